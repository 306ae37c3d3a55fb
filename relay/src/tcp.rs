//! The TCP/TLS fallback: a datagram relay over WebSocket (`GET /relay`). WebSocket because it
//! passes wherever HTTPS does: on port 443, through TLS (ours or a reverse proxy's), and behind
//! HTTP reverse proxies that forward upgrades; and it needs no port beyond the server's HTTPS one.
//!
//! Authentication: `Authorization: Bearer <token>` (or `?token=`), the token being
//! `<expiry>:<peer-id>:<password>` issued by management with the relay secret. The server knows
//! the client only by the peer id in its verified token.
//!
//! Frames (binary messages): client -> server `[len u8][recipient peer id][datagram]`,
//! server -> client `[len u8][sender peer id][datagram]`. Each client has a send queue bounded
//! in bytes; when it is full, datagrams to it are dropped and counted (datagram semantics,
//! bounded memory). One connection per peer: a new one closes the one it replaces (and frees
//! its queue); a global cap bounds the connections.

use crate::metrics::Metrics;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

pub use tern_proto::relay_ws::{decode_frame, encode_frame, RelayView, MAX_DATAGRAM, VIEW_REQUEST};

#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Bytes queued per receiving client before drops.
    pub queue_bytes: usize,
    /// A connection with no frame from the client for this long is closed.
    pub idle_timeout: Duration,
    /// Clients connected at once (one connection per peer); more are answered 503.
    pub max_clients: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            queue_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(120),
            max_clients: 10_000,
        }
    }
}

/// Frames per queue at most, whatever their size (the byte budget is the real bound).
const QUEUE_FRAMES: usize = 4096;

/// What the writer task sends: relayed frames (counted in the byte budget) and view answers.
enum Out {
    Frame(Bytes),
    Text(String),
}

/// Per-client drop counters (the client asks for them with [`VIEW_REQUEST`]).
#[derive(Default)]
struct ClientStats {
    dropped_from: AtomicU64,
    dropped_to: AtomicU64,
    /// Datagrams from this client whose recipient was not connected.
    no_recipient: AtomicU64,
}

struct Client {
    conn: u64,
    tx: mpsc::Sender<Out>,
    stats: Arc<ClientStats>,
    /// Bytes in `tx`'s queue.
    queued: Arc<AtomicUsize>,
    /// Fired when a newer connection of the same peer replaces this one.
    replaced: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct TcpRelay {
    secret: Vec<u8>,
    metrics: Arc<Metrics>,
    opts: TcpOptions,
    clients: Mutex<HashMap<String, Client>>,
    next: AtomicU64,
    /// Peers whose credentials were revoked before they expired (shared with TURN).
    revoked: Arc<crate::revoke::Revoked>,
}

#[derive(serde::Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

impl TcpRelay {
    pub fn new(secret: Vec<u8>, metrics: Arc<Metrics>, opts: TcpOptions) -> Arc<Self> {
        Self::with_revocations(secret, metrics, opts, Arc::default())
    }

    /// A relay that refuses the credentials `revoked` names.
    pub fn with_revocations(
        secret: Vec<u8>,
        metrics: Arc<Metrics>,
        opts: TcpOptions,
        revoked: Arc<crate::revoke::Revoked>,
    ) -> Arc<Self> {
        Arc::new(TcpRelay {
            secret,
            metrics,
            opts,
            clients: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            revoked,
        })
    }

    /// Peers whose credentials are refused (shared with TURN).
    pub fn revoked(&self) -> &crate::revoke::Revoked {
        &self.revoked
    }

    /// Closes the connection of `peer_id` (its access was revoked); whether one was open.
    pub fn disconnect(&self, peer_id: &str) -> bool {
        match self.lock().remove(peer_id) {
            Some(mut c) => {
                if let Some(r) = c.replaced.take() {
                    let _ = r.send(());
                }
                info!(peer = %peer_id, "TCP relay: connection closed, access revoked");
                true
            }
            None => false,
        }
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/relay", get(upgrade))
            .with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relay secret (load tokens are checked against it too).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Verifies a token `<expiry>:<peer-id>:<password>`; returns the peer id.
    pub fn verify(&self, token: &str, now: i64) -> Result<String, String> {
        let (user, pass) = token
            .rsplit_once(':')
            .ok_or("token is not <expiry>:<peer-id>:<password>")?;
        let peer = tern_proto::relay_auth::verify(&self.secret, user, pass, now)
            .map(str::to_string)
            .map_err(|e| e.to_string())?;
        if self.revoked.refuses_username(user) {
            return Err("credentials revoked: the peer was removed or its login ended".into());
        }
        Ok(peer)
    }

    async fn serve(self: Arc<Self>, ws: WebSocket, me: String) {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Out>(QUEUE_FRAMES);
        let queued = Arc::new(AtomicUsize::new(0));
        let (replaced_tx, mut replaced) = tokio::sync::oneshot::channel();
        let stats = Arc::new(ClientStats::default());
        let my_tx = tx.clone();
        let my_queued = queued.clone();
        let client = Client {
            conn,
            tx,
            stats: stats.clone(),
            queued: queued.clone(),
            replaced: Some(replaced_tx),
        };
        if let Some(mut old) = self.lock().insert(me.clone(), client) {
            // The older connection closes now and its queue goes with it.
            if let Some(r) = old.replaced.take() {
                let _ = r.send(());
            }
            info!(peer = %me, "TCP relay: a newer connection replaces the open one");
        }
        Metrics::inc(&self.metrics.tcp_connections_active);
        info!(peer = %me, "TCP relay client connected");
        let (mut sink, mut stream) = ws.split();
        let writer = tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let m = match out {
                    Out::Frame(frame) => {
                        queued.fetch_sub(frame.len(), Ordering::Relaxed);
                        Message::Binary(frame)
                    }
                    Out::Text(t) => Message::Text(t.into()),
                };
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(self.opts.idle_timeout, stream.next()) => r,
                _ = &mut replaced => {
                    debug!(peer = %me, "TCP relay connection replaced; closing");
                    break;
                }
            };
            let next = match read {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    debug!(peer = %me, error = %e, "TCP relay read error");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    debug!(peer = %me, "TCP relay client idle; closing");
                    break;
                }
            };
            match next {
                Message::Binary(f) => self.forward(&me, &stats, &f),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Text(t) if t.as_str() == VIEW_REQUEST => {
                    let view = RelayView {
                        dropped_from_you: stats.dropped_from.load(Ordering::Relaxed),
                        dropped_to_you: stats.dropped_to.load(Ordering::Relaxed),
                        no_recipient_from_you: stats.no_recipient.load(Ordering::Relaxed),
                        queued_to_you_bytes: my_queued.load(Ordering::Relaxed) as u64,
                        queue_limit_bytes: self.opts.queue_bytes as u64,
                        drops_total: self.metrics.tcp_drops_total.load(Ordering::Relaxed),
                        clients: self.connected() as u64,
                    };
                    // Best effort: a client whose queue is full learns that by the drops.
                    let _ =
                        my_tx.try_send(Out::Text(serde_json::to_string(&view).unwrap_or_default()));
                }
                Message::Text(_) => Metrics::inc(&self.metrics.malformed_total),
            }
            if writer.is_finished() {
                break;
            }
        }
        {
            let mut clients = self.lock();
            if clients.get(&me).is_some_and(|c| c.conn == conn) {
                clients.remove(&me);
            }
        }
        writer.abort();
        Metrics::dec(&self.metrics.tcp_connections_active);
        info!(peer = %me, "TCP relay client disconnected");
    }

    fn forward(&self, from: &str, from_stats: &ClientStats, frame: &[u8]) {
        let Some((to, datagram)) = decode_frame(frame) else {
            Metrics::inc(&self.metrics.malformed_total);
            return;
        };
        self.forward_to(from, from_stats, to, datagram);
    }

    fn forward_to(&self, from: &str, from_stats: &ClientStats, to: &str, datagram: &[u8]) {
        let Some(out) = encode_frame(from, datagram) else {
            Metrics::inc(&self.metrics.malformed_total);
            return;
        };
        let target = self
            .lock()
            .get(to)
            .map(|c| (c.tx.clone(), c.queued.clone(), c.stats.clone()));
        let Some((tx, queued, to_stats)) = target else {
            // Not the relay's load: the recipient is not connected to it.
            Metrics::inc(&self.metrics.tcp_no_recipient_total);
            from_stats.no_recipient.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let dropped = || {
            Metrics::inc(&self.metrics.tcp_drops_total);
            from_stats.dropped_from.fetch_add(1, Ordering::Relaxed);
            to_stats.dropped_to.fetch_add(1, Ordering::Relaxed);
        };
        let len = out.len();
        // Reserve room in the byte budget first; give it back if the frame is not queued.
        if queued.fetch_add(len, Ordering::Relaxed) + len > self.opts.queue_bytes {
            queued.fetch_sub(len, Ordering::Relaxed);
            dropped();
            return;
        }
        match tx.try_send(Out::Frame(Bytes::from(out))) {
            Ok(()) => {
                Metrics::inc(&self.metrics.tcp_packets_relayed_total);
                Metrics::add(&self.metrics.tcp_bytes_relayed_total, datagram.len() as u64);
            }
            Err(_) => {
                queued.fetch_sub(len, Ordering::Relaxed);
                dropped();
            }
        }
    }

    /// Connects a client that lives in this process (a WireGuard device the server hosts) as
    /// `peer`: datagrams relayed to it arrive on `sink` as (peer, sender, datagram); it sends
    /// with [`Attached::send`]. It replaces a connection of the same peer, and leaves when the
    /// returned handle is dropped.
    pub fn attach(
        self: &Arc<Self>,
        peer: &str,
        sink: mpsc::Sender<(String, String, Bytes)>,
    ) -> Attached {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Out>(QUEUE_FRAMES);
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(ClientStats::default());
        let client = Client {
            conn,
            tx,
            stats: stats.clone(),
            queued: queued.clone(),
            replaced: None,
        };
        if let Some(mut old) = self.lock().insert(peer.to_string(), client) {
            if let Some(r) = old.replaced.take() {
                let _ = r.send(());
            }
        }
        let me = peer.to_string();
        let pump = tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let Out::Frame(frame) = out else { continue };
                queued.fetch_sub(frame.len(), Ordering::Relaxed);
                let Some((from, datagram)) = decode_frame(&frame) else {
                    continue;
                };
                let from = from.to_string();
                let datagram = frame.slice_ref(datagram);
                if sink.send((me.clone(), from, datagram)).await.is_err() {
                    return;
                }
            }
        });
        Attached {
            relay: self.clone(),
            peer: peer.to_string(),
            conn,
            stats,
            pump,
        }
    }

    /// Bytes queued for `peer` (for tests and status).
    pub fn queued(&self, peer: &str) -> Option<usize> {
        self.lock()
            .get(peer)
            .map(|c| c.queued.load(Ordering::Relaxed))
    }

    /// Whether one more client may connect (the global cap).
    fn has_room(&self, peer: &str) -> bool {
        let clients = self.lock();
        clients.len() < self.opts.max_clients || clients.contains_key(peer)
    }

    pub fn connected(&self) -> usize {
        self.lock().len()
    }
}

/// A client of the relay inside this process (see [`TcpRelay::attach`]).
pub struct Attached {
    relay: Arc<TcpRelay>,
    peer: String,
    conn: u64,
    stats: Arc<ClientStats>,
    pump: tokio::task::JoinHandle<()>,
}

impl Attached {
    /// Relays a datagram to the connected client `to` (dropped and counted if it is not
    /// connected or its queue is full, as for any client).
    pub fn send(&self, to: &str, datagram: &[u8]) {
        self.relay.forward_to(&self.peer, &self.stats, to, datagram);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.pump.abort();
        let mut clients = self.relay.lock();
        if clients.get(&self.peer).is_some_and(|c| c.conn == self.conn) {
            clients.remove(&self.peer);
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn upgrade(
    State(relay): State<Arc<TcpRelay>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string)
        .or(q.token);
    let Some(token) = token else {
        Metrics::inc(&relay.metrics.auth_failures_total);
        return (StatusCode::UNAUTHORIZED, "missing relay token").into_response();
    };
    let me = match relay.verify(&token, now_unix()) {
        Ok(id) => id,
        Err(why) => {
            Metrics::inc(&relay.metrics.auth_failures_total);
            debug!(reason = %why, "TCP relay token refused");
            return (
                StatusCode::UNAUTHORIZED,
                format!("relay token refused: {why}"),
            )
                .into_response();
        }
    };
    let Ok(ws) = ws else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket",
        )
            .into_response();
    };
    if !relay.has_room(&me) {
        tracing::warn!(
            limit = relay.opts.max_clients,
            "TCP relay full: connection refused"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the TCP relay is at its connection limit; try again later",
        )
            .into_response();
    }
    ws.max_message_size(MAX_DATAGRAM + 512)
        .max_frame_size(MAX_DATAGRAM + 512)
        .on_upgrade(move |socket| relay.serve(socket, me))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_the_peer_and_expire() {
        let r = TcpRelay::new(
            b"sec".to_vec(),
            Arc::new(Metrics::default()),
            TcpOptions::default(),
        );
        let c = tern_proto::relay_auth::issue(b"sec", "peer-a", 2_000);
        let token = format!("{}:{}", c.username, c.password);
        assert_eq!(r.verify(&token, 1_000), Ok("peer-a".to_string()));
        assert!(r.verify(&token, 3_000).is_err(), "expired");
        assert!(
            r.verify("2000:peer-a:AAAA", 1_000).is_err(),
            "wrong password"
        );
        assert!(r.verify("garbage", 1_000).is_err());
    }

    #[tokio::test]
    async fn clients_inside_the_process_relay_like_any_other() {
        let r = TcpRelay::new(
            b"sec".to_vec(),
            Arc::new(Metrics::default()),
            TcpOptions::default(),
        );
        let (tx_a, _rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        let a = r.attach("phone", tx_a);
        let b = r.attach("laptop", tx_b);
        assert_eq!(r.connected(), 2);
        a.send("laptop", b"hello");
        let got = tokio::time::timeout(Duration::from_secs(2), rx_b.recv())
            .await
            .expect("in time")
            .expect("datagram");
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), &got.2[..]),
            ("laptop", "phone", &b"hello"[..])
        );
        drop(b);
        assert_eq!(r.connected(), 1, "a dropped handle leaves the relay");
        a.send("laptop", b"lost");
        assert_eq!(r.metrics.tcp_no_recipient_total.load(Ordering::Relaxed), 1);
        assert_eq!(
            r.metrics.tcp_drops_total.load(Ordering::Relaxed),
            0,
            "an absent recipient is not the relay's overload"
        );
    }
}
