//! `tern`: the Tern agent (daemon + CLI). `tern up` joins the network and runs the tunnel in the
//! foreground; `tern status` and `tern down` talk to the running daemon over a root-only socket.

/// `println!`/`print!` for this crate: a reader that went away (`tern status | head -4`) ends a
/// CLI command quietly instead of a panic; the daemon (`tern up`) ignores it and keeps running.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*).and_then(|_| out.flush()) {
            $crate::stdout_failed(e);
        }
    }};
}
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = write!(out, $($arg)*).and_then(|_| out.flush()) {
            $crate::stdout_failed(e);
        }
    }};
}

/// Set once this process runs the tunnel: from then on a closed stdout is not a reason to stop.
static DAEMON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Standard output failed: a closed pipe ends a CLI command as `head` expects (exit 0, nothing
/// printed); the daemon carries on; anything else ends the command with the error.
fn stdout_failed(e: std::io::Error) {
    if DAEMON.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

mod control;
mod diagnose;
mod dns;
mod engine;
mod logring;
mod nat64;
mod ping;
mod platform;
mod publish;
mod relays;
mod routes;
mod service;
mod signal;
mod socket;
mod state;
mod status;
mod turn;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(name = "tern", version, about = "Tern mesh VPN agent")]
struct Cli {
    /// Where the private key and saved config live.
    #[arg(
        long,
        global = true,
        env = "TERN_STATE_DIR",
        default_value = "/var/lib/tern"
    )]
    state_dir: PathBuf,
    /// Where the control socket lives (root-only directory).
    #[arg(long, global = true, env = "TERN_RUN_DIR", default_value = "/run/tern")]
    run_dir: PathBuf,
    /// TUN interface name.
    #[arg(long, global = true, env = "TERN_INTERFACE", default_value = "tern0")]
    interface: String,
    #[arg(
        long,
        global = true,
        env = "TERN_LOG",
        default_value = "info,webrtc_ice=error,turn=warn"
    )]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Join the network (a person signs in, or a machine uses a setup key) and run the tunnel
    /// (foreground). Later runs need neither.
    ///
    /// `tern up` stays in the foreground until Ctrl-C or `tern down`; `tern service install`
    /// runs it as a service instead. Its settings (--mtu, --nat64-prefix, --no-dns) are saved in
    /// the state directory, so a bare `tern up` and the service come back the same.
    Up {
        #[command(flatten)]
        join: JoinArgs,
        #[command(flatten)]
        settings: UpSettings,
    },
    /// Stop the running daemon (removes the interface).
    Down,
    /// Publish a port of this host on the server's public address while this command runs
    /// (Ctrl-C ends it). An admin must allow one of this peer's groups (Settings).
    Expose {
        /// tcp or udp.
        #[arg(value_parser = ["tcp", "udp"])]
        protocol: String,
        /// The port on this host (reached on 127.0.0.1).
        port: u16,
        /// Port on the server (default: the first free one it may publish).
        #[arg(long)]
        public_port: Option<u16>,
        /// Sources allowed to connect (CIDR, repeatable); default: everyone.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    /// Echo requests to a peer (by name or overlay address) or a host in a routed network,
    /// each reply with the path it took (direct, via TURN, via the TCP relay) and its RTT.
    Ping {
        /// Peer name, overlay address, or an address inside a routed network.
        target: String,
        /// How many requests (one per second).
        #[arg(short = 'c', long, default_value_t = 5)]
        count: u32,
        /// Stop at the first reply over a direct path (fail if none within --count).
        #[arg(long)]
        until_direct: bool,
    },
    /// Run active checks (management, signal, relays, STUN/TURN with the issued credentials,
    /// the NAT, each peer's path, loss, RTT and MTU, local conflicts) and say what is wrong and
    /// what to do. Exits 1 when something is wrong.
    Diagnose {
        /// Only this peer (name or overlay address).
        #[arg(long)]
        peer: Option<String>,
        /// Also the slow checks (the NAT's mapping lifetime; about a minute).
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        json: bool,
        /// Also write a debug bundle to this .tar.gz file: status, the report, the recent log,
        /// interfaces, routes, firewall and versions, with every secret redacted.
        #[arg(long, value_name = "FILE.tar.gz")]
        bundle: Option<PathBuf>,
    },
    /// Run the agent as a systemd service (starts at boot; no terminal needed).
    Service {
        #[command(subcommand)]
        action: ServiceCmd,
    },
    /// Show the daemon's connections.
    Status {
        #[arg(long)]
        json: bool,
        /// Candidates, handshake and traffic per peer.
        #[arg(short = 'd', long)]
        detail: bool,
    },
}

/// How to join: needed on the first join only (then remembered in the state directory).
#[derive(clap::Args, Debug)]
struct JoinArgs {
    /// Management URL, e.g. https://vpn.example.com (remembered after the first join). Several
    /// replicas of one server: their URLs separated by commas, the preferred first.
    #[arg(long, env = "TERN_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// Setup key, for machines nobody signs in on (first join only). Without one, tern up shows
    /// a code for a person to approve in the console.
    #[arg(long, env = "TERN_SETUP_KEY", hide_env_values = true)]
    setup_key: Option<String>,
    /// Name to register with (default: the host name).
    #[arg(long, env = "TERN_HOSTNAME")]
    hostname: Option<String>,
    /// Without a setup key: how long to wait for someone to approve this device's sign-in
    /// (default: until its code expires, 10 min).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    sign_in_timeout: Option<u64>,
}

/// How the tunnel runs. Saved in the state directory with the join: a bare `tern up` (and the
/// service) uses what was given last; a flag given again replaces the saved value.
#[derive(clap::Args, Debug, Clone, Default)]
struct UpSettings {
    /// Tunnel MTU (default: the management setting, 1280).
    #[arg(long, env = "TERN_MTU", value_parser = clap::value_parser!(u32).range(576..=9000))]
    mtu: Option<u32>,
    /// NAT64 on an IPv6-only uplink: auto (default: the network's prefix, found through DNS64 as
    /// RFC 7050 says), off, or the prefix itself (e.g. 64:ff9b::/96). IPv4 addresses of the
    /// server are reached through it when the host has no IPv4 route.
    #[arg(long, env = "TERN_NAT64_PREFIX", value_name = "auto|off|PREFIX")]
    nat64_prefix: Option<nat64::Setting>,
    /// Leave the host's DNS alone: no resolver for peer names and nameserver groups.
    #[arg(long, env = "TERN_NO_DNS", conflicts_with = "dns")]
    no_dns: bool,
    /// Answer peer names again (undoes a saved --no-dns).
    #[arg(long)]
    dns: bool,
}

/// The settings `tern up` runs with: the flags given, else the saved ones, else the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    mtu: Option<u32>,
    nat64: nat64::Setting,
    no_dns: bool,
}

impl UpSettings {
    fn over(&self, saved: Option<&state::SavedConfig>) -> anyhow::Result<Settings> {
        let saved_nat64 = match saved.and_then(|s| s.nat64_prefix.as_deref()) {
            None => nat64::Setting::Auto,
            Some(v) => v.parse().map_err(|e: String| {
                anyhow::anyhow!(
                    "the saved --nat64-prefix {v:?} is not valid ({e}); give --nat64-prefix again"
                )
            })?,
        };
        Ok(Settings {
            mtu: self.mtu.or(saved.and_then(|s| s.mtu)),
            nat64: self.nat64_prefix.unwrap_or(saved_nat64),
            no_dns: if self.dns {
                false
            } else {
                self.no_dns || saved.is_some_and(|s| s.no_dns)
            },
        })
    }
}

impl Settings {
    fn save_into(&self, c: &mut state::SavedConfig) {
        c.mtu = self.mtu;
        c.nat64_prefix = Some(self.nat64.to_string());
        c.no_dns = self.no_dns;
    }
}

#[derive(Subcommand, Debug)]
enum ServiceCmd {
    /// Join (with --setup-key on a first join), then install, enable and start the service. The
    /// settings given here are saved and used by the service (as by a bare `tern up`).
    Install {
        #[command(flatten)]
        join: JoinArgs,
        #[command(flatten)]
        settings: UpSettings,
    },
    /// Stop and disable the service and remove its unit.
    Uninstall,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(logring::Tee)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sock = status::socket_path(&cli.run_dir, &cli.interface);
    match cli.cmd {
        Cmd::Down => {
            status::request(&sock, "down").await?;
            println!("tern: {} going down", cli.interface);
            Ok(())
        }
        Cmd::Expose {
            protocol,
            port,
            public_port,
            allow,
        } => {
            let args = publish::ExposeArgs {
                protocol: protocol.clone(),
                local_port: port,
                public_port,
                allow,
            };
            let (x, mut conn) = status::expose(&sock, &args).await?;
            println!(
                "tern: publishing this host's {protocol} port {port} at {}",
                x.public_address
            );
            let everyone = x
                .allowed_sources
                .iter()
                .any(|s| s == "0.0.0.0/0" || s == "::/0");
            if everyone {
                println!("  open to everyone (restrict with --allow CIDR)");
            } else {
                println!("  open to {}", x.allowed_sources.join(", "));
            }
            println!("  shown in the console as {}", x.name);
            println!("Press Ctrl-C to stop publishing.");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    println!("tern: stopped publishing port {port}");
                    Ok(())
                }
                _ = term.recv() => Ok(()),
                _ = status::closed(&mut conn) => {
                    bail!("the tern daemon stopped; port {port} is no longer published")
                }
            }
        }
        Cmd::Service { action } => match action {
            ServiceCmd::Install {
                join: args,
                settings,
            } => {
                if !platform::net::valid_iface(&cli.interface) {
                    bail!(
                        "--interface {:?} is not a valid interface name (1-15 letters, digits, '-', '_' or '.')",
                        cli.interface
                    );
                }
                if !nix::unistd::geteuid().is_root() {
                    bail!("tern service install needs root (it writes a systemd unit)");
                }
                if status::request(&sock, "status").await.is_ok() {
                    bail!(
                        "a tern daemon already runs on {} (in a terminal?): stop it with `tern down`, then install the service",
                        cli.interface
                    );
                }
                let st = state::StateDir::new(&cli.state_dir)?;
                let saved = st.load_config()?;
                if saved.is_none() && args.management_url.is_none() {
                    bail!("this host has not joined a network yet: run `tern service install --management-url URL` (and --setup-key KEY for a machine nobody signs in on)");
                }
                let run_with = settings.over(saved.as_ref())?;
                match saved {
                    Some(mut c) if args.setup_key.is_none() && args.management_url.is_none() => {
                        run_with.save_into(&mut c);
                        st.save_config(&c)?;
                    }
                    _ => {
                        let j = join(&cli.state_dir, &cli.interface, args, run_with).await?;
                        println!(
                            "tern: joined as {} with {}",
                            j.session.config.name, j.session.config.address
                        );
                    }
                }
                service::install(&cli.state_dir, &cli.run_dir, &cli.interface)
            }
            ServiceCmd::Uninstall => service::uninstall(&cli.interface),
        },
        Cmd::Ping {
            target,
            count,
            until_direct,
        } => ping::run(&sock, &target, count.min(3600), until_direct).await,
        Cmd::Diagnose {
            peer,
            deep,
            json,
            bundle,
        } => {
            let args = diagnose::Args {
                peer,
                deep,
                bundle: bundle.is_some(),
            };
            let raw = status::request(
                &sock,
                &format!("diagnose {}", serde_json::to_string(&args)?),
            )
            .await?;
            let v: serde_json::Value =
                serde_json::from_str(&raw).context("the daemon sent a malformed report")?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                bail!("{e}");
            }
            let mut report: diagnose::Report =
                serde_json::from_value(v).context("the daemon sent a malformed report")?;
            if let Some(p) = &args.peer {
                if report.facts.peers.is_empty() {
                    bail!("no peer named {p:?} in this network map (see `tern status`)");
                }
            }
            if let Some(path) = bundle {
                let files = report.bundle.take().unwrap_or_default();
                diagnose::bundle::write(&path, &files)
                    .with_context(|| format!("writing the debug bundle {}", path.display()))?;
                eprintln!(
                    "tern: debug bundle written to {} (secrets redacted; read it before you share it)",
                    path.display()
                );
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", diagnose::render(&report));
            }
            if report.worst() >= Some(diagnose::Severity::Warning) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Status { json, detail } => {
            let raw = status::request(&sock, "status").await?;
            if json {
                print!("{raw}");
                return Ok(());
            }
            let s: status::Status =
                serde_json::from_str(&raw).context("daemon sent a malformed status")?;
            let yes = |b: bool| if b { "connected" } else { "unreachable" };
            println!(
                "Interface {}  address {}  key {}",
                s.interface, s.overlay_address, s.public_key
            );
            match s.management_refused.as_str() {
                "removed" => println!(
                    "Management: an admin removed this peer; it no longer retries. Join again with `tern down` and `tern up --setup-key KEY`"
                ),
                "login_expired" => println!(
                    "Management: this peer's login expired; it no longer retries. Sign in again with `tern down` and `tern up` (a setup-key peer: `tern up --setup-key KEY`)"
                ),
                "user_disabled" => println!(
                    "Management: this device's user is disabled; nothing flows until an admin enables the account (tern keeps checking)"
                ),
                _ => println!(
                    "Management {}{}  Signal {}  TCP relay {}",
                    yes(s.management),
                    if s.management_replicas > 1 {
                        format!(
                            " at {} (one of {} replicas)",
                            s.management_url, s.management_replicas
                        )
                    } else {
                        String::new()
                    },
                    yes(s.signal),
                    yes(s.tcp_relay)
                ),
            }
            if s.pending_approval {
                println!("Awaiting approval: an admin must approve this peer in the console");
            }
            if let Some(n) = &s.nat64 {
                println!("{}", n.line());
            }
            if let Some(l) = relays::status_line(&s.relays) {
                println!("{l}");
            }
            if !s.dns.state.is_empty() {
                println!("{}", s.dns.line());
                for b in &s.dns.blocked {
                    println!("  {b}");
                }
            }
            println!(
                "Peers: {}  (packets dropped by policy: {})",
                s.peers.len(),
                s.firewall_dropped
            );
            if s.peers.is_empty() && s.management && !s.pending_approval {
                println!("  no policy connects this peer with any other yet: an admin puts it in a group a policy covers (console: its peer page, or Settings for devices added by sign-in)");
            }
            for r in &s.routes {
                let g = |k: &str| {
                    r.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                let via = match g("peer_name") {
                    n if !n.is_empty() => n,
                    _ => "-".to_string(),
                };
                let state = match (g("state").as_str(), g("access").as_str()) {
                    ("installed", "none") => format!(
                        "installed, but no policy lets this peer use it ({via} drops its traffic; {} packets sent so far)",
                        r.get("sent_without_policy").and_then(|v| v.as_u64()).unwrap_or(0)
                    ),
                    ("installed", _) if r.get("open_to_groups").and_then(|v| v.as_bool()) == Some(true) => {
                        "installed, open to its distribution groups (all of the network, whatever the policies say)".to_string()
                    }
                    ("installed", a) if !a.is_empty() => {
                        format!("installed (policies allow {a})")
                    }
                    (s, _) => s.to_string(),
                };
                println!("Route {:<18} via {:<20} {state}", g("network"), via);
            }
            for n in &s.serving {
                println!("Serving {n}");
            }
            for p in &s.services {
                println!(
                    "Publishing {} {} -> {}{}  ({} active, {} total)",
                    p.protocol,
                    p.public_address,
                    p.target,
                    if p.ephemeral {
                        format!("  [tern expose: {}]", p.name)
                    } else {
                        format!("  [{}]", p.name)
                    },
                    p.active,
                    p.total
                );
            }
            for p in &s.peers {
                for line in peer_lines(p, detail) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Cmd::Up { join, settings } => {
            up(&cli.state_dir, sock, &cli.interface, join, settings).await
        }
    }
}

/// Says so when the management URL is plain http:// to a host other than this one: sign-in
/// secrets are sealed end to end, but the admin-visible metadata and tokens are not.
fn warn_plain_http(url: &str) {
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
            .trim_matches(['[', ']']);
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !local {
            warn!(%url, "management URL is plain http:// to another host: tokens and network maps travel unencrypted; use https://");
            eprintln!("tern: warning: {url} is plain http:// to another host; peer tokens and network maps travel unencrypted. Use https:// for anything but a lab.");
        }
    }
}

/// The human lines for one peer of `tern status`: no raw nulls, sizes in units, the path's reason.
fn peer_lines(p: &serde_json::Value, detail: bool) -> Vec<String> {
    let text = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let num = |k: &str| p.get(k).and_then(|v| v.as_f64());
    let mut rtt = num("latency_ms")
        .map(|r| format!("  rtt {r:.1} ms"))
        .unwrap_or_default();
    if let Some(l) = num("loss_pct").filter(|l| *l > 0.0) {
        rtt.push_str(&format!("  loss {l:.0}%"));
    }
    let connection = match text("connection").as_str() {
        "turn_relay" => "via TURN".to_string(),
        "tcp_relay" => "via TCP relay".to_string(),
        "none" | "" => "-".to_string(),
        c => c.to_string(),
    };
    let mut lines = vec![format!(
        "  {:<20} {:<15} {:<10} {:<13}{rtt}",
        text("name"),
        text("overlay_ip"),
        text("state"),
        connection
    )];
    let refused = match num("sent_without_policy").unwrap_or(0.0) {
        n if n > 0.0 => format!("; {n:.0} packets sent anyway were dropped by it"),
        _ => String::new(),
    };
    match text("access").as_str() {
        "none" => lines.push(format!(
            "      no policy lets this peer reach it (it may reach this peer){refused}"
        )),
        "all" | "" => {}
        a => lines.push(format!("      policies let this peer use {a}{refused}")),
    }
    let reason = text("path_reason");
    if !reason.is_empty() {
        let code = text("path_reason_code");
        lines.push(if detail && !code.is_empty() {
            format!("      {reason} [{code}]")
        } else {
            format!("      {reason}")
        });
    }
    if detail {
        let mut parts = vec![];
        if let (Some(l), Some(r)) = (
            p.get("local_candidate").and_then(|v| v.as_str()),
            p.get("remote_candidate").and_then(|v| v.as_str()),
        ) {
            parts.push(format!("pair {l} <-> {r}"));
        }
        parts.push(match num("last_handshake_secs_ago") {
            Some(s) if s < 90.0 => format!("handshake {s:.0} s ago"),
            Some(s) if s < 5400.0 => format!("handshake {:.0} min ago", s / 60.0),
            Some(s) => format!("handshake {:.0} h ago", s / 3600.0),
            None => "no handshake yet".to_string(),
        });
        parts.push(format!(
            "received {}, sent {}",
            bytes(num("bytes_rx").unwrap_or(0.0)),
            bytes(num("bytes_tx").unwrap_or(0.0))
        ));
        lines.push(format!("      {}", parts.join("  ")));
    }
    lines
}

/// A byte count in the largest unit that keeps it >= 1 (B, KiB, MiB, GiB, TiB).
fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// What a successful login leaves: the session, and the settings `up` runs with.
struct Joined {
    session: control::Session,
    /// The management URL in use, as this host dials it (through NAT64 where needed).
    url: String,
    servers: Arc<control::Servers>,
    key: tern_proto::SecretKey,
    hostname: String,
    settings: Settings,
    nat64: Arc<nat64::Nat64>,
}

/// Logs in to management (with the setup key on a first join) and saves the config, so that
/// later runs need no key.
async fn join(
    state_dir: &std::path::Path,
    iface: &str,
    args: JoinArgs,
    settings: Settings,
) -> anyhow::Result<Joined> {
    let JoinArgs {
        management_url,
        setup_key,
        hostname,
        sign_in_timeout,
    } = args;
    let st = state::StateDir::new(state_dir)?;
    let key = st.key()?;
    let saved = st.load_config()?;
    let url = management_url
        .or_else(|| saved.as_ref().map(|s| s.management_url.clone()))
        .context("no management URL: pass --management-url on the first join")?;
    let hostname = hostname
        .or_else(|| saved.as_ref().map(|s| s.hostname.clone()))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "tern-peer".into());
    let urls = control::parse_urls(&url).map_err(anyhow::Error::msg)?;
    for u in &urls {
        warn_plain_http(u);
    }
    // An IPv6-only uplink: IPv4 literals in the URLs are dialled through the NAT64 prefix.
    let nat64 = Arc::new(nat64::Nat64::new(settings.nat64, iface));
    nat64.want(&urls);
    nat64.refresh().await;
    if let Some(why) = urls.iter().find_map(|u| nat64.unreachable_ipv4(u)) {
        bail!("{why}");
    }
    let dial: Vec<String> = urls.iter().map(|u| nat64.url(u)).collect();
    let servers = control::Servers::dialling(urls, dial)?;
    let ch = servers.channel();
    // The server's key is pinned at the first join; an explicit join with a setup key (a
    // reinstalled server) pins the new one.
    let pinned = saved
        .as_ref()
        .filter(|s| {
            control::parse_urls(&s.management_url).ok().as_deref() == Some(servers.urls())
                && setup_key.is_none()
        })
        .and_then(|s| s.server_key.as_deref())
        .and_then(|k| k.parse::<tern_proto::PublicKey>().ok());
    // With several replicas, the first that answers.
    let mut attempt = 0;
    let server_pub = loop {
        let (at, current) = servers.current();
        match control::server_key(&current, &ch, pinned.as_ref()).await {
            Err(control::LoginError::Unreachable { .. }) if attempt + 1 < servers.len() => {
                attempt += 1;
                servers.failed(at);
            }
            Err(control::LoginError::Unreachable { url, why }) if nat64.url(&url) != url => {
                let p = nat64.prefix().map(|p| p.to_string()).unwrap_or_default();
                let how = match settings.nat64 {
                    nat64::Setting::Prefix(_) => "configured with --nat64-prefix: if it is not the network's NAT64 prefix, give the right one or --nat64-prefix auto",
                    _ => "discovered through the network's DNS64: check that the server runs and that its port is open",
                };
                bail!(
                    "cannot reach management at {url} through the NAT64 prefix {p} ({how}): {why}"
                );
            }
            r => break r?,
        }
    };
    let url = servers.current().1;
    let cred = match setup_key.as_deref() {
        Some(k) => control::Credential::SetupKey(k),
        None => control::Credential::None,
    };
    let session = match control::login_with(&url, &ch, &key, &server_pub, cred, &hostname).await {
        // Not registered (or a user's device whose login expired), and no setup key: the
        // person at this device signs in.
        Err(control::LoginError::Refused(m)) if setup_key.is_none() && signs_in(&m) => {
            let wait = sign_in_timeout.map(std::time::Duration::from_secs);
            device_sign_in(&url, &ch, &key, &server_pub, &hostname, wait).await?
        }
        r => r?,
    };
    let mut c = state::SavedConfig {
        management_url: servers.joined(),
        hostname: hostname.clone(),
        interface: iface.to_string(),
        mtu: None,
        server_key: Some(session.server_key.to_base64()),
        nat64_prefix: None,
        no_dns: false,
    };
    settings.save_into(&mut c);
    st.save_config(&c)?;
    Ok(Joined {
        session,
        url: servers.current_dial(),
        servers,
        key,
        hostname,
        settings,
        nat64,
    })
}

/// Whether a refusal is one a person's sign-in resolves.
fn signs_in(refusal: &str) -> bool {
    refusal.contains("not registered") || refusal.contains("device login expired")
}

/// Longest the agent waits for an approval, whatever the server says.
const SIGN_IN_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The interactive join: prints where to approve this device and its code, then waits (with a
/// spinner on a terminal) until someone approves it, denies it, or the code expires.
async fn device_sign_in(
    url: &str,
    ch: &tonic::transport::Channel,
    key: &tern_proto::SecretKey,
    server_pub: &tern_proto::PublicKey,
    hostname: &str,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<control::Session> {
    use std::io::{IsTerminal, Write};
    let code = control::start_device_login(url, ch, key, server_pub, hostname)
        .await
        .context("cannot start the sign-in")?;
    let left = (code.expires_unix - control::now_unix()).max(0);
    println!("To add this device ({hostname}) to the network, sign in with your company account:");
    println!();
    println!("    {}", code.url_complete);
    println!();
    println!(
        "or open {} on any device and enter the code {}",
        code.url, code.user_code
    );
    println!(
        "Waiting for approval; the code expires in {} min. (Machines nobody signs in on join with --setup-key.)",
        (left + 59) / 60
    );
    let _ = std::io::stdout().flush();
    let tty = std::io::stderr().is_terminal();
    let waits = std::time::Duration::from_secs(left as u64)
        .min(SIGN_IN_WAIT_MAX)
        .min(wait.unwrap_or(SIGN_IN_WAIT_MAX));
    let deadline = tokio::time::Instant::now() + waits;
    let spin = ['|', '/', '-', '\\'];
    let mut n = 0usize;
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            if tty {
                eprintln!();
            }
            bail!(
                "nobody approved the code {} within {}: run tern up again for a new code",
                code.user_code,
                if waits.as_secs() >= 60 {
                    format!("{} min", waits.as_secs().div_ceil(60))
                } else {
                    format!("{} s", waits.as_secs())
                }
            );
        }
        if tty {
            let secs = (deadline - now).as_secs();
            eprint!(
                "\r{} waiting for approval of {} ({}:{:02} left) ",
                spin[n % spin.len()],
                code.user_code,
                secs / 60,
                secs % 60
            );
            n += 1;
        }
        match control::login_with(
            url,
            ch,
            key,
            server_pub,
            control::Credential::DeviceCode(&code.user_code),
            hostname,
        )
        .await
        {
            Ok(s) => {
                if tty {
                    eprintln!("\r{:60}\r", "");
                }
                println!("tern: sign-in approved");
                return Ok(s);
            }
            Err(control::LoginError::Pending) => {}
            Err(control::LoginError::Unreachable { why, .. }) => {
                // A blip while waiting: keep waiting until the deadline.
                warn!(error = %why, "management unreachable while waiting for approval");
            }
            Err(e) => {
                if tty {
                    eprintln!();
                }
                return Err(e.into());
            }
        }
        tokio::time::sleep(code.interval).await;
    }
}

async fn up(
    state_dir: &std::path::Path,
    sock: PathBuf,
    iface: &str,
    join_args: JoinArgs,
    given: UpSettings,
) -> anyhow::Result<()> {
    let setup_key = join_args.setup_key.clone();
    DAEMON.store(true, std::sync::atomic::Ordering::Relaxed);
    if !platform::net::valid_iface(iface) {
        bail!("--interface {iface:?} is not a valid interface name (1-15 letters, digits, '-', '_' or '.')");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("tern up needs root (it creates a TUN device and routes)");
    }
    if status::request(&sock, "status").await.is_ok() {
        bail!("a tern daemon is already running on {iface}; run `tern down` first");
    }
    // A resolv.conf an earlier run changed and could not put back (it was killed).
    dns::host::restore_leftovers(state_dir);
    let saved = state::StateDir::new(state_dir)?.load_config()?;
    let settings = given.over(saved.as_ref())?;
    let Joined {
        session,
        url,
        servers,
        key,
        hostname,
        settings,
        nat64,
    } = join(state_dir, iface, join_args, settings).await?;
    let no_dns = settings.no_dns;
    let ch = servers.channel();
    let mtu = settings.mtu.unwrap_or(session.config.mtu);
    // Rules a crashed earlier run may have left behind.
    platform::net::remove_rules(iface);
    let tun = platform::tun::create(iface, &session.config.address, mtu)?;
    if let Some(c) = session
        .config
        .overlay_range
        .parse::<ipnet::IpNet>()
        .ok()
        .and_then(|o| {
            let locals = platform::net::local_networks(iface);
            routes::conflict(&o, &locals)
        })
    {
        warn!("overlay range: {c}");
    }
    info!(interface = iface, address = %session.config.address, mtu, peer_id = %session.peer_id, "tunnel up");
    println!(
        "tern: joined as {} with {} on {iface}",
        session.config.name, session.config.address
    );

    let (maps_tx, mut maps_rx) = watch::channel(None);
    let (token_tx, token_rx) = watch::channel(Some(session.token.clone()));
    let (mgmt_up_tx, mgmt_up) = watch::channel(false);
    let (refused_tx, refused_rx) = watch::channel(String::new());
    let (sig_up_tx, sig_up) = watch::channel(false);
    let (sig_out_tx, sig_out_rx) = mpsc::channel(256);
    let (sig_in_tx, mut sig_in_rx) = mpsc::channel(256);
    let (shared, mux) = socket::Shared::bind()?;
    let engine = engine::Engine::new(
        key.clone(),
        tun,
        iface.to_string(),
        sig_out_tx,
        shared.clone(),
        mux,
    );
    for sock in shared.sockets() {
        tokio::spawn(engine.clone().shared_loop(sock));
    }

    tokio::spawn(control::run_sync(
        control::Relogin {
            servers: servers.clone(),
            key: key.clone(),
            hostname,
            server_key: session.server_key,
            refused: refused_tx,
        },
        maps_tx,
        token_tx,
        mgmt_up_tx,
    ));
    tokio::spawn(control::run_status_reports(
        servers.clone(),
        engine.clone(),
        token_rx.clone(),
        mgmt_up.clone(),
    ));
    tokio::spawn(signal::run(
        servers.clone(),
        key.clone(),
        token_rx.clone(),
        sig_out_rx,
        sig_in_tx,
        sig_up_tx,
    ));
    tokio::spawn(engine.clone().tun_loop());
    tokio::spawn(engine.clone().timer_loop());
    {
        let e = engine.clone();
        tokio::spawn(async move {
            while let Some((from, msg)) = sig_in_rx.recv().await {
                e.handle_signal(from, msg).await;
            }
        });
    }
    // Network maps -> engine, and the TCP relay connection that follows the map's URL/token.
    let (relay_tx, relay_rx) = watch::channel::<TcpRelays>(None);
    let (services_tx, services_rx) = watch::channel(Arc::new(Vec::new()));
    let publisher = publish::Publisher::new(
        &nat64.outside_url(&servers.current().1),
        &url,
        tls_roots(),
        token_rx.clone(),
        services_rx,
    )?;
    tokio::spawn(publisher.clone().run());
    let (pending_tx, pending_rx) = watch::channel(false);
    let (dns_tx, dns_rx) = watch::channel(dns::Config::default());
    let dns_rx_status = dns_rx.clone();
    let host_dns: Arc<std::sync::Mutex<Option<dns::host::HostDns>>> = Arc::default();
    let dns_status = Arc::new(std::sync::Mutex::new(dns::Status {
        state: if no_dns { "off" } else { "waiting" }.into(),
        ..Default::default()
    }));
    if !no_dns {
        let ip = session
            .config
            .address
            .split('/')
            .next()
            .and_then(|a| a.parse().ok());
        if let Some(ip) = ip {
            tokio::spawn(run_dns(
                ip,
                state_dir.to_path_buf(),
                iface.to_string(),
                dns_rx,
                host_dns.clone(),
                dns_status.clone(),
            ));
        }
    }
    // A new NAT64 prefix (the host moved to another network) re-reads the map's relay URLs.
    let (nat64_tx, mut nat64_rx) = watch::channel(());
    {
        let e = engine.clone();
        let nat64 = nat64.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = maps_rx.changed() => if r.is_err() { break },
                    r = nat64_rx.changed() => if r.is_err() { break },
                }
                let Some(mut map) = maps_rx.borrow_and_update().clone() else {
                    continue;
                };
                if let Some(relay) = map.relay.as_mut() {
                    // A relay address without a route (an IPv6-only uplink): find the prefix.
                    if nat64.want(&nat64::Nat64::relay_urls(relay)) && nat64.refresh().await {
                        info!("dialling the relays through the NAT64 prefix");
                    }
                    nat64.relay(relay);
                }
                if pending_tx.send_replace(map.pending_approval) != map.pending_approval {
                    if map.pending_approval {
                        warn!("this peer awaits an admin's approval: it sees no other peer until then");
                    } else {
                        info!("this peer is approved");
                    }
                }
                e.apply_map(&map);
                e.apply_routes(&map);
                if let Some(d) = &map.dns {
                    let cfg = dns::Config::from_map(d);
                    dns_tx.send_if_modified(|cur| {
                        let changed = *cur != cfg;
                        *cur = cfg;
                        changed
                    });
                }
                services_tx.send_if_modified(|cur| {
                    let changed = **cur != map.served_services;
                    if changed {
                        *cur = Arc::new(map.served_services.clone());
                    }
                    changed
                });
                let tcp = map
                    .relay
                    .as_ref()
                    .filter(|r| !r.tcp_relay.is_empty())
                    .map(|r| {
                        (
                            r.tcp_relay
                                .iter()
                                .map(|t| t.url.clone())
                                .collect::<Vec<_>>(),
                            r.tcp_relay[0].token.clone(),
                        )
                    });
                relay_tx.send_if_modified(|cur| {
                    let changed = cur.as_ref().map(|c| &c.0) != tcp.as_ref().map(|t| &t.0)
                        || cur.is_none() != tcp.is_none();
                    *cur = tcp.clone();
                    changed
                });
            }
        });
    }
    let (views_tx, views_rx) = mpsc::channel::<ViewRequest>(8);
    let relay_error = Arc::new(std::sync::Mutex::new(String::new()));
    tokio::spawn(tcp_relay_loop(
        engine.clone(),
        relay_rx,
        views_rx,
        relay_error.clone(),
    ));
    tokio::spawn(watch_addresses(
        engine.clone(),
        nat64.clone(),
        nat64_tx,
        servers.clone(),
        publisher.clone(),
    ));
    tokio::spawn(engine.clone().probe_relays());
    tokio::spawn(engine.clone().turn_loop());
    if let Some(rx) = shared.take_relayed_stun() {
        tokio::spawn(engine.clone().relayed_stun_loop(rx));
    }

    let (down_tx, mut down_rx) = mpsc::channel(1);
    let sig_up_diag = sig_up.clone();
    let me = session.peer_id.clone();
    let addr = session.config.address.clone();
    let pubkey = key.public_key().to_base64();
    let iface_s = iface.to_string();
    let e = engine.clone();
    let status_servers = servers.clone();
    let status_nat64 = nat64.clone();
    let status_dns = dns_rx_status;
    let status_overlay: Option<ipnet::IpNet> = session.config.overlay_range.parse().ok();
    let status_now = Arc::new(move || {
        let (peer_list, route_list) = (e.status(), e.route_status());
        status::Status {
            interface: iface_s.clone(),
            peer_id: me.clone(),
            overlay_address: addr.clone(),
            public_key: pubkey.clone(),
            management: *mgmt_up.borrow(),
            management_url: status_servers.current().1,
            management_replicas: status_servers.len(),
            signal: *sig_up.borrow(),
            tcp_relay: e.tcp_connected(),
            // The servers as the map names them (the NAT64 line says how they are reached).
            relays: e
                .relay_status()
                .into_iter()
                .map(|mut r| {
                    r.url = status_nat64.outside_url(&r.url);
                    r
                })
                .collect(),
            peers: peer_list
                .iter()
                .filter_map(|p| serde_json::to_value(p).ok())
                .collect(),
            routes: route_list
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect(),
            serving: e.served_status(),
            firewall_dropped: e.firewall_dropped(),
            pending_approval: *pending_rx.borrow(),
            services: publisher.status(),
            management_refused: refused_rx.borrow().clone(),
            dns: {
                let mut d = dns_status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if d.state == "on" {
                    let peers: Vec<(std::net::IpAddr, String)> = peer_list
                        .iter()
                        .filter_map(|p| Some((p.overlay_ip.parse().ok()?, p.access.clone())))
                        .collect();
                    let routes: Vec<(ipnet::IpNet, String)> = route_list
                        .iter()
                        .filter(|r| r.state == "installed")
                        .filter_map(|r| Some((r.network.parse().ok()?, r.access.clone())))
                        .collect();
                    d.blocked = dns::blocked_nameservers(
                        &status_dns.borrow(),
                        &peers,
                        &routes,
                        status_overlay.as_ref(),
                    );
                }
                d
            },
            nat64: status_nat64.status(),
        }
    });
    let status_serve = status_now.clone();
    let (secret_key, token_secret, setup_secret) =
        (key.clone(), token_rx.clone(), setup_key.clone());
    status::serve(
        sock.clone(),
        move || status_serve(),
        down_tx,
        Arc::new(publish::ExposeClient {
            channel: ch.clone(),
            token: token_rx.clone(),
        }),
        Arc::new(diagnose::run::Context {
            status: Arc::new(move || serde_json::to_value(status_now()).unwrap_or_default()),
            secrets: Arc::new(move || {
                let mut s = vec![secret_key.to_base64()];
                s.extend(token_secret.borrow().clone());
                s.extend(setup_secret.clone());
                s
            }),
            relay_views: views_tx,
            relay_error,
            nat64: nat64.clone(),
            token: token_rx.clone(),
            engine: engine.clone(),
            channel: ch.clone(),
            url: url.clone(),
            signal_up: sig_up_diag,
            iface: iface.to_string(),
            mtu,
            overlay_range: session.config.overlay_range.parse().ok(),
        }),
    )
    .await?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupted"),
        _ = term.recv() => info!("terminated"),
        _ = down_rx.recv() => info!("tern down requested"),
    }
    // Our TURN allocation is freed on the server now rather than when its lifetime ends.
    if let Some((free, server)) = shared.set_turn(None) {
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.send_to(&free, server)).await;
    }
    let _ = std::fs::remove_file(&sock);
    platform::net::remove_rules(iface);
    if let Some(mut h) = host_dns.lock().unwrap_or_else(|e| e.into_inner()).take() {
        h.restore();
    }
    info!("tunnel down");
    Ok(())
}

/// The resolver for peer names and nameserver groups: waits for the map's names, listens on the
/// overlay address, then points the host's resolver at it (again whenever the domains change).
async fn run_dns(
    ip: std::net::IpAddr,
    state_dir: PathBuf,
    iface: String,
    mut cfg: watch::Receiver<dns::Config>,
    host: Arc<std::sync::Mutex<Option<dns::host::HostDns>>>,
    status: Arc<std::sync::Mutex<dns::Status>>,
) {
    let set =
        |f: &dyn Fn(&mut dns::Status)| f(&mut status.lock().unwrap_or_else(|e| e.into_inner()));
    while cfg.borrow_and_update().domain.is_empty() {
        if cfg.changed().await.is_err() {
            return;
        }
    }
    let sockets = match dns::server::bind(ip).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%ip, error = %e, "cannot listen for DNS on {ip}:53: peer names stay off (is another resolver bound there?)");
            set(&|s| {
                s.state = "failed".into();
                s.error =
                    format!("cannot listen on {ip}:53 ({e}); is another resolver bound there?");
            });
            return;
        }
    };
    let h = dns::host::HostDns::new(&state_dir, &iface, ip);
    let mode = match h.mode {
        dns::host::Mode::Resolved => "systemd-resolved",
        dns::host::Mode::ResolvConf => "resolv.conf",
    };
    set(&|s| {
        s.state = "on".into();
        s.resolver = format!("{ip}:53");
        s.host = mode.into();
    });
    let resolver = dns::server::Resolver {
        cfg: cfg.clone(),
        upstream: h.upstream.clone(),
    };
    *host.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    tokio::spawn(dns::server::serve(sockets, resolver));
    loop {
        let domains = cfg.borrow_and_update().routed_domains();
        let r = match host.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(h) => h.apply(ip, &domains),
            None => Ok(()),
        };
        if let Err(e) = &r {
            warn!(error = %e, "cannot point the host's resolver at tern: peer names resolve only when asked at {ip} directly");
        }
        set(&|s| {
            s.domains = domains.clone();
            s.error = r
                .as_ref()
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
        });
        if cfg.changed().await.is_err() {
            return;
        }
    }
}

/// The map's TCP relays (URLs in the map's order, the same for every agent) and the token.
type TcpRelays = Option<(Vec<String>, String)>;

/// While connected to a relay other than the map's first, how often the first is tried again
/// (so that agents that moved come back together and meet on one relay).
const TCP_RELAY_PREFERRED_RETRY: Duration = Duration::from_secs(30);
/// Most datagrams taken from the TCP relay connection (or queued for it) at a time.
const TCP_RELAY_BATCH: usize = 64;

/// A request for the relay's view of this agent (`tern diagnose`), answered when the relay
/// replies (dropped unanswered when no relay is connected).
pub type ViewRequest = tokio::sync::oneshot::Sender<tern_proto::relay_ws::RelayView>;

/// Keeps one TCP/WebSocket relay connection (the fallback path) while the map names a relay.
/// The map's first relay is used; when it cannot be reached the next one is (every agent that
/// cannot reach it does the same, so they meet there), and the first is tried again every 30 s.
async fn tcp_relay_loop(
    engine: Arc<engine::Engine>,
    mut cfg: watch::Receiver<TcpRelays>,
    mut views: mpsc::Receiver<ViewRequest>,
    last_error: Arc<std::sync::Mutex<String>>,
) {
    let set_error = |e: String| {
        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    };
    let mut backoff = tern_backoff::Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(30),
        std::time::Instant::now(),
    );
    // Which relay of the list to try next, and failures in a row.
    let (mut at, mut failures) = (0usize, 0usize);
    loop {
        let Some((urls, token)) = cfg.borrow_and_update().clone() else {
            engine.set_tcp_out(None);
            at = 0;
            if cfg.changed().await.is_err() {
                return;
            }
            continue;
        };
        let i = at % urls.len().max(1);
        let Some(url) = urls.get(i).cloned() else {
            continue;
        };
        let client =
            match tern_relay_client::RelayClient::connect(&url, &token, Some(tls_roots())).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%url, error = %e, "TCP relay connection failed");
                    set_error(format!("{url}: {e:#}"));
                    failures += 1;
                    at = i + 1;
                    // Every relay of the list failed once more: back off before the next round.
                    if failures % urls.len() == 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                            _ = cfg.changed() => { at = 0; }
                        }
                    }
                    continue;
                }
            };
        backoff.succeeded();
        failures = 0;
        set_error(String::new());
        info!(%url, fallback = i > 0, "TCP relay connected");
        let mut waiting: std::collections::VecDeque<ViewRequest> = Default::default();
        let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(1024);
        engine.set_tcp_out(Some(tx));
        let mut client = client;
        // Datagrams are taken a batch at a time both ways: what is queued without waiting, up to
        // TCP_RELAY_BATCH (one flush of the WebSocket; one lock of the core and coalesced TUN
        // writes).
        let mut batch: Vec<(String, Vec<u8>)> = Vec::with_capacity(TCP_RELAY_BATCH);
        let mut tcp_rx = crate::engine::TcpRx::default();
        let mut preferred = tokio::time::interval_at(
            tokio::time::Instant::now() + TCP_RELAY_PREFERRED_RETRY,
            TCP_RELAY_PREFERRED_RETRY,
        );
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some((to, d)) = out else { break };
                    // What else is queued joins it, up to a batch, then one flush.
                    let mut ok = client.feed(&to, &d).await.is_ok();
                    for _ in 1..TCP_RELAY_BATCH {
                        if !ok { break; }
                        let Ok((to, d)) = rx.try_recv() else { break };
                        ok = client.feed(&to, &d).await.is_ok();
                    }
                    if !ok || client.flush().await.is_err() { break; }
                }
                inc = client.recv_any() => {
                    use futures::FutureExt;
                    use tern_relay_client::Incoming;
                    let mut next = Some(inc);
                    let mut closed = false;
                    // The first message, then what is already there (recv_any is cancel-safe).
                    while let Some(inc) = next.take() {
                        match inc {
                            Ok(Some(Incoming::Datagram(from, d))) => batch.push((from, d)),
                            Ok(Some(Incoming::View(v))) => {
                                if let Some(w) = waiting.pop_front() {
                                    let _ = w.send(v);
                                }
                            }
                            _ => {
                                closed = true;
                                break;
                            }
                        }
                        if batch.len() < TCP_RELAY_BATCH {
                            next = client.recv_any().now_or_never();
                        }
                    }
                    if !batch.is_empty() {
                        engine.handle_tcp(&batch, &mut tcp_rx).await;
                        batch.clear();
                    }
                    if closed { break; }
                }
                Some(req) = views.recv() => {
                    waiting.truncate(8);
                    waiting.push_back(req);
                    if client.request_view().await.is_err() { break; }
                }
                _ = preferred.tick(), if i > 0 => {
                    if tern_relay_client::RelayClient::connect(&urls[0], &token, Some(tls_roots())).await.is_ok() {
                        info!(url = %urls[0], "the first TCP relay answers again: moving back to it");
                        at = 0;
                        break;
                    }
                }
                _ = cfg.changed() => {
                    at = 0;
                    break;
                }
            }
        }
        engine.set_tcp_out(None);
        if at != 0 || i == 0 {
            set_error("the connection was lost; reconnecting".into());
            warn!(%url, "TCP relay connection lost");
        }
    }
}

/// TLS trust for wss relay URLs: the system's roots (Debian's ca-certificates bundle) plus
/// TERN_CA_FILE (a PEM file) for private CAs and self-signed test certificates.
fn tls_roots() -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut files = vec![PathBuf::from("/etc/ssl/certs/ca-certificates.crt")];
    if let Some(extra) = control::ca_file() {
        files.push(extra);
    }
    for f in files {
        if let Ok(iter) = rustls::pki_types::CertificateDer::pem_file_iter(&f) {
            for c in iter.flatten() {
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    Arc::new(cfg.unwrap_or_else(|_| {
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }))
}

/// How often an IPv6-only host without a NAT64 prefix asks its resolver again (a DNS64 resolver
/// that was not up at boot).
const NAT64_RETRY: Duration = Duration::from_secs(30);

/// When the host's addresses change (new network, DHCP renew, roaming): looks for the network's
/// NAT64 prefix again and retries ICE at once. A new prefix re-reads the map's relay URLs
/// (`nat64_changed`) and redials management and the public-service tunnels.
async fn watch_addresses(
    engine: Arc<engine::Engine>,
    nat64: Arc<nat64::Nat64>,
    nat64_changed: watch::Sender<()>,
    servers: Arc<control::Servers>,
    publisher: Arc<publish::Publisher>,
) {
    let mut last = addresses();
    let mut asked = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = addresses();
        let moved = now != last;
        let missing =
            nat64.ipv6_only() && nat64.prefix().is_none() && asked.elapsed() >= NAT64_RETRY;
        if moved {
            info!("local addresses changed; retrying direct paths");
        }
        if moved || missing {
            asked = tokio::time::Instant::now();
            if nat64.refresh().await {
                nat64_changed.send_replace(());
                let dial: Vec<String> = servers.urls().iter().map(|u| nat64.url(u)).collect();
                if let Err(e) = servers.redial(dial) {
                    warn!(error = %e, "cannot dial management at its new address");
                }
                if let Err(e) = publisher.redial(&servers.current_dial()) {
                    warn!(error = %e, "cannot dial management's tunnels at its new address");
                }
            }
        }
        if moved {
            engine.retry_ice_now();
            last = now;
        }
    }
}

fn addresses() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    // IPv4 addresses: the kernel's fib trie lists local ones.
    v.extend(
        std::fs::read_to_string("/proc/net/fib_trie")
            .unwrap_or_default()
            .lines()
            .map(str::to_string),
    );
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_have_no_raw_nulls_and_say_why() {
        let p = serde_json::json!({
            "name": "home-b", "overlay_ip": "100.64.0.3", "state": "connecting",
            "connection": "none", "path_reason": "ICE is starting; the TCP relay carries traffic meanwhile",
            "local_candidate": null, "remote_candidate": null, "latency_ms": null,
            "last_handshake_secs_ago": null, "bytes_rx": 3_500_000u64, "bytes_tx": 12u64,
        });
        let lines = peer_lines(&p, true).join("\n");
        assert!(!lines.contains("null"), "{lines}");
        assert!(lines.contains("ICE is starting"), "{lines}");
        assert!(lines.contains("no handshake yet"), "{lines}");
        assert!(lines.contains("received 3.3 MiB, sent 12 B"), "{lines}");
        let q = serde_json::json!({
            "name": "gw", "overlay_ip": "100.64.0.4", "state": "connected",
            "connection": "turn_relay", "path_reason": "no direct pair got through the NATs; ICE relays through TURN",
            "local_candidate": "relay 203.0.113.1:50000", "remote_candidate": "srflx 198.51.100.2:4000",
            "latency_ms": 12.34, "last_handshake_secs_ago": 3, "bytes_rx": 0, "bytes_tx": 0,
        });
        let lines = peer_lines(&q, true).join("\n");
        assert!(
            lines.contains("via TURN") && lines.contains("rtt 12.3 ms"),
            "{lines}"
        );
        assert!(
            lines.contains("pair relay 203.0.113.1:50000 <-> srflx 198.51.100.2:4000"),
            "{lines}"
        );
        assert!(lines.contains("handshake 3 s ago"), "{lines}");
        assert!(
            !lines.contains("policies let") && !lines.contains("no policy"),
            "no access word: nothing to say: {lines}"
        );
        let mut r = q.clone();
        r["access"] = "none".into();
        r["last_handshake_secs_ago"] = 150.into();
        let lines = peer_lines(&r, true).join("\n");
        assert!(
            lines.contains("no policy lets this peer reach it (it may reach this peer)"),
            "{lines}"
        );
        assert!(lines.contains("handshake 2 min ago"), "{lines}");
        r["access"] = "tcp 22, 443".into();
        r["sent_without_policy"] = 4.into();
        let lines = peer_lines(&r, false).join("\n");
        assert!(
            lines.contains(
                "policies let this peer use tcp 22, 443; 4 packets sent anyway were dropped by it"
            ),
            "{lines}"
        );
    }
}
