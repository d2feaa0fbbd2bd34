-- Finished roots by end time, for the retention pass.
CREATE INDEX actions_finished_roots_idx ON actions (end_time) WHERE parent_name IS NULL;
