-- The documents read model (projection "documents"). `body` is the whole view as JSON;
-- the columns beside it are what reads filter and sort by: one document, the document
-- of a job, and an owner's documents newest first (keyset pagination). `created_at` is
-- RFC 3339 UTC with a fixed number of digits, so text order is time order.
CREATE TABLE document_views
(
    document_id text PRIMARY KEY,
    owner_id    text NOT NULL,
    job_id      text,
    created_at  text NOT NULL,
    status      text NOT NULL,
    body        text NOT NULL
) STRICT;

CREATE INDEX document_views_owner ON document_views (owner_id, created_at DESC, document_id DESC);
CREATE INDEX document_views_job ON document_views (job_id);
