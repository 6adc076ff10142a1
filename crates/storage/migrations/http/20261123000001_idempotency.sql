-- Idempotency keys: the first response to a (caller, key) pair, replayed on retries.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    status_code BIGINT,
    headers TEXT,
    body TEXT,
    created_at TEXT NOT NULL,
    locked_at TEXT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
