//! Nameserver groups: queries for listed domains go to nameservers inside the network.

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::handlers::{name, Admin};
use crate::model::{dns_name, NameserverGroup};
use crate::state::AppState;
use crate::store::NameserverInput;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use utoipa::ToSchema;

type St = State<Arc<AppState>>;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameserverBody {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Domains whose names go to these nameservers, e.g. ["factory.local"].
    pub domains: Vec<String>,
    /// "IP" or "IP:PORT" (port 53 by default), inside a route's network or a peer's address.
    pub nameservers: Vec<String>,
    /// Group ids: peers in any of them use this nameserver group.
    pub groups: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// A nameserver in canonical form ("IP" for port 53, else "IP:PORT").
fn server(s: &str) -> Result<(String, IpAddr), String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok((ip.to_string(), ip));
    }
    match t.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!("{t:?}: port 0 is not a port")),
        Ok(a) if a.port() == 53 => Ok((a.ip().to_string(), a.ip())),
        Ok(a) => Ok((a.to_string(), a.ip())),
        Err(_) => Err(format!(
            "{t:?} is not an address, e.g. 192.168.50.2 or 192.168.50.2:5353"
        )),
    }
}

async fn input(s: &AppState, b: NameserverBody) -> Result<NameserverInput, ApiError> {
    let n = name("name", &b.name)?;
    if b.domains.is_empty() {
        return Err(ApiError::invalid(
            "domains",
            "name at least one domain, e.g. factory.local",
        ));
    }
    let settings = s.store.settings().await?;
    let mut domains = vec![];
    for d in &b.domains {
        let d = dns_name(d).map_err(|e| ApiError::invalid("domains", e))?;
        if d == settings.dns_domain || d.ends_with(&format!(".{}", settings.dns_domain)) {
            return Err(ApiError::invalid(
                "domains",
                format!(
                    "{d} is the peers' own domain ({}), which every agent answers itself",
                    settings.dns_domain
                ),
            ));
        }
        if !domains.contains(&d) {
            domains.push(d);
        }
    }
    if b.nameservers.is_empty() {
        return Err(ApiError::invalid(
            "nameservers",
            "name at least one nameserver, e.g. 192.168.50.2",
        ));
    }
    if b.nameservers.len() > 8 || domains.len() > 64 {
        return Err(ApiError::invalid(
            "nameservers",
            "at most 8 nameservers and 64 domains per group",
        ));
    }
    // Agents reach a nameserver only through the network: behind a route, or a peer itself.
    let routes = s.store.routes().await?;
    let peers = s.store.peers().await?;
    let mut servers = vec![];
    for x in &b.nameservers {
        let (canon, ip) = server(x).map_err(|e| ApiError::invalid("nameservers", e))?;
        let reachable = routes.iter().any(|r| r.network.contains(&ip))
            || peers.iter().any(|p| p.overlay_ip == ip.to_string());
        if !reachable {
            return Err(ApiError::invalid(
                "nameservers",
                format!(
                    "{ip} is outside every route and is no peer's address: agents could not reach it (add a route for its network first)"
                ),
            ));
        }
        if !servers.contains(&canon) {
            servers.push(canon);
        }
    }
    if b.groups.is_empty() {
        return Err(ApiError::invalid(
            "groups",
            "pick the groups whose peers use these nameservers",
        ));
    }
    Ok(NameserverInput {
        name: n,
        description: b.description.trim().to_string(),
        domains,
        nameservers: servers,
        groups: b.groups,
        enabled: b.enabled,
    })
}

#[utoipa::path(get, path = "/api/nameservers", responses((status = 200, body = [NameserverGroup])))]
pub async fn list_nameservers(
    State(s): St,
    _a: Admin,
) -> Result<Json<Vec<NameserverGroup>>, ApiError> {
    Ok(Json(s.store.nameserver_groups().await?))
}

#[utoipa::path(post, path = "/api/nameservers", request_body = NameserverBody,
    responses((status = 201, body = NameserverGroup), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_nameserver(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<NameserverBody>,
) -> Result<impl IntoResponse, ApiError> {
    let i = input(&s, b).await?;
    let n = s.store.put_nameserver_group(&a.actor, None, &i).await?;
    Ok((StatusCode::CREATED, Json(n)))
}

#[utoipa::path(get, path = "/api/nameservers/{id}", responses((status = 200, body = NameserverGroup), (status = 404, body = ErrorBody)))]
pub async fn get_nameserver(
    State(s): St,
    _a: Admin,
    ApiPath(id): ApiPath,
) -> Result<Json<NameserverGroup>, ApiError> {
    Ok(Json(s.store.nameserver_group(&id).await?))
}

#[utoipa::path(put, path = "/api/nameservers/{id}", request_body = NameserverBody,
    responses((status = 200, body = NameserverGroup), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update_nameserver(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
    ApiJson(b): ApiJson<NameserverBody>,
) -> Result<Json<NameserverGroup>, ApiError> {
    s.store.nameserver_group(&id).await?;
    let i = input(&s, b).await?;
    Ok(Json(
        s.store
            .put_nameserver_group(&a.actor, Some(&id), &i)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/nameservers/{id}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete_nameserver(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> Result<StatusCode, ApiError> {
    s.store.delete_nameserver_group(&a.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_addresses_with_an_optional_port() {
        assert_eq!(
            server("192.168.50.2").map(|x| x.0),
            Ok("192.168.50.2".into())
        );
        assert_eq!(
            server("192.168.50.2:53").map(|x| x.0),
            Ok("192.168.50.2".into())
        );
        assert_eq!(
            server("192.168.50.2:5353").map(|x| x.0),
            Ok("192.168.50.2:5353".into())
        );
        assert_eq!(
            server("[fd00::2]:5353").map(|x| x.0),
            Ok("[fd00::2]:5353".into())
        );
        assert!(server("dns.factory").is_err());
        assert!(server("192.168.50.2:0").is_err());
    }
}
