//! The admin console: static files from `web/` embedded in the binary (no build step), served at
//! `/` with a strict content security policy. The console uses only the public REST API.

use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// (name, content type, bytes) of every console file.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/api.js"),
    ),
    (
        "ui.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/ui.js"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/pages.js"),
    ),
    (
        "network.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/network.js"),
    ),
    (
        "sso.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/sso.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/style.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../web/icon.svg"),
    ),
];
const INDEX: &[u8] = include_bytes!("../../web/index.html");

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{file}", get(asset))
        .route("/device", get(device))
}

#[derive(serde::Deserialize)]
struct DeviceQuery {
    code: Option<String>,
}

/// The short address `tern up` prints for a device sign-in: the console's approval page (with
/// the code filled in when the link carries one).
async fn device(axum::extract::Query(q): axum::extract::Query<DeviceQuery>) -> Response {
    let code = q
        .code
        .as_deref()
        .and_then(crate::store::normalize_user_code);
    let to = match code {
        Some(c) => format!("/#/device/{c}"),
        None => "/#/device".to_string(),
    };
    axum::response::Redirect::to(&to).into_response()
}

/// The origin (scheme://host:port) of a URL, for the CSP.
fn origin(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

async fn index(State(s): State<Arc<AppState>>) -> Response {
    // The console may call the identity provider's token endpoint (authorization code + PKCE).
    let mut connect = String::from("'self'");
    if let Some(v) = &s.oidc {
        if v.config.client_id.is_some() {
            // Cached only: a slow provider must not delay the console. The sign-in page fetches
            // the document (/api/auth/config) before the redirect, so the page load that
            // completes the sign-in has it.
            let cached = v.discovery_cached().await;
            if let Some(o) = cached.and_then(|d| origin(&d.token_endpoint)) {
                connect.push(' ');
                connect.push_str(&o);
            }
        }
    }
    let csp = format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src {connect}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    );
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn asset(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == file) {
        Some((_, ct, body)) => (
            [
                (header::CONTENT_TYPE, *ct),
                // Revalidated on each load, so an upgraded server never runs a stale console.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such console file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_loads_is_embedded() {
        let index = std::str::from_utf8(INDEX).expect("utf-8");
        for (name, _, body) in FILES {
            assert!(!body.is_empty(), "{name} is empty");
        }
        for part in index.split("/assets/").skip(1) {
            let name: String = part.chars().take_while(|c| *c != '"').collect();
            assert!(
                FILES.iter().any(|(n, _, _)| *n == name),
                "index.html loads {name}, which is not embedded"
            );
        }
        // Modules import each other by relative path; each must be embedded too.
        for (name, _, body) in FILES.iter().filter(|(n, _, _)| n.ends_with(".js")) {
            let text = std::str::from_utf8(body).expect("utf-8");
            for part in text.split("from \"./").skip(1) {
                let dep: String = part.chars().take_while(|c| *c != '"').collect();
                assert!(
                    FILES.iter().any(|(n, _, _)| *n == dep),
                    "{name} imports {dep}, which is not embedded"
                );
            }
        }
    }

    #[test]
    fn origins_for_the_csp() {
        assert_eq!(
            origin("https://id.example.com/oauth2/token").as_deref(),
            Some("https://id.example.com")
        );
        assert_eq!(
            origin("http://127.0.0.1:9000/token").as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(origin("not a url"), None);
    }
}
