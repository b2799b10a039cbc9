-- Workspace definitions: the validated spec as JSON, the SHA-256 of its canonical
-- form, and a revision that grows by one whenever the hash changes.
CREATE TABLE workspaces (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,           -- JSON (atelier_core::WorkspaceSpec)
    hash       TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- Secrets, sealed by the manager (AES-256-GCM, nonce || ciphertext, the name as
-- associated data) with the key in DATA/secret.key; never stored in the clear.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
