//! The client of Tern's TCP/TLS fallback relay: a WebSocket (over TLS with `wss://`) that carries
//! WireGuard datagrams to and from other peers by peer id, in the frames of
//! [`tern_proto::relay_ws`]. The agent keeps one open when UDP is blocked; tests and benchmarks use
//! it as a peer would.

pub use tern_proto::relay_ws::{decode_frame, encode_frame, RelayView, MAX_DATAGRAM, VIEW_REQUEST};

/// What arrives from the relay.
#[derive(Debug)]
pub enum Incoming {
    /// A datagram: (sender peer id, bytes).
    Datagram(String, Vec<u8>),
    /// The answer to [`RelayClient::request_view`].
    View(RelayView),
}

use anyhow::{anyhow, Context};
use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct RelayClient {
    ws: WebSocketStream<Box<dyn Io>>,
}

impl RelayClient {
    /// Connects to `url` (`ws://host:port/relay` or `wss://...`) with a token from the network map.
    /// `tls` supplies the trust roots for `wss` (defaults to none: pass a config).
    pub async fn connect(
        url: &str,
        token: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let mut req = url
            .into_client_request()
            .with_context(|| format!("bad relay URL {url:?}"))?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| anyhow!("token is not a valid header value"))?,
        );
        let uri = req.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("relay URL {url:?} has no host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let secure = uri.scheme_str() == Some("wss");
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if secure {
            let cfg = tls.ok_or_else(|| anyhow!("wss URL needs a TLS client config"))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| anyhow!("bad TLS server name {host:?}"))?;
            Box::new(
                tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake with relay")?,
            )
        } else {
            Box::new(tcp)
        };
        let (ws, _) = tokio_tungstenite::client_async(req, io)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => anyhow!(
                    "relay refused the connection ({}): {}",
                    r.status(),
                    r.body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default()
                ),
                e => anyhow!("WebSocket handshake with relay failed: {e}"),
            })?;
        Ok(RelayClient { ws })
    }

    pub async fn send(&mut self, to_peer: &str, datagram: &[u8]) -> anyhow::Result<()> {
        self.feed(to_peer, datagram).await?;
        self.flush().await
    }

    /// Queues a datagram for the relay without flushing (a batch then leaves with one
    /// [`RelayClient::flush`]).
    pub async fn feed(&mut self, to_peer: &str, datagram: &[u8]) -> anyhow::Result<()> {
        let f = encode_frame(to_peer, datagram)
            .ok_or_else(|| anyhow!("peer id or datagram too long"))?;
        self.ws
            .feed(Message::Binary(f.into()))
            .await
            .context("relay send")
    }

    /// Sends what [`RelayClient::feed`] queued.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.ws.flush().await.context("relay send")
    }

    /// Asks the relay for its view of this client; the answer arrives as [`Incoming::View`].
    pub async fn request_view(&mut self) -> anyhow::Result<()> {
        self.ws
            .send(Message::Text(VIEW_REQUEST.into()))
            .await
            .context("relay send")
    }

    /// Next datagram or view; None when the relay closed the connection. Cancel-safe: it waits
    /// only for the next message, so a read dropped while waiting loses nothing.
    pub async fn recv_any(&mut self) -> anyhow::Result<Option<Incoming>> {
        while let Some(m) = self.ws.next().await {
            match m.context("relay receive")? {
                Message::Binary(f) => {
                    let (from, d) =
                        decode_frame(&f).ok_or_else(|| anyhow!("malformed frame from relay"))?;
                    return Ok(Some(Incoming::Datagram(from.to_string(), d.to_vec())));
                }
                Message::Text(t) => {
                    if let Ok(v) = serde_json::from_str::<RelayView>(t.as_str()) {
                        return Ok(Some(Incoming::View(v)));
                    }
                }
                Message::Close(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Next datagram as (sender peer id, bytes); None when the relay closed the connection.
    pub async fn recv(&mut self) -> anyhow::Result<Option<(String, Vec<u8>)>> {
        while let Some(m) = self.ws.next().await {
            match m.context("relay receive")? {
                Message::Binary(f) => {
                    let (from, d) =
                        decode_frame(&f).ok_or_else(|| anyhow!("malformed frame from relay"))?;
                    return Ok(Some((from.to_string(), d.to_vec())));
                }
                Message::Close(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Sends raw bytes as one binary message (for robustness tests).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .context("relay send")
    }
}
