//! API errors and the JSON extractor that turns every malformed body into one of them.

use crate::store::StoreError;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Allowed, but probably a mistake: the same request with the named confirmation flag set
    /// goes through (409, kind "needs_confirmation", with the field).
    #[error("{field}: {message}")]
    NeedsConfirmation { field: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Too many attempts; try again later.
    #[error("{0}")]
    TooManyRequests(String),
    /// A dependency (the identity provider) is unreachable.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error; see the server log")]
    Internal(#[source] anyhow::Error),
}

/// JSON error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable kind: unauthorized, forbidden, not_found, conflict, invalid, bad_request,
    /// too_large, rate_limited, unavailable, internal.
    pub error: &'static str,
    /// What is wrong, in words.
    pub message: String,
    /// The input field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::NeedsConfirmation { .. } => (StatusCode::CONFLICT, "needs_confirmation"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.parts();
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "API request failed");
        }
        let field = match &self {
            ApiError::Invalid { field, .. } | ApiError::NeedsConfirmation { field, .. } => {
                Some(field.clone())
            }
            _ => None,
        };
        let message = match &self {
            ApiError::Invalid { message, .. } | ApiError::NeedsConfirmation { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        };
        (
            status,
            axum::Json(ErrorBody {
                error: kind,
                message,
                field,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Denied(m) => ApiError::Forbidden(m),
            StoreError::Invalid { field, message } => ApiError::Invalid {
                field: field.to_string(),
                message,
            },
            StoreError::Db(_) | StoreError::Migrate(_) => ApiError::Internal(anyhow::Error::new(e)),
        }
    }
}

/// `Json<T>` whose rejections are API errors with JSON bodies.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(r))
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::TooLarge {
                    limit: super::MAX_BODY,
                })
            }
            Err(JsonRejection::JsonDataError(e)) => {
                // serde's message names the field and what was expected.
                let inner = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text());
                Err(ApiError::BadRequest(format!(
                    "invalid request body: {inner}"
                )))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => {
                let inner = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text());
                Err(ApiError::BadRequest(format!(
                    "request body is not valid JSON: {inner}"
                )))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest(
                "send the body as JSON with Content-Type: application/json".into(),
            )),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

/// `Query<T>` with JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// `Path<String>` with JSON errors.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))
    }
}
