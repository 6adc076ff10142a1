-- The customer service's own tables (events, outbox, inbox and leases: storage's service
-- migrations). Portable SQL: the same file runs on SQLite and PostgreSQL.

-- The read model; one customer per email address.
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS customers_by_created ON customers (created_at DESC, id DESC);
