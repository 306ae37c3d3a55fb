//! Admin-managed entities: settings, users and tokens, groups, setup keys, policies, routes, audit.

use super::{check_groups, col, linked_groups, Result, Store, StoreError};
use crate::model::*;
use ipnet::IpNet;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::Row;

// ---------------------------------------------------------------------------------------------
// Settings

impl Store {
    pub async fn settings(&self) -> Result<Settings> {
        let mut conn = self.pool.acquire().await?;
        read_settings(&mut conn).await
    }

    pub async fn update_settings(&self, actor: &str, s: &Settings) -> Result<Settings> {
        let mut c = self.begin_change(actor).await?;
        // Peers keep their addresses: a range that would strand one is refused.
        let rows = sqlx::query("SELECT name, overlay_ip FROM peers")
            .fetch_all(c.conn())
            .await?;
        for r in &rows {
            let ip: String = col(r, "overlay_ip")?;
            let name: String = col(r, "name")?;
            let inside = ip
                .parse::<std::net::IpAddr>()
                .map(|a| s.overlay_range.contains(&a))
                .unwrap_or(false);
            if !inside {
                return Err(StoreError::Conflict(format!(
                    "overlay range {} does not contain peer {name:?} ({ip}); remove or move that peer first",
                    s.overlay_range
                )));
            }
        }
        let overlaps: Vec<String> = sqlx::query("SELECT network FROM routes")
            .fetch_all(c.conn())
            .await?
            .iter()
            .filter_map(|r| col::<String>(r, "network").ok())
            .filter(|n| {
                n.parse::<IpNet>()
                    .map(|n| nets_overlap(&n, &s.overlay_range))
                    .unwrap_or(false)
            })
            .collect();
        if let Some(n) = overlaps.first() {
            return Err(StoreError::Conflict(format!(
                "overlay range {} overlaps route {n}",
                s.overlay_range
            )));
        }
        sqlx::query(
            "UPDATE settings SET overlay_range = $1, mtu = $2, peer_login_expiry_secs = $3, \
             ephemeral_ttl_secs = $4, peer_approval_required = $5, dns_domain = $6 WHERE id = 1",
        )
        .bind(s.overlay_range.to_string())
        .bind(s.mtu as i64)
        .bind(s.peer_login_expiry_secs)
        .bind(s.ephemeral_ttl_secs)
        .bind(s.peer_approval_required as i64)
        .bind(&s.dns_domain)
        .execute(c.conn())
        .await?;
        check_groups(c.conn(), "expose_groups", &s.expose_groups).await?;
        sqlx::query("DELETE FROM expose_groups")
            .execute(c.conn())
            .await?;
        for g in &s.expose_groups {
            sqlx::query("INSERT INTO expose_groups (group_id) VALUES ($1)")
                .bind(g)
                .execute(c.conn())
                .await?;
        }
        check_groups(c.conn(), "sign_in_groups", &s.sign_in_groups).await?;
        if s.sign_in_groups
            .iter()
            .any(|g| g == crate::model::ALL_GROUP_ID)
        {
            return Err(StoreError::invalid(
                "sign_in_groups",
                "every peer is in the built-in group already",
            ));
        }
        sqlx::query("DELETE FROM sign_in_groups")
            .execute(c.conn())
            .await?;
        for g in &s.sign_in_groups {
            sqlx::query("INSERT INTO sign_in_groups (group_id) VALUES ($1)")
                .bind(g)
                .execute(c.conn())
                .await?;
        }
        c.audit("settings.update", "settings", "settings", json!(s))
            .await?;
        let out = read_settings(c.conn()).await?;
        c.commit(self).await?;
        Ok(out)
    }
}

pub(crate) async fn read_settings(conn: &mut sqlx::AnyConnection) -> Result<Settings> {
    let r = sqlx::query(
        "SELECT overlay_range, mtu, peer_login_expiry_secs, ephemeral_ttl_secs, network_serial, \
         peer_approval_required, dns_domain FROM settings WHERE id = 1",
    )
    .fetch_one(&mut *conn)
    .await?;
    let range: String = col(&r, "overlay_range")?;
    let expose_groups = sqlx::query("SELECT group_id FROM expose_groups ORDER BY group_id")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| col::<String>(r, "group_id"))
        .collect::<Result<Vec<_>>>()?;
    let sign_in_groups = sqlx::query("SELECT group_id FROM sign_in_groups ORDER BY group_id")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| col::<String>(r, "group_id"))
        .collect::<Result<Vec<_>>>()?;
    Ok(Settings {
        sign_in_groups,
        overlay_range: range.parse().map_err(|_| {
            StoreError::invalid(
                "overlay_range",
                format!("stored range {range:?} is not a CIDR"),
            )
        })?,
        mtu: col::<i64>(&r, "mtu")? as u32,
        peer_login_expiry_secs: col(&r, "peer_login_expiry_secs")?,
        ephemeral_ttl_secs: col(&r, "ephemeral_ttl_secs")?,
        peer_approval_required: col(&r, "peer_approval_required")?,
        dns_domain: col(&r, "dns_domain")?,
        expose_groups,
        network_serial: col(&r, "network_serial")?,
    })
}

pub fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

// ---------------------------------------------------------------------------------------------
// Users and personal access tokens

/// A user with the password hash, for sign-in.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: String,
}

pub(crate) fn user_from(r: &AnyRow) -> Result<User> {
    let subject: Option<String> = col(r, "oidc_subject")?;
    let role: String = col(r, "role")?;
    Ok(User {
        id: col(r, "id")?,
        username: col(r, "username")?,
        disabled: col(r, "disabled")?,
        created_at: col(r, "created_at")?,
        source: if subject.is_some() { "oidc" } else { "local" }.into(),
        // A role the code does not know (a newer server wrote it) grants the least.
        role: role.parse().unwrap_or(Role::User),
        devices: r.try_get::<i64, _>("devices").ok(),
    })
}

/// Users with their device counts.
macro_rules! users_with_devices {
    () => {
        "SELECT users.*, (SELECT COUNT(*) FROM peers WHERE peers.user_id = users.id) AS devices FROM users"
    };
}

fn token_from(r: &AnyRow) -> Result<AccessToken> {
    Ok(AccessToken {
        id: col(r, "id")?,
        user_id: col(r, "user_id")?,
        name: col(r, "name")?,
        expires_at: col(r, "expires_at")?,
        created_at: col(r, "created_at")?,
        last_used_at: col(r, "last_used_at")?,
    })
}

impl Store {
    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    pub async fn create_user(
        &self,
        actor: &str,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User> {
        let mut c = self.begin_change(actor).await?;
        let user = User {
            id: new_id(),
            username: username.to_string(),
            disabled: false,
            created_at: now_millis(),
            source: "local".into(),
            role,
            devices: Some(0),
        };
        sqlx::query("INSERT INTO users (id, username, password_hash, disabled, created_at, role) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&user.id)
            .bind(&user.username)
            .bind(password_hash)
            .bind(0i64)
            .bind(user.created_at)
            .bind(role.as_str())
            .execute(c.conn())
            .await
            .map_err(|e| StoreError::from(e).unique_as(|| format!("a user named {username:?} already exists")))?;
        c.audit(
            "user.create",
            "user",
            &user.id,
            json!({ "username": username, "role": role }),
        )
        .await?;
        c.commit(self).await?;
        Ok(user)
    }

    pub async fn user_credentials(&self, username: &str) -> Result<Option<UserCredentials>> {
        let r = sqlx::query("SELECT * FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        r.map(|r| {
            Ok(UserCredentials {
                user: user_from(&r)?,
                password_hash: col(&r, "password_hash")?,
            })
        })
        .transpose()
    }

    pub async fn user(&self, id: &str) -> Result<User> {
        let r = sqlx::query(concat!(users_with_devices!(), " WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        user_from(&r.ok_or_else(|| StoreError::not_found("user", id))?)
    }

    pub async fn users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(concat!(users_with_devices!(), " ORDER BY username"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_from).collect()
    }

    /// Changes a user's disabled flag, password and/or role. The last enabled owner can be
    /// neither disabled nor demoted. Disabling takes the user's devices off the network (every
    /// map is recomputed without them, and their streams close).
    pub async fn update_user(
        &self,
        actor: &str,
        id: &str,
        disabled: Option<bool>,
        password_hash: Option<&str>,
        role: Option<Role>,
    ) -> Result<User> {
        let mut c = self.begin_change(actor).await?;
        let Some(before) = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(c.conn())
            .await?
        else {
            return Err(StoreError::not_found("user", id));
        };
        let before = user_from(&before)?;
        let demoted = role.is_some_and(|r| r != Role::Owner);
        if before.role == Role::Owner && (disabled == Some(true) || demoted) {
            ensure_other_owner(c.conn(), id).await?;
        }
        if let Some(r) = role.filter(|r| *r != before.role) {
            sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
                .bind(r.as_str())
                .bind(id)
                .execute(c.conn())
                .await?;
            c.audit(
                "user.role",
                "user",
                id,
                json!({ "username": before.username, "from": before.role, "to": r }),
            )
            .await?;
        }
        if let Some(d) = disabled {
            sqlx::query("UPDATE users SET disabled = $1 WHERE id = $2")
                .bind(d as i64)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        if let Some(h) = password_hash {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                .bind(h)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        c.audit(
            "user.update",
            "user",
            id,
            json!({ "username": before.username, "disabled": disabled, "password_changed": password_hash.is_some() }),
        )
        .await?;
        let r = sqlx::query(concat!(users_with_devices!(), " WHERE id = $1"))
            .bind(id)
            .fetch_one(c.conn())
            .await?;
        let u = user_from(&r)?;
        c.commit(self).await?;
        Ok(u)
    }

    /// Deletes a user and the devices they added (the last enabled owner cannot be deleted).
    pub async fn delete_user(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let Some(r) = sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(c.conn())
            .await?
        else {
            return Err(StoreError::not_found("user", id));
        };
        let user = user_from(&r)?;
        if user.role == Role::Owner {
            ensure_other_owner(c.conn(), id).await?;
        }
        let devices = sqlx::query("SELECT id, name FROM peers WHERE user_id = $1 ORDER BY name")
            .bind(id)
            .fetch_all(c.conn())
            .await?;
        for d in &devices {
            let peer: String = col(d, "id")?;
            let name: String = col(d, "name")?;
            c.audit(
                "peer.delete",
                "peer",
                &peer,
                json!({ "name": name, "reason": format!("its user {} was deleted", user.username) }),
            )
            .await?;
        }
        // The devices go with the user (peers.user_id cascades), explicitly for clarity.
        sqlx::query("DELETE FROM peers WHERE user_id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit(
            "user.delete",
            "user",
            id,
            json!({ "username": user.username, "devices_removed": devices.len() }),
        )
        .await?;
        c.commit(self).await
    }

    pub async fn create_token(
        &self,
        actor: &str,
        user_id: &str,
        name: &str,
        token_hash: &str,
        expires_at: Option<Millis>,
    ) -> Result<AccessToken> {
        let mut c = self.begin_change(actor).await?;
        let t = AccessToken {
            id: new_id(),
            user_id: user_id.to_string(),
            name: name.to_string(),
            expires_at,
            created_at: now_millis(),
            last_used_at: None,
        };
        sqlx::query(
            "INSERT INTO access_tokens (id, user_id, name, token_hash, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(user_id)
        .bind(name)
        .bind(token_hash)
        .bind(expires_at)
        .bind(t.created_at)
        .execute(c.conn())
        .await
        .map_err(|e| {
            StoreError::from(e).unique_as(|| format!("you already have a token named {name:?}"))
        })?;
        c.audit(
            "token.create",
            "access_token",
            &t.id,
            json!({ "name": name, "user_id": user_id }),
        )
        .await?;
        c.commit(self).await?;
        Ok(t)
    }

    pub async fn tokens(&self, user_id: &str) -> Result<Vec<AccessToken>> {
        let rows = sqlx::query("SELECT * FROM access_tokens WHERE user_id = $1 ORDER BY name")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token_from).collect()
    }

    pub async fn delete_token(&self, actor: &str, user_id: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let n = sqlx::query("DELETE FROM access_tokens WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(c.conn())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::not_found("access token", id));
        }
        c.audit("token.delete", "access_token", id, json!({}))
            .await?;
        c.commit(self).await
    }

    /// The token and its user for a presented token hash; records the use.
    pub async fn token_by_hash(&self, token_hash: &str) -> Result<Option<(AccessToken, User)>> {
        let Some(r) = sqlx::query("SELECT * FROM access_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let t = token_from(&r)?;
        let user = self.user(&t.user_id).await?;
        sqlx::query("UPDATE access_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now_millis())
            .bind(&t.id)
            .execute(&self.pool)
            .await?;
        Ok(Some((t, user)))
    }
}

/// Refuses to take away the last enabled owner (someone must be able to change roles).
async fn ensure_other_owner(conn: &mut sqlx::AnyConnection, id: &str) -> Result<()> {
    let others: i64 =
        sqlx::query("SELECT COUNT(*) FROM users WHERE id <> $1 AND disabled = $2 AND role = $3")
            .bind(id)
            .bind(0i64)
            .bind(Role::Owner.as_str())
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
    if others == 0 {
        return Err(StoreError::Conflict(
            "this is the last enabled owner; make another user an owner first".into(),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Groups

impl Store {
    pub async fn groups(&self) -> Result<Vec<Group>> {
        let rows = sqlx::query(
            "SELECT g.id, g.name, g.builtin, (SELECT COUNT(*) FROM peer_groups pg WHERE pg.group_id = g.id) AS peers \
             FROM groups g ORDER BY g.builtin DESC, g.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(group_from).collect()
    }

    pub async fn group(&self, id: &str) -> Result<Group> {
        let mut conn = self.pool.acquire().await?;
        read_group(&mut conn, id).await
    }

    pub async fn create_group(&self, actor: &str, name: &str) -> Result<Group> {
        let mut c = self.begin_change(actor).await?;
        let id = new_id();
        sqlx::query("INSERT INTO groups (id, name, builtin) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(name)
            .bind(0i64)
            .execute(c.conn())
            .await
            .map_err(|e| {
                StoreError::from(e).unique_as(|| format!("a group named {name:?} already exists"))
            })?;
        c.audit("group.create", "group", &id, json!({ "name": name }))
            .await?;
        let g = read_group(c.conn(), &id).await?;
        c.commit(self).await?;
        Ok(g)
    }

    /// Sets who is in group `id` (peer ids), replacing its members at once.
    pub async fn set_group_members(
        &self,
        actor: &str,
        id: &str,
        peers: &[String],
    ) -> Result<Group> {
        let mut c = self.begin_change(actor).await?;
        let g = read_group(c.conn(), id).await?;
        if g.builtin {
            return Err(StoreError::invalid(
                "peers",
                format!("every peer is always in {:?}", g.name),
            ));
        }
        let mut members = std::collections::BTreeSet::new();
        for p in peers {
            let known = sqlx::query("SELECT id FROM peers WHERE id = $1")
                .bind(p)
                .fetch_optional(c.conn())
                .await?;
            if known.is_none() {
                return Err(StoreError::invalid(
                    "peers",
                    format!("no peer with id {p:?}"),
                ));
            }
            members.insert(p.as_str());
        }
        sqlx::query("DELETE FROM peer_groups WHERE group_id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        for p in &members {
            sqlx::query("INSERT INTO peer_groups (peer_id, group_id) VALUES ($1, $2)")
                .bind(*p)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        c.audit(
            "group.members",
            "group",
            id,
            json!({ "name": g.name, "peers": members.len() }),
        )
        .await?;
        let g = read_group(c.conn(), id).await?;
        c.commit(self).await?;
        Ok(g)
    }

    pub async fn rename_group(&self, actor: &str, id: &str, name: &str) -> Result<Group> {
        let mut c = self.begin_change(actor).await?;
        let g = read_group(c.conn(), id).await?;
        if g.builtin {
            return Err(StoreError::Conflict(format!(
                "group {:?} is built in and cannot be renamed",
                g.name
            )));
        }
        sqlx::query("UPDATE groups SET name = $1 WHERE id = $2")
            .bind(name)
            .bind(id)
            .execute(c.conn())
            .await
            .map_err(|e| {
                StoreError::from(e).unique_as(|| format!("a group named {name:?} already exists"))
            })?;
        c.audit(
            "group.update",
            "group",
            id,
            json!({ "name": name, "old_name": g.name }),
        )
        .await?;
        let g = read_group(c.conn(), id).await?;
        c.commit(self).await?;
        Ok(g)
    }

    /// Deletes a group that no policy, route or setup key uses (those would silently change).
    pub async fn delete_group(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let g = read_group(c.conn(), id).await?;
        if g.builtin {
            return Err(StoreError::Conflict(format!(
                "group {:?} is built in and cannot be deleted",
                g.name
            )));
        }
        let users = [
            ("SELECT p.name FROM policies p JOIN policy_groups pg ON pg.policy_id = p.id WHERE pg.group_id = $1", "policy"),
            ("SELECT r.network AS name FROM routes r WHERE r.routing_group_id = $1", "route"),
            ("SELECT r.network AS name FROM routes r JOIN route_groups rg ON rg.route_id = r.id WHERE rg.group_id = $1", "route"),
            ("SELECT r.network AS name FROM routes r JOIN route_access_groups ag ON ag.route_id = r.id WHERE ag.group_id = $1", "route"),
            ("SELECT k.name FROM setup_keys k JOIN setup_key_groups kg ON kg.setup_key_id = k.id WHERE kg.group_id = $1", "setup key"),
        ];
        for (sql, what) in users {
            if let Some(r) = sqlx::query(sql).bind(id).fetch_optional(c.conn()).await? {
                let n: String = col(&r, "name")?;
                return Err(StoreError::Conflict(format!(
                    "group {:?} is used by {what} {n:?}",
                    g.name
                )));
            }
        }
        sqlx::query("DELETE FROM groups WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit("group.delete", "group", id, json!({ "name": g.name }))
            .await?;
        c.commit(self).await
    }
}

fn group_from(r: &AnyRow) -> Result<Group> {
    Ok(Group {
        id: col(r, "id")?,
        name: col(r, "name")?,
        builtin: col(r, "builtin")?,
        peers: col(r, "peers")?,
    })
}

async fn read_group(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Group> {
    let r = sqlx::query(
        "SELECT g.id, g.name, g.builtin, (SELECT COUNT(*) FROM peer_groups pg WHERE pg.group_id = g.id) AS peers \
         FROM groups g WHERE g.id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    group_from(&r.ok_or_else(|| StoreError::not_found("group", id))?)
}

// ---------------------------------------------------------------------------------------------
// Setup keys

#[derive(Debug, Clone)]
pub struct NewSetupKey {
    pub name: String,
    pub reusable: bool,
    pub usage_limit: i64,
    pub expires_at: Option<Millis>,
    pub ephemeral: bool,
    pub auto_groups: Vec<String>,
}

impl NewSetupKey {
    /// A reusable key without usage limit or expiry whose peers join `auto_groups`.
    pub fn reusable(name: &str, auto_groups: Vec<String>) -> Self {
        NewSetupKey {
            name: name.to_string(),
            reusable: true,
            usage_limit: 0,
            expires_at: None,
            ephemeral: false,
            auto_groups,
        }
    }
}

pub(crate) async fn setup_key_from(conn: &mut sqlx::AnyConnection, r: &AnyRow) -> Result<SetupKey> {
    let id: String = col(r, "id")?;
    let auto_groups = linked_groups(
        conn,
        "SELECT group_id FROM setup_key_groups WHERE setup_key_id = $1 ORDER BY group_id",
        &id,
    )
    .await?;
    let mut k = SetupKey {
        id,
        name: col(r, "name")?,
        key_prefix: col(r, "key_prefix")?,
        reusable: col(r, "reusable")?,
        usage_limit: col(r, "usage_limit")?,
        used_count: col(r, "used_count")?,
        expires_at: col(r, "expires_at")?,
        ephemeral: col(r, "ephemeral")?,
        revoked: col(r, "revoked")?,
        auto_groups,
        created_at: col(r, "created_at")?,
        last_used_at: col(r, "last_used_at")?,
        state: String::new(),
    };
    k.state = setup_key_state(&k, now_millis()).to_string();
    Ok(k)
}

/// Why a setup key can or cannot admit another peer right now.
pub fn setup_key_state(k: &SetupKey, now: Millis) -> &'static str {
    if k.revoked {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else if (!k.reusable && k.used_count >= 1)
        || (k.usage_limit > 0 && k.used_count >= k.usage_limit)
    {
        "overused"
    } else {
        "valid"
    }
}

impl Store {
    pub async fn create_setup_key(
        &self,
        actor: &str,
        k: &NewSetupKey,
        key_hash: &str,
        key_prefix: &str,
    ) -> Result<SetupKey> {
        let mut c = self.begin_change(actor).await?;
        check_groups(c.conn(), "auto_groups", &k.auto_groups).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO setup_keys (id, name, key_hash, key_prefix, reusable, usage_limit, used_count, expires_at, \
             ephemeral, revoked, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&k.name)
        .bind(key_hash)
        .bind(key_prefix)
        .bind(k.reusable as i64)
        .bind(if k.reusable { k.usage_limit } else { 1 })
        .bind(0i64)
        .bind(k.expires_at)
        .bind(k.ephemeral as i64)
        .bind(0i64)
        .bind(now_millis())
        .execute(c.conn())
        .await?;
        set_links(c.conn(), Links::SetupKey, &id, &k.auto_groups).await?;
        c.audit("setup_key.create", "setup_key", &id, json!({ "name": k.name, "reusable": k.reusable, "usage_limit": k.usage_limit, "ephemeral": k.ephemeral, "auto_groups": k.auto_groups })).await?;
        let key = read_setup_key(c.conn(), &id).await?;
        c.commit(self).await?;
        Ok(key)
    }

    pub async fn setup_keys(&self) -> Result<Vec<SetupKey>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query("SELECT * FROM setup_keys ORDER BY created_at")
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(setup_key_from(&mut conn, r).await?);
        }
        Ok(out)
    }

    pub async fn setup_key(&self, id: &str) -> Result<SetupKey> {
        let mut conn = self.pool.acquire().await?;
        read_setup_key(&mut conn, id).await
    }

    pub async fn update_setup_key(
        &self,
        actor: &str,
        id: &str,
        name: Option<&str>,
        revoked: Option<bool>,
        auto_groups: Option<&[String]>,
        keep: bool,
    ) -> Result<SetupKey> {
        let mut c = self.begin_change(actor).await?;
        let before = read_setup_key(c.conn(), id).await?;
        if keep {
            if setup_key_state(&before, now_millis()) == "expired" {
                return Err(StoreError::invalid(
                    "keep",
                    "this setup key has already expired; create a new one",
                ));
            }
            sqlx::query("UPDATE setup_keys SET expires_at = NULL WHERE id = $1")
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        if before.revoked && revoked == Some(false) {
            return Err(StoreError::invalid(
                "revoked",
                "a revoked setup key cannot be reinstated; create a new one",
            ));
        }
        if let Some(n) = name {
            sqlx::query("UPDATE setup_keys SET name = $1 WHERE id = $2")
                .bind(n)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        if let Some(r) = revoked {
            sqlx::query("UPDATE setup_keys SET revoked = $1 WHERE id = $2")
                .bind(r as i64)
                .bind(id)
                .execute(c.conn())
                .await?;
        }
        if let Some(g) = auto_groups {
            check_groups(c.conn(), "auto_groups", g).await?;
            set_links(c.conn(), Links::SetupKey, id, g).await?;
        }
        c.audit(
            if revoked == Some(true) && !before.revoked {
                "setup_key.revoke"
            } else {
                "setup_key.update"
            },
            "setup_key",
            id,
            json!({ "name": name, "revoked": revoked, "auto_groups": auto_groups, "kept": keep }),
        )
        .await?;
        let k = read_setup_key(c.conn(), id).await?;
        c.commit(self).await?;
        Ok(k)
    }

    pub async fn delete_setup_key(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let k = read_setup_key(c.conn(), id).await?;
        sqlx::query("DELETE FROM setup_keys WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit(
            "setup_key.delete",
            "setup_key",
            id,
            json!({ "name": k.name }),
        )
        .await?;
        c.commit(self).await
    }
}

pub(crate) async fn read_setup_key(conn: &mut sqlx::AnyConnection, id: &str) -> Result<SetupKey> {
    let r = sqlx::query("SELECT * FROM setup_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let r = r.ok_or_else(|| StoreError::not_found("setup key", id))?;
    setup_key_from(conn, &r).await
}

/// A table linking an entity to groups.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Links {
    Peer,
    SetupKey,
    Route,
    RouteAccess,
    User,
}

impl Links {
    fn delete_sql(self) -> &'static str {
        match self {
            Links::Peer => "DELETE FROM peer_groups WHERE peer_id = $1",
            Links::SetupKey => "DELETE FROM setup_key_groups WHERE setup_key_id = $1",
            Links::Route => "DELETE FROM route_groups WHERE route_id = $1",
            Links::RouteAccess => "DELETE FROM route_access_groups WHERE route_id = $1",
            Links::User => "DELETE FROM user_groups WHERE user_id = $1",
        }
    }
    fn insert_sql(self) -> &'static str {
        match self {
            Links::Peer => "INSERT INTO peer_groups (peer_id, group_id) VALUES ($1, $2)",
            Links::SetupKey => {
                "INSERT INTO setup_key_groups (setup_key_id, group_id) VALUES ($1, $2)"
            }
            Links::Route => "INSERT INTO route_groups (route_id, group_id) VALUES ($1, $2)",
            Links::RouteAccess => {
                "INSERT INTO route_access_groups (route_id, group_id) VALUES ($1, $2)"
            }
            Links::User => "INSERT INTO user_groups (user_id, group_id) VALUES ($1, $2)",
        }
    }
}

/// Replaces the group links of `owner`.
pub(crate) async fn set_links(
    conn: &mut sqlx::AnyConnection,
    links: Links,
    owner: &str,
    groups: &[String],
) -> Result<()> {
    sqlx::query(links.delete_sql())
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    let mut seen = std::collections::BTreeSet::new();
    for g in groups.iter().filter(|g| seen.insert(g.as_str())) {
        sqlx::query(links.insert_sql())
            .bind(owner)
            .bind(g)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Policies

#[derive(Debug, Clone)]
pub struct PolicyInput {
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    pub bidirectional: bool,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
}

pub(crate) async fn policy_from(conn: &mut sqlx::AnyConnection, r: &AnyRow) -> Result<Policy> {
    let id: String = col(r, "id")?;
    let rows = sqlx::query(
        "SELECT group_id, side FROM policy_groups WHERE policy_id = $1 ORDER BY group_id",
    )
    .bind(&id)
    .fetch_all(&mut *conn)
    .await?;
    let (mut sources, mut destinations) = (vec![], vec![]);
    for g in &rows {
        let side: String = col(g, "side")?;
        let gid: String = col(g, "group_id")?;
        if side == "src" {
            sources.push(gid)
        } else {
            destinations.push(gid)
        }
    }
    policy_row(r, sources, destinations)
}

/// A policy from its row and its source/destination group ids.
pub(crate) fn policy_row(
    r: &AnyRow,
    sources: Vec<String>,
    destinations: Vec<String>,
) -> Result<Policy> {
    let proto: String = col(r, "protocol")?;
    let ports: String = col(r, "ports")?;
    Ok(Policy {
        id: col(r, "id")?,
        name: col(r, "name")?,
        description: col(r, "description")?,
        enabled: col(r, "enabled")?,
        protocol: proto
            .parse()
            .map_err(|e: String| StoreError::invalid("protocol", e))?,
        ports: ports
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        bidirectional: col(r, "bidirectional")?,
        sources,
        destinations,
        created_at: col(r, "created_at")?,
    })
}

impl Store {
    pub async fn policies(&self) -> Result<Vec<Policy>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query("SELECT * FROM policies ORDER BY name")
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(policy_from(&mut conn, r).await?);
        }
        Ok(out)
    }

    pub async fn policy(&self, id: &str) -> Result<Policy> {
        let mut conn = self.pool.acquire().await?;
        read_policy(&mut conn, id).await
    }

    /// Creates (`id` None) or replaces a policy.
    pub async fn put_policy(
        &self,
        actor: &str,
        id: Option<&str>,
        p: &PolicyInput,
    ) -> Result<Policy> {
        let mut c = self.begin_change(actor).await?;
        check_groups(c.conn(), "sources", &p.sources).await?;
        check_groups(c.conn(), "destinations", &p.destinations).await?;
        let ports = p
            .ports
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let dup = || format!("a policy named {:?} already exists", p.name);
        let before = match id {
            Some(id) => Some(read_policy(c.conn(), id).await?),
            None => None,
        };
        let id = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE policies SET name = $1, description = $2, enabled = $3, protocol = $4, ports = $5, \
                     bidirectional = $6 WHERE id = $7",
                )
                .bind(&p.name)
                .bind(&p.description)
                .bind(p.enabled as i64)
                .bind(p.protocol.as_str())
                .bind(&ports)
                .bind(p.bidirectional as i64)
                .bind(id)
                .execute(c.conn())
                .await
                .map_err(|e| StoreError::from(e).unique_as(dup))?;
                id.to_string()
            }
            None => {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO policies (id, name, description, enabled, protocol, ports, bidirectional, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&id)
                .bind(&p.name)
                .bind(&p.description)
                .bind(p.enabled as i64)
                .bind(p.protocol.as_str())
                .bind(&ports)
                .bind(p.bidirectional as i64)
                .bind(now_millis())
                .execute(c.conn())
                .await
                .map_err(|e| StoreError::from(e).unique_as(dup))?;
                id
            }
        };
        sqlx::query("DELETE FROM policy_groups WHERE policy_id = $1")
            .bind(&id)
            .execute(c.conn())
            .await?;
        for (side, groups) in [("src", &p.sources), ("dst", &p.destinations)] {
            let mut seen = std::collections::BTreeSet::new();
            for g in groups.iter().filter(|g| seen.insert(g.as_str())) {
                sqlx::query(
                    "INSERT INTO policy_groups (policy_id, group_id, side) VALUES ($1, $2, $3)",
                )
                .bind(&id)
                .bind(g)
                .bind(side)
                .execute(c.conn())
                .await?;
            }
        }
        let out = read_policy(c.conn(), &id).await?;
        // A switch flipped reads as what it is; anything else is an update.
        let action = match &before {
            None => "policy.create",
            Some(b)
                if b.enabled != out.enabled
                    && Policy {
                        enabled: out.enabled,
                        ..b.clone()
                    } == out =>
            {
                if out.enabled {
                    "policy.enabled"
                } else {
                    "policy.disabled"
                }
            }
            Some(_) => "policy.update",
        };
        c.audit(action, "policy", &id, json!(out)).await?;
        c.commit(self).await?;
        Ok(out)
    }

    pub async fn delete_policy(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let p = read_policy(c.conn(), id).await?;
        sqlx::query("DELETE FROM policies WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit("policy.delete", "policy", id, json!({ "name": p.name }))
            .await?;
        c.commit(self).await
    }
}

async fn read_policy(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Policy> {
    let r = sqlx::query("SELECT * FROM policies WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let r = r.ok_or_else(|| StoreError::not_found("policy", id))?;
    policy_from(conn, &r).await
}

// ---------------------------------------------------------------------------------------------
// Routes

#[derive(Debug, Clone)]
pub struct RouteInput {
    pub network: IpNet,
    pub description: String,
    pub routing_peer: Option<String>,
    pub routing_group: Option<String>,
    pub metric: i64,
    pub masquerade: bool,
    pub enabled: bool,
    pub groups: Vec<String>,
    pub access_groups: Vec<String>,
    pub open_to_groups: bool,
}

pub(crate) async fn route_from(conn: &mut sqlx::AnyConnection, r: &AnyRow) -> Result<Route> {
    let id: String = col(r, "id")?;
    let groups = linked_groups(
        conn,
        "SELECT group_id FROM route_groups WHERE route_id = $1 ORDER BY group_id",
        &id,
    )
    .await?;
    let access_groups = linked_groups(
        conn,
        "SELECT group_id FROM route_access_groups WHERE route_id = $1 ORDER BY group_id",
        &id,
    )
    .await?;
    let network: String = col(r, "network")?;
    Ok(Route {
        id,
        network: network.parse().map_err(|_| {
            StoreError::invalid(
                "network",
                format!("stored network {network:?} is not a CIDR"),
            )
        })?,
        description: col(r, "description")?,
        routing_peer: col(r, "routing_peer_id")?,
        routing_group: col(r, "routing_group_id")?,
        metric: col(r, "metric")?,
        masquerade: col(r, "masquerade")?,
        enabled: col(r, "enabled")?,
        groups,
        access_groups,
        open_to_groups: col(r, "open_to_groups")?,
        created_at: col(r, "created_at")?,
        serving: String::new(),
        clients: vec![],
    })
}

impl Store {
    pub async fn routes(&self) -> Result<Vec<Route>> {
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query("SELECT * FROM routes ORDER BY network, metric")
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(route_from(&mut conn, r).await?);
        }
        Ok(out)
    }

    pub async fn route(&self, id: &str) -> Result<Route> {
        let mut conn = self.pool.acquire().await?;
        read_route(&mut conn, id).await
    }

    /// Creates (`id` None) or replaces a route. Refused: a network overlapping the overlay range;
    /// a network that overlaps another route without being equal to it (equal networks on
    /// different routing peers are the HA case); the same network twice on the same router.
    pub async fn put_route(&self, actor: &str, id: Option<&str>, r: &RouteInput) -> Result<Route> {
        let mut c = self.begin_change(actor).await?;
        if r.routing_peer.is_some() == r.routing_group.is_some() {
            return Err(StoreError::invalid(
                "routing_peer",
                "give exactly one of routing_peer or routing_group",
            ));
        }
        if let Some(p) = &r.routing_peer {
            let found = sqlx::query("SELECT 1 FROM peers WHERE id = $1")
                .bind(p)
                .fetch_optional(c.conn())
                .await?;
            if found.is_none() {
                return Err(StoreError::invalid(
                    "routing_peer",
                    format!("unknown peer {p:?}"),
                ));
            }
        }
        if let Some(g) = &r.routing_group {
            check_groups(c.conn(), "routing_group", std::slice::from_ref(g)).await?;
        }
        check_groups(c.conn(), "groups", &r.groups).await?;
        check_groups(c.conn(), "access_groups", &r.access_groups).await?;
        let settings = read_settings(c.conn()).await?;
        if nets_overlap(&r.network, &settings.overlay_range) {
            return Err(StoreError::invalid(
                "network",
                format!(
                    "{} overlaps the overlay range {}",
                    r.network, settings.overlay_range
                ),
            ));
        }
        let others = sqlx::query("SELECT * FROM routes")
            .fetch_all(c.conn())
            .await?;
        for o in &others {
            let o = route_from(c.conn(), o).await?;
            if Some(o.id.as_str()) == id || !nets_overlap(&o.network, &r.network) {
                continue;
            }
            if o.network != r.network {
                return Err(StoreError::Conflict(format!(
                    "{} overlaps existing route {} ({}); use the same network for redundant routing peers",
                    r.network, o.network, o.id
                )));
            }
            if o.routing_peer == r.routing_peer && o.routing_group == r.routing_group {
                return Err(StoreError::Conflict(format!(
                    "route {} through the same routing peer already exists ({})",
                    r.network, o.id
                )));
            }
        }
        let id = match id {
            Some(id) => {
                read_route(c.conn(), id).await?;
                sqlx::query(
                    "UPDATE routes SET network = $1, description = $2, routing_peer_id = $3, routing_group_id = $4, \
                     metric = $5, masquerade = $6, enabled = $7, open_to_groups = $8 WHERE id = $9",
                )
                .bind(r.network.to_string())
                .bind(&r.description)
                .bind(r.routing_peer.clone())
                .bind(r.routing_group.clone())
                .bind(r.metric)
                .bind(r.masquerade as i64)
                .bind(r.enabled as i64)
                .bind(r.open_to_groups as i64)
                .bind(id)
                .execute(c.conn())
                .await?;
                id.to_string()
            }
            None => {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO routes (id, network, description, routing_peer_id, routing_group_id, metric, \
                     masquerade, enabled, created_at, open_to_groups) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&id)
                .bind(r.network.to_string())
                .bind(&r.description)
                .bind(r.routing_peer.clone())
                .bind(r.routing_group.clone())
                .bind(r.metric)
                .bind(r.masquerade as i64)
                .bind(r.enabled as i64)
                .bind(now_millis())
                .bind(r.open_to_groups as i64)
                .execute(c.conn())
                .await?;
                id
            }
        };
        set_links(c.conn(), Links::Route, &id, &r.groups).await?;
        set_links(c.conn(), Links::RouteAccess, &id, &r.access_groups).await?;
        let out = read_route(c.conn(), &id).await?;
        c.audit("route.put", "route", &id, json!(out)).await?;
        c.commit(self).await?;
        Ok(out)
    }

    pub async fn delete_route(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let r = read_route(c.conn(), id).await?;
        sqlx::query("DELETE FROM routes WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit("route.delete", "route", id, json!({ "network": r.network }))
            .await?;
        c.commit(self).await
    }
}

async fn read_route(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Route> {
    let r = sqlx::query("SELECT * FROM routes WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let r = r.ok_or_else(|| StoreError::not_found("route", id))?;
    route_from(conn, &r).await
}

// ---------------------------------------------------------------------------------------------
// Audit

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    pub limit: i64,
    /// Only events about this object (its id).
    pub target: Option<String>,
}

impl Store {
    /// Newest first. `action` matches a prefix ("peer." matches all peer events).
    pub async fn audit_events(&self, f: &AuditFilter) -> Result<Vec<AuditEvent>> {
        let rows = sqlx::query(
            "SELECT * FROM audit_events WHERE ($1 = '' OR actor = $2 OR actor LIKE $8) \
             AND ($3 = '' OR action LIKE $4) \
             AND created_at >= $5 AND created_at <= $6 AND ($9 = '' OR target_id = $10) \
             ORDER BY id DESC LIMIT $7",
        )
        .bind(f.actor.clone().unwrap_or_default())
        .bind(f.actor.clone().unwrap_or_default())
        .bind(f.action.clone().unwrap_or_default())
        .bind(format!(
            "{}%",
            f.action.clone().unwrap_or_default().replace('%', "")
        ))
        .bind(f.since.unwrap_or(0))
        .bind(f.until.unwrap_or(i64::MAX))
        .bind(f.limit.clamp(1, 1000))
        // "user:anna" also finds "user:anna (token ci)" and "user:anna (sso)".
        .bind(format!(
            "{} (%",
            f.actor.clone().unwrap_or_default().replace('%', "")
        ))
        .bind(f.target.clone().unwrap_or_default())
        .bind(f.target.clone().unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = col(r, "detail")?;
                Ok(AuditEvent {
                    id: col(r, "id")?,
                    created_at: col(r, "created_at")?,
                    actor: col(r, "actor")?,
                    action: col(r, "action")?,
                    target_type: col(r, "target_type")?,
                    target_id: col(r, "target_id")?,
                    detail: serde_json::from_str(&detail)
                        .unwrap_or(serde_json::Value::String(detail)),
                })
            })
            .collect()
    }
}
