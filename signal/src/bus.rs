//! Several signal replicas: a message for a peer that holds no stream on this replica goes to
//! the others as a PostgreSQL notification (the database the management replicas share), and the
//! replica that holds the peer's stream delivers it. Revocations go the same way. One task sends
//! the notifications in order over one connection, so a peer's candidates arrive in the order it
//! sent them; one listening connection receives the siblings' messages.
//!
//! Notifications are not stored: a replica that is reconnecting to the database misses what is
//! sent meanwhile, and agents retry ICE as after any lost signal message (a missed revocation
//! still ends with the token's lifetime).

use crate::Signal;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tern_proto::PublicKey;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The notification channel the replicas share.
pub const CHANNEL: &str = "tern_signal";
/// PostgreSQL refuses notification payloads of 8,000 bytes and more; this leaves room for the
/// header and base64.
pub const MAX_FORWARDED_PAYLOAD: usize = 5_600;
/// Messages queued for the siblings before senders are told to retry.
const QUEUE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("payload larger than {0} bytes")]
    TooLarge(usize),
    #[error("the link to the other replicas is busy")]
    Busy,
}

/// This replica's side of the link to its siblings.
pub struct Bus {
    origin: String,
    tx: mpsc::Sender<String>,
}

/// What replicas tell each other.
#[derive(Debug, PartialEq, Eq)]
enum Note {
    Deliver {
        to: PublicKey,
        from: PublicKey,
        payload: Vec<u8>,
    },
    Revoke {
        at_unix: i64,
        keys: Vec<PublicKey>,
    },
}

fn encode(origin: &str, note: &Note) -> String {
    match note {
        Note::Deliver { to, from, payload } => format!(
            "d {origin} {} {} {}",
            B64.encode(to.0),
            B64.encode(from.0),
            B64.encode(payload)
        ),
        Note::Revoke { at_unix, keys } => {
            let keys: Vec<String> = keys.iter().map(|k| B64.encode(k.0)).collect();
            format!("r {origin} {at_unix} {}", keys.join(","))
        }
    }
}

/// (origin, note); None for anything malformed (logged by the caller).
fn decode(s: &str) -> Option<(&str, Note)> {
    let key = |k: &str| {
        B64.decode(k)
            .ok()
            .and_then(|b| PublicKey::from_slice(&b).ok())
    };
    let mut parts = s.split(' ');
    let kind = parts.next()?;
    let origin = parts.next()?;
    let note = match kind {
        "d" => Note::Deliver {
            to: key(parts.next()?)?,
            from: key(parts.next()?)?,
            payload: B64.decode(parts.next()?).ok()?,
        },
        "r" => Note::Revoke {
            at_unix: parts.next()?.parse().ok()?,
            keys: parts
                .next()?
                .split(',')
                .filter(|k| !k.is_empty())
                .map(key)
                .collect::<Option<_>>()?,
        },
        _ => return None,
    };
    parts.next().is_none().then_some((origin, note))
}

impl Bus {
    pub(crate) fn forward(
        &self,
        to: &PublicKey,
        from: &PublicKey,
        payload: &[u8],
    ) -> Result<(), ForwardError> {
        if payload.len() > MAX_FORWARDED_PAYLOAD {
            return Err(ForwardError::TooLarge(MAX_FORWARDED_PAYLOAD));
        }
        let note = Note::Deliver {
            to: *to,
            from: *from,
            payload: payload.to_vec(),
        };
        self.tx
            .try_send(encode(&self.origin, &note))
            .map_err(|_| ForwardError::Busy)
    }

    pub(crate) fn revoke(&self, keys: &[PublicKey], at_unix: i64) {
        // About 45 bytes per key: well under the payload limit per notification.
        for chunk in keys.chunks(150) {
            let note = Note::Revoke {
                at_unix,
                keys: chunk.to_vec(),
            };
            if self.tx.try_send(encode(&self.origin, &note)).is_err() {
                warn!("could not tell the other signal replicas about a revocation (link busy); tokens issued before it lapse within their lifetime");
            }
        }
    }
}

/// Links `signal` to its siblings through the PostgreSQL database at `database_url`.
pub fn attach(signal: &Arc<Signal>, database_url: &str, origin: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(database_url)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let bus = Bus {
        origin: origin.to_string(),
        tx,
    };
    if signal.bus.set(bus).is_err() {
        anyhow::bail!("this signal service is already linked to its replicas");
    }
    tokio::spawn(send_notes(pool, rx));
    tokio::spawn(receive_notes(
        Arc::downgrade(signal),
        database_url.to_string(),
        origin.to_string(),
    ));
    info!(
        replica = origin,
        "signal: linked to other replicas through PostgreSQL"
    );
    Ok(())
}

async fn send_notes(pool: sqlx::PgPool, mut rx: mpsc::Receiver<String>) {
    while let Some(note) = rx.recv().await {
        let mut tries = 0;
        loop {
            match sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&note)
                .execute(&pool)
                .await
            {
                Ok(_) => break,
                Err(e) if tries < 3 => {
                    tries += 1;
                    debug!(error = %e, "signal: notifying the other replicas failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => {
                    warn!(error = %e, "signal: cannot reach the database; a message for a peer on another replica is lost (agents retry)");
                    break;
                }
            }
        }
    }
}

async fn receive_notes(signal: Weak<Signal>, url: String, origin: String) {
    let mut backoff = tern_backoff::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
        std::time::Instant::now(),
    );
    loop {
        if signal.strong_count() == 0 {
            return; // the service stopped
        }
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "signal: cannot listen to the other replicas; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            warn!(error = %e, "signal: cannot listen to the other replicas; retrying");
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        backoff.succeeded();
        loop {
            let n = match listener.recv().await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "signal: lost the link to the other replicas; reconnecting");
                    break;
                }
            };
            let Some(sig) = signal.upgrade() else {
                return;
            };
            match decode(n.payload()) {
                Some((from_replica, _)) if from_replica == origin => {}
                Some((_, Note::Deliver { to, from, payload })) => {
                    // Only the replica holding the peer's stream delivers; the others drop it.
                    if sig.lock().contains_key(&to) {
                        let (status, why) = sig.deliver(&to, &from, payload);
                        debug!(%to, ?status, why, "signal: delivered a message from another replica");
                    }
                }
                Some((_, Note::Revoke { at_unix, keys })) => {
                    sig.revoke_here(&keys, at_unix);
                }
                None => debug!("signal: ignoring a malformed note from another replica"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_malformed_ones_are_refused() {
        let a = PublicKey([1; 32]);
        let b = PublicKey([2; 32]);
        let d = Note::Deliver {
            to: a,
            from: b,
            payload: vec![0, 1, 2, 255],
        };
        let r = Note::Revoke {
            at_unix: 1_700_000_000,
            keys: vec![a, b],
        };
        for n in [d, r] {
            let wire = encode("srv-1", &n);
            assert!(wire.len() < 8000);
            assert_eq!(decode(&wire), Some(("srv-1", n)));
        }
        let big = Note::Deliver {
            to: a,
            from: b,
            payload: vec![7; MAX_FORWARDED_PAYLOAD],
        };
        assert!(encode("a-replica-id-of-forty-six-characters-abcdef", &big).len() < 8000);
        for bad in [
            "",
            "d",
            "x srv a b c",
            "d srv AAAA AAAA AAAA",
            "r srv soon AQ==",
            "d srv extra extra extra extra",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
