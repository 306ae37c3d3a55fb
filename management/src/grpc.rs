//! The agent-facing gRPC `ManagementService`: server key, sealed login/registration, and the
//! network-map `Sync` stream (full map first, then a new map within the debounce window of any
//! change that alters it; relay credentials re-issued at half their lifetime).

use crate::state::AppState;
use crate::store::{PeerMeta, StoreError};
use prost::Message;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tern_proto::management as pb;
use tern_proto::management::management_service_server::{
    ManagementService, ManagementServiceServer,
};
use tern_proto::token::{bearer, issue_peer_token, verify_peer_token};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

pub struct AgentService {
    state: Arc<AppState>,
}

pub fn service(state: Arc<AppState>) -> ManagementServiceServer<AgentService> {
    ManagementServiceServer::new(AgentService { state })
}

pub fn now_unix() -> i64 {
    crate::model::now_millis() / 1000
}

/// Maps store errors to gRPC statuses; internal details are logged, not sent.
pub fn status_from(e: StoreError) -> Status {
    match e {
        StoreError::Denied(m) => Status::permission_denied(m),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Conflict(m) => Status::failed_precondition(m),
        StoreError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Db(_) | StoreError::Migrate(_) => {
            tracing::error!(error = ?e, "store failure");
            Status::internal("management storage error; see server logs")
        }
    }
}

fn meta_from(m: Option<pb::PeerMeta>) -> PeerMeta {
    let m = m.unwrap_or_default();
    let clip = |s: String| s.chars().take(128).collect::<String>();
    PeerMeta {
        hostname: clip(m.hostname),
        os: clip(m.os),
        agent_version: clip(m.agent_version),
    }
}

/// Largest connection report accepted (one entry per remote peer).
const MAX_REPORTED: usize = 10_000;

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::SyncResponse, Status>> + Send>>;

/// What a sync stream's queue holds, boxed: the queue allocates its slots 32 at a time, and 32
/// unboxed messages (a map and a delta inline, plus a status) took 31 kB per stream, idle or not.
type SyncItem = Box<Result<pb::SyncResponse, Status>>;

/// How often an agent asks whether its code was approved.
const DEVICE_POLL_SECS: u32 = 2;

/// Refuses a sealed request whose timestamp is too far from the server clock (replay, or a
/// clock that needs fixing).
fn check_timestamp(ts: i64) -> Result<(), Status> {
    let skew = (now_unix() - ts).abs();
    if skew > tern_proto::LOGIN_MAX_SKEW_SECS {
        return Err(Status::unauthenticated(format!(
            "login timestamp is {skew} s away from the server clock (max {} s): check the agent's clock",
            tern_proto::LOGIN_MAX_SKEW_SECS
        )));
    }
    Ok(())
}

impl AgentService {
    /// Opens a message sealed to the server's key: who sealed it, and its body; a message seen
    /// before is refused (replay), by this process or, through the database, by any replica
    /// and before a restart.
    async fn open_sealed(
        &self,
        sealed: &pb::SealedMessage,
    ) -> Result<(tern_proto::PublicKey, Vec<u8>), Status> {
        let (agent_key, body) = tern_proto::open(&self.state.server_key, sealed).map_err(|e| {
            debug!(error = %e, "login could not be opened");
            Status::unauthenticated(format!(
                "{e}: is the agent using this server's current key?"
            ))
        })?;
        let id = crate::auth::ReplayCache::id(&sealed.sender_public_key, &sealed.nonce);
        let now = now_unix();
        let mut fresh = id.is_some_and(|id| {
            self.state
                .login_replays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first_use(id, now)
        });
        if let (true, Some(id)) = (fresh, id) {
            fresh = self
                .state
                .store
                .first_login_use(&hex::encode(id), now, now + crate::auth::ReplayCache::TTL)
                .await
                .map_err(status_from)?;
        }
        if !fresh {
            info!(key = %agent_key, "login refused: a replayed message");
            return Err(Status::unauthenticated(
                "this login message was already used: an agent seals a fresh one for every login",
            ));
        }
        Ok((agent_key, body))
    }

    fn seal_to(
        &self,
        agent_key: &tern_proto::PublicKey,
        msg: &impl Message,
    ) -> Result<Response<pb::SealedMessage>, Status> {
        let sealed = tern_proto::seal(&self.state.server_key, agent_key, &msg.encode_to_vec())
            .map_err(|_| Status::internal("could not seal the response"))?;
        Ok(Response::new(sealed))
    }

    /// The peer a request's token names, if its sync stream is open (it is online).
    fn online_peer(&self, md: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        let token = bearer(md).ok_or_else(|| Status::unauthenticated("missing peer token"))?;
        let id = verify_peer_token(&self.state.peer_token_secret, token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if !self.state.has_stream(&id.peer_id) {
            return Err(Status::failed_precondition(
                "open the sync stream first (the agent is not connected)",
            ));
        }
        Ok(id.peer_id)
    }

    fn publisher(&self) -> Result<&Arc<crate::publish::Publisher>, Status> {
        self.state
            .publisher
            .get()
            .ok_or_else(|| Status::unavailable("public services are not served by this process"))
    }
}

/// A CIDR in canonical form (a bare address: that host), for `tern expose --allow`.
fn source_net(s: &str) -> Result<ipnet::IpNet, Status> {
    if let Ok(ip) = s.trim().parse::<std::net::IpAddr>() {
        return Ok(ip.into());
    }
    let n: ipnet::IpNet = s.trim().parse().map_err(|_| {
        Status::invalid_argument(format!(
            "{s:?} is not a network in CIDR notation, e.g. 198.51.100.0/24"
        ))
    })?;
    if n.trunc() != n {
        return Err(Status::invalid_argument(format!(
            "{n} has host bits set; did you mean {}?",
            n.trunc()
        )));
    }
    Ok(n)
}

#[tonic::async_trait]
impl ManagementService for AgentService {
    async fn get_server_key(
        &self,
        _: Request<pb::ServerKeyRequest>,
    ) -> Result<Response<pb::ServerKeyResponse>, Status> {
        Ok(Response::new(pb::ServerKeyResponse {
            public_key: self.state.server_key.public_key().0.to_vec(),
            server_time_unix: now_unix(),
        }))
    }

    async fn login(
        &self,
        req: Request<pb::SealedMessage>,
    ) -> Result<Response<pb::SealedMessage>, Status> {
        let (agent_key, body) = self.open_sealed(&req.into_inner()).await?;
        let login = pb::LoginRequest::decode(body.as_slice())
            .map_err(|_| Status::invalid_argument("login request body is not a LoginRequest"))?;
        check_timestamp(login.timestamp_unix)?;
        let meta = meta_from(login.meta);
        let refused = |e: StoreError| {
            if let StoreError::Denied(m) = &e {
                info!(key = %agent_key, reason = %m, "login refused");
            }
            status_from(e)
        };
        let out = if !login.device_code.is_empty() {
            let code = crate::store::normalize_user_code(&login.device_code)
                .ok_or_else(|| Status::invalid_argument("malformed device code"))?;
            match self
                .state
                .store
                .login_device(&agent_key.to_base64(), &code, &meta)
                .await
                .map_err(refused)?
            {
                crate::store::DeviceLoginResult::Pending => {
                    return Err(Status::failed_precondition(
                        "waiting for someone to approve the code in the console",
                    ))
                }
                crate::store::DeviceLoginResult::Done(out) => *out,
            }
        } else {
            let setup_key = (!login.setup_key.is_empty()).then_some(login.setup_key.as_str());
            self.state
                .store
                .login_peer(&agent_key.to_base64(), setup_key, &meta)
                .await
                .map_err(refused)?
        };
        if out.registered {
            info!(peer = %out.peer.id, name = %out.peer.name, ip = %out.peer.overlay_ip, owner = ?out.peer.owner, "peer registered");
        } else {
            debug!(peer = %out.peer.id, "peer logged in");
        }
        let (token, exp) = issue_peer_token(
            &self.state.peer_token_secret,
            &out.peer.id,
            &agent_key,
            now_unix(),
            self.state.opts.peer_token_ttl.as_secs() as i64,
        )
        .map_err(|_| Status::internal("could not issue peer token"))?;
        let settings = self.state.store.settings().await.map_err(status_from)?;
        let resp = pb::LoginResponse {
            peer_token: token,
            token_expires_unix: exp,
            peer_config: Some(crate::netmap::peer_config(&out.peer, &settings)),
            peer_id: out.peer.id.clone(),
        };
        self.seal_to(&agent_key, &resp)
    }

    async fn start_device_login(
        &self,
        req: Request<pb::SealedMessage>,
    ) -> Result<Response<pb::SealedMessage>, Status> {
        let source = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_default();
        let (agent_key, body) = self.open_sealed(&req.into_inner()).await?;
        let r = pb::DeviceLoginRequest::decode(body.as_slice()).map_err(|_| {
            Status::invalid_argument("device login body is not a DeviceLoginRequest")
        })?;
        check_timestamp(r.timestamp_unix)?;
        let meta = meta_from(r.meta);
        let (code, expires_at) = self
            .state
            .store
            .start_device_login(&agent_key.to_base64(), &meta, &source)
            .await
            .map_err(status_from)?;
        info!(key = %agent_key, hostname = %meta.hostname, %source, "device sign-in started");
        let base = self
            .state
            .public_url
            .get()
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_default();
        let resp = pb::DeviceLoginResponse {
            verification_url: if base.is_empty() {
                String::new()
            } else {
                format!("{base}/device")
            },
            verification_url_complete: if base.is_empty() {
                String::new()
            } else {
                format!("{base}/device?code={code}")
            },
            user_code: code,
            expires_unix: expires_at / 1000,
            interval_secs: DEVICE_POLL_SECS,
        };
        self.seal_to(&agent_key, &resp)
    }

    type SyncStream = SyncStream;

    async fn report_status(
        &self,
        req: Request<pb::StatusReport>,
    ) -> Result<Response<pb::StatusAck>, Status> {
        // Reports describe online peers; dropped with the stream, so none outlive their peer.
        let peer_id = self.online_peer(req.metadata())?;
        let report = req.into_inner();
        if report.connections.len() > MAX_REPORTED {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORTED} connections per report"
            )));
        }
        let mut conns = Vec::with_capacity(report.connections.len());
        for c in report.connections {
            if c.peer_id.is_empty() || c.peer_id.len() > 64 {
                return Err(Status::invalid_argument("peer_id must be 1-64 characters"));
            }
            if !matches!(
                c.kind.as_str(),
                "direct" | "turn_relay" | "tcp_relay" | "connecting"
            ) {
                return Err(Status::invalid_argument(format!(
                    "unknown connection kind {:?}",
                    c.kind.chars().take(32).collect::<String>()
                )));
            }
            if c.reason_code.len() > 40
                || !c
                    .reason_code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                return Err(Status::invalid_argument(format!(
                    "malformed path reason code {:?} (lower-case letters and '_', at most 40)",
                    c.reason_code.chars().take(40).collect::<String>()
                )));
            }
            conns.push(crate::model::PeerConnection {
                peer_id: c.peer_id,
                kind: c.kind,
                rtt_ms: (c.rtt_ms > 0).then_some(c.rtt_ms),
                reason: (!c.reason_code.is_empty()).then_some(c.reason_code),
                peer_name: None,
                loss_pct: (c.probes_settled >= 3 && c.probes_lost <= c.probes_settled)
                    .then(|| (c.probes_lost * 100 / c.probes_settled) as u8),
            });
        }
        if report.reachable_networks.len() > 1024 {
            return Err(Status::invalid_argument(
                "at most 1024 reachable networks per report",
            ));
        }
        let mut nets = Vec::with_capacity(report.reachable_networks.len());
        for n in &report.reachable_networks {
            let net: ipnet::IpNet = n.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "reachable network {:?} is not a CIDR",
                    n.chars().take(64).collect::<String>()
                ))
            })?;
            nets.push(net.trunc());
        }
        if report.routes.len() > 1024 {
            return Err(Status::invalid_argument(
                "at most 1024 route reports per report",
            ));
        }
        let mut routes = Vec::with_capacity(report.routes.len());
        for r in &report.routes {
            let net: ipnet::IpNet = r.network.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "route report network {:?} is not a CIDR",
                    r.network.chars().take(64).collect::<String>()
                ))
            })?;
            if !matches!(
                r.state.as_str(),
                "installed" | "conflict" | "unserved" | "failed" | "no_access"
            ) {
                return Err(Status::invalid_argument(format!(
                    "unknown route state {:?}",
                    r.state.chars().take(32).collect::<String>()
                )));
            }
            routes.push((
                net.trunc(),
                r.state.clone(),
                r.detail.chars().take(300).collect(),
            ));
        }
        debug!(peer = %peer_id, connections = conns.len(), networks = nets.len(), routes = routes.len(), "status report");
        self.state.set_connections(&peer_id, conns);
        self.state.set_reachable(&peer_id, nets);
        self.state.set_route_reports(&peer_id, routes);
        Ok(Response::new(pb::StatusAck {}))
    }

    async fn expose(
        &self,
        req: Request<pb::ExposeRequest>,
    ) -> Result<Response<pb::ExposeResponse>, Status> {
        use crate::model::ServiceProtocol;
        let peer_id = self.online_peer(req.metadata())?;
        let p = self.publisher()?;
        let r = req.into_inner();
        let protocol: ServiceProtocol = r.protocol.parse().map_err(Status::invalid_argument)?;
        let local_port = u16::try_from(r.local_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{} is not a port (1-65535)", r.local_port))
            })?;
        let (first, last) = p.opts.ports.ok_or_else(|| {
            Status::failed_precondition(
                "public services are switched off on this server (--public-ports)",
            )
        })?;
        let public_port = match r.public_port {
            0 => None,
            n => {
                let n = u16::try_from(n)
                    .map_err(|_| Status::invalid_argument(format!("{n} is not a port")))?;
                p.opts
                    .check_port(protocol, n)
                    .and_then(|()| p.check_free(protocol, n))
                    .map_err(Status::invalid_argument)?;
                Some(n)
            }
        };
        let mut allowed_sources = r
            .allowed_sources
            .iter()
            .map(|s| source_net(s))
            .collect::<Result<Vec<_>, _>>()?;
        if allowed_sources.is_empty() {
            allowed_sources = vec![
                "0.0.0.0/0".parse().map_err(|_| Status::internal("cidr"))?,
                "::/0".parse().map_err(|_| Status::internal("cidr"))?,
            ];
        }
        let taken = |proto: ServiceProtocol, port: u16| {
            p.opts.check_port(proto, port).is_err() || p.check_free(proto, port).is_err()
        };
        let s = self
            .state
            .store
            .expose(
                &peer_id,
                crate::store::ExposeInput {
                    protocol,
                    local_port,
                    public_port,
                    ports: first..=last,
                    taken: &taken,
                    allowed_sources,
                    max_per_peer: p.opts.max_exposed_per_peer,
                },
            )
            .await
            .map_err(status_from)?;
        info!(peer = %peer_id, service = %s.name, port = s.public_port, protocol = protocol.as_str(), "port exposed");
        Ok(Response::new(pb::ExposeResponse {
            service_id: s.id,
            name: s.name,
            public_address: p.opts.address(s.public_port),
            allowed_sources: s.allowed_sources.iter().map(|n| n.to_string()).collect(),
        }))
    }

    async fn relay_load(
        &self,
        req: Request<pb::RelayLoadRequest>,
    ) -> Result<Response<pb::RelayLoadResponse>, Status> {
        // As for a map: a connected peer on the network (not one awaiting approval, removed or
        // whose user is disabled: those get no relay from their map either).
        let peer_id = self.online_peer(req.metadata())?;
        let on_network = self
            .state
            .store
            .peer(&peer_id)
            .await
            .map_err(status_from)?
            .on_network();
        if !on_network {
            return Err(Status::permission_denied(
                "this peer is not on the network (awaiting approval, or its user is disabled)",
            ));
        }
        let relays = self
            .state
            .relay_loads()
            .await
            .into_iter()
            .map(|r| {
                let (l, urls) = (r.load, r.turn_urls);
                // Tern's TURN usernames are `<expiry>:<peer id>`.
                let mine = l
                    .per_allocation
                    .iter()
                    .filter(|a| a.user.split_once(':').is_some_and(|(_, p)| p == peer_id));
                let (bits, datagrams) = mine.fold((0.0, 0.0), |(b, d), a| {
                    (b + a.bits_per_sec, d + a.datagrams_per_sec)
                });
                pb::TurnRelayLoad {
                    urls,
                    datagrams_per_sec: l.datagrams_per_sec,
                    bits_per_sec: l.bits_per_sec,
                    send_drops_per_sec: l.send_drops_per_sec,
                    receive_drops_per_sec: l.receive_drops_per_sec,
                    unsent_bytes: l.unsent_bytes,
                    queue_ms: l.queue_ms.unwrap_or(0.0),
                    allocations: l.allocations,
                    overloaded: l.overloaded,
                    why: l.why,
                    yours_bits_per_sec: bits,
                    yours_datagrams_per_sec: datagrams,
                    window_secs: l.window_secs,
                }
            })
            .collect();
        Ok(Response::new(pb::RelayLoadResponse { relays }))
    }

    async fn unexpose(
        &self,
        req: Request<pb::UnexposeRequest>,
    ) -> Result<Response<pb::UnexposeResponse>, Status> {
        let token =
            bearer(req.metadata()).ok_or_else(|| Status::unauthenticated("missing peer token"))?;
        let id = verify_peer_token(&self.state.peer_token_secret, token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let r = req.into_inner();
        self.state
            .store
            .unexpose(&id.peer_id, &r.service_id)
            .await
            .map_err(status_from)?;
        info!(peer = %id.peer_id, service = %r.service_id, "port no longer exposed");
        Ok(Response::new(pb::UnexposeResponse {}))
    }

    async fn sync(&self, req: Request<pb::SyncRequest>) -> Result<Response<SyncStream>, Status> {
        let deltas = req.get_ref().accepts_deltas;
        let token =
            bearer(req.metadata()).ok_or_else(|| Status::unauthenticated("missing peer token"))?;
        let id = verify_peer_token(&self.state.peer_token_secret, token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let peer = self
            .state
            .store
            .peer(&id.peer_id)
            .await
            .map_err(status_from)?;
        if peer.wg_public_key != id.key.to_base64() {
            return Err(Status::unauthenticated(
                "peer token does not match the registered key",
            ));
        }
        if let Some(axum::extract::ConnectInfo(addr)) = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        {
            self.state.set_endpoint(&peer.id, *addr);
        }
        let (tx, rx) = mpsc::channel(4);
        let state = self.state.clone();
        if state.stream_opened(&peer.id) {
            state
                .store
                .set_peer_connected(&peer.id, true)
                .await
                .map_err(status_from)?;
            info!(peer = %peer.id, name = %peer.name, "peer connected");
        }
        tokio::spawn(async move {
            let peer_id = peer.id.clone();
            if let Err(e) = run_sync(&state, &peer_id, id.key, &tx, deltas).await {
                debug!(peer = %peer_id, error = %e.message(), "sync stream ended with error");
                let _ = tx.send(Box::new(Err(e))).await;
            }
            if state.stream_closed(&peer_id) {
                match state.store.set_peer_connected(&peer_id, false).await {
                    Ok(()) => info!(peer = %peer_id, "peer disconnected"),
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e) => {
                        warn!(peer = %peer_id, error = ?e, "could not mark peer disconnected")
                    }
                }
                // Its `tern expose` ports end with it.
                match state.store.remove_ephemeral_services(Some(&peer_id)).await {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(peer = %peer_id, removed = n, "ephemeral public services removed")
                    }
                    Err(e) => {
                        warn!(peer = %peer_id, error = ?e, "could not remove ephemeral services")
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|item| *item),
        )))
    }
}

/// Room for a map to grow (a peer coming online adds two bytes) when it is written where the last
/// one fitted; a buffer with more spare room is shrunk before a stream keeps it (10,000 streams
/// whose maps grew by a few bytes held a quarter of a gigabyte in doubled buffers).
const SPARE: usize = 256;

/// The last map a stream sent, kept encoded with serial 0: a third of the memory of the decoded
/// map (thousands of streams each hold one), compared in one pass, and the delta to the next map
/// made from the bytes (`mapdelta::delta_encoded`), decoding only what changed.
#[derive(Default)]
pub struct LastSent(Option<(Vec<u8>, u64)>);

impl LastSent {
    /// The message that brings the agent from the last map sent to `map`, or None when nothing
    /// but the serial differs (`map` is then the last map sent): the first map, and every map for
    /// an agent that does not take deltas, whole; later ones as the change since the last one
    /// sent, unless that is no smaller.
    pub fn push(&mut self, mut map: pb::NetworkMap, deltas: bool) -> Option<pb::SyncResponse> {
        let serial = std::mem::take(&mut map.serial);
        let encoded = map.encode_to_vec();
        map.serial = serial;
        self.push_encoded(encoded, serial, deltas, || map)
    }

    /// As `push`, for a map given encoded without its serial; `whole` gives the same map decoded,
    /// called only when the map is sent whole.
    pub fn push_encoded(
        &mut self,
        mut encoded: Vec<u8>,
        serial: u64,
        deltas: bool,
        whole: impl FnOnce() -> pb::NetworkMap,
    ) -> Option<pb::SyncResponse> {
        let delta = match &self.0 {
            Some((bytes, _)) if *bytes == encoded => return None,
            Some((bytes, old_serial)) if deltas => {
                match tern_proto::mapdelta::delta_encoded(bytes, *old_serial, &encoded, serial) {
                    // Sent when smaller than the whole map with its serial.
                    Ok(Some(d)) if d.encoded_len() < encoded.len() + serial_len(serial) => Some(d),
                    Ok(_) => None,
                    Err(e) => {
                        warn!(error = %e, "a network map could not be compared: sending it whole");
                        None
                    }
                }
            }
            _ => None,
        };
        let msg = match delta {
            Some(d) => pb::SyncResponse {
                network_map: None,
                delta: Some(d),
            },
            None => pb::SyncResponse {
                network_map: Some(pb::NetworkMap { serial, ..whole() }),
                delta: None,
            },
        };
        // Kept per stream for as long as it lasts: no spare capacity from a buffer that grew.
        if encoded.capacity() > encoded.len() + SPARE {
            encoded.shrink_to_fit();
        }
        self.0 = Some((encoded, serial));
        Some(msg)
    }

    /// The serial of the last map sent, if any was.
    pub fn serial(&self) -> Option<u64> {
        self.0.as_ref().map(|(_, s)| *s)
    }

    /// The size of the last map sent, encoded without its serial (0 before the first).
    pub fn encoded_len(&self) -> usize {
        self.0.as_ref().map_or(0, |(b, _)| b.len())
    }
}

/// The bytes a map's serial field takes.
fn serial_len(serial: u64) -> usize {
    if serial == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(serial)
    }
}

/// Pushes maps until the client goes away or the peer is deleted.
async fn run_sync(
    state: &AppState,
    peer_id: &str,
    key: tern_proto::PublicKey,
    tx: &mpsc::Sender<SyncItem>,
    deltas: bool,
) -> Result<(), Status> {
    // Published indexes (one per burst of changes); the first map from a fresh one, so a peer
    // that just registered is in it.
    let mut indexes = state.index.subscribe();
    let mut idx = state.current_index().await.map_err(status_from)?;
    if !idx.contains(peer_id) {
        // Registered after the last published index: a fresh one (the cost of one snapshot,
        // paid by a newcomer, not by every reconnecting peer).
        idx = state.net_index().await.map_err(status_from)?;
    }
    let serial = |i: &crate::netmap::NetIndex| i.snapshot().settings.network_serial;
    let ttl = state.opts.relay_credentials_ttl.as_secs().max(60) as i64;
    let mut creds_expiry = now_unix() + ttl;
    let mut last = LastSent::default();
    // The new index changed nothing this peer's map depends on (see `NetIndex::since`).
    let mut unchanged = false;
    loop {
        // Checked before every push and credential refresh: a deleted or expired peer gets
        // nothing more, and signal forgets it.
        if let Some(why) = idx.refused(peer_id) {
            info!(peer = %peer_id, reason = %why, "sync stream closed");
            state.revoke_peer(peer_id, key);
            return Err(Status::permission_denied(why));
        }
        let login_expires = idx.login_expires_at(peer_id);
        if login_expires.is_some_and(|at| crate::model::now_millis() >= at) {
            info!(peer = %peer_id, "peer login expired: sync stream closed");
            state.revoke_peer(peer_id, key);
            return Err(Status::unauthenticated(
                crate::store::login_expired_message(idx.is_user_device(peer_id)),
            ));
        }
        let relay = &state.opts.relay;
        let deleted = || {
            state.revoke_peer(peer_id, key);
            Err(Status::not_found(
                "this peer was deleted by an administrator",
            ))
        };
        let msg = if std::mem::take(&mut unchanged) {
            None
        } else if deltas && last.serial().is_some() {
            // Written as bytes and compared with the last ones: the map is built whole only if
            // it is sent whole.
            let mut bytes = Vec::with_capacity(last.encoded_len() + SPARE);
            let Some(serial) = idx.map_bytes_for(peer_id, relay, creds_expiry, &mut bytes) else {
                return deleted();
            };
            last.push_encoded(bytes, serial, deltas, || {
                // The same index and peer: the map exists.
                idx.map_for(peer_id, relay, creds_expiry)
                    .unwrap_or_default()
            })
        } else {
            let Some(map) = idx.map_for(peer_id, relay, creds_expiry) else {
                return deleted();
            };
            last.push(map, deltas)
        };
        if let Some(msg) = msg {
            debug!(peer = %peer_id, serial = last.serial(), delta = msg.delta.is_some(), bytes = msg.encoded_len(), "pushing network map");
            if tx.send(Box::new(Ok(msg))).await.is_err() {
                return Ok(());
            }
        }
        let refresh_in = Duration::from_secs((creds_expiry - ttl / 2 - now_unix()).max(1) as u64);
        let expires_in = login_expires
            .map(|at| Duration::from_millis((at - crate::model::now_millis()).max(0) as u64));
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = tokio::time::sleep(expires_in.unwrap_or(Duration::from_secs(86_400))), if expires_in.is_some() => {}
            r = indexes.changed() => {
                if r.is_err() {
                    return Err(Status::unavailable("management is shutting down"));
                }
                let next = indexes.borrow_and_update().clone();
                // Never back in time (the first map may come from a newer index).
                if let Some(n) = next.filter(|n| serial(n) >= serial(&idx)) {
                    unchanged = last.serial().is_some()
                        && n.since().is_some_and(|s| {
                            s.from == serial(&idx) && !s.affected.contains(peer_id)
                        });
                    idx = n;
                }
            }
            _ = tokio::time::sleep(refresh_in) => {
                creds_expiry = now_unix() + ttl;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(serial: u64, peers: &[&str]) -> pb::NetworkMap {
        pb::NetworkMap {
            serial,
            remote_peers: peers
                .iter()
                .map(|id| pb::RemotePeer {
                    id: id.to_string(),
                    name: id.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_sends_the_first_map_whole_then_only_changes() {
        let mut last = LastSent::default();
        let first = last.push(map(1, &["a", "b"]), true).expect("first map");
        assert_eq!(first.network_map, Some(map(1, &["a", "b"])));
        assert_eq!(last.serial(), Some(1));
        // A newer serial with the same content: nothing, and the agent still has serial 1.
        assert_eq!(last.push(map(2, &["a", "b"]), true), None);
        assert_eq!(last.serial(), Some(1));
        let d = last
            .push(map(3, &["a", "c"]), true)
            .and_then(|m| m.delta)
            .expect("a delta");
        let got =
            tern_proto::mapdelta::apply(&map(1, &["a", "b"]), &d).expect("applies to serial 1");
        assert!(
            tern_proto::mapdelta::same(&got, &map(3, &["a", "c"])),
            "{got:?}"
        );
        // An agent without deltas gets every changed map whole.
        let mut plain = LastSent::default();
        plain.push(map(1, &["a"]), false);
        let whole = plain.push(map(2, &["b"]), false).expect("changed");
        assert_eq!(
            (whole.network_map, whole.delta),
            (Some(map(2, &["b"])), None)
        );
    }
}
