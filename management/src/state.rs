//! Shared state of a running management service: store, keys and secrets, the snapshot cache the
//! sync streams compute maps from, and the count of live sync streams per peer.

use crate::netmap::{NetIndex, RelaySettings};
use crate::store::{Store, StoreError};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tern_proto::SecretKey;
use tokio::sync::Mutex;

/// Options of the management service (the binaries fill them from flags/env).
#[derive(Clone, Debug)]
pub struct ManagementOptions {
    pub relay: RelaySettings,
    /// Relay credentials lifetime; re-issued on the sync stream when half of it has passed.
    pub relay_credentials_ttl: Duration,
    pub peer_token_ttl: Duration,
    pub admin_session_ttl: Duration,
    /// Shared with a separately deployed signal service; generated and stored if not given.
    pub peer_token_secret: Option<Vec<u8>>,
    /// Debounce window for network-map pushes after a change.
    pub sync_debounce: Duration,
}

impl Default for ManagementOptions {
    fn default() -> Self {
        ManagementOptions {
            relay: RelaySettings::default(),
            relay_credentials_ttl: Duration::from_secs(12 * 3600),
            peer_token_ttl: Duration::from_secs(3600),
            admin_session_ttl: Duration::from_secs(12 * 3600),
            peer_token_secret: None,
            sync_debounce: Duration::from_millis(150),
        }
    }
}

pub struct AppState {
    pub store: Store,
    pub server_key: SecretKey,
    pub peer_token_secret: Vec<u8>,
    pub admin_secret: Vec<u8>,
    pub opts: ManagementOptions,
    maps: Mutex<Option<(i64, Arc<NetIndex>)>>,
    streams: std::sync::Mutex<HashMap<String, usize>>,
}

/// 32 random bytes, base64: the form of every generated server secret.
pub fn random_secret_b64() -> String {
    random_b64(32)
}

fn random_b64(n: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    STANDARD.encode(b)
}

impl AppState {
    /// Loads (or creates on first start) the server's keys and secrets from the store.
    pub async fn new(store: Store, mut opts: ManagementOptions) -> Result<Arc<Self>, StoreError> {
        let key = store
            .secret_or_create("management_x25519", || SecretKey::generate().to_base64())
            .await?;
        let server_key = SecretKey::from_base64(&key).map_err(|e| {
            StoreError::invalid(
                "management_x25519",
                format!("stored server key is corrupt: {e}"),
            )
        })?;
        let admin_secret = store
            .secret_or_create("admin_jwt_secret", || random_b64(32))
            .await?
            .into_bytes();
        let peer_token_secret = match opts.peer_token_secret.clone() {
            Some(s) => s,
            None => store
                .secret_or_create("peer_token_secret", || random_b64(32))
                .await?
                .into_bytes(),
        };
        if opts.relay.secret.is_empty() {
            opts.relay.secret = store
                .secret_or_create("relay_secret", || random_b64(32))
                .await?
                .into_bytes();
        }
        Ok(Arc::new(AppState {
            store,
            server_key,
            peer_token_secret,
            admin_secret,
            opts,
            maps: Mutex::new(None),
            streams: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The index over the current snapshot; loaded once per network serial for all streams.
    pub async fn net_index(&self) -> Result<Arc<NetIndex>, StoreError> {
        let want = *self.store.subscribe().borrow();
        let mut cached = self.maps.lock().await;
        if let Some((serial, idx)) = cached.as_ref() {
            if *serial == want {
                return Ok(idx.clone());
            }
        }
        let snap = self.store.snapshot().await?;
        let idx = Arc::new(NetIndex::new(Arc::new(snap)));
        *cached = Some((want, idx.clone()));
        Ok(idx)
    }

    /// Records a sync stream opening; true if it is the peer's first live stream.
    pub fn stream_opened(&self, peer_id: &str) -> bool {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.entry(peer_id.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Records a sync stream ending; true if it was the peer's last live stream.
    pub fn stream_closed(&self, peer_id: &str) -> bool {
        let mut s = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        match s.get_mut(peer_id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                s.remove(peer_id);
                true
            }
            None => false,
        }
    }
}
