-- 1. One account per email, decided by the transaction that appends `UserRegistered`.
--
-- Until now a registration reserved its email in a statement of its own, before the
-- append. A COMMIT whose acknowledgement was lost released the reservation of a user who
-- was in fact registered, and a slow append could lose its reservation to a time-based
-- take-over. Now the row is written by a trigger in the append's own transaction: both
-- commit or neither does, and the primary key refuses a second account for the email.
-- `email` is the canonical form the domain writes into the event (trimmed, lower-case).

-- Reservations whose registration never committed.
DELETE FROM email_reservations r
 WHERE NOT EXISTS (SELECT 1 FROM events e
                    WHERE e.aggregate_type = 'user' AND e.event_type = 'UserRegistered'
                      AND e.aggregate_id = r.user_id::text);

-- Registered users whose reservation was released by a lost COMMIT acknowledgement get
-- their email back (the earliest registration wins if the old race admitted two).
INSERT INTO email_reservations (email, user_id, reserved_at)
SELECT DISTINCT ON (e.payload -> 'UserRegistered' ->> 'email')
       e.payload -> 'UserRegistered' ->> 'email', e.aggregate_id::uuid, e.recorded_at
  FROM events e
 WHERE e.aggregate_type = 'user' AND e.event_type = 'UserRegistered'
 ORDER BY e.payload -> 'UserRegistered' ->> 'email', e.transaction_id, e.position
ON CONFLICT (email) DO NOTHING;

CREATE FUNCTION karmic_claim_email() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    -- A duplicate raises unique_violation (23505) and aborts the append.
    INSERT INTO email_reservations (email, user_id, reserved_at)
    VALUES (NEW.payload -> 'UserRegistered' ->> 'email', NEW.aggregate_id::uuid, NEW.recorded_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_claim_email
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'user' AND NEW.event_type = 'UserRegistered')
EXECUTE FUNCTION karmic_claim_email();

-- 2. Projection driver leases.
--
-- A driver used to hold a session-level advisory lock on a pooled connection for a whole
-- batch. A frozen or destroyed Lambda container kept that lock until TCP keepalive noticed
-- (hours), and the held connection made small pools deadlock. A lease is a row: it costs no
-- connection while held and expires on its own (database clock). The checkpoint only
-- moves by compare-and-set from the position its driver read, so a driver whose lease ran
-- out can neither move it backwards nor skip what another driver applied.
ALTER TABLE projection_checkpoints
    ADD COLUMN lease_owner uuid,
    ADD COLUMN lease_until timestamptz;
