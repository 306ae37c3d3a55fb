//! Peers: registration with setup keys, key-proof logins, overlay IP allocation, connection state,
//! ephemeral clean-up, and the whole-network snapshot the network map is computed from.

use super::entities::Links;
use super::entities::{read_settings, setup_key_from, setup_key_state};
use super::{check_groups, col, set_links, Result, Store, StoreError};
use crate::model::*;
use ipnet::IpNet;
use serde_json::json;
use sqlx::any::AnyRow;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// What an agent reports about itself at login.
#[derive(Debug, Clone, Default)]
pub struct PeerMeta {
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
}

#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub peer: Peer,
    pub registered: bool,
}

/// Everything the network map depends on, read in one go.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub settings: Settings,
    pub peers: Vec<Peer>,
    pub policies: Vec<Policy>,
    pub routes: Vec<Route>,
    pub services: Vec<PublicService>,
    pub nameservers: Vec<NameserverGroup>,
    /// The relays of the live replicas, oldest replica first (one entry on a single server).
    pub relays: Vec<super::RelayUrls>,
}

/// Peers with their owner's name and state.
macro_rules! peer_select {
    () => {
        "SELECT peers.*, users.username AS owner, users.disabled AS owner_disabled \
         FROM peers LEFT JOIN users ON users.id = peers.user_id"
    };
}

fn peer_from(r: &AnyRow, groups: Vec<String>) -> Result<Peer> {
    Ok(Peer {
        id: col(r, "id")?,
        name: col(r, "name")?,
        wg_public_key: col(r, "wg_public_key")?,
        overlay_ip: col(r, "overlay_ip")?,
        hostname: col(r, "hostname")?,
        os: col(r, "os")?,
        agent_version: col(r, "agent_version")?,
        setup_key_id: col(r, "setup_key_id")?,
        ephemeral: col(r, "ephemeral")?,
        connected: col(r, "connected")?,
        approved: col(r, "approved")?,
        login_expiration_enabled: col(r, "login_expiration_enabled")?,
        user_id: col(r, "user_id")?,
        owner: col(r, "owner")?,
        owner_disabled: col::<Option<i64>>(r, "owner_disabled")?.unwrap_or(0) != 0,
        last_seen: col(r, "last_seen")?,
        last_login: col(r, "last_login")?,
        created_at: col(r, "created_at")?,
        groups,
        connections: Vec::new(),
        dns_name: String::new(),
        endpoint: None,
        wireguard: col::<Option<String>>(r, "device_key")?.map(|k| WireguardDevice {
            public_key: k,
            ..Default::default()
        }),
        alone: None,
    })
}

async fn read_peer_where(
    conn: &mut sqlx::AnyConnection,
    column: &str,
    value: &str,
) -> Result<Option<Peer>> {
    let sql = if column == "wg_public_key" {
        concat!(peer_select!(), " WHERE peers.wg_public_key = $1")
    } else {
        concat!(peer_select!(), " WHERE peers.id = $1")
    };
    let Some(r) = sqlx::query(sql)
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let id: String = col(&r, "id")?;
    let groups = super::linked_groups(
        conn,
        "SELECT group_id FROM peer_groups WHERE peer_id = $1 ORDER BY group_id",
        &id,
    )
    .await?;
    Ok(Some(peer_from(&r, groups)?))
}

/// The peer with `id`, in a change's transaction.
pub(super) async fn read_peer(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Peer> {
    read_peer_where(conn, "id", id)
        .await?
        .ok_or_else(|| StoreError::not_found("peer", id))
}

/// The first free host address of `range` (skipping the network and broadcast addresses).
pub fn allocate_ip(range: &IpNet, used: &HashSet<IpAddr>) -> Option<IpAddr> {
    // Bounded: the scan stops after `used.len() + 2` candidates, since at most that many can be taken.
    range
        .hosts()
        .take(used.len() + 2)
        .find(|ip| !used.contains(ip))
}

/// The DNS-label-like name a hostname gives a peer (lowercase letters, digits and dashes; at
/// most 48 characters), before `unique_name` makes it unique.
fn name_base(hostname: &str) -> String {
    let base: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    match base.trim_matches('-') {
        "" => "peer".into(),
        b => b.to_string(),
    }
}

/// `base`, or the first of `base-2`, `base-3`, ... that is not taken.
fn unique_name(base: &str, taken: &HashSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| base.to_string())
}

/// A registration whose WireGuard key another peer has.
pub const KEY_TAKEN: &str = "this WireGuard key is already registered";

/// The column of `peers` a unique violation is about (from the constraint's name on
/// PostgreSQL, `peers_name_key`, or SQLite's message, `UNIQUE constraint failed: peers.name`).
fn unique_column(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(d) = e else {
        return None;
    };
    if !d.is_unique_violation() {
        return None;
    }
    let text = format!("{} {}", d.constraint().unwrap_or(""), d.message());
    ["wg_public_key", "overlay_ip", "name"]
        .into_iter()
        .find(|c| text.contains(c))
}

/// Management's refusal of an unknown key without a setup key; the agent then offers the sign-in.
pub const NOT_REGISTERED: &str =
    "peer is not registered: a setup key is required to join, or sign in with tern up";

/// Why an expired login is refused, and what to do (user devices sign in again).
pub fn login_expired_message(user_device: bool) -> &'static str {
    if user_device {
        "device login expired: run tern up again to sign in"
    } else {
        "peer login expired: run tern up again with a valid setup key, or ask an admin to turn off login expiry for this peer"
    }
}

pub fn disabled_owner_message(p: &Peer) -> String {
    format!(
        "this device's user {} is disabled: ask an admin to enable the account",
        p.owner.as_deref().unwrap_or("(unknown)")
    )
}

/// How a new peer joins.
pub(super) struct NewPeer<'a> {
    pub setup_key_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub ephemeral: bool,
    pub login_expiration: bool,
    pub approved: bool,
    pub groups: &'a [String],
}

/// Inserts a new peer (a free overlay address, a unique name from its hostname) in the change's
/// transaction; returns its id, name and address.
pub(super) async fn register(
    conn: &mut sqlx::AnyConnection,
    wg_key: &str,
    meta: &PeerMeta,
    settings: &Settings,
    p: &NewPeer<'_>,
    now: Millis,
) -> Result<(String, String, String)> {
    // Every address (the first free one is taken), joined by the database into one string (a
    // row per peer cost more than the rest of the registration at 10,000 peers), but only the
    // names the new one could clash with: its base and the numbered forms of it (a base holds no
    // LIKE wildcard).
    let join = if conn.backend_name() == "PostgreSQL" {
        "SELECT string_agg(overlay_ip, ' ') FROM peers"
    } else {
        "SELECT group_concat(overlay_ip, ' ') FROM peers"
    };
    let all: Option<String> = sqlx::query_scalar(join).fetch_one(&mut *conn).await?;
    let used: HashSet<IpAddr> = all
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter_map(|a| a.parse().ok())
        .collect();
    let base = name_base(&meta.hostname);
    let mut names = HashSet::new();
    for r in sqlx::query("SELECT name FROM peers WHERE name = $1 OR name LIKE $2")
        .bind(&base)
        .bind(format!("{base}-%"))
        .fetch_all(&mut *conn)
        .await?
    {
        names.insert(col::<String>(&r, "name")?);
    }
    let ip = allocate_ip(&settings.overlay_range, &used).ok_or_else(|| {
        StoreError::Conflict(format!(
            "overlay range {} has no free address",
            settings.overlay_range
        ))
    })?;
    let id = new_id();
    let name = unique_name(&base, &names);
    sqlx::query(
        "INSERT INTO peers (id, name, wg_public_key, overlay_ip, hostname, os, agent_version, setup_key_id, \
         ephemeral, connected, login_expiration_enabled, last_seen, last_login, created_at, approved, user_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(&id)
    .bind(&name)
    .bind(wg_key)
    .bind(ip.to_string())
    .bind(&meta.hostname)
    .bind(&meta.os)
    .bind(&meta.agent_version)
    .bind(p.setup_key_id)
    .bind(p.ephemeral as i64)
    .bind(0i64)
    .bind(p.login_expiration as i64)
    .bind(now)
    .bind(now)
    .bind(now)
    .bind(p.approved as i64)
    .bind(p.user_id)
    .execute(&mut *conn)
    .await
    .map_err(|e| {
        // Each unique column says what clashed (registrations are serialised by the change's
        // serial bump, so only a key registered at the same moment is expected here).
        let what = match unique_column(&e) {
            Some("name") => format!("another peer has the name {name:?}; try again"),
            Some("overlay_ip") => format!("another peer has the overlay address {ip}; try again"),
            _ => KEY_TAKEN.into(),
        };
        StoreError::from(e).unique_as(|| what)
    })?;
    set_links(conn, Links::Peer, &id, p.groups).await?;
    Ok((id, name, ip.to_string()))
}

/// A WireGuard device's own key and its key in the mesh.
async fn set_device_keys(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    device_key: &str,
    mesh_key: &str,
) -> Result<()> {
    sqlx::query("UPDATE peers SET device_key = $1, wg_public_key = $2 WHERE id = $3")
        .bind(device_key)
        .bind(mesh_key)
        .bind(id)
        .execute(conn)
        .await
        .map_err(|e| StoreError::from(e).unique_as(|| KEY_TAKEN.into()))?;
    Ok(())
}

/// Refuses `name` for peer `id` (None: a new peer) when another peer's name is the same DNS
/// label (names are unique as labels, not only as typed): a rename must never move a label, and
/// with it every agent's answer for that name, to another peer. Names are few and renames rare:
/// every name is read.
async fn label_is_free(conn: &mut sqlx::AnyConnection, id: Option<&str>, name: &str) -> Result<()> {
    let label = label_of(name);
    let rows = sqlx::query("SELECT id, name, created_at FROM peers")
        .fetch_all(&mut *conn)
        .await?;
    let peers = rows
        .iter()
        .map(|r| {
            Ok((
                col::<String>(r, "id")?,
                col::<String>(r, "name")?,
                col::<Millis>(r, "created_at")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let keys: Vec<(&str, Millis, &str)> = peers
        .iter()
        .map(|(i, n, at)| (n.as_str(), *at, i.as_str()))
        .collect();
    // Another peer's label now (with a "-2" a clash gave it), or the label its name makes.
    let clash =
        peers
            .iter()
            .zip(labels_in_join_order(&keys))
            .find(|((other, other_name, _), now)| {
                Some(other.as_str()) != id && (*now == label || label_of(other_name) == label)
            });
    if let Some(((_, other_name, _), _)) = clash {
        return Err(StoreError::Conflict(format!(
            "the DNS name {label} belongs to the peer {other_name:?}: choose another name"
        )));
    }
    Ok(())
}

pub fn hash_secret(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

impl Store {
    /// Adds a plain WireGuard device: a peer named `name` (taken names are refused, not
    /// suffixed: the admin chose it) in `groups`, whose key in the mesh is `mesh_key` and whose
    /// own key is `device_key`.
    pub async fn create_wireguard_device(
        &self,
        actor: &str,
        name: &str,
        groups: &[String],
        device_key: &str,
        mesh_key: &str,
    ) -> Result<Peer> {
        let mut c = self.begin_change(actor).await?;
        label_is_free(c.conn(), None, name).await?;
        check_groups(c.conn(), "groups", groups).await?;
        let mut all = vec![ALL_GROUP_ID.to_string()];
        all.extend(
            groups
                .iter()
                .filter(|x| x.as_str() != ALL_GROUP_ID)
                .cloned(),
        );
        let settings = read_settings(c.conn()).await?;
        let meta = PeerMeta {
            hostname: name.to_string(),
            os: "WireGuard".into(),
            agent_version: String::new(),
        };
        let new = NewPeer {
            setup_key_id: None,
            user_id: None,
            ephemeral: false,
            login_expiration: false,
            approved: true,
            groups: &all,
        };
        let (id, _, ip) =
            register(c.conn(), mesh_key, &meta, &settings, &new, now_millis()).await?;
        sqlx::query("UPDATE peers SET name = $1 WHERE id = $2")
            .bind(name)
            .bind(&id)
            .execute(c.conn())
            .await?;
        set_device_keys(c.conn(), &id, device_key, mesh_key).await?;
        c.audit(
            "wireguard_device.create",
            "peer",
            &id,
            json!({ "name": name, "overlay_ip": ip, "groups": groups, "public_key": device_key }),
        )
        .await?;
        let p = read_peer(c.conn(), &id).await?;
        c.commit(self).await?;
        Ok(p)
    }

    /// Gives a WireGuard device new keys (its old configuration stops working).
    pub async fn rekey_wireguard_device(
        &self,
        actor: &str,
        id: &str,
        device_key: &str,
        mesh_key: &str,
    ) -> Result<Peer> {
        let mut c = self.begin_change(actor).await?;
        let p = read_peer(c.conn(), id).await?;
        if p.wireguard.is_none() {
            return Err(StoreError::Conflict(format!(
                "{} runs an agent, not a plain WireGuard device: it has no configuration to issue",
                p.name
            )));
        }
        set_device_keys(c.conn(), id, device_key, mesh_key).await?;
        c.audit(
            "wireguard_device.rekey",
            "peer",
            id,
            json!({ "name": p.name, "public_key": device_key }),
        )
        .await?;
        let p = read_peer(c.conn(), id).await?;
        c.commit(self).await?;
        Ok(p)
    }

    /// Logs a peer in by its (already proven) key, registering it with `setup_key` if it is new.
    /// Two logins of one new key at the same moment (an agent retrying, or two replicas) both
    /// succeed: the one that finds the key registered by the other logs in as that peer.
    pub async fn login_peer(
        &self,
        wg_key: &str,
        setup_key: Option<&str>,
        meta: &PeerMeta,
    ) -> Result<LoginOutcome> {
        match self.login_peer_once(wg_key, setup_key, meta).await {
            Err(StoreError::Conflict(m)) if m == KEY_TAKEN => {
                self.login_peer_once(wg_key, setup_key, meta).await
            }
            r => r,
        }
    }

    async fn login_peer_once(
        &self,
        wg_key: &str,
        setup_key: Option<&str>,
        meta: &PeerMeta,
    ) -> Result<LoginOutcome> {
        let now = now_millis();
        // Fast path without the write lock' s serial bump: an existing peer only updates its row.
        let mut conn = self.pool.acquire().await?;
        if let Some(peer) = read_peer_where(&mut conn, "wg_public_key", wg_key).await? {
            let settings = read_settings(&mut conn).await?;
            if peer.owner_disabled {
                return Err(StoreError::Denied(disabled_owner_message(&peer)));
            }
            let expired = peer.login_expiration_enabled
                && settings.peer_login_expiry_secs > 0
                && peer.last_login + settings.peer_login_expiry_secs * 1000 < now;
            if expired && peer.user_id.is_some() {
                // A user's device renews by its user signing in again, not with a setup key.
                return Err(StoreError::Denied(login_expired_message(true).into()));
            }
            if expired {
                // Expired means: a valid setup key (counted as a use) or an admin's action
                // (turning login expiry off for the peer). Any other string is not enough.
                let Some(sk) = setup_key else {
                    return Err(StoreError::Denied(login_expired_message(false).into()));
                };
                let kr = sqlx::query("SELECT * FROM setup_keys WHERE key_hash = $1")
                    .bind(hash_secret(sk))
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(kr) = kr else {
                    return Err(StoreError::Denied(
                        "peer login expired and the setup key given is not valid: use a valid setup key".into(),
                    ));
                };
                let key = setup_key_from(&mut conn, &kr).await?;
                let state = setup_key_state(&key, now);
                if state != "valid" {
                    let why = match state {
                        "overused" => "used up",
                        other => other,
                    };
                    return Err(StoreError::Denied(format!(
                        "peer login expired and setup key {:?} is {why}: use a valid setup key",
                        key.name
                    )));
                }
                sqlx::query(
                    "UPDATE setup_keys SET used_count = used_count + 1, last_used_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(&key.id)
                .execute(&mut *conn)
                .await?;
            }
            // `last_login` is when the peer last proved it may be here (registration, or renewal
            // with a setup key after expiry); the agent's silent token refreshes do not move it,
            // or login expiry would never come for a peer that stays online.
            let last_login = if expired { now } else { peer.last_login };
            sqlx::query("UPDATE peers SET hostname = $1, os = $2, agent_version = $3, last_login = $4 WHERE id = $5")
                .bind(&meta.hostname)
                .bind(&meta.os)
                .bind(&meta.agent_version)
                .bind(last_login)
                .bind(&peer.id)
                .execute(&mut *conn)
                .await?;
            let peer = read_peer_where(&mut conn, "id", &peer.id)
                .await?
                .ok_or_else(|| StoreError::not_found("peer", &peer.id))?;
            return Ok(LoginOutcome {
                peer,
                registered: false,
            });
        }
        drop(conn);
        let Some(setup_key) = setup_key else {
            return Err(StoreError::Denied(NOT_REGISTERED.into()));
        };
        let key_hash = hash_secret(setup_key);
        let mut c = self.begin_change("system").await?;
        let Some(kr) = sqlx::query("SELECT * FROM setup_keys WHERE key_hash = $1")
            .bind(&key_hash)
            .fetch_optional(c.conn())
            .await?
        else {
            return Err(StoreError::Denied("invalid setup key".into()));
        };
        let key = setup_key_from(c.conn(), &kr).await?;
        match setup_key_state(&key, now) {
            "valid" => {}
            "revoked" => {
                return Err(StoreError::Denied(format!(
                    "setup key {:?} has been revoked",
                    key.name
                )))
            }
            "expired" => {
                return Err(StoreError::Denied(format!(
                    "setup key {:?} has expired",
                    key.name
                )))
            }
            _ if !key.reusable => {
                return Err(StoreError::Denied(format!(
                    "setup key {:?} is one-off and has already been used",
                    key.name
                )))
            }
            _ => {
                return Err(StoreError::Denied(format!(
                    "setup key {:?} reached its usage limit of {}",
                    key.name, key.usage_limit
                )))
            }
        }
        let settings = read_settings(c.conn()).await?;
        let mut groups = vec![ALL_GROUP_ID.to_string()];
        groups.extend(key.auto_groups.iter().cloned());
        let (id, name, ip) = register(
            c.conn(),
            wg_key,
            meta,
            &settings,
            &NewPeer {
                setup_key_id: Some(&key.id),
                user_id: None,
                ephemeral: key.ephemeral,
                login_expiration: false,
                approved: !settings.peer_approval_required,
                groups: &groups,
            },
            now,
        )
        .await?;
        sqlx::query(
            "UPDATE setup_keys SET used_count = used_count + 1, last_used_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(&key.id)
        .execute(c.conn())
        .await?;
        c.actor = format!("setup_key:{}", key.name);
        c.audit(
            "peer.register",
            "peer",
            &id,
            json!({ "name": name, "overlay_ip": ip, "hostname": meta.hostname, "setup_key": key.name }),
        )
        .await?;
        let peer = read_peer_where(c.conn(), "id", &id)
            .await?
            .ok_or_else(|| StoreError::not_found("peer", &id))?;
        c.commit(self).await?;
        Ok(LoginOutcome {
            peer,
            registered: true,
        })
    }

    /// One peer, read alone (without its DNS name, which depends on the others': see
    /// [`Store::peer_with_name`]).
    pub async fn peer(&self, id: &str) -> Result<Peer> {
        let mut conn = self.pool.acquire().await?;
        read_peer_where(&mut conn, "id", id)
            .await?
            .ok_or_else(|| StoreError::not_found("peer", id))
    }

    /// One peer with its DNS name (reads every peer: for the API, not per connection).
    pub async fn peer_with_name(&self, id: &str) -> Result<Peer> {
        let mut conn = self.pool.acquire().await?;
        load_peers(&mut conn)
            .await?
            .into_iter()
            .find(|p| p.id == id)
            .ok_or_else(|| StoreError::not_found("peer", id))
    }

    pub async fn peers(&self) -> Result<Vec<Peer>> {
        let mut conn = self.pool.acquire().await?;
        load_peers(&mut conn).await
    }

    pub async fn update_peer(
        &self,
        actor: &str,
        id: &str,
        name: Option<&str>,
        groups: Option<&[String]>,
        login_expiration_enabled: Option<bool>,
        approved: Option<bool>,
    ) -> Result<Peer> {
        let mut c = self.begin_change(actor).await?;
        read_peer_where(c.conn(), "id", id)
            .await?
            .ok_or_else(|| StoreError::not_found("peer", id))?;
        if let Some(n) = name {
            label_is_free(c.conn(), Some(id), n).await?;
            sqlx::query("UPDATE peers SET name = $1 WHERE id = $2")
                .bind(n)
                .bind(id)
                .execute(c.conn())
                .await
                .map_err(|e| {
                    StoreError::from(e).unique_as(|| format!("a peer named {n:?} already exists"))
                })?;
        }
        if let Some(g) = groups {
            check_groups(c.conn(), "groups", g).await?;
            // Every peer stays in "All".
            let mut all = vec![ALL_GROUP_ID.to_string()];
            all.extend(g.iter().filter(|x| x.as_str() != ALL_GROUP_ID).cloned());
            set_links(c.conn(), Links::Peer, id, &all).await?;
        }
        if let Some(l) = login_expiration_enabled {
            sqlx::query("UPDATE peers SET login_expiration_enabled = $1 WHERE id = $2")
                .bind(l as i64)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        if let Some(a) = approved {
            sqlx::query("UPDATE peers SET approved = $1 WHERE id = $2")
                .bind(a as i64)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        c.audit("peer.update", "peer", id, json!({ "name": name, "groups": groups, "login_expiration_enabled": login_expiration_enabled, "approved": approved })).await?;
        let p = read_peer_where(c.conn(), "id", id)
            .await?
            .ok_or_else(|| StoreError::not_found("peer", id))?;
        c.commit(self).await?;
        Ok(p)
    }

    pub async fn delete_peer(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let p = read_peer_where(c.conn(), "id", id)
            .await?
            .ok_or_else(|| StoreError::not_found("peer", id))?;
        sqlx::query("DELETE FROM peers WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit(
            "peer.delete",
            "peer",
            id,
            json!({ "name": p.name, "overlay_ip": p.overlay_ip }),
        )
        .await?;
        c.commit(self).await
    }

    /// (all peers, connected peers)
    pub async fn peer_counts(&self) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS total, COUNT(CASE WHEN connected = 1 THEN 1 END) AS online \
             FROM peers",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((col(&r, "total")?, col(&r, "online")?))
    }

    /// Marks a peer connected (its sync stream is open on this replica) or disconnected (its
    /// stream here ended; a stream it opened meanwhile on another replica keeps it online),
    /// updating last seen.
    pub async fn set_peer_connected(&self, id: &str, connected: bool) -> Result<()> {
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            if connected {
                held.insert(id.to_string());
            } else {
                held.remove(id);
            }
        }
        let mut c = self.begin_change(&format!("peer:{id}")).await?;
        let n = if connected {
            sqlx::query(
                "UPDATE peers SET connected = $1, last_seen = $2, replica = $3 WHERE id = $4",
            )
            .bind(1i64)
            .bind(now_millis())
            .bind(self.replica())
            .bind(id)
            .execute(c.conn())
            .await?
            .rows_affected()
        } else {
            let n = sqlx::query("UPDATE peers SET last_seen = $1 WHERE id = $2")
                .bind(now_millis())
                .bind(id)
                .execute(c.conn())
                .await?
                .rows_affected();
            sqlx::query("UPDATE peers SET connected = $1 WHERE id = $2 AND (replica = $3 OR replica IS NULL)")
                .bind(0i64)
                .bind(id)
                .bind(self.replica())
                .execute(c.conn())
                .await?;
            n
        };
        if n == 0 {
            return Err(StoreError::not_found("peer", id));
        }
        c.commit(self).await
    }

    /// Records that these peers' logins expired: an audit event each, and a change, so every map
    /// is computed again without them.
    pub async fn logins_expired(&self, peers: &[(String, String)]) -> Result<()> {
        let mut c = self.begin_change("system").await?;
        for (id, name) in peers {
            c.audit("peer.login_expired", "peer", id, json!({ "name": name }))
                .await?;
        }
        c.commit(self).await
    }

    /// At start-up no stream is open, whatever the database says after a crash.
    pub async fn mark_all_disconnected(&self) -> Result<()> {
        let mut c = self.begin_change("system").await?;
        sqlx::query("UPDATE peers SET connected = $1 WHERE connected = $2")
            .bind(0i64)
            .bind(1i64)
            .execute(c.conn())
            .await?;
        c.commit(self).await
    }

    /// Removes ephemeral peers disconnected for longer than the configured TTL; returns how many.
    pub async fn remove_stale_ephemeral(&self, now: Millis) -> Result<u64> {
        let settings = self.settings().await?;
        let cutoff = now - settings.ephemeral_ttl_secs * 1000;
        let stale = sqlx::query(
            "SELECT id, name FROM peers WHERE ephemeral = $1 AND connected = $2 AND last_seen < $3",
        )
        .bind(1i64)
        .bind(0i64)
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        if stale.is_empty() {
            return Ok(0);
        }
        let mut c = self.begin_change("system").await?;
        let mut n = 0;
        for r in &stale {
            let id: String = col(r, "id")?;
            let name: String = col(r, "name")?;
            n += sqlx::query("DELETE FROM peers WHERE id = $1 AND connected = $2")
                .bind(&id)
                .bind(0i64)
                .execute(c.conn())
                .await?
                .rows_affected();
            c.audit(
                "peer.ephemeral_remove",
                "peer",
                &id,
                json!({ "name": name }),
            )
            .await?;
        }
        c.commit(self).await?;
        Ok(n)
    }

    /// A consistent snapshot of everything the network maps depend on (bulk reads, no N+1).
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut tx = self.pool.begin().await?;
        let settings = read_settings(&mut tx).await?;
        let peers = load_peers(&mut tx).await?;
        let links = sqlx::query("SELECT policy_id, group_id, side FROM policy_groups")
            .fetch_all(&mut *tx)
            .await?;
        let mut pl: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for r in &links {
            let e = pl.entry(col(r, "policy_id")?).or_default();
            let side: String = col(r, "side")?;
            if side == "src" {
                e.0.push(col(r, "group_id")?)
            } else {
                e.1.push(col(r, "group_id")?)
            }
        }
        let mut policies = vec![];
        for r in sqlx::query("SELECT * FROM policies ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
        {
            let id: String = col(&r, "id")?;
            let (sources, destinations) = pl.remove(&id).unwrap_or_default();
            policies.push(super::entities::policy_row(&r, sources, destinations)?);
        }
        let mut routes = vec![];
        for r in sqlx::query("SELECT * FROM routes ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
        {
            routes.push(super::entities::route_from(&mut tx, &r).await?);
        }
        let services = super::services::load_services(&mut tx).await?;
        let nameservers = super::dns::load_nameservers(&mut tx).await?;
        let relays = super::replicas::load_relays(&mut tx).await?;
        tx.commit().await?;
        Ok(Snapshot {
            settings,
            peers,
            policies,
            routes,
            services,
            nameservers,
            relays,
        })
    }
}

async fn load_peers(conn: &mut sqlx::AnyConnection) -> Result<Vec<Peer>> {
    let links = sqlx::query("SELECT peer_id, group_id FROM peer_groups ORDER BY group_id")
        .fetch_all(&mut *conn)
        .await?;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &links {
        groups
            .entry(col(r, "peer_id")?)
            .or_default()
            .push(col(r, "group_id")?);
    }
    let rows = sqlx::query(concat!(peer_select!(), " ORDER BY peers.name"))
        .fetch_all(&mut *conn)
        .await?;
    let mut peers = rows
        .iter()
        .map(|r| {
            let id: String = col(r, "id")?;
            peer_from(r, groups.remove(&id).unwrap_or_default())
        })
        .collect::<Result<Vec<_>>>()?;
    let domain = read_settings(&mut *conn).await?.dns_domain;
    let labels = dns_labels(&peers);
    for (p, label) in peers.iter_mut().zip(labels) {
        p.dns_name = format!("{label}.{domain}");
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_takes_first_free_host() {
        let range: IpNet = "100.64.0.0/30".parse().expect("cidr");
        let mut used = HashSet::new();
        let a = allocate_ip(&range, &used).expect("first");
        assert_eq!(a.to_string(), "100.64.0.1");
        used.insert(a);
        let b = allocate_ip(&range, &used).expect("second");
        assert_eq!(b.to_string(), "100.64.0.2");
        used.insert(b);
        assert_eq!(allocate_ip(&range, &used), None, "/30 has two hosts");
    }

    #[test]
    fn names_are_sanitised_and_unique() {
        let mut taken = HashSet::new();
        assert_eq!(
            unique_name(&name_base("Laptop.Corp"), &taken),
            "laptop-corp"
        );
        taken.insert("laptop-corp".to_string());
        assert_eq!(
            unique_name(&name_base("laptop.corp"), &taken),
            "laptop-corp-2"
        );
        assert_eq!(unique_name(&name_base("***"), &taken), "peer");
        assert_eq!(name_base(&"x".repeat(60)).len(), 48);
    }

    #[tokio::test]
    async fn registrations_get_the_first_free_address_and_a_name_no_one_has() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::connect(&format!("sqlite://{}", tmp.path().join("t.db").display()))
            .await
            .expect("store");
        let secret = "tern_sk_registrationsregistrations";
        let key = crate::store::NewSetupKey::reusable("k", vec![]);
        store
            .create_setup_key("t", &key, &hash_secret(secret), &secret[..12])
            .await
            .expect("setup key");
        let join = |host: &'static str| {
            let store = &store;
            async move {
                let wg = tern_proto::SecretKey::generate().public_key().to_base64();
                let meta = PeerMeta {
                    hostname: host.into(),
                    os: "linux".into(),
                    agent_version: "test".into(),
                };
                let p = store
                    .login_peer(&wg, Some(secret), &meta)
                    .await
                    .expect("registered")
                    .peer;
                (p.name, p.overlay_ip, p.id)
            }
        };
        // A name that only starts like another's is no clash; numbered forms taken by hostnames
        // are skipped.
        let mut got = vec![];
        for host in ["laptop", "laptopx", "laptop-2", "Laptop", "LAPTOP"] {
            got.push(join(host).await);
        }
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(
            names,
            ["laptop", "laptopx", "laptop-2", "laptop-3", "laptop-4"]
        );
        let ips: Vec<&str> = got.iter().map(|g| g.1.as_str()).collect();
        assert_eq!(
            ips,
            [
                "100.64.0.1",
                "100.64.0.2",
                "100.64.0.3",
                "100.64.0.4",
                "100.64.0.5"
            ]
        );
        // A deleted peer's address and name are given again.
        store.delete_peer("t", &got[1].2).await.expect("deleted");
        let again = join("laptopx").await;
        assert_eq!(
            (again.0.as_str(), again.1.as_str()),
            ("laptopx", "100.64.0.2")
        );
    }

    #[tokio::test]
    async fn logins_of_one_new_key_at_the_same_moment_all_succeed_as_one_peer() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::connect(&format!("sqlite://{}", tmp.path().join("t.db").display()))
            .await
            .expect("store");
        let secret = "tern_sk_concurrentconcurrentconc";
        let key = crate::store::NewSetupKey::reusable("k", vec![]);
        store
            .create_setup_key("t", &key, &hash_secret(secret), &secret[..12])
            .await
            .expect("setup key");
        let wg = tern_proto::SecretKey::generate().public_key().to_base64();
        let meta = PeerMeta {
            hostname: "laptop".into(),
            os: "linux".into(),
            agent_version: "test".into(),
        };
        let logins = (0..8).map(|_| store.login_peer(&wg, Some(secret), &meta));
        let got = futures::future::join_all(logins).await;
        let mut ids = HashSet::new();
        let mut registered = 0;
        for r in got {
            let o = r.expect("every login succeeds");
            ids.insert(o.peer.id);
            registered += usize::from(o.registered);
        }
        assert_eq!(ids.len(), 1, "one peer");
        assert_eq!(registered, 1, "registered once");
        let keys = store.setup_keys().await.expect("keys");
        assert_eq!(keys[0].used_count, 1, "the setup key is used once");

        // A unique violation names its column (SQLite's message).
        let mut conn = store.pool.acquire().await.expect("conn");
        let dup = sqlx::query(
            "INSERT INTO peers (id, name, wg_public_key, overlay_ip, hostname, os, agent_version, \
             ephemeral, connected, login_expiration_enabled, last_seen, last_login, created_at, approved) \
             VALUES ('x', 'laptop', 'other-key', '100.64.9.9', 'h', 'linux', 't', 0, 0, 0, 0, 0, 0, 1)",
        )
        .execute(&mut *conn)
        .await
        .expect_err("the name is taken");
        assert_eq!(unique_column(&dup), Some("name"));
    }
}
