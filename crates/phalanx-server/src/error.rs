//! The one place where errors become HTTP responses.
//!
//! Every refusal is `{"error": {"code", "message", "outcome", "leader_hint"?, "retry_after_ms"?}}`
//! with the status given in docs/api.md; 429, 503 and 507 carry `Retry-After`.
//! `outcome` says whether the request may still take effect: `not_done` (it
//! changed nothing, repeating it is safe) or `unknown` (it may commit yet).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Codes whose refusal leaves the outcome open: the request reached the
/// leader (or was proposed) and may still commit. Every other code means
/// that nothing was done. docs/api.md lists both.
pub const OUTCOME_UNKNOWN_CODES: &[&str] =
    &["timeout", "unavailable", "leader_changed", "membership_change_failed", "learner_lagging"];

/// The `outcome` field of an error body.
pub fn outcome(code: &str) -> &'static str {
    if OUTCOME_UNKNOWN_CODES.contains(&code) {
        "unknown"
    } else {
        "not_done"
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub leader_hint: Option<String>,
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), leader_hint: None, retry_after_ms: None }
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after_ms: u64) -> ApiError {
        ApiError {
            retry_after_ms: Some(retry_after_ms),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }
    pub fn overloaded(code: &'static str, message: impl Into<String>, retry_after_ms: u64) -> ApiError {
        ApiError { retry_after_ms: Some(retry_after_ms), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message) }
    }
    /// New work refused while the data directory's file system is under its
    /// free-space watermark (`507 Insufficient Storage`).
    pub fn disk_full(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after_ms: Some(5_000),
            ..ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", message)
        }
    }
    pub fn with_leader_hint(mut self, hint: Option<String>) -> ApiError {
        self.leader_hint = hint;
        self
    }
}

impl From<phalanx_core::Error> for ApiError {
    fn from(error: phalanx_core::Error) -> ApiError {
        use phalanx_core::Error as E;
        let status = match &error {
            E::Invalid { .. } | E::NotCapable { .. } => StatusCode::BAD_REQUEST,
            E::TaskNotFound { .. } | E::AgentNotFound { .. } | E::ConversationNotFound { .. } => StatusCode::NOT_FOUND,
            E::WrongSession { .. } => StatusCode::FORBIDDEN,
            E::StaleEpoch { .. }
            | E::Superseded { .. }
            | E::AlreadyTerminal { .. }
            | E::LeaseExpired { .. }
            | E::VersionConflict { .. }
            | E::ForceRequired { .. }
            | E::IdempotencyConflict { .. } => StatusCode::CONFLICT,
            E::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            E::LoopDetected { .. } | E::Deadlock { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            E::QueueFull { .. } | E::LimitReached { .. } | E::StateFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut api = ApiError::new(status, error.code(), error.to_string());
        if status == StatusCode::TOO_MANY_REQUESTS {
            api.retry_after_ms = Some(1000);
        }
        api
    }
}

impl ApiError {
    /// A refusal that axum or hyper answered on their own (405 with an empty
    /// body, a path parameter that does not decode, ...), in our format, with
    /// their text as the message.
    pub fn from_rejection(status: StatusCode, text: &str) -> ApiError {
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::LENGTH_REQUIRED => "length_required",
            StatusCode::REQUEST_TIMEOUT => "timeout",
            status if status.is_client_error() => "invalid",
            _ => "internal",
        };
        let text = text.trim();
        let message = if text.is_empty() {
            status.canonical_reason().unwrap_or("refused").to_lowercase()
        } else {
            text.to_string()
        };
        ApiError::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message, "outcome": outcome(self.code)});
        if let Some(hint) = &self.leader_hint {
            body["leader_hint"] = json!(hint);
        }
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = json!(ms);
        }
        let mut response = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(ms) = self.retry_after_ms {
            let seconds = ms.div_ceil(1000).max(1);
            response.headers_mut().insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}
