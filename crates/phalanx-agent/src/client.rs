//! The HTTP client for the API in `docs/api.md`: any node of a node list,
//! failover on error, backoff with full jitter, `Retry-After` honoured, and
//! a retry budget so that a struggling cluster is not buried under retries.
//!
//! Writes move fast: each attempt has a short timeout, a node that does not
//! answer in time is left for the next one, and a `leader_hint` is followed.
//! The timeout adapts to the latency the client sees, as TCP's does
//! (RFC 6298: the smoothed latency plus four times its variation), between
//! `WRITE_TIMEOUT_FLOOR` (250 ms) and `write_timeout` (500 ms): a commit takes
//! milliseconds on a healthy cluster, so a silent leader is left after a
//! quarter of a second, while a loaded one that answers slowly is given time. Every submit carries an idempotency key
//! (one is generated when the caller gave none), so a retry after an unknown
//! outcome is always safe.
//!
//! A request whose outcome is unknown (timed out, or the node failed while
//! forwarding it) is retried only when retrying is harmless (reads, fenced
//! or keyed writes); otherwise the caller hears `Error::Unknown` and decides.
//! Every error says whether anything may have been done (`Error::outcome`).
//! Refusals are classified by code with the contract's table
//! (`phalanx_api::ErrorCode`: status, outcome, transient), and a call that
//! gives up without an answer lists every node it tried and why; the rules
//! are items 1, 4 and 5 of `docs/sdk.md`, which the Python SDK follows too.
//! What to do with a result or a lease is the agent's business (`agent.rs`).

use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::throttle::{Class, Throttle};
use phalanx_api::ErrorCode;
/// Whether a failed request may have taken effect (docs/api.md, "Errors"):
/// the contract's own type.
pub use phalanx_api::Outcome;

/// The outcome of a refusal: the body's `outcome` field when it has one
/// (the node's word), else what the code's table says (docs/sdk.md, 4).
fn outcome_of_refusal(field: Option<&str>, code: &ErrorCode) -> Outcome {
    match field {
        Some("not_done") => Outcome::NotDone,
        Some(_) => Outcome::Unknown,
        None => code.outcome(),
    }
}

/// Whether a refusal may succeed later or on another node (docs/sdk.md, 4):
/// the table's word for a known code; a code this build does not know is
/// transient when its status is one all of whose known codes are (429, 503).
pub fn transient(status: u16, code: &ErrorCode) -> bool {
    match code {
        ErrorCode::Other(_) => matches!(status, 429 | 503),
        known => known.transient(),
    }
}

/// Codes whose refusal leaves the outcome open (docs/api.md), as
/// `phalanx_api::ErrorCode::outcome` says (a test keeps the two equal).
pub const OUTCOME_UNKNOWN_CODES: &[&str] =
    &["internal", "leader_changed", "unavailable", "timeout", "membership_change_failed", "learner_lagging"];

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The cluster refused the request; `outcome` says whether it may still take effect.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
        leader_hint: Option<String>,
        retry_after_ms: Option<u64>,
        outcome: Outcome,
    },
    /// No node could be reached: every attempt failed to connect, so nothing was done.
    #[error("no node answered: {0}")]
    Unavailable(String),
    /// A node was reached but the exchange broke (reset, timeout) and retries ran out.
    #[error("transport failure: {0}")]
    Transport(String),
    /// The request may or may not have taken effect.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("could not decode the answer: {0}")]
    Decode(String),
    /// A wait ran out (`await_tasks`); it wrote nothing.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Settings this client or agent cannot use (a node with an unknown
    /// scheme, a CA file that cannot be read); nothing was sent.
    #[error("unusable settings: {0}")]
    Config(String),
    /// The agent's outbox could not be opened or written (another agent
    /// holds it, the disk refused).
    #[error("outbox: {0}")]
    Outbox(String),
}

impl Error {
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    /// The refusal's code, as the contract's table knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.code().map(|code| code.parse().unwrap_or_else(|never| match never {}))
    }
    pub fn is_superseded(&self) -> bool {
        self.code() == Some("superseded")
    }
    /// A refusal that may succeed later or on another node (docs/sdk.md, 4).
    /// Only refusals are transient: other errors are not answers at all.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { status, code, .. } => transient(*status, &code.parse().unwrap_or_else(|never| match never {})),
            _ => false,
        }
    }
    /// A node answered (docs/sdk.md, 6): a refusal with a 4xx status. A 5xx,
    /// a failed connection or a timeout says the cluster cannot serve.
    pub fn is_answer(&self) -> bool {
        matches!(self, Error::Api { status, .. } if *status < 500)
    }
    /// The definite answer to a report (docs/sdk.md, 3): a refusal that is
    /// not transient. Anything else leaves the result to be sent again.
    pub fn is_definite(&self) -> bool {
        matches!(self, Error::Api { .. }) && !self.is_transient()
    }
    /// One item's refusal within a batch's answer, as a call of its own would have been refused.
    pub fn refused(code: ErrorCode, message: String) -> Error {
        Error::Api {
            status: code.status(),
            outcome: code.outcome(),
            code: code.to_string(),
            message,
            leader_hint: None,
            retry_after_ms: None,
        }
    }
    /// True when no node could be reached, or none answered in time.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Transport(_))
    }
    /// Whether the request may have taken effect: `NotDone` promises it did not.
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::Api { outcome, .. } => *outcome,
            Error::Unavailable(_) | Error::TimedOut(_) | Error::Config(_) | Error::Outbox(_) => Outcome::NotDone,
            Error::Transport(_) | Error::Unknown(_) | Error::Decode(_) => Outcome::Unknown,
        }
    }
}

/// Splits `host:port,host:port` (also accepting `http://` prefixes and stray blanks).
pub fn parse_nodes(nodes: &str) -> Vec<String> {
    nodes.split(',').map(normalize_node).filter(|n| !n.is_empty()).collect()
}

/// A node as the client keeps it: `host:port` for plain HTTP, or
/// `https://host:port` (docs/sdk.md, 1).
fn normalize_node(node: &str) -> String {
    node.trim().trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// `host:port` of a node, whatever its scheme.
fn node_host(node: &str) -> &str {
    node.strip_prefix("https://").unwrap_or(node)
}

/// The URL of `path` on `node`, in the node's own scheme.
fn node_url(node: &str, path: &str) -> String {
    if node.starts_with("https://") {
        format!("{node}{path}")
    } else {
        format!("http://{node}{path}")
    }
}

/// The environment variable naming the CA file `https://` nodes are verified by.
pub const CA_FILE_ENV: &str = "PHALANX_CA_FILE";
/// Bytes of a CA file (a bundle of a few certificates is a few KiB).
pub const CA_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// The HTTP client: TLS through rustls, verifying `https://` nodes against
/// `ca_file` alone when one is given, else the system's roots.
fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, Error> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .pool_max_idle_per_host(32);
    if let Some(path) = ca_file {
        let unusable = |why: String| Error::Config(format!("CA file {}: {why}", path.display()));
        let size = std::fs::metadata(path).map_err(|e| unusable(e.to_string()))?.len();
        if size > CA_FILE_BYTES_MAX {
            return Err(unusable(format!("{size} bytes is more than {CA_FILE_BYTES_MAX}")));
        }
        let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| unusable(e.to_string()))?;
        if certificates.is_empty() {
            return Err(unusable("holds no PEM certificate".into()));
        }
        builder = builder.tls_built_in_root_certs(false);
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| Error::Config(format!("the HTTP client: {e}")))
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    Duration::from_micros(rand::thread_rng().gen_range(0..=ceiling.as_micros() as u64))
}

/// Retries may be at most about a tenth of requests: every request earns a
/// tenth of a token, a retry spends one; a small floor (`tokens_max`, the
/// bucket is full at the start) lets a quiet client retry at all. Counted in
/// tenths, so that ten requests earn exactly one retry.
#[derive(Debug)]
pub struct RetryBudget {
    tenths: u32,
    tenths_max: u32,
}

impl RetryBudget {
    pub fn new(tokens_max: u32) -> RetryBudget {
        RetryBudget { tenths: tokens_max * 10, tenths_max: tokens_max * 10 }
    }
    pub fn on_request(&mut self) {
        self.tenths = (self.tenths + 1).min(self.tenths_max);
    }
    pub fn try_retry(&mut self) -> bool {
        if self.tenths >= 10 {
            self.tenths -= 10;
            true
        } else {
            false
        }
    }
}

/// Whether a request may be sent again when its outcome is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Reads, and writes whose repetition is harmless (fenced, keyed, CAS).
    Safe,
    /// Only when the request surely never took effect (connection refused, or a refusal that changed nothing).
    IfNotSent,
}

/// What the client does after one failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// A definite answer: hand it to the caller.
    Fail,
    /// The request may have taken effect and may not be repeated.
    FailUnknown,
    /// Overloaded here: wait as told, then ask the same node.
    RetrySameNode,
    /// This node cannot serve now: ask another (the leader, if hinted).
    RetryOtherNode,
}

/// What to do after a refusal (docs/sdk.md, 4): a code that is not
/// transient is final; a transient one is repeated, on the same node after a
/// 429 and on another otherwise, unless its outcome is unknown and repeating
/// the request is not harmless.
fn after_refusal(status: u16, code: &ErrorCode, outcome: Outcome, retry: Retry) -> Next {
    if !transient(status, code) {
        Next::Fail
    } else if outcome == Outcome::Unknown && retry == Retry::IfNotSent {
        Next::FailUnknown
    } else if status == 429 {
        Next::RetrySameNode
    } else {
        Next::RetryOtherNode
    }
}

/// The error a call ends with once it stops retrying: unknown when an
/// earlier attempt may have taken effect, even if the last did nothing.
/// A request the client refused itself (docs/sdk.md, 10): nothing was sent.
fn throttled(node: &str) -> Error {
    Error::Api {
        status: 429,
        code: ErrorCode::Overloaded.to_string(),
        message: format!(
            "throttled by the client: {node} refuses most requests of this class lately; nothing was sent"
        ),
        leader_hint: None,
        retry_after_ms: None,
        outcome: Outcome::NotDone,
    }
}

fn give_up(error: Error, maybe_done: bool) -> Error {
    match error.outcome() {
        Outcome::NotDone if maybe_done => {
            Error::Unknown(format!("an earlier attempt may have taken effect; the last: {error}"))
        }
        _ => error,
    }
}

/// A fresh idempotency key for a submit that carries none: 128 random bits.
pub fn generated_idempotency_key() -> String {
    format!("auto-{:032x}", rand::random::<u128>())
}

fn after_transport(connect_failed: bool, retry: Retry) -> Next {
    if connect_failed || retry == Retry::Safe {
        Next::RetryOtherNode
    } else {
        Next::FailUnknown
    }
}

/// `Retry-After` in whole seconds (the HTTP-date form is not sent by Phalanx nodes).
fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let seconds: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(seconds.saturating_mul(1000))
}

/// Percent-encodes one path segment or query value.
fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The priority a submit announces in `X-Phalanx-Priority`, so that a loaded
/// node sheds the lowest classes first before reading bodies (a batch
/// announces its highest task's).
fn door_priority(path: &str, body: &Value) -> Option<u64> {
    let tasks: Vec<&Value> = match path {
        "/v1/tasks" => vec![body],
        "/v1/tasks/batch" => body["tasks"].as_array()?.iter().collect(),
        _ => return None,
    };
    tasks.iter().map(|task| task["priority"].as_u64().unwrap_or(5)).filter(|p| *p <= 9).max()
}

/// The wire types are the contract's (`phalanx-api`), re-exported here.
pub use phalanx_api::{
    payload_hash, Ack, BatchItem, Budget, BudgetSet, Child, ClusterInfo, ClusterNode, CompleteItem, CompleteManyAnswer,
    CompleteManyItem, ContextEntry, Conversation, KeyLimits, KeyStatus, LeaseGrant, LimitRule, LimitsTable, Refusal,
    Registered, ReplayRequest, Replayed, SubmitRequest, Submitted, Task, TaskLease, TaskPage, TaskState, Usage,
    WaitingOn,
};

/// Bytes of one answer read at most: the cluster bounds what it stores
/// (`payload_bytes_max`, a page ≤ 1000 tasks); this bounds what a client believes.
pub const RESPONSE_BYTES_MAX: usize = 256 * 1024 * 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Per attempt of a write (long-polls aside): a commit takes milliseconds,
/// so a node silent for this long is paused, cut off or overloaded, and the
/// next node is tried (the deadline header lets the node refuse, changing
/// nothing, what it cannot propose within it).
pub const WRITE_TIMEOUT_DEFAULT: Duration = Duration::from_millis(500);
/// docs/sdk.md, 11: requests one client has in flight at once, long-polls
/// aside; past it a call waits in the client's own queue, and its attempt's
/// timeout starts once it is sent, so the client's queueing is never taken
/// for a slow node.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 128;
/// docs/sdk.md, 11: long-polls one client has waiting at once.
pub const POLLS_IN_FLIGHT_MAX: usize = 64;
/// The adaptive write timeout's floor (see the module's documentation): a
/// new leader is elected about 250 ms after the old one falls silent.
pub const WRITE_TIMEOUT_FLOOR: Duration = Duration::from_millis(250);
/// docs/sdk.md, 4: how long a write attempt may wait in all while its node
/// keeps answering other requests (a slow node, not a lost one).
pub const SLOW_NODE_WAIT_MAX: Duration = Duration::from_secs(2);

/// The latency of single write attempts, smoothed as RFC 6298 does.
#[derive(Clone, Copy, Debug, Default)]
struct Latency {
    smoothed_ms: f64,
    variation_ms: f64,
    samples: u64,
}

impl Latency {
    fn record(&mut self, ms: f64) {
        if self.samples == 0 {
            self.smoothed_ms = ms;
            self.variation_ms = ms / 2.0;
        } else {
            self.variation_ms = 0.75 * self.variation_ms + 0.25 * (self.smoothed_ms - ms).abs();
            self.smoothed_ms = 0.875 * self.smoothed_ms + 0.125 * ms;
        }
        self.samples += 1;
    }

    /// The timeout of one write attempt: none seen yet, the ceiling.
    fn timeout(&self, floor: Duration, ceiling: Duration) -> Duration {
        if self.samples == 0 || ceiling <= floor {
            return ceiling;
        }
        let ms = self.smoothed_ms + 4.0 * self.variation_ms;
        Duration::from_secs_f64(ms / 1000.0).clamp(floor, ceiling)
    }
}

/// How long each attempt of a call may wait for its answer.
#[derive(Clone, Copy, Debug)]
enum Attempt {
    /// Reads and administrative calls: a fixed timeout.
    Fixed(Duration),
    /// Task and agent writes: the adaptive write timeout, plus a long-poll's wait.
    Write { wait: Duration },
}
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// The jitter's ceiling when moving to another node (failover rather than
/// overload): an election takes a few hundred milliseconds, and the node's
/// `Retry-After` already spaces the retries; a wider jitter only stretches
/// the outage clients see.
const FAILOVER_BACKOFF_CAP: Duration = Duration::from_millis(250);
/// A server's `Retry-After` is honoured up to this long per retry.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);
/// The retry budget's floor: retries a fresh or quiet client may make at once.
const RETRY_TOKENS_MAX: u32 = 10;

/// How one exchange with one node failed before it produced an answer;
/// each carries the reason in a few words ("connection refused").
enum Failure {
    /// The connection was never made: the request surely did not arrive.
    Connect(String),
    /// The request may have arrived (reset, timeout, a broken body).
    Broken(String),
    TooLarge(String),
}

/// Why an exchange failed, in the words of the deepest error that says
/// (docs/sdk.md, 5): reqwest's own message ("error sending request") hides
/// the `connection refused` underneath.
fn failure_reason(error: &reqwest::Error, timeout: Duration) -> String {
    use std::error::Error as _;
    if error.is_timeout() {
        return if error.is_connect() { "connect timed out".into() } else { format!("no answer within {timeout:?}") };
    }
    let mut deepest = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return match io.kind() {
                ErrorKind::ConnectionRefused => "connection refused".into(),
                ErrorKind::ConnectionReset => "connection reset".into(),
                ErrorKind::ConnectionAborted => "connection aborted".into(),
                ErrorKind::TimedOut => "timed out".into(),
                ErrorKind::UnexpectedEof => "connection closed before an answer".into(),
                _ => io.to_string(),
            };
        }
        deepest = inner.to_string();
        source = inner.source();
    }
    deepest
}

/// The nodes one call tried, in the order first tried, with the last thing
/// each said and how often it was tried (docs/sdk.md, 5).
#[derive(Default)]
struct Tried {
    nodes: Vec<(String, String, u32)>,
    attempts: u32,
}

impl Tried {
    fn record(&mut self, node: &str, reason: String) {
        self.attempts += 1;
        match self.nodes.iter_mut().find(|(known, _, _)| known == node) {
            Some(entry) => {
                entry.1 = reason;
                entry.2 += 1;
            }
            None => self.nodes.push((node.to_string(), reason, 1)),
        }
    }
}

impl std::fmt::Display for Tried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.attempts == 1 { "" } else { "s" };
        write!(f, "after {} attempt{plural}: ", self.attempts)?;
        for (index, (node, reason, count)) in self.nodes.iter().enumerate() {
            let separator = if index == 0 { "" } else { "; " };
            write!(f, "{separator}{node}: {reason}")?;
            if *count > 1 {
                write!(f, " ({count} times)")?;
            }
        }
        Ok(())
    }
}

struct Answer {
    status: u16,
    retry_after_ms: Option<u64>,
    body: Vec<u8>,
}

pub struct Client {
    nodes: Vec<String>,
    current: AtomicUsize,
    token: Option<String>,
    name: Option<String>,
    http: reqwest::Client,
    /// Attempts after the first, at most, for one call.
    pub retries_max: u32,
    /// Per attempt of reads and administrative calls; a long-poll adds its `wait_ms`.
    pub request_timeout: Duration,
    /// Per attempt of task and agent writes, at most (`WRITE_TIMEOUT_DEFAULT`);
    /// the attempt's timeout adapts below it, down to `WRITE_TIMEOUT_FLOOR`.
    pub write_timeout: Duration,
    latency: Mutex<Latency>,
    /// When each node last gave an answer that shows it making progress
    /// (below 500: served, or refused for what was asked or for load);
    /// docs/sdk.md, 4: a node that answers others so is slow, not lost. One
    /// entry per node of the list.
    answered: Mutex<BTreeMap<String, Instant>>,
    budget: Mutex<RetryBudget>,
    /// docs/sdk.md, 10: adaptive throttling per node and priority class.
    throttle: Mutex<Throttle>,
    /// Whether the throttle may refuse locally (on by default).
    pub throttling: bool,
    /// docs/sdk.md, 11: requests in flight at once (`REQUESTS_IN_FLIGHT_MAX`),
    /// and long-polls apart (`POLLS_IN_FLIGHT_MAX`).
    slots: tokio::sync::Semaphore,
    poll_slots: tokio::sync::Semaphore,
    /// The secret of each agent session registered through this client:
    /// agent id -> (epoch, secret).
    sessions: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Client {
    /// A client for `host:port` nodes, e.g. `vec!["127.0.0.1:7070".into()]`.
    pub fn new(nodes: Vec<String>, token: Option<String>) -> Result<Client, Error> {
        let nodes: Vec<String> = nodes.iter().map(|n| normalize_node(n)).filter(|n| !n.is_empty()).collect();
        if nodes.is_empty() {
            return Err(Error::Unavailable("the node list is empty".into()));
        }
        // docs/sdk.md, 1: each node in the scheme it was given, and no other.
        if let Some(node) = nodes.iter().find(|n| n.contains("://") && !n.starts_with("https://")) {
            return Err(Error::Config(format!("node {node}: the scheme is not http:// or https://")));
        }
        let ca_file = std::env::var_os(CA_FILE_ENV).filter(|path| !path.is_empty()).map(std::path::PathBuf::from);
        let http = http_client(ca_file.as_deref())?;
        // Clients start on different nodes, so that a fleet spreads its load.
        let start = rand::thread_rng().gen_range(0..nodes.len());
        Ok(Client {
            nodes,
            current: AtomicUsize::new(start),
            token,
            name: None,
            http,
            retries_max: 8,
            request_timeout: Duration::from_secs(15),
            write_timeout: WRITE_TIMEOUT_DEFAULT,
            latency: Mutex::new(Latency::default()),
            answered: Mutex::new(BTreeMap::new()),
            budget: Mutex::new(RetryBudget::new(RETRY_TOKENS_MAX)),
            throttle: Mutex::new(Throttle::new(Instant::now())),
            throttling: true,
            slots: tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX),
            poll_slots: tokio::sync::Semaphore::new(POLLS_IN_FLIGHT_MAX),
            sessions: Mutex::new(BTreeMap::new()),
        })
    }

    /// Parses `host:port,host:port`.
    pub fn from_nodes_str(nodes: &str, token: Option<String>) -> Result<Client, Error> {
        Client::new(parse_nodes(nodes), token)
    }

    /// `PHALANX_NODES` (default `127.0.0.1:7070`, as the CLI) and `PHALANX_TOKEN`.
    pub fn from_env() -> Result<Client, Error> {
        let nodes = std::env::var("PHALANX_NODES").unwrap_or_else(|_| "127.0.0.1:7070".into());
        Client::from_nodes_str(&nodes, std::env::var("PHALANX_TOKEN").ok().filter(|t| !t.is_empty()))
    }

    /// Verifies `https://` nodes against this PEM CA file alone (docs/sdk.md,
    /// 1); without it, `PHALANX_CA_FILE`, else the system's roots. A file
    /// that cannot be read or holds no certificate is `Error::Config`.
    pub fn with_ca_file(mut self, path: impl AsRef<std::path::Path>) -> Result<Client, Error> {
        self.http = http_client(Some(path.as_ref()))?;
        Ok(self)
    }

    /// Names this client for the per-client rate limit (`X-Phalanx-Client`).
    pub fn with_name(mut self, name: impl Into<String>) -> Client {
        self.name = Some(name.into());
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Client {
        self.request_timeout = timeout;
        self
    }

    pub fn with_write_timeout(mut self, timeout: Duration) -> Client {
        self.write_timeout = timeout;
        self
    }

    /// Starts on the `index`-th node of the list (modulo its length) instead of a random one.
    pub fn starting_at(self, index: usize) -> Client {
        self.current.store(index % self.nodes.len(), Ordering::Relaxed);
        self
    }

    /// Turns client-side adaptive throttling (docs/sdk.md, 10) on or off.
    pub fn with_throttling(mut self, throttling: bool) -> Client {
        self.throttling = throttling;
        self
    }

    /// How far back the throttle counts requests and accepts (docs/sdk.md,
    /// 10; `throttle::WINDOW`, 10 s, by default): longer is steadier and
    /// slower to forget an overload that has passed.
    pub fn with_throttle_window(mut self, window: Duration) -> Client {
        self.throttle = Mutex::new(Throttle::with_window(Instant::now(), window));
        self
    }

    pub fn with_retries_max(mut self, retries_max: u32) -> Client {
        self.retries_max = retries_max;
        self
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    fn node(&self) -> String {
        self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()].clone()
    }

    /// The timeout of the next write attempt (long-polls add their wait).
    pub fn write_attempt_timeout(&self) -> Duration {
        self.latency
            .lock()
            .expect("latency lock")
            .timeout(WRITE_TIMEOUT_FLOOR.min(self.write_timeout), self.write_timeout)
    }

    /// Moves to the hinted leader when it is one of ours, else to the next node.
    fn move_on(&self, hint: Option<&str>) {
        let hint = hint.map(normalize_node);
        let hint = hint.as_deref().map(node_host);
        match hint.and_then(|h| self.nodes.iter().position(|n| node_host(n) == h)) {
            Some(index) => self.current.store(index, Ordering::Relaxed),
            None => {
                self.current.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One attempt on one node, no retry.
    async fn exchange(
        &self,
        node: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        minimal: bool,
    ) -> Result<Answer, Failure> {
        let mut request = self
            .http
            .request(method, node_url(node, path))
            .timeout(timeout)
            // The node refuses at once what it cannot propose within our
            // budget, which changes nothing, instead of timing out with an open outcome.
            .header("x-phalanx-deadline-ms", timeout.as_millis().to_string());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(name) = &self.name {
            request = request.header("x-phalanx-client", name);
        }
        if let Some(priority) = body.and_then(|body| door_priority(path, body)) {
            request = request.header("x-phalanx-priority", priority.to_string());
        }
        if minimal {
            request = request.header("prefer", "return=minimal");
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request.send().await.map_err(|e| {
            let reason = failure_reason(&e, timeout);
            if e.is_connect() {
                Failure::Connect(reason)
            } else {
                Failure::Broken(reason)
            }
        })?;
        let status = response.status().as_u16();
        // A 5xx (not ready, no leader, unavailable) says the node cannot make
        // progress: waiting longer on it would only delay failover.
        if status < 500 {
            self.answered.lock().expect("answered lock").insert(node.to_string(), Instant::now());
        }
        let retry_after_ms = retry_after_header(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| Failure::Broken(failure_reason(&e, timeout)))? {
            if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                return Err(Failure::TooLarge(format!(
                    "{node}: answer over RESPONSE_BYTES_MAX ({RESPONSE_BYTES_MAX})"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, retry_after_ms, body })
    }

    /// docs/sdk.md, 4: a write attempt on a node that keeps answering. When
    /// its `timeout` passes and the node answered other requests within that
    /// time, the node is slow, not lost, and the attempt is given another
    /// `timeout`, up to `SLOW_NODE_WAIT_MAX` in all; a node that answered
    /// nothing in a period is left then, as before (a paused or cut-off node
    /// is still left after one adaptive timeout, or two when it fell silent
    /// during the first). Under load this keeps queueing from being taken for
    /// a lost node, and the attempt from being sent again on top of it.
    async fn exchange_patiently(
        &self,
        node: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        minimal: bool,
    ) -> Result<Answer, Failure> {
        let ceiling = SLOW_NODE_WAIT_MAX.max(timeout);
        let start = Instant::now();
        let exchange = self.exchange(node, method, path, body, ceiling, minimal);
        let mut exchange = std::pin::pin!(exchange);
        let mut period_start = start;
        loop {
            let period_end = (period_start + timeout).min(start + ceiling);
            if let Ok(result) = tokio::time::timeout_at(period_end.into(), exchange.as_mut()).await {
                return result;
            }
            let answering = self.answered.lock().expect("answered lock").get(node).is_some_and(|at| *at > period_start);
            if period_end >= start + ceiling || !answering {
                return Err(Failure::Broken(format!("no answer within {:?}", period_end - start)));
            }
            period_start = period_end;
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        retry: Retry,
        attempt_timeout: Attempt,
    ) -> Result<T, Error> {
        self.call_with(method, path, body, retry, attempt_timeout, false).await
    }

    /// `call`, asking for a minimal answer (`Prefer: return=minimal`) when `minimal`.
    async fn call_with<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        retry: Retry,
        attempt_timeout: Attempt,
        minimal: bool,
    ) -> Result<T, Error> {
        self.budget.lock().expect("budget lock").on_request();
        // docs/sdk.md, 10: the throttle's class is the door's (a submit's priority).
        let class = body.and_then(|body| door_priority(path, body)).map_or(Class::Normal, Class::of_priority);
        let mut attempt = 0;
        // Whether an earlier attempt may have taken effect: then giving up
        // after a later "nothing done" still leaves the outcome unknown.
        let mut maybe_done = false;
        let mut tried = Tried::default();
        loop {
            let node = self.node();
            if self.throttling
                && !self.throttle.lock().expect("throttle lock").admit(&node, class, Instant::now(), rand::random())
            {
                return Err(give_up(throttled(&node), maybe_done));
            }
            // docs/sdk.md, 11: past the client's requests in flight, wait in
            // its own queue; the attempt's time starts once a slot is held.
            let slots = if path.ends_with("/poll") { &self.poll_slots } else { &self.slots };
            let slot = slots.acquire().await.expect("the semaphore is never closed");
            let timeout = match attempt_timeout {
                Attempt::Fixed(timeout) => timeout,
                Attempt::Write { wait } => self.write_attempt_timeout() + wait,
            };
            let sent = Instant::now();
            let exchanged = match attempt_timeout {
                Attempt::Write { wait: Duration::ZERO } => {
                    self.exchange_patiently(&node, method.clone(), path, body, timeout, minimal).await
                }
                _ => self.exchange(&node, method.clone(), path, body, timeout, minimal).await,
            };
            drop(slot);
            if let Ok(answer) = &exchanged {
                // Only a refusal for load counts against the node (SRE book: "accepts").
                let refused_for_load = matches!(answer.status, 429 | 503)
                    && matches!(refusal(answer).error_code(), Some(ErrorCode::Overloaded | ErrorCode::RateLimited));
                self.throttle.lock().expect("throttle lock").answered(&node, class, Instant::now(), !refused_for_load);
            }
            let (error, next) = match exchanged {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    if let Attempt::Write { wait: Duration::ZERO } = attempt_timeout {
                        self.latency.lock().expect("latency lock").record(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    return decode(&answer.body);
                }
                Ok(answer) => {
                    let error = refusal(&answer);
                    let Error::Api { leader_hint, outcome, code, .. } = &error else { unreachable!("refusal is Api") };
                    tried.record(&node, format!("{} {code}", answer.status));
                    let code: ErrorCode = code.parse().unwrap_or_else(|never| match never {});
                    let next = after_refusal(answer.status, &code, *outcome, retry);
                    if next == Next::RetryOtherNode {
                        self.move_on(leader_hint.as_deref());
                    }
                    (error, next)
                }
                Err(Failure::TooLarge(message)) => return Err(Error::Decode(message)),
                Err(Failure::Connect(reason)) => {
                    self.move_on(None);
                    tried.record(&node, reason);
                    (Error::Unavailable(tried.to_string()), after_transport(true, retry))
                }
                Err(Failure::Broken(reason)) => {
                    self.move_on(None);
                    tried.record(&node, reason);
                    (Error::Transport(tried.to_string()), after_transport(false, retry))
                }
            };
            match next {
                // A definite answer describes the state as it is, earlier attempts included.
                Next::Fail => return Err(error),
                Next::FailUnknown => return Err(Error::Unknown(error.to_string())),
                Next::RetrySameNode | Next::RetryOtherNode => {}
            }
            maybe_done |= error.outcome() == Outcome::Unknown;
            attempt += 1;
            if attempt > self.retries_max || !self.budget.lock().expect("budget lock").try_retry() {
                return Err(give_up(error, maybe_done));
            }
            // At least what the server asked for, plus jitter so that the
            // clients it refused together do not all come back together.
            let asked = match &error {
                Error::Api { retry_after_ms: Some(ms), .. } => Duration::from_millis(*ms).min(RETRY_AFTER_MAX),
                _ => Duration::ZERO,
            };
            let cap = if next == Next::RetryOtherNode { FAILOVER_BACKOFF_CAP } else { BACKOFF_CAP };
            tokio::time::sleep(asked + backoff(attempt - 1, BACKOFF_BASE, cap)).await;
        }
    }

    /// A task or agent write, repeated harmlessly (fenced, keyed or a session call).
    async fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, Error> {
        self.call(reqwest::Method::POST, path, Some(&body), Retry::Safe, Attempt::Write { wait: Duration::ZERO }).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(reqwest::Method::GET, path, None, Retry::Safe, Attempt::Fixed(self.request_timeout)).await
    }

    /// A submit without an idempotency key gets a generated one, the same for
    /// every attempt, so it is retried freely (after a timeout too) and
    /// creates at most one task.
    pub async fn submit(&self, request: &SubmitRequest) -> Result<Submitted, Error> {
        let mut request = request.clone();
        request.idempotency_key.get_or_insert_with(generated_idempotency_key);
        let body = serde_json::to_value(&request).expect("a SubmitRequest serialises");
        self.call(reqwest::Method::POST, "/v1/tasks", Some(&body), Retry::Safe, Attempt::Write { wait: Duration::ZERO })
            .await
    }

    /// Submits many tasks, each on its own; a task without a key gets a
    /// generated one, so the batch is retried freely.
    pub async fn submit_batch(&self, requests: &[SubmitRequest]) -> Result<Vec<Result<Submitted, Refusal>>, Error> {
        type Answer = phalanx_api::BatchAnswer;
        let mut requests = requests.to_vec();
        for request in &mut requests {
            request.idempotency_key.get_or_insert_with(generated_idempotency_key);
        }
        let body = json!({ "tasks": requests });
        let answer: Answer = self
            .call(
                reqwest::Method::POST,
                "/v1/tasks/batch",
                Some(&body),
                Retry::Safe,
                Attempt::Write { wait: Duration::ZERO },
            )
            .await?;
        Ok(answer
            .results
            .into_iter()
            .map(|item| match item {
                BatchItem::Submitted(submitted) => Ok(submitted),
                BatchItem::Refused { error } => Err(error),
            })
            .collect())
    }

    /// Linearizable unless `stale`: then the node answers from its own state.
    pub async fn get_task(&self, id: u64, stale: bool) -> Result<Task, Error> {
        self.get(&format!("/v1/tasks/{id}{}", if stale { "?stale=true" } else { "" })).await
    }

    pub async fn list_tasks(
        &self,
        queue: Option<&str>,
        state: Option<&str>,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<TaskPage, Error> {
        let mut query = Vec::new();
        if let Some(queue) = queue {
            query.push(format!("queue={}", encode(queue)));
        }
        if let Some(state) = state {
            query.push(format!("state={}", encode(state)));
        }
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        self.get(&format!("/v1/tasks?{}", query.join("&"))).await
    }

    pub async fn cancel(&self, id: u64) -> Result<Task, Error> {
        self.post(&format!("/v1/tasks/{id}/cancel"), json!({})).await
    }

    /// Starts a new session (a new epoch); the old session's leases are released.
    pub async fn register(&self, agent_id: &str, capabilities: &[String], capacity: u32) -> Result<Registered, Error> {
        let body = json!({"agent_id": agent_id, "capabilities": capabilities, "capacity": capacity});
        let registered: Registered = self.post("/v1/agents/register", body).await?;
        if let Some(session) = &registered.session {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            // One entry per agent id, so a long-lived client stays bounded by its agents.
            sessions.insert(agent_id.to_string(), (registered.epoch, session.clone()));
        }
        Ok(registered)
    }

    /// The body of a session's request: its epoch and, when this client
    /// registered that session, its secret.
    fn session_body(&self, agent_id: &str, epoch: u64) -> Value {
        let sessions = self.sessions.lock().expect("sessions lock");
        match sessions.get(agent_id).filter(|(known, _)| *known == epoch) {
            Some((_, session)) => json!({"epoch": epoch, "session": session}),
            None => json!({"epoch": epoch}),
        }
    }

    /// 404 or 409 means: register again.
    pub async fn heartbeat(&self, agent_id: &str, epoch: u64) -> Result<(), Error> {
        let body = self.session_body(agent_id, epoch);
        let _: Value = self.post(&format!("/v1/agents/{}/heartbeat", encode(agent_id)), body).await?;
        Ok(())
    }

    pub async fn deregister(&self, agent_id: &str, epoch: u64) -> Result<(), Error> {
        let body = self.session_body(agent_id, epoch);
        let _: Value = self.post(&format!("/v1/agents/{}/deregister", encode(agent_id)), body).await?;
        Ok(())
    }

    /// Long-polls for up to `max_tasks` leases on all the agent's
    /// capabilities, waiting up to `wait_ms`; the request's timeout is longer
    /// than the wait. Retrying is safe: leases lost with an answer expire,
    /// or return to pending at deregistration.
    pub async fn poll(
        &self,
        agent_id: &str,
        epoch: u64,
        max_tasks: u32,
        wait_ms: u64,
        lease_ttl_ms: u64,
    ) -> Result<Vec<LeaseGrant>, Error> {
        type Answer = phalanx_api::Polled;
        let mut body = self.session_body(agent_id, epoch);
        body["max_tasks"] = json!(max_tasks);
        body["wait_ms"] = json!(wait_ms);
        body["lease_ttl_ms"] = json!(lease_ttl_ms);
        let timeout = Attempt::Write { wait: Duration::from_millis(wait_ms) };
        let path = format!("/v1/agents/{}/poll", encode(agent_id));
        let answer: Answer = self.call(reqwest::Method::POST, &path, Some(&body), Retry::Safe, timeout).await?;
        Ok(answer.leases)
    }

    /// 409 `superseded` when `fence` is no longer the task's current one.
    pub async fn complete(&self, task_id: u64, fence: u64, result: &Value) -> Result<Task, Error> {
        self.complete_with_usage(task_id, fence, result, None).await
    }

    /// `complete`, reporting what the attempt consumed (counted against its
    /// key's `tokens_per_minute` and its tree's budget).
    pub async fn complete_with_usage(
        &self,
        task_id: u64,
        fence: u64,
        result: &Value,
        usage: Option<Usage>,
    ) -> Result<Task, Error> {
        let body = phalanx_api::CompleteRequest { fence, result: result.clone(), usage };
        self.post(&format!("/v1/tasks/{task_id}/complete"), serde_json::to_value(body).expect("serialises")).await
    }

    /// Many results in one request and one log entry (`POST /v1/tasks/complete`),
    /// with a minimal answer: one slot per item, in order, each `Ok` (the
    /// task's state now) or that item's own refusal. The request as a whole
    /// is retried like a single complete (fenced, so harmless).
    pub async fn complete_many(&self, items: &[CompleteItem]) -> Result<Vec<Result<TaskState, Error>>, Error> {
        let body = json!({ "results": items });
        let answer: CompleteManyAnswer = self
            .call_with(
                reqwest::Method::POST,
                "/v1/tasks/complete",
                Some(&body),
                Retry::Safe,
                Attempt::Write { wait: Duration::ZERO },
                true,
            )
            .await?;
        if answer.results.len() != items.len() {
            return Err(Error::Decode(format!("{} answers for {} results", answer.results.len(), items.len())));
        }
        Ok(answer
            .results
            .into_iter()
            .map(|item| match item {
                CompleteManyItem::Accepted { state, .. } => Ok(state),
                CompleteManyItem::Refused { error, .. } => Err(Error::refused(error.code, error.message)),
            })
            .collect())
    }

    /// A failure asking for a minimal answer (`Prefer: return=minimal`);
    /// whatever the node answers with its 2xx (a node that ignores the
    /// preference sends the task) is not read.
    pub async fn fail_minimal(&self, task_id: u64, fence: u64, error: &str, retryable: bool) -> Result<(), Error> {
        let body = json!({"fence": fence, "error": error, "retryable": retryable});
        let path = format!("/v1/tasks/{task_id}/fail");
        let _: serde::de::IgnoredAny = self
            .call_with(
                reqwest::Method::POST,
                &path,
                Some(&body),
                Retry::Safe,
                Attempt::Write { wait: Duration::ZERO },
                true,
            )
            .await?;
        Ok(())
    }

    pub async fn fail(&self, task_id: u64, fence: u64, error: &str, retryable: bool) -> Result<Task, Error> {
        self.fail_with_usage(task_id, fence, error, retryable, None).await
    }

    /// `fail`, reporting what the failed attempt consumed: it counts too.
    pub async fn fail_with_usage(
        &self,
        task_id: u64,
        fence: u64,
        error: &str,
        retryable: bool,
        usage: Option<Usage>,
    ) -> Result<Task, Error> {
        let body = phalanx_api::FailRequest { fence, error: error.to_string(), retryable: Some(retryable), usage };
        self.post(&format!("/v1/tasks/{task_id}/fail"), serde_json::to_value(body).expect("serialises")).await
    }

    // ---- flow control ----

    /// A write repeated only when it surely did not take effect (a second
    /// pause, resume, replay or delete after an unknown outcome would be
    /// refused, or move other tasks).
    async fn write_once<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<T, Error> {
        self.call(method, path, Some(&body), Retry::IfNotSent, Attempt::Write { wait: Duration::ZERO }).await
    }

    /// The limits table and every key in use.
    pub async fn limits(&self) -> Result<LimitsTable, Error> {
        self.get("/v1/limits").await
    }

    /// The limits in force for `key` and what it uses (404 `not_found`
    /// for a key with neither).
    pub async fn key_limits(&self, key: &str) -> Result<KeyStatus, Error> {
        self.get(&format!("/v1/limits/{}", encode(key))).await
    }

    /// Sets (replaces) the limits of a key, a wildcard (`tenant:*`) or `*`;
    /// safe to repeat.
    pub async fn set_key_limits(&self, key: &str, limits: &KeyLimits) -> Result<LimitRule, Error> {
        let body = serde_json::to_value(limits).expect("limits serialise");
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/limits/{}", encode(key)),
            Some(&body),
            Retry::Safe,
            Attempt::Write { wait: Duration::ZERO },
        )
        .await
    }

    pub async fn delete_key_limits(&self, key: &str) -> Result<(), Error> {
        let _: Value =
            self.write_once(reqwest::Method::DELETE, &format!("/v1/limits/{}", encode(key)), json!({})).await?;
        Ok(())
    }

    /// Pauses a task: a pending one at once, a leased one when its lease
    /// ends without a result.
    pub async fn pause(&self, task_id: u64) -> Result<Task, Error> {
        self.write_once(reqwest::Method::POST, &format!("/v1/tasks/{task_id}/pause"), json!({})).await
    }

    pub async fn resume(&self, task_id: u64) -> Result<Task, Error> {
        self.write_once(reqwest::Method::POST, &format!("/v1/tasks/{task_id}/resume"), json!({})).await
    }

    /// Dead or paused tasks matching the filter back to pending; the ids moved.
    pub async fn replay(&self, request: &ReplayRequest) -> Result<Vec<u64>, Error> {
        let body = serde_json::to_value(request).expect("a replay serialises");
        let replayed: Replayed = self.write_once(reqwest::Method::POST, "/v1/tasks/replay", body).await?;
        Ok(replayed.task_ids)
    }

    /// Sets (or with `None` removes) a root's budget; answers the tasks it
    /// resumed. Safe to repeat.
    pub async fn set_budget(&self, task_id: u64, budget: Option<Budget>) -> Result<Vec<u64>, Error> {
        let body = json!({ "budget": budget });
        let set: BudgetSet = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/tasks/{task_id}/budget"),
                Some(&body),
                Retry::Safe,
                Attempt::Write { wait: Duration::ZERO },
            )
            .await?;
        Ok(set.resumed)
    }

    /// Returns the new `valid_until_ms` (log time).
    pub async fn extend(&self, task_id: u64, fence: u64, lease_ttl_ms: u64) -> Result<u64, Error> {
        type Answer = phalanx_api::Extended;
        let body = json!(phalanx_api::ExtendRequest { fence, lease_ttl_ms: Some(lease_ttl_ms) });
        let answer: Answer = self.post(&format!("/v1/tasks/{task_id}/extend"), body).await?;
        Ok(answer.valid_until_ms)
    }

    pub async fn progress(&self, task_id: u64, fence: u64) -> Result<(), Error> {
        let _: Value = self.post(&format!("/v1/tasks/{task_id}/progress"), json!({"fence": fence})).await?;
        Ok(())
    }

    /// Records that `task_id` waits on `on` (deadlock-checked by the
    /// cluster); returns the awaited tasks still pending.
    pub async fn wait(&self, task_id: u64, fence: u64, on: &[u64], timeout_ms: u64) -> Result<Vec<u64>, Error> {
        type Answer = phalanx_api::Waiting;
        let body = json!(phalanx_api::WaitRequest { fence, on: on.to_vec(), timeout_ms });
        let answer: Answer = self.post(&format!("/v1/tasks/{task_id}/wait"), body).await?;
        Ok(answer.pending)
    }

    /// 404 `not_found` when the conversation has no entries yet.
    pub async fn context_get(&self, conversation_id: &str) -> Result<Conversation, Error> {
        self.get(&format!("/v1/conversations/{}", encode(conversation_id))).await
    }

    /// Compare-and-set when `expected_version` is given (0: only if absent);
    /// returns the key's new version. 409 `version_conflict` otherwise.
    pub async fn context_put(
        &self,
        conversation_id: &str,
        key: &str,
        value: &Value,
        expected_version: Option<u64>,
    ) -> Result<u64, Error> {
        self.context_write(conversation_id, key, value, expected_version, None).await
    }

    /// `context_put` on behalf of a task under its lease (`writer`: task id,
    /// fence): refused `superseded` or `lease_expired` once the lease is not
    /// held, and discarded if the attempt is superseded later.
    pub async fn context_put_as(
        &self,
        writer: (u64, u64),
        conversation_id: &str,
        key: &str,
        value: &Value,
        expected_version: Option<u64>,
    ) -> Result<u64, Error> {
        self.context_write(conversation_id, key, value, expected_version, Some(writer)).await
    }

    async fn context_write(
        &self,
        conversation_id: &str,
        key: &str,
        value: &Value,
        expected_version: Option<u64>,
        writer: Option<(u64, u64)>,
    ) -> Result<u64, Error> {
        type Answer = phalanx_api::ContextWritten;
        let mut body = json!({ "value": value });
        if let Some(version) = expected_version {
            body["expected_version"] = json!(version);
        }
        if let Some((task_id, fence)) = writer {
            body["task_id"] = json!(task_id);
            body["fence"] = json!(fence);
        }
        let path = format!("/v1/conversations/{}/{}", encode(conversation_id), encode(key));
        // A blind put repeats harmlessly; a CAS repeated after it committed
        // answers `version_conflict`, which the caller resolves by reading.
        let answer: Answer = self
            .call(reqwest::Method::PUT, &path, Some(&body), Retry::Safe, Attempt::Write { wait: Duration::ZERO })
            .await?;
        Ok(answer.version)
    }

    /// Deletes a conversation and its whole context. 404 `not_found` when
    /// there is none (also when a retried delete had already committed).
    pub async fn context_delete(&self, conversation_id: &str) -> Result<(), Error> {
        let path = format!("/v1/conversations/{}", encode(conversation_id));
        let _: Value = self
            .call(reqwest::Method::DELETE, &path, None, Retry::IfNotSent, Attempt::Fixed(self.request_timeout))
            .await?;
        Ok(())
    }

    pub async fn cluster(&self) -> Result<ClusterInfo, Error> {
        self.get("/v1/cluster").await
    }

    /// Readiness of one named node, asked once: failing over would answer
    /// for some other node.
    pub async fn health_ready(&self, node: &str) -> Result<Value, Error> {
        self.ask_once(node, "/health/ready").await
    }

    pub async fn health_live(&self, node: &str) -> Result<Value, Error> {
        self.ask_once(node, "/health/live").await
    }

    async fn ask_once(&self, node: &str, path: &str) -> Result<Value, Error> {
        match self.exchange(&normalize_node(node), reqwest::Method::GET, path, None, self.request_timeout, false).await
        {
            Ok(answer) if (200..300).contains(&answer.status) => decode(&answer.body),
            Ok(answer) => Err(refusal(&answer)),
            Err(Failure::Connect(reason)) => Err(Error::Unavailable(format!("{node}: {reason}"))),
            Err(Failure::Broken(reason)) => Err(Error::Transport(format!("{node}: {reason}"))),
            Err(Failure::TooLarge(message)) => Err(Error::Decode(message)),
        }
    }

    pub async fn status(&self) -> Result<Value, Error> {
        self.get("/v1/status").await
    }

    /// Waits up to 8 s for the node to catch up, so it has the long timeout.
    pub async fn add_member(&self, node_id: u64, addr: &str, raft_addr: Option<&str>) -> Result<Value, Error> {
        let body = json!({"node_id": node_id, "addr": addr, "raft_addr": raft_addr});
        self.call(
            reqwest::Method::POST,
            "/v1/cluster/members",
            Some(&body),
            Retry::Safe,
            Attempt::Fixed(self.request_timeout),
        )
        .await
    }

    pub async fn remove_member(&self, node_id: u64) -> Result<Value, Error> {
        let path = format!("/v1/cluster/members/{node_id}");
        self.call(reqwest::Method::DELETE, &path, None, Retry::Safe, Attempt::Fixed(self.request_timeout)).await
    }

    pub async fn config_get(&self) -> Result<Value, Error> {
        self.get("/v1/config").await
    }

    /// Changes policy keys; `force` is needed for a change that would refuse
    /// all new work of some kind or delete retained tasks (`409 force_required`).
    pub async fn config_set(&self, set: serde_json::Map<String, Value>, force: bool) -> Result<Value, Error> {
        let body = json!({ "set": set, "force": force });
        self.call(reqwest::Method::PUT, "/v1/config", Some(&body), Retry::Safe, Attempt::Fixed(self.request_timeout))
            .await
    }

    pub async fn config_history(&self) -> Result<Value, Error> {
        self.get("/v1/config/history").await
    }

    /// Makes an earlier version current again (`version`, default the one
    /// before the current); `force` as for `config_set`. A compare-and-set on
    /// the version read first, so it is safe to repeat: a repeat after an
    /// unknown outcome finds the version moved on and is refused
    /// (`409 version_conflict`) instead of going back a second version.
    pub async fn config_rollback(&self, version: Option<u64>, force: bool) -> Result<Value, Error> {
        let current = self.config_get().await?;
        let expected_version =
            current["version"].as_u64().ok_or_else(|| Error::Transport("GET /v1/config answered no version".into()))?;
        let body = phalanx_api::RollbackRequest { version, expected_version: Some(expected_version), force };
        self.call(
            reqwest::Method::POST,
            "/v1/config/rollback",
            Some(&serde_json::to_value(body).expect("a rollback serialises")),
            Retry::Safe,
            Attempt::Fixed(self.request_timeout),
        )
        .await
    }

    /// Waits until every task is terminal, reading each with backoff;
    /// `Error::TimedOut` when `timeout` passes first.
    pub async fn await_tasks(&self, ids: &[u64], timeout: Duration) -> Result<Vec<Task>, Error> {
        let deadline = Instant::now() + timeout;
        let mut done: Vec<Option<Task>> = vec![None; ids.len()];
        let mut attempt = 0;
        loop {
            for (slot, id) in done.iter_mut().zip(ids) {
                if slot.is_none() {
                    let task = self.get_task(*id, false).await?;
                    if task.state.is_terminal() {
                        *slot = Some(task);
                    }
                }
            }
            if done.iter().all(Option::is_some) {
                return Ok(done.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::TimedOut(format!("tasks {ids:?} did not finish within {timeout:?}")));
            }
            // A floor keeps full jitter from turning into a busy loop.
            let pause = Duration::from_millis(20) + backoff(attempt, BACKOFF_BASE, Duration::from_secs(1));
            tokio::time::sleep(pause.min(deadline - now)).await;
            attempt += 1;
        }
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
        Error::Decode(format!("{e}: {text}"))
    })
}

/// Reads `{"error": {...}}` (`phalanx_api::ErrorEnvelope`); a body that is
/// not one keeps its text as the message and its status decides.
fn refusal(answer: &Answer) -> Error {
    let value: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    // The envelope fills in a missing `outcome`; the table decides it then.
    let outcome_field = value["error"]["outcome"].as_str().map(str::to_string);
    let code_field = value["error"]["code"].as_str().map(str::to_string);
    match serde_json::from_value::<phalanx_api::ErrorEnvelope>(value) {
        Ok(envelope) => {
            let error = envelope.error;
            Error::Api {
                status: answer.status,
                outcome: outcome_of_refusal(outcome_field.as_deref(), &error.code),
                code: error.code.to_string(),
                message: error.message,
                leader_hint: error.leader_hint,
                retry_after_ms: error.retry_after_ms.or(answer.retry_after_ms),
            }
        }
        Err(_) => {
            let code: ErrorCode =
                code_field.as_deref().unwrap_or("unknown").parse().unwrap_or_else(|never| match never {});
            Error::Api {
                status: answer.status,
                outcome: outcome_of_refusal(None, &code),
                code: code.to_string(),
                message: String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)]).into_owned(),
                leader_hint: None,
                retry_after_ms: answer.retry_after_ms,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_write_timeout_follows_the_latency_between_floor_and_ceiling() {
        let (floor, ceiling) = (WRITE_TIMEOUT_FLOOR, WRITE_TIMEOUT_DEFAULT);
        let mut latency = Latency::default();
        // Nothing seen yet: the ceiling.
        assert_eq!(latency.timeout(floor, ceiling), ceiling);
        // Commits of a few milliseconds: the floor.
        for _ in 0..20 {
            latency.record(4.0);
        }
        assert_eq!(latency.timeout(floor, ceiling), floor);
        // A loaded cluster answering in 150-250 ms: more than the floor.
        for i in 0..40 {
            latency.record(if i % 2 == 0 { 150.0 } else { 250.0 });
        }
        let loaded = latency.timeout(floor, ceiling);
        assert!(loaded > Duration::from_millis(300) && loaded <= ceiling, "{loaded:?}");
        // A ceiling set below the floor wins.
        assert_eq!(latency.timeout(Duration::from_millis(100), Duration::from_millis(100)), Duration::from_millis(100));
    }

    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn submits_announce_their_priority_to_the_door() {
        assert_eq!(door_priority("/v1/tasks", &json!({"queue": "q", "priority": 8})), Some(8));
        assert_eq!(door_priority("/v1/tasks", &json!({"queue": "q"})), Some(5));
        let batch = json!({"tasks": [{"priority": 2}, {"priority": 7}, {}]});
        assert_eq!(door_priority("/v1/tasks/batch", &batch), Some(7));
        assert_eq!(door_priority("/v1/tasks/batch", &json!({"tasks": []})), None);
        assert_eq!(door_priority("/v1/agents/a/poll", &json!({"priority": 9})), None);
    }

    #[test]
    fn node_lists_parse() {
        assert_eq!(parse_nodes(" 127.0.0.1:1, http://127.0.0.1:2/ ,"), ["127.0.0.1:1", "127.0.0.1:2"]);
        let client = Client::from_nodes_str("a:1,b:2", None).unwrap();
        assert_eq!(client.nodes(), ["a:1", "b:2"]);
        assert!(Client::from_nodes_str(" , ", None).is_err());
    }

    #[test]
    fn backoff_stays_within_its_ceiling() {
        for attempt in 0..40 {
            let pause = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP);
            assert!(pause <= BACKOFF_CAP);
            assert!(pause <= BACKOFF_BASE * (1 << attempt.min(16)));
        }
        // Full jitter: draws spread over the whole range, not bunched at the ceiling.
        let draws: Vec<Duration> = (0..1000).map(|_| backoff(10, BACKOFF_BASE, BACKOFF_CAP)).collect();
        assert!(draws.iter().any(|d| *d < BACKOFF_CAP / 4) && draws.iter().any(|d| *d > BACKOFF_CAP * 3 / 4));
    }

    #[test]
    fn retry_budget_allows_about_a_tenth() {
        let mut budget = RetryBudget::new(2);
        assert!(budget.try_retry() && budget.try_retry());
        assert!(!budget.try_retry(), "the floor is spent");
        for _ in 0..10 {
            budget.on_request();
        }
        assert!(budget.try_retry(), "ten requests earn one retry");
        assert!(!budget.try_retry());
        for _ in 0..100 {
            budget.on_request();
        }
        let mut retries = 0;
        while budget.try_retry() {
            retries += 1;
        }
        assert_eq!(retries, 2, "capped at tokens_max");
    }

    #[test]
    fn what_to_do_after_a_failure() {
        fn check(status: u16, code: &str, retry: Retry, expected: Next) {
            let code: ErrorCode = code.parse().unwrap();
            let outcome = outcome_of_refusal(None, &code);
            assert_eq!(after_refusal(status, &code, outcome, retry), expected, "{status} {code} {retry:?}");
        }
        check(429, "queue_full", Retry::IfNotSent, Next::RetrySameNode);
        check(503, "not_leader", Retry::IfNotSent, Next::RetryOtherNode);
        check(503, "deadline_exceeded", Retry::IfNotSent, Next::RetryOtherNode);
        check(503, "timeout", Retry::IfNotSent, Next::FailUnknown);
        check(503, "unavailable", Retry::IfNotSent, Next::FailUnknown);
        check(503, "leader_changed", Retry::IfNotSent, Next::FailUnknown);
        check(503, "leader_unreachable", Retry::IfNotSent, Next::RetryOtherNode);
        check(503, "leader_changed", Retry::Safe, Next::RetryOtherNode);
        // The body's own `outcome` field decides over the table.
        assert_eq!(outcome_of_refusal(Some("unknown"), &ErrorCode::NotLeader), Outcome::Unknown);
        assert_eq!(outcome_of_refusal(Some("not_done"), &ErrorCode::Timeout), Outcome::NotDone);
        check(503, "timeout", Retry::Safe, Next::RetryOtherNode);
        check(409, "superseded", Retry::Safe, Next::Fail);
        check(400, "invalid", Retry::Safe, Next::Fail);
        assert_eq!(after_transport(true, Retry::IfNotSent), Next::RetryOtherNode);
        assert_eq!(after_transport(false, Retry::IfNotSent), Next::FailUnknown);
        assert_eq!(after_transport(false, Retry::Safe), Next::RetryOtherNode);
    }

    /// docs/sdk.md, 4: every code of the contract's table is classified by
    /// its `transient` and `outcome`, and a code from a newer node by status.
    #[test]
    fn sdk_4_retry_classification_follows_the_error_code_table() {
        for code in ErrorCode::ALL {
            let outcome = outcome_of_refusal(None, code);
            assert_eq!(outcome, code.outcome(), "{code}");
            let next = after_refusal(code.status(), code, outcome, Retry::Safe);
            let expected = match (code.transient(), code.status()) {
                (false, _) => Next::Fail,
                (true, 429) => Next::RetrySameNode,
                (true, _) => Next::RetryOtherNode,
            };
            assert_eq!(next, expected, "{code}");
            let unsafe_next = after_refusal(code.status(), code, outcome, Retry::IfNotSent);
            if code.transient() && code.outcome() == Outcome::Unknown {
                assert_eq!(unsafe_next, Next::FailUnknown, "{code}");
            }
        }
        let newer = ErrorCode::Other("from_the_future".into());
        assert_eq!(outcome_of_refusal(None, &newer), Outcome::Unknown);
        assert_eq!(after_refusal(503, &newer, Outcome::NotDone, Retry::IfNotSent), Next::RetryOtherNode);
        assert_eq!(after_refusal(429, &newer, Outcome::NotDone, Retry::IfNotSent), Next::RetrySameNode);
        assert_eq!(after_refusal(409, &newer, Outcome::NotDone, Retry::Safe), Next::Fail);
        let unknown: std::collections::BTreeSet<&str> =
            ErrorCode::ALL.iter().filter(|c| c.outcome() == Outcome::Unknown).map(|c| c.as_str()).collect();
        assert_eq!(unknown, OUTCOME_UNKNOWN_CODES.iter().copied().collect(), "OUTCOME_UNKNOWN_CODES follows the table");
    }

    #[test]
    fn retry_after_and_encoding() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after_header(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after_header(&headers), Some(2000));
        assert_eq!(encode("a b/é"), "a%20b%2F%C3%A9");
    }

    #[test]
    fn types_match_the_document() {
        let task: Task = serde_json::from_value(json!({
            "id": 7, "queue": "q", "payload": {"x": 1}, "priority": 5, "state": "leased",
            "created_ms": 1, "updated_ms": 2, "deadline_ms": null, "max_attempts": 3, "attempts": 1,
            "idempotency_key": null, "parent_id": null, "conversation_id": "c", "hop_count": 0,
            "lease": {"agent_id": "a", "agent_epoch": 1, "fence": 9, "valid_until_ms": 100, "progress_ms": 5},
            "last_fence": 9, "result": null, "error": null, "dead_reason": null, "superseded_count": 0, "trail": [],
            "from_a_newer_node": 1
        }))
        .unwrap();
        assert_eq!(task.state, TaskState::Leased);
        assert_eq!(task.lease.as_ref().map(|l| l.fence), Some(9));
        assert_eq!(task.other["from_a_newer_node"], json!(1), "unnamed fields are kept");
        assert!(task.trail.is_empty(), "the trail is a named field now");
        assert_eq!(serde_json::to_value(TaskState::Cancelled).unwrap(), json!("cancelled"));
        let request = SubmitRequest::new("q", json!(1)).with_idempotency_key("k");
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            json!({"queue": "q", "payload": 1, "priority": 5, "max_attempts": 3, "idempotency_key": "k"})
        );
    }

    /// The idempotency keys the fake nodes received, by node address.
    static KEYS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

    /// One scripted answer of the fake node: status, `Retry-After`, body, delay.
    type Script = (u16, Option<u64>, Value, u64);

    /// A node that answers each request with the next line of its script and
    /// counts what it received: enough to test failover without a cluster.
    async fn fake_node(script: Vec<Script>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        let addr_seen = addr.clone();
        tokio::spawn(async move {
            let mut script = script.into_iter();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                // Read the head, then as many body bytes as Content-Length says.
                loop {
                    let n = stream.read(&mut buffer).await.unwrap_or(0);
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0usize);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some(body) = text.split("\r\n\r\n").nth(1) {
                    if let Some(key) = serde_json::from_str::<Value>(body)
                        .ok()
                        .and_then(|b| b["idempotency_key"].as_str().map(String::from))
                    {
                        KEYS.lock().unwrap().push((addr_seen.clone(), key));
                    }
                }
                let Some((status, retry_after, body, delay_ms)) = script.next() else { return };
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let body = body.to_string();
                let retry_after = retry_after.map(|s| format!("retry-after: {s}\r\n")).unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry_after}connection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(format!("{head}{body}").as_bytes()).await;
            }
        });
        (addr, received)
    }

    /// A node whose submits answer after `slow_ms` and whose every other
    /// request answers at once, each connection served on its own; counts
    /// the submits it received.
    async fn slow_submits_node(slow_ms: u64, others: u16) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let submits = Arc::new(AtomicUsize::new(0));
        let counted = submits.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    loop {
                        let mut request = Vec::new();
                        let mut buffer = [0u8; 4096];
                        let head_end = loop {
                            let n = stream.read(&mut buffer).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            request.extend_from_slice(&buffer[..n]);
                            if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                                break end;
                            }
                        };
                        let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0);
                        while request.len() < head_end + 4 + length {
                            let n = stream.read(&mut buffer).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            request.extend_from_slice(&buffer[..n]);
                        }
                        let (status, body) = if head.starts_with("post /v1/tasks ") {
                            counted.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(slow_ms)).await;
                            (201, json!({"task_id": 1, "deduplicated": false}).to_string())
                        } else if others == 503 {
                            let error =
                                json!({"error": {"code": "not_ready", "message": "scripted", "outcome": "not_done"}});
                            (503, error.to_string())
                        } else {
                            (others, "{}".to_string())
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if stream.write_all(format!("{head}{body}").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, submits)
    }

    /// docs/sdk.md, 4: a write attempt is not abandoned while its node keeps
    /// answering other requests: a submit answered after 1.2 s (more than
    /// two adaptive timeouts) is waited for, and sent once.
    #[tokio::test]
    async fn sdk_4_a_slow_node_that_answers_others_is_waited_for() {
        let (node, submits) = slow_submits_node(1_200, 200).await;
        let client = Arc::new(Client::new(vec![node], None).unwrap());
        let submitting = {
            let client = client.clone();
            tokio::spawn(async move { client.submit(&SubmitRequest::new("q", json!(1))).await })
        };
        while !submitting.is_finished() {
            let _ = client.get_task(1, true).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let submitted = submitting.await.unwrap().expect("the slow submit was waited for");
        assert_eq!(submitted.task_id, 1);
        assert_eq!(submits.load(Ordering::SeqCst), 1, "sent once");
    }

    /// docs/sdk.md, 4: a node that answers others only with 5xx (it cannot
    /// make progress: a stalled disk, no leader) is left after one timeout,
    /// as a silent one is.
    #[tokio::test]
    async fn sdk_4_a_node_answering_others_only_with_5xx_is_left_after_one_timeout() {
        let (node, submits) = slow_submits_node(1_200, 503).await;
        let client = Arc::new(Client::new(vec![node], None).unwrap().with_retries_max(0));
        let submitting = {
            let client = client.clone();
            tokio::spawn(async move { client.submit(&SubmitRequest::new("q", json!(1))).await })
        };
        let start = Instant::now();
        while !submitting.is_finished() {
            let _ = client.get_task(1, true).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let error = submitting.await.unwrap().unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(900), "{:?}", start.elapsed());
        assert!(error.to_string().contains("no answer within 500ms"), "{error}");
        assert_eq!(submits.load(Ordering::SeqCst), 1);
    }

    /// docs/sdk.md, 4: a node that answers nothing is still left after one
    /// attempt timeout.
    #[tokio::test]
    async fn sdk_4_a_silent_node_is_left_after_one_timeout() {
        let (node, submits) = slow_submits_node(1_200, 200).await;
        let client = Client::new(vec![node], None).unwrap().with_retries_max(0);
        let start = Instant::now();
        let error = client.submit(&SubmitRequest::new("q", json!(1))).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(900), "{:?}", start.elapsed());
        assert!(error.to_string().contains("no answer within 500ms"), "{error}");
        assert_eq!(submits.load(Ordering::SeqCst), 1);
    }

    /// docs/sdk.md, 10: a node that refuses everything for load is soon
    /// spared most requests; what the client refuses itself fails at once as
    /// `overloaded`, `not_done`, "throttled by the client", and never
    /// reaches the node; other classes and nodes are not throttled.
    #[tokio::test]
    async fn sdk_10_a_node_refusing_for_load_is_throttled_by_the_client() {
        let overloaded = json!({"error": {"code": "overloaded", "message": "scripted", "outcome": "not_done"}});
        let (node, received) = fake_node(vec![(429, Some(0), overloaded, 0); 200]).await;
        let client = Client::new(vec![node], None).unwrap().with_retries_max(0);
        let low = SubmitRequest::new("q", json!(1)).with_priority(2);
        let (mut throttled, mut sent) = (0, 0);
        for _ in 0..100 {
            let error = client.submit(&low).await.unwrap_err();
            assert_eq!((error.code(), error.outcome()), (Some("overloaded"), Outcome::NotDone), "{error}");
            if error.to_string().contains("throttled by the client") {
                throttled += 1;
            } else {
                sent += 1;
            }
        }
        assert_eq!(sent, received.load(Ordering::SeqCst), "a throttled request never reaches the node");
        // p = (requests - 2 * 0) / (requests + 1): past the first few, nearly every request stays home.
        assert!(throttled >= 80 && sent >= 1, "{throttled} throttled, {sent} sent");
        // The high class has its own window: its first request is sent.
        let high = SubmitRequest::new("q", json!(1)).with_priority(8);
        let before = received.load(Ordering::SeqCst);
        let error = client.submit(&high).await.unwrap_err();
        assert!(!error.to_string().contains("throttled"), "{error}");
        assert_eq!(received.load(Ordering::SeqCst), before + 1);
        // Turned off, every request is sent.
        let client = client.with_throttling(false);
        let before = received.load(Ordering::SeqCst);
        for _ in 0..5 {
            let _ = client.submit(&low).await;
        }
        assert_eq!(received.load(Ordering::SeqCst), before + 5);
    }

    /// docs/sdk.md, 11: a client sends at most `REQUESTS_IN_FLIGHT_MAX`
    /// requests at once; the others wait in the client and are sent as
    /// slots free up, every one answered.
    #[tokio::test]
    async fn sdk_11_requests_past_the_bound_wait_in_the_client() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (open_seen, most_seen) = (open.clone(), most.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (open, most) = (open_seen.clone(), most_seen.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 8192];
                    let mut read = 0;
                    while !buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let body = r#"{"task_id": 1, "deduplicated": false}"#;
                    let answer = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        let client = Arc::new(
            Client::new(vec![addr], None)
                .unwrap()
                .with_retries_max(0)
                .with_write_timeout(Duration::from_secs(10))
                .with_throttling(false),
        );
        let calls = (0..REQUESTS_IN_FLIGHT_MAX + 44).map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.submit(&SubmitRequest::new("q", json!(1))).await })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap().expect("a request that waited for a slot is sent and answered");
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= REQUESTS_IN_FLIGHT_MAX && most > REQUESTS_IN_FLIGHT_MAX / 2, "{most} at once");
    }

    async fn refused_addr() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    }

    fn refused(code: &str, hint: Option<&str>) -> Value {
        json!({"error": {"code": code, "message": "scripted", "leader_hint": hint, "retry_after_ms": 10}})
    }

    #[tokio::test]
    async fn a_dead_node_and_a_follower_lead_to_the_leader() {
        let created = json!({"task_id": 1, "deduplicated": false});
        let (leader, leader_seen) = fake_node(vec![(201, None, created.clone(), 0), (201, None, created, 0)]).await;
        let hint = refused("not_leader", Some(&leader));
        let (follower, _) = fake_node(vec![(503, None, hint.clone(), 0), (503, None, hint, 0)]).await;
        let client = Client::new(vec![refused_addr().await, follower, leader], None).unwrap();
        for _ in 0..2 {
            let submitted = client.submit(&SubmitRequest::new("q", json!(null))).await.unwrap();
            assert_eq!(submitted.task_id, 1);
        }
        assert_eq!(leader_seen.load(Ordering::SeqCst), 2, "the leader is remembered once found");
    }

    #[tokio::test]
    async fn an_unknown_outcome_is_repeated_only_when_harmless() {
        let timeout = refused("timeout", None);
        let (node, seen) = fake_node(vec![(503, None, timeout, 0)]).await;
        let client = Client::new(vec![node], None).unwrap();
        let error = client.context_delete("c").await.unwrap_err();
        assert!(matches!(error, Error::Unknown(_)) && error.outcome() == Outcome::Unknown, "{error:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "a delete is not repeated");
    }

    #[tokio::test]
    async fn an_unkeyed_submit_gets_one_key_for_all_its_attempts() {
        let timeout = refused("timeout", None);
        let created = json!({"task_id": 2, "deduplicated": true});
        let (node, seen) =
            fake_node(vec![(503, None, timeout.clone(), 0), (503, None, timeout, 0), (201, None, created, 0)]).await;
        let client = Client::new(vec![node], None).unwrap();
        assert_eq!(client.submit(&SubmitRequest::new("q", json!(null))).await.unwrap().task_id, 2);
        assert_eq!(seen.load(Ordering::SeqCst), 3, "retried after each unknown outcome");
        let keys = KEYS.lock().unwrap().clone();
        let keys: Vec<&String> = keys.iter().filter(|(addr, _)| *addr == client.nodes()[0]).map(|(_, k)| k).collect();
        assert_eq!(keys.len(), 3);
        assert!(keys[0].starts_with("auto-") && keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_a_write_is_left_for_the_next_within_a_second() {
        let created = json!({"task_id": 4, "deduplicated": false});
        // The first node accepts the connection and never answers (a paused process).
        let (silent, _) = fake_node(vec![(201, None, created.clone(), 60_000)]).await;
        let (healthy, _) = fake_node(vec![(201, None, created, 0)]).await;
        let client = Client::new(vec![silent, healthy], None).unwrap().starting_at(0);
        let started = Instant::now();
        assert_eq!(client.submit(&SubmitRequest::new("q", json!(null))).await.unwrap().task_id, 4);
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn giving_up_after_an_unknown_attempt_says_unknown() {
        let timeout = refused("timeout", None);
        let (node, _) = fake_node(vec![(503, None, timeout, 0)]).await;
        let client = Client::new(vec![node, refused_addr().await], None).unwrap().starting_at(0).with_retries_max(2);
        let error = client.cancel(1).await.unwrap_err();
        assert_eq!(error.outcome(), Outcome::Unknown, "{error:?}");
        let client = Client::new(vec![refused_addr().await], None).unwrap().with_retries_max(1);
        assert_eq!(client.cancel(1).await.unwrap_err().outcome(), Outcome::NotDone);
    }

    #[tokio::test]
    async fn retry_after_is_honoured() {
        let busy = json!({"error": {"code": "queue_full", "message": "full"}});
        let created = json!({"task_id": 3, "deduplicated": false});
        let (node, _) = fake_node(vec![(429, Some(1), busy, 0), (201, None, created, 0)]).await;
        let client = Client::new(vec![node], None).unwrap();
        let started = Instant::now();
        assert_eq!(client.submit(&SubmitRequest::new("q", json!(null))).await.unwrap().task_id, 3);
        assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After: 1 waited out");
    }

    #[tokio::test]
    async fn a_long_poll_outlives_the_request_timeout() {
        let (node, _) = fake_node(vec![(200, None, json!({"leases": []}), 400)]).await;
        let client = Client::new(vec![node], None).unwrap().with_request_timeout(Duration::from_millis(200));
        assert!(client.poll("a", 1, 1, 400, 1000).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn refusals_keep_their_details_and_unreachable_clusters_say_so() {
        let superseded = json!({"error": {"code": "superseded", "message": "old fence"}});
        let (node, _) = fake_node(vec![(409, None, superseded, 0)]).await;
        let client = Client::new(vec![node], None).unwrap();
        let error = client.complete(1, 1, &json!(1)).await.unwrap_err();
        assert!(error.is_superseded() && error.status() == Some(409), "{error:?}");
        let client = Client::new(vec![refused_addr().await], None).unwrap().with_retries_max(2);
        assert!(client.get_task(1, false).await.unwrap_err().is_unreachable());
    }

    /// docs/sdk.md, 4, against nodes: a 408, a 507 and a code from a newer
    /// node answered 503 are repeated; 500 `internal` is not.
    #[tokio::test]
    async fn sdk_4_transient_refusals_are_repeated_and_the_rest_are_not() {
        let created = json!({"task_id": 5, "deduplicated": false});
        for (status, code) in [(408, "body_timeout"), (507, "disk_full"), (503, "from_the_future")] {
            let (node, seen) =
                fake_node(vec![(status, None, refused(code, None), 0), (201, None, created.clone(), 0)]).await;
            let client = Client::new(vec![node], None).unwrap();
            let submitted = client.submit(&SubmitRequest::new("q", json!(null))).await;
            assert_eq!(submitted.map(|s| s.task_id).ok(), Some(5), "{status} {code} is transient");
            assert_eq!(seen.load(Ordering::SeqCst), 2, "{code}");
        }
        let (node, seen) = fake_node(vec![(500, None, refused("internal", None), 0), (201, None, created, 0)]).await;
        let client = Client::new(vec![node], None).unwrap();
        let error = client.submit(&SubmitRequest::new("q", json!(null))).await.unwrap_err();
        assert_eq!(error.code(), Some("internal"));
        assert!(!error.is_transient() && error.is_definite() && !error.is_answer());
        assert_eq!(seen.load(Ordering::SeqCst), 1, "internal is not repeated");
    }

    /// docs/sdk.md, 5: giving up names every node tried and why.
    #[tokio::test]
    async fn sdk_5_no_node_answered_lists_every_node_tried_with_its_reason() {
        let (first, second) = (refused_addr().await, refused_addr().await);
        let client = Client::new(vec![first.clone(), second.clone()], None).unwrap().starting_at(0).with_retries_max(2);
        let error = client.get_task(1, false).await.unwrap_err();
        assert!(matches!(error, Error::Unavailable(_)) && error.outcome() == Outcome::NotDone, "{error:?}");
        assert_eq!(
            error.to_string(),
            format!("no node answered: after 3 attempts: {first}: connection refused (2 times); {second}: connection refused")
        );
        // A node that answered says what it answered.
        let (follower, _) = fake_node(vec![(503, None, refused("no_leader", None), 0)]).await;
        let dead = refused_addr().await;
        let client =
            Client::new(vec![follower.clone(), dead.clone()], None).unwrap().starting_at(0).with_retries_max(1);
        let error = client.get_task(1, false).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("no node answered: after 2 attempts: {follower}: 503 no_leader; {dead}: connection refused")
        );
    }

    /// docs/sdk.md, 1: an `https://` node is spoken to with TLS, any other
    /// node with plain HTTP, and nothing else is accepted.
    #[test]
    fn sdk_1_each_node_keeps_its_scheme() {
        let client = Client::from_nodes_str("http://a:1, b:2 ,https://c:3/", None).unwrap();
        assert_eq!(client.nodes(), ["a:1", "b:2", "https://c:3"]);
        assert_eq!(node_url("a:1", "/v1/x"), "http://a:1/v1/x");
        assert_eq!(node_url("https://c:3", "/v1/x"), "https://c:3/v1/x");
        for nodes in ["ftp://a:1", "127.0.0.1:1,ws://a:2"] {
            let error = Client::from_nodes_str(nodes, None).err().expect(nodes);
            assert!(matches!(error, Error::Config(_)), "{nodes}: {error:?}");
        }
        // A leader hint is host:port; it matches an https:// node too.
        client.move_on(Some("c:3"));
        assert_eq!(client.current.load(Ordering::Relaxed), 2);
        client.move_on(Some("http://a:1"));
        assert_eq!(client.current.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sdk_1_a_ca_file_that_cannot_be_used_fails_the_constructor() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = Client::from_nodes_str("https://a:1", None).unwrap().with_ca_file(&missing).err().unwrap();
        assert!(matches!(&error, Error::Config(why) if why.contains("missing.pem")), "{error:?}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = Client::from_nodes_str("https://a:1", None).unwrap().with_ca_file(&empty).err().unwrap();
        assert!(matches!(&error, Error::Config(why) if why.contains("no PEM certificate")), "{error:?}");
    }
}
