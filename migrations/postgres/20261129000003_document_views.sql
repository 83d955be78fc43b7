-- The documents read model (projection "documents"). `body` is the whole view as JSON;
-- the columns beside it are what reads filter and sort by: one document, the document
-- of a job, and an owner's documents newest first (keyset pagination).
CREATE TABLE document_views
(
    document_id uuid PRIMARY KEY,
    owner_id    uuid        NOT NULL,
    job_id      uuid,
    created_at  timestamptz NOT NULL,
    status      text        NOT NULL,
    body        jsonb       NOT NULL
);

CREATE INDEX document_views_owner ON document_views (owner_id, created_at DESC, document_id DESC);
CREATE INDEX document_views_job ON document_views (job_id);
