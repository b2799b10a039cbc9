//! Prebuild rows: status, the commits they were built from, staleness.

use atelier_core::PrebuildStatus;
use sqlx::Row;

use crate::{Change, Store, StoreError, now_ms, q};

/// One prebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrebuildRecord {
    /// `pb-` id; also its directory name.
    pub id: String,
    /// Workspace name.
    pub workspace: String,
    /// Workspace revision it was built from.
    pub revision: i64,
    /// Where it is in its life.
    pub status: PrebuildStatus,
    /// JSON object: repo path -> commit.
    pub commits: String,
    /// A repo's branch moved on since the build.
    pub stale: bool,
    /// Bytes on disk (memory file + disk image), once ready.
    pub size_bytes: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Start of the build, ms since epoch.
    pub created_at: i64,
    /// When it became ready.
    pub ready_at: Option<i64>,
    /// The OpenCode server frozen running in it, if any.
    pub opencode: Option<OpenCodeServer>,
}

/// An OpenCode server running inside a guest (frozen in a prebuild, or in a
/// sandbox restored from one). `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenCodeServer {
    /// OpenCode's version, as `/global/health` reported it.
    pub version: String,
    /// Guest port it listens on (on 127.0.0.1).
    pub port: u16,
    /// Its server password (user `opencode`).
    pub password: String,
    /// The directory its instance was warmed for (the workspace's first repo).
    pub directory: String,
}

impl std::fmt::Debug for OpenCodeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeServer")
            .field("version", &self.version)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("directory", &self.directory)
            .finish()
    }
}

fn from_row(r: &sqlx::sqlite::SqliteRow) -> Result<PrebuildRecord, StoreError> {
    let status: String = r.get("status");
    Ok(PrebuildRecord {
        status: PrebuildStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
            table: "prebuilds",
            detail: format!("status {status:?}"),
        })?,
        id: r.get("id"),
        workspace: r.get("workspace"),
        revision: r.get("revision"),
        commits: r.get("commits"),
        stale: r.get::<i64, _>("stale") != 0,
        size_bytes: r.get("size_bytes"),
        error: r.get("error"),
        created_at: r.get("created_at"),
        ready_at: r.get("ready_at"),
        opencode: match (
            r.get::<Option<String>, _>("opencode_version"),
            r.get::<Option<i64>, _>("opencode_port"),
            r.get::<Option<String>, _>("opencode_password"),
            r.get::<Option<String>, _>("opencode_directory"),
        ) {
            (Some(version), Some(port), Some(password), Some(directory)) => Some(OpenCodeServer {
                version,
                port: u16::try_from(port).map_err(|_| StoreError::Corrupt {
                    table: "prebuilds",
                    detail: format!("opencode_port {port}"),
                })?,
                password,
                directory,
            }),
            _ => None,
        },
    })
}

impl Store {
    /// Records a prebuild that starts building.
    pub async fn insert_prebuild(
        &self,
        id: &str,
        workspace: &str,
        revision: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO prebuilds (id, workspace, revision, status, created_at) VALUES (?, ?, ?, 'building', ?)",
        )
        .bind(id)
        .bind(workspace)
        .bind(revision)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("insert prebuild"))?;
        self.notify_prebuild(id).await;
        Ok(())
    }

    /// Marks a building prebuild ready with its commits and size.
    pub async fn prebuild_ready(
        &self,
        id: &str,
        commits_json: &str,
        size_bytes: i64,
    ) -> Result<(), StoreError> {
        self.end_prebuild(
            id,
            PrebuildStatus::Ready,
            commits_json,
            Some(size_bytes),
            None,
        )
        .await
    }

    /// Marks a building prebuild failed.
    pub async fn prebuild_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.end_prebuild(id, PrebuildStatus::Failed, "{}", None, Some(error))
            .await
    }

    /// The one writer of a prebuild's status: only the moves
    /// [`PrebuildStatus::can_transition_to`] allows, checked in the same statement.
    async fn end_prebuild(
        &self,
        id: &str,
        to: PrebuildStatus,
        commits_json: &str,
        size_bytes: Option<i64>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let from: Vec<&str> = PrebuildStatus::ALL
            .into_iter()
            .filter(|s| s.can_transition_to(to))
            .map(PrebuildStatus::as_str)
            .collect();
        let done = sqlx::query(
            "UPDATE prebuilds SET status = ?, commits = CASE WHEN ? = 'ready' THEN ? ELSE commits END,
                 size_bytes = ?, error = ?, ready_at = CASE WHEN ? = 'ready' THEN ? ELSE ready_at END
             WHERE id = ? AND status IN (SELECT value FROM json_each(?))",
        )
        .bind(to.as_str())
        .bind(to.as_str())
        .bind(commits_json)
        .bind(size_bytes)
        .bind(error)
        .bind(to.as_str())
        .bind(now_ms())
        .bind(id)
        .bind(serde_json::to_string(&from).unwrap_or_else(|_| "[]".into()))
        .execute(&self.pool)
        .await
        .map_err(q("end prebuild"))?;
        if done.rows_affected() == 0 {
            let now = self.prebuild(id).await?;
            return Err(StoreError::PrebuildTransition {
                id: id.to_owned(),
                from: now.map(|p| p.status),
                to,
            });
        }
        self.notify_prebuild(id).await;
        Ok(())
    }

    /// Records the OpenCode server a building prebuild froze running.
    pub async fn set_prebuild_opencode(
        &self,
        id: &str,
        oc: &OpenCodeServer,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE prebuilds SET opencode_version = ?, opencode_port = ?, opencode_password = ?, opencode_directory = ? WHERE id = ?",
        )
        .bind(&oc.version)
        .bind(i64::from(oc.port))
        .bind(&oc.password)
        .bind(&oc.directory)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("prebuild opencode"))?;
        Ok(())
    }

    /// Records the OpenCode server of a sandbox spawned from a prebuild with one.
    pub async fn set_sandbox_opencode(
        &self,
        id: &atelier_core::SandboxId,
        oc: &OpenCodeServer,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(oc).map_err(|e| StoreError::Corrupt {
            table: "sandboxes",
            detail: e.to_string(),
        })?;
        sqlx::query("UPDATE sandboxes SET opencode = ? WHERE id = ?")
            .bind(json)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("set sandbox opencode"))?;
        Ok(())
    }

    /// The OpenCode server of a sandbox, if it was spawned with one.
    pub async fn sandbox_opencode(
        &self,
        id: &atelier_core::SandboxId,
    ) -> Result<Option<OpenCodeServer>, StoreError> {
        let row = sqlx::query("SELECT opencode FROM sandboxes WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox opencode"))?;
        let Some(text) = row.and_then(|r| r.get::<Option<String>, _>("opencode")) else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                table: "sandboxes",
                detail: format!("opencode: {e}"),
            })
    }

    /// Flags a ready prebuild whose repos moved on.
    pub async fn set_prebuild_stale(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE prebuilds SET stale = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("prebuild stale"))?;
        self.notify_prebuild(id).await;
        Ok(())
    }

    /// One prebuild.
    pub async fn prebuild(&self, id: &str) -> Result<Option<PrebuildRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM prebuilds WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get prebuild"))?;
        row.as_ref().map(from_row).transpose()
    }

    /// Prebuilds, newest first; of one workspace when given.
    pub async fn prebuilds(
        &self,
        workspace: Option<&str>,
    ) -> Result<Vec<PrebuildRecord>, StoreError> {
        let rows = match workspace {
            Some(w) => {
                sqlx::query(
                    "SELECT * FROM prebuilds WHERE workspace = ? ORDER BY created_at DESC, id",
                )
                .bind(w)
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query("SELECT * FROM prebuilds ORDER BY created_at DESC, id")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(q("list prebuilds"))?;
        rows.iter().map(from_row).collect()
    }

    /// Forgets a prebuild (its files are gone).
    pub async fn delete_prebuild(&self, id: &str) -> Result<(), StoreError> {
        let row = sqlx::query("DELETE FROM prebuilds WHERE id = ? RETURNING workspace")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("delete prebuild"))?;
        if let Some(row) = row {
            self.notify(Change::PrebuildRemoved {
                id: id.to_owned(),
                workspace: row.get("workspace"),
            });
        }
        Ok(())
    }

    /// Tells the observer a prebuild row changed (re-read after the write).
    async fn notify_prebuild(&self, id: &str) {
        if let Ok(Some(rec)) = self.prebuild(id).await {
            self.notify(Change::Prebuild(rec));
        }
    }

    /// The workspace a sandbox was spawned from.
    pub async fn set_sandbox_workspace(
        &self,
        id: &atelier_core::SandboxId,
        workspace: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET workspace = ? WHERE id = ?")
            .bind(workspace)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("set sandbox workspace"))?;
        Ok(())
    }

    /// The workspace a sandbox was spawned from, if any.
    pub async fn sandbox_workspace(
        &self,
        id: &atelier_core::SandboxId,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT workspace FROM sandboxes WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox workspace"))?;
        Ok(row.and_then(|r| r.get("workspace")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prebuild_rows_move_through_their_states() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.insert_prebuild("pb-a", "demo", 1).await.unwrap();
        s.insert_prebuild("pb-b", "other", 1).await.unwrap();
        assert_eq!(
            s.prebuild("pb-a").await.unwrap().unwrap().status,
            PrebuildStatus::Building
        );
        s.prebuild_ready("pb-a", r#"{"/w":"abc"}"#, 42)
            .await
            .unwrap();
        s.set_prebuild_stale("pb-a").await.unwrap();
        let p = s.prebuild("pb-a").await.unwrap().unwrap();
        assert_eq!(
            (p.status, p.stale, p.size_bytes),
            (PrebuildStatus::Ready, true, Some(42))
        );
        // A finished build does not move again.
        assert!(matches!(
            s.prebuild_failed("pb-a", "late").await,
            Err(StoreError::PrebuildTransition {
                from: Some(PrebuildStatus::Ready),
                to: PrebuildStatus::Failed,
                ..
            })
        ));
        s.prebuild_failed("pb-b", "boom").await.unwrap();
        assert_eq!(
            s.prebuilds(Some("other")).await.unwrap()[0]
                .error
                .as_deref(),
            Some("boom")
        );
        assert_eq!(s.prebuilds(None).await.unwrap().len(), 2);
        s.delete_prebuild("pb-a").await.unwrap();
        assert!(s.prebuild("pb-a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn opencode_server_is_recorded_and_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        s.insert_prebuild("pb-a", "demo", 1).await.unwrap();
        assert_eq!(s.prebuild("pb-a").await.unwrap().unwrap().opencode, None);
        let oc = OpenCodeServer {
            version: "1.18.33".into(),
            port: 4096,
            password: "pw-secret-value".into(),
            directory: "/workspace/demo".into(),
        };
        s.set_prebuild_opencode("pb-a", &oc).await.unwrap();
        let p = s.prebuild("pb-a").await.unwrap().unwrap();
        assert_eq!(p.opencode.as_ref(), Some(&oc));
        assert!(!format!("{p:?}").contains("pw-secret-value"));
    }
}
