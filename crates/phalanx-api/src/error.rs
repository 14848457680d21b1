//! Error codes and the error body: `{"error": {"code", "message", "outcome", "leader_hint"?, "retry_after_ms"?}}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whether a refused request may still take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing was done: the request may be sent again as it is, to any node.
    NotDone,
    /// The request reached the leader (or was proposed) and may commit yet.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotDone => "not_done",
            Outcome::Unknown => "unknown",
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, $status:literal, $outcome:ident, $transient:literal; )*) => {
        /// Every code a node answers with. Unknown codes (from a newer node)
        /// parse as [`ErrorCode::Other`], classified by status alone.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// A code this build does not know, with the status it came with.
            Other(String),
        }

        impl ErrorCode {
            /// Every known code, in the order of docs/api.md's table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$variant => $text, )*
                    ErrorCode::Other(text) => text,
                }
            }

            /// The HTTP status a node answers this code with (a code some
            /// routes answer with another status says so in docs/api.md).
            pub fn status(&self) -> u16 {
                match self {
                    $( ErrorCode::$variant => $status, )*
                    ErrorCode::Other(_) => 500,
                }
            }

            /// Whether the refused request may still take effect.
            pub fn outcome(&self) -> Outcome {
                match self {
                    $( ErrorCode::$variant => Outcome::$outcome, )*
                    ErrorCode::Other(_) => Outcome::Unknown,
                }
            }

            /// Whether the same request may succeed later or on another
            /// node (after `Retry-After`, or at `leader_hint`). A request
            /// refused with a transient code whose outcome is
            /// [`Outcome::Unknown`] may be repeated only when repeating is
            /// harmless (a keyed submit, a fenced report, a read).
            pub fn transient(&self) -> bool {
                match self {
                    $( ErrorCode::$variant => $transient, )*
                    ErrorCode::Other(_) => false,
                }
            }
        }

        impl FromStr for ErrorCode {
            type Err = std::convert::Infallible;
            fn from_str(text: &str) -> Result<ErrorCode, Self::Err> {
                Ok(match text {
                    $( $text => ErrorCode::$variant, )*
                    other => ErrorCode::Other(other.to_string()),
                })
            }
        }
    };
}

error_codes! {
    /// The request is wrong; retrying it will not help.
    Invalid = "invalid", 400, NotDone, false;
    /// The body is not JSON, or not the JSON the route takes.
    MalformedJson = "malformed_json", 400, NotDone, false;
    /// A poll for capabilities the agent did not register.
    NotCapable = "not_capable", 400, NotDone, false;
    /// A Raft RPC that fails the checks made before consensus sees it.
    MalformedRaftRequest = "malformed_raft_request", 400, NotDone, false;
    /// Missing or wrong token.
    Unauthorized = "unauthorized", 401, NotDone, false;
    /// A heartbeat, poll or deregistration without the session's secret.
    WrongSession = "wrong_session", 403, NotDone, false;
    /// Peer traffic to a node that has no peer token configured.
    NoPeerToken = "no_peer_token", 403, NotDone, false;
    TaskNotFound = "task_not_found", 404, NotDone, false;
    AgentNotFound = "agent_not_found", 404, NotDone, false;
    /// An unknown route, conversation or member.
    NotFound = "not_found", 404, NotDone, false;
    /// The route exists, not with this method (`Allow` lists the methods).
    MethodNotAllowed = "method_not_allowed", 405, NotDone, false;
    /// The body did not arrive within `body_read_timeout_ms`.
    BodyTimeout = "body_timeout", 408, NotDone, true;
    /// A report with an old fence: the task was leased again since.
    Superseded = "superseded", 409, NotDone, false;
    /// An old agent session.
    StaleEpoch = "stale_epoch", 409, NotDone, false;
    AlreadyTerminal = "already_terminal", 409, NotDone, false;
    LeaseExpired = "lease_expired", 409, NotDone, false;
    /// A compare-and-set (policy, context, rollback) against a version that moved on.
    VersionConflict = "version_conflict", 409, NotDone, false;
    /// A policy change that needs `"force": true`.
    ForceRequired = "force_required", 409, NotDone, false;
    /// An idempotency key sent again with another request.
    IdempotencyConflict = "idempotency_conflict", 409, NotDone, false;
    /// A resume of a task whose tree is still over its budget (raise the budget first).
    BudgetExhausted = "budget_exhausted", 409, NotDone, false;
    /// A resume of a task that is not paused.
    NotPaused = "not_paused", 409, NotDone, false;
    /// A membership change naming a node that is already a member.
    AlreadyMember = "already_member", 409, NotDone, false;
    /// A membership change naming an id once removed.
    NodeIdReused = "node_id_reused", 409, NotDone, false;
    /// A membership change that would leave the cluster without a healthy majority.
    UnsafeMembershipChange = "unsafe_membership_change", 409, NotDone, false;
    /// A node to add that does not answer on its addresses.
    MemberUnreachable = "member_unreachable", 409, NotDone, false;
    /// A node to add whose addresses another member already has.
    AddressInUse = "address_in_use", 409, NotDone, false;
    /// Payload, result, context or request body over its `*_max`.
    TooLarge = "too_large", 413, NotDone, false;
    /// The request target is over `uri_bytes_max`.
    UriTooLong = "uri_too_long", 414, NotDone, false;
    UnsupportedMediaType = "unsupported_media_type", 415, NotDone, false;
    /// A delegation that repeats a step of its trail.
    LoopDetected = "loop_detected", 422, NotDone, false;
    /// A wait that would close a cycle.
    Deadlock = "deadlock", 422, NotDone, false;
    QueueFull = "queue_full", 429, NotDone, true;
    LimitReached = "limit_reached", 429, NotDone, true;
    /// Refused at the door; with `Retry-After`.
    Overloaded = "overloaded", 429, NotDone, true;
    /// The per-client rate limit; with `Retry-After`.
    RateLimited = "rate_limited", 429, NotDone, true;
    /// The write would take the replicated state past `state_bytes_max`.
    StateFull = "state_full", 429, NotDone, true;
    /// The request head is over `header_bytes_max`.
    HeaderTooLarge = "header_too_large", 431, NotDone, false;
    /// A node error that should not happen; report it.
    Internal = "internal", 500, Unknown, false;
    NoLeader = "no_leader", 503, NotDone, true;
    NotLeader = "not_leader", 503, NotDone, true;
    /// The follower could not connect to the leader: the request never left it.
    LeaderUnreachable = "leader_unreachable", 503, NotDone, true;
    /// The cluster cannot serve this write within the client's deadline.
    DeadlineExceeded = "deadline_exceeded", 503, NotDone, true;
    /// The node is starting, catching up, or its clock is off.
    NotReady = "not_ready", 503, NotDone, true;
    /// A forwarded request whose leader lost its leadership before answering.
    LeaderChanged = "leader_changed", 503, Unknown, true;
    /// A forward that was sent and broke off.
    Unavailable = "unavailable", 503, Unknown, true;
    /// Proposed, and not committed within `write_timeout_ms`.
    Timeout = "timeout", 503, Unknown, true;
    /// A membership change that consensus refused or did not finish.
    MembershipChangeFailed = "membership_change_failed", 503, Unknown, true;
    /// A learner that did not catch up in time to be promoted.
    LearnerLagging = "learner_lagging", 503, Unknown, true;
    /// New work refused under the disk's free-space watermark.
    DiskFull = "disk_full", 507, NotDone, true;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ErrorCode, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(text.parse().unwrap_or_else(|never| match never {}))
    }
}

/// The body of every refusal: `{"error": ErrorBody}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// One of the codes of docs/api.md's table (a newer node may send others).
    #[schema(value_type = String)]
    pub code: ErrorCode,
    pub message: String,
    /// Absent only from the 503 the listener answers past `connections_max`
    /// (which is `not_done`).
    #[serde(default = "not_done")]
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_hint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

fn not_done() -> Outcome {
    Outcome::NotDone
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert_eq!(&code.as_str().parse::<ErrorCode>().unwrap(), code);
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(&serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!("from_the_future".parse::<ErrorCode>().unwrap(), ErrorCode::Other("from_the_future".into()));
    }

    #[test]
    fn only_503s_and_internal_leave_the_outcome_open() {
        for code in ErrorCode::ALL {
            if code.outcome() == Outcome::Unknown {
                assert!(matches!(code.status(), 500 | 503), "{code}");
            }
            if code.status() < 500 && code.status() != 429 && code.status() != 408 {
                assert!(!code.transient(), "{code}: a 4xx that is not about load or time does not get better");
            }
        }
    }

    #[test]
    fn the_body_parses_without_an_outcome() {
        let body: ErrorEnvelope =
            serde_json::from_str(r#"{"error": {"code": "overloaded", "message": "busy"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Overloaded);
        assert_eq!(body.error.outcome, Outcome::NotDone);
    }
}
