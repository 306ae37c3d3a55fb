//! The TCP/TLS fallback relay's wire format (the relay speaks it; `tern-relay-client` is the
//! client agents use): a WebSocket (`GET /relay`, `Authorization: Bearer <token>`) whose binary messages are
//! frames `[len u8][peer id][datagram]`: to the relay the recipient's id, from it the sender's.
//! A text message [`VIEW_REQUEST`] asks the relay for its view of this client; it answers with
//! a text message holding a [`RelayView`] as JSON.

/// Largest datagram carried (WireGuard packets are far smaller).
pub const MAX_DATAGRAM: usize = 65_535;

/// The text message that asks the relay for a [`RelayView`].
pub const VIEW_REQUEST: &str = "view";

/// The relay's own figures about one client (`tern diagnose`): what it dropped and what it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayView {
    /// Datagrams from this client the relay dropped because the recipient's queue was full.
    pub dropped_from_you: u64,
    /// Datagrams to this client the relay dropped (this client's queue was full).
    pub dropped_to_you: u64,
    /// Datagrams from this client for a recipient not connected to the relay (dropped; not the
    /// relay's load). Absent from relays older than this field.
    #[serde(default)]
    pub no_recipient_from_you: u64,
    /// Bytes queued to this client now, and the most the relay queues per client.
    pub queued_to_you_bytes: u64,
    pub queue_limit_bytes: u64,
    /// Datagrams the relay dropped for all its clients, and how many are connected.
    pub drops_total: u64,
    pub clients: u64,
}

/// Builds a frame: one length byte, the peer id, the datagram.
pub fn encode_frame(peer_id: &str, datagram: &[u8]) -> Option<Vec<u8>> {
    let id = peer_id.as_bytes();
    if id.is_empty() || id.len() > 255 || datagram.len() > MAX_DATAGRAM {
        return None;
    }
    let mut f = Vec::with_capacity(1 + id.len() + datagram.len());
    f.push(id.len() as u8);
    f.extend_from_slice(id);
    f.extend_from_slice(datagram);
    Some(f)
}

/// Splits a frame into (peer id, datagram); None if malformed.
pub fn decode_frame(f: &[u8]) -> Option<(&str, &[u8])> {
    let n = *f.first()? as usize;
    if n == 0 || f.len() < 1 + n {
        return None;
    }
    let id = std::str::from_utf8(&f[1..1 + n]).ok()?;
    Some((id, &f[1 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_rejected() {
        let f = encode_frame("peer-1", b"datagram").expect("encode");
        assert_eq!(decode_frame(&f), Some(("peer-1", &b"datagram"[..])));
        assert_eq!(decode_frame(&[]), None);
        assert_eq!(decode_frame(&[0]), None);
        assert_eq!(decode_frame(&[5, b'a']), None);
        assert_eq!(
            decode_frame(&[2, 0xff, 0xfe]),
            None,
            "peer id must be UTF-8"
        );
        assert!(encode_frame("", b"x").is_none());
        assert!(encode_frame(&"x".repeat(256), b"x").is_none());
    }
}
