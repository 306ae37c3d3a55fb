//! Plain WireGuard devices: an admin adds one and gets its `wg-quick` configuration (and a QR
//! code for the phone app) once; the device is then a peer like any other (groups, policies,
//! routes, DNS name, removal).

use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::handlers::Admin;
use crate::model::Peer;
use crate::state::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_proto::SecretKey;
use utoipa::ToSchema;

type St = State<Arc<AppState>>;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireguardDeviceBody {
    /// The device's peer name (letters, digits and dashes), e.g. gina-phone.
    pub name: String,
    /// Group ids besides "All" (policies and routes follow them).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The new device, and its configuration: shown once (its private key is not stored).
#[derive(Serialize, ToSchema)]
pub struct WireguardDeviceCreated {
    pub peer: Peer,
    /// A `wg-quick` configuration file, private key included.
    pub config: String,
    /// Suggested file name (also a valid `wg-quick` interface name).
    pub file_name: String,
    /// The same configuration as a QR code (SVG), for the WireGuard phone apps.
    pub qr_svg: String,
}

/// A peer name an admin chose: a DNS label (the device is `<name>.<domain>` on every agent).
fn device_name(s: &str) -> Result<String, ApiError> {
    let n = s.trim().to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 48
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !n.starts_with('-')
        && !n.ends_with('-');
    if ok {
        Ok(n)
    } else if n.is_empty() {
        Err(ApiError::invalid(
            "name",
            "name the device, e.g. gina-phone",
        ))
    } else {
        Err(ApiError::invalid(
            "name",
            format!("{s:?}: use up to 48 letters, digits and dashes (not at either end), e.g. gina-phone"),
        ))
    }
}

/// `wg-quick` takes the file name as the interface name: at most 15 characters.
fn file_name(name: &str) -> String {
    let stem: String = name.chars().take(15).collect();
    format!("{}.conf", stem.trim_end_matches('-'))
}

fn qr_svg(text: &str) -> Result<String, ApiError> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::L)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(256, 256)
        .quiet_zone(true)
        .build())
}

fn gateway(s: &AppState) -> Result<Arc<crate::wgdev::Gateway>, ApiError> {
    s.wireguard.get().cloned().ok_or_else(|| {
        ApiError::Unavailable(
            "WireGuard devices are off on this server: run tern-server with its embedded relay and --wireguard-listen (default 0.0.0.0:51820)".into(),
        )
    })
}

/// The configuration for `peer` with its new private key, and its QR code.
async fn issued(
    s: &AppState,
    gw: &crate::wgdev::Gateway,
    peer: &Peer,
    secret: &SecretKey,
) -> Result<WireguardDeviceCreated, ApiError> {
    // The device sends the overlay and every routed network its map offers through the tunnel.
    let idx = s.net_index().await?;
    let mut allowed: Vec<IpNet> = vec![idx.snapshot().settings.overlay_range];
    let expiry = crate::grpc::now_unix() + s.opts.relay_credentials_ttl.as_secs() as i64;
    if let Some(map) = idx.map_for(&peer.id, &s.opts.relay, expiry) {
        for r in &map.routes {
            if let Ok(n) = r.network.parse::<IpNet>() {
                if !allowed.contains(&n) {
                    allowed.push(n);
                }
            }
        }
    }
    let config = gw.config(&peer.name, secret, &peer.overlay_ip, &allowed);
    let peer = s.store.peer_with_name(&peer.id).await?;
    Ok(WireguardDeviceCreated {
        qr_svg: qr_svg(&config)?,
        file_name: file_name(&peer.name),
        config,
        peer,
    })
}

#[utoipa::path(post, path = "/api/wireguard-devices", request_body = WireguardDeviceBody,
    responses((status = 201, body = WireguardDeviceCreated), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_wireguard_device(
    State(s): St,
    a: Admin,
    ApiJson(b): ApiJson<WireguardDeviceBody>,
) -> Result<impl IntoResponse, ApiError> {
    let gw = gateway(&s)?;
    let name = device_name(&b.name)?;
    let secret = SecretKey::generate();
    let public = secret.public_key();
    let mesh = gw.mesh_key_for(public.as_bytes());
    let peer = s
        .store
        .create_wireguard_device(&a.actor, &name, &b.groups, &public.to_base64(), &mesh)
        .await?;
    tracing::info!(peer = %peer.id, name = %peer.name, ip = %peer.overlay_ip, "WireGuard device added");
    Ok((
        StatusCode::CREATED,
        Json(issued(&s, &gw, &peer, &secret).await?),
    ))
}

/// A new configuration for a device (lost, or to take in routes added since): new keys; the
/// old configuration stops working at once.
#[utoipa::path(post, path = "/api/wireguard-devices/{id}/config",
    responses((status = 200, body = WireguardDeviceCreated), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn reissue_wireguard_config(
    State(s): St,
    a: Admin,
    ApiPath(id): ApiPath,
) -> Result<Json<WireguardDeviceCreated>, ApiError> {
    let gw = gateway(&s)?;
    let secret = SecretKey::generate();
    let public = secret.public_key();
    let mesh = gw.mesh_key_for(public.as_bytes());
    let peer = s
        .store
        .rekey_wireguard_device(&a.actor, &id, &public.to_base64(), &mesh)
        .await?;
    tracing::info!(peer = %peer.id, name = %peer.name, "WireGuard device got new keys");
    Ok(Json(issued(&s, &gw, &peer, &secret).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_dns_labels() {
        assert_eq!(device_name(" Gina-Phone ").ok(), Some("gina-phone".into()));
        assert!(device_name("").is_err());
        assert!(device_name("gina phone").is_err());
        assert!(device_name("-x").is_err());
        assert!(device_name(&"a".repeat(49)).is_err());
    }

    #[test]
    fn file_names_fit_an_interface_name() {
        assert_eq!(file_name("gina-phone"), "gina-phone.conf");
        assert_eq!(file_name("a-very-long-device-name"), "a-very-long-dev.conf");
        assert_eq!(file_name("abcdefghijklmn-x"), "abcdefghijklmn.conf");
    }

    #[test]
    fn the_qr_code_is_an_svg() {
        let svg = qr_svg("[Interface]\nPrivateKey = x\n").expect("qr");
        assert!(svg.starts_with("<?xml") || svg.starts_with("<svg"));
        assert!(svg.contains("</svg>"));
    }
}
