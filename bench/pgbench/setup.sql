-- Tables for pgbench's ceiling runs: copies of actionsd's own tables (with
-- their indexes, defaults and foreign keys) in a schema of their own, so
-- the daemon's rows and pgbench's never meet. Run by actionsd-bench on the
-- bench database after the daemon has applied its migrations.
DROP SCHEMA IF EXISTS ceiling CASCADE;
CREATE SCHEMA ceiling;
CREATE TABLE ceiling.runs (LIKE public.runs INCLUDING ALL);
CREATE TABLE ceiling.actions (LIKE public.actions INCLUDING ALL);
ALTER TABLE ceiling.actions
    ADD CONSTRAINT actions_run_fkey FOREIGN KEY (org, project, domain, run_name)
        REFERENCES ceiling.runs (org, project, domain, name),
    ADD CONSTRAINT actions_parent_fkey FOREIGN KEY (org, project, domain, run_name, parent_name)
        REFERENCES ceiling.actions (org, project, domain, run_name, name);
CREATE TABLE ceiling.events (LIKE public.events INCLUDING ALL);
-- One run with a running root action per pgbench client (ids 0..255).
INSERT INTO ceiling.runs (org, project, domain, name, root_name, run_spec)
    SELECT '', 'bench', 'development', 'p' || i, 'a0', '' FROM generate_series(0, 255) i;
INSERT INTO ceiling.actions (org, project, domain, run_name, name, kind, phase, spec)
    SELECT '', 'bench', 'development', 'p' || i, 'a0', 1, 4, '' FROM generate_series(0, 255) i;
