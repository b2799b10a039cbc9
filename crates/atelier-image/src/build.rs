//! The build pipeline: inputs, hash, cache check, steps, atomic publish.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::io_err;
use crate::kernel::{self, Package};
use crate::recipe::Recipe;
use crate::store::{self, BuildDir, BuildLock, Image, ImageManifest};
use crate::{ImageError, Progress, ProgressEvent, Step, TracingProgress, initramfs, npm, rootfs};

/// Version of the build procedure; bump it whenever the output for the same inputs changes.
pub const BUILDER_VERSION: u32 = 1;

/// The Debian mirror debootstrap uses unless the options say otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What to build and where.
#[derive(Clone)]
pub struct BuildOptions {
    /// Recipe name (see [`crate::RECIPES`]).
    pub name: String,
    /// Directory holding finished images (`<name>-<hash12>/`).
    pub images_dir: PathBuf,
    /// Persistent download caches (debootstrap packages, kernel and busybox debs).
    pub cache_dir: PathBuf,
    /// The guest agent executable installed as `/sbin/atelier-agent`.
    pub agent_binary: PathBuf,
    /// Receives step and message events.
    pub progress: Arc<dyn Progress>,
    /// Rebuild even if an image with the same hash exists (it is then replaced).
    pub force: bool,
    /// Debian mirror for debootstrap (not part of the hash).
    pub mirror: String,
}

impl BuildOptions {
    /// Options with tracing progress, no force and the default mirror.
    pub fn new(
        name: impl Into<String>,
        images_dir: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        agent_binary: impl Into<PathBuf>,
    ) -> Self {
        BuildOptions {
            name: name.into(),
            images_dir: images_dir.into(),
            cache_dir: cache_dir.into(),
            agent_binary: agent_binary.into(),
            progress: Arc::new(TracingProgress),
            force: false,
            mirror: DEFAULT_MIRROR.to_string(),
        }
    }
}

impl fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildOptions")
            .field("name", &self.name)
            .field("images_dir", &self.images_dir)
            .field("cache_dir", &self.cache_dir)
            .field("agent_binary", &self.agent_binary)
            .field("force", &self.force)
            .field("mirror", &self.mirror)
            .finish_non_exhaustive()
    }
}

/// Everything the image hash covers.
#[derive(serde::Serialize)]
struct HashInputs<'a> {
    builder_version: u32,
    recipe: &'a Recipe,
    include: Vec<String>,
    agent_sha256: &'a str,
    kernel_package: &'a str,
    kernel_version: &'a str,
    busybox_version: &'a str,
}

/// sha256 (hex) of the build inputs.
fn input_hash(inputs: &HashInputs<'_>) -> String {
    let json = serde_json::to_vec(inputs).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

fn sha256_file(path: &Path) -> Result<(String, Vec<u8>), ImageError> {
    let bad = |reason: String| ImageError::AgentBinary {
        path: path.to_path_buf(),
        reason,
    };
    let data = fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if data.len() < 4 || &data[..4] != b"\x7fELF" && &data[..2] != b"#!" {
        return Err(bad("not an ELF executable or script".to_string()));
    }
    Ok((hex::encode(Sha256::digest(&data)), data))
}

/// Runs `f` as a named step, emitting start/finish events.
fn step<T>(
    progress: &dyn Progress,
    step: Step,
    f: impl FnOnce() -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    progress.event(&ProgressEvent::StepStarted { step });
    let t = Instant::now();
    let r = f()?;
    progress.event(&ProgressEvent::StepFinished {
        step,
        elapsed: t.elapsed(),
    });
    Ok(r)
}

/// Builds the image named in `opts` (or returns the cached one with the same hash).
///
/// Blocking; takes minutes on a cold cache. Must run as root (debootstrap, chroot).
/// A failed build leaves nothing in `images_dir`; its debootstrap log is kept under
/// `cache_dir/logs/` and named in the error.
pub fn build(opts: &BuildOptions) -> Result<Image, ImageError> {
    let started = Instant::now();
    let progress = opts.progress.as_ref();
    let recipe = crate::recipe(&opts.name)?;

    // Prepare: tools, versions, hash, lock, cache check.
    let prepared = step(progress, Step::Prepare, || prepare(opts, recipe))?;
    let Prepared {
        agent_sha256,
        agent,
        kernel_pkg,
        busybox_pkg,
        full_hash,
    } = prepared;
    let hash12 = &full_hash[..12];
    let id = store::image_id(recipe.name, hash12);
    let final_dir = opts.images_dir.join(&id);

    let _lock = BuildLock::acquire(&opts.images_dir, &id, || {
        progress.event(&ProgressEvent::Message {
            step: Step::Prepare,
            text: "waiting for another build of this image to finish",
        })
    })?;
    store::clean_stale(&opts.images_dir);
    if !opts.force {
        // A damaged or partial directory is rebuilt (and replaced on publish).
        if let Ok(Some(img)) = Image::load(&final_dir) {
            progress.event(&ProgressEvent::CacheHit { id: &id });
            return Ok(img);
        }
    }

    let build_dir = BuildDir::create(&opts.images_dir, &id)?;
    let dir = build_dir.path().to_path_buf();
    let tree = dir.join("tree");
    let log = dir.join("debootstrap.log");

    let result = (|| -> Result<ImageManifest, ImageError> {
        step(progress, Step::Debootstrap, || {
            let on_line = |line: &str| {
                progress.event(&ProgressEvent::Message {
                    step: Step::Debootstrap,
                    text: line,
                })
            };
            rootfs::debootstrap(recipe, &opts.mirror, &tree, &opts.cache_dir, &log, &on_line)
        })?;

        let (kfiles, guest_modules) = step(progress, Step::Kernel, || {
            let unpacked = kernel::fetch_and_unpack(Step::Kernel, &kernel_pkg, &opts.cache_dir)?;
            let kfiles = kernel::locate(&unpacked)?;
            fs::copy(&kfiles.vmlinuz, dir.join(store::KERNEL_FILE)).map_err(io_err(
                Step::Kernel,
                "copy",
                &kfiles.vmlinuz,
            ))?;
            progress.event(&ProgressEvent::Message {
                step: Step::Kernel,
                text: &format!(
                    "installing modules of {} and running depmod",
                    kfiles.release
                ),
            });
            let guest_modules =
                rootfs::install_modules(&tree, &kfiles.release, &kfiles.modules_dir)?;
            Ok((kfiles, guest_modules))
        })?;

        if !recipe.npm.is_empty() {
            step(progress, Step::Npm, || {
                install_npm(recipe, &tree, &opts.cache_dir, progress)
            })?;
        }

        step(progress, Step::Configure, || {
            rootfs::configure(&tree, recipe, &agent)
        })?;

        let (initrd_modules, initrd_size) = step(progress, Step::Initramfs, || {
            let bb_dir = kernel::fetch_and_unpack(Step::Initramfs, &busybox_pkg, &opts.cache_dir)?;
            let busybox = ["bin/busybox", "usr/bin/busybox"]
                .iter()
                .map(|p| bb_dir.join(p))
                .find(|p| p.is_file())
                .ok_or_else(|| ImageError::Io {
                    step: Step::Initramfs,
                    op: "find busybox in",
                    path: bb_dir.clone(),
                    source: std::io::ErrorKind::NotFound.into(),
                })?;
            let read = |n: &str| {
                let p = guest_modules.join(n);
                fs::read_to_string(&p).map_err(io_err(Step::Initramfs, "read", p))
            };
            let deps = kernel::ModuleDeps::parse(
                &read("modules.dep")?,
                &read("modules.builtin").unwrap_or_default(),
            );
            let files =
                deps.closure(recipe.initramfs_modules)
                    .map_err(|detail| ImageError::Kernel {
                        kernel: kfiles.release.clone(),
                        detail,
                    })?;
            let size = initramfs::build(
                &dir.join(store::INITRD_FILE),
                &busybox,
                &guest_modules,
                &files,
            )?;
            Ok((files, size))
        })?;

        let (content, free, size) = step(progress, Step::RootfsImage, || {
            let (content, inodes) = rootfs::tree_usage(&tree);
            let size = rootfs::image_size(content, inodes, recipe.headroom_mib);
            progress.event(&ProgressEvent::Message {
                step: Step::RootfsImage,
                text: &format!(
                    "mkfs.ext4 -d: {} MiB of content into a {} MiB image",
                    content >> 20,
                    size >> 20
                ),
            });
            let free = rootfs::make_ext4(&tree, &dir.join(store::ROOTFS_FILE), size)?;
            store::remove_tree(&tree).map_err(io_err(Step::RootfsImage, "remove", &tree))?;
            Ok((content, free, size))
        })?;

        let now = time::OffsetDateTime::now_utc();
        let kernel_size = fs::metadata(dir.join(store::KERNEL_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(ImageManifest {
            format: 1,
            name: recipe.name.to_string(),
            hash: hash12.to_string(),
            full_hash: full_hash.clone(),
            builder_version: BUILDER_VERSION,
            suite: recipe.suite.to_string(),
            kernel_release: kfiles.release.clone(),
            kernel_package: kernel_pkg.name.clone(),
            kernel_package_version: kernel_pkg.version.clone(),
            busybox_version: busybox_pkg.version.clone(),
            agent_sha256: agent_sha256.clone(),
            cmdline: crate::kernel_cmdline(crate::host_tsc_khz()),
            initramfs_modules: initrd_modules
                .iter()
                .map(|m| kernel::module_name(m))
                .collect(),
            rootfs_size_bytes: size,
            rootfs_content_bytes: content,
            rootfs_free_bytes: free,
            kernel_size_bytes: kernel_size,
            initrd_size_bytes: initrd_size,
            created: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            created_unix_ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000)
                .unwrap_or(i64::MAX),
            build_duration_ms: 0,
            opencode_version: recipe.opencode_version().map(str::to_owned),
        })
    })();

    let mut manifest = match result {
        Ok(m) => m,
        Err(e) => {
            keep_failed_log(&opts.cache_dir, &id, &log);
            return Err(relocate_log(e, &opts.cache_dir, &id));
        }
    };

    step(progress, Step::Finish, || {
        manifest.build_duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
        publish(&opts.images_dir, &dir, &final_dir, &id, &manifest)
    })?;
    build_dir.keep();
    Image::load(&final_dir)?.ok_or_else(|| ImageError::Manifest {
        path: final_dir.join(store::MANIFEST_FILE),
        detail: "image incomplete right after publishing".to_string(),
    })
}

/// Fetches (or reuses) each npm install of the recipe and copies it into the tree.
fn install_npm(
    recipe: &Recipe,
    tree: &Path,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<(), ImageError> {
    let say = |text: &str| {
        progress.event(&ProgressEvent::Message {
            step: Step::Npm,
            text,
        })
    };
    let n = recipe.npm.len();
    for (i, inst) in recipe.npm.iter().enumerate() {
        let spec = inst.spec();
        say(&format!("[{}/{n}] npm install {spec}", i + 1));
        let on_line = |line: &str| say(&format!("[{}/{n}] {spec}: {line}", i + 1));
        let t = Instant::now();
        let (prefix, ran) = npm::fetch(inst, cache_dir, &on_line)?;
        let bytes = npm::install(tree, inst, &prefix)?;
        let how = if ran {
            format!("fetched in {:.1}s", t.elapsed().as_secs_f64())
        } else {
            "cached".to_string()
        };
        say(&format!(
            "[{}/{n}] {spec} ({how}): {} MiB into {}",
            i + 1,
            bytes >> 20,
            inst.dest
        ));
    }
    Ok(())
}

struct Prepared {
    agent_sha256: String,
    agent: Vec<u8>,
    kernel_pkg: Package,
    busybox_pkg: Package,
    full_hash: String,
}

fn prepare(opts: &BuildOptions, recipe: &Recipe) -> Result<Prepared, ImageError> {
    let s = Step::Prepare;
    for (tool, pkg) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("dumpe2fs", "e2fsprogs"),
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("chroot", "coreutils"),
    ] {
        crate::cmd::require_tool(s, tool, pkg)?;
    }
    if !recipe.npm.is_empty() {
        crate::cmd::require_tool(s, "npm", "npm")?;
    }
    if !rustix::process::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }
    for d in [&opts.images_dir, &opts.cache_dir] {
        fs::create_dir_all(d).map_err(io_err(s, "create directory", d))?;
    }
    let (agent_sha256, agent) = sha256_file(&opts.agent_binary)?;
    let kernel_pkg = kernel::resolve_kernel(recipe.kernel_package, recipe.kernel_release)?;
    let busybox_pkg = kernel::resolve_package(s, "busybox-static", None)?;
    let full_hash = input_hash(&HashInputs {
        builder_version: BUILDER_VERSION,
        recipe,
        include: rootfs::include_list(recipe),
        agent_sha256: &agent_sha256,
        kernel_package: &kernel_pkg.name,
        kernel_version: &kernel_pkg.version,
        busybox_version: &busybox_pkg.version,
    });
    Ok(Prepared {
        agent_sha256,
        agent,
        kernel_pkg,
        busybox_pkg,
        full_hash,
    })
}

/// Writes `image.json` last, then renames the build dir to its final name
/// (replacing an older dir of the same id, e.g. with `force`).
fn publish(
    images_dir: &Path,
    dir: &Path,
    final_dir: &Path,
    id: &str,
    manifest: &ImageManifest,
) -> Result<(), ImageError> {
    let s = Step::Finish;
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| ImageError::Manifest {
        path: dir.join(store::MANIFEST_FILE),
        detail: e.to_string(),
    })?;
    let tmp = dir.join(".image.json.tmp");
    let f = fs::File::create(&tmp).map_err(io_err(s, "create", &tmp))?;
    std::io::Write::write_all(&mut &f, &json).map_err(io_err(s, "write", &tmp))?;
    f.sync_all().map_err(io_err(s, "sync", &tmp))?;
    for name in [store::ROOTFS_FILE, store::KERNEL_FILE, store::INITRD_FILE] {
        let p = dir.join(name);
        if let Ok(f) = fs::File::open(&p) {
            f.sync_all().map_err(io_err(s, "sync", &p))?;
        }
    }
    let manifest_path = dir.join(store::MANIFEST_FILE);
    fs::rename(&tmp, &manifest_path).map_err(io_err(s, "rename", &manifest_path))?;
    if final_dir.exists() {
        let trash = images_dir.join(store::owned_name(".trash-", id));
        fs::rename(final_dir, &trash).map_err(io_err(s, "move aside", final_dir))?;
        fs::rename(dir, final_dir).map_err(io_err(s, "rename into place", final_dir))?;
        store::remove_tree(&trash).map_err(io_err(s, "remove", &trash))?;
    } else {
        fs::rename(dir, final_dir).map_err(io_err(s, "rename into place", final_dir))?;
    }
    if let Ok(d) = fs::File::open(images_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn failed_log_path(cache_dir: &Path, id: &str) -> PathBuf {
    cache_dir
        .join("logs")
        .join(format!("{id}-failed-debootstrap.log"))
}

/// Copies the debootstrap log of a failed build out of the build dir (which is deleted).
fn keep_failed_log(cache_dir: &Path, id: &str, log: &Path) {
    if log.exists() {
        let dst = failed_log_path(cache_dir, id);
        if let Some(p) = dst.parent() {
            let _ = fs::create_dir_all(p);
        }
        let _ = fs::copy(log, dst);
    }
}

/// Points an error's debootstrap log path at the kept copy (other logs, e.g. npm's
/// under `cache_dir/npm/logs/`, stay where they are).
fn relocate_log(e: ImageError, cache_dir: &Path, id: &str) -> ImageError {
    match e {
        ImageError::Command {
            step,
            command,
            status,
            stderr_tail,
            log: Some(log),
        } if log.file_name().is_some_and(|n| n == "debootstrap.log") => ImageError::Command {
            step,
            command,
            status,
            stderr_tail,
            log: Some(failed_log_path(cache_dir, id)),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(agent: &'a str, kver: &'a str) -> HashInputs<'a> {
        let recipe = crate::recipe("minimal").unwrap();
        HashInputs {
            builder_version: BUILDER_VERSION,
            recipe,
            include: rootfs::include_list(recipe),
            agent_sha256: agent,
            kernel_package: "linux-image-6.1.0-56-cloud-amd64",
            kernel_version: kver,
            busybox_version: "1:1.35.0-4",
        }
    }

    #[test]
    fn hash_is_stable_and_covers_inputs() {
        let a = input_hash(&inputs("aa", "6.1.192-2"));
        assert_eq!(a, input_hash(&inputs("aa", "6.1.192-2")));
        assert_eq!(a.len(), 64);
        assert_ne!(a, input_hash(&inputs("ab", "6.1.192-2")));
        assert_ne!(a, input_hash(&inputs("aa", "6.1.192-3")));
        let mut other = inputs("aa", "6.1.192-2");
        other.builder_version += 1;
        assert_ne!(a, input_hash(&other));
    }

    #[test]
    fn agent_binary_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent");
        fs::write(&p, b"\x7fELF\x02\x01").unwrap();
        let (h, data) = sha256_file(&p).unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(data.len(), 6);
        fs::write(&p, b"hello").unwrap();
        assert!(matches!(
            sha256_file(&p),
            Err(ImageError::AgentBinary { .. })
        ));
        assert!(sha256_file(&t.path().join("missing")).is_err());
    }
}
