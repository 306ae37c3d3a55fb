//! Plain WireGuard devices: a phone with the stock WireGuard app or a router that speaks only
//! WireGuard joins the mesh without an agent. Its tunnel ends on the server's WireGuard endpoint
//! (userspace, one UDP port); the server then acts as that device's agent in the mesh: one
//! sans-IO core ([`tern_tunnel::Node`]) per device, fed with the device's own network map, so the
//! same policies, routes and routing-peer choice apply as to any peer. Between the server and
//! the agents the device's traffic rides the in-process TCP relay (agents see the device as a
//! `hosted` peer and never try ICE with it).
//!
//! ```text
//! device --WireGuard/UDP--> gateway (device key) -> core of the device (mesh key) --TCP relay--> agent
//! ```
//!
//! Keys: the gateway's key and each device's mesh key are derived from the server's stored
//! secret (HMAC-SHA256), so nothing new is stored; the device's private key is shown once, in
//! the configuration handed to the admin, and never stored.

use crate::model::{Peer, WireguardDevice};
use crate::state::AppState;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_proto::SecretKey;
use tern_relay::tcp::{Attached, TcpRelay};
use tern_tunnel::{Decap, Node, Sender};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A device whose last handshake is older than this is offline (WireGuard's reject-after-time).
const ONLINE: Duration = Duration::from_secs(180);
/// How often timers run (boringtun's resolution) and live figures are refreshed.
const TICK: Duration = Duration::from_millis(250);
/// The MTU written into device configurations (the overlay's, as agents use it).
pub const DEVICE_MTU: u16 = 1280;
const BUF: usize = 65_536 + 256;
/// At most one unscheduled read of the network per this interval (unknown handshakes).
const REFRESH: Duration = Duration::from_secs(1);
/// Handshakes per second the endpoint takes before it answers with cookies (WireGuard's DoS
/// defence: a flood costs a MAC check each, not a Diffie-Hellman).
const HANDSHAKES_PER_SEC: u64 = 200;

fn derive(server_key: &SecretKey, label: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&server_key.to_bytes())
        .expect("HMAC takes any key length");
    mac.update(label);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The mesh key of the device whose own public key is `device_key`.
pub fn mesh_secret(server_key: &SecretKey, device_key: &[u8; 32]) -> [u8; 32] {
    derive(server_key, b"tern wireguard device mesh key v1", device_key)
}

fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    x25519::PublicKey::from(&x25519::StaticSecret::from(*secret)).to_bytes()
}

/// The server's WireGuard endpoint as the API and the console see it.
pub struct Gateway {
    secret: [u8; 32],
    pub public_key: [u8; 32],
    /// `host:port` written into device configurations.
    pub endpoint: String,
    server_key: SecretKey,
    live: Mutex<HashMap<String, WireguardDevice>>,
}

impl Gateway {
    pub fn new(server_key: &SecretKey, endpoint: String) -> Gateway {
        let secret = derive(server_key, b"tern wireguard gateway key v1", &[]);
        Gateway {
            public_key: public_of(&secret),
            secret,
            endpoint,
            server_key: SecretKey::from_bytes(server_key.to_bytes()),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The mesh public key (base64) of a device with this public key.
    pub fn mesh_key_for(&self, device_key: &[u8; 32]) -> String {
        tern_proto::PublicKey(public_of(&mesh_secret(&self.server_key, device_key))).to_base64()
    }

    /// Fills in what the endpoint sees of each WireGuard device now.
    pub fn fill_live(&self, peers: &mut [Peer]) {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for p in peers.iter_mut() {
            if let (Some(w), Some(l)) = (p.wireguard.as_mut(), live.get(&p.id)) {
                w.endpoint = l.endpoint.clone();
                w.last_handshake_secs = l.last_handshake_secs;
                w.rx_bytes = l.rx_bytes;
                w.tx_bytes = l.tx_bytes;
            }
        }
    }

    /// A `wg-quick` configuration for the device (its private key included: shown once).
    pub fn config(
        &self,
        name: &str,
        device_secret: &SecretKey,
        address: &str,
        allowed: &[IpNet],
    ) -> String {
        let allowed: Vec<String> = allowed.iter().map(|n| n.to_string()).collect();
        format!(
            "# Tern: WireGuard device {name}\n\
             # Import into the WireGuard app, or: wg-quick up ./this-file.conf\n\
             [Interface]\n\
             PrivateKey = {}\n\
             Address = {address}/32\n\
             MTU = {DEVICE_MTU}\n\
             \n\
             [Peer]\n\
             PublicKey = {}\n\
             Endpoint = {}\n\
             AllowedIPs = {}\n\
             PersistentKeepalive = 25\n",
            device_secret.to_base64(),
            tern_proto::PublicKey(self.public_key).to_base64(),
            self.endpoint,
            allowed.join(", "),
        )
    }
}

/// One hosted device: its tunnel to the device, and its core in the mesh.
struct Hosted {
    overlay: IpAddr,
    key: [u8; 32],
    index: u32,
    device: Tunn,
    endpoint: Option<SocketAddr>,
    node: Node,
    relay: Attached,
    /// Routing-peer choices (sticky, as on agents).
    routes: BTreeMap<String, String>,
    /// Whether the map says it is online (the store's value).
    connected: bool,
    rx: u64,
    tx: u64,
}

struct Runtime {
    gw: Arc<Gateway>,
    state: Arc<AppState>,
    relay: Arc<TcpRelay>,
    socket: Arc<UdpSocket>,
    hosted: HashMap<String, Hosted>,
    by_key: HashMap<[u8; 32], String>,
    by_index: HashMap<u32, String>,
    next_index: u32,
    sink: mpsc::Sender<(String, String, Bytes)>,
    buf: Vec<u8>,
    buf2: Vec<u8>,
    /// When an unknown device's handshake last made us read the network.
    refreshed: Instant,
    /// The endpoint's key pair (for the handshakes' key work).
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Checks MAC1 of every handshake before any key work; cookies under load.
    limiter: RateLimiter,
    limiter_reset: Instant,
}

/// Runs the endpoint until the server stops: datagrams from devices, relayed datagrams from
/// agents, map changes and timers, all on one task (no locks on the packet path).
pub async fn run(gw: Arc<Gateway>, state: Arc<AppState>, relay: Arc<TcpRelay>, socket: UdpSocket) {
    let (sink, mut from_relay) = mpsc::channel(4096);
    let mut rt = Runtime {
        state: state.clone(),
        relay,
        socket: Arc::new(socket),
        hosted: HashMap::new(),
        by_key: HashMap::new(),
        by_index: HashMap::new(),
        next_index: 1,
        sink,
        buf: vec![0u8; BUF],
        buf2: vec![0u8; BUF],
        refreshed: Instant::now(),
        limiter: RateLimiter::new(&x25519::PublicKey::from(gw.public_key), HANDSHAKES_PER_SEC),
        secret: x25519::StaticSecret::from(gw.secret),
        public: x25519::PublicKey::from(gw.public_key),
        limiter_reset: Instant::now(),
        gw,
    };
    let mut index = state.index.subscribe();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut udp = vec![0u8; BUF];
    let socket = rt.socket.clone();
    rt.apply_index(false).await;
    loop {
        tokio::select! {
            r = socket.recv_from(&mut udp) => match r {
                Ok((n, from)) => rt.on_device_datagram(from, &udp[..n]).await,
                Err(e) => {
                    debug!(error = %e, "WireGuard endpoint: receive error");
                }
            },
            Some((me, from, d)) = from_relay.recv() => rt.on_mesh_datagram(&me, &from, &d).await,
            r = index.changed() => {
                if r.is_err() {
                    return;
                }
                rt.apply_index(false).await;
            }
            _ = tick.tick() => rt.tick().await,
        }
    }
}

impl Runtime {
    /// Brings the hosted devices in line with the latest index: new devices start, removed
    /// (revoked) ones stop at once, the others get their new maps.
    async fn apply_index(&mut self, fresh: bool) {
        let read = if fresh {
            self.state.net_index().await
        } else {
            self.state.current_index().await
        };
        let idx = match read {
            Ok(i) => i,
            Err(e) => {
                warn!(error = ?e, "WireGuard endpoint: cannot read the network");
                return;
            }
        };
        let devices: Vec<&Peer> = idx
            .snapshot()
            .peers
            .iter()
            .filter(|p| p.wireguard.is_some() && p.on_network())
            .collect();
        // A device that got new keys starts again (its old tunnel must stop working).
        let keep: std::collections::HashSet<&str> = devices
            .iter()
            .filter(|p| {
                let key = p
                    .wireguard
                    .as_ref()
                    .and_then(|w| tern_proto::PublicKey::from_base64(&w.public_key).ok());
                match self.hosted.get(&p.id) {
                    Some(h) => key.is_some_and(|k| k.0 == h.key),
                    None => true,
                }
            })
            .map(|p| p.id.as_str())
            .collect();
        let gone: Vec<String> = self
            .hosted
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(h) = self.hosted.remove(&id) {
                self.by_key.remove(&h.key);
                self.by_index.remove(&h.index);
                if devices.iter().any(|p| p.id == id) {
                    info!(peer = %id, "WireGuard device has new keys: its old tunnel is closed");
                } else {
                    info!(peer = %id, "WireGuard device removed: its tunnel is closed");
                }
            }
        }
        let expiry =
            crate::grpc::now_unix() + self.state.opts.relay_credentials_ttl.as_secs() as i64;
        let now = Instant::now();
        for p in devices {
            let Some(map) = idx.map_for(&p.id, &self.state.opts.relay, expiry) else {
                continue;
            };
            if !self.hosted.contains_key(&p.id) {
                let Some(h) = self.start(p) else { continue };
                self.by_key.insert(h.key, p.id.clone());
                self.by_index.insert(h.index, p.id.clone());
                self.hosted.insert(p.id.clone(), h);
                info!(peer = %p.id, name = %p.name, ip = %p.overlay_ip, "WireGuard device hosted");
            }
            let Some(h) = self.hosted.get_mut(&p.id) else {
                continue;
            };
            h.connected = p.connected;
            tern_tunnel::map::apply(&mut h.node, &map, now);
            let (offers, connected) = tern_tunnel::map::route_offers(&map);
            let picks = tern_tunnel::routing::select(&offers, &connected, &h.routes);
            h.routes = picks
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), p.as_ref()?.0.clone())))
                .collect();
            let by_peer = h
                .routes
                .iter()
                .filter_map(|(n, id)| Some((n.parse().ok()?, h.node.peer_by_mgmt_id(id)?)))
                .collect();
            h.node.set_routes(by_peer, now);
            h.node.set_denied(tern_tunnel::map::denied_networks(&map));
            while h.node.poll_event().is_some() {}
        }
    }

    fn start(&mut self, p: &Peer) -> Option<Hosted> {
        let w = p.wireguard.as_ref()?;
        let key = tern_proto::PublicKey::from_base64(&w.public_key).ok()?.0;
        let overlay: IpAddr = p.overlay_ip.parse().ok()?;
        let index = loop {
            let i = self.next_index;
            self.next_index = (self.next_index % 0x00ff_ffff) + 1;
            if !self.by_index.contains_key(&i) {
                break i;
            }
        };
        let device = Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(key),
            None,
            None,
            index,
            None,
        );
        let mut node = Node::new(mesh_secret(&self.gw.server_key, &key));
        node.set_tcp_relay(true);
        Some(Hosted {
            overlay,
            key,
            index,
            device,
            endpoint: None,
            node,
            relay: self.relay.attach(&p.id, self.sink.clone()),
            routes: BTreeMap::new(),
            connected: p.connected,
            rx: 0,
            tx: 0,
        })
    }

    /// The device a sender belongs to.
    fn device_of(&self, sender: Sender) -> Option<String> {
        match sender {
            Sender::Key(k) => self.by_key.get(&k).cloned(),
            Sender::Index(i) => self.by_index.get(&i).cloned(),
        }
    }

    async fn on_device_datagram(&mut self, from: SocketAddr, d: &[u8]) {
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), d, &mut self.buf)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let _ = self.socket.send_to(cookie, from).await;
                return;
            }
            Err(_) => {
                debug!(%from, "WireGuard endpoint: not a WireGuard datagram for this endpoint");
                return;
            }
        };
        let Some(sender) = tern_tunnel::sender_of(packet, &self.secret, &self.public) else {
            debug!(%from, "WireGuard endpoint: a handshake not meant for this endpoint");
            return;
        };
        let mut id = self.device_of(sender);
        if id.is_none() && matches!(sender, Sender::Key(_)) && self.refreshed.elapsed() > REFRESH {
            // A handshake from a key not hosted yet: a device added a moment ago, before the
            // next published index. Read the network now (at most once per REFRESH).
            self.refreshed = Instant::now();
            self.apply_index(true).await;
            id = self.device_of(sender);
        }
        let Some(id) = id else {
            debug!(%from, "WireGuard endpoint: datagram from an unknown device");
            return;
        };
        let Some(h) = self.hosted.get_mut(&id) else {
            return;
        };
        h.rx += d.len() as u64;
        let now = Instant::now();
        let mut first = true;
        loop {
            let input: &[u8] = if first { d } else { &[] };
            let r = h.device.decapsulate(Some(from.ip()), input, &mut self.buf);
            first = false;
            match r {
                TunnResult::WriteToNetwork(w) => {
                    h.endpoint = Some(from);
                    h.tx += w.len() as u64;
                    let _ = self.socket.send_to(w, from).await;
                    // Packets queued during the handshake follow.
                    continue;
                }
                TunnResult::WriteToTunnelV4(pkt, src) => {
                    h.endpoint = Some(from);
                    if IpAddr::V4(src) != h.overlay {
                        debug!(peer = %id, %src, "WireGuard device sent from an address not its own; dropped");
                        return;
                    }
                    match h.node.encapsulate(pkt, now, &mut self.buf2) {
                        Ok(Some(t)) => {
                            if let Some(s) = h.node.spec(t.peer) {
                                h.relay.send(&s.id, t.payload);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            debug!(peer = %id, error = %e, "WireGuard device packet not sent")
                        }
                    }
                    flush_node(h, now, &mut self.buf2);
                }
                TunnResult::WriteToTunnelV6(..) => {
                    h.endpoint = Some(from);
                }
                TunnResult::Done => {
                    h.endpoint = Some(from);
                }
                TunnResult::Err(e) => {
                    debug!(peer = %id, error = ?e, "WireGuard device datagram refused");
                }
            }
            return;
        }
    }

    async fn on_mesh_datagram(&mut self, me: &str, from: &str, d: &[u8]) {
        let Some(h) = self.hosted.get_mut(me) else {
            return;
        };
        let Some(peer) = h.node.peer_by_mgmt_id(from) else {
            return;
        };
        let now = Instant::now();
        match h.node.decapsulate(peer, d, now, &mut self.buf) {
            Ok(Decap::Tunnel(pkt)) => {
                if let TunnResult::WriteToNetwork(w) = h.device.encapsulate(pkt, &mut self.buf2) {
                    if let Some(to) = h.endpoint {
                        h.tx += w.len() as u64;
                        let _ = self.socket.send_to(w, to).await;
                    }
                }
            }
            Ok(Decap::Network(t)) => {
                if let Some(s) = h.node.spec(t.peer) {
                    h.relay.send(&s.id, t.payload);
                }
                flush_node(h, now, &mut self.buf2);
            }
            Ok(Decap::Nothing) => {}
            Err(e) => {
                debug!(peer = %me, from, error = %e, "mesh datagram for a WireGuard device dropped")
            }
        }
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.limiter_reset) >= Duration::from_secs(1) {
            self.limiter.reset_count();
            self.limiter_reset = now;
        }
        let mut live = HashMap::with_capacity(self.hosted.len());
        let mut changed = vec![];
        for (id, h) in self.hosted.iter_mut() {
            h.node.handle_timeout(now);
            flush_node(h, now, &mut self.buf);
            while h.node.poll_event().is_some() {}
            if let TunnResult::WriteToNetwork(w) = h.device.update_timers(&mut self.buf) {
                if let Some(to) = h.endpoint {
                    h.tx += w.len() as u64;
                    let _ = self.socket.send_to(w, to).await;
                }
            }
            let since = h.device.time_since_last_handshake();
            let online = since.is_some_and(|s| s < ONLINE);
            if online != h.connected {
                h.connected = online;
                changed.push((id.clone(), online));
            }
            live.insert(
                id.clone(),
                WireguardDevice {
                    public_key: String::new(),
                    endpoint: h.endpoint.map(|e| e.to_string()),
                    last_handshake_secs: since.map(|s| s.as_secs()),
                    rx_bytes: h.rx,
                    tx_bytes: h.tx,
                },
            );
        }
        *self.gw.live.lock().unwrap_or_else(|e| e.into_inner()) = live;
        for (id, online) in changed {
            info!(peer = %id, online, "WireGuard device {}", if online { "connected" } else { "went quiet" });
            let store = self.state.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.set_peer_connected(&id, online).await {
                    debug!(peer = %id, error = ?e, "could not record the device's state");
                }
            });
        }
    }
}

/// Sends what the device's core has queued (handshakes, packets held during one, keepalives).
fn flush_node(h: &mut Hosted, _now: Instant, buf: &mut [u8]) {
    while let Some(t) = h.node.poll_transmit(buf) {
        if let Some(s) = h.node.spec(t.peer) {
            h.relay.send(&s.id, t.payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_derived_and_stable() {
        let k = SecretKey::from_bytes([9u8; 32]);
        let a = Gateway::new(&k, "vpn.example.com:51820".into());
        let b = Gateway::new(&k, "vpn.example.com:51820".into());
        assert_eq!(
            a.public_key, b.public_key,
            "the same server secret, the same gateway key"
        );
        let other = Gateway::new(&SecretKey::from_bytes([8u8; 32]), String::new());
        assert_ne!(a.public_key, other.public_key);
        assert_ne!(a.mesh_key_for(&[1; 32]), a.mesh_key_for(&[2; 32]));
        assert_eq!(a.mesh_key_for(&[1; 32]), b.mesh_key_for(&[1; 32]));
    }

    #[test]
    fn the_config_names_the_endpoint_and_the_networks() {
        let k = SecretKey::from_bytes([9u8; 32]);
        let g = Gateway::new(&k, "vpn.example.com:51820".into());
        let dev = SecretKey::from_bytes([3u8; 32]);
        let c = g.config(
            "phone",
            &dev,
            "100.64.0.7",
            &[
                "100.64.0.0/10".parse().expect("net"),
                "192.168.50.0/24".parse().expect("net"),
            ],
        );
        assert!(c.contains(&format!("PrivateKey = {}", dev.to_base64())));
        assert!(c.contains("Address = 100.64.0.7/32"));
        assert!(c.contains("Endpoint = vpn.example.com:51820"));
        assert!(c.contains("AllowedIPs = 100.64.0.0/10, 192.168.50.0/24"));
        assert!(c.contains(&format!(
            "PublicKey = {}",
            tern_proto::PublicKey(g.public_key).to_base64()
        )));
    }
}
