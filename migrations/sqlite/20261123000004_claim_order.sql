-- Claims take queued task actions of a queue in the order (created_at,
-- name, org, project, domain, run_name): an index in exactly that order
-- lets a claim read the first rows and stop (the Postgres migration of the
-- same number does the same for its order).
DROP INDEX actions_queued_idx;
CREATE INDEX actions_queued_idx ON actions (queue, created_at, name, org, project, domain, run_name)
    WHERE phase = 1 AND kind = 1;
