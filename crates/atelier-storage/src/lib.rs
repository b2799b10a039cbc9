//! The volume pool: every sandbox disk is a copy-on-write clone of an image, made in
//! constant time whatever the image size.
//!
//! Backends, best first:
//! - `reflink`: `ioctl(FICLONE)` on a filesystem that shares extents (XFS with
//!   `reflink=1`, btrfs). When the data directory's own filesystem cannot reflink
//!   (ext4, say), the pool creates a sparse file, formats it XFS with reflink and
//!   loop-mounts it at `<data>/pool`.
//! - `qcow2`: a qcow2 overlay whose backing file is the image (`qemu-img create -b`),
//!   the portable fallback when neither works (no root, no loop devices).
//!
//! This crate owns the pool directory and nothing else; it must not depend on other
//! Atelier crates.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Errors from the pool; each names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A filesystem operation on a pool path failed.
    #[error("cannot {op} {path}: {source}")]
    Fs {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A helper program failed or is missing.
    #[error("{program} failed: {detail}")]
    Tool {
        /// The program (mkfs.xfs, mount, qemu-img).
        program: &'static str,
        /// Its stderr or why it could not run, with a hint.
        detail: String,
    },
    /// The host is out of space for the pool.
    #[error("not enough space for the pool at {path}: {detail}")]
    NoSpace {
        /// The pool path.
        path: PathBuf,
        /// Details.
        detail: String,
    },
}

fn fs_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc_enospc()) {
            StorageError::NoSpace {
                path: path.to_owned(),
                detail: format!("{op}: {source}"),
            }
        } else {
            StorageError::Fs {
                op,
                path: path.to_owned(),
                source,
            }
        }
    }
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

/// How the pool makes clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// FICLONE on a reflink filesystem.
    Reflink,
    /// qcow2 overlays on a backing file.
    Qcow2,
}

impl Backend {
    /// Name shown by `status` and `doctor`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Reflink => "reflink",
            Backend::Qcow2 => "qcow2",
        }
    }
}

/// Which backend the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Reflink when possible (making a loop-mounted XFS pool if needed), else qcow2.
    #[default]
    Auto,
    /// Reflink or fail.
    Reflink,
    /// qcow2 always.
    Qcow2,
}

/// Disk image format of a clone, as QEMU needs to be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw image (a reflink clone).
    Raw,
    /// qcow2 overlay.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's `format=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The volume pool.
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    backend: Backend,
}

static IMPORT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Size of the sparse XFS file made when the data dir cannot reflink.
pub const DEFAULT_POOL_FILE_GIB: u64 = 64;

impl Pool {
    /// Opens the pool under `data_dir`, making it if needed.
    pub fn open(data_dir: &Path, choice: BackendChoice) -> Result<Pool, StorageError> {
        let root = data_dir.join("pool");
        fs::create_dir_all(&root).map_err(fs_err("create", &root))?;
        if choice == BackendChoice::Qcow2 {
            return Pool::with_backend(root, Backend::Qcow2);
        }
        if supports_reflink(&root)? {
            return Pool::with_backend(root, Backend::Reflink);
        }
        match mount_loop_pool(data_dir, &root) {
            Ok(()) if supports_reflink(&root)? => Pool::with_backend(root, Backend::Reflink),
            Ok(()) => Err(StorageError::Tool {
                program: "mkfs.xfs",
                detail: format!("{} is mounted but cannot reflink", root.display()),
            }),
            Err(e) if choice == BackendChoice::Reflink => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "no reflink pool; falling back to qcow2 overlays");
                Pool::with_backend(root, Backend::Qcow2)
            }
        }
    }

    fn with_backend(root: PathBuf, backend: Backend) -> Result<Pool, StorageError> {
        for sub in ["bases", "disks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(fs_err("create", &p))?;
        }
        // Half-copied bases from an interrupted import.
        for e in fs::read_dir(root.join("bases"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(Pool { root, backend })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding sandbox disks; every file in it belongs to a journaled disk.
    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    /// Path a sandbox's disk gets.
    pub fn disk_path(&self, sandbox_id: &str) -> PathBuf {
        self.disks_dir().join(format!("{sandbox_id}.img"))
    }

    /// Makes sure an image's rootfs is inside the pool (clones can only share extents
    /// within one filesystem) and returns the pooled copy. `key` names the content
    /// (the image hash); importing the same key twice is a no-op.
    pub fn import_base(&self, source: &Path, key: &str) -> Result<PathBuf, StorageError> {
        let dest = self.root.join("bases").join(format!("{key}.img"));
        if dest.exists() {
            return Ok(dest);
        }
        // One import at a time in this process; a unique temp name keeps two
        // processes (or a crashed earlier run) from colliding.
        let _one = IMPORT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if dest.exists() {
            return Ok(dest);
        }
        let tmp = self
            .root
            .join("bases")
            .join(format!(".{key}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let copied = (|| {
            if self.backend == Backend::Reflink && reflink(source, &tmp).is_ok() {
                return Ok(());
            }
            let _ = fs::remove_file(&tmp);
            sparse_copy(source, &tmp)
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dest).map_err(fs_err("rename", &dest))?;
        Ok(dest)
    }

    /// Clones `base` to `dest` copy-on-write; returns the disk format and the time the
    /// clone itself took.
    pub fn clone_disk(
        &self,
        base: &Path,
        dest: &Path,
    ) -> Result<(DiskFormat, Duration), StorageError> {
        let start = Instant::now();
        match self.backend {
            Backend::Reflink => {
                reflink(base, dest)?;
                Ok((DiskFormat::Raw, start.elapsed()))
            }
            Backend::Qcow2 => {
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(base)
                    .arg(dest)
                    .output()
                    .map_err(|e| tool_missing("qemu-img", "qemu-utils", e))?;
                if !out.status.success() {
                    let _ = fs::remove_file(dest);
                    return Err(StorageError::Tool {
                        program: "qemu-img",
                        detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                Ok((DiskFormat::Qcow2, start.elapsed()))
            }
        }
    }

    /// Removes a disk; a missing disk is fine (reclaim is idempotent).
    pub fn remove_disk(&self, path: &Path) -> Result<(), StorageError> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(fs_err("remove", path)(e)),
            _ => Ok(()),
        }
    }

    /// Every disk file in the pool, for orphan detection.
    pub fn list_disks(&self) -> Result<Vec<PathBuf>, StorageError> {
        let dir = self.disks_dir();
        let rd = fs::read_dir(&dir).map_err(fs_err("list", &dir))?;
        Ok(rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
    }

    /// Free and total bytes of the pool's filesystem.
    pub fn space(&self) -> Result<(u64, u64), StorageError> {
        let st =
            rustix::fs::statvfs(&self.root).map_err(|e| fs_err("statvfs", &self.root)(e.into()))?;
        Ok((st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
    }
}

fn tool_missing(program: &'static str, package: &str, e: io::Error) -> StorageError {
    StorageError::Tool {
        program,
        detail: format!("cannot run it ({e}); install the Debian package {package}"),
    }
}

/// Clones `src` into a new file `dest` with FICLONE.
pub fn reflink(src: &Path, dest: &Path) -> Result<(), StorageError> {
    let from = File::open(src).map_err(fs_err("open", src))?;
    let to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(fs_err("create", dest))?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&to, &from) {
        drop(to);
        let _ = fs::remove_file(dest);
        return Err(fs_err("reflink onto", dest)(e.into()));
    }
    Ok(())
}

/// Whether FICLONE works in `dir` (tries it on a scratch file).
pub fn supports_reflink(dir: &Path) -> Result<bool, StorageError> {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    fs::write(&a, b"probe").map_err(fs_err("write", &a))?;
    let ok = reflink(&a, &b).is_ok();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    Ok(ok)
}

fn sparse_copy(src: &Path, dest: &Path) -> Result<(), StorageError> {
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dest)
        .output()
        .map_err(|e| tool_missing("cp", "coreutils", e))?;
    if !out.status.success() {
        return Err(StorageError::Tool {
            program: "cp",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&mp.replace("\\040", " ")) == canon)
}

/// Makes (once) a sparse XFS file with reflink at `<data_dir>/pool.xfs` and mounts
/// it on `root` through a loop device. Shells out to mkfs.xfs and mount: no crate
/// formats XFS, and mount(8) sets up the loop device and its autoclear flag for us.
fn mount_loop_pool(data_dir: &Path, root: &Path) -> Result<(), StorageError> {
    if is_mountpoint(root) {
        return Ok(());
    }
    let file = data_dir.join("pool.xfs");
    if !file.exists() {
        let (free, _) = {
            let st =
                rustix::fs::statvfs(data_dir).map_err(|e| fs_err("statvfs", data_dir)(e.into()))?;
            (st.f_bavail * st.f_frsize, 0)
        };
        let size = (DEFAULT_POOL_FILE_GIB << 30).min(free.saturating_mul(9) / 10);
        if size < 2 << 30 {
            return Err(StorageError::NoSpace {
                path: data_dir.to_owned(),
                detail: format!(
                    "only {} MiB free; the pool needs at least 2 GiB",
                    free >> 20
                ),
            });
        }
        let tmp = data_dir.join(".pool.xfs.tmp");
        let f = File::create(&tmp).map_err(fs_err("create", &tmp))?;
        f.set_len(size).map_err(fs_err("size", &tmp))?;
        drop(f);
        let out = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&tmp)
            .output()
            .map_err(|e| tool_missing("mkfs.xfs", "xfsprogs", e));
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let _ = fs::remove_file(&tmp);
                return Err(StorageError::Tool {
                    program: "mkfs.xfs",
                    detail: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        fs::rename(&tmp, &file).map_err(fs_err("rename", &file))?;
    }
    let out = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&file)
        .arg(root)
        .output()
        .map_err(|e| tool_missing("mount", "mount", e))?;
    if !out.status.success() {
        return Err(StorageError::Tool {
            program: "mount",
            detail: format!(
                "{} (loop-mounting the pool needs root and loop devices)",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    tracing::info!(pool = %root.display(), file = %file.display(), "mounted loop XFS pool with reflink");
    Ok(())
}

/// Unmounts a loop pool made by [`Pool::open`], if mounted (tests and `doctor`).
pub fn unmount_pool(data_dir: &Path) -> Result<(), StorageError> {
    let root = data_dir.join("pool");
    if !is_mountpoint(&root) {
        return Ok(());
    }
    let out = Command::new("umount")
        .arg(&root)
        .output()
        .map_err(|e| tool_missing("umount", "mount", e))?;
    if !out.status.success() {
        return Err(StorageError::Tool {
            program: "umount",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(path: &Path, size: u64) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        use std::io::Write;
        let mut f = f;
        f.write_all(b"image header").unwrap();
    }

    #[test]
    fn qcow2_pool_clones_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), BackendChoice::Qcow2).unwrap();
        assert_eq!(pool.backend(), Backend::Qcow2);
        let img = dir.path().join("base.ext4");
        write_image(&img, 64 << 20);
        let base = pool.import_base(&img, "abc").unwrap();
        assert_eq!(pool.import_base(&img, "abc").unwrap(), base);
        let disk = pool.disk_path("sb-0000000001");
        let (fmt, _) = pool.clone_disk(&base, &disk).unwrap();
        assert_eq!(fmt, DiskFormat::Qcow2);
        assert_eq!(pool.list_disks().unwrap(), std::slice::from_ref(&disk));
        pool.remove_disk(&disk).unwrap();
        pool.remove_disk(&disk).unwrap();
        assert!(pool.list_disks().unwrap().is_empty());
    }

    #[test]
    fn reflink_pool_on_loop_xfs_when_root() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root for the loop mount");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), BackendChoice::Reflink).unwrap();
        assert_eq!(pool.backend(), Backend::Reflink);
        let img = dir.path().join("base.ext4");
        write_image(&img, 256 << 20);
        let base = pool.import_base(&img, "k").unwrap();
        let disk = pool.disk_path("sb-0000000002");
        let (fmt, _) = pool.clone_disk(&base, &disk).unwrap();
        assert_eq!(fmt, DiskFormat::Raw);
        assert_eq!(fs::read(&disk).unwrap()[..12], *b"image header");
        // A second clone onto an existing path is refused, not overwritten.
        assert!(pool.clone_disk(&base, &disk).is_err());
        drop(pool);
        unmount_pool(dir.path()).unwrap();
    }
}
