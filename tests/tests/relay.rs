//! Relay suite: coturn's own clients against Tern's STUN/TURN, credential and peer-filter checks
//! with the `turn` crate's client, the WebSocket datagram relay through TLS, a slow receiver, and
//! garbage input. Needs Debian's `coturn` package (turnutils_*), which scripts/test installs.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tern_relay::metrics::Metrics;
use tern_relay::{Relay, RelayConfig};
use tern_relay_client::RelayClient;
use tern_tests::{admin_login, init_tracing, rss_kib};
use tokio::net::UdpSocket;
use webrtc_util::Conn;

const SECRET: &[u8] = b"relay-test-secret";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A relay on loopback; `lab` allows 127.0.0.0/8 as a peer (coturn's tools relay client to client
/// through relayed addresses, which are loopback here).
async fn relay(lab: bool) -> Relay {
    Relay::start(relay_config(lab)).await.expect("relay starts")
}

fn relay_config(lab: bool) -> RelayConfig {
    let mut cfg = RelayConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1".parse().expect("ip"),
        SECRET.to_vec(),
    );
    cfg.relay_bind_ip = "127.0.0.1".parse().expect("ip");
    cfg.min_port = 40000 + (rand::random::<u16>() % 20000);
    cfg.max_port = cfg.min_port + 400;
    if lab {
        cfg.allow_peers = vec!["127.0.0.0/8".parse().expect("net")];
    }
    cfg
}

fn need(tool: &str) -> String {
    let p = format!("/usr/bin/{tool}");
    assert!(
        std::path::Path::new(&p).exists(),
        "{tool} missing: apt-get install coturn (scripts/test does)"
    );
    p
}

/// Runs a command with a time limit; returns (success, stdout+stderr).
async fn run(mut cmd: Command, limit: Duration) -> (bool, String) {
    let out = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("tool finished in time")
        .expect("join")
        .expect("tool ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn lost_packets(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.contains("Total lost packets"))?;
    line.split("Total lost packets")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_uclient_relays_between_its_clients_with_zero_loss() {
    init_tracing();
    let r = relay(true).await;
    let port = r.udp_addr.port().to_string();
    let mut cmd = Command::new(need("turnutils_uclient"));
    // 4 clients paired client-to-client (-y), 200 messages of 1,200 bytes each, every 5 ms.
    cmd.args([
        "-y", "-c", "-n", "200", "-m", "4", "-l", "1200", "-z", "5", "-u", "tester", "-W",
    ])
    .arg(String::from_utf8_lossy(SECRET).to_string())
    .args(["-p", &port, "127.0.0.1"]);
    let (_, out) = run(cmd, Duration::from_secs(60)).await;
    eprintln!("uclient output:\n{out}");
    let lost =
        lost_packets(&out).unwrap_or_else(|| panic!("uclient printed no loss figure:\n{out}"));
    assert_eq!(lost, 0, "uclient lost packets:\n{out}");
    assert!(
        Metrics::get(&r.metrics.allocations_total) >= 4,
        "allocations: {}",
        r.metrics.render()
    );
    assert!(
        Metrics::get(&r.metrics.turn_packets_relayed_total) >= 4 * 200,
        "{}",
        r.metrics.render()
    );

    // The same with a wrong secret: no allocation, no relayed message.
    let before = Metrics::get(&r.metrics.allocations_total);
    let mut cmd = Command::new(need("turnutils_uclient"));
    cmd.args([
        "-y",
        "-c",
        "-n",
        "5",
        "-m",
        "2",
        "-l",
        "100",
        "-u",
        "tester",
        "-W",
        "wrong-secret",
        "-p",
        &port,
        "127.0.0.1",
    ]);
    let (ok, out) = run(cmd, Duration::from_secs(60)).await;
    eprintln!("uclient with a wrong secret:\n{out}");
    assert!(
        !ok || lost_packets(&out).is_none(),
        "wrong secret must not relay:\n{out}"
    );
    assert_eq!(
        Metrics::get(&r.metrics.allocations_total),
        before,
        "no allocation with a wrong secret"
    );
    assert!(
        Metrics::get(&r.metrics.auth_failures_total) >= 1,
        "wrong passwords are counted"
    );
    r.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_binding_returns_the_mapped_address() {
    init_tracing();
    let r = relay(false).await;
    // coturn's STUN client.
    let mut cmd = Command::new(need("turnutils_stunclient"));
    cmd.args(["-p", &r.udp_addr.port().to_string(), "127.0.0.1"]);
    let (ok, out) = run(cmd, Duration::from_secs(30)).await;
    assert!(ok, "{out}");
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    // The stun crate (as agents use it), checking the exact port.
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let local = sock.local_addr().expect("addr");
    let client = turn_client(sock, &r.udp_addr, "", "").await;
    let mapped = client.send_binding_request().await.expect("binding");
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS is the client's address");
    assert!(Metrics::get(&r.metrics.stun_requests_total) >= 2);
    client.close().await.expect("close");
    r.close().await;
}

async fn turn_client(
    sock: Arc<UdpSocket>,
    server: &SocketAddr,
    user: &str,
    pass: &str,
) -> turn::client::Client {
    let c = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.to_string(),
        password: pass.to_string(),
        realm: "tern".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: sock,
        vnet: None,
    })
    .await
    .expect("client");
    c.listen().await.expect("listen");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_or_forged_credentials_and_loopback_peers_are_refused() {
    init_tracing();
    let r = relay(false).await;
    let sock = || async { Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind")) };

    // Expired.
    let old = tern_proto::relay_auth::issue(SECRET, "peer-x", now() - 10);
    let c = turn_client(sock().await, &r.udp_addr, &old.username, &old.password).await;
    assert!(
        c.allocate().await.is_err(),
        "expired credentials must not allocate"
    );
    c.close().await.expect("close");
    // Wrong secret.
    let forged = tern_proto::relay_auth::issue(b"guess", "peer-x", now() + 600);
    let c = turn_client(
        sock().await,
        &r.udp_addr,
        &forged.username,
        &forged.password,
    )
    .await;
    assert!(
        c.allocate().await.is_err(),
        "forged credentials must not allocate"
    );
    c.close().await.expect("close");
    assert!(
        Metrics::get(&r.metrics.auth_failures_total) >= 2,
        "expired and forged both counted"
    );
    assert_eq!(Metrics::get(&r.metrics.allocations_total), 0);

    // Valid: allocates, but a permission to 127.0.0.1 is refused (default filter).
    let good = tern_proto::relay_auth::issue(SECRET, "peer-x", now() + 600);
    let c = turn_client(sock().await, &r.udp_addr, &good.username, &good.password).await;
    let conn = c.allocate().await.expect("valid credentials allocate");
    assert_eq!(Metrics::get(&r.metrics.allocations_active), 1);
    let target = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let err = conn
        .send_to(b"hello", target.local_addr().expect("addr"))
        .await;
    assert!(err.is_err(), "permission to loopback must be refused");
    assert!(Metrics::get(&r.metrics.forbidden_peer_total) >= 1);
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_millis(500), target.recv_from(&mut buf)).await;
    assert!(got.is_err(), "nothing reached the loopback target");
    conn.close().await.expect("close");
    c.close().await.expect("close");
    r.close().await;
}

/// Security review, round two, item 11: an allocation cannot talk to the relay's own STUN/TURN
/// port (a nested Allocate through the relay, or a STUN answer about the relay itself), even in a
/// lab that allows the relay's address as a peer; other peers there still work. Before, a
/// Binding request sent through the relay to its own port was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_cannot_reach_the_relays_own_ports() {
    use stun::message::{Getter, Message, BINDING_REQUEST};
    init_tracing();
    let r = relay(true).await;
    let good = tern_proto::relay_auth::issue(SECRET, "peer-x", now() + 600);
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c = turn_client(sock, &r.udp_addr, &good.username, &good.password).await;
    let conn = c.allocate().await.expect("allocate");
    let mut m = Message::new();
    m.build(&[
        Box::new(stun::agent::TransactionId::new()),
        Box::new(BINDING_REQUEST),
    ])
    .expect("binding request");
    let before = Metrics::get(&r.metrics.forbidden_peer_total);
    let _ = conn.send_to(&m.raw, r.udp_addr).await;
    let mut buf = [0u8; 1500];
    let answer = tokio::time::timeout(Duration::from_secs(1), conn.recv_from(&mut buf)).await;
    if let Ok(Ok((n, from))) = &answer {
        let mut got = Message::new();
        got.raw = buf[..*n].to_vec();
        let _ = got.decode();
        let mut addr = stun::xoraddr::XorMappedAddress::default();
        let _ = addr.get_from(&got);
        panic!(
            "the relay answered itself from {from}: {} bytes, mapped {addr}",
            n
        );
    }
    assert!(Metrics::get(&r.metrics.forbidden_peer_total) > before);
    // A peer on the same (lab-allowed) address still gets datagrams.
    let target = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    conn.send_to(b"hello", target.local_addr().expect("addr"))
        .await
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(2), target.recv_from(&mut buf)).await;
    assert!(matches!(got, Ok(Ok((5, _)))), "{got:?}");
    conn.close().await.expect("close");
    c.close().await.expect("close");
    r.close().await;
}

/// Bursts through a bound channel, both ways: a peer's GSO sends (one `sendmsg` for a run of
/// datagrams, as agents send) reach the client as separate ChannelData messages, and a client's
/// quick succession of messages reaches the peer; every datagram whole, in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_through_a_bound_channel_arrive_whole_and_in_order_both_ways() {
    init_tracing();
    let r = relay(true).await;
    let creds = tern_proto::relay_auth::issue(SECRET, "peer-burst", now() + 600);
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c = turn_client(sock, &r.udp_addr, &creds.username, &creds.password).await;
    let conn = c.allocate().await.expect("allocate");
    let relayed = conn.local_addr().expect("relayed address");
    let peer = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let peer_addr = peer.local_addr().expect("addr");
    let mut buf = vec![0u8; 65_536];

    // Until the client's channel to the peer is bound (the client binds one after its first
    // send), messages may go as Send indications; wait for ChannelData to be in use.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer did not hear the client through the relay"
        );
        conn.send_to(b"warm-up", peer_addr).await.expect("send");
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(100), peer.recv_from(&mut buf)).await
        {
            assert_eq!((&buf[..n], from), (&b"warm-up"[..], relayed));
            seen += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while tokio::time::timeout(Duration::from_millis(200), peer.recv_from(&mut buf))
        .await
        .is_ok()
    {}

    // Peer -> client: runs of 40 numbered datagrams of 1,000 bytes (the last of each run 300),
    // each run one GSO send.
    let numbered = |i: usize, len: usize| -> Vec<u8> {
        let mut d = vec![(i % 251) as u8; len];
        d[..4].copy_from_slice(&(i as u32).to_be_bytes());
        d
    };
    let sender = tern_udp::SegmentSender::default();
    let per_run = 40;
    for run in 0..5 {
        let mut data = vec![];
        let mut want = vec![];
        for k in 0..per_run {
            let d = numbered(run * per_run + k, if k == per_run - 1 { 300 } else { 1000 });
            data.extend_from_slice(&d);
            want.push(d);
        }
        sender
            .send(&peer, &data, 1000, relayed)
            .await
            .expect("peer sends");
        for (k, w) in want.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(3), conn.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "peer -> client: run {run} lost from datagram {k} (GSO {})",
                        sender.gso()
                    )
                })
                .expect("client receives");
            assert_eq!(got.1, peer_addr, "the relay names the peer as the sender");
            assert!(
                &buf[..got.0] == w.as_slice(),
                "peer -> client: run {run} datagram {k} differs or is out of order"
            );
        }
    }

    // Client -> peer: runs of 20 datagrams sent back to back.
    for run in 0..10 {
        let want: Vec<Vec<u8>> = (0..20)
            .map(|k| numbered(run * 20 + k, 900 + k % 3))
            .collect();
        for d in &want {
            conn.send_to(d, peer_addr).await.expect("client sends");
        }
        for (k, w) in want.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("client -> peer: run {run} lost from datagram {k}"))
                .expect("peer receives");
            assert_eq!(got.1, relayed, "datagrams leave from the relayed address");
            assert!(
                &buf[..got.0] == w.as_slice(),
                "client -> peer: run {run} datagram {k} differs or is out of order"
            );
        }
    }
    assert!(
        Metrics::get(&r.metrics.turn_packets_relayed_total) >= 400,
        "{}",
        r.metrics.render()
    );
    conn.close().await.expect("close");
    c.close().await.expect("close");
    r.close().await;
}

/// Two clients relayed by the same server, each with a channel to the other's relayed address
/// (two agents both on TURN): what one sends reaches the other whole, in order, none lost, both
/// ways (the relay hands it from one allocation to the other without crossing its sockets).
type End = (
    turn::client::Client,
    Arc<dyn webrtc_util::Conn + Send + Sync>,
    SocketAddr,
);

/// Two allocations on `r` (users `left` and `right`) that have heard each other through their
/// channels (both ways: permissions and channels are in place), with nothing left to read.
async fn allocation_pair(r: &Relay, left: &str, right: &str) -> (End, End) {
    let mut ends = vec![];
    for name in [left, right] {
        let creds = tern_proto::relay_auth::issue(SECRET, name, now() + 600);
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let c = turn_client(sock, &r.udp_addr, &creds.username, &creds.password).await;
        let conn: Arc<dyn webrtc_util::Conn + Send + Sync> =
            Arc::new(c.allocate().await.expect("allocate"));
        let addr = conn.local_addr().expect("relayed address");
        ends.push((c, conn, addr));
    }
    let (la, ra) = (ends[0].2, ends[1].2);
    let (l, rt) = (ends[0].1.clone(), ends[1].1.clone());
    let mut buf = vec![0u8; 2048];
    // Both sides send until each hears the other (the turn client binds a channel after its
    // first send).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut heard_l, mut heard_r) = (0, 0);
    while heard_l < 20 || heard_r < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the allocations did not reach each other ({heard_l}, {heard_r})"
        );
        l.send_to(b"hi", ra).await.expect("send");
        rt.send_to(b"hi", la).await.expect("send");
        for (conn, heard, other) in [(&l, &mut heard_l, ra), (&rt, &mut heard_r, la)] {
            while let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_millis(50), conn.recv_from(&mut buf)).await
            {
                assert_eq!((&buf[..n], from), (&b"hi"[..], other));
                *heard += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for conn in [&l, &rt] {
        while tokio::time::timeout(Duration::from_millis(200), conn.recv_from(&mut buf))
            .await
            .is_ok()
        {}
    }
    let right_end = ends.pop().expect("right");
    let left_end = ends.pop().expect("left");
    (left_end, right_end)
}

async fn close_ends(ends: Vec<End>) {
    for (c, conn, _) in ends {
        conn.close().await.expect("close");
        c.close().await.expect("close");
    }
}

/// Datagram `i` of a numbered stream (its number in the first four bytes, two lengths).
fn numbered(i: usize) -> Vec<u8> {
    let mut d = vec![(i % 251) as u8; 1000 + (i % 2) * 100];
    d[..4].copy_from_slice(&(i as u32).to_be_bytes());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_allocations_on_one_relay_reach_each_other_through_their_channels() {
    init_tracing();
    let r = relay(true).await;
    let ((lc, left, la), (rc, right, ra)) = allocation_pair(&r, "peer-left", "peer-right").await;
    let mut buf = vec![0u8; 2048];
    for (from, to, to_addr, from_addr) in [(&left, &right, ra, la), (&right, &left, la, ra)] {
        for run in 0..10 {
            let want: Vec<Vec<u8>> = (0..20).map(|k| numbered(run * 20 + k)).collect();
            for d in &want {
                from.send_to(d, to_addr).await.expect("send");
            }
            for (k, w) in want.iter().enumerate() {
                let got = tokio::time::timeout(Duration::from_secs(3), to.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("run {run}: lost from datagram {k}"))
                    .expect("receive");
                assert_eq!(got.1, from_addr, "the sender's relayed address");
                assert!(
                    &buf[..got.0] == w.as_slice(),
                    "run {run}: datagram {k} differs or is out of order"
                );
            }
        }
    }
    close_ends(vec![(lc, left, la), (rc, right, ra)]).await;
    r.close().await;
}

/// The relay groups a batch's datagrams by destination (one GSO send per group): flows sent
/// interleaved, datagram by datagram, must still each arrive whole and in their own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_flows_through_one_relay_each_arrive_in_their_own_order() {
    init_tracing();
    let r = relay(true).await;
    let (a, b) = allocation_pair(&r, "flow-a-from", "flow-a-to").await;
    let (c, d) = allocation_pair(&r, "flow-b-from", "flow-b-to").await;
    let mut buf = vec![0u8; 2048];
    for round in 0..15 {
        // 20 datagrams of each flow, interleaved as fast as the clients send: the relay reads
        // several of them in one batch. Then all of them back, before the clients' sockets fill.
        let first = round * 20;
        for i in first..first + 20 {
            a.1.send_to(&numbered(i), b.2).await.expect("send");
            c.1.send_to(&numbered(1000 + i), d.2).await.expect("send");
        }
        for (to, from, offset) in [(&b, &a, 0), (&d, &c, 1000)] {
            for i in first..first + 20 {
                let (n, src) =
                    tokio::time::timeout(Duration::from_secs(3), to.1.recv_from(&mut buf))
                        .await
                        .unwrap_or_else(|_| panic!("datagram {} was lost", offset + i))
                        .expect("receive");
                assert_eq!(src, from.2, "the sender's relayed address");
                let number = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                assert_eq!(
                    number,
                    offset + i,
                    "out of order, or another flow's datagram"
                );
                assert!(
                    buf[..n] == numbered(offset + i),
                    "datagram {number} differs"
                );
            }
        }
    }
    close_ends(vec![a, b, c, d]).await;
    r.close().await;
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let (cert, key, _) = tern_tests::self_signed_localhost();
    let server = tern_relay::tls::server_config(vec![cert.clone()], key).expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    (server, Arc::new(client))
}

/// Serves the relay's HTTP side over TLS on loopback; returns its wss base URL and a stopper.
async fn serve_tls(r: &Relay) -> (String, tokio::sync::watch::Sender<bool>) {
    let (server, _) = tls_pair_cached();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(tern_relay::tls::serve(
        listener,
        r.router(),
        Some(server),
        rx,
    ));
    (format!("wss://localhost:{port}/relay"), tx)
}

fn tls_pair_cached() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    static P: std::sync::OnceLock<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> =
        std::sync::OnceLock::new();
    P.get_or_init(tls_pair).clone()
}

fn token(peer: &str, exp: i64, secret: &[u8]) -> String {
    let c = tern_proto::relay_auth::issue(secret, peer, exp);
    format!("{}:{}", c.username, c.password)
}

async fn recv_within(c: &mut RelayClient, d: Duration) -> (String, Vec<u8>) {
    tokio::time::timeout(d, c.recv())
        .await
        .expect("datagram in time")
        .expect("recv ok")
        .expect("open")
}

async fn wait_connected(r: &Relay, n: usize) {
    for _ in 0..200 {
        if r.tcp.connected() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} TCP relay clients did not register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay_over_tls_carries_datagrams_both_ways_and_stamps_the_sender() {
    init_tracing();
    let r = relay(false).await;
    let (url, stop) = serve_tls(&r).await;
    let (_, tls) = tls_pair_cached();
    let mut a = RelayClient::connect(
        &url,
        &token("peer-a", now() + 600, SECRET),
        Some(tls.clone()),
    )
    .await
    .expect("A connects");
    let mut b = RelayClient::connect(
        &url,
        &token("peer-b", now() + 600, SECRET),
        Some(tls.clone()),
    )
    .await
    .expect("B connects");
    wait_connected(&r, 2).await;
    a.send("peer-b", b"from a").await.expect("send");
    assert_eq!(
        recv_within(&mut b, Duration::from_secs(5)).await,
        ("peer-a".to_string(), b"from a".to_vec())
    );
    b.send("peer-a", b"from b").await.expect("send");
    assert_eq!(
        recv_within(&mut a, Duration::from_secs(5)).await,
        ("peer-b".to_string(), b"from b".to_vec())
    );
    // A 1,400-byte datagram (a full-size WireGuard packet) arrives intact.
    let big: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
    a.send("peer-b", &big).await.expect("send");
    assert_eq!(recv_within(&mut b, Duration::from_secs(5)).await.1, big);

    // Bad, expired and missing tokens are refused with a reason.
    for (t, why) in [
        (token("peer-c", now() + 600, b"wrong"), "wrong password"),
        (token("peer-c", now() - 5, SECRET), "expired"),
        ("nonsense".to_string(), "token is not"),
    ] {
        let err = RelayClient::connect(&url, &t, Some(tls.clone()))
            .await
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("401") && err.to_string().contains(why),
            "{err}"
        );
    }
    // Plain HTTP to the TLS port fails; a plain GET without upgrade is told what the endpoint is.
    assert!(RelayClient::connect(
        &url.replace("wss://", "ws://"),
        &token("p", now() + 60, SECRET),
        None
    )
    .await
    .is_err());
    assert!(Metrics::get(&r.metrics.auth_failures_total) >= 3);
    assert!(Metrics::get(&r.metrics.tcp_packets_relayed_total) >= 3);
    let _ = stop.send(true);
    r.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_causes_counted_drops_not_unbounded_memory() {
    init_tracing();
    let r = relay(false).await;
    let (url, stop) = serve_tls(&r).await;
    let (_, tls) = tls_pair_cached();
    let mut fast =
        RelayClient::connect(&url, &token("fast", now() + 600, SECRET), Some(tls.clone()))
            .await
            .expect("fast");
    // The slow client connects and never reads.
    let _slow = RelayClient::connect(&url, &token("slow", now() + 600, SECRET), Some(tls.clone()))
        .await
        .expect("slow");
    wait_connected(&r, 2).await;
    let before = rss_kib();
    let payload = vec![7u8; 1200];
    // 40,000 x 1,200 bytes = 48 MB offered to a receiver that reads nothing (bounded loop).
    for _ in 0..40_000 {
        fast.send("slow", &payload).await.expect("send");
    }
    // Let the relay work through what it has read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = r.tcp.queued("slow").expect("slow still connected");
    assert!(
        queued <= 1 << 20,
        "queue is bounded to 1 MiB, got {queued} bytes"
    );
    assert!(
        Metrics::get(&r.metrics.tcp_drops_total) > 10_000,
        "excess is dropped and counted: {}",
        r.metrics.render()
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 40 * 1024,
        "memory grew by {grown} KiB for 48 MB offered"
    );
    // The sender asks the relay for its view (`tern diagnose`): its own drops, counted.
    fast.request_view().await.expect("ask");
    let view = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match fast.recv_any().await {
                Ok(Some(tern_relay_client::Incoming::View(v))) => return v,
                Ok(Some(_)) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the relay answers within 5 s");
    assert!(view.dropped_from_you > 10_000, "{view:?}");
    assert_eq!(view.dropped_to_you, 0, "{view:?}");
    assert_eq!(view.queue_limit_bytes, 1 << 20);
    assert_eq!(view.clients, 2);
    assert_eq!(view.drops_total, Metrics::get(&r.metrics.tcp_drops_total));
    let _ = stop.send(true);
    r.close().await;
}

/// Security issue item 9: a flood of unauthenticated TURN requests from a thousand sources is
/// answered with the TURN server's current nonce by the front: the server creates one nonce, not
/// one per request (its nonce table is never pruned), and every request still gets its 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_does_not_grow_the_nonce_table() {
    init_tracing();
    let r = relay(false).await;
    let to = r.udp_addr;
    // Allocate requests without credentials: 20-byte header, random transaction id.
    let allocate = || {
        let mut m = vec![0x00, 0x03, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        m.extend((0..12).map(|_| rand::random::<u8>()));
        m
    };
    let mut answered = 0;
    for i in 0..1000u32 {
        let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let sock = UdpSocket::bind((ip, 0))
            .await
            .expect("bind a loopback source");
        for _ in 0..20 {
            sock.send_to(&allocate(), to).await.expect("send");
        }
        // Sampled sources are answered (a 401 error response with a nonce); all 20 answers to
        // the last one mean the relay has handled every request before them.
        let replies = match i {
            999 => 20,
            _ if i % 100 == 0 => 1,
            _ => 0,
        };
        for _ in 0..replies {
            let mut buf = [0u8; 1500];
            let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
                .await
                .expect("a 401 within 2 s")
                .expect("recv");
            assert_eq!(&buf[..2], &[0x01, 0x13], "Allocate error response");
            assert!(n > 20);
            answered += 1;
        }
    }
    assert_eq!(answered, 10 + 20);
    let created = Metrics::get(&r.metrics.turn_nonces_issued_total);
    assert!(
        (1..=2).contains(&created),
        "20,000 unauthenticated requests made the TURN server create {created} nonces"
    );
    r.close().await;
}

/// Security issue item 10: large datagrams to a stalled receiver pin at most the byte budget
/// (not 512 x 64 KiB), a newer connection of the same peer closes the older one and frees its
/// queue, and the relay refuses connections past its global cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_bounded_in_bytes_replaced_connections_close_and_clients_are_capped() {
    init_tracing();
    let mut cfg = relay_config(false);
    cfg.tcp.max_clients = 3;
    let r = Relay::start(cfg).await.expect("relay starts");
    let (url, stop) = serve_tls(&r).await;
    let (_, tls) = tls_pair_cached();
    let connect = |peer: &'static str| {
        let url = url.clone();
        let tls = tls.clone();
        async move { RelayClient::connect(&url, &token(peer, now() + 600, SECRET), Some(tls)).await }
    };
    let mut fast = connect("fast").await.expect("fast");
    let mut stale = connect("dup").await.expect("first connection of dup");
    wait_connected(&r, 2).await;
    // 64 KiB datagrams (the largest) to a receiver that never reads: 300 of them = 19 MB offered.
    let big = vec![9u8; 65_000];
    for _ in 0..300 {
        fast.send("dup", &big).await.expect("send");
    }
    // Every frame the relay read is either queued or dropped.
    tern_tests::wait_until(
        "the relay handled all 300 frames",
        Duration::from_secs(10),
        || {
            Metrics::get(&r.metrics.tcp_packets_relayed_total)
                + Metrics::get(&r.metrics.tcp_drops_total)
                >= 300
        },
    )
    .await;
    let queued = r.tcp.queued("dup").expect("dup connected");
    assert!(
        queued <= 1 << 20,
        "at most 1 MiB queued, got {queued} bytes"
    );
    // The same peer connects again: the stalled connection is closed, its queue freed.
    let mut fresh = connect("dup").await.expect("second connection of dup");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stale.recv().await {
                Ok(Some(_)) => {} // what was already in flight
                _ => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the replaced connection is closed");
    assert!(
        r.tcp.queued("dup").unwrap_or(0) < 65_536,
        "the old queue went with it"
    );
    fast.send("dup", b"to the new one").await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), fresh.recv())
        .await
        .expect("delivered within 5 s")
        .expect("recv");
    assert_eq!(got, Some(("fast".to_string(), b"to the new one".to_vec())));
    // The cap: fast, dup and one more; a fourth client is refused with a reason.
    let _third = connect("third").await.expect("third");
    wait_connected(&r, 3).await;
    let err = connect("fourth").await.err().expect("over the cap");
    assert!(format!("{err:#}").contains("503"), "{err:#}");
    let _ = stop.send(true);
    r.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_udp_and_websocket_input_never_breaks_the_relay() {
    init_tracing();
    let r = relay(false).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Random datagrams, STUN-looking headers with random bodies, and truncated valid requests.
    let mut valid = stun::message::Message::new();
    valid
        .build(&[
            Box::new(stun::agent::TransactionId::new()),
            Box::new(stun::message::BINDING_REQUEST),
        ])
        .expect("build");
    for i in 0..3000usize {
        let mut b: Vec<u8> = (0..(rnd() % 600) as usize).map(|_| rnd() as u8).collect();
        match i % 3 {
            0 => {}
            1 if b.len() >= 20 => {
                b[0] = 0x00;
                b[1] = 0x03; // Allocate request type
                b[4..8].copy_from_slice(&0x2112A442u32.to_be_bytes());
            }
            _ => b = valid.raw[..(rnd() as usize % valid.raw.len())].to_vec(),
        }
        let _ = sock.send_to(&b, r.udp_addr).await;
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Still answers a real binding request (from a fresh source, not rate-limited).
    let s2 = Arc::new(UdpSocket::bind("127.0.0.2:0").await.expect("bind"));
    let c = turn_client(s2, &r.udp_addr, "", "").await;
    let mapped = tokio::time::timeout(Duration::from_secs(5), c.send_binding_request())
        .await
        .expect("in time")
        .expect("binding");
    assert_eq!(mapped.ip().to_string(), "127.0.0.2");
    c.close().await.expect("close");
    assert!(Metrics::get(&r.metrics.malformed_total) > 0);

    // WebSocket: random binary frames, then the relay still relays.
    let (url, stop) = serve_tls(&r).await;
    let (_, tls) = tls_pair_cached();
    let mut a = RelayClient::connect(&url, &token("fa", now() + 600, SECRET), Some(tls.clone()))
        .await
        .expect("a");
    let mut b = RelayClient::connect(&url, &token("fb", now() + 600, SECRET), Some(tls.clone()))
        .await
        .expect("b");
    wait_connected(&r, 2).await;
    for _ in 0..500 {
        let f: Vec<u8> = (0..(rnd() % 300) as usize).map(|_| rnd() as u8).collect();
        a.send_raw(f).await.expect("send garbage");
    }
    a.send("fb", b"still works").await.expect("send");
    loop {
        let (from, d) = recv_within(&mut b, Duration::from_secs(5)).await;
        // Random frames may happen to address "fb" correctly; skip those.
        if d == b"still works" {
            assert_eq!(from, "fa");
            break;
        }
    }
    let _ = stop.send(true);
    r.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_map_hands_out_working_credentials_for_the_embedded_relay() {
    init_tracing();
    let db = tern_tests::TestDb::new(tern_tests::Backend::Sqlite)
        .await
        .expect("db");
    let srv = tern_tests::TestServer::start(&db.url)
        .await
        .expect("server");
    let relay_addr = srv
        .running
        .as_ref()
        .and_then(|r| r.relay.as_ref())
        .expect("embedded relay")
        .udp_addr;
    let a = tern_tests::TestAgent::new(&srv, "a").await;
    let b = tern_tests::TestAgent::new(&srv, "b").await;
    let la = a.login(Some(&srv.default_setup_key)).await.expect("a");
    let lb = b.login(Some(&srv.default_setup_key)).await.expect("b");
    let mut sa = a.sync(&la.peer_token).await.expect("sync a");
    let mut sb = b.sync(&lb.peer_token).await.expect("sync b");
    let ma = tern_tests::next_map(&mut sa, Duration::from_secs(5))
        .await
        .expect("map a");
    let mb = tern_tests::next_map(&mut sb, Duration::from_secs(5))
        .await
        .expect("map b");
    let ra = ma.relay.expect("relay section");
    assert_eq!(
        ra.stun[0].url,
        format!("stun:127.0.0.1:{}", relay_addr.port())
    );
    assert_eq!(
        ra.turn[0].url,
        format!("turn:127.0.0.1:{}?transport=udp", relay_addr.port())
    );
    assert!(
        ra.credentials_expire_unix > now() + 3600,
        "credentials live for hours"
    );

    // TURN: the map's credentials allocate on the relay the server runs.
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c = turn_client(
        sock,
        &relay_addr,
        &ra.turn[0].username,
        &ra.turn[0].password,
    )
    .await;
    let conn = c.allocate().await.expect("allocate with map credentials");
    conn.close().await.expect("close");
    c.close().await.expect("close");

    // TCP relay: both agents connect with their tokens and exchange a datagram, addressed by peer id.
    let url = &ra.tcp_relay[0].url;
    assert_eq!(
        url,
        &format!("{}/relay", srv.base.replace("http://", "ws://"))
    );
    let mut ca = RelayClient::connect(url, &ra.tcp_relay[0].token, None)
        .await
        .expect("a connects");
    let rb = mb.relay.expect("relay");
    let mut cb = RelayClient::connect(&rb.tcp_relay[0].url, &rb.tcp_relay[0].token, None)
        .await
        .expect("b connects");
    let relay = srv
        .running
        .as_ref()
        .and_then(|r| r.relay.clone())
        .expect("relay");
    wait_connected(&relay, 2).await;
    ca.send(&lb.peer_id, b"hello b").await.expect("send");
    assert_eq!(
        recv_within(&mut cb, Duration::from_secs(5)).await,
        (la.peer_id.clone(), b"hello b".to_vec())
    );

    // Metrics are served on the same port, to admins only.
    let anonymous = srv
        .http
        .get(srv.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(anonymous.status().as_u16(), 401, "metrics need a token");
    let text = srv
        .http
        .get(srv.url("/metrics"))
        .bearer_auth(&srv.token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(text.contains("tern_relay_allocations_total 1"), "{text}");
    assert!(
        text.contains("tern_relay_tcp_packets_relayed_total 1"),
        "{text}"
    );
    // A `user` is refused (service names and traffic are not theirs to see); an auditor, the
    // read-only account a scraper should use, is served.
    for (role, expect) in [("user", 403), ("auditor", 200)] {
        let (s, v) = srv
            .post(
                "/api/users",
                serde_json::json!({"username": format!("m-{role}"), "password": "metrics-pass-1", "role": role}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let token = admin_login(&srv.http, &srv.base, &format!("m-{role}"), "metrics-pass-1")
            .await
            .expect("sign in");
        let r = srv
            .http
            .get(srv.url("/metrics"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("metrics");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, expect, "{role}: {body}");
        if expect == 403 {
            assert!(body.contains("auditor"), "{body}");
        }
    }
    srv.stop().await;
    db.cleanup().await;
}

/// A relay running apart from management (`tern-relay`) reports its own load to management when
/// asked at `/load` with a token only management can make; an agent's `tern diagnose` gets it
/// through management's RelayLoad call, with the relay's TURN URL. A peer's relay token does
/// not open `/load` (it would show other peers' allocations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_relay_reports_its_load_to_management_and_only_to_it() {
    use tern_proto::management as pb;
    init_tracing();
    let r = relay(false).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(tern_relay::tls::serve(listener, r.router(), None, rx));
    // A peer's token is refused at /load; without a token too.
    let http = reqwest::Client::new();
    let load_url = format!("http://127.0.0.1:{port}/load");
    let got = http
        .get(&load_url)
        .bearer_auth(token("0123456789abcdef", now() + 60, SECRET))
        .send()
        .await
        .expect("ask");
    assert_eq!(got.status(), 403, "{:?}", got.text().await);
    assert_eq!(http.get(&load_url).send().await.expect("ask").status(), 401);

    let db = tern_tests::TestDb::new(tern_tests::Backend::Sqlite)
        .await
        .expect("db");
    let mut opts = tern_tests::fast_options();
    opts.relay.secret = SECRET.to_vec();
    opts.relay.turn_urls = vec![r.turn_url.clone()];
    opts.relay.tcp_relay_urls = vec![format!("ws://127.0.0.1:{port}/relay")];
    let server = tern_tests::TestServer::start_with(&db.url, opts)
        .await
        .expect("server");
    let agent = tern_tests::TestAgent::new(&server, "laptop").await;
    let login = agent
        .login(Some(&server.default_setup_key))
        .await
        .expect("login");
    // Asked like a map: only with the sync stream open.
    let ask = |a: &tern_tests::TestAgent, token: &str| {
        let mut req = tonic::Request::new(pb::RelayLoadRequest {});
        req.metadata_mut()
            .insert("authorization", tern_tests::bearer_value(token));
        let mut c = a.mgmt();
        async move { c.relay_load(req).await }
    };
    let e = ask(&agent, &login.peer_token).await.expect_err("no stream");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let _sync = agent.sync(&login.peer_token).await.expect("sync");
    server.wait_online(&login.peer_id).await;
    let mut req = tonic::Request::new(pb::RelayLoadRequest {});
    req.metadata_mut()
        .insert("authorization", tern_tests::bearer_value(&login.peer_token));
    let loads = agent
        .mgmt()
        .relay_load(req)
        .await
        .expect("relay load")
        .into_inner()
        .relays;
    let urls: Vec<&str> = loads
        .iter()
        .flat_map(|l| l.urls.iter().map(String::as_str))
        .collect();
    assert!(
        urls.contains(&r.turn_url.as_str()),
        "the separate relay's load arrives under its TURN URL: {loads:?}"
    );
    assert_eq!(loads.len(), 2, "it and the embedded relay: {loads:?}");
    // Without the peer token: refused.
    let e = agent
        .mgmt()
        .relay_load(pb::RelayLoadRequest {})
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // A peer awaiting an admin's approval learns nothing of the network's relays.
    let mut settings = server.get("/api/settings").await;
    settings
        .as_object_mut()
        .expect("settings")
        .remove("network_serial");
    settings["peer_approval_required"] = serde_json::json!(true);
    let (s, _) = server.put("/api/settings", settings).await;
    assert_eq!(s, 200);
    let newcomer = tern_tests::TestAgent::new(&server, "newcomer").await;
    let l2 = newcomer
        .login(Some(&server.default_setup_key))
        .await
        .expect("login");
    let _sync2 = newcomer.sync(&l2.peer_token).await.expect("sync");
    server.wait_online(&l2.peer_id).await;
    let e = ask(&newcomer, &l2.peer_token)
        .await
        .expect_err("pending approval");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    server.stop().await;
    db.cleanup().await;
    r.close().await;
}

/// Security review, round two, item 15: a peer removed by an admin loses its relay access at
/// once, on the relay management runs and on one running apart: its TURN allocation closes, its
/// TCP-relay connections close, and its credentials (valid for hours more) open nothing. Before,
/// all of that lasted until the credentials expired (up to 12 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_peer_loses_relay_access_at_once() {
    init_tracing();
    // A relay running apart, that management knows by its TCP-relay URL.
    let apart = relay(false).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(tern_relay::tls::serve(listener, apart.router(), None, rx));
    let db = tern_tests::TestDb::new(tern_tests::Backend::Sqlite)
        .await
        .expect("db");
    let mut opts = tern_tests::fast_options();
    opts.relay.secret = SECRET.to_vec();
    opts.relay.tcp_relay_urls = vec![format!("ws://127.0.0.1:{port}/relay")];
    let srv = tern_tests::TestServer::start_with(&db.url, opts)
        .await
        .expect("server");
    let embedded = srv
        .running
        .as_ref()
        .and_then(|r| r.relay.clone())
        .expect("embedded relay");
    let a = tern_tests::TestAgent::new(&srv, "a").await;
    let la = a.login(Some(&srv.default_setup_key)).await.expect("login");
    let mut sa = a.sync(&la.peer_token).await.expect("sync");
    let ra = tern_tests::next_map(&mut sa, Duration::from_secs(5))
        .await
        .expect("map")
        .relay
        .expect("relay section");
    let turn = ra.turn[0].clone();
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c = turn_client(sock, &embedded.udp_addr, &turn.username, &turn.password).await;
    let alloc = c.allocate().await.expect("allocate");
    assert_eq!(Metrics::get(&embedded.metrics.allocations_active), 1);
    // The map names the relay apart; the embedded one takes the same token.
    let tcp_token = ra.tcp_relay[0].token.clone();
    let tcp_urls = [
        ra.tcp_relay[0].url.clone(),
        format!("{}/relay", srv.base.replace("http://", "ws://")),
    ];
    let mut tcp_clients = vec![];
    for url in &tcp_urls {
        tcp_clients.push(
            RelayClient::connect(url, &tcp_token, None)
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}")),
        );
    }
    wait_connected(&embedded, 1).await;
    wait_connected(&apart, 1).await;

    let t0 = std::time::Instant::now();
    let (s, v) = srv
        .api(
            reqwest::Method::DELETE,
            &format!("/api/peers/{}", la.peer_id),
            None,
        )
        .await;
    assert_eq!(s, 204, "{v}");
    for (i, c) in tcp_clients.iter_mut().enumerate() {
        let end = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match c.recv().await {
                    Ok(Some(_)) => continue,
                    _ => return,
                }
            }
        })
        .await;
        assert!(
            end.is_ok(),
            "TCP relay connection {i} still open 3 s after the removal"
        );
    }
    let closed = t0.elapsed();
    for _ in 0..300 {
        if Metrics::get(&embedded.metrics.allocations_active) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        Metrics::get(&embedded.metrics.allocations_active),
        0,
        "the TURN allocation is closed"
    );
    // The credentials, hours from expiry, open nothing any more.
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let c2 = turn_client(sock, &embedded.udp_addr, &turn.username, &turn.password).await;
    assert!(c2.allocate().await.is_err(), "a new allocation is refused");
    for url in &tcp_urls {
        assert!(
            RelayClient::connect(url, &tcp_token, None).await.is_err(),
            "{url} accepted a revoked token"
        );
    }
    println!("figure: relay access of a removed peer ended {closed:?} after the DELETE");
    // Only management revokes: a relay credential or a load token does not open /revoke.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/revoke");
    let body = serde_json::json!({"peer_id": "someone", "expiring_by": now() + 60});
    for (bearer, want) in [
        (
            Some(tern_proto::relay_auth::load_token(SECRET, now() + 60)),
            403,
        ),
        (Some(token("0123456789abcdef", now() + 60, SECRET)), 403),
        (None, 401),
    ] {
        let mut req = http.post(&url).json(&body);
        if let Some(b) = &bearer {
            req = req.bearer_auth(b);
        }
        assert_eq!(req.send().await.expect("post").status(), want);
    }
    let _ = alloc.close().await;
    let _ = c.close().await;
    let _ = c2.close().await;
    srv.stop().await;
    db.cleanup().await;
    apart.close().await;
}
