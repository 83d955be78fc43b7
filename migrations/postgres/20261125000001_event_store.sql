-- The event store. The first seven columns are the shape postgres-es reads and writes
-- (it names its insert columns, so the defaults below fill the rest).
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    -- Global order for the feed. Identity values are handed out at insert time, not at
    -- commit time, so the feed reads by (transaction_id, position) below the oldest
    -- running transaction (see commands::store::postgres).
    position       bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_feed_order ON events (transaction_id, position);

-- One email, one account: the set-validation guard that no aggregate can give.
-- `email` is the canonical (lower-case) form.
CREATE TABLE email_reservations
(
    email       text PRIMARY KEY,
    user_id     uuid        NOT NULL,
    reserved_at timestamptz NOT NULL DEFAULT now()
);

-- Where each projection has got to in the feed.
CREATE TABLE projection_checkpoints
(
    name           text PRIMARY KEY,
    transaction_id bigint      NOT NULL DEFAULT 0,
    position       bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Read model: users, for the admin list and per-user reads.
CREATE TABLE users_view
(
    user_id       uuid PRIMARY KEY,
    email         text        NOT NULL,
    is_admin      boolean     NOT NULL DEFAULT false,
    active        boolean     NOT NULL DEFAULT true,
    registered_at timestamptz NOT NULL,
    version       bigint      NOT NULL
);

-- Read model: profiles.
CREATE TABLE profiles_view
(
    user_id      uuid PRIMARY KEY,
    display_name text        NOT NULL,
    bio          text,
    avatar_url   text,
    location     text,
    website      text,
    version      bigint      NOT NULL,
    updated_at   timestamptz NOT NULL
);
