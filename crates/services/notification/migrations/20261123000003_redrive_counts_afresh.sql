-- A redriven delivery gets its full number of attempts again; its attempt numbers go on (they
-- key its attempt history), so the attempts made before the redrive are kept here.
ALTER TABLE notifications ADD COLUMN attempts_before_redrive BIGINT NOT NULL DEFAULT 0;
