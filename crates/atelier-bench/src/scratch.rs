//! The bench's own scratch directory: never inside the manager's data dir, so a
//! benchmark run cannot disturb the manager (its pool's start-up sweep, its imports,
//! its disks).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A directory of the bench's own, removed (after unmounting a loop pool made in it)
/// when dropped: at the end of a step, on error, on panic, and when a step is dropped
/// at Ctrl-C.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Makes a fresh `.atelier-bench-*` directory in `base`, or beside `data_dir` (in
    /// its parent, so usually on the same filesystem as the manager's pool) when `base`
    /// is `None`. It is world-traversable (0755) so a VMM running as another user can
    /// reach the files put in it.
    pub fn create(data_dir: &Path, base: Option<&Path>) -> anyhow::Result<Scratch> {
        let base = match base {
            Some(b) => b.to_owned(),
            None => data_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!(".atelier-bench-{}-{nanos:08x}", std::process::id()));
        anyhow::ensure!(
            !path.starts_with(data_dir),
            "the scratch dir {} is inside the manager's data dir {}; pick another --scratch-dir",
            path.display(),
            data_dir.display()
        );
        fs::create_dir(&path).with_context(|| {
            format!(
                "creating the scratch dir {} (set --scratch-dir to a writable directory)",
                path.display()
            )
        })?;
        let scratch = Scratch { path };
        fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 0755 {}", scratch.path.display()))?;
        Ok(scratch)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // A pool opened here may have loop-mounted an XFS file at `pool/`; removing
        // files under a mount we cannot unmount would be wrong, so stop there.
        if let Err(e) = atelier_storage::unmount_pool(&self.path) {
            eprintln!(
                "warning: cannot unmount the bench's pool in {}: {e}; remove it by hand",
                self.path.display()
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "warning: cannot remove the bench's scratch dir {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lives_beside_the_data_dir_and_is_removed() {
        let parent = std::env::temp_dir().join(format!("atl-scratch-test-{}", std::process::id()));
        let data = parent.join("data");
        fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
        let path = {
            let s = Scratch::create(&data, None).unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(s.path().parent(), Some(parent.as_path()));
            fs::write(s.path().join("f"), b"x").unwrap_or_else(|e| panic!("{e}"));
            s.path().to_owned()
        };
        assert!(!path.exists());
        assert!(
            Scratch::create(&data, Some(&data)).is_err(),
            "never inside the data dir"
        );
        let _ = fs::remove_dir_all(&parent);
    }
}
