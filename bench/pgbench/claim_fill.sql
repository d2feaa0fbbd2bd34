-- Queues $1 task actions (~1 KiB each) for the claim script, oldest first.
INSERT INTO ceiling.actions (org, project, domain, run_name, name, parent_name, kind, phase, spec,
        queue, created_at)
    SELECT '', 'bench', 'development', 'p' || (i % 256), 'q' || i, 'a0', 1, 1,
        convert_to(repeat('x', 1000), 'UTF8'), 'default',
        now() + i * interval '1 microsecond'
    FROM generate_series(1, $1::bigint) i
