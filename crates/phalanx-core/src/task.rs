//! The records the state machine keeps: tasks, their leases, and agents.
//!
//! Plain data with no behaviour beyond small predicates; every change to them
//! goes through `State::apply` in `state.rs`.

use crate::flow::{Budget, Pause, Usage};
use serde::{Deserialize, Serialize};
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    pub idempotency_key: Option<String>,
    pub parent_id: Option<u64>,
    pub conversation_id: Option<String>,
    /// Delegation depth: 0 for a task submitted by a client.
    pub hop_count: u32,
    /// The delegation trail from the root task to this one (this one last).
    pub trail: Vec<TrailStep>,
    pub lease: Option<Lease>,
    /// The fence of the newest lease ever granted on this task (0 if none).
    pub last_fence: u64,
    pub result: Option<String>,
    pub error: Option<String>,
    pub dead_reason: Option<String>,
    /// Results and failures refused because their fence was not current.
    pub superseded_count: u32,
    /// For a delegation: the fence of the parent's lease that created it.
    /// `None` for a root, and for a child created before fences were recorded.
    #[serde(default)]
    pub parent_fence: Option<u64>,
    /// Children adopted by a later attempt than the one that made them:
    /// child id -> the latest adoption. An attempt's children are those it
    /// created and those it adopted (`State::owner_fence`).
    #[serde(default)]
    pub adopted: BTreeMap<u64, Adoption>,
    /// Flow control's key: the task counts against the key's limits and
    /// shares its turn in fair dispatch.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// Tokens the task is expected to consume, counted against its key's
    /// `tokens_per_minute` while it is leased.
    #[serde(default)]
    pub cost_estimate: Option<u64>,
    /// On a root: what its whole delegation tree may consume.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// What the task's attempts reported they consumed, summed.
    #[serde(default)]
    pub usage: Usage,
    /// A pause in force (state `paused`) or asked for while leased.
    #[serde(default)]
    pub pause: Option<Pause>,
    /// Times the task was replayed (moved back to pending from dead or paused).
    #[serde(default)]
    pub replays: u32,
    /// W3C Trace Context naming the span that submitted the task (trace id
    /// kept from the submitter, parent id = the node's submit span), so that
    /// every later span of the task, the agent's own included, joins the
    /// submitter's trace. Drawn at the edge (the core draws no random
    /// numbers); `None` for a task written before tasks carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
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
