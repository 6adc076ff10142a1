-- The reports' projection (src/reports.rs), changed in the transaction of every order write.
-- Portable SQL (SQLite and PostgreSQL).

-- Orders placed per UTC day, currency and current status, and the sum of their totals in
-- thousandths of the currency unit (NUMERIC: exact on PostgreSQL whatever the sum).
CREATE TABLE IF NOT EXISTS order_sales_daily (
    day TEXT NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    orders BIGINT NOT NULL,
    amount_milli NUMERIC NOT NULL,
    PRIMARY KEY (day, currency, status)
);

-- Counters of the fulfilment report: lead-time histogram buckets, cancellations by cause,
-- saga outcomes, orders placed.
CREATE TABLE IF NOT EXISTS order_fulfilment_counts (
    metric TEXT NOT NULL,
    label TEXT NOT NULL,
    orders BIGINT NOT NULL,
    PRIMARY KEY (metric, label)
);

-- A row here asks the order service to fill the tables above from the orders and their events
-- (once, when it starts): a database upgraded with orders in it reports its past.
CREATE TABLE IF NOT EXISTS order_reports_backfill (pending BIGINT PRIMARY KEY);
INSERT INTO order_reports_backfill (pending) VALUES (1);
