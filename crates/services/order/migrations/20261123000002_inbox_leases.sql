-- What consumer groups of this service have processed (redelivery has no second effect), and
-- leases (one active outbox relay per service).
CREATE TABLE IF NOT EXISTS inbox (
    group_name TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (group_name, message_id)
);

CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
