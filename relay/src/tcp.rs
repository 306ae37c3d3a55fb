//! The TCP/TLS fallback: a datagram relay over WebSocket (`GET /relay`). WebSocket because it
//! passes wherever HTTPS does: on port 443, through TLS (ours or a reverse proxy's), and behind
//! HTTP reverse proxies that forward upgrades; and it needs no port beyond the server's HTTPS one.
//!
//! Authentication: `Authorization: Bearer <token>` (or `?token=`), the token being
//! `<expiry>:<peer-id>:<password>` issued by management with the relay secret. The server knows
//! the client only by the peer id in its verified token.
//!
//! Frames (binary messages): client -> server `[len u8][recipient peer id][datagram]`,
//! server -> client `[len u8][sender peer id][datagram]`. Each client has a bounded send queue;
//! when it is full, datagrams to it are dropped and counted (datagram semantics, bounded memory).

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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

pub use tern_proto::relay_ws::{decode_frame, encode_frame, MAX_DATAGRAM};

#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Frames queued per receiving client before drops.
    pub queue: usize,
    /// A connection with no frame from the client for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            queue: 512,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

struct Client {
    conn: u64,
    tx: mpsc::Sender<Bytes>,
}

pub struct TcpRelay {
    secret: Vec<u8>,
    metrics: Arc<Metrics>,
    opts: TcpOptions,
    clients: Mutex<HashMap<String, Client>>,
    next: AtomicU64,
}

#[derive(serde::Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

impl TcpRelay {
    pub fn new(secret: Vec<u8>, metrics: Arc<Metrics>, opts: TcpOptions) -> Arc<Self> {
        Arc::new(TcpRelay {
            secret,
            metrics,
            opts,
            clients: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/relay", get(upgrade))
            .with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Verifies a token `<expiry>:<peer-id>:<password>`; returns the peer id.
    pub fn verify(&self, token: &str, now: i64) -> Result<String, String> {
        let (user, pass) = token
            .rsplit_once(':')
            .ok_or("token is not <expiry>:<peer-id>:<password>")?;
        tern_proto::relay_auth::verify(&self.secret, user, pass, now)
            .map(str::to_string)
            .map_err(|e| e.to_string())
    }

    async fn serve(self: Arc<Self>, ws: WebSocket, me: String) {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Bytes>(self.opts.queue);
        if let Some(old) = self.lock().insert(me.clone(), Client { conn, tx }) {
            drop(old); // its writer ends when the queue sender is gone
        }
        Metrics::inc(&self.metrics.tcp_connections_active);
        info!(peer = %me, "TCP relay client connected");
        let (mut sink, mut stream) = ws.split();
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if sink.send(Message::Binary(frame)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        loop {
            let next = match tokio::time::timeout(self.opts.idle_timeout, stream.next()).await {
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
                Message::Binary(f) => self.forward(&me, &f),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
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

    fn forward(&self, from: &str, frame: &[u8]) {
        let Some((to, datagram)) = decode_frame(frame) else {
            Metrics::inc(&self.metrics.malformed_total);
            return;
        };
        let Some(out) = encode_frame(from, datagram) else {
            Metrics::inc(&self.metrics.malformed_total);
            return;
        };
        let tx = self.lock().get(to).map(|c| c.tx.clone());
        match tx.map(|tx| tx.try_send(Bytes::from(out))) {
            Some(Ok(())) => {
                Metrics::inc(&self.metrics.tcp_packets_relayed_total);
                Metrics::add(&self.metrics.tcp_bytes_relayed_total, datagram.len() as u64);
            }
            _ => Metrics::inc(&self.metrics.tcp_drops_total),
        }
    }

    /// Frames queued for `peer` (for tests and status).
    pub fn queued(&self, peer: &str) -> Option<usize> {
        self.lock()
            .get(peer)
            .map(|c| self.opts.queue - c.tx.capacity())
    }

    pub fn connected(&self) -> usize {
        self.lock().len()
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
}
