-- Tamper evidence (commands::chain, docs/audit.md): each event's SHA-256, chained to the
-- previous event of its aggregate and computed by the append itself. Events written before
-- this migration get theirs from the backfill that runs right after the SQL migrations
-- (`commands::chain::backfill`), so no stored event is left unverifiable.
ALTER TABLE events ADD COLUMN hash text;

-- The backfill finds what it has left to chain through this (empty once it has run).
CREATE INDEX events_unchained ON events (aggregate_type, aggregate_id) WHERE hash IS NULL;
