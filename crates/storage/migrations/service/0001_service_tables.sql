-- Tables every service has, whatever it owns: its event store, its outbox, its inbox and its
-- leases. Portable SQL: the same file runs on SQLite and PostgreSQL.

-- Every fact about every aggregate; (aggregate_id, version) is the optimistic-concurrency guard.
CREATE TABLE IF NOT EXISTS events (
    aggregate_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    PRIMARY KEY (aggregate_id, version)
);

-- Messages to publish, written in the same transaction as the events that caused them.
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (created_at) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_by_aggregate ON outbox (aggregate_id, aggregate_version);

-- What this service's consumer groups have processed: a redelivery has no second effect.
CREATE TABLE IF NOT EXISTS inbox (
    group_name TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (group_name, message_id)
);

-- At most one holder of a role at a time (the service's outbox relay).
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
