-- The order service's own tables (events, outbox, inbox and leases: storage's service
-- migrations). Portable SQL: the same file runs on SQLite and PostgreSQL.

-- The read model: one row per order, its current state as JSON in `document`.
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    total TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_created ON orders (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS order_items (
    order_id TEXT NOT NULL,
    line_no BIGINT NOT NULL,
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    unit_price TEXT NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
CREATE INDEX IF NOT EXISTS order_items_by_sku ON order_items (sku);
