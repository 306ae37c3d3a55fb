//! REST for public services: ports on the server's public address carried to a target in the
//! mesh. Validation here covers what only the server knows (its port range, its own ports, ports
//! other programs hold); the store checks names, ports of other services and targets.

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::handlers::{cidr, name, Admin};
use crate::model::{PublicService, ServiceProtocol};
use crate::publish::Publisher;
use crate::state::AppState;
use crate::store::{default_idle_timeout, ServiceInput};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ipnet::IpNet;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::ToSchema;

type St = State<Arc<AppState>>;
type ApiResult<T> = Result<T, ApiError>;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceBody {
    pub name: String,
    /// "tcp" or "udp".
    pub protocol: String,
    /// Port on the server's public address, within the server's `--public-ports`.
    pub public_port: i64,
    /// A peer's overlay address, or an address inside a routed network.
    pub target_ip: String,
    pub target_port: i64,
    /// CIDRs (or single addresses) allowed to connect; give 0.0.0.0/0 (and ::/0) to open to
    /// everyone.
    pub allowed_sources: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// TCP only: a PROXY protocol v2 header tells the target the client's address.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Close a connection (TCP) or flow (UDP) after this long without traffic; default 3600 s
    /// for TCP, 60 s for UDP.
    pub idle_timeout_secs: Option<i64>,
}

fn yes() -> bool {
    true
}

fn port(field: &str, v: i64) -> ApiResult<u16> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid(field, format!("{v} is not a port (1-65535)")))
}

fn publisher(s: &AppState) -> ApiResult<&Arc<Publisher>> {
    s.publisher.get().ok_or_else(|| {
        ApiError::Unavailable("public services are not served by this process".into())
    })
}

fn input(
    p: &Publisher,
    b: ServiceBody,
    current: Option<&PublicService>,
    others: &[PublicService],
) -> ApiResult<ServiceInput> {
    let n = name("name", &b.name)?;
    let protocol: ServiceProtocol = b
        .protocol
        .trim()
        .parse()
        .map_err(|e: String| ApiError::invalid("protocol", e))?;
    let public_port = port("public_port", b.public_port)?;
    p.opts
        .check_port(protocol, public_port)
        .map_err(|e| ApiError::invalid("public_port", e))?;
    let same_listener = current
        .is_some_and(|c| c.enabled && c.protocol == protocol && c.public_port == public_port);
    // Another service's port is named as such (even while its listener is not open), before
    // asking the system whether the port is free.
    if let Some(o) = others.iter().find(|o| {
        o.protocol == protocol
            && o.public_port == public_port
            && current.is_none_or(|c| c.id != o.id)
    }) {
        return Err(ApiError::invalid(
            "public_port",
            format!(
                "port {public_port}/{} is already used by service {:?}",
                protocol.as_str(),
                o.name
            ),
        ));
    }
    if !same_listener {
        p.check_free(protocol, public_port)
            .map_err(|e| ApiError::invalid("public_port", e))?;
    }
    let target_ip = b.target_ip.trim().parse().map_err(|_| {
        ApiError::invalid(
            "target_ip",
            format!("{:?} is not an IP address, e.g. 192.168.50.10", b.target_ip),
        )
    })?;
    let target_port = port("target_port", b.target_port)?;
    if b.allowed_sources.is_empty() {
        return Err(ApiError::invalid(
            "allowed_sources",
            "give at least one source network; 0.0.0.0/0 opens the service to everyone",
        ));
    }
    if b.allowed_sources.len() > 100 {
        return Err(ApiError::invalid(
            "allowed_sources",
            "at most 100 source networks",
        ));
    }
    // A bare address means that one host.
    let allowed_sources = b
        .allowed_sources
        .iter()
        .map(|s| match s.trim().parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(IpNet::from(ip)),
            Err(_) => cidr("allowed_sources", s),
        })
        .collect::<ApiResult<Vec<_>>>()?;
    if b.proxy_protocol && protocol == ServiceProtocol::Udp {
        return Err(ApiError::invalid(
            "proxy_protocol",
            "the PROXY protocol header is for TCP services only",
        ));
    }
    let idle_timeout_secs = match b.idle_timeout_secs {
        None => default_idle_timeout(protocol),
        Some(v) if (10..=7 * 86_400).contains(&v) => v as u32,
        Some(v) => {
            return Err(ApiError::invalid(
                "idle_timeout_secs",
                format!("{v} is not within 10 s and 7 days"),
            ))
        }
    };
    Ok(ServiceInput {
        name: n,
        protocol,
        public_port,
        target_ip,
        target_port,
        allowed_sources,
        enabled: b.enabled,
        proxy_protocol: b.proxy_protocol,
        idle_timeout_secs,
    })
}

/// Fills what the store does not know: address, route in words, live counters.
fn present(p: &Publisher, mut s: PublicService) -> PublicService {
    s.public_address = p.opts.address(s.public_port);
    s.reached_via = p.reached_via(&s);
    s.stats = p.stats(&s.id);
    s
}

#[utoipa::path(get, path = "/api/services", responses((status = 200, body = [PublicService])))]
pub async fn list_services(State(s): St, _a: Admin) -> ApiResult<Json<Vec<PublicService>>> {
    let p = publisher(&s)?;
    Ok(Json(
        s.store
            .services()
            .await?
            .into_iter()
            .map(|x| present(p, x))
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/services", request_body = ServiceBody,
    responses((status = 201, body = PublicService), (status = 422, body = ErrorBody)))]
pub async fn create_service(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<ServiceBody>,
) -> ApiResult<impl IntoResponse> {
    let p = publisher(&s)?;
    let i = input(p, b, None, &s.store.services().await?)?;
    let out = s.store.put_service(&a.actor, None, &i).await?;
    Ok((StatusCode::CREATED, Json(present(p, out))))
}

#[utoipa::path(get, path = "/api/services/{id}", responses((status = 200, body = PublicService), (status = 404, body = ErrorBody)))]
pub async fn get_service(
    State(s): St,
    _a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<PublicService>> {
    let p = publisher(&s)?;
    Ok(Json(present(p, s.store.service(&id).await?)))
}

#[utoipa::path(put, path = "/api/services/{id}", request_body = ServiceBody,
    responses((status = 200, body = PublicService), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_service(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<ServiceBody>,
) -> ApiResult<Json<PublicService>> {
    let p = publisher(&s)?;
    let current = s.store.service(&id).await?;
    let i = input(p, b, Some(&current), &s.store.services().await?)?;
    let out = s.store.put_service(&a.actor, Some(&id), &i).await?;
    Ok(Json(present(p, out)))
}

#[utoipa::path(delete, path = "/api/services/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_service(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_service(&a.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
