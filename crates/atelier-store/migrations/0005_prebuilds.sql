-- Prebuilds: a workspace booted, cloned, initialised and snapshotted (disk + memory).
CREATE TABLE prebuilds (
    id         TEXT PRIMARY KEY,          -- pb-xxxxxxxxxx; its directory is pool/prebuilds/<id>
    workspace  TEXT NOT NULL,
    revision   INTEGER NOT NULL,          -- the workspace revision it was built from
    status     TEXT NOT NULL,             -- building, ready, failed
    commits    TEXT NOT NULL DEFAULT '{}',-- JSON: repo path -> commit hash
    stale      INTEGER NOT NULL DEFAULT 0,-- a repo moved on since (set by the checker)
    size_bytes INTEGER,
    error      TEXT,
    created_at INTEGER NOT NULL,
    ready_at   INTEGER
);
CREATE INDEX prebuilds_by_workspace ON prebuilds (workspace, created_at);

-- The workspace a sandbox was spawned from (its secrets and dev commands).
ALTER TABLE sandboxes ADD COLUMN workspace TEXT;
