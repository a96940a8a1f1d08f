//! API errors: one enum, one HTTP status per kind, always a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tern_orchestrator::ManagerError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or a bad one.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token lacks a permission.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such thing, or not the caller's.
    #[error("{0}")]
    NotFound(String),
    /// 413: the body is larger than any endpoint takes.
    #[error("{0}")]
    TooLarge(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 409: the VM's status does not allow this.
    #[error("{0}")]
    Conflict(String),
    /// 502: the hypervisor driver failed.
    #[error("{0}")]
    Driver(String),
    /// 500: the store or another internal part failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Driver(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let msg = e.to_string();
        match e {
            ManagerError::NotFound(_) => ApiError::NotFound(msg),
            ManagerError::WrongStatus { .. }
            | ManagerError::Illegal(_)
            | ManagerError::Conflict { .. }
            | ManagerError::Busy(_) => ApiError::Conflict(msg),
            ManagerError::Invalid(_) => ApiError::BadRequest(msg),
            ManagerError::Quota(_) => ApiError::Forbidden(msg),
            ManagerError::Driver(_) => ApiError::Driver(msg),
            ManagerError::Store(_) => {
                tracing::error!(error = %msg, "store failure");
                ApiError::Internal(msg)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
