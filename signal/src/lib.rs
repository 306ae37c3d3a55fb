//! Tern signal service: every agent keeps one authenticated gRPC stream open; messages addressed to
//! a peer's WireGuard public key are forwarded to that peer's live stream. The server learns who a
//! stream belongs to from the peer token (issued by management) and stamps that identity as the
//! sender of everything the stream sends, so nobody can receive or send as another peer. Payloads
//! are opaque (agents seal them end to end); nothing is stored.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_proto::signal as pb;
use tern_proto::signal::send_result::Status as SendStatus;
use tern_proto::signal::signal_service_server::{SignalService, SignalServiceServer};
use tern_proto::token::{bearer, verify_peer_token, verify_revoke_token};
use tern_proto::PublicKey;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

pub mod bus;

/// Largest payload forwarded (ICE offers with many candidates stay far below this).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Messages buffered per receiving stream before sends to it fail with RATE_LIMITED.
pub const QUEUE_DEPTH: usize = 256;
/// Payload bytes buffered per receiving stream before sends to it fail with RATE_LIMITED.
pub const QUEUE_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct SignalOptions {
    /// Sustained messages per second a peer may send.
    pub rate_per_sec: f64,
    /// Burst a peer may send at once.
    pub burst: f64,
}

impl Default for SignalOptions {
    fn default() -> Self {
        SignalOptions {
            rate_per_sec: 50.0,
            burst: 200.0,
        }
    }
}

type Outbox = mpsc::Sender<Result<pb::Inbound, Status>>;

struct Registration {
    conn: u64,
    tx: Outbox,
    /// Payload bytes in `tx`'s queue.
    queued: Arc<AtomicUsize>,
}

pub struct Signal {
    secret: Vec<u8>,
    opts: SignalOptions,
    peers: Mutex<HashMap<PublicKey, Registration>>,
    /// Peers removed or expired (key -> when, Unix seconds): tokens issued before are refused.
    revoked: Mutex<HashMap<PublicKey, i64>>,
    next_conn: AtomicU64,
    /// Other replicas of this service (PostgreSQL notifications), when there are any.
    bus: std::sync::OnceLock<bus::Bus>,
}

/// How long a revocation is remembered: longer than any peer token lives.
pub const REVOCATION_MEMORY_SECS: i64 = 24 * 3600;
/// Revocations remembered at most (the oldest are forgotten first).
const MAX_REVOCATIONS: usize = 100_000;

impl Signal {
    pub fn new(peer_token_secret: Vec<u8>, opts: SignalOptions) -> Arc<Self> {
        Arc::new(Signal {
            secret: peer_token_secret,
            opts,
            peers: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            bus: std::sync::OnceLock::new(),
        })
    }

    pub fn service(self: &Arc<Self>) -> SignalServiceServer<SignalHandle> {
        SignalServiceServer::new(SignalHandle(self.clone()))
            .max_decoding_message_size(MAX_PAYLOAD + 1024)
    }

    /// Number of peers with a live stream.
    pub fn online(&self) -> usize {
        self.lock().len()
    }

    /// Peers removed or whose login expired: their live streams end now, and tokens issued up to
    /// `at_unix` are refused from now on. Returns the number of streams closed.
    pub fn revoke(&self, keys: &[PublicKey], at_unix: i64) -> usize {
        if let Some(bus) = self.bus.get() {
            bus.revoke(keys, at_unix);
        }
        self.revoke_here(keys, at_unix)
    }

    /// [`Signal::revoke`] on this replica only (a sibling told us).
    fn revoke_here(&self, keys: &[PublicKey], at_unix: i64) -> usize {
        {
            let mut r = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() + keys.len() > MAX_REVOCATIONS {
                r.retain(|_, t| *t > at_unix - REVOCATION_MEMORY_SECS);
                while r.len() + keys.len() > MAX_REVOCATIONS {
                    let Some(oldest) = r.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) else {
                        break;
                    };
                    r.remove(&oldest);
                }
            }
            for k in keys {
                let t = r.entry(*k).or_insert(at_unix);
                *t = (*t).max(at_unix);
            }
        }
        let mut closed = 0;
        let mut peers = self.lock();
        for k in keys {
            if let Some(reg) = peers.remove(k) {
                let _ = reg.tx.try_send(Err(Status::permission_denied(
                    "this peer was removed or its login expired: run tern up again",
                )));
                closed += 1;
                info!(key = %k, "signal stream closed: peer revoked");
            }
        }
        closed
    }

    fn is_revoked(&self, key: &PublicKey, issued_at: i64) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|at| issued_at <= *at)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Registration>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, from: &PublicKey, msg: pb::Outbound) -> pb::SendResult {
        let result = |status: SendStatus, message: String| pb::SendResult {
            id: msg.id,
            status: status as i32,
            message,
        };
        let Ok(to) = PublicKey::from_slice(&msg.recipient) else {
            return result(
                SendStatus::Invalid,
                format!(
                    "recipient must be a 32-byte key, got {} bytes",
                    msg.recipient.len()
                ),
            );
        };
        if msg.payload.len() > MAX_PAYLOAD {
            return result(
                SendStatus::Invalid,
                format!(
                    "payload of {} bytes exceeds {MAX_PAYLOAD}",
                    msg.payload.len()
                ),
            );
        }
        if !self.lock().contains_key(&to) {
            if let Some(bus) = self.bus.get() {
                // Maybe on another replica: it delivers if the peer is connected there.
                return match bus.forward(&to, from, &msg.payload) {
                    Ok(()) => result(SendStatus::Delivered, String::new()),
                    Err(bus::ForwardError::TooLarge(max)) => result(
                        SendStatus::Invalid,
                        format!("payloads to peers on another replica are limited to {max} bytes"),
                    ),
                    Err(bus::ForwardError::Busy) => result(
                        SendStatus::RateLimited,
                        "the link to the other signal replicas is busy; retry later".into(),
                    ),
                };
            }
        }
        let (status, message) = self.deliver(&to, from, msg.payload);
        result(status, message)
    }

    /// Queues a delivery for a peer connected to this replica.
    fn deliver(&self, to: &PublicKey, from: &PublicKey, payload: Vec<u8>) -> (SendStatus, String) {
        let target = self
            .lock()
            .get(to)
            .map(|r| (r.tx.clone(), r.queued.clone()));
        let Some((tx, queued)) = target else {
            return (
                SendStatus::Offline,
                format!("peer {to} is not connected to signal"),
            );
        };
        let len = payload.len();
        if queued.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES {
            queued.fetch_sub(len, Ordering::Relaxed);
            return (
                SendStatus::RateLimited,
                format!("peer {to} is not keeping up; retry later"),
            );
        }
        let delivery = pb::Inbound {
            kind: Some(pb::inbound::Kind::Delivery(pb::Delivery {
                sender: from.0.to_vec(),
                payload,
            })),
        };
        let sent = tx.try_send(Ok(delivery));
        if sent.is_err() {
            queued.fetch_sub(len, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => (SendStatus::Delivered, String::new()),
            Err(mpsc::error::TrySendError::Full(_)) => (
                SendStatus::RateLimited,
                format!("peer {to} is not keeping up; retry later"),
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => (
                SendStatus::Offline,
                format!("peer {to} is not connected to signal"),
            ),
        }
    }
}

/// Token bucket (per stream).
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct SignalHandle(Arc<Signal>);

type InboundStream = Pin<Box<dyn Stream<Item = Result<pb::Inbound, Status>> + Send>>;

#[tonic::async_trait]
impl SignalService for SignalHandle {
    type OpenStream = InboundStream;

    async fn open(
        &self,
        req: Request<Streaming<pb::Outbound>>,
    ) -> Result<Response<InboundStream>, Status> {
        let sig = self.0.clone();
        let token =
            bearer(req.metadata()).ok_or_else(|| Status::unauthenticated("missing peer token"))?;
        let me = verify_peer_token(&sig.secret, token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if sig.is_revoked(&me.key, me.issued_at) {
            return Err(Status::permission_denied(
                "this peer was removed or its login expired: run tern up again",
            ));
        }
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let queued = Arc::new(AtomicUsize::new(0));
        let conn = sig.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = sig.lock().insert(
            me.key,
            Registration {
                conn,
                tx: tx.clone(),
                queued: queued.clone(),
            },
        ) {
            let _ = old.tx.try_send(Err(Status::aborted(
                "replaced by a newer connection of the same peer",
            )));
        }
        info!(peer = %me.peer_id, key = %me.key, "signal stream opened");
        tokio::spawn(async move {
            let mut bucket = Bucket {
                tokens: sig.opts.burst,
                last: Instant::now(),
            };
            loop {
                let next = tokio::select! {
                    m = incoming.next() => m,
                    _ = tx.closed() => None,
                };
                let msg = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        debug!(peer = %me.peer_id, error = %e, "signal stream error");
                        break;
                    }
                    None => break,
                };
                let result = if bucket.take(sig.opts.rate_per_sec, sig.opts.burst) {
                    sig.route(&me.key, msg)
                } else {
                    pb::SendResult {
                        id: msg.id,
                        status: SendStatus::RateLimited as i32,
                        message: format!(
                            "sender rate limit of {} messages/s exceeded",
                            sig.opts.rate_per_sec
                        ),
                    }
                };
                let reply = pb::Inbound {
                    kind: Some(pb::inbound::Kind::Result(result)),
                };
                // Results go back on our own queue; if we cannot keep up, wait a little, bounded.
                if tokio::time::timeout(Duration::from_secs(5), tx.send(Ok(reply)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let mut peers = sig.lock();
            if peers.get(&me.key).is_some_and(|r| r.conn == conn) {
                peers.remove(&me.key);
            }
            info!(peer = %me.peer_id, "signal stream closed");
        });
        // Deliveries leave the byte budget as the client takes them.
        let out = ReceiverStream::new(rx).map(move |item: Result<pb::Inbound, Status>| {
            if let Ok(pb::Inbound {
                kind: Some(pb::inbound::Kind::Delivery(d)),
            }) = &item
            {
                queued.fetch_sub(d.payload.len(), Ordering::Relaxed);
            }
            item
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeReply>, Status> {
        let token = bearer(req.metadata())
            .ok_or_else(|| Status::unauthenticated("missing revocation token"))?;
        verify_revoke_token(&self.0.secret, token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let r = req.into_inner();
        if r.keys.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10,000 keys per call"));
        }
        let keys: Vec<PublicKey> = r
            .keys
            .iter()
            .map(|k| PublicKey::from_slice(k))
            .collect::<Result<_, _>>()
            .map_err(|_| Status::invalid_argument("every key must be 32 bytes"))?;
        let closed = self.0.revoke(&keys, r.revoked_at_unix);
        Ok(Response::new(pb::RevokeReply {
            closed: closed as u32,
        }))
    }
}
