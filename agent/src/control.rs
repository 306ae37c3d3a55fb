//! Talking to management: sealed login (registration with a setup key the first time), and the
//! sync stream, reconnected with backoff; every new network map is published on a watch channel.

use anyhow::{anyhow, Context};
use prost::Message;
use std::time::Duration;
use tern_proto::management as pb;
use tern_proto::management::management_service_client::ManagementServiceClient;
use tern_proto::{PublicKey, SecretKey};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot reach management at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("management refused the login: {0}")]
    Refused(String),
    /// A device sign-in nobody has approved yet.
    #[error("the sign-in has not been approved yet")]
    Pending,
    #[error("the management server at {url} presents key {got}, not the key {pinned} it had when this peer joined: refusing to talk to it. If the server was reinstalled on purpose, join again with `tern up --setup-key KEY`")]
    ServerKeyChanged {
        url: String,
        pinned: String,
        got: String,
    },
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

/// Checks a management URL before anything dials it: `https://HOST[:PORT]` (or `http://` for a
/// lab), each mistake named.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err("the management URL is empty: pass --management-url https://HOST".into());
    }
    if url.chars().any(char::is_whitespace) {
        return Err(format!(
            "management URL {url:?} is not a valid URL: it contains spaces"
        ));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "management URL {url:?} has no scheme: write https://{url} (or http:// for a lab without TLS)"
        ));
    };
    if scheme != "https" && scheme != "http" {
        return Err(format!(
            "management URL {url:?} starts with {scheme}://; it must start with https:// (or http:// for a lab without TLS)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(format!(
            "management URL {url:?} has no host name or address"
        ));
    }
    if let Some((_, port)) = authority
        .rsplit_once(':')
        .filter(|_| !authority.ends_with(']'))
    {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "management URL {url:?} has port {port:?}; a port is a number from 1 to 65535"
            ));
        }
    }
    if url.parse::<tonic::codegen::http::Uri>().is_err() {
        return Err(format!("management URL {url:?} is not a valid URL"));
    }
    Ok(())
}

/// What went wrong reaching `url`, in words, from a gRPC status and the errors behind it (the
/// transport repeats itself: "transport error: transport error: tcp connect error: ...").
pub fn describe(url: &str, s: &tonic::Status) -> String {
    let mut chain: Vec<String> = vec![s.message().to_string()];
    let mut io_kind = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
        chain.push(e.to_string());
        cur = e.source();
    }
    let all = chain.join(" | ");
    let has = |needle: &str| all.to_lowercase().contains(&needle.to_lowercase());
    let hostport = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = hostport.split(['/', '?']).next().unwrap_or(hostport);
    let tls = url.starts_with("https://");
    if io_kind == Some(std::io::ErrorKind::ConnectionRefused) || has("connection refused") {
        return format!(
            "nothing accepts connections at {hostport} (connection refused): check the port, and that tern-server runs there"
        );
    }
    if io_kind == Some(std::io::ErrorKind::TimedOut)
        || has("timed out")
        || has("deadline has elapsed")
    {
        return format!(
            "no answer from {hostport} (timed out): check the address, and that no firewall drops the traffic"
        );
    }
    if has("dns error") || has("failed to lookup address") || has("name or service not known") {
        return format!("cannot resolve the host name in {url} (DNS): check its spelling");
    }
    if has("unknownissuer") || has("unknown issuer") || has("self-signed") || has("selfsigned") {
        return format!(
            "the certificate of {hostport} is not trusted (unknown issuer): use a certificate from a public CA, or point TERN_CA_FILE at the CA that signed it"
        );
    }
    if has("notvalidforname") || has("not valid for name") {
        return format!("the certificate of {hostport} is not valid for this host name: use the name it was issued for");
    }
    if has("certificate expired") || has("expired") && has("certificate") {
        return format!("the certificate of {hostport} has expired: renew it on the server");
    }
    if tls && (has("invalidcontenttype") || has("corrupt message") || has("wrong version number")) {
        return format!(
            "{hostport} does not speak TLS: use http:// instead of https:// (or turn TLS on at the server)"
        );
    }
    if !tls
        && (has("frame with invalid size")
            || has("invalid http version")
            || has("connection reset")
            || has("broken pipe")
            || has("unexpected eof")
            || has("connection closed"))
    {
        return format!(
            "{hostport} did not answer as plain HTTP/2; if it serves TLS, use https:// instead of http://"
        );
    }
    // Otherwise the most specific message, once.
    let mut seen = std::collections::HashSet::new();
    chain
        .into_iter()
        .rev()
        .find(|m| !m.is_empty() && seen.insert(m.clone()))
        .unwrap_or_else(|| "unknown error".into())
}

/// The endpoint of management (and signal, on the same server) at `url`. `https` URLs are
/// verified against the system's roots plus the PEM file named by `TERN_CA_FILE` (private CAs,
/// self-signed trial certificates).
///
/// With replicas to move to (`replicas` > 1) a replica that vanishes without closing its
/// connections (a machine that lost power, a network cut) is noticed within about 5 s by HTTP/2
/// keep-alive pings, instead of 30 s.
fn endpoint(url: &str, dial: &str, replicas: usize) -> anyhow::Result<Endpoint> {
    let (interval, timeout) = if replicas > 1 {
        (Duration::from_secs(3), Duration::from_secs(2))
    } else {
        (Duration::from_secs(20), Duration::from_secs(10))
    };
    let mut ep = Endpoint::from_shared(dial.to_string())
        .map_err(|_| anyhow!("management URL {url:?} is not a valid http(s) URL"))?
        .connect_timeout(if replicas > 1 {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(10)
        })
        .http2_keep_alive_interval(interval)
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = ca_file() {
            let pem = std::fs::read(&path)
                .with_context(|| format!("reading TERN_CA_FILE {}", path.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        // Dialled through NAT64: the certificate is still checked for the host as given.
        if dial != url {
            if let Some(host) = url
                .parse::<tonic::codegen::http::Uri>()
                .ok()
                .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
            {
                tls = tls.domain_name(host);
            }
        }
        ep = ep
            .tls_config(tls)
            .context("TLS configuration for management")?;
    }
    Ok(ep)
}

/// `--management-url`: one URL, or several replicas of one management service separated by
/// commas (each checked; duplicates dropped).
pub fn parse_urls(list: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for u in list.split(',').map(str::trim) {
        if u.is_empty() && list.contains(',') {
            return Err(format!(
                "--management-url {list:?} has an empty entry: separate replicas' URLs with single commas"
            ));
        }
        check_url(u)?;
        let u = u.trim_end_matches('/').to_string();
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    Ok(urls)
}

/// The management replicas this agent may use (one URL, or several serving one network on one
/// database), and the one it uses now. Everything that talks to management or signal holds
/// [`Servers::channel`], which always leads to the current replica: when the agent moves, every
/// later call (sync, signal, reports, expose, diagnose) goes to the new one.
pub struct Servers {
    /// The URLs as given (what the user reads, and what is saved).
    urls: Vec<String>,
    /// The same as this host dials them now (through NAT64 on an IPv6-only uplink; they change
    /// when the host moves to another network), with their endpoints.
    dial: std::sync::Mutex<(Vec<String>, Vec<Endpoint>)>,
    current: std::sync::atomic::AtomicUsize,
    /// Sets the channel's one endpoint (another replica, or the same dialled another way).
    switch: tokio::sync::mpsc::Sender<tonic::transport::channel::Change<usize, Endpoint>>,
    channel: Channel,
}

impl Servers {
    /// Starts with the first URL.
    #[cfg(test)]
    pub fn new(urls: Vec<String>) -> anyhow::Result<std::sync::Arc<Servers>> {
        Servers::dialling(urls.clone(), urls)
    }

    /// `urls` as given, each dialled at the same position of `dial` (the same URL, or its
    /// IPv4 literal embedded in the NAT64 prefix).
    pub fn dialling(
        urls: Vec<String>,
        dial: Vec<String>,
    ) -> anyhow::Result<std::sync::Arc<Servers>> {
        anyhow::ensure!(!urls.is_empty(), "no management URL");
        let endpoints = endpoints(&urls, &dial)?;
        let (channel, switch) = Channel::balance_channel(8);
        switch
            .try_send(tonic::transport::channel::Change::Insert(
                0,
                endpoints[0].clone(),
            ))
            .map_err(|_| anyhow!("cannot set up the management channel"))?;
        Ok(std::sync::Arc::new(Servers {
            urls,
            dial: std::sync::Mutex::new((dial, endpoints)),
            current: 0.into(),
            switch,
            channel,
        }))
    }

    fn dialled(&self) -> std::sync::MutexGuard<'_, (Vec<String>, Vec<Endpoint>)> {
        self.dial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host now dials the URLs at `dial` (its NAT64 prefix changed): the replica in use is
    /// reached there from the next request on. True if anything changed.
    pub fn redial(&self, dial: Vec<String>) -> anyhow::Result<bool> {
        let mut d = self.dialled();
        if d.0 == dial {
            return Ok(false);
        }
        let eps = endpoints(&self.urls, &dial)?;
        let i = self.current.load(std::sync::atomic::Ordering::Acquire);
        use tonic::transport::channel::Change;
        let _ = self.switch.try_send(Change::Remove(i));
        let _ = self.switch.try_send(Change::Insert(i, eps[i].clone()));
        info!(url = %self.urls[i], dial = %dial[i], "management is now dialled at another address");
        *d = (dial, eps);
        Ok(true)
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// (index, URL) of the replica in use.
    pub fn current(&self) -> (usize, String) {
        let i = self.current.load(std::sync::atomic::Ordering::Acquire);
        (i, self.urls[i].clone())
    }

    /// The URL of the replica in use as this host dials it.
    pub fn current_dial(&self) -> String {
        let i = self.current.load(std::sync::atomic::Ordering::Acquire);
        self.dialled().0[i].clone()
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// All URLs, as given (for the saved configuration).
    pub fn joined(&self) -> String {
        self.urls.join(",")
    }

    /// Replica `failed` did not answer or dropped a stream: the next one is used, unless
    /// another task already moved on. True if this call moved.
    pub fn failed(&self, failed: usize) -> bool {
        if self.urls.len() < 2 {
            return false;
        }
        let next = (failed + 1) % self.urls.len();
        if self
            .current
            .compare_exchange(
                failed,
                next,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        use tonic::transport::channel::Change;
        let ep = self.dialled().1[next].clone();
        let _ = self.switch.try_send(Change::Remove(failed));
        let _ = self.switch.try_send(Change::Insert(next, ep));
        warn!(from = %self.urls[failed], to = %self.urls[next], "moving to another management replica");
        true
    }
}

/// One endpoint per URL, dialled at the same position of `dial`.
fn endpoints(urls: &[String], dial: &[String]) -> anyhow::Result<Vec<Endpoint>> {
    anyhow::ensure!(
        urls.len() == dial.len(),
        "one dialled URL per management URL"
    );
    urls.iter()
        .zip(dial)
        .map(|(u, d)| endpoint(u, d, urls.len()))
        .collect()
}

/// How long to wait before the next attempt after `failures` failures in a row with `replicas`
/// to try: a short random pause while there are replicas not yet tried (so that the agents of a
/// replica that died do not all arrive at a sibling in the same instant), then exponential
/// backoff with jitter up to 10 s once every replica failed.
pub fn retry_delay(failures: u32, replicas: usize) -> Duration {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    if (failures as usize) < replicas {
        return Duration::from_millis(rng.gen_range(50..=750));
    }
    let rounds = (failures as usize / replicas.max(1)).min(6) as u32;
    let base = Duration::from_millis(500) * 2u32.pow(rounds.saturating_sub(1));
    let base = base.min(Duration::from_secs(10));
    base.mul_f64(rng.gen_range(0.5..=1.0))
}

/// Extra trust anchor for TLS (management and the relay WebSocket).
pub fn ca_file() -> Option<std::path::PathBuf> {
    std::env::var("TERN_CA_FILE")
        .or_else(|_| std::env::var("TERN_RELAY_CA"))
        .ok()
        .map(Into::into)
}

pub struct Session {
    /// The server's key that sealed this session (pinned at the first join).
    pub server_key: PublicKey,
    pub peer_id: String,
    pub token: String,
    pub token_expires_unix: i64,
    pub config: pb::PeerConfig,
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What proves a login may happen (besides the peer's key).
#[derive(Clone, Copy, Debug)]
pub enum Credential<'a> {
    /// A known peer's key alone.
    None,
    SetupKey(&'a str),
    /// The user code of an approved device sign-in.
    DeviceCode(&'a str),
}

/// A device sign-in to approve in the console.
#[derive(Debug, Clone)]
pub struct DeviceCode {
    pub user_code: String,
    /// Where to approve it (built from the management URL when the server has no public URL).
    pub url: String,
    pub url_complete: String,
    pub expires_unix: i64,
    pub interval: Duration,
}

/// The server's key, checked against the pinned one.
pub async fn server_key(
    url: &str,
    ch: &Channel,
    pinned: Option<&PublicKey>,
) -> Result<PublicKey, LoginError> {
    let mut c = ManagementServiceClient::new(ch.clone());
    let server = c
        .get_server_key(pb::ServerKeyRequest {})
        .await
        .map_err(|s| LoginError::Unreachable {
            url: url.to_string(),
            why: describe(url, &s),
        })?
        .into_inner();
    let server_pub = PublicKey::from_slice(&server.public_key).context("server key")?;
    if let Some(p) = pinned.filter(|p| **p != server_pub) {
        return Err(LoginError::ServerKeyChanged {
            url: url.to_string(),
            pinned: p.to_base64(),
            got: server_pub.to_base64(),
        });
    }
    Ok(server_pub)
}

fn peer_meta(hostname: &str) -> pb::PeerMeta {
    pb::PeerMeta {
        hostname: hostname.to_string(),
        os: std::env::consts::OS.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn refused(url: &str, s: tonic::Status) -> LoginError {
    match s.code() {
        tonic::Code::Unavailable => LoginError::Unreachable {
            url: url.to_string(),
            why: describe(url, &s),
        },
        tonic::Code::FailedPrecondition => LoginError::Pending,
        _ => LoginError::Refused(s.message().to_string()),
    }
}

/// Asks for a device sign-in code for this peer's key.
pub async fn start_device_login(
    url: &str,
    ch: &Channel,
    key: &SecretKey,
    server_pub: &PublicKey,
    hostname: &str,
) -> Result<DeviceCode, LoginError> {
    let mut c = ManagementServiceClient::new(ch.clone());
    let req = pb::DeviceLoginRequest {
        meta: Some(peer_meta(hostname)),
        timestamp_unix: now_unix(),
    };
    let sealed =
        tern_proto::seal(key, server_pub, &req.encode_to_vec()).context("sealing sign-in")?;
    let resp = c
        .start_device_login(sealed)
        .await
        .map_err(|s| refused(url, s))?;
    let (from, body) =
        tern_proto::open(key, &resp.into_inner()).context("opening sign-in response")?;
    if from != *server_pub {
        return Err(anyhow!("sign-in response was not sealed by the server key").into());
    }
    let r = pb::DeviceLoginResponse::decode(body.as_slice()).context("decoding sign-in")?;
    let base = url.trim_end_matches('/');
    let (url, url_complete) = if r.verification_url.is_empty() {
        (
            format!("{base}/device"),
            format!("{base}/device?code={}", r.user_code),
        )
    } else {
        (r.verification_url, r.verification_url_complete)
    };
    Ok(DeviceCode {
        user_code: r.user_code,
        url,
        url_complete,
        expires_unix: r.expires_unix,
        interval: Duration::from_secs(u64::from(r.interval_secs.clamp(1, 30))),
    })
}

pub async fn login(
    url: &str,
    ch: &Channel,
    key: &SecretKey,
    setup_key: Option<&str>,
    hostname: &str,
    pinned: Option<&PublicKey>,
) -> Result<Session, LoginError> {
    let server_pub = server_key(url, ch, pinned).await?;
    let cred = match setup_key {
        Some(k) => Credential::SetupKey(k),
        None => Credential::None,
    };
    login_with(url, ch, key, &server_pub, cred, hostname).await
}

/// One sealed login; `LoginError::Pending` while a device code awaits approval.
pub async fn login_with(
    url: &str,
    ch: &Channel,
    key: &SecretKey,
    server_pub: &PublicKey,
    cred: Credential<'_>,
    hostname: &str,
) -> Result<Session, LoginError> {
    let mut c = ManagementServiceClient::new(ch.clone());
    let (setup_key, device_code) = match cred {
        Credential::None => ("", ""),
        Credential::SetupKey(k) => (k, ""),
        Credential::DeviceCode(d) => ("", d),
    };
    let req = pb::LoginRequest {
        setup_key: setup_key.to_string(),
        meta: Some(peer_meta(hostname)),
        timestamp_unix: now_unix(),
        device_code: device_code.to_string(),
    };
    let sealed =
        tern_proto::seal(key, server_pub, &req.encode_to_vec()).context("sealing login")?;
    let resp = c.login(sealed).await.map_err(|s| refused(url, s))?;
    let (from, body) =
        tern_proto::open(key, &resp.into_inner()).context("opening login response")?;
    if from != *server_pub {
        return Err(anyhow!("login response was not sealed by the server key").into());
    }
    let r = pb::LoginResponse::decode(body.as_slice()).context("decoding login response")?;
    let config = r
        .peer_config
        .ok_or_else(|| anyhow!("login response without peer config"))?;
    Ok(Session {
        server_key: *server_pub,
        peer_id: r.peer_id,
        token: r.peer_token,
        token_expires_unix: r.token_expires_unix,
        config,
    })
}

/// How often a device whose user is disabled asks again.
const DISABLED_RECHECK: Duration = Duration::from_secs(20);

/// What the agent needs to log in again on its own: where, as whom, and the pinned server key.
pub struct Relogin {
    pub servers: std::sync::Arc<Servers>,
    pub key: SecretKey,
    pub hostname: String,
    pub server_key: PublicKey,
    /// Set when management refuses this peer for good: "removed" (an admin deleted it) or
    /// "login_expired"; retrying stops until the peer joins again with a setup key.
    pub refused: watch::Sender<String>,
}

/// Why management refuses a peer for good, as a status code, from its refusal message.
pub fn refusal_code(message: &str) -> Option<&'static str> {
    if message.contains("not registered") {
        Some("removed")
    } else if message.contains("login expired") {
        Some("login_expired")
    } else if message.contains("user") && message.contains("is disabled") {
        Some("user_disabled")
    } else {
        None
    }
}

/// Keeps a sync stream open (re-logging in for fresh tokens), publishing maps; reports whether
/// management is reachable on `up`.
pub async fn run_sync(
    who: Relogin,
    maps: watch::Sender<Option<pb::NetworkMap>>,
    token: watch::Sender<Option<String>>,
    up: watch::Sender<bool>,
) {
    let Relogin {
        servers,
        key,
        hostname,
        server_key,
        refused,
    } = who;
    let ch = servers.channel();
    // Failures in a row (each moves to the next replica, if there are several).
    let mut failures = 0u32;
    let fail = |failures: &mut u32, at: usize| {
        *failures += 1;
        servers.failed(at);
        retry_delay(*failures, servers.len())
    };
    loop {
        let (at, url) = servers.current();
        let session = match login(&url, &ch, &key, None, &hostname, Some(&server_key)).await {
            Ok(s) => s,
            Err(LoginError::Refused(m)) if refusal_code(&m) == Some("user_disabled") => {
                // Until an admin enables the account again: say so, check now and then.
                warn!(reason = %m, "management refuses this device while its user is disabled");
                up.send_replace(false);
                refused.send_replace("user_disabled".into());
                // Nothing flows meanwhile: the others dropped this device; it drops them too.
                maps.send_replace(Some(pb::NetworkMap::default()));
                tokio::time::sleep(DISABLED_RECHECK).await;
                continue;
            }
            Err(LoginError::Refused(m)) if refusal_code(&m).is_some() => {
                let code = refusal_code(&m).unwrap_or_default();
                tracing::error!(reason = %m, "management refuses this peer: no more retries; join again with `tern up --setup-key KEY`");
                up.send_replace(false);
                refused.send_replace(code.to_string());
                maps.send_replace(Some(pb::NetworkMap::default()));
                return;
            }
            Err(e) => {
                let wait = fail(&mut failures, at);
                warn!(error = %e, retry_in = ?wait, "management login failed");
                up.send_replace(false);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        token.send_replace(Some(session.token.clone()));
        refused.send_if_modified(|r| {
            let was = !r.is_empty();
            r.clear();
            was
        });
        let mut c = ManagementServiceClient::new(ch.clone());
        let mut req = tonic::Request::new(pb::SyncRequest {
            accepts_deltas: true,
            ..Default::default()
        });
        if let Ok(v) = format!("Bearer {}", session.token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        let mut stream = match c.sync(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                let wait = fail(&mut failures, at);
                warn!(error = %e.message(), retry_in = ?wait, "sync stream refused");
                up.send_replace(false);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        up.send_replace(true);
        info!(%url, "management sync stream open");
        // Re-login before the token expires (signal needs a valid one for reconnects).
        let refresh =
            Duration::from_secs(((session.token_expires_unix - now_unix()) * 3 / 4).max(30) as u64);
        let mut deadline = tokio::time::Instant::now() + refresh;
        // Whether the stream ended because of the server (then another replica is tried).
        let server_fault = loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep_until(deadline) => {
                    deadline = tokio::time::Instant::now() + refresh;
                    match login(&url, &ch, &key, None, &hostname, Some(&server_key)).await {
                        Ok(s) => { token.send_replace(Some(s.token)); }
                        Err(e) => warn!(error = %e, "token refresh failed"),
                    }
                    continue;
                }
            };
            match msg {
                Ok(Some(m)) => {
                    failures = 0;
                    let next = next_map(maps.borrow().as_ref(), m);
                    match next {
                        Ok(Some(map)) => {
                            maps.send_replace(Some(map));
                        }
                        Ok(None) => {}
                        Err(gap) => {
                            // The stream's first message is a full map.
                            warn!(%gap, "missed a network map change; reopening the sync stream for a full map");
                            break false;
                        }
                    }
                }
                Ok(None) => {
                    warn!("management closed the sync stream");
                    break true;
                }
                Err(e) => {
                    warn!(error = %e.message(), "sync stream failed");
                    break true;
                }
            }
        };
        up.send_replace(false);
        if server_fault {
            let wait = fail(&mut failures, at);
            tokio::time::sleep(wait).await;
        }
    }
}

/// The map after a sync message: a full map (unless older than the one we have), or the one we
/// have with a delta applied; a delta for another map than ours is a gap.
pub fn next_map(
    current: Option<&pb::NetworkMap>,
    m: pb::SyncResponse,
) -> Result<Option<pb::NetworkMap>, tern_proto::mapdelta::Gap> {
    if let Some(map) = m.network_map {
        let newer = current.is_none_or(|old| map.serial >= old.serial);
        return Ok(newer.then_some(map));
    }
    let Some(d) = m.delta else {
        return Ok(None);
    };
    let Some(cur) = current else {
        return Err(tern_proto::mapdelta::Gap {
            have: 0,
            base: d.base_serial,
        });
    };
    tern_proto::mapdelta::apply(cur, &d).map(Some)
}

/// The connection report sent to management: one entry per remote peer.
pub fn connection_report(peers: &[crate::engine::PeerStatus]) -> Vec<pb::PeerConnection> {
    use crate::engine::PathKind;
    let mut out: Vec<pb::PeerConnection> = peers
        .iter()
        .map(|p| pb::PeerConnection {
            peer_id: p.id.clone(),
            kind: match p.connection {
                PathKind::Direct => "direct",
                PathKind::TurnRelay => "turn_relay",
                PathKind::TcpRelay => "tcp_relay",
                PathKind::None => "connecting",
            }
            .into(),
            rtt_ms: p
                .latency_ms
                .map_or(0, |r| r.round().clamp(1.0, 60_000.0) as u32),
            reason_code: p.path_reason_code.clone(),
            probes_settled: p.probes.map_or(0, |x| x.0),
            probes_lost: p.probes.map_or(0, |x| x.1),
        })
        .collect();
    out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    out
}

/// Reports how this agent reaches each peer: within 2 s of a change of path, and every 30 s
/// (management forgets reports older than 75 s). RTT changes alone wait for the 30 s report.
pub async fn run_status_reports(
    servers: std::sync::Arc<Servers>,
    engine: std::sync::Arc<crate::engine::Engine>,
    token: watch::Receiver<Option<String>>,
    up: watch::Receiver<bool>,
) {
    let mut last: Option<Vec<(String, String)>> = None;
    let mut last_sent = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if !*up.borrow() {
            last = None;
            continue;
        }
        let Some(t) = token.borrow().clone() else {
            continue;
        };
        let conns = connection_report(&engine.status());
        let networks = engine.reachable_networks();
        let routes: Vec<pb::RouteReport> = engine
            .route_status()
            .into_iter()
            .map(|r| {
                let (state, detail) = r.report();
                pb::RouteReport {
                    network: r.network,
                    state: state.into(),
                    routing_peer_id: r.peer_id,
                    detail,
                }
            })
            .collect();
        let mut shape: Vec<(String, String)> = conns
            .iter()
            .map(|c| (c.peer_id.clone(), c.kind.clone()))
            .collect();
        shape.extend(networks.iter().map(|n| (n.clone(), String::new())));
        shape.extend(routes.iter().map(|r| (r.network.clone(), r.state.clone())));
        if last.as_ref() == Some(&shape) && last_sent.elapsed() < Duration::from_secs(30) {
            continue;
        }
        let mut req = tonic::Request::new(pb::StatusReport {
            connections: conns,
            reachable_networks: networks,
            routes,
        });
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req.set_timeout(Duration::from_secs(10));
        match ManagementServiceClient::new(servers.channel())
            .report_status(req)
            .await
        {
            Ok(_) => {
                last = Some(shape);
                last_sent = tokio::time::Instant::now();
            }
            Err(e) => debug!(error = %e.message(), "status report failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_mistakes_are_named() {
        assert!(check_url("https://tern.example.com").is_ok());
        assert!(check_url("http://127.0.0.1:8080").is_ok());
        assert!(check_url("https://[2001:db8::1]:443/").is_ok());
        for (url, words) in [
            ("tern.example.com:443", "has no scheme"),
            ("htp://x", "must start with https://"),
            ("grpc://x:1", "must start with https://"),
            ("https://", "has no host"),
            ("https://:443", "has no host"),
            ("http://x:0", "a port is a number"),
            ("http://x:http", "a port is a number"),
        ] {
            let e = check_url(url).expect_err(url);
            assert!(e.contains(words), "{url}: {e}");
        }
    }

    #[test]
    fn several_replicas_urls_are_checked_each_and_retries_spread_then_back_off() {
        assert_eq!(
            parse_urls("https://a.example.com, https://b.example.com/,https://a.example.com"),
            Ok(vec![
                "https://a.example.com".to_string(),
                "https://b.example.com".to_string()
            ])
        );
        assert_eq!(
            parse_urls("http://10.0.0.1:8080"),
            Ok(vec!["http://10.0.0.1:8080".to_string()])
        );
        let e = parse_urls("https://a.example.com,,https://b").expect_err("empty entry");
        assert!(e.contains("empty entry"), "{e}");
        let e = parse_urls("https://a.example.com,b.example.com").expect_err("no scheme");
        assert!(e.contains("has no scheme"), "{e}");
        // While replicas remain untried: a short random pause, under a second.
        for f in 1..3 {
            let d = retry_delay(f, 3);
            assert!(
                d >= Duration::from_millis(50) && d < Duration::from_secs(1),
                "{d:?}"
            );
        }
        // Then backoff grows, with jitter, up to 10 s.
        let late: Vec<Duration> = (0..50).map(|_| retry_delay(60, 2)).collect();
        assert!(late
            .iter()
            .all(|d| *d >= Duration::from_secs(5) && *d <= Duration::from_secs(10)));
        assert!(late.iter().any(|d| *d != late[0]), "jittered");
        let one = retry_delay(1, 1);
        assert!(one <= Duration::from_millis(500), "{one:?}");
    }

    #[tokio::test]
    async fn moving_to_another_replica_happens_once_per_failure() {
        let s = Servers::new(vec![
            "http://127.0.0.1:1".to_string(),
            "http://127.0.0.1:2".to_string(),
        ])
        .expect("servers");
        assert_eq!(s.current().0, 0);
        assert!(s.failed(0));
        // Signal and sync both saw replica 0 fail: only the first moves.
        assert!(!s.failed(0));
        assert_eq!(s.current(), (1, "http://127.0.0.1:2".to_string()));
        assert!(s.failed(1));
        assert_eq!(s.current().0, 0);
        let single = Servers::new(vec!["http://127.0.0.1:1".to_string()]).expect("one");
        assert!(!single.failed(0));
        assert_eq!(single.joined(), "http://127.0.0.1:1");
    }

    #[test]
    fn permanent_refusals_are_told_apart_from_outages() {
        assert_eq!(
            refusal_code("peer is not registered: a setup key is required to join"),
            Some("removed")
        );
        assert_eq!(
            refusal_code("peer login expired: run tern up again with a valid setup key"),
            Some("login_expired")
        );
        assert_eq!(
            refusal_code("device login expired: run tern up again to sign in"),
            Some("login_expired")
        );
        assert_eq!(
            refusal_code("this device's user erin is disabled: ask an admin to enable the account"),
            Some("user_disabled")
        );
        assert_eq!(refusal_code("invalid setup key"), None);
    }

    #[test]
    fn deltas_apply_to_the_map_they_were_made_from_and_a_gap_asks_for_a_full_one() {
        let base = pb::NetworkMap {
            serial: 5,
            pending_approval: true,
            ..Default::default()
        };
        let newer = pb::NetworkMap {
            serial: 6,
            ..Default::default()
        };
        let d = tern_proto::mapdelta::delta(&base, &newer).expect("a change");
        let msg = |d: &pb::MapDelta| pb::SyncResponse {
            network_map: None,
            delta: Some(d.clone()),
        };
        assert_eq!(next_map(Some(&base), msg(&d)), Ok(Some(newer.clone())));
        // Missed serial 5 (we still have 4): a gap.
        let older = pb::NetworkMap {
            serial: 4,
            ..base.clone()
        };
        assert!(next_map(Some(&older), msg(&d)).is_err());
        assert!(next_map(None, msg(&d)).is_err());
        // A full map always resets; an older full map is ignored.
        let full = |m: &pb::NetworkMap| pb::SyncResponse {
            network_map: Some(m.clone()),
            delta: None,
        };
        assert_eq!(
            next_map(Some(&older), full(&newer)),
            Ok(Some(newer.clone()))
        );
        assert_eq!(next_map(Some(&newer), full(&older)), Ok(None));
    }
}
