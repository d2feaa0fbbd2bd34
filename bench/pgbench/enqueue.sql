-- The writes of one Enqueue of a child task action, without its rule
-- checks: insert the action (~1 KiB) and its event in one transaction, no
-- NOTIFY. Each client enqueues under its own run's root.
\set n random(1, 1000000000000)
BEGIN;
INSERT INTO ceiling.actions (org, project, domain, run_name, name, parent_name, kind, phase, spec,
        queue, output_uri, condition_type, deadline, run_output_base)
    VALUES ('', 'bench', 'development', 'p' || :client_id, 'c' || :n, 'a0', 1, 1,
        convert_to(repeat('x', 1000), 'UTF8'), 'default', '', NULL, NULL, 's3://bench/p' || :client_id)
    ON CONFLICT DO NOTHING;
INSERT INTO ceiling.events (org, project, domain, run_name, name, parent_name, version, phase,
        attempt, output_uri, error, value, queue, lease_holder)
    VALUES ('', 'bench', 'development', 'p' || :client_id, 'c' || :n, 'a0', 1, 1, 1, '', NULL, NULL,
        'default', NULL);
END;
