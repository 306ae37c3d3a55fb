//! Time-limited relay credentials in coturn's `use-auth-secret` form (the "TURN REST API"
//! draft-uberti-behave-turn-rest-00): `username = "<expiry-unix>:<peer-id>"`,
//! `password = base64(HMAC-SHA1(secret, username))`. The TCP/TLS relay token uses the same form.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

#[derive(Clone, PartialEq, Eq)]
pub struct RelayCredentials {
    pub username: String,
    pub password: String,
    pub expires_unix: i64,
}

impl std::fmt::Debug for RelayCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("expires_unix", &self.expires_unix)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("username is not of the form <expiry>:<id>")]
    Malformed,
    #[error("credentials expired at {0}")]
    Expired(i64),
    #[error("wrong password")]
    BadPassword,
}

/// The password for `username` under `secret`.
pub fn password_for(secret: &[u8], username: &str) -> String {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha1::new_from_slice(secret).unwrap_or_else(|_| unreachable!("hmac key"));
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Issues credentials for `peer_id` that expire at `expires_unix`.
pub fn issue(secret: &[u8], peer_id: &str, expires_unix: i64) -> RelayCredentials {
    let username = format!("{expires_unix}:{peer_id}");
    let password = password_for(secret, &username);
    RelayCredentials {
        username,
        password,
        expires_unix,
    }
}

/// Checks `username` (expiry, form) and returns the peer id it names. The password check is
/// separate because TURN verifies a message integrity derived from it rather than the password.
pub fn check_username(username: &str, now_unix: i64) -> Result<(i64, &str), CredentialError> {
    let (exp, id) = username.split_once(':').ok_or(CredentialError::Malformed)?;
    let exp: i64 = exp.parse().map_err(|_| CredentialError::Malformed)?;
    if id.is_empty() {
        return Err(CredentialError::Malformed);
    }
    if exp < now_unix {
        return Err(CredentialError::Expired(exp));
    }
    Ok((exp, id))
}

/// Verifies a username/password pair; returns the peer id.
pub fn verify<'a>(
    secret: &[u8],
    username: &'a str,
    password: &str,
    now_unix: i64,
) -> Result<&'a str, CredentialError> {
    let (_, id) = check_username(username, now_unix)?;
    let expected = password_for(secret, username);
    use subtle::ConstantTimeEq;
    let ok: bool = expected.as_bytes().ct_eq(password.as_bytes()).into();
    if !ok {
        return Err(CredentialError::BadPassword);
    }
    Ok(id)
}

/// A token for a relay's `GET /load` (management's only): `<expiry>:<password>`, the password
/// being the HMAC of `load:<expiry>`, a message no relay credential signs (their usernames start
/// with a digit). So it opens nothing else (TURN, the TCP relay), and no peer's credential opens
/// `/load`.
pub fn load_token(secret: &[u8], expires_unix: i64) -> String {
    format!(
        "{expires_unix}:{}",
        password_for(secret, &format!("load:{expires_unix}"))
    )
}

/// Checks a [`load_token`].
pub fn verify_load_token(secret: &[u8], token: &str, now_unix: i64) -> Result<(), CredentialError> {
    verify_management_token(secret, "load", token, now_unix)
}

/// A token for a relay's `POST /revoke` (management's only), made like [`load_token`] for the
/// purpose `revoke`: neither opens the other.
pub fn revoke_token(secret: &[u8], expires_unix: i64) -> String {
    format!(
        "{expires_unix}:{}",
        password_for(secret, &format!("revoke:{expires_unix}"))
    )
}

/// Checks a [`revoke_token`].
pub fn verify_revoke_token(
    secret: &[u8],
    token: &str,
    now_unix: i64,
) -> Result<(), CredentialError> {
    verify_management_token(secret, "revoke", token, now_unix)
}

fn verify_management_token(
    secret: &[u8],
    purpose: &str,
    token: &str,
    now_unix: i64,
) -> Result<(), CredentialError> {
    let (exp, password) = token.split_once(':').ok_or(CredentialError::Malformed)?;
    let exp: i64 = exp.parse().map_err(|_| CredentialError::Malformed)?;
    if exp < now_unix {
        return Err(CredentialError::Expired(exp));
    }
    use subtle::ConstantTimeEq;
    let expected = password_for(secret, &format!("{purpose}:{exp}"));
    let ok: bool = expected.as_bytes().ct_eq(password.as_bytes()).into();
    if ok {
        Ok(())
    } else {
        Err(CredentialError::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_tokens_open_only_load_and_relay_credentials_never_open_it() {
        let r = revoke_token(b"s3cret", 1_000);
        assert_eq!(verify_revoke_token(b"s3cret", &r, 999), Ok(()));
        assert!(
            verify_load_token(b"s3cret", &r, 999).is_err(),
            "a revoke token is not a load token"
        );
        assert!(verify_revoke_token(b"s3cret", &load_token(b"s3cret", 1_000), 999).is_err());
        let t = load_token(b"s3cret", 1_000);
        assert_eq!(verify_load_token(b"s3cret", &t, 999), Ok(()));
        assert!(verify_load_token(b"s3cret", &t, 1_001).is_err(), "expired");
        assert!(
            verify_load_token(b"other", &t, 999).is_err(),
            "another secret"
        );
        // A peer's relay credential, presented as a load token, is refused; and the load token
        // is no relay credential.
        let c = issue(b"s3cret", "peer-1", 1_000);
        assert!(verify_load_token(b"s3cret", &format!("1000:{}", c.password), 999).is_err());
        let (exp, pass) = t.split_once(':').expect("token");
        assert!(verify(b"s3cret", &format!("{exp}:load"), pass, 999).is_err());
    }

    #[test]
    fn matches_hmac_sha1_reference() {
        // Expected value computed independently with Python's hmac/hashlib (HMAC-SHA1, base64).
        assert_eq!(
            password_for(b"north", "1433166483:ninefingers"),
            "HSpPEXkcJsPEbYtSnhGxv0Bekgk="
        );
        assert_ne!(
            password_for(b"south", "1433166483:ninefingers"),
            "HSpPEXkcJsPEbYtSnhGxv0Bekgk="
        );
    }

    #[test]
    fn issued_credentials_verify_until_expiry() {
        let c = issue(b"s3cret", "peer-1", 1_000);
        assert_eq!(
            verify(b"s3cret", &c.username, &c.password, 999),
            Ok("peer-1")
        );
        assert_eq!(
            verify(b"s3cret", &c.username, &c.password, 1_001),
            Err(CredentialError::Expired(1_000))
        );
        assert_eq!(
            verify(b"other", &c.username, &c.password, 999),
            Err(CredentialError::BadPassword)
        );
        assert_eq!(
            verify(b"s3cret", "nocolon", "x", 0),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            verify(b"s3cret", "12:", "x", 0),
            Err(CredentialError::Malformed)
        );
        assert!(!format!("{c:?}").contains(&c.password));
    }
}
