//! Admin sign-in sessions and the accounts of admins that sign in through OIDC.

use super::{user_from, Result, Store, StoreError};
use crate::model::{new_id, Millis, Role, User};
use serde_json::json;

/// How a session was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInMethod {
    Password,
    Oidc,
}

impl SignInMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            SignInMethod::Password => "password",
            SignInMethod::Oidc => "oidc",
        }
    }
}

impl Store {
    /// Opens a session for `user_id` until `expires_at`; returns its id (the JWT's `sid`).
    pub async fn create_session(
        &self,
        user: &User,
        method: SignInMethod,
        now: Millis,
        expires_at: Millis,
    ) -> Result<String> {
        let mut c = self.begin_quiet(&format!("user:{}", user.username)).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO admin_sessions (id, user_id, method, created_at, expires_at, revoked) \
             VALUES ($1, $2, $3, $4, $5, 0)",
        )
        .bind(&id)
        .bind(&user.id)
        .bind(method.as_str())
        .bind(now)
        .bind(expires_at)
        .execute(c.conn())
        .await?;
        // Expired sessions are swept here, so the table stays as small as the live sessions.
        sqlx::query("DELETE FROM admin_sessions WHERE expires_at < $1")
            .bind(now)
            .execute(c.conn())
            .await?;
        c.audit(
            "auth.login",
            "user",
            &user.id,
            json!({ "method": method.as_str() }),
        )
        .await?;
        c.commit(self).await?;
        Ok(id)
    }

    /// The user of a live session (not revoked, not expired), if any.
    pub async fn session_user(&self, session_id: &str, now: Millis) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.* FROM admin_sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.id = $1 AND s.revoked = 0 AND s.expires_at > $2",
        )
        .bind(session_id)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(user_from).transpose()
    }

    /// Ends a session (sign-out); ending an already ended session is not an error.
    pub async fn revoke_session(&self, actor: &str, user_id: &str, session_id: &str) -> Result<()> {
        let mut c = self.begin_quiet(actor).await?;
        sqlx::query("UPDATE admin_sessions SET revoked = 1 WHERE id = $1 AND user_id = $2")
            .bind(session_id)
            .bind(user_id)
            .execute(c.conn())
            .await?;
        c.audit("auth.logout", "user", user_id, json!({})).await?;
        c.commit(self).await
    }

    /// Ends every session of a user except `keep` (after a password change or when disabled).
    pub async fn revoke_user_sessions(&self, user_id: &str, keep: Option<&str>) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE admin_sessions SET revoked = 1 WHERE user_id = $1 AND id <> $2 AND revoked = 0",
        )
        .bind(user_id)
        .bind(keep.unwrap_or(""))
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// The account linked to an OIDC subject, created on its first sign-in. Its username is the
    /// preferred name, suffixed when a (local) account already has that name; it has no password.
    ///
    /// `role` is what the provider's claims grant: a new account gets it; an existing admin or
    /// user follows it (the provider is the source of truth for who administers), while owners
    /// and auditors, which only an owner assigns in Tern, keep theirs.
    pub async fn oidc_user(&self, subject: &str, preferred_name: &str, role: Role) -> Result<User> {
        let find = "SELECT * FROM users WHERE oidc_subject = $1";
        if let Some(r) = sqlx::query(find)
            .bind(subject)
            .fetch_optional(self.pool())
            .await?
        {
            let user = user_from(&r)?;
            return self.follow_provider_role(user, role).await;
        }
        let mut c = self.begin_quiet("system").await?;
        if let Some(r) = sqlx::query(find)
            .bind(subject)
            .fetch_optional(c.conn())
            .await?
        {
            drop(c);
            let user = user_from(&r)?;
            return self.follow_provider_role(user, role).await;
        }
        let base: String = preferred_name.chars().take(60).collect();
        let mut username = base.clone();
        for n in 2.. {
            let taken = sqlx::query("SELECT 1 FROM users WHERE username = $1")
                .bind(&username)
                .fetch_optional(c.conn())
                .await?;
            if taken.is_none() {
                break;
            }
            if n > 1000 {
                return Err(StoreError::Conflict(format!(
                    "no free username for {preferred_name:?}"
                )));
            }
            username = format!("{base}-{n}");
        }
        let user = User {
            id: new_id(),
            username,
            disabled: false,
            created_at: crate::model::now_millis(),
            source: "oidc".into(),
            role,
            devices: None,
        };
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, disabled, created_at, oidc_subject, role) \
             VALUES ($1, $2, $3, 0, $4, $5, $6)",
        )
        .bind(&user.id)
        .bind(&user.username)
        // Not a PHC string: no password ever verifies against it.
        .bind("!oidc")
        .bind(user.created_at)
        .bind(subject)
        .bind(role.as_str())
        .execute(c.conn())
        .await?;
        c.audit(
            "user.create",
            "user",
            &user.id,
            json!({ "username": user.username, "source": "oidc", "role": role }),
        )
        .await?;
        c.commit(self).await?;
        Ok(user)
    }

    /// An SSO admin whose provider no longer grants admin becomes a user, and the other way
    /// round; owners and auditors keep the role an owner gave them.
    async fn follow_provider_role(&self, user: User, role: Role) -> Result<User> {
        let follows = matches!(user.role, Role::Admin | Role::User);
        if !follows || user.role == role || !matches!(role, Role::Admin | Role::User) {
            return Ok(user);
        }
        let mut c = self.begin_quiet("system").await?;
        sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(&user.id)
            .execute(c.conn())
            .await?;
        c.audit(
            "user.role",
            "user",
            &user.id,
            json!({ "username": user.username, "from": user.role, "to": role, "by": "identity provider claim" }),
        )
        .await?;
        c.commit(self).await?;
        Ok(User { role, ..user })
    }
}
