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

#[cfg(test)]
mod tests {
    use super::*;

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
