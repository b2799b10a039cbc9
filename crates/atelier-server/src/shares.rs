//! Host folders shared into guests (virtio-9p): which folders may be shared and
//! which host user the VMM of a sandbox with shares runs as.
//!
//! A guest is root in its VM and hostile. So:
//! - only folders under the operator's share roots (`atelier serve --share-root`)
//!   may be shared, after canonicalising (symlinks and `..` cannot escape), and
//!   never the manager's data dir or a folder holding it;
//! - the VMM runs as the owner of the shared folders, never as root: the host then
//!   applies that user's permissions to everything the guest does through the
//!   share, and the 9p server stores the guest's owners, modes and device nodes as
//!   metadata (`security_model=mapped-xattr` in `atelier-vmm`) instead of applying
//!   them;
//! - a folder owned by root (e.g. under `/root`, where the README's root user
//!   works) is shared by a VMM running as the unprivileged system user
//!   [`crate::share_access::VMM_USER`], granted access to that folder only, with
//!   ACL entries journaled and revoked when the sandbox goes
//!   ([`crate::share_access`]); only a root client (or the admin API without a
//!   `mount_owner`) may share a root-owned folder;
//! - a `,` in a path is refused: QEMU's option parser would read it as a separator.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use atelier_core::{MountSpec, Owner, SandboxSpec};
use atelier_store::SandboxRecord;
use atelier_vmm::Share;

use crate::{Error, ManagerConfig};

/// The share roots when the operator names none: users' home folders, which hold
/// their projects, and root's (the README's setup runs as root).
pub const DEFAULT_SHARE_ROOTS: &[&str] = &["/home", "/root"];

/// Checks a new sandbox's mounts against the share roots and replaces them with
/// their canonical form; sets `mount_owner` to the user its VMM will run as.
pub(crate) fn check_spec(cfg: &ManagerConfig, spec: &mut SandboxSpec) -> Result<(), Error> {
    let checked = check(cfg, &spec.mounts, spec.mount_owner)?;
    spec.mounts = checked.mounts;
    spec.mount_owner = checked.owner;
    Ok(())
}

/// A sandbox's 9p shares, the host uid/gid its VMM drops to, and the root-owned
/// folders (canonical path, read-only) that user must be granted access to first.
#[derive(Debug, Default)]
pub(crate) struct VmShares {
    /// The 9p exports.
    pub shares: Vec<Share>,
    /// The uid/gid the VMM drops to; None keeps the manager's user.
    pub run_as: Option<(u32, u32)>,
    /// Folders owned by root that [`crate::share_access::VMM_USER`] needs an ACL
    /// grant on.
    pub grants: Vec<(PathBuf, bool)>,
}

/// The 9p shares of sandbox `rec` and the uid/gid its VMM drops to, checked again
/// at every launch (a folder may have moved, changed owner or become a symlink
/// since the sandbox was created). `None` when the VMM keeps the manager's user:
/// no shares, or the manager itself runs as the folders' (non-root) owner.
pub(crate) fn vm_shares(cfg: &ManagerConfig, rec: &SandboxRecord) -> Result<VmShares, Error> {
    let checked = check(cfg, &rec.mounts, rec.mount_owner)?;
    let shares = checked
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| Share {
            tag: format!("atl{i}"),
            path: PathBuf::from(&m.source),
            read_only: m.read_only,
        })
        .collect();
    // Dropping to our own user is no drop (and QEMU refuses it).
    let me = rustix::process::geteuid().as_raw();
    let grants = if checked.root_owned {
        checked
            .mounts
            .iter()
            .map(|m| (PathBuf::from(&m.source), m.read_only))
            .collect()
    } else {
        Vec::new()
    };
    Ok(VmShares {
        shares,
        run_as: checked
            .owner
            .filter(|o| o.uid != me)
            .map(|o| (o.uid, o.gid)),
        grants,
    })
}

/// Refuses to pause or fork (`done`) a sandbox with shared folders: QEMU blocks
/// migrating a VM while the guest has a 9p export mounted, so its memory cannot be
/// saved.
pub(crate) fn refuse_migration(rec: &SandboxRecord, done: &str) -> Result<(), Error> {
    if rec.mounts.is_empty() {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "sandbox {} shares host folders, and a VM with a mounted 9p share cannot have its memory saved, so it cannot be {done}; stop and start it instead (its disk is kept), or create it without --mount",
        rec.name
    )))
}

/// The share roots in canonical form; a root that does not exist shares nothing.
fn roots(cfg: &ManagerConfig) -> Vec<PathBuf> {
    cfg.share_roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .collect()
}

fn roots_text(cfg: &ManagerConfig) -> String {
    if cfg.share_roots.is_empty() {
        return "none".into();
    }
    cfg.share_roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checked mounts: canonical, with the VMM's user.
#[derive(Debug)]
struct Checked {
    mounts: Vec<MountSpec>,
    owner: Option<Owner>,
    /// The folders belong to root: the VMM runs as the share user, with a grant.
    root_owned: bool,
}

/// Canonical mounts and the VMM's user; see the module docs for the rules.
fn check(
    cfg: &ManagerConfig,
    mounts: &[MountSpec],
    requested: Option<Owner>,
) -> Result<Checked, Error> {
    if mounts.is_empty() {
        return Ok(Checked {
            mounts: Vec::new(),
            owner: None,
            root_owned: false,
        });
    }
    let roots = roots(cfg);
    let data_dir = std::fs::canonicalize(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    let mut out = Vec::with_capacity(mounts.len());
    let mut owner: Option<(u32, u32, String)> = None;
    for m in mounts {
        let source = canonical_source(&m.source)?;
        let shown = source.display().to_string();
        if !roots.iter().any(|r| source.starts_with(r)) {
            return Err(Error::invalid(format!(
                "mount source {shown} is outside the share roots ({}); share a folder under one of them, or have the operator add a root with `atelier serve --share-root DIR`",
                roots_text(cfg)
            )));
        }
        if source.starts_with(&data_dir) || data_dir.starts_with(&source) {
            return Err(Error::invalid(format!(
                "mount source {shown} holds or is inside the manager's data dir {}; share a project folder instead",
                data_dir.display()
            )));
        }
        let meta = std::fs::metadata(&source)
            .map_err(|e| Error::invalid(format!("mount source {shown} cannot be shared: {e}")))?;
        if !meta.is_dir() {
            return Err(Error::invalid(format!(
                "mount source {shown} is not a directory"
            )));
        }
        if meta.uid() == 0 && !rustix::process::geteuid().is_root() {
            return Err(Error::invalid(format!(
                "mount source {shown} belongs to root, and the manager does not run as root, so it cannot grant the unprivileged user its VM would run as access to it (the VM of a sandbox with shared folders never runs as root): share a folder owned by a regular user (e.g. `chown -R USER: {shown}`)"
            )));
        }
        match &owner {
            Some((uid, _, first)) if *uid != meta.uid() => {
                return Err(Error::invalid(format!(
                    "mount sources {first} (uid {uid}) and {shown} (uid {}) belong to different users; the sandbox's VM runs as one user, so share folders of one owner",
                    meta.uid()
                )));
            }
            Some(_) => {}
            None => owner = Some((meta.uid(), meta.gid(), shown.clone())),
        }
        out.push(MountSpec {
            source: shown,
            target: m.target.clone(),
            read_only: m.read_only,
        });
    }
    let Some((folder_uid, folder_gid, first)) = owner else {
        return Ok(Checked {
            mounts: out,
            owner: None,
            root_owned: false,
        });
    };
    // Root's folders are shared by the unprivileged share user, never by root.
    let root_owned = folder_uid == 0;
    let (uid, gid) = if root_owned {
        crate::share_access::vmm_user()?
    } else {
        (folder_uid, folder_gid)
    };
    // The client's own uid (the CLI sends it) is a preference, not an authority: a
    // non-root one must be the folders' owner (for root's folders, the share user
    // the record already names); root (or none) means "the owner".
    let owner = match requested {
        Some(o) if o.uid == uid => o,
        Some(o) if o.uid != 0 => {
            return Err(Error::invalid(format!(
                "mount_owner {}:{} does not own {first} (uid {folder_uid} does); a sandbox's VM runs as the owner of its shared folders, so share a folder you own",
                o.uid, o.gid
            )));
        }
        _ => Owner { uid, gid },
    };
    Ok(Checked {
        mounts: out,
        owner: Some(owner),
        root_owned,
    })
}

/// `source` made absolute and free of symlinks and `..`, refusing what QEMU's
/// option parser would misread.
fn canonical_source(source: &str) -> Result<PathBuf, Error> {
    let comma = |p: &str| {
        Error::invalid(format!(
            "mount source {p} has a ',' in its path, which QEMU's option parser treats as a separator; rename the folder or share its parent"
        ))
    };
    if source.contains(',') {
        return Err(comma(source));
    }
    let canonical = std::fs::canonicalize(Path::new(source))
        .map_err(|e| Error::invalid(format!("mount source {source} cannot be shared: {e}")))?;
    let text = canonical.to_str().ok_or_else(|| {
        Error::invalid(format!(
            "mount source {} is not valid UTF-8; rename it",
            canonical.display()
        ))
    })?;
    if text.contains(',') {
        return Err(comma(text));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cfg(root: &Path) -> ManagerConfig {
        let mut c = ManagerConfig::new(root.join("data"));
        c.share_roots = vec![root.join("share")];
        c
    }

    fn mount(p: &Path) -> MountSpec {
        MountSpec {
            source: p.display().to_string(),
            target: "/mnt".into(),
            read_only: false,
        }
    }

    fn chown(p: &Path, uid: u32) {
        rustix::fs::chown(
            p,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(uid)),
        )
        .unwrap();
    }

    #[test]
    fn refuses_outside_roots_symlink_escapes_root_owned_and_commas() {
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("share");
        let proj = share.join("proj");
        std::fs::create_dir_all(&proj).unwrap();
        std::fs::create_dir_all(t.path().join("data")).unwrap();
        let c = cfg(t.path());
        let err = |m: MountSpec| check(&c, &[m], None).unwrap_err().message;

        let e = err(mount(Path::new("/")));
        assert!(
            e.contains("outside the share roots") && e.contains("--share-root"),
            "{e}"
        );
        assert!(e.contains(&share.display().to_string()), "{e}");
        let e = err(mount(&proj.join("../../data")));
        assert!(e.contains("outside the share roots"), "{e}");
        std::os::unix::fs::symlink("/etc", proj.join("link")).unwrap();
        let e = err(mount(&proj.join("link")));
        assert!(e.contains("/etc") && e.contains("outside"), "{e}");
        let e = err(mount(&share.join("a,b")));
        assert!(e.contains("','"), "{e}");

        if rustix::process::geteuid().is_root() {
            // The temp dir is root's: its VMM runs as the share user, which only a
            // root client (or none) may ask for; a regular user is refused.
            let (uid, gid) = crate::share_access::vmm_user().unwrap();
            assert_ne!(uid, 0);
            let ck = check(&c, &[mount(&proj)], Some(Owner { uid: 0, gid: 0 })).unwrap();
            assert_eq!((ck.owner, ck.root_owned), (Some(Owner { uid, gid }), true));
            // Checked again at a later launch with the owner the record holds.
            let again = check(&c, &[mount(&proj)], ck.owner).unwrap();
            assert_eq!(again.owner, ck.owner);
            let e = check(
                &c,
                &[mount(&proj)],
                Some(Owner {
                    uid: 1000,
                    gid: 1000,
                }),
            )
            .unwrap_err()
            .message;
            assert!(e.contains("does not own") && e.contains("uid 0"), "{e}");
            chown(&proj, 65534);
            let ck = check(&c, &[mount(&proj)], Some(Owner { uid: 0, gid: 0 })).unwrap();
            let (m, o) = (ck.mounts, ck.owner);
            assert!(!ck.root_owned);
            assert_eq!(
                o,
                Some(Owner {
                    uid: 65534,
                    gid: 65534
                })
            );
            assert_eq!(
                m[0].source,
                proj.canonicalize().unwrap().display().to_string()
            );
            let e = check(
                &c,
                &[mount(&proj)],
                Some(Owner {
                    uid: 1000,
                    gid: 1000,
                }),
            )
            .unwrap_err()
            .message;
            assert!(e.contains("does not own"), "{e}");
            // The data dir is never shared, even under a root.
            let mut c2 = c.clone();
            c2.share_roots = vec![t.path().to_owned()];
            chown(&t.path().join("data"), 65534);
            let e = check(&c2, &[mount(&t.path().join("data"))], None)
                .unwrap_err()
                .message;
            assert!(e.contains("data dir"), "{e}");
        }
    }
}
