//! Atelier's persistent state in SQLite (WAL): sandboxes and their recorded state
//! transitions, the host resource journal, hashed API tokens and settings.
//!
//! The store knows nothing about the host: it never creates or removes a resource,
//! it only records them. It depends on `atelier-core` alone among Atelier crates.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atelier_core::{MountSpec, Owner, SandboxId, SandboxOp, SandboxState};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

mod prebuilds;
pub use prebuilds::{OpenCodeServer, PrebuildRecord};
mod workspaces;
pub use workspaces::{SecretRecord, WorkspaceRecord};
mod sessions;
pub use sessions::{NewSession, SessionRecord, TokenRecord};
mod tasks;
pub use tasks::{AttentionRecord, NewTask, TaskPatch, TaskRecord, WorkspaceUsage};

/// A change the store committed, reported to its observer (the manager's event
/// bus) right after the commit, in commit order for each sandbox.
#[derive(Debug, Clone)]
pub enum Change {
    /// A sandbox row was inserted.
    SandboxCreated(SandboxRecord),
    /// A sandbox changed state.
    SandboxState {
        /// The row after the change.
        record: SandboxRecord,
        /// The state it left.
        from: SandboxState,
        /// Why.
        reason: String,
    },
    /// A prebuild row was inserted or changed.
    Prebuild(PrebuildRecord),
    /// A prebuild row was removed.
    PrebuildRemoved {
        /// Prebuild id.
        id: String,
        /// Its workspace.
        workspace: String,
    },
    /// A task row was inserted (`from` None) or changed (`from` its state before;
    /// the same state for a progress update).
    Task {
        /// The row after the change.
        record: Box<TaskRecord>,
        /// The state before.
        from: Option<atelier_core::task::TaskState>,
    },
    /// An attention item was raised or resolved.
    Attention(AttentionRecord),
    /// A workspace definition was stored (changed) or removed.
    Workspace {
        /// Workspace name.
        name: String,
        /// Whether it was removed.
        deleted: bool,
    },
}

/// Receives every [`Change`]; must not block (it runs inside store calls).
pub type Observer = std::sync::Arc<dyn Fn(Change) + Send + Sync>;

/// Errors from the store; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or migrated.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// Database path.
        path: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("cannot migrate database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A live sandbox already has this name.
    #[error("a sandbox named {0:?} already exists")]
    NameTaken(String),
    /// Every address of the sandbox subnet is leased.
    #[error("the sandbox IP pool is exhausted; delete sandboxes or configure a larger subnet")]
    PoolExhausted,
    /// No such sandbox.
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    /// The state machine forbids this transition.
    #[error("sandbox {id} is {from}; it cannot become {to}")]
    BadTransition {
        /// Sandbox id.
        id: SandboxId,
        /// Current state.
        from: SandboxState,
        /// Requested state.
        to: SandboxState,
    },
    /// A prebuild's status cannot move this way (e.g. a finished build again).
    #[error("prebuild {id} is {}; it cannot become {to}", from.map(|f| f.as_str()).unwrap_or("gone"))]
    PrebuildTransition {
        /// Prebuild id.
        id: String,
        /// Its status now (None when it no longer exists).
        from: Option<atelier_core::PrebuildStatus>,
        /// Requested status.
        to: atelier_core::PrebuildStatus,
    },
    /// A state that exists only during an operation was entered without one.
    #[error("sandbox {id} cannot become {to} without an operation (a bug: use Store::begin)")]
    NoOperation {
        /// Sandbox id.
        id: SandboxId,
        /// Requested state.
        to: SandboxState,
    },
    /// A query failed.
    #[error("database query {op} failed: {source}")]
    Query {
        /// Which operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// A row holds a value this version cannot read.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// No such task.
    #[error("task {0} not found")]
    TaskNotFound(String),
    /// A task's state cannot move this way.
    #[error("task {id} is {from}; it cannot become {to}")]
    TaskTransition {
        /// Task id.
        id: String,
        /// Its state now.
        from: atelier_core::task::TaskState,
        /// Requested state.
        to: atelier_core::task::TaskState,
    },
    /// No such attention item.
    #[error("attention item {0} not found")]
    AttentionNotFound(String),
    /// The item was already answered (or is gone).
    #[error("attention item {id} is already {}", status.as_str())]
    AttentionResolved {
        /// Item id.
        id: String,
        /// What it is now.
        status: atelier_core::task::AttentionStatus,
    },
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// A sandbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Id.
    pub id: SandboxId,
    /// Unique live name.
    pub name: String,
    /// Image name.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Current state.
    pub state: SandboxState,
    /// Last error, for failed sandboxes.
    pub error: Option<String>,
    /// Milliseconds from the create/start request to the agent answering.
    pub boot_ms: Option<i64>,
    /// Creation time, ms since epoch.
    pub created_at: i64,
    /// Last change, ms since epoch.
    pub updated_at: i64,
    /// Host folders shared into the guest.
    pub mounts: Vec<MountSpec>,
    /// Host user the VMM runs as when folders are shared.
    pub mount_owner: Option<Owner>,
    /// Egress policy in its text form (`allow-all`, `deny-all`, `a.com,*.b.org`).
    pub egress: String,
    /// The operation in flight, if any (set by [`Store::begin`], cleared when the
    /// sandbox comes to rest).
    pub operation: Option<SandboxOp>,
}

/// A recorded state transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Previous state (none for the first).
    pub from: Option<SandboxState>,
    /// New state.
    pub to: SandboxState,
    /// Why, when known.
    pub reason: Option<String>,
    /// When, ms since epoch.
    pub at: i64,
}

/// One journaled host resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRecord {
    /// Journal row id.
    pub id: i64,
    /// Who holds it: a sandbox id, or another owner's text (`template:…`,
    /// `prebuild:…`), as the journal writes it.
    pub owner: String,
    /// Kind (`dir`, `disk`, `process`, ...), owned by the crate that makes it.
    pub kind: String,
    /// Where it is: a path, usually.
    pub locator: String,
}

/// What [`Store::change_state`] writes.
struct StateChange<'e> {
    to: SandboxState,
    operation: Option<SandboxOp>,
    /// Some: replace the stored error (Some(None) clears it); None: keep it.
    error: Option<Option<&'e str>>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    /// Serialises read-then-write transactions in this process (they also begin
    /// IMMEDIATE; a deferred one fails with SQLITE_BUSY_SNAPSHOT when another writer
    /// commits between its read and its write, which no busy timeout waits out).
    rmw: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Told of every committed change, once set.
    observer: std::sync::Arc<std::sync::OnceLock<ObserverSlot>>,
}

struct ObserverSlot(Observer);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

fn parse_state(s: &str) -> Result<SandboxState, StoreError> {
    SandboxState::from_str(s).map_err(|e| StoreError::Corrupt {
        table: "sandboxes",
        detail: e.to_string(),
    })
}

fn sandbox_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<SandboxRecord, StoreError> {
    let id: String = row.get("id");
    let state: String = row.get("state");
    Ok(SandboxRecord {
        id: SandboxId::parse(&id).ok_or_else(|| StoreError::Corrupt {
            table: "sandboxes",
            detail: format!("id {id:?}"),
        })?,
        name: row.get("name"),
        image: row.get("image"),
        vcpus: row.get::<i64, _>("vcpus") as u32,
        memory_mib: row.get::<i64, _>("memory_mib") as u32,
        state: parse_state(&state)?,
        error: row.get("error"),
        boot_ms: row.get("boot_ms"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        mounts: serde_json::from_str(row.get::<&str, _>("mounts")).map_err(|e| {
            StoreError::Corrupt {
                table: "sandboxes",
                detail: format!("mounts: {e}"),
            }
        })?,
        mount_owner: row.get::<Option<&str>, _>("mount_owner").and_then(|s| {
            let (u, g) = s.split_once(':')?;
            Some(Owner {
                uid: u.parse().ok()?,
                gid: g.parse().ok()?,
            })
        }),
        egress: row.get("egress"),
        operation: row
            .get::<Option<&str>, _>("operation")
            .map(|o| {
                SandboxOp::from_str(o).map_err(|e| StoreError::Corrupt {
                    table: "sandboxes",
                    detail: e.to_string(),
                })
            })
            .transpose()?,
    })
}

impl Store {
    /// Opens (creating if needed) the database at `path` and runs migrations.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store {
            pool,
            rmw: Default::default(),
            observer: Default::default(),
        })
    }

    /// Sets the observer told of every committed change (once; later calls are
    /// ignored and return false).
    pub fn observe(&self, observer: Observer) -> bool {
        self.observer.set(ObserverSlot(observer)).is_ok()
    }

    pub(crate) fn notify(&self, change: Change) {
        if let Some(o) = self.observer.get() {
            (o.0)(change);
        }
    }

    /// Inserts a new sandbox in state `creating`, recording the first transition.
    pub async fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let res = sqlx::query(
            "INSERT INTO sandboxes (id, name, image, vcpus, memory_mib, state, error, boot_ms, created_at, updated_at, mounts, mount_owner, egress, operation)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(rec.id.as_str())
        .bind(&rec.name)
        .bind(&rec.image)
        .bind(rec.vcpus as i64)
        .bind(rec.memory_mib as i64)
        .bind(rec.state.as_str())
        .bind(&rec.error)
        .bind(rec.boot_ms)
        .bind(rec.created_at)
        .bind(rec.updated_at)
        .bind(serde_json::to_string(&rec.mounts).unwrap_or_else(|_| "[]".into()))
        .bind(rec.mount_owner.map(|o| format!("{}:{}", o.uid, o.gid)))
        .bind(&rec.egress)
        .bind(rec.operation.map(SandboxOp::as_str))
        .execute(&mut *tx)
        .await;
        match res {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::NameTaken(rec.name.clone()));
            }
            r => r.map_err(q("insert sandbox"))?,
        };
        sqlx::query("INSERT INTO sandbox_transitions (sandbox_id, from_state, to_state, reason, at) VALUES (?, NULL, ?, 'created', ?)")
            .bind(rec.id.as_str())
            .bind(rec.state.as_str())
            .bind(rec.created_at)
            .execute(&mut *tx)
            .await
            .map_err(q("insert transition"))?;
        tx.commit().await.map_err(q("commit"))?;
        self.notify(Change::SandboxCreated(rec.clone()));
        Ok(())
    }

    /// A sandbox by id, deleted ones included.
    pub async fn get_sandbox(&self, id: &SandboxId) -> Result<SandboxRecord, StoreError> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get sandbox"))?
            .ok_or_else(|| StoreError::SandboxNotFound(id.to_string()))?;
        sandbox_from_row(&row)
    }

    /// A live (not deleted) sandbox by id or by name.
    pub async fn find_sandbox(&self, id_or_name: &str) -> Result<SandboxRecord, StoreError> {
        let row = sqlx::query(
            "SELECT * FROM sandboxes WHERE (id = ? OR name = ?) AND state <> 'deleted' LIMIT 1",
        )
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("find sandbox"))?
        .ok_or_else(|| StoreError::SandboxNotFound(id_or_name.to_owned()))?;
        sandbox_from_row(&row)
    }

    /// Sandboxes, oldest first; deleted ones only when asked.
    pub async fn list_sandboxes(
        &self,
        include_deleted: bool,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let sql = if include_deleted {
            "SELECT * FROM sandboxes ORDER BY created_at, id"
        } else {
            "SELECT * FROM sandboxes WHERE state <> 'deleted' ORDER BY created_at, id"
        };
        let rows = sqlx::query(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(q("list sandboxes"))?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Moves a sandbox to the resting state `to` if the state machine allows it from
    /// its current state, recording the transition and clearing the operation in
    /// flight; `error` replaces the stored error (None clears it). States that exist
    /// only during an operation are entered with [`Store::begin`] instead.
    pub async fn transition(
        &self,
        id: &SandboxId,
        to: SandboxState,
        reason: &str,
        error: Option<&str>,
    ) -> Result<SandboxRecord, StoreError> {
        if to.in_flight() {
            return Err(StoreError::NoOperation { id: id.clone(), to });
        }
        let change = StateChange {
            to,
            operation: None,
            error: Some(error),
        };
        self.change_state(id, reason, change, |from| from.can_transition_to(to))
            .await
    }

    /// Begins `op` on a sandbox: records the operation and moves the sandbox to the
    /// state the operation runs in, in one transaction, if `op` may begin from its
    /// current state. Ends with [`Store::transition`] to a resting state (or
    /// [`Store::end_operation`] when the state does not change).
    pub async fn begin(
        &self,
        id: &SandboxId,
        op: SandboxOp,
        reason: &str,
    ) -> Result<SandboxRecord, StoreError> {
        let to = op.runs_in();
        let change = StateChange {
            to,
            operation: Some(op),
            error: None,
        };
        self.change_state(id, reason, change, |from| {
            op.may_begin_from(from) && (from == to || from.can_transition_to(to))
        })
        .await
    }

    /// The one writer of sandbox states: reads the current state in an IMMEDIATE
    /// transaction (no other writer can commit between the read and the write,
    /// which would fail with BUSY_SNAPSHOT), asks `allowed` whether the change may
    /// happen from it, writes state, operation and error, records the transition
    /// when the state changes, commits and tells the observer.
    async fn change_state(
        &self,
        id: &SandboxId,
        reason: &str,
        change: StateChange<'_>,
        allowed: impl FnOnce(SandboxState) -> bool,
    ) -> Result<SandboxRecord, StoreError> {
        let _rmw = self.rmw.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q("begin"))?;
        let row = sqlx::query("SELECT state FROM sandboxes WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("read state"))?
            .ok_or_else(|| StoreError::SandboxNotFound(id.to_string()))?;
        let from = parse_state(row.get::<&str, _>("state"))?;
        let to = change.to;
        if !allowed(from) {
            return Err(StoreError::BadTransition {
                id: id.clone(),
                from,
                to,
            });
        }
        let now = now_ms();
        let sql = match change.error {
            Some(_) => {
                "UPDATE sandboxes SET state = ?, operation = ?, updated_at = ?, error = ? WHERE id = ?"
            }
            None => "UPDATE sandboxes SET state = ?, operation = ?, updated_at = ? WHERE id = ?",
        };
        let mut update = sqlx::query(sql)
            .bind(to.as_str())
            .bind(change.operation.map(SandboxOp::as_str))
            .bind(now);
        if let Some(error) = change.error {
            update = update.bind(error);
        }
        update
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(q("update state"))?;
        if from != to {
            sqlx::query("INSERT INTO sandbox_transitions (sandbox_id, from_state, to_state, reason, at) VALUES (?, ?, ?, ?, ?)")
                .bind(id.as_str())
                .bind(from.as_str())
                .bind(to.as_str())
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(q("insert transition"))?;
        }
        tx.commit().await.map_err(q("commit"))?;
        let record = self.get_sandbox(id).await?;
        // Still under `rmw`: observers see changes in commit order.
        if from != to {
            self.notify(Change::SandboxState {
                record: record.clone(),
                from,
                reason: reason.to_owned(),
            });
        }
        Ok(record)
    }

    /// Clears the operation of a sandbox that ends it in the state it began in (a
    /// fork's source, a failed pause).
    pub async fn end_operation(&self, id: &SandboxId) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET operation = NULL WHERE id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("end operation"))?;
        Ok(())
    }

    /// Records how long the last boot took.
    pub async fn set_boot_ms(&self, id: &SandboxId, boot_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET boot_ms = ? WHERE id = ?")
            .bind(boot_ms)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("set boot_ms"))?;
        Ok(())
    }

    /// The recorded transitions of a sandbox, oldest first.
    pub async fn transitions(&self, id: &SandboxId) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT from_state, to_state, reason, at FROM sandbox_transitions WHERE sandbox_id = ? ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(q("list transitions"))?;
        rows.iter()
            .map(|r| {
                Ok(Transition {
                    from: r
                        .get::<Option<&str>, _>("from_state")
                        .map(parse_state)
                        .transpose()?,
                    to: parse_state(r.get::<&str, _>("to_state"))?,
                    reason: r.get("reason"),
                    at: r.get("at"),
                })
            })
            .collect()
    }

    /// Journals a resource before it is created. Recording the same resource twice
    /// is harmless (returns the existing row).
    pub async fn record_resource(
        &self,
        owner: &str,
        kind: &str,
        locator: &str,
    ) -> Result<i64, StoreError> {
        sqlx::query(
            "INSERT INTO resources (sandbox_id, kind, locator, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(kind, locator) DO NOTHING",
        )
        .bind(owner)
        .bind(kind)
        .bind(locator)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("record resource"))?;
        let row = sqlx::query("SELECT id FROM resources WHERE kind = ? AND locator = ?")
            .bind(kind)
            .bind(locator)
            .fetch_one(&self.pool)
            .await
            .map_err(q("read resource"))?;
        Ok(row.get("id"))
    }

    /// Removes a resource from the journal once it is gone from the host.
    pub async fn forget_resource(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM resources WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("forget resource"))?;
        Ok(())
    }

    /// Journaled resources of one owner (or all when `owner` is None), newest first,
    /// which is the order to reclaim them in.
    pub async fn resources(&self, owner: Option<&str>) -> Result<Vec<ResourceRecord>, StoreError> {
        let rows = match owner {
            Some(id) => {
                sqlx::query("SELECT * FROM resources WHERE sandbox_id = ? ORDER BY id DESC")
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query("SELECT * FROM resources ORDER BY id DESC")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(q("list resources"))?;
        Ok(rows
            .iter()
            .map(|r| ResourceRecord {
                id: r.get("id"),
                owner: r.get("sandbox_id"),
                kind: r.get("kind"),
                locator: r.get("locator"),
            })
            .collect())
    }

    /// Number of API tokens.
    pub async fn token_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM api_tokens")
            .fetch_one(&self.pool)
            .await
            .map_err(q("count tokens"))?;
        Ok(row.get("n"))
    }

    /// Stores the SHA-256 (hex) of a new token.
    pub async fn insert_token(&self, name: &str, sha256_hex: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (name, sha256, created_at) VALUES (?, ?, ?)")
            .bind(name)
            .bind(sha256_hex)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(q("insert token"))?;
        Ok(())
    }

    /// All stored token hashes.
    pub async fn token_hashes(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT sha256 FROM api_tokens")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list tokens"))?;
        Ok(rows.iter().map(|r| r.get("sha256")).collect())
    }

    /// A setting's value.
    pub async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get setting"))?;
        Ok(row.map(|r| r.get("value")))
    }

    /// Sets a setting.
    pub async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(q("put setting"))?;
        Ok(())
    }

    /// Removes a setting (absent is fine).
    pub async fn delete_setting(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM settings WHERE key = ?")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(q("delete setting"))?;
        Ok(())
    }

    /// Settings whose key starts with `prefix`, by key.
    pub async fn settings_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT key, value FROM settings WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list settings"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get("key"), r.get("value")))
            .collect())
    }
}

/// A dev command row: its name and the JSON spec the server owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCommandRecord {
    /// Owning sandbox.
    pub sandbox_id: SandboxId,
    /// Name (unique per sandbox).
    pub name: String,
    /// JSON document (command, port, cwd, env, restart).
    pub spec: String,
}

impl Store {
    /// The guest address leased to `sandbox_id`, leasing the lowest free address in
    /// `first..=last` if it has none. The lease and its journal row (`kind`, the
    /// address) are written in one transaction, so a crash never leaves one without
    /// the other.
    pub async fn lease_ip(
        &self,
        sandbox_id: &SandboxId,
        first: u32,
        last: u32,
        kind: &str,
    ) -> Result<std::net::Ipv4Addr, StoreError> {
        let _serial = self.rmw.lock().await;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q("begin"))?;
        if let Some(row) = sqlx::query("SELECT address FROM ip_leases WHERE sandbox_id = ?")
            .bind(sandbox_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("get lease"))?
        {
            let a: String = row.get("address");
            return a.parse().map_err(|_| StoreError::Corrupt {
                table: "ip_leases",
                detail: format!("address {a:?}"),
            });
        }
        let used: std::collections::HashSet<u32> = sqlx::query("SELECT address FROM ip_leases")
            .fetch_all(&mut *tx)
            .await
            .map_err(q("list leases"))?
            .iter()
            .filter_map(|r| {
                r.get::<&str, _>("address")
                    .parse::<std::net::Ipv4Addr>()
                    .ok()
            })
            .map(u32::from)
            .collect();
        let Some(free) = (first..=last).find(|a| !used.contains(a)) else {
            return Err(StoreError::PoolExhausted);
        };
        let addr = std::net::Ipv4Addr::from(free);
        sqlx::query("INSERT INTO ip_leases (address, sandbox_id, created_at) VALUES (?, ?, ?)")
            .bind(addr.to_string())
            .bind(sandbox_id.as_str())
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(q("insert lease"))?;
        sqlx::query(
            "INSERT INTO resources (sandbox_id, kind, locator, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(kind, locator) DO NOTHING",
        )
        .bind(sandbox_id.as_str())
        .bind(kind)
        .bind(addr.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(q("record lease"))?;
        tx.commit().await.map_err(q("commit"))?;
        Ok(addr)
    }

    /// The address leased to a sandbox, if any.
    pub async fn lease_of(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<std::net::Ipv4Addr>, StoreError> {
        let row = sqlx::query("SELECT address FROM ip_leases WHERE sandbox_id = ?")
            .bind(sandbox_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("get lease"))?;
        Ok(row.and_then(|r| r.get::<&str, _>("address").parse().ok()))
    }

    /// All leases: (address, sandbox).
    pub async fn leases(&self) -> Result<Vec<(std::net::Ipv4Addr, SandboxId)>, StoreError> {
        let rows = sqlx::query("SELECT address, sandbox_id FROM ip_leases ORDER BY address")
            .fetch_all(&self.pool)
            .await
            .map_err(q("list leases"))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.get::<&str, _>("address").parse().ok()?,
                    SandboxId::parse(r.get::<&str, _>("sandbox_id"))?,
                ))
            })
            .collect())
    }

    /// Returns an address to the pool.
    pub async fn release_ip(&self, address: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM ip_leases WHERE address = ?")
            .bind(address)
            .execute(&self.pool)
            .await
            .map_err(q("release lease"))?;
        Ok(())
    }

    /// Changes a sandbox's egress policy (text form).
    pub async fn set_egress(&self, id: &SandboxId, egress: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET egress = ?, updated_at = ? WHERE id = ?")
            .bind(egress)
            .bind(now_ms())
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("set egress"))?;
        Ok(())
    }

    /// Creates or replaces a dev command.
    pub async fn put_dev_command(
        &self,
        id: &SandboxId,
        name: &str,
        spec: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dev_commands (sandbox_id, name, spec, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT(sandbox_id, name) DO UPDATE SET spec = excluded.spec",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(spec)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(q("put dev command"))?;
        Ok(())
    }

    /// Dev commands of a sandbox (all sandboxes when None), by name.
    pub async fn dev_commands(
        &self,
        id: Option<&SandboxId>,
    ) -> Result<Vec<DevCommandRecord>, StoreError> {
        let rows = match id {
            Some(id) => {
                sqlx::query("SELECT * FROM dev_commands WHERE sandbox_id = ? ORDER BY name")
                    .bind(id.as_str())
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query("SELECT * FROM dev_commands ORDER BY sandbox_id, name")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(q("list dev commands"))?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(DevCommandRecord {
                    sandbox_id: SandboxId::parse(r.get::<&str, _>("sandbox_id"))?,
                    name: r.get("name"),
                    spec: r.get("spec"),
                })
            })
            .collect())
    }

    /// Removes a dev command; false when there was none.
    pub async fn delete_dev_command(&self, id: &SandboxId, name: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM dev_commands WHERE sandbox_id = ? AND name = ?")
            .bind(id.as_str())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("delete dev command"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes every dev command of a sandbox.
    pub async fn delete_dev_commands(&self, id: &SandboxId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM dev_commands WHERE sandbox_id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(q("delete dev commands"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> SandboxRecord {
        let now = now_ms();
        SandboxRecord {
            id: SandboxId::generate(),
            name: name.into(),
            image: "minimal".into(),
            vcpus: 1,
            memory_mib: 512,
            state: SandboxState::Creating,
            error: None,
            boot_ms: None,
            created_at: now,
            updated_at: now,
            mounts: vec![MountSpec {
                source: "/src".into(),
                target: "/w".into(),
                read_only: true,
            }],
            mount_owner: Some(Owner {
                uid: 1000,
                gid: 100,
            }),
            egress: "allow-all".into(),
            operation: Some(SandboxOp::Create),
        }
    }

    #[tokio::test]
    async fn ip_leases_are_lowest_free_stable_and_exhaust() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let base = u32::from(std::net::Ipv4Addr::new(10, 9, 0, 2));
        let mut ids = Vec::new();
        for n in 0..3 {
            let rec = rec(&format!("s{n}"));
            store.insert_sandbox(&rec).await.unwrap();
            ids.push(rec.id);
        }
        let a = store.lease_ip(&ids[0], base, base + 1, "ip").await.unwrap();
        let b = store.lease_ip(&ids[1], base, base + 1, "ip").await.unwrap();
        assert_eq!(a.to_string(), "10.9.0.2");
        assert_eq!(b.to_string(), "10.9.0.3");
        // Asking again returns the same lease.
        assert_eq!(
            store.lease_ip(&ids[0], base, base + 1, "ip").await.unwrap(),
            a
        );
        assert!(matches!(
            store.lease_ip(&ids[2], base, base + 1, "ip").await,
            Err(StoreError::PoolExhausted)
        ));
        // Journaled with the lease.
        let res = store.resources(Some(ids[0].as_str())).await.unwrap();
        assert!(
            res.iter()
                .any(|r| r.kind == "ip" && r.locator == "10.9.0.2")
        );
        store.release_ip("10.9.0.2").await.unwrap();
        assert_eq!(store.lease_of(&ids[0]).await.unwrap(), None);
        assert_eq!(
            store.lease_ip(&ids[2], base, base + 1, "ip").await.unwrap(),
            a
        );
    }

    #[tokio::test]
    async fn sandbox_lifecycle_and_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        let a = rec("demo");
        store.insert_sandbox(&a).await.unwrap();
        assert!(matches!(
            store.insert_sandbox(&rec("demo")).await,
            Err(StoreError::NameTaken(_))
        ));
        assert_eq!(store.find_sandbox("demo").await.unwrap(), a);
        assert_eq!(
            store.find_sandbox(a.id.as_str()).await.unwrap().name,
            "demo"
        );

        let running = store
            .transition(&a.id, SandboxState::Running, "ready", None)
            .await
            .unwrap();
        assert_eq!(running.operation, None, "coming to rest ends the operation");
        // In-flight states are entered only with an operation.
        let err = store
            .transition(&a.id, SandboxState::Deleting, "x", None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoOperation { .. }));
        let err = store.begin(&a.id, SandboxOp::Start, "x").await.unwrap_err();
        assert!(matches!(err, StoreError::BadTransition { .. }));
        // An operation that keeps the state is recorded, then ended.
        let forking = store.begin(&a.id, SandboxOp::Fork, "fork").await.unwrap();
        assert_eq!(
            (forking.state, forking.operation),
            (SandboxState::Running, Some(SandboxOp::Fork))
        );
        store.end_operation(&a.id).await.unwrap();
        assert_eq!(store.get_sandbox(&a.id).await.unwrap().operation, None);
        let deleting = store.begin(&a.id, SandboxOp::Delete, "rm").await.unwrap();
        assert_eq!(deleting.operation, Some(SandboxOp::Delete));
        store
            .transition(&a.id, SandboxState::Deleted, "rm", None)
            .await
            .unwrap();
        let states: Vec<_> = store
            .transitions(&a.id)
            .await
            .unwrap()
            .iter()
            .map(|t| t.to)
            .collect();
        assert_eq!(
            states,
            [
                SandboxState::Creating,
                SandboxState::Running,
                SandboxState::Deleting,
                SandboxState::Deleted
            ]
        );
        // The name is free again once deleted.
        store.insert_sandbox(&rec("demo")).await.unwrap();

        let r1 = store
            .record_resource(a.id.as_str(), "disk", "/p/a.img")
            .await
            .unwrap();
        assert_eq!(
            store
                .record_resource(a.id.as_str(), "disk", "/p/a.img")
                .await
                .unwrap(),
            r1
        );
        let r2 = store
            .record_resource(a.id.as_str(), "process", "/run/a")
            .await
            .unwrap();
        let ids: Vec<_> = store
            .resources(Some(a.id.as_str()))
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, [r2, r1], "newest first");
        store.forget_resource(r2).await.unwrap();
        assert_eq!(store.resources(None).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn tokens_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        assert_eq!(store.token_count().await.unwrap(), 0);
        store.insert_token("admin", "ab").await.unwrap();
        assert_eq!(store.token_hashes().await.unwrap(), ["ab"]);
        assert_eq!(store.setting("k").await.unwrap(), None);
        store.put_setting("k", "1").await.unwrap();
        store.put_setting("k", "2").await.unwrap();
        assert_eq!(store.setting("k").await.unwrap().as_deref(), Some("2"));
    }
}
