//! The HTTP client: any node of a node list, failover on error, backoff with
//! full jitter, `Retry-After` honoured, and a retry budget so that a
//! struggling cluster is not buried under retries.
//!
//! A request whose outcome is unknown (timed out, or the node failed while
//! forwarding it) is retried only when retrying is harmless; otherwise the
//! caller hears `Error::Unknown` and decides.

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The cluster refused the request; nothing changed.
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String, leader_hint: Option<String>, retry_after_ms: Option<u64> },
    /// No node could be reached (connection refused or failed everywhere).
    #[error("no node answered: {0}")]
    Unavailable(String),
    /// The request may or may not have taken effect.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("could not decode the answer: {0}")]
    Decode(String),
}

impl Error {
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
    pub fn is_superseded(&self) -> bool {
        self.code() == Some("superseded")
    }
    /// True when no node could be reached or the cluster cannot serve now.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    Duration::from_micros(rand::thread_rng().gen_range(0..=ceiling.as_micros() as u64))
}

/// Retries may be at most about a tenth of requests: every request earns 0.1
/// token, a retry spends one; a small floor lets a quiet client retry at all.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: f64,
    tokens_max: f64,
}

impl RetryBudget {
    pub fn new(tokens_max: f64) -> RetryBudget {
        RetryBudget { tokens: tokens_max, tokens_max }
    }
    pub fn on_request(&mut self) {
        self.tokens = (self.tokens + 0.1).min(self.tokens_max);
    }
    pub fn try_retry(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
    Dead,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Leased)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub queue: String,
    pub payload: Value,
    pub priority: u8,
    pub state: TaskState,
    pub attempts: u32,
    pub max_attempts: u32,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<String>,
    pub hop_count: u32,
    pub last_fence: u64,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub dead_reason: Option<String>,
    pub superseded_count: u32,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// A lease as the poll hands it out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub task: Task,
    pub fence: u64,
    pub valid_until_ms: u64,
    pub lease_ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub queue: String,
    pub payload: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_fence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
}

impl SubmitRequest {
    pub fn new(queue: impl Into<String>, payload: Value) -> SubmitRequest {
        SubmitRequest {
            queue: queue.into(),
            payload,
            priority: Some(5),
            idempotency_key: None,
            deadline_ms: None,
            max_attempts: Some(3),
            parent_id: None,
            parent_fence: None,
            conversation_id: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submitted {
    pub task_id: u64,
    pub deduplicated: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registered {
    pub agent_id: String,
    pub epoch: u64,
    pub heartbeat_interval_ms: u64,
    pub agent_ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    pub next_after: Option<u64>,
}

/// Whether a request may be sent again when its outcome is unknown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads, and writes whose repetition is harmless (fenced, keyed, CAS).
    Safe,
    /// Only when the request surely never arrived (connection refused).
    IfNotSent,
}

pub struct Client {
    nodes: Vec<String>,
    current: AtomicUsize,
    token: Option<String>,
    name: Option<String>,
    http: reqwest::Client,
    pub retries_max: u32,
    pub request_timeout: Duration,
    budget: Mutex<RetryBudget>,
}

const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

impl Client {
    pub fn new(nodes: Vec<String>, token: Option<String>) -> Result<Client, Error> {
        let nodes: Vec<String> = nodes
            .into_iter()
            .map(|n| n.trim().trim_start_matches("http://").to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if nodes.is_empty() {
            return Err(Error::Unavailable("the node list is empty".into()));
        }
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let start = rand::thread_rng().gen_range(0..nodes.len());
        Ok(Client {
            nodes,
            current: AtomicUsize::new(start),
            token,
            name: None,
            http,
            retries_max: 8,
            request_timeout: Duration::from_secs(15),
            budget: Mutex::new(RetryBudget::new(10.0)),
        })
    }

    /// Parses `host:port,host:port`.
    pub fn from_nodes_str(nodes: &str, token: Option<String>) -> Result<Client, Error> {
        Client::new(nodes.split(',').map(str::to_string).collect(), token)
    }

    /// Names this client for the per-client rate limit (`X-Phalanx-Client`).
    pub fn with_name(mut self, name: impl Into<String>) -> Client {
        self.name = Some(name.into());
        self
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    fn node(&self) -> String {
        self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()].clone()
    }

    fn move_on(&self, hint: Option<&str>) {
        if let Some(index) = hint.and_then(|h| self.nodes.iter().position(|n| n == h)) {
            self.current.store(index, Ordering::Relaxed);
        } else {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        retry: Retry,
        timeout: Duration,
    ) -> Result<T, Error> {
        self.budget.lock().expect("budget lock").on_request();
        let mut attempt = 0;
        loop {
            let node = self.node();
            let mut request = self.http.request(method.clone(), format!("http://{node}{path}")).timeout(timeout);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(name) = &self.name {
                request = request.header("x-phalanx-client", name);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let (error, wait) = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let text = response.text().await.map_err(|e| Error::Unknown(e.to_string()))?;
                    if (200..300).contains(&status) {
                        return serde_json::from_str(&text).map_err(|e| Error::Decode(format!("{e}: {text}")));
                    }
                    let value: Value = serde_json::from_str(&text).unwrap_or(json!({}));
                    let error = &value["error"];
                    let api = Error::Api {
                        status,
                        code: error["code"].as_str().unwrap_or("unknown").to_string(),
                        message: error["message"].as_str().unwrap_or(&text).to_string(),
                        leader_hint: error["leader_hint"].as_str().map(str::to_string),
                        retry_after_ms: error["retry_after_ms"].as_u64(),
                    };
                    let Error::Api { code, leader_hint, retry_after_ms, .. } = &api else { unreachable!() };
                    // Refusals that changed nothing and may pass on retry, perhaps on another node.
                    let retriable = match status {
                        429 => true,
                        503 => {
                            matches!(code.as_str(), "no_leader" | "not_leader" | "not_ready" | "overloaded")
                                || retry == Retry::Safe
                        }
                        _ => false,
                    };
                    if !retriable {
                        return Err(if status == 503 && retry == Retry::IfNotSent {
                            Error::Unknown(api.to_string())
                        } else {
                            api
                        });
                    }
                    if status == 503 {
                        self.move_on(leader_hint.as_deref());
                    }
                    (api.clone(), retry_after_ms.map(Duration::from_millis))
                }
                Err(error) if error.is_connect() => {
                    self.move_on(None);
                    (Error::Unavailable(format!("{node}: {error}")), None)
                }
                Err(error) => {
                    self.move_on(None);
                    if retry == Retry::IfNotSent {
                        return Err(Error::Unknown(format!("{node}: {error}")));
                    }
                    (Error::Unavailable(format!("{node}: {error}")), None)
                }
            };
            attempt += 1;
            if attempt > self.retries_max || !self.budget.lock().expect("budget lock").try_retry() {
                return Err(error);
            }
            let pause = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP).max(wait.unwrap_or_default().min(BACKOFF_CAP));
            tokio::time::sleep(pause).await;
        }
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, Error> {
        self.call(reqwest::Method::POST, path, Some(&body), Retry::Safe, self.request_timeout).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(reqwest::Method::GET, path, None, Retry::Safe, self.request_timeout).await
    }

    pub async fn submit(&self, request: &SubmitRequest) -> Result<Submitted, Error> {
        let body = serde_json::to_value(request).expect("serialisable");
        let retry = if request.idempotency_key.is_some() { Retry::Safe } else { Retry::IfNotSent };
        self.call(reqwest::Method::POST, "/v1/tasks", Some(&body), retry, self.request_timeout).await
    }

    /// Submits many tasks; each result is a task id or an error object.
    pub async fn submit_batch(&self, requests: &[SubmitRequest]) -> Result<Vec<Value>, Error> {
        let keyed = requests.iter().all(|r| r.idempotency_key.is_some());
        let body = json!({ "tasks": requests });
        let retry = if keyed { Retry::Safe } else { Retry::IfNotSent };
        let answer: Value =
            self.call(reqwest::Method::POST, "/v1/tasks/batch", Some(&body), retry, self.request_timeout).await?;
        Ok(answer["results"].as_array().cloned().unwrap_or_default())
    }

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
            query.push(format!("queue={queue}"));
        }
        if let Some(state) = state {
            query.push(format!("state={state}"));
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

    pub async fn register(&self, agent_id: &str, capabilities: &[String], capacity: u32) -> Result<Registered, Error> {
        self.post(
            "/v1/agents/register",
            json!({"agent_id": agent_id, "capabilities": capabilities, "capacity": capacity}),
        )
        .await
    }

    pub async fn heartbeat(&self, agent_id: &str, epoch: u64) -> Result<(), Error> {
        let _: Value = self.post(&format!("/v1/agents/{agent_id}/heartbeat"), json!({"epoch": epoch})).await?;
        Ok(())
    }

    pub async fn deregister(&self, agent_id: &str, epoch: u64) -> Result<(), Error> {
        let _: Value = self.post(&format!("/v1/agents/{agent_id}/deregister"), json!({"epoch": epoch})).await?;
        Ok(())
    }

    /// Long-polls for up to `max_tasks` leases, waiting up to `wait_ms`.
    pub async fn poll(
        &self,
        agent_id: &str,
        epoch: u64,
        max_tasks: u32,
        wait_ms: u64,
        lease_ttl_ms: u64,
    ) -> Result<Vec<LeaseGrant>, Error> {
        let body = json!({"epoch": epoch, "max_tasks": max_tasks, "wait_ms": wait_ms, "lease_ttl_ms": lease_ttl_ms});
        let timeout = self.request_timeout + Duration::from_millis(wait_ms);
        let answer: Value = self
            .call(reqwest::Method::POST, &format!("/v1/agents/{agent_id}/poll"), Some(&body), Retry::Safe, timeout)
            .await?;
        serde_json::from_value(answer["leases"].clone()).map_err(|e| Error::Decode(e.to_string()))
    }

    pub async fn complete(&self, task_id: u64, fence: u64, result: &Value) -> Result<Task, Error> {
        self.post(&format!("/v1/tasks/{task_id}/complete"), json!({"fence": fence, "result": result})).await
    }

    pub async fn fail(&self, task_id: u64, fence: u64, error: &str, retryable: bool) -> Result<Task, Error> {
        self.post(&format!("/v1/tasks/{task_id}/fail"), json!({"fence": fence, "error": error, "retryable": retryable}))
            .await
    }

    pub async fn extend(&self, task_id: u64, fence: u64, lease_ttl_ms: u64) -> Result<u64, Error> {
        let answer: Value = self
            .post(&format!("/v1/tasks/{task_id}/extend"), json!({"fence": fence, "lease_ttl_ms": lease_ttl_ms}))
            .await?;
        Ok(answer["valid_until_ms"].as_u64().unwrap_or(0))
    }

    pub async fn progress(&self, task_id: u64, fence: u64) -> Result<(), Error> {
        let _: Value = self.post(&format!("/v1/tasks/{task_id}/progress"), json!({"fence": fence})).await?;
        Ok(())
    }

    /// Records that `task_id` waits on `on` (deadlock-checked by the cluster).
    pub async fn wait(&self, task_id: u64, fence: u64, on: &[u64], timeout_ms: u64) -> Result<Vec<u64>, Error> {
        let body = json!({"fence": fence, "on": on, "timeout_ms": timeout_ms});
        let answer: Value = self.post(&format!("/v1/tasks/{task_id}/wait"), body).await?;
        Ok(answer["pending"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect())
    }

    pub async fn context_get(&self, conversation_id: &str) -> Result<Value, Error> {
        self.get(&format!("/v1/conversations/{conversation_id}")).await
    }

    pub async fn context_put(
        &self,
        conversation_id: &str,
        key: &str,
        value: &Value,
        expected_version: Option<u64>,
    ) -> Result<u64, Error> {
        let mut body = json!({ "value": value });
        if let Some(version) = expected_version {
            body["expected_version"] = json!(version);
        }
        let answer: Value = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/conversations/{conversation_id}/{key}"),
                Some(&body),
                Retry::Safe,
                self.request_timeout,
            )
            .await?;
        Ok(answer["version"].as_u64().unwrap_or(0))
    }

    pub async fn cluster(&self) -> Result<Value, Error> {
        self.get("/v1/cluster").await
    }

    pub async fn status(&self) -> Result<Value, Error> {
        self.get("/v1/status").await
    }

    pub async fn add_member(&self, node_id: u64, addr: &str, raft_addr: Option<&str>) -> Result<Value, Error> {
        self.post("/v1/cluster/members", json!({"node_id": node_id, "addr": addr, "raft_addr": raft_addr})).await
    }

    pub async fn remove_member(&self, node_id: u64) -> Result<Value, Error> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/cluster/members/{node_id}"),
            None,
            Retry::Safe,
            self.request_timeout,
        )
        .await
    }

    pub async fn config_get(&self) -> Result<Value, Error> {
        self.get("/v1/config").await
    }

    pub async fn config_set(&self, set: serde_json::Map<String, Value>) -> Result<Value, Error> {
        let body = json!({ "set": set });
        self.call(reqwest::Method::PUT, "/v1/config", Some(&body), Retry::Safe, self.request_timeout).await
    }

    pub async fn config_history(&self) -> Result<Value, Error> {
        self.get("/v1/config/history").await
    }

    pub async fn config_rollback(&self, version: Option<u64>) -> Result<Value, Error> {
        self.post("/v1/config/rollback", json!({ "version": version })).await
    }

    /// Waits until every task is terminal, polling with backoff.
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
            if Instant::now() >= deadline {
                return Err(Error::Unknown(format!("tasks {ids:?} did not finish within {timeout:?}")));
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(20 * (1 << attempt.min(5)))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse() {
        let client = Client::from_nodes_str(" 127.0.0.1:1, http://127.0.0.1:2 ,", None).unwrap();
        assert_eq!(client.nodes(), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(Client::from_nodes_str(" , ", None).is_err());
    }

    #[test]
    fn backoff_stays_within_its_ceiling() {
        for attempt in 0..20 {
            let pause = backoff(attempt, BACKOFF_BASE, BACKOFF_CAP);
            assert!(pause <= BACKOFF_CAP);
            assert!(pause <= BACKOFF_BASE * (1 << attempt.min(16)));
        }
    }

    #[test]
    fn retry_budget_allows_about_a_tenth() {
        let mut budget = RetryBudget::new(2.0);
        assert!(budget.try_retry() && budget.try_retry());
        assert!(!budget.try_retry(), "the floor is spent");
        for _ in 0..100 {
            budget.on_request();
        }
        let mut retries = 0;
        while budget.try_retry() {
            retries += 1;
        }
        assert_eq!(retries, 2, "capped at tokens_max, earned at 0.1 per request");
    }
}
