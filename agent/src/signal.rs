//! The agent's signal client: one authenticated stream, reconnected with backoff. Payloads are
//! sealed end to end (crypto_box between the two WireGuard keys) before they leave the agent.

use serde::{Deserialize, Serialize};
use tern_proto::signal as pb;
use tern_proto::signal::signal_service_client::SignalServiceClient;
use tern_proto::{PublicKey, SecretKey};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// What peers tell each other to set up a path (sealed inside signal payloads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PeerMsg {
    /// ICE credentials of a new session (from the controlling side).
    Offer {
        session: u64,
        ufrag: String,
        pwd: String,
    },
    /// ICE credentials of the controlled side for `session`.
    Answer {
        session: u64,
        ufrag: String,
        pwd: String,
    },
    /// One trickled ICE candidate.
    Candidate { session: u64, candidate: String },
    /// What the sender knows of its own reachability (address families, NAT mapping, a public
    /// address), so that both sides can say why a pair runs through a relay. Older agents
    /// neither send it nor read it.
    Reach {
        session: u64,
        ipv4: bool,
        ipv6: bool,
        /// "independent", "dependent" or "unknown" (RFC 4787 mapping).
        mapping: String,
        public: bool,
    },
}

impl PeerMsg {
    pub fn reach(session: u64, r: &tern_tunnel::reach::Reach) -> PeerMsg {
        use tern_tunnel::reach::Mapping;
        PeerMsg::Reach {
            session,
            ipv4: r.ipv4,
            ipv6: r.ipv6,
            mapping: match r.mapping {
                Mapping::EndpointIndependent => "independent",
                Mapping::EndpointDependent => "dependent",
                Mapping::Unknown => "unknown",
            }
            .into(),
            public: r.public,
        }
    }
}

/// The reachability a [`PeerMsg::Reach`] carries.
pub fn reach_of(ipv4: bool, ipv6: bool, mapping: &str, public: bool) -> tern_tunnel::reach::Reach {
    use tern_tunnel::reach::Mapping;
    tern_tunnel::reach::Reach {
        ipv4,
        ipv6,
        mapping: match mapping {
            "independent" => Mapping::EndpointIndependent,
            "dependent" => Mapping::EndpointDependent,
            _ => Mapping::Unknown,
        },
        public,
    }
}

/// Seals a PeerMsg for `to` as the signal payload (prost-encoded SealedMessage).
pub fn seal_msg(key: &SecretKey, to: &PublicKey, m: &PeerMsg) -> Option<Vec<u8>> {
    use prost::Message;
    let body = serde_json::to_vec(m).ok()?;
    Some(tern_proto::seal(key, to, &body).ok()?.encode_to_vec())
}

/// Opens a payload from `from`; the sealed sender key must be the signal-stamped sender.
pub fn open_msg(key: &SecretKey, from: &PublicKey, payload: &[u8]) -> Option<PeerMsg> {
    use prost::Message;
    let sealed = tern_proto::management::SealedMessage::decode(payload).ok()?;
    let (sender, body) = tern_proto::open(key, &sealed).ok()?;
    if &sender != from {
        return None;
    }
    serde_json::from_slice(&body).ok()
}

/// Runs the signal stream forever: sends what arrives on `out`, delivers what comes in on `inc`.
pub async fn run(
    servers: std::sync::Arc<crate::control::Servers>,
    key: SecretKey,
    mut token: watch::Receiver<Option<String>>,
    mut out: mpsc::Receiver<(PublicKey, PeerMsg)>,
    inc: mpsc::Sender<(PublicKey, PeerMsg)>,
    up: watch::Sender<bool>,
) {
    let ch = servers.channel();
    // Failures in a row; each moves to the next management replica if there are several
    // (signal is served with management).
    let mut failures = 0u32;
    let mut id = 0u64;
    loop {
        let (at, _) = servers.current();
        let Some(t) = token.borrow_and_update().clone() else {
            if token.changed().await.is_err() {
                return;
            }
            continue;
        };
        let (tx, rx) = mpsc::channel::<pb::Outbound>(64);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
        let mut stream = match SignalServiceClient::new(ch.clone()).open(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                failures += 1;
                servers.failed(at);
                let wait = crate::control::retry_delay(failures, servers.len());
                warn!(error = %e.message(), retry_in = ?wait, "signal connection failed");
                up.send_replace(false);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        up.send_replace(true);
        info!("signal stream open");
        failures = 0;
        loop {
            tokio::select! {
                m = out.recv() => {
                    let Some((to, msg)) = m else { return };
                    let Some(payload) = seal_msg(&key, &to, &msg) else { continue };
                    id += 1;
                    if tx.send(pb::Outbound { id, recipient: to.0.to_vec(), payload }).await.is_err() {
                        break;
                    }
                }
                m = stream.message() => match m {
                    Ok(Some(pb::Inbound { kind: Some(pb::inbound::Kind::Delivery(d)) })) => {
                        let Ok(from) = PublicKey::from_slice(&d.sender) else { continue };
                        match open_msg(&key, &from, &d.payload) {
                            Some(msg) => { let _ = inc.send((from, msg)).await; }
                            None => debug!(%from, "dropping signal payload that does not open"),
                        }
                    }
                    Ok(Some(pb::Inbound { kind: Some(pb::inbound::Kind::Result(r)) })) => {
                        if r.status != pb::send_result::Status::Delivered as i32 {
                            debug!(id = r.id, message = %r.message, "signal send not delivered");
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
            }
        }
        warn!("signal stream lost; reconnecting");
        up.send_replace(false);
        failures += 1;
        servers.failed(at);
        tokio::time::sleep(crate::control::retry_delay(failures, servers.len())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_peer_messages_open_only_from_the_stamped_sender() {
        let a = SecretKey::generate();
        let b = SecretKey::generate();
        let m = PeerMsg::Offer {
            session: 7,
            ufrag: "u".into(),
            pwd: "p".into(),
        };
        let wire = seal_msg(&a, &b.public_key(), &m).expect("seal");
        assert_eq!(open_msg(&b, &a.public_key(), &wire), Some(m));
        let c = SecretKey::generate();
        assert_eq!(
            open_msg(&b, &c.public_key(), &wire),
            None,
            "sender mismatch"
        );
        assert_eq!(open_msg(&b, &a.public_key(), b"garbage"), None);
    }
}
