//! The records the state machine keeps: tasks, their leases, and agents.
//!
//! Plain data with no behaviour beyond small predicates and accessors; every
//! change to them goes through `State::apply` in `state.rs`. A task is laid
//! out in memory for a state of millions of them (see `Task`) and encoded as
//! the record it always was (`TaskRecord`): that layout is this file's
//! business, and the encodings are the snapshot format's.

use crate::flow::{Budget, Pause, Usage};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Where a task is in its life. Terminal states never change again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for an agent (possibly not before `not_before_ms`, after a retry).
    Pending,
    /// Held by one agent under a lease with a fencing token.
    Leased,
    /// An agent reported a result under the current fence.
    Succeeded,
    /// An agent reported a non-retryable failure under the current fence.
    Failed,
    /// Cancelled by a client before it finished.
    Cancelled,
    /// Dead-lettered: see `dead_reason` (attempts exhausted, expired, ...).
    Dead,
    /// Held back, not finished: by its tree's budget, by an operator, or
    /// after its attempts under an `on_exhausted: pause` policy (see
    /// `Task::pause`). Resume or replay makes it pending again.
    Paused,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Dead)
    }

    pub fn parse(text: &str) -> Option<TaskState> {
        Some(match text {
            "pending" => TaskState::Pending,
            "leased" => TaskState::Leased,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            "dead" => TaskState::Dead,
            "paused" => TaskState::Paused,
            _ => return None,
        })
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
}

/// The right of one agent to work on one task until `valid_until_ms` (log time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub agent_id: String,
    /// The agent's session epoch when the lease was granted.
    pub agent_epoch: u64,
    /// Fencing token: the log index of the entry that granted this lease.
    pub fence: u64,
    pub valid_until_ms: u64,
    /// Log time of the last progress report (or of the grant). A lease with no
    /// progress for the policy's `stall_timeout_ms` is revoked as stuck.
    pub progress_ms: u64,
}

/// A task as the state keeps it. Most tasks are roots waiting or leased
/// with none of the rarer fields set, and a large state holds millions of
/// them, so what is rare lives in `TaskExtra`, allocated only when one of
/// its fields is set; a lease is boxed (few tasks hold one at a time); a
/// root's trail, the one step its submit made, is not stored but rebuilt
/// from the queue and its step's payload hash; and a trace context in the form
/// the edge writes is held as its 25 bytes rather than 55 characters.
///
/// None of this shows in the encodings: a task serialises through
/// `TaskRecord`'s fields, in the same order, as the record it was
/// (`tests/task_encoding.rs` holds both encodings to a fixture).
#[derive(Clone, Debug)]
pub struct Task {
    pub id: u64,
    /// The capability an agent needs to take this task.
    pub queue: String,
    /// Opaque JSON text; the core only checks its size.
    pub payload: String,
    /// 0..=9, higher runs first.
    pub priority: u8,
    pub state: TaskState,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Absolute log time after which the task is dead-lettered as `expired`.
    pub deadline_ms: Option<u64>,
    pub max_attempts: u32,
    /// Leases granted so far.
    pub attempts: u32,
    /// After a retryable failure, the task is not leased again before this log time.
    pub not_before_ms: u64,
    pub lease: Option<Box<Lease>>,
    /// The fence of the newest lease ever granted on this task (0 if none).
    pub last_fence: u64,
    /// The payload hash of the trail's last step (this task's own); with
    /// `queue`, all a root's trail holds when it is the plain one.
    step_hash: u64,
    /// The trace context when it is in the edge's form (see `traceparent`).
    trace: Option<TraceContext>,
    extra: Option<Box<TaskExtra>>,
}

/// The fields of a task that most tasks leave at their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskExtra {
    pub idempotency_key: Option<String>,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<String>,
    /// Delegation depth: 0 for a task submitted by a client.
    pub hop_count: u32,
    /// The trail when it is not a root's plain one step (see `Task::trail`).
    trail: Option<Vec<TrailStep>>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub dead_reason: Option<String>,
    /// Results and failures refused because their fence was not current.
    pub superseded_count: u32,
    /// For a delegation: the fence of the parent's lease that created it.
    /// `None` for a root, and for a child created before fences were recorded.
    pub parent_fence: Option<u64>,
    /// Children adopted by a later attempt than the one that made them:
    /// child id -> the latest adoption. An attempt's children are those it
    /// created and those it adopted (`State::owner_fence`).
    pub adopted: BTreeMap<u64, Adoption>,
    /// Flow control's key: the task counts against the key's limits and
    /// shares its turn in fair dispatch.
    pub concurrency_key: Option<String>,
    /// Tokens the task is expected to consume, counted against its key's
    /// `tokens_per_minute` while it is leased.
    pub cost_estimate: Option<u64>,
    /// On a root: what its whole delegation tree may consume.
    pub budget: Option<Budget>,
    /// What the task's attempts reported they consumed, summed.
    pub usage: Usage,
    /// A pause in force (state `paused`) or asked for while leased.
    pub pause: Option<Pause>,
    /// Times the task was replayed (moved back to pending from dead or paused).
    pub replays: u32,
    /// A trace context not in the edge's form, kept as it came.
    traceparent_text: Option<String>,
}

impl TaskExtra {
    /// What a task without extra fields reads.
    const EMPTY: TaskExtra = TaskExtra {
        idempotency_key: None,
        parent_id: None,
        conversation_id: None,
        hop_count: 0,
        trail: None,
        result: None,
        error: None,
        dead_reason: None,
        superseded_count: 0,
        parent_fence: None,
        adopted: BTreeMap::new(),
        concurrency_key: None,
        cost_estimate: None,
        budget: None,
        usage: Usage { tokens_in: 0, tokens_out: 0, cost: 0 },
        pause: None,
        replays: 0,
        traceparent_text: None,
    };
}

static EMPTY_EXTRA: TaskExtra = TaskExtra::EMPTY;

impl Task {
    /// The fields most tasks leave at their defaults, read.
    pub fn extra(&self) -> &TaskExtra {
        self.extra.as_deref().unwrap_or(&EMPTY_EXTRA)
    }

    /// The same, to change: allocated on the first write.
    pub fn extra_mut(&mut self) -> &mut TaskExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.extra().idempotency_key.as_deref()
    }

    pub fn parent_id(&self) -> Option<u64> {
        self.extra().parent_id
    }

    pub fn conversation_id(&self) -> Option<&str> {
        self.extra().conversation_id.as_deref()
    }

    /// Delegation depth: 0 for a task submitted by a client.
    pub fn hop_count(&self) -> u32 {
        self.extra().hop_count
    }

    pub fn result(&self) -> Option<&str> {
        self.extra().result.as_deref()
    }

    pub fn error(&self) -> Option<&str> {
        self.extra().error.as_deref()
    }

    pub fn dead_reason(&self) -> Option<&str> {
        self.extra().dead_reason.as_deref()
    }

    pub fn superseded_count(&self) -> u32 {
        self.extra().superseded_count
    }

    pub fn parent_fence(&self) -> Option<u64> {
        self.extra().parent_fence
    }

    pub fn adopted(&self) -> &BTreeMap<u64, Adoption> {
        &self.extra().adopted
    }

    pub fn concurrency_key(&self) -> Option<&str> {
        self.extra().concurrency_key.as_deref()
    }

    pub fn cost_estimate(&self) -> Option<u64> {
        self.extra().cost_estimate
    }

    pub fn budget(&self) -> Option<&Budget> {
        self.extra().budget.as_ref()
    }

    pub fn usage(&self) -> &Usage {
        &self.extra().usage
    }

    pub fn pause(&self) -> Option<&Pause> {
        self.extra().pause.as_ref()
    }

    pub fn replays(&self) -> u32 {
        self.extra().replays
    }

    /// The delegation trail from the root task to this one (this one last).
    pub fn trail(&self) -> Cow<'_, [TrailStep]> {
        match &self.extra().trail {
            Some(trail) => Cow::Borrowed(trail),
            None => Cow::Owned(vec![self.plain_step()]),
        }
    }

    /// The step a client's submit records, the only one of a root's trail.
    fn plain_step(&self) -> TrailStep {
        TrailStep { queue: self.queue.clone(), agent_id: None, payload_hash: self.step_hash }
    }

    /// W3C Trace Context naming the span that submitted the task (trace id
    /// kept from the submitter, parent id = the node's submit span), so that
    /// every later span of the task, the agent's own included, joins the
    /// submitter's trace. Drawn at the edge (the core draws no random
    /// numbers); `None` for a task written before tasks carried it.
    pub fn traceparent(&self) -> Option<Cow<'_, str>> {
        match &self.trace {
            Some(trace) => Some(Cow::Owned(trace.text())),
            None => self.extra().traceparent_text.as_deref().map(Cow::Borrowed),
        }
    }

    /// Takes the pause off, if there is one: allocates nothing if not, and
    /// frees the extra fields if the pause was the only one set.
    pub fn take_pause(&mut self) -> Option<Pause> {
        let pause = self.extra.as_mut()?.pause.take();
        if self.extra.as_deref() == Some(&EMPTY_EXTRA) {
            self.extra = None;
        }
        pause
    }
}

impl PartialEq for Task {
    fn eq(&self, other: &Task) -> bool {
        self.id == other.id
            && self.queue == other.queue
            && self.payload == other.payload
            && self.priority == other.priority
            && self.state == other.state
            && self.created_ms == other.created_ms
            && self.updated_ms == other.updated_ms
            && self.deadline_ms == other.deadline_ms
            && self.max_attempts == other.max_attempts
            && self.attempts == other.attempts
            && self.not_before_ms == other.not_before_ms
            && self.lease == other.lease
            && self.last_fence == other.last_fence
            && self.step_hash == other.step_hash
            && self.trace == other.trace
            && self.extra() == other.extra()
    }
}

impl Eq for Task {}

/// A trace context in the form the edge writes, `00-<32 hex>-<16 hex>-<2
/// hex>` in lowercase, held as its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    const TEXT_BYTES: usize = 55;

    /// `None` for any text that would not read back exactly from `text`.
    fn parse(text: &str) -> Option<TraceContext> {
        let bytes = text.as_bytes();
        if bytes.len() != Self::TEXT_BYTES || !bytes.starts_with(b"00-") || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        fn nibble(byte: u8) -> Option<u8> {
            match byte {
                b'0'..=b'9' => Some(byte - b'0'),
                b'a'..=b'f' => Some(byte - b'a' + 10),
                _ => None,
            }
        }
        fn decode<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
            let mut out = [0; N];
            for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
                *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
            }
            Some(out)
        }
        let [flags] = decode::<1>(&bytes[53..55])?;
        Some(TraceContext { trace_id: decode(&bytes[3..35])?, parent_id: decode(&bytes[36..52])?, flags })
    }

    /// The text, in a buffer of its own (ASCII throughout).
    fn text_bytes(&self) -> [u8; Self::TEXT_BYTES] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; Self::TEXT_BYTES];
        out[..2].copy_from_slice(b"00");
        let mut at = 3;
        for (index, byte) in self.trace_id.iter().chain(&self.parent_id).chain([&self.flags]).enumerate() {
            if index == 16 || index == 24 {
                at += 1;
            }
            out[at] = DIGITS[usize::from(byte >> 4)];
            out[at + 1] = DIGITS[usize::from(byte & 0xf)];
            at += 2;
        }
        out
    }

    fn text(&self) -> String {
        String::from_utf8(self.text_bytes().to_vec()).expect("ASCII")
    }
}

impl Serialize for TraceContext {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(std::str::from_utf8(&self.text_bytes()).expect("ASCII"))
    }
}

/// A task's fields as its encodings hold them, in their order: what a task
/// is read from, and what `Task::from` builds one of.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename = "Task")]
pub struct TaskRecord {
    pub id: u64,
    pub queue: String,
    pub payload: String,
    pub priority: u8,
    pub state: TaskState,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub deadline_ms: Option<u64>,
    pub max_attempts: u32,
    pub attempts: u32,
    pub not_before_ms: u64,
    pub idempotency_key: Option<String>,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<String>,
    pub hop_count: u32,
    pub trail: Vec<TrailStep>,
    pub lease: Option<Lease>,
    pub last_fence: u64,
    pub result: Option<String>,
    pub error: Option<String>,
    pub dead_reason: Option<String>,
    pub superseded_count: u32,
    #[serde(default)]
    pub parent_fence: Option<u64>,
    #[serde(default)]
    pub adopted: BTreeMap<u64, Adoption>,
    #[serde(default)]
    pub concurrency_key: Option<String>,
    #[serde(default)]
    pub cost_estimate: Option<u64>,
    #[serde(default)]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub pause: Option<Pause>,
    #[serde(default)]
    pub replays: u32,
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl From<TaskRecord> for Task {
    fn from(record: TaskRecord) -> Task {
        let plain_root = match record.trail.as_slice() {
            [step] => step.queue == record.queue && step.agent_id.is_none(),
            _ => false,
        };
        let step_hash = record.trail.last().map_or(0, |step| step.payload_hash);
        let trace = record.traceparent.as_deref().and_then(TraceContext::parse);
        let extra = TaskExtra {
            idempotency_key: record.idempotency_key,
            parent_id: record.parent_id,
            conversation_id: record.conversation_id,
            hop_count: record.hop_count,
            trail: if plain_root { None } else { Some(record.trail) },
            result: record.result,
            error: record.error,
            dead_reason: record.dead_reason,
            superseded_count: record.superseded_count,
            parent_fence: record.parent_fence,
            adopted: record.adopted,
            concurrency_key: record.concurrency_key,
            cost_estimate: record.cost_estimate,
            budget: record.budget,
            usage: record.usage,
            pause: record.pause,
            replays: record.replays,
            traceparent_text: if trace.is_some() { None } else { record.traceparent },
        };
        Task {
            id: record.id,
            queue: record.queue,
            payload: record.payload,
            priority: record.priority,
            state: record.state,
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
            deadline_ms: record.deadline_ms,
            max_attempts: record.max_attempts,
            attempts: record.attempts,
            not_before_ms: record.not_before_ms,
            lease: record.lease.map(Box::new),
            last_fence: record.last_fence,
            step_hash,
            trace,
            extra: if extra == TaskExtra::EMPTY { None } else { Some(Box::new(extra)) },
        }
    }
}

impl<'de> Deserialize<'de> for Task {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Task, D::Error> {
        TaskRecord::deserialize(deserializer).map(Task::from)
    }
}

/// `TaskRecord` borrowed from a task, to write it: the same fields in the
/// same order, so the same encodings.
#[derive(Serialize)]
#[serde(rename = "Task")]
struct TaskRecordRef<'a> {
    id: u64,
    queue: &'a str,
    payload: &'a str,
    priority: u8,
    state: TaskState,
    created_ms: u64,
    updated_ms: u64,
    deadline_ms: Option<u64>,
    max_attempts: u32,
    attempts: u32,
    not_before_ms: u64,
    idempotency_key: Option<&'a str>,
    parent_id: Option<u64>,
    conversation_id: Option<&'a str>,
    hop_count: u32,
    trail: TrailRef<'a>,
    lease: Option<&'a Lease>,
    last_fence: u64,
    result: Option<&'a str>,
    error: Option<&'a str>,
    dead_reason: Option<&'a str>,
    superseded_count: u32,
    parent_fence: Option<u64>,
    adopted: &'a BTreeMap<u64, Adoption>,
    concurrency_key: Option<&'a str>,
    cost_estimate: Option<u64>,
    budget: Option<&'a Budget>,
    usage: &'a Usage,
    pause: Option<&'a Pause>,
    replays: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<TraceparentRef<'a>>,
}

/// A trail to write: stored, or a root's plain step rebuilt.
enum TrailRef<'a> {
    Stored(&'a [TrailStep]),
    Plain(&'a Task),
}

impl Serialize for TrailRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TrailRef::Stored(steps) => steps.serialize(serializer),
            TrailRef::Plain(task) => {
                let step = TrailStepRef { queue: &task.queue, agent_id: None, payload_hash: task.step_hash };
                std::slice::from_ref(&step).serialize(serializer)
            }
        }
    }
}

/// `TrailStep` borrowed, to write a root's plain step without copying its queue.
#[derive(Serialize)]
#[serde(rename = "TrailStep")]
struct TrailStepRef<'a> {
    queue: &'a str,
    agent_id: Option<&'a str>,
    payload_hash: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TraceparentRef<'a> {
    Compact(TraceContext),
    Text(&'a str),
}

impl Serialize for Task {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let extra = self.extra();
        TaskRecordRef {
            id: self.id,
            queue: &self.queue,
            payload: &self.payload,
            priority: self.priority,
            state: self.state,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            deadline_ms: self.deadline_ms,
            max_attempts: self.max_attempts,
            attempts: self.attempts,
            not_before_ms: self.not_before_ms,
            idempotency_key: extra.idempotency_key.as_deref(),
            parent_id: extra.parent_id,
            conversation_id: extra.conversation_id.as_deref(),
            hop_count: extra.hop_count,
            trail: match &extra.trail {
                Some(trail) => TrailRef::Stored(trail),
                None => TrailRef::Plain(self),
            },
            lease: self.lease.as_deref(),
            last_fence: self.last_fence,
            result: extra.result.as_deref(),
            error: extra.error.as_deref(),
            dead_reason: extra.dead_reason.as_deref(),
            superseded_count: extra.superseded_count,
            parent_fence: extra.parent_fence,
            adopted: &extra.adopted,
            concurrency_key: extra.concurrency_key.as_deref(),
            cost_estimate: extra.cost_estimate,
            budget: extra.budget.as_ref(),
            usage: &extra.usage,
            pause: extra.pause.as_ref(),
            replays: extra.replays,
            traceparent: match (&self.trace, &extra.traceparent_text) {
                (Some(trace), _) => Some(TraceparentRef::Compact(*trace)),
                (None, Some(text)) => Some(TraceparentRef::Text(text)),
                (None, None) => None,
            },
        }
        .serialize(serializer)
    }
}

/// A child taken over by a later attempt of its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The fence of the adopting lease.
    pub fence: u64,
    /// The adopting request's idempotency key when it differs from the
    /// child's own: it names the child too, and leaves with the tree.
    pub idempotency_key: Option<String>,
}

/// A child as a lease lists it, so that a new attempt can see what earlier
/// attempts delegated and adopt it instead of delegating again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    pub task_id: u64,
    pub queue: String,
    /// FNV-1a of the payload text, as in the trail.
    pub payload_hash: u64,
    pub state: TaskState,
    /// The fence of the parent's lease that created it.
    pub parent_fence: Option<u64>,
    /// The fence of the latest attempt that adopted it, if one did.
    pub adopted_fence: Option<u64>,
}

/// One step of a delegation trail: which capability was asked, by which
/// agent (the holder of the delegating task's lease), with what payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailStep {
    pub queue: String,
    pub agent_id: Option<String>,
    /// FNV-1a of the payload text: equal payloads, equal hashes, on every replica.
    pub payload_hash: u64,
}

/// FNV-1a, 64 bits: deterministic across processes and platforms, unlike std's hasher.
pub fn payload_hash(payload: &str) -> u64 {
    payload.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A lease as handed to an agent: the task and the fence to present with results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub task: Task,
    pub fence: u64,
    pub valid_until_ms: u64,
    /// The task's children (at most `children_per_task_max`, oldest first):
    /// what earlier attempts delegated, for this one to adopt.
    #[serde(default)]
    pub children: Vec<Child>,
}

/// A registered agent session. Liveness (heartbeats) is soft state on the
/// leader; only registration, expiry and deregistration are replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub capabilities: BTreeSet<String>,
    /// How many leases the agent may hold at once.
    pub capacity: u32,
    /// Incremented by every registration; leases of older epochs are void.
    pub epoch: u64,
    /// The session's secret, known to the agent alone: the epoch is public
    /// (listed, and in every lease), so it cannot prove who speaks. Empty for
    /// a session registered before sessions had secrets.
    #[serde(default)]
    pub session: String,
    pub registered_ms: u64,
    /// Ids of the tasks this agent holds a lease on.
    pub leased_task_ids: BTreeSet<u64>,
    /// Leases revoked because the agent made no progress on them (stuck).
    pub stuck_count: u32,
    /// Log time of the latest such revocation.
    pub stuck_ms: Option<u64>,
}

impl Agent {
    /// Leases the agent may still take: its capacity less the leases it holds.
    pub fn room(&self) -> u32 {
        self.capacity.saturating_sub(self.leased_task_ids.len() as u32)
    }
}
