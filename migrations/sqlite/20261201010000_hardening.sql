-- Attempts use the full uint32 range of UpdateRequest.attempt: INTEGER
-- columns already hold 64 bits, so only the write path changes.

-- The latest ActionAddress an executor reported (flyteidl2.common.ActionAddress).
ALTER TABLE actions ADD COLUMN address BLOB NULL;
ALTER TABLE events ADD COLUMN address BLOB NULL;

-- Events carry what a task's default output location is computed from, so
-- that every ActionUpdate of a task, live or from a snapshot, reports it.
ALTER TABLE events ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN run_output_base TEXT NOT NULL DEFAULT '';
UPDATE events SET (kind, run_output_base) = (
    SELECT a.kind, a.run_output_base FROM actions a
    WHERE a.org = events.org AND a.project = events.project AND a.domain = events.domain
      AND a.run_name = events.run_name AND a.name = events.name
)
WHERE EXISTS (
    SELECT 1 FROM actions a
    WHERE a.org = events.org AND a.project = events.project AND a.domain = events.domain
      AND a.run_name = events.run_name AND a.name = events.name
);
