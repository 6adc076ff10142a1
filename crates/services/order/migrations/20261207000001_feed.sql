-- The order feed: every order event numbered in the order the feeder saw it committed, across
-- orders, so a stream of many orders (a customer's, or all) resumes after a number with no gap
-- and no repeat. The feeder (one process at a time, under a lease) numbers events after they
-- committed; the write path does not change. Portable SQL (SQLite and PostgreSQL).
ALTER TABLE events ADD COLUMN feed_position BIGINT;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_feed_position ON events (feed_position);
CREATE INDEX IF NOT EXISTS events_unfed ON events (occurred_at) WHERE feed_position IS NULL;
