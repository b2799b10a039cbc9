//! The images directory: finished image dirs, their manifests, build temp dirs and locks.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::{ImageError, Step};

/// Name of the manifest file; written last, so its presence marks a complete image.
pub const MANIFEST_FILE: &str = "image.json";
/// Name of the root file system image inside an image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Name of the kernel inside an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// Name of the initramfs inside an image directory.
pub const INITRD_FILE: &str = "initrd.img";

const BUILD_PREFIX: &str = ".build-";
const TRASH_PREFIX: &str = ".trash-";

/// Contents of `image.json`: what an image is and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Manifest format version.
    pub format: u32,
    /// Image (recipe) name, e.g. `minimal`.
    pub name: String,
    /// First 12 hex digits of the content hash; the directory is `<name>-<hash>`.
    pub hash: String,
    /// The full sha256 content hash of the build inputs.
    pub full_hash: String,
    /// Version of the builder that made the image.
    pub builder_version: u32,
    /// Debian suite of the root file system.
    pub suite: String,
    /// Kernel release (`uname -r`).
    pub kernel_release: String,
    /// Debian package the kernel came from.
    pub kernel_package: String,
    /// Version of that package.
    pub kernel_package_version: String,
    /// Version of the busybox-static package used in the initramfs.
    pub busybox_version: String,
    /// sha256 of the agent binary installed as `/sbin/atelier-agent`.
    pub agent_sha256: String,
    /// Kernel command line to boot with (see [`crate::kernel_cmdline`]).
    pub cmdline: String,
    /// Module files the initramfs loads, in order.
    pub initramfs_modules: Vec<String>,
    /// Apparent size of `rootfs.ext4` in bytes.
    pub rootfs_size_bytes: u64,
    /// Bytes of content copied into the file system.
    pub rootfs_content_bytes: u64,
    /// Free bytes in the file system right after the build.
    pub rootfs_free_bytes: u64,
    /// Size of `vmlinuz` in bytes.
    pub kernel_size_bytes: u64,
    /// Size of `initrd.img` in bytes.
    pub initrd_size_bytes: u64,
    /// When the build finished (RFC 3339, UTC).
    pub created: String,
    /// Same instant in milliseconds since the Unix epoch (for sorting).
    pub created_unix_ms: i64,
    /// Wall-clock duration of the build in milliseconds.
    pub build_duration_ms: u64,
    /// Version of OpenCode (`opencode-ai`) the image carries, if any; a prebuild
    /// whose OpenCode differs is stale. Absent in images built before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opencode_version: Option<String>,
}

/// A complete image on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The image directory (`<images_dir>/<name>-<hash12>`).
    pub dir: PathBuf,
    /// Its parsed `image.json`.
    pub manifest: ImageManifest,
}

impl Image {
    /// The image id, `<name>-<hash12>` (also the directory name).
    pub fn id(&self) -> String {
        image_id(&self.manifest.name, &self.manifest.hash)
    }
    /// Path of the raw ext4 root file system.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS_FILE)
    }
    /// Path of the kernel (bzImage).
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }
    /// Path of the initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(INITRD_FILE)
    }
    /// The kernel command line recorded at build time.
    pub fn cmdline(&self) -> &str {
        &self.manifest.cmdline
    }

    /// Loads the image in `dir`; `Ok(None)` when it is not a complete image.
    pub fn load(dir: &Path) -> Result<Option<Image>, ImageError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ImageError::Manifest {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        let manifest: ImageManifest =
            serde_json::from_str(&text).map_err(|e| ImageError::Manifest {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        let img = Image {
            dir: dir.to_path_buf(),
            manifest,
        };
        let complete = dir.file_name().and_then(|n| n.to_str()) == Some(img.id().as_str())
            && [img.rootfs(), img.kernel(), img.initrd()]
                .iter()
                .all(|p| p.is_file());
        Ok(complete.then_some(img))
    }
}

/// `<name>-<hash12>`.
pub(crate) fn image_id(name: &str, hash12: &str) -> String {
    format!("{name}-{hash12}")
}

/// Every complete image in `images_dir`, sorted by name, newest first within a name.
pub fn list(images_dir: &Path) -> Result<Vec<Image>, ImageError> {
    let entries = match fs::read_dir(images_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(Step::Prepare, "read directory", images_dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') || !e.path().is_dir() {
            continue;
        }
        // A damaged manifest is skipped here; `Image::load` reports it to callers that ask.
        if let Ok(Some(img)) = Image::load(&e.path()) {
            out.push(img);
        }
    }
    out.sort_by(|a, b| {
        a.manifest
            .name
            .cmp(&b.manifest.name)
            .then(b.manifest.created_unix_ms.cmp(&a.manifest.created_unix_ms))
    });
    Ok(out)
}

/// The newest complete image called `name`, if any.
pub fn find(images_dir: &Path, name: &str) -> Result<Option<Image>, ImageError> {
    Ok(list(images_dir)?
        .into_iter()
        .find(|i| i.manifest.name == name))
}

/// Removes images: `id` is a name (every build of it) or a `name-hash12` id (that one).
/// Each directory is renamed away first, so readers never see half-deleted images.
/// Returns what was removed; no match is [`ImageError::NotFound`].
pub fn remove(images_dir: &Path, id: &str) -> Result<Vec<Image>, ImageError> {
    let victims: Vec<Image> = list(images_dir)?
        .into_iter()
        .filter(|i| i.manifest.name == id || i.id() == id)
        .collect();
    if victims.is_empty() {
        return Err(ImageError::NotFound {
            id: id.to_string(),
            images_dir: images_dir.to_path_buf(),
        });
    }
    for v in &victims {
        let trash = images_dir.join(owned_name(TRASH_PREFIX, &v.id()));
        fs::rename(&v.dir, &trash).map_err(io_err(Step::Finish, "rename for removal", &v.dir))?;
        remove_tree(&trash).map_err(io_err(Step::Finish, "remove", &trash))?;
    }
    Ok(victims)
}

/// This process's start time in clock ticks since boot (field 22 of /proc/self/stat).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// A name for a scratch entry owned by this process: `<prefix><what>-<pid>-<starttime>`.
pub(crate) fn owned_name(prefix: &str, what: &str) -> String {
    let pid = std::process::id();
    format!("{prefix}{what}-{pid}-{}", start_ticks(pid).unwrap_or(0))
}

/// Whether the process that created a scratch entry named like [`owned_name`] is gone.
fn owner_is_gone(name: &str) -> bool {
    let mut parts = name.rsplitn(3, '-');
    let (Some(ticks), Some(pid)) = (parts.next(), parts.next()) else {
        return true;
    };
    let (Ok(ticks), Ok(pid)) = (ticks.parse::<u64>(), pid.parse::<u32>()) else {
        return true;
    };
    start_ticks(pid) != Some(ticks)
}

/// Removes build and trash directories left by processes that no longer exist.
pub(crate) fn clean_stale(images_dir: &Path) {
    let Ok(entries) = fs::read_dir(images_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.starts_with(BUILD_PREFIX) || name.starts_with(TRASH_PREFIX))
            && owner_is_gone(&name)
        {
            tracing::info!(dir = %e.path().display(), "removing stale image build directory");
            if let Err(err) = remove_tree(&e.path()) {
                tracing::warn!(dir = %e.path().display(), %err, "cannot remove stale directory");
            }
        }
    }
}

/// Unmounts anything mounted below `dir` (debootstrap mounts /proc and /sys in its
/// target and leaves them if killed), then deletes it.
pub(crate) fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let Ok(canon) = dir.canonicalize() else {
        return Ok(());
    };
    let mut mounts = mounts_below(&canon);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        if let Err(e) = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(mount = %m.display(), %e, "cannot unmount");
        }
    }
    // Never recurse into a file system that is still mounted (e.g. the host's /proc).
    if let Some(m) = mounts_below(&canon).first() {
        return Err(std::io::Error::other(format!(
            "{} is still mounted; unmount it and retry",
            m.display()
        )));
    }
    fs::remove_dir_all(dir)
}

/// Mount points at or below `dir` in this process's mount namespace.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(oct) = std::str::from_utf8(&b[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A build directory that deletes itself unless [`BuildDir::keep`] is called.
pub(crate) struct BuildDir {
    path: PathBuf,
    armed: bool,
}

impl BuildDir {
    /// Creates `<images_dir>/.build-<id>-<pid>-<starttime>`.
    pub(crate) fn create(images_dir: &Path, id: &str) -> Result<Self, ImageError> {
        let path = images_dir.join(owned_name(BUILD_PREFIX, id));
        if path.exists() {
            remove_tree(&path).map_err(io_err(Step::Prepare, "remove", &path))?;
        }
        fs::create_dir(&path).map_err(io_err(Step::Prepare, "create directory", &path))?;
        Ok(BuildDir { path, armed: true })
    }
    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    /// Disarms the cleanup (after the directory was renamed into place).
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = remove_tree(&self.path)
        {
            tracing::warn!(dir = %self.path.display(), %e, "cannot remove build directory");
        }
    }
}

/// An exclusive lock on one image id, held until dropped.
pub(crate) struct BuildLock {
    _file: File,
}

impl BuildLock {
    /// Takes the lock `<images_dir>/.<id>.lock`, calling `waiting` if it must wait.
    pub(crate) fn acquire(
        images_dir: &Path,
        id: &str,
        waiting: impl FnOnce(),
    ) -> Result<Self, ImageError> {
        use rustix::fs::{FlockOperation, flock};
        let path = images_dir.join(format!(".{id}.lock"));
        let file = File::create(&path).map_err(io_err(Step::Prepare, "create lock file", &path))?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            waiting();
            flock(&file, FlockOperation::LockExclusive)
                .map_err(|e| io_err(Step::Prepare, "lock", &path)(e.into()))?;
        }
        Ok(BuildLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_names_track_liveness() {
        let mine = owned_name(BUILD_PREFIX, "minimal-abc");
        assert!(!owner_is_gone(&mine));
        assert!(owner_is_gone(".build-minimal-abc-999999999-1"));
        assert!(owner_is_gone(".build-garbage"));
    }

    #[test]
    fn stale_dirs_are_removed_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join(".build-minimal-abc-999999999-1");
        fs::create_dir_all(stale.join("x")).unwrap();
        let live = BuildDir::create(tmp.path(), "minimal-abc").unwrap();
        clean_stale(tmp.path());
        assert!(!stale.exists());
        assert!(live.path().exists());
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
