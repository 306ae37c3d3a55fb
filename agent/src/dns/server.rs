//! The agent's resolver on its overlay address, port 53 (UDP and TCP): peer names answered from
//! the map, the rest forwarded (nameserver groups through the tunnel, other names to the host's
//! usual nameservers), each forward bounded in time.

use super::wire::{self, RCODE_FORMERR, RCODE_SERVFAIL};
use super::{decide, Config, Decision};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// How long one nameserver gets to answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries in flight at once.
const IN_FLIGHT: usize = 256;

pub struct Resolver {
    pub cfg: watch::Receiver<Config>,
    pub upstream: Vec<SocketAddr>,
}

impl Resolver {
    /// The answer to one query message (None: nothing to say, e.g. it was not a query).
    pub async fn handle(&self, msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let q = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(wire::WireError::NotQuery) => return None,
            Err(_) => return wire::error_header(msg, RCODE_FORMERR),
        };
        let decision = decide(&self.cfg.borrow(), &q, &self.upstream);
        match decision {
            Decision::Answer(rcode, addrs) => Some(wire::answer(msg, &q, rcode, &addrs)),
            Decision::Forward(servers) => {
                for s in &servers {
                    let r = if tcp {
                        forward_tcp(*s, msg).await
                    } else {
                        forward_udp(*s, msg).await
                    };
                    match r {
                        Ok(a) if a.len() >= 12 && a[..2] == msg[..2] => return Some(a),
                        Ok(_) => debug!(server = %s, "nameserver answered with another id"),
                        Err(e) => {
                            debug!(server = %s, name = %q.name, error = %e, "nameserver did not answer")
                        }
                    }
                }
                Some(wire::answer(msg, &q, RCODE_SERVFAIL, &[]))
            }
        }
    }
}

async fn forward_udp(server: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(server).await?;
    s.send(msg).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(FORWARD_TIMEOUT, s.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))??;
    buf.truncate(n);
    Ok(buf)
}

async fn forward_tcp(server: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(FORWARD_TIMEOUT, async {
        let mut s = TcpStream::connect(server).await?;
        s.write_all(&(msg.len() as u16).to_be_bytes()).await?;
        s.write_all(msg).await?;
        read_framed(&mut s).await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))?
}

async fn read_framed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The resolver's sockets, bound before anything points the host at them.
pub struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

/// Listens on `ip`:53, UDP and TCP.
pub async fn bind(ip: IpAddr) -> std::io::Result<Sockets> {
    let addr = SocketAddr::new(ip, 53);
    Ok(Sockets {
        udp: UdpSocket::bind(addr).await?,
        tcp: TcpListener::bind(addr).await?,
    })
}

/// Serves queries until the sockets fail.
pub async fn serve(s: Sockets, r: Resolver) -> std::io::Result<()> {
    let udp = Arc::new(s.udp);
    let tcp = s.tcp;
    let r = Arc::new(r);
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    let (r2, limit2) = (r.clone(), limit.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let Ok(permit) = limit2.clone().acquire_owned().await else {
                return;
            };
            let r = r2.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // A client may send several queries on one connection; 10 s idle ends it.
                while let Ok(Ok(q)) =
                    tokio::time::timeout(Duration::from_secs(10), read_framed(&mut stream)).await
                {
                    let Some(a) = r.handle(&q, true).await else {
                        return;
                    };
                    if stream
                        .write_all(&(a.len() as u16).to_be_bytes())
                        .await
                        .is_err()
                        || stream.write_all(&a).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "DNS socket failed");
                return Err(e);
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue; // overloaded: the client retries
        };
        let msg = buf[..n].to_vec();
        let (r, udp) = (r.clone(), udp.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(mut a) = r.handle(&msg, false).await {
                if a.len() > 512 && !has_edns(&msg) {
                    // Too big for plain UDP: the truncated flag sends the client to TCP.
                    a.truncate(12);
                    a[2] |= 0x02;
                    a[4..12].fill(0);
                }
                let _ = udp.send_to(&a, from).await;
            }
        });
    }
}

/// Whether a query carries an EDNS OPT record (then larger UDP answers are fine).
fn has_edns(msg: &[u8]) -> bool {
    msg.len() >= 12 && u16::from_be_bytes([msg[10], msg[11]]) > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::{build_query, TYPE_A};

    #[tokio::test]
    async fn forwards_to_the_next_nameserver_when_one_is_silent_and_answers_peers_itself() {
        // A nameserver on loopback that answers everything with one address; a silent one.
        let ns = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let ns_addr = ns.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = ns.recv_from(&mut b).await {
                let q = wire::parse_query(&b[..n]).expect("query");
                let a = wire::answer(&b[..n], &q, 0, &["192.0.2.7".parse().expect("ip")]);
                let _ = ns.send_to(&a, from).await;
            }
        });
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let mut cfg = Config {
            domain: "tern.internal".into(),
            ..Default::default()
        };
        cfg.records
            .insert("b".into(), "100.64.0.3".parse().expect("ip"));
        let (_tx, rx) = watch::channel(cfg);
        let r = Resolver {
            cfg: rx,
            upstream: vec![silent.local_addr().expect("addr"), ns_addr],
        };
        let a = r
            .handle(&build_query(9, "example.com", TYPE_A), false)
            .await
            .expect("answer");
        assert_eq!(
            &a[a.len() - 4..],
            &[192, 0, 2, 7],
            "from the second nameserver"
        );
        let a = r
            .handle(&build_query(9, "b.tern.internal", TYPE_A), false)
            .await
            .expect("answer");
        assert_eq!(&a[a.len() - 4..], &[100, 64, 0, 3]);
        assert_eq!(
            r.handle(&[1, 2, 3], false).await,
            None,
            "too short for a header"
        );
    }
}
