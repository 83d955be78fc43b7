-- 1. One account per email, decided by the transaction that appends `UserRegistered`
-- (see the Postgres migration of the same name for the why). The trigger's insert runs in
-- the append's transaction; a duplicate email aborts the append.

DELETE FROM email_reservations
 WHERE NOT EXISTS (SELECT 1 FROM events e
                    WHERE e.aggregate_type = 'user' AND e.event_type = 'UserRegistered'
                      AND e.aggregate_id = email_reservations.user_id);

INSERT INTO email_reservations (email, user_id, reserved_at)
SELECT json_extract(e.payload, '$.UserRegistered.email'), e.aggregate_id, e.recorded_at
  FROM events e
 WHERE e.aggregate_type = 'user' AND e.event_type = 'UserRegistered'
 ORDER BY e.rowid
ON CONFLICT (email) DO NOTHING;

CREATE TRIGGER events_claim_email
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN NEW.aggregate_type = 'user' AND NEW.event_type = 'UserRegistered'
BEGIN
    INSERT INTO email_reservations (email, user_id, reserved_at)
    VALUES (json_extract(NEW.payload, '$.UserRegistered.email'), NEW.aggregate_id, NEW.recorded_at);
END;

-- 2. Projection driver leases (see the Postgres migration). They replace an in-process
-- mutex, so a `karmic` CLI beside a running `karmic serve` is held off too. `lease_until`
-- is in milliseconds since the Unix epoch.
ALTER TABLE projection_checkpoints ADD COLUMN lease_owner text;
ALTER TABLE projection_checkpoints ADD COLUMN lease_until integer;
