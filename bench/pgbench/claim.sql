-- One executor claim: lease the 10 oldest queued task actions, skipping
-- rows other claimers hold, moving each to INITIALIZING with an event, in
-- one statement (one transaction).
WITH picked AS (
    SELECT org, project, domain, run_name, name FROM ceiling.actions
    WHERE queue = 'default' AND phase = 1 AND kind = 1
    ORDER BY created_at LIMIT 10 FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE ceiling.actions a SET phase = 3, lease_holder = 'pgbench-' || :client_id,
        lease_deadline = now() + interval '30 seconds', version = a.version + 1, updated_at = now()
    FROM picked p
    WHERE (a.org, a.project, a.domain, a.run_name, a.name) = (p.org, p.project, p.domain, p.run_name, p.name)
    RETURNING a.*
)
INSERT INTO ceiling.events (org, project, domain, run_name, name, parent_name, version, phase,
        attempt, output_uri, error, value, queue, lease_holder)
    SELECT org, project, domain, run_name, name, parent_name, version, phase, attempt, output_uri,
        error, value, queue, lease_holder FROM changed;
