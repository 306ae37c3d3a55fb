//! `Debug` for secret-bearing protocol messages (their derived Debug is disabled in build.rs).

use crate::management::{LoginRequest, LoginResponse, TcpRelay, TurnServer};
use std::fmt;

const REDACTED: &str = "<redacted>";

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field(
                "setup_key",
                &if self.setup_key.is_empty() {
                    ""
                } else {
                    REDACTED
                },
            )
            .field("meta", &self.meta)
            .field("timestamp_unix", &self.timestamp_unix)
            .finish()
    }
}

impl fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("peer_token", &REDACTED)
            .field("token_expires_unix", &self.token_expires_unix)
            .field("peer_config", &self.peer_config)
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnServer")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for TcpRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpRelay")
            .field("url", &self.url)
            .field("token", &REDACTED)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::management::*;

    #[test]
    fn secrets_do_not_appear_in_debug() {
        let req = LoginRequest {
            setup_key: "SETUPKEY-123".into(),
            ..Default::default()
        };
        let resp = LoginResponse {
            peer_token: "TOKEN-xyz".into(),
            ..Default::default()
        };
        let turn = TurnServer {
            url: "turn:x".into(),
            username: "1:p".into(),
            password: "PW-abc".into(),
        };
        let tcp = TcpRelay {
            url: "wss://x".into(),
            token: "TOK-def".into(),
        };
        let map = NetworkMap {
            relay: Some(RelayConfig {
                turn: vec![turn.clone()],
                tcp_relay: vec![tcp.clone()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let all = format!("{req:?}{resp:?}{turn:?}{tcp:?}{map:?}");
        for secret in ["SETUPKEY-123", "TOKEN-xyz", "PW-abc", "TOK-def"] {
            assert!(!all.contains(secret), "{secret} leaked in {all}");
        }
        assert!(all.contains("turn:x"));
    }
}
