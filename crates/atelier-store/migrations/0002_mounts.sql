-- Host folders shared into the sandbox (JSON array of MountSpec) and the host user
-- its VMM runs as ("uid:gid") when it has any.
ALTER TABLE sandboxes ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';
ALTER TABLE sandboxes ADD COLUMN mount_owner TEXT;
