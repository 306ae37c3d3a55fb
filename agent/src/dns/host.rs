//! Pointing the host's resolver at the agent for the network's names, and putting it back.
//!
//! With systemd-resolved (/etc/resolv.conf links to its stub), the interface gets our resolver
//! and routing-only domains (`~tern.internal`), so only those names come to us; resolved drops
//! that when the interface goes, crash or not. Otherwise /etc/resolv.conf names our resolver
//! alone (we pass every other name to the nameservers it named before); the original is saved in
//! the state directory first and written back on `tern down`, or at the next start after a
//! crash. The file is rewritten in place (a bind-mounted resolv.conf, as in network namespaces,
//! stays bound).

use anyhow::{bail, Context};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

const RESOLV_CONF: &str = "/etc/resolv.conf";
const BACKUP: &str = "resolv.conf.before-tern";
const MARKER: &str = "# Written by tern";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// systemd-resolved: per-interface DNS and routing domains.
    Resolved,
    /// /etc/resolv.conf rewritten (saved first).
    ResolvConf,
}

/// The host's resolver configuration while the agent runs.
pub struct HostDns {
    pub mode: Mode,
    iface: String,
    backup: PathBuf,
    /// The nameservers the host used before (for names that are not ours).
    pub upstream: Vec<SocketAddr>,
    applied: Option<Vec<String>>,
}

fn resolved_present() -> bool {
    let stub = std::fs::read_link(RESOLV_CONF)
        .map(|t| t.to_string_lossy().contains("systemd/resolve"))
        .unwrap_or(false);
    stub && which("resolvectl").is_some()
}

fn which(bin: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// The nameservers a resolv.conf names (port 53), except `skip`.
pub fn nameservers(conf: &str, skip: Option<IpAddr>) -> Vec<SocketAddr> {
    conf.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| Some(*ip) != skip)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Our resolv.conf: our resolver alone, with the original's other lines (search, options).
pub fn ours(original: &str, iface: &str, ip: IpAddr, domains: &[String]) -> String {
    let mut s = format!(
        "{MARKER} for {iface}: it answers {} itself and passes every other name to the\n# nameservers this file named before. `tern down` puts the original back.\nnameserver {ip}\n",
        domains.join(", ")
    );
    for l in original.lines() {
        let t = l.trim_start();
        if t.starts_with("nameserver")
            || t.starts_with(MARKER)
            || t.starts_with("# nameservers this file")
        {
            continue;
        }
        s.push_str(l);
        s.push('\n');
    }
    s
}

fn write_in_place(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Puts back a resolv.conf a crashed run left changed (before anything else touches it).
pub fn restore_leftovers(state_dir: &Path) {
    if put_back(state_dir) {
        info!("restored {RESOLV_CONF} as it was before an earlier run that did not stop cleanly");
    }
}

/// Writes the saved resolv.conf back and removes the copy; true if there was one to put back.
fn put_back(state_dir: &Path) -> bool {
    let backup = state_dir.join(BACKUP);
    let Ok(original) = std::fs::read_to_string(&backup) else {
        return false;
    };
    match write_in_place(Path::new(RESOLV_CONF), &original) {
        Ok(()) => {
            let _ = std::fs::remove_file(&backup);
            true
        }
        Err(e) => {
            warn!(error = %e, "cannot restore {RESOLV_CONF} from {}", backup.display());
            false
        }
    }
}

impl HostDns {
    /// Reads how the host resolves (nothing changes yet).
    pub fn new(state_dir: &Path, iface: &str, our_ip: IpAddr) -> HostDns {
        let mode = if resolved_present() {
            Mode::Resolved
        } else {
            Mode::ResolvConf
        };
        let upstream = match mode {
            Mode::Resolved => vec![],
            Mode::ResolvConf => std::fs::read_to_string(RESOLV_CONF)
                .map(|c| nameservers(&c, Some(our_ip)))
                .unwrap_or_default(),
        };
        HostDns {
            mode,
            iface: iface.to_string(),
            backup: state_dir.join(BACKUP),
            upstream,
            applied: None,
        }
    }

    /// Sends `domains` to our resolver at `ip` (again only when they changed).
    pub fn apply(&mut self, ip: IpAddr, domains: &[String]) -> anyhow::Result<()> {
        if self.applied.as_deref() == Some(domains) {
            return Ok(());
        }
        match self.mode {
            Mode::Resolved => {
                let run = |args: &[String]| -> anyhow::Result<()> {
                    let out = std::process::Command::new("resolvectl")
                        .args(args)
                        .output()
                        .context("running resolvectl")?;
                    if !out.status.success() {
                        bail!(
                            "resolvectl {}: {}",
                            args.join(" "),
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                    Ok(())
                };
                run(&["dns".into(), self.iface.clone(), ip.to_string()])?;
                let mut d = vec!["domain".to_string(), self.iface.clone()];
                d.extend(domains.iter().map(|x| format!("~{x}")));
                run(&d)?;
                run(&["default-route".into(), self.iface.clone(), "false".into()])?;
            }
            Mode::ResolvConf => {
                let current = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
                if !self.backup.exists() {
                    if current.starts_with(MARKER) {
                        bail!("{RESOLV_CONF} was written by tern but its saved original is gone: fix it by hand, then run tern up again");
                    }
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&self.backup)
                        .with_context(|| format!("saving {RESOLV_CONF}"))?;
                    f.write_all(current.as_bytes())?;
                    f.sync_all()?;
                }
                let original = std::fs::read_to_string(&self.backup)?;
                write_in_place(
                    Path::new(RESOLV_CONF),
                    &ours(&original, &self.iface, ip, domains),
                )?;
            }
        }
        info!(mode = ?self.mode, domains = ?domains, resolver = %ip, "host resolver: these names go to tern");
        self.applied = Some(domains.to_vec());
        Ok(())
    }

    /// Puts the host's resolver configuration back.
    pub fn restore(&mut self) {
        if self.applied.take().is_none() {
            return;
        }
        match self.mode {
            Mode::Resolved => {
                let _ = std::process::Command::new("resolvectl")
                    .args(["revert", &self.iface])
                    .output();
            }
            Mode::ResolvConf => {
                if put_back(self.backup.parent().unwrap_or(Path::new("."))) {
                    info!("{RESOLV_CONF} restored as it was before tern started");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_file_keeps_search_and_options_and_names_only_us() {
        let original = "# from DHCP\nnameserver 203.0.113.53\nnameserver fe80::1%eth0\nsearch corp.example\noptions edns0\n";
        let ip: IpAddr = "100.64.0.2".parse().expect("ip");
        let s = ours(original, "tern0", ip, &["tern.internal".into()]);
        assert!(s.starts_with(MARKER));
        assert_eq!(nameservers(&s, None), vec![SocketAddr::new(ip, 53)]);
        assert!(s.contains("search corp.example\noptions edns0\n"), "{s}");
        assert!(s.contains("# from DHCP"), "{s}");
        assert_eq!(
            nameservers(original, None),
            vec![
                "203.0.113.53:53".parse().expect("a"),
                "[fe80::1]:53".parse().expect("a")
            ]
        );
        // Written over our own file (a second apply), nothing doubles.
        let again = ours(&s, "tern0", ip, &["tern.internal".into()]);
        let servers = again
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .count();
        assert_eq!(servers, 1, "{again}");
        assert_eq!(again.matches(MARKER).count(), 1, "{again}");
    }
}
