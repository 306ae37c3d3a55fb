//! OIDC single sign-on: validates ID or access tokens of an external identity provider by its
//! issuer, audience and signing keys (JWKS, from discovery or a configured URL), and decides from a
//! configured claim whether the holder is a Tern admin.
//!
//! Only asymmetric algorithms are accepted (an HS256 token "signed" with a public key is the
//! classic confusion attack), the issuer must match exactly, the audience must contain one of the
//! configured values, and `exp` is required. Keys are cached; an unknown `kid` triggers one
//! refresh at most every [`MIN_REFRESH`], so rotated keys are picked up without letting forged
//! tokens hammer the provider.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Keys older than this are fetched again before use.
const MAX_KEY_AGE: Duration = Duration::from_secs(3600);
/// At most one refresh per this interval for tokens naming an unknown key.
const MIN_REFRESH: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery or JWKS document read.
const MAX_DOC: usize = 256 * 1024;

#[derive(Debug, Clone, Default)]
pub struct OidcConfig {
    /// Issuer URL, compared exactly with the token's `iss`.
    pub issuer: String,
    /// Accepted audiences (`aud` must contain one); usually the console's client id.
    pub audiences: Vec<String>,
    /// JWKS URL; when unset, the issuer's discovery document names it.
    pub jwks_url: Option<String>,
    /// `claim=value`: an admin if the claim equals the value or is a list containing it; any
    /// other account of the provider signs in as a user (their own devices only).
    /// When unset, every valid token of the issuer for this audience is an admin.
    pub admin_claim: Option<(String, String)>,
    /// Claim listing the account's groups (e.g. `groups`): values that name a Tern group put the
    /// user's devices in it. Unset: groups are managed in Tern only.
    pub groups_claim: Option<String>,
    /// Claim naming the account (falls back to email, preferred_username, sub).
    pub username_claim: String,
    /// Client id the console uses for the authorization-code flow (PKCE, public client).
    pub client_id: Option<String>,
    pub scopes: String,
}

impl OidcConfig {
    /// Parses `claim=value` as given on the command line.
    pub fn parse_admin_claim(s: &str) -> Result<(String, String), String> {
        match s.split_once('=') {
            Some((c, v)) if !c.trim().is_empty() && !v.trim().is_empty() => {
                Ok((c.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!(
                "--oidc-admin-claim {s:?} must be CLAIM=VALUE, e.g. groups=tern-admins"
            )),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OidcError {
    #[error("not a JWT")]
    Malformed,
    #[error("algorithm {0:?} is not accepted (asymmetric signatures only)")]
    Algorithm(Algorithm),
    #[error("the identity provider has no key {0:?}")]
    UnknownKey(String),
    #[error("bad signature")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("cannot fetch the identity provider's keys: {0}")]
    Fetch(String),
}

/// Who a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIdentity {
    pub subject: String,
    pub username: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The admin claim holds (or none is configured).
    pub admin: bool,
    /// The groups claim's values, when a groups claim is configured (empty if the token lacks
    /// it: the user is then in no provider group).
    pub groups: Option<Vec<String>>,
}

/// The endpoints the console needs for its sign-in redirect.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Discovery {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub jwks_uri: String,
    #[serde(default)]
    pub authorization_endpoint: String,
    #[serde(default)]
    pub token_endpoint: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
}

struct KeyCache {
    keys: JwkSet,
    fetched: Option<Instant>,
    discovery: Option<Discovery>,
    discovery_failure: Option<(Instant, OidcError)>,
}

pub struct OidcVerifier {
    pub config: OidcConfig,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
}

const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl OidcVerifier {
    pub fn new(config: OidcConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(OidcVerifier {
            config,
            http,
            cache: Mutex::new(KeyCache {
                keys: JwkSet { keys: vec![] },
                fetched: None,
                discovery: None,
                discovery_failure: None,
            }),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let fail = |e: String| OidcError::Fetch(format!("{url}: {e}"));
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let body = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        if body.len() > MAX_DOC {
            return Err(fail(format!("document larger than {MAX_DOC} bytes")));
        }
        serde_json::from_slice(&body).map_err(|e| fail(e.to_string()))
    }

    /// The discovery document if it was fetched already (never waits on the network).
    pub async fn discovery_cached(&self) -> Option<Discovery> {
        self.cache.lock().await.discovery.clone()
    }

    /// The provider's discovery document (fetched once, then cached). A failure is remembered
    /// for [`MIN_REFRESH`], so public endpoints cannot make us hammer an ailing provider.
    pub async fn discovery(&self) -> Result<Discovery, OidcError> {
        {
            let c = self.cache.lock().await;
            if let Some(d) = c.discovery.clone() {
                return Ok(d);
            }
            if let Some((at, e)) = &c.discovery_failure {
                if at.elapsed() < MIN_REFRESH {
                    return Err(e.clone());
                }
            }
        }
        let r = self.fetch_discovery().await;
        let mut c = self.cache.lock().await;
        match &r {
            Ok(d) => {
                c.discovery = Some(d.clone());
                c.discovery_failure = None;
            }
            Err(e) => c.discovery_failure = Some((Instant::now(), e.clone())),
        }
        r
    }

    async fn fetch_discovery(&self) -> Result<Discovery, OidcError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let d: Discovery = self.get_json(&url).await?;
        if d.issuer.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(OidcError::Fetch(format!(
                "discovery document names issuer {:?}, configured {:?}",
                d.issuer, self.config.issuer
            )));
        }
        Ok(d)
    }

    async fn refresh(&self) -> Result<(), OidcError> {
        let url = match &self.config.jwks_url {
            Some(u) => u.clone(),
            None => self.discovery().await?.jwks_uri,
        };
        let keys: JwkSet = self.get_json(&url).await?;
        tracing::info!(url = %url, keys = keys.keys.len(), "fetched OIDC signing keys");
        let mut c = self.cache.lock().await;
        c.keys = keys;
        c.fetched = Some(Instant::now());
        Ok(())
    }

    async fn key_for(&self, kid: Option<&str>) -> Result<Jwk, OidcError> {
        let pick = |set: &JwkSet| -> Option<Jwk> {
            match kid {
                Some(k) => set.find(k).cloned(),
                // Without a kid, a provider with one key is unambiguous.
                None if set.keys.len() == 1 => set.keys.first().cloned(),
                None => None,
            }
        };
        let (found, age) = {
            let c = self.cache.lock().await;
            (pick(&c.keys), c.fetched.map(|t| t.elapsed()))
        };
        let stale = age.is_none_or(|a| a > MAX_KEY_AGE);
        if let (Some(k), false) = (&found, stale) {
            return Ok(k.clone());
        }
        if stale || age.is_some_and(|a| a > MIN_REFRESH) {
            match self.refresh().await {
                Ok(()) => {}
                // A provider outage must not lock out admins whose key is still cached.
                Err(e) if found.is_some() => tracing::warn!(error = %e, "OIDC key refresh failed"),
                Err(e) => return Err(e),
            }
        }
        let c = self.cache.lock().await;
        pick(&c.keys)
            .or(found)
            .ok_or_else(|| OidcError::UnknownKey(kid.unwrap_or("").to_string()))
    }

    /// Validates a token and its admin claim.
    pub async fn verify(&self, token: &str) -> Result<OidcIdentity, OidcError> {
        let header = decode_header(token).map_err(|_| OidcError::Malformed)?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(OidcError::Algorithm(header.alg));
        }
        let jwk = self.key_for(header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| OidcError::Invalid(format!("unusable key: {e}")))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[self.config.issuer.as_str()]);
        v.set_audience(&self.config.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        // Clocks of a provider and this server agree within seconds (NTP); a token that expired
        // 30 s ago must not still work as a bearer.
        v.leeway = 5;
        let data = decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => OidcError::Signature,
                K::ExpiredSignature => OidcError::Expired,
                K::ImmatureSignature => OidcError::NotYetValid,
                K::InvalidIssuer => OidcError::Issuer,
                K::InvalidAudience => OidcError::Audience,
                K::InvalidAlgorithm => OidcError::Algorithm(header.alg),
                K::MissingRequiredClaim(c) => OidcError::Invalid(format!("claim {c:?} is missing")),
                other => OidcError::Invalid(format!("{other:?}")),
            }
        })?;
        let claims = data.claims;
        let admin = match &self.config.admin_claim {
            Some((claim, value)) => claim_has(claims.rest.get(claim), value),
            None => true,
        };
        let groups = self.config.groups_claim.as_ref().map(|c| {
            claim_values(claims.rest.get(c))
                .into_iter()
                .filter(|g| !g.is_empty() && g.len() <= 128 && !g.chars().any(char::is_control))
                .take(256)
                .collect()
        });
        let str_claim = |name: &str| {
            claims
                .rest
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
                .map(str::to_string)
        };
        let username = str_claim(&self.config.username_claim)
            .or_else(|| str_claim("email"))
            .or_else(|| str_claim("preferred_username"))
            .unwrap_or_else(|| claims.sub.clone());
        Ok(OidcIdentity {
            subject: claims.sub,
            username,
            expires_at: claims.exp,
            admin,
            groups,
        })
    }
}

/// True if the claim is `value` or a list (or space-separated string, as `scope`) containing it.
fn claim_has(claim: Option<&serde_json::Value>, value: &str) -> bool {
    match claim {
        Some(serde_json::Value::String(s)) => s == value || s.split(' ').any(|p| p == value),
        Some(serde_json::Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(value)),
        Some(serde_json::Value::Bool(b)) => value == if *b { "true" } else { "false" },
        _ => false,
    }
}

/// A claim's values: a list of strings, or one string (space-separated, as `scope`).
fn claim_values(claim: Option<&serde_json::Value>) -> Vec<String> {
    match claim {
        Some(serde_json::Value::String(s)) => s.split(' ').map(str::to_string).collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn admin_claim_matches_strings_lists_and_scopes() {
        assert!(claim_has(Some(&json!("admins")), "admins"));
        assert!(claim_has(Some(&json!(["staff", "admins"])), "admins"));
        assert!(claim_has(Some(&json!("openid tern.admin")), "tern.admin"));
        assert!(claim_has(Some(&json!(true)), "true"));
        assert!(!claim_has(Some(&json!(["staff"])), "admins"));
        assert!(!claim_has(Some(&json!("admins-not")), "admins"));
        assert!(!claim_has(None, "admins"));
    }

    #[test]
    fn group_claims_are_lists_or_words() {
        assert_eq!(
            claim_values(Some(&json!(["eng", "ops"]))),
            vec!["eng", "ops"]
        );
        assert_eq!(claim_values(Some(&json!("eng ops"))), vec!["eng", "ops"]);
        assert!(claim_values(Some(&json!(7))).is_empty());
        assert!(claim_values(None).is_empty());
    }

    #[test]
    fn admin_claim_flag_needs_both_halves() {
        assert_eq!(
            OidcConfig::parse_admin_claim("groups=tern-admins"),
            Ok(("groups".into(), "tern-admins".into()))
        );
        assert!(OidcConfig::parse_admin_claim("groups").is_err());
        assert!(OidcConfig::parse_admin_claim("=x").is_err());
    }

    #[tokio::test]
    async fn a_failed_discovery_is_not_retried_at_once() {
        // A "provider" that answers every connection with a 500.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            }
        });
        let v = OidcVerifier::new(OidcConfig {
            issuer: format!("http://{addr}"),
            audiences: vec!["tern".into()],
            ..Default::default()
        })
        .expect("verifier");
        let first = v.discovery().await.expect_err("provider fails");
        assert!(first.to_string().contains("500"), "{first}");
        let second = v.discovery().await.expect_err("still failing");
        assert_eq!(first, second, "the remembered failure");
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one request only"
        );
        server.abort();
    }

    #[tokio::test]
    async fn symmetric_tokens_are_refused_before_any_fetch() {
        let v = OidcVerifier::new(OidcConfig {
            issuer: "http://127.0.0.1:9/".into(),
            audiences: vec!["tern".into()],
            ..Default::default()
        })
        .expect("verifier");
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &json!({"sub": "x", "exp": 4_000_000_000i64}),
            &jsonwebtoken::EncodingKey::from_secret(b"public key bytes"),
        )
        .expect("encode");
        assert_eq!(
            v.verify(&t).await,
            Err(OidcError::Algorithm(Algorithm::HS256))
        );
        assert_eq!(v.verify("garbage").await, Err(OidcError::Malformed));
    }
}
