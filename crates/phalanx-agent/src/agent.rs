//! The agent runtime: register, heartbeat, long-poll through any node, run
//! handlers with bounded concurrency, extend long leases, report results
//! under the lease's fence, and drain gracefully.
//!
//! Fencing on the agent side: a lease already past its local deadline is
//! never started, and a lease older than one already seen for the same task
//! is refused. When no node answers for `orchestrator_timeout_ms`, the agent
//! goes autonomous: results go to the durable outbox (`outbox.rs`) and are
//! reconciled when a node answers again.

use crate::client::{payload_hash, Child, Client, Conversation, Error, LeaseGrant, SubmitRequest, Submitted, Task};
use crate::outbox::{Entry, Outbox, Report};
use futures::FutureExt;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
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
    /// Where the outbox lives; `None` keeps no outbox (results are retried in memory only).
    pub outbox_dir: Option<PathBuf>,
    /// Local work the agent may do while autonomous, within the budget below.
    pub autonomous_handler: Option<AutonomousHandler>,
    /// Autonomy budget: runs of the autonomous handler, and seconds since going autonomous.
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
}

impl TaskContext {
    pub fn client(&self) -> &Client {
        &self.client
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
    fn set_mode(&self, mode: Mode, agent_id: &str) {
        if self.mode.swap(mode as u8, Ordering::Relaxed) != mode as u8 {
            tracing::warn!(agent_id, mode = mode.as_str(), "agent mode changed");
        }
    }
}

/// The newest fence seen per task, at most `SEEN_FENCES_MAX` tasks (oldest forgotten first).
pub struct SeenFences {
    fences: BTreeMap<u64, u64>,
    order: VecDeque<u64>,
}

pub const SEEN_FENCES_MAX: usize = 10_000;

impl SeenFences {
    pub fn new() -> SeenFences {
        SeenFences { fences: BTreeMap::new(), order: VecDeque::new() }
    }

    /// Accepts a lease unless a newer one was already seen for the task.
    pub fn accept(&mut self, task_id: u64, fence: u64) -> bool {
        match self.fences.get(&task_id) {
            Some(&seen) if seen > fence => false,
            Some(_) => {
                self.fences.insert(task_id, fence);
                true
            }
            None => {
                if self.order.len() >= SEEN_FENCES_MAX {
                    if let Some(oldest) = self.order.pop_front() {
                        self.fences.remove(&oldest);
                    }
                }
                self.order.push_back(task_id);
                self.fences.insert(task_id, fence);
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

/// Safety margin kept from a lease's end: work is not started this close to it.
pub const LEASE_MARGIN: Duration = Duration::from_millis(200);

/// Whether a lease granted with `lease_ttl_ms` on a poll sent at `sent_at` may still be started.
pub fn lease_startable(sent_at: Instant, lease_ttl_ms: u64, now: Instant) -> bool {
    sent_at + Duration::from_millis(lease_ttl_ms) > now + LEASE_MARGIN
}

pub struct Agent {
    config: AgentConfig,
    client: Arc<Client>,
    handler: Handler,
    pub stats: Arc<AgentStats>,
    seen: Mutex<SeenFences>,
    outbox: Option<Arc<Outbox>>,
    epoch: AtomicU64,
    /// Held while re-registering, so that the heartbeat and the poll loop do
    /// not both start a session (the second would release the first's leases).
    registering: tokio::sync::Mutex<()>,
    /// When a node last answered this agent.
    last_contact: Mutex<Instant>,
    /// When the agent last went autonomous.
    autonomous_since: Mutex<Option<Instant>>,
}

impl Agent {
    pub fn new(config: AgentConfig, handler: Handler) -> Result<Arc<Agent>, Error> {
        let client = Client::new(config.nodes.clone(), config.token.clone())?.with_name(config.agent_id.clone());
        let outbox = match &config.outbox_dir {
            Some(dir) => Some(Arc::new(
                Outbox::open(&dir.join(format!("{}.outbox", config.agent_id)))
                    .map_err(|e| Error::Decode(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Arc::new(Agent {
            config,
            client: Arc::new(client),
            handler,
            stats: Arc::new(AgentStats::default()),
            seen: Mutex::new(SeenFences::new()),
            outbox,
            epoch: AtomicU64::new(0),
            registering: tokio::sync::Mutex::new(()),
            last_contact: Mutex::new(Instant::now()),
            autonomous_since: Mutex::new(None),
        }))
    }

    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// Counters and mode, readable while the agent runs.
    pub fn stats(&self) -> &AgentStats {
        &self.stats
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.as_ref().map(|o| o.len()).unwrap_or(0)
    }

    fn contact(&self) {
        *self.last_contact.lock().expect("contact lock") = Instant::now();
        if self.stats.mode() == Mode::Autonomous {
            self.stats.set_mode(Mode::Reconciling, &self.config.agent_id);
        }
    }

    fn note_failure(&self, error: &Error) {
        if error.is_unreachable() || matches!(error, Error::Unknown(_)) {
            let silent = self.last_contact.lock().expect("contact lock").elapsed();
            if silent >= Duration::from_millis(self.config.orchestrator_timeout_ms) {
                self.stats.set_mode(Mode::Autonomous, &self.config.agent_id);
            }
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
                polled = self.client.poll(&self.config.agent_id, epoch, free, self.config.poll_wait_ms, self.config.lease_ttl_ms) => polled,
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

    /// While autonomous, runs the declared local work within the autonomy budget.
    async fn autonomy_step(&self) {
        let Some(work) = &self.config.autonomous_handler else { return };
        if self.stats.mode() != Mode::Autonomous {
            *self.autonomous_since.lock().expect("autonomy lock") = None;
            return;
        }
        let since = *self.autonomous_since.lock().expect("autonomy lock").get_or_insert_with(Instant::now);
        let within_time = since.elapsed() <= Duration::from_secs(self.config.autonomy_seconds_max);
        let within_count = self.stats.autonomous_runs.load(Ordering::Relaxed) < self.config.autonomy_tasks_max as u64;
        if within_time && within_count {
            self.stats.autonomous_runs.fetch_add(1, Ordering::Relaxed);
            work().await;
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
            };
            let extender = tokio::spawn(self.clone().extend_loop(grant.task.id, grant.fence, lease_deadline));
            // A panicking handler is a failed attempt, not a lease kept alive
            // by its extender until the cluster revokes it as stuck.
            let outcome = AssertUnwindSafe((self.handler)(context)).catch_unwind().await;
            extender.abort();
            let report = match outcome {
                Ok(Ok(result)) => Report::Complete { result },
                Ok(Err(error)) => Report::Fail { error: error.message, retryable: error.retryable },
                Err(_) => Report::Fail { error: "the handler panicked".into(), retryable: true },
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
                Err(Error::Api { status: 429 | 503, .. }) => {}
                Err(error @ Error::Api { .. }) => {
                    tracing::warn!(task_id, fence, %error, "lease lost: extension refused");
                    *lease_deadline.lock().expect("lease lock") = Instant::now();
                    return;
                }
                Err(error) => self.note_failure(&error),
            }
        }
    }

    /// Reports a result under its fence; when no node can take it, keeps it
    /// in the outbox for reconciliation.
    async fn report(&self, entry: Entry) {
        // Not longer than orchestrator_timeout: past it, the agent is on its own.
        let timeout = Duration::from_millis(self.config.orchestrator_timeout_ms);
        let sent = match tokio::time::timeout(timeout, self.send(&entry)).await {
            Ok(sent) => sent,
            Err(_) => Err(Error::Unavailable(format!("no node answered within {timeout:?}"))),
        };
        match sent {
            Ok(()) => {}
            Err(error) => {
                self.stats.set_mode(Mode::Autonomous, &self.config.agent_id);
                self.note_failure(&error);
                match &self.outbox {
                    Some(outbox) => match outbox.push(&entry) {
                        Ok(()) => {
                            self.stats.outboxed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(io) => {
                            tracing::error!(task_id = entry.task_id, %io, "outbox write failed; result lost locally")
                        }
                    },
                    None => {
                        tracing::error!(task_id = entry.task_id, %error, "could not report a result and no outbox is set")
                    }
                }
            }
        }
    }

    /// Sends one report. A definite answer (accepted, superseded, refused) is
    /// final; only an unreachable cluster returns an error.
    async fn send(&self, entry: &Entry) -> Result<(), Error> {
        let answer = match &entry.report {
            Report::Complete { result } => self.client.complete(entry.task_id, entry.fence, result).await.map(|_| ()),
            Report::Fail { error, retryable } => {
                self.client.fail(entry.task_id, entry.fence, error, *retryable).await.map(|_| ())
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
            // Overload and unavailability are not answers about the result: try again later.
            Err(error @ Error::Api { status: 429 | 503, .. }) => Err(error),
            Err(Error::Api { code, message, .. }) => {
                self.contact();
                tracing::warn!(task_id = entry.task_id, %code, %message, "result refused");
                Ok(())
            }
            Err(error) => Err(error),
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

    /// Delivers the outbox whenever a node answers: reconciling mode.
    async fn flush_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(outbox) = self.outbox.clone() else { return };
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = stop.changed(), if !stopping => stopping = true,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if !outbox.is_empty() && self.stats.mode() != Mode::Autonomous {
                self.stats.set_mode(Mode::Reconciling, &self.config.agent_id);
                while let Some(entry) = outbox.front() {
                    let timeout = Duration::from_millis(self.config.orchestrator_timeout_ms);
                    if !matches!(tokio::time::timeout(timeout, self.send(&entry)).await, Ok(Ok(()))) {
                        break;
                    }
                    self.stats.reconciled.fetch_add(1, Ordering::Relaxed);
                    if let Err(io) = outbox.pop_front() {
                        tracing::error!(%io, "outbox update failed");
                        break;
                    }
                }
                if outbox.is_empty() {
                    self.stats.set_mode(Mode::Connected, &self.config.agent_id);
                }
            } else if outbox.is_empty() && self.stats.mode() == Mode::Reconciling {
                self.stats.set_mode(Mode::Connected, &self.config.agent_id);
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

    #[test]
    fn an_expired_instruction_is_not_started() {
        let sent = Instant::now();
        assert!(lease_startable(sent, 1_000, sent));
        assert!(!lease_startable(sent, 1_000, sent + Duration::from_millis(900)));
        assert!(!lease_startable(sent, 100, sent));
    }
}
