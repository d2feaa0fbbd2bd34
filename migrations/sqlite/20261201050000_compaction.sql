-- Where each daemon's event feed has read up to, refreshed while it runs.
-- Retention deletes a run's events only once every daemon with a live
-- (unexpired) position has read past all of them.
CREATE TABLE feed_positions (
    daemon     TEXT    NOT NULL CONSTRAINT feed_positions_pkey PRIMARY KEY,
    seq        INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

-- Runs deleted from the database whose blobs and logs are still to be
-- deleted from the blob store (retried at every retention pass).
CREATE TABLE run_purges (
    org        TEXT    NOT NULL,
    project    TEXT    NOT NULL,
    domain     TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    deleted_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT run_purges_pkey PRIMARY KEY (org, project, domain, name)
) STRICT;
