//! Files on the host: everything the manager writes is private to it. The process
//! umask becomes 077 at start (database, secrets key, tokens, pool disks, memory
//! snapshots, logs, run dirs and sockets are then created without group or other
//! bits), the data dir is 0700, and what an older version left wider is narrowed.
//!
//! VMMs that drop to an unprivileged user (sandboxes with shared folders) need no
//! access to any of it: QEMU opens its disk, sockets and logs before dropping, and
//! memory state files are handed to it as descriptors (`atelier-vmm`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::Error;

/// Sets the umask to 077, creates `data_dir` 0700 (narrowing an existing one) and
/// removes group and other bits from everything under it. Symlinks are not
/// followed; other filesystems mounted below (the loop pool) are included.
pub(crate) fn secure_data_dir(data_dir: &Path) -> Result<(), Error> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", data_dir.display())))?;
    let narrowed = narrow_tree(data_dir);
    if narrowed > 0 {
        tracing::info!(
            data_dir = %data_dir.display(),
            narrowed,
            "made files under the data dir private to the manager"
        );
    }
    let mode = std::fs::metadata(data_dir)
        .map_err(|e| Error::internal(format!("cannot read {}: {e}", data_dir.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::internal(format!(
            "the data dir {} stays mode {:o} after chmod 0700; fix its permissions",
            data_dir.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Removes group and other bits from `dir` and everything under it (the pool's
/// filesystem root after it is mounted, for one).
pub(crate) fn narrow(dir: &Path) {
    narrow_tree(dir);
}

/// Removes group/other bits below and including `dir`; returns how many entries
/// changed. Errors on single entries are logged and skipped (a file may vanish).
fn narrow_tree(dir: &Path) -> usize {
    let mut changed = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            let narrowed = std::fs::Permissions::from_mode(mode & 0o7700);
            match std::fs::set_permissions(&p, narrowed) {
                Ok(()) => changed += 1,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot narrow permissions")
                }
            }
        }
        if ft.is_dir()
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn narrows_an_existing_wide_data_dir() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/f"), "x").unwrap();
        for (p, m) in [
            (d.clone(), 0o755),
            (d.join("sub"), 0o777),
            (d.join("sub/f"), 0o644),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        secure_data_dir(&d).unwrap();
        for (p, m) in [
            (d.clone(), 0o700),
            (d.join("sub"), 0o700),
            (d.join("sub/f"), 0o600),
        ] {
            let got = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, m, "{}", p.display());
        }
        // Symlinks are not followed.
        let passwd = std::fs::metadata("/etc/passwd")
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(passwd & 0o044, 0);
        // New files are private through the umask.
        std::fs::write(d.join("new"), "y").unwrap();
        let got = std::fs::metadata(d.join("new"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, 0o600);
    }
}
