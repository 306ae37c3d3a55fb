//! Admin authentication: argon2 password hashes, admin session JWTs, personal access tokens, and
//! the random secrets (setup keys, tokens) handed out once and stored hashed.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

pub const ADMIN_AUDIENCE: &str = "tern-admin";
/// Prefix of personal access tokens, so they are recognisable (and scannable) in leaked text.
pub const PAT_PREFIX: &str = "tern_pat_";
pub const SETUP_KEY_PREFIX: &str = "tern_sk_";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed")]
    Hash,
    #[error("session token is invalid or expired")]
    BadToken,
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| AuthError::Hash)
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so timing does not reveal usernames.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not-a-real-password").unwrap_or_default())
}

/// `prefix` + 32 random base62 characters (~190 bits).
pub fn random_secret(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{body}")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminClaims {
    /// User id.
    pub sub: String,
    pub name: String,
    /// Session id: the session must still be live in the store (sign-out ends it).
    pub sid: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

pub fn issue_admin_token(
    secret: &[u8],
    user_id: &str,
    name: &str,
    sid: &str,
    now: i64,
    ttl: i64,
) -> Result<(String, i64), AuthError> {
    let claims = AdminClaims {
        sub: user_id.into(),
        name: name.into(),
        sid: sid.into(),
        aud: ADMIN_AUDIENCE.into(),
        iat: now,
        exp: now + ttl,
    };
    let t = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| AuthError::BadToken)?;
    Ok((t, now + ttl))
}

/// True if `token` is one of ours (HS256), as opposed to an identity provider's token.
pub fn is_admin_token(token: &str) -> bool {
    jsonwebtoken::decode_header(token).is_ok_and(|h| h.alg == Algorithm::HS256)
}

pub fn verify_admin_token(secret: &[u8], token: &str) -> Result<AdminClaims, AuthError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[ADMIN_AUDIENCE]);
    v.leeway = 5;
    decode::<AdminClaims>(token, &DecodingKey::from_secret(secret), &v)
        .map(|d| d.claims)
        .map_err(|_| AuthError::BadToken)
}

/// Password guessing brake (pure state machine; the caller passes the clock). Every sign-in
/// attempt is counted *before* its password is checked (so concurrent attempts cannot slip past
/// the limit while earlier ones are still hashing): at most [`SignInThrottle::MAX_FAILURES`]
/// attempts per username and [`SignInThrottle::MAX_PER_SOURCE`] per source address within
/// [`SignInThrottle::WINDOW`]; past that the username (or source) is locked for
/// [`SignInThrottle::LOCK`]. A right password clears its username's count.
#[derive(Default)]
pub struct SignInThrottle {
    entries: std::collections::HashMap<String, Attempts>,
}

#[derive(Clone, Copy)]
struct Attempts {
    count: u32,
    first: std::time::Instant,
    locked_until: Option<std::time::Instant>,
}

/// Why a sign-in was refused before its password was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Until the lock ends.
    pub wait: std::time::Duration,
    /// The source address (not the username) hit its limit.
    pub by_source: bool,
}

impl SignInThrottle {
    pub const MAX_FAILURES: u32 = 5;
    pub const MAX_PER_SOURCE: u32 = 30;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(300);
    pub const LOCK: std::time::Duration = std::time::Duration::from_secs(300);
    /// Entries kept at most (old ones are dropped first).
    const MAX_ENTRIES: usize = 10_000;

    fn user_key(username: &str) -> String {
        let name: String = username.trim().to_lowercase().chars().take(64).collect();
        format!("u:{name}")
    }

    fn source_key(ip: std::net::IpAddr) -> String {
        format!("s:{}", tern_proto::source_of(ip))
    }

    fn locked(&self, key: &str, now: std::time::Instant) -> Option<std::time::Duration> {
        match self.entries.get(key).and_then(|a| a.locked_until) {
            Some(until) if until > now => Some(until - now),
            _ => None,
        }
    }

    fn count(&mut self, key: String, limit: u32, now: std::time::Instant) {
        let a = self.entries.entry(key).or_insert(Attempts {
            count: 0,
            first: now,
            locked_until: None,
        });
        if now.duration_since(a.first) >= Self::WINDOW || a.locked_until.is_some_and(|u| u <= now) {
            *a = Attempts {
                count: 0,
                first: now,
                locked_until: None,
            };
        }
        a.count += 1;
        if a.count >= limit {
            a.locked_until = Some(now + Self::LOCK);
        }
    }

    /// Counts one attempt for `username` from `source`, or refuses it while either is locked.
    pub fn reserve(
        &mut self,
        username: &str,
        source: Option<std::net::IpAddr>,
        now: std::time::Instant,
    ) -> Result<(), Throttled> {
        let user = Self::user_key(username);
        let src = source.map(Self::source_key);
        if let Some(wait) = src.as_deref().and_then(|k| self.locked(k, now)) {
            return Err(Throttled {
                wait,
                by_source: true,
            });
        }
        if let Some(wait) = self.locked(&user, now) {
            return Err(Throttled {
                wait,
                by_source: false,
            });
        }
        if self.entries.len() >= Self::MAX_ENTRIES {
            self.entries.retain(|_, a| {
                now.duration_since(a.first) < Self::WINDOW
                    || a.locked_until.is_some_and(|u| u > now)
            });
        }
        self.count(user, Self::MAX_FAILURES, now);
        if let Some(k) = src {
            self.count(k, Self::MAX_PER_SOURCE, now);
        }
        Ok(())
    }

    /// The password was right: the username's count starts again, and the attempt is given
    /// back to its source (so a busy office behind one address is limited by its failures only).
    pub fn succeeded(&mut self, username: &str, source: Option<std::net::IpAddr>) {
        self.entries.remove(&Self::user_key(username));
        if let Some(a) = source.and_then(|ip| self.entries.get_mut(&Self::source_key(ip))) {
            if a.locked_until.is_none() {
                a.count = a.count.saturating_sub(1);
            }
        }
    }
}

/// Misses per key (unknown device sign-in codes an account looked up) within a window (pure;
/// the caller passes the clock): past [`MissCounter::MAX`] in [`MissCounter::WINDOW`], further
/// lookups wait until the window ends. Guessing one of the codes waiting (8 letters out of 20)
/// at that pace takes longer than any code lives.
#[derive(Default)]
pub struct MissCounter {
    entries: std::collections::HashMap<String, (std::time::Instant, u32)>,
}

impl MissCounter {
    pub const MAX: u32 = 20;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
    const MAX_ENTRIES: usize = 10_000;

    /// How long `key` must wait before it may look again (None: it may).
    pub fn wait(&self, key: &str, now: std::time::Instant) -> Option<std::time::Duration> {
        let (first, n) = *self.entries.get(key)?;
        let ends = first + Self::WINDOW;
        (n >= Self::MAX && ends > now).then(|| ends - now)
    }

    /// `key` looked up something that was not there.
    pub fn missed(&mut self, key: &str, now: std::time::Instant) {
        if self.entries.len() >= Self::MAX_ENTRIES {
            self.entries
                .retain(|_, (first, _)| now.duration_since(*first) < Self::WINDOW);
        }
        let e = self.entries.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(e.0) >= Self::WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

/// Sealed logins already seen (sender key + nonce), so a captured login cannot be played again
/// within its timestamp window (pure; the caller passes the clock). Each entry lives
/// [`ReplayCache::TTL`] from first sight, longer than any replay the timestamp check would let
/// through; at most [`ReplayCache::MAX`] entries (the oldest go first).
#[derive(Default)]
pub struct ReplayCache {
    seen: std::collections::HashSet<[u8; 56]>,
    order: std::collections::VecDeque<(i64, [u8; 56])>,
}

impl ReplayCache {
    pub const TTL: i64 = 2 * tern_proto::LOGIN_MAX_SKEW_SECS + 1;
    pub const MAX: usize = 200_000;

    /// The cache key of a sealed message, or None when its fields have the wrong sizes.
    pub fn id(sender: &[u8], nonce: &[u8]) -> Option<[u8; 56]> {
        if sender.len() != 32 || nonce.len() != 24 {
            return None;
        }
        let mut id = [0u8; 56];
        id[..32].copy_from_slice(sender);
        id[32..].copy_from_slice(nonce);
        Some(id)
    }

    /// True (and remembered) the first time `id` is seen within [`ReplayCache::TTL`].
    pub fn first_use(&mut self, id: [u8; 56], now_unix: i64) -> bool {
        while let Some((exp, k)) = self.order.front() {
            if *exp > now_unix {
                break;
            }
            self.seen.remove(k);
            self.order.pop_front();
        }
        if self.seen.contains(&id) {
            return false;
        }
        if self.order.len() >= Self::MAX {
            if let Some((_, k)) = self.order.pop_front() {
                self.seen.remove(&k);
            }
        }
        self.seen.insert(id);
        self.order.push_back((now_unix + Self::TTL, id));
        true
    }
}

/// Password hashing off the async workers: argon2 runs on `n` dedicated threads (so sign-in
/// floods cannot starve gRPC, STUN or the API, and the 19 MiB argon2 scratch memory stays in
/// those threads' allocator arenas instead of spreading over every blocking-pool thread); when
/// all are busy for longer than [`PasswordPool::QUEUE_WAIT`] the caller answers 429.
pub struct PasswordPool {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The pool was busy for too long.
#[derive(Debug, thiserror::Error)]
#[error("the server is busy checking other passwords")]
pub struct PoolBusy;

impl PasswordPool {
    pub const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

    /// Half the cores (at least one): hashing never takes the whole machine.
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_permits((cores / 2).max(1))
    }

    pub fn with_permits(n: usize) -> Self {
        let n = n.max(1);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(n);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tern-argon2-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(p) => p.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the pool is gone
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(n)),
            jobs,
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolBusy> {
        let permit = tokio::time::timeout(Self::QUEUE_WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolBusy)?
            .map_err(|_| PoolBusy)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A permit means a thread is free (or about to be): the job never waits behind another.
        self.jobs
            .try_send(Box::new(move || {
                let _ = tx.send(f());
                drop(permit);
            }))
            .map_err(|_| PoolBusy)?;
        rx.await.map_err(|_| PoolBusy)
    }

    pub async fn verify(&self, password: String, hash: String) -> Result<bool, PoolBusy> {
        self.run(move || verify_password(&password, &hash)).await
    }

    pub async fn hash(&self, password: String) -> Result<Result<String, AuthError>, PoolBusy> {
        self.run(move || hash_password(&password)).await
    }
}

impl Default for PasswordPool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_guessing_waits_after_twenty_misses_per_window() {
        let mut m = MissCounter::default();
        let t0 = std::time::Instant::now();
        for _ in 0..MissCounter::MAX {
            assert_eq!(m.wait("u1", t0), None);
            m.missed("u1", t0);
        }
        let wait = m.wait("u1", t0).expect("limited");
        assert_eq!(wait, MissCounter::WINDOW);
        assert_eq!(m.wait("u2", t0), None, "per account");
        assert_eq!(
            m.wait("u1", t0 + MissCounter::WINDOW),
            None,
            "the window ends"
        );
    }

    use super::*;

    #[test]
    fn attempts_are_counted_before_the_check_per_username_and_source() {
        use std::time::Duration;
        let t0 = std::time::Instant::now();
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        let mut t = SignInThrottle::default();
        // Five attempts pass (none has finished yet: counting does not wait for the outcome).
        for i in 0..5 {
            assert!(
                t.reserve(" Admin ", ip("192.0.2.1"), t0).is_ok(),
                "attempt {i}"
            );
        }
        let r = t
            .reserve("admin", ip("192.0.2.2"), t0 + Duration::from_secs(10))
            .expect_err("sixth attempt refused");
        assert!(!r.by_source);
        assert_eq!(r.wait, SignInThrottle::LOCK - Duration::from_secs(10));
        assert!(
            t.reserve("other", ip("192.0.2.3"), t0).is_ok(),
            "other names are not affected"
        );
        let later = t0 + SignInThrottle::LOCK;
        assert!(t.reserve("admin", None, later).is_ok(), "lock ends");
        // A right password clears the username's count.
        let mut t = SignInThrottle::default();
        for _ in 0..4 {
            t.reserve("x", None, t0).expect("allowed");
        }
        t.succeeded("x", None);
        for _ in 0..4 {
            t.reserve("x", None, t0).expect("allowed after success");
        }
        // Attempts spread beyond the window never lock.
        let mut t = SignInThrottle::default();
        for i in 0..10 {
            t.reserve("slow", None, t0 + SignInThrottle::WINDOW * i)
                .expect("allowed");
        }
        // One source guessing many usernames is stopped; one IPv6 /64 is one source.
        let mut t = SignInThrottle::default();
        for i in 0..SignInThrottle::MAX_PER_SOURCE {
            let src = format!("2001:db8:1:2::{:x}", i + 1);
            t.reserve(&format!("user{i}"), ip(&src), t0)
                .expect("under the source limit");
        }
        let r = t
            .reserve("fresh", ip("2001:db8:1:2::ffff"), t0)
            .expect_err("source locked");
        assert!(r.by_source);
        assert!(t.reserve("fresh", ip("2001:db8:1:3::1"), t0).is_ok());
        // Right passwords give their attempt back to the source.
        let mut t = SignInThrottle::default();
        for i in 0..SignInThrottle::MAX_PER_SOURCE * 2 {
            let name = format!("user{i}");
            t.reserve(&name, ip("192.0.2.9"), t0)
                .expect("successes are not limited");
            t.succeeded(&name, ip("192.0.2.9"));
        }
    }

    #[test]
    fn a_sealed_login_is_accepted_once_within_its_window() {
        let mut c = ReplayCache::default();
        let id = ReplayCache::id(&[1; 32], &[2; 24]).expect("sizes");
        assert!(ReplayCache::id(&[1; 31], &[2; 24]).is_none());
        assert!(c.first_use(id, 1000));
        assert!(!c.first_use(id, 1000), "replayed at once");
        assert!(
            !c.first_use(id, 1000 + ReplayCache::TTL - 1),
            "replayed late in the window"
        );
        let other = ReplayCache::id(&[1; 32], &[3; 24]).expect("sizes");
        assert!(c.first_use(other, 1000), "another nonce is another login");
        // After the window the timestamp check refuses it anyway; the entry is gone.
        assert!(c.first_use(id, 1000 + ReplayCache::TTL));
        assert!(c.seen.len() <= 2);
    }

    #[tokio::test]
    async fn hashing_runs_off_the_async_workers_and_answers_busy_when_full() {
        let pool = PasswordPool::with_permits(1);
        let h = pool
            .hash("correct horse".into())
            .await
            .expect("pool")
            .expect("hash");
        assert!(pool
            .verify("correct horse".into(), h.clone())
            .await
            .expect("pool"));
        assert!(!pool.verify("wrong".into(), h).await.expect("pool"));
        // Hold the only permit: the next caller gives up after QUEUE_WAIT instead of queueing.
        let _held = pool.permits.clone().acquire_owned().await.expect("permit");
        let t = std::time::Instant::now();
        assert!(pool.verify("x".into(), "y".into()).await.is_err());
        assert!(t.elapsed() >= PasswordPool::QUEUE_WAIT);
    }

    #[test]
    fn password_hash_verifies_only_the_right_password() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let a = random_secret(SETUP_KEY_PREFIX);
        let b = random_secret(SETUP_KEY_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("tern_sk_") && a.len() == 8 + 32);
    }

    #[test]
    fn admin_tokens_are_not_peer_tokens() {
        let (t, _) =
            issue_admin_token(b"k", "u1", "admin", "s1", 2_000_000_000, 60).expect("issue");
        assert_eq!(verify_admin_token(b"k", &t).expect("ok").sub, "u1");
        assert!(verify_admin_token(b"other", &t).is_err());
        let key = tern_proto::SecretKey::generate().public_key();
        let (peer, _) =
            tern_proto::token::issue_peer_token(b"k", "p", &key, 2_000_000_000, 60).expect("peer");
        assert!(verify_admin_token(b"k", &peer).is_err(), "audience differs");
    }
}
