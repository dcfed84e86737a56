-- 0003: a listening mode set for one device through the admin API (NULL: none; the settings decide).

ALTER TABLE devices ADD COLUMN listen_mode VARCHAR(16) NULL;
