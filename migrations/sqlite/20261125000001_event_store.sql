-- The event store, in the shape sqlite-es reads and writes. The implicit rowid is the
-- global position: SQLite admits one writer at a time and rows are never deleted, so
-- rowid order is commit order and the feed needs no further guard.
CREATE TABLE events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       integer CHECK (sequence >= 0) NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        text                          NOT NULL,
    metadata       text                          NOT NULL,
    recorded_at    text                          NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TABLE email_reservations
(
    email       text PRIMARY KEY,
    user_id     text NOT NULL,
    reserved_at text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE projection_checkpoints
(
    name           text PRIMARY KEY,
    transaction_id integer NOT NULL DEFAULT 0,
    position       integer NOT NULL DEFAULT 0,
    updated_at     text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE users_view
(
    user_id       text PRIMARY KEY,
    email         text    NOT NULL,
    is_admin      integer NOT NULL DEFAULT 0,
    active        integer NOT NULL DEFAULT 1,
    registered_at text    NOT NULL,
    version       integer NOT NULL
) STRICT;

CREATE TABLE profiles_view
(
    user_id      text PRIMARY KEY,
    display_name text    NOT NULL,
    bio          text,
    avatar_url   text,
    location     text,
    website      text,
    version      integer NOT NULL,
    updated_at   text    NOT NULL
) STRICT;
