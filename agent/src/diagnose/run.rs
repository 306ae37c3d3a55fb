//! The checks themselves, run by the daemon on real sockets and through the real tunnel, each
//! bounded in time; they gather [`Facts`] for [`super::analyze`].

use super::wire;
use super::{Args, Facts, PeerFacts, PingFacts, PmtuFacts, Reach, Report, RouteFacts};
use crate::engine::{Engine, PathKind};
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::management as pb;
use tern_proto::management::management_service_client::ManagementServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;

/// What the checks need from the running daemon.
pub struct Context {
    pub engine: Arc<Engine>,
    pub channel: Channel,
    pub url: String,
    pub signal_up: watch::Receiver<bool>,
    pub iface: String,
    pub mtu: u32,
    pub overlay_range: Option<IpNet>,
    /// The daemon's status as `tern status --json` shows it (for the bundle).
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// Every secret the daemon holds now (private key, management token, setup key; relay
    /// credentials are read from the map here), to redact from the bundle.
    pub secrets: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Asks the TCP relay connection for the relay's view of this agent.
    pub relay_views: tokio::sync::mpsc::Sender<crate::ViewRequest>,
    /// Why the TCP relay is not connected (empty when it is).
    pub relay_error: Arc<std::sync::Mutex<String>>,
    /// How IPv4 addresses are dialled (through NAT64 on an IPv6-only uplink).
    pub nat64: Arc<crate::nat64::Nat64>,
    /// The peer token (management's RelayLoad call needs it).
    pub token: watch::Receiver<Option<String>>,
}

/// The TURN relays' own load as management reports it (within 2 s; none if it cannot say).
async fn turn_load(ctx: &Context) -> Vec<super::TurnLoad> {
    let Some(t) = ctx.token.borrow().clone() else {
        return vec![];
    };
    let mut req = tonic::Request::new(pb::RelayLoadRequest {});
    if let Ok(v) = format!("Bearer {t}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req.set_timeout(Duration::from_secs(2));
    let Ok(r) = ManagementServiceClient::new(ctx.channel.clone())
        .relay_load(req)
        .await
    else {
        return vec![];
    };
    r.into_inner()
        .relays
        .into_iter()
        .map(|l| super::TurnLoad {
            url: l.urls.first().cloned().unwrap_or_default(),
            bits_per_sec: l.bits_per_sec,
            datagrams_per_sec: l.datagrams_per_sec,
            send_drops_per_sec: l.send_drops_per_sec,
            receive_drops_per_sec: l.receive_drops_per_sec,
            unsent_bytes: l.unsent_bytes,
            queue_ms: l.queue_ms,
            overloaded: l.overloaded,
            why: l.why,
            yours_bits_per_sec: l.yours_bits_per_sec,
        })
        .collect()
}

/// The relay's view of this agent now, if it answers within a second.
async fn relay_view(ctx: &Context) -> Option<tern_proto::relay_ws::RelayView> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    ctx.relay_views.try_send(tx).ok()?;
    tokio::time::timeout(Duration::from_secs(1), rx)
        .await
        .ok()?
        .ok()
}

/// Echo requests per peer in the loss/RTT train, and their spacing.
const TRAIN: u32 = 10;
/// Idle times of the `--deep` NAT mapping check (one allocation each, in parallel).
const DEEP_IDLES: [u64; 3] = [12, 24, 48];
/// At most this many peers are probed (the rest are reported from the data plane only).
const MAX_PROBED: usize = 16;

pub async fn run(ctx: &Context, args: &Args) -> Report {
    let t0 = Instant::now();
    let relay = ctx.engine.relay_config();
    let mut stun_urls: Vec<String> = relay.stun.iter().map(|s| s.url.clone()).collect();
    for u in &relay.stun_probe_urls {
        if !stun_urls.contains(u) {
            stun_urls.push(u.clone());
        }
    }
    let turns: Vec<pb::TurnServer> = relay.turn.iter().take(2).cloned().collect();
    let all_peers = ctx.engine.status();
    let map_peers = all_peers.len();
    let peers: Vec<crate::engine::PeerStatus> = all_peers
        .into_iter()
        .filter(|p| {
            args.peer
                .as_ref()
                .is_none_or(|w| *w == p.name || *w == p.overlay_ip)
        })
        .collect();

    let view_before = relay_view(ctx).await;
    let management = management_check(ctx);
    let stun = wire::stun_all(&stun_urls);
    let turn = futures::future::join_all(
        turns
            .iter()
            .map(|t| wire::turn_check(&t.url, &t.username, &t.password, &ctx.nat64)),
    );
    let probes = futures::future::join_all(peers.iter().take(MAX_PROBED).map(|p| {
        let ip: Option<IpAddr> = p.overlay_ip.parse().ok();
        let up = p.state == "connected";
        let mtu = ctx.mtu;
        async move {
            match ip.filter(|_| up) {
                Some(ip) => {
                    let (ping, pmtu) = tokio::join!(ping_train(ip), pmtu_check(ip, mtu));
                    (Some(ping), Some(pmtu))
                }
                None => (None, None),
            }
        }
    }));
    let deep = async {
        match (args.deep, turns.first()) {
            (true, Some(t)) => {
                wire::nat_lifetime(&t.url, &t.username, &t.password, &DEEP_IDLES, &ctx.nat64).await
            }
            _ => vec![],
        }
    };
    let ((management, offset), stun, turn, probes, nat_lifetime) =
        tokio::join!(management, stun, turn, probes, deep);
    let (view_after, turn_load) = tokio::join!(relay_view(ctx), turn_load(ctx));

    let tcp_relay = relay.tcp_relay.first().map(|t| {
        let ok = ctx.engine.tcp_connected();
        Reach {
            ok,
            detail: if ok {
                String::new()
            } else {
                let why = ctx
                    .relay_error
                    .lock()
                    .map(|e| e.clone())
                    .unwrap_or_default();
                if why.is_empty() {
                    format!("not connected to {}", t.url)
                } else {
                    format!("not connected to {}: {why}", t.url)
                }
            },
        }
    });
    let locals = crate::platform::net::local_networks(&ctx.iface);
    let status_now = (ctx.status)();
    let facts = Facts {
        management,
        clock_offset_secs: offset,
        signal: *ctx.signal_up.borrow(),
        tcp_relay,
        stun,
        turn,
        credentials_expire_unix: relay.credentials_expire_unix,
        now_unix: crate::control::now_unix(),
        nat_lifetime,
        relay_view: view_before.zip(view_after),
        keepalive_secs: u64::from(tern_tunnel::KEEPALIVE),
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (ping, pmtu) = probes.get(i).cloned().unwrap_or((None, None));
                PeerFacts {
                    name: p.name.clone(),
                    overlay_ip: p.overlay_ip.clone(),
                    online: p.online,
                    up: p.state == "connected",
                    path: match p.connection {
                        PathKind::Direct => "direct",
                        PathKind::TurnRelay => "turn_relay",
                        PathKind::TcpRelay => "tcp_relay",
                        PathKind::None => "none",
                    }
                    .into(),
                    reason_code: p.path_reason_code.clone(),
                    reason: p.path_reason.clone(),
                    path_changes: p.path_changes_10m,
                    ping,
                    pmtu,
                    probe_rtt_ms: p.latency_ms.filter(|_| p.probes.is_some()),
                    probe_loss_pct: p.loss_pct,
                    in_map_secs: Some(p.in_map_secs),
                    last_handshake_secs: p.last_handshake_secs_ago,
                    access: p.access.clone(),
                }
            })
            .collect(),
        overlay_conflict: ctx
            .overlay_range
            .and_then(|o| crate::routes::conflict(&o, &locals))
            .map(|c| format!("overlay range {c}")),
        routes: ctx
            .engine
            .route_status()
            .into_iter()
            .map(|r| RouteFacts {
                network: r.network,
                via: r.peer_name,
                state: r.state,
                access: r.access,
            })
            .collect(),
        serving: ctx.engine.served_status(),
        ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .ok()
            .map(|v| v.trim() == "1"),
        nat64: ctx.nat64.status(),
        turn_load,
        map_peers: Some(map_peers),
        pending_approval: status_now["pending_approval"] == true,
        relay_loopback: if crate::relays::loopback_url(&ctx.url) {
            vec![]
        } else {
            relay
                .stun
                .iter()
                .map(|x| &x.url)
                .chain(relay.turn.iter().map(|t| &t.url))
                .chain(relay.tcp_relay.iter().map(|t| &t.url))
                .filter(|u| crate::relays::loopback_url(u))
                .cloned()
                .collect()
        },
        nameservers_blocked: status_now["dns"]["blocked"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect(),
        ipv4_unreachable: relay
            .stun
            .iter()
            .map(|x| &x.url)
            .chain(relay.turn.iter().map(|t| &t.url))
            .chain(relay.tcp_relay.iter().map(|t| &t.url))
            .filter(|u| ctx.nat64.unreachable_ipv4(u).is_some())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let mut report = Report {
        findings: super::analyze(&facts),
        facts,
        took_ms: t0.elapsed().as_millis() as u64,
        deep: args.deep,
        bundle: None,
    };
    if args.bundle {
        let mut secrets = (ctx.secrets)();
        for t in &relay.turn {
            secrets.push(t.password.clone());
        }
        for t in &relay.tcp_relay {
            secrets.push(t.token.clone());
        }
        let pretty =
            |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
        let files = vec![
            ("status.json".to_string(), pretty((ctx.status)())),
            (
                "diagnose.json".to_string(),
                pretty(serde_json::to_value(&report).unwrap_or_default()),
            ),
            ("diagnose.txt".to_string(), super::render(&report)),
            ("log.txt".to_string(), crate::logring::recent()),
            ("system.txt".to_string(), super::bundle::system().await),
        ];
        report.bundle = Some(super::bundle::Files {
            files: files
                .into_iter()
                .map(|(n, c)| (n, super::bundle::redact(&c, &secrets)))
                .collect(),
        });
    }
    report
}

/// Management answers (the same call a login starts with), and the server's clock then.
async fn management_check(ctx: &Context) -> (Reach, Option<i64>) {
    let mut c = ManagementServiceClient::new(ctx.channel.clone());
    let before = crate::control::now_unix_f64();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        c.get_server_key(pb::ServerKeyRequest {}),
    )
    .await;
    let after = crate::control::now_unix_f64();
    match r {
        Err(_) => (
            Reach {
                ok: false,
                detail: format!("{} did not answer within 3 s", ctx.url),
            },
            None,
        ),
        Ok(Err(s)) => (
            Reach {
                ok: false,
                detail: crate::control::describe(&ctx.url, &s),
            },
            None,
        ),
        Ok(Ok(k)) => {
            let server = k.into_inner().server_time_unix;
            let offset = (server as f64 + 0.5 - (before + after) / 2.0).round() as i64;
            (
                Reach {
                    ok: true,
                    detail: String::new(),
                },
                (server > 0).then_some(offset),
            )
        }
    }
}

/// Runs `ping` (bounded by its own deadline) and returns its output, or None.
async fn ping(args: Vec<String>) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(8),
        tokio::process::Command::new("ping")
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).to_string())
}

/// "10 packets transmitted, 9 received, ..." and "rtt min/avg/max/mdev = a/b/c/d ms".
pub fn parse_ping(out: &str) -> PingFacts {
    let mut p = PingFacts::default();
    for line in out.lines() {
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            p.sent = nums.first().copied().unwrap_or(0);
            p.received = nums.get(1).copied().unwrap_or(0);
        }
        if let Some(v) = line.split(" = ").nth(1).filter(|_| line.starts_with("rtt")) {
            let vals: Vec<f64> = v
                .split_whitespace()
                .next()
                .unwrap_or("")
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect();
            p.avg_ms = vals.get(1).copied();
            p.max_ms = vals.get(2).copied();
        }
    }
    p
}

fn ping_args(ip: IpAddr, count: u32, size: Option<u32>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-n".into(),
        "-q".into(),
        "-c".into(),
        count.to_string(),
        "-i".into(),
        "0.2".into(),
        "-W".into(),
        "1".into(),
    ];
    if let Some(s) = size {
        a.extend(["-M".into(), "do".into(), "-s".into(), s.to_string()]);
    }
    a.push(ip.to_string());
    a
}

/// A train of echo requests through the tunnel: loss and round trip of the path as it is.
async fn ping_train(ip: IpAddr) -> PingFacts {
    ping(ping_args(ip, TRAIN, None))
        .await
        .map(|o| parse_ping(&o))
        .unwrap_or_default()
}

/// Full-size and small echo requests with DF; when only small ones pass, the largest size that
/// does (bisection, one request per step).
async fn pmtu_check(ip: IpAddr, mtu: u32) -> PmtuFacts {
    let header = if ip.is_ipv4() { 28 } else { 48 };
    let passes = |size: u32, n: u32| async move {
        ping(ping_args(ip, n, Some(size.saturating_sub(header))))
            .await
            .map(|o| parse_ping(&o).received > 0)
            .unwrap_or(false)
    };
    let small = 576.min(mtu);
    let (full_ok, small_ok) = tokio::join!(passes(mtu, 3), passes(small, 3));
    let mut largest_ok = None;
    if small_ok && !full_ok {
        let (mut lo, mut hi) = (small, mtu);
        while hi - lo > 16 {
            let mid = (lo + hi) / 2;
            if passes(mid, 1).await {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        largest_ok = Some(lo);
    }
    PmtuFacts {
        mtu,
        full_ok,
        small_ok,
        largest_ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_is_read_for_loss_and_round_trip() {
        let out = "PING 100.64.0.3 (100.64.0.3) 56(84) bytes of data.\n\n--- 100.64.0.3 ping statistics ---\n10 packets transmitted, 7 received, 30% packet loss, time 1804ms\nrtt min/avg/max/mdev = 0.310/352.512/401.100/0.090 ms\n";
        let p = parse_ping(out);
        assert_eq!((p.sent, p.received), (10, 7));
        assert_eq!(p.avg_ms, Some(352.512));
        assert_eq!(p.max_ms, Some(401.1));
        let none = parse_ping(
            "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2040ms\n",
        );
        assert_eq!((none.sent, none.received, none.avg_ms), (3, 0, None));
    }
}
