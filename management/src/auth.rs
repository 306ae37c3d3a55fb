//! Admin authentication: argon2 password hashes, admin session JWTs, personal access tokens, and
//! the random secrets (setup keys, tokens) handed out once and stored hashed.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

pub const ADMIN_AUDIENCE: &str = "tern-admin";
/// Prefix of personal access tokens, so they are recognisable (and scannable) in leaked text.
pub const PAT_PREFIX: &str = "tern_pat_";
pub const SETUP_KEY_PREFIX: &str = "tern_sk_";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed")]
    Hash,
    #[error("session token is invalid or expired")]
    BadToken,
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AuthError::Hash)
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so timing does not reveal usernames.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not-a-real-password").unwrap_or_default())
}

/// `prefix` + 32 random base62 characters (~190 bits).
pub fn random_secret(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminClaims {
    /// User id.
    pub sub: String,
    pub name: String,
    /// Session id: the session must still be live in the store (sign-out ends it).
    pub sid: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

pub fn issue_admin_token(
    secret: &[u8],
    user_id: &str,
    name: &str,
    sid: &str,
    now: i64,
    ttl: i64,
) -> Result<(String, i64), AuthError> {
    let claims = AdminClaims {
        sub: user_id.into(),
        name: name.into(),
        sid: sid.into(),
        aud: ADMIN_AUDIENCE.into(),
        iat: now,
        exp: now + ttl,
    };
    let t = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| AuthError::BadToken)?;
    Ok((t, now + ttl))
}

/// True if `token` is one of ours (HS256), as opposed to an identity provider's token.
pub fn is_admin_token(token: &str) -> bool {
    jsonwebtoken::decode_header(token).is_ok_and(|h| h.alg == Algorithm::HS256)
}

pub fn verify_admin_token(secret: &[u8], token: &str) -> Result<AdminClaims, AuthError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[ADMIN_AUDIENCE]);
    v.leeway = 5;
    decode::<AdminClaims>(token, &DecodingKey::from_secret(secret), &v)
        .map(|d| d.claims)
        .map_err(|_| AuthError::BadToken)
}

/// Password guessing brake (pure state machine; the caller passes the clock): after
/// [`SignInThrottle::MAX_FAILURES`] failed sign-ins for one username within
/// [`SignInThrottle::WINDOW`], that username is locked for [`SignInThrottle::LOCK`] — checked
/// before the (deliberately slow) password hash runs.
#[derive(Default)]
pub struct SignInThrottle {
    entries: std::collections::HashMap<String, Attempts>,
}

#[derive(Clone, Copy)]
struct Attempts {
    failures: u32,
    first: std::time::Instant,
    locked_until: Option<std::time::Instant>,
}

impl SignInThrottle {
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(300);
    pub const LOCK: std::time::Duration = std::time::Duration::from_secs(300);
    /// Entries kept at most (old ones are dropped first).
    const MAX_ENTRIES: usize = 10_000;

    fn key(username: &str) -> String {
        username.trim().to_lowercase().chars().take(64).collect()
    }

    /// Err(wait) while the username is locked.
    pub fn check(
        &self,
        username: &str,
        now: std::time::Instant,
    ) -> Result<(), std::time::Duration> {
        match self
            .entries
            .get(&Self::key(username))
            .and_then(|a| a.locked_until)
        {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn failed(&mut self, username: &str, now: std::time::Instant) {
        if self.entries.len() >= Self::MAX_ENTRIES {
            self.entries.retain(|_, a| {
                now.duration_since(a.first) < Self::WINDOW
                    || a.locked_until.is_some_and(|u| u > now)
            });
        }
        let a = self.entries.entry(Self::key(username)).or_insert(Attempts {
            failures: 0,
            first: now,
            locked_until: None,
        });
        if now.duration_since(a.first) >= Self::WINDOW || a.locked_until.is_some_and(|u| u <= now) {
            *a = Attempts {
                failures: 0,
                first: now,
                locked_until: None,
            };
        }
        a.failures += 1;
        if a.failures >= Self::MAX_FAILURES {
            a.locked_until = Some(now + Self::LOCK);
        }
    }

    pub fn succeeded(&mut self, username: &str) {
        self.entries.remove(&Self::key(username));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_the_username_for_a_while() {
        let t0 = std::time::Instant::now();
        let mut t = SignInThrottle::default();
        for i in 0..4 {
            t.failed("Admin", t0 + std::time::Duration::from_secs(i));
            assert!(
                t.check("admin", t0).is_ok(),
                "not locked after {} failures",
                i + 1
            );
        }
        t.failed(" admin ", t0 + std::time::Duration::from_secs(10));
        let wait = t
            .check("ADMIN", t0 + std::time::Duration::from_secs(10))
            .expect_err("locked");
        assert_eq!(wait, SignInThrottle::LOCK);
        assert!(t.check("other", t0).is_ok(), "other names are not affected");
        let later = t0 + std::time::Duration::from_secs(10) + SignInThrottle::LOCK;
        assert!(t.check("admin", later).is_ok(), "lock ends");
        // After the lock, counting starts again.
        t.failed("admin", later);
        assert!(t.check("admin", later).is_ok());
        // Failures spread beyond the window never lock.
        let mut t = SignInThrottle::default();
        for i in 0..10 {
            t.failed("slow", t0 + SignInThrottle::WINDOW * i);
        }
        assert!(t.check("slow", t0 + SignInThrottle::WINDOW * 10).is_ok());
        // Success clears the count.
        let mut t = SignInThrottle::default();
        for _ in 0..4 {
            t.failed("x", t0);
        }
        t.succeeded("x");
        t.failed("x", t0);
        assert!(t.check("x", t0).is_ok());
    }

    #[test]
    fn password_hash_verifies_only_the_right_password() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let a = random_secret(SETUP_KEY_PREFIX);
        let b = random_secret(SETUP_KEY_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("tern_sk_") && a.len() == 8 + 32);
    }

    #[test]
    fn admin_tokens_are_not_peer_tokens() {
        let (t, _) =
            issue_admin_token(b"k", "u1", "admin", "s1", 2_000_000_000, 60).expect("issue");
        assert_eq!(verify_admin_token(b"k", &t).expect("ok").sub, "u1");
        assert!(verify_admin_token(b"other", &t).is_err());
        let key = tern_proto::SecretKey::generate().public_key();
        let (peer, _) =
            tern_proto::token::issue_peer_token(b"k", "p", &key, 2_000_000_000, 60).expect("peer");
        assert!(verify_admin_token(b"k", &peer).is_err(), "audience differs");
    }
}
