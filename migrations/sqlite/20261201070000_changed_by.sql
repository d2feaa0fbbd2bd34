-- Who made each change: the authenticated principal that asked for it
-- (token name, client id, OIDC subject or task credential), when the daemon
-- requires authentication. NULL for changes the daemon makes itself (lease
-- expiry, condition timeouts, claims) and without authentication.
ALTER TABLE events ADD COLUMN changed_by text NULL;
