//! Robustness of what reads input from outside (security issue, "keep it closed"): REST bodies,
//! the sealed gRPC login and signal messages get random and mutated inputs, bounded in count;
//! nothing panics, every refusal is a clean 4xx / gRPC error, valid requests still work
//! afterwards, and memory does not grow with the garbage. (The STUN/TURN front, the WebSocket
//! relay frames and the public-service tunnel frames have their own garbage tests in the relay
//! suite and in tern-proto.)

use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use std::time::Duration;
use tern_proto::management as pb;
use tern_proto::signal as spb;
use tern_tests::*;
use tonic::Code;

/// A mutation of `valid`: bytes flipped, cut, duplicated, or a value swapped for another type.
fn mutate(rng: &mut StdRng, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    // Half the time: valid JSON with one field set to a hostile value (exercises validation).
    if rng.gen_bool(0.5) {
        if let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(valid) {
            let keys: Vec<String> = o.keys().cloned().collect();
            if !keys.is_empty() {
                let k = &keys[rng.gen_range(0..keys.len())];
                let nasty = [
                    json!(""),
                    json!(" "),
                    json!("x".repeat(10_000)),
                    json!(-1),
                    json!(65_536),
                    json!(1e20),
                    json!(i64::MAX),
                    json!("0.0.0.0/0"),
                    json!("::/0"),
                    json!("999.1.1.1/24"),
                    json!("192.168.1.1/33"),
                    json!(["x", 1, null]),
                    json!({"a": 1}),
                    json!(null),
                    json!(true),
                    json!("\u{0}\u{1b}[31m"),
                    json!("<script>alert(1)</script>"),
                    json!("../../etc/passwd"),
                    json!("ünïcödé-名前"),
                ];
                o.insert(k.clone(), nasty[rng.gen_range(0..nasty.len())].clone());
                return Value::Object(o).to_string().into_bytes();
            }
        }
    }
    match rng.gen_range(0..6) {
        0 => {
            for _ in 0..rng.gen_range(1..8) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
        }
        1 => b.truncate(rng.gen_range(0..=b.len())),
        2 => {
            let cut = rng.gen_range(0..=b.len());
            let tail = b[cut..].to_vec();
            b.extend_from_slice(&tail);
        }
        3 => b = (0..rng.gen_range(0..400)).map(|_| rng.gen()).collect(),
        4 => {
            let s = String::from_utf8_lossy(&b).into_owned();
            let swapped = [
                "null",
                "[]",
                "{}",
                "-1",
                "1e309",
                "\"\"",
                "true",
                "\"\\u0000\"",
            ][rng.gen_range(0..8)];
            // Replace the first value after a colon.
            b = match s.split_once(':') {
                Some((k, rest)) => {
                    let end = rest.find([',', '}']).unwrap_or(rest.len());
                    format!("{k}:{swapped}{}", &rest[end..]).into_bytes()
                }
                None => s.into_bytes(),
            };
        }
        _ => {
            let s = String::from_utf8_lossy(&b).replace('}', ",\"extra\":\"x\"}");
            b = s.into_bytes();
        }
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_rest_bodies_get_clean_4xx_answers_and_change_nothing() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let mut rng = StdRng::seed_from_u64(0x7e57);
    let cases: Vec<(&str, Value)> = vec![
        ("/api/groups", json!({"name": "plc"})),
        (
            "/api/policies",
            json!({"name": "p", "enabled": true, "protocol": "tcp", "ports": ["502"],
                   "bidirectional": false, "sources": ["all"], "destinations": ["all"]}),
        ),
        (
            "/api/routes",
            json!({"network": "192.168.50.0/24", "routing_peer": "nope", "metric": 10, "groups": []}),
        ),
        (
            "/api/services",
            json!({"name": "s", "protocol": "tcp", "public_port": 10001, "target": "192.168.50.10",
                   "target_port": 502, "allowed_sources": ["0.0.0.0/0"], "enabled": true}),
        ),
        ("/api/setup-keys", json!({"name": "k", "reusable": true})),
        (
            "/api/users",
            json!({"username": "x", "password": "long-enough-1"}),
        ),
    ];
    let http = reqwest::Client::new();
    let mut statuses = std::collections::BTreeMap::new();
    // Two rounds of the same number of inputs: after the first has warmed caches and allocator
    // arenas (argon2 alone keeps 19 MiB per hashing thread), the second must not add memory.
    let mut warm = 0;
    for i in 0..1200 {
        if i == 600 {
            warm = rss_kib();
        }
        let (path, valid) = &cases[i % cases.len()];
        let body = mutate(&mut rng, valid.to_string().as_bytes());
        let r = http
            .post(srv.url(path))
            .bearer_auth(&srv.token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        *statuses.entry(status).or_insert(0) += 1;
        let text = r.text().await.expect("body");
        assert!(
            status < 500,
            "{path} answered {status} to {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{path}: non-JSON error {status}: {text}"));
            assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
        }
    }
    // Nothing broke: the server answers, sign-in works, the data is consistent.
    assert!(srv.get("/api/groups").await.is_array());
    admin_login(&http, &srv.base, "admin", ADMIN_PASSWORD)
        .await
        .expect("sign-in still works");
    let grown = rss_kib().saturating_sub(warm);
    assert!(
        grown < 16 * 1024,
        "the second 600 inputs grew memory by {grown} KiB"
    );
    eprintln!("statuses: {statuses:?}");
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_sealed_logins_and_signal_messages_are_refused_cleanly() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let mut rng = StdRng::seed_from_u64(0x5ea1);
    let a = TestAgent::new(&srv, "a").await;
    let mut c = a.mgmt();
    let server_pub = tern_proto::PublicKey::from_slice(
        &c.get_server_key(pb::ServerKeyRequest {})
            .await
            .expect("key")
            .into_inner()
            .public_key,
    )
    .expect("32 bytes");
    let req = pb::LoginRequest {
        setup_key: srv.default_setup_key.clone(),
        timestamp_unix: tern_management::grpc::now_unix(),
        ..Default::default()
    };
    let valid = tern_proto::seal(&a.key, &server_pub, &req.encode_to_vec()).expect("seal");
    let before = rss_kib();
    for _ in 0..400 {
        let mut m = valid.clone();
        match rng.gen_range(0..3) {
            0 => m.sender_public_key = mutate(&mut rng, &m.sender_public_key),
            1 => m.nonce = mutate(&mut rng, &m.nonce),
            _ => m.ciphertext = mutate(&mut rng, &m.ciphertext),
        }
        if m == valid {
            continue;
        }
        match c.login(m).await {
            Ok(_) => panic!("a mutated login was accepted"),
            Err(e) => assert!(
                matches!(e.code(), Code::Unauthenticated | Code::InvalidArgument),
                "{e}"
            ),
        }
    }
    // The valid one still works once.
    a.login(Some(&srv.default_setup_key))
        .await
        .expect("a fresh login works");

    // Signal: random recipients and payloads of every size; the stream keeps going.
    let token = a.login(None).await.expect("login").peer_token;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer_value(&token));
    let mut inbound = a.signal().open(req).await.expect("open").into_inner();
    for id in 0..300u64 {
        let recipient: Vec<u8> = (0..rng.gen_range(0..40)).map(|_| rng.gen()).collect();
        // Up to a little over the 64 KiB limit (refused as invalid, the stream stays up).
        let payload: Vec<u8> = (0..rng.gen_range(0..66_000)).map(|_| rng.gen()).collect();
        tx.send(spb::Outbound {
            id,
            recipient,
            payload,
        })
        .await
        .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("answered within 5 s")
            .expect("stream ok")
            .expect("stream open");
        match reply.kind {
            Some(spb::inbound::Kind::Result(r)) => {
                assert_eq!(r.id, id);
                assert_ne!(
                    r.status(),
                    spb::send_result::Status::Delivered,
                    "nobody has a random key"
                );
                assert!(!r.message.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    srv.stop().await;
    db.cleanup().await;
}

/// A user creates an account's device, signs it in, and returns (device's peer id, the user's
/// console token).
async fn users_device(server: &TestServer, user: &str, device: &str) -> (String, String) {
    let password = format!("{user}-password-1");
    let (s, u) = server
        .post(
            "/api/users",
            json!({"username": user, "password": password, "role": "user"}),
        )
        .await;
    assert_eq!(s, 201, "{u}");
    let token = admin_login(&server.http, &server.base, user, &password)
        .await
        .expect("sign in");
    let agent = TestAgent::new(server, device).await;
    let code = agent.start_device_login().await.expect("code");
    let (s, v) = server
        .api_as(
            &token,
            reqwest::Method::POST,
            &format!("/api/device/{}/approve", code.user_code),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let login = agent
        .login_with_code(&code.user_code)
        .await
        .expect("approved login");
    (login.peer_id, token)
}

/// Security review, round two, item 1: a user's device that joined before `fileserver` cannot
/// take its DNS name by renaming itself `FileServer` (a name is unique as a DNS label, and a
/// rename never moves a label to another peer); an admin's rename is held to the same rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_never_takes_another_peers_dns_name() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let (laptop, erin) = users_device(&server, "erin", "erin-laptop").await;
    // fileserver joins after the laptop.
    let fs = TestAgent::new(&server, "fileserver").await;
    let fs_login = fs.login(Some(&server.default_setup_key)).await.expect("fs");
    let fs_peer = server
        .get(&format!("/api/peers/{}", fs_login.peer_id))
        .await;
    assert_eq!(fs_peer["dns_name"], "fileserver.tern.internal", "{fs_peer}");
    for (who, name) in [
        ("erin", "FileServer"),
        ("erin", "FILESERVER"),
        ("erin", "fileserver"),
    ] {
        let (s, v) = server
            .api_as(
                &erin,
                reqwest::Method::PUT,
                &format!("/api/peers/{laptop}"),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, 409, "{who} renaming to {name:?}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or("")
                .contains("belongs to the peer \"fileserver\""),
            "{v}"
        );
    }
    let (s, v) = server
        .put(
            &format!("/api/peers/{laptop}"),
            json!({"name": "FileServer"}),
        )
        .await;
    assert_eq!(s, 409, "an admin too: {v}");
    let fs_peer = server
        .get(&format!("/api/peers/{}", fs_login.peer_id))
        .await;
    assert_eq!(fs_peer["dns_name"], "fileserver.tern.internal", "{fs_peer}");
    // Other names stay free to take, and a rename to one's own label in other letters works.
    let (s, v) = server
        .api_as(
            &erin,
            reqwest::Method::PUT,
            &format!("/api/peers/{laptop}"),
            Some(json!({"name": "Erin Laptop"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mine = server.get(&format!("/api/peers/{laptop}")).await;
    assert_eq!(mine["dns_name"], "erin-laptop.tern.internal", "{mine}");
    server.stop().await;
    db.cleanup().await;
}

/// Security review, round two, item 2: a UDP public service whose carrier is slow to open
/// tunnels (its control connection is up, it never opens one) queues what outside clients send
/// meanwhile, within a byte bound per flow and for all flows together: 40 source ports each
/// sending 256 datagrams of 60 kB (614 MB) leave the server's memory within that bound, and
/// what was dropped is counted. (Before: 16 MB per flow, 36 -> 678 MB in about a second.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_through_a_slow_carrier_stays_within_its_queue_bounds() {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    };
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let mut opts = fast_options();
    opts.public.bind = "127.0.0.1".parse().expect("ip");
    opts.public.ports = Some((port, port));
    let server = TestServer::start_with(&db.url, opts).await.expect("server");
    let carrier = TestAgent::new(&server, "sensor-gw").await;
    let login = carrier
        .login(Some(&server.default_setup_key))
        .await
        .expect("carrier");
    let ip = login
        .peer_config
        .expect("config")
        .address
        .split('/')
        .next()
        .expect("ip")
        .to_string();
    // Its control connection is up; it never opens a data tunnel.
    let publisher = server.state().publisher.get().expect("publisher").clone();
    let (_generation, _control) = publisher.hub.register(&login.peer_id);
    let (s, svc) = server
        .post(
            "/api/services",
            json!({"name": "telemetry", "protocol": "udp", "public_port": port,
                   "target_ip": ip, "target_port": 5000, "allowed_sources": ["0.0.0.0/0"]}),
        )
        .await;
    assert_eq!(s, 201, "{svc}");
    let id = svc["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib();
    let payload = std::sync::Arc::new(vec![0x5au8; 60_000]);
    let senders: Vec<_> = (0..40)
        .map(|_| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                for i in 0..256 {
                    let _ = s.send_to(&payload, ("127.0.0.1", port)).await;
                    if i % 8 == 7 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        })
        .collect();
    for t in senders {
        t.await.expect("sender");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    let stats = server.get(&format!("/api/services/{id}")).await["stats"].clone();
    eprintln!(
        "figure: RSS grew {grown_mib} MiB under a 614 MB UDP flood through a slow carrier: {stats}"
    );
    assert!(
        grown_mib < 64,
        "memory stays within the queue bounds (32 MiB for all flows): grew {grown_mib} MiB"
    );
    assert!(
        stats["dropped_full"].as_u64() > Some(0),
        "the excess is dropped and counted: {stats}"
    );
    server.stop().await;
    db.cleanup().await;
}

/// Security review, round two, item 5: nobody can keep everyone else from signing in. Twenty
/// sources each asking for the most codes one source may hold fill the server's 1,000 waiting
/// sign-ins; a person's `tern up` from another address still gets a code (the oldest of the
/// biggest holder makes way), and a flood from the addresses of one IPv6 /64 counts as one
/// source. (Before: the newcomer was refused for 10 minutes, and every address of a /64 had a
/// budget of its own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sign_in_codes_cannot_lock_others_out() {
    use tern_management::store::{PeerMeta, MAX_PENDING_DEVICE_LOGINS, MAX_PENDING_PER_SOURCE};
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let store = &server.state().store;
    let meta = PeerMeta {
        hostname: "flood".into(),
        os: "linux".into(),
        agent_version: "test".into(),
    };
    let key = || tern_proto::SecretKey::generate().public_key().to_base64();
    let per = MAX_PENDING_PER_SOURCE;
    // A /64 is one source: its addresses share one budget.
    let mut refused = None;
    for i in 0..(per + 5) {
        if let Err(e) = store
            .start_device_login(&key(), &meta, &format!("2001:db8:66:1::{:x}", i + 1))
            .await
        {
            refused = Some((i, e.to_string()));
            break;
        }
    }
    let (n, why) = refused.expect("the /64 is cut off");
    assert!(n == per && why.contains("already waiting"), "{n}: {why}");
    // With it, nineteen more sources at their cap fill the server's 1,000 waiting sign-ins.
    for s in 1..(MAX_PENDING_DEVICE_LOGINS / per) {
        for _ in 0..per {
            store
                .start_device_login(&key(), &meta, &format!("198.51.100.{s}"))
                .await
                .expect("within the per-source cap");
        }
    }
    // Full: a newcomer from elsewhere still gets a code.
    let (code, _) = store
        .start_device_login(&key(), &meta, "203.0.113.77")
        .await
        .expect("a person signing in is not locked out by the flood");
    let (s, v) = server
        .api(reqwest::Method::GET, &format!("/api/device/{code}"), None)
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("pending")), "{v}");
    server.stop().await;
    db.cleanup().await;
}

/// Security review, round two, item 7: a captured sealed login cannot be played again on another
/// replica of the same database, nor after a restart (each replica, and each restart, starts with
/// an empty memory; the database remembers). Before, only the replica that saw it refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_login_is_refused_on_every_replica_and_after_a_restart() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let first = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&first, "laptop").await;
    let mut c = a.mgmt();
    let server_pub = tern_proto::PublicKey::from_slice(
        &c.get_server_key(pb::ServerKeyRequest {})
            .await
            .expect("key")
            .into_inner()
            .public_key,
    )
    .expect("32 bytes");
    let req = pb::LoginRequest {
        setup_key: first.default_setup_key.clone(),
        timestamp_unix: tern_management::grpc::now_unix(),
        ..Default::default()
    };
    let captured = tern_proto::seal(&a.key, &server_pub, &req.encode_to_vec()).expect("seal");
    c.login(captured.clone()).await.expect("the original login");
    let e = c.login(captured.clone()).await.expect_err("replayed here");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Another replica (or this one restarted): a fresh memory, the same database.
    let second = TestServer::replica_of(&first, &db.url)
        .await
        .expect("replica");
    let mut c2 = TestAgent::new(&second, "attacker").await.mgmt();
    let e = c2
        .login(captured)
        .await
        .expect_err("replayed on another replica");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("already used"), "{e:?}");
    second.stop().await;
    first.stop().await;
    db.cleanup().await;
}

/// What a raw HTTP/2 client saw from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Event {
    /// A HEADERS or RST_STREAM frame on stream 1: the request was answered or cut.
    Answered,
    /// The server closed the connection.
    Closed,
}

/// A hand-driven HTTP/2 client (prior knowledge), to behave the way slow attackers do: it
/// answers the server's SETTINGS and PINGs (so keep-alive never ends it) and reports what the
/// server does with stream 1.
struct RawH2 {
    write: std::sync::Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    events: tokio::sync::mpsc::UnboundedReceiver<H2Event>,
}

impl RawH2 {
    async fn connect(addr: &str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut read, mut write) = tcp.into_split();
        write
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");
        let write = std::sync::Arc::new(tokio::sync::Mutex::new(write));
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let w = write.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 9];
            loop {
                if read.read_exact(&mut head).await.is_err() {
                    let _ = tx.send(H2Event::Closed);
                    return;
                }
                let len =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let (kind, flags) = (head[3], head[4]);
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    let _ = tx.send(H2Event::Closed);
                    return;
                }
                let reply = match (kind, flags & 1) {
                    (4, 0) => Some(b"\0\0\0\x04\x01\0\0\0\0".to_vec()),
                    (6, 0) => Some([b"\0\0\x08\x06\x01\0\0\0\0".as_slice(), &payload].concat()),
                    _ => None,
                };
                if let Some(r) = reply {
                    let _ = w.lock().await.write_all(&r).await;
                }
                if matches!(kind, 1 | 3) && stream == 1 {
                    let _ = tx.send(H2Event::Answered);
                }
            }
        });
        RawH2 { write, events }
    }

    async fn send(&self, frame: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        self.write.lock().await.write_all(frame).await.is_ok()
    }

    /// A HEADERS frame opening stream 1 (HPACK: static-table names, literal values).
    fn headers(method_get: bool, path: &str, end_stream: bool) -> Vec<u8> {
        let mut block = vec![
            if method_get { 0x82 } else { 0x83 },
            0x86,
            0x04,
            path.len() as u8,
        ];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(b"\x01\x01x");
        if !method_get {
            block.extend_from_slice(b"\x0f\x10\x10application/json");
        }
        let flags = 0x04 | if end_stream { 0x01 } else { 0 };
        let mut f = vec![0, 0, block.len() as u8, 0x01, flags, 0, 0, 0, 1];
        f.extend_from_slice(&block);
        f
    }

    /// What happens next, within `limit`.
    async fn next(&mut self, limit: Duration) -> Option<H2Event> {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Security review, round two, item 8: slow clients cannot hold the API port. An HTTP/2
/// connection that sends its preface and then nothing is closed (200 of them from one address
/// were all still open at 45 s before), a request body trickled one byte every 3 s is cut off at
/// 20 s (HTTP/1.1 and HTTP/2), and a connection with no request in flight is closed after 60 s
/// even though it answers every PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_cannot_hold_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let addr = server.base.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();

    // 200 HTTP/2 prefaces, then silence.
    let mut silent = vec![];
    for _ in 0..200 {
        silent.push(RawH2::connect(&addr).await);
    }
    // A request body trickled over HTTP/2 and over HTTP/1.1.
    let mut h2_trickle = RawH2::connect(&addr).await;
    assert!(
        h2_trickle
            .send(&RawH2::headers(false, "/api/auth/login", false))
            .await
    );
    let mut h1_trickle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    h1_trickle
        .write_all(
            b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{",
        )
        .await
        .expect("write");
    // One request answered, then nothing but PING answers.
    let mut idle = RawH2::connect(&addr).await;
    assert!(idle.send(&RawH2::headers(true, "/healthz", true)).await);
    assert_eq!(
        idle.next(Duration::from_secs(5)).await,
        Some(H2Event::Answered)
    );

    let trickler = {
        let h2 = h2_trickle.write.clone();
        tokio::spawn(async move {
            let mut h1 = h1_trickle;
            let mut h1_cut = None;
            for i in 0..15u32 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = h2.lock().await.write_all(b"\0\0\x01\0\0\0\0\0\x01 ").await;
                if h1_cut.is_none() && h1.write_all(b" ").await.is_err() {
                    h1_cut = Some(i);
                }
                let mut buf = [0u8; 256];
                if h1_cut.is_none() {
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(10), h1.read(&mut buf)).await
                    {
                        // An answer (400/408) or the close.
                        let _ = n;
                        h1_cut = Some(i);
                    }
                }
            }
            h1_cut
        })
    };

    // The silent ones go after the header timeout (10 s), well before 20 s.
    for (i, c) in silent.iter_mut().enumerate() {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        assert_eq!(
            c.next(left).await,
            Some(H2Event::Closed),
            "silent HTTP/2 connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    let silent_closed = started.elapsed();
    // The trickled HTTP/2 body is answered or cut within its 20 s (plus slack).
    let left = Duration::from_secs(35).saturating_sub(started.elapsed());
    let h2_cut = h2_trickle.next(left).await;
    assert!(
        h2_cut.is_some(),
        "a trickled HTTP/2 body still held its request after {:?}",
        started.elapsed()
    );
    let h1_cut = trickler.await.expect("trickler");
    assert!(
        h1_cut.is_some_and(|i| i < 11),
        "a trickled HTTP/1.1 body was not cut within 35 s: {h1_cut:?}"
    );
    // The idle connection goes after 60 s without a request.
    let left = Duration::from_secs(75).saturating_sub(started.elapsed());
    assert_eq!(
        idle.next(left).await,
        Some(H2Event::Closed),
        "an idle HTTP/2 connection was still open after {:?}",
        started.elapsed()
    );
    println!(
        "figure: 200 silent HTTP/2 connections closed by {silent_closed:?}; idle one closed by {:?}",
        started.elapsed()
    );
    // The server still serves.
    let (s, _) = server.api(reqwest::Method::GET, "/api/peers", None).await;
    assert_eq!(s, 200);
    server.stop().await;
    db.cleanup().await;
}

/// Security review, round two, item 16: behind a reverse proxy (`--trusted-proxies`), per-source
/// limits key on the client the proxy names (X-Forwarded-For, or a PROXY protocol header), so
/// one client guessing passwords does not lock out everyone else coming through the proxy.
/// Before, every request counted against the proxy's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_limits_key_on_the_client_it_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start_configured(&db.url, fast_options(), |cfg| {
        cfg.trusted_proxies = tern_relay::tls::TrustedProxies::parse("127.0.0.1").expect("proxies");
    })
    .await
    .expect("server");
    let http = reqwest::Client::new();
    let login = |who: &'static str, user: String, pw: &'static str| {
        http.post(server.url("/api/auth/login"))
            .header("x-forwarded-for", format!("{who}, 127.0.0.1"))
            .json(&json!({"username": user, "password": pw}))
            .send()
    };
    // One client behind the proxy guesses many usernames until its address is locked.
    let mut last = (0, Value::Null);
    for i in 0..40 {
        let r = login("198.51.100.1", format!("nobody{i}"), "wrong-wrong")
            .await
            .expect("login");
        last = (r.status().as_u16(), r.json().await.unwrap_or(Value::Null));
        if last.0 == 429 {
            break;
        }
    }
    assert_eq!(last.0, 429, "{}", last.1);
    assert!(last.1["message"]
        .as_str()
        .unwrap_or("")
        .contains("from your address"));
    // Another client through the same proxy signs in.
    let r = login("198.51.100.2", "admin".into(), ADMIN_PASSWORD)
        .await
        .expect("login");
    assert_eq!(
        r.status().as_u16(),
        200,
        "a second client behind the proxy was locked out with the first: {}",
        r.text().await.unwrap_or_default()
    );
    // The PROXY protocol names the client the same way.
    let addr = server.base.trim_start_matches("http://").to_string();
    let body = r#"{"username":"nobody","password":"wrong-wrong"}"#;
    let status_via = |client: &'static str| {
        let addr = addr.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let req = format!(
                "PROXY TCP4 {client} 192.0.2.1 40000 443\r\nPOST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut out)).await;
            out.lines().next().unwrap_or("").to_string()
        }
    };
    let locked = status_via("198.51.100.1").await;
    assert!(locked.contains("429"), "{locked}");
    let other = status_via("198.51.100.3").await;
    assert!(other.contains("401"), "{other}");
    server.stop().await;
    db.cleanup().await;
}

/// Security review, round two, item 13: one peer's `tern expose` cannot take every public port
/// (before: 100 of 100, and an admin's service then found none free). Ten at once by default;
/// a stopped one gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_take_every_public_port() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let lo = 20000 + rand::random::<u16>() % 20000;
    let mut opts = fast_options();
    opts.public.ports = Some((lo, lo + 14));
    opts.public.bind = "127.0.0.1".parse().expect("ip");
    let server = TestServer::start_with(&db.url, opts).await.expect("server");
    let agent = TestAgent::new(&server, "sharer").await;
    let login = agent
        .login(Some(&server.default_setup_key))
        .await
        .expect("login");
    let _sync = agent.sync(&login.peer_token).await.expect("sync");
    server.wait_online(&login.peer_id).await;
    let (s, g) = server
        .api(
            reqwest::Method::POST,
            "/api/groups",
            Some(json!({"name": "sharers"})),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    let gid = g["id"].as_str().expect("group id").to_string();
    let (s, p) = server
        .api(
            reqwest::Method::PUT,
            &format!("/api/peers/{}", login.peer_id),
            Some(json!({"groups": ["all", gid]})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let mut settings = server.get("/api/settings").await;
    let obj = settings.as_object_mut().expect("settings");
    obj.remove("network_serial");
    obj.insert("expose_groups".into(), json!([gid]));
    let (s, v) = server
        .api(reqwest::Method::PUT, "/api/settings", Some(settings))
        .await;
    assert_eq!(s, 200, "{v}");
    let expose = |port: u32| {
        let mut req = tonic::Request::new(pb::ExposeRequest {
            protocol: "tcp".into(),
            local_port: port,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", bearer_value(&login.peer_token));
        let mut c = agent.mgmt();
        async move { c.expose(req).await.map(|r| r.into_inner()) }
    };
    let mut ids = vec![];
    let mut refused = None;
    for i in 0..15 {
        match expose(8000 + i).await {
            Ok(r) => ids.push(r.service_id),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (n, e) = refused.expect("the eleventh is refused");
    assert_eq!(n, 10, "{e:?}");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("already publishes 10 ports"),
        "{}",
        e.message()
    );
    // Five ports of the fifteen are left for admins' services.
    let services = server.get("/api/services").await;
    assert_eq!(services.as_array().map(Vec::len), Some(10), "{services}");
    // A stopped one gives its place back.
    let mut req = tonic::Request::new(pb::UnexposeRequest {
        service_id: ids[0].clone(),
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&login.peer_token));
    agent.mgmt().unexpose(req).await.expect("unexpose");
    expose(9000).await.expect("room again");
    server.stop().await;
    db.cleanup().await;
}
