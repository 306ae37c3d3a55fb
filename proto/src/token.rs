//! Peer tokens: short-lived JWTs that management issues at login and that the sync stream and the
//! signal service accept. HS256 with a secret shared by management and signal (in `tern-server`
//! they are one process; a split deployment passes the same `TERN_PEER_TOKEN_SECRET` to both).

use crate::keys::PublicKey;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Audience of peer tokens; admin tokens use another, so one is never accepted as the other.
pub const PEER_AUDIENCE: &str = "tern-peer";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerClaims {
    /// Peer id.
    pub sub: String,
    /// WireGuard public key (base64).
    pub key: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("peer token is invalid or expired: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("peer token names a malformed key")]
    Key,
}

/// An authenticated peer, as read from a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub peer_id: String,
    pub key: PublicKey,
    /// When the token was issued (Unix seconds): revocations refuse tokens issued before them.
    pub issued_at: i64,
}

pub fn issue_peer_token(
    secret: &[u8],
    peer_id: &str,
    key: &PublicKey,
    now_unix: i64,
    ttl_secs: i64,
) -> Result<(String, i64), TokenError> {
    let exp = now_unix + ttl_secs;
    let claims = PeerClaims {
        sub: peer_id.to_string(),
        key: key.to_base64(),
        aud: PEER_AUDIENCE.to_string(),
        iat: now_unix,
        exp,
    };
    let t = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?;
    Ok((t, exp))
}

pub fn verify_peer_token(secret: &[u8], token: &str) -> Result<PeerIdentity, TokenError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[PEER_AUDIENCE]);
    v.leeway = 5;
    let data = decode::<PeerClaims>(token, &DecodingKey::from_secret(secret), &v)?;
    let key: PublicKey = data.claims.key.parse().map_err(|_| TokenError::Key)?;
    Ok(PeerIdentity {
        peer_id: data.claims.sub,
        key,
        issued_at: data.claims.iat,
    })
}

/// Audience of the tokens management presents to a separate signal service's `Revoke`.
pub const REVOKE_AUDIENCE: &str = "tern-signal-revoke";

#[derive(Debug, Serialize, Deserialize)]
struct RevokeClaims {
    aud: String,
    iat: i64,
    exp: i64,
}

/// A one-minute token for `Revoke`, signed with the shared peer-token secret.
pub fn issue_revoke_token(secret: &[u8], now_unix: i64) -> Result<String, TokenError> {
    let claims = RevokeClaims {
        aud: REVOKE_AUDIENCE.to_string(),
        iat: now_unix,
        exp: now_unix + 60,
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

pub fn verify_revoke_token(secret: &[u8], token: &str) -> Result<(), TokenError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[REVOKE_AUDIENCE]);
    v.leeway = 5;
    decode::<RevokeClaims>(token, &DecodingKey::from_secret(secret), &v)?;
    Ok(())
}

/// Reads `authorization: Bearer <token>` from gRPC metadata.
pub fn bearer(meta: &tonic::metadata::MetadataMap) -> Option<&str> {
    meta.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    #[test]
    fn token_round_trip_and_refusals() {
        let key = SecretKey::generate().public_key();
        let t0 = now();
        let (t, _) = issue_peer_token(b"secret", "p1", &key, t0, 60).expect("issue");
        let id = verify_peer_token(b"secret", &t).expect("verify");
        assert_eq!(
            id,
            PeerIdentity {
                peer_id: "p1".into(),
                key,
                issued_at: t0,
            }
        );
        assert!(verify_peer_token(b"other", &t).is_err(), "wrong secret");
        let (old, _) = issue_peer_token(b"secret", "p1", &key, now() - 3600, 60).expect("issue");
        assert!(verify_peer_token(b"secret", &old).is_err(), "expired");
        assert!(verify_peer_token(b"secret", "garbage").is_err());
    }

    #[test]
    fn revoke_tokens_and_peer_tokens_are_not_interchangeable() {
        let r = issue_revoke_token(b"secret", now()).expect("issue");
        assert!(verify_revoke_token(b"secret", &r).is_ok());
        assert!(verify_revoke_token(b"other", &r).is_err(), "wrong secret");
        assert!(
            verify_peer_token(b"secret", &r).is_err(),
            "not a peer token"
        );
        let key = SecretKey::generate().public_key();
        let (p, _) = issue_peer_token(b"secret", "p1", &key, now(), 60).expect("issue");
        assert!(
            verify_revoke_token(b"secret", &p).is_err(),
            "a peer cannot revoke"
        );
        let old = issue_revoke_token(b"secret", now() - 3600).expect("issue");
        assert!(verify_revoke_token(b"secret", &old).is_err(), "expired");
    }
}
