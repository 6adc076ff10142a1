-- A charge that failed without an answer from the provider (timed out, or the provider kept
-- failing until the deadline) may still have been made: `unresolved` marks it until the
-- provider has been asked what became of it (and a charge it made has been refunded).
ALTER TABLE payments ADD COLUMN unresolved BIGINT NOT NULL DEFAULT 0;
