//! First start: an admin account and a reusable setup key, returned once so the binary can print
//! them (they are stored hashed and can never be shown again). The key expires after
//! [`FIRST_KEY_TTL`] unless an admin lifts the expiry (console: Setup keys → Never expire): a
//! key printed in a log must not stay a way in for good.

use crate::auth::{self, SETUP_KEY_PREFIX};
use crate::store::{hash_secret, NewSetupKey, Store, StoreError};

/// How long the setup key made at first start works, unless an admin keeps it.
pub const FIRST_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct FirstStart {
    pub admin_user: String,
    /// Present when the password was generated (not given through TERN_ADMIN_PASSWORD).
    pub generated_password: Option<String>,
    pub setup_key: String,
}

/// Creates the first admin and a default setup key if the database has no user yet.
pub async fn first_start(
    store: &Store,
    admin_user: &str,
    admin_password: Option<&str>,
) -> Result<Option<FirstStart>, StoreError> {
    if store.user_count().await? > 0 {
        return Ok(None);
    }
    let generated = admin_password.is_none().then(|| auth::random_secret(""));
    let password = admin_password
        .map(str::to_string)
        .or_else(|| generated.clone())
        .unwrap_or_default();
    if password.chars().count() < 10 {
        return Err(StoreError::invalid(
            "admin_password",
            "TERN_ADMIN_PASSWORD must be at least 10 characters",
        ));
    }
    let hash = auth::hash_password(&password)
        .map_err(|e| StoreError::invalid("admin_password", e.to_string()))?;
    let key = auth::random_secret(SETUP_KEY_PREFIX);
    let new = NewSetupKey {
        expires_at: Some(crate::model::now_millis() + FIRST_KEY_TTL.as_millis() as i64),
        ..NewSetupKey::reusable("default", vec![])
    };
    let prefix: String = key.chars().take(SETUP_KEY_PREFIX.len() + 4).collect();
    store
        .create_setup_key("system", &new, &hash_secret(&key), &prefix)
        .await?;
    // Without a policy nobody sees anybody; like NetBird, start with everyone connected to everyone.
    let p = crate::store::PolicyInput {
        name: "default".into(),
        description: "All peers can reach each other (created at first start; narrow it down)"
            .into(),
        enabled: true,
        protocol: crate::model::Protocol::Any,
        ports: vec![],
        bidirectional: true,
        sources: vec![crate::model::ALL_GROUP_ID.into()],
        destinations: vec![crate::model::ALL_GROUP_ID.into()],
    };
    if store.policies().await?.is_empty() {
        store.put_policy("system", None, &p).await?;
    }
    // Last: an existing user marks the first start as done.
    store
        .create_user("system", admin_user, &hash, crate::model::Role::Owner)
        .await?;
    Ok(Some(FirstStart {
        admin_user: admin_user.to_string(),
        generated_password: generated,
        setup_key: key,
    }))
}
