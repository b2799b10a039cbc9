-- Browser sessions, replacing 0003's `sessions` (whose cookies were set for the
-- whole wildcard domain: every sandbox page could receive them). They are dropped
-- so that every browser signs in again under the new scheme.
DROP TABLE IF EXISTS sessions;

-- A `manager` session lives on the manager's own origin and can only mint `proxy`
-- sessions; a `proxy` session is bound to one sandbox host and only opens it.
-- Revoking a manager session or the API token that created a session revokes
-- everything made from it.
CREATE TABLE browser_sessions (
    id          TEXT PRIMARY KEY NOT NULL,      -- public id: list, revoke
    sha256      TEXT NOT NULL UNIQUE,           -- hash of the cookie value
    kind        TEXT NOT NULL,                  -- 'manager' or 'proxy'
    host        TEXT,                           -- proxy: the host it opens (lowercase, no port)
    parent_id   TEXT,                           -- proxy: the manager session that made it
    token_id    INTEGER,                        -- the API token that signed in
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX browser_sessions_by_parent ON browser_sessions(parent_id);
CREATE INDEX browser_sessions_by_token ON browser_sessions(token_id);
