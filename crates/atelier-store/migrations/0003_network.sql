-- Egress policy of each sandbox, in its text form: allow-all, deny-all, or a
-- comma-separated domain allow-list.
ALTER TABLE sandboxes ADD COLUMN egress TEXT NOT NULL DEFAULT 'allow-all';

-- The persisted IP pool: one guest address per sandbox, held until it is deleted.
CREATE TABLE ip_leases (
    address    TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL UNIQUE REFERENCES sandboxes(id),
    created_at INTEGER NOT NULL
);

-- Dev commands the agent supervises; the proxy routes dev-{name}-{id} to `port`.
CREATE TABLE dev_commands (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,           -- JSON: command, port, cwd, env, restart
    created_at INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, name)
);

-- Browser sessions for the proxy (cookie value hashed, like API tokens).
CREATE TABLE sessions (
    sha256     TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
