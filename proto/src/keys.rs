//! X25519 keys as WireGuard uses them: 32 bytes, shown as standard base64.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
}

/// A WireGuard (X25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_slice(b: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| KeyError::Length(b.len()))?;
        Ok(Self(arr))
    }
    /// Standard base64, as `wg` prints keys.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let b = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        Self::from_slice(&b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        Self::from_slice(&b)
    }
}

/// A WireGuard (X25519) private key. `Debug` never shows the key.
#[derive(Clone)]
pub struct SecretKey(crypto_box::SecretKey);

impl SecretKey {
    pub fn generate() -> Self {
        Self(crypto_box::SecretKey::generate(&mut rand::rngs::OsRng))
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(crypto_box::SecretKey::from(b))
    }
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let b = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        let arr: [u8; 32] = b
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(b.len()))?;
        Ok(Self::from_bytes(arr))
    }
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    /// Standard base64, as `wg` prints private keys. Handle with care: this is the secret.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.0.public_key().as_bytes())
    }
    pub(crate) fn inner(&self) -> &crypto_box::SecretKey {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_through_base64() {
        let sk = SecretKey::generate();
        let pk = sk.public_key();
        let parsed: PublicKey = pk.to_base64().parse().expect("parse");
        assert_eq!(parsed, pk);
        let sk2 = SecretKey::from_base64(&sk.to_base64()).expect("parse secret");
        assert_eq!(sk2.public_key(), pk);
    }

    #[test]
    fn bad_keys_are_rejected_with_reason() {
        assert_eq!("!!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
    }

    #[test]
    fn secret_debug_is_redacted() {
        let sk = SecretKey::generate();
        let shown = format!("{sk:?}");
        assert!(!shown.contains(&sk.to_base64()));
        assert!(shown.contains("redacted"));
    }
}
