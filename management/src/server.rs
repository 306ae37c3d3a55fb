//! Serves REST, the management gRPC service, and optionally signal and the relay's WebSocket
//! endpoint on one listener (HTTP/1.1 for the API and console, HTTP/2 for gRPC, plain or TLS), so
//! a deployment needs one TCP port plus the relay's UDP port. The embedded relay shares the relay
//! secret with management automatically, and its URLs go into every network map.

use crate::state::{AppState, ManagementOptions};
use crate::store::Store;
use anyhow::Context;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tern_relay::{Relay, RelayConfig};
use tern_signal::{Signal, SignalOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// The relay started inside the server process (`tern-server`).
#[derive(Clone, Debug)]
pub struct EmbeddedRelay {
    pub udp_listen: SocketAddr,
    /// Address clients reach the relay's UDP side at (advertised in relayed addresses and URLs).
    pub public_ip: IpAddr,
    pub min_port: u16,
    pub max_port: u16,
    /// Peer ranges allowed despite the default filter (labs only).
    pub allow_peers: Vec<IpNet>,
    /// The alternate STUN port (same IP as `udp_listen`), handed to agents for `tern diagnose`.
    pub stun_alt_port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    pub opts: ManagementOptions,
    /// Also serve signal (the all-in-one server).
    pub signal: Option<SignalOptions>,
    /// Also run the relay.
    pub relay: Option<EmbeddedRelay>,
    /// Serve HTTPS with this certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// URL agents and admins use (default: derived from the bound address).
    pub public_url: Option<String>,
    /// The WireGuard endpoint for plain WireGuard devices (needs the embedded relay).
    pub wireguard: Option<WireguardEndpoint>,
    /// Reverse proxies whose PROXY header or X-Forwarded-For names the client.
    pub trusted_proxies: tern_relay::tls::TrustedProxies,
}

/// Where plain WireGuard devices connect.
#[derive(Clone, Debug)]
pub struct WireguardEndpoint {
    pub listen: SocketAddr,
    /// `host:port` written into device configurations; default: the public URL's host and the
    /// listen port.
    pub advertise: Option<String>,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, database_url: String) -> Self {
        ServerConfig {
            listen,
            database_url,
            opts: ManagementOptions::default(),
            signal: None,
            relay: None,
            tls: None,
            public_url: None,
            wireguard: None,
            trusted_proxies: Default::default(),
        }
    }
}

pub struct Running {
    pub addr: SocketAddr,
    pub public_url: String,
    pub state: Arc<AppState>,
    pub signal: Option<Arc<Signal>>,
    pub relay: Option<Arc<Relay>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    janitor: JoinHandle<()>,
    expiry: JoinHandle<()>,
    indexer: JoinHandle<()>,
    publisher: JoinHandle<()>,
    wireguard: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets requests finish for up to `grace`, then drops what is left
    /// (sync and signal streams never finish on their own).
    pub async fn stop(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        self.janitor.abort();
        self.expiry.abort();
        self.indexer.abort();
        self.publisher.abort();
        if let Some(w) = &self.wireguard {
            w.abort();
        }
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
        if let Some(r) = &self.relay {
            r.close().await;
        }
        // Its peers go offline now and their agents move to a sibling replica, if any.
        if let Err(e) = self.state.store.unregister_replica().await {
            warn!(error = ?e, "could not unregister this replica");
        }
        self.state.store.close().await;
    }
}

/// `host[:port]` of a URL, and the host alone.
fn url_authority(url: &str) -> anyhow::Result<(String, String)> {
    let uri: axum::http::Uri = url
        .parse()
        .with_context(|| format!("public URL {url:?} is not a URL"))?;
    let auth = uri
        .authority()
        .with_context(|| format!("public URL {url:?} has no host"))?;
    Ok((auth.as_str().to_string(), auth.host().to_string()))
}

fn host_for_url(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

pub async fn start(cfg: ServerConfig) -> anyhow::Result<Running> {
    let store = Store::connect(&cfg.database_url)
        .await
        .with_context(|| format!("opening database {}", redact_url(&cfg.database_url)))?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let public_url = cfg.public_url.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            host_for_url(addr.ip())
        };
        format!("{scheme}://{host}:{}", addr.port())
    });
    let public_url = public_url.trim_end_matches('/').to_string();

    let mut opts = cfg.opts.clone();
    if opts.relay.secret.is_empty() {
        opts.relay.secret = store
            .secret_or_create("relay_secret", crate::state::random_secret_b64)
            .await?
            .into_bytes();
    }
    // The embedded relay's own TURN URL (its load is reported under it).
    let mut own_turn: Vec<String> = vec![];
    let mut own_tcp = String::new();
    let relay = match &cfg.relay {
        None => None,
        Some(er) => {
            let settings = store.settings().await?;
            let mut rc = RelayConfig::new(er.udp_listen, er.public_ip, opts.relay.secret.clone());
            rc.min_port = er.min_port;
            rc.max_port = er.max_port;
            rc.overlay = Some(settings.overlay_range);
            rc.allow_peers = er.allow_peers.clone();
            rc.stun_alt_listen = er
                .stun_alt_port
                .map(|p| SocketAddr::new(er.udp_listen.ip(), p));
            let relay = Arc::new(
                Relay::start(rc)
                    .await
                    .context("starting the embedded relay")?,
            );
            // The relay refuses the overlay range as a peer address: follow settings changes.
            let (filter, watched) = (relay.filter.clone(), store.clone());
            tokio::spawn(async move {
                let mut changes = watched.subscribe();
                let mut current = Some(settings.overlay_range);
                while changes.changed().await.is_ok() {
                    if let Ok(s) = watched.settings().await {
                        if current != Some(s.overlay_range) {
                            tracing::info!(overlay = %s.overlay_range, "relay: overlay range changed");
                            current = Some(s.overlay_range);
                            filter.set_overlay(current);
                        }
                    }
                }
            });
            let udp = format!("{}:{}", host_for_url(er.public_ip), relay.udp_addr.port());
            if opts.relay.stun_urls.is_empty() {
                opts.relay.stun_urls.push(format!("stun:{udp}"));
            }
            if let Some(alt) = relay.stun_alt_addr {
                opts.relay.stun_probe_urls.push(format!(
                    "stun:{}:{}",
                    host_for_url(er.public_ip),
                    alt.port()
                ));
            }
            own_turn = vec![relay.turn_url.clone()];
            if opts.relay.turn_urls.is_empty() {
                opts.relay.turn_urls.extend(own_turn.iter().cloned());
            }
            let (authority, _) = url_authority(&public_url)?;
            let ws = if public_url.starts_with("https") {
                "wss"
            } else {
                "ws"
            };
            own_tcp = format!("{ws}://{authority}/relay");
            if opts.relay.tcp_relay_urls.is_empty() {
                opts.relay.tcp_relay_urls.push(own_tcp.clone());
            }
            Some(relay)
        }
    };
    opts.public.host = url_authority(&public_url)?.1;
    opts.public.reserved.push(crate::publish::Reserved {
        protocol: crate::model::ServiceProtocol::Tcp,
        first: addr.port(),
        last: addr.port(),
        what: "API, console and agents",
    });
    if let Some(er) = &cfg.relay {
        let udp = crate::model::ServiceProtocol::Udp;
        opts.public.reserved.push(crate::publish::Reserved {
            protocol: udp,
            first: er.udp_listen.port(),
            last: er.udp_listen.port(),
            what: "STUN/TURN",
        });
        if let Some(p) = er.stun_alt_port {
            opts.public.reserved.push(crate::publish::Reserved {
                protocol: udp,
                first: p,
                last: p,
                what: "the relay's alternate STUN port",
            });
        }
        opts.public.reserved.push(crate::publish::Reserved {
            protocol: udp,
            first: er.min_port,
            last: er.max_port,
            what: "TURN relay port range",
        });
    }
    // This replica and its relays join the network (and peers no live replica holds are
    // offline, whatever the database says after a crash).
    store
        .register_replica(&opts.relay.urls())
        .await
        .context("resetting connection state")?;
    store.spawn_replica_tasks(&cfg.database_url);
    // No agent of this process is connected yet: `tern expose` of offline agents ends.
    store
        .remove_ephemeral_services(None)
        .await
        .context("removing ephemeral public services")?;
    let publisher = crate::publish::Publisher::new(opts.public.clone());
    let state = AppState::new(store, opts)
        .await
        .context("loading server keys")?;
    let _ = state.publisher.set(publisher.clone());
    let _ = state.public_url.set(public_url.clone());
    if let Some(r) = &relay {
        let _ = state.relay_metrics.set(r.metrics.clone());
        let _ = state.relay_load.set(crate::state::OwnRelay {
            relay: r.clone(),
            meter: r.load.clone(),
            turn_urls: own_turn,
            tcp_url: own_tcp,
        });
        let _ = state.relay_udp.set(r.udp_addr);
    }
    let wireguard = match (&cfg.wireguard, &relay) {
        (Some(w), Some(r)) => {
            let socket = tokio::net::UdpSocket::bind(w.listen).await.with_context(|| {
                format!(
                    "binding the WireGuard endpoint on udp {} (another WireGuard on this port? choose another with --wireguard-listen, or --wireguard-listen off)",
                    w.listen
                )
            })?;
            // Bursts from devices wait here while the endpoint's task works (as on agents).
            if let Err(e) = tern_udp::force_buffers(&socket, 4 << 20) {
                tracing::debug!(error = %e, "WireGuard endpoint: default socket buffers (no CAP_NET_ADMIN)");
            }
            let port = socket.local_addr()?.port();
            let advertise = match &w.advertise {
                Some(a) => a.clone(),
                None => {
                    let host = url_authority(&public_url)?.1;
                    let local = host == "localhost"
                        || host
                            .trim_matches(['[', ']'])
                            .parse::<IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback());
                    if local {
                        warn!(%host, "WireGuard devices would be told to connect to {host}:{port}, which only this machine reaches: set --public-url (or --wireguard-endpoint) for real use");
                    }
                    format!("{host}:{port}")
                }
            };
            let gw = Arc::new(crate::wgdev::Gateway::new(
                &state.server_key,
                advertise.clone(),
            ));
            let _ = state.wireguard.set(gw.clone());
            info!(listen = %socket.local_addr()?, %advertise, "WireGuard endpoint for plain WireGuard devices");
            Some(tokio::spawn(crate::wgdev::run(
                gw,
                state.clone(),
                r.tcp.clone(),
                socket,
            )))
        }
        (Some(_), None) => {
            warn!("WireGuard devices need the embedded relay: the WireGuard endpoint is off");
            None
        }
        _ => None,
    };
    let mut router = crate::api::router(state.clone()).route_service(
        "/tern.management.v1.ManagementService/{*method}",
        crate::grpc::service(state.clone()),
    );
    let signal = cfg
        .signal
        .clone()
        .map(|o| Signal::new(state.peer_token_secret.clone(), o));
    if let Some(sig) = &signal {
        let _ = state.signal.set(sig.clone());
        if state.store.kind() == crate::store::DbKind::Postgres {
            // Replicas on one PostgreSQL reach each other's peers.
            tern_signal::bus::attach(sig, &cfg.database_url, state.store.replica())
                .context("linking signal to its replicas")?;
        }
        router = router.route_service("/tern.signal.v1.SignalService/{*method}", sig.service());
    }
    if let Some(r) = &relay {
        router = router.merge(r.router());
    }
    router = router
        .merge(crate::publish::router(state.clone()))
        .merge(metrics_router(state.clone()));
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(tern_relay::tls::serve_with(
        listener,
        router,
        cfg.tls.clone(),
        cfg.trusted_proxies.clone(),
        rx,
    ));
    let janitor = tokio::spawn(janitor(state.clone()));
    let expiry = tokio::spawn(expiry_watch(state.clone()));
    let indexer = tokio::spawn(state.clone().publish_indexes());
    let publisher = tokio::spawn(publisher.run(state.clone()));
    info!(%addr, %public_url, signal = signal.is_some(), relay = relay.is_some(), tls = cfg.tls.is_some(), "management listening");
    Ok(Running {
        addr,
        public_url,
        state,
        signal,
        relay,
        shutdown,
        task,
        janitor,
        expiry,
        indexer,
        publisher,
        wireguard,
    })
}

/// `/metrics`: the embedded relay's counters and those of public services (Prometheus text),
/// for admins only (a personal access token as the scraper's bearer token): service names,
/// ports and traffic are not for everyone who can reach the API port.
fn metrics_router(state: Arc<AppState>) -> axum::Router {
    async fn render(
        axum::extract::State(state): axum::extract::State<Arc<AppState>>,
        caller: crate::api::Admin,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        // Admins and auditors (a read-only auditor account's token is the right one for a
        // scraper); a `user` sees only their own devices anywhere else.
        if !caller.role().is_admin() && caller.role() != crate::model::Role::Auditor {
            tracing::info!(user = %caller.user.username, "metrics refused: not an admin or auditor");
            return crate::api::ApiError::Forbidden(
                "metrics are for admins and auditors; scrape with an auditor's access token".into(),
            )
            .into_response();
        }
        let mut out = state
            .relay_metrics
            .get()
            .map(|m| m.render())
            .unwrap_or_default();
        if let Some(p) = state.publisher.get() {
            match state.store.services().await {
                Ok(services) => out.push_str(&crate::publish::render_metrics(p, &services)),
                Err(e) => warn!(error = ?e, "metrics: cannot list public services"),
            }
        }
        ([("content-type", "text/plain; version=0.0.4")], out).into_response()
    }
    axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .with_state(state)
}

/// Takes peers off everyone's map when their login expires (whether or not they are online, and
/// without waiting for another change): records the expiry, which rebuilds the maps.
async fn expiry_watch(state: Arc<AppState>) {
    let mut changes = state.store.subscribe();
    loop {
        let idx = match state.net_index().await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = ?e, "login expiry watch: cannot read the network");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let now = crate::model::now_millis();
        let wait = idx
            .next_expiry()
            .map(|at| Duration::from_millis((at - now).max(0) as u64 + 20))
            .unwrap_or(Duration::from_secs(86_400));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let expired = idx.expired_by(crate::model::now_millis());
                if !expired.is_empty() {
                    if let Err(e) = state.store.logins_expired(&expired).await {
                        warn!(error = ?e, "could not record expired logins");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                changes.borrow_and_update();
            }
        }
    }
}

/// Periodic clean-up: ephemeral peers that stayed disconnected past their TTL.
async fn janitor(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        match state
            .store
            .remove_stale_ephemeral(crate::model::now_millis())
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed disconnected ephemeral peers"),
            Err(e) => warn!(error = ?e, "ephemeral peer clean-up failed"),
        }
    }
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://tern:hunter2@db/tern"),
            "postgres://tern:***@db/tern"
        );
        assert_eq!(
            super::redact_url("sqlite://data/tern.db"),
            "sqlite://data/tern.db"
        );
    }

    #[test]
    fn url_authority_keeps_the_port() {
        assert_eq!(
            super::url_authority("https://vpn.example.com:8443/x").expect("url"),
            (
                "vpn.example.com:8443".to_string(),
                "vpn.example.com".to_string()
            )
        );
        assert!(super::url_authority("not a url").is_err());
    }
}
