//! Control-plane suite: setup keys and registration, network-map streaming, overlay IP allocation
//! under concurrency, signal, on SQLite and (when configured) PostgreSQL.

use serde_json::json;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tern_proto::signal as spb;
use tern_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_keys_admit_exactly_what_they_allow() {
    init_tracing();
    on_each_backend(|backend, url| async move {
        let srv = TestServer::start(&url).await.expect("server");

        // One-off key: first use registers, second use (another agent) is refused clearly.
        let (one_off, one_off_id) = srv.setup_key(json!({ "name": "one-off" })).await;
        let a = TestAgent::new(&srv, "alpha").await;
        let resp = a
            .login(Some(&one_off))
            .await
            .expect("first use of one-off key");
        assert!(
            resp.peer_config
                .as_ref()
                .expect("cfg")
                .address
                .starts_with("100.64."),
            "{backend:?}"
        );
        let b = TestAgent::new(&srv, "bravo").await;
        let err = b
            .login(Some(&one_off))
            .await
            .expect_err("second use must fail");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("one-off") && err.message().contains("already been used"),
            "{}",
            err.message()
        );
        let k = srv.get(&format!("/api/setup-keys/{one_off_id}")).await;
        assert_eq!(k["used_count"], 1);
        assert_eq!(k["state"], "overused");

        // The registered agent logs in again with no key and keeps its address.
        let again = a.login(None).await.expect("login without key");
        assert_eq!(again.peer_config, resp.peer_config);
        assert_eq!(again.peer_id, resp.peer_id);

        // Unknown agent without a key: told to use one.
        let err = b.login(None).await.expect_err("unregistered");
        assert!(
            err.message().contains("setup key is required"),
            "{}",
            err.message()
        );

        // Reusable with limit 2: exactly two peers.
        let (two, _) = srv
            .setup_key(json!({ "name": "two", "reusable": true, "usage_limit": 2 }))
            .await;
        for h in ["c1", "c2"] {
            TestAgent::new(&srv, h)
                .await
                .login(Some(&two))
                .await
                .expect("within limit");
        }
        let err = TestAgent::new(&srv, "c3")
            .await
            .login(Some(&two))
            .await
            .expect_err("over limit");
        assert!(
            err.message().contains("usage limit of 2"),
            "{}",
            err.message()
        );

        // Revoked key refused.
        let (rev, rev_id) = srv
            .setup_key(json!({ "name": "rev", "reusable": true }))
            .await;
        let (s, v) = srv
            .put(
                &format!("/api/setup-keys/{rev_id}"),
                json!({ "revoked": true }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let err = TestAgent::new(&srv, "r1")
            .await
            .login(Some(&rev))
            .await
            .expect_err("revoked");
        assert!(err.message().contains("revoked"), "{}", err.message());

        // Expired key refused (created already expired through the store).
        let new = tern_management::store::NewSetupKey {
            expires_at: Some(tern_management::model::now_millis() - 1000),
            ..tern_management::store::NewSetupKey::reusable("old", vec![])
        };
        let raw = "tern_sk_expiredexpiredexpiredexpired00";
        srv.state()
            .store
            .create_setup_key(
                "test",
                &new,
                &tern_management::store::hash_secret(raw),
                "tern_sk_expi",
            )
            .await
            .expect("create");
        let err = TestAgent::new(&srv, "e1")
            .await
            .login(Some(raw))
            .await
            .expect_err("expired");
        assert!(err.message().contains("expired"), "{}", err.message());

        // Garbage key.
        let err = TestAgent::new(&srv, "g1")
            .await
            .login(Some("nope"))
            .await
            .expect_err("invalid");
        assert_eq!(err.message(), "invalid setup key");

        // Registration is audited.
        let ev = srv.get("/api/audit?action=peer.register").await;
        assert_eq!(ev.as_array().expect("list").len(), 3, "alpha, c1, c2: {ev}");
        srv.stop().await;
    })
    .await;
}

/// Turns login expiry on for `peer_id` and sets the expiry to `secs` for every peer.
async fn expire_logins(srv: &TestServer, peer_id: &str, secs: i64) {
    let (s, v) = srv
        .put(
            &format!("/api/peers/{peer_id}"),
            json!({ "login_expiration_enabled": true }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let settings = srv.get("/api/settings").await;
    let (s, v) = srv
        .put(
            "/api/settings",
            json!({"overlay_range": settings["overlay_range"], "mtu": settings["mtu"],
            "peer_login_expiry_secs": secs, "ephemeral_ttl_secs": settings["ephemeral_ttl_secs"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

/// Security issue item 3: an expired peer gets back in only with a valid setup key (any other
/// string is refused) or after an admin turns its login expiry off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_peer_needs_a_valid_setup_key_or_an_admin() {
    init_tracing();
    on_each_backend(|_, url| async move {
        let srv = TestServer::start(&url).await.expect("server");
        let agent = TestAgent::new(&srv, "laptop").await;
        let l = agent
            .login(Some(&srv.default_setup_key))
            .await
            .expect("register");
        expire_logins(&srv, &l.peer_id, 1).await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let err = agent.login(None).await.expect_err("expired without a key");
        assert!(err.message().contains("login expired"), "{}", err.message());
        for bogus in ["x", "tern_sk_not-a-real-key-at-all-000000"] {
            let err = agent
                .login(Some(bogus))
                .await
                .expect_err("a made-up key is not enough");
            assert!(
                err.message().contains("not valid"),
                "{bogus}: {}",
                err.message()
            );
        }
        // A revoked key is not enough either.
        let (rev, rev_id) = srv
            .setup_key(json!({ "name": "old", "reusable": true }))
            .await;
        let (s, _) = srv
            .put(
                &format!("/api/setup-keys/{rev_id}"),
                json!({ "revoked": true }),
            )
            .await;
        assert_eq!(s, 200);
        let err = agent.login(Some(&rev)).await.expect_err("revoked key");
        assert!(err.message().contains("revoked"), "{}", err.message());
        // A valid key renews the login ...
        agent
            .login(Some(&srv.default_setup_key))
            .await
            .expect("a valid key renews the login");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        agent.login(None).await.expect_err("expired again");
        // ... and so does an admin turning expiry off for the peer.
        let (s, v) = srv
            .put(
                &format!("/api/peers/{}", l.peer_id),
                json!({ "login_expiration_enabled": false }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        agent.login(None).await.expect("expiry off: back in");
        srv.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_requires_holding_the_key_and_a_fresh_timestamp() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&srv, "a").await;
    let mut c = a.mgmt();
    let server_pub = tern_proto::PublicKey::from_slice(
        &c.get_server_key(tern_proto::management::ServerKeyRequest {})
            .await
            .expect("key")
            .into_inner()
            .public_key,
    )
    .expect("32 bytes");
    use prost::Message;
    let req = tern_proto::management::LoginRequest {
        setup_key: srv.default_setup_key.clone(),
        timestamp_unix: tern_management::grpc::now_unix(),
        ..Default::default()
    };
    // Sealed by one key but claiming to be another: cannot be opened.
    let mut sealed = tern_proto::seal(&a.key, &server_pub, &req.encode_to_vec()).expect("seal");
    sealed.sender_public_key = tern_proto::SecretKey::generate().public_key().0.to_vec();
    let err = c.login(sealed).await.expect_err("forged sender");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Replay of an old request.
    let old = tern_proto::management::LoginRequest {
        timestamp_unix: tern_management::grpc::now_unix() - 3600,
        ..req.clone()
    };
    let sealed = tern_proto::seal(&a.key, &server_pub, &old.encode_to_vec()).expect("seal");
    let err = c.login(sealed).await.expect_err("stale");
    assert!(err.message().contains("clock"), "{}", err.message());
    // A captured login played again within its window (security issue item 5): once the peer
    // is deleted, the replay must not register it again.
    let captured = tern_proto::seal(&a.key, &server_pub, &req.encode_to_vec()).expect("seal");
    let first = c.login(captured.clone()).await.expect("first use");
    let (_, body) = tern_proto::open(&a.key, &first.into_inner()).expect("open");
    let peer_id = tern_proto::management::LoginResponse::decode(body.as_slice())
        .expect("decode")
        .peer_id;
    assert_eq!(srv.delete(&format!("/api/peers/{peer_id}")).await, 204);
    let err = c.login(captured).await.expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"), "{}", err.message());
    let peers = srv.get("/api/peers").await;
    assert_eq!(
        peers.as_array().map(|p| p.len()),
        Some(0),
        "not registered again: {peers}"
    );
    // Garbage.
    let err = c
        .login(tern_proto::management::SealedMessage::default())
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::Unauthenticated);
    // Sync without or with a bad token.
    let err = a.sync("not-a-token").await.expect_err("bad token");
    assert_eq!(err.code(), Code::Unauthenticated);
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_stream_follows_registrations_and_policies_within_a_second() {
    init_tracing();
    on_each_backend(|_backend, url| async move {
        let srv = TestServer::start(&url).await.expect("server");
        let a = TestAgent::new(&srv, "alpha").await;
        let la = a.login(Some(&srv.default_setup_key)).await.expect("register A");
        let mut sa = a.sync(&la.peer_token).await.expect("sync A");
        let first = next_map(&mut sa, Duration::from_secs(5)).await.expect("first map");
        assert!(first.remote_peers.is_empty(), "A is alone");
        assert_eq!(first.peer_config.as_ref().expect("cfg").mtu, 1280);

        // The stream marks A connected.
        let peer = srv.get(&format!("/api/peers/{}", la.peer_id)).await;
        assert_eq!(peer["connected"], true);

        // B registers: A sees B (key and overlay IP) within 1 s under the default All<->All policy.
        let b = TestAgent::new(&srv, "bravo").await;
        let t0 = Instant::now();
        let lb = b.login(Some(&srv.default_setup_key)).await.expect("register B");
        let b_ip = lb.peer_config.as_ref().expect("cfg").address.split('/').next().expect("ip").to_string();
        let m = wait_map(&mut sa, Duration::from_secs(1), |m| m.remote_peers.len() == 1).await.expect("B within 1 s");
        eprintln!("B appeared in A's map after {:?}", t0.elapsed());
        assert_eq!(m.remote_peers[0].wg_public_key, b.key.public_key().0.to_vec());
        assert_eq!(m.remote_peers[0].overlay_ip, b_ip);
        assert!(m.serial > first.serial, "serial grows");

        // Disabling the policy removes B within 1 s.
        let pols = srv.get("/api/policies").await;
        let p = &pols[0];
        let (s, v) = srv
            .put(
                &format!("/api/policies/{}", p["id"].as_str().expect("id")),
                json!({ "name": p["name"], "enabled": false, "protocol": "any", "sources": ["all"], "destinations": ["all"] }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let t0 = Instant::now();
        wait_map(&mut sa, Duration::from_secs(1), |m| m.remote_peers.is_empty()).await.expect("B gone within 1 s");
        eprintln!("B left A's map after {:?}", t0.elapsed());

        // A's stream ending marks A disconnected, with a last-seen time.
        let before = tern_management::model::now_millis();
        drop(sa);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let peer = srv.get(&format!("/api/peers/{}", la.peer_id)).await;
            if peer["connected"] == false {
                assert!(peer["last_seen"].as_i64().expect("last_seen") >= before - 1000);
                break;
            }
            assert!(Instant::now() < deadline, "A still connected: {peer}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Deleting a peer ends its stream with a clear status.
        let mut sb = b.sync(&lb.peer_token).await.expect("sync B");
        next_map(&mut sb, Duration::from_secs(5)).await.expect("B's first map");
        assert_eq!(srv.delete(&format!("/api/peers/{}", lb.peer_id)).await, 204);
        let end = tokio::time::timeout(Duration::from_secs(5), sb.message()).await.expect("stream reacts");
        let err = end.expect_err("stream ends with an error");
        assert_eq!(err.code(), Code::NotFound);
        srv.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_approval_required_a_new_peer_is_isolated_until_an_admin_approves_it() {
    init_tracing();
    on_each_backend(|_backend, url| async move {
        let srv = TestServer::start(&url).await.expect("server");
        // A joined before approval was switched on: it stays approved.
        let a = TestAgent::new(&srv, "alpha").await;
        let la = a
            .login(Some(&srv.default_setup_key))
            .await
            .expect("register A");
        let mut sa = a.sync(&la.peer_token).await.expect("sync A");
        next_map(&mut sa, Duration::from_secs(5))
            .await
            .expect("A's first map");

        let settings = srv.get("/api/settings").await;
        assert_eq!(settings["peer_approval_required"], false, "off by default");
        let mut body = settings.clone();
        let obj = body.as_object_mut().expect("object");
        obj.remove("network_serial");
        obj.insert("peer_approval_required".into(), json!(true));
        let (s, v) = srv.put("/api/settings", body).await;
        assert_eq!(s, 200, "{v}");
        // A PUT without the field keeps it.
        let (s, v) = srv
            .put(
                "/api/settings",
                json!({"overlay_range": settings["overlay_range"], "mtu": 1280,
                "peer_login_expiry_secs": 0, "ephemeral_ttl_secs": settings["ephemeral_ttl_secs"]}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["peer_approval_required"], true);

        let b = TestAgent::new(&srv, "bravo").await;
        let lb = b
            .login(Some(&srv.default_setup_key))
            .await
            .expect("register B");
        let peer_b = srv.get(&format!("/api/peers/{}", lb.peer_id)).await;
        assert_eq!(peer_b["approved"], false);
        let mut sb = b.sync(&lb.peer_token).await.expect("sync B");
        let mb = next_map(&mut sb, Duration::from_secs(5))
            .await
            .expect("B's map");
        assert!(mb.pending_approval, "B is told it awaits approval");
        assert!(
            mb.remote_peers.is_empty() && mb.relay.is_none(),
            "B sees no one, gets no relay"
        );
        // A does not see B (any map A gets meanwhile still lists no one).
        let early = wait_map(&mut sa, Duration::from_millis(700), |m| {
            !m.remote_peers.is_empty()
        })
        .await;
        assert!(
            early.is_err(),
            "A must not see B before approval: {early:?}"
        );

        let (s, v) = srv
            .put(
                &format!("/api/peers/{}", lb.peer_id),
                json!({"approved": true}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["approved"], true);
        wait_map(&mut sa, Duration::from_secs(2), |m| {
            m.remote_peers.len() == 1
        })
        .await
        .expect("A sees B after approval");
        let mb = wait_map(&mut sb, Duration::from_secs(2), |m| !m.pending_approval)
            .await
            .expect("B approved");
        assert_eq!(mb.remote_peers.len(), 1, "B sees A");
        assert!(mb.relay.is_some());
        let audit = srv.get("/api/audit?action=peer.update").await;
        assert!(audit.to_string().contains("\"approved\":true"), "{audit}");
        srv.stop().await;
    })
    .await;
}

/// The next message on a stream, within 5 s.
async fn next_msg(
    s: &mut tonic::Streaming<tern_proto::management::SyncResponse>,
) -> tern_proto::management::SyncResponse {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a message in time")
        .expect("stream")
        .expect("not ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_stream_follows_the_same_maps_as_full_maps_in_fewer_bytes() {
    use prost::Message;
    use tern_proto::mapdelta;
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&srv, "a").await;
    let la = a.login(Some(&srv.default_setup_key)).await.expect("a");
    let mut many = vec![];
    for i in 0..30 {
        let p = TestAgent::new(&srv, &format!("p{i}")).await;
        p.login(Some(&srv.default_setup_key))
            .await
            .expect("register");
        many.push(p);
    }
    let mut full = a.sync_with(&la.peer_token, false).await.expect("full");
    let mut deltas = a.sync_with(&la.peer_token, true).await.expect("deltas");
    // The first map comes from the last published index and is whole; registrations just
    // before may come in the next messages. Both streams catch up to the 30 peers.
    let mut have = next_msg(&mut deltas)
        .await
        .network_map
        .expect("the first is whole");
    while have.remote_peers.len() < 30 {
        let d = next_msg(&mut deltas).await.delta.expect("then deltas");
        have = mapdelta::apply(&have, &d).expect("applies");
    }
    let mut first = next_msg(&mut full).await.network_map.expect("map");
    while first.remote_peers.len() < 30 {
        first = next_msg(&mut full).await.network_map.expect("map");
    }
    let (mut full_bytes, mut delta_bytes) = (0, 0);
    let step = |what: &'static str| what;
    // Changes: a peer comes online, a new peer, a policy edit, a peer removed.
    let online = &many[3];
    let lo = online.login(None).await.expect("login");
    let _hold = online.sync(&lo.peer_token).await.expect("online");
    let x = TestAgent::new(&srv, "newcomer").await;
    for change in 0..4 {
        let what = match change {
            0 => step("a peer came online"),
            1 => {
                x.login(Some(&srv.default_setup_key)).await.expect("new");
                step("a new peer")
            }
            2 => {
                let pols = srv.get("/api/policies").await;
                let id = pols[0]["id"].as_str().expect("id").to_string();
                let (s, v) = srv.put(&format!("/api/policies/{id}"), json!({"name": "all-to-all", "protocol": "tcp", "ports": ["22"], "sources": ["all"], "destinations": ["all"]})).await;
                assert_eq!(s, 200, "{v}");
                step("a policy edit")
            }
            _ => {
                let peers = srv.get("/api/peers").await;
                let id = peers
                    .as_array()
                    .expect("peers")
                    .iter()
                    .find(|p| p["name"] == "p7")
                    .expect("p7")["id"]
                    .as_str()
                    .expect("id")
                    .to_string();
                assert_eq!(srv.delete(&format!("/api/peers/{id}")).await, 204);
                step("a peer removed")
            }
        };
        let f = next_msg(&mut full).await;
        let d = next_msg(&mut deltas).await;
        full_bytes += f.encoded_len();
        delta_bytes += d.encoded_len();
        let want = f.network_map.expect("full stream: whole maps");
        let delta = d.delta.expect("a delta after the first map");
        have = mapdelta::apply(&have, &delta).expect("applies");
        assert!(
            mapdelta::same(&have, &want),
            "{what}: the delta stream's map differs"
        );
        eprintln!(
            "{what}: full map {} B, delta {} B",
            want.encoded_len(),
            delta.encoded_len()
        );
    }
    assert!(
        delta_bytes * 5 < full_bytes,
        "deltas {delta_bytes} B vs full maps {full_bytes} B"
    );
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_registrations_get_distinct_addresses() {
    init_tracing();
    on_each_backend(|backend, url| async move {
        let srv = TestServer::start(&url).await.expect("server");
        let mut agents = vec![];
        for i in 0..50 {
            agents.push(TestAgent::new(&srv, &format!("host{i}")).await);
        }
        let key = srv.default_setup_key.clone();
        let results = futures::future::join_all(agents.iter().map(|a| a.login(Some(&key)))).await;
        let mut ips = HashSet::new();
        for r in results {
            let r = r.unwrap_or_else(|e| panic!("{backend:?}: registration failed: {e}"));
            ips.insert(r.peer_config.expect("cfg").address);
        }
        assert_eq!(ips.len(), 50, "{backend:?}: addresses must be distinct");
        let peers = srv.get("/api/peers").await;
        assert_eq!(peers.as_array().expect("list").len(), 50);
        // Stable across logins.
        let again = agents[7].login(None).await.expect("login");
        assert!(ips.contains(&again.peer_config.expect("cfg").address));
        srv.stop().await;
    })
    .await;
}

async fn open_signal(
    a: &TestAgent,
    token: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<spb::Outbound>,
        tonic::Streaming<spb::Inbound>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", bearer_value(token));
    let inbound = a.signal().open(req).await?.into_inner();
    Ok((tx, inbound))
}

async fn next_inbound(s: &mut tonic::Streaming<spb::Inbound>) -> spb::inbound::Kind {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("signal message within 5 s")
        .expect("stream ok")
        .expect("stream open")
        .kind
        .expect("kind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_delivers_with_server_stamped_sender_and_refuses_impostors() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&srv, "a").await;
    let b = TestAgent::new(&srv, "b").await;
    let c = TestAgent::new(&srv, "c").await;
    let ta = a
        .login(Some(&srv.default_setup_key))
        .await
        .expect("A")
        .peer_token;
    let tb = b
        .login(Some(&srv.default_setup_key))
        .await
        .expect("B")
        .peer_token;
    let tc = c
        .login(Some(&srv.default_setup_key))
        .await
        .expect("C")
        .peer_token;

    let (a_tx, mut a_rx) = open_signal(&a, &ta).await.expect("A opens");
    let (_b_tx, mut b_rx) = open_signal(&b, &tb).await.expect("B opens");
    // Both streams are registered once the server has seen them; poll the registry.
    let sig = srv
        .running
        .as_ref()
        .expect("running")
        .signal
        .clone()
        .expect("signal");
    wait_until("streams registered", Duration::from_secs(5), || {
        sig.online() >= 2
    })
    .await;

    a_tx.send(spb::Outbound {
        id: 1,
        recipient: b.key.public_key().0.to_vec(),
        payload: b"offer".to_vec(),
    })
    .await
    .expect("send");
    match next_inbound(&mut b_rx).await {
        spb::inbound::Kind::Delivery(d) => {
            assert_eq!(
                d.sender,
                a.key.public_key().0.to_vec(),
                "sender is A, stamped by the server"
            );
            assert_eq!(d.payload, b"offer");
        }
        other => panic!("expected delivery, got {other:?}"),
    }
    match next_inbound(&mut a_rx).await {
        spb::inbound::Kind::Result(r) => {
            assert_eq!(r.status(), spb::send_result::Status::Delivered)
        }
        other => panic!("expected result, got {other:?}"),
    }

    // C is registered but offline: A's send reports OFFLINE.
    a_tx.send(spb::Outbound {
        id: 2,
        recipient: c.key.public_key().0.to_vec(),
        payload: b"x".to_vec(),
    })
    .await
    .expect("send");
    match next_inbound(&mut a_rx).await {
        spb::inbound::Kind::Result(r) => {
            assert_eq!(r.id, 2);
            assert_eq!(r.status(), spb::send_result::Status::Offline);
            assert!(r.message.contains("not connected"), "{}", r.message);
        }
        other => panic!("expected result, got {other:?}"),
    }
    // A malformed recipient is refused with a reason.
    a_tx.send(spb::Outbound {
        id: 3,
        recipient: vec![1, 2, 3],
        payload: vec![],
    })
    .await
    .expect("send");
    match next_inbound(&mut a_rx).await {
        spb::inbound::Kind::Result(r) => assert_eq!(r.status(), spb::send_result::Status::Invalid),
        other => panic!("expected result, got {other:?}"),
    }

    // C cannot open B's mailbox: its own token names C, and a forged token is refused.
    let forged = tern_proto::token::issue_peer_token(
        b"guessed-secret",
        "b",
        &b.key.public_key(),
        tern_management::grpc::now_unix(),
        60,
    )
    .expect("forge")
    .0;
    let err = open_signal(&c, &forged).await.expect_err("forged token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = open_signal(&c, "").await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let (c_tx, _c_rx) = open_signal(&c, &tc).await.expect("C opens its own");
    // Whatever C sends arrives at B as from C.
    c_tx.send(spb::Outbound {
        id: 9,
        recipient: b.key.public_key().0.to_vec(),
        payload: b"hi".to_vec(),
    })
    .await
    .expect("send");
    match next_inbound(&mut b_rx).await {
        spb::inbound::Kind::Delivery(d) => assert_eq!(d.sender, c.key.public_key().0.to_vec()),
        other => panic!("expected delivery, got {other:?}"),
    }
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_rate_limits_a_flooding_peer() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&srv, "a").await;
    let ta = a
        .login(Some(&srv.default_setup_key))
        .await
        .expect("A")
        .peer_token;
    let (a_tx, mut a_rx) = open_signal(&a, &ta).await.expect("A opens");
    let nobody = tern_proto::SecretKey::generate().public_key().0.to_vec();
    // Default burst is 200 at 50/s; send 400 as fast as possible (bounded) and count refusals.
    let sender = tokio::spawn(async move {
        for id in 0..400u64 {
            if a_tx
                .send(spb::Outbound {
                    id,
                    recipient: nobody.clone(),
                    payload: vec![],
                })
                .await
                .is_err()
            {
                break;
            }
        }
        a_tx
    });
    let mut limited = 0;
    for _ in 0..400 {
        if let spb::inbound::Kind::Result(r) = next_inbound(&mut a_rx).await {
            if r.status() == spb::send_result::Status::RateLimited {
                limited += 1;
            }
        }
    }
    let _keep = sender.await.expect("sender");
    assert!(
        limited >= 100,
        "expected the burst limit to refuse most of the excess, got {limited}"
    );
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue item 10: a peer that stops reading its signal stream pins at most 1 MiB of
/// others' messages (not 256 x 64 KiB); past that, senders are told it is not keeping up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_signal_reader_pins_a_bounded_number_of_bytes() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let a = TestAgent::new(&srv, "a").await;
    let b = TestAgent::new(&srv, "stalled").await;
    let ta = a
        .login(Some(&srv.default_setup_key))
        .await
        .expect("A")
        .peer_token;
    let tb = b
        .login(Some(&srv.default_setup_key))
        .await
        .expect("B")
        .peer_token;
    let (a_tx, mut a_rx) = open_signal(&a, &ta).await.expect("A opens");
    let (_b_tx, _b_rx_never_read) = open_signal(&b, &tb).await.expect("B opens");
    srv.wait_signal_streams(2).await;
    let to_b = b.key.public_key().0.to_vec();
    let mut delivered = 0;
    let mut refused = 0;
    // 200 x 60 KiB = 12 MB: under the old 256-message queue all of it would be accepted.
    for id in 0..200u64 {
        a_tx.send(spb::Outbound {
            id,
            recipient: to_b.clone(),
            payload: vec![1u8; 60 * 1024],
        })
        .await
        .expect("send");
        if let spb::inbound::Kind::Result(r) = next_inbound(&mut a_rx).await {
            match r.status() {
                spb::send_result::Status::Delivered => delivered += 1,
                spb::send_result::Status::RateLimited => {
                    assert!(r.message.contains("not keeping up"), "{}", r.message);
                    refused += 1
                }
                other => panic!("unexpected {other:?}: {}", r.message),
            }
        }
    }
    eprintln!("delivered {delivered}, refused {refused}");
    // What the reader's HTTP/2 windows absorb comes on top of the 1 MiB queue.
    assert!(
        delivered * 60 <= 6 * 1024,
        "{delivered} x 60 KiB accepted for a stalled reader"
    );
    assert!(refused >= 100, "the rest is refused, got {refused}");
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue item 14: the agent pins the management server's key at the first join and
/// refuses a server that presents another one (e.g. someone answering at the management URL),
/// saying how to join again on purpose. Runs the real `tern` binary; the refusal comes before
/// any TUN device or route is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_management_server_whose_key_changed() {
    init_tracing();
    if tern_tests::mesh::skip() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let someone_else = tern_proto::SecretKey::generate().public_key().to_base64();
    std::fs::write(
        state.join("config.json"),
        serde_json::to_string(&json!({
            "management_url": srv.base, "hostname": "pinned", "interface": "ternpin0",
            "mtu": null, "server_key": someone_else,
        }))
        .expect("json"),
    )
    .expect("config");
    let run = tmp.path().join("run");
    let out = tern_tests::mesh::tern_up_bounded(
        &[
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--run-dir".as_ref(),
            run.as_os_str(),
        ],
        &[],
        "ternpin0",
        Duration::from_secs(30),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("presents key"), "{stderr}");
    assert!(stderr.contains(&someone_else), "{stderr}");
    assert!(stderr.contains("tern up --setup-key"), "{stderr}");
    assert!(
        !std::path::Path::new("/sys/class/net/ternpin0").exists(),
        "no TUN device was made"
    );
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue item 4: deleting a peer or letting its login expire ends its open streams at
/// once — the sync stream pushes nothing more (no fresh relay credentials), the signal service in
/// the process and a separately deployed one close its stream and refuse its token — and only
/// management (holding the shared secret) can tell a signal service to revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_expired_peers_lose_their_streams_at_once() {
    use tern_proto::signal::signal_service_client::SignalServiceClient;
    init_tracing();
    // A split signal service on loopback, sharing the peer-token secret.
    let secret = b"a-shared-peer-token-secret-for-the-test".to_vec();
    let split = tern_signal::Signal::new(secret.clone(), Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let split_url = format!("http://{}", listener.local_addr().expect("addr"));
    let svc = split.service();
    let split_task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let mut opts = fast_options();
    opts.peer_token_secret = Some(secret.clone());
    opts.signal_url = Some(split_url.clone());
    let srv = TestServer::start_with(&db.url, opts).await.expect("server");
    let split_ch = tonic::transport::Channel::from_shared(split_url)
        .expect("uri")
        .connect()
        .await
        .expect("connect split signal");
    let open_split = |token: String| {
        let ch = split_ch.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<spb::Outbound>(4);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut()
                .insert("authorization", bearer_value(&token));
            SignalServiceClient::new(ch)
                .open(req)
                .await
                .map(|r| (tx, r.into_inner()))
        }
    };
    async fn ends_within<T>(s: &mut tonic::Streaming<T>, what: &str) -> tonic::Status {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.message()).await {
                Err(_) => panic!("{what}: still open after 5 s"),
                Ok(Err(e)) => return e,
                Ok(Ok(None)) => return tonic::Status::cancelled("closed"),
                Ok(Ok(Some(_))) => {}
            }
        }
    }

    // Deletion.
    let a = TestAgent::new(&srv, "doomed").await;
    let la = a
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register");
    let (_a_tx, mut a_sig) = open_signal(&a, &la.peer_token).await.expect("signal");
    let (_a_tx2, mut a_split) = open_split(la.peer_token.clone())
        .await
        .expect("split signal");
    let mut a_sync = a.sync(&la.peer_token).await.expect("sync");
    next_map(&mut a_sync, Duration::from_secs(5))
        .await
        .expect("first map");
    srv.wait_signal_streams(1).await;
    wait_until(
        "the split signal has the stream",
        Duration::from_secs(5),
        || split.online() >= 1,
    )
    .await;
    assert_eq!(srv.delete(&format!("/api/peers/{}", la.peer_id)).await, 204);
    let e = ends_within(&mut a_sig, "signal stream of a deleted peer").await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = ends_within(&mut a_split, "split signal stream of a deleted peer").await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let err = open_signal(&a, &la.peer_token)
        .await
        .expect_err("old token refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = open_split(la.peer_token.clone())
        .await
        .expect_err("refused by the split one too");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let e = ends_within(&mut a_sync, "sync stream of a deleted peer").await;
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Expiry while the streams are open.
    let b = TestAgent::new(&srv, "expiring").await;
    let lb = b
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register");
    let (_b_tx, mut b_sig) = open_signal(&b, &lb.peer_token).await.expect("signal");
    let mut b_sync = b.sync(&lb.peer_token).await.expect("sync");
    next_map(&mut b_sync, Duration::from_secs(5))
        .await
        .expect("first map");
    expire_logins(&srv, &lb.peer_id, 3).await;
    let e = ends_within(&mut b_sync, "sync stream of an expired peer").await;
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("login expired"), "{e}");
    let e = ends_within(&mut b_sig, "signal stream of an expired peer").await;
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // Only management can revoke: a peer's own token is not a revocation token.
    let c = TestAgent::new(&srv, "curious").await;
    let lc = c
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register");
    let mut req = tonic::Request::new(spb::RevokeRequest {
        keys: vec![lb.peer_id.as_bytes().to_vec()],
        revoked_at_unix: tern_management::grpc::now_unix(),
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&lc.peer_token));
    let err = SignalServiceClient::new(split_ch.clone())
        .revoke(req)
        .await
        .expect_err("a peer cannot revoke");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    srv.stop().await;
    split_task.abort();
    db.cleanup().await;
}

/// Two replicas on one PostgreSQL, in process: a change on one reaches a stream on the other,
/// signal crosses between them, a peer moves replicas without being marked offline by the one
/// it left, and a replica that stops its heartbeat has its peers marked offline by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_share_changes_signal_and_presence() {
    init_tracing();
    if postgres_url().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the replica tests: set TERN_TEST_POSTGRES_URL"
        );
        eprintln!("SKIPPED: replicas need PostgreSQL (TERN_TEST_POSTGRES_URL)");
        return;
    }
    let db = TestDb::new(Backend::Postgres).await.expect("db");
    let one = TestServer::start(&db.url).await.expect("replica 1");
    let two = TestServer::replica_of(&one, &db.url)
        .await
        .expect("replica 2");
    let status = two.get("/api/status").await;
    assert_eq!(
        status["replicas"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );

    // A syncs on replica 1; B registers on replica 2: A sees B within a second.
    let a = TestAgent::new(&one, "alpha").await;
    let la = a.login(Some(&one.default_setup_key)).await.expect("A");
    let mut sa = a.sync(&la.peer_token).await.expect("sync A");
    next_map(&mut sa, Duration::from_secs(5))
        .await
        .expect("A's first map");
    let b = TestAgent::new(&two, "bravo").await;
    let t = Instant::now();
    let lb = b.login(Some(&two.default_setup_key)).await.expect("B");
    wait_map(&mut sa, Duration::from_secs(2), |m| {
        m.remote_peers.len() == 1
    })
    .await
    .expect("a registration on replica 2 reaches A's stream on replica 1");
    eprintln!(
        "replica 2's change reached replica 1's stream in {:?}",
        t.elapsed()
    );
    let mut sb = b.sync(&lb.peer_token).await.expect("sync B");
    next_map(&mut sb, Duration::from_secs(5))
        .await
        .expect("B's first map");
    // An admin write on replica 2 (rename B) reaches A's stream on replica 1.
    let (s, v) = two
        .put(
            &format!("/api/peers/{}", lb.peer_id),
            json!({ "name": "bravo-2" }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_map(&mut sa, Duration::from_secs(2), |m| {
        m.remote_peers.iter().any(|p| p.name.starts_with("bravo-2"))
    })
    .await
    .expect("the rename reaches replica 1");

    // Signal: A on replica 1 sends to B on replica 2.
    let (a_tx, mut a_rx) = open_signal(&a, &la.peer_token).await.expect("A signal");
    let (_b_tx, mut b_rx) = open_signal(&b, &lb.peer_token).await.expect("B signal");
    one.wait_signal_streams(1).await;
    two.wait_signal_streams(1).await;
    a_tx.send(spb::Outbound {
        id: 1,
        recipient: b.key.public_key().0.to_vec(),
        payload: b"candidate across replicas".to_vec(),
    })
    .await
    .expect("send");
    match next_inbound(&mut a_rx).await {
        spb::inbound::Kind::Result(r) => {
            assert_eq!(r.status(), spb::send_result::Status::Delivered, "{r:?}")
        }
        other => panic!("expected a result, got {other:?}"),
    }
    match next_inbound(&mut b_rx).await {
        spb::inbound::Kind::Delivery(d) => {
            assert_eq!(d.sender, a.key.public_key().0.to_vec());
            assert_eq!(d.payload, b"candidate across replicas");
        }
        other => panic!("expected a delivery, got {other:?}"),
    }

    // A moves to replica 2 (opens a stream there, then its stream on replica 1 ends): it stays
    // online.
    let a2 = TestAgent::new(&two, "alpha").await.with_key(a.key.clone());
    let mut sa2 = a2.sync(&la.peer_token).await.expect("A on replica 2");
    next_map(&mut sa2, Duration::from_secs(5))
        .await
        .expect("A's map from replica 2");
    drop(sa);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer = two.get(&format!("/api/peers/{}", la.peer_id)).await;
    assert_eq!(peer["connected"], true, "A moved, it did not leave: {peer}");

    // Replica 2 goes silent (its heartbeat is made old, as if it hung or was killed): replica 1
    // marks its peers offline within a few seconds.
    let replica2 = two.state().store.replica().to_string();
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
    let t = Instant::now();
    // Keep it old while replica 2 would renew it (its own heartbeat re-registers it later).
    let stale = async {
        loop {
            let _ = sqlx::query("UPDATE replicas SET heartbeat_at = 0 WHERE id = $1")
                .bind(&replica2)
                .execute(&pool)
                .await;
            let peer = one.get(&format!("/api/peers/{}", lb.peer_id)).await;
            if peer["connected"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), stale)
        .await
        .expect("replica 1 marks the silent replica's peers offline");
    eprintln!(
        "a silent replica's peers were offline after {:?}",
        t.elapsed()
    );
    pool.close().await;
    // Replica 2 was only slow: at its next heartbeat it registers again and its peers, whose
    // streams it still holds, are online again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while two.get(&format!("/api/peers/{}", lb.peer_id)).await["connected"] != true {
        assert!(
            Instant::now() < deadline,
            "replica 2's peers not online again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleting B on replica 1 closes its signal stream on replica 2 (the revocation crossed).
    assert_eq!(one.delete(&format!("/api/peers/{}", lb.peer_id)).await, 204);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match b_rx.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("B's signal stream on replica 2 reacts to a deletion on replica 1");
    let err = end.expect_err("the stream ends with an error");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    drop((sb, sa2));
    two.stop().await;
    one.stop().await;
    db.cleanup().await;
}
