//! Serves REST, the management gRPC service and (optionally) signal on one listener: HTTP/1.1 for
//! the API and console, HTTP/2 for gRPC, so a deployment needs one TCP port.

use crate::state::{AppState, ManagementOptions};
use crate::store::Store;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tern_signal::{Signal, SignalOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    pub opts: ManagementOptions,
    /// Also serve signal (the all-in-one server).
    pub signal: Option<SignalOptions>,
}

pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    pub signal: Option<Arc<Signal>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    janitor: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets requests finish for up to `grace`, then drops what is left
    /// (sync and signal streams never finish on their own).
    pub async fn stop(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        self.janitor.abort();
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
        self.state.store.close().await;
    }
}

pub async fn start(cfg: ServerConfig) -> anyhow::Result<Running> {
    let store = Store::connect(&cfg.database_url)
        .await
        .with_context(|| format!("opening database {}", redact_url(&cfg.database_url)))?;
    store
        .mark_all_disconnected()
        .await
        .context("resetting connection state")?;
    let state = AppState::new(store, cfg.opts.clone())
        .await
        .context("loading server keys")?;
    let mut router = crate::api::router(state.clone()).route_service(
        "/tern.management.v1.ManagementService/{*method}",
        crate::grpc::service(state.clone()),
    );
    let signal = cfg
        .signal
        .clone()
        .map(|o| Signal::new(state.peer_token_secret.clone(), o));
    if let Some(sig) = &signal {
        router = router.route_service("/tern.signal.v1.SignalService/{*method}", sig.service());
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (shutdown, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!(error = %e, "HTTP server ended with error");
        }
    });
    let janitor = tokio::spawn(janitor(state.clone()));
    info!(%addr, signal = signal.is_some(), "management listening");
    Ok(Running {
        addr,
        state,
        signal,
        shutdown,
        task,
        janitor,
    })
}

/// Periodic clean-up: ephemeral peers that stayed disconnected past their TTL.
async fn janitor(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        match state
            .store
            .remove_stale_ephemeral(crate::model::now_millis())
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed disconnected ephemeral peers"),
            Err(e) => warn!(error = ?e, "ephemeral peer clean-up failed"),
        }
    }
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://tern:hunter2@db/tern"),
            "postgres://tern:***@db/tern"
        );
        assert_eq!(
            super::redact_url("sqlite://data/tern.db"),
            "sqlite://data/tern.db"
        );
    }
}
