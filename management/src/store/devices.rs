//! Devices that join by their user's sign-in (RFC 8628 style): the agent proves its WireGuard key
//! and gets a short user code; a signed-in person approves (or denies) that code in the console;
//! the agent's next login with the code registers the device as that user's (or renews its login).
//! Also the groups a user's identity provider maps them to, which their devices follow.

use super::entities::{read_settings, user_from, Links};
use super::peers::{register, NewPeer, PeerMeta};
use super::{col, set_links, LoginOutcome, Result, Store, StoreError};
use crate::model::*;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use utoipa::ToSchema;

/// How long a code waits for its approval.
pub const DEVICE_CODE_TTL_MS: Millis = 10 * 60 * 1000;
/// At most this many sign-ins wait at once (anyone can ask for a code). When they do, a new
/// one takes the place of the oldest from the source holding the most, so a few sources cannot
/// keep everyone else from signing in.
pub const MAX_PENDING_DEVICE_LOGINS: i64 = 1000;
/// At most this many wait from one source, an IPv4 address or an IPv6 /64 (a NAT may hide a
/// whole office: generous).
pub const MAX_PENDING_PER_SOURCE: i64 = 50;
/// Letters that cannot be mistaken for one another (no vowels: no words; no 0/O, 1/I).
const CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// A sign-in waiting for (or given) approval, as the approval page shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceLogin {
    /// e.g. "BCDF-GHJK".
    pub user_code: String,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    /// Where the request came from (the address management saw).
    pub source: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// "pending", "approved" or "denied".
    pub state: String,
    /// The peer this sign-in renews, if the device is already registered.
    pub existing_peer: Option<String>,
    /// Who approved or denied it.
    pub decided_by: Option<String>,
}

/// What the agent's login with a code comes to.
#[derive(Debug)]
pub enum DeviceLoginResult {
    /// Nobody has approved the code yet: ask again after the interval.
    Pending,
    Done(Box<LoginOutcome>),
}

/// A random user code, `XXXX-XXXX` (20^8, about 2.6e10 codes).
fn new_user_code() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    let mut s = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            s.push('-');
        }
        s.push(CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char);
    }
    s
}

/// A code as a person may type it (lower case, spaces, without the dash) in its stored form, or
/// None if it cannot be one.
pub fn normalize_user_code(input: &str) -> Option<String> {
    let letters: Vec<u8> = input
        .bytes()
        .filter(|b| !matches!(b, b' ' | b'-' | b'\t'))
        .map(|b| b.to_ascii_uppercase())
        .collect();
    if letters.len() != 8 || !letters.iter().all(|b| CODE_ALPHABET.contains(b)) {
        return None;
    }
    let s = String::from_utf8(letters).ok()?;
    Some(format!("{}-{}", &s[..4], &s[4..]))
}

fn unknown_code(code: &str) -> StoreError {
    StoreError::Denied(format!(
        "no sign-in is waiting for the code {code}: it may have expired or been used; run tern up again on the device for a new one"
    ))
}

impl Store {
    /// Starts a device sign-in for a proven WireGuard key: a fresh code (replacing any earlier
    /// one of the same key).
    pub async fn start_device_login(
        &self,
        wg_key: &str,
        meta: &PeerMeta,
        source: &str,
    ) -> Result<(String, Millis)> {
        let now = now_millis();
        let mut c = self.begin_quiet("system").await?;
        sqlx::query("DELETE FROM device_logins WHERE expires_at < $1 OR wg_public_key = $2")
            .bind(now)
            .bind(wg_key)
            .execute(c.conn())
            .await?;
        let waiting: i64 = col(
            &sqlx::query("SELECT COUNT(*) AS n FROM device_logins")
                .fetch_one(c.conn())
                .await?,
            "n",
        )?;
        let net = source
            .parse::<std::net::IpAddr>()
            .map(|ip| tern_proto::source_of(ip).to_string())
            .unwrap_or_else(|_| source.to_string());
        let mut from_here = 0;
        if !net.is_empty() {
            from_here = col(
                &sqlx::query("SELECT COUNT(*) AS n FROM device_logins WHERE source_net = $1")
                    .bind(&net)
                    .fetch_one(c.conn())
                    .await?,
                "n",
            )?;
            if from_here >= MAX_PENDING_PER_SOURCE {
                return Err(StoreError::Denied(format!(
                    "{from_here} device sign-ins from {source} are already waiting for approval; approve or let them expire (10 min), then try again"
                )));
            }
        }
        if waiting >= MAX_PENDING_DEVICE_LOGINS {
            // The source holding the most gives up its oldest code, if it holds more than this
            // one does (else everyone holds as little: try later).
            let top = sqlx::query(
                "SELECT source_net, COUNT(*) AS n FROM device_logins WHERE state = 'pending' \
                 GROUP BY source_net ORDER BY n DESC, source_net LIMIT 1",
            )
            .fetch_optional(c.conn())
            .await?;
            let (top_net, top_n): (String, i64) = match &top {
                Some(r) => (col(r, "source_net")?, col(r, "n")?),
                None => (String::new(), 0),
            };
            if top_n <= from_here + 1 {
                return Err(StoreError::Denied(format!(
                    "{waiting} device sign-ins are already waiting for approval; try again in a few minutes"
                )));
            }
            sqlx::query(
                "DELETE FROM device_logins WHERE user_code = (SELECT user_code FROM device_logins \
                 WHERE source_net = $1 AND state = 'pending' ORDER BY created_at LIMIT 1)",
            )
            .bind(&top_net)
            .execute(c.conn())
            .await?;
        }
        let expires_at = now + DEVICE_CODE_TTL_MS;
        for _ in 0..5 {
            let code = new_user_code();
            let r = sqlx::query(
                "INSERT INTO device_logins (user_code, wg_public_key, hostname, os, agent_version, source, \
                 created_at, expires_at, state, source_net) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9)",
            )
            .bind(&code)
            .bind(wg_key)
            .bind(&meta.hostname)
            .bind(&meta.os)
            .bind(&meta.agent_version)
            .bind(source)
            .bind(now)
            .bind(expires_at)
            .bind(&net)
            .execute(c.conn())
            .await;
            match r {
                Ok(_) => {
                    c.commit(self).await?;
                    return Ok((code, expires_at));
                }
                Err(e) => {
                    let e = StoreError::from(e).unique_as(String::new);
                    if !matches!(e, StoreError::Conflict(_)) {
                        return Err(e);
                    }
                }
            }
        }
        Err(StoreError::Conflict(
            "could not find a free sign-in code; try again".into(),
        ))
    }

    /// The sign-in a code names, for the approval page (None: unknown or expired).
    pub async fn device_login(&self, code: &str) -> Result<Option<DeviceLogin>> {
        let r = sqlx::query(
            "SELECT d.*, p.name AS existing_peer, u.username AS decided_by FROM device_logins d \
             LEFT JOIN peers p ON p.wg_public_key = d.wg_public_key \
             LEFT JOIN users u ON u.id = d.user_id WHERE d.user_code = $1 AND d.expires_at >= $2",
        )
        .bind(code)
        .bind(now_millis())
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok(DeviceLogin {
                user_code: col(&r, "user_code")?,
                hostname: col(&r, "hostname")?,
                os: col(&r, "os")?,
                agent_version: col(&r, "agent_version")?,
                source: col(&r, "source")?,
                created_at: col(&r, "created_at")?,
                expires_at: col(&r, "expires_at")?,
                state: col(&r, "state")?,
                existing_peer: col(&r, "existing_peer")?,
                decided_by: col(&r, "decided_by")?,
            })
        })
        .transpose()
    }

    /// A signed-in user approves or denies a waiting sign-in. A device already registered to
    /// someone else can only be taken over (or turned away) by an admin.
    pub async fn decide_device_login(
        &self,
        actor: &str,
        user: &User,
        code: &str,
        approve: bool,
    ) -> Result<DeviceLogin> {
        let Some(d) = self.device_login(code).await? else {
            return Err(unknown_code(code));
        };
        if d.state != "pending" {
            return Err(StoreError::Conflict(format!(
                "this sign-in was already {} by {}",
                d.state,
                d.decided_by.as_deref().unwrap_or("someone")
            )));
        }
        let mut c = self.begin_quiet(actor).await?;
        if !user.role.is_admin() {
            let owner = sqlx::query(
                "SELECT p.user_id FROM peers p JOIN device_logins d ON d.wg_public_key = p.wg_public_key \
                 WHERE d.user_code = $1",
            )
            .bind(code)
            .fetch_optional(c.conn())
            .await?;
            let owner: Option<String> = match &owner {
                Some(r) => col(r, "user_id")?,
                None => None,
            };
            if owner.is_none() && d.existing_peer.is_some() || owner.is_some_and(|o| o != user.id) {
                return Err(StoreError::Denied(format!(
                    "{} is registered to someone else: only its owner or an admin can {} this sign-in",
                    d.existing_peer.as_deref().unwrap_or("this device"),
                    if approve { "approve" } else { "deny" }
                )));
            }
        }
        let n = sqlx::query(
            "UPDATE device_logins SET state = $1, user_id = $2, decided_at = $3 \
             WHERE user_code = $4 AND state = 'pending'",
        )
        .bind(if approve { "approved" } else { "denied" })
        .bind(&user.id)
        .bind(now_millis())
        .bind(code)
        .execute(c.conn())
        .await?
        .rows_affected();
        if n == 0 {
            return Err(unknown_code(code));
        }
        c.audit(
            if approve { "device.approve" } else { "device.deny" },
            "device_login",
            code,
            json!({ "hostname": d.hostname, "os": d.os, "source": d.source, "user": user.username, "existing_peer": d.existing_peer }),
        )
        .await?;
        c.commit(self).await?;
        Ok(DeviceLogin {
            state: if approve { "approved" } else { "denied" }.into(),
            decided_by: Some(user.username.clone()),
            ..d
        })
    }

    /// The agent's login with its code: pending, refused (denied, expired, unknown, or its
    /// approver disabled), or done (the device registered as its approver's, or its login
    /// renewed). The code is used up when done.
    pub async fn login_device(
        &self,
        wg_key: &str,
        code: &str,
        meta: &PeerMeta,
    ) -> Result<DeviceLoginResult> {
        let now = now_millis();
        let row = sqlx::query("SELECT * FROM device_logins WHERE user_code = $1")
            .bind(code)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) =
            row.filter(|r| col::<String>(r, "wg_public_key").ok().as_deref() == Some(wg_key))
        else {
            return Err(unknown_code(code));
        };
        let forget = || async {
            sqlx::query("DELETE FROM device_logins WHERE user_code = $1")
                .bind(code)
                .execute(&self.pool)
                .await
        };
        if col::<i64>(&row, "expires_at")? < now {
            forget().await?;
            return Err(StoreError::Denied(format!(
                "the code {code} expired before anyone approved it: run tern up again for a new one"
            )));
        }
        let state: String = col(&row, "state")?;
        let approver: Option<String> = col(&row, "user_id")?;
        match (state.as_str(), approver) {
            ("pending", _) => Ok(DeviceLoginResult::Pending),
            ("denied", who) => {
                forget().await?;
                let who = match who {
                    Some(id) => self.user(&id).await.map(|u| u.username).unwrap_or_default(),
                    None => String::new(),
                };
                Err(StoreError::Denied(format!(
                    "{who} denied this device's sign-in in the console"
                )))
            }
            ("approved", Some(user_id)) => {
                let r = self.finish_device_login(wg_key, code, &user_id, meta).await;
                if !matches!(r, Err(StoreError::Db(_))) {
                    forget().await?;
                }
                r.map(|o| DeviceLoginResult::Done(Box::new(o)))
            }
            _ => Err(unknown_code(code)),
        }
    }

    async fn finish_device_login(
        &self,
        wg_key: &str,
        code: &str,
        user_id: &str,
        meta: &PeerMeta,
    ) -> Result<LoginOutcome> {
        let now = now_millis();
        let mut c = self.begin_change("system").await?;
        let Some(u) = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(c.conn())
            .await?
        else {
            return Err(StoreError::Denied(
                "the user who approved this sign-in was deleted: run tern up again".into(),
            ));
        };
        let user = user_from(&u)?;
        if user.disabled {
            return Err(StoreError::Denied(format!(
                "{} approved this sign-in but the account is disabled: ask an admin, then run tern up again",
                user.username
            )));
        }
        c.actor = format!("user:{} (device sign-in)", user.username);
        let groups = user_group_ids(c.conn(), &user.id).await?;
        let existing = sqlx::query("SELECT id, user_id FROM peers WHERE wg_public_key = $1")
            .bind(wg_key)
            .fetch_optional(c.conn())
            .await?;
        let (id, registered) = match existing {
            Some(r) => {
                let id: String = col(&r, "id")?;
                // A renewal: the sign-in proves the device may stay; it becomes (or stays) the
                // approver's, with login expiry, in their groups.
                sqlx::query(
                    "UPDATE peers SET user_id = $1, last_login = $2, login_expiration_enabled = 1, \
                     hostname = $3, os = $4, agent_version = $5 WHERE id = $6",
                )
                .bind(&user.id)
                .bind(now)
                .bind(&meta.hostname)
                .bind(&meta.os)
                .bind(&meta.agent_version)
                .bind(&id)
                .execute(c.conn())
                .await?;
                for g in &groups {
                    join_group(c.conn(), &id, g).await?;
                }
                c.audit(
                    "peer.login",
                    "peer",
                    &id,
                    json!({ "user": user.username, "code": code, "hostname": meta.hostname }),
                )
                .await?;
                (id, false)
            }
            None => {
                let settings = read_settings(c.conn()).await?;
                // A new device: its owner's groups, and those every device added by sign-in
                // joins (Settings; a renewal leaves its groups to the admin).
                let mut all = vec![ALL_GROUP_ID.to_string()];
                all.extend(groups.iter().cloned());
                all.extend(settings.sign_in_groups.iter().cloned());
                all.sort();
                all.dedup();
                let (id, name, ip) = register(
                    c.conn(),
                    wg_key,
                    meta,
                    &settings,
                    &NewPeer {
                        setup_key_id: None,
                        user_id: Some(&user.id),
                        ephemeral: false,
                        login_expiration: true,
                        // An admin's approval of the code is an admin's approval of the device.
                        approved: !settings.peer_approval_required || user.role.is_admin(),
                        groups: &all,
                    },
                    now,
                )
                .await?;
                c.audit(
                    "peer.register",
                    "peer",
                    &id,
                    json!({ "name": name, "overlay_ip": ip, "hostname": meta.hostname, "user": user.username, "code": code }),
                )
                .await?;
                (id, true)
            }
        };
        let peer = super::peers::read_peer(c.conn(), &id).await?;
        c.commit(self).await?;
        Ok(LoginOutcome { peer, registered })
    }

    /// The groups of `user_id` from their identity provider's claim: `names` are matched to
    /// Tern groups by name (others are ignored; the built-in group is never one). Their devices
    /// join the new groups and leave the ones the claim no longer names. Returns the names
    /// matched; changes nothing (and bumps no serial) when they are the same as before.
    pub async fn sync_user_groups(
        &self,
        user_id: &str,
        username: &str,
        names: &[String],
    ) -> Result<Vec<String>> {
        let groups = self.groups().await?;
        let mut want: BTreeSet<String> = BTreeSet::new();
        let mut matched = vec![];
        for g in groups.iter().filter(|g| !g.builtin) {
            if names.iter().any(|n| n == &g.name) {
                want.insert(g.id.clone());
                matched.push(g.name.clone());
            }
        }
        let mut conn = self.pool.acquire().await?;
        let had: BTreeSet<String> = user_group_ids(&mut conn, user_id)
            .await?
            .into_iter()
            .collect();
        drop(conn);
        if had == want {
            return Ok(matched);
        }
        let mut c = self.begin_change("identity provider").await?;
        let want_v: Vec<String> = want.iter().cloned().collect();
        set_links(c.conn(), Links::User, user_id, &want_v).await?;
        let devices = sqlx::query("SELECT id FROM peers WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(c.conn())
            .await?;
        for d in &devices {
            let peer: String = col(d, "id")?;
            for g in had.difference(&want) {
                sqlx::query("DELETE FROM peer_groups WHERE peer_id = $1 AND group_id = $2")
                    .bind(&peer)
                    .bind(g)
                    .execute(c.conn())
                    .await?;
            }
            for g in want.difference(&had) {
                join_group(c.conn(), &peer, g).await?;
            }
        }
        let name_of = |ids: Vec<&String>| -> Vec<String> {
            ids.into_iter()
                .filter_map(|id| groups.iter().find(|g| &g.id == id).map(|g| g.name.clone()))
                .collect()
        };
        c.audit(
            "user.groups",
            "user",
            user_id,
            json!({
                "username": username,
                "joined": name_of(want.difference(&had).collect()),
                "left": name_of(had.difference(&want).collect()),
                "devices": devices.len(),
            }),
        )
        .await?;
        c.commit(self).await?;
        Ok(matched)
    }
}

/// Puts a peer in a group (nothing if it is in it already).
async fn join_group(conn: &mut sqlx::AnyConnection, peer: &str, group: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO peer_groups (peer_id, group_id) SELECT $1, $2 \
         WHERE NOT EXISTS (SELECT 1 FROM peer_groups WHERE peer_id = $1 AND group_id = $2)",
    )
    .bind(peer)
    .bind(group)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn user_group_ids(conn: &mut sqlx::AnyConnection, user_id: &str) -> Result<Vec<String>> {
    super::linked_groups(
        conn,
        "SELECT group_id FROM user_groups WHERE user_id = $1 ORDER BY group_id",
        user_id,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_typed_forgivingly_and_checked() {
        let c = new_user_code();
        assert_eq!(c.len(), 9);
        assert_eq!(normalize_user_code(&c).as_deref(), Some(c.as_str()));
        assert_eq!(
            normalize_user_code(" bcdf ghjk ").as_deref(),
            Some("BCDF-GHJK")
        );
        assert_eq!(
            normalize_user_code("bcdfghjk").as_deref(),
            Some("BCDF-GHJK")
        );
        assert_eq!(normalize_user_code("BCDF-GHJ"), None, "too short");
        assert_eq!(
            normalize_user_code("BCDF-GHJA"),
            None,
            "a vowel is never in a code"
        );
        assert_eq!(normalize_user_code("BCDF-GHJ0"), None);
        assert_eq!(normalize_user_code("ÄBCD-GHJK"), None);
    }
}
