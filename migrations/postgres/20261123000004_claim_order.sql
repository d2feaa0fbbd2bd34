-- Claims take queued task actions of a queue in the order (created_at, org,
-- project, domain, run_name, name). An index in exactly that order lets a
-- claim read the first rows and stop, whatever the planner's statistics
-- say; with (queue, created_at) alone a queue filled faster than
-- autovacuum analyzes it was planned as empty and sorted in full on every
-- claim.
DROP INDEX actions_queued_idx;
CREATE INDEX actions_queued_idx ON actions (queue, created_at, org, project, domain, run_name, name)
    WHERE phase = 1 AND kind = 1;
