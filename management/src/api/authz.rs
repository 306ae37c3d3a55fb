//! Who may call which route: the one table of the API's role rules, applied to every request
//! after routing (by the route's template and method), before any handler runs. Handlers add
//! only what depends on the row (a `user` sees their own devices; only an owner changes roles).

use super::error::ApiError;
use super::handlers::authenticate;
use crate::model::Role;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Routes anyone may call, signed in or not.
pub const PUBLIC: &[&str] = &[
    "/healthz",
    "/api/openapi.json",
    "/api/auth/login",
    "/api/auth/oidc",
    "/api/auth/config",
];

/// Whether `role` may call `method` on the route template `path` (the handler may still narrow
/// it to the caller's own rows).
pub fn permitted(role: Role, method: &Method, path: &str) -> bool {
    let read = *method == Method::GET;
    match path {
        // Every account: itself, its own tokens, signing out; looking up a device's code.
        "/api/auth/me" | "/api/auth/logout" | "/api/tokens" | "/api/tokens/{id}" => true,
        "/api/device/{code}" => true,
        // Approving makes the device the caller's: not for a read-only auditor.
        "/api/device/{code}/approve" | "/api/device/{code}/deny" => role != Role::Auditor,
        // A user reads, renames and removes their own devices; an auditor only reads.
        "/api/peers" => read,
        "/api/peers/{id}" => role != Role::Auditor || read,
        // Anyone changes their own password (the handler allows nothing else to non-admins).
        "/api/users/{id}" if *method == Method::PUT => true,
        _ => role.is_admin() || (role == Role::Auditor && read),
    }
}

/// What a refused role is told.
pub fn refusal(role: Role, method: &Method) -> String {
    match role {
        Role::Auditor => "auditors can read everything but change nothing".into(),
        Role::User if *method == Method::GET => {
            "users see only their own devices; this needs an admin or an auditor".into()
        }
        _ => format!("a {role} cannot change this; ask an admin"),
    }
}

/// Authenticates every non-public API request and checks [`permitted`]; the caller is handed to
/// the handler (as [`Admin`]) in the request's extensions.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    path: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(route) = path.map(|p| p.as_str().to_string()) else {
        return next.run(req).await;
    };
    if PUBLIC.contains(&route.as_str()) || !route.starts_with("/api/") {
        return next.run(req).await;
    }
    let caller = match authenticate(&state, req.headers()).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if !permitted(caller.user.role, req.method(), &route) {
        tracing::info!(user = %caller.user.username, role = %caller.user.role, method = %req.method(), route, "refused by role");
        return ApiError::Forbidden(refusal(caller.user.role, req.method())).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_admins_may_do_everything_auditors_only_read() {
        for path in ["/api/policies", "/api/settings", "/api/users", "/api/audit"] {
            for m in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
                assert!(permitted(Role::Owner, &m, path));
                assert!(permitted(Role::Admin, &m, path));
                assert_eq!(
                    permitted(Role::Auditor, &m, path),
                    m == Method::GET,
                    "{m} {path}"
                );
                assert!(!permitted(Role::User, &m, path), "{m} {path}");
            }
        }
    }

    #[test]
    fn users_reach_only_their_own_things() {
        let u = Role::User;
        assert!(permitted(u, &Method::GET, "/api/peers"));
        assert!(permitted(u, &Method::PUT, "/api/peers/{id}"));
        assert!(permitted(u, &Method::DELETE, "/api/peers/{id}"));
        assert!(!permitted(
            Role::Auditor,
            &Method::DELETE,
            "/api/peers/{id}"
        ));
        assert!(permitted(u, &Method::POST, "/api/device/{code}/approve"));
        assert!(!permitted(u, &Method::GET, "/api/setup-keys"));
        assert!(!permitted(u, &Method::GET, "/api/users"));
        assert!(
            permitted(u, &Method::PUT, "/api/users/{id}"),
            "own password"
        );
        assert!(refusal(Role::Auditor, &Method::POST).contains("change nothing"));
        assert!(!permitted(
            Role::Auditor,
            &Method::POST,
            "/api/device/{code}/approve"
        ));
        assert!(permitted(Role::Auditor, &Method::GET, "/api/device/{code}"));
    }
}
