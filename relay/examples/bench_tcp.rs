//! TCP/WebSocket relay throughput between two local clients, plain and TLS (prints figures).
//! One sender pushes 1,200-byte datagrams for a fixed time; the receiver counts what arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_relay::metrics::Metrics;
use tern_relay::{Relay, RelayConfig};
use tern_relay_client::RelayClient;

const SECRET: &[u8] = b"bench";

fn token(peer: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + 3600;
    let c = tern_proto::relay_auth::issue(SECRET, peer, exp);
    format!("{}:{}", c.username, c.password)
}

async fn run(
    relay: &Relay,
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    label: &str,
) -> anyhow::Result<()> {
    let mut tx = RelayClient::connect(url, &token("tx"), tls.clone()).await?;
    let mut rx = RelayClient::connect(url, &token("rx"), tls).await?;
    while relay.tcp.connected() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drops0 = Metrics::get(&relay.metrics.tcp_drops_total);
    let dur = Duration::from_secs(5);
    let payload = vec![0x5au8; 1200];
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        let end = Instant::now() + dur + Duration::from_millis(500);
        while let Ok(Ok(Some(_))) = tokio::time::timeout_at(end.into(), rx.recv()).await {
            n += 1;
        }
        n
    });
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        tx.send("rx", &payload).await?;
        sent += 1;
    }
    let got = counter.await?;
    let secs = dur.as_secs_f64();
    println!(
        "{label:<6} sent {sent:>8} recv {got:>8} ({:.0} msg/s, {:.0} Mbit/s payload), dropped at relay {}",
        got as f64 / secs,
        got as f64 * 1200.0 * 8.0 / secs / 1e6,
        Metrics::get(&relay.metrics.tcp_drops_total) - drops0
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let relay = Relay::start(RelayConfig::new(
        "127.0.0.1:0".parse()?,
        "127.0.0.1".parse()?,
        SECRET.to_vec(),
    ))
    .await?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let plain_url = format!("ws://127.0.0.1:{}/relay", plain.local_addr()?.port());
    tokio::spawn(tern_relay::tls::serve(
        plain,
        relay.router(),
        None,
        rx.clone(),
    ));

    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let server = tern_relay::tls::server_config(vec![cert.clone()], key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tls_url = format!("wss://localhost:{}/relay", tls.local_addr()?.port());
    tokio::spawn(tern_relay::tls::serve(
        tls,
        relay.router(),
        Some(server),
        rx,
    ));

    run(&relay, &plain_url, None, "ws").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run(&relay, &tls_url, Some(Arc::new(client)), "wss").await?;
    let _ = stop.send(true);
    relay.close().await;
    Ok(())
}
