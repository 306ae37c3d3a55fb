//! crypto_box (X25519 + XSalsa20-Poly1305) between two WireGuard keys. Opening a message proves
//! the sender holds the private half of `sender_public_key`: this is the agent's key proof towards
//! management, and the end-to-end envelope for ICE offers/answers/candidates sent through signal.

use crate::keys::{PublicKey, SecretKey};
use crate::management::SealedMessage;
use crypto_box::aead::{Aead, AeadCore};
use crypto_box::SalsaBox;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed message has a malformed sender key: {0}")]
    SenderKey(#[from] crate::keys::KeyError),
    #[error("sealed message nonce must be 24 bytes, got {0}")]
    Nonce(usize),
    #[error("sealed message could not be opened (wrong key or tampered)")]
    Open,
    #[error("sealing failed")]
    Seal,
}

/// Seals `plaintext` from `sender` to `recipient`.
pub fn seal(
    sender: &SecretKey,
    recipient: &PublicKey,
    plaintext: &[u8],
) -> Result<SealedMessage, SealError> {
    let b = SalsaBox::new(&crypto_box::PublicKey::from(recipient.0), sender.inner());
    let nonce = SalsaBox::generate_nonce(&mut rand::rngs::OsRng);
    let ciphertext = b.encrypt(&nonce, plaintext).map_err(|_| SealError::Seal)?;
    Ok(SealedMessage {
        sender_public_key: sender.public_key().0.to_vec(),
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

/// Opens a message sealed to `recipient`; returns the authenticated sender key and the plaintext.
pub fn open(recipient: &SecretKey, msg: &SealedMessage) -> Result<(PublicKey, Vec<u8>), SealError> {
    let sender = PublicKey::from_slice(&msg.sender_public_key)?;
    let nonce: [u8; 24] = msg
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Nonce(msg.nonce.len()))?;
    let b = SalsaBox::new(&crypto_box::PublicKey::from(sender.0), recipient.inner());
    let plain = b
        .decrypt(&nonce.into(), msg.ciphertext.as_slice())
        .map_err(|_| SealError::Open)?;
    Ok((sender, plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_message_opens_only_for_recipient_and_names_sender() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let c = SecretKey::generate();
        let m = seal(&a, &b.public_key(), b"hello").expect("seal");
        let (sender, plain) = open(&b, &m).expect("open");
        assert_eq!(sender, a.public_key());
        assert_eq!(plain, b"hello");
        assert_eq!(open(&c, &m), Err(SealError::Open));
    }

    #[test]
    fn claiming_another_sender_key_fails() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let victim = SecretKey::generate();
        let mut m = seal(&a, &b.public_key(), b"x").expect("seal");
        m.sender_public_key = victim.public_key().0.to_vec();
        assert_eq!(open(&b, &m), Err(SealError::Open));
    }

    #[test]
    fn malformed_fields_are_errors_not_panics() {
        let b = SecretKey::generate();
        let m = SealedMessage {
            sender_public_key: vec![1; 5],
            nonce: vec![],
            ciphertext: vec![],
        };
        assert!(matches!(open(&b, &m), Err(SealError::SenderKey(_))));
        let m = SealedMessage {
            sender_public_key: vec![1; 32],
            nonce: vec![0; 3],
            ciphertext: vec![],
        };
        assert_eq!(open(&b, &m), Err(SealError::Nonce(3)));
    }
}
