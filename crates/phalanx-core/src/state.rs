//! The replicated state and `State::apply`, the only way to change it.
//!
//! Every decision compares against log time (`now_ms`, the maximum of the
//! leader stamps seen so far), never a local clock, so that two replicas
//! applying the same entries end in byte-identical state. Indexes (ready
//! queues, lease expiry, deadlines, the delegation trees) are kept beside
//! the task map and checked against it by `check_invariants`.
//!
//! Delegation trees: a child belongs to the attempt of its parent that
//! created it, or to a later one that adopted it (a lease lists the task's
//! children; delegating the same step again adopts the earlier attempt's
//! child). When a task ends, what its other attempts left behind goes:
//! their open children are cancelled and their context entries discarded.
//! Retention compacts only whole finished trees.
//!
//! Flow control (per-key limits, fair dispatch, budgets, pause and replay)
//! lives in `state/flow.rs`: the lease grant path asks it which task of a
//! queue comes next.

use crate::command::{Command, NewTask, Outcome, Request, Response, Submitted, Writer};
use crate::flow::{Drr, KeyLimits, KeyUsage, OnExhausted, PauseCause, Usage, USAGE_VALUE_MAX};
use crate::limits::Limits;
use crate::task::{payload_hash, Adoption, Agent, Child, Grant, Lease, Task, TaskRecord, TaskState, TrailStep};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod flow;

/// Expected refusals: typed values, mapped to HTTP statuses at the edge.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("task {task_id} not found")]
    TaskNotFound { task_id: u64 },
    #[error("agent {agent_id:?} is not registered")]
    AgentNotFound { agent_id: String },
    #[error("agent {agent_id:?} session epoch {epoch} is stale (current {current})")]
    StaleEpoch { agent_id: String, epoch: u64, current: u64 },
    #[error("agent {agent_id:?}: the session secret is missing or wrong for epoch {epoch}")]
    WrongSession { agent_id: String, epoch: u64 },
    #[error("fence {fence} on task {task_id} is superseded (current fence {current})")]
    Superseded { task_id: u64, fence: u64, current: u64 },
    #[error("task {task_id} is already {state:?}")]
    AlreadyTerminal { task_id: u64, state: TaskState },
    #[error("the lease on task {task_id} is no longer held")]
    LeaseExpired { task_id: u64 },
    #[error("queue {queue:?} is full ({max} open tasks)")]
    QueueFull { queue: String, max: u64 },
    #[error("limit {limit} reached ({max})")]
    LimitReached { limit: String, max: u64 },
    #[error("{field} is {bytes} bytes, over the limit of {max}")]
    TooLarge { field: String, bytes: u64, max: u64 },
    #[error("agent {agent_id:?} does not declare capability {queue:?}")]
    NotCapable { agent_id: String, queue: String },
    #[error("context key {key:?} is at version {current}, not {expected}")]
    VersionConflict { key: String, expected: u64, current: u64 },
    #[error("delegation loop from task {task_id}: {trail}")]
    LoopDetected { task_id: u64, trail: String },
    #[error("waiting would deadlock: {cycle}")]
    Deadlock { cycle: String },
    #[error("the replicated state would hold {bytes} bytes, over state_bytes_max ({max}); finished tasks leave with retention, conversations can be deleted")]
    StateFull { bytes: u64, max: u64 },
    #[error("conversation {conversation_id:?} not found")]
    ConversationNotFound { conversation_id: String },
    /// A policy change that would refuse all new work of some kind or delete
    /// retained tasks, sent without `force`.
    #[error("this change of {field} needs \"force\": true: {reason}")]
    ForceRequired { field: String, reason: String },
    /// An idempotency key sent again with another request: a key names one
    /// request, so the second is refused rather than answered with the first.
    #[error("idempotency key {key:?} names task {task_id}, submitted with another {field}")]
    IdempotencyConflict { key: String, task_id: u64, field: String },
    // Flow control: appended, so that errors recorded before keep their meaning.
    /// A budget-paused task cannot resume while its tree's budget is still
    /// exhausted: raise the budget (`SetBudget` on the root), which resumes it.
    #[error("task {task_id} is paused by the budget of its tree (root {root_id}), still exhausted: {reason}")]
    BudgetExhausted { task_id: u64, root_id: u64, reason: String },
    #[error("no limits are set for key {key:?}")]
    LimitsNotFound { key: String },
    #[error("task {task_id} is {state:?}, not paused")]
    NotPaused { task_id: u64, state: TaskState },
}

impl Error {
    /// The stable machine-readable code used in JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid",
            Error::TaskNotFound { .. } => "task_not_found",
            Error::AgentNotFound { .. } => "agent_not_found",
            Error::StaleEpoch { .. } => "stale_epoch",
            Error::WrongSession { .. } => "wrong_session",
            Error::Superseded { .. } => "superseded",
            Error::AlreadyTerminal { .. } => "already_terminal",
            Error::LeaseExpired { .. } => "lease_expired",
            Error::QueueFull { .. } => "queue_full",
            Error::LimitReached { .. } => "limit_reached",
            Error::TooLarge { .. } => "too_large",
            Error::NotCapable { .. } => "not_capable",
            Error::VersionConflict { .. } => "version_conflict",
            Error::LoopDetected { .. } => "loop_detected",
            Error::Deadlock { .. } => "deadlock",
            Error::StateFull { .. } => "state_full",
            Error::ConversationNotFound { .. } => "not_found",
            Error::ForceRequired { .. } => "force_required",
            Error::IdempotencyConflict { .. } => "idempotency_conflict",
            Error::BudgetExhausted { .. } => "budget_exhausted",
            Error::LimitsNotFound { .. } => "not_found",
            Error::NotPaused { .. } => "not_paused",
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::Invalid { field: field.to_string(), reason: reason.into() }
}

/// Names (queues, agent ids, keys): 1..=max bytes of `[A-Za-z0-9._:-]`.
pub fn validate_name(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::TooLarge { field: field.to_string(), bytes: value.len() as u64, max: max as u64 });
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))) {
        return Err(invalid(field, format!("character {bad:?} is not allowed (use A-Z a-z 0-9 . _ - :)")));
    }
    Ok(())
}

/// A usage report's figures within `USAGE_VALUE_MAX`.
fn check_usage(usage: Option<&Usage>) -> Result<(), Error> {
    let Some(usage) = usage else { return Ok(()) };
    usage.validate().map_err(|(field, reason)| invalid(&format!("usage.{field}"), reason))
}

fn check_size(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::TooLarge { field: field.to_string(), bytes: value.len() as u64, max: max as u64 });
    }
    Ok(())
}

/// Checks of a new task that need no state; run at the HTTP edge and again on apply.
pub fn validate_new_task(task: &NewTask, limits: &Limits) -> Result<(), Error> {
    validate_name("queue", &task.queue, limits.queue_name_bytes_max)?;
    check_size("payload", &task.payload, limits.payload_bytes_max)?;
    if task.priority > 9 {
        return Err(invalid("priority", "must be 0..=9"));
    }
    if task.max_attempts == 0 || task.max_attempts > limits.attempts_max {
        return Err(invalid("max_attempts", format!("must be 1..={}", limits.attempts_max)));
    }
    if let Some(key) = &task.idempotency_key {
        validate_name("idempotency_key", key, limits.id_bytes_max)?;
    }
    if let Some(conversation_id) = &task.conversation_id {
        validate_name("conversation_id", conversation_id, limits.id_bytes_max)?;
    }
    if task.deadline_ms == Some(0) {
        return Err(invalid("deadline_ms", "must be positive"));
    }
    if let Some(key) = &task.concurrency_key {
        validate_name("concurrency_key", key, limits.id_bytes_max)?;
    }
    if let Some(estimate) = task.cost_estimate {
        if estimate > USAGE_VALUE_MAX {
            return Err(invalid("cost_estimate", format!("{estimate} is over {USAGE_VALUE_MAX}")));
        }
    }
    if let Some(budget) = &task.budget {
        if task.parent_id.is_some() {
            return Err(invalid("budget", "only a root carries a budget: it covers the whole delegation tree"));
        }
        budget.validate().map_err(|(field, reason)| invalid(&format!("budget.{field}"), reason))?;
    }
    if let Some(traceparent) = &task.traceparent {
        if !valid_traceparent(traceparent) {
            return Err(invalid(
                "traceparent",
                "must be 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, ids not all zero",
            ));
        }
    }
    // A delegation is fenced like a result: without the fence of the
    // parent's lease, nothing may be decided on the parent's behalf.
    match (task.parent_id, task.parent_fence) {
        (Some(_), None) => {
            return Err(invalid("parent_fence", "required with parent_id: the fence of the parent's lease"))
        }
        (None, Some(_)) => return Err(invalid("parent_fence", "only with parent_id")),
        _ => {}
    }
    Ok(())
}

/// Whether `text` is a version-00 W3C `traceparent` as the edge stores it:
/// `00-` then 32 and 16 lowercase hex digits, neither all zeros, and two for
/// the flags (https://www.w3.org/TR/trace-context/#traceparent-header).
pub fn valid_traceparent(text: &str) -> bool {
    let bytes = text.as_bytes();
    let hex =
        |range: std::ops::Range<usize>| bytes[range].iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    let nonzero = |range: std::ops::Range<usize>| bytes[range].iter().any(|b| *b != b'0');
    bytes.len() == 55
        && bytes.starts_with(b"00-")
        && bytes[35] == b'-'
        && bytes[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && nonzero(3..35)
        && nonzero(36..52)
}

/// `Limits::validate` as a refusal.
fn validate_policy(policy: &Limits) -> Result<(), Error> {
    policy.validate().map_err(|invalid| Error::Invalid { field: invalid.field.to_string(), reason: invalid.reason })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// key -> (version, value)
    pub entries: BTreeMap<String, (u64, String)>,
    /// key -> the task and fence that wrote the entry, for an entry written
    /// on a task's behalf (a client's own writes have none).
    #[serde(default)]
    pub writers: BTreeMap<String, Writer>,
    pub bytes: usize,
    /// Log time of the last write, from which `conversation_ttl_ms` counts.
    /// `None` for a conversation written by an earlier version, which then
    /// leaves only with its tasks or when deleted (never by a guessed age).
    #[serde(default)]
    pub written_ms: Option<u64>,
}

/// The bytes of a task counted against `state_bytes_max`: what a client or
/// an agent chose the size of (payload, result, error).
fn task_bytes(task: &Task) -> u64 {
    (task.payload.len() + task.result().map_or(0, str::len) + task.error().map_or(0, str::len)) as u64
}

/// Policy versions kept for `config history` and rollback.
pub const POLICY_HISTORY_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub policy: Limits,
    pub set_ms: u64,
    /// Why: "bootstrap", "set by client", "rollback to 3: dispatch stalled", ...
    pub note: String,
    /// The change needed `force` (it refused some new work or deleted
    /// retained tasks when it was made) and carried it; the note says why.
    #[serde(default)]
    pub forced: bool,
}

/// One edge set of the wait-for graph.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// Awaited tasks not finished yet.
    pub on: BTreeSet<u64>,
    /// Every task the wait named, to judge the outcome when all have finished.
    pub named: Vec<u64>,
    pub until_ms: u64,
}

/// Monotonic counters, replicated so that every node reports the same figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub submitted: u64,
    pub deduplicated: u64,
    pub leases_granted: u64,
    pub leases_expired: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub dead: u64,
    pub superseded: u64,
    pub compacted: u64,
    /// Delegations answered with a child of an earlier attempt of the parent.
    #[serde(default)]
    pub adopted: u64,
    /// Children cancelled because their parent ended and no attempt of it
    /// that reported the end owned them.
    #[serde(default)]
    pub orphans_cancelled: u64,
    /// Context entries discarded because the attempt that wrote them was superseded.
    #[serde(default)]
    pub context_entries_discarded: u64,
    /// Tasks paused (by budget, operator or exhausted attempts).
    #[serde(default)]
    pub paused: u64,
    #[serde(default)]
    pub resumed: u64,
    #[serde(default)]
    pub replayed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    now_ms: u64,
    last_index: u64,
    next_task_id: u64,
    limits: Limits,
    tasks: Tasks,
    /// Pending tasks that may be leased now, per queue, best first: (9 - priority, id).
    #[serde(deserialize_with = "bulk_map_of_sets")]
    ready: BTreeMap<String, BTreeSet<(u8, u64)>>,
    /// Pending tasks waiting out a retry backoff: (not_before_ms, id).
    #[serde(deserialize_with = "bulk_set")]
    delayed: BTreeSet<(u64, u64)>,
    /// Leased tasks by lease end: (valid_until_ms, id).
    #[serde(deserialize_with = "bulk_set")]
    lease_expiry: BTreeSet<(u64, u64)>,
    /// Leased tasks by last progress: (progress_ms, id).
    #[serde(deserialize_with = "bulk_set")]
    lease_progress: BTreeSet<(u64, u64)>,
    /// Non-terminal tasks with a deadline: (deadline_ms, id).
    #[serde(deserialize_with = "bulk_set")]
    deadlines: BTreeSet<(u64, u64)>,
    /// Terminal tasks by the time they finished: (updated_ms, id), for retention.
    #[serde(deserialize_with = "bulk_set")]
    finished: BTreeSet<(u64, u64)>,
    /// Non-terminal tasks per queue.
    open_per_queue: BTreeMap<String, u64>,
    agents: BTreeMap<String, Agent>,
    /// The last epoch given to each agent id, kept after deregistration so an
    /// epoch is never reused.
    agent_epochs: BTreeMap<String, u64>,
    #[serde(deserialize_with = "bulk_map")]
    idempotency_keys: BTreeMap<String, u64>,
    conversations: BTreeMap<String, Conversation>,
    /// The wait-for graph: waiting task -> the tasks it waits on.
    waits: BTreeMap<u64, Wait>,
    /// Reverse edges: task -> the tasks waiting on it.
    waited_by: BTreeMap<u64, BTreeSet<u64>>,
    /// Waits by deadline: (until_ms, waiting task).
    #[serde(deserialize_with = "bulk_set")]
    wait_deadlines: BTreeSet<(u64, u64)>,
    policy_version: u64,
    /// Earlier and current policies, newest last, at most `POLICY_HISTORY_MAX`.
    policy_history: Vec<PolicyVersion>,
    /// Registered agents per capability.
    servers_per_queue: BTreeMap<String, u32>,
    /// Queues with ready tasks and no agent serving them: since when (log time),
    /// and whether their tasks were already marked after the grace period.
    unserved_since: BTreeMap<String, (u64, bool)>,
    /// Ids of nodes removed from the cluster; never to be reused.
    retired_nodes: BTreeSet<u64>,
    counters: Counters,
    /// Flow control's limits table: a key, or a wildcard (`tenant:*`), to its limits.
    #[serde(default)]
    key_limits: BTreeMap<String, KeyLimits>,
    /// What each concurrency key in use holds and has used (kept after its
    /// last task until its bucket is full and its window empty).
    #[serde(default)]
    key_usage: BTreeMap<String, KeyUsage>,
    /// Fair dispatch's turn per queue and priority band (inverse priority).
    #[serde(default)]
    drr: BTreeMap<String, BTreeMap<u8, Drr>>,
    // Derived from the fields above, so not stored in snapshots: `restore`
    // recounts them when a snapshot is loaded, and `check_invariants` checks them.
    /// Bytes counted against `state_bytes_max` (see `task_bytes`, `Conversation::bytes`).
    #[serde(skip)]
    state_bytes: u64,
    /// Conversations by last write: (written_ms, id), for `conversation_ttl_ms`.
    #[serde(skip)]
    conversation_expiry: BTreeSet<(u64, String)>,
    /// Tasks in the state per conversation id: a conversation leaves with its last task.
    #[serde(skip)]
    conversation_tasks: BTreeMap<String, u64>,
    /// The delegation trees: parent -> its children in the state.
    #[serde(skip)]
    children: BTreeMap<u64, BTreeSet<u64>>,
    /// Open tasks per tree, by the tree's root (roots of finished trees absent).
    #[serde(skip)]
    tree_open: BTreeMap<u64, u64>,
    /// Trees that have wholly finished, by when their last task did: (ms,
    /// root). Retention compacts whole trees from here, oldest first.
    #[serde(skip)]
    compactable: BTreeSet<(u64, u64)>,
    /// Tasks in the trees of `compactable`: what retention may remove.
    #[serde(skip)]
    compactable_tasks: u64,
    /// Context entries per writing task: task -> (conversation, key).
    #[serde(skip)]
    written: BTreeMap<u64, BTreeSet<(String, String)>>,
    /// `ready` again, split for fair dispatch: queue -> inverse priority ->
    /// concurrency key ("" for tasks without one) -> task ids.
    #[serde(skip)]
    fair_ready: FairReady,
    /// Reported usage per delegation tree, by root (trees with none absent).
    #[serde(skip)]
    tree_usage: BTreeMap<u64, Usage>,
    /// Key records with no open task, by when they may go: (ms, key).
    #[serde(skip)]
    key_idle: BTreeSet<(u64, String)>,
}

/// Entries preallocated at most when reading a map, whatever length its
/// encoding claims (the claim is not trusted; the vector grows past it).
const PREALLOCATED_ENTRIES_MAX: usize = 1 << 20;

/// Reads a map into a `BTreeMap` built in bulk from its entries: full nodes,
/// where inserting one entry at a time in key order leaves them a little
/// over half full. For the task map of a large state that is most of a
/// third of its memory. Duplicate keys keep the last value, as inserts would.
fn bulk_map<'de, D, K, V>(deserializer: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<K, V> {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(PREALLOCATED_ENTRIES_MAX));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries.into_iter().collect())
        }
    }
    deserializer.deserialize_map(Entries(std::marker::PhantomData))
}

/// The task map, each task shared between the state and the copies made of
/// it for snapshots (copy on write): copying the state for a snapshot copies
/// a pointer per task instead of every task's strings, so the copy holds
/// apply back for milliseconds, not seconds, on a large state; a task
/// changed while a copy is being written is copied then, alone. Encoded as
/// the plain map of tasks it was (the snapshot format does not change).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tasks(BTreeMap<u64, Arc<Task>>);

impl Tasks {
    pub fn get(&self, id: &u64) -> Option<&Task> {
        self.0.get(id).map(|task| &**task)
    }
    /// The task to change: copied first if a snapshot's copy still shares it.
    pub fn get_mut(&mut self, id: &u64) -> Option<&mut Task> {
        self.0.get_mut(id).map(Arc::make_mut)
    }
    pub fn insert(&mut self, id: u64, task: Task) {
        self.0.insert(id, Arc::new(task));
    }
    pub fn remove(&mut self, id: &u64) -> Option<Task> {
        self.0.remove(id).map(Arc::unwrap_or_clone)
    }
    pub fn contains_key(&self, id: &u64) -> bool {
        self.0.contains_key(id)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Task> {
        self.0.values().map(|task| &**task)
    }
    pub fn range(&self, range: impl std::ops::RangeBounds<u64>) -> impl DoubleEndedIterator<Item = (&u64, &Task)> {
        self.0.range(range).map(|(id, task)| (id, &**task))
    }
}

impl std::ops::Index<&u64> for Tasks {
    type Output = Task;
    fn index(&self, id: &u64) -> &Task {
        &self.0[id]
    }
}

impl Serialize for Tasks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(id, task)| (id, &**task)))
    }
}

impl<'de> Deserialize<'de> for Tasks {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Tasks, D::Error> {
        let tasks: BTreeMap<u64, Task> = bulk_map(deserializer)?;
        Ok(Tasks(tasks.into_iter().map(|(id, task)| (id, Arc::new(task))).collect()))
    }
}

/// Reads a sequence into a `BTreeSet` built in bulk, as `bulk_map` does a
/// map: the indexes of a large state (the ready queues above all) are
/// nearly as many entries as its tasks.
fn bulk_set<'de, D, T>(deserializer: D) -> Result<BTreeSet<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Ord,
{
    BulkSet::deserialize(deserializer).map(|set| set.0)
}

/// A `BTreeSet` read by `bulk_set`, to be a value of a map.
struct BulkSet<T>(BTreeSet<T>);

impl<'de, T: Deserialize<'de> + Ord> Deserialize<'de> for BulkSet<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Ord> serde::de::Visitor<'de> for Items<T> {
            type Value = BulkSet<T>;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(PREALLOCATED_ENTRIES_MAX));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(BulkSet(items.into_iter().collect()))
            }
        }
        deserializer.deserialize_seq(Items(std::marker::PhantomData))
    }
}

/// A map of sets (`ready`), each set built in bulk.
fn bulk_map_of_sets<'de, D, K, T>(deserializer: D) -> Result<BTreeMap<K, BTreeSet<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    T: Deserialize<'de> + Ord,
{
    let sets: BTreeMap<K, BulkSet<T>> = bulk_map(deserializer)?;
    Ok(sets.into_iter().map(|(key, set)| (key, set.0)).collect())
}

/// queue -> inverse priority -> concurrency key -> ready task ids.
type FairReady = BTreeMap<String, BTreeMap<u8, BTreeMap<String, BTreeSet<u64>>>>;

/// What `State` derives from its stored fields (recounted on restore, checked
/// by `check_invariants`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Derived {
    state_bytes: u64,
    conversation_expiry: BTreeSet<(u64, String)>,
    conversation_tasks: BTreeMap<String, u64>,
    children: BTreeMap<u64, BTreeSet<u64>>,
    tree_open: BTreeMap<u64, u64>,
    compactable: BTreeSet<(u64, u64)>,
    compactable_tasks: u64,
    written: BTreeMap<u64, BTreeSet<(String, String)>>,
    fair_ready: FairReady,
    tree_usage: BTreeMap<u64, Usage>,
    key_idle: BTreeSet<(u64, String)>,
}

impl State {
    pub fn new(limits: Limits) -> State {
        let first =
            PolicyVersion { version: 1, policy: limits.clone(), set_ms: 0, note: "bootstrap".into(), forced: false };
        State { limits, next_task_id: 1, policy_version: 1, policy_history: vec![first], ..State::default() }
    }

    /// Recounts what is derived from the stored fields (the byte count, the
    /// conversation indexes, the delegation trees). Call it on a state read
    /// from a snapshot.
    pub fn restore(&mut self) {
        let derived = self.derived();
        self.state_bytes = derived.state_bytes;
        self.conversation_expiry = derived.conversation_expiry;
        self.conversation_tasks = derived.conversation_tasks;
        self.children = derived.children;
        self.tree_open = derived.tree_open;
        self.compactable = derived.compactable;
        self.compactable_tasks = derived.compactable_tasks;
        self.written = derived.written;
        self.fair_ready = derived.fair_ready;
        self.tree_usage = derived.tree_usage;
        self.key_idle = derived.key_idle;
    }

    /// Recounts the derived fields in one pass over the tasks. It runs at
    /// every start of a replica on the whole state, so it avoids per-task map
    /// lookups where it can and builds the large maps from sorted runs (bulk
    /// built: full nodes, no rebalancing) rather than by one insert per task.
    fn derived(&self) -> Derived {
        let mut state_bytes = self.conversations.values().map(|c| c.bytes as u64).sum::<u64>();
        let conversation_expiry =
            self.conversations.iter().filter_map(|(id, c)| c.written_ms.map(|at| (at, id.clone()))).collect();
        let mut conversation_tasks: BTreeMap<String, u64> = BTreeMap::new();
        let mut children: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut tree_usage: BTreeMap<u64, Usage> = BTreeMap::new();
        // Per task: (its tree's root, whether it is open, when it was updated).
        let mut memberships: Vec<(u64, bool, u64)> = Vec::with_capacity(self.tasks.len());
        for task in self.tasks.values() {
            state_bytes += task_bytes(task);
            if let Some(id) = task.conversation_id() {
                match conversation_tasks.get_mut(id) {
                    Some(count) => *count += 1,
                    None => {
                        conversation_tasks.insert(id.to_string(), 1);
                    }
                }
            }
            // A parent missing from the state (compacted by a version that did
            // not keep trees whole) makes its child a root.
            let parent = task.parent_id().filter(|parent| self.tasks.contains_key(parent));
            if let Some(parent) = parent {
                children.entry(parent).or_default().insert(task.id);
            }
            let root = if parent.is_some() { self.root_of(task.id) } else { task.id };
            memberships.push((root, !task.state.is_terminal(), task.updated_ms));
            if !task.usage().is_zero() {
                tree_usage.entry(root).or_default().add(task.usage());
            }
        }
        // Roots are mostly in order already (a root precedes its tree).
        memberships.sort_by_key(|&(root, _, _)| root);
        let mut tree_open = Vec::new();
        let mut compactable = Vec::new();
        let mut compactable_tasks = 0;
        for tree in memberships.chunk_by(|a, b| a.0 == b.0) {
            let root = tree[0].0;
            let open = tree.iter().filter(|(_, open, _)| *open).count() as u64;
            if open > 0 {
                tree_open.push((root, open));
            } else {
                compactable.push((tree.iter().map(|&(_, _, updated_ms)| updated_ms).max().unwrap_or(0), root));
                compactable_tasks += tree.len() as u64;
            }
        }
        drop(memberships);
        let tree_open: BTreeMap<u64, u64> = tree_open.into_iter().collect();
        let compactable: BTreeSet<(u64, u64)> = compactable.into_iter().collect();
        let mut written: BTreeMap<u64, BTreeSet<(String, String)>> = BTreeMap::new();
        for (conversation_id, conversation) in &self.conversations {
            for (key, writer) in &conversation.writers {
                written.entry(writer.task_id).or_default().insert((conversation_id.clone(), key.clone()));
            }
        }
        let mut fair_ready = FairReady::new();
        for (queue, set) in &self.ready {
            // `set` is ordered by (band, id): the ids of one band and key come in order.
            let mut bands: BTreeMap<u8, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
            for &(band, id) in set {
                let key = self.tasks[&id].concurrency_key().unwrap_or("");
                let keys = bands.entry(band).or_default();
                match keys.get_mut(key) {
                    Some(ids) => ids.push(id),
                    None => {
                        keys.insert(key.to_string(), vec![id]);
                    }
                }
            }
            let bands = bands
                .into_iter()
                .map(|(band, keys)| {
                    (band, keys.into_iter().map(|(key, ids)| (key, ids.into_iter().collect())).collect())
                })
                .collect();
            fair_ready.insert(queue.clone(), bands);
        }
        let key_idle =
            self.key_usage.iter().filter_map(|(key, usage)| usage.idle_from_ms.map(|at| (at, key.clone()))).collect();
        Derived {
            state_bytes,
            conversation_expiry,
            conversation_tasks,
            children,
            tree_open,
            compactable,
            compactable_tasks,
            written,
            fair_ready,
            tree_usage,
            key_idle,
        }
    }

    /// The root of a task's delegation tree: its oldest ancestor in the state.
    /// (Parents have smaller ids than their children, so the walk ends.)
    fn root_of(&self, mut task_id: u64) -> u64 {
        while let Some(parent) = self.tasks[&task_id].parent_id().filter(|parent| self.tasks.contains_key(parent)) {
            task_id = parent;
        }
        task_id
    }

    /// Every task of the tree under `root`, the root first.
    fn tree(&self, root: u64) -> Vec<u64> {
        let mut tree = vec![root];
        let mut next = 0;
        while next < tree.len() {
            if let Some(children) = self.children.get(&tree[next]) {
                tree.extend(children.iter().copied());
            }
            next += 1;
        }
        tree
    }

    /// Bytes of the replicated state counted against `state_bytes_max`.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    pub fn conversation_count(&self) -> usize {
        self.conversations.len()
    }

    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    pub fn policy_history(&self) -> &[PolicyVersion] {
        &self.policy_history
    }

    /// What a change to `policy` would do to the state as it is now that
    /// needs `force`: a `*_max` lowered below what is in use (so some kind of
    /// new work, or a re-registration, would be refused), or retention
    /// lowered so that finished tasks kept for reads would be deleted. Only
    /// keys the change lowers are judged, so a value forced earlier does not
    /// make every later change need force. Each reason names its key.
    pub fn force_reasons(&self, policy: &Limits) -> Vec<(&'static str, String)> {
        let old = &self.limits;
        let mut reasons = Vec::new();
        let task_count = self.tasks.len();
        let open = task_count - self.finished.len();
        if policy.tasks_max < old.tasks_max {
            if policy.tasks_max <= open {
                reasons.push((
                    "tasks_max",
                    format!("{} is not above the {open} open tasks: every submit would be refused", policy.tasks_max),
                ));
            } else if policy.tasks_max <= task_count {
                let deleted = task_count + 1 - policy.tasks_max;
                reasons.push((
                    "tasks_max",
                    format!(
                        "{} is not above the {task_count} tasks kept: the next submit would delete {deleted} finished tasks",
                        policy.tasks_max
                    ),
                ));
            }
        }
        if policy.queue_tasks_max < old.queue_tasks_max {
            if let Some((queue, count)) = self.open_per_queue.iter().max_by_key(|(queue, count)| (**count, queue.len()))
            {
                if (*count as usize) > policy.queue_tasks_max {
                    reasons.push((
                        "queue_tasks_max",
                        format!(
                            "{} is below the {count} open tasks of queue {queue:?}: every submit to it would be refused",
                            policy.queue_tasks_max
                        ),
                    ));
                }
            }
        }
        if policy.agents_max < old.agents_max && self.agents.len() > policy.agents_max {
            reasons.push((
                "agents_max",
                format!(
                    "{} is below the {} agents registered: every new registration would be refused",
                    policy.agents_max,
                    self.agents.len()
                ),
            ));
        }
        if policy.queue_name_bytes_max < old.queue_name_bytes_max {
            let in_use = self.open_per_queue.keys().chain(self.servers_per_queue.keys());
            if let Some(queue) =
                in_use.filter(|queue| queue.len() > policy.queue_name_bytes_max).max_by_key(|queue| queue.len())
            {
                reasons.push((
                    "queue_name_bytes_max",
                    format!(
                        "{} is below the {} bytes of queue {queue:?}, in use: submits to it and registrations serving it would be refused",
                        policy.queue_name_bytes_max,
                        queue.len()
                    ),
                ));
            }
        }
        if policy.id_bytes_max < old.id_bytes_max {
            let in_use = self.agents.keys().chain(self.conversations.keys()).chain(self.idempotency_keys.keys());
            if let Some(id) = in_use.filter(|id| id.len() > policy.id_bytes_max).max_by_key(|id| id.len()) {
                reasons.push((
                    "id_bytes_max",
                    format!(
                        "{} is below the {} bytes of {id:?}, in use: requests naming it would be refused",
                        policy.id_bytes_max,
                        id.len()
                    ),
                ));
            }
        }
        let widest = self.agents.values().map(|agent| agent.capabilities.len()).max().unwrap_or(0);
        if policy.capabilities_per_agent_max < old.capabilities_per_agent_max
            && widest > policy.capabilities_per_agent_max
        {
            reasons.push((
                "capabilities_per_agent_max",
                format!(
                    "{} is below the {widest} capabilities of a registered agent: it could not register again",
                    policy.capabilities_per_agent_max
                ),
            ));
        }
        let largest = self.agents.values().map(|agent| agent.capacity).max().unwrap_or(0);
        if policy.leases_per_agent_max < old.leases_per_agent_max && largest > policy.leases_per_agent_max {
            reasons.push((
                "leases_per_agent_max",
                format!(
                    "{} is below the capacity {largest} of a registered agent: it could not register again",
                    policy.leases_per_agent_max
                ),
            ));
        }
        if policy.conversations_max < old.conversations_max && self.conversations.len() > policy.conversations_max {
            reasons.push((
                "conversations_max",
                format!(
                    "{} is below the {} conversations kept: every new conversation would be refused",
                    policy.conversations_max,
                    self.conversations.len()
                ),
            ));
        }
        let fullest = self.conversations.values().map(|conversation| conversation.bytes).max().unwrap_or(0);
        if policy.conversation_bytes_max < old.conversation_bytes_max && fullest > policy.conversation_bytes_max {
            reasons.push((
                "conversation_bytes_max",
                format!(
                    "{} is below the {fullest} bytes of a conversation: every write to it would be refused",
                    policy.conversation_bytes_max
                ),
            ));
        }
        if policy.idempotency_keys_max < old.idempotency_keys_max
            && self.idempotency_keys.len() > policy.idempotency_keys_max
        {
            reasons.push((
                "idempotency_keys_max",
                format!(
                    "{} is below the {} idempotency keys kept: every submit with a new key would be refused",
                    policy.idempotency_keys_max,
                    self.idempotency_keys.len()
                ),
            ));
        }
        if policy.finished_tasks_max < old.finished_tasks_max && self.finished.len() > policy.finished_tasks_max {
            reasons.push((
                "finished_tasks_max",
                format!(
                    "{} is below the {} finished tasks kept: {} of them would be deleted at once",
                    policy.finished_tasks_max,
                    self.finished.len(),
                    self.finished.len() - policy.finished_tasks_max
                ),
            ));
        }
        if policy.limit_keys_max < old.limit_keys_max && self.key_limits.len() > policy.limit_keys_max {
            reasons.push((
                "limit_keys_max",
                format!(
                    "{} is below the {} entries of the limits table: every new entry would be refused",
                    policy.limit_keys_max,
                    self.key_limits.len()
                ),
            ));
        }
        if policy.finished_task_ttl_ms < old.finished_task_ttl_ms {
            let now = self.now_ms;
            // Retention by age compacts whole trees, timed from their last task's end.
            let expired: usize = self
                .compactable
                .iter()
                .take_while(|(at, _)| at.saturating_add(policy.finished_task_ttl_ms) < now)
                .map(|(_, root)| self.tree(*root).len())
                .sum();
            if expired > 0 {
                reasons.push((
                    "finished_task_ttl_ms",
                    format!(
                        "{} ms would delete {expired} finished tasks at once (finished longer ago than that)",
                        policy.finished_task_ttl_ms
                    ),
                ));
            }
        }
        reasons
    }

    /// Whether a change to `policy` may be made with or without `force`:
    /// `Ok(None)` when it needs none, `Ok(Some(why))` when it needs force and
    /// carries it, `ForceRequired` naming the first key and every reason
    /// when it needs force and lacks it. Run at the edge and again on apply.
    pub fn judge_policy(&self, policy: &Limits, force: bool) -> Result<Option<String>, Error> {
        let reasons = self.force_reasons(policy);
        let Some((field, _)) = reasons.first() else { return Ok(None) };
        let why = reasons.iter().map(|(field, why)| format!("{field} {why}")).collect::<Vec<_>>().join("; ");
        if !force {
            return Err(Error::ForceRequired { field: field.to_string(), reason: why });
        }
        Ok(Some(why))
    }

    /// Validates and installs a policy. A change or rollback by a client
    /// (`judged`) must also pass `force_reasons` unless it carries `force`;
    /// the policy guard's rollback is not judged, so that it can always
    /// restore a version that served.
    fn set_policy(&mut self, policy: &Limits, note: String, judged: bool, force: bool) -> Result<Outcome, Error> {
        validate_policy(policy)?;
        let mut note = note;
        let mut forced = false;
        if judged {
            if let Some(why) = self.judge_policy(policy, force)? {
                forced = true;
                note = format!("{note} (forced: {why})");
            }
        }
        self.policy_version += 1;
        self.limits = policy.clone();
        self.policy_history.push(PolicyVersion {
            version: self.policy_version,
            policy: policy.clone(),
            set_ms: self.now_ms,
            note,
            forced,
        });
        if self.policy_history.len() > POLICY_HISTORY_MAX {
            self.policy_history.remove(0);
        }
        Ok(Outcome::PolicySet { version: self.policy_version })
    }

    // ---- reads ----

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
    pub fn last_index(&self) -> u64 {
        self.last_index
    }
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    pub fn task(&self, id: u64) -> Option<&Task> {
        self.tasks.get(&id)
    }
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
    pub fn agent(&self, id: &str) -> Option<&Agent> {
        self.agents.get(id)
    }
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }
    pub fn node_retired(&self, node_id: u64) -> bool {
        self.retired_nodes.contains(&node_id)
    }
    pub fn conversation(&self, id: &str) -> Option<&Conversation> {
        self.conversations.get(id)
    }

    /// Tasks with id > `after_id`, filtered, in id order, at most `limit`.
    pub fn tasks(&self, queue: Option<&str>, state: Option<TaskState>, after_id: u64, limit: usize) -> Vec<&Task> {
        self.tasks
            .range(after_id.saturating_add(1)..)
            .map(|(_, task)| task)
            .filter(|task| queue.is_none_or(|q| task.queue == q))
            .filter(|task| state.is_none_or(|s| task.state == s))
            .take(limit)
            .collect()
    }

    /// Whether some registered agent with free capacity serves a queue with a
    /// task ready now that no key's limit holds back: if so and no lease is
    /// granted, dispatch is stalled.
    pub fn dispatch_possible(&self) -> bool {
        self.agents.values().any(|agent| {
            (agent.leased_task_ids.len() as u32) < agent.capacity
                && agent.capabilities.iter().any(|q| self.queue_has_eligible(q))
        })
    }

    /// Queues with tasks ready now that no registered agent serves.
    pub fn unserved_queues(&self) -> Vec<String> {
        self.ready
            .iter()
            .filter(|(queue, set)| !set.is_empty() && self.servers_per_queue.get(*queue).copied().unwrap_or(0) == 0)
            .map(|(queue, _)| queue.clone())
            .collect()
    }

    /// Tracks unserved queues; past the grace period their waiting tasks get
    /// an error saying why nothing happens (they stay pending: an agent may
    /// still come).
    fn check_unserved(&mut self) {
        let now = self.now_ms;
        let unserved = self.unserved_queues();
        self.unserved_since.retain(|queue, _| unserved.contains(queue));
        for queue in unserved {
            let (since, marked) = *self.unserved_since.entry(queue.clone()).or_insert((now, false));
            if marked || now.saturating_sub(since) <= self.limits.unserved_grace_ms {
                continue;
            }
            let waiting: Vec<u64> =
                self.ready.get(&queue).map(|set| set.iter().map(|(_, id)| *id).collect()).unwrap_or_default();
            for id in waiting {
                let error = format!(
                    "unserved: no registered agent serves queue {queue:?} (for {} ms)",
                    now.saturating_sub(since)
                );
                self.set_error(id, error);
            }
            self.unserved_since.insert(queue, (since, true));
        }
    }

    /// Counts of tasks per (queue, state), for metrics and status.
    pub fn queue_stats(&self) -> BTreeMap<String, [u64; 7]> {
        let mut stats: BTreeMap<String, [u64; 7]> = BTreeMap::new();
        for task in self.tasks.values() {
            stats.entry(task.queue.clone()).or_default()[task.state as usize] += 1;
        }
        stats
    }

    /// Age in log time of the oldest task still pending, if any.
    pub fn oldest_pending_age_ms(&self) -> Option<u64> {
        let oldest = self.ready.values().filter_map(|set| set.iter().map(|(_, id)| *id).min()).min();
        let oldest_delayed = self.delayed.iter().map(|(_, id)| *id).min();
        let id = match (oldest, oldest_delayed) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.now_ms.saturating_sub(self.tasks[&id].created_ms))
    }

    /// The earliest log time at which advancing time would change something
    /// (a backoff ends, a lease expires, a deadline or a wait times out, a
    /// key held back by its rate or its tokens per minute may be granted again).
    /// The leader proposes a `Tick` once its clock reaches it.
    pub fn next_due_ms(&self) -> Option<u64> {
        [
            // Saturating throughout: a client may ask for a deadline at the end
            // of time, and a wrapped sum would make the leader tick nonstop.
            self.delayed.first().map(|(at, _)| *at),
            self.lease_expiry.first().map(|(at, _)| at.saturating_add(1)),
            self.lease_progress
                .first()
                .map(|(at, _)| at.saturating_add(self.limits.stall_timeout_ms).saturating_add(1)),
            self.deadlines.first().map(|(at, _)| at.saturating_add(1)),
            self.wait_deadlines.first().map(|(at, _)| at.saturating_add(1)),
            self.compactable
                .first()
                .map(|(at, _)| at.saturating_add(self.limits.finished_task_ttl_ms).saturating_add(1)),
            self.conversation_expiry
                .first()
                .map(|(at, _)| at.saturating_add(self.limits.conversation_ttl_ms).saturating_add(1)),
            self.unserved_since
                .values()
                .filter(|(_, marked)| !marked)
                .map(|(since, _)| since.saturating_add(self.limits.unserved_grace_ms).saturating_add(1))
                .min(),
            self.next_key_due_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ---- checks: what applying would refuse, decided without changing anything ----

    /// Whether applying `command` now would refuse it, and why, changing
    /// nothing. The HTTP edge runs it before proposing, so a refusal costs
    /// no log entry; `apply` runs the same checks again first, since the
    /// state may move in between. Two refusals are left to the log because
    /// applying them records something: a report under a stale fence (counted
    /// as superseded) and a delegation loop (dead-letters its parent). The
    /// tasks of a submit are judged one by one by `check_new_task`.
    pub fn check(&self, command: &Command) -> Result<(), Error> {
        match command {
            Command::Tick | Command::RetireNode { .. } => Ok(()),
            Command::Submit { tasks } => {
                if tasks.len() > self.limits.batch_tasks_max {
                    return Err(Error::LimitReached {
                        limit: "batch_tasks_max".into(),
                        max: self.limits.batch_tasks_max as u64,
                    });
                }
                Ok(())
            }
            Command::Cancel { task_id } => self.open_task(*task_id).map(drop),
            Command::RegisterAgent { agent_id, capabilities, capacity, .. } => {
                self.check_register(agent_id, capabilities, *capacity)
            }
            Command::DeregisterAgent { agent_id, epoch } | Command::ExpireAgent { agent_id, epoch } => {
                self.current_agent(agent_id, *epoch).map(drop)
            }
            Command::Lease { agent_id, epoch, queues, lease_ttl_ms, .. } => {
                self.check_lease(agent_id, *epoch, queues, *lease_ttl_ms).map(drop)
            }
            Command::Complete { task_id, fence, result, usage } => {
                check_size("result", result, self.limits.result_bytes_max)?;
                check_usage(usage.as_ref())?;
                if self.completed_before(*task_id, *fence, result).is_some() {
                    return Ok(());
                }
                // A stale fence is left to the log (it is counted there).
                let Some(task) = self.check_report(*task_id, *fence)? else { return Ok(()) };
                let old = task.result().map_or(0, str::len);
                self.check_room(result.len() as u64, old as u64)
            }
            Command::Fail { task_id, fence, error, retryable, usage } => {
                check_size("error", error, self.limits.result_bytes_max)?;
                check_usage(usage.as_ref())?;
                if self.failed_before(*task_id, *fence, error, *retryable).is_some() {
                    return Ok(());
                }
                // A stale fence is left to the log (it is counted there).
                let Some(task) = self.check_report(*task_id, *fence)? else { return Ok(()) };
                let old = task.error().map_or(0, str::len);
                self.check_room(error.len() as u64, old as u64)
            }
            Command::Extend { task_id, fence, lease_ttl_ms } => {
                self.check_lease_ttl(*lease_ttl_ms)?;
                self.check_report_on_lease(*task_id, *fence)
            }
            Command::Progress { task_id, fence } => self.check_report_on_lease(*task_id, *fence),
            Command::ContextPut { conversation_id, key, value, expected_version, writer } => {
                self.check_context_put(conversation_id, key, value, *expected_version, *writer).map(drop)
            }
            Command::ContextDelete { conversation_id } => {
                if self.conversations.contains_key(conversation_id) {
                    Ok(())
                } else {
                    Err(Error::ConversationNotFound { conversation_id: conversation_id.clone() })
                }
            }
            Command::Wait { task_id, fence, on, timeout_ms } => self.check_wait(*task_id, *fence, on, *timeout_ms),
            Command::SetPolicy { policy, expected_version, force, .. } => {
                if *expected_version != self.policy_version {
                    return Err(Error::VersionConflict {
                        key: "policy".into(),
                        expected: *expected_version,
                        current: self.policy_version,
                    });
                }
                validate_policy(policy)?;
                self.judge_policy(policy, *force).map(drop)
            }
            Command::RollbackPolicy { to_version, by_client, force, expected_version, .. } => {
                if let Some(expected) = expected_version.filter(|v| *v != self.policy_version) {
                    return Err(Error::VersionConflict {
                        key: "policy".into(),
                        expected,
                        current: self.policy_version,
                    });
                }
                let policy = &self.rollback_target(*to_version)?.policy;
                validate_policy(policy)?;
                if *by_client {
                    self.judge_policy(policy, *force)?;
                }
                Ok(())
            }
            Command::SetKeyLimits { key, limits } => self.check_set_key_limits(key, limits),
            Command::DeleteKeyLimits { key } => self.check_delete_key_limits(key),
            Command::Pause { task_id } => self.open_task(*task_id).map(drop),
            Command::Resume { task_id } => self.check_resume(*task_id),
            Command::Replay { queue, state, concurrency_key, limit, .. } => {
                self.check_replay(queue.as_deref(), *state, concurrency_key.as_deref(), *limit)
            }
            Command::SetBudget { task_id, budget } => self.check_set_budget(*task_id, budget.as_ref()),
        }
    }

    fn rollback_target(&self, to_version: u64) -> Result<&PolicyVersion, Error> {
        self.policy_history
            .iter()
            .find(|v| v.version == to_version)
            .ok_or_else(|| invalid("version", format!("policy version {to_version} is not in the history")))
    }

    // ---- the state transition ----

    /// Applies one log entry. `index` is the entry's Raft log index; it is the
    /// fencing token of every lease the entry grants.
    pub fn apply(&mut self, index: u64, request: &Request) -> Response {
        assert!(index > self.last_index, "log index went back: {index} after {}", self.last_index);
        self.last_index = index;
        self.now_ms = self.now_ms.max(request.now_ms);
        self.advance_time();
        let outcomes = request.commands.iter().map(|command| self.apply_command(index, command)).collect();
        self.check_unserved();
        Response { outcomes }
    }

    /// Moves what log time has made due: backoffs ended, leases expired, deadlines passed.
    fn advance_time(&mut self) {
        let now = self.now_ms;
        while let Some(&(not_before, id)) = self.delayed.first() {
            if not_before > now {
                break;
            }
            self.delayed.pop_first();
            assert_eq!(self.tasks[&id].state, TaskState::Pending);
            self.ready_insert(id);
        }
        while let Some(&(valid_until, id)) = self.lease_expiry.first() {
            if valid_until >= now {
                break;
            }
            self.counters.leases_expired += 1;
            self.release_lease(id);
            self.retry_or_bury(id, "lease expired");
        }
        while let Some(&(progress, id)) = self.lease_progress.first() {
            if progress.saturating_add(self.limits.stall_timeout_ms) >= now {
                break;
            }
            // Stuck: alive (heartbeats) but no progress. Revoke and re-grant elsewhere.
            let holder = self.tasks[&id].lease.as_ref().map(|lease| lease.agent_id.clone());
            self.release_lease(id);
            if let Some(agent) = holder.and_then(|holder| self.agents.get_mut(&holder)) {
                agent.stuck_count += 1;
                agent.stuck_ms = Some(now);
            }
            self.set_error(id, format!("stuck: no progress for {} ms; lease revoked", self.limits.stall_timeout_ms));
            self.retry_or_bury(id, "stuck");
        }
        // Retention by age: finished trees (and their idempotency keys) leave
        // `finished_task_ttl_ms` after their last task finished.
        while let Some(&(finished_ms, _)) = self.compactable.first() {
            if finished_ms.saturating_add(self.limits.finished_task_ttl_ms) >= now {
                break;
            }
            self.compact_oldest_tree();
        }
        while let Some((written_ms, id)) = self.conversation_expiry.first() {
            if written_ms.saturating_add(self.limits.conversation_ttl_ms) >= now {
                break;
            }
            let id = id.clone();
            self.remove_conversation(&id);
        }
        while let Some(&(until, id)) = self.wait_deadlines.first() {
            if until >= now {
                break;
            }
            self.remove_wait(id);
            if self.tasks.contains_key(&id) {
                self.set_error(id, "wait_timeout: the awaited tasks did not finish in time".to_string());
            }
        }
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline >= now {
                break;
            }
            self.finish(id, TaskState::Dead, None, |task| task.extra_mut().dead_reason = Some("expired".to_string()));
        }
        self.forget_idle_keys();
        self.enforce_retention();
    }

    fn apply_command(&mut self, index: u64, command: &Command) -> Outcome {
        // The checks the edge ran before proposing, again: the state may have
        // moved in between. What follows them only carries the command out.
        let result = self.check(command).and_then(|()| match command {
            Command::Tick => Ok(Outcome::Ticked),
            Command::Submit { tasks } => Ok(self.submit(tasks)),
            Command::Cancel { task_id } => self.cancel(*task_id),
            Command::RegisterAgent { agent_id, capabilities, capacity, session } => {
                self.register(agent_id, capabilities, *capacity, session)
            }
            Command::DeregisterAgent { agent_id, epoch } => {
                self.remove_agent(agent_id, *epoch).map(|()| Outcome::Deregistered)
            }
            Command::ExpireAgent { agent_id, epoch } => self.remove_agent(agent_id, *epoch).map(|()| Outcome::Expired),
            Command::Lease { agent_id, epoch, queues, tasks_max, lease_ttl_ms } => {
                self.lease(index, agent_id, *epoch, queues, *tasks_max, *lease_ttl_ms)
            }
            Command::Complete { task_id, fence, result, usage } => {
                self.complete(*task_id, *fence, result, usage.as_ref())
            }
            Command::Fail { task_id, fence, error, retryable, usage } => {
                self.fail(*task_id, *fence, error, *retryable, usage.as_ref())
            }
            Command::Extend { task_id, fence, lease_ttl_ms } => self.extend(*task_id, *fence, *lease_ttl_ms),
            Command::Progress { task_id, fence } => self.progress(*task_id, *fence),
            Command::ContextPut { conversation_id, key, value, expected_version, writer } => {
                self.context_put(conversation_id, key, value, *expected_version, *writer)
            }
            Command::ContextDelete { conversation_id } => {
                if self.remove_conversation(conversation_id) {
                    Ok(Outcome::ContextDeleted)
                } else {
                    Err(Error::ConversationNotFound { conversation_id: conversation_id.clone() })
                }
            }
            Command::Wait { task_id, fence, on, timeout_ms } => self.wait(*task_id, *fence, on, *timeout_ms),
            Command::SetPolicy { policy, note, force, .. } => self.set_policy(policy, note.clone(), true, *force),
            Command::RollbackPolicy { to_version, note, by_client, force, .. } => {
                let policy = self.rollback_target(*to_version)?.policy.clone();
                self.set_policy(&policy, format!("rollback to {to_version}: {note}"), *by_client, *force)
            }
            Command::RetireNode { node_id } => {
                self.retired_nodes.insert(*node_id);
                Ok(Outcome::NodeRetired)
            }
            Command::SetKeyLimits { key, limits } => {
                self.key_limits.insert(key.clone(), limits.clone());
                Ok(Outcome::KeyLimitsSet)
            }
            Command::DeleteKeyLimits { key } => {
                self.key_limits.remove(key);
                Ok(Outcome::KeyLimitsDeleted)
            }
            Command::Pause { task_id } => Ok(self.pause(*task_id)),
            Command::Resume { task_id } => Ok(self.resume(*task_id)),
            Command::Replay { queue, state, concurrency_key, since_ms, limit } => {
                Ok(self.replay(queue.as_deref(), *state, concurrency_key.as_deref(), *since_ms, *limit))
            }
            Command::SetBudget { task_id, budget } => Ok(self.set_budget(*task_id, *budget)),
        });
        self.enforce_retention();
        result.unwrap_or_else(|error| Outcome::Refused { error })
    }

    fn submit(&mut self, tasks: &[NewTask]) -> Outcome {
        let results = tasks.iter().map(|task| self.submit_one(task)).collect();
        Outcome::Submitted { results }
    }

    /// Whether a new task would be refused now, and why, changing nothing:
    /// the edge runs it on every task before proposing, `submit_one` again
    /// when applying. A delegation is judged by its parent's lease first: the
    /// fence must be current and the lease held, before the key, the trail
    /// or anything else is looked at. A known idempotency key is answered
    /// with its task only if the request is the same (queue, payload,
    /// parent). A delegation loop is let through: when applied it
    /// dead-letters the parent, so it must reach the log.
    pub fn check_new_task(&self, new: &NewTask) -> Result<(), Error> {
        validate_new_task(new, &self.limits)?;
        if let (Some(parent_id), Some(fence)) = (new.parent_id, new.parent_fence) {
            self.held_lease(parent_id, fence)?;
        }
        if self.known_key(new)?.is_some() {
            return Ok(());
        }
        if new.idempotency_key.is_some() && self.idempotency_keys.len() >= self.limits.idempotency_keys_max {
            return Err(Error::LimitReached {
                limit: "idempotency_keys_max".into(),
                max: self.limits.idempotency_keys_max as u64,
            });
        }
        if let Some(parent_id) = new.parent_id {
            let parent = &self.tasks[&parent_id];
            if self.adoptable(parent, new).is_some() {
                return Ok(());
            }
            if self.delegation_loop(parent, &new.queue, payload_hash(&new.payload)).is_some() {
                return Ok(());
            }
            let children = self.children.get(&parent_id).map_or(0, BTreeSet::len);
            if children >= self.limits.children_per_task_max {
                return Err(Error::LimitReached {
                    limit: "children_per_task_max".into(),
                    max: self.limits.children_per_task_max as u64,
                });
            }
        }
        let open = self.open_per_queue.get(&new.queue).copied().unwrap_or(0);
        if open >= self.limits.queue_tasks_max as u64 {
            return Err(Error::QueueFull { queue: new.queue.clone(), max: self.limits.queue_tasks_max as u64 });
        }
        self.check_budget(new.payload.len() as u64, 0)?;
        // Retention makes room by compacting finished trees, never open
        // tasks nor finished ones whose tree is still at work.
        if self.tasks.len() - self.compactable_tasks as usize >= self.limits.tasks_max {
            return Err(Error::LimitReached { limit: "tasks_max".into(), max: self.limits.tasks_max as u64 });
        }
        Ok(())
    }

    /// The task an idempotency key already names, if the request is the one
    /// that created it (same queue, payload and parent); a key reused for
    /// another request is a conflict. The fence is not compared: a stale one
    /// was refused before, and the parent's current one sent with a key of an
    /// earlier attempt adopts that attempt's child.
    fn known_key(&self, new: &NewTask) -> Result<Option<u64>, Error> {
        let Some(key) = &new.idempotency_key else { return Ok(None) };
        let Some(task) = self.idempotency_keys.get(key).and_then(|id| self.tasks.get(id)) else { return Ok(None) };
        let field = if task.queue != new.queue {
            "queue"
        } else if task.payload != new.payload {
            "payload"
        } else if task.parent_id() != new.parent_id {
            "parent_id"
        } else {
            return Ok(Some(task.id));
        };
        Err(Error::IdempotencyConflict { key: key.clone(), task_id: task.id, field: field.to_string() })
    }

    /// The fence of the attempt of `parent` that a child belongs to: the
    /// latest that adopted it, or the one that created it. `None` for a
    /// child created before fences were recorded.
    pub fn owner_fence(&self, parent: &Task, child: &Task) -> Option<u64> {
        parent.adopted().get(&child.id).map(|adoption| adoption.fence).or(child.parent_fence())
    }

    /// A child of an earlier attempt of the parent doing the same step (same
    /// queue, same payload) that the delegating attempt may take over instead
    /// of creating a duplicate: one not failed, dead or cancelled (the new
    /// attempt may want the step done again), the oldest first.
    fn adoptable(&self, parent: &Task, new: &NewTask) -> Option<u64> {
        let fence = new.parent_fence?;
        self.children.get(&parent.id)?.iter().copied().find(|id| {
            let child = &self.tasks[id];
            child.queue == new.queue
                && child.payload == new.payload
                && matches!(child.state, TaskState::Pending | TaskState::Leased | TaskState::Succeeded)
                && self.owner_fence(parent, child).is_none_or(|owner| owner < fence)
        })
    }

    /// Records that the attempt under `fence` of `parent_id` took `child_id`
    /// over; `key` is the adopting request's idempotency key when it is not
    /// the child's own, so that a retry of the request finds the child.
    /// Answers whether it was an adoption (the child was not this attempt's yet).
    fn adopt(&mut self, parent_id: u64, fence: u64, child_id: u64, key: Option<String>) -> bool {
        let owner = self.owner_fence(&self.tasks[&parent_id], &self.tasks[&child_id]);
        if owner == Some(fence) {
            return false;
        }
        let parent = self.tasks.get_mut(&parent_id).expect("checked: the parent exists");
        let previous = parent.extra_mut().adopted.insert(child_id, Adoption { fence, idempotency_key: key.clone() });
        if let Some(old) = previous.and_then(|adoption| adoption.idempotency_key) {
            if Some(&old) != key.as_ref() && self.idempotency_keys.get(&old) == Some(&child_id) {
                self.idempotency_keys.remove(&old);
            }
        }
        if let Some(key) = key {
            self.idempotency_keys.insert(key, child_id);
        }
        self.counters.adopted += 1;
        true
    }

    fn submit_one(&mut self, new: &NewTask) -> Result<Submitted, Error> {
        self.check_new_task(new)?;
        if let Some(task_id) = self.known_key(new)? {
            self.counters.deduplicated += 1;
            let adopted = match (new.parent_id, new.parent_fence) {
                (Some(parent_id), Some(fence)) => {
                    // The key is the child's own or an earlier adoption's: kept as it is.
                    let own = self.tasks[&task_id].idempotency_key() == new.idempotency_key.as_deref();
                    self.adopt(parent_id, fence, task_id, if own { None } else { new.idempotency_key.clone() })
                }
                _ => false,
            };
            return Ok(Submitted { task_id, deduplicated: true, adopted });
        }
        if let (Some(parent_id), Some(fence)) = (new.parent_id, new.parent_fence) {
            if let Some(child_id) = self.adoptable(&self.tasks[&parent_id], new) {
                self.counters.deduplicated += 1;
                let adopted = self.adopt(parent_id, fence, child_id, new.idempotency_key.clone());
                assert!(adopted, "an adoptable child belongs to an earlier attempt");
                return Ok(Submitted { task_id: child_id, deduplicated: true, adopted });
            }
        }
        let hash = payload_hash(&new.payload);
        let (hop_count, parent_conversation, trail) = match new.parent_id {
            None => (0, None, vec![TrailStep { queue: new.queue.clone(), agent_id: None, payload_hash: hash }]),
            Some(parent_id) => self.delegate(parent_id, new, hash)?,
        };
        while self.tasks.len() >= self.limits.tasks_max {
            assert!(self.compact_oldest_tree(), "check_new_task saw room among the finished trees");
        }
        let id = self.next_task_id;
        self.next_task_id += 1;
        let deadline_ms = new.deadline_ms.map(|relative| self.now_ms.saturating_add(relative));
        let task = Task::from(TaskRecord {
            id,
            queue: new.queue.clone(),
            payload: new.payload.clone(),
            priority: new.priority,
            state: TaskState::Pending,
            created_ms: self.now_ms,
            updated_ms: self.now_ms,
            deadline_ms,
            max_attempts: new.max_attempts,
            attempts: 0,
            not_before_ms: 0,
            idempotency_key: new.idempotency_key.clone(),
            parent_id: new.parent_id,
            conversation_id: new.conversation_id.clone().or(parent_conversation),
            hop_count,
            trail,
            lease: None,
            last_fence: 0,
            result: None,
            error: None,
            dead_reason: None,
            superseded_count: 0,
            parent_fence: new.parent_fence,
            adopted: BTreeMap::new(),
            concurrency_key: new.concurrency_key.clone(),
            cost_estimate: new.cost_estimate,
            budget: new.budget,
            usage: Usage::default(),
            pause: None,
            replays: 0,
            traceparent: new.traceparent.clone(),
        });
        if let Some(key) = &new.idempotency_key {
            self.idempotency_keys.insert(key.clone(), id);
        }
        if let Some(deadline) = deadline_ms {
            self.deadlines.insert((deadline, id));
        }
        *self.open_per_queue.entry(new.queue.clone()).or_default() += 1;
        self.state_bytes += task_bytes(&task);
        if let Some(conversation_id) = task.conversation_id() {
            *self.conversation_tasks.entry(conversation_id.to_string()).or_default() += 1;
        }
        let root = match new.parent_id {
            Some(parent_id) => {
                self.children.entry(parent_id).or_default().insert(id);
                self.root_of(parent_id)
            }
            None => id,
        };
        *self.tree_open.entry(root).or_default() += 1;
        if let Some(key) = &new.concurrency_key {
            self.key_opened(key);
        }
        self.tasks.insert(id, task);
        // Into a tree whose budget is exhausted, a new task comes paused.
        self.make_ready(id);
        self.counters.submitted += 1;
        Ok(Submitted { task_id: id, deduplicated: false, adopted: false })
    }

    /// A task that exists and has not finished.
    fn open_task(&self, task_id: u64) -> Result<&Task, Error> {
        let task = self.tasks.get(&task_id).ok_or(Error::TaskNotFound { task_id })?;
        if task.state.is_terminal() {
            return Err(Error::AlreadyTerminal { task_id, state: task.state });
        }
        Ok(task)
    }

    fn cancel(&mut self, task_id: u64) -> Result<Outcome, Error> {
        self.finish(task_id, TaskState::Cancelled, None, |_| {});
        Ok(Outcome::Cancelled { task: self.tasks[&task_id].clone() })
    }

    fn check_register(&self, agent_id: &str, capabilities: &BTreeSet<String>, capacity: u32) -> Result<(), Error> {
        validate_name("agent_id", agent_id, self.limits.id_bytes_max)?;
        if capabilities.is_empty() {
            return Err(invalid("capabilities", "must name at least one queue"));
        }
        if capabilities.len() > self.limits.capabilities_per_agent_max {
            return Err(Error::LimitReached {
                limit: "capabilities_per_agent_max".into(),
                max: self.limits.capabilities_per_agent_max as u64,
            });
        }
        for capability in capabilities {
            validate_name("capabilities", capability, self.limits.queue_name_bytes_max)?;
        }
        if capacity == 0 || capacity > self.limits.leases_per_agent_max {
            return Err(invalid("capacity", format!("must be 1..={}", self.limits.leases_per_agent_max)));
        }
        if !self.agents.contains_key(agent_id) && self.agents.len() >= self.limits.agents_max {
            return Err(Error::LimitReached { limit: "agents_max".into(), max: self.limits.agents_max as u64 });
        }
        Ok(())
    }

    fn register(
        &mut self,
        agent_id: &str,
        capabilities: &BTreeSet<String>,
        capacity: u32,
        session: &str,
    ) -> Result<Outcome, Error> {
        if let Some(old) = self.agents.get(agent_id) {
            // A new session of a known agent: its old session's leases are void.
            let epoch = old.epoch;
            self.remove_agent(agent_id, epoch).expect("current epoch");
        }
        let epoch = self.agent_epochs.get(agent_id).copied().unwrap_or(0) + 1;
        self.agent_epochs.insert(agent_id.to_string(), epoch);
        for capability in capabilities {
            *self.servers_per_queue.entry(capability.clone()).or_default() += 1;
        }
        let agent = Agent {
            id: agent_id.to_string(),
            capabilities: capabilities.clone(),
            capacity,
            epoch,
            session: session.to_string(),
            registered_ms: self.now_ms,
            leased_task_ids: BTreeSet::new(),
            stuck_count: 0,
            stuck_ms: None,
        };
        self.agents.insert(agent_id.to_string(), agent);
        Ok(Outcome::Registered { epoch })
    }

    /// Whether a request speaks for the agent's current session: the epoch
    /// must be the current one and `session` its secret. Heartbeats, polls
    /// and deregistration are checked so at the edge; a command they propose
    /// carries the epoch, which apply checks again.
    pub fn check_session(&self, agent_id: &str, epoch: u64, session: Option<&str>) -> Result<&Agent, Error> {
        let agent = self.current_agent(agent_id, epoch)?;
        if !agent.session.is_empty() && session != Some(agent.session.as_str()) {
            return Err(Error::WrongSession { agent_id: agent_id.to_string(), epoch });
        }
        Ok(agent)
    }

    fn current_agent(&self, agent_id: &str, epoch: u64) -> Result<&Agent, Error> {
        let agent = self.agents.get(agent_id).ok_or_else(|| Error::AgentNotFound { agent_id: agent_id.to_string() })?;
        if agent.epoch != epoch {
            return Err(Error::StaleEpoch { agent_id: agent_id.to_string(), epoch, current: agent.epoch });
        }
        Ok(agent)
    }

    /// Deregistration and expiry: the agent's leases go back to pending at
    /// once (their attempt stays counted) so other agents can take them, or
    /// to dead letters when that was the last attempt, as for a lapsed lease.
    fn remove_agent(&mut self, agent_id: &str, epoch: u64) -> Result<(), Error> {
        let held: Vec<u64> = self.current_agent(agent_id, epoch)?.leased_task_ids.iter().copied().collect();
        for task_id in held {
            // Burying one task cancels its orphaned children, which may be
            // held here too: those have finished already.
            if self.tasks[&task_id].state.is_terminal() {
                continue;
            }
            self.release_lease(task_id);
            self.retry_or_bury(task_id, "agent left");
        }
        let agent = self.agents.remove(agent_id).expect("checked above");
        assert!(agent.leased_task_ids.is_empty(), "every lease of a removed agent is released");
        for capability in &agent.capabilities {
            let count = self.servers_per_queue.get_mut(capability).expect("counted at registration");
            *count -= 1;
            if *count == 0 {
                self.servers_per_queue.remove(capability);
            }
        }
        Ok(())
    }

    fn check_lease_ttl(&self, lease_ttl_ms: u64) -> Result<(), Error> {
        if !(self.limits.lease_ttl_ms_min..=self.limits.lease_ttl_ms_max).contains(&lease_ttl_ms) {
            return Err(invalid(
                "lease_ttl_ms",
                format!("must be {}..={}", self.limits.lease_ttl_ms_min, self.limits.lease_ttl_ms_max),
            ));
        }
        Ok(())
    }

    fn check_lease(&self, agent_id: &str, epoch: u64, queues: &[String], lease_ttl_ms: u64) -> Result<&Agent, Error> {
        let agent = self.current_agent(agent_id, epoch)?;
        self.check_lease_ttl(lease_ttl_ms)?;
        if queues.is_empty() {
            return Err(invalid("queues", "must name at least one queue"));
        }
        if let Some(queue) = queues.iter().find(|q| !agent.capabilities.contains(*q)) {
            return Err(Error::NotCapable { agent_id: agent_id.to_string(), queue: queue.clone() });
        }
        Ok(agent)
    }

    /// How many leases a `Lease` command would grant now: none when the
    /// agent is at its capacity or no task is ready on the queues (or every
    /// ready one is held back by its key's limits). A
    /// long-poll proposes a lease only when this is positive, so that an
    /// agent waiting for work costs no log entry. (Applying may still grant
    /// fewer: another agent may take the tasks first.)
    pub fn grantable(
        &self,
        agent_id: &str,
        epoch: u64,
        queues: &[String],
        tasks_max: u32,
        lease_ttl_ms: u64,
    ) -> Result<u32, Error> {
        let agent = self.check_lease(agent_id, epoch, queues, lease_ttl_ms)?;
        let room = tasks_max.min(agent.room());
        let distinct: BTreeSet<&String> = queues.iter().collect();
        let mut ready: u32 = 0;
        for queue in distinct {
            if ready >= room {
                break;
            }
            ready = ready.saturating_add(self.eligible_count(queue, room - ready));
        }
        Ok(room.min(ready))
    }

    fn lease(
        &mut self,
        index: u64,
        agent_id: &str,
        epoch: u64,
        queues: &[String],
        tasks_max: u32,
        lease_ttl_ms: u64,
    ) -> Result<Outcome, Error> {
        let agent = self.agents.get(agent_id).expect("checked: the agent's current session");
        let count = tasks_max.min(agent.room());
        let valid_until_ms = self.now_ms.saturating_add(lease_ttl_ms);
        let mut grants = Vec::new();
        for _ in 0..count {
            // The best task over all asked queues: highest priority, then
            // within the band the key whose turn it is (fair dispatch), and
            // between queues the oldest. A task already granted by this entry
            // and released again within it (its holder expired, deregistered
            // or re-registered) waits for the next entry: a second grant would
            // carry the same fence as the voided one, and the fence must name
            // one lease. A key over one of its limits is passed over.
            let best = queues
                .iter()
                .filter_map(|queue| self.queue_candidate(queue, index).map(|turn| (turn, queue)))
                .min_by_key(|(turn, _)| (turn.band, turn.task_id));
            let Some((turn, queue)) = best else { break };
            let queue = queue.clone();
            let task_id = turn.task_id;
            self.take_turn(&queue, &turn);
            self.ready_remove(task_id);
            self.key_granted(task_id);
            let task = self.tasks.get_mut(&task_id).expect("ready task exists");
            assert_eq!(task.state, TaskState::Pending);
            assert!(task.lease.is_none());
            assert!(index > task.last_fence, "fences must increase");
            task.state = TaskState::Leased;
            task.attempts += 1;
            task.last_fence = index;
            task.updated_ms = self.now_ms;
            let now = self.now_ms;
            task.lease = Some(Box::new(Lease {
                agent_id: agent_id.to_string(),
                agent_epoch: epoch,
                fence: index,
                valid_until_ms,
                progress_ms: now,
            }));
            let task = task.clone();
            // Every earlier attempt is superseded now: what it wrote in the
            // conversation goes, so that this one can write its own.
            self.discard_entries(task_id, None);
            grants.push(Grant { task, fence: index, valid_until_ms, children: self.children_of(task_id) });
            self.lease_expiry.insert((valid_until_ms, task_id));
            self.lease_progress.insert((now, task_id));
            self.agents.get_mut(agent_id).expect("current agent").leased_task_ids.insert(task_id);
            self.counters.leases_granted += 1;
        }
        Ok(Outcome::Leased { grants })
    }

    /// A task's children as a lease lists them (at most `children_per_task_max`, oldest first).
    pub fn children_of(&self, task_id: u64) -> Vec<Child> {
        let parent = &self.tasks[&task_id];
        let Some(children) = self.children.get(&task_id) else { return Vec::new() };
        children
            .iter()
            .take(self.limits.children_per_task_max)
            .map(|id| {
                let child = &self.tasks[id];
                Child {
                    task_id: child.id,
                    queue: child.queue.clone(),
                    payload_hash: payload_hash(&child.payload),
                    state: child.state,
                    parent_fence: child.parent_fence(),
                    adopted_fence: parent.adopted().get(id).map(|adoption| adoption.fence),
                }
            })
            .collect()
    }

    /// Whether `fence` may report on this task: it must be the newest fence
    /// ever granted, and the task must not have finished.
    fn current_fence(&self, task_id: u64, fence: u64) -> Result<&Task, Error> {
        let task = self.tasks.get(&task_id).ok_or(Error::TaskNotFound { task_id })?;
        if fence != task.last_fence || task.last_fence == 0 {
            return Err(Error::Superseded { task_id, fence, current: task.last_fence });
        }
        if task.state.is_terminal() {
            return Err(Error::AlreadyTerminal { task_id, state: task.state });
        }
        Ok(task)
    }

    /// `current_fence` as the edge sees it: a stale fence is let through (no
    /// task: `None`), because applying it records it as superseded.
    fn check_report(&self, task_id: u64, fence: u64) -> Result<Option<&Task>, Error> {
        match self.current_fence(task_id, fence) {
            Ok(task) => Ok(Some(task)),
            Err(Error::Superseded { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// A lease held now under `fence`: what a delegation or a context write
    /// on a task's behalf needs. Refused at the edge, stale fence included
    /// (nothing is recorded of it): a superseded attempt may not act for the
    /// task, nor may one whose lease lapsed, as for an extension.
    fn held_lease(&self, task_id: u64, fence: u64) -> Result<&Task, Error> {
        let task = self.current_fence(task_id, fence)?;
        if task.lease.is_none() {
            return Err(Error::LeaseExpired { task_id });
        }
        Ok(task)
    }

    /// A report that needs the lease itself (extend, progress, wait): the
    /// fence may be current on a task whose lease lapsed and is not re-granted yet.
    fn check_report_on_lease(&self, task_id: u64, fence: u64) -> Result<(), Error> {
        match self.check_report(task_id, fence)? {
            Some(task) if task.lease.is_none() => Err(Error::LeaseExpired { task_id }),
            _ => Ok(()),
        }
    }

    /// `current_fence` when applying: a superseded report is counted.
    fn check_fence(&mut self, task_id: u64, fence: u64) -> Result<(), Error> {
        let result = self.current_fence(task_id, fence).map(drop);
        if let Err(Error::Superseded { .. }) = result {
            self.tasks.get_mut(&task_id).expect("found").extra_mut().superseded_count += 1;
            self.counters.superseded += 1;
        }
        result
    }

    /// The same result delivered twice under the same fence (a retried
    /// request whose answer was lost) is answered as before.
    fn completed_before(&self, task_id: u64, fence: u64, result: &str) -> Option<&Task> {
        let task = self.tasks.get(&task_id)?;
        let same = task.state == TaskState::Succeeded && task.last_fence == fence && task.result() == Some(result);
        same.then_some(task)
    }

    /// A failure delivered twice under the same fence (a retried request
    /// whose answer was lost) is answered as before and changes nothing: no
    /// second backoff, no second entry in the delay queue.
    fn failed_before(&self, task_id: u64, fence: u64, error: &str, retryable: bool) -> Option<&Task> {
        let task = self.tasks.get(&task_id)?;
        let same_error = task.error() == Some(error) && task.last_fence == fence;
        // A paused task stays paused after a retryable failure.
        let already_retrying = retryable && matches!(task.state, TaskState::Pending | TaskState::Paused);
        let already_failed = !retryable && matches!(task.state, TaskState::Failed);
        (same_error && (already_retrying || already_failed)).then_some(task)
    }

    fn complete(&mut self, task_id: u64, fence: u64, result: &str, usage: Option<&Usage>) -> Result<Outcome, Error> {
        if let Some(task) = self.completed_before(task_id, fence, result) {
            return Ok(Outcome::Completed { task: task.clone() });
        }
        self.check_fence(task_id, fence)?;
        self.make_room(result.len() as u64, self.tasks[&task_id].result().map_or(0, str::len) as u64)?;
        if let Some(usage) = usage {
            self.record_usage(task_id, usage);
        }
        // A succeeded task carries no error of an earlier attempt or wait.
        self.finish(task_id, TaskState::Succeeded, Some(fence), |task| {
            task.extra_mut().result = Some(result.to_string());
            task.extra_mut().error = None;
        });
        Ok(Outcome::Completed { task: self.tasks[&task_id].clone() })
    }

    fn fail(
        &mut self,
        task_id: u64,
        fence: u64,
        error: &str,
        retryable: bool,
        usage: Option<&Usage>,
    ) -> Result<Outcome, Error> {
        if let Some(task) = self.failed_before(task_id, fence, error, retryable) {
            return Ok(Outcome::Failed { task: task.clone() });
        }
        self.check_fence(task_id, fence)?;
        self.make_room(error.len() as u64, self.tasks[&task_id].error().map_or(0, str::len) as u64)?;
        if let Some(usage) = usage {
            self.record_usage(task_id, usage);
        }
        let task = &self.tasks[&task_id];
        // A report under the current fence may come after the lease lapsed
        // and the task was paused: a retryable failure leaves it paused.
        let was_paused = task.state == TaskState::Paused;
        let exhausted = task.attempts >= self.max_attempts_of(task);
        let pause_when_exhausted = self.on_exhausted(&task.queue) == OnExhausted::Pause;
        if !retryable {
            self.finish(task_id, TaskState::Failed, Some(fence), |task| {
                task.extra_mut().error = Some(error.to_string())
            });
        } else if exhausted && !pause_when_exhausted {
            self.finish(task_id, TaskState::Dead, Some(fence), |task| {
                task.extra_mut().error = Some(error.to_string());
                task.extra_mut().dead_reason = Some(format!("attempts_exhausted: {} attempts", task.attempts));
            });
        } else {
            let (base, max) = self.backoff_of(&task.queue);
            let exponent = task.attempts.saturating_sub(1).min(30);
            let backoff = base.saturating_mul(1 << exponent).min(max);
            let not_before = self.now_ms.saturating_add(backoff);
            let attempts = task.attempts;
            self.release_lease(task_id);
            self.remove_ready(task_id);
            self.set_error(task_id, error.to_string());
            // The attempt is over and not accepted: its context entries go.
            // (Its children stay, for the next attempt to adopt.)
            self.discard_entries(task_id, None);
            if was_paused {
                // Stays paused, where resume or replay will find it.
            } else if exhausted {
                let reason = format!("attempts_exhausted: {attempts} attempts");
                self.pause_pending(task_id, PauseCause::AttemptsExhausted, reason);
            } else {
                self.tasks.get_mut(&task_id).expect("checked").not_before_ms = not_before;
                self.requeue(task_id);
            }
        }
        Ok(Outcome::Failed { task: self.tasks[&task_id].clone() })
    }

    fn extend(&mut self, task_id: u64, fence: u64, lease_ttl_ms: u64) -> Result<Outcome, Error> {
        self.check_fence(task_id, fence)?;
        let now = self.now_ms;
        let task = self.tasks.get_mut(&task_id).expect("checked");
        let lease = task.lease.as_mut().expect("checked: a current fence on a leased task");
        let old = lease.valid_until_ms;
        let valid_until_ms = now.saturating_add(lease_ttl_ms).max(old);
        lease.valid_until_ms = valid_until_ms;
        task.updated_ms = now;
        self.lease_expiry.remove(&(old, task_id));
        self.lease_expiry.insert((valid_until_ms, task_id));
        Ok(Outcome::Extended { valid_until_ms })
    }

    fn progress(&mut self, task_id: u64, fence: u64) -> Result<Outcome, Error> {
        self.check_fence(task_id, fence)?;
        let now = self.now_ms;
        let task = self.tasks.get_mut(&task_id).expect("checked");
        let lease = task.lease.as_mut().expect("checked: a current fence on a leased task");
        self.lease_progress.remove(&(lease.progress_ms, task_id));
        lease.progress_ms = now;
        self.lease_progress.insert((now, task_id));
        Ok(Outcome::Progressed)
    }

    /// The version a context write would create and the conversation's
    /// bytes after it, or why it is refused.
    fn check_context_put(
        &self,
        conversation_id: &str,
        key: &str,
        value: &str,
        expected_version: Option<u64>,
        writer: Option<Writer>,
    ) -> Result<(u64, usize), Error> {
        validate_name("conversation_id", conversation_id, self.limits.id_bytes_max)?;
        validate_name("key", key, self.limits.id_bytes_max)?;
        check_size("value", value, self.limits.conversation_bytes_max)?;
        if let Some(writer) = writer {
            let task = self.held_lease(writer.task_id, writer.fence)?;
            if task.conversation_id() != Some(conversation_id) {
                return Err(invalid(
                    "conversation_id",
                    format!(
                        "task {} writes on its own behalf only to its own conversation ({})",
                        writer.task_id,
                        task.conversation_id().unwrap_or("it has none")
                    ),
                ));
            }
        }
        if !self.conversations.contains_key(conversation_id)
            && self.conversations.len() >= self.limits.conversations_max
        {
            return Err(Error::LimitReached {
                limit: "conversations_max".into(),
                max: self.limits.conversations_max as u64,
            });
        }
        let conversation = self.conversations.get(conversation_id);
        let current = conversation.and_then(|c| c.entries.get(key));
        let current_version = current.map(|(version, _)| *version).unwrap_or(0);
        if let Some(expected) = expected_version {
            if expected != current_version {
                return Err(Error::VersionConflict { key: key.to_string(), expected, current: current_version });
            }
        }
        let old_bytes = current.map(|(_, old)| key.len() + old.len()).unwrap_or(0);
        let bytes = conversation.map(|c| c.bytes).unwrap_or(0) - old_bytes + key.len() + value.len();
        if bytes > self.limits.conversation_bytes_max {
            return Err(Error::TooLarge {
                field: "conversation context".into(),
                bytes: bytes as u64,
                max: self.limits.conversation_bytes_max as u64,
            });
        }
        let old_total = conversation.map(|c| c.bytes).unwrap_or(0);
        self.check_budget(bytes as u64, old_total as u64)?;
        Ok((current_version + 1, bytes))
    }

    fn context_put(
        &mut self,
        conversation_id: &str,
        key: &str,
        value: &str,
        expected_version: Option<u64>,
        writer: Option<Writer>,
    ) -> Result<Outcome, Error> {
        let (version, bytes) = self.check_context_put(conversation_id, key, value, expected_version, writer)?;
        let old_total = self.conversations.get(conversation_id).map_or(0, |c| c.bytes);
        let now = self.now_ms;
        let conversation = self.conversations.entry(conversation_id.to_string()).or_default();
        conversation.entries.insert(key.to_string(), (version, value.to_string()));
        conversation.bytes = bytes;
        let previous = match writer {
            Some(writer) => conversation.writers.insert(key.to_string(), writer),
            None => conversation.writers.remove(key),
        };
        if let Some(old) = conversation.written_ms.replace(now) {
            self.conversation_expiry.remove(&(old, conversation_id.to_string()));
        }
        self.conversation_expiry.insert((now, conversation_id.to_string()));
        self.state_bytes = self.state_bytes - old_total as u64 + bytes as u64;
        let entry = (conversation_id.to_string(), key.to_string());
        if let Some(previous) = previous {
            self.unindex_writer(previous.task_id, &entry);
        }
        if let Some(writer) = writer {
            self.written.entry(writer.task_id).or_default().insert(entry);
        }
        Ok(Outcome::ContextWritten { version })
    }

    /// Why a delegation from `parent` to `queue` would be a loop, if it is:
    /// it repeats a step already on the parent's trail (same capability, same
    /// payload), or it passes `delegation_hops_max`. Names the trail.
    fn delegation_loop(&self, parent: &Task, queue: &str, hash: u64) -> Option<String> {
        let repeats = parent.trail().iter().any(|s| s.queue == queue && s.payload_hash == hash);
        if !repeats && parent.hop_count() < self.limits.delegation_hops_max {
            return None;
        }
        let mut path: Vec<String> = parent.trail().iter().map(|s| s.queue.clone()).collect();
        path.push(queue.to_string());
        let why = if repeats {
            "repeats a step already on its trail".to_string()
        } else {
            format!("passes delegation_hops_max {}", self.limits.delegation_hops_max)
        };
        Some(format!("{} {why}", path.join(" -> ")))
    }

    /// A checked delegation's hop count, conversation and trail. A loop
    /// dead-letters the parent with the trail in its reason: it would only go
    /// round again.
    fn delegate(
        &mut self,
        parent_id: u64,
        new: &NewTask,
        hash: u64,
    ) -> Result<(u32, Option<String>, Vec<TrailStep>), Error> {
        let parent = self.tasks.get(&parent_id).expect("checked: the parent exists");
        if let Some(trail) = self.delegation_loop(parent, &new.queue, hash) {
            if !parent.state.is_terminal() {
                let reason = format!("loop_detected: {trail}");
                self.finish(parent_id, TaskState::Dead, None, |task| task.extra_mut().dead_reason = Some(reason));
            }
            return Err(Error::LoopDetected { task_id: parent_id, trail });
        }
        let step = TrailStep {
            queue: new.queue.clone(),
            agent_id: parent.lease.as_ref().map(|lease| lease.agent_id.clone()),
            payload_hash: hash,
        };
        let mut trail = parent.trail().into_owned();
        trail.push(step);
        Ok((parent.hop_count() + 1, parent.conversation_id().map(str::to_string), trail))
    }

    /// Whether a task may wait on others: not if that closes a cycle in the
    /// wait-for graph (the cycle is named).
    fn check_wait(&self, task_id: u64, fence: u64, on: &[u64], timeout_ms: u64) -> Result<(), Error> {
        if on.is_empty() || on.len() > self.limits.wait_tasks_max {
            return Err(invalid("on", format!("must name 1..={} tasks", self.limits.wait_tasks_max)));
        }
        if timeout_ms == 0 || timeout_ms > self.limits.wait_ms_max {
            return Err(invalid("timeout_ms", format!("must be 1..={}", self.limits.wait_ms_max)));
        }
        if on.contains(&task_id) {
            return Err(Error::Deadlock { cycle: format!("{task_id} -> {task_id}") });
        }
        if let Some(missing) = on.iter().find(|id| !self.tasks.contains_key(id)) {
            return Err(Error::TaskNotFound { task_id: *missing });
        }
        let Some(task) = self.check_report(task_id, fence)? else { return Ok(()) };
        if task.lease.is_none() {
            return Err(Error::LeaseExpired { task_id });
        }
        for &target in on {
            if let Some(mut path) = self.wait_path(target, task_id) {
                path.insert(0, task_id);
                let cycle: Vec<String> = path.iter().map(|id| id.to_string()).collect();
                return Err(Error::Deadlock { cycle: cycle.join(" -> ") });
            }
        }
        Ok(())
    }

    /// Records that a checked task waits on others.
    fn wait(&mut self, task_id: u64, fence: u64, on: &[u64], timeout_ms: u64) -> Result<Outcome, Error> {
        self.check_fence(task_id, fence)?;
        self.remove_wait(task_id);
        let pending: BTreeSet<u64> = on.iter().copied().filter(|id| !self.tasks[id].state.is_terminal()).collect();
        if pending.is_empty() {
            self.resolve_wait(task_id, on);
            return Ok(Outcome::Waiting { pending: Vec::new() });
        }
        let until_ms = self.now_ms.saturating_add(timeout_ms);
        for &target in &pending {
            self.waited_by.entry(target).or_default().insert(task_id);
        }
        self.wait_deadlines.insert((until_ms, task_id));
        let outcome = Outcome::Waiting { pending: pending.iter().copied().collect() };
        self.waits.insert(task_id, Wait { on: pending, named: on.to_vec(), until_ms });
        Ok(outcome)
    }

    /// A path of wait edges from `from` to `to`, if any (depth-first, iterative).
    fn wait_path(&self, from: u64, to: u64) -> Option<Vec<u64>> {
        let mut stack = vec![(from, vec![from])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            if at == to {
                return Some(path);
            }
            if !seen.insert(at) {
                continue;
            }
            if let Some(wait) = self.waits.get(&at) {
                for &next in &wait.on {
                    let mut longer = path.clone();
                    longer.push(next);
                    stack.push((next, longer));
                }
            }
        }
        None
    }

    fn remove_wait(&mut self, task_id: u64) {
        if let Some(wait) = self.waits.remove(&task_id) {
            self.wait_deadlines.remove(&(wait.until_ms, task_id));
            for target in wait.on {
                if let Some(waiters) = self.waited_by.get_mut(&target) {
                    waiters.remove(&task_id);
                    if waiters.is_empty() {
                        self.waited_by.remove(&target);
                    }
                }
            }
        }
    }

    /// Every awaited task has finished. If all of them are dead, the waiting
    /// task cannot succeed either: it is dead-lettered now, not at its deadline.
    fn resolve_wait(&mut self, task_id: u64, named: &[u64]) {
        let all_dead = named.iter().all(|id| self.tasks.get(id).is_some_and(|t| t.state == TaskState::Dead));
        let waiter = &self.tasks[&task_id];
        if all_dead && !waiter.state.is_terminal() {
            let ids: Vec<String> = named.iter().map(|id| id.to_string()).collect();
            let reason = format!("dependencies_dead: every awaited task ({}) is dead", ids.join(", "));
            self.finish(task_id, TaskState::Dead, None, |task| task.extra_mut().dead_reason = Some(reason));
        }
    }

    /// The tasks waiting on `task_id` learn that it finished.
    fn notify_waiters(&mut self, task_id: u64) {
        let Some(waiters) = self.waited_by.remove(&task_id) else { return };
        for waiter in waiters {
            let Some(wait) = self.waits.get_mut(&waiter) else { continue };
            wait.on.remove(&task_id);
            if wait.on.is_empty() {
                let named = wait.named.clone();
                self.remove_wait(waiter);
                self.resolve_wait(waiter, &named);
            }
        }
    }

    pub fn wait_of(&self, task_id: u64) -> Option<&Wait> {
        self.waits.get(&task_id)
    }

    // ---- helpers that keep the indexes in step with the tasks ----

    /// A task that may be leased now (new, or after a lease without a
    /// result): ready, or paused if a pause was asked for while it was
    /// leased or its tree's budget is exhausted.
    fn make_ready(&mut self, task_id: u64) {
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        task.not_before_ms = 0;
        self.requeue(task_id);
    }

    /// Back to pending, after `not_before_ms` (a backoff), unless a pause
    /// holds it back.
    fn requeue(&mut self, task_id: u64) {
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        assert!(!task.state.is_terminal());
        assert!(task.lease.is_none());
        task.state = TaskState::Pending;
        if let Some(pause) = task.take_pause() {
            // Asked for while the task was leased: in force now.
            self.pause_pending(task_id, pause.cause, pause.reason);
            return;
        }
        let root = self.root_of(task_id);
        if let Some(reason) = self.budget_exhausted(root) {
            self.pause_pending(task_id, PauseCause::Budget, reason);
            return;
        }
        let task = &self.tasks[&task_id];
        if task.not_before_ms > self.now_ms {
            self.delayed.insert((task.not_before_ms, task_id));
        } else {
            self.ready_insert(task_id);
        }
    }

    fn remove_ready(&mut self, task_id: u64) {
        self.ready_remove(task_id);
        let task = &self.tasks[&task_id];
        self.delayed.remove(&(task.not_before_ms, task_id));
    }

    /// Indexes a pending task as ready now, for dispatch (`ready`) and for
    /// fair dispatch (`fair_ready`).
    fn ready_insert(&mut self, task_id: u64) {
        let task = &self.tasks[&task_id];
        assert_eq!(task.state, TaskState::Pending);
        let band = 9 - task.priority;
        self.ready.entry(task.queue.clone()).or_default().insert((band, task_id));
        let key = task.concurrency_key().map(str::to_string).unwrap_or_default();
        let keys = self.fair_ready.entry(task.queue.clone()).or_default().entry(band).or_default();
        keys.entry(key).or_default().insert(task_id);
    }

    /// Takes a task out of both ready indexes, if it is there. A key whose
    /// last ready task leaves loses its credit in the round; a band left
    /// empty loses its round.
    fn ready_remove(&mut self, task_id: u64) {
        let task = &self.tasks[&task_id];
        let band = 9 - task.priority;
        let Some(set) = self.ready.get_mut(&task.queue) else { return };
        if !set.remove(&(band, task_id)) {
            return;
        }
        if set.is_empty() {
            self.ready.remove(&task.queue);
        }
        let key = task.concurrency_key().map(str::to_string).unwrap_or_default();
        let bands = self.fair_ready.get_mut(&task.queue).expect("indexed alike");
        let keys = bands.get_mut(&band).expect("indexed alike");
        let ids = keys.get_mut(&key).expect("indexed alike");
        assert!(ids.remove(&task_id), "indexed alike");
        if !ids.is_empty() {
            return;
        }
        keys.remove(&key);
        let band_empty = keys.is_empty();
        if band_empty {
            bands.remove(&band);
            if bands.is_empty() {
                self.fair_ready.remove(&task.queue);
            }
        }
        let queue = task.queue.clone();
        if let Some(rounds) = self.drr.get_mut(&queue) {
            if band_empty {
                rounds.remove(&band);
            } else if let Some(turn) = rounds.get_mut(&band).filter(|turn| turn.cursor == key) {
                turn.deficit = 0;
            }
            if rounds.is_empty() {
                self.drr.remove(&queue);
            }
        }
    }

    /// A task whose lease ended without a result: ready for another attempt,
    /// or, when it has used all of them, dead (or paused, if its queue's
    /// policy says `on_exhausted: pause`).
    fn retry_or_bury(&mut self, task_id: u64, why: &str) {
        let task = &self.tasks[&task_id];
        if task.attempts >= self.max_attempts_of(task) {
            let reason = format!("attempts_exhausted: {why} on attempt {}", task.attempts);
            if self.on_exhausted(&task.queue) == OnExhausted::Pause {
                self.pause_pending(task_id, PauseCause::AttemptsExhausted, reason);
            } else {
                self.finish(task_id, TaskState::Dead, None, |task| task.extra_mut().dead_reason = Some(reason));
            }
        } else {
            self.make_ready(task_id);
        }
    }

    fn release_lease(&mut self, task_id: u64) {
        // A wait belongs to the lease that asked for it.
        self.remove_wait(task_id);
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        if let Some(lease) = task.lease.take() {
            let key = task.concurrency_key().map(str::to_string);
            let estimate = task.cost_estimate().unwrap_or(0);
            task.state = TaskState::Pending;
            if let Some(key) = key {
                let usage = self.key_usage.get_mut(&key).expect("an open task's key has a record");
                usage.held -= 1;
                usage.leased_estimate -= estimate;
            }
            self.lease_expiry.remove(&(lease.valid_until_ms, task_id));
            self.lease_progress.remove(&(lease.progress_ms, task_id));
            if let Some(agent) = self.agents.get_mut(&lease.agent_id) {
                if agent.epoch == lease.agent_epoch {
                    agent.leased_task_ids.remove(&task_id);
                }
            }
        }
    }

    /// Moves a task to a terminal state, out of every index but `finished`.
    /// `accepted` is the fence of the report that ended it (a complete or a
    /// fail by the lease holder), `None` when the cluster ended it (cancel,
    /// deadline, lapsed last attempt, loop, dead dependencies). What the
    /// other attempts left behind goes: their context entries, and their
    /// open children, cancelled, and so on down the tree.
    fn finish(&mut self, task_id: u64, state: TaskState, accepted: Option<u64>, update: impl FnOnce(&mut Task)) {
        self.finish_one(task_id, state, accepted, update);
        // Iterative, so that a deep tree costs no deep recursion.
        let mut ended = vec![(task_id, accepted)];
        while let Some((parent_id, accepted)) = ended.pop() {
            for (child_id, owner) in self.orphans(parent_id, accepted) {
                // Ending an earlier orphan may have ended this one (a wait).
                if self.tasks[&child_id].state.is_terminal() {
                    continue;
                }
                let parent_state = self.tasks[&parent_id].state.as_str();
                let why = format!(
                    "orphaned: parent {parent_id} ended {parent_state} and no attempt of it that reported owns this child (attempt under fence {owner})"
                );
                self.finish_one(child_id, TaskState::Cancelled, None, |task| task.extra_mut().error = Some(why));
                self.counters.orphans_cancelled += 1;
                ended.push((child_id, None));
            }
        }
    }

    /// The open children of a finished task that no accepted attempt owns,
    /// with the fence of the attempt each belongs to. Children created
    /// before fences were recorded are left alone.
    fn orphans(&self, parent_id: u64, accepted: Option<u64>) -> Vec<(u64, u64)> {
        let Some(children) = self.children.get(&parent_id) else { return Vec::new() };
        let parent = &self.tasks[&parent_id];
        children
            .iter()
            .filter_map(|id| {
                let child = &self.tasks[id];
                let owner = self.owner_fence(parent, child)?;
                (!child.state.is_terminal() && Some(owner) != accepted).then_some((*id, owner))
            })
            .collect()
    }

    fn finish_one(&mut self, task_id: u64, state: TaskState, accepted: Option<u64>, update: impl FnOnce(&mut Task)) {
        assert!(state.is_terminal());
        self.release_lease(task_id);
        self.remove_ready(task_id);
        let now = self.now_ms;
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        assert!(!task.state.is_terminal(), "task {task_id} finished twice");
        assert!(accepted.is_none_or(|fence| fence == task.last_fence), "only the current fence ends a task");
        task.state = state;
        task.updated_ms = now;
        // A pause is a live condition: it ends with the task.
        task.take_pause();
        let key = task.concurrency_key().map(str::to_string);
        let before = task_bytes(task);
        update(task);
        self.state_bytes = self.state_bytes - before + task_bytes(task);
        if let Some(deadline) = task.deadline_ms {
            self.deadlines.remove(&(deadline, task_id));
        }
        let open = self.open_per_queue.get_mut(&task.queue).expect("open count");
        *open -= 1;
        if *open == 0 {
            self.open_per_queue.remove(&task.queue);
        }
        self.finished.insert((now, task_id));
        if let Some(key) = key {
            self.key_closed(&key);
        }
        self.discard_entries(task_id, accepted);
        let root = self.root_of(task_id);
        let open = self.tree_open.get_mut(&root).expect("an open task counts in its tree");
        *open -= 1;
        if *open == 0 {
            // The whole tree has finished: retention may take it, as one.
            self.tree_open.remove(&root);
            self.compactable.insert((now, root));
            self.compactable_tasks += self.tree(root).len() as u64;
        }
        self.notify_waiters(task_id);
        match state {
            TaskState::Succeeded => self.counters.succeeded += 1,
            TaskState::Failed => self.counters.failed += 1,
            TaskState::Cancelled => self.counters.cancelled += 1,
            TaskState::Dead => self.counters.dead += 1,
            TaskState::Pending | TaskState::Leased | TaskState::Paused => unreachable!(),
        }
    }

    /// Retention by count. Run once a command (or the advance of time) is
    /// done, never inside `finish`: at equal log times the task just finished
    /// may sort first in `finished`, and it must outlive the outcome that
    /// reports it (and the waiters it resolves). Only whole finished trees
    /// leave, so finished tasks of trees still at work may stay over the count.
    fn enforce_retention(&mut self) {
        while self.finished.len() > self.limits.finished_tasks_max && self.compact_oldest_tree() {}
    }

    /// Drops the finished tree that finished first (retention): the root and
    /// every task under it, with their idempotency keys (the adopting
    /// requests' keys too). False when no tree has wholly finished.
    fn compact_oldest_tree(&mut self) -> bool {
        let Some((_, root)) = self.compactable.pop_first() else { return false };
        let tree = self.tree(root);
        self.compactable_tasks -= tree.len() as u64;
        self.tree_usage.remove(&root);
        for task_id in tree {
            let task = self.tasks.remove(&task_id).expect("a tree's tasks exist");
            assert!(task.state.is_terminal(), "a compacted tree has no open task");
            assert!(self.finished.remove(&(task.updated_ms, task_id)), "a finished task is indexed");
            self.children.remove(&task_id);
            if let Some(parent) = task.parent_id() {
                if let Some(siblings) = self.children.get_mut(&parent) {
                    siblings.remove(&task_id);
                    if siblings.is_empty() {
                        self.children.remove(&parent);
                    }
                }
            }
            self.state_bytes -= task_bytes(&task);
            if let Some(conversation_id) = task.conversation_id() {
                let count = self.conversation_tasks.get_mut(conversation_id).expect("counted at submit");
                *count -= 1;
                if *count == 0 {
                    // The conversation's last task is gone: its context goes with it.
                    self.conversation_tasks.remove(conversation_id);
                    self.remove_conversation(conversation_id);
                }
            }
            let keys = task.idempotency_key().map(|key| (key, task_id));
            let adoption_keys = task
                .adopted()
                .iter()
                .filter_map(|(child, adoption)| adoption.idempotency_key.as_deref().map(|key| (key, *child)));
            for (key, named) in keys.into_iter().chain(adoption_keys) {
                if self.idempotency_keys.get(key) == Some(&named) {
                    self.idempotency_keys.remove(key);
                }
            }
            self.counters.compacted += 1;
        }
        true
    }

    /// Refuses a write that would take the state past `state_bytes_max`:
    /// `added` bytes replace `removed` ones.
    fn check_budget(&self, added: u64, removed: u64) -> Result<(), Error> {
        let bytes = (self.state_bytes - removed).saturating_add(added);
        if added > removed && bytes > self.limits.state_bytes_max as u64 {
            return Err(Error::StateFull { bytes, max: self.limits.state_bytes_max as u64 });
        }
        Ok(())
    }

    /// A result or error finishes work already admitted: rather than refuse
    /// it, the oldest finished trees are compacted (as retention would) until
    /// it fits. Refused only when even that cannot make room; then nothing
    /// is compacted.
    fn make_room(&mut self, added: u64, removed: u64) -> Result<(), Error> {
        self.check_room(added, removed)?;
        while self.check_budget(added, removed).is_err() {
            assert!(self.compact_oldest_tree(), "check_room saw room among the finished trees");
        }
        Ok(())
    }

    /// Whether `make_room` would find room, changing nothing. O(tasks of
    /// finished trees), but only once the budget is reached.
    fn check_room(&self, added: u64, removed: u64) -> Result<(), Error> {
        let refused = match self.check_budget(added, removed) {
            Ok(()) => return Ok(()),
            Err(refused) => refused,
        };
        let needed = (self.state_bytes - removed).saturating_add(added) - self.limits.state_bytes_max as u64;
        let freeable: u64 =
            self.compactable.iter().flat_map(|(_, root)| self.tree(*root)).map(|id| task_bytes(&self.tasks[&id])).sum();
        if freeable < needed {
            return Err(refused);
        }
        Ok(())
    }

    /// Replaces a task's error text, keeping the byte count. Errors the state
    /// machine writes itself are short and never refused.
    fn set_error(&mut self, task_id: u64, error: String) {
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        let before = task_bytes(task);
        task.extra_mut().error = Some(error);
        self.state_bytes = self.state_bytes - before + task_bytes(task);
    }

    fn unindex_writer(&mut self, task_id: u64, entry: &(String, String)) {
        if let Some(entries) = self.written.get_mut(&task_id) {
            entries.remove(entry);
            if entries.is_empty() {
                self.written.remove(&task_id);
            }
        }
    }

    /// Removes the context entries a task wrote, but for those of the
    /// attempt under `keep` (the accepted or the live one): an entry of a
    /// superseded attempt would stand in the way of the accepted one.
    fn discard_entries(&mut self, task_id: u64, keep: Option<u64>) {
        let Some(entries) = self.written.get(&task_id) else { return };
        let doomed: Vec<(String, String)> = entries
            .iter()
            .filter(|(conversation_id, key)| Some(self.conversations[conversation_id].writers[key].fence) != keep)
            .cloned()
            .collect();
        for entry in doomed {
            let (conversation_id, key) = &entry;
            let conversation = self.conversations.get_mut(conversation_id).expect("indexed entries exist");
            let (_, value) = conversation.entries.remove(key).expect("indexed entries exist");
            conversation.writers.remove(key);
            let bytes = key.len() + value.len();
            conversation.bytes -= bytes;
            self.state_bytes -= bytes as u64;
            self.unindex_writer(task_id, &entry);
            self.counters.context_entries_discarded += 1;
        }
    }

    /// Deletes a conversation and its context; false if there was none.
    fn remove_conversation(&mut self, conversation_id: &str) -> bool {
        let Some(conversation) = self.conversations.remove(conversation_id) else { return false };
        for (key, writer) in &conversation.writers {
            self.unindex_writer(writer.task_id, &(conversation_id.to_string(), key.clone()));
        }
        self.state_bytes -= conversation.bytes as u64;
        if let Some(at) = conversation.written_ms {
            self.conversation_expiry.remove(&(at, conversation_id.to_string()));
        }
        true
    }

    /// Full consistency check of every index against the task map. O(n):
    /// for tests and for the start of a replica, not for every apply.
    pub fn check_invariants(&self) {
        self.check_stored_invariants();
        self.check_derived_invariants();
    }

    /// `restore`, then every check of `check_invariants` but the recount of
    /// the derived fields, which `restore` has just made: what a replica
    /// runs on a state read from a snapshot.
    pub fn restore_checked(&mut self) {
        self.restore();
        self.check_stored_invariants();
    }

    /// The derived fields are what a recount from the stored ones gives.
    fn check_derived_invariants(&self) {
        let derived = self.derived();
        assert_eq!(derived.state_bytes, self.state_bytes, "state bytes");
        assert_eq!(derived.conversation_expiry, self.conversation_expiry, "conversation expiry index");
        assert_eq!(derived.conversation_tasks, self.conversation_tasks, "tasks per conversation");
        assert_eq!(derived.children, self.children, "children index");
        assert_eq!(derived.tree_open, self.tree_open, "open tasks per tree");
        assert_eq!(derived.compactable, self.compactable, "finished trees");
        assert_eq!(derived.compactable_tasks, self.compactable_tasks, "tasks of finished trees");
        assert_eq!(derived.written, self.written, "context entries per writer");
        assert_eq!(derived.fair_ready, self.fair_ready, "ready tasks per key");
        assert_eq!(derived.tree_usage, self.tree_usage, "usage per tree");
        assert_eq!(derived.key_idle, self.key_idle, "idle keys");
    }

    /// Every check of `check_invariants` on the stored fields (and on the
    /// derived ones through them).
    fn check_stored_invariants(&self) {
        // The wait-for graph has no cycle: no task waits, through others, on
        // itself (one depth-first pass: grey while on the path, black when done).
        let mut done = BTreeSet::new();
        for start in self.waits.keys() {
            if done.contains(start) {
                continue;
            }
            let mut on_path = BTreeSet::from([*start]);
            let mut stack: Vec<(u64, Vec<u64>)> = vec![(*start, self.waits[start].on.iter().copied().collect())];
            while let Some((at, next)) = stack.last_mut() {
                match next.pop() {
                    Some(awaited) => {
                        assert!(!on_path.contains(&awaited), "the wait-for graph has a cycle through task {awaited}");
                        if done.contains(&awaited) {
                            continue;
                        }
                        let onward =
                            self.waits.get(&awaited).map(|w| w.on.iter().copied().collect()).unwrap_or_default();
                        on_path.insert(awaited);
                        stack.push((awaited, onward));
                    }
                    None => {
                        let finished = *at;
                        on_path.remove(&finished);
                        done.insert(finished);
                        stack.pop();
                    }
                }
            }
        }
        let mut ready = 0;
        for (queue, set) in &self.ready {
            for &(inverse_priority, id) in set {
                let task = &self.tasks[&id];
                assert_eq!(&task.queue, queue);
                assert_eq!(task.state, TaskState::Pending);
                assert_eq!(9 - task.priority, inverse_priority);
                ready += 1;
            }
        }
        for &(not_before, id) in &self.delayed {
            let task = &self.tasks[&id];
            assert_eq!(task.state, TaskState::Pending);
            assert_eq!(task.not_before_ms, not_before);
        }
        let pending = self.tasks.values().filter(|t| t.state == TaskState::Pending).count();
        assert_eq!(pending, ready + self.delayed.len(), "every pending task is ready or delayed, once");
        let mut leased = 0;
        for task in self.tasks.values() {
            assert_eq!(task.state == TaskState::Leased, task.lease.is_some(), "task {}", task.id);
            if let Some(lease) = &task.lease {
                leased += 1;
                assert_eq!(lease.fence, task.last_fence);
                assert!(self.lease_expiry.contains(&(lease.valid_until_ms, task.id)));
                let agent = &self.agents[&lease.agent_id];
                assert_eq!(agent.epoch, lease.agent_epoch);
                assert!(agent.leased_task_ids.contains(&task.id));
            }
            assert_eq!(task.state.is_terminal(), self.finished.contains(&(task.updated_ms, task.id)));
            assert!(task.id < self.next_task_id);
        }
        assert_eq!(leased, self.lease_expiry.len());
        assert_eq!(leased, self.lease_progress.len());
        let held: usize = self.agents.values().map(|a| a.leased_task_ids.len()).sum();
        assert_eq!(held, leased, "every lease is held by exactly one agent");
        self.check_flow_invariants();
        let mut servers: BTreeMap<String, u32> = BTreeMap::new();
        for agent in self.agents.values() {
            for capability in &agent.capabilities {
                *servers.entry(capability.clone()).or_default() += 1;
            }
        }
        assert_eq!(servers, self.servers_per_queue, "agents per capability");
        let open: u64 = self.open_per_queue.values().sum();
        assert_eq!(open as usize, self.tasks.values().filter(|t| !t.state.is_terminal()).count());
        for conversation in self.conversations.values() {
            let bytes: usize = conversation.entries.iter().map(|(key, (_, value))| key.len() + value.len()).sum();
            assert_eq!(bytes, conversation.bytes, "conversation bytes");
            for (key, writer) in &conversation.writers {
                assert!(conversation.entries.contains_key(key), "a writer of an entry that is gone");
                // Only the live or the accepted attempt's entries are kept:
                // a new lease discards the earlier ones.
                if let Some(task) = self.tasks.get(&writer.task_id) {
                    assert_eq!(writer.fence, task.last_fence, "entry {key:?} of a superseded attempt");
                }
            }
        }
        for (parent_id, children) in &self.children {
            let parent = &self.tasks[parent_id];
            assert!(children.len() >= parent.adopted().keys().filter(|id| children.contains(id)).count());
            for child_id in children {
                let child = &self.tasks[child_id];
                // Retention keeps trees whole: no child outlives its parent.
                assert_eq!(child.parent_id(), Some(*parent_id));
                assert!(child.id > parent.id);
                // A finished parent's open children belong to the attempt whose report ended it.
                if parent.state.is_terminal() && !child.state.is_terminal() {
                    let owner = self.owner_fence(parent, child);
                    assert!(
                        owner.is_none() || owner == Some(parent.last_fence),
                        "open child {child_id} of finished task {parent_id} belongs to a superseded attempt"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(on: &[u64]) -> Wait {
        Wait { on: on.iter().copied().collect(), named: on.to_vec(), until_ms: 0 }
    }

    #[test]
    #[should_panic(expected = "the wait-for graph has a cycle")]
    fn the_invariant_check_finds_a_cycle_of_waits() {
        let mut state = State::new(Limits::default());
        // 1 waits on 2, 2 on 3, 3 on 1: what `wait` refuses as a deadlock.
        state.waits = BTreeMap::from([(1, waiting(&[2])), (2, waiting(&[3])), (3, waiting(&[1]))]);
        state.check_invariants();
    }

    #[test]
    fn the_invariant_check_accepts_waits_that_share_a_task() {
        let mut state = State::new(Limits::default());
        // A diamond, not a cycle: 1 and 2 both wait on 3, 1 also on 2.
        state.waits = BTreeMap::from([(1, waiting(&[2, 3])), (2, waiting(&[3]))]);
        state.check_invariants();
    }
}
