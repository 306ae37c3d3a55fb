//! Tern relay: STUN binding and TURN over UDP (the `turn` crate behind our front: coturn-style
//! time-limited credentials, peer-address filter, per-source rate limits, allocation quotas), a
//! WebSocket datagram relay for networks that block UDP (reachable on 443, through TLS and reverse
//! proxies), and Prometheus metrics.

pub mod fastpath;
pub mod filter;
pub mod limiter;
pub mod load;
pub mod metrics;
pub mod revoke;
pub mod tcp;
pub mod tls;
pub mod udp;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use ipnet::IpNet;
use metrics::Metrics;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// STUN/TURN UDP listener (the TURN port, 3478 by default).
    pub udp_listen: SocketAddr,
    /// Address advertised in XOR-RELAYED-ADDRESS (the server's public IP).
    pub public_ip: IpAddr,
    /// IP relay sockets bind to (unspecified = all).
    pub relay_bind_ip: IpAddr,
    pub min_port: u16,
    pub max_port: u16,
    pub realm: String,
    pub secret: Vec<u8>,
    /// The overlay range: never a relay destination.
    pub overlay: Option<IpNet>,
    /// Peer ranges allowed despite the default filter (labs, tests).
    pub allow_peers: Vec<IpNet>,
    pub limits: udp::UdpLimits,
    pub tcp: tcp::TcpOptions,
    /// A second UDP port that answers STUN Binding requests only (RFC 5780's alternate port):
    /// an agent that sees two different mappings from one socket knows its NAT maps per
    /// destination (`tern diagnose`).
    pub stun_alt_listen: Option<SocketAddr>,
}

impl RelayConfig {
    pub fn new(udp_listen: SocketAddr, public_ip: IpAddr, secret: Vec<u8>) -> Self {
        RelayConfig {
            udp_listen,
            public_ip,
            relay_bind_ip: if udp_listen.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            },
            min_port: 49152,
            max_port: 65535,
            realm: "tern".into(),
            secret,
            overlay: "100.64.0.0/10".parse().ok(),
            allow_peers: vec![],
            limits: udp::UdpLimits::default(),
            tcp: tcp::TcpOptions::default(),
            stun_alt_listen: None,
        }
    }
}

pub struct Relay {
    pub metrics: Arc<Metrics>,
    /// The peer-address filter (shared with the UDP front; its overlay range can change).
    pub filter: filter::PeerFilter,
    pub udp_addr: SocketAddr,
    /// The alternate STUN port, when it is served.
    pub stun_alt_addr: Option<SocketAddr>,
    pub tcp: Arc<tcp::TcpRelay>,
    /// The TURN relay's own load (see [`load`]).
    pub load: Arc<load::LoadMeter>,
    /// The TURN URL agents are given for this relay (its public address and port).
    pub turn_url: String,
    turn: Arc<turn::server::Server>,
}

impl Relay {
    pub async fn start(cfg: RelayConfig) -> anyhow::Result<Relay> {
        anyhow::ensure!(!cfg.secret.is_empty(), "relay secret must not be empty");
        let metrics = Arc::new(Metrics::default());
        let sock = UdpSocket::bind(cfg.udp_listen)
            .await
            .with_context(|| format!("binding UDP {}", cfg.udp_listen))?;
        udp::size_buffers(&sock, 8 << 20);
        let udp_addr = sock.local_addr()?;
        let filter = filter::PeerFilter::new(cfg.overlay, cfg.allow_peers.clone());
        let shared = udp::UdpShared::new(
            metrics.clone(),
            filter.clone(),
            cfg.secret.clone(),
            cfg.realm.clone(),
            cfg.limits.clone(),
        );
        let revoked = shared.revoked.clone();
        let front = udp::FrontConn::new(Arc::new(sock), shared.clone());
        let load = load::LoadMeter::new(shared.clone());
        tokio::spawn(load::LoadMeter::run(Arc::downgrade(&load)));
        let turn = turn::server::Server::new(turn::server::config::ServerConfig {
            conn_configs: vec![turn::server::config::ConnConfig {
                conn: Arc::new(front),
                relay_addr_generator: Box::new(udp::RelayGen {
                    shared: shared.clone(),
                    bind_ip: cfg.relay_bind_ip,
                    public_ip: cfg.public_ip,
                    min_port: cfg.min_port,
                    max_port: cfg.max_port,
                }),
            }],
            realm: cfg.realm.clone(),
            auth_handler: Arc::new(udp::CoturnAuth { shared }),
            channel_bind_timeout: Duration::from_secs(0),
            alloc_close_notify: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("starting TURN server: {e}"))?;
        let stun_alt_addr = match cfg.stun_alt_listen {
            None => None,
            Some(a) => match UdpSocket::bind(a).await {
                Ok(s) => {
                    let addr = s.local_addr().ok();
                    tokio::spawn(udp::stun_only(s, metrics.clone(), cfg.limits.clone()));
                    addr
                }
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "cannot serve the alternate STUN port; `tern diagnose` cannot tell NAT mapping behaviour");
                    None
                }
            },
        };
        filter.set_own(
            vec![cfg.public_ip, udp_addr.ip(), cfg.relay_bind_ip],
            (cfg.min_port, cfg.max_port),
            [Some(udp_addr.port()), stun_alt_addr.map(|a| a.port())]
                .into_iter()
                .flatten()
                .collect(),
        );
        let tcp = tcp::TcpRelay::with_revocations(
            cfg.secret.clone(),
            metrics.clone(),
            cfg.tcp.clone(),
            revoked,
        );
        tracing::info!(%udp_addr, public_ip = %cfg.public_ip, ports = %format!("{}-{}", cfg.min_port, cfg.max_port), "relay listening");
        Ok(Relay {
            metrics,
            filter,
            udp_addr,
            stun_alt_addr,
            tcp,
            load,
            turn_url: format!(
                "turn:{}:{}?transport=udp",
                match cfg.public_ip {
                    IpAddr::V6(v6) => format!("[{v6}]"),
                    v4 => v4.to_string(),
                },
                udp_addr.port()
            ),
            turn: Arc::new(turn),
        })
    }

    /// Ends `peer_id`'s relay access (it was removed, its login ended or its user was
    /// disabled): its credentials expiring at or before `expiring_by` are refused from now on,
    /// its TURN allocations and its TCP-relay connection close.
    pub async fn revoke(&self, peer_id: &str, expiring_by: i64) -> revoke::Revocation {
        revoke_here(&self.tcp, &self.turn, peer_id, expiring_by).await
    }

    /// `/relay` (WebSocket datagram relay) and `/load` (its TURN load, for management); an
    /// embedding server serves the counters itself.
    pub fn router(&self) -> Router {
        let state = (
            self.tcp.clone(),
            self.load.clone(),
            vec![self.turn_url.clone()],
        );
        self.tcp.router().merge(
            Router::new()
                .route("/load", get(load_report))
                .with_state(state)
                .merge(
                    Router::new()
                        .route("/revoke", axum::routing::post(revoke_request))
                        .with_state((self.tcp.clone(), self.turn.clone())),
                ),
        )
    }

    /// `/relay` and `/metrics` (the stand-alone relay).
    pub fn router_with_metrics(&self) -> Router {
        let m = self.metrics.clone();
        self.router().route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
            }),
        )
    }

    pub async fn close(&self) {
        let _ = self.turn.close().await;
    }
}

/// `GET /load`, with a load token (`tern_proto::relay_auth::load_token`): management's only, so
/// agents cannot read other agents' allocations.
async fn load_report(
    axum::extract::State((tcp, meter, turn_urls)): axum::extract::State<(
        Arc<tcp::TcpRelay>,
        Arc<load::LoadMeter>,
        Vec<String>,
    )>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match token.map(|t| tern_proto::relay_auth::verify_load_token(tcp.secret(), t, now)) {
        Some(Ok(())) => axum::Json(load::LoadReport {
            turn_urls,
            load: meter.load(),
        })
        .into_response(),
        Some(Err(why)) => (
            StatusCode::FORBIDDEN,
            format!("the relay's load is for its management server only ({why})"),
        )
            .into_response(),
        None => (StatusCode::UNAUTHORIZED, "missing load token").into_response(),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn revoke_here(
    tcp: &tcp::TcpRelay,
    turn: &turn::server::Server,
    peer_id: &str,
    expiring_by: i64,
) -> revoke::Revocation {
    tcp.revoked().revoke(peer_id, expiring_by, unix_now());
    let tcp_connections = usize::from(tcp.disconnect(peer_id));
    let mut allocations = 0;
    let users: std::collections::BTreeSet<String> = match turn.get_allocations_info(None).await {
        Ok(all) => all
            .into_values()
            .map(|a| a.username)
            .filter(|u| {
                u.split_once(':').is_some_and(|(_, p)| p == peer_id)
                    && tcp.revoked().refuses_username(u)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(peer = %peer_id, error = %e, "cannot list TURN allocations to close a revoked peer's");
            Default::default()
        }
    };
    for u in users {
        if turn.delete_allocations_by_username(u).await.is_ok() {
            allocations += 1;
        }
    }
    tracing::info!(peer = %peer_id, allocations, tcp_connections, "relay access revoked");
    revoke::Revocation {
        allocations,
        tcp_connections,
    }
}

/// `POST /revoke`, with a revoke token (`tern_proto::relay_auth::revoke_token`): management
/// ends a peer's access to this relay (a relay running apart from it).
async fn revoke_request(
    axum::extract::State((tcp, turn)): axum::extract::State<(
        Arc<tcp::TcpRelay>,
        Arc<turn::server::Server>,
    )>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    match token.map(|t| tern_proto::relay_auth::verify_revoke_token(tcp.secret(), t, unix_now())) {
        Some(Ok(())) => {}
        Some(Err(why)) => {
            return (
                StatusCode::FORBIDDEN,
                format!("revoking relay access is for the management server only ({why})"),
            )
                .into_response()
        }
        None => {
            return (
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer <revoke token>",
            )
                .into_response()
        }
    }
    let req: revoke::RevokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"peer_id\": \"…\", \"expiring_by\": <unix seconds>}}: {e}"),
            )
                .into_response()
        }
    };
    if req.peer_id.is_empty() || req.peer_id.len() > 128 {
        return (StatusCode::BAD_REQUEST, "peer_id must be 1-128 characters").into_response();
    }
    axum::Json(revoke_here(&tcp, &turn, &req.peer_id, req.expiring_by).await).into_response()
}
