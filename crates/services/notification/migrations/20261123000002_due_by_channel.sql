-- The worker claims due deliveries of the channels whose breaker lets calls through: without
-- the channel in the index, a backlog held by an open breaker is scanned on every claim.
CREATE INDEX IF NOT EXISTS notifications_due_by_channel ON notifications (status, channel, next_attempt_at);
