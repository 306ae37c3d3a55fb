//! The agents' tunnel connections: one control connection per agent and its pool of idle data
//! connections. A public connection takes an idle data connection of the agent that carries it,
//! or asks the agent for one (`Want`) and waits a bounded time.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tern_proto::tunnel::Control;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// A data connection from an agent (an upgraded HTTP connection).
pub trait TunnelIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TunnelIo for T {}
pub type Tunnel = Box<dyn TunnelIo>;

/// Idle data connections kept per agent; more are closed (the agent opens them again on demand).
const MAX_IDLE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("the agent is not connected")]
    Offline,
    #[error("the agent did not open a tunnel within {0:?}")]
    Timeout(Duration),
}

struct Agent {
    generation: u64,
    control: mpsc::Sender<Control>,
    idle: VecDeque<Tunnel>,
    waiters: VecDeque<oneshot::Sender<Tunnel>>,
}

#[derive(Default)]
pub struct Hub {
    agents: Mutex<HashMap<String, Agent>>,
    next: std::sync::atomic::AtomicU64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Agent>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new control connection of `peer` replaces any earlier one (whose receiver then ends).
    /// Returns its generation (for [`Hub::unregister`]) and the frames to send it.
    pub fn register(&self, peer: &str) -> (u64, mpsc::Receiver<Control>) {
        let generation = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        self.lock().insert(
            peer.to_string(),
            Agent {
                generation,
                control: tx,
                idle: VecDeque::new(),
                waiters: VecDeque::new(),
            },
        );
        (generation, rx)
    }

    /// The control connection `generation` of `peer` ended: the agent is offline for public
    /// services; its idle tunnels are closed and waiting clients are told at once.
    pub fn unregister(&self, peer: &str, generation: u64) {
        let mut agents = self.lock();
        if agents.get(peer).is_some_and(|a| a.generation == generation) {
            agents.remove(peer);
        }
    }

    /// Forgets `peer`'s control connection and idle tunnels (they close); waiting clients fail.
    pub fn remove(&self, peer: &str) {
        self.lock().remove(peer);
    }

    pub fn online(&self, peer: &str) -> bool {
        self.lock().contains_key(peer)
    }

    /// Number of agents with a control connection, and their idle tunnels.
    pub fn counts(&self) -> (usize, usize) {
        let agents = self.lock();
        (agents.len(), agents.values().map(|a| a.idle.len()).sum())
    }

    /// A data connection arrived from `peer`: it goes to a waiting client, or to the idle pool.
    pub fn add(&self, peer: &str, mut t: Tunnel) {
        let mut agents = self.lock();
        let Some(a) = agents.get_mut(peer) else {
            return; // no control connection: the agent is reconnecting; it will open more
        };
        while let Some(w) = a.waiters.pop_front() {
            match w.send(t) {
                Ok(()) => return,
                Err(back) => t = back, // that client gave up
            }
        }
        if a.idle.len() < MAX_IDLE {
            a.idle.push_back(t);
        }
    }

    /// Takes a tunnel to `peer`: an idle one at once, else asks the agent for one and waits up to
    /// `wait`.
    pub async fn take(&self, peer: &str, wait: Duration) -> Result<Tunnel, HubError> {
        let rx = {
            let mut agents = self.lock();
            let a = agents.get_mut(peer).ok_or(HubError::Offline)?;
            // (The agent replaces a used tunnel by itself; it is asked only when none is idle.)
            if let Some(t) = a.idle.pop_front() {
                return Ok(t);
            }
            let (tx, rx) = oneshot::channel();
            a.waiters.retain(|w| !w.is_closed());
            a.waiters.push_back(tx);
            let _ = a.control.try_send(Control::Want(1));
            rx
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(t)) => Ok(t),
            // The control connection ended while we waited.
            Ok(Err(_)) => Err(HubError::Offline),
            Err(_) => Err(HubError::Timeout(wait)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel() -> Tunnel {
        Box::new(tokio::io::duplex(64).0)
    }

    #[tokio::test]
    async fn idle_tunnels_are_taken_first_and_replaced_on_demand() {
        let hub = std::sync::Arc::new(Hub::default());
        assert_eq!(
            hub.take("a", Duration::from_millis(10)).await.err(),
            Some(HubError::Offline)
        );
        let (_, mut control) = hub.register("a");
        hub.add("a", tunnel());
        assert!(hub.take("a", Duration::from_millis(10)).await.is_ok());
        assert!(
            control.try_recv().is_err(),
            "nothing asked while tunnels were idle"
        );
        // Nothing idle: the agent is asked and the waiter gets the next tunnel.
        let h = hub.clone();
        let waiter = tokio::spawn(async move { h.take("a", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits for a tunnel");
        assert_eq!(control.try_recv().ok(), Some(Control::Want(1)));
        hub.add("a", tunnel());
        assert!(waiter.await.expect("task").is_ok());
        assert_eq!(
            hub.take("a", Duration::from_millis(20)).await.err(),
            Some(HubError::Timeout(Duration::from_millis(20)))
        );
    }

    #[tokio::test]
    async fn an_agent_going_offline_fails_its_waiters_at_once() {
        let hub = std::sync::Arc::new(Hub::default());
        let (generation, _control) = hub.register("a");
        let h = hub.clone();
        let waiter = tokio::spawn(async move { h.take("a", Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.unregister("a", generation);
        let r = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("answered at once")
            .expect("task");
        assert_eq!(r.err(), Some(HubError::Offline));
        assert!(!hub.online("a"));
    }

    #[tokio::test]
    async fn a_stale_generation_does_not_unregister_a_newer_control_connection() {
        let hub = Hub::default();
        let (old, _c1) = hub.register("a");
        let (_new, _c2) = hub.register("a");
        hub.unregister("a", old);
        assert!(hub.online("a"));
        hub.add("a", tunnel());
        assert_eq!(hub.counts(), (1, 1));
    }
}
