-- actionsd schema for the embedded SQLite store: runs, actions and the
-- append-only event log. The same tables, columns and constraint names as
-- the Postgres schema, in SQLite's dialect:
-- - times are INTEGER microseconds since the Unix epoch (UTC), so they sort
--   and compare as numbers (`deadline <= now` for the condition reaper);
-- - bytes are BLOB, small integers INTEGER;
-- - tables are STRICT, so a value of the wrong type is refused as in
--   Postgres instead of being stored as given.

CREATE TABLE runs (
    org                    TEXT    NOT NULL,
    project                TEXT    NOT NULL,
    domain                 TEXT    NOT NULL,
    name                   TEXT    NOT NULL,
    root_name              TEXT    NOT NULL,
    -- RunSpec bytes exactly as received with the root's Enqueue.
    run_spec               BLOB    NOT NULL,
    queue                  TEXT    NULL,
    max_action_concurrency INTEGER NOT NULL DEFAULT 0,
    created_at             INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT runs_pkey PRIMARY KEY (org, project, domain, name)
) STRICT;

CREATE TABLE actions (
    org            TEXT    NOT NULL,
    project        TEXT    NOT NULL,
    domain         TEXT    NOT NULL,
    run_name       TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    parent_name    TEXT    NULL,
    kind           INTEGER NOT NULL,
    phase          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL DEFAULT 1,
    version        INTEGER NOT NULL DEFAULT 1,
    -- The Action message as enqueued.
    spec           BLOB    NOT NULL,
    queue          TEXT    NULL,
    output_uri     TEXT    NOT NULL DEFAULT '',
    error          BLOB    NULL,
    value          BLOB    NULL,
    condition_type INTEGER NULL,
    deadline       INTEGER NULL,
    start_time     INTEGER NULL,
    end_time       INTEGER NULL,
    abort_reason   TEXT    NULL,
    aborted_by     BLOB    NULL,
    signalled_by   BLOB    NULL,
    created_at     INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    updated_at     INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    CONSTRAINT actions_pkey PRIMARY KEY (org, project, domain, run_name, name),
    CONSTRAINT actions_run_fkey FOREIGN KEY (org, project, domain, run_name)
        REFERENCES runs (org, project, domain, name),
    CONSTRAINT actions_parent_fkey FOREIGN KEY (org, project, domain, run_name, parent_name)
        REFERENCES actions (org, project, domain, run_name, name),
    CONSTRAINT actions_kind_check CHECK (kind BETWEEN 1 AND 3),
    CONSTRAINT actions_phase_check CHECK (phase BETWEEN 1 AND 10),
    CONSTRAINT actions_attempt_check CHECK (attempt >= 1)
) STRICT;

-- Children of a parent (watch snapshots, abort cascades).
CREATE INDEX actions_children_idx ON actions (org, project, domain, run_name, parent_name);
-- Queued task actions per queue, oldest first (executors).
CREATE INDEX actions_queued_idx ON actions (queue, created_at) WHERE phase = 1 AND kind = 1;

-- One row per accepted change. SQLite runs one write transaction at a
-- time, so `seq` order is commit order and the event feed reads
-- `seq > cursor` without a gap. Unlike Postgres there is no transaction id
-- column, and `seq` (the rowid) needs no separate feed index.
-- AUTOINCREMENT: a `seq` is never reused, even after the newest events
-- are deleted.
CREATE TABLE events (
    seq         INTEGER CONSTRAINT events_pkey PRIMARY KEY AUTOINCREMENT,
    org         TEXT    NOT NULL,
    project     TEXT    NOT NULL,
    domain      TEXT    NOT NULL,
    run_name    TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    parent_name TEXT    NULL,
    version     INTEGER NOT NULL,
    phase       INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    output_uri  TEXT    NOT NULL,
    error       BLOB    NULL,
    value       BLOB    NULL,
    created_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;

CREATE INDEX events_action_idx ON events (org, project, domain, run_name, name, version);
