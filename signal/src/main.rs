//! `tern-signal`: the signal service on its own (split deployments).
use clap::Parser;
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Tern signal service: sealed ICE messages between peers"
)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "TERN_SIGNAL_LISTEN", default_value = "0.0.0.0:10000")]
    listen: SocketAddr,
    /// The peer-token secret management uses (TERN_PEER_TOKEN_SECRET there too).
    #[arg(long, env = "TERN_PEER_TOKEN_SECRET", hide_env_values = true)]
    peer_token_secret: SecretString,
    /// The PostgreSQL database management uses (TERN_DATABASE_URL there too): with it, several
    /// signal replicas pass messages to each other's peers. Without it, run one signal service.
    #[arg(long, env = "TERN_DATABASE_URL", hide_env_values = true)]
    database_url: Option<SecretString>,
    /// Sustained messages per second per peer.
    #[arg(long, env = "TERN_SIGNAL_RATE", default_value_t = 50.0)]
    rate: f64,
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match try_main(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn try_main(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let opts = tern_signal::SignalOptions {
            rate_per_sec: args.rate,
            burst: (args.rate * 4.0).max(10.0),
        };
        let sig = tern_signal::Signal::new(
            args.peer_token_secret.expose_secret().as_bytes().to_vec(),
            opts,
        );
        if let Some(url) = &args.database_url {
            let url = url.expose_secret();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                anyhow::bail!("--database-url must be a postgres:// URL (replicas share one PostgreSQL); leave it out for a single signal service");
            }
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string();
            let origin = format!("signal-{host}-{}-{}", args.listen.port(), std::process::id());
            tern_signal::bus::attach(&sig, url, &origin)?;
        }
        tracing::info!(listen = %args.listen, "signal listening");
        tonic::transport::Server::builder()
            .add_service(sig.service())
            .serve_with_shutdown(args.listen, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
