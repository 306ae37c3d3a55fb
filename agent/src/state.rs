//! The agent's state directory: its WireGuard private key (generated once, mode 0600) and the
//! config that lets a restart rejoin without the setup key.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tern_proto::SecretKey;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedConfig {
    pub management_url: String,
    pub hostname: String,
    pub interface: String,
    /// MTU override from the command line (None = the management setting).
    pub mtu: Option<u32>,
    /// The management server's key at the first join (base64); a server presenting another key
    /// is refused until the peer joins again with a setup key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key: Option<String>,
    /// `--nat64-prefix` as last given ("auto", "off" or a prefix; None: never given, auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat64_prefix: Option<String>,
    /// `--no-dns` as last given.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_dns: bool,
}

pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting state dir {}", dir.display()))?;
        Ok(StateDir { dir })
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("private.key")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The private key, generated and stored (0600) on first use.
    pub fn key(&self) -> anyhow::Result<SecretKey> {
        let p = self.key_path();
        if p.exists() {
            let mode = std::fs::metadata(&p)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by others (mode {mode:o}); fix with chmod 600",
                    p.display()
                );
            }
            let s =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            return SecretKey::from_base64(&s)
                .with_context(|| format!("{} does not hold a WireGuard key", p.display()));
        }
        let k = SecretKey::generate();
        write_private(&p, k.to_base64().as_bytes())?;
        Ok(k)
    }

    pub fn load_config(&self) -> anyhow::Result<Option<SavedConfig>> {
        let p = self.config_path();
        if !p.exists() {
            return Ok(None);
        }
        let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Some(serde_json::from_str(&s).with_context(|| {
            format!("{} is not valid", p.display())
        })?))
    }

    pub fn save_config(&self, c: &SavedConfig) -> anyhow::Result<()> {
        write_private(
            &self.config_path(),
            serde_json::to_string_pretty(c)?.as_bytes(),
        )
    }
}

/// Writes a file readable only by its owner, atomically (temp file + rename).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_generated_once_with_mode_0600() {
        let d = tempfile::tempdir().expect("tmp");
        let s = StateDir::new(d.path().join("st")).expect("state");
        let k1 = s.key().expect("key");
        let k2 = s.key().expect("key again");
        assert_eq!(k1.public_key(), k2.public_key());
        let mode = std::fs::metadata(d.path().join("st/private.key"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(
            d.path().join("st/private.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(s.key().is_err(), "a world-readable key is refused");
    }

    #[test]
    fn config_round_trips() {
        let d = tempfile::tempdir().expect("tmp");
        let s = StateDir::new(d.path()).expect("state");
        assert!(s.load_config().expect("load").is_none());
        let c = SavedConfig {
            management_url: "http://x:1".into(),
            hostname: "h".into(),
            interface: "tern0".into(),
            mtu: None,
            server_key: Some("AAAA".into()),
            nat64_prefix: Some("64:ff9b::/96".into()),
            no_dns: true,
        };
        s.save_config(&c).expect("save");
        assert_eq!(s.load_config().expect("load"), Some(c));
        // A file written before the settings were saved still loads (with their defaults).
        std::fs::write(
            d.path().join("config.json"),
            r#"{"management_url":"http://x:1","hostname":"h","interface":"tern0","mtu":1400}"#,
        )
        .expect("write");
        let old = s.load_config().expect("load").expect("some");
        assert_eq!(
            (old.mtu, old.nat64_prefix, old.no_dns),
            (Some(1400), None, false)
        );
    }
}
