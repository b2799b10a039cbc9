//! Workspace definitions (JSON spec, content hash, revision) and sealed secrets.
//!
//! The store never sees a secret in the clear: the manager seals values before
//! `put_secret` and opens them after `get_secret`.

use sqlx::Row;

use crate::{Store, StoreError, now_ms, q};

/// A stored workspace definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    /// Unique name.
    pub name: String,
    /// The validated spec as JSON.
    pub spec: String,
    /// SHA-256 (hex) of the spec's canonical JSON.
    pub hash: String,
    /// 1 for a new definition, +1 on every change of hash.
    pub revision: i64,
    /// When first applied, ms since epoch.
    pub created_at: i64,
    /// When last changed, ms since epoch.
    pub updated_at: i64,
}

/// A stored secret's metadata (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// Unique name.
    pub name: String,
    /// When first set, ms since epoch.
    pub created_at: i64,
    /// When last set, ms since epoch.
    pub updated_at: i64,
}

fn workspace_from_row(r: &sqlx::sqlite::SqliteRow) -> WorkspaceRecord {
    WorkspaceRecord {
        name: r.get("name"),
        spec: r.get("spec"),
        hash: r.get("hash"),
        revision: r.get("revision"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

fn secret_from_row(r: &sqlx::sqlite::SqliteRow) -> SecretRecord {
    SecretRecord {
        name: r.get("name"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
    }
}

impl Store {
    /// Creates or updates a workspace definition. A new hash grows the revision by
    /// one (1 for a new name); the same hash keeps it, storing the definition if it
    /// differs in what the hash leaves out (budget, templates). Returns the
    /// revision in effect and whether anything changed.
    pub async fn put_workspace(
        &self,
        name: &str,
        spec_json: &str,
        hash: &str,
    ) -> Result<(i64, bool), StoreError> {
        let _serial = self.rmw.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q("begin"))?;
        let current = sqlx::query("SELECT spec, hash, revision FROM workspaces WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("get workspace"))?;
        let now = now_ms();
        let revision = match current {
            Some(row)
                if row.get::<&str, _>("hash") == hash
                    && row.get::<&str, _>("spec") == spec_json =>
            {
                return Ok((row.get("revision"), false));
            }
            Some(row) if row.get::<&str, _>("hash") == hash => {
                sqlx::query("UPDATE workspaces SET spec = ?, updated_at = ? WHERE name = ?")
                    .bind(spec_json)
                    .bind(now)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(q("update workspace"))?;
                row.get::<i64, _>("revision")
            }
            Some(row) => {
                let revision = row.get::<i64, _>("revision") + 1;
                sqlx::query(
                    "UPDATE workspaces SET spec = ?, hash = ?, revision = ?, updated_at = ?
                     WHERE name = ?",
                )
                .bind(spec_json)
                .bind(hash)
                .bind(revision)
                .bind(now)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(q("update workspace"))?;
                revision
            }
            None => {
                sqlx::query(
                    "INSERT INTO workspaces (name, spec, hash, revision, created_at, updated_at)
                     VALUES (?, ?, ?, 1, ?, ?)",
                )
                .bind(name)
                .bind(spec_json)
                .bind(hash)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(q("insert workspace"))?;
                1
            }
        };
        tx.commit().await.map_err(q("commit"))?;
        self.notify(crate::Change::Workspace {
            name: name.to_owned(),
            deleted: false,
        });
        Ok((revision, true))
    }

    /// One workspace definition.
    pub async fn get_workspace(&self, name: &str) -> Result<Option<WorkspaceRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get workspace"))?;
        Ok(row.as_ref().map(workspace_from_row))
    }

    /// Every workspace definition, by name.
    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM workspaces ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list workspaces"))?;
        Ok(rows.iter().map(workspace_from_row).collect())
    }

    /// Removes a workspace definition; false when there was none.
    pub async fn delete_workspace(&self, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM workspaces WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("delete workspace"))?;
        let deleted = r.rows_affected() > 0;
        if deleted {
            self.notify(crate::Change::Workspace {
                name: name.to_owned(),
                deleted: true,
            });
        }
        Ok(deleted)
    }

    /// Creates or replaces a sealed secret; returns its metadata.
    pub async fn put_secret(&self, name: &str, sealed: &[u8]) -> Result<SecretRecord, StoreError> {
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO secrets (name, sealed, created_at, updated_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed,
                                             updated_at = excluded.updated_at
             RETURNING name, created_at, updated_at",
        )
        .bind(name)
        .bind(sealed)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(q("put secret"))?;
        Ok(secret_from_row(&row))
    }

    /// A sealed secret, if it exists.
    pub async fn get_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT sealed FROM secrets WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get secret"))?;
        Ok(row.map(|r| r.get("sealed")))
    }

    /// Every secret's name and times (never values), by name.
    pub async fn list_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query("SELECT name, created_at, updated_at FROM secrets ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list secrets"))?;
        Ok(rows.iter().map(secret_from_row).collect())
    }

    /// Removes a secret; false when there was none.
    pub async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM secrets WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("delete secret"))?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn workspace_revisions_follow_the_hash() {
        let (_d, s) = store().await;
        assert_eq!(s.get_workspace("w").await.unwrap(), None);
        assert_eq!(s.put_workspace("w", "{}", "h1").await.unwrap(), (1, true));
        assert_eq!(s.put_workspace("w", "{}", "h1").await.unwrap(), (1, false));
        // The same hash with another definition (a budget): stored, same revision.
        assert_eq!(
            s.put_workspace("w", r#"{"budget":{}}"#, "h1")
                .await
                .unwrap(),
            (1, true)
        );
        assert_eq!(
            s.get_workspace("w").await.unwrap().unwrap().spec,
            r#"{"budget":{}}"#
        );
        assert_eq!(s.put_workspace("w", "{}", "h1").await.unwrap(), (1, true));
        let first = s.get_workspace("w").await.unwrap().unwrap();
        assert_eq!(
            s.put_workspace("w", r#"{"a":1}"#, "h2").await.unwrap(),
            (2, true)
        );
        let w = s.get_workspace("w").await.unwrap().unwrap();
        assert_eq!(
            (w.spec.as_str(), w.hash.as_str(), w.revision),
            (r#"{"a":1}"#, "h2", 2)
        );
        assert_eq!(w.created_at, first.created_at);
        assert!(w.updated_at >= first.updated_at);
        s.put_workspace("a", "{}", "x").await.unwrap();
        let names: Vec<_> = s
            .list_workspaces()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect();
        assert_eq!(names, ["a", "w"]);
        assert!(s.delete_workspace("w").await.unwrap());
        assert!(!s.delete_workspace("w").await.unwrap());
        // A re-created workspace starts again at revision 1.
        assert_eq!(s.put_workspace("w", "{}", "h2").await.unwrap(), (1, true));
    }

    #[tokio::test]
    async fn secrets_store_sealed_bytes_and_list_no_values() {
        let (_d, s) = store().await;
        assert_eq!(s.get_secret("k").await.unwrap(), None);
        let a = s.put_secret("k", &[1, 2, 3]).await.unwrap();
        assert_eq!(a.name, "k");
        assert_eq!(s.get_secret("k").await.unwrap(), Some(vec![1, 2, 3]));
        let b = s.put_secret("k", &[4]).await.unwrap();
        assert_eq!(b.created_at, a.created_at);
        assert_eq!(s.get_secret("k").await.unwrap(), Some(vec![4]));
        s.put_secret("a", &[0]).await.unwrap();
        let list = s.list_secrets().await.unwrap();
        assert_eq!(
            list.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "k"]
        );
        assert!(s.delete_secret("k").await.unwrap());
        assert!(!s.delete_secret("k").await.unwrap());
        assert_eq!(s.get_secret("k").await.unwrap(), None);
    }
}
