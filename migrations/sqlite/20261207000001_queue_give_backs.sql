-- How often a message was given back (a receive that did no work, see
-- worker::queue::JobQueue::give_back): its own backoff, and its limit.
ALTER TABLE queue_messages ADD COLUMN given_back INTEGER NOT NULL DEFAULT 0;
