//! The HTTP API (docs/api.md), the Raft RPC routes, health and metrics.
//!
//! Every handler is thin: parse and validate at the edge, then either read the
//! applied state or propose a command through the proposer. A follower does
//! not handle `/v1` requests itself: `route_to_leader` forwards them, once, to
//! the leader (a request already forwarded is never forwarded again, so two
//! nodes that disagree about the leader cannot bounce it forever).

use crate::error::{ApiError, ErrorCode};
use crate::node::Node;
use crate::proposer;
use crate::raft_wire::{Format, RAFT_FORMAT_HEADER};
use crate::trace::{AttributeValue, Span, TraceContext};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use phalanx_api as api;
use phalanx_core::state::validate_name;
use phalanx_core::{Command, NewTask, Outcome, Task};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Node_ = Arc<Node>;
type ApiResult = Result<Response, ApiError>;
type Body = Result<Bytes, BytesRejection>;

/// Marks a request a follower forwarded to the leader.
const FORWARDED_HEADER: &str = "x-phalanx-forwarded";
/// Carries the peer token on a forwarded request (its `Authorization` header
/// is the client's own, relayed).
const PEER_TOKEN_HEADER: &str = "x-phalanx-peer-token";
/// Marks a response answered from a node's own, possibly stale, state.
const STALE_HEADER: &str = "x-phalanx-stale";
/// W3C Trace Context of the caller's span (`trace.rs`).
const TRACEPARENT_HEADER: &str = "traceparent";
/// Longest long-poll an agent may ask for.
const POLL_WAIT_MS_MAX: u64 = 30_000;
const LIST_LIMIT_MAX: usize = 1000;

/// The Raft RPC routes alone, for a node's separate Raft listener.
pub fn raft_router(node: Arc<Node>) -> Router {
    raft_routes(node.clone()).with_state(node)
}

fn raft_routes(node: Arc<Node>) -> Router<Node_> {
    Router::new()
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
        .route("/raft/probe", get(raft_probe))
        .layer(DefaultBodyLimit::max(node.config.raft_request_bytes_max))
        .layer(middleware::from_fn_with_state(node, require_peer_token))
}

pub fn router(node: Arc<Node>) -> Router {
    // Raft RPCs are served here only when the node has no Raft listener of its
    // own and a peer token to check: a one-node server without one serves none.
    let raft = match (&node.config.raft_listen, &node.config.peer_token) {
        (None, Some(_)) => raft_routes(node.clone()),
        _ => Router::new(),
    };
    let routed = Router::new()
        .route("/v1/tasks", post(submit).get(list_tasks))
        .route("/v1/tasks/batch", post(submit_batch))
        .route("/v1/tasks/complete", post(complete_many))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/tasks/{id}/complete", post(complete))
        .route("/v1/tasks/{id}/fail", post(fail))
        .route("/v1/tasks/{id}/extend", post(extend))
        .route("/v1/tasks/{id}/wait", post(wait))
        .route("/v1/tasks/{id}/progress", post(progress))
        .route("/v1/tasks/{id}/pause", post(pause))
        .route("/v1/tasks/{id}/resume", post(resume))
        .route("/v1/tasks/{id}/budget", put(set_budget))
        .route("/v1/tasks/replay", post(replay))
        .route("/v1/limits", get(list_limits))
        .route("/v1/limits/{key}", get(get_limits).put(set_limits).delete(delete_limits))
        .route("/v1/agents", get(list_agents))
        .route("/v1/status", get(status))
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/{agent_id}/heartbeat", post(heartbeat))
        .route("/v1/agents/{agent_id}/deregister", post(deregister))
        .route("/v1/agents/{agent_id}/poll", post(poll))
        .route("/v1/conversations/{id}", get(context_get).delete(context_delete))
        .route("/v1/conversations/{id}/{key}", put(context_put))
        .route("/v1/config", get(config_get).put(config_set))
        .route("/v1/config/history", get(config_history))
        .route("/v1/config/rollback", post(config_rollback))
        .route("/v1/cluster/members", post(add_member))
        .route("/v1/cluster/members/{id}", axum::routing::delete(remove_member))
        .layer(middleware::from_fn_with_state(node.clone(), route_to_leader))
        .layer(middleware::from_fn_with_state(node.clone(), read_body))
        .layer(middleware::from_fn_with_state(node.clone(), admit));
    let client = Router::new()
        .merge(routed)
        .route("/v1/cluster", get(cluster))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(node.config.request_bytes_max))
        .layer(middleware::from_fn_with_state(node.clone(), require_client_token));
    let health = Router::new()
        .route(
            "/health/live",
            get(|node: State<Node_>| async move { Json(api::openapi::Live { live: true, node_id: node.id() }) }),
        )
        .route("/health/ready", get(ready));
    Router::new()
        .merge(raft)
        .merge(client.merge(health).layer(middleware::from_fn(json_rejections)))
        .merge(crate::console::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(node.clone(), count_requests))
        .with_state(node)
}

// ---- middleware ----

/// Bytes of an axum or hyper refusal read to put its text in our format.
const REJECTION_TEXT_BYTES_MAX: usize = 4096;

/// Refusals that axum answers by itself, outside our handlers (405 with an
/// empty body, a path parameter that is not valid UTF-8, ...), in the JSON
/// error format like every other refusal. Ours are JSON already and pass.
async fn json_rejections(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(response.status().is_client_error() || response.status().is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, REJECTION_TEXT_BYTES_MAX).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let allow = parts.headers.get("allow").cloned();
    let text = match &allow {
        Some(allowed) if parts.status == StatusCode::METHOD_NOT_ALLOWED => {
            format!("method {method} is not allowed on {path}; allowed: {}", allowed.to_str().unwrap_or(""))
        }
        _ => text,
    };
    let mut answer = ApiError::from_rejection(parts.status, &text).into_response();
    if let Some(allowed) = allow {
        answer.headers_mut().insert("allow", allowed);
    }
    answer
}

async fn count_requests(State(node): State<Node_>, request: Request, next: Next) -> Response {
    node.stats.http_requests.fetch_add(1, Ordering::Relaxed);
    let target = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > node.config.uri_bytes_max {
        let message =
            format!("the request target is {target} bytes, over uri_bytes_max ({})", node.config.uri_bytes_max);
        return ApiError::new(ErrorCode::UriTooLong, message).into_response();
    }
    next.run(request).await
}

/// Reads the whole body, within `body_read_timeout_ms` and
/// `request_bytes_max`, after the door admitted the request and before
/// anything else waits on it: a client that sends its body slowly (or never)
/// is answered `408` instead of holding its slot and its buffers for good.
async fn read_body(State(node): State<Node_>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let timeout = Duration::from_millis(node.config.body_read_timeout_ms);
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, node.config.request_bytes_max)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let message =
                format!("request body refused (request_bytes_max is {}): {error}", node.config.request_bytes_max);
            return ApiError::new(ErrorCode::TooLarge, message).into_response();
        }
        Err(_) => {
            let message =
                format!("the request body did not arrive within body_read_timeout_ms ({})", timeout.as_millis());
            return ApiError::new(ErrorCode::BodyTimeout, message).into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn check_token(headers: &HeaderMap, expected: &Option<String>) -> Result<(), ApiError> {
    let Some(expected) = expected else { return Ok(()) };
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(expected.as_str()) {
        return Err(ApiError::new(ErrorCode::Unauthorized, "missing or wrong bearer token"));
    }
    Ok(())
}

async fn require_client_token(State(node): State<Node_>, request: Request, next: Next) -> Response {
    match check_token(request.headers(), &node.config.client_token) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

async fn require_peer_token(State(node): State<Node_>, request: Request, next: Next) -> Response {
    if node.config.peer_token.is_none() {
        let message = "this node has no peer token, so it serves no Raft RPCs: set --peer-token on every node";
        return ApiError::new(ErrorCode::NoPeerToken, message).into_response();
    }
    match check_token(request.headers(), &node.config.peer_token) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Whether a request was forwarded by a peer: it carries `X-Phalanx-Forwarded`
/// and the peer token in `X-Phalanx-Peer-Token`. A client that sends the
/// header without the token is refused (`forwarded_refused`), so it cannot
/// skip the rate limit or the forwarding rules by claiming to be a peer.
fn forwarded_by_peer(node: &Node, request: &Request) -> Result<bool, ApiError> {
    if !request.headers().contains_key(FORWARDED_HEADER) {
        return Ok(false);
    }
    let presented = request.headers().get(PEER_TOKEN_HEADER).and_then(|v| v.to_str().ok());
    match &node.config.peer_token {
        Some(token) if presented == Some(token.as_str()) => Ok(true),
        _ => Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!("{FORWARDED_HEADER} is for peers: it needs the peer token in {PEER_TOKEN_HEADER}"),
        )),
    }
}

/// Header carrying the client's remaining time budget, in milliseconds.
pub const DEADLINE_HEADER: &str = "x-phalanx-deadline-ms";
/// Header giving the priority (0..=9) of new work before its body is read.
pub const PRIORITY_HEADER: &str = "x-phalanx-priority";
/// Header naming the client for per-client rate limits.
pub const CLIENT_HEADER: &str = "x-phalanx-client";

/// In-flight slots by priority: the first thing a request meets, from its
/// head alone, before routing, the router's layers, authentication and its
/// body (`listener::Gate`), so that refusing new work costs the node as little
/// as possible (a prepared answer, no route matched, no layer run) and never
/// waits behind admitted work. A forwarded request takes a slot here too: the
/// leader bounds the work that followers send it, by the priority the client
/// announced. (A request refused here is counted in
/// `phalanx_http_requests_total` and `phalanx_refused_overload_total`, not in
/// the request-duration histogram.)
pub fn door(node: Node_) -> crate::listener::Gate {
    Arc::new(move |method, uri, headers| {
        // A bound on requests being served at once (long-polls aside): past it the
        // node answers 429 at once instead of queueing work it cannot finish soon.
        // Only new work is bounded this way: completes, failures, extensions and
        // heartbeats finish work already admitted, and refusing them would waste it.
        let path = uri.path();
        let new_work = method == Method::POST && (path == "/v1/tasks" || path == "/v1/tasks/batch");
        if !new_work {
            return Ok(None);
        }
        // The priority header lets the door shed the lowest classes first.
        let priority = match headers.get(PRIORITY_HEADER).map(|v| v.to_str().ok().and_then(|v| v.parse::<u8>().ok())) {
            None => 5u8,
            Some(Some(priority)) if priority <= 9 => priority,
            Some(_) => {
                node.stats.http_requests.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::invalid(format!("{PRIORITY_HEADER} must be 0..=9")).into_response());
            }
        };
        // The bound follows the delay in the proposal queue (`AdaptiveLimit`).
        match node.admission_limit.try_admit(priority) {
            Some(slot) => Ok(Some(Box::new(slot))),
            None => {
                node.stats.http_requests.fetch_add(1, Ordering::Relaxed);
                node.stats.refused_overload.fetch_add(1, Ordering::Relaxed);
                Err(crate::error::door_refusal(priority))
            }
        }
    })
}

/// Per-client rate limit and request deadline. A forwarded request is not
/// rate-limited again (the node that received it did that).
async fn admit(State(node): State<Node_>, request: Request, next: Next) -> Response {
    let now = Instant::now();
    let forwarded = match forwarded_by_peer(&node, &request) {
        Ok(forwarded) => forwarded,
        Err(error) => return error.into_response(),
    };
    if !forwarded {
        let client = match request.headers().get(CLIENT_HEADER).and_then(|v| v.to_str().ok()) {
            Some(name) => name.chars().take(128).collect::<String>(),
            None => request
                .extensions()
                .get::<axum::extract::ConnectInfo<crate::listener::PeerAddr>>()
                .map(|info| info.0 .0.ip().to_string())
                .unwrap_or_default(),
        };
        if let Err(wait) = node.rate_limiter.check(&client, now) {
            node.stats.refused_overload.fetch_add(1, Ordering::Relaxed);
            let message =
                format!("client {client:?} is over its rate limit ({} requests/s)", node.config.client_rate_per_second);
            return ApiError::overloaded(ErrorCode::RateLimited, message, wait.as_millis() as u64 + 1).into_response();
        }
    }
    let deadline =
        match request.headers().get(DEADLINE_HEADER).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok())) {
            None => None,
            Some(None) => {
                return ApiError::invalid(format!("{DEADLINE_HEADER} must be a whole number of milliseconds"))
                    .into_response()
            }
            Some(Some(0)) => {
                return ApiError::unavailable(
                    ErrorCode::DeadlineExceeded,
                    "the request arrived with no time left; nothing was done",
                    0,
                )
                .into_response()
            }
            Some(Some(ms)) => Some(now + Duration::from_millis(ms)),
        };
    crate::admission::DEADLINE.scope(deadline, next.run(request)).await
}

fn wants_stale(request: &Request) -> bool {
    request.method() == Method::GET
        && request.uri().query().is_some_and(|q| q.split('&').any(|pair| pair == "stale=true"))
}

async fn route_to_leader(State(node): State<Node_>, request: Request, next: Next) -> Response {
    // A node that cannot make progress says so at once, so clients move on
    // instead of waiting out a write that cannot commit here. A leader
    // handing leadership over (stalled, or its clock off) serves nothing
    // either: each write or read it served would reach the followers as a
    // leader's message and keep them from electing another.
    let handing_over =
        || node.stepping_down.load(Ordering::Relaxed).then(|| "it is handing leadership over".to_string());
    if let Some(why) = node.stall().or_else(handing_over) {
        let leader = node.leader().filter(|(id, _)| *id != node.id()).map(|(_, addr)| addr);
        return ApiError::unavailable(ErrorCode::NotReady, format!("this node cannot make progress: {why}"), 200)
            .with_leader_hint(leader)
            .into_response();
    }
    let forwarded = match forwarded_by_peer(&node, &request) {
        Ok(forwarded) => forwarded,
        Err(error) => return error.into_response(),
    };
    if wants_stale(&request) {
        // Every answer of a stale read is labelled, a 404 included: a client
        // must be able to tell a lagging node from a missing task.
        let mut response = next.run(request).await;
        response.headers_mut().insert(STALE_HEADER, HeaderValue::from_static("true"));
        return response;
    }
    if forwarded {
        return next.run(request).await;
    }
    // During an election the request waits here, briefly, for the new
    // leader (perhaps this node) instead of sending the client away.
    await_leader(&node).await;
    if node.is_leader() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, node.config.request_bytes_max).await {
        Ok(body) => body,
        Err(_) => return ApiError::new(ErrorCode::TooLarge, "request body too large").into_response(),
    };
    let mut answer = forward(&node, &parts, body.clone()).await;
    // Nothing was sent: once another leader is known (a dead leader refuses
    // connections long before its successor is elected), the same request
    // goes there, within the client's deadline.
    if let Err(ForwardRefused { nothing_sent_to: Some((leader_id, term)), .. }) = &answer {
        let (leader_id, term) = (*leader_id, *term);
        let budget = leader_wait_budget(Duration::from_millis(50));
        if tokio::time::timeout(budget, leadership_moved(&node, leader_id, term)).await.is_ok() {
            await_leader(&node).await;
            if node.is_leader() {
                return next.run(Request::from_parts(parts, axum::body::Body::from(body))).await;
            }
            if node.leader().is_some_and(|(id, _)| id != leader_id) {
                answer = forward(&node, &parts, body).await;
            }
        }
    }
    match answer {
        Ok(response) => response,
        Err(refused) => refused.error.into_response(),
    }
}

/// Why a forward failed; `nothing_sent_to` names the leader (and its term)
/// that could not be reached at all.
struct ForwardRefused {
    error: ApiError,
    nothing_sent_to: Option<(u64, u64)>,
}

impl From<ApiError> for ForwardRefused {
    fn from(error: ApiError) -> ForwardRefused {
        ForwardRefused { error, nothing_sent_to: None }
    }
}

/// How long a request may still wait here for the leadership: at most
/// `LEADER_WAIT_MS_MAX`, and never past its deadline less `margin` (the time
/// to answer in).
fn leader_wait_budget(margin: Duration) -> Duration {
    let budget = Duration::from_millis(LEADER_WAIT_MS_MAX);
    match crate::admission::current_deadline() {
        Some(deadline) => budget.min(deadline.saturating_duration_since(Instant::now()).saturating_sub(margin)),
        None => budget,
    }
}

/// How long a follower tries to connect to the leader. Past it (or on a
/// refused connection) nothing was sent, and the client hears
/// `leader_unreachable`, which promises that nothing was done.
pub const FORWARD_CONNECT_TIMEOUT_MS: u64 = 250;

/// Copies onto a forwarded request the client's headers that the leader
/// needs. The one place that decides what a forward carries.
fn forward_headers(incoming: &HeaderMap, mut outgoing: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    for name in ["authorization", "content-type", PRIORITY_HEADER, "prefer", TRACEPARENT_HEADER] {
        if let Some(value) = incoming.get(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    outgoing
}

/// How long a request may wait on a node that knows no leader (an election
/// is under way), at most; the client's deadline shortens it.
const LEADER_WAIT_MS_MAX: u64 = 1_000;

/// Waits until this node knows a leader, for at most `LEADER_WAIT_MS_MAX`
/// and never past the request's deadline (less a margin to answer in).
async fn await_leader(node: &Node) -> Option<(u64, String)> {
    if let Some(leader) = node.leader() {
        return Some(leader);
    }
    let budget = leader_wait_budget(Duration::from_millis(20));
    let mut metrics = node.raft.server_metrics();
    // The guard `wait_for` returns is dropped at once: it must not live across an await.
    let _ =
        tokio::time::timeout(budget, async { metrics.wait_for(|m| m.current_leader.is_some()).await.is_ok() }).await;
    node.leader()
}

/// Resolves when this node's view of the leadership moves away from
/// `leader_id` at `term`: another leader, or an election under way (a
/// follower that stops hearing the leader's keep-alives campaigns, or votes
/// for another node that does).
async fn leadership_moved(node: &Node, leader_id: u64, term: u64) {
    let mut metrics = node.raft.server_metrics();
    // The guard `wait_for` returns is dropped at once: it must not live across an await.
    let stopped = metrics
        .wait_for(|metrics| metrics.current_leader != Some(leader_id) || metrics.vote.leader_id().term != term)
        .await
        .is_err();
    if stopped {
        // Raft has shut down: the node is stopping and the forward ends with it.
        std::future::pending::<()>().await;
    }
}

/// Sends the request to the leader and relays its answer. The forward is
/// bounded by a short connect timeout and by leadership: if the node learns
/// of another leader (or an election) while the leader has not answered, the
/// forward is abandoned and the client told at once, with the new leader.
async fn forward(
    node: &Node,
    parts: &axum::http::request::Parts,
    body: axum::body::Bytes,
) -> Result<Response, ForwardRefused> {
    let Some((leader_id, leader_addr)) = node.leader() else {
        return Err(ApiError::unavailable(
            ErrorCode::NoLeader,
            "no leader is known: an election may be under way",
            200,
        )
        .into());
    };
    let term = node.raft.server_metrics().borrow().vote.leader_id().term;
    node.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let wait = if path.ends_with("/poll") { POLL_WAIT_MS_MAX } else { 0 };
    let mut timeout = Duration::from_millis(node.config.write_timeout_ms + wait + 2_000);
    let mut outgoing = node
        .http
        .request(parts.method.clone(), node.peer_url(&leader_addr, path))
        .header(FORWARDED_HEADER, node.id().to_string())
        .header(PEER_TOKEN_HEADER, node.config.peer_token.clone().unwrap_or_default())
        .body(body);
    outgoing = forward_headers(&parts.headers, outgoing);
    if let Some(deadline) = crate::admission::current_deadline() {
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        outgoing = outgoing.header(DEADLINE_HEADER, remaining.as_millis().to_string());
        // The leader refuses what it cannot propose in time; past the
        // client's own budget an answer would find nobody waiting anyway.
        timeout = timeout.min(remaining + Duration::from_millis(500));
    }
    let outgoing = outgoing.timeout(timeout);
    let exchange = async {
        let answer = outgoing.send().await?;
        let status = answer.status();
        let headers = answer.headers().clone();
        let bytes = answer.bytes().await?;
        Ok::<_, reqwest::Error>((status, headers, bytes))
    };
    let result = tokio::select! {
        result = exchange => result,
        () = leadership_moved(node, leader_id, term) => {
            // Answered once the new leader is known (or the wait runs out),
            // so the client goes straight to it.
            let hint = await_leader(node).await.map(|(_, addr)| addr);
            let message = format!(
                "leader {leader_id} at {leader_addr} did not answer before the leadership moved; \
                 the request was sent and may still commit"
            );
            let retry_after_ms = if hint.is_some() { 0 } else { 100 };
            return Err(ApiError::unavailable(ErrorCode::LeaderChanged, message, retry_after_ms).with_leader_hint(hint).into());
        }
    };
    let (status, headers, bytes) = result.map_err(|error| {
        if error.is_connect() {
            // Refused, or no connection within FORWARD_CONNECT_TIMEOUT_MS: the
            // request never left this node.
            let error = ApiError::unavailable(
                ErrorCode::LeaderUnreachable,
                format!("leader {leader_id} at {leader_addr} could not be reached; nothing was sent: {error}"),
                50,
            );
            ForwardRefused { error, nothing_sent_to: Some((leader_id, term)) }
        } else {
            ApiError::unavailable(
                ErrorCode::Unavailable,
                format!("leader {leader_id} at {leader_addr} did not answer; the request may still commit: {error}"),
                200,
            )
            .with_leader_hint(Some(leader_addr.clone()))
            .into()
        }
    })?;
    let mut response = (status, bytes).into_response();
    for name in ["content-type", "retry-after", STALE_HEADER, PREFERENCE_APPLIED_HEADER] {
        if let Some(value) = headers.get(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

// ---- helpers ----

/// Binds the outcome a command answers, or answers `500 internal` (and logs)
/// if the state machine answered another: a mismatch is a bug, and a bug in
/// one handler must not take the replica down.
macro_rules! expect_outcome {
    ($outcome:ident, $pattern:pat) => {
        let $pattern = $outcome else {
            return Err(ApiError::unexpected(stringify!($pattern), &$outcome));
        };
    };
}

fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes =
        body.map_err(|rejection| ApiError::new(ErrorCode::TooLarge, format!("request body refused: {rejection}")))?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|error| {
        let code = if error.is_data() { ErrorCode::Invalid } else { ErrorCode::MalformedJson };
        ApiError::new(code, format!("request body: {error}"))
    })
}

/// A query string's `key=value` pairs, percent-decoded (`%3A` is `:`; `+`
/// is a space, as in forms). A pair that does not decode to UTF-8 is `400 invalid`.
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    fn decode(text: &str) -> Result<String, ApiError> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' => {
                    let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                    let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                        ApiError::invalid(format!("query {text:?}: % must be followed by two hex digits"))
                    })?;
                    out.push(byte);
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                byte => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| ApiError::invalid(format!("query {text:?} is not UTF-8 once decoded")))
    }
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::invalid(format!("task id {text:?} is not a number")))
}

/// Refuses what applying would refuse (`check` runs the state machine's own
/// checks), so that a refusal costs no log entry. A refusal is trusted only
/// after a read index: a leader still applying entries committed before it
/// took over must not refuse what the log already allows (a result for a task
/// it has not applied yet). When leadership cannot be confirmed the log decides.
async fn refuse_early(
    node: &Node,
    check: impl Fn(&phalanx_core::State) -> Vec<Result<(), phalanx_core::Error>>,
) -> Vec<Result<(), phalanx_core::Error>> {
    let judge = || check(&node.shared.data.read().expect("state lock").state);
    let first = judge();
    if first.iter().all(Result::is_ok) {
        return first;
    }
    let barrier = Duration::from_millis(node.config.write_timeout_ms);
    match tokio::time::timeout(barrier, node.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => judge(),
        _ => first.iter().map(|_| Ok(())).collect(),
    }
}

/// `refuse_early` for one command.
async fn check_command(node: &Node, command: &Command) -> Result<(), ApiError> {
    let mut judged = refuse_early(node, |state| vec![state.check(command)]).await;
    judged.pop().expect("one judgement").map_err(ApiError::from)
}

/// `refuse_early` for the tasks of a submit, one judgement per task.
async fn check_new_tasks(node: &Node, tasks: &[NewTask]) -> Vec<Result<(), phalanx_core::Error>> {
    refuse_early(node, |state| tasks.iter().map(|task| state.check_new_task(task)).collect()).await
}

/// Proposes a command the applied state does not refuse, and waits for its
/// outcome.
async fn propose(node: &Node, command: Command) -> Result<(Outcome, u64), ApiError> {
    check_command(node, &command).await?;
    let deadline = crate::admission::current_deadline();
    let (outcome, index) =
        node.proposer.propose_by(command, deadline).await.map_err(|error| proposal_error(node, error))?;
    match outcome {
        Outcome::Refused { error } => Err(error.into()),
        outcome => Ok((outcome, index)),
    }
}

/// A proposal that did not get an outcome, as the client hears it.
fn proposal_error(node: &Node, error: proposer::Error) -> ApiError {
    match error {
        proposer::Error::NotLeader { leader_addr, .. } => {
            ApiError::unavailable(ErrorCode::NotLeader, "this node is no longer the leader", 100)
                .with_leader_hint(leader_addr)
        }
        proposer::Error::Overloaded(_) => {
            node.stats.refused_overload.fetch_add(1, Ordering::Relaxed);
            ApiError::overloaded(ErrorCode::Overloaded, error.to_string(), 100)
        }
        proposer::Error::Timeout(_) => ApiError::unavailable(ErrorCode::Timeout, error.to_string(), 500),
        proposer::Error::DeadlineExceeded => ApiError::unavailable(ErrorCode::DeadlineExceeded, error.to_string(), 100),
        proposer::Error::Fatal(_) => ApiError::unavailable(ErrorCode::Unavailable, error.to_string(), 1000),
    }
}

/// Waits until this node has applied everything the leader had committed
/// when the read arrived (Raft §6.4 read index), unless `stale=true`.
async fn read_barrier(node: &Node, query: &Option<String>) -> Result<bool, ApiError> {
    let stale = query.as_deref().is_some_and(|q| q.split('&').any(|pair| pair == "stale=true"));
    if stale {
        return Ok(true);
    }
    node.raft.ensure_linearizable().await.map_err(|error| {
        ApiError::unavailable(
            ErrorCode::NotLeader,
            format!("cannot confirm leadership for a linearizable read: {error}"),
            100,
        )
        .with_leader_hint(node.leader().map(|(_, addr)| addr))
    })?;
    Ok(false)
}

fn mark_stale(mut response: Response, stale: bool) -> Response {
    if stale {
        response.headers_mut().insert(STALE_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// A task's state as the contract names it.
pub fn api_state(state: phalanx_core::TaskState) -> api::TaskState {
    use phalanx_core::TaskState as S;
    match state {
        S::Pending => api::TaskState::Pending,
        S::Leased => api::TaskState::Leased,
        S::Succeeded => api::TaskState::Succeeded,
        S::Failed => api::TaskState::Failed,
        S::Cancelled => api::TaskState::Cancelled,
        S::Dead => api::TaskState::Dead,
        S::Paused => api::TaskState::Paused,
    }
}

pub fn api_usage(usage: &phalanx_core::Usage) -> api::Usage {
    api::Usage { tokens_in: usage.tokens_in, tokens_out: usage.tokens_out, cost: usage.cost }
}

fn core_usage(usage: &api::Usage) -> phalanx_core::Usage {
    phalanx_core::Usage { tokens_in: usage.tokens_in, tokens_out: usage.tokens_out, cost: usage.cost }
}

fn api_budget(budget: &phalanx_core::Budget) -> api::Budget {
    api::Budget { tokens_max: budget.tokens_max, cost_max: budget.cost_max }
}

fn core_budget(budget: &api::Budget) -> phalanx_core::Budget {
    phalanx_core::Budget { tokens_max: budget.tokens_max, cost_max: budget.cost_max }
}

fn api_pause(pause: &phalanx_core::Pause) -> api::Pause {
    use phalanx_core::PauseCause as C;
    let cause = match pause.cause {
        C::Budget => api::PauseCause::Budget,
        C::Operator => api::PauseCause::Operator,
        C::AttemptsExhausted => api::PauseCause::AttemptsExhausted,
    };
    api::Pause { cause, reason: pause.reason.clone(), since_ms: pause.since_ms }
}

pub fn api_waiting_on(waiting: phalanx_core::WaitingOn) -> api::WaitingOn {
    api::WaitingOn { key: waiting.key, limit: waiting.limit.as_str().to_string(), rule: waiting.rule }
}

/// A task as the API shows it (`phalanx_api::Task`), borrowing from the
/// state: payload and result are written as the JSON text they are stored as.
pub fn view(task: &Task) -> api::TaskRef<'_> {
    api::TaskRef {
        id: task.id,
        queue: &task.queue,
        payload: api::raw_json(&task.payload),
        priority: task.priority,
        state: api_state(task.state),
        created_ms: task.created_ms,
        updated_ms: task.updated_ms,
        deadline_ms: task.deadline_ms,
        max_attempts: task.max_attempts,
        attempts: task.attempts,
        idempotency_key: task.idempotency_key(),
        parent_id: task.parent_id(),
        conversation_id: task.conversation_id(),
        hop_count: task.hop_count(),
        trail: task
            .trail()
            .iter()
            .map(|step| api::TrailStep {
                queue: step.queue.clone(),
                agent_id: step.agent_id.clone(),
                payload_hash: step.payload_hash,
            })
            .collect(),
        lease: task.lease.as_ref().map(|lease| api::TaskLease {
            agent_id: lease.agent_id.clone(),
            agent_epoch: lease.agent_epoch,
            fence: lease.fence,
            valid_until_ms: lease.valid_until_ms,
            progress_ms: lease.progress_ms,
            other: Default::default(),
        }),
        last_fence: task.last_fence,
        result: task.result().map(api::raw_json),
        error: task.error(),
        dead_reason: task.dead_reason(),
        superseded_count: task.superseded_count(),
        parent_fence: task.parent_fence(),
        concurrency_key: task.concurrency_key(),
        cost_estimate: task.cost_estimate(),
        budget: task.budget().map(api_budget),
        usage: api_usage(task.usage()),
        pause: task.pause().map(api_pause),
        replays: task.replays(),
        traceparent: task.traceparent(),
        waiting_on: None,
    }
}

fn api_child(child: &phalanx_core::task::Child) -> api::Child {
    api::Child {
        task_id: child.task_id,
        queue: child.queue.clone(),
        payload_hash: child.payload_hash,
        state: api_state(child.state),
        parent_fence: child.parent_fence,
        adopted_fence: child.adopted_fence,
    }
}

fn task_response(task: &Task) -> Response {
    Json(view(task)).into_response()
}

// ---- tasks ----

/// The trace of one task of a submit: the caller's span (from the body's
/// `traceparent`, else the header's, else, for a delegation, the parent
/// task's stored one), and the node's submit span, a child of it (or the
/// root of a new trace), whose context the task stores.
#[derive(Clone, Copy, Debug)]
struct SubmitTrace {
    caller: Option<TraceContext>,
    span: TraceContext,
}

/// The `traceparent` header, if one came: `400 invalid` if it is not one
/// well-formed value.
fn header_traceparent(headers: &HeaderMap) -> Result<Option<TraceContext>, ApiError> {
    let mut values = headers.get_all(TRACEPARENT_HEADER).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::invalid("traceparent header: send one, not several"));
    }
    let text = value.to_str().map_err(|_| ApiError::invalid("traceparent header: not ASCII"))?;
    TraceContext::parse(text).map(Some).map_err(|why| ApiError::invalid(format!("traceparent header {why}")))
}

/// A submit's task as the state machine takes it, checked as far as it
/// can be without the state, and its trace.
fn new_task(
    request: api::SubmitRequest,
    header: Option<TraceContext>,
    node: &Node,
) -> Result<(NewTask, SubmitTrace), ApiError> {
    {
        let body_context = match &request.traceparent {
            Some(text) => {
                Some(TraceContext::parse(text).map_err(|why| ApiError::invalid(format!("traceparent {why}")))?)
            }
            None => None,
        };
        let mut task = NewTask {
            queue: request.queue,
            payload: request.payload.to_string(),
            priority: request.priority.unwrap_or(5),
            deadline_ms: request.deadline_ms,
            max_attempts: request.max_attempts.unwrap_or(3),
            idempotency_key: request.idempotency_key,
            parent_id: request.parent_id,
            parent_fence: request.parent_fence,
            conversation_id: request.conversation_id,
            concurrency_key: request.concurrency_key,
            cost_estimate: request.cost_estimate,
            budget: request.budget.as_ref().map(core_budget),
            traceparent: None,
        };
        let (limits, parent_context) = {
            let data = node.shared.data.read().expect("state lock");
            // A delegation without a context of its own joins its parent's
            // trace. The parent's context never changes once stored, so
            // reading it here, before the proposal, is as good as in apply.
            let parent_context = match (body_context.or(header), task.parent_id) {
                (None, Some(parent_id)) => data.state.task(parent_id).and_then(stored_context),
                _ => None,
            };
            (data.state.limits().clone(), parent_context)
        };
        let caller = body_context.or(header).or(parent_context);
        let span = caller.map_or_else(TraceContext::root, |caller| caller.child());
        task.traceparent = Some(span.header());
        // Stateless checks first, so a malformed task is refused without a read index.
        phalanx_core::state::validate_new_task(&task, &limits)?;
        Ok((task, SubmitTrace { caller, span }))
    }
}

/// The span of one task of a submit: `phalanx.submit`, or
/// `phalanx.delegation` for a child, from `start` to now.
fn submit_span(
    node: &Node,
    start: u64,
    task: &NewTask,
    trace: &SubmitTrace,
    answer: Result<&phalanx_core::command::Submitted, &ApiError>,
) -> Span {
    let mut attributes = vec![
        ("phalanx.node.id", node.id().into()),
        ("phalanx.queue", task.queue.as_str().into()),
        ("phalanx.priority", u32::from(task.priority).into()),
    ];
    if let Some(parent_id) = task.parent_id {
        attributes.push(("phalanx.parent.id", parent_id.into()));
    }
    if let Some(key) = &task.idempotency_key {
        attributes.push(("phalanx.idempotency_key", key.as_str().into()));
    }
    if let Ok(submitted) = answer {
        attributes.push(("phalanx.task.id", submitted.task_id.into()));
        attributes.push(("phalanx.deduplicated", submitted.deduplicated.into()));
    }
    finished_span(
        if task.parent_id.is_some() { "phalanx.delegation" } else { "phalanx.submit" },
        trace.span,
        trace.caller.map(|caller| caller.span_id),
        start,
        attributes,
        answer.err().map(|error| error.code.as_str().to_string()),
    )
}

/// A span that ends now, with its outcome as an attribute.
fn finished_span(
    name: &'static str,
    context: TraceContext,
    parent_span_id: Option<u64>,
    start: u64,
    mut attributes: Vec<(&'static str, AttributeValue)>,
    error: Option<String>,
) -> Span {
    attributes.push(("phalanx.outcome", error.as_deref().unwrap_or("ok").into()));
    Span {
        name,
        context,
        parent_span_id,
        start_unix_nanos: start,
        end_unix_nanos: crate::trace::unix_nanos(),
        attributes,
        error,
    }
}

/// The context a span about `task_id` joins: the task's stored one (a new
/// trace for a task without one, or one this node does not know).
fn task_trace(node: &Node, task_id: u64) -> (Option<String>, Option<TraceContext>) {
    let data = node.shared.data.read().expect("state lock");
    let task = data.state.task(task_id);
    let context = task.and_then(stored_context);
    (task.map(|task| task.queue.clone()), context)
}

/// The span of a report on a task (complete, fail, extend): a child of the
/// task's stored context.
#[allow(clippy::too_many_arguments)]
fn report_span(
    node: &Node,
    name: &'static str,
    start: u64,
    task_id: u64,
    fence: u64,
    usage: Option<&api::Usage>,
    trace: (Option<String>, Option<TraceContext>),
    error: Option<&ApiError>,
) -> Span {
    let (queue, parent) = trace;
    let mut attributes = vec![
        ("phalanx.node.id", node.id().into()),
        ("phalanx.task.id", task_id.into()),
        ("phalanx.fence", fence.into()),
    ];
    if let Some(queue) = queue {
        attributes.push(("phalanx.queue", queue.into()));
    }
    if let Some(usage) = usage {
        // OpenTelemetry GenAI semantic conventions; cost has no GenAI name.
        attributes.push(("gen_ai.usage.input_tokens", usage.tokens_in.into()));
        attributes.push(("gen_ai.usage.output_tokens", usage.tokens_out.into()));
        attributes.push(("phalanx.usage.cost", usage.cost.into()));
    }
    let context = parent.map_or_else(TraceContext::root, |parent| parent.child());
    finished_span(
        name,
        context,
        parent.map(|parent| parent.span_id),
        start,
        attributes,
        error.map(|error| error.code.as_str().to_string()),
    )
}

/// Counts one submitted task's outcome for the policy guard: accepted, or
/// refused by what the policy allows. A `429 overloaded` or `rate_limited`
/// says the node is busy, not that the policy refuses, and a 5xx says the
/// outcome is unknown: neither counts.
fn count_submit(node: &Node, refusal: Option<(StatusCode, &ErrorCode)>) {
    match refusal {
        None => node.stats.submits_accepted.fetch_add(1, Ordering::Relaxed),
        Some((status, code))
            if status.is_client_error() && !matches!(code, ErrorCode::Overloaded | ErrorCode::RateLimited) =>
        {
            node.stats.submits_refused.fetch_add(1, Ordering::Relaxed)
        }
        Some(_) => 0,
    };
}

async fn submit(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    let answer = submit_task(&node, &headers, body).await;
    count_submit(&node, answer.as_ref().err().map(|error| (error.status, &error.code)));
    answer
}

/// Refuses new work (submits, delegations, registrations) while the disk is
/// under its watermark; finishing work and reads go on, so the fleet drains.
/// `body` is what the work will write, counted against the free space until
/// the next measurement.
fn check_disk(node: &Node, body: &Body) -> Result<(), ApiError> {
    if let Some(why) = node.disk_problem() {
        return Err(ApiError::disk_full(format!("new work refused: {why}")));
    }
    let bytes = body.as_ref().map_or(0, |b| b.len() as u64);
    node.disk.written_since_measured.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

async fn submit_task(node: &Node_, headers: &HeaderMap, body: Body) -> ApiResult {
    let start = node.tracer.start();
    check_disk(node, &body)?;
    let header = header_traceparent(headers)?;
    let (task, trace) = new_task(parse::<api::SubmitRequest>(body)?, header, node)?;
    // The task is kept for the span only when spans are recorded.
    let spanned = start.map(|start| (start, task.clone()));
    let proposed_traceparent = task.traceparent.clone();
    let answer = async {
        check_new_tasks(node, std::slice::from_ref(&task)).await.pop().expect("one judgement")?;
        let (outcome, _) = propose(node, Command::Submit { tasks: vec![task] }).await?;
        expect_outcome!(outcome, Outcome::Submitted { mut results });
        Ok::<_, ApiError>(results.pop().expect("one result per task")?)
    }
    .await;
    if let Some((start, task)) = spanned {
        node.tracer.record(submit_span(node, start, &task, &trace, answer.as_ref()));
    }
    let submitted = answer?;
    // A new task keeps the context proposed; a deduplicated one, its first submit's.
    let traceparent = match submitted.deduplicated {
        false => proposed_traceparent,
        true => stored_traceparents(node, &[submitted.task_id]).pop().flatten(),
    };
    let body = submitted_body(&submitted, traceparent);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The stored `traceparent` of each task: the one a submit made, or, for a
/// deduplicated submit, the one the first submit made.
fn stored_traceparents(node: &Node, task_ids: &[u64]) -> Vec<Option<String>> {
    let data = node.shared.data.read().expect("state lock");
    task_ids.iter().map(|id| data.state.task(*id).and_then(|task| task.traceparent().map(Cow::into_owned))).collect()
}

/// What a submit created or found.
fn submitted_body(submitted: &phalanx_core::command::Submitted, traceparent: Option<String>) -> api::Submitted {
    api::Submitted {
        task_id: submitted.task_id,
        deduplicated: submitted.deduplicated,
        adopted: submitted.adopted,
        traceparent,
    }
}

async fn submit_batch(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    let answer = submit_tasks(&node, &headers, body).await;
    if let Err(error) = &answer {
        count_submit(&node, Some((error.status, &error.code)));
    }
    answer
}

/// A batch; each task's outcome is counted for the policy guard on its own.
async fn submit_tasks(node: &Node_, headers: &HeaderMap, body: Body) -> ApiResult {
    let start = node.tracer.start();
    check_disk(node, &body)?;
    let header = header_traceparent(headers)?;
    let batch = parse::<api::BatchRequest>(body)?;
    let batch_max = node.shared.data.read().expect("state lock").state.limits().batch_tasks_max;
    if batch.tasks.is_empty() || batch.tasks.len() > batch_max {
        return Err(ApiError::invalid(format!("tasks: a batch holds 1..={batch_max} tasks")));
    }
    // Each task stands on its own: one refused (malformed, or refused by the
    // state) is answered in its slot, and only the others are proposed.
    let mut slots: Vec<Result<usize, ApiError>> = Vec::new();
    let mut valid = Vec::new();
    let mut traces = Vec::new();
    for task in batch.tasks {
        match new_task(task, header, node) {
            Ok((task, trace)) => {
                slots.push(Ok(valid.len()));
                valid.push(task);
                traces.push(trace);
            }
            Err(error) => slots.push(Err(error)),
        }
    }
    // The tasks are kept for their spans only when spans are recorded.
    let spanned = start.map(|start| (start, valid.clone()));
    let judged = check_new_tasks(node, &valid).await;
    let mut proposed = Vec::new();
    // For each valid task: its index among the proposed ones, or its refusal.
    let mut placed: Vec<Result<usize, phalanx_core::Error>> = Vec::new();
    for (task, judgement) in valid.into_iter().zip(judged) {
        placed.push(judgement.map(|()| {
            proposed.push(task);
            proposed.len() - 1
        }));
    }
    let mut results = Vec::new();
    if !proposed.is_empty() {
        let proposal = propose(node, Command::Submit { tasks: proposed }).await;
        let outcome = match proposal {
            Ok((outcome, _)) => outcome,
            Err(error) => {
                // The whole batch's answer: each valid task's span says so.
                if let Some((start, valid)) = &spanned {
                    for (task, trace) in valid.iter().zip(&traces) {
                        node.tracer.record(submit_span(node, *start, task, trace, Err(&error)));
                    }
                }
                return Err(error);
            }
        };
        expect_outcome!(outcome, Outcome::Submitted { results: submitted });
        results = submitted;
    }
    // Each valid task's answer, in order: what was created or found, or why not.
    let answers: Vec<Result<phalanx_core::command::Submitted, ApiError>> = placed
        .iter()
        .map(|placement| match placement {
            Ok(j) => results[*j].clone().map_err(ApiError::from),
            Err(error) => Err(ApiError::from(error.clone())),
        })
        .collect();
    if let Some((start, valid)) = &spanned {
        for ((task, trace), answer) in valid.iter().zip(&traces).zip(&answers) {
            node.tracer.record(submit_span(node, *start, task, trace, answer.as_ref()));
        }
    }
    let created: Vec<u64> = answers.iter().filter_map(|answer| answer.as_ref().ok().map(|s| s.task_id)).collect();
    let mut traceparents = stored_traceparents(node, &created).into_iter();
    let mut answers = answers.into_iter();
    let rendered: Vec<api::BatchItem> = slots
        .into_iter()
        .map(|slot| {
            let refused = match slot {
                Ok(_) => match answers.next().expect("one answer per valid task") {
                    Ok(submitted) => {
                        count_submit(node, None);
                        let traceparent = traceparents.next().flatten();
                        return api::BatchItem::Submitted(submitted_body(&submitted, traceparent));
                    }
                    Err(error) => error,
                },
                Err(error) => error,
            };
            count_submit(node, Some((refused.status, &refused.code)));
            api::BatchItem::Refused { error: api::Refusal { code: refused.code, message: refused.message } }
        })
        .collect();
    Ok(Json(api::BatchAnswer { results: rendered }).into_response())
}

async fn get_task(State(node): State<Node_>, Path(id): Path<String>, RawQuery(query): RawQuery) -> ApiResult {
    let id = parse_id(&id)?;
    let stale = read_barrier(&node, &query).await?;
    let data = node.shared.data.read().expect("state lock");
    let task = data.state.task(id).ok_or(phalanx_core::Error::TaskNotFound { task_id: id })?;
    let view = api::TaskRef { waiting_on: data.state.waiting_on(id).map(api_waiting_on), ..view(task) };
    Ok(mark_stale(Json(view).into_response(), stale))
}

async fn list_tasks(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let (mut queue, mut state, mut after, mut limit) = (None, None, 0u64, 100usize);
    for (key, value) in query_pairs(query.as_deref())? {
        let value = value.as_str();
        match key.as_str() {
            "queue" => queue = Some(value.to_string()),
            "state" => {
                state = Some(phalanx_core::TaskState::parse(value).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "state {value:?}: use pending, leased, succeeded, failed, cancelled, dead or paused"
                    ))
                })?)
            }
            "after" => after = value.parse().map_err(|_| ApiError::invalid(format!("after {value:?}")))?,
            "limit" => {
                limit = value.parse().map_err(|_| ApiError::invalid(format!("limit {value:?}")))?;
                if limit == 0 || limit > LIST_LIMIT_MAX {
                    return Err(ApiError::invalid(format!("limit must be 1..={LIST_LIMIT_MAX}")));
                }
            }
            "stale" => {}
            other => return Err(ApiError::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    if let Some(queue) = &queue {
        validate_name("queue", queue, 1024)?;
    }
    let stale = read_barrier(&node, &query).await?;
    let bytes_max = node.config.list_bytes_max;
    // Copy what the answer needs under the lock (a memory copy, bounded by
    // `list_bytes_max`), then let the lock go: serialising is slower, and
    // applying the log waits for the lock.
    let tasks = {
        let data = node.shared.data.read().expect("state lock");
        let found = data.state.tasks(queue.as_deref(), state, after, limit);
        let mut copied = Vec::new();
        let mut bytes = 0;
        for task in &found {
            if !copied.is_empty() && bytes + task_bytes_estimate(task) > bytes_max {
                break;
            }
            bytes += task_bytes_estimate(task);
            copied.push((*task).clone());
        }
        let cut = copied.len() < found.len();
        (copied, cut, found.len() == limit)
    };
    let (tasks, cut, full) = tasks;
    let body =
        tokio::task::spawn_blocking(move || list_answer(&tasks, cut, full, bytes_max)).await.map_err(|error| {
            ApiError::unavailable(ErrorCode::Unavailable, format!("serialising the list failed: {error}"), 100)
        })?;
    Ok(mark_stale(([("content-type", "application/json")], body).into_response(), stale))
}

/// At least the bytes a task takes in a list answer, short of JSON escapes.
fn task_bytes_estimate(task: &Task) -> usize {
    let texts = task.payload.len()
        + task.result().map_or(0, str::len)
        + task.error().map_or(0, str::len)
        + task.dead_reason().map_or(0, str::len);
    // The trail holds a step per hop and one for the root.
    texts + task.queue.len() + (task.hop_count() as usize + 1) * 64 + 400
}

/// `{tasks, next_after, truncated}` of at most `bytes_max` bytes (or the
/// first task alone, when it is larger): the tasks are serialised one by one
/// and the list is cut before the one that would pass the bound. `cut`: the
/// copy under the lock was already cut by bytes; `full`: the query found
/// `limit` tasks, so more may follow.
fn list_answer(tasks: &[Task], mut cut: bool, full: bool, bytes_max: usize) -> Vec<u8> {
    // Room for the tail: `],"next_after":ID,"truncated":false}`.
    const TAIL_BYTES_MAX: usize = 64;
    let mut body = b"{\"tasks\":[".to_vec();
    let mut last = None;
    for task in tasks {
        let text = serde_json::to_vec(&view(task)).expect("a task view serialises");
        if last.is_some() && body.len() + 1 + text.len() + TAIL_BYTES_MAX > bytes_max {
            cut = true;
            break;
        }
        if last.is_some() {
            body.push(b',');
        }
        body.extend_from_slice(&text);
        last = Some(task.id);
    }
    let next_after = if cut || full { last } else { None };
    let tail = json!({"next_after": next_after, "truncated": cut}).to_string();
    body.extend_from_slice(b"],");
    body.extend_from_slice(&tail.as_bytes()[1..]);
    body
}

async fn cancel(State(node): State<Node_>, Path(id): Path<String>) -> ApiResult {
    let task_id = parse_id(&id)?;
    let (outcome, _) = propose(&node, Command::Cancel { task_id }).await?;
    expect_outcome!(outcome, Outcome::Cancelled { task });
    Ok(task_response(&task))
}

/// Whether the client asked for an acknowledgement without the task body
/// (`Prefer: return=minimal`, RFC 7240).
fn wants_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|value| value.split([',', ';']).any(|preference| preference.trim().eq_ignore_ascii_case("return=minimal")))
}

const PREFERENCE_APPLIED_HEADER: &str = "preference-applied";

/// A report's answer: the task, or with `return=minimal` only `{task_id, state}`.
fn report_response(task: &Task, minimal: bool) -> Response {
    if !minimal {
        return task_response(task);
    }
    minimal_response(Json(api::Ack { task_id: task.id, state: api_state(task.state) }).into_response())
}

fn minimal_response(mut response: Response) -> Response {
    response.headers_mut().insert(PREFERENCE_APPLIED_HEADER, HeaderValue::from_static("return=minimal"));
    response
}

async fn complete(State(node): State<Node_>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> ApiResult {
    let start = node.tracer.start();
    let task_id = parse_id(&id)?;
    let body = parse::<api::CompleteRequest>(body)?;
    let command = Command::Complete {
        task_id,
        fence: body.fence,
        result: body.result.to_string(),
        usage: body.usage.as_ref().map(core_usage),
    };
    let trace = start.map(|start| (start, task_trace(&node, task_id)));
    let answer = propose(&node, command).await;
    if let Some((start, trace)) = trace {
        let span = report_span(
            &node,
            "phalanx.complete",
            start,
            task_id,
            body.fence,
            body.usage.as_ref(),
            trace,
            answer.as_ref().err(),
        );
        node.tracer.record(span);
    }
    let (outcome, _) = answer?;
    expect_outcome!(outcome, Outcome::Completed { task });
    Ok(report_response(&task, wants_minimal(&headers)))
}

/// A result of a batch, as its span needs it: (span start, task id, fence, usage).
type ReportedResult = (u64, u64, u64, Option<phalanx_core::Usage>);

/// Many results in one request and one log entry, each judged on its own
/// and answered in its slot: a malformed item, one the state refuses, or one
/// under a stale fence is refused alone. A failure of the proposal itself
/// (no leader, a timeout) answers the whole request, as for a single complete.
async fn complete_many(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Loose {
        results: Vec<Value>,
    }
    let start = node.tracer.start();
    let items = parse::<Loose>(body)?.results;
    let batch_max = node.shared.data.read().expect("state lock").state.limits().batch_tasks_max;
    if items.is_empty() || items.len() > batch_max {
        return Err(ApiError::invalid(format!("results: a batch holds 1..={batch_max} results")));
    }
    // Each slot: the task id when it is known, and the command or the refusal.
    let mut slots: Vec<(Option<u64>, Result<Command, ApiError>)> = items
        .into_iter()
        .map(|item| {
            let task_id = item.get("task_id").and_then(Value::as_u64);
            let command = serde_json::from_value::<api::CompleteItem>(item)
                .map(|item| Command::Complete {
                    task_id: item.task_id,
                    fence: item.fence,
                    result: item.result.to_string(),
                    usage: item.usage.as_ref().map(core_usage),
                })
                .map_err(|error| ApiError::invalid(format!("result: {error}")));
            (task_id, command)
        })
        .collect();
    // What each well-formed result's span needs, taken before the checks
    // (a result they refuse gets a span too), and only when spans are recorded.
    let reported: Vec<Option<ReportedResult>> = slots
        .iter()
        .map(|(_, command)| match (start, command) {
            (Some(start), Ok(Command::Complete { task_id, fence, usage, .. })) => {
                Some((start, *task_id, *fence, *usage))
            }
            _ => None,
        })
        .collect();
    let judged = refuse_early(&node, |state| {
        slots.iter().filter_map(|(_, command)| command.as_ref().ok()).map(|command| state.check(command)).collect()
    })
    .await;
    let mut judged = judged.into_iter();
    for (_, slot) in slots.iter_mut() {
        if slot.is_ok() {
            if let Err(error) = judged.next().expect("one judgement per command") {
                *slot = Err(error.into());
            }
        }
    }
    let proposed: Vec<Command> = slots.iter().filter_map(|(_, command)| command.as_ref().ok().cloned()).collect();
    let mut outcomes = Vec::new().into_iter();
    if !proposed.is_empty() {
        let deadline = crate::admission::current_deadline();
        let (answered, _) =
            node.proposer.propose_all_by(proposed, deadline).await.map_err(|error| proposal_error(&node, error))?;
        outcomes = answered.into_iter();
    }
    let results = slots
        .into_iter()
        .zip(reported)
        .map(|((task_id, slot), reported)| {
            // Each result's span, when spans are recorded: accepted (`refused`
            // None) or refused, with the task's stored trace context.
            let record = |trace, refused: Option<&ApiError>| {
                if let Some((start, task_id, fence, usage)) = &reported {
                    let usage = usage.as_ref().map(api_usage);
                    let span = report_span(
                        &node,
                        "phalanx.complete",
                        *start,
                        *task_id,
                        *fence,
                        usage.as_ref(),
                        trace,
                        refused,
                    );
                    node.tracer.record(span);
                }
            };
            let refused = match slot {
                Ok(_) => match outcomes.next().expect("one outcome per proposed command") {
                    Outcome::Completed { task } => {
                        if reported.is_some() {
                            record((Some(task.queue.clone()), stored_context(&task)), None);
                        }
                        return api::CompleteManyItem::Accepted {
                            task_id: task.id,
                            ok: true,
                            state: api_state(task.state),
                        };
                    }
                    Outcome::Refused { error } => ApiError::from(error),
                    other => ApiError::unexpected("Outcome::Completed", &other),
                },
                Err(error) => error,
            };
            if let Some((_, reported_id, _, _)) = &reported {
                record(task_trace(&node, *reported_id), Some(&refused));
            }
            api::CompleteManyItem::Refused {
                task_id,
                error: api::Refusal { code: refused.code, message: refused.message },
            }
        })
        .collect();
    let response = Json(api::CompleteManyAnswer { results }).into_response();
    // The answer is an acknowledgement per result whatever was asked.
    Ok(if wants_minimal(&headers) { minimal_response(response) } else { response })
}

async fn fail(State(node): State<Node_>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> ApiResult {
    let start = node.tracer.start();
    let task_id = parse_id(&id)?;
    let body = parse::<api::FailRequest>(body)?;
    let retryable = body.retryable.unwrap_or(true);
    let command = Command::Fail {
        task_id,
        fence: body.fence,
        error: body.error,
        retryable,
        usage: body.usage.as_ref().map(core_usage),
    };
    let trace = start.map(|start| (start, task_trace(&node, task_id)));
    let answer = propose(&node, command).await;
    if let Some((start, trace)) = trace {
        let mut span = report_span(
            &node,
            "phalanx.fail",
            start,
            task_id,
            body.fence,
            body.usage.as_ref(),
            trace,
            answer.as_ref().err(),
        );
        span.attributes.push(("phalanx.retryable", retryable.into()));
        node.tracer.record(span);
    }
    let (outcome, _) = answer?;
    expect_outcome!(outcome, Outcome::Failed { task });
    Ok(report_response(&task, wants_minimal(&headers)))
}

async fn extend(State(node): State<Node_>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> ApiResult {
    let start = node.tracer.start();
    let task_id = parse_id(&id)?;
    let body = parse::<api::ExtendRequest>(body)?;
    let lease_ttl_ms = body.lease_ttl_ms.unwrap_or_else(|| default_lease_ttl_ms(&node));
    let trace = start.map(|start| (start, task_trace(&node, task_id)));
    let answer = propose(&node, Command::Extend { task_id, fence: body.fence, lease_ttl_ms }).await;
    if let Some((start, trace)) = trace {
        let span = report_span(&node, "phalanx.extend", start, task_id, body.fence, None, trace, answer.as_ref().err());
        node.tracer.record(span);
    }
    let (outcome, _) = answer?;
    expect_outcome!(outcome, Outcome::Extended { valid_until_ms });
    // The answer carries no task body already: minimal as it is.
    let response = Json(api::Extended { valid_until_ms }).into_response();
    Ok(if wants_minimal(&headers) { minimal_response(response) } else { response })
}

/// The lease holder says the work moves; a lease without progress for the
/// policy's `stall_timeout_ms` is revoked as stuck.
async fn progress(State(node): State<Node_>, Path(id): Path<String>, body: Body) -> ApiResult {
    let task_id = parse_id(&id)?;
    let body = parse::<api::ProgressRequest>(body)?;
    propose(&node, Command::Progress { task_id, fence: body.fence }).await?;
    Ok(Json(api::Ok::YES).into_response())
}

async fn list_agents(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    // Copied under the lock, turned into JSON after it is let go.
    let agents: Vec<phalanx_core::Agent> =
        node.shared.data.read().expect("state lock").state.agents().cloned().collect();
    let agents: Vec<api::AgentInfo> = agents
        .into_iter()
        .map(|agent| api::AgentInfo {
            leases: agent.leased_task_ids.len(),
            agent_id: agent.id,
            epoch: agent.epoch,
            capabilities: agent.capabilities.into_iter().collect(),
            capacity: agent.capacity,
            stuck_count: agent.stuck_count,
            stuck_ms: agent.stuck_ms,
        })
        .collect();
    Ok(mark_stale(Json(api::Agents { agents }).into_response(), stale))
}

/// What an operator needs at a glance: is it working, not just is it up.
async fn status(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    let data = node.shared.data.read().expect("state lock");
    let state = &data.state;
    let stuck: Vec<&str> = state.agents().filter(|a| a.stuck_count > 0).map(|a| a.id.as_str()).collect();
    let queues: serde_json::Map<String, Value> = state
        .queue_stats()
        .into_iter()
        .map(|(queue, counts)| {
            let names = ["pending", "leased", "succeeded", "failed", "cancelled", "dead", "paused"];
            let counts: serde_json::Map<String, Value> =
                names.iter().zip(counts).map(|(name, count)| (name.to_string(), json!(count))).collect();
            (queue, Value::Object(counts))
        })
        .collect();
    let body = json!({
        "policy_version": state.policy_version(),
        "tasks": state.task_count(),
        "conversations": state.conversation_count(),
        "state_bytes": state.state_bytes(),
        "state_bytes_max": state.limits().state_bytes_max,
        "agents": state.agents().count(),
        "stuck_agents": stuck,
        "unserved_queues": state.unserved_queues(),
        "oldest_pending_age_ms": state.oldest_pending_age_ms(),
        "counters": state.counters(),
        "queues": queues,
        "keys": state.key_statuses().iter().take(STATUS_ROWS_MAX).map(api_key_status).collect::<Vec<_>>(),
        "trees": tree_spends(state),
    });
    Ok(mark_stale(Json(body).into_response(), stale))
}

/// Rows of each list `GET /v1/status` shows (keys, trees): status is a
/// glance, `GET /v1/limits` lists every key.
const STATUS_ROWS_MAX: usize = 1000;

/// The spend of the trees that reported usage, newest roots first.
fn tree_spends(state: &phalanx_core::State) -> Vec<api::TreeSpend> {
    state
        .tree_usages()
        .iter()
        .rev()
        .take(STATUS_ROWS_MAX)
        .map(|(root, usage)| api::TreeSpend {
            root_id: *root,
            usage: api_usage(usage),
            budget: state.task(*root).and_then(|task| task.budget()).map(api_budget),
            exhausted: state.budget_exhausted(*root),
        })
        .collect()
}

// ---- flow control ----

fn api_key_limits(limits: &phalanx_core::KeyLimits) -> api::KeyLimits {
    api::KeyLimits {
        concurrency_max: limits.concurrency_max,
        rate_per_second: limits.rate_per_second_milli.map(api::KeyLimits::rate_from_milli),
        burst: limits.burst,
        weight: limits.weight,
        tokens_per_minute: limits.tokens_per_minute,
    }
}

/// The decimal rate becomes thousandths here; the state machine checks the
/// bounds and the cross-field rules.
fn core_key_limits(limits: &api::KeyLimits) -> Result<phalanx_core::KeyLimits, ApiError> {
    let rate_per_second_milli = limits
        .rate_per_second_milli()
        .map_err(|reason| ApiError::invalid(format!("invalid rate_per_second: {reason}")))?;
    Ok(phalanx_core::KeyLimits {
        concurrency_max: limits.concurrency_max,
        rate_per_second_milli,
        burst: limits.burst,
        weight: limits.weight,
        tokens_per_minute: limits.tokens_per_minute,
    })
}

fn api_key_status(status: &phalanx_core::KeyStatus) -> api::KeyStatus {
    api::KeyStatus {
        key: status.key.clone(),
        rule: status.rule.clone(),
        limits: status.limits.as_ref().map(api_key_limits),
        held: status.held,
        rate_tokens_left: status.rate_tokens_left,
        tokens_in_window: status.tokens_in_window,
        leased_estimate: status.leased_estimate,
        open_tasks: status.open_tasks,
    }
}

async fn list_limits(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    let table = {
        let data = node.shared.data.read().expect("state lock");
        let rules = data
            .state
            .key_limits()
            .iter()
            .map(|(key, limits)| api::LimitRule { key: key.clone(), limits: api_key_limits(limits) })
            .collect();
        let keys = data.state.key_statuses().iter().map(api_key_status).collect();
        api::LimitsTable { rules, keys }
    };
    Ok(mark_stale(Json(table).into_response(), stale))
}

/// The limits in force for a key (its own entry or a wildcard's) and what
/// it uses now; `404 not_found` for a key with neither.
async fn get_limits(State(node): State<Node_>, Path(key): Path<String>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    let status = node.shared.data.read().expect("state lock").state.key_status(&key);
    let status = status.ok_or_else(|| phalanx_core::Error::LimitsNotFound { key: key.clone() })?;
    Ok(mark_stale(Json(api_key_status(&status)).into_response(), stale))
}

async fn set_limits(State(node): State<Node_>, Path(key): Path<String>, body: Body) -> ApiResult {
    let request = parse::<api::KeyLimits>(body)?;
    let limits = core_key_limits(&request)?;
    let (outcome, _) = propose(&node, Command::SetKeyLimits { key: key.clone(), limits: limits.clone() }).await?;
    expect_outcome!(outcome, Outcome::KeyLimitsSet);
    Ok(Json(api::LimitRule { key, limits: api_key_limits(&limits) }).into_response())
}

async fn delete_limits(State(node): State<Node_>, Path(key): Path<String>) -> ApiResult {
    let (outcome, _) = propose(&node, Command::DeleteKeyLimits { key }).await?;
    expect_outcome!(outcome, Outcome::KeyLimitsDeleted);
    Ok(Json(api::Ok::YES).into_response())
}

async fn pause(State(node): State<Node_>, Path(id): Path<String>) -> ApiResult {
    let task_id = parse_id(&id)?;
    let (outcome, _) = propose(&node, Command::Pause { task_id }).await?;
    expect_outcome!(outcome, Outcome::Paused { task });
    Ok(task_response(&task))
}

async fn resume(State(node): State<Node_>, Path(id): Path<String>) -> ApiResult {
    let task_id = parse_id(&id)?;
    let (outcome, _) = propose(&node, Command::Resume { task_id }).await?;
    expect_outcome!(outcome, Outcome::Resumed { task });
    Ok(task_response(&task))
}

async fn replay(State(node): State<Node_>, body: Body) -> ApiResult {
    let request = parse::<api::ReplayRequest>(body)?;
    let state = phalanx_core::TaskState::parse(request.state.as_str()).expect("the contract's states are the core's");
    let command = Command::Replay {
        queue: request.queue,
        state,
        concurrency_key: request.concurrency_key,
        since_ms: request.since_ms,
        limit: request.limit,
    };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::Replayed { task_ids });
    Ok(Json(api::Replayed { task_ids }).into_response())
}

async fn set_budget(State(node): State<Node_>, Path(id): Path<String>, body: Body) -> ApiResult {
    let task_id = parse_id(&id)?;
    let request = parse::<api::BudgetRequest>(body)?;
    let command = Command::SetBudget { task_id, budget: request.budget.as_ref().map(core_budget) };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::BudgetSet { resumed });
    Ok(Json(api::BudgetSet { resumed }).into_response())
}

/// Declares that the task (under its lease) waits on other tasks. Answers at
/// once: 200 with the tasks still pending, or 422 `deadlock` naming the cycle.
async fn wait(State(node): State<Node_>, Path(id): Path<String>, body: Body) -> ApiResult {
    let task_id = parse_id(&id)?;
    let body = parse::<api::WaitRequest>(body)?;
    let command = Command::Wait { task_id, fence: body.fence, on: body.on, timeout_ms: body.timeout_ms };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::Waiting { pending });
    Ok(Json(api::Waiting { pending }).into_response())
}

fn default_lease_ttl_ms(node: &Node) -> u64 {
    node.shared.data.read().expect("state lock").state.limits().lease_ttl_ms_default
}

// ---- agents ----

async fn register(State(node): State<Node_>, body: Body) -> ApiResult {
    check_disk(&node, &body)?;
    let body = parse::<api::RegisterRequest>(body)?;
    // The session's secret: 128 random bits, drawn here because the state
    // machine draws no random numbers, and answered to the registering agent alone.
    let session = format!("{:032x}", rand::random::<u128>());
    let command = Command::RegisterAgent {
        agent_id: body.agent_id.clone(),
        capabilities: body.capabilities.into_iter().collect(),
        capacity: body.capacity.unwrap_or(1),
        session: session.clone(),
    };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::Registered { epoch });
    node.heard_from_agent(&body.agent_id, epoch);
    let policy = node.shared.data.read().expect("state lock").state.limits().clone();
    Ok(Json(api::Registered {
        agent_id: body.agent_id,
        epoch,
        session: Some(session),
        heartbeat_interval_ms: policy.agent_heartbeat_interval_ms,
        agent_ttl_ms: policy.agent_ttl_ms,
    })
    .into_response())
}

/// Checks that the request speaks for the agent's current session (its epoch
/// and its secret) and records the session as alive. A forged heartbeat,
/// poll or deregistration for another agent's id is refused here.
fn check_session(node: &Node, agent_id: &str, epoch: u64, session: Option<&str>) -> Result<Vec<String>, ApiError> {
    let data = node.shared.data.read().expect("state lock");
    let agent = data.state.check_session(agent_id, epoch, session)?;
    let capabilities = agent.capabilities.iter().cloned().collect();
    drop(data);
    node.heard_from_agent(agent_id, epoch);
    Ok(capabilities)
}

async fn heartbeat(State(node): State<Node_>, Path(agent_id): Path<String>, body: Body) -> ApiResult {
    let body = parse::<api::SessionRequest>(body)?;
    check_session(&node, &agent_id, body.epoch, body.session.as_deref())?;
    Ok(Json(api::Ok::YES).into_response())
}

async fn deregister(State(node): State<Node_>, Path(agent_id): Path<String>, body: Body) -> ApiResult {
    let body = parse::<api::SessionRequest>(body)?;
    check_session(&node, &agent_id, body.epoch, body.session.as_deref())?;
    propose(&node, Command::DeregisterAgent { agent_id, epoch: body.epoch }).await?;
    Ok(Json(api::Ok::YES).into_response())
}

/// Long-poll: proposes a lease only when the applied state shows the agent
/// has room and work is ready for it, otherwise waits for the next apply
/// (which may have changed that) until `wait_ms` runs out.
async fn poll(State(node): State<Node_>, Path(agent_id): Path<String>, body: Body) -> ApiResult {
    let start = node.tracer.start();
    let body = parse::<api::PollRequest>(body)?;
    let wait_ms = body.wait_ms.unwrap_or(0);
    if wait_ms > POLL_WAIT_MS_MAX {
        return Err(ApiError::invalid(format!("wait_ms must be at most {POLL_WAIT_MS_MAX}")));
    }
    let tasks_max = body.max_tasks.unwrap_or(1);
    if tasks_max == 0 || tasks_max > 1000 {
        return Err(ApiError::invalid("max_tasks must be 1..=1000"));
    }
    let lease_ttl_ms = body.lease_ttl_ms.unwrap_or_else(|| default_lease_ttl_ms(&node));
    let capabilities = check_session(&node, &agent_id, body.epoch, body.session.as_deref())?;
    let queues = body.queues.unwrap_or_else(|| capabilities.clone());
    if queues.is_empty() {
        return Err(ApiError::invalid("queues must name at least one queue"));
    }
    if let Some(queue) = queues.iter().find(|q| !capabilities.contains(q)) {
        return Err(phalanx_core::Error::NotCapable { agent_id: agent_id.clone(), queue: queue.clone() }.into());
    }
    let _permit = node.pollers.clone().try_acquire_owned().map_err(|_| {
        node.stats.refused_overload.fetch_add(1, Ordering::Relaxed);
        ApiError::overloaded(
            ErrorCode::Overloaded,
            format!("pollers_max ({}) long-polls already wait here", node.config.pollers_max),
            1000,
        )
    })?;
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let mut applied = node.shared.applied_tx.subscribe();
        // A lease is proposed only when the applied state shows it would
        // grant something. An agent at its capacity, or with nothing ready on
        // its queues, waits for an apply that changes that (a lease ends, a
        // task arrives) and proposes nothing meanwhile.
        let grantable = node.shared.data.read().expect("state lock").state.grantable(
            &agent_id,
            body.epoch,
            &queues,
            tasks_max,
            lease_ttl_ms,
        )?;
        if grantable > 0 {
            let command = Command::Lease {
                agent_id: agent_id.clone(),
                epoch: body.epoch,
                queues: queues.clone(),
                tasks_max,
                lease_ttl_ms,
            };
            let (outcome, _) = propose(&node, command).await?;
            expect_outcome!(outcome, Outcome::Leased { grants });
            if let Some(start) = start {
                for grant in &grants {
                    node.tracer.record(lease_span(&node, start, &agent_id, grant));
                }
            }
            if !grants.is_empty() || Instant::now() >= deadline {
                let leases: Vec<api::LeaseGrantRef> = grants
                    .iter()
                    .map(|grant| api::LeaseGrantRef {
                        task: view(&grant.task),
                        fence: grant.fence,
                        valid_until_ms: grant.valid_until_ms,
                        lease_ttl_ms,
                        children: grant.children.iter().map(api_child).collect(),
                    })
                    .collect();
                return Ok(Json(serde_json::json!({ "leases": leases })).into_response());
            }
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Json(api::Polled { leases: vec![] }).into_response());
        }
        if tokio::time::timeout(deadline - now, applied.changed()).await.is_err() {
            return Ok(Json(api::Polled { leases: vec![] }).into_response());
        }
        node.heard_from_agent(&agent_id, body.epoch);
    }
}

/// The span of one grant of a poll: a child of the task's stored context.
fn lease_span(node: &Node, start: u64, agent_id: &str, grant: &phalanx_core::Grant) -> Span {
    let parent = stored_context(&grant.task);
    let attributes = vec![
        ("phalanx.node.id", node.id().into()),
        ("phalanx.task.id", grant.task.id.into()),
        ("phalanx.queue", grant.task.queue.as_str().into()),
        ("phalanx.fence", grant.fence.into()),
        ("phalanx.attempt", grant.task.attempts.into()),
        ("phalanx.agent.id", agent_id.into()),
    ];
    let context = parent.map_or_else(TraceContext::root, |parent| parent.child());
    finished_span("phalanx.lease", context, parent.map(|parent| parent.span_id), start, attributes, None)
}

/// A task's stored trace context, if it has one.
fn stored_context(task: &Task) -> Option<TraceContext> {
    task.traceparent().and_then(|text| TraceContext::parse(&text).ok())
}

// ---- conversations ----

async fn context_get(State(node): State<Node_>, Path(id): Path<String>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    // A copy (at most `conversation_bytes_max`) under the lock; parsed and
    // serialised after it is let go.
    let conversation = node.shared.data.read().expect("state lock").state.conversation(&id).cloned();
    let conversation = conversation.ok_or(phalanx_core::Error::ConversationNotFound { conversation_id: id.clone() })?;
    let writers = conversation.writers;
    let entries = conversation
        .entries
        .into_iter()
        .map(|(key, (version, value))| {
            // Stored text that does not parse is served as a string (see `raw_json`).
            let value: Value = serde_json::from_str(&value).unwrap_or(Value::String(value));
            // Which task, under which lease, wrote it (none for a client's own write).
            let writer = writers.get(&key);
            let entry = api::ContextEntry {
                version,
                value,
                task_id: writer.map(|w| w.task_id),
                fence: writer.map(|w| w.fence),
            };
            (key, entry)
        })
        .collect();
    Ok(mark_stale(Json(api::Conversation { conversation_id: id, entries }).into_response(), stale))
}

/// Deletes a conversation and its whole context (authorised as its writes are).
async fn context_delete(State(node): State<Node_>, Path(id): Path<String>) -> ApiResult {
    validate_name("conversation_id", &id, 1024)?;
    propose(&node, Command::ContextDelete { conversation_id: id.clone() }).await?;
    Ok(Json(api::ConversationDeleted { conversation_id: id, deleted: true }).into_response())
}

async fn context_put(State(node): State<Node_>, Path((id, key)): Path<(String, String)>, body: Body) -> ApiResult {
    let body = parse::<api::ContextPutRequest>(body)?;
    let writer = match (body.task_id, body.fence) {
        (Some(task_id), Some(fence)) => Some(phalanx_core::Writer { task_id, fence }),
        (None, None) => None,
        _ => return Err(ApiError::invalid("task_id and fence: a write on a task's behalf carries both")),
    };
    let command = Command::ContextPut {
        conversation_id: id,
        key,
        value: body.value.to_string(),
        expected_version: body.expected_version,
        writer,
    };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::ContextWritten { version });
    Ok(Json(api::ContextWritten { version }).into_response())
}

// ---- policy ----

async fn config_get(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    let data = node.shared.data.read().expect("state lock");
    let body = json!({"version": data.state.policy_version(), "policy": data.state.limits()});
    Ok(mark_stale(Json(body).into_response(), stale))
}

async fn config_history(State(node): State<Node_>, RawQuery(query): RawQuery) -> ApiResult {
    let stale = read_barrier(&node, &query).await?;
    let data = node.shared.data.read().expect("state lock");
    let body = json!({"version": data.state.policy_version(), "history": data.state.policy_history()});
    Ok(mark_stale(Json(body).into_response(), stale))
}

/// Builds the new policy from the current one and the changes, validates it
/// (types, bounds, cross-field rules, and what it would do to the state as
/// it is now) before proposing; the state machine does all of it again when
/// applying, so a change that cannot pass costs no log entry.
async fn config_set(State(node): State<Node_>, body: Body) -> ApiResult {
    let body = parse::<api::ConfigSetRequest>(body)?;
    if body.set.is_empty() {
        return Err(ApiError::invalid("set: name at least one KEY=VALUE"));
    }
    let (current, version) = {
        let data = node.shared.data.read().expect("state lock");
        (serde_json::to_value(data.state.limits()).expect("policy serialises"), data.state.policy_version())
    };
    let mut policy = current.clone();
    for (key, value) in &body.set {
        let Some(slot) = policy.get_mut(key) else {
            return Err(ApiError::invalid(format!("{key}: no such policy key")));
        };
        let value = match value {
            Value::String(text) => serde_json::from_str(text).unwrap_or_else(|_| value.clone()),
            other => other.clone(),
        };
        // The one policy key that is not a number: each queue's retry policy,
        // checked whole by `validate` below.
        if key == "queues" {
            if !value.is_object() {
                return Err(ApiError::invalid(format!(
                    "policy key queues: {value} is not an object of queue policies"
                )));
            }
            *slot = value;
            continue;
        }
        // Every policy value is a whole number within its key's bounds; saying
        // so here names the key, where the policy's deserialiser would not
        // (a value too large for the key's type).
        let Some(number) = value.as_u64() else {
            return Err(ApiError::invalid(format!(
                "policy key {key}: {value} is not a whole number in 0..={}",
                u64::MAX
            )));
        };
        if let Some(bound) = phalanx_core::Limits::bound(key) {
            bound
                .check(number)
                .map_err(|invalid| ApiError::invalid(format!("{}: {}", invalid.field, invalid.reason)))?;
        }
        *slot = value;
    }
    let policy: phalanx_core::Limits =
        serde_json::from_value(policy).map_err(|error| ApiError::invalid(format!("policy: {error}")))?;
    policy.validate().map_err(|invalid| ApiError::invalid(format!("{}: {}", invalid.field, invalid.reason)))?;
    node.shared.data.read().expect("state lock").state.judge_policy(&policy, body.force)?;
    let keys: Vec<&String> = body.set.keys().collect();
    let note = format!("set {}", keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "));
    let command = Command::SetPolicy {
        policy,
        expected_version: body.expected_version.unwrap_or(version),
        note,
        force: body.force,
    };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::PolicySet { version });
    Ok(Json(api::PolicySet { version }).into_response())
}

/// A rollback is a compare-and-set on the version it replaces
/// (`expected_version`, default the current one): sent again after an
/// unknown outcome, it finds the version moved on and is refused
/// (`409 version_conflict`) instead of rolling back twice. Without
/// `version`, it restores the version before `expected_version`, which the
/// append-only history fixes once `expected_version` is known.
async fn config_rollback(State(node): State<Node_>, body: Body) -> ApiResult {
    let body = parse::<api::RollbackRequest>(body)?;
    let (to_version, expected) = {
        let data = node.shared.data.read().expect("state lock");
        let history = data.state.policy_history();
        let expected = body.expected_version.unwrap_or(data.state.policy_version());
        let to_version = match body.version {
            Some(version) => version,
            None => {
                let at = history.iter().position(|v| v.version == expected).ok_or_else(|| {
                    ApiError::from(phalanx_core::Error::VersionConflict {
                        key: "policy".into(),
                        expected,
                        current: data.state.policy_version(),
                    })
                })?;
                if at == 0 {
                    return Err(ApiError::invalid("there is no earlier policy version to roll back to"));
                }
                history[at - 1].version
            }
        };
        // Judged before proposing, so a refusal costs no log entry; the
        // state machine judges it again when applying.
        if let Some(old) = history.iter().find(|v| v.version == to_version) {
            data.state.judge_policy(&old.policy, body.force)?;
        }
        (to_version, expected)
    };
    let command = Command::RollbackPolicy {
        to_version,
        note: "asked by a client".into(),
        by_client: true,
        force: body.force,
        expected_version: Some(expected),
    };
    let (outcome, _) = propose(&node, command).await?;
    expect_outcome!(outcome, Outcome::PolicySet { version });
    Ok(Json(api::RolledBack { version, rolled_back_to: to_version }).into_response())
}

// ---- cluster, health, metrics ----

async fn cluster(State(node): State<Node_>) -> ApiResult {
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let contacts = node.peer_contacts.lock().expect("contacts lock").clone();
    let skews = node.log_clock.skews_ms();
    let nodes: Vec<Value> = membership
        .nodes()
        .map(|(id, member)| {
            let matched = metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
            let last_contact_ms =
                if *id == node.id() { Some(0) } else { contacts.get(id).map(|at| at.elapsed().as_millis() as u64) };
            json!({
                "id": id,
                "addr": member.api,
                "raft_addr": member.raft,
                "voter": voters.contains(id),
                "matched_index": matched,
                "last_contact_ms": last_contact_ms,
                "clock_skew_ms": skews.get(id),
                "clock_skewed": skews.get(id).map(|skew| skew.unsigned_abs() > node.config.clock_skew_max_ms),
            })
        })
        .collect();
    Ok(Json(json!({
        "node_id": node.id(),
        "leader_id": metrics.current_leader,
        "term": metrics.current_term,
        "state": format!("{:?}", metrics.state),
        "last_log_index": metrics.last_log_index,
        "last_applied": metrics.last_applied.map(|l| l.index),
        "snapshot_index": metrics.snapshot.map(|l| l.index),
        "millis_since_quorum_ack": metrics.millis_since_quorum_ack,
        "election_hold_back": node.elections.lock().expect("elections lock").hold_back.clone(),
        "clock_skew_max_ms": node.config.clock_skew_max_ms,
        "disk_free_bytes": node.disk_free_bytes(),
        "disk_free_min_bytes": node.disk_free_min_bytes(),
        "connections_max": node.config.connections_max,
        "descriptor_limit": node.descriptors.limit,
        "nodes": nodes,
    }))
    .into_response())
}

/// How long a node being added may take to catch up before the add is
/// refused (it stays a learner).
const LEARNER_CATCH_UP_MS: u64 = 8_000;
/// How long one membership step (add a learner, change the voters) may take
/// before the caller hears `timeout` (outcome unknown) instead of waiting on.
const MEMBERSHIP_STEP_TIMEOUT_MS: u64 = 5_000;
/// How long a node being added has to answer its liveness probe.
const MEMBER_PROBE_TIMEOUT_MS: u64 = 1_000;
/// A voter that has not answered the leader for this long does not count
/// towards the majority a removal must leave behind.
const VOTER_CONTACT_MS_MAX: u64 = 1_000;
/// A voter this many entries behind the leader's log is not caught up.
const VOTER_LAG_ENTRIES_MAX: u64 = 1_000;

fn membership_error(error: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(ErrorCode::MembershipChangeFailed, format!("membership change failed: {error}"), 1000)
}

/// Runs one membership step within `MEMBERSHIP_STEP_TIMEOUT_MS`.
async fn membership_step<T, E: std::fmt::Display>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(Duration::from_millis(MEMBERSHIP_STEP_TIMEOUT_MS), step).await {
        Ok(result) => result.map_err(membership_error),
        Err(_) => Err(ApiError::unavailable(
            ErrorCode::Timeout,
            format!(
                "{what} did not finish within {MEMBERSHIP_STEP_TIMEOUT_MS} ms: the outcome is unknown, \
                 check GET /v1/cluster before trying again"
            ),
            1000,
        )),
    }
}

/// A membership change refused before anything changed: 409, whatever the
/// code (`no_peer_token` included, which peer traffic answers with 403).
fn membership_conflict(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(code, message).with_status(StatusCode::CONFLICT)
}

/// Asks the node at `addr` who it is: a member is added only if it runs, is
/// a Phalanx node, and is the node the caller named.
async fn probe_member(node: &Node, node_id: u64, addr: &str, raft_addr: &str) -> Result<(), ApiError> {
    let timeout = Duration::from_millis(MEMBER_PROBE_TIMEOUT_MS);
    let unreachable = |why: String| {
        membership_conflict(
            ErrorCode::MemberUnreachable,
            format!("node {node_id} at {addr} did not answer its probe ({why}): start it first, then add it"),
        )
    };
    let answer = node
        .http
        .get(node.peer_url(addr, "/health/live"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    let live: Value = answer.json().await.map_err(|error| unreachable(format!("not a Phalanx node: {error}")))?;
    match live["node_id"].as_u64() {
        Some(id) if id == node_id => {}
        Some(id) => {
            return Err(membership_conflict(
                ErrorCode::AddressInUse,
                format!("{addr} is node {id}, not node {node_id}: a node keeps its id for life"),
            ))
        }
        None => return Err(unreachable("its answer names no node id".into())),
    }
    let connect = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(raft_addr)).await;
    if !matches!(connect, Ok(Ok(_))) {
        return Err(membership_conflict(
            ErrorCode::MemberUnreachable,
            format!("node {node_id}'s Raft address {raft_addr} does not accept connections"),
        ));
    }
    Ok(())
}

/// Adds a node: first as a learner (it catches up by log or snapshot), then
/// as a voter. Refused before anything changes when the id or an address is
/// already taken, an address does not parse, the node does not answer, or
/// the cluster has no peer token. Node ids are never reused: an id that was
/// ever a member is refused.
async fn add_member(State(node): State<Node_>, body: Body) -> ApiResult {
    let body = parse::<api::AddMemberRequest>(body)?;
    if body.node_id == 0 {
        return Err(ApiError::invalid("node_id must be positive"));
    }
    let raft_addr = body.raft_addr.clone().unwrap_or_else(|| body.addr.clone());
    for addr in [&body.addr, &raft_addr] {
        crate::raft_types::check_addr(addr).map_err(ApiError::invalid)?;
    }
    if node.config.peer_token.is_none() {
        return Err(membership_conflict(
            ErrorCode::NoPeerToken,
            "a cluster of more than one node needs a peer token: restart every node with --peer-token".into(),
        ));
    }
    let (voters, retry) = {
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        if membership.voter_ids().any(|id| id == body.node_id) {
            return Err(membership_conflict(
                ErrorCode::AlreadyMember,
                format!("node {} is already a voter", body.node_id),
            ));
        }
        let wanted = crate::raft_types::Member::new(body.addr.clone(), raft_addr.clone());
        // A learner left behind by an add that timed out may be added again,
        // with the same addresses.
        let retry = match membership.get_node(&body.node_id) {
            Some(member) if *member == wanted => true,
            Some(member) => {
                return Err(membership_conflict(
                    ErrorCode::AlreadyMember,
                    format!("node {} is already a learner at {member}", body.node_id),
                ))
            }
            None => false,
        };
        for (id, member) in membership.nodes() {
            let taken = [&member.api, &member.raft];
            if *id != body.node_id && (taken.contains(&&body.addr) || taken.contains(&&raft_addr)) {
                return Err(membership_conflict(
                    ErrorCode::AddressInUse,
                    format!("node {id} already uses {member}: two members cannot share an address"),
                ));
            }
        }
        (membership.voter_ids().collect::<std::collections::BTreeSet<u64>>(), retry)
    };
    let retired = node.shared.data.read().expect("state lock").state.node_retired(body.node_id);
    if retired {
        return Err(membership_conflict(
            ErrorCode::NodeIdReused,
            format!("node id {} was removed before; node ids are never reused", body.node_id),
        ));
    }
    probe_member(&node, body.node_id, &body.addr, &raft_addr).await?;
    let member = crate::raft_types::Member::new(body.addr.clone(), raft_addr.clone());
    let target = if retry {
        node.raft.metrics().borrow().last_log_index.unwrap_or(0)
    } else {
        membership_step("adding the learner", node.raft.add_learner(body.node_id, member, false)).await?.log_id.index
    };
    // A voter that is not caught up (or not even running) would count
    // towards every quorum without being able to help form one: the node
    // becomes a voter only once it holds the log up to its own addition.
    let caught_up = node
        .raft
        .wait(Some(Duration::from_millis(LEARNER_CATCH_UP_MS)))
        .metrics(
            |metrics| {
                let matched = metrics.replication.as_ref().and_then(|r| r.get(&body.node_id).cloned().flatten());
                matched.is_some_and(|log_id| log_id.index >= target)
            },
            "the new learner catches up",
        )
        .await;
    if caught_up.is_err() {
        return Err(ApiError::unavailable(
            ErrorCode::LearnerLagging,
            format!(
                "node {} at {} did not catch up within {LEARNER_CATCH_UP_MS} ms; it stays a learner, not a voter: \
                 check that it runs and is reachable, then add it again (or remove it)",
                body.node_id, body.addr
            ),
            1000,
        ));
    }
    let mut new_voters = voters;
    new_voters.insert(body.node_id);
    membership_step("promoting the learner", node.raft.change_membership(new_voters, false)).await?;
    Ok(Json(api::MemberChanged { ok: true, node_id: body.node_id }).into_response())
}

/// The voters among `voters` that answer the leader and hold its log
/// (the leader itself always does).
fn healthy_voters(node: &Node, voters: &std::collections::BTreeSet<u64>) -> std::collections::BTreeSet<u64> {
    let metrics = node.raft.metrics().borrow().clone();
    let last = metrics.last_log_index.unwrap_or(0);
    let contacts = node.peer_contacts.lock().expect("contacts lock").clone();
    voters
        .iter()
        .copied()
        .filter(|id| {
            if *id == node.id() {
                return true;
            }
            let matched = metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index);
            let recent = contacts.get(id).is_some_and(|at| at.elapsed() < Duration::from_millis(VOTER_CONTACT_MS_MAX));
            recent && matched.is_some_and(|m| m + VOTER_LAG_ENTRIES_MAX >= last)
        })
        .collect()
}

/// Removes a voter or a learner. A voter is removed only if the voters left
/// behind include a majority that answers the leader and holds its log: a
/// change that cannot commit (a majority of the new voters down) would block
/// every write until they return, and one that leaves no live majority
/// would brick the cluster.
async fn remove_member(State(node): State<Node_>, Path(id): Path<String>) -> ApiResult {
    let node_id = parse_id(&id)?;
    let (voters, is_learner) = {
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let is_learner = membership.learner_ids().any(|l| l == node_id);
        (voters, is_learner)
    };
    if is_learner {
        propose(&node, Command::RetireNode { node_id }).await?;
        let change = openraft::ChangeMembers::RemoveNodes([node_id].into());
        membership_step("removing the learner", node.raft.change_membership(change, false)).await?;
        return Ok(Json(api::MemberChanged { ok: true, node_id }).into_response());
    }
    if !voters.contains(&node_id) {
        return Err(ApiError::not_found(format!("node {node_id} is not a member")));
    }
    if voters.len() == 1 {
        return Err(ApiError::invalid("cannot remove the last voter"));
    }
    let remaining: std::collections::BTreeSet<u64> = voters.iter().copied().filter(|v| *v != node_id).collect();
    let healthy = healthy_voters(&node, &remaining);
    let majority = remaining.len() / 2 + 1;
    if healthy.len() < majority {
        let missing: Vec<u64> = remaining.difference(&healthy).copied().collect();
        return Err(membership_conflict(
            ErrorCode::UnsafeMembershipChange,
            format!(
                "removing node {node_id} would leave voters {remaining:?}, of which only {healthy:?} answer the \
                 leader and hold its log; a majority of {} needs {majority}: bring {missing:?} back first",
                remaining.len()
            ),
        ));
    }
    // Recorded first, so the id can never come back even if the change below fails half-way.
    propose(&node, Command::RetireNode { node_id }).await?;
    membership_step("removing the voter", node.raft.change_membership(remaining, false)).await?;
    Ok(Json(api::MemberChanged { ok: true, node_id }).into_response())
}

/// Ready means useful: a leader is known and this node's applied state is
/// not far behind its log.
async fn ready(State(node): State<Node_>) -> ApiResult {
    let problems = node.problems();
    if problems.is_empty() {
        let metrics = node.raft.metrics().borrow().clone();
        let applied = metrics.last_applied.map(|l| l.index).unwrap_or(0);
        return Ok(
            Json(api::Ready { ready: true, leader_id: metrics.current_leader, last_applied: applied }).into_response()
        );
    }
    Err(ApiError::unavailable(ErrorCode::NotReady, problems.join("; "), 500))
}

/// The contract, generated from `phalanx-api` (the same text as docs/openapi.json).
async fn openapi() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(api::openapi::document_json).clone();
    ([("content-type", "application/json")], text).into_response()
}

async fn metrics(State(node): State<Node_>) -> ApiResult {
    Ok(([("content-type", "text/plain; version=0.0.4")], crate::metrics::render(&node)).into_response())
}

// ---- Raft RPC (server side of network.rs) ----

/// Decodes a Raft RPC body in the format its headers name (`raft_wire.rs`)
/// and runs the edge checks (`raft_edge.rs`) on it before openraft sees it;
/// a refusal is a JSON error, never a panic.
fn raft_input<T: DeserializeOwned>(
    node: &Node,
    headers: &HeaderMap,
    body: Body,
    check: impl FnOnce(&crate::raft_edge::Receiver, &T) -> Result<(), String>,
) -> Result<(T, Format), ApiError> {
    let bytes =
        body.map_err(|rejection| ApiError::new(ErrorCode::TooLarge, format!("Raft request refused: {rejection}")))?;
    let malformed = |why: String| {
        node.stats.raft_refused.fetch_add(1, Ordering::Relaxed);
        ApiError::new(ErrorCode::MalformedRaftRequest, format!("Raft request: {why}"))
    };
    let format = Format::of(headers).map_err(malformed)?;
    let request: T = format.decode(&bytes).map_err(malformed)?;
    let membership = node.raft.metrics().borrow().membership_config.clone();
    check(&crate::raft_edge::Receiver { membership: &membership }, &request).map_err(|why| {
        node.stats.raft_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(why, "refused a Raft request");
        ApiError::invalid(format!("Raft request refused: {why}"))
    })?;
    Ok((request, format))
}

/// A Raft RPC's answer, in the format it was asked in.
fn raft_answer<T: Serialize>(format: Format, answer: &T) -> ApiResult {
    let bytes = format
        .encode(answer)
        .map_err(|why| ApiError::new(ErrorCode::Internal, format!("encoding a Raft answer: {why}")))?;
    let version = HeaderValue::from(format.version());
    Ok((
        [
            (CONTENT_TYPE, HeaderValue::from_static(format.content_type())),
            (HeaderName::from_static(RAFT_FORMAT_HEADER), version),
        ],
        bytes,
    )
        .into_response())
}

async fn raft_append(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    let (request, format) = raft_input(&node, &headers, body, crate::raft_edge::check_append_request)?;
    let answer = node.raft.append_entries(request).await;
    // Any answer but "your vote is old" means a current leader reached us.
    if answer.as_ref().is_ok_and(|a| !matches!(a, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
        node.heard_from_leader();
    }
    raft_answer(format, &answer)
}

/// The election guard's probe (`election_guard.rs`): who this node is, how
/// long ago it last heard from its leader (nothing while, as leader, it hands
/// leadership over), and its wall clock (for `clock.rs`).
async fn raft_probe(State(node): State<Node_>) -> ApiResult {
    let term = node.raft.server_metrics().borrow().vote.leader_id().term;
    Ok(Json(json!({
        "node_id": node.id(),
        "term": term,
        "leader_contact_age_ms": node.leader_contact_age_ms(),
        "wall_clock_ms": crate::clock::wall_clock_ms(),
    }))
    .into_response())
}

async fn raft_vote(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    let (request, format) = raft_input(&node, &headers, body, crate::raft_edge::check_vote_request)?;
    raft_answer(format, &node.raft.vote(request).await)
}

async fn raft_snapshot(State(node): State<Node_>, headers: HeaderMap, body: Body) -> ApiResult {
    let (request, format) = raft_input(&node, &headers, body, crate::raft_edge::check_snapshot_request)?;
    let answer = node.raft.install_snapshot(request).await;
    if answer.is_ok() {
        node.heard_from_leader();
    }
    raft_answer(format, &answer)
}
