//! The local control socket: `tern status` and `tern down` talk to the daemon over a Unix socket
//! in a root-only directory (mode 0700, socket 0600).

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub peer_id: String,
    pub overlay_address: String,
    pub public_key: String,
    pub management: bool,
    /// The management replica in use (its URL), and how many the agent was given.
    #[serde(default)]
    pub management_url: String,
    #[serde(default)]
    pub management_replicas: usize,
    pub signal: bool,
    pub tcp_relay: bool,
    /// The map's TURN servers, their round trips from this host and the one in use.
    #[serde(default)]
    pub relays: Vec<crate::relays::RelayStatus>,
    pub peers: Vec<serde_json::Value>,
    /// Routed networks this peer uses, and through which routing peer.
    #[serde(default)]
    pub routes: Vec<serde_json::Value>,
    /// Networks this peer routes for others.
    #[serde(default)]
    pub serving: Vec<String>,
    /// Inbound packets dropped by the policy filter.
    #[serde(default)]
    pub firewall_dropped: u64,
    /// Peer approval is required and an admin has not approved this peer yet.
    #[serde(default)]
    pub pending_approval: bool,
    /// Public services whose clients this peer carries to their target.
    #[serde(default)]
    pub services: Vec<crate::publish::ServiceStatus>,
    /// Present when management refuses this peer for good: `removed` (an admin deleted it) or
    /// `login_expired`; the agent no longer retries.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub management_refused: String,
    /// The resolver for peer names and nameserver groups.
    #[serde(default)]
    pub dns: crate::dns::Status,
    /// Only on a host without an IPv4 route: the NAT64 prefix IPv4 addresses go through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat64: Option<crate::nat64::Status>,
}

pub fn socket_path(run_dir: &Path, iface: &str) -> PathBuf {
    run_dir.join(format!("{iface}.sock"))
}

/// Serves requests: "status" -> JSON status; "down" -> answer, then `on_down` fires;
/// "expose <json>" -> publishes a port through management and unpublishes it when the caller
/// closes the connection (its `tern expose` ended).
pub async fn serve(
    path: PathBuf,
    status: impl Fn() -> Status + Send + Sync + 'static,
    down: tokio::sync::mpsc::Sender<()>,
    expose: std::sync::Arc<crate::publish::ExposeClient>,
    diagnose: std::sync::Arc<crate::diagnose::run::Context>,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let status = std::sync::Arc::new(status);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            let down = down.clone();
            let expose = expose.clone();
            let diagnose = diagnose.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                if let Some(args) = line.trim().strip_prefix("diagnose ") {
                    let reply = match serde_json::from_str::<crate::diagnose::Args>(args) {
                        Err(e) => serde_json::json!({ "error": format!("malformed diagnose request: {e}") }).to_string(),
                        Ok(a) => serde_json::to_string(&crate::diagnose::run::run(&diagnose, &a).await)
                            .unwrap_or_default(),
                    };
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                    return;
                }
                if let Some(args) = line.trim().strip_prefix("expose ") {
                    let reply = match serde_json::from_str::<crate::publish::ExposeArgs>(args) {
                        Err(e) => Err(format!("malformed expose request: {e}")),
                        Ok(a) => expose.expose(&a).await,
                    };
                    let (text, id) = match reply {
                        Ok(x) => (
                            serde_json::to_string(&x).unwrap_or_default(),
                            Some(x.service_id),
                        ),
                        Err(e) => (serde_json::json!({ "error": e }).to_string(), None),
                    };
                    let _ = w.write_all(format!("{text}\n").as_bytes()).await;
                    if let Some(id) = id {
                        // Held until `tern expose` ends (Ctrl-C closes the connection).
                        let mut sink = vec![];
                        let _ = r.read_to_end(&mut sink).await;
                        expose.unexpose(&id).await;
                    }
                    return;
                }
                let reply = match line.trim() {
                    "status" => serde_json::to_string(&status()).unwrap_or_default(),
                    "down" => {
                        let _ = down.send(()).await;
                        "{\"ok\":true}".to_string()
                    }
                    other => format!("{{\"error\":\"unknown command {other:?}\"}}"),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            });
        }
    });
    Ok(())
}

/// Asks the daemon to publish a port; the returned connection keeps it published.
pub async fn expose(
    path: &Path,
    args: &crate::publish::ExposeArgs,
) -> anyhow::Result<(crate::publish::Exposed, UnixStream)> {
    let mut s = connect(path).await?;
    s.write_all(format!("expose {}\n", serde_json::to_string(args)?).as_bytes())
        .await?;
    let mut line = vec![];
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 || b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&line).context("the daemon sent a malformed answer")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e}");
    }
    Ok((
        serde_json::from_value(v).context("the daemon sent a malformed answer")?,
        s,
    ))
}

/// Resolves when the daemon closes the connection.
pub async fn closed(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
}

async fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!(
                "the tern daemon is not running (no socket at {})",
                path.display()
            )
        }
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {}: run as root", path.display())
        }
        _ => anyhow::anyhow!("cannot reach the daemon at {}: {e}", path.display()),
    })
}

pub async fn request(path: &Path, cmd: &str) -> anyhow::Result<String> {
    let mut s = connect(path).await?;
    s.write_all(format!("{cmd}\n").as_bytes()).await?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).await?;
    Ok(out)
}
