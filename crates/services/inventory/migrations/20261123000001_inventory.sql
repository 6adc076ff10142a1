-- The inventory service's own tables (events, outbox, inbox and leases: storage's service
-- migrations). Portable SQL: the same file runs on SQLite and PostgreSQL.

CREATE TABLE IF NOT EXISTS products (
    sku TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    price TEXT NOT NULL,
    currency TEXT NOT NULL,
    on_hand BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    CHECK (reserved >= 0 AND reserved <= on_hand)
);

-- What each order holds; released on cancellation or a failed payment.
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (order_id, sku)
);
