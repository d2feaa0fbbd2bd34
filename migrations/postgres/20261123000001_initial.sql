-- actionsd schema: runs, actions and the append-only event log.

CREATE TABLE runs (
    org                    text        NOT NULL,
    project                text        NOT NULL,
    domain                 text        NOT NULL,
    name                   text        NOT NULL,
    root_name              text        NOT NULL,
    -- RunSpec bytes exactly as received with the root's Enqueue.
    run_spec               bytea       NOT NULL,
    queue                  text        NULL,
    max_action_concurrency integer     NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT runs_pkey PRIMARY KEY (org, project, domain, name)
);

CREATE TABLE actions (
    org            text        NOT NULL,
    project        text        NOT NULL,
    domain         text        NOT NULL,
    run_name       text        NOT NULL,
    name           text        NOT NULL,
    parent_name    text        NULL,
    kind           smallint    NOT NULL,
    phase          smallint    NOT NULL,
    attempt        integer     NOT NULL DEFAULT 1,
    version        bigint      NOT NULL DEFAULT 1,
    -- The Action message as enqueued.
    spec           bytea       NOT NULL,
    queue          text        NULL,
    output_uri     text        NOT NULL DEFAULT '',
    error          bytea       NULL,
    value          bytea       NULL,
    condition_type integer     NULL,
    deadline       timestamptz NULL,
    start_time     timestamptz NULL,
    end_time       timestamptz NULL,
    abort_reason   text        NULL,
    aborted_by     bytea       NULL,
    signalled_by   bytea       NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT actions_pkey PRIMARY KEY (org, project, domain, run_name, name),
    CONSTRAINT actions_run_fkey FOREIGN KEY (org, project, domain, run_name)
        REFERENCES runs (org, project, domain, name),
    CONSTRAINT actions_parent_fkey FOREIGN KEY (org, project, domain, run_name, parent_name)
        REFERENCES actions (org, project, domain, run_name, name),
    CONSTRAINT actions_kind_check CHECK (kind BETWEEN 1 AND 3),
    CONSTRAINT actions_phase_check CHECK (phase BETWEEN 1 AND 10),
    CONSTRAINT actions_attempt_check CHECK (attempt >= 1)
);

-- Children of a parent (watch snapshots, abort cascades).
CREATE INDEX actions_children_idx ON actions (org, project, domain, run_name, parent_name);
-- Queued task actions per queue, oldest first (executors).
CREATE INDEX actions_queued_idx ON actions (queue, created_at) WHERE phase = 1 AND kind = 1;

-- One row per accepted change. `xid` is the writing transaction's id: the
-- event feed reads only rows of transactions that have finished (below the
-- oldest running transaction), ordered by (xid, seq), so no row is skipped
-- when transactions commit out of sequence order.
CREATE TABLE events (
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    org         text        NOT NULL,
    project     text        NOT NULL,
    domain      text        NOT NULL,
    run_name    text        NOT NULL,
    name        text        NOT NULL,
    parent_name text        NULL,
    version     bigint      NOT NULL,
    phase       smallint    NOT NULL,
    attempt     integer     NOT NULL,
    output_uri  text        NOT NULL,
    error       bytea       NULL,
    value       bytea       NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_pkey PRIMARY KEY (seq)
);

CREATE INDEX events_feed_idx ON events (xid, seq);
CREATE INDEX events_action_idx ON events (org, project, domain, run_name, name, version);
