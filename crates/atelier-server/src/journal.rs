//! The resource journal: the only code that records and reclaims host resources.
//! Every resource is recorded here before it is made and forgotten only once it is
//! gone, so a crash at any point leaves a row saying what to undo. Sandboxes,
//! template builds and prebuild builds record theirs the same way; [`Owner`] says
//! whose a row is and [`ResourceKind`] what it is and how it is reclaimed.

use std::path::Path;
use std::sync::Arc;

use atelier_core::SandboxId;
use atelier_storage::Pool;
use atelier_store::Store;
use atelier_vmm::RunPaths;

use crate::Error;
use crate::network::Network;
use crate::vms::kill_vmms;

/// What a journaled resource is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A directory (a sandbox's run files and console log, a build directory).
    Dir,
    /// A disk clone in the pool.
    Disk,
    /// A VMM process, located by its run directory.
    Process,
    /// A TAP (made by, and dying with, its VMM; reclaimed with the process).
    Tap,
    /// A guest address and its firewall elements (a sandbox's is reclaimed with
    /// its disk: the address is part of its identity).
    Ip,
    /// ACL entries granting the share user access to a root-owned shared folder
    /// (`uid:owner:path`; reclaimed with the disk: the grant lives as long as the
    /// sandbox). See [`crate::share_access`].
    ShareAccess,
}

impl ResourceKind {
    /// Every kind, in no particular order.
    pub const ALL: [ResourceKind; 6] = [
        ResourceKind::Dir,
        ResourceKind::Disk,
        ResourceKind::Process,
        ResourceKind::Tap,
        ResourceKind::Ip,
        ResourceKind::ShareAccess,
    ];

    /// The name stored in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Dir => "dir",
            ResourceKind::Disk => "disk",
            ResourceKind::Process => "process",
            ResourceKind::Tap => "tap",
            ResourceKind::Ip => "ip",
            ResourceKind::ShareAccess => "share-access",
        }
    }

    /// The kind stored as `s`, if it is one.
    pub fn parse(s: &str) -> Option<ResourceKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether reclaiming `kinds` takes this kind along: a TAP goes with its VMM,
    /// an address with the disk.
    fn implied_by(self, kinds: &[ResourceKind]) -> bool {
        match self {
            ResourceKind::Tap => kinds.contains(&ResourceKind::Process),
            ResourceKind::Ip | ResourceKind::ShareAccess => kinds.contains(&ResourceKind::Disk),
            _ => false,
        }
    }
}

/// Whose a journaled resource is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A sandbox (stored as its id, `sb-…`).
    Sandbox(SandboxId),
    /// The build of a memory-snapshot template (stored as `template:<key>`).
    Template(String),
    /// The build of a prebuild (stored as `prebuild:<id>`).
    Prebuild(String),
}

impl Owner {
    /// The text stored in the journal.
    pub fn key(&self) -> String {
        match self {
            Owner::Sandbox(id) => id.to_string(),
            Owner::Template(k) => format!("template:{k}"),
            Owner::Prebuild(id) => format!("prebuild:{id}"),
        }
    }

    /// The owner stored as `s`, if it is one.
    pub fn parse(s: &str) -> Option<Owner> {
        if let Some(k) = s.strip_prefix("template:") {
            return Some(Owner::Template(k.to_owned()));
        }
        if let Some(id) = s.strip_prefix("prebuild:") {
            return Some(Owner::Prebuild(id.to_owned()));
        }
        SandboxId::parse(s).map(Owner::Sandbox)
    }
}

impl From<&SandboxId> for Owner {
    fn from(id: &SandboxId) -> Owner {
        Owner::Sandbox(id.clone())
    }
}

/// One journal row.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Journal row id.
    pub id: i64,
    /// Whose it is; None for a row this version cannot read (it is kept).
    pub owner: Option<Owner>,
    /// The owner as stored.
    pub owner_key: String,
    /// What it is; None for a kind this version does not know (it is kept).
    pub kind: Option<ResourceKind>,
    /// The kind as stored.
    pub kind_name: String,
    /// Where it is: a path, a TAP name, an address.
    pub locator: String,
}

/// The journal and the reclaiming of what it records.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    store: Store,
    pool: Pool,
    net: Option<Arc<Network>>,
}

impl Journal {
    pub(crate) fn new(store: Store, pool: Pool, net: Option<Arc<Network>>) -> Journal {
        Journal { store, pool, net }
    }

    /// Records a resource before it is made. Recording it twice is harmless.
    pub(crate) async fn record(
        &self,
        owner: impl Into<Owner>,
        kind: ResourceKind,
        locator: impl AsRef<str>,
    ) -> Result<(), Error> {
        let owner = owner.into();
        self.store
            .record_resource(&owner.key(), kind.as_str(), locator.as_ref())
            .await?;
        Ok(())
    }

    /// The resources of `owner` (all when None), newest first.
    pub(crate) async fn list(&self, owner: Option<&Owner>) -> Result<Vec<Resource>, Error> {
        let key = owner.map(Owner::key);
        Ok(self
            .store
            .resources(key.as_deref())
            .await?
            .into_iter()
            .map(|r| Resource {
                id: r.id,
                owner: Owner::parse(&r.owner),
                kind: ResourceKind::parse(&r.kind),
                owner_key: r.owner,
                kind_name: r.kind,
                locator: r.locator,
            })
            .collect())
    }

    /// Whether any journal row is at `locator`.
    pub(crate) async fn has_locator(&self, locator: &str) -> Result<bool, Error> {
        Ok(self
            .store
            .resources(None)
            .await?
            .iter()
            .any(|r| r.locator == locator))
    }

    /// Reclaims the resources of `owner` whose kind is in `kinds` (and what they
    /// imply), newest first, forgetting each once it is gone.
    pub(crate) async fn reclaim(
        &self,
        owner: impl Into<Owner>,
        kinds: &[ResourceKind],
    ) -> Result<(), Error> {
        let owner = owner.into();
        for r in self.list(Some(&owner)).await? {
            if let Some(k) = r.kind
                && (kinds.contains(&k) || k.implied_by(kinds))
            {
                self.reclaim_one(&r).await?;
            }
        }
        Ok(())
    }

    /// Reclaims everything `owner` holds.
    pub(crate) async fn reclaim_all(&self, owner: impl Into<Owner>) -> Result<(), Error> {
        self.reclaim(owner, &ResourceKind::ALL).await
    }

    /// Forgets the rows of `owner` without touching the host: what they name has
    /// become something else's (a finished build's directory is now a template).
    pub(crate) async fn release(&self, owner: impl Into<Owner>) -> Result<(), Error> {
        let owner = owner.into();
        for r in self.list(Some(&owner)).await? {
            self.store.forget_resource(r.id).await?;
        }
        Ok(())
    }

    /// Removes one resource from the host, then from the journal. A row of a kind
    /// this version does not know is kept (a newer manager may know it).
    pub(crate) async fn reclaim_one(&self, r: &Resource) -> Result<(), Error> {
        let Some(kind) = r.kind else {
            tracing::warn!(kind = %r.kind_name, locator = %r.locator, "unknown resource kind; keeping it");
            return Ok(());
        };
        match kind {
            ResourceKind::Process => {
                kill_vmms(&r.locator).await;
                let paths = RunPaths::new(Path::new(&r.locator));
                for f in [&paths.qmp, &paths.agent, &paths.pidfile] {
                    let _ = std::fs::remove_file(f);
                }
            }
            ResourceKind::Disk => self.pool.remove_disk(Path::new(&r.locator))?,
            ResourceKind::Tap => {
                if let Some(net) = &self.net {
                    net.links.delete(&r.locator).await?;
                }
            }
            ResourceKind::Ip => {
                if let Some(net) = &self.net
                    && let Ok(ip) = r.locator.parse()
                {
                    net.forget(ip).await?;
                }
                self.store.release_ip(&r.locator).await?;
            }
            ResourceKind::ShareAccess => self.revoke_share_access(r).await?,
            ResourceKind::Dir => match std::fs::remove_dir_all(&r.locator) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::internal(format!("cannot remove {}: {e}", r.locator)));
                }
                _ => {}
            },
        }
        tracing::debug!(owner = %r.owner_key, kind = kind.as_str(), locator = %r.locator, "reclaimed");
        self.store.forget_resource(r.id).await?;
        Ok(())
    }
}

impl Journal {
    /// Records, then grants, the share user's access to root-owned folder `path`
    /// for sandbox `owner`.
    pub(crate) async fn grant_share_access(
        &self,
        owner: &SandboxId,
        uid: u32,
        path: &Path,
        read_only: bool,
    ) -> Result<(), Error> {
        let _serial = crate::share_access::LOCK.lock().await;
        let locator = crate::share_access::locator(uid, owner.as_str(), path);
        self.record(owner, ResourceKind::ShareAccess, &locator)
            .await?;
        let p = path.to_owned();
        let stats =
            tokio::task::spawn_blocking(move || crate::share_access::grant(&p, uid, read_only))
                .await
                .map_err(|e| Error::internal(e.to_string()))??;
        tracing::info!(sandbox = %owner, path = %path.display(), uid, entries = stats.entries, skipped = stats.skipped, "granted the share user access to a root-owned folder");
        Ok(())
    }

    /// Revokes the grant of row `r`, except where another sandbox's grant still
    /// covers the folder (a folder inside another grant is left alone entirely; a
    /// folder holding one keeps that subtree).
    async fn revoke_share_access(&self, r: &Resource) -> Result<(), Error> {
        let Some((uid, path)) = crate::share_access::parse_locator(&r.locator) else {
            tracing::warn!(locator = %r.locator, "unreadable share-access row; forgetting it");
            return Ok(());
        };
        let _serial = crate::share_access::LOCK.lock().await;
        let others: Vec<std::path::PathBuf> = self
            .list(None)
            .await?
            .into_iter()
            .filter(|o| o.id != r.id && o.kind == Some(ResourceKind::ShareAccess))
            .filter_map(|o| crate::share_access::parse_locator(&o.locator))
            .filter(|(u, _)| *u == uid)
            .map(|(_, p)| p)
            .collect();
        if others.iter().any(|o| path.starts_with(o)) {
            tracing::debug!(path = %path.display(), "another sandbox's grant covers this folder; keeping it");
            return Ok(());
        }
        let keep: Vec<_> = others
            .into_iter()
            .filter(|o| o.starts_with(&path))
            .collect();
        let p = path.clone();
        let stats =
            tokio::task::spawn_blocking(move || crate::share_access::revoke(&p, uid, &keep))
                .await
                .map_err(|e| Error::internal(e.to_string()))??;
        tracing::info!(path = %path.display(), uid, entries = stats.entries, "revoked the share user's access to a root-owned folder");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_owners_round_trip_through_their_stored_text() {
        for k in ResourceKind::ALL {
            assert_eq!(ResourceKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ResourceKind::parse("vhost"), None);
        let id = SandboxId::generate();
        for o in [
            Owner::Sandbox(id.clone()),
            Owner::Template("abc-512m-1c-tcg-n1".into()),
            Owner::Prebuild("pb-123".into()),
        ] {
            assert_eq!(Owner::parse(&o.key()), Some(o));
        }
        assert_eq!(Owner::parse("nonsense"), None);
    }

    #[test]
    fn a_tap_goes_with_its_process_and_an_address_with_the_disk() {
        use ResourceKind::*;
        assert!(Tap.implied_by(&[Process]));
        assert!(!Tap.implied_by(&[Disk]));
        assert!(Ip.implied_by(&[Disk]));
        assert!(!Ip.implied_by(&[Process]));
        assert!(!Dir.implied_by(&[Process, Disk]));
        // A root-owned folder's grant lasts as long as the sandbox (its disk), so
        // delete, a failed first create and reconcile revoke it.
        assert!(ShareAccess.implied_by(&[Disk]));
        assert!(!ShareAccess.implied_by(&[Process]));
    }
}
