//! A small OpenID Connect provider for the SSO tests, on a loopback port: discovery document,
//! JWKS (an RSA and an EC key, made by `openssl genpkey`), an authorization endpoint that signs
//! in a preset user at once, and a token endpoint that checks PKCE and returns a signed ID token.
//! Tests also sign arbitrary tokens with its keys (or with keys it does not publish).

use anyhow::{anyhow, Context};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub jwk: Jwk,
}

/// Makes a key with the openssl command line tool (`rsa` or `ec`).
pub fn make_key(kind: &str, kid: &str) -> anyhow::Result<SigningKey> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("key.pem");
    let args: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    };
    let out = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl genpkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(&path)?;
    let (alg, key) = match kind {
        "rsa" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)?),
        _ => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)?),
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg)?;
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.key_algorithm = Some(match alg {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        _ => KeyAlgorithm::ES256,
    });
    Ok(SigningKey {
        kid: kid.to_string(),
        alg,
        key,
        jwk,
    })
}

impl SigningKey {
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).expect("sign token")
    }
}

#[derive(Default)]
struct Pending {
    nonce: String,
    challenge: String,
    redirect_uri: String,
}

struct IdpState {
    issuer: String,
    audience: String,
    published: Vec<Jwk>,
    signer: Arc<SigningKey>,
    /// Claims of the user the authorization endpoint signs in.
    user: Mutex<Value>,
    codes: Mutex<HashMap<String, Pending>>,
}

pub struct Idp {
    pub issuer: String,
    pub audience: String,
    pub rsa: Arc<SigningKey>,
    pub ec: Arc<SigningKey>,
    state: Arc<IdpState>,
    task: tokio::task::JoinHandle<()>,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Idp {
    pub async fn start(audience: &str) -> anyhow::Result<Idp> {
        let rsa = Arc::new(make_key("rsa", "rsa-1")?);
        let ec = Arc::new(make_key("ec", "ec-1")?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let issuer = format!("http://{addr}");
        let state = Arc::new(IdpState {
            issuer: issuer.clone(),
            audience: audience.to_string(),
            published: vec![rsa.jwk.clone(), ec.jwk.clone()],
            signer: rsa.clone(),
            user: Mutex::new(json!({})),
            codes: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Idp {
            issuer,
            audience: audience.to_string(),
            rsa,
            ec,
            state,
            task,
        })
    }

    /// Claims for a token of this provider for `sub`, valid for 10 minutes.
    /// The server's single sign-on settings for this provider: the console is client
    /// `audience`, admins hold groups=tern-admins, names come from the email claim, and
    /// `groups_claim` (when given) maps to Tern groups.
    pub fn config(
        &self,
        audience: &str,
        groups_claim: Option<&str>,
    ) -> tern_management::oidc::OidcConfig {
        tern_management::oidc::OidcConfig {
            issuer: self.issuer.clone(),
            audiences: vec![audience.into()],
            jwks_url: None,
            admin_claim: Some(("groups".into(), "tern-admins".into())),
            groups_claim: groups_claim.map(str::to_string),
            username_claim: "email".into(),
            client_id: Some(audience.into()),
            scopes: "openid email".into(),
        }
    }

    pub fn claims(&self, sub: &str, extra: Value) -> Value {
        let mut c = json!({
            "iss": self.issuer, "aud": self.audience, "sub": sub,
            "iat": now(), "exp": now() + 600,
        });
        if let (Some(m), Value::Object(e)) = (c.as_object_mut(), extra) {
            m.extend(e);
        }
        c
    }

    /// The user the authorization endpoint signs in from now on.
    pub fn set_user(&self, claims: Value) {
        *self.state.user.lock().unwrap_or_else(|e| e.into_inner()) = claims;
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery(State(s): State<Arc<IdpState>>) -> Json<Value> {
    Json(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/jwks", s.issuer),
        "authorization_endpoint": format!("{}/authorize", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks(State(s): State<Arc<IdpState>>) -> Json<JwkSet> {
    Json(JwkSet {
        keys: s.published.clone(),
    })
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    client_id: String,
    redirect_uri: String,
    state: String,
    nonce: String,
    code_challenge: String,
    code_challenge_method: String,
    response_type: String,
}

async fn authorize(State(s): State<Arc<IdpState>>, Query(q): Query<AuthorizeQuery>) -> Response {
    if q.client_id != s.audience || q.response_type != "code" || q.code_challenge_method != "S256" {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "bad authorization request",
        )
            .into_response();
    }
    let code = hex::encode(rand::random::<[u8; 16]>());
    s.codes.lock().unwrap_or_else(|e| e.into_inner()).insert(
        code.clone(),
        Pending {
            nonce: q.nonce,
            challenge: q.code_challenge,
            redirect_uri: q.redirect_uri.clone(),
        },
    );
    let sep = if q.redirect_uri.contains('?') {
        '&'
    } else {
        '?'
    };
    Redirect::to(&format!(
        "{}{sep}code={code}&state={}",
        q.redirect_uri,
        urlencode(&q.state)
    ))
    .into_response()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    code: String,
    redirect_uri: String,
    client_id: String,
    code_verifier: String,
}

async fn token(State(s): State<Arc<IdpState>>, Form(f): Form<TokenForm>) -> Response {
    let cors = || [(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")];
    let bad = |m: &str| {
        (
            axum::http::StatusCode::BAD_REQUEST,
            cors(),
            Json(json!({"error": "invalid_grant", "error_description": m})),
        )
            .into_response()
    };
    let Some(p) = s
        .codes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&f.code)
    else {
        return bad("unknown or used code");
    };
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(f.code_verifier.as_bytes()));
    if f.grant_type != "authorization_code"
        || f.client_id != s.audience
        || f.redirect_uri != p.redirect_uri
        || challenge != p.challenge
    {
        return bad("PKCE or redirect mismatch");
    }
    let mut claims = s.user.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(m) = claims.as_object_mut() {
        m.insert("iss".into(), json!(s.issuer));
        m.insert("aud".into(), json!(s.audience));
        m.insert("iat".into(), json!(now()));
        m.insert("exp".into(), json!(now() + 600));
        m.insert("nonce".into(), json!(p.nonce));
    }
    let id_token = s.signer.sign(&claims);
    (
        cors(),
        Json(json!({"id_token": id_token, "token_type": "Bearer", "expires_in": 600})),
    )
        .into_response()
}

/// The same token with one byte of its signature flipped (a "bad signature" case that keeps the
/// header, its known kid and the claims).
pub fn with_forged_signature(token: &str) -> anyhow::Result<String> {
    let (rest, sig) = token.rsplit_once('.').ok_or_else(|| anyhow!("not a JWT"))?;
    let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig)?;
    if let Some(b) = bytes.first_mut() {
        *b ^= 0x55;
    }
    Ok(format!(
        "{rest}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}
