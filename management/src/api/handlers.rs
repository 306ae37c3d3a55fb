//! REST handlers: input validation happens here (formats, ranges), referential checks and
//! uniqueness in the store, all inside one transaction per change.

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use crate::auth::{self, PAT_PREFIX, SETUP_KEY_PREFIX};
use crate::model::*;
use crate::state::AppState;
use crate::store::{hash_secret, AuditFilter, NewSetupKey, PolicyInput, RouteInput, SignInMethod};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

type St = State<Arc<AppState>>;
type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------------
// Authentication

/// The authenticated caller of a request (any role: see [`super::authz`]).
#[derive(Clone)]
pub struct Admin {
    pub user: User,
    /// How the audit log names this actor.
    pub actor: String,
    /// The console session the request belongs to (None for access tokens and IdP tokens).
    pub session: Option<String>,
}

impl Admin {
    pub fn role(&self) -> Role {
        self.user.role
    }

    /// Refuses unless the caller is an owner.
    pub fn require_owner(&self, what: &str) -> ApiResult<()> {
        if self.user.role == Role::Owner {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("only an owner can {what}")))
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        // Normally authenticated (and its role checked) by `authz::authorize` already.
        if let Some(a) = parts.extensions.get::<Admin>() {
            return Ok(a.clone());
        }
        authenticate(state, &parts.headers).await
    }
}

/// The caller a request's bearer token names (a personal access token, a console session, or an
/// identity provider's token), if the account is enabled.
pub(super) async fn authenticate(
    state: &AppState,
    headers: &axum::http::HeaderMap,
) -> ApiResult<Admin> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
        })?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            ApiError::Unauthorized("Authorization header must be \"Bearer <token>\"".into())
        })?
        .trim();
    let (user, actor, session) = if token.starts_with(PAT_PREFIX) {
        let (t, user) = state
            .store
            .token_by_hash(&hash_secret(token))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown access token".into()))?;
        if t.expires_at.is_some_and(|e| e <= now_millis()) {
            return Err(ApiError::Unauthorized(format!(
                "access token {:?} has expired",
                t.name
            )));
        }
        let actor = format!("user:{} (token {})", user.username, t.name);
        (user, actor, None)
    } else if auth::is_admin_token(token) || state.oidc.is_none() {
        let claims = auth::verify_admin_token(&state.admin_secret, token)
            .map_err(|e| ApiError::Unauthorized(format!("{e}: sign in again")))?;
        let user = state
            .store
            .session_user(&claims.sid, now_millis())
            .await?
            .filter(|u| u.id == claims.sub)
            .ok_or_else(|| ApiError::Unauthorized("the session has ended: sign in again".into()))?;
        let actor = format!("user:{}", user.username);
        (user, actor, Some(claims.sid))
    } else {
        let (user, _) = oidc_user(state, token).await?;
        let actor = format!("user:{} (sso)", user.username);
        (user, actor, None)
    };
    let user = enabled(user)?;
    Ok(Admin {
        user,
        actor,
        session,
    })
}

/// The user, unless an admin disabled the account.
fn enabled(user: User) -> ApiResult<User> {
    if user.disabled {
        return Err(ApiError::Forbidden(format!(
            "user {:?} is disabled",
            user.username
        )));
    }
    Ok(user)
}

/// Validates an identity provider's token and returns the linked account (created on its first
/// sign-in, an admin if the provider's admin claim says so, else a user), and when that token
/// expires (Unix seconds). The user's groups follow the provider's groups claim.
async fn oidc_user(state: &AppState, token: &str) -> ApiResult<(User, i64)> {
    use crate::oidc::OidcError;
    let Some(v) = &state.oidc else {
        return Err(ApiError::Unauthorized(
            "single sign-on is not configured on this server".into(),
        ));
    };
    let id = v.verify(token).await.map_err(|e| {
        tracing::info!(error = %e, "OIDC token refused");
        match e {
            OidcError::Fetch(_) => {
                ApiError::Unavailable(format!("cannot check the sign-in: {e}; try again later"))
            }
            _ => ApiError::Unauthorized(format!("identity provider token refused: {e}")),
        }
    })?;
    let role = if id.admin { Role::Admin } else { Role::User };
    let user = state
        .store
        .oidc_user(&id.subject, &id.username, role)
        .await?;
    if let Some(groups) = &id.groups {
        let matched = state
            .store
            .sync_user_groups(&user.id, &user.username, groups)
            .await?;
        tracing::debug!(user = %user.username, groups = ?matched, "groups from the identity provider");
    }
    Ok((user, id.expires_at))
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

pub(super) fn name(field: &str, s: &str) -> ApiResult<String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if t.chars().count() > 64 {
        return Err(ApiError::invalid(field, "must be at most 64 characters"));
    }
    if t.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(t.to_string())
}

/// A CIDR in canonical form (no host bits set).
pub(super) fn cidr(field: &str, s: &str) -> ApiResult<IpNet> {
    let n: IpNet = s.trim().parse().map_err(|_| {
        ApiError::invalid(
            field,
            format!("{s:?} is not a network in CIDR notation, e.g. 192.168.50.0/24"),
        )
    })?;
    if n.trunc() != n {
        return Err(ApiError::invalid(
            field,
            format!("{n} has host bits set; did you mean {}?", n.trunc()),
        ));
    }
    Ok(n)
}

async fn password(s: &AppState, field: &str, p: &str) -> ApiResult<String> {
    if p.chars().count() < 10 {
        return Err(ApiError::invalid(field, "must be at least 10 characters"));
    }
    if p.len() > 1024 {
        return Err(ApiError::invalid(field, "must be at most 1024 bytes"));
    }
    s.passwords
        .hash(p.to_string())
        .await
        .map_err(busy)?
        .map_err(|e| ApiError::Internal(e.into()))
}

fn deleted() -> impl IntoResponse {
    StatusCode::NO_CONTENT
}

// ---------------------------------------------------------------------------------------------
// Health, docs, sign-in

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", security(), responses((status = 200, description = "healthy")))]
pub async fn healthz(State(s): St) -> ApiResult<Json<serde_json::Value>> {
    let settings = s.store.settings().await?;
    Ok(Json(
        serde_json::json!({ "status": "ok", "network_serial": settings.network_serial }),
    ))
}

pub async fn openapi_json() -> impl IntoResponse {
    use utoipa::OpenApi;
    Json(super::ApiDoc::openapi())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub username: String,
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoginReply {
    /// Bearer token for this API.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub user: User,
}

/// Sign in with an admin account; returns a session JWT.
#[utoipa::path(post, path = "/api/auth/login", security(), request_body = LoginBody,
    responses((status = 200, body = LoginReply), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn login(
    State(s): St,
    SourceAddr(source): SourceAddr,
    ApiJson(b): ApiJson<LoginBody>,
) -> ApiResult<Json<LoginReply>> {
    let username = b.username.trim();
    // Counted before any await: concurrent guesses cannot outrun the limit.
    let reserved = s
        .sign_in_throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reserve(username, source, std::time::Instant::now());
    if let Err(t) = reserved {
        let wait = t.wait.as_secs().max(1);
        return Err(if t.by_source {
            tracing::warn!(source = ?source, "admin sign-in refused: too many attempts from this address");
            ApiError::TooManyRequests(format!(
                "too many sign-in attempts from your address; try again in {wait} s"
            ))
        } else {
            tracing::warn!(%username, "admin sign-in refused: too many failed attempts");
            ApiError::TooManyRequests(format!(
                "too many failed sign-ins for this user; try again in {wait} s"
            ))
        });
    }
    if b.password.len() > 1024 {
        return Err(ApiError::Unauthorized("wrong username or password".into()));
    }
    let creds = s.store.user_credentials(username).await?;
    let hash = creds
        .as_ref()
        .map(|c| c.password_hash.clone())
        .unwrap_or_else(|| auth::dummy_hash().to_string());
    let ok = s.passwords.verify(b.password, hash).await.map_err(busy)?;
    let Some(c) = creds.filter(|_| ok) else {
        tracing::info!(%username, "admin sign-in refused");
        return Err(ApiError::Unauthorized("wrong username or password".into()));
    };
    let user = enabled(c.user)?;
    s.sign_in_throttle
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .succeeded(username, source);
    let ttl = s.opts.admin_session_ttl.as_secs() as i64;
    open_session(&s, user, SignInMethod::Password, ttl).await
}

fn busy(e: auth::PoolBusy) -> ApiError {
    ApiError::TooManyRequests(format!("{e}; try again in a few seconds"))
}

/// The client's address, when the listener recorded it (`ConnectInfo`).
pub struct SourceAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for SourceAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(SourceAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// Opens a console session of `ttl` seconds and signs its token.
async fn open_session(
    s: &AppState,
    user: User,
    method: SignInMethod,
    ttl: i64,
) -> ApiResult<Json<LoginReply>> {
    let now = now_millis();
    // The session row ends exactly when the token's `exp` says (whole seconds), so the console's
    // timer and the server agree; the JWT's leeway does not extend it.
    let expires_at = (now / 1000 + ttl) * 1000;
    let sid = s
        .store
        .create_session(&user, method, now, expires_at)
        .await?;
    let (token, exp) = auth::issue_admin_token(
        &s.admin_secret,
        &user.id,
        &user.username,
        &sid,
        now / 1000,
        ttl,
    )
    .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Json(LoginReply {
        token,
        expires_at: exp,
        user,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcLoginBody {
    /// An ID token (or JWT access token) issued by the configured identity provider.
    pub token: String,
}

/// Exchanges an identity provider's token for a console session (which ends no later than the
/// provider's token would).
#[utoipa::path(post, path = "/api/auth/oidc", security(), request_body = OidcLoginBody,
    responses((status = 200, body = LoginReply), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn login_oidc(
    State(s): St,
    ApiJson(b): ApiJson<OidcLoginBody>,
) -> ApiResult<Json<LoginReply>> {
    let token = b.token.trim();
    if auth::is_admin_token(token) {
        return Err(ApiError::invalid(
            "token",
            "this is a Tern session token, not one from the identity provider",
        ));
    }
    let (user, token_expires) = oidc_user(&s, token).await?;
    let user = enabled(user)?;
    // The session ends no later than the provider's token: signing out at the provider (or a
    // short token lifetime there) must not leave a longer Tern session behind.
    let left = token_expires - now_millis() / 1000;
    let ttl = (s.opts.admin_session_ttl.as_secs() as i64).min(left);
    if ttl < 1 {
        return Err(ApiError::Unauthorized(
            "identity provider token refused: it has expired; sign in again".into(),
        ));
    }
    open_session(&s, user, SignInMethod::Oidc, ttl).await
}

/// Ends the current console session; its token is refused from now on.
#[utoipa::path(post, path = "/api/auth/logout", responses((status = 204), (status = 401, body = ErrorBody)))]
pub async fn logout(State(s): St, a: Admin) -> ApiResult<StatusCode> {
    if let Some(sid) = &a.session {
        s.store.revoke_session(&a.actor, &a.user.id, sid).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct AuthConfig {
    /// Local accounts with passwords are always available.
    pub password: bool,
    pub oidc: Option<OidcPublicConfig>,
    /// The server's public URL (what agents pass to `tern up --management-url`).
    pub public_url: String,
}

#[derive(Serialize, ToSchema)]
pub struct OidcPublicConfig {
    pub issuer: String,
    pub client_id: String,
    pub scopes: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
}

/// How admins can sign in (for the console's sign-in page); public.
#[utoipa::path(get, path = "/api/auth/config", security(), responses((status = 200, body = AuthConfig)))]
pub async fn auth_config(State(s): St) -> Json<AuthConfig> {
    let mut oidc = None;
    if let Some(v) = &s.oidc {
        if let Some(client_id) = &v.config.client_id {
            match v.discovery().await {
                Ok(d) => {
                    oidc = Some(OidcPublicConfig {
                        issuer: v.config.issuer.clone(),
                        client_id: client_id.clone(),
                        scopes: v.config.scopes.clone(),
                        authorization_endpoint: d.authorization_endpoint,
                        token_endpoint: d.token_endpoint,
                    })
                }
                Err(e) => tracing::warn!(error = %e, "OIDC discovery failed; SSO button hidden"),
            }
        }
    }
    Json(AuthConfig {
        password: true,
        oidc,
        public_url: s.public_url.get().cloned().unwrap_or_default(),
    })
}

/// The signed-in user.
#[utoipa::path(get, path = "/api/auth/me", responses((status = 200, body = User), (status = 401, body = ErrorBody)))]
pub async fn me(a: Admin) -> Json<User> {
    Json(a.user)
}

// ---------------------------------------------------------------------------------------------
// Users and tokens

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserBody {
    pub username: String,
    pub password: String,
    /// owner, admin, auditor or user (default admin). Only an owner creates owners.
    pub role: Option<Role>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserBody {
    pub disabled: Option<bool>,
    pub password: Option<String>,
    /// Required when changing one's own password.
    pub current_password: Option<String>,
    /// Only an owner changes roles; the last owner keeps theirs.
    pub role: Option<Role>,
}

/// Refuses an admin acting on an owner's or another admin's account (only owners do that).
fn may_manage(a: &Admin, target: &User, what: &str) -> ApiResult<()> {
    if a.user.id != target.id && target.role.is_admin() {
        a.require_owner(&format!("{what} of another admin or owner"))?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/users", responses((status = 200, body = [User])))]
pub async fn list_users(State(s): St, _a: Admin) -> ApiResult<Json<Vec<User>>> {
    Ok(Json(s.store.users().await?))
}

#[utoipa::path(post, path = "/api/users", request_body = NewUserBody,
    responses((status = 201, body = User), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_user(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<NewUserBody>,
) -> ApiResult<impl IntoResponse> {
    let username = name("username", &b.username)?;
    let role = b.role.unwrap_or(Role::Admin);
    if role == Role::Owner {
        a.require_owner("make someone an owner")?;
    }
    let hash = password(&s, "password", &b.password).await?;
    let u = s
        .store
        .create_user(&a.actor, &username, &hash, role)
        .await?;
    Ok((StatusCode::CREATED, Json(u)))
}

#[utoipa::path(get, path = "/api/users/{id}", responses((status = 200, body = User), (status = 404, body = ErrorBody)))]
pub async fn get_user(State(s): St, _a: Admin, ApiPath(id): ApiPath) -> ApiResult<Json<User>> {
    Ok(Json(s.store.user(&id).await?))
}

#[utoipa::path(put, path = "/api/users/{id}", request_body = UpdateUserBody, responses((status = 200, body = User), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn update_user(
    State(s): St,
    a: Admin,
    SourceAddr(source): SourceAddr,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<UpdateUserBody>,
) -> ApiResult<Json<User>> {
    let target = s.store.user(&id).await?;
    if !a.role().is_admin() {
        // Auditors and users may change their own password, nothing else.
        if a.user.id != id || b.disabled.is_some() || b.role.is_some() {
            return Err(ApiError::Forbidden(
                "you can change only your own password; ask an admin for anything else".into(),
            ));
        }
    }
    if b.role.is_some_and(|r| r != target.role) {
        a.require_owner("change roles")?;
    }
    if b.password.is_some() {
        may_manage(&a, &target, "change the password")?;
    }
    if b.disabled.is_some() {
        may_manage(&a, &target, "disable or enable the account")?;
    }
    if b.password.is_some() && target.source == "oidc" {
        return Err(ApiError::invalid(
            "password",
            "this account signs in through the identity provider and has no password",
        ));
    }
    if b.password.is_some() && a.user.id == id {
        // A stolen session must not be enough to take the account over.
        let Some(current) = b.current_password.clone().filter(|p| !p.is_empty()) else {
            return Err(ApiError::invalid(
                "current_password",
                "enter your current password to change it",
            ));
        };
        // Guesses here count with sign-in guesses (same username and source budget): a stolen
        // session must not become a fast password oracle.
        let reserved = s
            .sign_in_throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(&a.user.username, source, std::time::Instant::now());
        if let Err(t) = reserved {
            tracing::warn!(user = %a.user.username, source = ?source, "password change refused: too many wrong current passwords");
            return Err(ApiError::TooManyRequests(format!(
                "too many wrong passwords; try again in {} s",
                t.wait.as_secs().max(1)
            )));
        }
        let creds = s.store.user_credentials(&a.user.username).await?;
        let hash = creds.map(|c| c.password_hash).unwrap_or_default();
        if current.len() > 1024 || !s.passwords.verify(current, hash).await.map_err(busy)? {
            tracing::info!(user = %a.user.username, "password change refused: wrong current password");
            return Err(ApiError::invalid(
                "current_password",
                "is not your current password",
            ));
        }
        s.sign_in_throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .succeeded(&a.user.username, source);
    }
    let hash = match b.password.as_deref() {
        Some(p) => Some(password(&s, "password", p).await?),
        None => None,
    };
    let user = s
        .store
        .update_user(&a.actor, &id, b.disabled, hash.as_deref(), b.role)
        .await?;
    // A new password or a disabled account ends the user's other sessions (a password changed
    // because it leaked must lock out whoever used it); a disabled user's devices leave every
    // map (the store's change wakes the sync streams, which close theirs).
    if hash.is_some() || b.disabled == Some(true) {
        let keep = if a.user.id == id {
            a.session.as_deref()
        } else {
            None
        };
        let n = s.store.revoke_user_sessions(&id, keep).await?;
        tracing::info!(user = %user.username, sessions = n, "ended sessions after an account change");
    }
    if b.disabled == Some(true) {
        s.revoke_user_devices(&id).await?;
    }
    Ok(Json(user))
}

#[utoipa::path(delete, path = "/api/users/{id}", responses((status = 204), (status = 409, body = ErrorBody)))]
pub async fn delete_user(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    let target = s.store.user(&id).await?;
    may_manage(&a, &target, "delete the account")?;
    let devices: Vec<(String, String)> = s
        .store
        .peers()
        .await?
        .into_iter()
        .filter(|p| p.user_id.as_deref() == Some(id.as_str()))
        .map(|p| (p.id, p.wg_public_key))
        .collect();
    s.store.delete_user(&a.actor, &id).await?;
    for (peer, k) in &devices {
        if let Ok(k) = k.parse() {
            s.revoke_peer(peer, k);
        }
    }
    Ok(deleted())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    pub name: String,
    /// Lifetime in days (1-365); omitted = no expiry.
    pub expires_in_days: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct NewTokenReply {
    /// The token itself, shown only now.
    pub token: String,
    pub access_token: AccessToken,
}

#[utoipa::path(get, path = "/api/tokens", responses((status = 200, body = [AccessToken])))]
pub async fn list_tokens(State(s): St, a: Admin) -> ApiResult<Json<Vec<AccessToken>>> {
    Ok(Json(s.store.tokens(&a.user.id).await?))
}

/// Creates a personal access token for scripts; the token is returned once.
#[utoipa::path(post, path = "/api/tokens", request_body = NewTokenBody, responses((status = 201, body = NewTokenReply)))]
pub async fn create_token(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<NewTokenBody>,
) -> ApiResult<impl IntoResponse> {
    let n = name("name", &b.name)?;
    let expires_at = match b.expires_in_days {
        None => None,
        Some(d) if (1..=365).contains(&d) => Some(now_millis() + d * 86_400_000),
        Some(d) => {
            return Err(ApiError::invalid(
                "expires_in_days",
                format!("{d} is not within 1-365"),
            ))
        }
    };
    let token = auth::random_secret(PAT_PREFIX);
    let t = s
        .store
        .create_token(&a.actor, &a.user.id, &n, &hash_secret(&token), expires_at)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewTokenReply {
            token,
            access_token: t,
        }),
    ))
}

#[utoipa::path(delete, path = "/api/tokens/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_token(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_token(&a.actor, &a.user.id, &id).await?;
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Groups

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupBody {
    pub name: String,
}

#[utoipa::path(get, path = "/api/groups", responses((status = 200, body = [Group])))]
pub async fn list_groups(State(s): St, _a: Admin) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(s.store.groups().await?))
}

#[utoipa::path(post, path = "/api/groups", request_body = GroupBody,
    responses((status = 201, body = Group), (status = 409, body = ErrorBody)))]
pub async fn create_group(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<GroupBody>,
) -> ApiResult<impl IntoResponse> {
    let n = name("name", &b.name)?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_group(&a.actor, &n).await?),
    ))
}

#[utoipa::path(get, path = "/api/groups/{id}", responses((status = 200, body = Group), (status = 404, body = ErrorBody)))]
pub async fn get_group(State(s): St, _a: Admin, ApiPath(id): ApiPath) -> ApiResult<Json<Group>> {
    Ok(Json(s.store.group(&id).await?))
}

#[utoipa::path(put, path = "/api/groups/{id}", request_body = GroupBody, responses((status = 200, body = Group)))]
pub async fn update_group(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<GroupBody>,
) -> ApiResult<Json<Group>> {
    let n = name("name", &b.name)?;
    Ok(Json(s.store.rename_group(&a.actor, &id, &n).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupMembersBody {
    /// Peer ids: the group's members from now on (replacing the current ones).
    pub peers: Vec<String>,
}

/// Sets a group's members in one change.
#[utoipa::path(put, path = "/api/groups/{id}/members", request_body = GroupMembersBody,
    responses((status = 200, body = Group), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_group_members(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<GroupMembersBody>,
) -> ApiResult<Json<Group>> {
    if b.peers.len() > 100_000 {
        return Err(ApiError::invalid("peers", "at most 100,000 peers"));
    }
    Ok(Json(
        s.store.set_group_members(&a.actor, &id, &b.peers).await?,
    ))
}

#[utoipa::path(delete, path = "/api/groups/{id}", responses((status = 204), (status = 409, body = ErrorBody)))]
pub async fn delete_group(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_group(&a.actor, &id).await?;
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Setup keys

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSetupKeyBody {
    pub name: String,
    /// One-off (false, default) or reusable.
    #[serde(default)]
    pub reusable: bool,
    /// For reusable keys: how many peers it may admit; 0 or omitted = unlimited.
    #[serde(default)]
    pub usage_limit: i64,
    /// Lifetime in seconds (60 s to 365 days); omitted = never expires.
    pub expires_in_secs: Option<i64>,
    /// Peers joined with this key are removed some minutes after they disconnect.
    #[serde(default)]
    pub ephemeral: bool,
    /// Groups the new peers join (besides "All").
    #[serde(default)]
    pub auto_groups: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct NewSetupKeyReply {
    /// The key itself, shown only now.
    pub key: String,
    pub setup_key: SetupKey,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSetupKeyBody {
    pub name: Option<String>,
    /// true revokes the key (cannot be undone).
    pub revoked: Option<bool>,
    pub auto_groups: Option<Vec<String>>,
    /// true removes the key's expiry (e.g. keeps the key made at first start, which expires
    /// after 24 h). An expired key cannot be kept.
    pub keep: Option<bool>,
}

#[utoipa::path(get, path = "/api/setup-keys", responses((status = 200, body = [SetupKey])))]
pub async fn list_setup_keys(State(s): St, _a: Admin) -> ApiResult<Json<Vec<SetupKey>>> {
    Ok(Json(s.store.setup_keys().await?))
}

#[utoipa::path(post, path = "/api/setup-keys", request_body = NewSetupKeyBody,
    responses((status = 201, body = NewSetupKeyReply), (status = 422, body = ErrorBody)))]
pub async fn create_setup_key(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<NewSetupKeyBody>,
) -> ApiResult<impl IntoResponse> {
    let n = name("name", &b.name)?;
    if b.usage_limit < 0 {
        return Err(ApiError::invalid(
            "usage_limit",
            "must be 0 (unlimited) or more",
        ));
    }
    if !b.reusable && b.usage_limit > 1 {
        return Err(ApiError::invalid(
            "usage_limit",
            "a one-off key admits one peer; set reusable to allow more",
        ));
    }
    let expires_at = match b.expires_in_secs {
        None => None,
        Some(x) if (60..=365 * 86_400).contains(&x) => Some(now_millis() + x * 1000),
        Some(x) => {
            return Err(ApiError::invalid(
                "expires_in_secs",
                format!("{x} is not within 60 s to 365 days"),
            ))
        }
    };
    let key = auth::random_secret(SETUP_KEY_PREFIX);
    let new = NewSetupKey {
        name: n,
        reusable: b.reusable,
        usage_limit: b.usage_limit,
        expires_at,
        ephemeral: b.ephemeral,
        auto_groups: b.auto_groups,
    };
    let prefix = key
        .chars()
        .take(SETUP_KEY_PREFIX.len() + 4)
        .collect::<String>();
    let k = s
        .store
        .create_setup_key(&a.actor, &new, &hash_secret(&key), &prefix)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewSetupKeyReply { key, setup_key: k }),
    ))
}

#[utoipa::path(get, path = "/api/setup-keys/{id}", responses((status = 200, body = SetupKey), (status = 404, body = ErrorBody)))]
pub async fn get_setup_key(
    State(s): St,
    _a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<SetupKey>> {
    Ok(Json(s.store.setup_key(&id).await?))
}

#[utoipa::path(put, path = "/api/setup-keys/{id}", request_body = UpdateSetupKeyBody, responses((status = 200, body = SetupKey)))]
pub async fn update_setup_key(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<UpdateSetupKeyBody>,
) -> ApiResult<Json<SetupKey>> {
    let n = b.name.as_deref().map(|n| name("name", n)).transpose()?;
    Ok(Json(
        s.store
            .update_setup_key(
                &a.actor,
                &id,
                n.as_deref(),
                b.revoked,
                b.auto_groups.as_deref(),
                b.keep == Some(true),
            )
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/setup-keys/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_setup_key(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_setup_key(&a.actor, &id).await?;
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Peers

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePeerBody {
    pub name: Option<String>,
    /// Group ids (the peer always stays in "All").
    pub groups: Option<Vec<String>>,
    pub login_expiration_enabled: Option<bool>,
    /// Approve (true) a peer awaiting approval, or take the approval back (false).
    pub approved: Option<bool>,
}

/// Refuses a `user` another user's device.
fn own_device(a: &Admin, p: &Peer) -> ApiResult<()> {
    if a.role().sees_all() || p.user_id.as_deref() == Some(a.user.id.as_str()) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "peer {:?} is not one of your devices",
            p.name
        )))
    }
}

/// Every peer with its reported paths, each naming the peer at its other end (the whole list
/// tells which of them still exist).
async fn peers_with_paths(s: &AppState) -> ApiResult<Vec<Peer>> {
    let mut peers = s.store.peers().await?;
    s.with_connections(&mut peers);
    let names: std::collections::HashMap<String, String> = peers
        .iter()
        .map(|p| (p.id.clone(), p.name.clone()))
        .collect();
    for p in &mut peers {
        for c in &mut p.connections {
            c.peer_name = names.get(&c.peer_id).cloned();
        }
    }
    Ok(peers)
}

/// Marks the online peers among `peers` that report no path with whether their map lists no
/// other peer at all (then no policy connects them with anyone: a device in no group). For a
/// few peers at a time (one peer's page, a user's own devices): it computes their maps.
async fn mark_alone(s: &AppState, peers: &mut [Peer]) -> ApiResult<()> {
    if !peers
        .iter()
        .any(|p| p.connected && p.connections.is_empty() && p.wireguard.is_none())
    {
        return Ok(());
    }
    let idx = s.current_index().await?;
    let none = crate::netmap::RelaySettings::default();
    for p in peers
        .iter_mut()
        .filter(|p| p.connected && p.connections.is_empty() && p.wireguard.is_none())
    {
        p.alone = idx
            .map_for(&p.id, &none, 0)
            .map(|m| m.remote_peers.is_empty());
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/peers", responses((status = 200, body = [Peer])))]
pub async fn list_peers(
    State(s): St,
    a: Admin,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    use axum::http::header;
    if !a.role().sees_all() {
        // A user's own devices; their paths name peers they cannot see, by name only.
        let mut mine: Vec<Peer> = peers_with_paths(&s)
            .await?
            .into_iter()
            .filter(|p| p.user_id.as_deref() == Some(a.user.id.as_str()))
            .collect();
        mark_alone(&s, &mut mine).await?;
        return Ok(Json(mine).into_response());
    }
    // The console polls this every few seconds; most polls change nothing and get a 304.
    let etag = s.peers_etag();
    let cache = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "private, no-cache".to_string()),
    ];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if fresh {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    let mut peers = s.store.peers().await?;
    s.with_connections(&mut peers);
    Ok((cache, Json(peers)).into_response())
}

#[utoipa::path(get, path = "/api/peers/{id}", responses((status = 200, body = Peer), (status = 404, body = ErrorBody)))]
pub async fn get_peer(State(s): St, a: Admin, ApiPath(id): ApiPath) -> ApiResult<Json<Peer>> {
    let p = peers_with_paths(&s)
        .await?
        .into_iter()
        .find(|p| p.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("peer {id:?} not found")))?;
    own_device(&a, &p)?;
    let mut one = [p];
    mark_alone(&s, &mut one).await?;
    let [p] = one;
    Ok(Json(p))
}

#[derive(Serialize, ToSchema)]
pub struct ServerStatus {
    pub peers_total: i64,
    pub peers_online: i64,
    /// Peer pairs by path, as the agents report them.
    pub connections: ConnectionSummary,
    pub relay: RelayStatus,
    /// The management replica that answered.
    pub replica: String,
    /// Live management replicas (one unless several run on one PostgreSQL), oldest first.
    pub replicas: Vec<crate::store::ReplicaInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct ConnectionSummary {
    pub direct: u64,
    /// Through TURN or the TCP relay.
    pub relayed: u64,
    pub connecting: u64,
}

#[derive(Serialize, ToSchema)]
pub struct RelayStatus {
    /// Whether the relay in this process answers STUN; None when the relay runs elsewhere.
    pub healthy: Option<bool>,
    pub allocations: u64,
    pub tcp_clients: u64,
    pub auth_failures: u64,
    /// STUN, TURN and TCP-relay URLs handed to agents.
    pub urls: Vec<String>,
    /// The TURN relay's own load over its last seconds (None when the relay runs elsewhere).
    pub load: Option<RelayLoad>,
}

/// What the relay in this process measures of its own load.
#[derive(Serialize, ToSchema)]
pub struct RelayLoad {
    pub bits_per_sec: f64,
    pub datagrams_per_sec: f64,
    /// Datagrams its uplink dropped, and those it could not read in time, per second.
    pub send_drops_per_sec: f64,
    pub receive_drops_per_sec: f64,
    /// Bytes waiting to go out, and about how long they take to drain (None: nothing waits).
    pub unsent_bytes: u64,
    pub queue_ms: Option<f64>,
    pub overloaded: bool,
    /// Why, with the figures (empty when not overloaded).
    pub why: String,
}

/// Live status for the console's overview: peers online and the relay's health.
#[utoipa::path(get, path = "/api/status", responses((status = 200, body = ServerStatus)))]
pub async fn status(State(s): St, _a: Admin) -> ApiResult<Json<ServerStatus>> {
    use tern_relay::metrics::Metrics;
    let (peers_total, peers_online) = s.store.peer_counts().await?;
    let (direct, relayed, connecting) = s.connection_summary();
    let m = s.relay_metrics.get();
    // The relays every agent is given: those of all live replicas.
    let idx = s.current_index().await?;
    let r = s.opts.relay.with_replicas(&idx.snapshot().relays);
    Ok(Json(ServerStatus {
        replica: s.store.replica().to_string(),
        replicas: s.store.replicas().await?,
        peers_total,
        peers_online,
        connections: ConnectionSummary {
            direct,
            relayed,
            connecting,
        },
        relay: RelayStatus {
            healthy: s.relay_healthy().await,
            allocations: m.map_or(0, |m| Metrics::get(&m.allocations_active)),
            tcp_clients: m.map_or(0, |m| Metrics::get(&m.tcp_connections_active)),
            auth_failures: m.map_or(0, |m| Metrics::get(&m.auth_failures_total)),
            load: s.relay_load.get().map(|o| {
                let l = o.meter.load();
                RelayLoad {
                    bits_per_sec: l.bits_per_sec,
                    datagrams_per_sec: l.datagrams_per_sec,
                    send_drops_per_sec: l.send_drops_per_sec,
                    receive_drops_per_sec: l.receive_drops_per_sec,
                    unsent_bytes: l.unsent_bytes,
                    queue_ms: l.queue_ms,
                    overloaded: l.overloaded,
                    why: l.why,
                }
            }),
            urls: r
                .stun_urls
                .iter()
                .chain(&r.turn_urls)
                .chain(&r.tcp_relay_urls)
                .cloned()
                .collect(),
        },
    }))
}

#[utoipa::path(put, path = "/api/peers/{id}", request_body = UpdatePeerBody, responses((status = 200, body = Peer)))]
pub async fn update_peer(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<UpdatePeerBody>,
) -> ApiResult<Json<Peer>> {
    if !a.role().is_admin() {
        own_device(&a, &s.store.peer(&id).await?)?;
        if b.groups.is_some() || b.login_expiration_enabled.is_some() || b.approved.is_some() {
            return Err(ApiError::Forbidden(
                "you can rename your devices; groups, approval and login expiry are an admin's"
                    .into(),
            ));
        }
    }
    let n = b.name.as_deref().map(|n| name("name", n)).transpose()?;
    s.store
        .update_peer(
            &a.actor,
            &id,
            n.as_deref(),
            b.groups.as_deref(),
            b.login_expiration_enabled,
            b.approved,
        )
        .await?;
    Ok(Json(s.store.peer_with_name(&id).await?))
}

#[utoipa::path(delete, path = "/api/peers/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_peer(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    let peer = s.store.peer(&id).await?;
    own_device(&a, &peer)?;
    let key = peer.wg_public_key;
    s.store.delete_peer(&a.actor, &id).await?;
    // Its open streams end now (sync notices the deletion; signal is told here).
    if let Ok(k) = key.parse::<tern_proto::PublicKey>() {
        s.revoke_peer(&id, k);
    }
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Policies

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub protocol: Protocol,
    /// "22" or "8000-8080"; only for tcp/udp; empty = all ports.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default = "yes")]
    pub bidirectional: bool,
    /// Source group ids.
    pub sources: Vec<String>,
    /// Destination group ids.
    pub destinations: Vec<String>,
}

fn yes() -> bool {
    true
}

fn policy_input(b: PolicyBody) -> ApiResult<PolicyInput> {
    let n = name("name", &b.name)?;
    if b.description.len() > 1024 {
        return Err(ApiError::invalid(
            "description",
            "must be at most 1024 bytes",
        ));
    }
    if b.sources.is_empty() {
        return Err(ApiError::invalid(
            "sources",
            "give at least one source group",
        ));
    }
    if b.destinations.is_empty() {
        return Err(ApiError::invalid(
            "destinations",
            "give at least one destination group",
        ));
    }
    if !b.ports.is_empty() && !matches!(b.protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(ApiError::invalid(
            "ports",
            format!(
                "ports apply only to tcp or udp, not {}",
                b.protocol.as_str()
            ),
        ));
    }
    let ports = b
        .ports
        .iter()
        .map(|p| {
            p.parse::<PortRange>()
                .map_err(|e| ApiError::invalid("ports", e))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(PolicyInput {
        name: n,
        description: b.description,
        enabled: b.enabled,
        protocol: b.protocol,
        ports,
        bidirectional: b.bidirectional,
        sources: b.sources,
        destinations: b.destinations,
    })
}

#[utoipa::path(get, path = "/api/policies", responses((status = 200, body = [Policy])))]
pub async fn list_policies(State(s): St, _a: Admin) -> ApiResult<Json<Vec<Policy>>> {
    Ok(Json(s.store.policies().await?))
}

#[utoipa::path(post, path = "/api/policies", request_body = PolicyBody,
    responses((status = 201, body = Policy), (status = 422, body = ErrorBody)))]
pub async fn create_policy(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<PolicyBody>,
) -> ApiResult<impl IntoResponse> {
    let p = policy_input(b)?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.put_policy(&a.actor, None, &p).await?),
    ))
}

#[utoipa::path(get, path = "/api/policies/{id}", responses((status = 200, body = Policy), (status = 404, body = ErrorBody)))]
pub async fn get_policy(State(s): St, _a: Admin, ApiPath(id): ApiPath) -> ApiResult<Json<Policy>> {
    Ok(Json(s.store.policy(&id).await?))
}

#[utoipa::path(put, path = "/api/policies/{id}", request_body = PolicyBody, responses((status = 200, body = Policy)))]
pub async fn update_policy(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<PolicyBody>,
) -> ApiResult<Json<Policy>> {
    let p = policy_input(b)?;
    Ok(Json(s.store.put_policy(&a.actor, Some(&id), &p).await?))
}

#[utoipa::path(delete, path = "/api/policies/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_policy(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_policy(&a.actor, &id).await?;
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Routes

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteBody {
    /// CIDR, e.g. 192.168.50.0/24.
    pub network: String,
    #[serde(default)]
    pub description: String,
    /// Routing peer id (or give routing_group).
    pub routing_peer: Option<String>,
    /// Group of routing peers (HA).
    pub routing_group: Option<String>,
    /// Lower is preferred (1-9999).
    #[serde(default = "default_metric")]
    pub metric: i64,
    #[serde(default = "yes")]
    pub masquerade: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Distribution groups: peers in them install the route.
    pub groups: Vec<String>,
    /// Access groups: if set, only policies whose destinations include one of them open the
    /// routed network, for what they allow. Empty: policies towards the routing peer's groups
    /// do (unless `open_to_groups`).
    #[serde(default)]
    pub access_groups: Vec<String>,
    /// Without access groups: let every peer in the distribution groups reach the whole network
    /// whatever the policies say (an explicit choice). Omitted: false for a new route, unchanged
    /// when a route is saved again (a script written before this setting keeps its routes as
    /// they were).
    #[serde(default)]
    pub open_to_groups: Option<bool>,
    /// Create or save the route although its network overlaps one that a distribution peer
    /// reaches directly (otherwise 409 `needs_confirmation` says which).
    #[serde(default)]
    pub confirm_overlap: bool,
}

fn default_metric() -> i64 {
    100
}

/// A route that is probably a mistake: its network overlaps one that a peer receiving the route
/// reaches directly (that peer will not install it). Duplicates and partial overlaps with other
/// routes are refused by the store.
async fn route_overlaps(s: &AppState, r: &RouteInput) -> ApiResult<()> {
    let net = r.network;
    let overlaps = |n: &IpNet| n.contains(&net.network()) || net.contains(&n.network());
    let routes = s.store.routes().await?;
    let peers = s.store.peers().await?;
    // Peers that route this very network (this route or another one for failover) are expected
    // to be attached to it.
    let routes_it = |p: &crate::model::Peer| {
        Some(&p.id) == r.routing_peer.as_ref()
            || r.routing_group
                .as_ref()
                .is_some_and(|g| p.groups.contains(g))
            || routes.iter().filter(|o| o.network == net).any(|o| {
                o.routing_peer.as_ref() == Some(&p.id)
                    || o.routing_group
                        .as_ref()
                        .is_some_and(|g| p.groups.contains(g))
            })
    };
    for p in peers
        .iter()
        .filter(|p| !routes_it(p) && r.groups.iter().any(|g| p.groups.contains(g)))
    {
        if let Some(n) = s
            .reachable_of(&p.id)
            .into_iter()
            .find(|n| overlaps(n) && n.prefix_len() > 0)
        {
            return Err(ApiError::NeedsConfirmation {
                field: "network".into(),
                message: format!(
                    "{net} overlaps {n}, which {} reaches directly: that peer will not install the route. Confirm if that is intended",
                    p.name
                ),
            });
        }
    }
    Ok(())
}

/// The route `b` describes; `current` is the route it replaces (None when creating one).
fn route_input(b: RouteBody, current: Option<&Route>) -> ApiResult<RouteInput> {
    let open_to_groups = b
        .open_to_groups
        .unwrap_or_else(|| current.is_some_and(|c| c.open_to_groups && b.access_groups.is_empty()));
    let network = cidr("network", &b.network)?;
    if !(1..=9999).contains(&b.metric) {
        return Err(ApiError::invalid(
            "metric",
            format!("{} is not within 1-9999", b.metric),
        ));
    }
    if b.groups.is_empty() {
        return Err(ApiError::invalid(
            "groups",
            "give at least one distribution group",
        ));
    }
    if network.prefix_len() == 0 {
        return Err(ApiError::invalid(
            "network",
            "default routes (exit nodes) are not supported yet",
        ));
    }
    if b.open_to_groups == Some(true) && !b.access_groups.is_empty() {
        return Err(ApiError::invalid(
            "open_to_groups",
            "a route with access groups is opened by the policies towards them: leave access_groups empty to open the network to the distribution groups",
        ));
    }
    Ok(RouteInput {
        network,
        description: b.description,
        routing_peer: b.routing_peer,
        routing_group: b.routing_group,
        metric: b.metric,
        masquerade: b.masquerade,
        enabled: b.enabled,
        groups: b.groups,
        open_to_groups,
        access_groups: b.access_groups,
    })
}

#[utoipa::path(get, path = "/api/routes", responses((status = 200, body = [Route])))]
pub async fn list_routes(State(s): St, _a: Admin) -> ApiResult<Json<Vec<Route>>> {
    let mut routes = s.store.routes().await?;
    let peers = s.store.peers().await?;
    for r in &mut routes {
        r.serving = s.route_serving(r, &peers);
        r.clients = s.route_clients(r, &peers);
    }
    Ok(Json(routes))
}

#[utoipa::path(post, path = "/api/routes", request_body = RouteBody,
    responses((status = 201, body = Route), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_route(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<RouteBody>,
) -> ApiResult<impl IntoResponse> {
    let confirmed = b.confirm_overlap;
    let r = route_input(b, None)?;
    if !confirmed {
        route_overlaps(&s, &r).await?;
    }
    Ok((
        StatusCode::CREATED,
        Json(s.store.put_route(&a.actor, None, &r).await?),
    ))
}

#[utoipa::path(get, path = "/api/routes/{id}", responses((status = 200, body = Route), (status = 404, body = ErrorBody)))]
pub async fn get_route(State(s): St, _a: Admin, ApiPath(id): ApiPath) -> ApiResult<Json<Route>> {
    let mut r = s.store.route(&id).await?;
    let peers = s.store.peers().await?;
    r.serving = s.route_serving(&r, &peers);
    r.clients = s.route_clients(&r, &peers);
    Ok(Json(r))
}

#[utoipa::path(put, path = "/api/routes/{id}", request_body = RouteBody, responses((status = 200, body = Route)))]
pub async fn update_route(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<RouteBody>,
) -> ApiResult<Json<Route>> {
    let confirmed = b.confirm_overlap;
    let current = s.store.route(&id).await?;
    let r = route_input(b, Some(&current))?;
    if !confirmed {
        route_overlaps(&s, &r).await?;
    }
    Ok(Json(s.store.put_route(&a.actor, Some(&id), &r).await?))
}

#[utoipa::path(delete, path = "/api/routes/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_route(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_route(&a.actor, &id).await?;
    Ok(deleted())
}

// ---------------------------------------------------------------------------------------------
// Settings and audit

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    pub overlay_range: String,
    pub mtu: u32,
    pub peer_login_expiry_secs: i64,
    pub ephemeral_ttl_secs: i64,
    /// New peers wait for an admin's approval; omitted = unchanged.
    pub peer_approval_required: Option<bool>,
    /// Groups whose peers may publish their own ports with `tern expose`; omitted = unchanged.
    pub expose_groups: Option<Vec<String>>,
    /// Peers' DNS domain, e.g. tern.internal; omitted = unchanged.
    pub dns_domain: Option<String>,
    /// Groups every device added by a person's sign-in joins; omitted = unchanged.
    pub sign_in_groups: Option<Vec<String>>,
}

#[utoipa::path(get, path = "/api/settings", responses((status = 200, body = Settings)))]
pub async fn get_settings(State(s): St, _a: Admin) -> ApiResult<Json<Settings>> {
    Ok(Json(s.store.settings().await?))
}

#[utoipa::path(put, path = "/api/settings", request_body = SettingsBody,
    responses((status = 200, body = Settings), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_settings(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<SettingsBody>,
) -> ApiResult<Json<Settings>> {
    let range = cidr("overlay_range", &b.overlay_range)?;
    let max_prefix = if range.addr().is_ipv4() { 30 } else { 126 };
    if range.prefix_len() > max_prefix || range.prefix_len() < 8 {
        return Err(ApiError::invalid(
            "overlay_range",
            format!(
                "prefix /{} must be within /8 and /{max_prefix}",
                range.prefix_len()
            ),
        ));
    }
    if !(1280..=9000).contains(&b.mtu) {
        return Err(ApiError::invalid(
            "mtu",
            format!(
                "{} is not within 1280-9000 (IPv6 needs at least 1280)",
                b.mtu
            ),
        ));
    }
    if b.peer_login_expiry_secs < 0 {
        return Err(ApiError::invalid(
            "peer_login_expiry_secs",
            "must be 0 (never) or more",
        ));
    }
    if !(60..=30 * 86_400).contains(&b.ephemeral_ttl_secs) {
        return Err(ApiError::invalid(
            "ephemeral_ttl_secs",
            "must be within 60 s and 30 days",
        ));
    }
    let current = s.store.settings().await?;
    let peer_approval_required = b
        .peer_approval_required
        .unwrap_or(current.peer_approval_required);
    let expose_groups = b.expose_groups.unwrap_or(current.expose_groups);
    let sign_in_groups = b.sign_in_groups.unwrap_or(current.sign_in_groups);
    let dns_domain = match b.dns_domain.as_deref() {
        Some(d) => crate::model::dns_name(d).map_err(|e| ApiError::invalid("dns_domain", e))?,
        None => current.dns_domain,
    };
    let new = Settings {
        dns_domain,
        overlay_range: range,
        mtu: b.mtu,
        peer_login_expiry_secs: b.peer_login_expiry_secs,
        ephemeral_ttl_secs: b.ephemeral_ttl_secs,
        peer_approval_required,
        expose_groups,
        sign_in_groups,
        network_serial: 0,
    };
    Ok(Json(s.store.update_settings(&a.actor, &new).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Actor, e.g. "user:admin" (also matches that user's tokens and SSO sign-ins).
    pub actor: Option<String>,
    /// Action prefix, e.g. "peer." or "policy.put".
    pub action: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// At most 1000; default 200.
    pub limit: Option<i64>,
    /// Only events about this object (a peer's, route's, ... id).
    pub target: Option<String>,
}

#[utoipa::path(get, path = "/api/audit", params(AuditQuery), responses((status = 200, body = [AuditEvent])))]
pub async fn list_audit(
    State(s): St,
    _a: Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEvent>>> {
    let f = AuditFilter {
        actor: q.actor.filter(|s| !s.is_empty()),
        action: q.action.filter(|s| !s.is_empty()),
        since: q.since,
        until: q.until,
        limit: q.limit.unwrap_or(200),
        target: q.target.filter(|s| !s.is_empty()),
    };
    if let Some(l) = q.limit {
        if !(1..=1000).contains(&l) {
            return Err(ApiError::invalid(
                "limit",
                format!("{l} is not within 1-1000"),
            ));
        }
    }
    Ok(Json(s.store.audit_events(&f).await?))
}
