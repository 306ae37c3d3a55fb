//! Employees and their devices, against a real server on each backend: roles per REST route (a
//! table checked against the OpenAPI document, so no route is forgotten), device sign-in codes
//! approved by a signed-in person, device ownership, disabling and deleting users, device login
//! expiry, owner-only rules, and groups from the identity provider's claim.

use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tern_tests::idp::Idp;
use tern_tests::*;

const O: u8 = 1;
const A: u8 = 2;
const R: u8 = 4; // auditor
const U: u8 = 8;
const ALL: u8 = O | A | R | U;
const READ: u8 = O | A | R;
const WRITE: u8 = O | A;

/// Who may call each route (the handlers may still narrow it to the caller's own rows). Written
/// out here, apart from the server's table, as the contract a reviewer checks.
const EXPECTED: &[(&str, &str, u8)] = &[
    ("GET", "/api/auth/me", ALL),
    ("POST", "/api/auth/logout", ALL),
    ("GET", "/api/users", READ),
    ("POST", "/api/users", WRITE),
    ("GET", "/api/users/{id}", READ),
    ("PUT", "/api/users/{id}", ALL),
    ("DELETE", "/api/users/{id}", WRITE),
    ("GET", "/api/tokens", ALL),
    ("POST", "/api/tokens", ALL),
    ("DELETE", "/api/tokens/{id}", ALL),
    ("GET", "/api/groups", READ),
    ("POST", "/api/groups", WRITE),
    ("GET", "/api/groups/{id}", READ),
    ("PUT", "/api/groups/{id}", WRITE),
    ("DELETE", "/api/groups/{id}", WRITE),
    ("PUT", "/api/groups/{id}/members", WRITE),
    ("GET", "/api/setup-keys", READ),
    ("POST", "/api/setup-keys", WRITE),
    ("GET", "/api/setup-keys/{id}", READ),
    ("PUT", "/api/setup-keys/{id}", WRITE),
    ("DELETE", "/api/setup-keys/{id}", WRITE),
    ("GET", "/api/peers", ALL),
    ("GET", "/api/status", READ),
    ("GET", "/api/peers/{id}", ALL),
    ("PUT", "/api/peers/{id}", O | A | U),
    ("DELETE", "/api/peers/{id}", O | A | U),
    ("GET", "/api/policies", READ),
    ("POST", "/api/policies", WRITE),
    ("GET", "/api/policies/{id}", READ),
    ("PUT", "/api/policies/{id}", WRITE),
    ("DELETE", "/api/policies/{id}", WRITE),
    ("GET", "/api/routes", READ),
    ("POST", "/api/routes", WRITE),
    ("GET", "/api/routes/{id}", READ),
    ("PUT", "/api/routes/{id}", WRITE),
    ("DELETE", "/api/routes/{id}", WRITE),
    ("GET", "/api/services", READ),
    ("POST", "/api/services", WRITE),
    ("GET", "/api/services/{id}", READ),
    ("PUT", "/api/services/{id}", WRITE),
    ("DELETE", "/api/services/{id}", WRITE),
    ("GET", "/api/settings", READ),
    ("PUT", "/api/settings", WRITE),
    ("GET", "/api/audit", READ),
    ("GET", "/api/nameservers", READ),
    ("POST", "/api/nameservers", WRITE),
    ("GET", "/api/nameservers/{id}", READ),
    ("PUT", "/api/nameservers/{id}", WRITE),
    ("DELETE", "/api/nameservers/{id}", WRITE),
    ("POST", "/api/wireguard-devices", WRITE),
    ("POST", "/api/wireguard-devices/{id}/config", WRITE),
    ("GET", "/api/device/{code}", ALL),
    ("POST", "/api/device/{code}/approve", O | A | U),
    ("POST", "/api/device/{code}/deny", O | A | U),
];

/// Routes anyone may call (no token).
const PUBLIC: &[&str] = &[
    "/healthz",
    "/api/openapi.json",
    "/api/auth/login",
    "/api/auth/oidc",
    "/api/auth/config",
];

/// Asserts a REST answer's status and that its message says `words`.
fn answer(status: u16, body: &Value, want: u16, words: &str) {
    assert_eq!(status, want, "{body}");
    let msg = body["message"].as_str().unwrap_or("");
    assert!(msg.contains(words), "{msg:?} should say {words:?}: {body}");
}

/// Creates a local account with `role` and returns (id, session token).
async fn account(server: &TestServer, name: &str, role: &str) -> (String, String) {
    let password = format!("{name}-password-1");
    let (s, u) = server
        .post(
            "/api/users",
            json!({"username": name, "password": password, "role": role}),
        )
        .await;
    assert_eq!(s, 201, "create {role} {name}: {u}");
    assert_eq!(u["role"], role);
    let token = admin_login(&server.http, &server.base, name, &password)
        .await
        .expect("sign in");
    (u["id"].as_str().expect("id").to_string(), token)
}

/// A personal access token of the account signed in with `session`.
async fn pat(server: &TestServer, session: &str) -> String {
    let (s, v) = server
        .api_as(
            session,
            Method::POST,
            "/api/tokens",
            Some(json!({"name": "roles-test"})),
        )
        .await;
    assert_eq!(s, 201, "token: {v}");
    v["token"].as_str().expect("token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_as_the_table_says() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");

    // Every operation of the OpenAPI document is in the table (a new route needs a decision).
    let doc: Value = server.get("/api/openapi.json").await;
    let mut documented = vec![];
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for m in ops.as_object().expect("ops").keys() {
            documented.push((m.to_uppercase(), path.clone()));
        }
    }
    for (m, p) in &documented {
        let known =
            EXPECTED.iter().any(|(em, ep, _)| em == m && ep == p) || PUBLIC.contains(&p.as_str());
        assert!(known, "{m} {p} is not in the role table");
    }
    for (m, p, _) in EXPECTED {
        assert!(
            documented.iter().any(|(dm, dp)| dm == m && dp == p),
            "{m} {p} is in the table but not in the OpenAPI document"
        );
    }

    let me = server.get("/api/auth/me").await;
    assert_eq!(me["role"], "owner", "the first account is the owner");
    let owner = pat(&server, &server.token).await;
    let mut callers = vec![(
        "owner",
        O,
        owner,
        me["id"].as_str().expect("id").to_string(),
    )];
    for (name, role, bit) in [
        ("ada", "admin", A),
        ("rex", "auditor", R),
        ("uma", "user", U),
    ] {
        let (id, session) = account(&server, name, role).await;
        callers.push((role, bit, pat(&server, &session).await, id));
    }

    for (method, template, allowed) in EXPECTED {
        for (role, bit, token, own_id) in &callers {
            // Ids that exist for the caller where that matters, else ones that do not (a 404,
            // or a 422 for a body, is "allowed": the role check passed).
            let path = template
                .replace(
                    "{id}",
                    if template.starts_with("/api/users/") && *method != "DELETE" {
                        own_id
                    } else {
                        "0123456789abcdef"
                    },
                )
                .replace("{code}", "BCDF-GHJK");
            let body = (*method != "GET" && *method != "DELETE").then(|| json!({}));
            let m: Method = method.parse().expect("method");
            let (status, answer) = server.api_as(token, m, &path, body).await;
            if allowed & bit != 0 {
                assert!(
                    status != 403 && status != 401,
                    "{role} must be allowed {method} {template}: {status} {answer}"
                );
            } else {
                assert_eq!(
                    status, 403,
                    "{role} must be refused {method} {template}: {answer}"
                );
                let msg = answer["message"].as_str().unwrap_or("");
                assert!(
                    msg.contains("auditor")
                        || msg.contains("users see")
                        || msg.contains("ask an admin"),
                    "{role} {method} {template}: the refusal says why: {msg:?}"
                );
            }
        }
    }
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_owners_change_roles_and_the_last_owner_stays() {
    on_each_backend(|_b, url| async move {
        let server = TestServer::start(&url).await.expect("server");
        let owner_id = server.get("/api/auth/me").await["id"]
            .as_str()
            .expect("id")
            .to_string();
        let (ada, ada_s) = account(&server, "ada", "admin").await;
        let (bob, _) = account(&server, "bob", "admin").await;
        let (uma, uma_s) = account(&server, "uma", "user").await;

        // An admin changes no roles, no other admin's or owner's password, and creates no owner.
        for (path, body, words) in [
            (
                format!("/api/users/{uma}"),
                json!({"role": "admin"}),
                "only an owner can change roles",
            ),
            (
                format!("/api/users/{bob}"),
                json!({"password": "another-password-1"}),
                "only an owner",
            ),
            (
                format!("/api/users/{owner_id}"),
                json!({"disabled": true}),
                "only an owner",
            ),
        ] {
            let (s, v) = server.api_as(&ada_s, Method::PUT, &path, Some(body)).await;
            assert_eq!(s, 403, "{v}");
            assert!(v["message"].as_str().unwrap_or("").contains(words), "{v}");
        }
        let (s, v) = server
            .api_as(
                &ada_s,
                Method::POST,
                "/api/users",
                Some(json!({"username": "eve", "password": "eve-password-12", "role": "owner"})),
            )
            .await;
        assert_eq!(s, 403, "{v}");
        let (s, v) = server
            .api_as(&ada_s, Method::DELETE, &format!("/api/users/{bob}"), None)
            .await;
        assert_eq!(s, 403, "an admin deletes no other admin: {v}");
        // But an admin manages users, and a user changes only their own password.
        let (s, v) = server
            .api_as(
                &ada_s,
                Method::PUT,
                &format!("/api/users/{uma}"),
                Some(json!({"password": "uma-password-2"})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let uma_s = admin_login(&server.http, &server.base, "uma", "uma-password-2")
            .await
            .unwrap_or(uma_s);
        let (s, v) = server
            .api_as(
                &uma_s,
                Method::PUT,
                &format!("/api/users/{ada}"),
                Some(json!({"password": "x-password-123"})),
            )
            .await;
        assert_eq!(s, 403, "{v}");
        let (s, v) = server
            .api_as(
                &uma_s,
                Method::PUT,
                &format!("/api/users/{uma}"),
                Some(json!({"role": "admin"})),
            )
            .await;
        assert_eq!(s, 403, "no self-promotion: {v}");

        // The owner promotes; the last owner can be neither demoted nor deleted nor disabled.
        let (s, v) = server
            .put(&format!("/api/users/{ada}"), json!({"role": "auditor"}))
            .await;
        assert_eq!((s, v["role"].as_str()), (200, Some("auditor")), "{v}");
        for (m, body) in [
            (Method::PUT, Some(json!({"role": "admin"}))),
            (Method::PUT, Some(json!({"disabled": true}))),
            (Method::DELETE, None),
        ] {
            let (s, v) = server.api(m, &format!("/api/users/{owner_id}"), body).await;
            answer(s, &v, 409, "last enabled owner");
        }
        let (s, _) = server
            .put(&format!("/api/users/{bob}"), json!({"role": "owner"}))
            .await;
        assert_eq!(s, 200);
        let (s, v) = server
            .put(&format!("/api/users/{owner_id}"), json!({"role": "admin"}))
            .await;
        assert_eq!(s, 200, "with a second owner the first may step down: {v}");

        let events = server.get("/api/audit?action=user.role").await;
        let n = events.as_array().map_or(0, |e| e.len());
        assert!(n >= 3, "role changes are audited: {events}");
        server.stop().await;
    })
    .await;
}

/// Waits for the next map on `s` that satisfies `ok`, within `within`.
async fn map_where(
    s: &mut tonic::Streaming<tern_proto::management::SyncResponse>,
    within: Duration,
    ok: impl Fn(&tern_proto::management::NetworkMap) -> bool,
) -> tern_proto::management::NetworkMap {
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let m = next_map(s, left).await.expect("a map in time");
        if ok(&m) {
            return m;
        }
    }
}

fn has_peer(m: &tern_proto::management::NetworkMap, name: &str) -> bool {
    m.remote_peers.iter().any(|p| p.name == name)
}

/// A device joins by its user's sign-in: code, approval, login.
async fn sign_in_device(
    server: &TestServer,
    approver: &str,
    device: &TestAgent,
) -> tern_proto::management::LoginResponse {
    let c = device.start_device_login().await.expect("code");
    let (s, v) = server
        .api_as(
            approver,
            Method::POST,
            &format!("/api/device/{}/approve", c.user_code),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 200, "approve: {v}");
    device
        .login_with_code(&c.user_code)
        .await
        .expect("login with the approved code")
}

/// A laptop added by sign-in whose owner is in no group lands in the groups Settings names for
/// such devices, so the policies for them apply at once (it used to see no peer at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_added_by_sign_in_join_the_groups_settings_name() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let (_erin, erin_s) = account(&server, "erin", "user").await;
    let group = |name: &'static str| {
        let server = &server;
        async move {
            let (s, g) = server.post("/api/groups", json!({ "name": name })).await;
            assert_eq!(s, 201, "{g}");
            g["id"].as_str().expect("id").to_string()
        }
    };
    let (laptops, factory) = (group("laptops").await, group("factory").await);
    // Only "laptops -> factory": without a group, a new laptop would see nobody.
    for p in server
        .get("/api/policies")
        .await
        .as_array()
        .expect("policies")
    {
        let (s, _) = server
            .api(
                Method::DELETE,
                &format!("/api/policies/{}", p["id"].as_str().expect("id")),
                None,
            )
            .await;
        assert_eq!(s, 204);
    }
    let (s, p) = server
        .post(
            "/api/policies",
            json!({"name": "laptops-to-factory", "protocol": "tcp", "ports": ["502"], "bidirectional": false,
                   "sources": [laptops], "destinations": [factory]}),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    // Before the setting: a laptop in no group sees nobody, and its page says so.
    let early = TestAgent::new(&server, "erin-old-laptop").await;
    let e = sign_in_device(&server, &erin_s, &early).await;
    let _early_sync = early.sync(&e.peer_token).await.expect("sync");
    let mut page = Value::Null;
    for _ in 0..50 {
        page = server.get(&format!("/api/peers/{}", e.peer_id)).await;
        if page["alone"].is_boolean() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(page["alone"], true, "{page}");
    let (s, mine) = server
        .api_as(&erin_s, Method::GET, "/api/peers", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(mine[0]["alone"], true, "her own list says it too: {mine}");
    let mut settings = server.get("/api/settings").await;
    let obj = settings.as_object_mut().expect("settings");
    obj.remove("network_serial");
    obj.insert("sign_in_groups".into(), json!(["all"]));
    let (s, e) = server.put("/api/settings", settings.clone()).await;
    assert_eq!(
        (s, e["field"].as_str()),
        (422, Some("sign_in_groups")),
        "{e}"
    );
    settings["sign_in_groups"] = json!([laptops]);
    let (s, saved) = server.put("/api/settings", settings).await;
    assert_eq!(s, 200, "{saved}");
    assert_eq!(saved["sign_in_groups"], json!([laptops]));

    let gw = TestAgent::new(&server, "factory-gw").await;
    let gw_login = gw.login(Some(&server.default_setup_key)).await.expect("gw");
    let (s, _) = server
        .put(
            &format!("/api/peers/{}", gw_login.peer_id),
            json!({ "groups": [factory] }),
        )
        .await;
    assert_eq!(s, 200);
    let laptop = TestAgent::new(&server, "erin-laptop").await;
    let l = sign_in_device(&server, &erin_s, &laptop).await;
    let p = server.get(&format!("/api/peers/{}", l.peer_id)).await;
    assert!(
        p["groups"]
            .as_array()
            .expect("groups")
            .contains(&json!(laptops)),
        "{p}"
    );
    let mut sync = laptop.sync(&l.peer_token).await.expect("sync");
    let m = next_map(&mut sync, Duration::from_secs(5))
        .await
        .expect("map");
    assert!(
        has_peer(&m, "factory-gw"),
        "the laptop reaches the factory: {m:?}"
    );
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_join_by_their_users_sign_in_and_leave_with_them() {
    on_each_backend(|_b, url| async move {
        let server = TestServer::start(&url).await.expect("server");
        let (erin, erin_s) = account(&server, "erin", "user").await;
        let (_frank, frank_s) = account(&server, "frank", "user").await;

        // An appliance joined with a setup key watches its map.
        let gw = TestAgent::new(&server, "factory-gw").await;
        let gw_login = gw.login(Some(&server.default_setup_key)).await.expect("gw");
        let mut gw_sync = gw.sync(&gw_login.peer_token).await.expect("sync");
        next_map(&mut gw_sync, Duration::from_secs(5))
            .await
            .expect("first map");

        // The laptop asks for a code; until someone approves it, it waits.
        let laptop = TestAgent::new(&server, "erin-laptop").await;
        let code = laptop.start_device_login().await.expect("code");
        assert_eq!(code.user_code.len(), 9, "{:?}", code.user_code);
        assert!(
            code.verification_url_complete.is_empty()
                || code
                    .verification_url_complete
                    .ends_with(&format!("/device?code={}", code.user_code)),
            "{code:?}"
        );
        let e = laptop
            .login_with_code(&code.user_code)
            .await
            .expect_err("pending");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("approve"), "{e:?}");
        // Another key cannot use that code; a wrong code is refused in words.
        let thief = TestAgent::new(&server, "thief").await;
        let e = thief
            .login_with_code(&code.user_code)
            .await
            .expect_err("not its code");
        assert!(e.message().contains("no sign-in is waiting"), "{e:?}");
        let e = laptop
            .login_with_code("BCDF-GHJK")
            .await
            .expect_err("wrong code");
        assert!(e.message().contains("run tern up again"), "{e:?}");

        // The approval page shows the device; typed in lower case without the dash it still works.
        let typed = code.user_code.replace('-', "").to_lowercase();
        let (s, d) = server
            .api_as(&erin_s, Method::GET, &format!("/api/device/{typed}"), None)
            .await;
        assert_eq!(s, 200, "{d}");
        assert_eq!(
            (
                d["hostname"].as_str(),
                d["os"].as_str(),
                d["state"].as_str()
            ),
            (Some("erin-laptop"), Some("linux"), Some("pending")),
            "{d}"
        );
        let (s, d) = server
            .api_as(&erin_s, Method::GET, "/api/device/xx", None)
            .await;
        assert_eq!(s, 422, "a malformed code: {d}");
        let (s, _) = server
            .api_as(
                &erin_s,
                Method::POST,
                &format!("/api/device/{}/approve", code.user_code),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200);
        let (s, d) = server
            .api_as(
                &frank_s,
                Method::POST,
                &format!("/api/device/{}/approve", code.user_code),
                Some(json!({})),
            )
            .await;
        answer(s, &d, 409, "already approved by erin");
        let l = laptop
            .login_with_code(&code.user_code)
            .await
            .expect("approved");
        let laptop_id = l.peer_id.clone();
        assert!(
            laptop.login_with_code(&code.user_code).await.is_err(),
            "a code is used once"
        );
        // Later logins need only the key.
        laptop.login(None).await.expect("key login");
        map_where(&mut gw_sync, Duration::from_secs(3), |m| {
            has_peer(m, "erin-laptop")
        })
        .await;

        // Her second device likewise.
        let phone = TestAgent::new(&server, "erin-desktop").await;
        sign_in_device(&server, &erin_s, &phone).await;

        // The owner shows in the API; erin sees her two devices and nothing else.
        let p = server.get(&format!("/api/peers/{laptop_id}")).await;
        assert_eq!(
            (p["owner"].as_str(), p["user_id"].as_str()),
            (Some("erin"), Some(erin.as_str())),
            "{p}"
        );
        let (s, mine) = server
            .api_as(&erin_s, Method::GET, "/api/peers", None)
            .await;
        assert_eq!(s, 200);
        let names: Vec<&str> = mine
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(names, vec!["erin-desktop", "erin-laptop"], "{mine}");
        let gw_id = gw_login.peer_id.clone();
        let (s, v) = server
            .api_as(&erin_s, Method::GET, &format!("/api/peers/{gw_id}"), None)
            .await;
        assert_eq!(s, 403, "{v}");
        let (s, v) = server
            .api_as(
                &frank_s,
                Method::DELETE,
                &format!("/api/peers/{laptop_id}"),
                None,
            )
            .await;
        assert_eq!(s, 403, "frank cannot remove erin's laptop: {v}");
        let (s, v) = server
            .api_as(
                &erin_s,
                Method::PUT,
                &format!("/api/peers/{laptop_id}"),
                Some(json!({"name": "erins-laptop"})),
            )
            .await;
        assert_eq!((s, v["name"].as_str()), (200, Some("erins-laptop")), "{v}");
        let (s, v) = server
            .api_as(
                &erin_s,
                Method::PUT,
                &format!("/api/peers/{laptop_id}"),
                Some(json!({"groups": ["all"]})),
            )
            .await;
        assert_eq!(s, 403, "groups are an admin's: {v}");
        for path in ["/api/setup-keys", "/api/policies", "/api/users"] {
            let (s, _) = server.api_as(&erin_s, Method::GET, path, None).await;
            assert_eq!(s, 403, "{path}");
        }

        // Erin's laptop asking again (a new code for a registered device): frank can neither
        // approve nor deny it (security review, round two, item 14: before, anyone could deny).
        let again = laptop.start_device_login().await.expect("code");
        for verb in ["approve", "deny"] {
            let (s, d) = server
                .api_as(
                    &frank_s,
                    Method::POST,
                    &format!("/api/device/{}/{verb}", again.user_code),
                    Some(json!({})),
                )
                .await;
            answer(
                s,
                &d,
                403,
                &format!("only its owner or an admin can {verb}"),
            );
        }
        // Guessing codes is limited per account: 20 unknown ones in ten minutes, then 429
        // (before: 2,000 guesses in 0.2 s); others are not affected.
        let (_gus, gus_s) = account(&server, "gus", "user").await;
        let mut statuses = vec![];
        for i in 0..25u32 {
            let guess: String = (0..8)
                .map(|k| b"BCDFGHJKLMNPQRSTVWXZ"[((i * 7 + k * 3) % 20) as usize] as char)
                .collect();
            let (s, v) = server
                .api_as(&gus_s, Method::GET, &format!("/api/device/{guess}"), None)
                .await;
            statuses.push(s);
            if s == 429 {
                answer(s, &v, 429, "too many codes that match no waiting sign-in");
                break;
            }
        }
        assert_eq!(statuses.len(), 21, "{statuses:?}");
        assert!(statuses[..20].iter().all(|s| *s == 404), "{statuses:?}");
        let (s, d) = server
            .api_as(
                &erin_s,
                Method::GET,
                &format!("/api/device/{}", again.user_code),
                None,
            )
            .await;
        assert_eq!(s, 200, "erin still looks codes up: {d}");

        // Denied: the device is told so.
        let stranger = TestAgent::new(&server, "unknown-box").await;
        let c = stranger.start_device_login().await.expect("code");
        let (s, _) = server
            .api_as(
                &erin_s,
                Method::POST,
                &format!("/api/device/{}/deny", c.user_code),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200);
        let e = stranger
            .login_with_code(&c.user_code)
            .await
            .expect_err("denied");
        assert!(e.message().contains("erin denied"), "{e:?}");

        // A code nobody approved in time: the page no longer knows it, the device is told.
        let late = TestAgent::new(&server, "late-box").await;
        let c = late.start_device_login().await.expect("code");
        sqlx::query("UPDATE device_logins SET expires_at = 1 WHERE user_code = $1")
            .bind(&c.user_code)
            .execute(server.state().store.pool())
            .await
            .expect("age the code");
        let (s, v) = server
            .api_as(
                &erin_s,
                Method::GET,
                &format!("/api/device/{}", c.user_code),
                None,
            )
            .await;
        answer(s, &v, 404, "may have expired");
        let e = late
            .login_with_code(&c.user_code)
            .await
            .expect_err("expired");
        assert!(
            e.message().contains("expired before anyone approved it"),
            "{e:?}"
        );

        // Approved by a user who is disabled before the device logs in: refused.
        let box2 = TestAgent::new(&server, "frank-box").await;
        let c = box2.start_device_login().await.expect("code");
        let (s, _) = server
            .api_as(
                &frank_s,
                Method::POST,
                &format!("/api/device/{}/approve", c.user_code),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200);
        let frank_id = server
            .get("/api/users")
            .await
            .as_array()
            .expect("users")
            .iter()
            .find(|u| u["username"] == "frank")
            .expect("frank")["id"]
            .as_str()
            .expect("id")
            .to_string();
        let (s, _) = server
            .put(&format!("/api/users/{frank_id}"), json!({"disabled": true}))
            .await;
        assert_eq!(s, 200);
        let e = box2
            .login_with_code(&c.user_code)
            .await
            .expect_err("approver disabled");
        assert!(
            e.message()
                .contains("frank approved this sign-in but the account is disabled"),
            "{e:?}"
        );

        // Disabling erin: her devices leave the appliance's map within 2 s and their stream ends.
        let l = laptop.login(None).await.expect("login");
        let mut laptop_sync = laptop.sync(&l.peer_token).await.expect("sync");
        next_map(&mut laptop_sync, Duration::from_secs(5))
            .await
            .expect("map");
        let t0 = Instant::now();
        let (s, _) = server
            .put(&format!("/api/users/{erin}"), json!({"disabled": true}))
            .await;
        assert_eq!(s, 200);
        map_where(&mut gw_sync, Duration::from_secs(2), |m| {
            !has_peer(m, "erins-laptop") && !has_peer(m, "erin-desktop")
        })
        .await;
        let gone = t0.elapsed();
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match laptop_sync.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(e) => return Some(e),
                }
            }
        })
        .await
        .expect("the laptop's stream ends within 2 s");
        let e = end.expect("ended with a reason");
        assert!(e.message().contains("erin is disabled"), "{e:?}");
        let e = laptop
            .login(None)
            .await
            .expect_err("refused while disabled");
        assert!(e.message().contains("is disabled"), "{e:?}");
        eprintln!("disabled user's devices left the map in {gone:?}");

        // Enabled again: back. Deleted: the devices go with her.
        let (s, _) = server
            .put(&format!("/api/users/{erin}"), json!({"disabled": false}))
            .await;
        assert_eq!(s, 200);
        laptop.login(None).await.expect("enabled again");
        assert_eq!(server.delete(&format!("/api/users/{erin}")).await, 204);
        let e = laptop.login(None).await.expect_err("deleted with its user");
        assert!(e.message().contains("not registered"), "{e:?}");
        let peers = server.get("/api/peers").await;
        assert_eq!(
            peers.as_array().map(|p| p.len()),
            Some(1),
            "only the appliance: {peers}"
        );

        // Codes cost nothing to ask for, so one address may keep only so many waiting.
        let mut refused = None;
        for i in 0..60 {
            let a = TestAgent::new(&server, &format!("flood-{i}")).await;
            if let Err(e) = a.start_device_login().await {
                refused = Some((i, e));
                break;
            }
        }
        let (n, e) = refused.expect("a flood of codes is cut off");
        assert!(
            n >= 40 && e.message().contains("already waiting for approval"),
            "{n}: {e:?}"
        );

        let events = server.get("/api/audit?action=device.").await;
        let actions: Vec<&str> = events
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["action"].as_str())
            .collect();
        assert!(
            actions.contains(&"device.approve") && actions.contains(&"device.deny"),
            "{actions:?}"
        );
        let events = server.get("/api/audit?action=peer.delete").await;
        assert!(
            events.to_string().contains("its user erin was deleted"),
            "{events}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_device_login_expires_and_a_new_sign_in_renews_it() {
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let (_id, ivy_s) = account(&server, "ivy", "user").await;
    let appliance = TestAgent::new(&server, "appliance").await;
    let a = appliance
        .login(Some(&server.default_setup_key))
        .await
        .expect("appliance");
    let mut a_sync = appliance.sync(&a.peer_token).await.expect("sync");
    let laptop = TestAgent::new(&server, "ivy-laptop").await;
    sign_in_device(&server, &ivy_s, &laptop).await;
    map_where(&mut a_sync, Duration::from_secs(3), |m| {
        has_peer(m, "ivy-laptop")
    })
    .await;
    let mut s = server.get("/api/settings").await;
    s["peer_login_expiry_secs"] = json!(1);
    s.as_object_mut()
        .expect("settings")
        .remove("network_serial");
    let (st, v) = server.put("/api/settings", s).await;
    assert_eq!(st, 200, "{v}");
    // Offline and expired: it leaves the appliance's map on its own (no other change needed).
    map_where(&mut a_sync, Duration::from_secs(4), |m| {
        !has_peer(m, "ivy-laptop")
    })
    .await;
    let e = laptop.login(None).await.expect_err("expired");
    assert!(
        e.message()
            .contains("device login expired: run tern up again to sign in"),
        "{e:?}"
    );
    appliance
        .login(None)
        .await
        .expect("setup-key appliances have no login expiry");
    // A new sign-in renews it (long enough for the rest of the test).
    let mut s = server.get("/api/settings").await;
    s["peer_login_expiry_secs"] = json!(3600);
    s.as_object_mut()
        .expect("settings")
        .remove("network_serial");
    let (st, v) = server.put("/api/settings", s).await;
    assert_eq!(st, 200, "{v}");
    sign_in_device(&server, &ivy_s, &laptop).await;
    laptop
        .login(None)
        .await
        .expect("renewed by the new sign-in");
    map_where(&mut a_sync, Duration::from_secs(3), |m| {
        has_peer(m, "ivy-laptop")
    })
    .await;
    let peers = server.get("/api/peers").await;
    assert_eq!(
        peers.as_array().map(|p| p.len()),
        Some(2),
        "renewed, not registered twice"
    );
    let events = server.get("/api/audit?action=peer.login_expired").await;
    assert!(events.to_string().contains("ivy-laptop"), "{events}");
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_groups_put_a_users_devices_in_tern_groups() {
    let idp = Idp::start("tern-console").await.expect("idp");
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let mut opts = fast_options();
    opts.oidc = Some(idp.config("tern-console", Some("groups")));
    let server = TestServer::start_with(&db.url, opts).await.expect("server");
    let (s, eng) = server
        .post("/api/groups", json!({"name": "engineering"}))
        .await;
    assert_eq!(s, 201, "{eng}");
    let eng_id = eng["id"].as_str().expect("id").to_string();

    let sign_in = |groups: Value| {
        let token = idp.rsa.sign(&idp.claims(
            "gina",
            json!({"email": "gina@example.com", "groups": groups}),
        ));
        let server = &server;
        async move {
            let r = server
                .http
                .post(server.url("/api/auth/oidc"))
                .json(&json!({"token": token}))
                .send()
                .await
                .expect("oidc");
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.expect("json");
            assert_eq!(v["user"]["role"], "user", "no admin claim: a user");
            v["token"].as_str().expect("session").to_string()
        }
    };
    let gina = sign_in(json!(["staff", "engineering"])).await;
    let laptop = TestAgent::new(&server, "gina-laptop").await;
    let l = sign_in_device(&server, &gina, &laptop).await;
    let p = server.get(&format!("/api/peers/{}", l.peer_id)).await;
    let groups: Vec<&str> = p["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g.as_str())
        .collect();
    assert!(
        groups.contains(&eng_id.as_str()),
        "in engineering from the claim: {p}"
    );
    // The claim no longer names it: the device leaves at her next sign-in.
    sign_in(json!(["staff"])).await;
    let p = server.get(&format!("/api/peers/{}", l.peer_id)).await;
    let groups: Vec<&str> = p["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g.as_str())
        .collect();
    assert_eq!(groups, vec!["all"], "{p}");
    let events = server.get("/api/audit?action=user.groups").await;
    assert!(events.to_string().contains("engineering"), "{events}");
    server.stop().await;
    db.cleanup().await;
}
