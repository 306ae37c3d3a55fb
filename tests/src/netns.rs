//! Network-namespace lab for end-to-end tests (after `shared/lab/netns.sh`):
//!
//! ```text
//!            <p>-inet: bridge br0 = "the internet", 203.0.113.0/24
//!      ┌──────────────────────┼──────────────────────┐
//!  <p>-ra wan .11          <p>-srv .10            <p>-rb wan .12
//!  NAT easy|hard           tern-server            NAT easy|hard
//!      │ lan 192.0.2.1                               │ lan 198.51.100.1
//!  <p>-ha 192.0.2.2                              <p>-hb 198.51.100.2
//! ```
//! Easy NAT: nft `masquerade` (port-preserving); hard NAT: `masquerade random,fully-random`.
//! Both routers drop unsolicited inbound packets. Every name carries a random prefix so two runs
//! never collide; `Drop` kills the processes it started (by PID) and deletes the namespaces, also
//! when a test fails.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SERVER_IP: &str = "203.0.113.10";
/// What every lab namespace starts with as its resolv.conf.
pub const LAB_RESOLV_CONF: &str =
    "# lab namespace\nnameserver 203.0.113.53\noptions timeout:1 attempts:2\n";
/// Network-specific NAT64 prefix of the lab carrier (the well-known one refuses documentation
/// addresses, RFC 6052).
pub const NAT64_PREFIX: &str = "2001:db8:64:ff9b::/96";
/// The server's IPv4-embedded address under `NAT64_PREFIX`.
pub const SERVER_NAT64: &str = "2001:db8:64:ff9b::cb00:710a";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    Easy,
    Hard,
}

pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    pub dir: tempfile::TempDir,
    veths: u32,
}

/// Whether this machine can run the namespace suites (root + `ip`).
pub fn available() -> bool {
    nix_is_root() && Path::new("/usr/sbin/ip").exists()
        || Path::new("/sbin/ip").exists() && nix_is_root()
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Path of a workspace binary built next to the running test (target/<profile>/NAME).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

impl Lab {
    /// The internet bridge and the server namespace.
    pub fn new() -> anyhow::Result<Lab> {
        let prefix = format!("t{:04x}", rand::random::<u16>());
        let mut lab = Lab {
            prefix,
            namespaces: vec![],
            children: vec![],
            dir: tempfile::tempdir()?,
            veths: 0,
        };
        let inet = lab.add_ns("inet")?;
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &inet, "link", "set", "br0", "up"])?;
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &inet,
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
            ])
            .output();
        let srv = lab.add_ns("srv")?;
        lab.link_to_bridge(&srv, "eth0", &format!("{SERVER_IP}/24"))?;
        Ok(lab)
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// A namespace with only its loopback (for a process that reaches the world through
    /// [`forward_into`] alone).
    pub fn add_bare(&mut self, name: &str) -> anyhow::Result<String> {
        self.add_ns(name)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<String> {
        let n = self.ns(name);
        ip(&["netns", "add", &n])?;
        self.namespaces.push(n.clone());
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        // Its own resolv.conf (`ip netns exec` binds it over /etc/resolv.conf): an agent that
        // points the resolver at itself changes this file, never the host's.
        let etc = Path::new("/etc/netns").join(&n);
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), LAB_RESOLV_CONF)?;
        Ok(n)
    }

    /// The resolv.conf processes in namespace `ns` see.
    pub fn resolv_conf(&self, ns: &str) -> PathBuf {
        Path::new("/etc/netns").join(ns).join("resolv.conf")
    }

    /// A veth pair between two namespaces, named `a_if`/`b_if` inside them.
    fn veth(&mut self, a: &str, a_if: &str, b: &str, b_if: &str) -> anyhow::Result<()> {
        self.veths += 1;
        let (x, y) = (
            format!("{}a{}", self.prefix, self.veths),
            format!("{}b{}", self.prefix, self.veths),
        );
        ip(&["link", "add", &x, "type", "veth", "peer", "name", &y])?;
        ip(&["link", "set", &x, "netns", a])?;
        ip(&["link", "set", &y, "netns", b])?;
        ip(&["-n", a, "link", "set", &x, "name", a_if])?;
        ip(&["-n", b, "link", "set", &y, "name", b_if])?;
        ip(&["-n", a, "link", "set", a_if, "up"])?;
        ip(&["-n", b, "link", "set", b_if, "up"])?;
        Ok(())
    }

    fn link_to_bridge(&mut self, ns: &str, ifname: &str, cidr: &str) -> anyhow::Result<()> {
        let inet = self.ns("inet");
        let port = format!("p{}", self.veths + 1);
        self.veth(ns, ifname, &inet, &port)?;
        ip(&["-n", &inet, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", ns, "addr", "add", cidr, "dev", ifname])?;
        Ok(())
    }

    /// A home behind a NAT router: `tag` "a" uses WAN .11 and LAN 192.0.2.0/24, "b" uses .12 and
    /// 198.51.100.0/24. Returns the home namespace name.
    pub fn add_home(&mut self, tag: &str, nat: Nat) -> anyhow::Result<String> {
        let (wan, lan) = match tag {
            "a" => ("203.0.113.11", "192.0.2"),
            "b" => ("203.0.113.12", "198.51.100"),
            "c" => ("203.0.113.13", "192.0.2"),
            _ => bail!("unknown home {tag:?}"),
        };
        let r = self.add_ns(&format!("r{tag}"))?;
        let h = self.add_ns(&format!("h{tag}"))?;
        self.link_to_bridge(&r, "eth0", &format!("{wan}/24"))?;
        self.veth(&r, "eth1", &h, "eth0")?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            "eth1",
        ])?;
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{lan}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &h,
            "route",
            "add",
            "default",
            "via",
            &format!("{lan}.1"),
        ])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]))?;
        let masq = match nat {
            Nat::Easy => "masquerade",
            Nat::Hard => "masquerade random,fully-random",
        };
        let rules = r#"table ip tern_nat {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" MASQ
  }
}
table inet tern_fw {
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "eth0" ct state established,related accept
    iifname "eth0" drop
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "eth0" ct state new,invalid drop
  }
}
"#
        .replace("MASQ", masq);
        self.nft(&r, &rules)?;
        Ok(h)
    }

    /// A LAN behind home `home_ns` (which must forward): a device at 192.168.50.10 whose network
    /// 192.168.50.0/24 the home reaches on its eth1 (192.168.50.1). Returns the LAN namespace.
    pub fn add_lan(&mut self, home_ns: &str) -> anyhow::Result<String> {
        self.add_lan_named(home_ns, "lan", "192.168.50")
    }

    /// A LAN `<net>.0/24` behind `home_ns` (on its eth1, `<net>.1`) with a device `<net>.10` in a
    /// namespace called `name`.
    pub fn add_lan_named(
        &mut self,
        home_ns: &str,
        name: &str,
        net: &str,
    ) -> anyhow::Result<String> {
        let lan = self.add_ns(name)?;
        self.veth(home_ns, "eth1", &lan, "eth0")?;
        ip(&[
            "-n",
            home_ns,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            "eth1",
        ])?;
        ip(&[
            "-n",
            &lan,
            "addr",
            "add",
            &format!("{net}.10/24"),
            "dev",
            "eth0",
        ])?;
        Ok(lan)
    }

    /// A host on the "internet" bridge with no agent and no NAT (e.g. a supplier's server), at
    /// `ip` in 203.0.113.0/24. Returns its namespace.
    pub fn add_internet_host(&mut self, name: &str, ip: &str) -> anyhow::Result<String> {
        let ns = self.add_ns(name)?;
        self.link_to_bridge(&ns, "eth0", &format!("{ip}/24"))?;
        Ok(ns)
    }

    /// A home whose uplink is IPv6 only, behind a carrier NAT64 (tayga + NAT44 masquerade) with
    /// the network-specific prefix `NAT64_PREFIX`; the gateway's IPv4 side is 203.0.113.14 on the
    /// internet bridge. Returns the home namespace (2001:db8:64:1::2, no IPv4 route).
    pub fn add_nat64_home(&mut self) -> anyhow::Result<String> {
        let g = self.add_ns("g6")?;
        let h = self.add_ns("h6")?;
        self.link_to_bridge(&g, "eth0", "203.0.113.14/24")?;
        self.veth(&g, "eth1", &h, "eth0")?;
        ip(&[
            "-n",
            &h,
            "-6",
            "addr",
            "add",
            "2001:db8:64:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            &h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:64:1::1",
        ])?;
        ip(&[
            "-n",
            &g,
            "-6",
            "addr",
            "add",
            "2001:db8:64:1::1/64",
            "dev",
            "eth1",
            "nodad",
        ])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &g,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        let conf = self.dir.path().join("tayga.conf");
        let data = self.dir.path().join("tayga");
        std::fs::create_dir_all(&data)?;
        std::fs::write(
            &conf,
            format!(
                "tun-device nat64\nipv4-addr 192.0.2.1\nipv6-addr 2001:db8:64:ff::1\nprefix {NAT64_PREFIX}\ndynamic-pool 192.0.2.0/24\ndata-dir {}\n",
                data.display()
            ),
        )?;
        let conf_s = conf.display().to_string();
        run(Command::new("ip").args(["netns", "exec", &g, "tayga", "-c", &conf_s, "--mktun"]))?;
        ip(&["-n", &g, "link", "set", "nat64", "up"])?;
        ip(&["-n", &g, "addr", "add", "203.0.113.14/32", "dev", "nat64"])?;
        ip(&[
            "-n",
            &g,
            "-6",
            "addr",
            "add",
            "2001:db8:64:1::1/128",
            "dev",
            "nat64",
            "nodad",
        ])?;
        ip(&["-n", &g, "route", "add", "192.0.2.0/24", "dev", "nat64"])?;
        ip(&["-n", &g, "-6", "route", "add", NAT64_PREFIX, "dev", "nat64"])?;
        ip(&[
            "-n",
            &g,
            "-6",
            "route",
            "add",
            "2001:db8:64:ff::1/128",
            "dev",
            "nat64",
        ])?;
        self.nft(
            &g,
            r#"table ip tern_nat64 {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "eth0" ip saddr 192.0.2.0/24 masquerade
  }
}
"#,
        )?;
        let tayga = PathBuf::from("/usr/sbin/tayga");
        self.spawn("tayga", &g, &tayga, &["-c", &conf_s, "-d"], &[])?;
        Ok(h)
    }

    /// The carrier's resolver for the NAT64 home (`home_ns` from [`Lab::add_nat64_home`]):
    /// dnsmasq on the gateway at 2001:db8:64:1::1, which the home's resolv.conf names. With
    /// `dns64` it answers `ipv4only.arpa` as a DNS64 resolver does (RFC 7050: its well-known
    /// IPv4 addresses, and the same embedded in `NAT64_PREFIX` as AAAA); without, as a resolver
    /// without DNS64 (the IPv4 addresses only). Replaces a resolver started before.
    pub fn carrier_resolver(&mut self, home_ns: &str, dns64: bool) -> anyhow::Result<()> {
        self.stop("dns64");
        let g = self.ns("g6");
        let prefix: ipnet::Ipv6Net = NAT64_PREFIX.parse()?;
        let mut o = prefix.network().octets();
        let mut records = vec!["192.0.0.170".to_string(), "192.0.0.171".to_string()];
        if dns64 {
            for last in [170u8, 171] {
                o[12..].copy_from_slice(&[192, 0, 0, last]);
                records.push(std::net::Ipv6Addr::from(o).to_string());
            }
        }
        let host_record = format!("--host-record=ipv4only.arpa,{}", records.join(","));
        let dnsmasq = PathBuf::from("/usr/sbin/dnsmasq");
        self.spawn(
            "dns64",
            &g,
            &dnsmasq,
            &[
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--user=root",
                "--pid-file=",
                "--bind-interfaces",
                "--listen-address=2001:db8:64:1::1",
                "--log-queries",
                "--log-facility=-",
                &host_record,
            ],
            &[],
        )?;
        std::fs::write(
            self.resolv_conf(home_ns),
            "# the carrier's resolver\nnameserver 2001:db8:64:1::1\noptions timeout:1 attempts:2\n",
        )?;
        // Ready when it answers.
        self.wait_for("the carrier's resolver", Duration::from_secs(10), || {
            let out = self.exec(home_ns, &["getent", "ahosts", "ipv4only.arpa"]);
            out.status.success()
        })?;
        Ok(())
    }

    /// One LAN (a bridge) shared by several homes that can all route into it: the device is
    /// 192.168.50.10, home i gets 192.168.50.(i+1). Returns the device's namespace.
    pub fn add_shared_lan(&mut self, homes: &[&str]) -> anyhow::Result<String> {
        let br = self.add_ns("lanbr")?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &br,
                "sysctl",
                "-qw",
                "net.bridge.bridge-nf-call-iptables=0",
            ])
            .output();
        let lan = self.add_ns("lan")?;
        self.veth(&lan, "eth0", &br, "d0")?;
        ip(&["-n", &br, "link", "set", "d0", "master", "br0"])?;
        ip(&["-n", &lan, "addr", "add", "192.168.50.10/24", "dev", "eth0"])?;
        for (i, h) in homes.iter().enumerate() {
            let port = format!("h{i}");
            self.veth(h, "eth1", &br, &port)?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&[
                "-n",
                h,
                "addr",
                "add",
                &format!("192.168.50.{}/24", i + 1),
                "dev",
                "eth1",
            ])?;
        }
        Ok(lan)
    }

    /// Lowers the MTU of every "internet" link (router WANs, server, bridge) to `mtu` and makes the
    /// routers drop the ICMP "fragmentation needed" / "packet too big" they would send or forward:
    /// a path-MTU black hole.
    pub fn pmtu_blackhole(&self, mtu: u32) -> anyhow::Result<()> {
        let m = mtu.to_string();
        let inet = self.ns("inet");
        let ports =
            String::from_utf8_lossy(&self.exec(&inet, &["ip", "-o", "link", "show"]).stdout)
                .to_string();
        for line in ports.lines() {
            if let Some(name) = line
                .split(':')
                .nth(1)
                .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            {
                if name != "lo" && !name.is_empty() {
                    ip(&["-n", &inet, "link", "set", &name, "mtu", &m])?;
                }
            }
        }
        ip(&["-n", &self.ns("srv"), "link", "set", "eth0", "mtu", &m])?;
        for r in self
            .namespaces
            .iter()
            .filter(|n| n.ends_with("-ra") || n.ends_with("-rb") || n.ends_with("-rc"))
        {
            ip(&["-n", r, "link", "set", "eth0", "mtu", &m])?;
            self.nft(
                r,
                "table inet tern_pmtu {
  chain forward {
    type filter hook forward priority -10; policy accept;
    icmp type destination-unreachable icmp code frag-needed drop
    icmpv6 type packet-too-big drop
  }
  chain output {
    type filter hook output priority -10; policy accept;
    icmp type destination-unreachable icmp code frag-needed drop
    icmpv6 type packet-too-big drop
  }
}
",
            )?;
        }
        Ok(())
    }

    /// Forgets every NAT mapping of a router (as a reboot or mapping timeout would).
    pub fn flush_nat(&self, router: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args(["netns", "exec", router, "conntrack", "-F"])).map(|_| ())
    }

    /// Loads nftables rules into a namespace.
    pub fn nft(&self, ns: &str, rules: &str) -> anyhow::Result<()> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(rules.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {ns} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs a command in a namespace and waits for it.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"))
    }

    /// Starts a long-running process in a namespace, logging to `<dir>/<label>.log`.
    pub fn spawn(
        &mut self,
        label: &str,
        ns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(format!("{label}.log")))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().with_context(|| format!("starting {label}"))?;
        let pid = child.id();
        self.children.push((label.to_string(), child));
        Ok(pid)
    }

    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{label}.log"))).unwrap_or_default()
    }

    /// Stops a process started with `spawn` (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            terminate(&mut child);
        }
    }

    /// Kills a process started with `spawn` with SIGKILL (a crash: no clean-up runs).
    pub fn crash(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `cond` holds, polling every 200 ms, up to `limit`.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if cond() {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("timed out after {limit:?} waiting for {what}")
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut() {
            terminate(c);
        }
        for n in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(n));
        }
    }
}

/// A TCP listener at `addr` inside namespace `ns`: created by a helper thread that joins the
/// namespace (a socket stays in the namespace it was made in; this process's other threads
/// stay where they are).
pub fn listen_in(ns: &str, addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {path}"))?;
        let l =
            std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr} in {path}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace helper thread panicked"))?
}

/// Makes this process's loopback TCP port `port` reachable inside namespace `ns` at
/// 127.0.0.1:`port` (a userspace relay: connections accepted there are carried to the host's
/// loopback). Lets an agent in a namespace reach a server running in the test process. Ends
/// when the returned task is aborted.
pub fn forward_into(ns: &str, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let l = listen_in(ns, std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    let l = tokio::net::TcpListener::from_std(l)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inside, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut out).await;
                }
            });
        }
    }))
}
