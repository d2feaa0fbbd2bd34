-- The read API's listings walk these orders with keyset pagination.
-- Listings of one run use the primary key; filters by phase or queue walk
-- this order and skip non-matching rows.
CREATE INDEX actions_listing_idx ON actions (created_at, org, project, domain, run_name, name);
CREATE INDEX runs_listing_idx ON runs (created_at, org, project, domain, name);
