-- Leasing: executors take queued task actions under a lease. The same
-- columns and indexes as the Postgres migration; lease_deadline is INTEGER
-- microseconds since the Unix epoch (UTC), like every other time here.
-- ALTER TABLE ADD COLUMN keeps the tables STRICT.

ALTER TABLE actions ADD COLUMN run_output_base TEXT NOT NULL DEFAULT '';
-- The executor holding (or that last held) a lease; the lease is live
-- while lease_deadline is set.
ALTER TABLE actions ADD COLUMN lease_holder TEXT NULL;
ALTER TABLE actions ADD COLUMN lease_deadline INTEGER NULL;

-- Events say which queue and which executor they concern, so the pipeline
-- can wake lease streams and push cancellations without reading actions.
ALTER TABLE events ADD COLUMN queue TEXT NULL;
ALTER TABLE events ADD COLUMN lease_holder TEXT NULL;

CREATE INDEX actions_live_leases_idx ON actions (lease_holder) WHERE lease_deadline IS NOT NULL;
CREATE INDEX actions_lease_expiry_idx ON actions (lease_deadline) WHERE lease_deadline IS NOT NULL;
CREATE INDEX actions_condition_deadline_idx ON actions (deadline) WHERE phase = 9 AND kind = 3;
