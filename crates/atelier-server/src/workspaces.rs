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
