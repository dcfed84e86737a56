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
