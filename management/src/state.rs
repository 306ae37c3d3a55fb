//! Shared state of a running management service: store, keys and secrets, the snapshot cache the
//! sync streams compute maps from, and the count of live sync streams per peer.

use crate::model::{Peer, PeerConnection};
use crate::netmap::{NetIndex, RelaySettings};
use crate::store::{Store, StoreError};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::SecretKey;
use tokio::sync::Mutex;

/// Options of the management service (the binaries fill them from flags/env).
#[derive(Clone, Debug)]
pub struct ManagementOptions {
    pub relay: RelaySettings,
    /// Relay credentials lifetime; re-issued on the sync stream when half of it has passed.
    pub relay_credentials_ttl: Duration,
    pub peer_token_ttl: Duration,
    pub admin_session_ttl: Duration,
    /// Shared with a separately deployed signal service; generated and stored if not given.
    pub peer_token_secret: Option<Vec<u8>>,
    /// Debounce window for network-map pushes after a change.
    pub sync_debounce: Duration,
    /// OIDC single sign-on for admins; off when None.
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// Public services (ports on the server carried to targets in the mesh).
    pub public: crate::publish::PublicOptions,
    /// A separately deployed signal service (gRPC URL) to tell when peers are removed or expire.
    pub signal_url: Option<String>,
}

impl Default for ManagementOptions {
    fn default() -> Self {
        ManagementOptions {
            relay: RelaySettings::default(),
            relay_credentials_ttl: Duration::from_secs(12 * 3600),
            peer_token_ttl: Duration::from_secs(3600),
            admin_session_ttl: Duration::from_secs(12 * 3600),
            peer_token_secret: None,
            sync_debounce: Duration::from_millis(150),
            oidc: None,
            public: crate::publish::PublicOptions::default(),
            signal_url: None,
        }
    }
}

/// A client's report about one route: (network, state code, reason in words).
pub type RouteReport = (ipnet::IpNet, String, String);

/// The relay embedded in this server: its load meter, and its URLs as the maps give them.
pub struct OwnRelay {
    /// The relay itself (to end a revoked peer's access at once).
    pub relay: Arc<tern_relay::Relay>,
    pub meter: Arc<tern_relay::load::LoadMeter>,
    pub turn_urls: Vec<String>,
    pub tcp_url: String,
}

pub struct AppState {
    pub store: Store,
    pub server_key: SecretKey,
    pub peer_token_secret: Vec<u8>,
    pub admin_secret: Vec<u8>,
    pub opts: ManagementOptions,
    pub oidc: Option<crate::oidc::OidcVerifier>,
    maps: Mutex<Option<(i64, Arc<NetIndex>)>>,
    /// The latest index, published by one task at most once per debounce interval, so a burst
    /// of changes (a fleet reconnecting) costs each stream one map per interval, not one per
    /// change.
    pub index: tokio::sync::watch::Sender<Option<Arc<NetIndex>>>,
    streams: std::sync::Mutex<HashMap<String, usize>>,
    /// Latest connection report per peer (in memory: it is live state, not configuration).
    connections: std::sync::Mutex<HashMap<String, (Instant, Vec<PeerConnection>)>>,
    /// Networks each online peer reaches without the tunnel (from its reports).
    reachable: std::sync::Mutex<HashMap<String, Vec<ipnet::IpNet>>>,
    /// The address each online peer's management connection comes from (its public address, as
    /// this server sees it).
    endpoints: std::sync::Mutex<HashMap<String, std::net::SocketAddr>>,
    /// Each online peer's last report about the routes it was given: (network, state, detail).
    route_reports: std::sync::Mutex<HashMap<String, Vec<RouteReport>>>,
    /// Bumped when a report changes which path any pair uses (not for RTT alone).
    conn_version: std::sync::atomic::AtomicU64,
    conn_summary: std::sync::Mutex<Option<CachedSummary>>,
    /// Counters of the relay running in this process, if any.
    pub relay_metrics: std::sync::OnceLock<Arc<tern_relay::metrics::Metrics>>,
    /// UDP address of the embedded relay, for the health probe.
    pub relay_udp: std::sync::OnceLock<std::net::SocketAddr>,
    /// The embedded relay's load meter and URLs.
    pub relay_load: std::sync::OnceLock<OwnRelay>,
    /// Asks other relays for their load (`relay_loads`), and its last answer (the relays sample
    /// once a second, so agents asking more often get that).
    http: reqwest::Client,
    loads: tokio::sync::Mutex<Option<(std::time::Instant, Vec<tern_relay::load::LoadReport>)>>,
    relay_health: Mutex<Option<(Instant, bool)>>,
    /// Password sign-in attempts per username and source.
    pub sign_in_throttle: std::sync::Mutex<crate::auth::SignInThrottle>,
    /// Device sign-in codes looked up that did not exist, per account (guessing is limited).
    pub code_misses: std::sync::Mutex<crate::auth::MissCounter>,
    /// argon2 off the async workers, bounded.
    pub passwords: crate::auth::PasswordPool,
    /// Sealed logins already used (replays are refused).
    pub login_replays: std::sync::Mutex<crate::auth::ReplayCache>,
    /// Public services: listeners, tunnels to agents, counters (set by the server at start).
    pub publisher: std::sync::OnceLock<Arc<crate::publish::Publisher>>,
    /// The signal service in this process, if any (told at once when a peer is revoked).
    pub signal: std::sync::OnceLock<Arc<tern_signal::Signal>>,
    /// The URL agents and admins use for this server (set at start).
    pub public_url: std::sync::OnceLock<String>,
    /// The endpoint of plain WireGuard devices, if it runs.
    pub wireguard: std::sync::OnceLock<Arc<crate::wgdev::Gateway>>,
}

/// (path-change version, 5-s time bucket) a cached connection summary was computed for.
type SummaryKey = (u64, i64);
/// (direct, relayed, connecting) pairs, with the key they were computed for.
type CachedSummary = (SummaryKey, (u64, u64, u64));

/// A report older than this is no longer shown (agents report at least every 30 s).
const REPORT_TTL: Duration = Duration::from_secs(75);

/// 32 random bytes, base64: the form of every generated server secret.
pub fn random_secret_b64() -> String {
    random_b64(32)
}

fn random_b64(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    STANDARD.encode(b)
}

impl AppState {
    /// A peer was deleted, its login expired or its user was disabled: the signal service (in
    /// this process, and a separate one at `signal_url`) closes its stream and refuses tokens
    /// issued until now, and it carries no public-service client any more (its tunnels close).
    pub fn revoke_peer(&self, peer_id: &str, key: tern_proto::PublicKey) {
        if let Some(p) = self.publisher.get() {
            p.cut(peer_id);
        }
        let now = crate::grpc::now_unix();
        // Relays: every credential issued until now expires by now + their lifetime.
        let expiring_by = now + self.opts.relay_credentials_ttl.as_secs() as i64;
        if let Some(own) = self.relay_load.get() {
            let relay = own.relay.clone();
            let id = peer_id.to_string();
            tokio::spawn(async move { relay.revoke(&id, expiring_by).await });
        }
        let others = self.separate_relays("/revoke");
        if !others.is_empty() && !self.opts.relay.secret.is_empty() {
            let token = tern_proto::relay_auth::revoke_token(&self.opts.relay.secret, now + 60);
            let body = tern_relay::revoke::RevokeRequest {
                peer_id: peer_id.to_string(),
                expiring_by,
            };
            let http = self.http.clone();
            tokio::spawn(async move {
                for url in others {
                    let sent = http
                        .post(&url)
                        .timeout(std::time::Duration::from_secs(3))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            tracing::debug!(%url, peer = %body.peer_id, "relay access revoked")
                        }
                        Ok(r) => {
                            tracing::warn!(%url, status = %r.status(), "a relay refused to revoke a removed peer's access (same --relay-secret on both?); its credentials lapse within their lifetime")
                        }
                        Err(e) => {
                            tracing::warn!(%url, error = %e, "could not tell a relay about a removed peer; its credentials lapse within their lifetime")
                        }
                    }
                }
            });
        }
        if let Some(sig) = self.signal.get() {
            sig.revoke(&[key], now);
        }
        if let Some(url) = self.opts.signal_url.clone() {
            let secret = self.peer_token_secret.clone();
            tokio::spawn(async move {
                if let Err(e) = revoke_remote(&url, &secret, key, now).await {
                    tracing::warn!(%url, error = %e, "could not tell the signal service about a removed peer; its token lapses within the token lifetime");
                }
            });
        }
    }

    /// A user was disabled: signal drops their devices at once (their sync streams close on the
    /// store's change, and their maps leave everyone else's).
    pub async fn revoke_user_devices(&self, user_id: &str) -> Result<usize, StoreError> {
        let peers = self.store.peers().await?;
        let mut n = 0;
        for p in peers
            .iter()
            .filter(|p| p.user_id.as_deref() == Some(user_id))
        {
            if let Ok(k) = p.wg_public_key.parse() {
                self.revoke_peer(&p.id, k);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Loads (or creates on first start) the server's keys and secrets from the store.
    pub async fn new(store: Store, mut opts: ManagementOptions) -> Result<Arc<Self>, StoreError> {
        let key = store
            .secret_or_create("management_x25519", || SecretKey::generate().to_base64())
            .await?;
        let server_key = SecretKey::from_base64(&key).map_err(|e| {
            StoreError::invalid(
                "management_x25519",
                format!("stored server key is corrupt: {e}"),
            )
        })?;
        let admin_secret = store
            .secret_or_create("admin_jwt_secret", || random_b64(32))
            .await?
            .into_bytes();
        let peer_token_secret = match opts.peer_token_secret.clone() {
            Some(s) => s,
            None => store
                .secret_or_create("peer_token_secret", || random_b64(32))
                .await?
                .into_bytes(),
        };
        if opts.relay.secret.is_empty() {
            opts.relay.secret = store
                .secret_or_create("relay_secret", || random_b64(32))
                .await?
                .into_bytes();
        }
        let oidc = match opts.oidc.clone() {
            Some(c) => Some(crate::oidc::OidcVerifier::new(c).map_err(|e| {
                StoreError::invalid("oidc", format!("cannot set up the OIDC client: {e}"))
            })?),
            None => None,
        };
        Ok(Arc::new(AppState {
            oidc,
            store,
            server_key,
            peer_token_secret,
            admin_secret,
            opts,
            maps: Mutex::new(None),
            index: tokio::sync::watch::Sender::new(None),
            streams: std::sync::Mutex::new(HashMap::new()),
            connections: std::sync::Mutex::new(HashMap::new()),
            reachable: std::sync::Mutex::new(HashMap::new()),
            route_reports: std::sync::Mutex::new(HashMap::new()),
            endpoints: std::sync::Mutex::new(HashMap::new()),
            conn_version: std::sync::atomic::AtomicU64::new(0),
            conn_summary: std::sync::Mutex::new(None),
            relay_metrics: std::sync::OnceLock::new(),
            relay_udp: std::sync::OnceLock::new(),
            relay_load: std::sync::OnceLock::new(),
            http: reqwest::Client::new(),
            loads: tokio::sync::Mutex::new(None),
            relay_health: Mutex::new(None),
            sign_in_throttle: std::sync::Mutex::new(Default::default()),
            code_misses: std::sync::Mutex::new(Default::default()),
            passwords: crate::auth::PasswordPool::new(),
            login_replays: std::sync::Mutex::new(Default::default()),
            publisher: std::sync::OnceLock::new(),
            signal: std::sync::OnceLock::new(),
            public_url: std::sync::OnceLock::new(),
            wireguard: std::sync::OnceLock::new(),
        }))
    }

    /// The index over the current snapshot; loaded once per network serial for all streams.
    pub async fn net_index(&self) -> Result<Arc<NetIndex>, StoreError> {
        let want = *self.store.subscribe().borrow();
        let mut cached = self.maps.lock().await;
        if let Some((serial, idx)) = cached.as_ref() {
            if *serial == want {
                return Ok(idx.clone());
            }
        }
        let snap = self.store.snapshot().await?;
        let mut idx = NetIndex::new(Arc::new(snap));
        if let Some((_, prev)) = cached.as_ref() {
            idx = idx.with_changes_since(prev);
        }
        let idx = Arc::new(idx);
        *cached = Some((want, idx.clone()));
        Ok(idx)
    }

    /// Publishes the index after every burst of store changes (debounced), until the store
    /// closes. Sync streams follow [`AppState::index`].
    pub async fn publish_indexes(self: Arc<Self>) {
        let mut changes = self.store.subscribe();
        loop {
            changes.borrow_and_update();
            match self.net_index().await {
                Ok(i) => {
                    self.index.send_replace(Some(i));
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "cannot compute the network index; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
            // A burst of changes produces one index.
            tokio::time::sleep(self.opts.sync_debounce).await;
        }
    }

    /// The TURN relays' own load: the embedded relay's, and that of every other relay of the
    /// network (separate `tern-relay`s, other replicas' relays) asked at its `/load` next to
    /// its TCP relay URL (within 1.5 s; one that does not answer is left out).
    pub async fn relay_loads(&self) -> Vec<tern_relay::load::LoadReport> {
        let mut cache = self.loads.lock().await;
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < tern_relay::load::SAMPLE_EVERY {
                return v.clone();
            }
        }
        let fresh = self.ask_relay_loads().await;
        *cache = Some((std::time::Instant::now(), fresh.clone()));
        fresh
    }

    async fn ask_relay_loads(&self) -> Vec<tern_relay::load::LoadReport> {
        use tern_relay::load::LoadReport;
        let mut out: Vec<LoadReport> = vec![];
        let own = self.relay_load.get();
        if let Some(o) = own {
            out.push(LoadReport {
                turn_urls: o.turn_urls.clone(),
                load: o.meter.load(),
            });
        }
        let others = self.separate_relays("/load");
        if others.is_empty() || self.opts.relay.secret.is_empty() {
            return out;
        }
        let token = tern_proto::relay_auth::load_token(
            &self.opts.relay.secret,
            crate::model::now_millis() / 1000 + 60,
        );
        let http = &self.http;
        let asks = others.iter().map(|url| {
            let req = http
                .get(url)
                .timeout(std::time::Duration::from_millis(1500))
                .bearer_auth(&token);
            async move {
                match req.send().await {
                    Ok(r) if r.status().is_success() => r.json::<LoadReport>().await.ok(),
                    Ok(r) => {
                        tracing::debug!(%url, status = %r.status(), "relay load refused");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(%url, error = %e, "relay load not answered");
                        None
                    }
                }
            }
        });
        // This server's own relay reached under another name counts once.
        out.extend(
            futures::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .filter(|r| own.is_none_or(|o| o.turn_urls != r.turn_urls)),
        );
        out
    }

    /// `path` on every relay this server hands out that does not run in this process (from
    /// their TCP-relay URLs: `wss://host/relay` → `https://host{path}`).
    fn separate_relays(&self, path: &str) -> Vec<String> {
        let own = self.relay_load.get();
        let replicas = self
            .index
            .borrow()
            .as_ref()
            .map(|i| i.snapshot().relays.clone())
            .unwrap_or_default();
        let all = self.opts.relay.with_replicas(&replicas);
        all.tcp_relay_urls
            .iter()
            .filter(|u| own.is_none_or(|o| o.tcp_url != **u))
            .filter_map(|u| {
                let http = u
                    .strip_prefix("wss://")
                    .map(|r| format!("https://{r}"))
                    .or_else(|| u.strip_prefix("ws://").map(|r| format!("http://{r}")))?;
                Some(format!("{}{path}", http.strip_suffix("/relay")?))
            })
            .collect()
    }

    /// The latest published index (or one computed now, before the first is published).
    pub async fn current_index(&self) -> Result<Arc<NetIndex>, StoreError> {
        let published = self.index.borrow().clone();
        match published {
            Some(i) => Ok(i),
            None => self.net_index().await,
        }
    }

    /// Records a sync stream opening; true if it is the peer's first live stream.
    pub fn stream_opened(&self, peer_id: &str) -> bool {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.entry(peer_id.to_string()).or_insert(0);
        *n += 1;
        let first = *n == 1;
        if first {
            // Paths between online peers are shown: who is online changed.
            self.conn_version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        first
    }

    /// Records a sync stream ending; true if it was the peer's last live stream.
    pub fn stream_closed(&self, peer_id: &str) -> bool {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        match s.get_mut(peer_id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                s.remove(peer_id);
                self.connections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(peer_id);
                self.reachable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(peer_id);
                self.route_reports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(peer_id);
                self.endpoints
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(peer_id);
                // Its paths vanish, also from the reports of peers that still list it.
                self.conn_version
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Whether the peer has a live sync stream (it is online).
    pub fn has_stream(&self, peer_id: &str) -> bool {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(peer_id)
    }

    /// Records the networks a peer reaches without the tunnel (from its report).
    pub fn set_reachable(&self, peer_id: &str, nets: Vec<ipnet::IpNet>) {
        self.reachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer_id.to_string(), nets);
    }

    /// Records where a peer's management connection comes from.
    pub fn set_endpoint(&self, peer_id: &str, addr: std::net::SocketAddr) {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer_id.to_string(), addr);
    }

    /// Records what became of the routes a peer was given (from its report).
    pub fn set_route_reports(&self, peer_id: &str, routes: Vec<RouteReport>) {
        self.route_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer_id.to_string(), routes);
    }

    /// What each online client reported about `route`'s network, by name.
    pub fn route_clients(
        &self,
        route: &crate::model::Route,
        peers: &[Peer],
    ) -> Vec<crate::model::RouteClient> {
        let reports = self.route_reports.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<crate::model::RouteClient> = peers
            .iter()
            .filter_map(|p| {
                let (_, state, detail) = reports
                    .get(&p.id)?
                    .iter()
                    .find(|(n, _, _)| *n == route.network)?;
                Some(crate::model::RouteClient {
                    peer_id: p.id.clone(),
                    peer_name: p.name.clone(),
                    state: state.clone(),
                    detail: detail.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.peer_name.cmp(&b.peer_name));
        out
    }

    /// The networks `peer_id` last reported reaching without the tunnel (empty if offline).
    pub fn reachable_of(&self, peer_id: &str) -> Vec<ipnet::IpNet> {
        self.reachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether a routing peer serves `route` now, in words, from the routing peers' reports.
    pub fn route_serving(&self, route: &crate::model::Route, peers: &[Peer]) -> String {
        if !route.enabled {
            return "not served: the route is disabled".into();
        }
        let candidates: Vec<&Peer> = match (&route.routing_peer, &route.routing_group) {
            (Some(id), _) => peers.iter().filter(|p| &p.id == id).collect(),
            (None, Some(g)) => peers.iter().filter(|p| p.groups.contains(g)).collect(),
            (None, None) => vec![],
        };
        if candidates.is_empty() {
            return "not served: no routing peer".into();
        }
        let reach = self.reachable.lock().unwrap_or_else(|e| e.into_inner());
        let net = route.network;
        let overlaps = |n: &ipnet::IpNet| n.contains(&net.network()) || net.contains(&n.network());
        let mut why = vec![];
        for p in &candidates {
            if !p.approved {
                why.push(format!("{} awaits approval", p.name));
            } else if !self.has_stream(&p.id) {
                why.push(format!("{} is offline", p.name));
            } else {
                match reach.get(&p.id) {
                    None => why.push(format!("{} has not reported its networks yet", p.name)),
                    Some(nets) if nets.iter().any(overlaps) => {
                        return format!("served by {}", p.name);
                    }
                    Some(nets) => {
                        let has: Vec<String> = nets
                            .iter()
                            .filter(|n| n.addr().is_ipv4() == net.addr().is_ipv4())
                            .take(4)
                            .map(|n| n.to_string())
                            .collect();
                        why.push(format!(
                            "{} has no route to {net}{}",
                            p.name,
                            if has.is_empty() {
                                String::new()
                            } else {
                                format!(" (it reaches {})", has.join(", "))
                            }
                        ))
                    }
                }
            }
        }
        format!("not served: {}", why.join("; "))
    }

    /// Records an agent's connection report, replacing its previous one.
    pub fn set_connections(&self, peer_id: &str, conns: Vec<PeerConnection>) {
        let shape = |cs: &[PeerConnection]| {
            cs.iter()
                .map(|c| (c.peer_id.clone(), c.kind.clone()))
                .collect::<Vec<_>>()
        };
        let new_shape = shape(&conns);
        let old = self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer_id.to_string(), (Instant::now(), conns));
        if old.is_none_or(|(_, o)| shape(&o) != new_shape) {
            self.conn_version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Validator of the peer list: changes with every network change, every change of path
    /// between peers, and at least every 30 s (RTTs, last login details).
    pub fn peers_etag(&self) -> String {
        let serial = *self.store.subscribe().borrow();
        let paths = self.conn_version.load(std::sync::atomic::Ordering::Relaxed);
        let bucket = crate::model::now_millis() / 30_000;
        format!("\"p{serial}-{paths}-{bucket}\"")
    }

    /// Distinct peer pairs by path kind (direct, relayed, connecting), from live reports.
    /// Recomputed when a path changes, and at most every 5 s otherwise (reports age out).
    pub fn connection_summary(&self) -> (u64, u64, u64) {
        let key = (
            self.conn_version.load(std::sync::atomic::Ordering::Relaxed),
            crate::model::now_millis() / 5_000,
        );
        let mut cached = self.conn_summary.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, v)) = *cached {
            if k == key {
                return v;
            }
        }
        // Only pairs of online peers: a peer that went offline takes its paths with it, also
        // from the reports of the peers that still list it.
        let online: std::collections::HashSet<String> = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
        let (mut direct, mut relayed, mut connecting) = (0, 0, 0);
        for (peer, (at, conns)) in map.iter() {
            if at.elapsed() >= REPORT_TTL || !online.contains(peer) {
                continue;
            }
            for c in conns.iter().filter(|c| online.contains(&c.peer_id)) {
                let (a, b) = (peer.as_str(), c.peer_id.as_str());
                if !seen.insert(if a < b { (a, b) } else { (b, a) }) {
                    continue;
                }
                match c.kind.as_str() {
                    "direct" => direct += 1,
                    "turn_relay" | "tcp_relay" => relayed += 1,
                    _ => connecting += 1,
                }
            }
        }
        *cached = Some((key, (direct, relayed, connecting)));
        (direct, relayed, connecting)
    }

    /// Fills in the reported connections of online peers (only to peers that exist and are
    /// online: an offline peer's paths vanish from everyone's list at once).
    pub fn with_connections(&self, peers: &mut [Peer]) {
        if let Some(w) = self.wireguard.get() {
            w.fill_live(peers);
        }
        let known: std::collections::HashSet<String> = peers
            .iter()
            .filter(|p| p.connected)
            .map(|p| p.id.clone())
            .collect();
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        for p in peers.iter_mut().filter(|p| p.connected) {
            p.endpoint = endpoints.get(&p.id).map(|a| a.to_string());
        }
        drop(endpoints);
        let map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for p in peers.iter_mut().filter(|p| p.connected) {
            if let Some((at, conns)) = map.get(&p.id) {
                if at.elapsed() < REPORT_TTL {
                    p.connections = conns
                        .iter()
                        .filter(|c| known.contains(&c.peer_id))
                        .cloned()
                        .collect();
                }
            }
        }
    }

    /// Whether the embedded relay answers a STUN binding request (None: no embedded relay).
    /// Probed at most every 5 s.
    pub async fn relay_healthy(&self) -> Option<bool> {
        let addr = *self.relay_udp.get()?;
        let mut cached = self.relay_health.lock().await;
        if let Some((at, ok)) = *cached {
            if at.elapsed() < Duration::from_secs(5) {
                return Some(ok);
            }
        }
        let ok = stun_probe(addr).await;
        if !ok {
            tracing::warn!(%addr, "embedded relay did not answer a STUN probe");
        }
        *cached = Some((Instant::now(), ok));
        Some(ok)
    }
}

/// Sends one STUN Binding request (RFC 8489) and waits up to 1 s for the matching success reply.
async fn stun_probe(mut addr: std::net::SocketAddr) -> bool {
    use rand::RngCore;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let bind: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    let mut req = [0u8; 20];
    req[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    rand::rngs::OsRng.fill_bytes(&mut req[8..20]);
    if sock.send_to(&req, addr).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    let wait = async {
        loop {
            match sock.recv_from(&mut buf).await {
                Ok((n, from)) if from.port() == addr.port() && n >= 20 => {
                    // Binding success response with our transaction id.
                    if buf[0..2] == [0x01, 0x01] && buf[8..20] == req[8..20] {
                        return true;
                    }
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .unwrap_or(false)
}

/// `Revoke` on a separately deployed signal service.
async fn revoke_remote(
    url: &str,
    secret: &[u8],
    key: tern_proto::PublicKey,
    now: i64,
) -> anyhow::Result<()> {
    use tern_proto::signal::signal_service_client::SignalServiceClient;
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let token = tern_proto::token::issue_revoke_token(secret, now)?;
    let mut req = tonic::Request::new(tern_proto::signal::RevokeRequest {
        keys: vec![key.0.to_vec()],
        revoked_at_unix: now,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    SignalServiceClient::new(ch).revoke(req).await?;
    Ok(())
}
