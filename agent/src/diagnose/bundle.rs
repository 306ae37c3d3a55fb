//! `tern diagnose --bundle FILE.tar.gz`: what a supporter needs in one file — the status, the
//! diagnose report, the daemon's recent log, interfaces, routes, rules, firewall and versions —
//! with every secret the agent holds (private key, management token, relay credentials, setup
//! key) replaced by `[redacted]`, and setup keys found anywhere masked too. The daemon assembles
//! and redacts the files (it knows the secrets); the CLI only writes the archive.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// The bundle's files, already redacted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Files {
    pub files: Vec<(String, String)>,
}

pub const REDACTED: &str = "[redacted]";

/// Replaces every secret (at least 8 characters) and every `tern_sk_…` setup key in `text`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    let mut secrets: Vec<&String> = secrets.iter().filter(|s| s.len() >= 8).collect();
    // Longer first, so that a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets {
        out = out.replace(s.as_str(), REDACTED);
        // JSON escapes '/' in none of our encoders, but base64 '+' and '/' may be escaped by
        // others: cover the \u002f form too.
        let escaped = s.replace('/', "\\/");
        if escaped != *s {
            out = out.replace(&escaped, REDACTED);
        }
    }
    let mut masked = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("tern_sk_") {
        masked.push_str(&rest[..i + "tern_sk_".len()]);
        rest = &rest[i + "tern_sk_".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 {
            masked.push_str(REDACTED);
        }
        rest = &rest[end..];
    }
    masked.push_str(rest);
    masked
}

/// Output of a system command (bounded to 3 s), headed by the command line.
async fn command(args: &[&str]) -> String {
    let mut s = format!("$ {}\n", args.join(" "));
    let Some((prog, rest)) = args.split_first() else {
        return s;
    };
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::process::Command::new(prog)
            .args(rest)
            .kill_on_drop(true)
            .output(),
    )
    .await
    {
        Err(_) => s.push_str("(no answer within 3 s)\n"),
        Ok(Err(e)) => s.push_str(&format!("(cannot run: {e})\n")),
        Ok(Ok(o)) => {
            s.push_str(&String::from_utf8_lossy(&o.stdout));
            s.push_str(&String::from_utf8_lossy(&o.stderr));
        }
    }
    s.push('\n');
    s
}

/// The host's network state as text.
pub async fn system() -> String {
    let mut s = format!(
        "tern {} ({} {})\n\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    for c in [
        &["uname", "-a"][..],
        &["ip", "-d", "addr", "show"],
        &["ip", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show"],
        &["ip", "rule", "show"],
        &["nft", "list", "ruleset"],
        &[
            "sysctl",
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
            "net.ipv4.conf.all.rp_filter",
        ],
        &["ss", "-uanp"],
    ] {
        s.push_str(&command(c).await);
    }
    s
}

/// One file in a ustar archive: header (512 bytes) and content padded to 512.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], mtime: u64) {
    let mut h = [0u8; 512];
    let n = name.as_bytes();
    h[..n.len().min(99)].copy_from_slice(&n[..n.len().min(99)]);
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, 0o600);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, data.len() as u64);
    octal(&mut h, 136, 12, mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// Writes the files as a gzip-compressed tar archive under a `tern-diagnose/` directory (mode
/// 0600: it describes the host's network).
pub fn write(path: &Path, files: &Files) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut tar = vec![];
    for (name, content) in &files.files {
        tar_entry(
            &mut tar,
            &format!("tern-diagnose/{name}"),
            content.as_bytes(),
            mtime,
        );
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    gz.write_all(&tar)?;
    gz.finish()?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_and_any_setup_key_is_redacted() {
        let secrets = vec![
            "cHJpdmF0ZS1r/ZXktYmFzZTY0+LzEy=".to_string(),
            "eyJhbGciOi.token.sig".to_string(),
            "short".to_string(),
        ];
        let text = "key cHJpdmF0ZS1r/ZXktYmFzZTY0+LzEy= and cHJpdmF0ZS1r\\/ZXktYmFzZTY0+LzEy= \
            {\"token\":\"eyJhbGciOi.token.sig\"} joined with tern_sk_AbC-123_x, tern_sk_ alone; short stays";
        let r = redact(text, &secrets);
        assert!(!r.contains("cHJpdmF0ZS1r"), "{r}");
        assert!(!r.contains("eyJhbGciOi"), "{r}");
        assert!(!r.contains("AbC-123"), "{r}");
        assert!(
            r.contains("tern_sk_[redacted],") && r.contains("tern_sk_ alone"),
            "{r}"
        );
        assert!(r.contains("short stays"), "too short to be a secret: {r}");
    }

    #[test]
    fn the_archive_is_a_tar_gz_that_tar_reads() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("b.tar.gz");
        let files = Files {
            files: vec![
                ("status.json".into(), "{\"a\":1}\n".into()),
                ("log.txt".into(), "x".repeat(1000)),
            ],
        };
        write(&p, &files).expect("write");
        let out = std::process::Command::new("tar")
            .args(["-tzvf"])
            .arg(&p)
            .output()
            .expect("tar");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{list}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            list.contains("tern-diagnose/status.json") && list.contains("1000"),
            "{list}"
        );
        let x = std::process::Command::new("tar")
            .args(["-xzf"])
            .arg(&p)
            .arg("-C")
            .arg(dir.path())
            .output()
            .expect("tar");
        assert!(x.status.success());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tern-diagnose/status.json")).expect("read"),
            "{\"a\":1}\n"
        );
    }
}
