//! Several management replicas on one PostgreSQL. Each replica has a random id, a row in
//! `replicas` with a heartbeat, and marks the peers whose sync stream it holds
//! (`peers.replica`). Every committed change notifies `tern_network` (inside its transaction, so
//! the notification leaves on commit); every replica listens and wakes its own sync streams, so a
//! write on any replica reaches the streams on all of them. A replica whose heartbeat stops (it
//! was killed, or lost the database) has its peers marked offline by the survivors.
//!
//! On SQLite there is one process: it registers itself (the console lists it) and marks every
//! peer offline at start, as before replicas existed.

use super::{Change, DbKind, Result, Store};
use crate::model::now_millis;
use sqlx::Row;
use std::time::Duration;

/// How often a replica renews its heartbeat (and looks for dead siblings).
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// A replica whose heartbeat is older than this is dead: its peers are marked offline.
pub const REPLICA_DEAD_AFTER: Duration = Duration::from_secs(12);
/// The notification channel of network changes.
pub const NETWORK_CHANNEL: &str = "tern_network";
/// A replica that misses notifications (its listening connection broke) still follows the
/// serial this often.
const SERIAL_POLL: Duration = Duration::from_secs(5);

/// A replica as the console shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReplicaInfo {
    pub id: String,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds.
    pub heartbeat_at: i64,
    /// Peers whose sync stream this replica holds.
    pub peers: i64,
}

/// The relay URLs a replica hands out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayUrls {
    pub stun: Vec<String>,
    pub turn: Vec<String>,
    pub tcp_relay: Vec<String>,
    pub stun_probe: Vec<String>,
}

/// The relays of the live replicas, oldest first (in the snapshot's transaction).
pub(super) async fn load_relays(conn: &mut sqlx::AnyConnection) -> Result<Vec<RelayUrls>> {
    let rows = sqlx::query("SELECT relays FROM replicas ORDER BY started_at, id")
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .filter_map(|j| serde_json::from_str::<RelayUrls>(&j).ok())
        .collect())
}

/// A fresh replica id: the host name and a random suffix (unique per start).
pub fn new_replica_id() -> String {
    let host = nix_hostname().unwrap_or_else(|| "tern".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(40)
        .collect();
    format!("{host}-{}", &crate::model::new_id()[..6])
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Change {
    /// PostgreSQL: tells the other replicas, when this transaction commits, that the network
    /// changed (they read the serial themselves).
    pub(super) async fn notify_replicas(&mut self, kind: DbKind) -> Result<()> {
        if kind == DbKind::Postgres {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(NETWORK_CHANNEL)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok(())
    }
}

impl Store {
    /// This process's replica id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Registers this replica (heartbeat now). At start-up, peers no live replica holds are
    /// offline whatever the database says after a crash: on SQLite all of them, on PostgreSQL
    /// those of replicas without a fresh heartbeat.
    pub async fn register_replica(&self, relays: &RelayUrls) -> Result<()> {
        let relays = serde_json::to_string(relays).unwrap_or_default();
        *self.relays.lock().unwrap_or_else(|e| e.into_inner()) = relays.clone();
        // A change: the siblings' maps list this replica's relays from now on.
        let mut c = self.begin_change("system").await?;
        self.insert_replica_row(&mut c, relays).await?;
        c.commit(self).await?;
        match self.kind {
            DbKind::Sqlite => {
                sqlx::query("DELETE FROM replicas WHERE id <> $1")
                    .bind(self.replica())
                    .execute(&self.pool)
                    .await?;
                self.mark_all_disconnected().await
            }
            DbKind::Postgres => {
                self.reap_dead_replicas().await?;
                // Peers left marked online by a server without replicas (before this version).
                let orphans = sqlx::query(
                    "SELECT COUNT(*) FROM peers WHERE connected = $1 AND (replica IS NULL OR \
                     replica NOT IN (SELECT id FROM replicas))",
                )
                .bind(1i64)
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>(0)?;
                if orphans > 0 {
                    let mut c = self.begin_change("system").await?;
                    sqlx::query(
                        "UPDATE peers SET connected = $1 WHERE connected = $2 AND (replica IS NULL \
                         OR replica NOT IN (SELECT id FROM replicas))",
                    )
                    .bind(0i64)
                    .bind(1i64)
                    .execute(c.conn())
                    .await?;
                    c.commit(self).await?;
                }
                Ok(())
            }
        }
    }

    /// This replica's row, heartbeat now, in change `c`.
    async fn insert_replica_row(&self, c: &mut Change, relays: String) -> Result<()> {
        let now = now_millis();
        sqlx::query(
            "INSERT INTO replicas (id, started_at, heartbeat_at, relays) VALUES ($1, $2, $3, $4)",
        )
        .bind(self.replica())
        .bind(now)
        .bind(now)
        .bind(relays)
        .execute(c.conn())
        .await?;
        Ok(())
    }

    /// Renews the heartbeat (re-registering if a sibling reaped this replica while it could not
    /// reach the database) and marks offline the peers of dead replicas. Returns how many
    /// replicas were found dead.
    pub async fn heartbeat(&self) -> Result<usize> {
        let n = sqlx::query("UPDATE replicas SET heartbeat_at = $1 WHERE id = $2")
            .bind(now_millis())
            .bind(self.replica())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if n == 0 {
            tracing::warn!(replica = %self.replica(), "this replica was taken for dead (no heartbeat); registering again");
            let relays = self
                .relays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let held: Vec<String> = self
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            let mut c = self.begin_change("system").await?;
            self.insert_replica_row(&mut c, relays).await?;
            // Its streams were marked offline by whoever reaped it: mark them online again.
            for id in held {
                sqlx::query("UPDATE peers SET connected = $1, replica = $2 WHERE id = $3")
                    .bind(1i64)
                    .bind(self.replica())
                    .bind(id)
                    .execute(c.conn())
                    .await?;
            }
            c.commit(self).await?;
        }
        self.reap_dead_replicas().await
    }

    async fn reap_dead_replicas(&self) -> Result<usize> {
        let cutoff = now_millis() - REPLICA_DEAD_AFTER.as_millis() as i64;
        let dead: Vec<String> = sqlx::query("SELECT id FROM replicas WHERE heartbeat_at < $1")
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        for id in &dead {
            let mut c = self.begin_change("system").await?;
            let peers = sqlx::query(
                "UPDATE peers SET connected = $1 WHERE replica = $2 AND connected = $3",
            )
            .bind(0i64)
            .bind(id)
            .bind(1i64)
            .execute(c.conn())
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM replicas WHERE id = $1")
                .bind(id)
                .execute(c.conn())
                .await?;
            c.commit(self).await?;
            tracing::warn!(replica = %id, peers, "a management replica stopped its heartbeat: its peers are offline until they reconnect to a live replica");
        }
        Ok(dead.len())
    }

    /// A clean stop: this replica's peers go offline now (their agents move to a sibling) and
    /// its row goes.
    pub async fn unregister_replica(&self) -> Result<()> {
        let mut c = self.begin_change("system").await?;
        sqlx::query("UPDATE peers SET connected = $1 WHERE replica = $2 AND connected = $3")
            .bind(0i64)
            .bind(self.replica())
            .bind(1i64)
            .execute(c.conn())
            .await?;
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(self.replica())
            .execute(c.conn())
            .await?;
        c.commit(self).await
    }

    /// The live replicas, oldest first.
    pub async fn replicas(&self) -> Result<Vec<ReplicaInfo>> {
        let rows = sqlx::query(
            "SELECT r.id, r.started_at, r.heartbeat_at, \
             (SELECT COUNT(*) FROM peers p WHERE p.replica = r.id AND p.connected = $1) AS peers \
             FROM replicas r ORDER BY r.started_at, r.id",
        )
        .bind(1i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaInfo {
                    id: r.try_get("id")?,
                    started_at: r.try_get("started_at")?,
                    heartbeat_at: r.try_get("heartbeat_at")?,
                    peers: r.try_get("peers")?,
                })
            })
            .collect()
    }

    /// PostgreSQL: keeps the heartbeat and follows the changes other replicas commit, until the
    /// pool closes. (SQLite has one process: nothing to do.)
    pub fn spawn_replica_tasks(&self, database_url: &str) {
        if self.kind != DbKind::Postgres {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if store.pool.is_closed() {
                    return;
                }
                if let Err(e) = store.heartbeat().await {
                    tracing::warn!(error = ?e, "replica heartbeat failed");
                }
            }
        });
        let store = self.clone();
        let url = database_url.to_string();
        tokio::spawn(async move { store.follow_replicas(&url).await });
    }

    /// Reads the serial and wakes this replica's streams if another replica moved it on.
    async fn catch_up(&self) -> Result<()> {
        let serial: i64 = sqlx::query("SELECT network_serial FROM settings WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        self.changes.send_if_modified(|cur| {
            let newer = serial > *cur;
            if newer {
                *cur = serial;
            }
            newer
        });
        Ok(())
    }

    async fn follow_replicas(&self, url: &str) {
        let mut backoff = tern_backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            std::time::Instant::now(),
        );
        loop {
            if self.pool.is_closed() {
                return;
            }
            let mut listener = match sqlx::postgres::PgListener::connect(url).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for other replicas' changes; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(NETWORK_CHANNEL).await {
                tracing::warn!(error = %e, "cannot listen for other replicas' changes; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            backoff.succeeded();
            loop {
                // Whatever was missed while (re)connecting.
                if let Err(e) = self.catch_up().await {
                    tracing::debug!(error = ?e, "reading the network serial failed");
                }
                match tokio::time::timeout(SERIAL_POLL, listener.try_recv()).await {
                    Err(_) => {}          // poll
                    Ok(Ok(Some(_))) => {} // a change somewhere
                    Ok(Ok(None)) => {}    // reconnected: caught up above
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "lost the change notifications of other replicas; reconnecting");
                        break;
                    }
                }
                if self.pool.is_closed() {
                    return;
                }
            }
        }
    }
}
