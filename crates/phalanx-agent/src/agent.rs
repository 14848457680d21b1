//! The agent runtime: register, heartbeat, long-poll through any node, run
//! handlers with bounded concurrency, extend long leases, report results
//! under the lease's fence, and drain gracefully.
//!
//! Fencing on the agent side: a lease within its safety margin of its local
//! deadline is never started, and a lease older than one already seen for
//! the same task is refused. When no node answers for
//! `orchestrator_timeout_ms`, the agent goes autonomous: results go to the
//! outbox (`outbox.rs`; in memory without an outbox directory) and are
//! reconciled when a node answers again.
//!
//! The rules (margin, fence memory, state, autonomy budget, outbox) are the
//! numbered items of `docs/sdk.md`, which the Python SDK follows too; the
//! decisions are pure functions here (`lease_margin`, `poll_wait_ms`,
//! `mode_of`, `AutonomyBudget`), and the runtime feeds them time and facts.

use crate::client::{
    payload_hash, Child, Client, CompleteItem, Conversation, Error, LeaseGrant, SubmitRequest, Submitted, Task, Usage,
};
use crate::outbox::{Entry, Outbox, Report};
use futures::FutureExt;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct AgentConfig {
    pub nodes: Vec<String>,
    pub token: Option<String>,
    pub agent_id: String,
    pub capabilities: Vec<String>,
    /// Tasks handled at once (the capacity declared to the cluster).
    pub concurrency: u32,
    pub lease_ttl_ms: u64,
    pub poll_wait_ms: u64,
    /// With no answer from any node for this long, the agent goes autonomous.
    pub orchestrator_timeout_ms: u64,
    /// Where the outbox lives (`<dir>/<agent_id>.outbox`); `None` keeps
    /// undelivered results in memory only (lost when the process ends).
    pub outbox_dir: Option<PathBuf>,
    /// The PEM CA file `https://` nodes are verified by (docs/sdk.md, 1;
    /// default `PHALANX_CA_FILE`, else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Local work the agent may do while autonomous, within the budget below.
    pub autonomous_handler: Option<AutonomousHandler>,
    /// Autonomy budget, per outage (docs/sdk.md, 7): runs of the autonomous
    /// handler, and seconds since going autonomous.
    pub autonomy_tasks_max: u32,
    pub autonomy_seconds_max: u64,
}

/// Local work for an autonomous agent (no cluster task: nothing to fence).
pub type AutonomousHandler = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl AgentConfig {
    pub fn new(nodes: Vec<String>, agent_id: impl Into<String>, capabilities: Vec<String>) -> AgentConfig {
        AgentConfig {
            nodes,
            token: None,
            agent_id: agent_id.into(),
            capabilities,
            concurrency: 1,
            lease_ttl_ms: 30_000,
            poll_wait_ms: 10_000,
            orchestrator_timeout_ms: 5_000,
            outbox_dir: None,
            ca_file: None,
            autonomous_handler: None,
            autonomy_tasks_max: 0,
            autonomy_seconds_max: 0,
        }
    }
}

/// A handler failure; `retryable: false` fails the task for good.
#[derive(Clone, Debug)]
pub struct HandlerError {
    pub message: String,
    pub retryable: bool,
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), retryable: true }
    }
    pub fn fatal(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), retryable: false }
    }
}

impl From<Error> for HandlerError {
    fn from(error: Error) -> HandlerError {
        HandlerError::retryable(error.to_string())
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;
pub type Handler = Arc<dyn Fn(TaskContext) -> HandlerFuture + Send + Sync>;

/// Wraps an async function as a handler.
pub fn handler<F, Fut>(function: F) -> Handler
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
{
    Arc::new(move |context| Box::pin(function(context)))
}

/// What a handler gets: the task, its fence and deadline, the children
/// earlier attempts delegated, and delegation helpers.
#[derive(Clone)]
pub struct TaskContext {
    pub task: Task,
    /// The fencing token: pass it to any system the handler writes to.
    pub fence: u64,
    /// Local instant after which the lease, as granted, may have lapsed;
    /// `lease_deadline()` follows the extensions.
    pub valid_until: Instant,
    /// The task's children when the lease was granted (`lease.children`):
    /// a planner that replaces another sees what it delegated. Delegating
    /// the same step again adopts the child instead of making a duplicate.
    pub children: Vec<Child>,
    lease_deadline: Arc<Mutex<Instant>>,
    client: Arc<Client>,
    /// Delegations of this attempt per step (queue, payload hash), so that
    /// each gets its own idempotency key and a retried one the same.
    steps: Arc<Mutex<BTreeMap<(String, u64), u32>>>,
    /// What the handler reported it consumed, sent with its result.
    usage: Arc<Mutex<Option<Usage>>>,
}

impl TaskContext {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The task's W3C Trace Context (`docs/sdk.md` item 12): the node's
    /// submit span of the task. A handler that records spans makes them
    /// children of it, so they join the submitter's trace. `None` for a task
    /// submitted to a node that did not record one.
    pub fn traceparent(&self) -> Option<&str> {
        self.task.traceparent.as_deref()
    }

    /// Adds to what this attempt consumed (tokens, cost); the sum goes with
    /// its result or failure, counted against the task's key's
    /// `tokens_per_minute` and its tree's budget.
    pub fn report_usage(&self, usage: Usage) {
        let mut total = self.usage.lock().expect("usage lock");
        let sum = total.get_or_insert_with(Usage::default);
        sum.tokens_in = sum.tokens_in.saturating_add(usage.tokens_in);
        sum.tokens_out = sum.tokens_out.saturating_add(usage.tokens_out);
        sum.cost = sum.cost.saturating_add(usage.cost);
    }

    /// What the attempt has reported so far.
    pub fn usage(&self) -> Option<Usage> {
        *self.usage.lock().expect("usage lock")
    }

    /// Local instant the lease runs to, as extended so far; in the past once
    /// the cluster refused an extension (the lease is lost: stop writing).
    pub fn lease_deadline(&self) -> Instant {
        *self.lease_deadline.lock().expect("lease lock")
    }

    /// Submits a child task on another capability (fan-out); the child
    /// inherits the conversation and extends the delegation trail. A step an
    /// earlier attempt of this task delegated already (same queue, same
    /// payload) answers with that child, adopted: see `delegate`.
    pub async fn spawn_child(&self, queue: &str, payload: Value) -> Result<u64, Error> {
        Ok(self.delegate(queue, payload).await?.task_id)
    }

    /// `spawn_child`, answering whether the child was adopted from an
    /// earlier attempt. Fenced by this lease: refused `superseded` or
    /// `lease_expired` once the lease is lost.
    pub async fn delegate(&self, queue: &str, payload: Value) -> Result<Submitted, Error> {
        let hash = payload_hash(&payload.to_string());
        let ordinal = {
            let mut steps = self.steps.lock().expect("steps lock");
            let count = steps.entry((queue.to_string(), hash)).or_default();
            *count += 1;
            *count
        };
        let mut request = SubmitRequest::new(queue, payload).with_parent(self.task.id, self.fence);
        request.conversation_id = self.task.conversation_id.clone();
        // One key per step of this attempt: a retried request finds its child.
        // A later attempt sends other keys; the cluster matches its steps to
        // the children of earlier attempts by queue and payload.
        request.idempotency_key =
            Some(format!("child-{}-{}-{}-{ordinal}-{hash:016x}", self.task.id, self.fence, queue));
        self.client.submit(&request).await
    }

    /// Waits for tasks to finish (fan-in). The wait is declared to the
    /// cluster first, so a wait that would deadlock is refused at once.
    pub async fn await_tasks(&self, ids: &[u64], timeout: Duration) -> Result<Vec<Task>, Error> {
        self.client.wait(self.task.id, self.fence, ids, timeout.as_millis().max(1) as u64).await?;
        self.client.await_tasks(ids, timeout).await
    }

    /// Hands the work to another capability: spawns the child and returns
    /// the result to record for this task.
    pub async fn hand_off(&self, queue: &str, payload: Value) -> Result<Value, Error> {
        let child = self.spawn_child(queue, payload).await?;
        Ok(serde_json::json!({ "handed_off_to": child }))
    }

    /// The task's conversation; `None` when it has none or it is still empty.
    pub async fn context_get(&self) -> Result<Option<Conversation>, Error> {
        let Some(conversation) = &self.task.conversation_id else { return Ok(None) };
        match self.client.context_get(conversation).await {
            Ok(conversation) => Ok(Some(conversation)),
            Err(error) if error.code() == Some("not_found") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Compare-and-set on the task's conversation (0 = only if absent), on
    /// this task's behalf under its lease: refused once the lease is lost,
    /// and discarded if this attempt is superseded.
    pub async fn context_put(&self, key: &str, value: &Value, expected_version: Option<u64>) -> Result<u64, Error> {
        let conversation = self
            .task
            .conversation_id
            .as_deref()
            .ok_or_else(|| Error::Decode("the task has no conversation_id".into()))?;
        self.client.context_put_as((self.task.id, self.fence), conversation, key, value, expected_version).await
    }

    /// Reports progress on a long task (a lease without progress is revoked as stuck).
    pub async fn progress(&self) -> Result<(), Error> {
        self.client.progress(self.task.id, self.fence).await
    }
}

/// The cluster forgot this session (404 `agent_not_found`, 409 `stale_epoch`).
fn session_lost(error: &Error) -> bool {
    matches!(error.code(), Some("agent_not_found" | "stale_epoch"))
}

/// The agent's connection to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Connected = 0,
    Autonomous = 1,
    Reconciling = 2,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Connected => "connected",
            Mode::Autonomous => "autonomous",
            Mode::Reconciling => "reconciling",
        }
    }
}

#[derive(Default)]
pub struct AgentStats {
    pub autonomous_runs: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub superseded: AtomicU64,
    /// Reports refused for good with another code than `superseded`.
    pub rejected: AtomicU64,
    pub refused_expired: AtomicU64,
    pub refused_stale: AtomicU64,
    pub outboxed: AtomicU64,
    pub reconciled: AtomicU64,
    mode: AtomicU8,
}

impl AgentStats {
    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            1 => Mode::Autonomous,
            2 => Mode::Reconciling,
            _ => Mode::Connected,
        }
    }
    /// Sets the mode; whether it changed.
    fn set_mode(&self, mode: Mode, agent_id: &str) -> bool {
        let changed = self.mode.swap(mode as u8, Ordering::Relaxed) != mode as u8;
        if changed {
            tracing::warn!(agent_id, mode = mode.as_str(), "agent mode changed");
        }
        changed
    }
}

/// The agent's state from two facts (docs/sdk.md, 6): how long no node has
/// answered, and whether results are owed.
pub fn mode_of(silent: Duration, orchestrator_timeout: Duration, outbox_len: usize) -> Mode {
    if silent >= orchestrator_timeout {
        Mode::Autonomous
    } else if outbox_len > 0 {
        Mode::Reconciling
    } else {
        Mode::Connected
    }
}

/// The autonomy budget of one outage (docs/sdk.md, 7): renewed each time
/// the agent becomes autonomous.
#[derive(Clone, Copy, Debug)]
pub struct AutonomyBudget {
    runs_max: u32,
    duration_max: Duration,
    since: Instant,
    runs: u32,
}

impl AutonomyBudget {
    pub fn new(runs_max: u32, duration_max: Duration, now: Instant) -> AutonomyBudget {
        AutonomyBudget { runs_max, duration_max, since: now, runs: 0 }
    }

    /// A new outage began at `now`: the whole budget again.
    pub fn renew(&mut self, now: Instant) {
        self.since = now;
        self.runs = 0;
    }

    /// Takes one run if the budget allows it; the time the run may take.
    pub fn take_run(&mut self, now: Instant) -> Option<Duration> {
        let left = self.duration_max.checked_sub(now.saturating_duration_since(self.since))?;
        if self.runs >= self.runs_max || left.is_zero() {
            return None;
        }
        self.runs += 1;
        Some(left)
    }
}

/// The newest fence seen per task, at most `SEEN_FENCES_MAX` tasks, the
/// least recently seen forgotten first (docs/sdk.md, 3).
pub struct SeenFences {
    /// task id -> (newest fence, when last seen).
    fences: BTreeMap<u64, (u64, u64)>,
    /// when last seen -> task id, oldest first.
    order: BTreeMap<u64, u64>,
    clock: u64,
}

pub const SEEN_FENCES_MAX: usize = 10_000;

impl SeenFences {
    pub fn new() -> SeenFences {
        SeenFences { fences: BTreeMap::new(), order: BTreeMap::new(), clock: 0 }
    }

    /// Accepts a lease unless a newer one was already seen for the task.
    pub fn accept(&mut self, task_id: u64, fence: u64) -> bool {
        self.clock += 1;
        match self.fences.get(&task_id).copied() {
            Some((seen, _)) if seen > fence => false,
            Some((_, last)) => {
                self.order.remove(&last);
                self.order.insert(self.clock, task_id);
                self.fences.insert(task_id, (fence, self.clock));
                true
            }
            None => {
                if self.fences.len() >= SEEN_FENCES_MAX {
                    if let Some((_, oldest)) = self.order.pop_first() {
                        self.fences.remove(&oldest);
                    }
                }
                self.order.insert(self.clock, task_id);
                self.fences.insert(task_id, (fence, self.clock));
                true
            }
        }
    }
}

impl Default for SeenFences {
    fn default() -> Self {
        SeenFences::new()
    }
}

/// The lease safety margin's floor (docs/sdk.md, 2).
pub const LEASE_MARGIN: Duration = Duration::from_millis(200);
/// The lease safety margin's ceiling (docs/sdk.md, 2).
pub const LEASE_MARGIN_MAX: Duration = Duration::from_secs(1);

/// How close to a lease's local deadline work is no longer started: a tenth
/// of the lease, at least `LEASE_MARGIN` and at most `LEASE_MARGIN_MAX`.
pub fn lease_margin(lease_ttl_ms: u64) -> Duration {
    (Duration::from_millis(lease_ttl_ms) / 10).clamp(LEASE_MARGIN, LEASE_MARGIN_MAX)
}

/// Whether a lease granted with `lease_ttl_ms` on a poll sent at `sent_at`
/// may still be started: the lease counts from the poll's sending.
pub fn lease_startable(sent_at: Instant, lease_ttl_ms: u64, now: Instant) -> bool {
    sent_at + Duration::from_millis(lease_ttl_ms) > now + lease_margin(lease_ttl_ms)
}

/// How long a poll may wait for work: at most half the lease, so that a
/// lease granted at the end of the wait still has half its time.
pub fn poll_wait_ms(poll_wait_ms: u64, lease_ttl_ms: u64) -> u64 {
    poll_wait_ms.min(lease_ttl_ms / 2)
}

pub struct Agent {
    config: AgentConfig,
    client: Arc<Client>,
    batcher: Arc<crate::batch::CompleteBatcher>,
    handler: Handler,
    pub stats: Arc<AgentStats>,
    seen: Mutex<SeenFences>,
    outbox: Arc<Outbox>,
    epoch: AtomicU64,
    /// Held while re-registering, so that the heartbeat and the poll loop do
    /// not both start a session (the second would release the first's leases).
    registering: tokio::sync::Mutex<()>,
    /// When a node last answered this agent.
    last_contact: Mutex<Instant>,
    /// The autonomy budget of the current (or last) outage.
    autonomy: Mutex<AutonomyBudget>,
}

impl Agent {
    pub fn new(config: AgentConfig, handler: Handler) -> Result<Arc<Agent>, Error> {
        let mut client = Client::new(config.nodes.clone(), config.token.clone())?.with_name(config.agent_id.clone());
        if let Some(path) = &config.ca_file {
            client = client.with_ca_file(path)?;
        }
        let outbox = match &config.outbox_dir {
            Some(dir) => Outbox::open(&dir.join(format!("{}.outbox", config.agent_id)))
                .map_err(|error| Error::Outbox(error.to_string()))?,
            None => {
                tracing::warn!(agent_id = %config.agent_id, "no outbox_dir: undelivered results are kept in memory only");
                Outbox::in_memory()
            }
        };
        let autonomy = AutonomyBudget::new(
            config.autonomy_tasks_max,
            Duration::from_secs(config.autonomy_seconds_max),
            Instant::now(),
        );
        Ok(Arc::new(Agent {
            config,
            client: Arc::new(client),
            batcher: Arc::default(),
            handler,
            stats: Arc::new(AgentStats::default()),
            seen: Mutex::new(SeenFences::new()),
            outbox: Arc::new(outbox),
            epoch: AtomicU64::new(0),
            registering: tokio::sync::Mutex::new(()),
            last_contact: Mutex::new(Instant::now()),
            autonomy: Mutex::new(autonomy),
        }))
    }

    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// Counters and mode, readable while the agent runs.
    pub fn stats(&self) -> &AgentStats {
        &self.stats
    }

    /// Batch complete requests sent so far (each carries up to `crate::batch::BATCH_MAX` results).
    pub fn complete_requests(&self) -> u64 {
        self.batcher.requests.load(Ordering::Relaxed)
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Sets the mode from the facts (docs/sdk.md, 6); entering autonomy
    /// renews the autonomy budget (7).
    fn refresh_mode(&self) {
        let silent = self.last_contact.lock().expect("contact lock").elapsed();
        let timeout = Duration::from_millis(self.config.orchestrator_timeout_ms);
        let mode = mode_of(silent, timeout, self.outbox.len());
        if self.stats.set_mode(mode, &self.config.agent_id) && mode == Mode::Autonomous {
            self.autonomy.lock().expect("autonomy lock").renew(Instant::now());
        }
    }

    /// A node answered.
    fn contact(&self) {
        *self.last_contact.lock().expect("contact lock") = Instant::now();
        self.refresh_mode();
    }

    /// A request failed: a 4xx is still an answer; anything else is not.
    fn note_failure(&self, error: &Error) {
        if error.is_answer() {
            self.contact();
        } else {
            self.refresh_mode();
        }
    }

    async fn register(&self) -> Result<u64, Error> {
        let registered =
            self.client.register(&self.config.agent_id, &self.config.capabilities, self.config.concurrency).await?;
        self.epoch.store(registered.epoch, Ordering::SeqCst);
        self.contact();
        Ok(registered.heartbeat_interval_ms)
    }

    /// Starts a new session after the cluster forgot `stale_epoch`, unless
    /// another loop already did; pauses after a failure so that a refusal
    /// does not turn into a busy loop.
    async fn reregister(&self, stale_epoch: u64) {
        let _guard = self.registering.lock().await;
        if self.epoch.load(Ordering::SeqCst) != stale_epoch {
            return;
        }
        tracing::warn!(agent_id = %self.config.agent_id, stale_epoch, "session lost; registering again");
        if let Err(error) = self.register().await {
            self.note_failure(&error);
            tracing::warn!(agent_id = %self.config.agent_id, %error, "registering again failed");
            tokio::time::sleep(crate::client::backoff(4, Duration::from_millis(100), Duration::from_secs(2))).await;
        }
    }

    /// Runs until SIGTERM or ctrl-c, then drains.
    pub async fn run(self: Arc<Self>) -> Result<(), Error> {
        let shutdown = async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        self.run_until(shutdown).await
    }

    /// Runs until `shutdown` resolves: then stops polling, finishes the tasks
    /// in hand, reports them, and deregisters.
    pub async fn run_until(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let mut attempt = 0;
        let heartbeat_ms = loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                registered = self.register() => match registered {
                    Ok(ms) => break ms,
                    Err(error) => {
                        self.note_failure(&error);
                        attempt += 1;
                        tokio::time::sleep(crate::client::backoff(attempt, Duration::from_millis(100), Duration::from_secs(2))).await;
                    }
                }
            }
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let heartbeats = tokio::spawn(self.clone().heartbeat_loop(heartbeat_ms, stopped.clone()));
        let flusher = tokio::spawn(self.clone().flush_loop(stopped));
        let slots = Arc::new(Semaphore::new(self.config.concurrency as usize));
        let wait_ms = poll_wait_ms(self.config.poll_wait_ms, self.config.lease_ttl_ms);
        loop {
            let free = slots.available_permits() as u32;
            if free == 0 {
                tokio::select! {
                    _ = &mut shutdown => break,
                    permit = slots.clone().acquire_owned() => { drop(permit); continue; }
                }
            }
            let sent_at = Instant::now();
            let epoch = self.epoch.load(Ordering::SeqCst);
            let polled = tokio::select! {
                _ = &mut shutdown => break,
                polled = self.client.poll(&self.config.agent_id, epoch, free, wait_ms, self.config.lease_ttl_ms) => polled,
            };
            match polled {
                Ok(grants) => {
                    self.contact();
                    for grant in grants {
                        self.clone().start(grant, sent_at, slots.clone());
                    }
                }
                Err(error) if session_lost(&error) => self.reregister(epoch).await,
                Err(error) => {
                    if let Error::Api { .. } = error {
                        tracing::warn!(agent_id = %self.config.agent_id, %error, "poll refused");
                    }
                    self.note_failure(&error);
                    self.autonomy_step().await;
                    tokio::time::sleep(crate::client::backoff(3, Duration::from_millis(100), Duration::from_secs(1)))
                        .await;
                }
            }
        }
        // Drain: every slot back means every handler finished and reported.
        let _all = slots.acquire_many(self.config.concurrency).await;
        let _ = stop.send(true);
        let _ = heartbeats.await;
        let _ = flusher.await;
        let _ = self.client.deregister(&self.config.agent_id, self.epoch.load(Ordering::SeqCst)).await;
        Ok(())
    }

    /// While autonomous, runs the declared local work within this outage's
    /// autonomy budget; a run past the budget's time is abandoned.
    async fn autonomy_step(&self) {
        let Some(work) = &self.config.autonomous_handler else { return };
        if self.stats.mode() != Mode::Autonomous {
            return;
        }
        let Some(left) = self.autonomy.lock().expect("autonomy lock").take_run(Instant::now()) else { return };
        self.stats.autonomous_runs.fetch_add(1, Ordering::Relaxed);
        if tokio::time::timeout(left, work()).await.is_err() {
            tracing::warn!(agent_id = %self.config.agent_id, "autonomous work ran past the autonomy budget; abandoned");
        }
    }

    fn start(self: Arc<Self>, grant: LeaseGrant, sent_at: Instant, slots: Arc<Semaphore>) {
        let now = Instant::now();
        if !lease_startable(sent_at, grant.lease_ttl_ms, now) {
            self.stats.refused_expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                task_id = grant.task.id,
                fence = grant.fence,
                "refusing an instruction already past its lease"
            );
            return;
        }
        if !self.seen.lock().expect("seen lock").accept(grant.task.id, grant.fence) {
            self.stats.refused_stale.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                task_id = grant.task.id,
                fence = grant.fence,
                "refusing a lease older than one already seen"
            );
            return;
        }
        let Ok(permit) = slots.try_acquire_owned() else {
            // More grants than free slots cannot happen (we ask for `free`); drop safely: the lease expires.
            return;
        };
        tokio::spawn(async move {
            let valid_until = sent_at + Duration::from_millis(grant.lease_ttl_ms);
            let lease_deadline = Arc::new(Mutex::new(valid_until));
            let context = TaskContext {
                task: grant.task.clone(),
                fence: grant.fence,
                valid_until,
                children: grant.children.clone(),
                lease_deadline: lease_deadline.clone(),
                client: self.client.clone(),
                steps: Arc::default(),
                usage: Arc::default(),
            };
            let usage = context.usage.clone();
            let extender = tokio::spawn(self.clone().extend_loop(grant.task.id, grant.fence, lease_deadline));
            // A panicking handler is a failed attempt, not a lease kept alive
            // by its extender until the cluster revokes it as stuck.
            let outcome = AssertUnwindSafe((self.handler)(context)).catch_unwind().await;
            extender.abort();
            let usage = *usage.lock().expect("usage lock");
            let report = match outcome {
                Ok(Ok(result)) => Report::Complete { result, usage },
                Ok(Err(error)) => Report::Fail { error: error.message, retryable: error.retryable, usage },
                Err(_) => Report::Fail { error: "the handler panicked".into(), retryable: true, usage },
            };
            self.report(Entry { task_id: grant.task.id, fence: grant.fence, report }).await;
            drop(permit);
        });
    }

    /// Keeps the lease of a long task alive (every third of its
    /// time-to-live, so that one lost extension still leaves time for the next).
    async fn extend_loop(self: Arc<Self>, task_id: u64, fence: u64, lease_deadline: Arc<Mutex<Instant>>) {
        let ttl = Duration::from_millis(self.config.lease_ttl_ms);
        let period = (ttl / 3).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(period).await;
            let sent_at = Instant::now();
            match self.client.extend(task_id, fence, self.config.lease_ttl_ms).await {
                Ok(_) => {
                    self.contact();
                    // Counted from the request's start, as for a poll: never later than the leader's view.
                    *lease_deadline.lock().expect("lease lock") = sent_at + ttl;
                }
                Err(error) if error.is_definite() => {
                    self.note_failure(&error);
                    tracing::warn!(task_id, fence, %error, "lease lost: extension refused");
                    *lease_deadline.lock().expect("lease lock") = Instant::now();
                    return;
                }
                Err(error) => self.note_failure(&error),
            }
        }
    }

    /// Reports a result under its fence; when no node takes it (or the agent
    /// is autonomous), keeps it in the outbox for reconciliation.
    async fn report(&self, entry: Entry) {
        if self.stats.mode() != Mode::Autonomous {
            // Not longer than orchestrator_timeout: past it, the agent is on its own.
            let timeout = Duration::from_millis(self.config.orchestrator_timeout_ms);
            match tokio::time::timeout(timeout, self.send(&entry)).await {
                Ok(Ok(())) => return,
                Ok(Err(error)) => {
                    tracing::warn!(task_id = entry.task_id, %error, "result not delivered; to the outbox")
                }
                Err(_) => {
                    tracing::warn!(task_id = entry.task_id, "no node took the result within {timeout:?}; to the outbox")
                }
            }
        }
        match self.outbox.push(&entry) {
            Ok(()) => {
                self.stats.outboxed.fetch_add(1, Ordering::Relaxed);
            }
            // The lease lapses and the task is run again: at least once still holds.
            Err(error) => tracing::error!(task_id = entry.task_id, %error, "result dropped: the outbox refused it"),
        }
        self.refresh_mode();
    }

    /// Sends one report. A definite answer (accepted, superseded, refused
    /// for good) is final; a transient refusal or no answer is an error.
    async fn send(&self, entry: &Entry) -> Result<(), Error> {
        let answer = match &entry.report {
            Report::Complete { result, usage } => {
                let item =
                    CompleteItem { task_id: entry.task_id, fence: entry.fence, result: result.clone(), usage: *usage };
                self.batcher.complete(&self.client, item).await
            }
            Report::Fail { error, retryable, usage } => {
                self.client.fail_with_usage(entry.task_id, entry.fence, error, *retryable, *usage).await.map(|_| ())
            }
        };
        match answer {
            Ok(()) => {
                self.contact();
                let counter = if matches!(entry.report, Report::Complete { .. }) {
                    &self.stats.completed
                } else {
                    &self.stats.failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) if error.is_superseded() => {
                self.contact();
                self.stats.superseded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    task_id = entry.task_id,
                    fence = entry.fence,
                    "result superseded: another lease owns the task now"
                );
                Ok(())
            }
            Err(error) if error.is_definite() => {
                self.note_failure(&error);
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(task_id = entry.task_id, %error, "result refused for good");
                Ok(())
            }
            // Overload, no leader, no answer: not an answer about the result; try again later.
            Err(error) => {
                self.note_failure(&error);
                Err(error)
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, interval_ms: u64, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(Duration::from_millis(interval_ms.max(100)));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = interval.tick() => {}
            }
            let epoch = self.epoch.load(Ordering::SeqCst);
            match self.client.heartbeat(&self.config.agent_id, epoch).await {
                Ok(()) => self.contact(),
                Err(error) if matches!(error.status(), Some(404 | 409)) => self.reregister(epoch).await,
                Err(error) => self.note_failure(&error),
            }
        }
    }

    /// Delivers the outbox, oldest first, whenever the agent is not
    /// autonomous, and keeps the mode current (docs/sdk.md, 6): at least
    /// every 200 ms, with or without an outbox directory.
    async fn flush_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut stopping = false;
        // The delivery in flight, kept across rounds: an answer slower than
        // the wait below is waited for again, never asked for a second time
        // (a result sent twice at once would be taken twice, the second
        // answered as already done).
        let mut delivery: Option<Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>> = None;
        loop {
            tokio::select! {
                _ = stop.changed(), if !stopping => stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            self.refresh_mode();
            if self.stats.mode() != Mode::Autonomous {
                loop {
                    if delivery.is_none() {
                        let Some(entry) = self.outbox.front() else { break };
                        let agent = self.clone();
                        delivery = Some(Box::pin(async move { agent.send(&entry).await }));
                    }
                    let in_flight = delivery.as_mut().expect("a delivery is in flight");
                    let wait = Duration::from_millis(self.config.orchestrator_timeout_ms);
                    let Ok(answer) = tokio::time::timeout(wait, in_flight).await else { break };
                    delivery = None;
                    if answer.is_err() {
                        break;
                    }
                    self.stats.reconciled.fetch_add(1, Ordering::Relaxed);
                    if let Err(error) = self.outbox.pop_front() {
                        tracing::error!(%error, "outbox update failed");
                        break;
                    }
                    self.refresh_mode();
                }
            }
            if stopping {
                // One last delivery attempt was made above; what remains stays durable for the next start.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_fence_is_refused_and_the_map_is_bounded() {
        let mut seen = SeenFences::new();
        assert!(seen.accept(1, 10));
        assert!(!seen.accept(1, 9), "older than one already seen");
        assert!(seen.accept(1, 12));
        assert!(seen.accept(1, 12), "the same lease again is not older");
        for task in 2..=(SEEN_FENCES_MAX as u64) {
            assert!(seen.accept(task, 1));
        }
        assert!(!seen.accept(1, 11), "still remembered at the limit");
        assert!(seen.accept(SEEN_FENCES_MAX as u64 + 1, 1), "one past the limit");
        assert!(seen.accept(1, 11), "the oldest task was forgotten");
        assert!(!seen.accept(3, 0), "the others were not");
    }

    /// docs/sdk.md, 3: the least recently *seen* task is forgotten first,
    /// so a task whose leases keep coming is remembered.
    #[test]
    fn sdk_3_fence_memory_forgets_the_least_recently_seen_task() {
        let mut seen = SeenFences::new();
        assert!(seen.accept(1, 10));
        for task in 2..(SEEN_FENCES_MAX as u64) {
            assert!(seen.accept(task, 1));
        }
        assert!(seen.accept(1, 10), "task 1 seen again: now the most recent");
        assert!(seen.accept(SEEN_FENCES_MAX as u64, 1), "at the limit");
        assert!(seen.accept(SEEN_FENCES_MAX as u64 + 1, 1), "one past it: task 2 is forgotten");
        assert!(!seen.accept(1, 9), "task 1 is still remembered");
        assert!(seen.accept(2, 0), "task 2 was forgotten");
    }

    /// docs/sdk.md, 2: a tenth of the lease, within 200 ms and 1 s.
    #[test]
    fn sdk_2_lease_margin_is_a_tenth_of_the_ttl_within_200ms_and_1s() {
        fn check(lease_ttl_ms: u64, margin_ms: u64) {
            assert_eq!(lease_margin(lease_ttl_ms), Duration::from_millis(margin_ms), "{lease_ttl_ms}");
        }
        check(100, 200);
        check(1_000, 200);
        check(5_000, 500);
        check(30_000, 1_000);
        let sent = Instant::now();
        let at = |ms| sent + Duration::from_millis(ms);
        assert!(lease_startable(sent, 1_000, sent));
        assert!(lease_startable(sent, 1_000, at(799)));
        assert!(!lease_startable(sent, 1_000, at(800)));
        assert!(lease_startable(sent, 5_000, at(4_499)));
        assert!(!lease_startable(sent, 5_000, at(4_600)), "a 5 s lease keeps 500 ms, not 200");
        assert!(!lease_startable(sent, 200, sent), "a lease no longer than the floor is never started");
        assert!(lease_startable(sent, 60_000, at(58_999)));
        assert!(!lease_startable(sent, 60_000, at(59_000)));
    }

    /// docs/sdk.md, 2: a poll waits at most half the lease.
    #[test]
    fn sdk_2_a_poll_waits_at_most_half_the_lease() {
        assert_eq!(poll_wait_ms(10_000, 1_000), 500);
        assert_eq!(poll_wait_ms(300, 30_000), 300);
        assert_eq!(poll_wait_ms(10_000, 30_000), 10_000);
    }

    /// docs/sdk.md, 6: the state is a function of silence and the outbox.
    #[test]
    fn sdk_6_agent_state_follows_silence_and_the_outbox() {
        let timeout = Duration::from_millis(500);
        let check = |silent_ms, outbox_len, expected: Mode| {
            assert_eq!(mode_of(Duration::from_millis(silent_ms), timeout, outbox_len), expected);
        };
        check(0, 0, Mode::Connected);
        check(499, 0, Mode::Connected);
        check(0, 3, Mode::Reconciling);
        check(500, 0, Mode::Autonomous);
        check(500, 3, Mode::Autonomous);
    }

    /// docs/sdk.md, 7: the budget is per outage.
    #[test]
    fn sdk_7_autonomy_budget_is_renewed_per_outage() {
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        let mut budget = AutonomyBudget::new(2, Duration::from_secs(10), start);
        assert_eq!(budget.take_run(at(1)), Some(Duration::from_secs(9)));
        assert_eq!(budget.take_run(at(2)), Some(Duration::from_secs(8)));
        assert_eq!(budget.take_run(at(3)), None, "two runs per outage");
        budget.renew(at(100));
        assert!(budget.take_run(at(101)).is_some(), "a new outage, a new budget");
        assert_eq!(budget.take_run(at(111)), None, "ten seconds per outage");
    }
}
