//! REST suite: authentication, CRUD of every entity, and bad input -> 4xx JSON errors with no
//! partial writes. Runs on SQLite and (when configured) PostgreSQL.

use reqwest::Method;
use serde_json::{json, Value};
use tern_tests::*;

fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// Asserts a JSON error with `status`, whose message contains `needle`.
fn assert_err(got: (u16, Value), status: u16, needle: &str) {
    let (s, v) = got;
    assert_eq!(s, status, "expected {status}, got {s}: {v}");
    let msg = v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error without message: {v}"));
    assert!(
        msg.contains(needle),
        "message {msg:?} should mention {needle:?}"
    );
    assert!(v["error"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_locks_the_username_not_everyone() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let (s, v) = srv
        .post(
            "/api/users",
            json!({"username": "second", "password": "second-admin-pw"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let http = reqwest::Client::new();
    let attempt = |user: &'static str, pw: &'static str| {
        let http = http.clone();
        let url = srv.url("/api/auth/login");
        async move {
            let r = http
                .post(url)
                .json(&json!({"username": user, "password": pw}))
                .send()
                .await
                .expect("login");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for _ in 0..5 {
        assert_eq!(attempt("admin", "guess-guess-guess").await.0, 401);
    }
    let (status, body) = attempt("admin", "guess-guess-guess").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("try again in"),
        "{body}"
    );
    // Locked means locked, even with the right password ...
    assert_eq!(attempt("admin", ADMIN_PASSWORD).await.0, 429);
    // ... for that username only.
    assert_eq!(attempt("second", "second-admin-pw").await.0, 200);
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue items 1 and 11: concurrent guesses cannot outrun the per-username limit (each
/// attempt is counted before its password is checked), one address guessing many usernames is
/// stopped, and a client that sends half a request is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_are_counted_before_the_check_and_slow_clients_are_cut_off() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let http = reqwest::Client::new();
    let url = srv.url("/api/auth/login");
    // 200 wrong guesses at once, the right password among them.
    let mut tasks = vec![];
    for i in 0..200 {
        let http = http.clone();
        let url = url.clone();
        let pw = if i == 150 {
            ADMIN_PASSWORD
        } else {
            "guess-guess-guess"
        };
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"username": "admin", "password": pw}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let mut checked = 0;
    for t in tasks {
        let status = t.await.expect("task");
        assert!(matches!(status, 200 | 401 | 429), "status {status}");
        if status != 429 {
            checked += 1;
        }
    }
    assert!(
        checked <= 5,
        "{checked} passwords were checked; the limit is 5 per username"
    );
    // One address trying many usernames is stopped too (counted across usernames).
    let mut last = (0, Value::Null);
    for i in 0..40 {
        let r = http
            .post(&url)
            .json(&json!({"username": format!("nobody{i}"), "password": "whatever-123"}))
            .send()
            .await
            .expect("login");
        last = (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        );
        if last.0 == 429 {
            break;
        }
    }
    assert_eq!(last.0, 429, "{}", last.1);
    assert!(
        last.1["message"]
            .as_str()
            .unwrap_or("")
            .contains("from your address"),
        "{}",
        last.1
    );
    // Half a request: the server closes the connection instead of waiting forever.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = srv.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 before the close is fine
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a partial request held its connection for 30 s"
    );
    // A connection that sends nothing at all is closed too.
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(30), idle.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection stayed open"
    );
    srv.stop().await;
    db.cleanup().await;
}

/// Routes say whether a routing peer serves them now, from the routing peers' own reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_say_whether_their_routing_peer_serves_them() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let gw = TestAgent::new(&srv, "factory-gw").await;
    let l = gw
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register");
    let route = |net: &str| json!({"network": net, "routing_peer": l.peer_id, "metric": 10, "groups": ["all"]});
    let (s, lan) = srv.post("/api/routes", route("192.168.50.0/24")).await;
    assert_eq!(s, 201, "{lan}");
    let (s, other) = srv.post("/api/routes", route("10.99.0.0/24")).await;
    assert_eq!(s, 201, "{other}");
    let serving = |id: String| {
        let srv = &srv;
        async move {
            srv.get(&format!("/api/routes/{id}")).await["serving"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    };
    assert!(serving(id(&lan)).await.contains("factory-gw is offline"));
    let _sync = gw.sync(&l.peer_token).await.expect("sync");
    srv.wait_online(&l.peer_id).await;
    assert!(serving(id(&lan))
        .await
        .contains("has not reported its networks yet"));
    let mut req = tonic::Request::new(tern_proto::management::StatusReport {
        connections: vec![],
        reachable_networks: vec!["192.168.50.0/24".into(), "10.0.0.0/24".into()],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&l.peer_token));
    gw.mgmt().report_status(req).await.expect("report");
    assert_eq!(serving(id(&lan)).await, "served by factory-gw");
    let why = serving(id(&other)).await;
    assert!(
        why.starts_with("not served: factory-gw has no route to 10.99.0.0/24 (it reaches"),
        "{why}"
    );
    let all = srv.get("/api/routes").await;
    assert!(all.to_string().contains("served by factory-gw"), "{all}");
    // A network that a receiving peer reaches directly asks for confirmation (409
    // needs_confirmation, at the field): that peer would not install the route.
    let laptop = TestAgent::new(&srv, "laptop").await;
    let ll = laptop
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register laptop");
    let _lsync = laptop.sync(&ll.peer_token).await.expect("sync laptop");
    srv.wait_online(&ll.peer_id).await;
    let mut req = tonic::Request::new(tern_proto::management::StatusReport {
        connections: vec![],
        reachable_networks: vec!["172.16.5.0/24".into()],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&ll.peer_token));
    laptop.mgmt().report_status(req).await.expect("report");
    let (s, v) = srv.post("/api/routes", route("172.16.0.0/16")).await;
    assert_eq!(
        (s, v["error"].clone()),
        (409, json!("needs_confirmation")),
        "{v}"
    );
    assert_eq!(v["field"], "network");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("which laptop reaches directly"),
        "{v}"
    );
    let mut confirmed = route("172.16.0.0/16");
    confirmed["confirm_overlap"] = json!(true);
    let (s, v) = srv.post("/api/routes", confirmed).await;
    assert_eq!(s, 201, "confirmed: {v}");
    // The laptop reports that it skipped the route (it overlaps its own LAN): the route lists it.
    let mut req = tonic::Request::new(tern_proto::management::StatusReport {
        reachable_networks: vec!["172.16.5.0/24".into()],
        routes: vec![tern_proto::management::RouteReport {
            network: "172.16.0.0/16".into(),
            state: "conflict".into(),
            routing_peer_id: l.peer_id.clone(),
            detail: "172.16.0.0/16 overlaps 172.16.5.0/24 on eth0".into(),
        }],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", bearer_value(&ll.peer_token));
    laptop.mgmt().report_status(req).await.expect("report");
    let r = srv
        .get(&format!("/api/routes/{}", v["id"].as_str().unwrap_or("")))
        .await;
    assert_eq!(r["clients"][0]["peer_name"], "laptop", "{r}");
    assert_eq!(r["clients"][0]["state"], "conflict", "{r}");
    assert!(
        r["clients"][0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("overlaps"),
        "{r}"
    );
    let mut bad = tonic::Request::new(tern_proto::management::StatusReport {
        routes: vec![tern_proto::management::RouteReport {
            network: "172.16.0.0/16".into(),
            state: "sideways".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    bad.metadata_mut()
        .insert("authorization", bearer_value(&ll.peer_token));
    let err = laptop.mgmt().report_status(bad).await.expect_err("refused");
    assert!(err.message().contains("unknown route state"), "{err}");
    // A malformed report is refused in words.
    let mut bad = tonic::Request::new(tern_proto::management::StatusReport {
        connections: vec![],
        reachable_networks: vec!["not-a-network".into()],
        ..Default::default()
    });
    bad.metadata_mut()
        .insert("authorization", bearer_value(&l.peer_token));
    let err = gw.mgmt().report_status(bad).await.expect_err("refused");
    assert!(err.message().contains("is not a CIDR"), "{err}");
    srv.stop().await;
    db.cleanup().await;
}

/// A group's members are set in one change; unknown peers and the built-in group are refused at
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_are_set_in_one_change() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let mut ids = vec![];
    for host in ["plc-gw", "laptop"] {
        let a = TestAgent::new(&srv, host).await;
        ids.push(
            a.login(Some(&srv.default_setup_key))
                .await
                .expect("register")
                .peer_id,
        );
    }
    let (s, g) = srv.post("/api/groups", json!({"name": "factory"})).await;
    assert_eq!(s, 201, "{g}");
    let path = format!("/api/groups/{}/members", id(&g));
    let (s, g2) = srv
        .put(&path, json!({"peers": [ids[0], ids[1], ids[0]]}))
        .await;
    assert_eq!(s, 200, "{g2}");
    assert_eq!(g2["peers"], 2);
    let (s, g3) = srv.put(&path, json!({"peers": [ids[1]]})).await;
    assert_eq!(s, 200, "{g3}");
    assert_eq!(g3["peers"], 1);
    let gw = srv.get(&format!("/api/peers/{}", ids[0])).await;
    assert!(!gw["groups"].to_string().contains(&id(&g)), "{gw}");
    let laptop = srv.get(&format!("/api/peers/{}", ids[1])).await;
    assert!(laptop["groups"].to_string().contains(&id(&g)), "{laptop}");
    assert_err(
        srv.put(&path, json!({"peers": ["ghost"]})).await,
        422,
        "no peer with id",
    );
    assert_err(
        srv.put("/api/groups/all/members", json!({"peers": []}))
            .await,
        422,
        "always in",
    );
    let ev = srv.get("/api/audit?action=group.members").await;
    assert_eq!(ev.as_array().map(|a| a.len()), Some(2), "{ev}");
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue item 7: the setup key made at first start expires after 24 h unless an admin
/// keeps it; an expired key cannot be kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_setup_key_expires_unless_an_admin_keeps_it() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let keys = srv.get("/api/setup-keys").await;
    let first = keys
        .as_array()
        .and_then(|k| k.iter().find(|k| k["name"] == "default"))
        .cloned()
        .expect("the first start's key");
    let now = tern_management::model::now_millis();
    let expires = first["expires_at"].as_i64().expect("it expires");
    let day = 24 * 3600 * 1000;
    assert!(
        (now + day - 60_000..=now + day).contains(&expires),
        "{first}"
    );
    let path = format!("/api/setup-keys/{}", id(&first));
    let (s, kept) = srv.put(&path, json!({ "keep": true })).await;
    assert_eq!(s, 200, "{kept}");
    assert!(kept["expires_at"].is_null(), "{kept}");
    assert_eq!(kept["state"], "valid");
    // An expired key stays expired.
    let new = tern_management::store::NewSetupKey {
        expires_at: Some(now - 1000),
        ..tern_management::store::NewSetupKey::reusable("old", vec![])
    };
    let old = srv
        .state()
        .store
        .create_setup_key("test", &new, "0123", "tern_sk_0123")
        .await
        .expect("create");
    assert_err(
        srv.put(
            &format!("/api/setup-keys/{}", old.id),
            json!({ "keep": true }),
        )
        .await,
        422,
        "already expired",
    );
    srv.stop().await;
    db.cleanup().await;
}

/// Security issue item 7: changing one's own password needs the current one (a stolen session is
/// not enough); another admin's password can be reset without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_password_change_needs_the_current_password() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let users = srv.get("/api/users").await;
    let me = users
        .as_array()
        .and_then(|a| a.iter().find(|u| u["username"] == "admin"))
        .and_then(|u| u["id"].as_str())
        .expect("admin user")
        .to_string();
    let path = format!("/api/users/{me}");
    let (s, v) = srv
        .put(&path, json!({"password": "new-password-123"}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["field"], "current_password", "{v}");
    let (s, v) = srv
        .put(
            &path,
            json!({"password": "new-password-123", "current_password": "not-it-at-all"}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v.to_string().contains("is not your current password"),
        "{v}"
    );
    let (s, v) = srv
        .put(
            &path,
            json!({"password": "new-password-123", "current_password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let http = reqwest::Client::new();
    admin_login(&http, &srv.base, "admin", "new-password-123")
        .await
        .expect("the new password works");
    // Another admin's password: no current password needed (they may have forgotten it).
    let (s, other) = srv
        .post(
            "/api/users",
            json!({"username": "second", "password": "second-admin-pw"}),
        )
        .await;
    assert_eq!(s, 201, "{other}");
    let (s, v) = srv
        .put(
            &format!("/api/users/{}", other["id"].as_str().expect("id")),
            json!({"password": "reset-by-admin-1"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Security review, round two, item 12: wrong current passwords are throttled like sign-ins
    // (before: 60 wrong values in 0.8 s, never a 429).
    let mut answers = vec![];
    for _ in 0..10 {
        let (s, v) = srv
            .put(
                &path,
                json!({"password": "another-password-1", "current_password": "a-wrong-guess"}),
            )
            .await;
        answers.push(s);
        if s == 429 {
            assert!(
                v["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("too many wrong passwords"),
                "{v}"
            );
            break;
        }
    }
    assert_eq!(
        answers,
        [422, 422, 422, 422, 422, 429],
        "five checked, then refused"
    );
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_is_required_and_tokens_work() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let http = reqwest::Client::new();

    // No token, a bad token, a wrong password.
    for path in ["/api/peers", "/api/groups", "/api/settings", "/api/audit"] {
        let r = http.get(srv.url(path)).send().await.expect("req");
        assert_eq!(r.status(), 401, "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"], "unauthorized");
    }
    let r = http
        .get(srv.url("/api/peers"))
        .bearer_auth("garbage")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);
    let err = admin_login(&http, &srv.base, "admin", "wrong-password")
        .await
        .expect_err("wrong password");
    assert!(
        err.to_string().contains("wrong username or password"),
        "{err}"
    );
    let err = admin_login(&http, &srv.base, "nobody", "whatever-123")
        .await
        .expect_err("unknown user");
    assert!(
        err.to_string().contains("wrong username or password"),
        "{err}"
    );

    // Personal access token: shown once, works, can be deleted.
    let (s, v) = srv
        .post(
            "/api/tokens",
            json!({ "name": "ci", "expires_in_days": 30 }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let pat = v["token"].as_str().expect("token").to_string();
    assert!(pat.starts_with("tern_pat_"));
    let r = http
        .get(srv.url("/api/peers"))
        .bearer_auth(&pat)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    // Changes made with the token are the admin's, named with the token, and the audit filter
    // for the admin finds them (but not another user whose name merely starts the same).
    let r = http
        .post(srv.url("/api/groups"))
        .bearer_auth(&pat)
        .json(&json!({ "name": "made-by-token" }))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    let ev = srv.get("/api/audit?actor=user:admin&action=group.").await;
    assert_eq!(ev[0]["actor"], "user:admin (token ci)", "{ev}");
    let none = srv.get("/api/audit?actor=user:adm").await;
    assert_eq!(none, json!([]), "a partial name matches nothing");
    let listed = srv.get("/api/tokens").await;
    assert!(!listed.to_string().contains(&pat), "token is never listed");
    assert_eq!(
        srv.delete(&format!("/api/tokens/{}", id(&v["access_token"])))
            .await,
        204
    );
    let r = http
        .get(srv.url("/api/peers"))
        .bearer_auth(&pat)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);
    assert_err(
        srv.post("/api/tokens", json!({ "name": "x", "expires_in_days": 0 }))
            .await,
        422,
        "1-365",
    );

    // Users: create, sign in, disable (sessions stop working), cannot disable the last one.
    let (s, u) = srv
        .post(
            "/api/users",
            json!({ "username": "ops", "password": "ops-password-1" }),
        )
        .await;
    assert_eq!(s, 201, "{u}");
    let ops_token = admin_login(&http, &srv.base, "ops", "ops-password-1")
        .await
        .expect("ops login");
    // A password change ends the user's other sessions, not the one that made the change.
    let ops_other = admin_login(&http, &srv.base, "ops", "ops-password-1")
        .await
        .expect("second ops session");
    let r = http
        .put(srv.url(&format!("/api/users/{}", id(&u))))
        .bearer_auth(&ops_token)
        .json(&json!({ "password": "ops-password-2", "current_password": "ops-password-1" }))
        .send()
        .await
        .expect("change password");
    assert_eq!(r.status(), 200);
    for (token, want) in [(&ops_token, 200), (&ops_other, 401)] {
        let r = http
            .get(srv.url("/api/auth/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("me");
        assert_eq!(r.status(), want);
    }
    assert_err(
        srv.post(
            "/api/users",
            json!({ "username": "ops", "password": "ops-password-1" }),
        )
        .await,
        409,
        "already exists",
    );
    assert_err(
        srv.post(
            "/api/users",
            json!({ "username": "short", "password": "123" }),
        )
        .await,
        422,
        "at least 10",
    );
    let (s, _) = srv
        .put(
            &format!("/api/users/{}", id(&u)),
            json!({ "disabled": true }),
        )
        .await;
    assert_eq!(s, 200);
    let r = http
        .get(srv.url("/api/peers"))
        .bearer_auth(&ops_token)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401, "disabled user's session is ended at once");
    let err = admin_login(&http, &srv.base, "ops", "ops-password-2")
        .await
        .expect_err("disabled user cannot sign in");
    assert!(err.to_string().contains("disabled"), "{err}");
    let me = srv.get("/api/auth/me").await;
    assert_err(
        srv.put(
            &format!("/api/users/{}", id(&me)),
            json!({ "disabled": true }),
        )
        .await,
        409,
        "last enabled",
    );

    // OpenAPI document.
    let doc: Value = http
        .get(srv.url("/api/openapi.json"))
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/api/peers",
        "/api/routes/{id}",
        "/api/setup-keys",
        "/api/policies",
        "/api/audit",
    ] {
        assert!(doc["paths"][p].is_object(), "OpenAPI lacks {p}");
    }
    srv.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_and_bad_input_on_every_entity() {
    init_tracing();
    on_each_backend(|backend, url| async move {
        let srv = TestServer::start(&url).await.expect("server");

        // Groups.
        let (s, staff) = srv.post("/api/groups", json!({ "name": "staff" })).await;
        assert_eq!(s, 201, "{backend:?} {staff}");
        let (s, routers) = srv.post("/api/groups", json!({ "name": "routers" })).await;
        assert_eq!(s, 201);
        assert_err(srv.post("/api/groups", json!({ "name": "staff" })).await, 409, "already exists");
        assert_err(srv.post("/api/groups", json!({ "name": "  " })).await, 422, "must not be empty");
        let (s, renamed) = srv.put(&format!("/api/groups/{}", id(&staff)), json!({ "name": "employees" })).await;
        assert_eq!((s, renamed["name"].as_str()), (200, Some("employees")));
        assert_err(srv.put("/api/groups/all", json!({ "name": "x" })).await, 409, "built in");
        assert_err(srv.api(Method::GET, "/api/groups/nope", None).await, 404, "not found");

        // Setup keys with groups; peers via registration.
        let (s, v) = srv.post("/api/setup-keys", json!({ "name": "k", "auto_groups": ["nope"] })).await;
        assert_eq!(s, 422, "{v}");
        assert_eq!(v["field"], "auto_groups");
        assert!(v["message"].as_str().expect("msg").contains("unknown group \"nope\""), "{v}");
        let before = srv.get("/api/setup-keys").await.as_array().expect("list").len();
        assert_err(srv.post("/api/setup-keys", json!({ "name": "k", "usage_limit": 5 })).await, 422, "one-off");
        assert_err(srv.post("/api/setup-keys", json!({ "name": "k", "expires_in_secs": 5 })).await, 422, "60 s");
        assert_eq!(srv.get("/api/setup-keys").await.as_array().expect("list").len(), before, "no partial write");
        let (router_key, router_key_id) =
            srv.setup_key(json!({ "name": "routers", "reusable": true, "auto_groups": [id(&routers)] })).await;
        let gw = TestAgent::new(&srv, "gateway").await;
        let gw_login = gw.login(Some(&router_key)).await.expect("gateway registers");
        let peer = srv.get(&format!("/api/peers/{}", gw_login.peer_id)).await;
        let groups: Vec<&str> = peer["groups"].as_array().expect("groups").iter().filter_map(Value::as_str).collect();
        assert!(groups.contains(&"all") && groups.contains(&id(&routers).as_str()), "{peer}");
        let (s, p) = srv
            .put(&format!("/api/peers/{}", gw_login.peer_id), json!({ "name": "factory-gw", "groups": [id(&routers), id(&staff)] }))
            .await;
        assert_eq!(s, 200, "{p}");
        assert_eq!(p["name"], "factory-gw");
        assert_err(srv.put(&format!("/api/peers/{}", gw_login.peer_id), json!({ "groups": ["ghost"] })).await, 422, "unknown group");
        let k = srv.get(&format!("/api/setup-keys/{router_key_id}")).await;
        assert_eq!(k["used_count"], 1);
        assert!(!k.to_string().contains(&router_key), "the key is never shown again");

        // Policies.
        let good = json!({ "name": "ssh", "protocol": "tcp", "ports": ["22", "8000-8080"], "bidirectional": false,
                           "sources": [id(&staff)], "destinations": [id(&routers)] });
        let (s, pol) = srv.post("/api/policies", good.clone()).await;
        assert_eq!(s, 201, "{pol}");
        assert_eq!(pol["ports"], json!(["22", "8000-8080"]));
        assert_err(srv.post("/api/policies", good.clone()).await, 409, "already exists");
        let mut bad = good.clone();
        bad["name"] = json!("p2");
        bad["ports"] = json!(["9000-80"]);
        assert_err(srv.post("/api/policies", bad.clone()).await, 422, "starts after it ends");
        bad["ports"] = json!(["70000"]);
        assert_err(srv.post("/api/policies", bad.clone()).await, 422, "out of range");
        bad["ports"] = json!(["ssh"]);
        assert_err(srv.post("/api/policies", bad.clone()).await, 422, "not a number");
        bad["ports"] = json!(["22"]);
        bad["protocol"] = json!("icmp");
        assert_err(srv.post("/api/policies", bad.clone()).await, 422, "only to tcp or udp");
        bad["protocol"] = json!("sctp");
        assert_err(srv.post("/api/policies", bad.clone()).await, 400, "unknown variant");
        bad["protocol"] = json!("tcp");
        bad["sources"] = json!(["ghost"]);
        assert_err(srv.post("/api/policies", bad.clone()).await, 422, "unknown group");
        let (s, upd) = srv.put(&format!("/api/policies/{}", id(&pol)), json!({ "name": "ssh", "protocol": "udp", "ports": ["53"],
            "sources": [id(&staff)], "destinations": [id(&routers)] })).await;
        assert_eq!(s, 200, "{upd}");
        assert_eq!(upd["protocol"], "udp");
        // The group is in use now: deleting it is refused with the reason.
        assert_err(srv.api(Method::DELETE, &format!("/api/groups/{}", id(&staff)), None).await, 409, "used by policy");

        // Routes.
        let route = json!({ "network": "192.168.50.0/24", "routing_peer": gw_login.peer_id, "metric": 10, "groups": [id(&staff)] });
        let (s, r1) = srv.post("/api/routes", route.clone()).await;
        assert_eq!(s, 201, "{r1}");
        assert_err(srv.post("/api/routes", route.clone()).await, 409, "same routing peer");
        let mut bad = route.clone();
        bad["network"] = json!("192.168.50.300/24");
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "CIDR");
        bad["network"] = json!("192.168.50.0/23");
        assert_err(srv.post("/api/routes", bad.clone()).await, 409, "overlaps existing route");
        bad["network"] = json!("100.64.1.0/24");
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "overlay range");
        bad["network"] = json!("10.1.0.0/16");
        bad["groups"] = json!(["ghost"]);
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "unknown group");
        bad["groups"] = json!([id(&staff)]);
        bad["access_groups"] = json!(["ghost"]);
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "unknown group");
        bad["access_groups"] = json!([]);
        bad["routing_peer"] = json!("ghost-peer");
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "unknown peer");
        bad["routing_group"] = json!(id(&routers));
        assert_err(srv.post("/api/routes", bad.clone()).await, 422, "exactly one");
        // HA: the same network through a group of routers is allowed.
        let (s, r2) = srv
            .post("/api/routes", json!({ "network": "192.168.50.0/24", "routing_group": id(&routers), "metric": 20, "groups": [id(&staff)] }))
            .await;
        assert_eq!(s, 201, "{r2}");
        assert_eq!(srv.get("/api/routes").await.as_array().expect("list").len(), 2, "failed creates left nothing");
        let (s, r1u) = srv
            .put(&format!("/api/routes/{}", id(&r1)), json!({ "network": "192.168.50.0/24", "routing_peer": gw_login.peer_id,
                "metric": 5, "masquerade": false, "groups": [id(&staff)] }))
            .await;
        assert_eq!(s, 200, "{r1u}");
        assert_eq!((r1u["metric"].as_i64(), r1u["masquerade"].as_bool()), (Some(5), Some(false)));

        // Settings.
        let st = srv.get("/api/settings").await;
        assert_eq!((st["overlay_range"].as_str(), st["mtu"].as_u64()), (Some("100.64.0.0/10"), Some(1280)));
        assert_err(srv.put("/api/settings", json!({ "overlay_range": "10.0.0.0/33", "mtu": 1280, "peer_login_expiry_secs": 0, "ephemeral_ttl_secs": 600 })).await, 422, "CIDR");
        assert_err(srv.put("/api/settings", json!({ "overlay_range": "100.64.0.0/10", "mtu": 900, "peer_login_expiry_secs": 0, "ephemeral_ttl_secs": 600 })).await, 422, "1280");
        assert_err(srv.put("/api/settings", json!({ "overlay_range": "10.99.0.0/16", "mtu": 1280, "peer_login_expiry_secs": 0, "ephemeral_ttl_secs": 600 })).await, 409, "does not contain peer");
        let (s, st2) = srv.put("/api/settings", json!({ "overlay_range": "100.64.0.0/10", "mtu": 1380, "peer_login_expiry_secs": 86400, "ephemeral_ttl_secs": 300 })).await;
        assert_eq!(s, 200, "{st2}");
        assert_eq!(st2["mtu"], 1380);

        // Malformed and oversized bodies.
        let raw = srv.http.post(srv.url("/api/groups")).bearer_auth(&srv.token).header("content-type", "application/json").body("{not json").send().await.expect("req");
        assert_eq!(raw.status(), 400);
        let v: Value = raw.json().await.expect("json error body");
        assert!(v["message"].as_str().expect("msg").contains("not valid JSON"), "{v}");
        let huge = json!({ "name": "x".repeat(100 * 1024) });
        assert_err(srv.post("/api/groups", huge).await, 413, "larger than");
        let (s, v) = srv.api(Method::GET, "/api/nope", None).await;
        assert_eq!((s, v["error"].as_str()), (404, Some("not_found")));

        // Deletes.
        assert_eq!(srv.delete(&format!("/api/routes/{}", id(&r2))).await, 204);
        assert_eq!(srv.delete(&format!("/api/policies/{}", id(&pol))).await, 204);
        assert_eq!(srv.delete(&format!("/api/setup-keys/{router_key_id}")).await, 204);
        assert_eq!(srv.delete(&format!("/api/peers/{}", gw_login.peer_id)).await, 204);
        assert!(srv.get("/api/routes").await.as_array().expect("list").is_empty(), "route of a deleted peer goes with it");
        assert_eq!(srv.delete(&format!("/api/groups/{}", id(&staff))).await, 204);
        assert_eq!(srv.delete(&format!("/api/peers/{}", gw_login.peer_id)).await, 404);

        // Every change is in the audit log, attributed to the admin.
        let ev = srv.get("/api/audit?actor=user:admin&limit=1000").await;
        let actions: Vec<&str> = ev.as_array().expect("list").iter().filter_map(|e| e["action"].as_str()).collect();
        for a in ["group.create", "group.update", "policy.create", "route.put", "settings.update", "peer.update", "peer.delete", "route.delete", "setup_key.delete"] {
            assert!(actions.contains(&a), "audit lacks {a}: {actions:?}");
        }
        let reg = srv.get("/api/audit?action=peer.register").await;
        assert_eq!(reg[0]["actor"], "setup_key:routers");
        assert_err(srv.api(Method::GET, "/api/audit?limit=0", None).await, 422, "1-1000");
        srv.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_list_answers_not_modified_until_something_changes() {
    init_tracing();
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let srv = TestServer::start(&db.url).await.expect("server");
    let get = |etag: Option<String>| {
        let mut r = srv.http.get(srv.url("/api/peers")).bearer_auth(&srv.token);
        if let Some(e) = etag {
            r = r.header("if-none-match", e);
        }
        async move {
            let resp = r.send().await.expect("peers");
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            (resp.status().as_u16(), etag)
        }
    };
    // 304 for an unchanged list. The validator also rolls over every 30 s; should that happen
    // between two requests, the second try (milliseconds later) cannot meet another rollover.
    let not_modified = |etag: String| {
        let get = &get;
        async move {
            match get(Some(etag)).await {
                (304, _) => true,
                (200, Some(fresh)) => get(Some(fresh)).await.0 == 304,
                _ => false,
            }
        }
    };
    let (s, etag) = get(None).await;
    assert_eq!(s, 200);
    let etag = etag.expect("ETag on the peer list");
    assert!(not_modified(etag.clone()).await, "nothing changed");
    // Without a valid session the validator does not leak anything.
    let r = srv
        .http
        .get(srv.url("/api/peers"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("anon");
    assert_eq!(r.status(), 401);

    // A peer registers: the list changes.
    let a = TestAgent::new(&srv, "alpha").await;
    let la = a
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register");
    let (s, etag2) = get(Some(etag.clone())).await;
    assert_eq!(s, 200, "a new peer invalidates the list");
    let etag2 = etag2.expect("etag");
    // Clients that accept gzip get it (the peer list is the console's largest response).
    let raw = srv
        .http
        .get(srv.url("/api/peers"))
        .bearer_auth(&srv.token)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("gzip request");
    assert_eq!(
        raw.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    assert!(not_modified(etag2).await);

    // A connection report that changes a path invalidates it; the same report again does not.
    let b = TestAgent::new(&srv, "bravo").await;
    let lb = b
        .login(Some(&srv.default_setup_key))
        .await
        .expect("register b");
    let report = |kind: &str| {
        let mut req = tonic::Request::new(tern_proto::management::StatusReport {
            connections: vec![tern_proto::management::PeerConnection {
                peer_id: lb.peer_id.clone(),
                kind: kind.into(),
                rtt_ms: 5,
                reason_code: String::new(),
                probes_settled: 0,
                probes_lost: 0,
            }],
            reachable_networks: vec![],
            routes: vec![],
        });
        req.metadata_mut()
            .insert("authorization", bearer_value(&la.peer_token));
        req
    };
    // Only online peers report (the report goes when the stream does).
    let err = a
        .mgmt()
        .report_status(report("direct"))
        .await
        .expect_err("no sync stream yet");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let _sa = a.sync(&la.peer_token).await.expect("sync a");
    let (_, etag3) = get(None).await;
    let etag3 = etag3.expect("etag");
    a.mgmt()
        .report_status(report("direct"))
        .await
        .expect("report");
    let (s, etag4) = get(Some(etag3.clone())).await;
    assert_eq!(s, 200, "a new path shows at once");
    let etag4 = etag4.expect("etag");
    a.mgmt()
        .report_status(report("direct"))
        .await
        .expect("same report");
    assert!(not_modified(etag4).await, "unchanged report");
    // Paths are between online peers: B is not online, so A's path to it is not shown.
    let peers = srv.get("/api/peers").await;
    let a_row = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == la.peer_id))
        .cloned()
        .expect("a listed");
    assert_eq!(a_row["connections"], json!([]), "{a_row}");
    // B comes online: the path shows; B goes offline: it vanishes at once, also from the counts.
    let sb = b.sync(&lb.peer_token).await.expect("sync b");
    let shows = |want: usize| {
        let srv = &srv;
        let id = la.peer_id.clone();
        async move {
            for _ in 0..100 {
                let peers = srv.get("/api/peers").await;
                let n = peers
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["id"] == id))
                    .and_then(|p| p["connections"].as_array().map(|c| c.len()))
                    .unwrap_or(0);
                let st = srv.get("/api/status").await;
                let counted = st["connections"]["direct"].as_u64().unwrap_or(0) as usize;
                if n == want && counted == want {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            false
        }
    };
    assert!(
        shows(1).await,
        "the path between two online peers is listed and counted"
    );
    drop(sb);
    assert!(
        shows(0).await,
        "an offline peer's path vanishes within 10 s"
    );
    // A report naming an unknown kind is refused in words.
    let err = a
        .mgmt()
        .report_status(report("carrier-pigeon"))
        .await
        .expect_err("bad kind");
    assert!(err.message().contains("unknown connection kind"), "{err}");
    srv.stop().await;
    db.cleanup().await;
}

/// Asserts a 422 naming `field`, whose message contains `needle`.
fn assert_field(got: (u16, Value), field: &str, needle: &str) {
    assert_eq!(got.1["field"], field, "{}", got.1);
    assert_err(got, 422, needle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_services_refuse_bad_input_field_by_field_and_are_audited() {
    init_tracing();
    on_each_backend(|_, url| async move {
        // Ports inside the range the server may publish: two free ones and one another program
        // holds.
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = held.local_addr().expect("addr").port();
        let free: Vec<u16> = (0..2)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr").port()
            })
            .collect();
        let lo = *free.iter().chain([&busy]).min().expect("ports");
        let hi = *free.iter().chain([&busy]).max().expect("ports");
        let mut opts = fast_options();
        opts.public.bind = "127.0.0.1".parse().expect("ip");
        opts.public.ports = Some((lo, hi));
        let srv = TestServer::start_with(&url, opts).await.expect("server");
        let nas = TestAgent::new(&srv, "nas").await;
        let login = nas.login(Some(&srv.default_setup_key)).await.expect("register");
        let nas_ip = login
            .peer_config
            .expect("config")
            .address
            .split('/')
            .next()
            .expect("ip")
            .to_string();
        let (s, r) = srv
            .post("/api/routes", json!({ "network": "192.168.50.0/24", "routing_peer": login.peer_id, "groups": ["all"] }))
            .await;
        assert_eq!(s, 201, "{r}");

        let good = json!({ "name": "plc", "protocol": "tcp", "public_port": free[0],
            "target_ip": "192.168.50.10", "target_port": 502, "allowed_sources": ["198.51.100.0/24"] });
        let (s, plc) = srv.post("/api/services", good.clone()).await;
        assert_eq!(s, 201, "{plc}");
        assert_eq!(plc["public_address"], format!("127.0.0.1:{}", free[0]));
        assert_eq!(plc["idle_timeout_secs"], 3600);
        assert_eq!(plc["proxy_protocol"], false);
        assert_eq!(plc["ephemeral"], false);
        assert_eq!(plc["stats"]["active"], 0);
        assert!(plc["stats"].get("last_error").is_none(), "no null fields: {plc}");

        let with = |k: &str, v: Value| {
            let mut b = good.clone();
            b["name"] = json!("other");
            b["public_port"] = json!(free[1]);
            b[k] = v;
            b
        };
        let post = |b: Value| srv.post("/api/services", b);
        let mut dup = good.clone();
        dup["public_port"] = json!(free[1]);
        assert_field(post(dup).await, "name", "already exists");
        assert_field(post(with("public_port", json!(free[0]))).await, "public_port", "already used by service \"plc\"");
        assert_field(post(with("public_port", json!(busy))).await, "public_port", "cannot be opened");
        assert_field(post(with("public_port", json!(80))).await, "public_port", "outside the ports this server may publish");
        assert_field(post(with("public_port", json!(70000))).await, "public_port", "not a port");
        assert_field(post(with("protocol", json!("sctp"))).await, "protocol", "tcp or udp");
        assert_field(post(with("target_ip", json!("10.9.9.9"))).await, "target_ip", "add a route for its network");
        assert_field(post(with("target_ip", json!("100.64.200.200"))).await, "target_ip", "no peer has the overlay address");
        assert_field(post(with("target_ip", json!("plc.local"))).await, "target_ip", "not an IP address");
        assert_field(post(with("target_port", json!(0))).await, "target_port", "not a port");
        assert_field(post(with("allowed_sources", json!([]))).await, "allowed_sources", "0.0.0.0/0 opens the service to everyone");
        assert_field(post(with("allowed_sources", json!(["198.51.100.0/33"]))).await, "allowed_sources", "CIDR");
        assert_field(post(with("allowed_sources", json!(["198.51.100.7/24"]))).await, "allowed_sources", "did you mean 198.51.100.0/24");
        assert_field(post(with("idle_timeout_secs", json!(1))).await, "idle_timeout_secs", "not within");
        let mut udp = with("protocol", json!("udp"));
        udp["proxy_protocol"] = json!(true);
        assert_field(post(udp.clone()).await, "proxy_protocol", "TCP services only");
        assert_eq!(srv.get("/api/services").await.as_array().map(Vec::len), Some(1), "nothing written on error");

        // The same port number for UDP is another service; a peer's overlay address is a target.
        udp["proxy_protocol"] = json!(false);
        udp["public_port"] = json!(free[0]);
        let (s, u) = post(udp).await;
        assert_eq!(s, 201, "{u}");
        assert_eq!(u["idle_timeout_secs"], 60, "UDP flows idle out sooner");
        let mut peer = with("target_ip", json!(nas_ip));
        peer["name"] = json!("nas-web");
        peer["public_port"] = json!(free[1]);
        let (s, p) = post(peer.clone()).await;
        assert_eq!(s, 201, "{p}");

        // Update, read back, delete; audited.
        let pid = id(&p);
        peer["allowed_sources"] = json!(["0.0.0.0/0", "::/0", "203.0.113.7"]);
        peer["enabled"] = json!(false);
        let (s, upd) = srv.put(&format!("/api/services/{pid}"), peer.clone()).await;
        assert_eq!(s, 200, "{upd}");
        assert_eq!(upd["allowed_sources"], json!(["0.0.0.0/0", "::/0", "203.0.113.7/32"]), "a bare address is one host");
        assert_eq!(upd["reached_via"], "disabled");
        assert_err(srv.put("/api/services/nope", peer).await, 404, "not found");
        assert_eq!(srv.delete(&format!("/api/services/{pid}")).await, 204);
        assert_err(srv.api(Method::GET, &format!("/api/services/{pid}"), None).await, 404, "not found");
        let audit = srv.get("/api/audit?action=service.").await;
        let actions: Vec<&str> = audit.as_array().expect("events").iter().filter_map(|e| e["action"].as_str()).collect();
        assert!(actions.contains(&"service.put") && actions.contains(&"service.delete"), "{actions:?}");
        let doc = srv.get("/api/openapi.json").await;
        assert!(doc["paths"]["/api/services/{id}"].is_object(), "documented");
        drop(held);
        srv.stop().await;
    })
    .await;
}
