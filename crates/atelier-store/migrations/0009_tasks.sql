-- Tasks: a prompt run by OpenCode in a sandbox of its own, on a branch of its own.
CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,   -- tk-xxxxxxxxxx
    workspace    TEXT NOT NULL,
    template     TEXT NOT NULL,
    effort       TEXT NOT NULL,               -- low, medium, high, max
    title        TEXT NOT NULL,
    description  TEXT NOT NULL,
    state        TEXT NOT NULL,               -- see atelier_core::task::TaskState
    parent       TEXT,                        -- the task it was chained from
    branch       TEXT NOT NULL,               -- atelier/<id>-<slug> (or the parent's)
    base_branch  TEXT NOT NULL,               -- what the branch started from
    base_commit  TEXT,                        -- its commit when the task started
    repo_path    TEXT,                        -- guest path of the repository
    sandbox      TEXT,                        -- sandbox id while it has one
    session      TEXT,                        -- OpenCode session id
    parked       INTEGER NOT NULL DEFAULT 0,  -- sandbox paused while waiting on a person
    error        TEXT,
    todos_done   INTEGER NOT NULL DEFAULT 0,
    todos_total  INTEGER NOT NULL DEFAULT 0,
    todos        TEXT NOT NULL DEFAULT '[]',  -- JSON [{content, status}]
    files        TEXT NOT NULL DEFAULT '[]',  -- JSON [path]: files the agent edited
    messages     INTEGER NOT NULL DEFAULT 0,
    tokens_in    INTEGER NOT NULL DEFAULT 0,
    tokens_out   INTEGER NOT NULL DEFAULT 0,
    cost         REAL NOT NULL DEFAULT 0,
    summary      TEXT,                        -- the agent's last text
    always       TEXT NOT NULL DEFAULT '[]',  -- JSON [{permission, patterns}]: "always" answers
    pending_say  TEXT NOT NULL DEFAULT '[]',  -- JSON [text]: follow-ups queued while busy
    diff         TEXT,                        -- the branch's diff vs its base (kept)
    diff_truncated INTEGER NOT NULL DEFAULT 0,
    commits      TEXT NOT NULL DEFAULT '[]',  -- JSON [{id, subject}]
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    finished_at  INTEGER,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX tasks_by_state ON tasks (state, created_at);
CREATE INDEX tasks_by_workspace ON tasks (workspace, created_at);

-- Permission requests and questions (and stalled warnings): stored when they
-- appear, re-synchronised from OpenCode after every reconnect and restart.
CREATE TABLE attention (
    id          TEXT PRIMARY KEY NOT NULL,    -- at-xxxxxxxxxx
    task        TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,                -- permission, question, stalled
    remote_id   TEXT NOT NULL,                -- OpenCode's request id ('' for stalled)
    title       TEXT NOT NULL,                -- one line: the command, the path, the question
    detail      TEXT NOT NULL DEFAULT '{}',   -- JSON: what OpenCode sent
    status      TEXT NOT NULL,                -- pending, answered, gone
    answer      TEXT,                         -- JSON atelier_core::task::Answer
    created_at  INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE UNIQUE INDEX attention_remote ON attention (task, kind, remote_id) WHERE remote_id <> '';
CREATE INDEX attention_pending ON attention (status, created_at);
