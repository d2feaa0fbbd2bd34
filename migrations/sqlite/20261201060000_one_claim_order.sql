-- Claims take queued task actions of a queue in the order (created_at, org,
-- project, domain, run_name, name) on both backends; the index follows.
DROP INDEX actions_queued_idx;
CREATE INDEX actions_queued_idx ON actions (queue, created_at, org, project, domain, run_name, name)
    WHERE phase = 1 AND kind = 1;
