//! Talking to management: sealed login (registration with a setup key the first time), and the
//! sync stream, reconnected with backoff; every new network map is published on a watch channel.

use anyhow::{anyhow, Context};
use prost::Message;
use std::time::Duration;
use tern_proto::management as pb;
use tern_proto::management::management_service_client::ManagementServiceClient;
use tern_proto::{PublicKey, SecretKey};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot reach management at {url}: {source}")]
    Unreachable { url: String, source: anyhow::Error },
    #[error("management refused the login: {0}")]
    Refused(String),
    #[error("the management server at {url} presents key {got}, not the key {pinned} it had when this peer joined: refusing to talk to it. If the server was reinstalled on purpose, join again with `tern up --setup-key KEY`")]
    ServerKeyChanged {
        url: String,
        pinned: String,
        got: String,
    },
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

/// A lazily connecting channel to management (and signal, on the same server). `https` URLs are
/// verified against the system's roots plus the PEM file named by `TERN_CA_FILE` (private CAs,
/// self-signed trial certificates).
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|_| anyhow!("management URL {url:?} is not a valid http(s) URL"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = ca_file() {
            let pem = std::fs::read(&path)
                .with_context(|| format!("reading TERN_CA_FILE {}", path.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        ep = ep
            .tls_config(tls)
            .context("TLS configuration for management")?;
    }
    Ok(ep.connect_lazy())
}

/// Extra trust anchor for TLS (management and the relay WebSocket).
pub fn ca_file() -> Option<std::path::PathBuf> {
    std::env::var("TERN_CA_FILE")
        .or_else(|_| std::env::var("TERN_RELAY_CA"))
        .ok()
        .map(Into::into)
}

pub struct Session {
    /// The server's key that sealed this session (pinned at the first join).
    pub server_key: PublicKey,
    pub peer_id: String,
    pub token: String,
    pub token_expires_unix: i64,
    pub config: pb::PeerConfig,
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub async fn login(
    url: &str,
    ch: &Channel,
    key: &SecretKey,
    setup_key: Option<&str>,
    hostname: &str,
    pinned: Option<&PublicKey>,
) -> Result<Session, LoginError> {
    let mut c = ManagementServiceClient::new(ch.clone());
    let server = c
        .get_server_key(pb::ServerKeyRequest {})
        .await
        .map_err(|s| LoginError::Unreachable {
            url: url.to_string(),
            source: anyhow!("{}", s.message()),
        })?
        .into_inner();
    let server_pub = PublicKey::from_slice(&server.public_key).context("server key")?;
    if let Some(p) = pinned.filter(|p| **p != server_pub) {
        return Err(LoginError::ServerKeyChanged {
            url: url.to_string(),
            pinned: p.to_base64(),
            got: server_pub.to_base64(),
        });
    }
    let req = pb::LoginRequest {
        setup_key: setup_key.unwrap_or_default().to_string(),
        meta: Some(pb::PeerMeta {
            hostname: hostname.to_string(),
            os: std::env::consts::OS.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }),
        timestamp_unix: now_unix(),
    };
    let sealed =
        tern_proto::seal(key, &server_pub, &req.encode_to_vec()).context("sealing login")?;
    let resp = c.login(sealed).await.map_err(|s| match s.code() {
        tonic::Code::Unavailable => LoginError::Unreachable {
            url: url.to_string(),
            source: anyhow!("{}", s.message()),
        },
        _ => LoginError::Refused(s.message().to_string()),
    })?;
    let (from, body) =
        tern_proto::open(key, &resp.into_inner()).context("opening login response")?;
    if from != server_pub {
        return Err(anyhow!("login response was not sealed by the server key").into());
    }
    let r = pb::LoginResponse::decode(body.as_slice()).context("decoding login response")?;
    let config = r
        .peer_config
        .ok_or_else(|| anyhow!("login response without peer config"))?;
    Ok(Session {
        server_key: server_pub,
        peer_id: r.peer_id,
        token: r.peer_token,
        token_expires_unix: r.token_expires_unix,
        config,
    })
}

/// What the agent needs to log in again on its own: where, as whom, and the pinned server key.
pub struct Relogin {
    pub url: String,
    pub ch: Channel,
    pub key: SecretKey,
    pub hostname: String,
    pub server_key: PublicKey,
}

/// Keeps a sync stream open (re-logging in for fresh tokens), publishing maps; reports whether
/// management is reachable on `up`.
pub async fn run_sync(
    who: Relogin,
    maps: watch::Sender<Option<pb::NetworkMap>>,
    token: watch::Sender<Option<String>>,
    up: watch::Sender<bool>,
) {
    let Relogin {
        url,
        ch,
        key,
        hostname,
        server_key,
    } = who;
    let mut backoff = Duration::from_millis(500);
    loop {
        let session = match login(&url, &ch, &key, None, &hostname, Some(&server_key)).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "management login failed");
                up.send_replace(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        token.send_replace(Some(session.token.clone()));
        let mut c = ManagementServiceClient::new(ch.clone());
        let mut req = tonic::Request::new(pb::SyncRequest::default());
        if let Ok(v) = format!("Bearer {}", session.token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        let mut stream = match c.sync(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                warn!(error = %e.message(), "sync stream refused");
                up.send_replace(false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        up.send_replace(true);
        info!("management sync stream open");
        // Re-login before the token expires (signal needs a valid one for reconnects).
        let refresh =
            Duration::from_secs(((session.token_expires_unix - now_unix()) * 3 / 4).max(30) as u64);
        let mut deadline = tokio::time::Instant::now() + refresh;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep_until(deadline) => {
                    deadline = tokio::time::Instant::now() + refresh;
                    match login(&url, &ch, &key, None, &hostname, Some(&server_key)).await {
                        Ok(s) => { token.send_replace(Some(s.token)); }
                        Err(e) => warn!(error = %e, "token refresh failed"),
                    }
                    continue;
                }
            };
            match msg {
                Ok(Some(m)) => {
                    backoff = Duration::from_millis(500);
                    if let Some(map) = m.network_map {
                        let newer = maps
                            .borrow()
                            .as_ref()
                            .is_none_or(|old| map.serial >= old.serial);
                        if newer {
                            maps.send_replace(Some(map));
                        }
                    }
                }
                Ok(None) => {
                    warn!("management closed the sync stream");
                    break;
                }
                Err(e) => {
                    warn!(error = %e.message(), "sync stream failed");
                    break;
                }
            }
        }
        up.send_replace(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The connection report sent to management: one entry per remote peer.
pub fn connection_report(peers: &[crate::engine::PeerStatus]) -> Vec<pb::PeerConnection> {
    use crate::engine::PathKind;
    let mut out: Vec<pb::PeerConnection> = peers
        .iter()
        .map(|p| pb::PeerConnection {
            peer_id: p.id.clone(),
            kind: match p.connection {
                PathKind::Direct => "direct",
                PathKind::TurnRelay => "turn_relay",
                PathKind::TcpRelay => "tcp_relay",
                PathKind::None => "connecting",
            }
            .into(),
            rtt_ms: p
                .latency_ms
                .map_or(0, |r| r.round().clamp(1.0, 60_000.0) as u32),
        })
        .collect();
    out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    out
}

/// Reports how this agent reaches each peer: within 2 s of a change of path, and every 30 s
/// (management forgets reports older than 75 s). RTT changes alone wait for the 30 s report.
pub async fn run_status_reports(
    ch: Channel,
    engine: std::sync::Arc<crate::engine::Engine>,
    token: watch::Receiver<Option<String>>,
    up: watch::Receiver<bool>,
) {
    let mut last: Option<Vec<(String, String)>> = None;
    let mut last_sent = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if !*up.borrow() {
            last = None;
            continue;
        }
        let Some(t) = token.borrow().clone() else {
            continue;
        };
        let conns = connection_report(&engine.status());
        let shape: Vec<(String, String)> = conns
            .iter()
            .map(|c| (c.peer_id.clone(), c.kind.clone()))
            .collect();
        if last.as_ref() == Some(&shape) && last_sent.elapsed() < Duration::from_secs(30) {
            continue;
        }
        let mut req = tonic::Request::new(pb::StatusReport { connections: conns });
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req.set_timeout(Duration::from_secs(10));
        match ManagementServiceClient::new(ch.clone())
            .report_status(req)
            .await
        {
            Ok(_) => {
                last = Some(shape);
                last_sent = tokio::time::Instant::now();
            }
            Err(e) => debug!(error = %e.message(), "status report failed"),
        }
    }
}
