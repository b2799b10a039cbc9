//! Root-owned folders shared into guests: the VMM of such a sandbox runs as a
//! dedicated unprivileged system user ([`VMM_USER`]), never as root, and that user
//! is granted access to the shared tree with POSIX ACL entries for as long as the
//! sandbox exists.
//!
//! - The grant is journaled (kind `share-access`) before it is made and revoked when
//!   the sandbox is deleted, or by reconcile after a crash. Revoking removes the
//!   user's ACL entries again and leaves the folder's modes as they were.
//! - Only directories and regular files on the folder's own filesystem get an
//!   entry: no symlink is followed (every step is resolved with `openat2`
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`), device nodes,
//!   FIFOs and sockets are left alone, and a regular file with more than one hard
//!   link is left alone (granting it would grant its other names too).
//! - Directories also get a default ACL entry, so files the operator creates in the
//!   folder meanwhile stay reachable for the guest.
//! - QEMU opens the folder before it drops to the user, so the folder's ancestors
//!   (e.g. `/root`, mode 0700) need no grant.
//! - Files the guest creates belong to [`VMM_USER`] with mode 0600 (directories
//!   0700): mapped-xattr 9p keeps the guest's owners and modes as metadata and never
//!   applies them. Root reads and writes them as it does every file; they are not
//!   re-owned (no root-owned file ever appears through a share).
//!
//! The ACLs are written as the kernel's `system.posix_acl_*` extended attributes,
//! so no `setfacl` is needed (`getfacl` from Debian's `acl` package shows them).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, XattrFlags};
use rustix::io::Errno;

use crate::Error;

/// The system user that share VMMs of root-owned folders run as.
pub const VMM_USER: &str = "atelier-vmm";

/// Serialises grants and revokes (with the journal reads that decide them), so a
/// revoke never strips what a concurrent grant of the same folder just added.
pub(crate) static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static VMM_IDS: std::sync::Mutex<Option<(u32, u32)>> = std::sync::Mutex::new(None);

/// The uid and gid of [`VMM_USER`], creating it (a system user with no home and no
/// login shell) when it does not exist yet.
pub(crate) fn vmm_user() -> Result<(u32, u32), Error> {
    let mut cached = VMM_IDS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(u) = *cached {
        return Ok(u);
    }
    let found = match lookup_user(VMM_USER) {
        Some(u) => u,
        None => {
            let out = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--comment",
                    "Atelier share VMMs",
                    VMM_USER,
                ])
                .output();
            // Another manager may have created it meanwhile: look again either way.
            lookup_user(VMM_USER).ok_or_else(|| {
                let why = match out {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                Error::unavailable(format!(
                    "cannot create the system user {VMM_USER} that runs the VMs of sandboxes sharing root-owned folders: useradd failed ({why}); run scripts/deps.sh or `useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {VMM_USER}`"
                ))
            })?
        }
    };
    if found.0 == 0 {
        return Err(Error::unavailable(format!(
            "the system user {VMM_USER} has uid 0; give it an unprivileged uid"
        )));
    }
    *cached = Some(found);
    Ok(found)
}

/// `name`'s uid and gid from /etc/passwd.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        let _pw = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// The journal locator of sandbox `owner`'s grant to `uid` on `path`: the owner is
/// part of it, so two sandboxes sharing one folder hold one row each.
pub(crate) fn locator(uid: u32, owner: &str, path: &Path) -> String {
    format!("{uid}:{owner}:{}", path.display())
}

/// The uid and path of a grant's journal locator.
pub(crate) fn parse_locator(locator: &str) -> Option<(u32, PathBuf)> {
    let mut f = locator.splitn(3, ':');
    let uid = f.next()?.parse().ok()?;
    let _owner = f.next()?;
    Some((uid, PathBuf::from(f.next()?)))
}

/// What a grant or revoke walk touched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WalkStats {
    /// Directories and regular files whose ACL was changed (or already right).
    pub entries: u64,
    /// Entries left alone: special files, symlinks, hard-linked files, other
    /// filesystems, and entries that vanished or refused the change.
    pub skipped: u64,
}

/// Grants `uid` read and write access (read only when `read_only`) to the tree at
/// `path` (canonical); see the module docs.
pub(crate) fn grant(path: &Path, uid: u32, read_only: bool) -> Result<WalkStats, Error> {
    let (file, dir) = if read_only { (4, 5) } else { (6, 7) };
    walk(path, &[], &mut |fd, is_dir, nlink| {
        if !is_dir && nlink > 1 {
            return Ok(false);
        }
        let perm = if is_dir { dir } else { file };
        update(fd, ACCESS, |acl| Some(with_user(acl, uid, perm)), is_dir)?;
        if is_dir {
            update(fd, DEFAULT, |acl| Some(with_user(acl, uid, dir)), is_dir)?;
        }
        Ok(true)
    })
    .map_err(|e| {
        Error::internal(format!(
            "cannot grant {VMM_USER} (uid {uid}) access to {}: {e}; share a folder owned by a regular user instead",
            path.display()
        ))
    })
}

/// Removes `uid`'s ACL entries from the tree at `path`, leaving alone the subtrees
/// in `keep` (still granted to another sandbox). A folder that is gone is fine.
pub(crate) fn revoke(path: &Path, uid: u32, keep: &[PathBuf]) -> Result<WalkStats, Error> {
    let r = walk(path, keep, &mut |fd, is_dir, _| {
        update(fd, ACCESS, |acl| without_user(acl, uid), is_dir)?;
        if is_dir {
            update(fd, DEFAULT, |acl| without_user(acl, uid), is_dir)?;
        }
        Ok(true)
    });
    match r {
        Err(e) if e == Errno::NOENT || e == Errno::NOTDIR => Ok(WalkStats::default()),
        r => r.map_err(|e| {
            Error::internal(format!(
                "cannot revoke {VMM_USER} (uid {uid}) access to {}: {e}; remove it with `setfacl -R -x u:{uid},d:u:{uid} {}`",
                path.display(),
                path.display()
            ))
        }),
    }
}

const ACCESS: &CStr = c"system.posix_acl_access";
const DEFAULT: &CStr = c"system.posix_acl_default";

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;
const XATTR_VERSION: u32 = 2;

/// One POSIX ACL entry, ordered as the kernel wants them (tag, then id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

fn decode(b: &[u8]) -> Option<Vec<Entry>> {
    let (head, rest) = b.split_at_checked(4)?;
    if u32::from_le_bytes(head.try_into().ok()?) != XATTR_VERSION || rest.len() % 8 != 0 {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect(),
    )
}

fn encode(acl: &[Entry]) -> Vec<u8> {
    let mut sorted = acl.to_vec();
    sorted.sort();
    let mut out = XATTR_VERSION.to_le_bytes().to_vec();
    for e in sorted {
        out.extend(e.tag.to_le_bytes());
        out.extend(e.perm.to_le_bytes());
        out.extend(e.id.to_le_bytes());
    }
    out
}

/// The ACL equivalent to permission bits `mode`.
fn from_mode(mode: u32) -> Vec<Entry> {
    let e = |tag, shift: u32| Entry {
        tag,
        id: UNDEFINED_ID,
        perm: ((mode >> shift) & 7) as u16,
    };
    vec![e(USER_OBJ, 6), e(GROUP_OBJ, 3), e(OTHER, 0)]
}

/// Sets the mask to what the group class holds (needed once any named entry
/// exists), or drops it when no named entry is left.
fn fix_mask(mut acl: Vec<Entry>) -> Vec<Entry> {
    acl.retain(|e| e.tag != MASK);
    if acl.iter().any(|e| e.tag == USER || e.tag == GROUP) {
        let perm = acl
            .iter()
            .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
            .fold(0, |p, e| p | e.perm);
        acl.push(Entry {
            tag: MASK,
            id: UNDEFINED_ID,
            perm,
        });
    }
    acl
}

fn with_user(mut acl: Vec<Entry>, uid: u32, perm: u16) -> Vec<Entry> {
    acl.retain(|e| !(e.tag == USER && e.id == uid));
    acl.push(Entry {
        tag: USER,
        id: uid,
        perm,
    });
    fix_mask(acl)
}

/// `acl` without `uid`'s entry; None when it has none (nothing to write).
fn without_user(mut acl: Vec<Entry>, uid: u32) -> Option<Vec<Entry>> {
    let before = acl.len();
    acl.retain(|e| !(e.tag == USER && e.id == uid));
    (acl.len() != before).then(|| fix_mask(acl))
}

/// Reads ACL `name` of the entry `fd` (an `O_PATH` descriptor), lets `change` edit
/// it, and writes it back. A missing access ACL reads as the mode bits; a missing
/// default ACL as the access ACL's base entries (as `setfacl -d` does). A default
/// ACL left with base entries only is removed.
fn update(
    fd: &OwnedFd,
    name: &CStr,
    change: impl FnOnce(Vec<Entry>) -> Option<Vec<Entry>>,
    is_dir: bool,
) -> Result<(), Errno> {
    // xattr calls do not take O_PATH descriptors; the magic link names the same
    // inode without resolving any path again.
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let current = match read_acl(&proc, name)? {
        Some(acl) => acl,
        None if name == ACCESS => from_mode(rustix::fs::fstat(fd)?.st_mode),
        None => {
            let access = match read_acl(&proc, ACCESS)? {
                Some(a) => a,
                None => from_mode(rustix::fs::fstat(fd)?.st_mode),
            };
            access
                .into_iter()
                .filter(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
                .collect()
        }
    };
    let Some(next) = change(current) else {
        return Ok(());
    };
    let minimal = !next.iter().any(|e| e.tag == USER || e.tag == GROUP);
    if is_dir && name == DEFAULT && minimal {
        return match rustix::fs::removexattr(&proc, name) {
            Err(Errno::NODATA) => Ok(()),
            r => r,
        };
    }
    // A minimal access ACL is folded back into the mode bits by the kernel.
    rustix::fs::setxattr(&proc, name, &encode(&next), XattrFlags::empty())
}

fn read_acl(proc: &str, name: &CStr) -> Result<Option<Vec<Entry>>, Errno> {
    let size = match rustix::fs::getxattr_query(proc, name) {
        Err(Errno::NODATA) => return Ok(None),
        r => r?,
    };
    let mut buf = vec![0u8; size];
    let n = rustix::fs::getxattr(proc, name, &mut buf[..])?;
    decode(&buf[..n]).map(Some).ok_or(Errno::INVAL)
}

/// Calls `each(fd, is_dir, nlink)` on every directory and regular file of the tree
/// at `top` on its filesystem, `top` included, never following a symlink and
/// skipping the subtrees in `keep`. An error on `top` ends the walk; one on an entry
/// below it (gone meanwhile, refused) skips that entry.
fn walk(
    top: &Path,
    keep: &[PathBuf],
    each: &mut dyn FnMut(&OwnedFd, bool, u64) -> Result<bool, Errno>,
) -> Result<WalkStats, Errno> {
    let resolve = ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_XDEV
        | ResolveFlags::NO_MAGICLINKS;
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let path_flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root = rustix::fs::open(top, dir_flags, Mode::empty())?;
    let dev = rustix::fs::fstat(&root)?.st_dev;
    let mut stats = WalkStats::default();
    // Paths relative to `top`; directories are reopened from `root` so the walk
    // holds two descriptors however deep the tree is.
    let mut stack = vec![PathBuf::from(".")];
    let mut first = true;
    while let Some(rel) = stack.pop() {
        let dir = match rustix::fs::openat2(&root, &rel, dir_flags, Mode::empty(), resolve) {
            Ok(d) => d,
            Err(e) if first => return Err(e),
            Err(_) => {
                stats.skipped += 1;
                continue;
            }
        };
        let dir_path = rustix::fs::openat(&dir, c".", path_flags, Mode::empty())?;
        match each(&dir_path, true, 1) {
            Ok(_) => stats.entries += 1,
            Err(e) if first => return Err(e),
            Err(_) => stats.skipped += 1,
        }
        first = false;
        let entries = match rustix::fs::Dir::read_from(&dir) {
            Ok(d) => d,
            Err(_) => continue,
        };
        for entry in entries {
            let Ok(entry) = entry else {
                stats.skipped += 1;
                break;
            };
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name.to_bytes()).to_owned();
            let rel = rel.join(&name);
            if keep.iter().any(|k| top.join(&rel) == *k) {
                continue;
            }
            let Ok(fd) = rustix::fs::openat(&dir, &*name, path_flags, Mode::empty()) else {
                stats.skipped += 1;
                continue;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else {
                stats.skipped += 1;
                continue;
            };
            match FileType::from_raw_mode(st.st_mode) {
                // Reopened (and checked) beneath `root` when its turn comes.
                FileType::Directory => stack.push(rel),
                FileType::RegularFile if st.st_dev == dev => match each(&fd, false, st.st_nlink) {
                    Ok(true) => stats.entries += 1,
                    Ok(false) | Err(_) => stats.skipped += 1,
                },
                _ => stats.skipped += 1,
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    const UID: u32 = 4_000_123;

    fn acl(p: &Path, name: &CStr) -> Option<Vec<Entry>> {
        read_acl(p.to_str().unwrap(), name).unwrap()
    }

    fn has_user(p: &Path, name: &CStr) -> Option<u16> {
        acl(p, name)?
            .into_iter()
            .find(|e| e.tag == USER && e.id == UID)
            .map(|e| e.perm)
    }

    #[test]
    fn acl_entries_round_trip_and_keep_the_mask_right() {
        let base = from_mode(0o640);
        let with = with_user(base.clone(), UID, 6);
        assert_eq!(decode(&encode(&with)).unwrap().len(), 5);
        let mask = with.iter().find(|e| e.tag == MASK).unwrap();
        assert_eq!(mask.perm, 6, "group r-- | user rw-");
        let mut back = without_user(with, UID).unwrap();
        back.sort();
        let mut base_sorted = base;
        base_sorted.sort();
        assert_eq!(back, base_sorted, "no named entry left: no mask");
        assert_eq!(without_user(back, UID), None);
        assert_eq!(decode(b"\x01\0\0\0"), None);
        assert_eq!(decode(b"\x02\0\0\0\x01"), None);
    }

    #[test]
    fn grant_covers_the_tree_only_and_revoke_restores_it() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let t = tempfile::Builder::new()
            .prefix("atl-acl-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let top = t.path().join("proj");
        let sub = top.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let file = sub.join("main.rs");
        std::fs::write(&file, "fn main() {}\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, "secret\n").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        std::fs::hard_link(&outside, top.join("hard")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            top.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let before: Vec<_> = [&top, &sub, &file, &outside]
            .iter()
            .map(|p| std::fs::symlink_metadata(p).unwrap().mode())
            .collect();

        let stats = grant(&top, UID, false).unwrap();
        assert_eq!(stats.entries, 3, "{stats:?}");
        assert_eq!(has_user(&top, ACCESS), Some(7));
        assert_eq!(has_user(&top, DEFAULT), Some(7));
        assert_eq!(has_user(&sub, ACCESS), Some(7));
        assert_eq!(has_user(&file, ACCESS), Some(6));
        // Nothing outside the tree, through a symlink or a second hard link.
        assert_eq!(acl(&outside, ACCESS), None);
        // What root adds meanwhile inherits the entry (masked by its mode).
        std::fs::write(sub.join("new.rs"), "").unwrap();
        assert!(has_user(&sub.join("new.rs"), ACCESS).is_some());
        // A second grant is idempotent; a read-only one lowers it.
        grant(&top, UID, true).unwrap();
        assert_eq!(has_user(&file, ACCESS), Some(4));
        assert_eq!(has_user(&top, ACCESS), Some(5));

        // Another sandbox's grant on `sub` keeps that subtree.
        revoke(&top, UID, std::slice::from_ref(&sub)).unwrap();
        assert_eq!(has_user(&top, ACCESS), None);
        assert_eq!(acl(&top, DEFAULT), None);
        assert_eq!(has_user(&sub, ACCESS), Some(5));
        revoke(&top, UID, &[]).unwrap();
        for p in [&top, &sub, &file, &sub.join("new.rs")] {
            assert_eq!(acl(p, ACCESS), None, "{}", p.display());
        }
        assert_eq!(acl(&sub, DEFAULT), None);
        let after: Vec<_> = [&top, &sub, &file, &outside]
            .iter()
            .map(|p| std::fs::symlink_metadata(p).unwrap().mode())
            .collect();
        assert_eq!(before, after, "modes are as they were");
        // A folder that is gone revokes to nothing.
        assert_eq!(
            revoke(&t.path().join("gone"), UID, &[]).unwrap(),
            WalkStats::default()
        );
    }

    #[test]
    fn locators_round_trip() {
        let l = locator(998, "sb-abc", Path::new("/root/a:b"));
        assert_eq!(parse_locator(&l), Some((998, PathBuf::from("/root/a:b"))));
        assert_eq!(parse_locator("x"), None);
    }
}
