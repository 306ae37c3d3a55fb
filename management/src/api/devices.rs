//! Device sign-in approval: a signed-in person looks up the code their device shows and approves
//! (or denies) it; the device then joins as theirs.

use super::error::{ApiError, ErrorBody};
use super::handlers::Admin;
use crate::state::AppState;
use crate::store::{normalize_user_code, DeviceLogin};
use axum::extract::{Path, State};
use axum::Json;
use std::sync::Arc;

type St = State<Arc<AppState>>;

fn code(input: &str) -> Result<String, ApiError> {
    normalize_user_code(input).ok_or_else(|| {
        ApiError::invalid(
            "code",
            "a code is 8 letters as the device shows it, e.g. BCDF-GHJK",
        )
    })
}

/// The sign-in waiting for `code`. Unknown codes count against the caller: after
/// [`MissCounter::MAX`](crate::auth::MissCounter::MAX) in ten minutes, lookups wait (guessing
/// someone else's code to approve or deny it is not a way in).
async fn waiting(s: &AppState, a: &Admin, code: &str) -> Result<DeviceLogin, ApiError> {
    let now = std::time::Instant::now();
    let wait = s
        .code_misses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .wait(&a.user.id, now);
    if let Some(wait) = wait {
        tracing::warn!(user = %a.user.username, "device code lookup refused: too many unknown codes");
        return Err(ApiError::TooManyRequests(format!(
            "too many codes that match no waiting sign-in; check the code on the device and try again in {} min",
            wait.as_secs().div_ceil(60).max(1)
        )));
    }
    match s.store.device_login(code).await? {
        Some(d) => Ok(d),
        None => {
            s.code_misses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .missed(&a.user.id, now);
            Err(ApiError::NotFound(format!(
                "no sign-in is waiting for the code {code}: it may have expired or been used; run tern up again on the device for a new one"
            )))
        }
    }
}

/// The device a code belongs to (name, OS, where it asked from), to check before approving.
#[utoipa::path(get, path = "/api/device/{code}",
    responses((status = 200, body = DeviceLogin), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn get_device_login(
    State(s): St,
    a: Admin,
    Path(c): Path<String>,
) -> Result<Json<DeviceLogin>, ApiError> {
    Ok(Json(waiting(&s, &a, &code(&c)?).await?))
}

/// Approves a device's sign-in: it joins the network as the caller's device (or renews its
/// login).
#[utoipa::path(post, path = "/api/device/{code}/approve",
    responses((status = 200, body = DeviceLogin), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn approve_device_login(
    State(s): St,
    a: Admin,
    Path(c): Path<String>,
) -> Result<Json<DeviceLogin>, ApiError> {
    decide(&s, &a, &c, true).await
}

/// Denies a device's sign-in: the device is told so and stops waiting. A device registered to
/// someone else: only its owner or an admin.
#[utoipa::path(post, path = "/api/device/{code}/deny",
    responses((status = 200, body = DeviceLogin), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn deny_device_login(
    State(s): St,
    a: Admin,
    Path(c): Path<String>,
) -> Result<Json<DeviceLogin>, ApiError> {
    decide(&s, &a, &c, false).await
}

async fn decide(
    s: &AppState,
    a: &Admin,
    c: &str,
    approve: bool,
) -> Result<Json<DeviceLogin>, ApiError> {
    let c = code(c)?;
    waiting(s, a, &c).await?;
    Ok(Json(
        s.store
            .decide_device_login(&a.actor, &a.user, &c, approve)
            .await?,
    ))
}
