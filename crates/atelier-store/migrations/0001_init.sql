CREATE TABLE sandboxes (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    image       TEXT NOT NULL,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    error       TEXT,
    boot_ms     INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- A name is unique among sandboxes that still exist.
CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes(name) WHERE state <> 'deleted';

CREATE TABLE sandbox_transitions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id),
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    reason      TEXT,
    at          INTEGER NOT NULL
);
CREATE INDEX sandbox_transitions_by_sandbox ON sandbox_transitions(sandbox_id, seq);

-- The resource journal: every host resource is written here before it is made,
-- and removed only after it has been reclaimed.
CREATE TABLE resources (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    locator     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE(kind, locator)
);
CREATE INDEX resources_by_sandbox ON resources(sandbox_id);

CREATE TABLE api_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    sha256      TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE settings (
    key         TEXT PRIMARY KEY NOT NULL,
    value       TEXT NOT NULL
);
