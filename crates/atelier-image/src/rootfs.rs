//! The root tree: debootstrap, kernel modules, configuration, pruning and the ext4 image.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::cmd::{self, command};
use crate::error::io_err;
use crate::recipe::Recipe;
use crate::{ImageError, Step};

/// Packages the builder always adds (depmod in the guest, and for the agent to load modules).
const BUILDER_PACKAGES: &[&str] = &["kmod"];

/// The package list passed to debootstrap: recipe packages plus builder packages, sorted.
pub(crate) fn include_list(recipe: &Recipe) -> Vec<String> {
    let mut pkgs: Vec<String> = recipe
        .packages
        .iter()
        .chain(BUILDER_PACKAGES)
        .map(|s| s.to_string())
        .collect();
    pkgs.sort();
    pkgs.dedup();
    pkgs
}

/// Runs debootstrap into `tree`, downloading through `cache_dir/debootstrap`,
/// logging to `log`, and reporting each output line to `on_line`.
pub(crate) fn debootstrap(
    recipe: &Recipe,
    mirror: &str,
    tree: &Path,
    cache_dir: &Path,
    log: &Path,
    on_line: &(dyn Fn(&str) + Sync),
) -> Result<(), ImageError> {
    let step = Step::Debootstrap;
    let prog = cmd::require_tool(step, "debootstrap", "debootstrap")?;
    let cache = cache_dir.join("debootstrap");
    fs::create_dir_all(&cache).map_err(io_err(step, "create directory", &cache))?;
    let cache = cache
        .canonicalize()
        .map_err(io_err(step, "resolve", &cache))?;
    // With setpriv (util-linux), debootstrap dies with us instead of writing on into a
    // build directory that the next build removes as stale.
    let mut c = match cmd::require_tool(step, "setpriv", "util-linux") {
        Ok(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL"]).arg(prog);
            c
        }
        Err(_) => Command::new(prog),
    };
    c.arg(format!("--variant={}", recipe.variant))
        .arg(format!("--include={}", include_list(recipe).join(",")))
        .arg("--components=main")
        .arg(format!("--cache-dir={}", cache.display()))
        .arg(recipe.suite)
        .arg(tree)
        .arg(mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    cmd::run_logged(step, &mut c, log, on_line)
}

/// Resolves `guest_path` (absolute, inside the guest) to a host path under `tree`
/// whose parent directories are checked to stay inside the tree. A symlink at the
/// final component is removed, so writing never follows a link out of the tree.
pub(crate) fn tree_path(step: Step, tree: &Path, guest_path: &str) -> Result<PathBuf, ImageError> {
    let rel = Path::new(guest_path.trim_start_matches('/'));
    let bad = || ImageError::Io {
        step,
        op: "write outside the root tree",
        path: tree.join(rel),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path escapes the tree"),
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(bad());
    }
    let host = tree.join(rel);
    let parent = host.parent().ok_or_else(bad)?;
    fs::create_dir_all(parent).map_err(io_err(step, "create directory", parent))?;
    let canon_tree = tree.canonicalize().map_err(io_err(step, "resolve", tree))?;
    let canon_parent = parent
        .canonicalize()
        .map_err(io_err(step, "resolve", parent))?;
    if !canon_parent.starts_with(&canon_tree) {
        return Err(bad());
    }
    let file_name = host.file_name().ok_or_else(bad)?;
    let host = canon_parent.join(file_name);
    if host
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        fs::remove_file(&host).map_err(io_err(step, "remove symlink", &host))?;
    }
    Ok(host)
}

/// Writes a file into the tree with the given mode.
pub(crate) fn write_file(
    step: Step,
    tree: &Path,
    guest_path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), ImageError> {
    let host = tree_path(step, tree, guest_path)?;
    fs::write(&host, contents).map_err(io_err(step, "write", &host))?;
    fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(io_err(
        step,
        "set permissions on",
        &host,
    ))
}

/// Copies a directory tree (files, directories, symlinks), keeping permission bits.
pub(crate) fn copy_tree(step: Step, src: &Path, dst: &Path) -> Result<u64, ImageError> {
    let mut bytes = 0;
    fs::create_dir_all(dst).map_err(io_err(step, "create directory", dst))?;
    for e in fs::read_dir(src).map_err(io_err(step, "read directory", src))? {
        let e = e.map_err(io_err(step, "read directory", src))?;
        let from = e.path();
        let to = dst.join(e.file_name());
        let ft = e.file_type().map_err(io_err(step, "stat", &from))?;
        if ft.is_dir() {
            bytes += copy_tree(step, &from, &to)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io_err(step, "read link", &from))?;
            let _ = fs::remove_file(&to);
            symlink(&target, &to).map_err(io_err(step, "create symlink", &to))?;
        } else if ft.is_file() {
            bytes += fs::copy(&from, &to).map_err(io_err(step, "copy", &from))?;
        }
    }
    Ok(bytes)
}

/// Copies the kernel modules into the tree and runs the guest's `depmod` in a chroot.
/// Returns the modules directory inside the tree.
pub(crate) fn install_modules(
    tree: &Path,
    release: &str,
    modules_src: &Path,
) -> Result<PathBuf, ImageError> {
    let step = Step::Kernel;
    let dst = tree_path(step, tree, &format!("/lib/modules/{release}"))?;
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(io_err(step, "remove", &dst))?;
    }
    copy_tree(step, modules_src, &dst)?;
    let chroot = cmd::require_tool(step, "chroot", "coreutils")?;
    let has_depmod = [
        "sbin/depmod",
        "usr/sbin/depmod",
        "bin/depmod",
        "usr/bin/depmod",
    ]
    .iter()
    .any(|p| tree.join(p).symlink_metadata().is_ok());
    if !has_depmod {
        return Err(ImageError::Kernel {
            kernel: release.to_string(),
            detail: "depmod not found in the root tree; the recipe must include the kmod package"
                .to_string(),
        });
    }
    let mut c = command(chroot, [tree.as_os_str()]);
    c.args(["depmod", "-a", release]).env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    cmd::run(step, &mut c)?;
    Ok(dst)
}

/// Writes the image identity files, the recipe's extra files and the agent; unlocks root.
pub(crate) fn configure(tree: &Path, recipe: &Recipe, agent: &[u8]) -> Result<(), ImageError> {
    let step = Step::Configure;
    write_file(step, tree, "/etc/hostname", b"atelier\n", 0o644)?;
    write_file(
        step,
        tree,
        "/etc/hosts",
        b"127.0.0.1\tlocalhost\n127.0.1.1\tatelier\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write_file(
        step,
        tree,
        "/etc/resolv.conf",
        b"# placeholder: the atelier agent writes the sandbox's resolvers here at boot\n",
        0o644,
    )?;
    write_file(step, tree, "/etc/machine-id", b"", 0o444)?;
    let dbus_id = tree.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok() {
        fs::remove_file(&dbus_id).map_err(io_err(step, "remove", &dbus_id))?;
    }
    // Root gets an empty password; there are no login services in the image.
    let shadow = tree_path(step, tree, "/etc/shadow")?;
    let text = fs::read_to_string(&shadow).map_err(io_err(step, "read", &shadow))?;
    let text: String = text
        .lines()
        .map(|l| match l.split_once(':') {
            Some(("root", rest)) => {
                let rest = rest.split_once(':').map(|(_, r)| r).unwrap_or("");
                format!("root::{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    fs::write(&shadow, text).map_err(io_err(step, "write", &shadow))?;
    for f in recipe.files {
        write_file(step, tree, f.path, f.contents.as_bytes(), f.mode)?;
    }
    write_file(step, tree, "/sbin/atelier-agent", agent, 0o755)?;
    prune(tree, recipe.prune)
}

/// Removes the recipe's prune patterns: `dir/*` (contents), `dir/*.ext` (matching files), or a path.
pub(crate) fn prune(tree: &Path, patterns: &[&str]) -> Result<(), ImageError> {
    let step = Step::Configure;
    for pat in patterns {
        let (dir, leaf) = pat.rsplit_once('/').unwrap_or(("", pat));
        // A `*` in a directory component (e.g. `lib/modules/*/kernel/sound`) stands
        // for every entry there.
        for dir_path in expand_dirs(tree, dir) {
            prune_in(&dir_path, leaf, step)?;
        }
    }
    Ok(())
}

fn expand_dirs(tree: &Path, dir: &str) -> Vec<std::path::PathBuf> {
    let mut found = vec![tree.to_path_buf()];
    for comp in dir.split('/').filter(|c| !c.is_empty()) {
        found = found
            .into_iter()
            .flat_map(|base| match comp.split_once('*') {
                None => vec![base.join(comp)],
                Some((pre, suf)) => fs::read_dir(&base)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(pre) && n.ends_with(suf)
                    })
                    .map(|e| e.path())
                    .collect(),
            })
            .collect();
    }
    found
}

fn prune_in(dir_path: &Path, leaf: &str, step: Step) -> Result<(), ImageError> {
    {
        let remove = |p: &Path| -> Result<(), ImageError> {
            let md = p.symlink_metadata().map_err(io_err(step, "stat", p))?;
            if md.is_dir() {
                fs::remove_dir_all(p).map_err(io_err(step, "remove", p))
            } else {
                fs::remove_file(p).map_err(io_err(step, "remove", p))
            }
        };
        if let Some((pre, suf)) = leaf.split_once('*') {
            let Ok(entries) = fs::read_dir(dir_path) else {
                return Ok(());
            };
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(pre) && n.ends_with(suf) && n.len() >= pre.len() + suf.len() {
                    // "dir/*.ext" only removes files; "dir/*" removes everything.
                    if !suf.is_empty() && e.path().is_dir() {
                        continue;
                    }
                    remove(&e.path())?;
                }
            }
        } else if dir_path.join(leaf).symlink_metadata().is_ok() {
            remove(&dir_path.join(leaf))?;
        }
    }
    Ok(())
}

/// Bytes the tree will take in an ext4 file system with 4 KiB blocks, and its inode count.
pub(crate) fn tree_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            inodes += 1;
            if md.is_dir() {
                bytes += 4096;
                stack.push(e.path());
            } else if md.is_file() {
                bytes += md.len().div_ceil(4096) * 4096;
            }
        }
    }
    (bytes, inodes)
}

/// Size for `rootfs.ext4`: content plus metadata overhead plus `headroom_mib` free, in MiB units.
pub(crate) fn image_size(content_bytes: u64, inodes: u64, headroom_mib: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let base = content_bytes + content_bytes / 16 + inodes * 256 + 64 * MIB + headroom_mib * MIB;
    // inode tables (256 B per 16 KiB) and group descriptors: ~2 %.
    let total = base + base / 50;
    total.div_ceil(MIB) * MIB
}

/// Creates the sparse file `out` of `size` bytes and fills it with an ext4 file system
/// holding `tree`. Returns the free bytes reported by `dumpe2fs`.
pub(crate) fn make_ext4(tree: &Path, out: &Path, size: u64) -> Result<u64, ImageError> {
    let step = Step::RootfsImage;
    let mkfs = cmd::require_tool(step, "mkfs.ext4", "e2fsprogs")?;
    let dumpe2fs = cmd::require_tool(step, "dumpe2fs", "e2fsprogs")?;
    let f = fs::File::create(out).map_err(io_err(step, "create", out))?;
    f.set_len(size).map_err(io_err(step, "size", out))?;
    drop(f);
    let mut c = command(
        mkfs,
        [
            "-F",
            "-q",
            "-t",
            "ext4",
            "-L",
            "atelier-root",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
        ],
    );
    c.arg(tree).arg(out);
    cmd::run(step, &mut c)?;
    let out = cmd::run(
        step,
        &mut command(dumpe2fs, ["-h".as_ref(), out.as_os_str()]),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("Free blocks:") * field("Block size:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_list_adds_kmod_once_sorted() {
        let r = crate::recipe::recipe("minimal").unwrap();
        let l = include_list(r);
        assert_eq!(l.iter().filter(|p| *p == "kmod").count(), 1);
        let mut sorted = l.clone();
        sorted.sort();
        assert_eq!(l, sorted);
    }

    #[test]
    fn tree_path_refuses_escapes_and_replaces_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("root");
        fs::create_dir_all(tree.join("etc")).unwrap();
        let outside = t.path().join("outside");
        fs::write(&outside, "host").unwrap();
        symlink(&outside, tree.join("etc/resolv.conf")).unwrap();
        write_file(Step::Configure, &tree, "/etc/resolv.conf", b"guest", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "host");
        assert_eq!(
            fs::read_to_string(tree.join("etc/resolv.conf")).unwrap(),
            "guest"
        );
        assert!(tree_path(Step::Configure, &tree, "/../x").is_err());
        symlink(t.path(), tree.join("escape")).unwrap();
        assert!(tree_path(Step::Configure, &tree, "/escape/x").is_err());
    }

    #[test]
    fn prune_patterns() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("a/sub")).unwrap();
        fs::write(root.join("a/x.deb"), "").unwrap();
        fs::write(root.join("a/keep"), "").unwrap();
        fs::create_dir_all(root.join("b/dir")).unwrap();
        fs::write(root.join("b/f"), "").unwrap();
        fs::create_dir_all(root.join("m/6.1/kernel/sound")).unwrap();
        fs::create_dir_all(root.join("m/6.1/kernel/fs")).unwrap();
        prune(root, &["m/*/kernel/sound"]).unwrap();
        assert!(!root.join("m/6.1/kernel/sound").exists());
        assert!(root.join("m/6.1/kernel/fs").exists());
        prune(root, &["a/*.deb", "b/*", "missing/*", "nothing"]).unwrap();
        assert!(!root.join("a/x.deb").exists());
        assert!(root.join("a/keep").exists() && root.join("a/sub").exists());
        assert!(root.join("b").exists());
        assert_eq!(fs::read_dir(root.join("b")).unwrap().count(), 0);
    }

    #[test]
    fn image_size_leaves_headroom() {
        let s = image_size(300 << 20, 10_000, 1024);
        assert!(s >= (300 << 20) + (1024 << 20));
        assert_eq!(s % (1 << 20), 0);
    }
}
