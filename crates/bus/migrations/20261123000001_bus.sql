-- The embedded bus: one durable log, read by consumer groups at their own offsets.
-- Portable SQL: the same file runs on SQLite (bus.db) and PostgreSQL (schema bus).

-- Hands out log positions. Publishers update its one row inside their transaction, so they
-- are serialized and positions become visible in order: a reader never sees 11 before 10.
CREATE TABLE IF NOT EXISTS bus_sequence (
    id BIGINT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
INSERT INTO bus_sequence (id, last_seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS bus_log (
    seq BIGINT PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    message_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    published_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS bus_log_by_topic ON bus_log (topic, seq);

-- How far each consumer group has read.
CREATE TABLE IF NOT EXISTS bus_offsets (
    group_name TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- Messages a group gave up on after its last attempt; an operator redrives or discards them.
CREATE TABLE IF NOT EXISTS bus_dead_letters (
    id TEXT PRIMARY KEY,
    group_name TEXT NOT NULL,
    seq BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    failed_at TEXT NOT NULL,
    redrive_requested_at TEXT
);
CREATE INDEX IF NOT EXISTS bus_dead_letters_by_group ON bus_dead_letters (group_name, failed_at);
