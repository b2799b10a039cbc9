//! API tokens (by id, for listing and revoking) and browser sessions: `manager`
//! sessions on the manager's origin and `proxy` sessions bound to one sandbox host.

use sqlx::Row;

use crate::{Store, StoreError, now_ms, q};

/// One API token (its hash is never returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Row id: what `token revoke` takes.
    pub id: i64,
    /// Name given at creation.
    pub name: String,
    /// Creation time, ms since epoch.
    pub created_at: i64,
}

/// One browser session (its cookie hash is never returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Public id (`ses-…`).
    pub id: String,
    /// `manager` or `proxy`.
    pub kind: String,
    /// The host a proxy session opens.
    pub host: Option<String>,
    /// The manager session a proxy session was made from.
    pub parent_id: Option<String>,
    /// The API token that signed in.
    pub token_id: Option<i64>,
    /// Creation time, ms since epoch.
    pub created_at: i64,
    /// Expiry, ms since epoch.
    pub expires_at: i64,
}

/// What a new session row holds.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    /// Public id.
    pub id: &'a str,
    /// Hash of the cookie value.
    pub sha256: &'a str,
    /// `manager` or `proxy`.
    pub kind: &'a str,
    /// The host a proxy session opens.
    pub host: Option<&'a str>,
    /// The manager session a proxy session is made from.
    pub parent_id: Option<&'a str>,
    /// The API token that signed in.
    pub token_id: Option<i64>,
    /// Expiry, ms since epoch.
    pub expires_at: i64,
}

fn session_from_row(r: &sqlx::sqlite::SqliteRow) -> SessionRecord {
    SessionRecord {
        id: r.get("id"),
        kind: r.get("kind"),
        host: r.get("host"),
        parent_id: r.get("parent_id"),
        token_id: r.get("token_id"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
    }
}

const SESSION_COLS: &str = "id, kind, host, parent_id, token_id, created_at, expires_at";

impl Store {
    /// The id of the token with this hash, if it exists (revoked tokens are deleted).
    pub async fn token_id(&self, sha256_hex: &str) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query("SELECT id FROM api_tokens WHERE sha256 = ?")
            .bind(sha256_hex)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("find token"))?;
        Ok(row.map(|r| r.get("id")))
    }

    /// Every API token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, name, created_at FROM api_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list tokens"))?;
        Ok(rows
            .iter()
            .map(|r| TokenRecord {
                id: r.get("id"),
                name: r.get("name"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    /// Stores a new token's hash and returns its id.
    pub async fn create_token(&self, name: &str, sha256_hex: &str) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO api_tokens (name, sha256, created_at) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(sha256_hex)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(q("insert token"))?;
        Ok(row.get("id"))
    }

    /// Deletes a token and every browser session it signed in (and their children);
    /// false when no such token exists.
    pub async fn revoke_token(&self, id: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("revoke token"))?;
        let gone = sqlx::query("DELETE FROM api_tokens WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("revoke token"))?
            .rows_affected();
        sqlx::query(
            "DELETE FROM browser_sessions WHERE token_id = ? OR parent_id IN \
             (SELECT id FROM browser_sessions WHERE token_id = ?)",
        )
        .bind(id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(q("revoke token sessions"))?;
        tx.commit().await.map_err(q("revoke token"))?;
        Ok(gone > 0)
    }

    /// Stores a browser session; expired sessions are removed on the way.
    pub async fn insert_browser_session(&self, s: &NewSession<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query("DELETE FROM browser_sessions WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("expire sessions"))?;
        sqlx::query(
            "INSERT INTO browser_sessions (id, sha256, kind, host, parent_id, token_id, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id)
        .bind(s.sha256)
        .bind(s.kind)
        .bind(s.host)
        .bind(s.parent_id)
        .bind(s.token_id)
        .bind(now)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await
        .map_err(q("insert session"))?;
        Ok(())
    }

    /// The unexpired session whose cookie hashes to `sha256_hex`.
    pub async fn browser_session(
        &self,
        sha256_hex: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM browser_sessions WHERE sha256 = ? AND expires_at > ?"
        ))
        .bind(sha256_hex)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(q("check session"))?;
        Ok(row.as_ref().map(session_from_row))
    }

    /// Every unexpired session, oldest first.
    pub async fn browser_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM browser_sessions WHERE expires_at > ? ORDER BY created_at, id"
        ))
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await
        .map_err(q("list sessions"))?;
        Ok(rows.iter().map(session_from_row).collect())
    }

    /// Deletes a session and the proxy sessions made from it; how many rows went.
    pub async fn revoke_browser_session(&self, id: &str) -> Result<u64, StoreError> {
        let n = sqlx::query("DELETE FROM browser_sessions WHERE id = ? OR parent_id = ?")
            .bind(id)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("revoke session"))?
            .rows_affected();
        Ok(n)
    }

    /// Deletes every browser session; how many there were.
    pub async fn revoke_all_browser_sessions(&self) -> Result<u64, StoreError> {
        let n = sqlx::query("DELETE FROM browser_sessions")
            .execute(&self.pool)
            .await
            .map_err(q("revoke sessions"))?
            .rows_affected();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_cascade_from_parent_and_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let tok = store.create_token("t", "hash-t").await.unwrap();
        assert_eq!(store.token_id("hash-t").await.unwrap(), Some(tok));
        let later = now_ms() + 60_000;
        let new = |id: &'static str, sha: &'static str, parent: Option<&'static str>| NewSession {
            id,
            sha256: sha,
            kind: if parent.is_some() { "proxy" } else { "manager" },
            host: parent.map(|_| "sandbox-sb-0000000000.localhost"),
            parent_id: parent,
            token_id: Some(tok),
            expires_at: later,
        };
        store
            .insert_browser_session(&new("m1", "h1", None))
            .await
            .unwrap();
        store
            .insert_browser_session(&new("p1", "h2", Some("m1")))
            .await
            .unwrap();
        store
            .insert_browser_session(&new("m2", "h3", None))
            .await
            .unwrap();
        store
            .insert_browser_session(&new("p2", "h4", Some("m2")))
            .await
            .unwrap();
        assert_eq!(store.browser_sessions().await.unwrap().len(), 4);
        assert_eq!(store.revoke_browser_session("m1").await.unwrap(), 2);
        assert!(store.browser_session("h2").await.unwrap().is_none());
        assert_eq!(store.browser_session("h4").await.unwrap().unwrap().id, "p2");
        assert!(store.revoke_token(tok).await.unwrap());
        assert!(store.browser_sessions().await.unwrap().is_empty());
        assert_eq!(store.token_id("hash-t").await.unwrap(), None);
        assert!(!store.revoke_token(tok).await.unwrap());
        // Expired sessions are invisible.
        let mut old = new("m3", "h5", None);
        old.expires_at = now_ms() - 1;
        store.insert_browser_session(&old).await.unwrap();
        assert!(store.browser_session("h5").await.unwrap().is_none());
    }
}
