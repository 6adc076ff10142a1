-- The payment service's own tables (events, outbox, inbox and leases: storage's service
-- migrations). Portable SQL: the same file runs on SQLite and PostgreSQL.

-- One payment per order. `status`: pending (details recorded, waiting for stock),
-- authorizing (a charge is due or in flight), succeeded, failed, cancelled.
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL UNIQUE,
    customer_id TEXT,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    method TEXT NOT NULL,
    token TEXT NOT NULL,
    status TEXT NOT NULL,
    refunded TEXT NOT NULL,
    cancel_requested BIGINT NOT NULL,
    provider_ref TEXT,
    failure_reason TEXT,
    deadline_at TEXT,
    attempts BIGINT NOT NULL,
    next_attempt_at TEXT,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS payments_due ON payments (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS payments_newest ON payments (created_at, id);

-- Refunds of a succeeded payment. `status`: pending (due or in flight), succeeded, failed.
CREATE TABLE IF NOT EXISTS refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    reason TEXT NOT NULL,
    status TEXT NOT NULL,
    provider_ref TEXT,
    failure_reason TEXT,
    attempts BIGINT NOT NULL,
    next_attempt_at TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS refunds_by_payment ON refunds (payment_id, created_at);
CREATE INDEX IF NOT EXISTS refunds_due ON refunds (status, next_attempt_at);
