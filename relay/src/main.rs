//! `tern-relay`: STUN/TURN on UDP and the WebSocket datagram relay on HTTP(S), standalone.

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Tern relay: STUN/TURN over UDP and the TCP/WebSocket datagram relay"
)]
struct Args {
    /// STUN/TURN UDP listen address.
    #[arg(long, env = "TERN_RELAY_UDP_LISTEN", default_value = "0.0.0.0:3478")]
    udp_listen: SocketAddr,
    /// HTTP(S) listen address for /relay (WebSocket) and /metrics.
    #[arg(long, env = "TERN_RELAY_HTTP_LISTEN", default_value = "0.0.0.0:8443")]
    http_listen: SocketAddr,
    /// Public IP advertised for relayed addresses.
    #[arg(long, env = "TERN_RELAY_PUBLIC_IP")]
    public_ip: IpAddr,
    /// Relay port range, e.g. 49152-65535.
    #[arg(long, env = "TERN_RELAY_PORTS", default_value = "49152-65535")]
    ports: String,
    #[arg(long, env = "TERN_RELAY_REALM", default_value = "tern")]
    realm: String,
    /// Shared secret (TERN_RELAY_SECRET of management).
    #[arg(long, env = "TERN_RELAY_SECRET", hide_env_values = true)]
    secret: SecretString,
    /// Overlay range, never relayed to.
    #[arg(long, env = "TERN_OVERLAY_RANGE", default_value = "100.64.0.0/10")]
    overlay: IpNet,
    /// Peer ranges allowed despite the default filter (labs only), comma-separated.
    #[arg(long, env = "TERN_RELAY_ALLOW_PEERS", value_delimiter = ',')]
    allow_peers: Vec<IpNet>,
    #[arg(long, env = "TERN_RELAY_MAX_ALLOCATIONS", default_value_t = 10_000)]
    max_allocations: u64,
    #[arg(
        long,
        env = "TERN_RELAY_MAX_ALLOCATIONS_PER_USER",
        default_value_t = 16
    )]
    max_allocations_per_user: u64,
    /// PEM certificate chain for HTTPS (with --tls-key).
    #[arg(long, env = "TERN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "TERN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Reverse proxies or load balancers in front of --http-listen (addresses or CIDR prefixes,
    /// comma-separated) whose PROXY protocol header or X-Forwarded-For names the client.
    #[arg(long, env = "TERN_TRUSTED_PROXIES")]
    trusted_proxies: Option<String>,
    #[arg(long, env = "TERN_LOG", default_value = "info,turn::server=off")]
    log: String,
}

fn parse_ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("ports must look like 49152-65535")?;
    let (a, b): (u16, u16) = (a.trim().parse()?, b.trim().parse()?);
    anyhow::ensure!(a > 0 && a <= b, "port range {s} is empty or starts at 0");
    Ok((a, b))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(try_main(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn try_main(args: Args) -> anyhow::Result<()> {
    let (min_port, max_port) = parse_ports(&args.ports)?;
    let mut cfg = tern_relay::RelayConfig::new(
        args.udp_listen,
        args.public_ip,
        args.secret.expose_secret().as_bytes().to_vec(),
    );
    cfg.realm = args.realm;
    cfg.min_port = min_port;
    cfg.max_port = max_port;
    cfg.overlay = Some(args.overlay);
    cfg.allow_peers = args.allow_peers;
    cfg.limits.max_allocations = args.max_allocations;
    cfg.limits.max_allocations_per_user = args.max_allocations_per_user;
    let relay = tern_relay::Relay::start(cfg).await?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tern_relay::tls::load_server_config(c, k)?),
        _ => None,
    };
    let proxies = match args.trusted_proxies.as_deref() {
        Some(list) => tern_relay::tls::TrustedProxies::parse(list)
            .with_context(|| format!("--trusted-proxies {list:?}"))?,
        None => Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding {}", args.http_listen))?;
    tracing::info!(addr = %args.http_listen, tls = tls.is_some(), "relay HTTP listening (/relay, /metrics)");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(tern_relay::tls::serve_with(
        listener,
        relay.router_with_metrics(),
        tls,
        proxies,
        stop_rx,
    ));
    let _ = tokio::signal::ctrl_c().await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    relay.close().await;
    Ok(())
}
