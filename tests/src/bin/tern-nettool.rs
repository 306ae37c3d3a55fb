//! Test helper run inside network namespaces. Every mode prints one result line (and servers print
//! "listening" first), so tests read outcomes from logs or stdout.
//!
//!   tern-nettool serve PORT [--proxy]   one TCP connection: prints "<sha256> <bytes> <source ip>"
//!                                        (--proxy: the source from a PROXY v2 header)
//!   tern-nettool send ADDR:PORT BYTES    sends BYTES pseudo-random bytes: "<sha256> <bytes> <secs>s"
//!   tern-nettool source PORT BYTES       every connection gets BYTES pseudo-random bytes, then EOF
//!   tern-nettool fetch ADDR:PORT BYTES   reads to EOF: "<sha256> <bytes> <secs>s" (fails if short)
//!   tern-nettool echo PORT               TCP echo server, any number of connections
//!   tern-nettool burst ADDR:PORT N BYTES N connections at once, each echoes BYTES: "ok <n> of <N>"
//!   tern-nettool connects ADDR:PORT N    N sequential connect + 1-byte echo: "p50 <ms> p99 <ms>"
//!   tern-nettool udp-echo PORT           UDP echo server
//!   tern-nettool udp-ping ADDR:PORT N    N request/response datagrams: "sent N received M wrong W"
//!   tern-nettool flood ADDR:PORT N SECS  opens N TCP connections, holds them SECS: "opened <n>"
//!   tern-nettool udp-blast ADDR:PORT MBIT SECS  1,000-byte datagrams at MBIT Mbit/s for SECS
//!                                        (at most 60 s): "sent <n>"
//!   tern-nettool hold ADDR:PORT SECS     one connection held until closed by the peer or SECS:
//!                                        "closed after <secs>s" or "still open"

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let a = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let n = |i: usize| a(i).parse::<u64>().unwrap_or(0);
    let r = match a(1) {
        "serve" => serve(a(2), a(3) == "--proxy"),
        "send" => send(a(2), n(3)),
        "source" => source(a(2), n(3)),
        "fetch" => fetch(a(2), n(3)),
        "echo" => echo(a(2)),
        "burst" => burst(a(2), n(3), n(4)),
        "connects" => connects(a(2), n(3)),
        "udp-echo" => udp_echo(a(2)),
        "udp-ping" => udp_ping(a(2), n(3)),
        "flood" => flood(a(2), n(3), n(4)),
        "udp-blast" => udp_blast(a(2), n(3), n(4)),
        "hold" => hold(a(2), n(3)),
        _ => Err("usage: see the top of tern-nettool.rs".to_string()),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-nettool: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("bad address {s:?}"))
}

fn listening() -> Result<(), String> {
    println!("listening");
    std::io::stdout().flush().map_err(err)
}

fn listen(port: &str) -> Result<TcpListener, String> {
    TcpListener::bind(format!("0.0.0.0:{port}")).map_err(err)
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can hash what they move.
struct Gen(u64);

impl Gen {
    fn new() -> Gen {
        Gen(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

fn write_random(s: &mut TcpStream, bytes: u64) -> Result<String, String> {
    let mut h = Sha256::new();
    let mut g = Gen::new();
    let mut left = bytes;
    let mut buf = vec![0u8; 65536];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..k]);
        s.write_all(&buf[..k]).map_err(err)?;
        h.update(&buf[..k]);
        left -= k as u64;
    }
    Ok(hex::encode(h.finalize()))
}

fn read_all(s: &mut TcpStream) -> Result<(String, u64), String> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let k = s.read(&mut buf).map_err(err)?;
        if k == 0 {
            return Ok((hex::encode(h.finalize()), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Strips a PROXY protocol v2 header, returning the source address it names.
fn proxy_source(s: &mut TcpStream) -> Result<String, String> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).map_err(err)?;
    if &head[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return Err("no PROXY v2 header".into());
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(err)?;
    match head[13] >> 4 {
        1 if len >= 12 => {
            Ok(std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]).to_string())
        }
        2 if len >= 36 => {
            let o: [u8; 16] = body[..16].try_into().map_err(err)?;
            Ok(std::net::Ipv6Addr::from(o).to_canonical().to_string())
        }
        f => Err(format!("unexpected address family {f}")),
    }
}

fn serve(port: &str, proxy: bool) -> Result<(), String> {
    let l = listen(port)?;
    listening()?;
    let (mut s, from) = l.accept().map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err)?;
    let src = if proxy {
        proxy_source(&mut s)?
    } else {
        from.ip().to_string()
    };
    let (hash, n) = read_all(&mut s)?;
    println!("{hash} {n} {src}");
    Ok(())
}

fn send(to: &str, bytes: u64) -> Result<(), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr(to)?, Duration::from_secs(10)).map_err(err)?;
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(err)?;
    let hash = write_random(&mut s, bytes)?;
    s.shutdown(std::net::Shutdown::Write).map_err(err)?;
    let mut rest = vec![];
    let _ = s.read_to_end(&mut rest);
    println!("{hash} {bytes} {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

fn source(port: &str, bytes: u64) -> Result<(), String> {
    let l = listen(port)?;
    listening()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
            if let Ok(h) = write_random(&mut s, bytes) {
                println!("sent {h} {bytes}");
            }
        });
    }
    Ok(())
}

fn fetch(from: &str, bytes: u64) -> Result<(), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr(from)?, Duration::from_secs(10)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err)?;
    let (hash, n) = read_all(&mut s)?;
    println!("{hash} {n} {:.2}s", start.elapsed().as_secs_f64());
    if n != bytes {
        return Err(format!("got {n} of {bytes} bytes"));
    }
    Ok(())
}

fn echo(port: &str) -> Result<(), String> {
    let l = listen(port)?;
    listening()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
            let mut buf = vec![0u8; 65536];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 || s.write_all(&buf[..k]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// One connection: sends `bytes`, reads the echo back, compares.
fn echo_once(to: SocketAddr, bytes: u64, seed: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err)?;
    let mut w = s.try_clone().map_err(err)?;
    let writer = std::thread::spawn(move || {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15 ^ seed);
        let mut buf = vec![0u8; 65536];
        let mut left = bytes;
        let mut h = Sha256::new();
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            g.fill(&mut buf[..k]);
            w.write_all(&buf[..k]).map_err(err)?;
            h.update(&buf[..k]);
            left -= k as u64;
        }
        w.shutdown(std::net::Shutdown::Write).map_err(err)?;
        Ok::<_, String>(hex::encode(h.finalize()))
    });
    let (got, n) = read_all(&mut s)?;
    let sent = writer.join().map_err(|_| "writer panicked".to_string())??;
    if n != bytes || got != sent {
        return Err(format!("echo mismatch: {n} of {bytes} bytes"));
    }
    Ok(())
}

fn burst(to: &str, conns: u64, bytes: u64) -> Result<(), String> {
    let to = addr(to)?;
    let handles: Vec<_> = (0..conns)
        .map(|i| std::thread::spawn(move || echo_once(to, bytes, i)))
        .collect();
    let mut ok = 0;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("thread panicked".into());
            }
        }
    }
    println!("ok {ok} of {conns}");
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn connects(to: &str, n: u64) -> Result<(), String> {
    let to = addr(to)?;
    let mut ms = vec![];
    for _ in 0..n {
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).map_err(err)?;
        s.set_nodelay(true).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(err)?;
        s.write_all(b"x").map_err(err)?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(err)?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    println!("p50 {:.3} p99 {:.3}", pick(0.5), pick(0.99));
    Ok(())
}

fn udp_echo(port: &str) -> Result<(), String> {
    let s = UdpSocket::bind(format!("0.0.0.0:{port}")).map_err(err)?;
    listening()?;
    let mut buf = [0u8; 65536];
    loop {
        let (n, from) = s.recv_from(&mut buf).map_err(err)?;
        let _ = s.send_to(&buf[..n], from);
    }
}

fn udp_blast(to: &str, mbit: u64, secs: u64) -> Result<(), String> {
    let to = addr(to)?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(err)?;
    let payload = [0x5au8; 1000];
    let per_sec = (mbit.clamp(1, 1000) * 1_000_000 / 8000).max(1);
    let gap = Duration::from_secs_f64(1.0 / per_sec as f64);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs.min(60));
    let mut sent = 0u64;
    while Instant::now() < end {
        // Errors (a full socket buffer) are part of blasting: keep the pace.
        if s.send_to(&payload, to).is_ok() {
            sent += 1;
        }
        let due = start + gap * (sent as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    println!("sent {sent}");
    Ok(())
}

fn udp_ping(to: &str, n: u64) -> Result<(), String> {
    let to = addr(to)?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(err)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(err)?;
    // Each datagram names this client and its sequence number: a reply meant for another client
    // counts as wrong.
    let me = std::process::id();
    let (mut received, mut wrong) = (0u64, 0u64);
    let mut buf = [0u8; 2048];
    for seq in 0..n {
        let msg = format!("{me}:{seq}:{}", "x".repeat(100));
        s.send_to(msg.as_bytes(), to).map_err(err)?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((k, _)) if buf[..k] == *msg.as_bytes() => {
                    received += 1;
                    break;
                }
                Ok((k, _)) => {
                    let text = String::from_utf8_lossy(&buf[..k]);
                    if !text.starts_with(&format!("{me}:")) {
                        wrong += 1;
                    }
                }
                Err(_) => break,
            }
        }
    }
    println!("sent {n} received {received} wrong {wrong}");
    Ok(())
}

fn flood(to: &str, n: u64, secs: u64) -> Result<(), String> {
    let to = addr(to)?;
    let mut held = Vec::with_capacity(n as usize);
    for _ in 0..n {
        // Connections that never send a byte (half-open from the service's point of view).
        if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            held.push(s);
        }
    }
    println!("opened {}", held.len());
    std::io::stdout().flush().map_err(err)?;
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn hold(to: &str, secs: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr(to)?, Duration::from_secs(10)).map_err(err)?;
    println!("connected");
    std::io::stdout().flush().map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(secs)))
        .map_err(err)?;
    let t0 = Instant::now();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) if t0.elapsed() < Duration::from_secs(secs) => {
                println!("closed after {:.2}s", t0.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok(k) if k > 0 => continue,
            _ => {
                println!("still open");
                return Ok(());
            }
        }
    }
}
