//! Everything the agent asks of the operating system, behind one module per OS: the TUN device
//! (`tun`), kernel routes, the routing peer's forwarding rules and facts about the host's networks
//! (`net`), and UDP socket options (`sockopt`). The rest of the agent (and the sans-IO core in
//! `tern-tunnel`) calls only what this module exports, so a macOS or Windows port adds a module
//! beside `linux` instead of touching the data path.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!(
    "the Tern agent runs on Linux today: add src/platform/<os>/ with tun, net and sockopt"
);
