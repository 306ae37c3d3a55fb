//! Peers whose relay access ended before their credentials did (removed, login expired, user
//! disabled): management says so, and their credentials issued until then are refused — new
//! TURN requests and TCP-relay connections — while what they hold open is closed
//! ([`crate::Relay::revoke`]). A credential's only dates are its expiry, so a revocation names the
//! latest expiry it covers: management passes "now + its credential lifetime", which every
//! credential issued before now falls under and none issued after (a peer that signs in again
//! gets later ones).

use std::collections::HashMap;
use std::sync::Mutex;

/// Revoked peers and the latest credential expiry each revocation covers (pure; the caller
/// passes the clock).
#[derive(Default)]
pub struct Revoked {
    peers: Mutex<HashMap<String, i64>>,
}

impl Revoked {
    /// Entries kept at most; past that the ones covering the nearest expiry go first (their
    /// credentials are the closest to lapsing anyway).
    const MAX: usize = 100_000;

    /// Credentials of `peer_id` expiring at or before `expiring_by` are refused from now on.
    pub fn revoke(&self, peer_id: &str, expiring_by: i64, now: i64) {
        let mut m = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, by| *by >= now);
        if m.len() >= Self::MAX {
            if let Some(k) = m.iter().min_by_key(|(_, by)| **by).map(|(k, _)| k.clone()) {
                m.remove(&k);
            }
        }
        let by = m.entry(peer_id.to_string()).or_insert(expiring_by);
        *by = (*by).max(expiring_by);
    }

    /// Whether a credential of `peer_id` expiring at `expires` is revoked.
    pub fn refuses(&self, peer_id: &str, expires: i64) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer_id)
            .is_some_and(|by| expires <= *by)
    }

    /// Whether a credential username (`<expiry>:<peer-id>`) is revoked.
    pub fn refuses_username(&self, username: &str) -> bool {
        match username.split_once(':') {
            Some((exp, peer)) => exp.parse().is_ok_and(|exp| self.refuses(peer, exp)),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `POST /revoke` takes (from management, with a [`tern_proto::relay_auth::revoke_token`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RevokeRequest {
    pub peer_id: String,
    /// Credentials of the peer expiring at or before this (unix seconds) are refused.
    pub expiring_by: i64,
}

/// What a revocation closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    pub allocations: usize,
    pub tcp_connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_issued_before_a_revocation_are_refused_later_ones_pass() {
        let r = Revoked::default();
        // Revoked at 1,000 by a server whose credentials live 600 s.
        r.revoke("peer-a", 1_600, 1_000);
        assert!(r.refuses("peer-a", 1_600), "issued just before");
        assert!(r.refuses("peer-a", 1_100), "issued long before");
        assert!(!r.refuses("peer-a", 1_601), "issued after: a new sign-in");
        assert!(!r.refuses("peer-b", 1_100), "another peer");
        assert!(r.refuses_username("1500:peer-a"));
        assert!(!r.refuses_username("1700:peer-a"));
        assert!(!r.refuses_username("nonsense"));
        // A later revocation widens it; an earlier one does not narrow it.
        r.revoke("peer-a", 1_200, 1_000);
        assert!(r.refuses("peer-a", 1_600));
        // Entries whose credentials have all lapsed go.
        r.revoke("peer-c", 5_000, 2_000);
        assert!(!r.refuses("peer-a", 1_600), "forgotten once lapsed");
        assert_eq!(r.len(), 1);
    }
}
