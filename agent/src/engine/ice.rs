//! ICE sessions (webrtc-ice): started when the core schedules an attempt, offers/answers/
//! candidates sealed over signal, our own server-reflexive candidate from the shared port, and the
//! outcome (the pair and its endpoint, or why it failed) reported back to the core.

use super::*;

impl Engine {
    pub(super) fn stop_ice(&self, peer: PeerId, session: u64) {
        let mut conns = write(&self.conns);
        if conns.get(&peer).is_some_and(|c| c.0 == session) {
            conns.remove(&peer);
        }
        drop(conns);
        let old = lock(&self.ice).remove(&(peer, session));
        if let Some(s) = old {
            tokio::spawn(async move {
                let _ = s.agent.close().await;
            });
        }
    }

    /// Reports an ICE outcome to the core and runs what follows.
    pub(super) fn ice_event(self: &Arc<Self>, peer: PeerId, ev: IceEvent) {
        lock(&self.node).handle_ice_event(peer, ev, Instant::now());
        self.run_events();
    }

    /// Retries ICE now for every peer without a pair (e.g. after a local address change).
    pub fn retry_ice_now(&self) {
        lock(&self.node).retry_ice_now(Instant::now());
    }

    pub(super) fn ice_urls(&self) -> Vec<Url> {
        let relay = lock(&self.relay).clone();
        let mut urls = vec![];
        for s in &relay.stun {
            if let Ok(u) = Url::parse_url(&s.url) {
                urls.push(u);
            }
        }
        // TURN over UDP is our own allocation on the shared port (`turn_loop`); webrtc-ice
        // allocates only on the nearest TURN server over TCP, when the map has one.
        let preferred = lock(&self.relays).preferred().map(str::to_string);
        for t in relay
            .turn
            .iter()
            .filter(|t| udp_server(&t.url).is_none())
            .filter(|t| preferred.as_ref().is_none_or(|p| *p == t.url))
        {
            if let Ok(mut u) = Url::parse_url(&t.url) {
                u.username = t.username.clone();
                u.password = t.password.clone();
                urls.push(u);
            }
        }
        urls
    }

    /// Tells the peer our server-reflexive address on the shared port (from a STUN binding to the
    /// map's STUN server), as an ICE candidate of `session`: with it the peer's checks punch
    /// through our NAT. webrtc-ice gathers none on a muxed port.
    pub(super) async fn signal_reflexive(self: Arc<Self>, to: PublicKey, session: u64) {
        use webrtc_ice::candidate::candidate_base::CandidateBaseConfig;
        use webrtc_ice::candidate::candidate_server_reflexive::CandidateServerReflexiveConfig;
        let servers: Vec<(String, u16)> = lock(&self.relay)
            .stun
            .iter()
            .filter_map(|s| udp_server(&s.url))
            .collect();
        let mut seen = vec![];
        // One mapping per family, to tell how the NAT maps (against the alternate STUN port).
        let mut first: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = vec![];
        for (host, port) in servers {
            for stun in resolve(&host, port).await {
                let Some(mapped) = self.shared.reflexive(stun).await else {
                    debug!(%stun, "no STUN answer on the shared port");
                    continue;
                };
                if !first.iter().any(|(s, _)| s.is_ipv4() == stun.is_ipv4()) {
                    first.push((stun, mapped));
                }
                if seen.contains(&mapped) {
                    continue;
                }
                seen.push(mapped);
                let c = CandidateServerReflexiveConfig {
                    base_config: CandidateBaseConfig {
                        network: "udp".into(),
                        address: mapped.ip().to_string(),
                        port: mapped.port(),
                        component: 1,
                        ..Default::default()
                    },
                    rel_addr: if mapped.is_ipv4() { "0.0.0.0" } else { "::" }.into(),
                    rel_port: self.shared.port(),
                }
                .new_candidate_server_reflexive();
                match c {
                    Ok(c) => {
                        debug!(%mapped, session, "signalling our server-reflexive address");
                        send_candidate(&self.signal_out, to, session, &c).await;
                    }
                    Err(e) => debug!(error = %e, "server-reflexive candidate"),
                }
            }
        }
        self.signal_relayed(to, session).await;
        // Measured once per network (and every few minutes), not per session.
        let known = lock(&self.node).fresh_reach(Instant::now());
        let reach = match known {
            Some(r) => r,
            None => {
                let r = self.measure_reach(&first).await;
                lock(&self.node).set_reach(r, Instant::now());
                r
            }
        };
        let _ = self
            .signal_out
            .send((to, crate::signal::PeerMsg::reach(session, &reach)))
            .await;
    }

    /// This host's reachability for the peer (see `tern_tunnel::reach`): the families it has a
    /// default route for, and how its NAT maps the shared port, from `first` (a STUN server and
    /// the mapping it saw, per family) against the relay's alternate STUN port.
    async fn measure_reach(
        &self,
        first: &[(std::net::SocketAddr, std::net::SocketAddr)],
    ) -> tern_tunnel::reach::Reach {
        use tern_tunnel::reach::{Mapping, Reach};
        let ifc = self.iface.clone();
        let (ipv4, ipv6) =
            tokio::task::spawn_blocking(move || crate::platform::net::default_routes(&ifc))
                .await
                .unwrap_or((true, true));
        let probes: Vec<(String, u16)> = lock(&self.relay)
            .stun_probe_urls
            .iter()
            .filter_map(|u| udp_server(u))
            .collect();
        let mut mapping = Mapping::Unknown;
        'probe: for (host, port) in probes {
            for other in resolve(&host, port).await {
                let Some((_, mapped)) = first
                    .iter()
                    .find(|(s, _)| s.is_ipv4() == other.is_ipv4() && *s != other)
                else {
                    continue;
                };
                if let Some(m) = self.shared.reflexive(other).await {
                    mapping = if m == *mapped {
                        Mapping::EndpointIndependent
                    } else {
                        Mapping::EndpointDependent
                    };
                    break 'probe;
                }
            }
        }
        Reach {
            ipv4,
            ipv6,
            mapping,
            public: !first.is_empty(),
        }
    }

    /// Tells the peer our relayed address (our allocation on the shared port) as a `relay`
    /// candidate of `session`: it sends its checks there from its own port, and the TURN server
    /// hands them to us. Waits a little for an allocation under way (an agent just started).
    async fn signal_relayed(&self, to: PublicKey, session: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let (relayed, mapped) = loop {
            if let Some(r) = self.shared.turn_relayed() {
                break r;
            }
            if self.shared.turn_server().is_none() || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match relay_candidate(relayed, Some(mapped)) {
            Ok(c) => {
                debug!(%relayed, session, "signalling our relayed address");
                send_candidate(&self.signal_out, to, session, &c).await;
            }
            Err(e) => debug!(error = %e, "relay candidate"),
        }
    }

    /// Keeps our allocation on the shared port on the TURN server ICE would use (the nearest
    /// that answers, else the map's first over UDP), with the map's credentials: its requests,
    /// renewals and retries, as [`crate::turn::Client`] schedules them.
    pub async fn turn_loop(self: Arc<Self>) {
        let mut resolved: Option<(String, std::net::SocketAddr)> = None;
        loop {
            let want = {
                let relay = lock(&self.relay);
                let preferred = lock(&self.relays).preferred().map(str::to_string);
                relay
                    .turn
                    .iter()
                    .filter(|t| udp_server(&t.url).is_some())
                    .find(|t| preferred.as_ref().is_none_or(|p| *p == t.url))
                    .cloned()
            };
            let cfg = match want {
                None => None,
                Some(t) => {
                    if resolved.as_ref().is_none_or(|(u, _)| *u != t.url) {
                        let addr = match udp_server(&t.url) {
                            Some((host, port)) => resolve(&host, port).await.into_iter().next(),
                            None => None,
                        };
                        resolved = addr.map(|a| (t.url.clone(), a));
                    }
                    resolved.as_ref().map(|(url, server)| crate::turn::Config {
                        url: url.clone(),
                        server: *server,
                        username: t.username.clone(),
                        password: t.password.clone(),
                    })
                }
            };
            let same = self
                .shared
                .with_turn(|c| Some(c.config()) == cfg.as_ref())
                .unwrap_or(cfg.is_none());
            if !same {
                // The allocation left behind is freed at once rather than after its lifetime.
                if let Some((free, server)) = self.shared.set_turn(cfg) {
                    let _ = self.shared.send_to(&free, server).await;
                }
            }
            let now = Instant::now();
            let (out, events, server, next) = self
                .shared
                .with_turn(|c| {
                    c.handle_timeout(now);
                    let out: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
                    let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
                    (out, events, Some(c.server()), c.poll_timeout())
                })
                .unwrap_or_default();
            if let Some(server) = server {
                for m in out {
                    if let Err(e) = self.shared.send_to(&m, server).await {
                        debug!(%server, error = %e, "TURN request not sent");
                    }
                }
            }
            for ev in events {
                match ev {
                    crate::turn::Event::Allocated { relayed, mapped } => {
                        info!(%relayed, %mapped, server = ?server, "TURN allocation on the shared port")
                    }
                    crate::turn::Event::Lost(why) => {
                        warn!(server = ?server, %why, "TURN allocation on the shared port lost; trying again")
                    }
                }
            }
            // The map, the preferred server and our own timers are looked at again within 1 s.
            let wait = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.turn_wake.notified() => {}
            }
        }
    }

    /// Hands ICE the STUN a peer sent through our allocation. A peer's first check of a session
    /// from a stand-in address makes that address a `relay` candidate of the session before ICE
    /// sees it, so ICE ranks (and waits before nominating) the pair as relayed; that check is
    /// held back briefly (ICE sends it again) so the candidate is in place first.
    pub async fn relayed_stun_loop(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(Vec<u8>, std::net::SocketAddr)>,
    ) {
        while let Some((d, y)) = rx.recv().await {
            let new_for = crate::socket::binding_request_ufrag(&d).and_then(|ufrag| {
                let mut ice = lock(&self.ice);
                let s = ice.values_mut().find(|s| s.ufrag == ufrag)?;
                if s.relayed.contains(&y) || s.relayed.len() >= 16 {
                    return None;
                }
                s.relayed.push(y);
                Some(s.agent.clone())
            });
            let Some(agent) = new_for else {
                self.shared.to_ice(d, y);
                continue;
            };
            let x = self.shared.with_turn(|c| c.peer_of(&y)).flatten();
            match relay_candidate(y, x) {
                Ok(c) => {
                    let c: Arc<dyn Candidate + Send + Sync> = Arc::new(c);
                    if let Err(e) = agent.add_remote_candidate(&c) {
                        debug!(error = %e, "relayed candidate refused");
                    }
                    debug!(stand_in = %y, peer = ?x, "a peer's checks arrive through our TURN allocation");
                }
                Err(e) => debug!(error = %e, "relayed candidate"),
            }
            let shared = self.shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                shared.to_ice(d, y);
            });
        }
    }

    /// Probes every TURN server of the map from the shared port (a STUN Binding, timed) every
    /// [`crate::relays::PROBE_EVERY`], and at once when the map's servers change; ICE sessions
    /// started after a probe allocate on the nearest server that answers.
    pub async fn probe_relays(self: Arc<Self>) {
        loop {
            let turn: Vec<(String, String, u16)> = lock(&self.relay)
                .turn
                .iter()
                .filter_map(|t| udp_server(&t.url).map(|(host, port)| (t.url.clone(), host, port)))
                .collect();
            if !turn.is_empty() {
                let probes = turn.into_iter().map(|(url, host, port)| {
                    let me = self.clone();
                    async move {
                        let addr = resolve(&host, port).await.into_iter().next();
                        let rtt = match addr {
                            Some(addr) => {
                                let t0 = Instant::now();
                                me.shared.reflexive(addr).await.map(|_| t0.elapsed())
                            }
                            None => None,
                        };
                        (url, rtt)
                    }
                });
                let results = futures::future::join_all(probes).await;
                let mut book = lock(&self.relays);
                let before = book.preferred().map(str::to_string);
                for (url, rtt) in results {
                    book.record(&url, rtt);
                }
                let after = book.preferred().map(str::to_string);
                if before != after {
                    info!(
                        turn = after.as_deref().unwrap_or("every server"),
                        "TURN server for new ICE sessions (nearest that answers)"
                    );
                }
            }
            let next = lock(&self.relays).next_probe();
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.relays_changed.notified() => {}
            }
        }
    }

    pub fn relay_status(&self) -> Vec<crate::relays::RelayStatus> {
        let mut st = lock(&self.relays).status();
        let ours = self.shared.with_turn(|c| {
            (
                c.config().url.clone(),
                c.relayed().map(|a| a.to_string()),
                c.last_error().map(str::to_string),
            )
        });
        if let Some((url, relayed, error)) = ours {
            if let Some(r) = st.iter_mut().find(|r| r.url == url) {
                r.relayed = relayed;
                r.allocation_error = error;
            }
        }
        st
    }

    /// Hosts of the TURN servers in the current map.
    pub(super) fn turn_hosts(&self) -> Vec<String> {
        lock(&self.relay)
            .turn
            .iter()
            .filter_map(|t| Url::parse_url(&t.url).ok())
            .map(|u| u.host)
            .collect()
    }

    pub(super) async fn new_agent(&self, controlling: bool) -> anyhow::Result<Arc<Agent>> {
        let iface = self.iface.clone();
        let overlay = lock(&self.node).overlay();
        // Host candidates of a family the host has no default route for only reach its own
        // LANs; on a host with a default route of the other family (an IPv6-only uplink with an
        // IPv4 LAN) they are left out: webrtc-ice hands each datagram of the shared port to any
        // of its host candidates and drops answers from a remote of another family, which made
        // relayed checks through our allocation fail at random on such hosts.
        let ifc = self.iface.clone();
        let (v4_default, v6_default) =
            tokio::task::spawn_blocking(move || crate::platform::net::default_routes(&ifc))
                .await
                .unwrap_or((true, true));
        let family_ok = move |ip: &IpAddr| match ip {
            IpAddr::V4(_) => v4_default || !v6_default,
            IpAddr::V6(_) => v6_default || !v4_default,
        };
        let cfg = AgentConfig {
            urls: self.ice_urls(),
            network_types: vec![NetworkType::Udp4, NetworkType::Udp6],
            multicast_dns_mode: webrtc_ice::mdns::MulticastDnsMode::Disabled,
            is_controlling: controlling,
            // A relayed pair is nominated only if no direct pair has succeeded for 2.5 s: a
            // host pair whose first checks are lost on a busy link must not lose to TURN for
            // the life of the session (the TCP relay carries traffic meanwhile).
            relay_acceptance_min_wait: Some(Duration::from_millis(2500)),
            srflx_acceptance_min_wait: Some(Duration::from_millis(300)),
            // Consent checks every second; a path silent for 3 s (NAT rebinding, dead link) is
            // dropped and the relay fallback takes over while ICE is retried.
            disconnected_timeout: Some(Duration::from_secs(3)),
            failed_timeout: Some(Duration::from_secs(8)),
            keepalive_interval: Some(Duration::from_secs(1)),
            check_interval: Duration::from_millis(200),
            interface_filter: Arc::new(Some(Box::new(move |name: &str| {
                name != iface && !name.starts_with("tern")
            }))),
            // Not the overlay, and not link-local: a candidate carries no interface scope, so a
            // link-local pair works by chance at best.
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| {
                let link_local = match ip {
                    IpAddr::V4(v4) => v4.is_link_local(),
                    IpAddr::V6(v6) => v6.is_unicast_link_local(),
                };
                !link_local && overlay.is_none_or(|o| !o.contains(&ip)) && family_ok(&ip)
            }))),
            // Host candidates on the shared port; the server-reflexive one is ours
            // (signal_reflexive); relay candidates use the TURN client's own socket.
            udp_network: webrtc_ice::udp_network::UDPNetwork::Muxed(self.mux.clone()),
            ..Default::default()
        };
        Ok(Arc::new(Agent::new(cfg).await?))
    }

    /// Registers a new ICE session for `peer` with the core and the shell; returns its cancel
    /// receiver (dropped with the session).
    pub(super) fn begin_session(
        self: &Arc<Self>,
        peer: PeerId,
        agent: &Arc<Agent>,
        session: u64,
        ufrag: String,
    ) -> mpsc::Receiver<()> {
        let (cancel, cancel_rx) = mpsc::channel(1);
        // Older sessions of this peer are stopped by the core (StopIce) when this one starts
        // or connects, except a TURN pair that carries traffic meanwhile.
        lock(&self.ice).insert(
            (peer, session),
            IceSession {
                agent: agent.clone(),
                ufrag,
                relayed: vec![],
                _cancel: cancel,
                dial_cancel: None,
            },
        );
        self.wire_agent_events(peer, agent, session);
        self.ice_event(peer, IceEvent::Started { session });
        cancel_rx
    }

    pub(super) fn wire_agent_events(
        self: &Arc<Self>,
        peer: PeerId,
        agent: &Arc<Agent>,
        session: u64,
    ) {
        let out = self.signal_out.clone();
        let Some(to) = lock(&self.node).spec(peer).map(|s| PublicKey(s.key)) else {
            return;
        };
        let (weak_agent, shared) = (Arc::downgrade(agent), self.shared.clone());
        agent.on_candidate(Box::new(
            move |c: Option<Arc<dyn Candidate + Send + Sync>>| {
                let (out, weak_agent, shared) = (out.clone(), weak_agent.clone(), shared.clone());
                Box::pin(async move {
                    match c {
                        Some(c) => send_candidate(&out, to, session, c.as_ref()).await,
                        // Gathered: stand-ins take a family ICE has candidates of.
                        None => {
                            let Some(agent) = weak_agent.upgrade() else {
                                return;
                            };
                            let Ok(cands) = agent.get_local_candidates().await else {
                                return;
                            };
                            let has = |v4: bool| {
                                cands.iter().any(|c| {
                                    c.address()
                                        .parse::<IpAddr>()
                                        .is_ok_and(|a| a.is_ipv4() == v4)
                                })
                            };
                            shared.set_stand_in_family(!has(true) && has(false));
                        }
                    }
                })
            },
        ));
        let weak = Arc::downgrade(self);
        agent.on_connection_state_change(Box::new(move |s: ConnectionState| {
            if matches!(
                s,
                ConnectionState::Failed | ConnectionState::Disconnected | ConnectionState::Closed
            ) {
                if let Some(me) = weak.upgrade() {
                    if read(&me.conns).get(&peer).is_some_and(|c| c.0 == session) {
                        info!(peer, state = %s, "ICE path lost; using the relay fallback");
                    }
                    me.ice_event(peer, IceEvent::Lost { session });
                }
            }
            Box::pin(async {})
        }));
    }

    /// Controlling side: a new ICE session with a fresh offer.
    pub(super) async fn start_offer(self: Arc<Self>, peer: PeerId) {
        let Some(key) = lock(&self.node).spec(peer).map(|s| PublicKey(s.key)) else {
            return;
        };
        let agent = match self.new_agent(true).await {
            Ok(a) => a,
            Err(e) => {
                warn!(peer, error = %e, "cannot create ICE agent");
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session: 0,
                        why: format!("cannot create an ICE agent: {e}"),
                    },
                );
                return;
            }
        };
        let session: u64 = rand::random();
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let cancel = self.begin_session(peer, &agent, session, ufrag.clone());
        // Kept with the session until the answer arrives (the dial takes it there).
        if let Some(s) = lock(&self.ice).get_mut(&(peer, session)) {
            s.dial_cancel = Some(cancel);
        }
        debug!(peer, session, "sending ICE offer");
        let _ = self
            .signal_out
            .send((
                key,
                PeerMsg::Offer {
                    session,
                    ufrag,
                    pwd,
                },
            ))
            .await;
        tokio::spawn(self.clone().signal_reflexive(key, session));
    }

    /// Handles a message from another peer (through signal).
    pub async fn handle_signal(self: &Arc<Self>, from: PublicKey, msg: PeerMsg) {
        let (peer, controlling) = {
            let n = lock(&self.node);
            let Some(peer) = n.peer_by_key(&from.0) else {
                debug!(%from, "signal from a peer not in our map");
                return;
            };
            (peer, n.controlling(peer))
        };
        match msg {
            PeerMsg::Offer {
                session,
                ufrag,
                pwd,
            } => {
                if controlling {
                    return; // we offer to this peer, not the other way round
                }
                let agent = match self.new_agent(false).await {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(peer, error = %e, "cannot create ICE agent");
                        return;
                    }
                };
                let (lu, lp) = agent.get_local_user_credentials().await;
                let cancel = self.begin_session(peer, &agent, session, lu.clone());
                let _ = self
                    .signal_out
                    .send((
                        from,
                        PeerMsg::Answer {
                            session,
                            ufrag: lu,
                            pwd: lp,
                        },
                    ))
                    .await;
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer, error = %e, "ICE gathering failed");
                }
                tokio::spawn(self.clone().signal_reflexive(from, session));
                let me = self.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        tern_tunnel::ICE_ATTEMPT,
                        agent.accept(cancel, ufrag, pwd),
                    )
                    .await;
                    me.ice_result(peer, &agent, session, r).await;
                });
            }
            PeerMsg::Answer {
                session,
                ufrag,
                pwd,
            } => {
                let (agent, cancel) = {
                    let mut ice = lock(&self.ice);
                    match ice.get_mut(&(peer, session)) {
                        Some(s) => match s.dial_cancel.take() {
                            Some(c) => (s.agent.clone(), c),
                            None => return, // a repeated answer
                        },
                        None => return,
                    }
                };
                if let Err(e) = agent.gather_candidates() {
                    warn!(peer, error = %e, "ICE gathering failed");
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let r = tokio::time::timeout(
                        tern_tunnel::ICE_ATTEMPT,
                        agent.dial(cancel, ufrag, pwd),
                    )
                    .await;
                    me.ice_result(peer, &agent, session, r).await;
                });
            }
            PeerMsg::Reach {
                ipv4,
                ipv6,
                mapping,
                public,
                ..
            } => {
                let r = crate::signal::reach_of(ipv4, ipv6, &mapping, public);
                debug!(peer, reach = ?r, "the peer's reachability");
                lock(&self.node).set_peer_reach(peer, r);
            }
            PeerMsg::Candidate { session, candidate } => {
                let Some(agent) = self.session_agent(peer, session) else {
                    return;
                };
                match unmarshal_candidate(&candidate) {
                    Ok(c) => {
                        let inside = c
                            .address()
                            .parse::<IpAddr>()
                            .is_ok_and(|ip| lock(&self.node).tunnelled(ip));
                        if inside {
                            // Reaching it would route WireGuard into its own tunnel.
                            debug!(peer, candidate = %c.address(), "ignoring a candidate inside a routed network");
                            return;
                        }
                        // Its checks may reach us through our allocation: the TURN server lets
                        // them in from the addresses we permit.
                        if c.candidate_type() != CandidateType::Relay {
                            if let Ok(ip) = c.address().parse::<IpAddr>() {
                                self.shared.turn_permit(ip);
                            }
                        }
                        let c: Arc<dyn Candidate + Send + Sync> = Arc::new(c);
                        if let Err(e) = agent.add_remote_candidate(&c) {
                            debug!(peer, error = %e, "remote candidate refused");
                        }
                    }
                    Err(e) => debug!(peer, error = %e, "malformed remote candidate"),
                }
            }
        }
    }

    pub(super) fn session_agent(&self, peer: PeerId, session: u64) -> Option<Arc<Agent>> {
        lock(&self.ice)
            .get(&(peer, session))
            .map(|s| s.agent.clone())
    }

    pub(super) async fn ice_result(
        self: &Arc<Self>,
        peer: PeerId,
        agent: &Arc<Agent>,
        session: u64,
        r: Result<
            Result<Arc<impl Conn + Send + Sync + 'static>, webrtc_ice::Error>,
            tokio::time::error::Elapsed,
        >,
    ) {
        let conn: Arc<dyn Conn + Send + Sync> = match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(peer, error = %e, "ICE failed");
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session,
                        why: format!("ICE checks failed: {e}"),
                    },
                );
                return;
            }
            Err(_) => {
                self.ice_event(
                    peer,
                    IceEvent::Failed {
                        session,
                        why: format!(
                            "no ICE pair within {} s",
                            tern_tunnel::ICE_ATTEMPT.as_secs()
                        ),
                    },
                );
                return;
            }
        };
        let Some(pair) = agent.get_selected_candidate_pair() else {
            self.ice_event(
                peer,
                IceEvent::Failed {
                    session,
                    why: "ICE connected without a selected pair".into(),
                },
            );
            return;
        };
        let Ok(remote_addr) = pair.remote.address().parse::<IpAddr>() else {
            self.ice_event(
                peer,
                IceEvent::Failed {
                    session,
                    why: format!("unusable remote address {}", pair.remote.address()),
                },
            );
            return;
        };
        // The remote side's relay address shows up as peer-reflexive when its checks arrive
        // before its relay candidate: an address on a TURN server is relayed all the same.
        let turn_hosts = self.turn_hosts();
        let remote_sock = std::net::SocketAddr::new(remote_addr, pair.remote.port());
        // Through our own allocation: the peer's address behind the stand-in, and ours on the
        // TURN server, are what the user wants to read.
        let ours = crate::turn::is_stand_in(&remote_sock)
            .then(|| {
                self.shared
                    .with_turn(|c| Some((c.relayed()?, c.peer_of(&remote_sock)?)))
                    .flatten()
            })
            .flatten();
        let relayed = pair.local.candidate_type() == CandidateType::Relay
            || pair.remote.candidate_type() == CandidateType::Relay
            || crate::turn::is_stand_in(&remote_sock)
            || turn_hosts.iter().any(|h| *h == pair.remote.address());
        let (local, remote) = match ours {
            Some((relayed, peer)) => (format!("relay {relayed}"), format!("prflx {peer}")),
            None => (
                format!(
                    "{} {}:{}",
                    candidate_kind(pair.local.candidate_type()),
                    pair.local.address(),
                    pair.local.port()
                ),
                format!(
                    "{} {}:{}",
                    candidate_kind(pair.remote.candidate_type()),
                    pair.remote.address(),
                    pair.remote.port()
                ),
            ),
        };
        let path = IcePath {
            session,
            kind: if relayed {
                CorePath::TurnRelay
            } else {
                CorePath::Direct
            },
            local,
            remote,
            remote_addr,
            // A pair on the shared port: WireGuard goes there directly, not through webrtc-ice.
            endpoint: (pair.local.candidate_type() != CandidateType::Relay)
                .then(|| std::net::SocketAddr::new(remote_addr, pair.remote.port())),
        };
        let (local, remote, kind) = (path.local.clone(), path.remote.clone(), path.kind);
        let direct = path.endpoint.is_some();
        // A first pair's conn is in place before the core switches to it, so no packet finds
        // it missing; a pair that would replace one in use (an upgrade attempt) goes in only
        // once the core took it.
        let first = {
            let mut conns = write(&self.conns);
            let first = !conns.contains_key(&peer);
            if first {
                conns.insert(peer, (session, conn.clone()));
            }
            first
        };
        self.ice_event(peer, IceEvent::Connected(path));
        if lock(&self.node).ice_session(peer) != Some(session) {
            // Refused (stale, TURN again on an upgrade attempt, or its pair runs through the
            // tunnel): StopIce closed it.
            info!(peer, remote = %remote, "ICE pair discarded");
            return;
        }
        if !first {
            write(&self.conns).insert(peer, (session, conn.clone()));
        }
        info!(peer, path = ?PathKind::from(kind), %local, %remote, "ICE connected");
        if direct {
            return; // its datagrams arrive on the shared port
        }
        tokio::spawn(self.clone().relayed_loop(peer, session, conn));
    }
}

/// A `relay` candidate at `addr`, related to `rel` (the address behind it, when known).
fn relay_candidate(
    addr: std::net::SocketAddr,
    rel: Option<std::net::SocketAddr>,
) -> Result<webrtc_ice::candidate::candidate_base::CandidateBase, webrtc_ice::Error> {
    use webrtc_ice::candidate::candidate_base::CandidateBaseConfig;
    use webrtc_ice::candidate::candidate_relay::CandidateRelayConfig;
    CandidateRelayConfig {
        base_config: CandidateBaseConfig {
            network: "udp".into(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        rel_addr: rel.map_or_else(|| "0.0.0.0".into(), |r| r.ip().to_string()),
        rel_port: rel.map_or(0, |r| r.port()),
        relay_client: None,
    }
    .new_candidate_relay()
}

/// Trickles one of our candidates for `session` to `to` over signal.
async fn send_candidate(
    out: &mpsc::Sender<(PublicKey, PeerMsg)>,
    to: PublicKey,
    session: u64,
    c: &(dyn Candidate + Send + Sync),
) {
    let candidate = c.marshal();
    let _ = out
        .send((to, PeerMsg::Candidate { session, candidate }))
        .await;
}

/// Host (without IPv6 brackets) and port of a STUN/TURN server reached over UDP (a `stun:`
/// URL, or a `turn:` URL without `?transport=tcp`); None for anything else or a malformed URL.
fn udp_server(url: &str) -> Option<(String, u16)> {
    let u = Url::parse_url(url).ok()?;
    (u.proto == webrtc_ice::url::ProtoType::Udp)
        .then(|| (u.host.trim_matches(['[', ']']).to_string(), u.port))
}

/// The addresses of `host` (none when it does not resolve: the caller skips the server).
async fn resolve(host: &str, port: u16) -> Vec<std::net::SocketAddr> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(a) => a.collect(),
        Err(e) => {
            debug!(host, error = %e, "STUN/TURN server does not resolve");
            vec![]
        }
    }
}
