//! The commands that change the state (one Raft log entry carries a batch of
//! them) and the outcome of each.
//!
//! A command is a request to change something; whether it is valid is decided
//! when it is applied, against the replicated state, so every replica decides
//! the same. Validation that needs no state (names, sizes) is also run at the
//! HTTP edge so bad input is refused before it costs a log entry.

use crate::flow::{Budget, KeyLimits, Usage};
use crate::state::Error;
use crate::task::{Grant, Task, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One log entry's payload: commands applied in order at one leader-stamped time.
/// Batching many commands into one entry is what makes one fsync serve many
/// client requests (group commit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The proposing leader's wall clock; applying keeps log time monotonic.
    pub now_ms: u64,
    pub commands: Vec<Command>,
}

/// The outcomes of one entry's commands, in the same order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub outcomes: Vec<Outcome>,
}

/// A task as submitted by a client or by an agent delegating work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    pub queue: String,
    pub payload: String,
    pub priority: u8,
    /// Relative to the entry's log time; `None` means no deadline.
    pub deadline_ms: Option<u64>,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    pub parent_id: Option<u64>,
    /// The delegating task's fence: a delegation from a stale lease is refused.
    #[serde(default)]
    pub parent_fence: Option<u64>,
    pub conversation_id: Option<String>,
    /// Flow control: the key whose limits and fair share the task counts against.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// Tokens the task is expected to consume (for `tokens_per_minute`).
    #[serde(default)]
    pub cost_estimate: Option<u64>,
    /// Only on a root: what its whole delegation tree may consume.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The `traceparent` to store on the task (`Task::traceparent`), made
    /// by the edge: `00-<trace id>-<submit span id>-<flags>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl NewTask {
    /// A task with the API's defaults (priority 5, three attempts, no
    /// deadline, no key, no parent, no conversation, no flow control).
    pub fn new(queue: impl Into<String>, payload: impl Into<String>) -> NewTask {
        NewTask {
            queue: queue.into(),
            payload: payload.into(),
            priority: 5,
            deadline_ms: None,
            max_attempts: 3,
            idempotency_key: None,
            parent_id: None,
            parent_fence: None,
            conversation_id: None,
            concurrency_key: None,
            cost_estimate: None,
            budget: None,
            traceparent: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Only advances log time, so that lease expiry and deadlines fire when idle.
    Tick,
    /// Submit tasks; each one succeeds or fails on its own.
    Submit {
        tasks: Vec<NewTask>,
    },
    Cancel {
        task_id: u64,
    },
    RegisterAgent {
        agent_id: String,
        capabilities: BTreeSet<String>,
        capacity: u32,
        /// The new session's secret, drawn by the leader: heartbeats, polls
        /// and deregistration must present it (the epoch is public).
        #[serde(default)]
        session: String,
    },
    DeregisterAgent {
        agent_id: String,
        epoch: u64,
    },
    /// Proposed by the leader when an agent's heartbeat time-to-live runs out.
    ExpireAgent {
        agent_id: String,
        epoch: u64,
    },
    /// Grant up to `tasks_max` leases on the given queues (each must be a
    /// capability of the agent). The fence of every grant is this entry's index.
    Lease {
        agent_id: String,
        epoch: u64,
        queues: Vec<String>,
        tasks_max: u32,
        lease_ttl_ms: u64,
    },
    Complete {
        task_id: u64,
        fence: u64,
        result: String,
        /// What the attempt consumed: counted against its key's window and
        /// its tree's budget.
        #[serde(default)]
        usage: Option<Usage>,
    },
    Fail {
        task_id: u64,
        fence: u64,
        error: String,
        retryable: bool,
        /// A failed attempt consumed something too.
        #[serde(default)]
        usage: Option<Usage>,
    },
    Extend {
        task_id: u64,
        fence: u64,
        lease_ttl_ms: u64,
    },
    /// The lease holder reports progress on a long task (not a heartbeat:
    /// heartbeats say the agent lives, progress says the work moves).
    Progress {
        task_id: u64,
        fence: u64,
    },
    /// Write one key of a conversation's context. With `expected_version`, only
    /// if the key's version is still that (0 = key absent): compare-and-set.
    /// With `writer`, the write is made on behalf of a task under its lease:
    /// refused unless that lease is current, and discarded when the attempt
    /// is superseded.
    ContextPut {
        conversation_id: String,
        key: String,
        value: String,
        expected_version: Option<u64>,
        #[serde(default)]
        writer: Option<Writer>,
    },
    /// Delete a conversation and its whole context.
    ContextDelete {
        conversation_id: String,
    },
    /// The task holding lease `fence` waits for the tasks `on` to finish,
    /// for at most `timeout_ms`. Refused if the wait would close a cycle.
    Wait {
        task_id: u64,
        fence: u64,
        on: Vec<u64>,
        timeout_ms: u64,
    },
    /// Replaces the policy if its version is still `expected_version`. A
    /// change that would refuse all new work of some kind or delete retained
    /// tasks (`State::force_reasons`) is refused unless `force` is set.
    SetPolicy {
        policy: crate::Limits,
        expected_version: u64,
        note: String,
        #[serde(default)]
        force: bool,
    },
    /// Makes an earlier version's policy current again (as a new version).
    /// A client's rollback (`by_client`) is judged like a change and needs
    /// `force` in the same cases; the policy guard's is never refused for
    /// want of it (and entries written before the field existed were not).
    ///
    /// With `expected_version`, a compare-and-set: refused (`version_conflict`)
    /// unless the policy is still at that version, so that a rollback sent
    /// again after an unknown outcome does not roll back a second time.
    RollbackPolicy {
        to_version: u64,
        note: String,
        #[serde(default)]
        by_client: bool,
        #[serde(default)]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_version: Option<u64>,
    },
    /// Records that a node left the cluster, so its id is never reused.
    RetireNode {
        node_id: u64,
    },
    // Flow control. New variants go last, so that entries written before
    // keep their meaning.
    /// Sets the limits of a concurrency key, or of every key matching a
    /// wildcard (`tenant:*`, or `*`), replacing what was there.
    SetKeyLimits {
        key: String,
        limits: KeyLimits,
    },
    DeleteKeyLimits {
        key: String,
    },
    /// An operator pauses a task: a pending one at once, a leased one when
    /// its lease ends without a result (the lease runs to its end).
    Pause {
        task_id: u64,
    },
    /// Makes a paused task pending again (or withdraws the pause asked for
    /// a leased one). Refused for a task paused by its tree's budget while
    /// the budget is still exhausted: raise it with `SetBudget`, which
    /// resumes the tree. A task paused after its attempts gets them anew.
    Resume {
        task_id: u64,
    },
    /// Moves up to `limit` dead or paused tasks matching the filter back to
    /// pending, oldest first: trail kept, attempts counted anew. Never a
    /// task that succeeded (only `dead` and `paused` are accepted). Skips
    /// tasks whose parent has finished and tasks of a tree whose budget is
    /// exhausted.
    Replay {
        #[serde(default)]
        queue: Option<String>,
        state: TaskState,
        #[serde(default)]
        concurrency_key: Option<String>,
        /// Only tasks that reached their state at or after this log time.
        #[serde(default)]
        since_ms: Option<u64>,
        limit: u32,
    },
    /// Sets (or removes) a root's budget. If the tree was paused by its
    /// budget and no longer exhausts it, its budget-paused tasks resume.
    SetBudget {
        task_id: u64,
        budget: Option<Budget>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    Ticked,
    Submitted {
        results: Vec<Result<Submitted, Error>>,
    },
    Cancelled {
        task: Task,
    },
    Registered {
        epoch: u64,
    },
    Deregistered,
    Expired,
    Leased {
        grants: Vec<Grant>,
    },
    Completed {
        task: Task,
    },
    Failed {
        task: Task,
    },
    Extended {
        valid_until_ms: u64,
    },
    Progressed,
    ContextWritten {
        version: u64,
    },
    ContextDeleted,
    NodeRetired,
    PolicySet {
        version: u64,
    },
    /// `pending` lists the awaited tasks not finished yet (empty: nothing to wait for).
    Waiting {
        pending: Vec<u64>,
    },
    Refused {
        error: Error,
    },
    // Flow control: appended, as the commands are.
    KeyLimitsSet,
    KeyLimitsDeleted,
    Paused {
        task: Task,
    },
    Resumed {
        task: Task,
    },
    Replayed {
        task_ids: Vec<u64>,
    },
    /// The budget-paused tasks that resumed.
    BudgetSet {
        resumed: Vec<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub task_id: u64,
    /// True when nothing new was created: the idempotency key was known, or
    /// an earlier attempt of the parent had delegated the same step.
    pub deduplicated: bool,
    /// True when the task is a child of an earlier attempt of the parent,
    /// now taken over by the delegating attempt.
    #[serde(default)]
    pub adopted: bool,
}

/// The task, and the fence of its lease, on whose behalf a context write is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub task_id: u64,
    pub fence: u64,
}
