//! Test helper run inside network namespaces: a TCP sink that prints the SHA-256 and length of
//! what it received, and a source that sends N pseudo-random bytes and prints the same.
//!   tern-nettool serve PORT          (one connection, then exit)
//!   tern-nettool send ADDR:PORT BYTES

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("serve") => serve(args.get(2).map(String::as_str).unwrap_or("5001")),
        Some("send") => send(
            args.get(2).map(String::as_str).unwrap_or(""),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
        ),
        _ => Err("usage: tern-nettool serve PORT | send ADDR:PORT BYTES".to_string()),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-nettool: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(port: &str) -> Result<(), String> {
    let l = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| e.to_string())?;
    println!("listening");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut s, from) = l.accept().map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let k = s.read(&mut buf).map_err(|e| e.to_string())?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    println!("{} {n} {}", hex::encode(h.finalize()), from.ip());
    Ok(())
}

fn send(addr: &str, bytes: u64) -> Result<(), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(
        &addr.parse().map_err(|_| format!("bad address {addr:?}"))?,
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut left = bytes;
    let mut buf = vec![0u8; 65536];
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        for b in buf[..k].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        s.write_all(&buf[..k]).map_err(|e| e.to_string())?;
        h.update(&buf[..k]);
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = vec![];
    let _ = s.read_to_end(&mut rest);
    println!(
        "{} {bytes} {:.2}s",
        hex::encode(h.finalize()),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
