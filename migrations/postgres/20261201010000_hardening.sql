-- Attempts use the full uint32 range of UpdateRequest.attempt.
ALTER TABLE actions ALTER COLUMN attempt TYPE bigint;
ALTER TABLE events ALTER COLUMN attempt TYPE bigint;
ALTER TABLE actions ADD CONSTRAINT actions_attempt_max_check CHECK (attempt <= 4294967295);

-- The latest ActionAddress an executor reported (flyteidl2.common.ActionAddress).
ALTER TABLE actions ADD COLUMN address bytea NULL;
ALTER TABLE events ADD COLUMN address bytea NULL;

-- Events carry what a task's default output location is computed from, so
-- that every ActionUpdate of a task, live or from a snapshot, reports it.
ALTER TABLE events ADD COLUMN kind smallint NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN run_output_base text NOT NULL DEFAULT '';
UPDATE events e SET kind = a.kind, run_output_base = a.run_output_base
FROM actions a
WHERE (a.org, a.project, a.domain, a.run_name, a.name) = (e.org, e.project, e.domain, e.run_name, e.name);
