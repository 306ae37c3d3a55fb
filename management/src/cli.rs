//! Command line of `tern-management` and `tern-server` (every flag also reads a `TERN_...` env var).

use crate::netmap::RelaySettings;
use crate::oidc::OidcConfig;
use crate::server::{self, ServerConfig};
use crate::state::ManagementOptions;
use anyhow::Context;
use clap::Parser;
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Tern server: management (API, console, agents' gRPC), signal and relay"
)]
pub struct Args {
    /// Address for the API, console and gRPC (one port: HTTP/1.1 and HTTP/2).
    #[arg(long, env = "TERN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Where the embedded SQLite database lives.
    #[arg(long, env = "TERN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://user:pass@host/db` for PostgreSQL; default: SQLite in the data dir.
    #[arg(long, env = "TERN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,
    /// The URL agents and admins use to reach this server (printed at start).
    #[arg(long, env = "TERN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// First admin's user name (only used when the database has no user).
    #[arg(long, env = "TERN_ADMIN_USER", default_value = "admin")]
    pub admin_user: String,
    /// First admin's password; generated and printed once when not given.
    #[arg(long, env = "TERN_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<SecretString>,
    /// STUN URLs handed to agents, comma-separated (e.g. stun:vpn.example.com:3478).
    #[arg(long, env = "TERN_STUN_URLS", value_delimiter = ',')]
    pub stun_urls: Vec<String>,
    /// TURN URLs handed to agents with time-limited credentials, comma-separated.
    #[arg(long, env = "TERN_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,
    /// TCP/TLS relay URLs, comma-separated.
    #[arg(long, env = "TERN_TCP_RELAY_URLS", value_delimiter = ',')]
    pub tcp_relay_urls: Vec<String>,
    /// Shared secret of the relay (coturn `static-auth-secret`); generated and stored if not given.
    #[arg(long, env = "TERN_RELAY_SECRET", hide_env_values = true)]
    pub relay_secret: Option<SecretString>,
    /// Lifetime of relay credentials in seconds (re-issued at half-life).
    #[arg(long, env = "TERN_RELAY_CREDENTIALS_TTL", default_value_t = 43_200)]
    pub relay_credentials_ttl: u64,
    /// Secret shared with a separately deployed signal service; generated and stored if not given.
    #[arg(long, env = "TERN_PEER_TOKEN_SECRET", hide_env_values = true)]
    pub peer_token_secret: Option<SecretString>,
    /// A separately deployed tern-signal (its gRPC URL, e.g. http://signal:10000), told at once
    /// when a peer is removed or its login expires.
    #[arg(long, env = "TERN_SIGNAL_URL")]
    pub signal_url: Option<String>,
    /// PEM certificate chain: serve HTTPS (API, console, gRPC, relay WebSocket) on --listen.
    #[arg(long, env = "TERN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TERN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Reverse proxies or load balancers in front of --listen, comma-separated addresses or
    /// CIDR prefixes (e.g. 10.0.0.5,fd00::/64): their PROXY protocol header (v1/v2) and
    /// X-Forwarded-For name the client for sign-in throttling and every other per-source limit.
    /// Anyone else's are ignored. Default: none (the connection's address is the client).
    #[arg(long, env = "TERN_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Do not run the embedded relay (tern-server only).
    #[arg(long, env = "TERN_NO_RELAY")]
    pub no_relay: bool,
    /// STUN/TURN UDP listen address of the embedded relay.
    #[arg(long, env = "TERN_RELAY_UDP_LISTEN", default_value = "0.0.0.0:3478")]
    pub relay_udp_listen: SocketAddr,
    /// Second UDP port of the embedded relay that answers STUN Binding requests only, so that
    /// `tern diagnose` can tell whether an agent's NAT maps per destination; default: the
    /// STUN/TURN port + 1 (3479); 0 switches it off. Open it in the firewall like 3478.
    #[arg(long, env = "TERN_RELAY_STUN_ALT_PORT")]
    pub relay_stun_alt_port: Option<u16>,
    /// Public IP of the relay (advertised to agents); default: the public URL's host if it is an
    /// IP, else the listen IP, else 127.0.0.1 (local trials only).
    #[arg(long, env = "TERN_RELAY_PUBLIC_IP")]
    pub relay_public_ip: Option<std::net::IpAddr>,
    /// TURN relay port range.
    #[arg(long, env = "TERN_RELAY_PORTS", default_value = "49152-65535")]
    pub relay_ports: String,
    /// Peer ranges the relay may reach despite its default filter (labs only), comma-separated.
    #[arg(long, env = "TERN_RELAY_ALLOW_PEERS", value_delimiter = ',')]
    pub relay_allow_peers: Vec<ipnet::IpNet>,
    /// UDP address of the endpoint plain WireGuard devices connect to (tern-server only; needs
    /// the embedded relay); "off" switches WireGuard devices off. Open (and publish, in Docker)
    /// this UDP port.
    #[arg(long, env = "TERN_WIREGUARD_LISTEN", default_value = "0.0.0.0:51820")]
    pub wireguard_listen: String,
    /// `host:port` devices are told to connect to; default: the public URL's host and the
    /// --wireguard-listen port (set it when a NAT or another port is in front).
    #[arg(long, env = "TERN_WIREGUARD_ENDPOINT")]
    pub wireguard_endpoint: Option<String>,
    /// Ports the server may publish as public services (TCP and UDP), e.g. 10000-10999; "off"
    /// switches public services off. Open (and publish, in Docker) the same range.
    #[arg(long, env = "TERN_PUBLIC_PORTS", default_value = "10000-10999")]
    pub public_ports: String,
    /// Address public service ports listen on.
    #[arg(long, env = "TERN_PUBLIC_BIND", default_value = "0.0.0.0")]
    pub public_bind: std::net::IpAddr,
    /// Open public-service connections plus UDP flows, all services together.
    #[arg(long, env = "TERN_PUBLIC_MAX_CONNECTIONS", default_value_t = 4096)]
    pub public_max_connections: usize,
    /// The same, per source address (one source cannot starve the others).
    #[arg(long, env = "TERN_PUBLIC_MAX_PER_SOURCE", default_value_t = 256)]
    pub public_max_per_source: usize,
    /// Ports one peer may publish with `tern expose` at once (services an admin creates do not
    /// count), so one device cannot take the whole --public-ports range.
    #[arg(long, env = "TERN_PUBLIC_MAX_EXPOSED_PER_PEER", default_value_t = 10)]
    pub public_max_exposed_per_peer: usize,
    /// Lifetime of a console sign-in session in seconds.
    #[arg(long, env = "TERN_ADMIN_SESSION_TTL", default_value_t = 43_200)]
    pub admin_session_ttl: u64,
    /// OIDC single sign-on for admins: the identity provider's issuer URL (exactly as in `iss`).
    #[arg(long, env = "TERN_OIDC_ISSUER", requires = "oidc_audience")]
    pub oidc_issuer: Option<String>,
    /// Accepted token audiences (the `aud` claim), comma-separated; usually the client id.
    #[arg(long, env = "TERN_OIDC_AUDIENCE", value_delimiter = ',')]
    pub oidc_audience: Vec<String>,
    /// JWKS URL; default: `jwks_uri` from the issuer's discovery document.
    #[arg(long, env = "TERN_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
    /// CLAIM=VALUE that makes a signed-in user an admin (e.g. groups=tern-admins); everyone
    /// else signs in as a user who sees and adds only their own devices. Without it every user
    /// the provider issues a token for this audience to is an admin.
    #[arg(long, env = "TERN_OIDC_ADMIN_CLAIM")]
    pub oidc_admin_claim: Option<String>,
    /// Claim listing a user's groups (e.g. groups): each value that names a Tern group puts the
    /// user's devices in that group at every sign-in (and takes them out when it goes).
    #[arg(long, env = "TERN_OIDC_GROUPS_CLAIM")]
    pub oidc_groups_claim: Option<String>,
    /// Claim naming the account in Tern (falls back to email, preferred_username, sub).
    #[arg(long, env = "TERN_OIDC_USERNAME_CLAIM", default_value = "email")]
    pub oidc_username_claim: String,
    /// Client id of the console (public client, authorization code + PKCE); shows the SSO button.
    #[arg(long, env = "TERN_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// Scopes the console asks for.
    #[arg(long, env = "TERN_OIDC_SCOPES", default_value = "openid profile email")]
    pub oidc_scopes: String,
    /// Log filter (tracing syntax), e.g. "info,tern_management=debug".
    #[arg(long, env = "TERN_LOG", default_value = "info,turn::server=off")]
    pub log: String,
}

fn oidc_config(args: &Args) -> anyhow::Result<Option<OidcConfig>> {
    let Some(issuer) = args.oidc_issuer.clone() else {
        return Ok(None);
    };
    for (flag, url) in [
        ("--oidc-issuer", Some(&issuer)),
        ("--oidc-jwks-url", args.oidc_jwks_url.as_ref()),
    ] {
        let Some(url) = url else { continue };
        let uri: axum::http::Uri = url
            .parse()
            .with_context(|| format!("{flag} {url:?} is not a URL"))?;
        let loopback = uri.host().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => anyhow::bail!("{flag} {url:?} must be an https:// URL (http only on loopback)"),
        }
    }
    let audiences: Vec<String> = args
        .oidc_audience
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if audiences.is_empty() {
        anyhow::bail!("--oidc-audience is required with --oidc-issuer");
    }
    let admin_claim = args
        .oidc_admin_claim
        .as_deref()
        .map(OidcConfig::parse_admin_claim)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if admin_claim.is_none() {
        tracing::warn!("--oidc-admin-claim not set: every account of the identity provider with a token for this audience is an admin");
    }
    Ok(Some(OidcConfig {
        issuer,
        audiences,
        jwks_url: args.oidc_jwks_url.clone(),
        admin_claim,
        groups_claim: args
            .oidc_groups_claim
            .clone()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty()),
        username_claim: args.oidc_username_claim.clone(),
        client_id: args.oidc_client_id.clone(),
        scopes: args.oidc_scopes.clone(),
    }))
}

pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(args: Args, with_signal: bool) -> anyhow::Result<()> {
    let database_url = match &args.database_url {
        Some(u) => u.expose_secret().to_string(),
        None => format!("sqlite://{}", args.data_dir.join("tern.db").display()),
    };
    let relay = RelaySettings {
        stun_urls: args.stun_urls.clone(),
        turn_urls: args.turn_urls.clone(),
        tcp_relay_urls: args.tcp_relay_urls.clone(),
        stun_probe_urls: vec![],
        secret: args
            .relay_secret
            .as_ref()
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .unwrap_or_default(),
    };
    let opts =
        ManagementOptions {
            relay,
            relay_credentials_ttl: Duration::from_secs(args.relay_credentials_ttl.max(120)),
            peer_token_secret: args
                .peer_token_secret
                .as_ref()
                .map(|s| s.expose_secret().as_bytes().to_vec()),
            admin_session_ttl: Duration::from_secs(args.admin_session_ttl.max(60)),
            signal_url: args.signal_url.clone(),
            oidc: oidc_config(&args)?,
            public: crate::publish::PublicOptions {
                ports: match args.public_ports.trim() {
                    "off" | "" => None,
                    r => Some(parse_ports(r).with_context(|| {
                        format!("--public-ports {r:?} (e.g. 10000-10999 or off)")
                    })?),
                },
                bind: args.public_bind,
                max_connections: args.public_max_connections.max(1),
                max_per_source: args.public_max_per_source.max(1),
                max_exposed_per_peer: args.public_max_exposed_per_peer,
                ..Default::default()
            },
            ..ManagementOptions::default()
        };
    if !with_signal && args.signal_url.is_none() {
        tracing::warn!("no --signal-url: a separate signal service learns that a peer was removed only when its token lapses (up to 1 h)");
    }
    raise_fd_limit();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tern_relay::tls::load_server_config(c, k)?),
        _ => None,
    };
    let relay = if with_signal && !args.no_relay {
        let (min_port, max_port) = parse_ports(&args.relay_ports)
            .with_context(|| format!("--relay-ports {:?}", args.relay_ports))?;
        let public_ip = args
            .relay_public_ip
            .or_else(|| {
                let host = args.public_url.as_deref()?.parse::<axum::http::Uri>().ok()?.host()?.to_string();
                host.trim_matches(['[', ']']).parse().ok()
            })
            .or_else(|| (!args.listen.ip().is_unspecified()).then(|| args.listen.ip()))
            .unwrap_or_else(|| {
                tracing::warn!("relay public IP unknown: advertising 127.0.0.1 (this machine only); start with --public-url http://ADDRESS:PORT (or --relay-public-ip) for agents on other machines");
                std::net::IpAddr::from([127, 0, 0, 1])
            });
        Some(server::EmbeddedRelay {
            udp_listen: args.relay_udp_listen,
            public_ip,
            min_port,
            max_port,
            allow_peers: args.relay_allow_peers.clone(),
            stun_alt_port: match args.relay_stun_alt_port {
                Some(0) => None,
                Some(p) => Some(p),
                None => args.relay_udp_listen.port().checked_add(1),
            },
        })
    } else {
        None
    };
    let wireguard = match args.wireguard_listen.trim() {
        "off" | "" => None,
        _ if relay.is_none() => None,
        l => Some(server::WireguardEndpoint {
            listen: l.parse().with_context(|| {
                format!("--wireguard-listen {l:?} is not an address, e.g. 0.0.0.0:51820 (or off)")
            })?,
            advertise: args.wireguard_endpoint.clone(),
        }),
    };
    let cfg = ServerConfig {
        wireguard,
        listen: args.listen,
        database_url,
        opts,
        signal: with_signal.then(tern_signal::SignalOptions::default),
        relay,
        tls,
        public_url: args.public_url.clone(),
        trusted_proxies: match args.trusted_proxies.as_deref() {
            Some(list) => tern_relay::tls::TrustedProxies::parse(list)
                .with_context(|| format!("--trusted-proxies {list:?}"))?,
            None => Default::default(),
        },
    };
    let running = server::start(cfg).await?;
    let first = crate::bootstrap::first_start(
        &running.state.store,
        &args.admin_user,
        args.admin_password.as_ref().map(|p| p.expose_secret()),
    )
    .await
    .context("creating the first admin account")?;
    let url = args.public_url.clone().unwrap_or_else(|| {
        let host = if running.addr.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            running.addr.ip().to_string()
        };
        format!("http://{host}:{}", running.addr.port())
    });
    println!("Tern is running.");
    println!("  Console and API:  {url}/   (OpenAPI: {url}/api/openapi.json)");
    println!("  Agents join with: tern up --management-url {url}   (people sign in; machines add --setup-key <KEY>)");
    if let Some(r) = &running.relay {
        println!("  Relay:            STUN/TURN udp {}  (TCP fallback {url}/relay, metrics {url}/metrics with an admin token)", r.udp_addr);
    }
    if args.public_url.is_none() {
        println!("  Note:             no --public-url: agents are told this server is at {url}{}; for machines elsewhere start it with --public-url http://ADDRESS:{} (the address they reach it at)",
            if running.relay.is_some() && args.relay_public_ip.is_none() && args.listen.ip().is_unspecified() {
                " and its relay at 127.0.0.1 (this machine only)"
            } else {
                ""
            },
            running.addr.port());
    }
    if let Some(w) = running.state.wireguard.get() {
        println!(
            "  WireGuard:        udp {}  (plain WireGuard devices connect to {}; add them under Peers in the console)",
            args.wireguard_listen, w.endpoint
        );
    }
    if let Ok(replicas) = running.state.store.replicas().await {
        let me = running.state.store.replica();
        let others: Vec<&str> = replicas
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| *id != me)
            .collect();
        if !others.is_empty() {
            println!(
                "  Replicas:         this is {me}, one of {} live on this database (others: {}); give agents every replica's URL: --management-url URL1,URL2",
                others.len() + 1,
                others.join(", ")
            );
            if running.state.wireguard.get().is_some() || running.state.opts.public.ports.is_some()
            {
                println!("                    WireGuard devices and public services are served by one replica: switch them off on the others (--wireguard-listen off, --public-ports off)");
            }
        }
    }
    match running.state.opts.public.ports {
        Some((a, b)) => println!(
            "  Public services:  tcp/udp ports {a}-{b} on {} (open them in the firewall)",
            args.public_bind
        ),
        None => println!("  Public services:  off (--public-ports)"),
    }
    if let Some(f) = first {
        println!("First start: these are shown only once; store them now.");
        println!("  Admin user:       {}", f.admin_user);
        match &f.generated_password {
            Some(p) => println!("  Admin password:   {p}"),
            None => println!("  Admin password:   (from TERN_ADMIN_PASSWORD)"),
        }
        println!(
            "  Setup key:        {}   (reusable; expires in 24 h unless you choose \"Never expire\" under Setup keys in the console)",
            f.setup_key
        );
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop(Duration::from_secs(5)).await;
    Ok(())
}

/// Public services hold two descriptors per connection: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, "cannot raise the open-file limit");
            }
        }
    }
}

fn parse_ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("a port range must look like 49152-65535")?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("bad port {a:?}"))?,
        b.trim()
            .parse()
            .with_context(|| format!("bad port {b:?}"))?,
    );
    anyhow::ensure!(a > 0 && a <= b, "port range {s} is empty or starts at 0");
    Ok((a, b))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// `main` of both binaries: errors are printed with all their causes.
pub fn main_with(with_signal: bool) -> std::process::ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // One flag set, two binaries: each names itself in --help and --version.
    let (name, about) = if with_signal {
        (
            "tern-server",
            "Tern server: management (API, console, agents' gRPC), signal and the relay in one process",
        )
    } else {
        (
            "tern-management",
            "Tern management alone (API, console, agents' gRPC); run tern-signal beside it",
        )
    };
    let matches = Args::command()
        .name(name)
        .bin_name(name)
        .about(about)
        .get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    init_logging(&args.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, with_signal)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
