-- The OpenCode server a prebuild froze running in its snapshot (all NULL when it
-- has none): the version it reported, its guest port, the per-prebuild server
-- password (the data dir is 0700) and the directory its instance was warmed for.
ALTER TABLE prebuilds ADD COLUMN opencode_version TEXT;
ALTER TABLE prebuilds ADD COLUMN opencode_port INTEGER;
ALTER TABLE prebuilds ADD COLUMN opencode_password TEXT;
ALTER TABLE prebuilds ADD COLUMN opencode_directory TEXT;
-- The same endpoint for a sandbox spawned from such a prebuild (JSON), kept on the
-- sandbox because its prebuild may be removed while the sandbox lives on.
ALTER TABLE sandboxes ADD COLUMN opencode TEXT;
