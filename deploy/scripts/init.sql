-- VoiceGrow schema for a fresh MySQL/MariaDB database (run against the selected database,
-- e.g. from /docker-entrypoint-initdb.d with MYSQL_DATABASE set). Generated from
-- voicegrow/storage/migrations by voicegrow.storage.schema.render_init_sql; a test keeps
-- the two in step. The server applies any later migration itself at start-up.

CREATE TABLE IF NOT EXISTS schema_version (
    version INT NOT NULL,
    name VARCHAR(200) NOT NULL,
    applied_at DOUBLE NOT NULL,
    PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- 0001: devices, their sessions, the turns of each session and free-form events.
-- Written in MySQL/MariaDB dialect; voicegrow.storage.schema translates it for SQLite.
-- Times are unix seconds (DOUBLE). Ids compare bytewise (utf8mb4_bin), as in SQLite.

CREATE TABLE IF NOT EXISTS devices (
    device_id VARCHAR(128) NOT NULL,
    first_seen_at DOUBLE NOT NULL,
    last_seen_at DOUBLE NOT NULL,
    info_json TEXT NOT NULL,
    PRIMARY KEY (device_id),
    KEY devices_last_seen (last_seen_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS sessions (
    session_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(128) NOT NULL,
    protocol VARCHAR(32) NOT NULL,
    remote_addr VARCHAR(64) NOT NULL,
    started_at DOUBLE NOT NULL,
    ended_at DOUBLE NULL,
    end_reason VARCHAR(64) NULL,
    PRIMARY KEY (session_id),
    KEY sessions_device_time (device_id, started_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS turns (
    turn_id VARCHAR(64) NOT NULL,
    session_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(128) NOT NULL,
    started_at DOUBLE NOT NULL,
    transcript TEXT NOT NULL,
    reply_text TEXT NOT NULL,
    language VARCHAR(16) NOT NULL,
    timings_json TEXT NOT NULL,
    outcome VARCHAR(16) NOT NULL,
    error TEXT NULL,
    audio_in_key VARCHAR(512) NULL,
    audio_out_key VARCHAR(512) NULL,
    PRIMARY KEY (turn_id),
    KEY turns_device_time (device_id, started_at, turn_id),
    KEY turns_time (started_at, turn_id),
    KEY turns_session (session_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS events (
    event_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(128) NOT NULL,
    session_id VARCHAR(64) NULL,
    kind VARCHAR(64) NOT NULL,
    at DOUBLE NOT NULL,
    data_json TEXT NOT NULL,
    PRIMARY KEY (event_id),
    KEY events_device_time (device_id, at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- 0002: timers and alarms set through the tools, and the tool calls of each turn.
-- state: pending until fired, cancelled or dropped (the device stayed offline past the grace period).

CREATE TABLE IF NOT EXISTS timers (
    timer_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(128) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    due_at DOUBLE NOT NULL,
    created_at DOUBLE NOT NULL,
    label VARCHAR(200) NOT NULL,
    language VARCHAR(16) NOT NULL,
    duration_s INT NOT NULL,
    state VARCHAR(16) NOT NULL,
    fired_at DOUBLE NULL,
    PRIMARY KEY (timer_id),
    KEY timers_device_due (device_id, due_at),
    KEY timers_state_due (state, due_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

ALTER TABLE turns ADD COLUMN tool_calls_json TEXT NULL;

-- 0003: a listening mode set for one device through the admin API (NULL: none; the settings decide).

ALTER TABLE devices ADD COLUMN listen_mode VARCHAR(16) NULL;

INSERT IGNORE INTO schema_version (version, name, applied_at) VALUES (1, 'initial', UNIX_TIMESTAMP());
INSERT IGNORE INTO schema_version (version, name, applied_at) VALUES (2, 'tools', UNIX_TIMESTAMP());
INSERT IGNORE INTO schema_version (version, name, applied_at) VALUES (3, 'listen_mode', UNIX_TIMESTAMP());
