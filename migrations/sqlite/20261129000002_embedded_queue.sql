-- The embedded job queue (`karmic serve` without SQS): SQS's semantics over a table.
-- A message is visible when `visible_at` (ms since the epoch) has passed; receiving it
-- hides it for the visibility timeout, counts the receive and hands out a new receipt
-- handle (only the latest one may delete it or change its visibility). A message
-- received more than the queue's maximum is moved to the dead-letter queue instead.
CREATE TABLE queue_messages
(
    id            TEXT PRIMARY KEY,
    queue         TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    sent_at       INTEGER NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt       TEXT
);

CREATE INDEX queue_messages_visible ON queue_messages (queue, visible_at, sent_at);
CREATE UNIQUE INDEX queue_messages_receipt ON queue_messages (receipt);
