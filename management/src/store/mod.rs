//! The management store: one schema (`migrations/`) on SQLite (embedded default) or PostgreSQL,
//! through sqlx's `Any` driver. Every change runs in one transaction that first bumps the network
//! serial (which also serialises writers: it takes the settings row lock on PostgreSQL and the
//! write lock on SQLite), writes its audit event, and after commit wakes the sync streams.

mod devices;
mod dns;
mod entities;
mod peers;
mod replicas;
mod services;
mod sessions;

pub use devices::*;
pub use dns::*;
pub use entities::*;
pub use peers::*;
pub use replicas::*;
pub use services::*;
pub use sessions::*;

use crate::model::{new_id, now_millis};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Row, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

/// The one migration set, shared by the server and the tests.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{entity} {id:?} not found")]
    NotFound { entity: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Denied(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn not_found(entity: &'static str, id: impl Into<String>) -> Self {
        StoreError::NotFound {
            entity,
            id: id.into(),
        }
    }
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field,
            message: message.into(),
        }
    }
    /// Maps a unique-constraint violation to a conflict with `msg`; other errors pass through.
    fn unique_as(self, msg: impl FnOnce() -> String) -> Self {
        match &self {
            StoreError::Db(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                StoreError::Conflict(msg())
            }
            _ => self,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    kind: DbKind,
    /// SQLite has one writer; queueing writers here avoids SQLITE_BUSY under bursts.
    write_lock: Option<Arc<Mutex<()>>>,
    changes: watch::Sender<i64>,
    /// This process's replica id (see [`replicas`]).
    replica: Arc<str>,
    /// Peers whose sync stream this replica holds.
    held: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// This replica's relay URLs as registered (JSON), to register again after being reaped.
    relays: Arc<std::sync::Mutex<String>>,
}

/// A change transaction: serial already bumped; call [`Change::commit`] to apply and notify.
pub struct Change {
    tx: Transaction<'static, Any>,
    /// None for a quiet change (nothing a network map depends on).
    serial: Option<i64>,
    actor: String,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl Change {
    pub fn conn(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }

    /// Records an audit event in this transaction.
    pub async fn audit(
        &mut self,
        action: &str,
        target_type: &str,
        target_id: &str,
        detail: serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_events (id, created_at, actor, action, target_type, target_id, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(format!("{:015}-{}", now_millis(), &new_id()[..8]))
        .bind(now_millis())
        .bind(self.actor.clone())
        .bind(action)
        .bind(target_type)
        .bind(target_id)
        .bind(detail.to_string())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn commit(self, store: &Store) -> Result<()> {
        self.tx.commit().await?;
        if let Some(serial) = self.serial {
            store.changes.send_replace(serial);
        }
        Ok(())
    }
}

/// The SQLite file holds the JWT secret, relay and peer-token secrets and the server's private
/// key: its directory is created 0700 and the file 0600 before SQLite opens it (SQLite gives its
/// WAL and shared-memory files the database file's mode). A directory that already exists with
/// wider permissions is reported, not changed (it may be shared on purpose).
fn private_files(db: &std::path::Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create database directory {}: {e}", dir.display()))?;
        } else if let Ok(m) = std::fs::metadata(dir) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    mode = format!("{mode:o}"),
                    "the data directory is readable by other users; it holds the server's secrets: chmod 700 {}",
                    dir.display()
                );
            }
        }
    }
    if !db.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(db)
            .map_err(|e| format!("cannot create database file {}: {e}", db.display()))?;
    }
    Ok(())
}

/// Narrows the database file and its WAL/SHM companions to 0600 where an older version (or a
/// copy) left them wider, saying so.
fn tighten_files(db: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => {
                    tracing::warn!(file = %p.display(), was = format!("{mode:o}"), "database file was readable by other users; now 600")
                }
                Err(e) => {
                    tracing::warn!(file = %p.display(), mode = format!("{mode:o}"), error = %e, "database file is readable by other users and could not be narrowed: chmod 600 it")
                }
            }
        }
    }
}

impl Store {
    /// Opens `url` (`sqlite://path` or `postgres://...`) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (DbKind::Postgres, url.to_string())
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path);
            private_files(std::path::Path::new(path))
                .map_err(|e| StoreError::Db(sqlx::Error::Configuration(e.into())))?;
            let sep = if url.contains('?') { '&' } else { '?' };
            (DbKind::Sqlite, format!("{url}{sep}mode=rwc"))
        } else {
            return Err(StoreError::invalid(
                "database_url",
                format!("unsupported database URL {url:?}: use sqlite://PATH or postgres://..."),
            ));
        };
        let mut opts = AnyPoolOptions::new()
            .max_connections(if kind == DbKind::Sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10));
        if kind == DbKind::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(&url).await?;
        if kind == DbKind::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        MIGRATOR.run(&pool).await?;
        if kind == DbKind::Sqlite {
            if let Some(path) = url.strip_prefix("sqlite://") {
                let path = path.split('?').next().unwrap_or(path);
                tighten_files(std::path::Path::new(path));
            }
        }
        let serial: i64 = sqlx::query("SELECT network_serial FROM settings WHERE id = 1")
            .fetch_one(&pool)
            .await?
            .try_get(0)?;
        let (changes, _) = watch::channel(serial);
        Ok(Store {
            pool,
            kind,
            write_lock: (kind == DbKind::Sqlite).then(|| Arc::new(Mutex::new(()))),
            changes,
            replica: replicas::new_replica_id().into(),
            held: Arc::default(),
            relays: Arc::default(),
        })
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A receiver that changes whenever a committed change bumped the network serial.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changes.subscribe()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Starts a change transaction on behalf of `actor` (for the audit log).
    pub async fn begin_change(&self, actor: &str) -> Result<Change> {
        let guard = match &self.write_lock {
            Some(l) => Some(l.clone().lock_owned().await),
            None => None,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE settings SET network_serial = network_serial + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let serial: i64 = sqlx::query("SELECT network_serial FROM settings WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let mut c = Change {
            tx,
            serial: Some(serial),
            actor: actor.to_string(),
            _guard: guard,
        };
        c.notify_replicas(self.kind).await?;
        Ok(c)
    }

    /// Starts a change that no network map depends on (sign-in sessions): audited, serialised
    /// with other writers on SQLite, but the serial stays and no sync stream wakes.
    pub async fn begin_quiet(&self, actor: &str) -> Result<Change> {
        let guard = match &self.write_lock {
            Some(l) => Some(l.clone().lock_owned().await),
            None => None,
        };
        let tx = self.pool.begin().await?;
        Ok(Change {
            tx,
            serial: None,
            actor: actor.to_string(),
            _guard: guard,
        })
    }

    /// A server secret by name, created with `make` the first time (first writer wins).
    /// Records a sealed login's id (hex) until `expires_at` (Unix seconds); false when it was
    /// recorded before (a replay), also by another replica or before a restart. Ids past their
    /// window are forgotten now and then.
    pub async fn first_login_use(&self, id: &str, now: i64, expires_at: i64) -> Result<bool> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static INSERTS: AtomicU64 = AtomicU64::new(0);
        if INSERTS.fetch_add(1, Ordering::Relaxed).is_multiple_of(256) {
            sqlx::query("DELETE FROM login_nonces WHERE expires_at < $1")
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        let r = sqlx::query("INSERT INTO login_nonces (id, expires_at) VALUES ($1, $2)")
            .bind(id)
            .bind(expires_at)
            .execute(&self.pool)
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                // Seen before, unless the row lingers past its window (not yet forgotten).
                let row = sqlx::query("SELECT expires_at FROM login_nonces WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                let lingering = match &row {
                    Some(r) => r.try_get::<i64, _>(0)? < now,
                    None => true,
                };
                if lingering {
                    sqlx::query("UPDATE login_nonces SET expires_at = $1 WHERE id = $2")
                        .bind(expires_at)
                        .bind(id)
                        .execute(&self.pool)
                        .await?;
                }
                Ok(lingering)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn secret_or_create(
        &self,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String> {
        if let Some(row) = sqlx::query("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(row.try_get(0)?);
        }
        let value = make();
        // Another process may win the race; whatever was stored first is read back below.
        let _ = sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, $2)")
            .bind(name)
            .bind(&value)
            .execute(&self.pool)
            .await;
        let row = sqlx::query("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// Column types the store reads; booleans are stored as BIGINT 0/1 (see the migration).
pub(crate) trait FromCol: Sized {
    fn get(row: &AnyRow, name: &str) -> Result<Self>;
}

macro_rules! from_col_direct {
    ($($t:ty),*) => {$(
        impl FromCol for $t {
            fn get(row: &AnyRow, name: &str) -> Result<Self> {
                Ok(row.try_get(name)?)
            }
        }
    )*};
}
from_col_direct!(String, i64, Option<String>, Option<i64>);

impl FromCol for bool {
    fn get(row: &AnyRow, name: &str) -> Result<Self> {
        Ok(row.try_get::<i64, _>(name)? != 0)
    }
}

/// Reads a column, turning decode errors into store errors.
pub(crate) fn col<T: FromCol>(row: &AnyRow, name: &str) -> Result<T> {
    T::get(row, name)
}

/// Loads the group ids of `owner` from a link table.
pub(crate) async fn linked_groups(
    conn: &mut sqlx::AnyConnection,
    sql: &'static str,
    owner: &str,
) -> Result<Vec<String>> {
    let rows = sqlx::query(sql).bind(owner).fetch_all(&mut *conn).await?;
    rows.iter().map(|r| col::<String>(r, "group_id")).collect()
}

/// Checks that every id names an existing group; the error names the first unknown one.
pub(crate) async fn check_groups(
    conn: &mut sqlx::AnyConnection,
    field: &'static str,
    ids: &[String],
) -> Result<()> {
    for id in ids {
        let found = sqlx::query("SELECT 1 FROM groups WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_none() {
            return Err(StoreError::invalid(field, format!("unknown group {id:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod file_mode_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_database_and_its_directory_are_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("data");
        let db = dir.join("tern.db");
        let store = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("store");
        store.settings().await.expect("a write-ahead read");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&db), 0o600);
        for companion in ["tern.db-wal", "tern.db-shm"] {
            let p = dir.join(companion);
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{companion}");
            }
        }
        drop(store);
        // A file left world-readable (an older version, a copy) is narrowed at the next start.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let _store = Store::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("store");
        assert_eq!(mode(&db), 0o600);
    }
}
