//! `tern service install|uninstall`: the agent as a systemd service, so `tern up` need not stay in
//! a terminal. Install joins first when given a setup key (the service then starts with no key),
//! writes the unit (this binary, this state and run directory, this interface), and enables and
//! starts it. Where systemd does not run, it says so and leaves the unit for the admin.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where units are written; `TERN_SYSTEMD_DIR` overrides it (images built offline, tests), and
/// then systemd is left alone: the unit is only written (or removed).
pub fn unit_dir() -> PathBuf {
    offline_dir().unwrap_or_else(|| PathBuf::from("/etc/systemd/system"))
}

fn offline_dir() -> Option<PathBuf> {
    std::env::var_os("TERN_SYSTEMD_DIR").map(PathBuf::from)
}

/// `tern.service` for the default interface, `tern-IFACE.service` for another.
pub fn unit_name(iface: &str) -> String {
    if iface == "tern0" {
        "tern.service".into()
    } else {
        format!("tern-{iface}.service")
    }
}

/// The unit for this binary and these directories.
pub fn unit(exe: &Path, state_dir: &Path, run_dir: &Path, iface: &str) -> String {
    let args = format!(
        "--state-dir {} --run-dir {} --interface {iface}",
        state_dir.display(),
        run_dir.display()
    );
    format!(
        "# Written by `tern service install`; `tern service uninstall` removes it.
[Unit]
Description=Tern mesh VPN agent ({iface})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={exe} {args} up
ExecStop={exe} {args} down
Restart=on-failure
RestartSec=3
# The agent creates a TUN device, routes and nftables rules.
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
UMask=0077

[Install]
WantedBy=multi-user.target
",
        exe = exe.display()
    )
}

/// Whether systemd manages this host (its runtime directory exists) and `systemctl` is here.
fn systemd_running() -> bool {
    offline_dir().is_none()
        && Path::new("/run/systemd/system").is_dir()
        && Command::new("systemctl")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("running systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the unit and, under systemd, enables and starts it.
pub fn install(state_dir: &Path, run_dir: &Path, iface: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let state_dir = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let dir = unit_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = unit_name(iface);
    let path = dir.join(&name);
    std::fs::write(&path, unit(&exe, &state_dir, run_dir, iface))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("tern: wrote {}", path.display());
    if offline_dir().is_some() {
        println!("tern: TERN_SYSTEMD_DIR is set: the unit is written, not enabled");
        return Ok(());
    }
    if !systemd_running() {
        bail!(
            "systemd does not run on this host, so {name} was written but not started: start the agent with `tern up` (or your init system)"
        );
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "--now", &name])?;
    println!(
        "tern: {name} is enabled and running (it starts at boot); `tern status` shows it, `journalctl -u {name}` its log"
    );
    Ok(())
}

/// Stops and disables the service and removes the unit.
pub fn uninstall(iface: &str) -> anyhow::Result<()> {
    let name = unit_name(iface);
    let path = unit_dir().join(&name);
    if !path.exists() {
        bail!(
            "no tern service is installed for {iface} ({} does not exist)",
            path.display()
        );
    }
    if systemd_running() {
        systemctl(&["disable", "--now", &name])?;
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if systemd_running() {
        systemctl(&["daemon-reload"])?;
    }
    println!("tern: {name} stopped and removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_this_binary_with_these_directories() {
        let u = unit(
            Path::new("/usr/local/bin/tern"),
            Path::new("/var/lib/tern"),
            Path::new("/run/tern"),
            "tern0",
        );
        assert!(u.contains(
            "ExecStart=/usr/local/bin/tern --state-dir /var/lib/tern --run-dir /run/tern --interface tern0 up\n"
        ));
        assert!(u.contains("ExecStop=/usr/local/bin/tern --state-dir /var/lib/tern --run-dir /run/tern --interface tern0 down\n"));
        assert!(u.contains("WantedBy=multi-user.target"));
        assert_eq!(unit_name("tern0"), "tern.service");
        assert_eq!(unit_name("wg-office"), "tern-wg-office.service");
    }
}
