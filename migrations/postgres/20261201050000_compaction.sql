-- Where each daemon's event feed has read up to, refreshed while it runs.
-- Retention deletes a run's events only once every daemon with a live
-- (unexpired) position has read past all of them.
CREATE TABLE feed_positions (
    daemon     text        NOT NULL,
    xid        xid8        NOT NULL,
    seq        bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT feed_positions_pkey PRIMARY KEY (daemon)
);

-- Runs deleted from the database whose blobs and logs are still to be
-- deleted from the blob store (retried at every retention pass).
CREATE TABLE run_purges (
    org        text        NOT NULL,
    project    text        NOT NULL,
    domain     text        NOT NULL,
    name       text        NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT run_purges_pkey PRIMARY KEY (org, project, domain, name)
);
