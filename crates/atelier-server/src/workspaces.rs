//! The workspace and secret services: apply, list, show and delete workspace
//! definitions; set, list and delete secrets (sealed at rest, see
//! [`crate::secrets`]); and the decrypted value for injection at spawn.
//!
//! Secret values are never logged and never returned by the API.

use atelier_core::{ValidationError, WorkspaceSpec, validate_secret_name};
use atelier_store::{SecretRecord, WorkspaceRecord};
use zeroize::Zeroizing;

use crate::Error;
use crate::manager::Manager;
use crate::secrets::{SecretBox, SecretError};

/// Largest secret value (64 KiB).
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Serialises "does every referenced secret exist" with "is this secret still
/// referenced", so an apply and a secret delete cannot interleave and leave a
/// workspace pointing at a deleted secret. Process-wide; these operations are rare.
static REFS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl From<SecretError> for Error {
    fn from(e: SecretError) -> Self {
        Error::internal(e.to_string())
    }
}

/// Where in `spec` the secret `name` is referenced first, as a field path.
fn reference_field(spec: &WorkspaceSpec, name: &str) -> String {
    if let Some(k) = spec
        .secrets
        .env
        .iter()
        .find_map(|(k, r)| (r.secret == name).then_some(k))
    {
        return format!("secrets.env.{k}.secret");
    }
    if let Some(i) = spec.secrets.files.iter().position(|f| f.secret == name) {
        return format!("secrets.files[{i}].secret");
    }
    if let Some(i) = spec
        .repos
        .iter()
        .position(|r| r.credentials.as_deref() == Some(name))
    {
        return format!("repos[{i}].credentials");
    }
    if let Some(p) = spec
        .opencode_keys
        .iter()
        .find_map(|(p, s)| (s == name).then_some(p))
    {
        return format!("opencode_keys.{p}");
    }
    "secrets".to_owned()
}

impl Manager {
    fn secret_box(&self) -> Result<std::sync::Arc<SecretBox>, Error> {
        Ok(SecretBox::for_data_dir(&self.cfg.data_dir)?)
    }

    /// The spec stored in a workspace row.
    pub fn workspace_spec(rec: &WorkspaceRecord) -> Result<WorkspaceSpec, Error> {
        serde_json::from_str(&rec.spec).map_err(|e| {
            Error::internal(format!(
                "stored definition of workspace {:?} is unreadable: {e}",
                rec.name
            ))
        })
    }

    /// Validates and stores a workspace definition. Every secret it references must
    /// exist. Returns the stored row and whether it changed (an identical definition
    /// keeps its revision).
    pub async fn apply_workspace(
        &self,
        spec: WorkspaceSpec,
    ) -> Result<(WorkspaceRecord, bool), Error> {
        spec.validate()?;
        let _refs = REFS.lock().await;
        let known: std::collections::BTreeSet<String> = self
            .store
            .list_secrets()
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
        if let Some(missing) = spec.secret_names().into_iter().find(|n| !known.contains(n)) {
            return Err(ValidationError::new(
                reference_field(&spec, &missing),
                format!(
                    "secret {missing:?} does not exist; set it first with `atelier secret set {missing}`"
                ),
            )
            .into());
        }
        let json = serde_json::to_string(&spec).map_err(|e| {
            Error::internal(format!("cannot encode workspace {:?}: {e}", spec.name))
        })?;
        let (revision, changed) = self
            .store
            .put_workspace(&spec.name, &json, &spec.content_hash())
            .await?;
        tracing::info!(workspace = %spec.name, revision, changed, "workspace applied");
        let rec = self.workspace(&spec.name).await?;
        Ok((rec, changed))
    }

    /// One workspace definition.
    pub async fn workspace(&self, name: &str) -> Result<WorkspaceRecord, Error> {
        self.store.get_workspace(name).await?.ok_or_else(|| {
            Error::not_found(format!(
                "workspace {name:?} not found; see `atelier workspace list`"
            ))
        })
    }

    /// Every workspace definition, by name.
    pub async fn workspaces(&self) -> Result<Vec<WorkspaceRecord>, Error> {
        Ok(self.store.list_workspaces().await?)
    }

    /// Removes a workspace definition.
    pub async fn delete_workspace(&self, name: &str) -> Result<(), Error> {
        let _refs = REFS.lock().await;
        if self
            .store
            .prebuilds(Some(name))
            .await?
            .iter()
            .any(|p| p.status == atelier_core::PrebuildStatus::Building)
        {
            return Err(Error::conflict(format!(
                "workspace {name:?} has a prebuild building; wait for it to finish"
            )));
        }
        if !self.store.delete_workspace(name).await? {
            return Err(Error::not_found(format!("workspace {name:?} not found")));
        }
        self.remove_unused_prebuilds(name).await?;
        tracing::info!(workspace = %name, "workspace deleted");
        Ok(())
    }

    /// Creates or replaces a secret (at most 64 KiB), sealed before it is stored.
    pub async fn set_secret(&self, name: &str, value: Vec<u8>) -> Result<SecretRecord, Error> {
        let value = Zeroizing::new(value);
        validate_secret_name(name)?;
        if value.is_empty() {
            return Err(Error::invalid(format!(
                "secret {name:?}: the value is empty; pipe it on stdin or use --file"
            )));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(Error::invalid(format!(
                "secret {name:?}: the value is {} bytes; at most {MAX_SECRET_BYTES}",
                value.len()
            )));
        }
        let sealed = self.secret_box()?.seal(name, &value)?;
        let rec = self.store.put_secret(name, &sealed).await?;
        tracing::info!(secret = %name, "secret set");
        Ok(rec)
    }

    /// Every secret's name and times (never values).
    pub async fn secrets(&self) -> Result<Vec<SecretRecord>, Error> {
        Ok(self.store.list_secrets().await?)
    }

    /// Removes a secret; refused while a workspace references it.
    pub async fn delete_secret(&self, name: &str) -> Result<(), Error> {
        let _refs = REFS.lock().await;
        let mut users = Vec::new();
        for rec in self.store.list_workspaces().await? {
            if Self::workspace_spec(&rec)?.secret_names().contains(name) {
                users.push(rec.name);
            }
        }
        if !users.is_empty() {
            return Err(Error::conflict(format!(
                "secret {name:?} is referenced by workspace {}; remove the reference and \
                 re-apply, or delete the workspace first",
                users.join(", ")
            )));
        }
        if !self.store.delete_secret(name).await? {
            return Err(Error::not_found(format!(
                "secret {name:?} not found; see `atelier secret list`"
            )));
        }
        tracing::info!(secret = %name, "secret deleted");
        Ok(())
    }

    /// A secret's value, decrypted (wiped from memory when dropped). For injection
    /// into guests only: never log it or send it to an API client.
    pub(crate) async fn secret_value(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
        let sealed = self
            .store
            .get_secret(name)
            .await?
            .ok_or_else(|| Error::not_found(format!("secret {name:?} not found")))?;
        Ok(self.secret_box()?.open(name, &sealed)?)
    }
}

/// The narrow handle over workspaces that the task service uses: read a
/// definition, make sure a prebuild is ready, and push a branch from the host with
/// the repository's credentials. Nothing else of the manager is reachable from it.
#[derive(Debug, Clone)]
pub struct Workspaces {
    mgr: std::sync::Arc<Manager>,
}

impl Workspaces {
    pub(crate) fn new(mgr: std::sync::Arc<Manager>) -> Workspaces {
        Workspaces { mgr }
    }

    /// A workspace's definition.
    pub async fn spec(&self, name: &str) -> Result<WorkspaceSpec, Error> {
        Ok(self.mgr.load_workspace(name).await?.1)
    }

    /// The workspace's newest ready prebuild; when it has none, waits for the one
    /// building or starts one and waits for it (`progress` hears each step). Fails
    /// with the build's error.
    pub async fn ensure_prebuild(
        &self,
        name: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<atelier_store::PrebuildRecord, Error> {
        use futures::StreamExt;
        // Subscribed first, so a build finishing meanwhile is not missed.
        let mut events = Box::pin(self.mgr.events().subscribe(None));
        if let Some(p) = self.mgr.newest_ready_prebuild(name).await? {
            return Ok(p);
        }
        let building = self
            .mgr
            .store()
            .prebuilds(Some(name))
            .await?
            .into_iter()
            .find(|p| p.status == atelier_core::PrebuildStatus::Building);
        let id = match building {
            Some(p) => {
                progress(&format!("waiting for prebuild {} of {name}", p.id));
                p.id
            }
            None => {
                let p = self.mgr.prebuild_create(name).await?;
                progress(&format!("building prebuild {} of {name} first", p.id));
                p.id
            }
        };
        loop {
            let p = self
                .mgr
                .store()
                .prebuild(&id)
                .await?
                .ok_or_else(|| Error::unavailable(format!("prebuild {id} was removed")))?;
            match p.status {
                atelier_core::PrebuildStatus::Ready => return Ok(p),
                atelier_core::PrebuildStatus::Failed => {
                    return Err(Error::unavailable(format!(
                        "prebuild {id} of {name} failed: {}; see `atelier prebuild logs {id}`",
                        p.error.unwrap_or_default()
                    )));
                }
                atelier_core::PrebuildStatus::Building => {}
            }
            // Wake on any of this build's events; re-read the row either way.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while let Some(d) = events.next().await {
                    if let crate::events::Delivery::Event(e) = d
                        && let atelier_core::event::EventKind::PrebuildStatus { prebuild, .. } =
                            &e.kind
                        && *prebuild == id
                    {
                        return;
                    }
                }
            })
            .await;
        }
    }

    /// Pushes `branch` (from a bundle made in a sandbox) to repository `repo` of
    /// workspace `name`, from the host, with the repository's credentials.
    pub async fn push_branch(
        &self,
        name: &str,
        repo: usize,
        branch: &str,
        bundle: &std::path::Path,
    ) -> Result<(), Error> {
        let spec = self.spec(name).await?;
        let r = spec.repos.get(repo).ok_or_else(|| {
            Error::invalid(format!("workspace {name} has no repository number {repo}"))
        })?;
        let secret = match &r.credentials {
            Some(s) => Some(self.mgr.secret_value(s).await?),
            None => None,
        };
        let dir = bundle
            .parent()
            .ok_or_else(|| Error::internal("bundle path has no parent"))?;
        let url = r.push_url.as_deref().unwrap_or(&r.url);
        crate::prebuild::push_bundle(url, branch, secret.as_deref().map(|v| &v[..]), bundle, dir)
            .await
    }

    /// A private scratch directory for one task's host-side files (bundles).
    pub fn scratch_dir(&self, task: &str) -> Result<std::path::PathBuf, Error> {
        let d = self.mgr.config().data_dir.join("tasks").join(task);
        std::fs::create_dir_all(&d)
            .map_err(|e| Error::internal(format!("cannot create {}: {e}", d.display())))?;
        Ok(d)
    }
}
