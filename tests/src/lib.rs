//! Shared harness for Tern's end-to-end suites: databases (a temporary SQLite file, or a fresh
//! database on the PostgreSQL server named by `TERN_TEST_POSTGRES_URL`), an in-process server on
//! an ephemeral loopback port, an admin REST client, and gRPC clients that act as agents.

use anyhow::{anyhow, Context};
use std::future::Future;
use std::time::Duration;
use tern_management::server::{self, Running, ServerConfig};
use tern_management::state::ManagementOptions;
use tern_proto::management as pb;
use tern_proto::management::management_service_client::ManagementServiceClient;
use tern_proto::signal::signal_service_client::SignalServiceClient;
use tern_proto::SecretKey;
use tonic::transport::Channel;

pub mod idp;
pub mod mesh;
pub mod netns;
pub mod scale;
pub mod webdriver;

pub const ADMIN_PASSWORD: &str = "correct-horse-battery";

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test; dropped (PostgreSQL) or deleted (SQLite) by [`TestDb::cleanup`].
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("tern.db").display());
                Ok(TestDb {
                    url,
                    backend,
                    _dir: Some(dir),
                    pg: None,
                })
            }
            Backend::Postgres => {
                let admin =
                    postgres_url().ok_or_else(|| anyhow!("TERN_TEST_POSTGRES_URL is not set"))?;
                let name = format!("tern_t_{}", &tern_management::model::new_id()[..12]);
                let pool = sqlx::PgPool::connect(&admin)
                    .await
                    .context("connecting to TERN_TEST_POSTGRES_URL")?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await?;
                pool.close().await;
                let url = with_db_name(&admin, &name);
                Ok(TestDb {
                    url,
                    backend,
                    _dir: None,
                    pg: Some((admin, name)),
                })
            }
        }
    }

    pub async fn cleanup(self) {
        if let Some((admin, name)) = &self.pg {
            if let Ok(pool) = sqlx::PgPool::connect(admin).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await;
                pool.close().await;
            }
        }
    }
}

fn with_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    format!("{}/{name}{query}", &base[..path_start])
}

pub fn postgres_url() -> Option<String> {
    std::env::var("TERN_TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// The backends this run covers: SQLite always; PostgreSQL when configured. In CI (CI=true)
/// a missing PostgreSQL is an error, so the suite cannot silently shrink to SQLite only.
pub fn backends() -> Vec<Backend> {
    if postgres_url().is_some() {
        vec![Backend::Sqlite, Backend::Postgres]
    } else {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but TERN_TEST_POSTGRES_URL is not set: the store suite must run on PostgreSQL too"
        );
        eprintln!("note: TERN_TEST_POSTGRES_URL not set; running on SQLite only (see README)");
        vec![Backend::Sqlite]
    }
}

/// Runs `body` once per backend with a fresh database, cleaning up even when it panics.
pub async fn on_each_backend<F, Fut>(body: F)
where
    F: Fn(Backend, String) -> Fut,
    Fut: Future<Output = ()>,
{
    use futures::FutureExt;
    for b in backends() {
        let db = TestDb::new(b).await.expect("test database");
        let url = db.url.clone();
        let r = std::panic::AssertUnwindSafe(body(b, url))
            .catch_unwind()
            .await;
        db.cleanup().await;
        if let Err(p) = r {
            eprintln!("failed on {b:?}");
            std::panic::resume_unwind(p);
        }
    }
}

/// An in-process server (management + signal) with an admin signed in.
pub struct TestServer {
    pub running: Option<Running>,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
    /// The setup key created at first start (reusable).
    pub default_setup_key: String,
}

pub fn fast_options() -> ManagementOptions {
    ManagementOptions {
        sync_debounce: Duration::from_millis(50),
        ..ManagementOptions::default()
    }
}

impl TestServer {
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        Self::start_with(database_url, fast_options()).await
    }

    pub async fn start_with(database_url: &str, opts: ManagementOptions) -> anyhow::Result<Self> {
        Self::start_configured(database_url, opts, |_| {}).await
    }

    /// A server whose configuration `tweak` changes before it starts.
    pub async fn start_configured(
        database_url: &str,
        opts: ManagementOptions,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        let running = Self::run(database_url, opts, tweak).await?;
        let first = tern_management::bootstrap::first_start(
            &running.state.store,
            "admin",
            Some(ADMIN_PASSWORD),
        )
        .await?
        .ok_or_else(|| anyhow!("database was not fresh"))?;
        Self::signed_in(running, first.setup_key).await
    }

    /// Another replica of `first` on the same (PostgreSQL) database.
    pub async fn replica_of(first: &TestServer, database_url: &str) -> anyhow::Result<Self> {
        let running = Self::run(database_url, fast_options(), |_| {}).await?;
        Self::signed_in(running, first.default_setup_key.clone()).await
    }

    async fn signed_in(running: Running, default_setup_key: String) -> anyhow::Result<Self> {
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()?;
        let token = admin_login(&http, &base, "admin", ADMIN_PASSWORD).await?;
        Ok(TestServer {
            running: Some(running),
            base,
            token,
            http,
            default_setup_key,
        })
    }

    async fn run(
        database_url: &str,
        opts: ManagementOptions,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Running> {
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse()?, database_url.to_string());
        cfg.opts = opts;
        cfg.signal = Some(tern_signal::SignalOptions::default());
        cfg.relay = Some(server::EmbeddedRelay {
            udp_listen: "127.0.0.1:0".parse()?,
            public_ip: "127.0.0.1".parse()?,
            // Above Linux's ephemeral range (32768-60999), so a port a test picked by binding
            // port 0 is never inside the relay's range.
            min_port: 61000 + (rand::random::<u16>() % 4000),
            max_port: 0,
            allow_peers: vec![],
            stun_alt_port: None,
        });
        if let Some(r) = cfg.relay.as_mut() {
            r.max_port = r.min_port + 400;
        }
        cfg.wireguard = Some(server::WireguardEndpoint {
            listen: "127.0.0.1:0".parse()?,
            advertise: None,
        });
        tweak(&mut cfg);
        server::start(cfg).await
    }

    pub fn state(&self) -> &std::sync::Arc<tern_management::state::AppState> {
        &self.running.as_ref().expect("server running").state
    }

    /// Waits until `peer_id` has a live sync stream (reports are accepted from then on).
    pub async fn wait_online(&self, peer_id: &str) {
        wait_until("peer online", Duration::from_secs(5), || {
            self.state().has_stream(peer_id)
        })
        .await;
    }

    /// Waits until `n` peers have a signal stream open on this server.
    pub async fn wait_signal_streams(&self, n: usize) {
        let sig = self
            .running
            .as_ref()
            .and_then(|r| r.signal.clone())
            .expect("signal runs here");
        wait_until("signal streams registered", Duration::from_secs(5), || {
            sig.online() >= n
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop(Duration::from_secs(2)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An authenticated request; returns status and JSON body (Null when empty).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.api_as(&self.token, method, path, body).await
    }

    /// A request with another account's token.
    pub async fn api_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let (s, v) = self.api(reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.api(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.api(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> u16 {
        self.api(reqwest::Method::DELETE, path, None).await.0
    }

    /// Creates a setup key through the API and returns (key, id).
    pub async fn setup_key(&self, body: serde_json::Value) -> (String, String) {
        let (s, v) = self.post("/api/setup-keys", body).await;
        assert_eq!(s, 201, "create setup key: {v}");
        (
            v["key"].as_str().expect("key").to_string(),
            v["setup_key"]["id"].as_str().expect("id").to_string(),
        )
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.base.clone())
            .expect("uri")
            .connect()
            .await
            .expect("gRPC connect")
    }
}

pub async fn admin_login(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({ "username": user, "password": password }))
        .send()
        .await?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        return Err(anyhow!("login failed ({status}): {v}"));
    }
    Ok(v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token in {v}"))?
        .to_string())
}

/// A gRPC client that plays an agent: its own WireGuard key, sealed login, sync and signal.
pub struct TestAgent {
    pub key: SecretKey,
    pub hostname: String,
    channel: Channel,
}

impl TestAgent {
    /// The same agent (key) talking to another server (a replica).
    pub fn with_key(mut self, key: SecretKey) -> Self {
        self.key = key;
        self
    }

    pub async fn new(server: &TestServer, hostname: &str) -> Self {
        TestAgent {
            key: SecretKey::generate(),
            hostname: hostname.to_string(),
            channel: server.channel().await,
        }
    }

    /// An agent on an existing connection (many agents share one HTTP/2 connection).
    pub fn with_channel(channel: Channel, hostname: &str) -> Self {
        TestAgent {
            key: SecretKey::generate(),
            hostname: hostname.to_string(),
            channel,
        }
    }

    pub fn mgmt(&self) -> ManagementServiceClient<Channel> {
        ManagementServiceClient::new(self.channel.clone())
    }

    pub fn signal(&self) -> SignalServiceClient<Channel> {
        SignalServiceClient::new(self.channel.clone())
    }

    /// The server's public key.
    async fn server_pub(&self) -> Result<tern_proto::PublicKey, tonic::Status> {
        let k = self
            .mgmt()
            .get_server_key(pb::ServerKeyRequest {})
            .await?
            .into_inner();
        tern_proto::PublicKey::from_slice(&k.public_key)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }

    fn meta(&self) -> pb::PeerMeta {
        pb::PeerMeta {
            hostname: self.hostname.clone(),
            os: "linux".into(),
            agent_version: "test".into(),
            kernel: String::new(),
        }
    }

    /// Seals `msg` to the server, calls `rpc` with it and opens the answer.
    async fn sealed_call<R: prost::Message + Default, F, Fut>(
        &self,
        msg: &impl prost::Message,
        rpc: F,
    ) -> Result<R, tonic::Status>
    where
        F: FnOnce(ManagementServiceClient<Channel>, pb::SealedMessage) -> Fut,
        Fut:
            std::future::Future<Output = Result<tonic::Response<pb::SealedMessage>, tonic::Status>>,
    {
        let server_pub = self.server_pub().await?;
        let sealed = tern_proto::seal(&self.key, &server_pub, &msg.encode_to_vec())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let resp = rpc(self.mgmt(), sealed).await?.into_inner();
        let (sender, body) = tern_proto::open(&self.key, &resp)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        assert_eq!(
            sender, server_pub,
            "the answer must come from the server key"
        );
        R::decode(body.as_slice()).map_err(|e| tonic::Status::internal(e.to_string()))
    }

    /// Logs in (registering with `setup_key` when given).
    pub async fn login(&self, setup_key: Option<&str>) -> Result<pb::LoginResponse, tonic::Status> {
        self.login_request(setup_key.unwrap_or_default(), "").await
    }

    /// Logs in with the code of a device sign-in (FAILED_PRECONDITION while it waits).
    pub async fn login_with_code(&self, code: &str) -> Result<pb::LoginResponse, tonic::Status> {
        self.login_request("", code).await
    }

    async fn login_request(
        &self,
        setup_key: &str,
        device_code: &str,
    ) -> Result<pb::LoginResponse, tonic::Status> {
        let req = pb::LoginRequest {
            setup_key: setup_key.to_string(),
            meta: Some(self.meta()),
            timestamp_unix: tern_management::grpc::now_unix(),
            device_code: device_code.to_string(),
        };
        self.sealed_call(&req, |mut c, s| async move { c.login(s).await })
            .await
    }

    /// Starts a device sign-in: the code a person approves.
    pub async fn start_device_login(&self) -> Result<pb::DeviceLoginResponse, tonic::Status> {
        let req = pb::DeviceLoginRequest {
            meta: Some(self.meta()),
            timestamp_unix: tern_management::grpc::now_unix(),
        };
        self.sealed_call(
            &req,
            |mut c, s| async move { c.start_device_login(s).await },
        )
        .await
    }

    pub async fn sync(
        &self,
        token: &str,
    ) -> Result<tonic::Streaming<pb::SyncResponse>, tonic::Status> {
        self.sync_with(token, false).await
    }

    /// A sync stream that takes deltas after its first (full) map when `deltas`.
    pub async fn sync_with(
        &self,
        token: &str,
        deltas: bool,
    ) -> Result<tonic::Streaming<pb::SyncResponse>, tonic::Status> {
        let mut req = tonic::Request::new(pb::SyncRequest {
            accepts_deltas: deltas,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", bearer_value(token));
        Ok(self.mgmt().sync(req).await?.into_inner())
    }
}

pub fn bearer_value(token: &str) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {token}").parse().expect("ascii token")
}

/// Next map from a sync stream, or an error if none arrives within `within`.
pub async fn next_map(
    s: &mut tonic::Streaming<pb::SyncResponse>,
    within: Duration,
) -> anyhow::Result<pb::NetworkMap> {
    let msg = tokio::time::timeout(within, s.message())
        .await
        .map_err(|_| anyhow!("no network map within {within:?}"))??
        .ok_or_else(|| anyhow!("sync stream ended"))?;
    msg.network_map
        .ok_or_else(|| anyhow!("sync message without a map"))
}

/// Reads maps until `pred` holds, up to `within` in total.
pub async fn wait_map(
    s: &mut tonic::Streaming<pb::SyncResponse>,
    within: Duration,
    pred: impl Fn(&pb::NetworkMap) -> bool,
) -> anyhow::Result<pb::NetworkMap> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = next_map(s, left).await?;
        if pred(&m) {
            return Ok(m);
        }
    }
}

/// Polls `ready` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's resident memory in KiB (0 if unknown).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh self-signed certificate for "localhost": (certificate, private key, certificate PEM).
pub fn self_signed_localhost() -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
    String,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    (ck.cert.der().clone(), key, ck.cert.pem())
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TERN_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
