-- Budgets, and the conversation kept for when the sandbox is gone.
-- A task's own spending limit (NULL: none): cost in USD, tokens (input + output).
ALTER TABLE tasks ADD COLUMN budget_usd REAL;
ALTER TABLE tasks ADD COLUMN budget_tokens INTEGER;
-- A person said "continue" past the workspace's budget for this task.
ALTER TABLE tasks ADD COLUMN workspace_budget_waived INTEGER NOT NULL DEFAULT 0;
-- The session's messages as last read from OpenCode (JSON list, bounded), and when:
-- what `GET /tasks/{id}/messages` shows once the sandbox is stopped or parked.
ALTER TABLE tasks ADD COLUMN conversation TEXT;
ALTER TABLE tasks ADD COLUMN conversation_at INTEGER;
