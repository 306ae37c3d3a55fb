//! Admin REST API (axum, JSON) with its OpenAPI document at `/api/openapi.json`.
//! Every error is a JSON body `{"error": kind, "message": text, "field": name?}` with a 4xx status
//! for bad input; storage failures are a 500 whose details stay in the server log.

pub mod authz;
mod devices;
mod dns;
mod error;
mod handlers;
mod services;
mod wireguard;

pub use error::ApiError;
pub use handlers::Admin;

use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use utoipa::OpenApi;

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    use handlers::*;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/auth/login", post(login))
        .route("/api/auth/me", get(me))
        .route("/api/auth/logout", post(logout))
        .route("/api/auth/oidc", post(login_oidc))
        .route("/api/auth/config", get(auth_config))
        .route("/api/users", get(list_users).post(create_user))
        .route(
            "/api/users/{id}",
            get(get_user).put(update_user).delete(delete_user),
        )
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", axum::routing::delete(delete_token))
        .route("/api/groups", get(list_groups).post(create_group))
        .route(
            "/api/groups/{id}",
            get(get_group).put(update_group).delete(delete_group),
        )
        .route(
            "/api/groups/{id}/members",
            axum::routing::put(set_group_members),
        )
        .route(
            "/api/setup-keys",
            get(list_setup_keys).post(create_setup_key),
        )
        .route(
            "/api/setup-keys/{id}",
            get(get_setup_key)
                .put(update_setup_key)
                .delete(delete_setup_key),
        )
        .route("/api/peers", get(list_peers))
        .route("/api/status", get(status))
        .route(
            "/api/peers/{id}",
            get(get_peer).put(update_peer).delete(delete_peer),
        )
        .route("/api/policies", get(list_policies).post(create_policy))
        .route(
            "/api/policies/{id}",
            get(get_policy).put(update_policy).delete(delete_policy),
        )
        .route("/api/routes", get(list_routes).post(create_route))
        .route(
            "/api/routes/{id}",
            get(get_route).put(update_route).delete(delete_route),
        )
        .route(
            "/api/services",
            get(services::list_services).post(services::create_service),
        )
        .route(
            "/api/services/{id}",
            get(services::get_service)
                .put(services::update_service)
                .delete(services::delete_service),
        )
        .route("/api/settings", get(get_settings).put(update_settings))
        .route("/api/audit", get(list_audit))
        .route(
            "/api/nameservers",
            get(dns::list_nameservers).post(dns::create_nameserver),
        )
        .route(
            "/api/nameservers/{id}",
            get(dns::get_nameserver)
                .put(dns::update_nameserver)
                .delete(dns::delete_nameserver),
        )
        .route(
            "/api/wireguard-devices",
            post(wireguard::create_wireguard_device),
        )
        .route(
            "/api/wireguard-devices/{id}/config",
            post(wireguard::reissue_wireguard_config),
        )
        .route("/api/device/{code}", get(devices::get_device_login))
        .route(
            "/api/device/{code}/approve",
            post(devices::approve_device_login),
        )
        .route("/api/device/{code}/deny", post(devices::deny_device_login))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authz::authorize,
        ))
        .merge(crate::web::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // JSON and console files are gzipped for clients that ask (small bodies are left alone); the
        // fastest level keeps most of the gain (bench_console) at a fraction of the CPU.
        .layer(
            tower_http::compression::CompressionLayer::new()
                .gzip(true)
                .quality(tower_http::CompressionLevel::Fastest),
        )
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Tern management API", description = "Admin API of the Tern mesh overlay."),
    paths(
        handlers::healthz,
        handlers::login, handlers::me, handlers::logout, handlers::login_oidc, handlers::auth_config,
        handlers::list_users, handlers::create_user, handlers::get_user, handlers::update_user, handlers::delete_user,
        handlers::list_tokens, handlers::create_token, handlers::delete_token,
        handlers::list_groups, handlers::create_group, handlers::get_group, handlers::update_group, handlers::set_group_members, handlers::delete_group,
        handlers::list_setup_keys, handlers::create_setup_key, handlers::get_setup_key, handlers::update_setup_key, handlers::delete_setup_key,
        handlers::list_peers, handlers::get_peer, handlers::status, handlers::update_peer, handlers::delete_peer,
        handlers::list_policies, handlers::create_policy, handlers::get_policy, handlers::update_policy, handlers::delete_policy,
        handlers::list_routes, handlers::create_route, handlers::get_route, handlers::update_route, handlers::delete_route,
        services::list_services, services::create_service, services::get_service, services::update_service, services::delete_service,
        handlers::get_settings, handlers::update_settings,
        handlers::list_audit,
        devices::get_device_login, devices::approve_device_login, devices::deny_device_login,
        dns::list_nameservers, dns::create_nameserver, dns::get_nameserver, dns::update_nameserver, dns::delete_nameserver,
        wireguard::create_wireguard_device, wireguard::reissue_wireguard_config,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or tern_pat_…")
                    .build(),
            ),
        );
    }
}
