-- The notification service's own tables (events, outbox, inbox and leases: storage's service
-- migrations). Portable SQL: the same file runs on SQLite and PostgreSQL.

-- Templates by key `<event type>.<channel>` (order.shipped.email). Rendered with minijinja.
CREATE TABLE IF NOT EXISTS notification_templates (
    template_key TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    subject TEXT NOT NULL,
    text_body TEXT NOT NULL,
    html_body TEXT,
    version BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);

-- One delivery per (event, channel). `status`: pending (due or in flight), sent, failed
-- (permanent provider error or invalid recipient), dead (retries exhausted; redrivable).
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    channel TEXT NOT NULL,
    recipient TEXT NOT NULL,
    customer_id TEXT,
    order_id TEXT,
    template_key TEXT,
    subject TEXT NOT NULL,
    text_body TEXT NOT NULL,
    html_body TEXT,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_attempt_at TEXT,
    last_error TEXT,
    provider_ref TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (event_id, channel)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS notifications_newest ON notifications (created_at, id);
CREATE INDEX IF NOT EXISTS notifications_by_order ON notifications (order_id, created_at);
CREATE INDEX IF NOT EXISTS notifications_by_customer ON notifications (customer_id, created_at);

-- Every attempt at sending, with the provider's answer.
CREATE TABLE IF NOT EXISTS notification_attempts (
    notification_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (notification_id, attempt)
);
