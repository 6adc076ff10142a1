-- The worker looks up pending deliveries, and operators list dead ones; sent deliveries, nearly
-- all of them, are never looked up by status. Partial indexes hold only the rows looked up, so
-- a delivery recorded as sent adds no entry to them (each delivery's update used to add one to
-- both of the indexes on status), and they stay as small as the backlog.
DROP INDEX IF EXISTS notifications_due;
DROP INDEX IF EXISTS notifications_due_by_channel;
CREATE INDEX IF NOT EXISTS notifications_pending ON notifications (channel, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS notifications_dead ON notifications (updated_at, id)
    WHERE status = 'dead';
