-- actions_children_idx shares its first four columns with actions_pkey, so
-- a lookup by full key (the batch prefetches, the parent foreign key's
-- check on every insert) could be planned on it, reading every action of
-- the run and filtering on name. On a table that autovacuum has not yet
-- analyzed the two indexes cost the same to the planner, and it chose the
-- children index: an Enqueue then read the whole run, hundreds of pages
-- per statement in a run of a few thousand actions. Indexing only child
-- rows (parent_name IS NOT NULL) leaves the children index to the queries
-- that name a parent, whose `parent_name = …` implies the predicate, and
-- every full-key lookup to the primary key, whatever the statistics say.
-- The index is rebuilt in this migration's transaction, which locks the
-- table while it runs.
DROP INDEX actions_children_idx;
CREATE INDEX actions_children_idx ON actions (org, project, domain, run_name, parent_name)
    WHERE parent_name IS NOT NULL;
