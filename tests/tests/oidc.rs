//! OIDC single sign-on against a real (test) identity provider on a loopback port: tokens are
//! checked for issuer, audience, signature, expiry and the admin claim; accepted tokens map to a
//! linked admin account; the console signs in through the provider (authorization code + PKCE).

use serde_json::{json, Value};
use std::time::Duration;
use tern_tests::idp::{make_key, now, with_forged_signature, Idp};
use tern_tests::webdriver::{screenshot_dir, Browser};
use tern_tests::*;

const AUDIENCE: &str = "tern-console";

async fn server_with_idp(db_url: &str, idp: &Idp) -> TestServer {
    let mut opts = fast_options();
    opts.oidc = Some(idp.config(AUDIENCE, None));
    TestServer::start_with(db_url, opts).await.expect("server")
}

async fn me(server: &TestServer, token: &str) -> (u16, Value) {
    let r = server
        .http
        .get(server.url("/api/auth/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_tokens_are_checked_for_issuer_audience_signature_expiry_and_claim() {
    let idp = Idp::start(AUDIENCE).await.expect("idp");
    let idp = &idp;
    on_each_backend(|_backend, url| async move {
        let server = server_with_idp(&url, idp).await;
        let admin = |sub: &str| {
            idp.claims(
                sub,
                json!({"email": format!("{sub}@example.com"), "groups": ["staff", "tern-admins"]}),
            )
        };

        // Accepted: RS256 and ES256 keys from the JWKS, found through discovery.
        let good = idp.rsa.sign(&admin("anna"));
        let (status, user) = me(&server, &good).await;
        assert_eq!(status, 200, "valid RS256 token: {user}");
        assert_eq!(user["username"], "anna@example.com");
        assert_eq!(user["source"], "oidc");
        let (status, again) = me(&server, &idp.ec.sign(&admin("anna"))).await;
        assert_eq!(status, 200, "valid ES256 token: {again}");
        assert_eq!(again["id"], user["id"], "same subject, same account");

        // Refused, each with a reason in words.
        let other_key = make_key("rsa", "rsa-1").expect("unpublished key with a known kid");
        let mut wrong_iss = admin("anna");
        wrong_iss["iss"] = json!("https://evil.example.com");
        let mut wrong_aud = admin("anna");
        wrong_aud["aud"] = json!("some-other-app");
        let mut expired = admin("anna");
        expired["exp"] = json!(now() - 3600);
        expired["iat"] = json!(now() - 7200);
        // Security review, round two, item 17: 30 s past its expiry is past (the leeway was 60 s).
        let mut just_expired = admin("anna");
        just_expired["exp"] = json!(now() - 30);
        just_expired["iat"] = json!(now() - 3630);
        let mut future = admin("anna");
        future["nbf"] = json!(now() + 3600);
        let mut no_exp = admin("anna");
        no_exp.as_object_mut().expect("object").remove("exp");
        let hs256 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &admin("anna"),
            &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
        )
        .expect("hs256");
        let cases = [
            ("wrong issuer", idp.rsa.sign(&wrong_iss), "issuer"),
            ("wrong audience", idp.rsa.sign(&wrong_aud), "audience"),
            ("expired", idp.rsa.sign(&expired), "expired"),
            ("expired 30 s ago", idp.rsa.sign(&just_expired), "expired"),
            ("not yet valid", idp.rsa.sign(&future), "not valid yet"),
            ("no expiry", idp.rsa.sign(&no_exp), "invalid"),
            (
                "signed by another key",
                other_key.sign(&admin("anna")),
                "signature",
            ),
            (
                "tampered signature",
                with_forged_signature(&good).expect("forge"),
                "signature",
            ),
            ("HS256 (ours, not the provider's)", hs256, "session token"),
            ("garbage", "a.b.c".to_string(), ""),
        ];
        for (what, token, words) in cases {
            let (status, body) = me(&server, &token).await;
            assert_eq!(status, 401, "{what} must be refused: {body}");
            let msg = body["message"].as_str().unwrap_or("");
            assert!(
                msg.contains(words),
                "{what}: message {msg:?} should say {words:?}"
            );
            let r = server
                .http
                .post(server.url("/api/auth/oidc"))
                .json(&json!({ "token": token }))
                .send()
                .await
                .expect("oidc login");
            assert!(
                r.status() == 401 || r.status() == 422,
                "{what}: exchange refused, got {}",
                r.status()
            );
        }

        // A valid token without the admin claim: signed in as a user, who sees only their own
        // devices.
        let staff = idp.rsa.sign(&idp.claims(
            "bob",
            json!({"email": "bob@example.com", "groups": ["staff"]}),
        ));
        let (status, body) = me(&server, &staff).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["role"], "user", "{body}");
        assert_eq!(user["role"], "admin", "anna has the admin claim");
        let r = server
            .http
            .get(server.url("/api/setup-keys"))
            .bearer_auth(&staff)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 403);

        // Exchange for a console session; sign-out ends it.
        let r = server
            .http
            .post(server.url("/api/auth/oidc"))
            .json(&json!({ "token": good }))
            .send()
            .await
            .expect("exchange");
        assert_eq!(r.status(), 200);
        let session: Value = r.json().await.expect("json");
        let st = session["token"]
            .as_str()
            .expect("session token")
            .to_string();
        assert_eq!(me(&server, &st).await.0, 200);
        // The session ends when the provider's token does (10 minutes here), not after the
        // server's 12-hour session lifetime (security issue item 6).
        let ends = session["expires_at"].as_i64().expect("expires_at");
        assert!(ends <= now() + 600 && ends >= now() + 590, "{session}");
        let out = server
            .http
            .post(server.url("/api/auth/logout"))
            .bearer_auth(&st)
            .send()
            .await
            .expect("logout");
        assert_eq!(out.status(), 204);
        assert_eq!(me(&server, &st).await.0, 401, "session ended");

        // The SSO account is listed, has no password, and can be disabled like any admin.
        let users = server.get("/api/users").await;
        let sso = users
            .as_array()
            .expect("users")
            .iter()
            .find(|u| u["username"] == "anna@example.com")
            .expect("SSO user listed")
            .clone();
        let id = sso["id"].as_str().expect("id");
        let (status, body) = server
            .put(
                &format!("/api/users/{id}"),
                json!({"password": "a-long-password-1"}),
            )
            .await;
        assert_eq!(status, 422, "SSO accounts have no password: {body}");
        let (status, _) = server
            .put(&format!("/api/users/{id}"), json!({"disabled": true}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            me(&server, &good).await.0,
            403,
            "disabled SSO admin refused"
        );
        let login = server
            .http
            .post(server.url("/api/auth/login"))
            .json(&json!({"username": "anna@example.com", "password": ""}))
            .send()
            .await
            .expect("login");
        assert_eq!(login.status(), 401, "no password sign-in for SSO accounts");

        // Everything above is in the audit log.
        let events = server.get("/api/audit?action=auth.").await;
        let actions: Vec<&str> = events
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["action"].as_str())
            .collect();
        assert!(
            actions.contains(&"auth.login") && actions.contains(&"auth.logout"),
            "{actions:?}"
        );

        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_sso_refuses_provider_tokens() {
    let idp = Idp::start(AUDIENCE).await.expect("idp");
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = TestServer::start(&db.url).await.expect("server");
    let token = idp
        .rsa
        .sign(&idp.claims("anna", json!({"groups": ["tern-admins"]})));
    assert_eq!(me(&server, &token).await.0, 401);
    let cfg = server.get("/api/auth/config").await;
    assert_eq!(cfg["oidc"], Value::Null, "no SSO button");
    server.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_signs_in_through_the_identity_provider() {
    if !tern_tests::webdriver::available() {
        return;
    }
    let idp = Idp::start(AUDIENCE).await.expect("idp");
    let db = TestDb::new(Backend::Sqlite).await.expect("db");
    let server = server_with_idp(&db.url, &idp).await;
    let b = Browser::start(1280, 900).await.expect("browser");
    let t = Duration::from_secs(10);

    // A user without the admin claim signs in as a user: their own devices, nothing else.
    idp.set_user(json!({"sub": "bob", "email": "bob@example.com", "groups": ["staff"]}));
    b.goto(&format!("{}/", server.base)).await.expect("open");
    let sso = b.wait("#sso", t).await.expect("SSO button");
    b.click(&sso).await.expect("click");
    b.wait_text(".page[data-page=devices] h1", "My devices", t)
        .await
        .expect("a user lands on their devices");
    b.wait_text(".page[data-page=devices]", "You have no devices yet", t)
        .await
        .expect("none yet");
    b.goto(&format!("{}/#/setup-keys", server.base))
        .await
        .expect("open");
    b.wait_text(".page[data-page=devices] h1", "My devices", t)
        .await
        .expect("admin pages are not shown to a user");
    let out = b.wait("#signout", t).await.expect("sign out");
    b.click(&out).await.expect("click");

    idp.set_user(json!({"sub": "anna", "email": "anna@example.com", "groups": ["tern-admins"]}));
    let sso = b.wait("#sso", t).await.expect("SSO button");
    b.click(&sso).await.expect("click");
    b.wait_text(".page[data-page=overview] h1", "Overview", t)
        .await
        .expect("signed in through the provider");
    b.wait_text("#who", "anna@example.com", t)
        .await
        .expect("named by the email claim");
    let url = b.current_url().await.expect("url");
    assert!(
        !url.contains("code="),
        "the code is removed from the address bar: {url}"
    );
    b.screenshot(&screenshot_dir().join("14-signed-in-with-sso.png"))
        .await
        .expect("shot");
    let out = b.wait("#signout", t).await.expect("sign out");
    b.click(&out).await.expect("click");
    b.wait_text("#signin-form", "signed out", t)
        .await
        .expect("signed out");

    drop(b);
    server.stop().await;
    db.cleanup().await;
}
