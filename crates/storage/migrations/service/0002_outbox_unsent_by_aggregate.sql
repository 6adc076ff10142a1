-- The unsent rows of an aggregate, found through an index of unsent rows only: the relay's
-- checks and the insert's "was another row of this aggregate waiting" look up a few entries
-- whatever the planner's statistics say. (Through the index of all rows by aggregate, a
-- planner without statistics, such as after a restore or before the first ANALYZE, read the
-- whole outbox per insert instead.) No query needs the aggregate's sent rows.
DROP INDEX IF EXISTS outbox_by_aggregate;
CREATE INDEX IF NOT EXISTS outbox_unsent_by_aggregate ON outbox (aggregate_id, aggregate_version)
    WHERE sent_at IS NULL;
