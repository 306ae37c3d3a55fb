//! tern-tunnel: the agent's data plane as a state machine without I/O (no tokio, no locks, no
//! sockets; time is passed in). The `tern` binary is the shell around it: TUN device, sockets,
//! ICE sessions, signal, management, kernel routes. See [`Node`].
//!
//! - [`Node`]: peers and their WireGuard sessions (boringtun), cryptokey routing through an
//!   allowed-IPs trie, the policy filter, the path per peer with its reason, ICE retry schedule.
//! - [`allowed_ips`]: longest-prefix match, allocation-free.
//! - [`firewall`]: the stateful inbound policy filter.
//! - [`routing`]: which routing peer serves each routed network (HA without flapping).
//! - [`reach`]: each side's reachability and why a pair between two sides runs through a relay.
//! - [`backoff`]: the one retry schedule (the `tern-backoff` crate, shared with the shells).

pub mod allowed_ips;
pub use tern_backoff as backoff;
pub mod firewall;
#[cfg(feature = "map")]
pub mod map;
mod node;
pub mod packet;
pub mod probe;
pub mod reach;
pub mod routing;

pub use node::*;
