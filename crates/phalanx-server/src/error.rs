//! The one place where errors become HTTP responses.
//!
//! Every refusal is `{"error": {"code", "message", "outcome", "leader_hint"?, "retry_after_ms"?}}`
//! with the status given in docs/api.md; 429, 503 and 507 carry `Retry-After`.
//! `outcome` says whether the request may still take effect: `not_done` (it
//! changed nothing, repeating it is safe) or `unknown` (it may commit yet).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
pub use phalanx_api::ErrorCode;
use phalanx_api::{ErrorBody, ErrorEnvelope};

/// A refusal on its way to the client: the code decides the status (the
/// table in `phalanx_api::ErrorCode`), bar the few answers docs/api.md
/// names with another (`with_status`).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub leader_hint: Option<String>,
    pub retry_after_ms: Option<u64>,
}

fn status_of(code: &ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { status: status_of(&code), code, message: message.into(), leader_hint: None, retry_after_ms: None }
    }
    pub fn with_status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Invalid, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }
    /// A refusal with `Retry-After` (a 503, or a 429 for load).
    pub fn unavailable(code: ErrorCode, message: impl Into<String>, retry_after_ms: u64) -> ApiError {
        ApiError { retry_after_ms: Some(retry_after_ms), ..ApiError::new(code, message) }
    }
    pub fn overloaded(code: ErrorCode, message: impl Into<String>, retry_after_ms: u64) -> ApiError {
        ApiError::unavailable(code, message, retry_after_ms)
    }
    /// New work refused while the data directory's file system is under its
    /// free-space watermark (`507 Insufficient Storage`).
    pub fn disk_full(message: impl Into<String>) -> ApiError {
        ApiError::unavailable(ErrorCode::DiskFull, message, 5_000)
    }
    /// The state machine answered a command with the outcome of another
    /// command: a bug, answered `500 internal` (outcome unknown: the command
    /// was applied) instead of taking the node down.
    pub fn unexpected(command: &str, outcome: &impl std::fmt::Debug) -> ApiError {
        tracing::error!(command, ?outcome, "the state machine answered an unexpected outcome");
        ApiError::new(ErrorCode::Internal, format!("{command}: the state machine answered {outcome:?}"))
    }
    pub fn with_leader_hint(mut self, hint: Option<String>) -> ApiError {
        self.leader_hint = hint;
        self
    }

    /// The body: `{"error": {...}}`.
    pub fn envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope {
            error: ErrorBody {
                code: self.code.clone(),
                message: self.message.clone(),
                outcome: self.code.outcome(),
                leader_hint: self.leader_hint.clone(),
                retry_after_ms: self.retry_after_ms,
            },
        }
    }

    /// A whole HTTP/1.1 answer that closes the connection, for the listener's
    /// refusals made before hyper sees a request.
    pub fn http1_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_string(&self.envelope()).expect("an error body serialises");
        let retry =
            self.retry_after_ms.map(|ms| format!("retry-after: {}\r\n", retry_after_seconds(ms))).unwrap_or_default();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{retry}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

fn retry_after_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

impl From<phalanx_core::Error> for ApiError {
    fn from(error: phalanx_core::Error) -> ApiError {
        let code: ErrorCode = error.code().parse().unwrap_or_else(|never| match never {});
        let mut api = ApiError::new(code, error.to_string());
        if api.status == StatusCode::TOO_MANY_REQUESTS {
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
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::REQUEST_TIMEOUT => ErrorCode::BodyTimeout,
            status if status.is_client_error() => ErrorCode::Invalid,
            _ => ErrorCode::Internal,
        };
        let text = text.trim();
        let message = if text.is_empty() {
            status.canonical_reason().unwrap_or("refused").to_lowercase()
        } else {
            text.to_string()
        };
        ApiError::new(code, message).with_status(status)
    }
}

/// The door's refusal of new work (`429 overloaded`), one per priority,
/// serialised once: under overload a node answers tens of thousands of these
/// a second, and each should cost a copy of prepared bytes, not a message
/// formatted and a JSON document written.
pub fn door_refusal(priority: u8) -> Response {
    static PREPARED: std::sync::LazyLock<Vec<axum::body::Bytes>> = std::sync::LazyLock::new(|| {
        (0..=9u8)
            .map(|priority| {
                let error = ApiError::overloaded(
                    ErrorCode::Overloaded,
                    format!(
                        "the node is serving all the requests priority {priority} may use of requests_in_flight_max; \
                         try again after Retry-After"
                    ),
                    100,
                );
                axum::body::Bytes::from(serde_json::to_vec(&error.envelope()).expect("an envelope serialises"))
            })
            .collect()
    });
    let body = PREPARED[usize::from(priority.min(9))].clone();
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("retry-after", HeaderValue::from(retry_after_seconds(100)));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.envelope())).into_response();
        if let Some(ms) = self.retry_after_ms {
            response.headers_mut().insert("retry-after", HeaderValue::from(retry_after_seconds(ms)));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the state machine refuses with is one of the contract's,
    /// answered with the contract's status.
    #[test]
    fn core_codes_are_in_the_contract() {
        use phalanx_core::Error as E;
        let errors = [
            E::Invalid { field: "f".into(), reason: "r".into() },
            E::TaskNotFound { task_id: 1 },
            E::AgentNotFound { agent_id: "a".into() },
            E::ConversationNotFound { conversation_id: "c".into() },
            E::StaleEpoch { agent_id: "a".into(), epoch: 1, current: 2 },
            E::WrongSession { agent_id: "a".into(), epoch: 1 },
            E::Superseded { task_id: 1, fence: 1, current: 2 },
            E::AlreadyTerminal { task_id: 1, state: phalanx_core::TaskState::Succeeded },
            E::LeaseExpired { task_id: 1 },
            E::QueueFull { queue: "q".into(), max: 1 },
            E::LimitReached { limit: "l".into(), max: 1 },
            E::TooLarge { field: "f".into(), bytes: 2, max: 1 },
            E::NotCapable { agent_id: "a".into(), queue: "q".into() },
            E::VersionConflict { key: "k".into(), expected: 1, current: 2 },
            E::LoopDetected { task_id: 1, trail: "t".into() },
            E::Deadlock { cycle: "c".into() },
            E::StateFull { bytes: 2, max: 1 },
            E::ForceRequired { field: "f".into(), reason: "r".into() },
            E::IdempotencyConflict { key: "k".into(), task_id: 1, field: "f".into() },
        ];
        for error in errors {
            let api = ApiError::from(error.clone());
            assert!(!matches!(api.code, ErrorCode::Other(_)), "{} is not in phalanx_api::ErrorCode", error.code());
            assert_eq!(api.status.as_u16(), api.code.status());
        }
    }

    #[test]
    fn the_listener_answer_carries_the_outcome() {
        let bytes = ApiError::unavailable(ErrorCode::Overloaded, "busy", 1000)
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .http1_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("retry-after: 1\r\n"));
        let body: ErrorEnvelope = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body.error.outcome, phalanx_api::Outcome::NotDone);
    }
}
