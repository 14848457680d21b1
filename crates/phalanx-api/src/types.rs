//! Requests and answers of the HTTP API v1 (docs/api.md), as they travel.
//!
//! Request bodies refuse unknown fields (a misspelt option is an error, not
//! a silent default). Answers keep fields this build does not know in
//! `other`, so that an older client reading a newer node loses nothing.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

// ---- tasks ----

/// What an attempt consumed. `cost` is a whole number in a unit the fleet
/// chooses (micro-dollars, say); tokens are the provider's. Each at most 10^12.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    #[serde(default)]
    pub cost: u64,
}

/// What a delegation tree may consume, carried by its root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_max: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// Its tree's budget is exhausted; resumed when the budget is raised.
    Budget,
    /// An operator paused it.
    Operator,
    /// It used its attempts and its queue's policy says `on_exhausted: pause`.
    AttemptsExhausted,
}

/// Why a task is paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Pause {
    pub cause: PauseCause,
    pub reason: String,
    pub since_ms: u64,
}

/// Which flow-control limit holds a pending task back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WaitingOn {
    pub key: String,
    /// `concurrency_max`, `rate_per_second` or `tokens_per_minute`.
    pub limit: String,
    /// The limits table's entry that set it (the key itself or a wildcard such as `tenant:*`).
    pub rule: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
    Dead,
    /// Held back until resumed: by an operator, by its tree's budget, or
    /// after its attempts when its queue's policy says `on_exhausted: pause`.
    Paused,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Leased,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Dead,
        TaskState::Paused,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Leased | TaskState::Paused)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Leased => "leased",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Dead => "dead",
            TaskState::Paused => "paused",
        }
    }

    pub fn parse(text: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// `POST /v1/tasks`, and each task of `POST /v1/tasks/batch`.
/// [`SubmitRequest::new`] sets the documented defaults; the `with_*`
/// methods the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The queue's name: 1..=1024 bytes of `[A-Za-z0-9._:-]`.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,1024}$")]
    pub queue: String,
    /// Any JSON value (default `null`), at most `payload_bytes_max` as text.
    #[serde(default)]
    pub payload: Value,
    /// 0..=9, higher first (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<u8>,
    /// A submit sent again with the same key answers the first one's task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Relative: the task is dropped (dead) if not finished this many ms from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// A delegation: the task on whose behalf this one is submitted ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<u64>,
    /// ... and the fence of the parent's lease (required with `parent_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_fence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,1024}$")]
    pub conversation_id: Option<String>,
    /// The flow-control key its limits are counted under (`/v1/limits/{key}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,1024}$")]
    pub concurrency_key: Option<String>,
    /// Tokens it is expected to use, counted against its key's
    /// `tokens_per_minute` while it is leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_estimate: Option<u64>,
    /// For a root task: what its whole delegation tree may use; when the
    /// tree's reported usage reaches it, the tree's pending tasks are paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// W3C Trace Context of the submitter's span: the node's submit span
    /// becomes its child. Wins over the `traceparent` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$", max_length = 512)]
    pub traceparent: Option<String>,
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
            concurrency_key: None,
            cost_estimate: None,
            budget: None,
            traceparent: None,
        }
    }
    /// W3C Trace Context of the caller's span, so that the task's spans join its trace.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> SubmitRequest {
        self.traceparent = Some(traceparent.into());
        self
    }
    /// Counted under this flow-control key's limits.
    pub fn with_concurrency_key(mut self, key: impl Into<String>) -> SubmitRequest {
        self.concurrency_key = Some(key.into());
        self
    }
    pub fn with_cost_estimate(mut self, tokens: u64) -> SubmitRequest {
        self.cost_estimate = Some(tokens);
        self
    }
    /// A budget for the tree this root task starts.
    pub fn with_budget(mut self, budget: Budget) -> SubmitRequest {
        self.budget = Some(budget);
        self
    }
    /// 0..=9, higher first.
    pub fn with_priority(mut self, priority: u8) -> SubmitRequest {
        self.priority = Some(priority);
        self
    }
    /// A keyed submit is deduplicated by the cluster, so the client may retry
    /// it freely. Without one, the SDK's `Client::submit` generates a key per call.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> SubmitRequest {
        self.idempotency_key = Some(key.into());
        self
    }
    /// Relative: the task is dropped if not finished this many ms from now.
    pub fn with_deadline_ms(mut self, deadline_ms: u64) -> SubmitRequest {
        self.deadline_ms = Some(deadline_ms);
        self
    }
    pub fn with_max_attempts(mut self, max_attempts: u32) -> SubmitRequest {
        self.max_attempts = Some(max_attempts);
        self
    }
    pub fn with_conversation(mut self, conversation_id: impl Into<String>) -> SubmitRequest {
        self.conversation_id = Some(conversation_id.into());
        self
    }
    /// A delegation: checked against the parent's current fence and trail.
    pub fn with_parent(mut self, parent_id: u64, parent_fence: u64) -> SubmitRequest {
        self.parent_id = Some(parent_id);
        self.parent_fence = Some(parent_fence);
        self
    }
}

/// `POST /v1/tasks/batch`: 1..=`batch_tasks_max` tasks in one log entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub tasks: Vec<SubmitRequest>,
}

/// What a submit created or found (`201`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub task_id: u64,
    /// Nothing new was created: the key was known, or an earlier attempt of
    /// the parent had delegated the same step.
    pub deduplicated: bool,
    /// A child of an earlier attempt of the parent, taken over by this one.
    #[serde(default)]
    pub adopted: bool,
    /// The task's stored trace context (`Task::traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A refusal of one task of a batch (the batch itself was answered).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Refusal {
    #[schema(value_type = String)]
    pub code: crate::ErrorCode,
    pub message: String,
}

/// One task's slot in a batch's answer, in the order of the request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BatchItem {
    Submitted(Submitted),
    Refused { error: Refusal },
}

/// `POST /v1/tasks/batch`'s answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchAnswer {
    pub results: Vec<BatchItem>,
}

/// One step of a delegation chain: who handed which payload to which queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrailStep {
    pub queue: String,
    pub agent_id: Option<String>,
    /// FNV-1a of the payload's JSON text ([`payload_hash`]).
    pub payload_hash: u64,
}

/// The lease a task is held under, as the task shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskLease {
    pub agent_id: String,
    /// The agent's session epoch when the lease was granted.
    pub agent_epoch: u64,
    /// The fencing token to present with results: the log index that granted the lease.
    pub fence: u64,
    /// In log time (the leader's clock), not the client's.
    pub valid_until_ms: u64,
    /// Log time of the last progress report (or of the grant).
    #[serde(default)]
    pub progress_ms: u64,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// A task as `GET /v1/tasks/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: u64,
    pub queue: String,
    pub payload: Value,
    pub priority: u8,
    pub state: TaskState,
    #[serde(default)]
    pub created_ms: u64,
    #[serde(default)]
    pub updated_ms: u64,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    pub max_attempts: u32,
    pub attempts: u32,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<String>,
    pub hop_count: u32,
    #[serde(default)]
    pub trail: Vec<TrailStep>,
    #[serde(default)]
    pub lease: Option<TaskLease>,
    pub last_fence: u64,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub dead_reason: Option<String>,
    /// Reports refused because their fence was stale.
    pub superseded_count: u32,
    /// For a delegation: the fence of the parent's lease that created it.
    #[serde(default)]
    pub parent_fence: Option<u64>,
    #[serde(default)]
    pub concurrency_key: Option<String>,
    #[serde(default)]
    pub cost_estimate: Option<u64>,
    /// A root's budget for its tree.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// What its attempts reported they consumed.
    #[serde(default)]
    pub usage: Usage,
    /// Why it is paused (or, on a leased task, asked to be when its lease ends).
    #[serde(default)]
    pub pause: Option<Pause>,
    /// Times it was replayed.
    #[serde(default)]
    pub replays: u32,
    /// W3C Trace Context naming the node's submit span of this task: an
    /// agent makes its own spans children of it to join the submitter's
    /// trace. Absent on a task submitted before tasks carried one.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// A pending task its key's limits hold back: which key and limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<WaitingOn>,
    /// Fields a newer node sends that this build does not know.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// A [`Task`] as a node writes it, borrowing from its state: the payload and
/// the result are stored JSON text written as they are, not parsed again.
/// Serialises to exactly what [`Task`] reads (a test checks it).
#[derive(Serialize)]
pub struct TaskRef<'a> {
    pub id: u64,
    pub queue: &'a str,
    pub payload: Cow<'a, RawValue>,
    pub priority: u8,
    pub state: TaskState,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub deadline_ms: Option<u64>,
    pub max_attempts: u32,
    pub attempts: u32,
    pub idempotency_key: Option<&'a str>,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<&'a str>,
    pub hop_count: u32,
    pub trail: Vec<TrailStep>,
    pub lease: Option<TaskLease>,
    pub last_fence: u64,
    pub result: Option<Cow<'a, RawValue>>,
    pub error: Option<&'a str>,
    pub dead_reason: Option<&'a str>,
    pub superseded_count: u32,
    pub parent_fence: Option<u64>,
    pub concurrency_key: Option<&'a str>,
    pub cost_estimate: Option<u64>,
    pub budget: Option<Budget>,
    pub usage: Usage,
    pub pause: Option<Pause>,
    pub replays: u32,
    pub traceparent: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<WaitingOn>,
}

/// Stored JSON text as JSON. Text that does not parse is served as a JSON
/// string instead: a read never fails on what the state holds.
pub fn raw_json(text: &str) -> Cow<'_, RawValue> {
    match serde_json::from_str::<&RawValue>(text) {
        Ok(value) => Cow::Borrowed(value),
        Err(_) => {
            Cow::Owned(serde_json::value::to_raw_value(text).expect("a string always serialises as a JSON string"))
        }
    }
}

/// FNV-1a of a payload's JSON text, as the cluster computes it (for the
/// trail and for [`Child::payload_hash`]).
pub fn payload_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// `GET /v1/tasks`: a page, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Ask again with `after=` this id for the next page; absent at the end.
    pub next_after: Option<u64>,
    /// The page was cut at `list_bytes_max` before `limit` tasks.
    #[serde(default)]
    pub truncated: bool,
}

/// `POST /v1/tasks/{id}/complete`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The fence of the lease the result was produced under.
    pub fence: u64,
    #[serde(default)]
    pub result: Value,
    /// What the attempt consumed, counted against its key and its tree's budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One result of `POST /v1/tasks/complete`: a complete's body with its task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteItem {
    pub task_id: u64,
    /// The fence of the lease the result was produced under.
    pub fence: u64,
    #[serde(default)]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `POST /v1/tasks/complete`: many results in one request and one log
/// entry, each judged on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteManyRequest {
    pub results: Vec<CompleteItem>,
}

/// The minimal answer to a report (`Prefer: return=minimal`): which task,
/// and the state it is in now, without its body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Ack {
    pub task_id: u64,
    pub state: TaskState,
}

/// One result's slot in `POST /v1/tasks/complete`'s answer, in request order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CompleteManyItem {
    /// Accepted (or an accepted result sent again): `ok` is always true.
    Accepted { task_id: u64, ok: bool, state: TaskState },
    /// Refused, this result alone; `task_id` is absent when the item did not parse.
    Refused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task_id: Option<u64>,
        error: Refusal,
    },
}

/// `POST /v1/tasks/complete`'s answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompleteManyAnswer {
    pub results: Vec<CompleteManyItem>,
}

/// `POST /v1/tasks/{id}/fail`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    pub fence: u64,
    pub error: String,
    /// Default true: the task goes back to pending while attempts remain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// What the failed attempt consumed: it counts too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `POST /v1/tasks/{id}/extend`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub fence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Extended {
    pub valid_until_ms: u64,
}

/// `POST /v1/tasks/{id}/progress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressRequest {
    pub fence: u64,
}

/// `POST /v1/tasks/{id}/wait`: the task (under its lease) waits on others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    pub fence: u64,
    pub on: Vec<u64>,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Waiting {
    /// The tasks waited on that are not finished yet.
    pub pending: Vec<u64>,
}

/// The answer of a write with nothing else to say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ok {
    pub ok: bool,
}

impl Ok {
    pub const YES: Ok = Ok { ok: true };
}

// ---- flow control ----

/// `PUT /v1/limits/{key}`, and a rule as `GET /v1/limits` shows it. Every
/// field is optional; an absent one does not limit. A PUT replaces the
/// whole rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Leases held at once on tasks of the key (1..=1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000000)]
    pub concurrency_max: Option<u32>,
    /// Grants per second, a decimal with at most three places (0.001..=1,000,000):
    /// a token bucket refilled in log time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// The bucket's size in grants (only with `rate_per_second`; default one
    /// second's worth, at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000000)]
    pub burst: Option<u32>,
    /// The key's share in fair dispatch within a priority band (1..=1000, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub weight: Option<u32>,
    /// Tokens (in + out) per minute: reported usage in the last minute plus
    /// the cost estimates of leased tasks stay within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub tokens_per_minute: Option<u64>,
}

impl KeyLimits {
    /// `rate_per_second` in thousandths of a grant, as the state machine
    /// keeps it; a rate that is not a positive decimal with at most three
    /// places is refused, naming why.
    pub fn rate_per_second_milli(&self) -> Result<Option<u64>, String> {
        let Some(rate) = self.rate_per_second else { return Ok(None) };
        if !rate.is_finite() || rate <= 0.0 {
            return Err(format!("{rate} must be a positive number"));
        }
        let milli = (rate * 1000.0).round();
        if milli < 1.0 || milli > 1e15 || ((rate * 1000.0) - milli).abs() > 1e-6 * milli.max(1.0) {
            return Err(format!("{rate} must be at least 0.001, with at most three decimal places"));
        }
        Ok(Some(milli as u64))
    }

    /// The decimal rate of a rate kept in thousandths.
    pub fn rate_from_milli(milli: u64) -> f64 {
        milli as f64 / 1000.0
    }
}

/// One entry of the limits table: a key, a wildcard (`tenant:*`) or `*`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LimitRule {
    pub key: String,
    pub limits: KeyLimits,
}

/// What one concurrency key holds and has used now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeyStatus {
    pub key: String,
    /// The table's entry whose limits apply (the key itself or a wildcard), if any.
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub limits: Option<KeyLimits>,
    /// Leases held now on tasks of the key.
    pub held: u32,
    /// Whole grants left in the rate's bucket (absent: no rate limit).
    #[serde(default)]
    pub rate_tokens_left: Option<u64>,
    /// Tokens reported within the last minute.
    pub tokens_in_window: u64,
    /// Cost estimates of the key's leased tasks.
    pub leased_estimate: u64,
    /// Tasks of the key not finished (pending, leased, paused).
    pub open_tasks: u64,
}

/// `GET /v1/limits`: the whole table and every key in use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LimitsTable {
    pub rules: Vec<LimitRule>,
    pub keys: Vec<KeyStatus>,
}

/// `POST /v1/tasks/replay`: dead or paused tasks back to pending, oldest
/// first, trail kept and attempts counted anew.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// `dead` or `paused`.
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Only tasks that reached their state at or after this log time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// 1..=`batch_tasks_max`.
    #[schema(minimum = 1)]
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Replayed {
    pub task_ids: Vec<u64>,
}

/// `PUT /v1/tasks/{id}/budget`: a root's budget for its tree (`null` removes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    pub budget: Option<Budget>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BudgetSet {
    /// The tasks paused by the budget that the change resumed.
    pub resumed: Vec<u64>,
}

/// A delegation tree's spend, as `GET /v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TreeSpend {
    pub root_id: u64,
    pub usage: Usage,
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Why the tree may not go on, when its budget is reached.
    #[serde(default)]
    pub exhausted: Option<String>,
}

// ---- agents ----

/// `POST /v1/agents/register`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,1024}$")]
    pub agent_id: String,
    /// The queues it serves.
    pub capabilities: Vec<String>,
    /// Leases it holds at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub agent_id: String,
    pub epoch: u64,
    /// The session's secret: presented on the session's heartbeats, polls
    /// and deregistration.
    #[serde(default)]
    pub session: Option<String>,
    pub heartbeat_interval_ms: u64,
    pub agent_ttl_ms: u64,
}

/// `POST /v1/agents/{agent_id}/heartbeat` and `.../deregister`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    pub epoch: u64,
    /// The secret `register` answered; the epoch alone is public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// `POST /v1/agents/{agent_id}/poll`: a long-poll for leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Default: every capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    /// 1..=1000 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_tasks: Option<u32>,
    /// How long to wait for work (default 0, at most 30,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 30000)]
    pub wait_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
}

/// A child of a leased task, as the lease lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Child {
    pub task_id: u64,
    pub queue: String,
    /// FNV-1a of the payload's JSON text ([`payload_hash`]).
    pub payload_hash: u64,
    pub state: TaskState,
    /// The fence of the parent's lease that created it.
    pub parent_fence: Option<u64>,
    /// The fence of the latest attempt that adopted it, if one did.
    pub adopted_fence: Option<u64>,
}

impl Child {
    /// Whether the child does this step: the same queue and payload.
    pub fn is_step(&self, queue: &str, payload: &Value) -> bool {
        self.queue == queue && self.payload_hash == payload_hash(&payload.to_string())
    }

    /// The attempt it belongs to: the latest that adopted it, or the one that created it.
    pub fn owner_fence(&self) -> Option<u64> {
        self.adopted_fence.or(self.parent_fence)
    }
}

/// A lease as the poll hands it out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseGrant {
    pub task: Task,
    pub fence: u64,
    pub valid_until_ms: u64,
    pub lease_ttl_ms: u64,
    /// The task's children: what earlier attempts delegated, for this one
    /// to adopt (delegating the same step again answers with the child).
    #[serde(default)]
    pub children: Vec<Child>,
}

/// [`LeaseGrant`] as a node writes it.
#[derive(Serialize)]
pub struct LeaseGrantRef<'a> {
    pub task: TaskRef<'a>,
    pub fence: u64,
    pub valid_until_ms: u64,
    pub lease_ttl_ms: u64,
    pub children: Vec<Child>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Polled {
    pub leases: Vec<LeaseGrant>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentInfo {
    pub agent_id: String,
    pub epoch: u64,
    pub capabilities: Vec<String>,
    pub capacity: u32,
    /// Leases held now.
    pub leases: usize,
    /// Leases revoked because it made no progress on them.
    pub stuck_count: u32,
    /// Log time of the latest such revocation.
    pub stuck_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Agents {
    pub agents: Vec<AgentInfo>,
}

// ---- conversations ----

/// `PUT /v1/conversations/{id}/{key}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextPutRequest {
    pub value: Value,
    /// Compare-and-set: refused (`409 version_conflict`) unless the key is at this version (0: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// A write on a task's behalf names the task and its lease's fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContextWritten {
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContextEntry {
    pub version: u64,
    pub value: Value,
    /// The task and fence that wrote it, for a write on a task's behalf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// `GET /v1/conversations/{id}`: the shared context of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Conversation {
    pub conversation_id: String,
    pub entries: BTreeMap<String, ContextEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConversationDeleted {
    pub conversation_id: String,
    pub deleted: bool,
}

// ---- policy ----

/// `GET /v1/config`: the replicated policy (key → whole number).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Config {
    pub version: u64,
    #[schema(value_type = Object)]
    pub policy: Map<String, Value>,
}

/// One version of the policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersion {
    pub version: u64,
    #[schema(value_type = Object)]
    pub policy: Map<String, Value>,
    pub note: String,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// `GET /v1/config/history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigHistory {
    pub version: u64,
    pub history: Vec<PolicyVersion>,
}

/// `PUT /v1/config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigSetRequest {
    /// KEY → VALUE (a whole number, or its text).
    #[schema(value_type = Object)]
    pub set: Map<String, Value>,
    /// Compare-and-set: the version this change replaces (default: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// Needed for a change that would refuse all new work of some kind or
    /// delete retained tasks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicySet {
    pub version: u64,
}

/// `POST /v1/config/rollback`: makes an earlier version current again (as a
/// new version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to restore; default: the one before `expected_version`,
    /// found when the rollback is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Compare-and-set: the version this rollback replaces. With it, a
    /// rollback is safe to send again (a repeat finds the version moved on
    /// and is refused `409 version_conflict`); without it, the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolledBack {
    /// The new current version.
    pub version: u64,
    /// The version whose policy it holds.
    pub rolled_back_to: u64,
}

// ---- cluster ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterNode {
    pub id: u64,
    pub addr: String,
    #[serde(default)]
    pub raft_addr: Option<String>,
    pub voter: bool,
    pub matched_index: Option<u64>,
    /// How long ago this node last heard from it (itself: 0; never: null).
    pub last_contact_ms: Option<u64>,
    #[serde(default)]
    pub clock_skew_ms: Option<i64>,
    #[serde(default)]
    pub clock_skewed: Option<bool>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// `GET /v1/cluster`: this node's view of the Raft group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterInfo {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// Leader, Follower, Candidate, Learner or Shutdown.
    pub state: String,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    #[serde(default)]
    pub millis_since_quorum_ack: Option<u64>,
    pub nodes: Vec<ClusterNode>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}

/// `POST /v1/cluster/members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub node_id: u64,
    /// Its client address (`host:port`).
    pub addr: String,
    /// Its Raft listener, when separate from `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_addr: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberChanged {
    pub ok: bool,
    pub node_id: u64,
}

/// `GET /health/ready` when ready (otherwise `503 not_ready` naming the reasons).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    pub leader_id: Option<u64>,
    pub last_applied: u64,
}

/// `GET /v1/status`: what an operator needs at a glance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Status {
    pub policy_version: u64,
    pub tasks: u64,
    pub conversations: u64,
    pub state_bytes: u64,
    pub state_bytes_max: u64,
    pub agents: u64,
    pub stuck_agents: Vec<String>,
    pub unserved_queues: Vec<String>,
    pub oldest_pending_age_ms: Option<u64>,
    /// Counters since the log began (submitted, completed, dead, ...).
    #[schema(value_type = Object)]
    pub counters: Map<String, Value>,
    /// Queue → state → tasks.
    pub queues: BTreeMap<String, BTreeMap<String, u64>>,
    /// Concurrency keys in use, in key order (at most 1000).
    #[serde(default)]
    pub keys: Vec<KeyStatus>,
    /// Spend of the delegation trees that reported usage, newest roots first (at most 1000).
    #[serde(default)]
    pub trees: Vec<TreeSpend>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Map<String, Value>,
}
