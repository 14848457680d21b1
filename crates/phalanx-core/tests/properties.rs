//! Property tests of the state machine over random histories of entries:
//! at most one live lease per task, fences strictly increasing, stale fences
//! changing nothing, acknowledged tasks never disappearing (and finished
//! ones never changing), two replicas, one rebuilt from a snapshot
//! midway, ending byte-identical, the edge's checks (`State::check`)
//! refusing exactly what applying refuses, and delegation trees that hold
//! up (no child without its parent, no delegation without the parent's
//! current fence, no open child of a finished parent but the accepted
//! attempt's).
//!
//! A history is generated as templates (`Op`) that are resolved against the
//! state just before their entry, so that fences and epochs are sometimes
//! the current ones and sometimes stale. Example-based tests live in
//! `scenarios.rs`.

use phalanx_core::{Command, Error, Limits, NewTask, Outcome, Request, Response, State, Task, TaskState, Writer};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
const AGENTS: [&str; 3] = ["a0", "a1", "a2"];

/// Which fence a fenced command carries, relative to the task's current one.
#[derive(Clone, Debug)]
enum Fence {
    Current,
    Older(u64),
    Newer(u64),
    Any(u64),
}

/// Which epoch an agent command carries.
#[derive(Clone, Copy, Debug)]
enum Epoch {
    Current,
    Stale,
}

/// Which task a command names: `leased` prefers a task under lease, so that
/// results with the current fence are frequent; `n` picks among candidates,
/// one past the end meaning a task that does not exist.
#[derive(Clone, Copy, Debug)]
struct Pick {
    leased: bool,
    n: u16,
}

#[derive(Clone, Debug)]
struct TaskSpec {
    queue: usize,
    priority: u8,
    key: Option<u8>,
    deadline_ms: Option<u64>,
    max_attempts: u32,
}

#[derive(Clone, Debug)]
enum Op {
    Tick,
    Submit(Vec<TaskSpec>),
    Register {
        agent: usize,
        queues: u8,
        capacity: u32,
    },
    Deregister {
        agent: usize,
        epoch: Epoch,
    },
    Expire {
        agent: usize,
        epoch: Epoch,
    },
    /// `capable`: ask only for queues the agent serves (else `queues` as is).
    Lease {
        agent: usize,
        epoch: Epoch,
        queues: u8,
        capable: bool,
        tasks_max: u32,
        lease_ttl_ms: u64,
    },
    Complete {
        task: Pick,
        fence: Fence,
    },
    Fail {
        task: Pick,
        fence: Fence,
        retryable: bool,
    },
    Extend {
        task: Pick,
        fence: Fence,
        lease_ttl_ms: u64,
    },
    Cancel {
        task: Pick,
    },
    /// `writer`: on behalf of a task (preferably a leased one) under a
    /// fence, into its own conversation when `own` and it has one.
    ContextPut {
        conversation: u8,
        key: u8,
        expected: Option<u8>,
        writer: Option<(Pick, Fence, bool)>,
    },
    /// A delegation from `parent` under `fence` (none when `fenced` is false),
    /// of step `step` on `queue`, keyed by one of a few keys shared with roots.
    /// `again`: the step of one of the parent's children, if it has any (an
    /// attempt after the one that delegated it does the same step).
    Delegate {
        parent: Pick,
        fence: Fence,
        fenced: bool,
        queue: usize,
        step: u8,
        key: Option<u8>,
        again: bool,
    },
    Wait {
        task: Pick,
        fence: Fence,
        on: Vec<Pick>,
        timeout_ms: u64,
    },
    ContextDelete {
        conversation: u8,
    },
    /// The holder (or a stale one) says the work moves.
    Progress {
        task: Pick,
        fence: Fence,
    },
    /// A policy change (the stall timeout, 10 min to 1 h: longer than a
    /// history, so that the revocation of stuck leases, which every entry
    /// runs, does not make a refused command look like a change) under the
    /// current version or a stale one, or a client's rollback to a version.
    Policy {
        stall_timeout_ms: u64,
        stale: bool,
        rollback_to: Option<u8>,
    },
}

/// One log entry: how far the index jumps, how the leader's clock moves
/// (possibly backwards), its commands, and a probe for the stale-fence check.
#[derive(Clone, Debug)]
struct EntrySpec {
    index_gap: u64,
    clock_step_ms: i64,
    ops: Vec<Op>,
    probe: Probe,
}

/// A stale-fence command tried on a copy of the state after an entry.
#[derive(Clone, Debug)]
struct Probe {
    task: Pick,
    fence: Fence,
    /// 0: Complete, 1: Fail, 2: Extend.
    kind: u8,
}

fn fence() -> impl Strategy<Value = Fence> {
    prop_oneof![
        4 => Just(Fence::Current),
        2 => (1..5u64).prop_map(Fence::Older),
        1 => (1..5u64).prop_map(Fence::Newer),
        1 => (0..400u64).prop_map(Fence::Any),
    ]
}

/// For delegations and context writes, which mean something only under a
/// held lease: mostly the current fence, sometimes a stale one.
fn mostly_current_fence() -> impl Strategy<Value = Fence> {
    prop_oneof![8 => Just(Fence::Current), 1 => (1..5u64).prop_map(Fence::Older), 1 => (0..400u64).prop_map(Fence::Any)]
}

fn leased_pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.95), any::<u16>()).prop_map(|(leased, n)| Pick { leased, n })
}

fn stale_fence() -> impl Strategy<Value = Fence> {
    prop_oneof![(1..5u64).prop_map(Fence::Older), (1..5u64).prop_map(Fence::Newer), (0..400u64).prop_map(Fence::Any),]
}

fn epoch() -> impl Strategy<Value = Epoch> {
    prop_oneof![5 => Just(Epoch::Current), 1 => Just(Epoch::Stale)]
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.7), any::<u16>()).prop_map(|(leased, n)| Pick { leased, n })
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    (0..QUEUES.len(), 0..=9u8, prop::option::weighted(0.3, 0..4u8), prop::option::weighted(0.3, 1..20_000u64), 1..=3u32)
        .prop_map(|(queue, priority, key, deadline_ms, max_attempts)| TaskSpec {
            queue,
            priority,
            key,
            deadline_ms,
            max_attempts,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS.len();
    let queues = 1..8u8;
    prop_oneof![
        1 => Just(Op::Tick),
        3 => prop::collection::vec(task_spec(), 1..=3).prop_map(Op::Submit),
        3 => (agent.clone(), queues.clone(), 1..=3u32)
            .prop_map(|(agent, queues, capacity)| Op::Register { agent, queues, capacity }),
        1 => (agent.clone(), epoch()).prop_map(|(agent, epoch)| Op::Deregister { agent, epoch }),
        1 => (agent.clone(), epoch()).prop_map(|(agent, epoch)| Op::Expire { agent, epoch }),
        6 => (
            agent,
            epoch(),
            queues,
            prop::bool::weighted(0.9),
            0..=3u32,
            prop_oneof![1 => 50..100u64, 9 => 100..4_000u64],
        )
            .prop_map(|(agent, epoch, queues, capable, tasks_max, lease_ttl_ms)| Op::Lease {
                agent,
                epoch,
                queues,
                capable,
                tasks_max,
                lease_ttl_ms
            }),
        4 => (pick(), fence()).prop_map(|(task, fence)| Op::Complete { task, fence }),
        3 => (pick(), fence(), any::<bool>()).prop_map(|(task, fence, retryable)| Op::Fail { task, fence, retryable }),
        2 => (pick(), fence(), 100..4_000u64)
            .prop_map(|(task, fence, lease_ttl_ms)| Op::Extend { task, fence, lease_ttl_ms }),
        1 => pick().prop_map(|task| Op::Cancel { task }),
        2 => (0..2u8, 0..3u8, prop::option::of(0..3u8), prop::option::weighted(0.6, (leased_pick(), mostly_current_fence(), prop::bool::weighted(0.9))))
            .prop_map(|(conversation, key, expected, writer)| Op::ContextPut { conversation, key, expected, writer }),
        6 => (leased_pick(), mostly_current_fence(), prop::bool::weighted(0.95), 0..QUEUES.len(), 0..2u8, prop::option::weighted(0.5, 0..8u8), any::<bool>())
            .prop_map(|(parent, fence, fenced, queue, step, key, again)| Op::Delegate { parent, fence, fenced, queue, step, key, again }),
        1 => (pick(), fence(), prop::collection::vec(pick(), 1..=3), 1..20_000u64)
            .prop_map(|(task, fence, on, timeout_ms)| Op::Wait { task, fence, on, timeout_ms }),
        1 => (0..2u8).prop_map(|conversation| Op::ContextDelete { conversation }),
        2 => (pick(), fence()).prop_map(|(task, fence)| Op::Progress { task, fence }),
        1 => (600_000..3_600_000u64, prop::bool::weighted(0.2), prop::option::weighted(0.3, 0..4u8))
            .prop_map(|(stall_timeout_ms, stale, rollback_to)| Op::Policy { stall_timeout_ms, stale, rollback_to }),
    ]
}

fn entry() -> impl Strategy<Value = EntrySpec> {
    (
        1..=4u64,
        prop_oneof![2 => -500..0i64, 12 => 0..2_500i64, 1 => 2_500..40_000i64],
        prop::collection::vec(op(), 1..=5),
        (pick(), stale_fence(), 0..3u8).prop_map(|(task, fence, kind)| Probe { task, fence, kind }),
    )
        .prop_map(|(index_gap, clock_step_ms, ops, probe)| EntrySpec { index_gap, clock_step_ms, ops, probe })
}

fn history() -> impl Strategy<Value = Vec<EntrySpec>> {
    prop::collection::vec(entry(), 50..150)
}

/// Ops of planners at work: roots leased, steps delegated, leases lost and
/// granted again (expiry, retryable failures, agents leaving), the same steps
/// delegated again by the next attempt, children finishing, parents ending.
fn tree_op() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS.len();
    prop_oneof![
        2 => prop::collection::vec(task_spec(), 1..=2).prop_map(Op::Submit),
        2 => (agent.clone(), 2..=4u32).prop_map(|(agent, capacity)| Op::Register { agent, queues: 7, capacity }),
        1 => (agent.clone(), epoch()).prop_map(|(agent, epoch)| Op::Expire { agent, epoch }),
        5 => (agent, 1..=2u32, 500..5_000u64).prop_map(|(agent, tasks_max, lease_ttl_ms)| Op::Lease {
            agent,
            epoch: Epoch::Current,
            queues: 7,
            capable: true,
            tasks_max,
            lease_ttl_ms,
        }),
        3 => (pick(), fence()).prop_map(|(task, fence)| Op::Complete { task, fence }),
        2 => (pick(), fence(), prop::bool::weighted(0.8)).prop_map(|(task, fence, retryable)| Op::Fail { task, fence, retryable }),
        1 => pick().prop_map(|task| Op::Cancel { task }),
        3 => (0..2u8, 0..3u8, prop::option::of(0..2u8), prop::option::weighted(0.9, (leased_pick(), mostly_current_fence(), prop::bool::weighted(0.9))))
            .prop_map(|(conversation, key, expected, writer)| Op::ContextPut { conversation, key, expected, writer }),
        8 => (leased_pick(), mostly_current_fence(), prop::bool::weighted(0.97), 0..QUEUES.len(), 0..2u8, prop::option::weighted(0.5, 0..8u8), prop::bool::weighted(0.7))
            .prop_map(|(parent, fence, fenced, queue, step, key, again)| Op::Delegate { parent, fence, fenced, queue, step, key, again }),
        1 => (leased_pick(), mostly_current_fence(), prop::collection::vec(pick(), 1..=3), 1..5_000u64)
            .prop_map(|(task, fence, on, timeout_ms)| Op::Wait { task, fence, on, timeout_ms }),
    ]
}

fn tree_history() -> impl Strategy<Value = Vec<EntrySpec>> {
    let entry = (
        1..=3u64,
        prop_oneof![1 => -200..0i64, 12 => 0..1_500i64, 2 => 1_500..10_000i64],
        prop::collection::vec(tree_op(), 1..=4),
        (pick(), stale_fence(), 0..3u8).prop_map(|(task, fence, kind)| Probe { task, fence, kind }),
    )
        .prop_map(|(index_gap, clock_step_ms, ops, probe)| EntrySpec { index_gap, clock_step_ms, ops, probe });
    prop::collection::vec(entry, 50..150)
}

// ---- resolving templates against the state ----

fn queue_set(mask: u8) -> Vec<String> {
    QUEUES.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, q)| q.to_string()).collect()
}

/// A task id: a leased task when asked and there is one, else any task, or
/// (one past the candidates) an id that was never given.
fn task_id(state: &State, pick: Pick) -> u64 {
    let all = state.tasks(None, None, 0, usize::MAX);
    let leased: Vec<u64> = all.iter().filter(|t| t.state == TaskState::Leased).map(|t| t.id).collect();
    let candidates: Vec<u64> =
        if pick.leased && !leased.is_empty() { leased } else { all.iter().map(|t| t.id).collect() };
    let n = pick.n as usize % (candidates.len() + 1);
    candidates.get(n).copied().unwrap_or(1_000_000)
}

fn fence_value(state: &State, task_id: u64, fence: &Fence) -> u64 {
    let current = state.task(task_id).map(|t| t.last_fence).unwrap_or(0);
    match fence {
        Fence::Current => current,
        Fence::Older(by) => current.saturating_sub(*by),
        Fence::Newer(by) => current + by,
        Fence::Any(value) => *value,
    }
}

/// Whether a fence would be refused as superseded on this task.
fn is_stale(state: &State, task_id: u64, fence: u64) -> bool {
    state.task(task_id).is_some_and(|t| t.last_fence == 0 || fence != t.last_fence)
}

trait Children {
    fn children_of_any(&self, parent_id: u64) -> Vec<&Task>;
}

impl Children for State {
    /// The tasks whose parent is `parent_id`, oldest first.
    fn children_of_any(&self, parent_id: u64) -> Vec<&Task> {
        self.tasks(None, None, parent_id, usize::MAX).into_iter().filter(|t| t.parent_id() == Some(parent_id)).collect()
    }
}

fn agent_epoch(state: &State, agent: usize, epoch: Epoch) -> u64 {
    let current = state.agent(AGENTS[agent]).map(|a| a.epoch).unwrap_or(1);
    match epoch {
        Epoch::Current => current,
        Epoch::Stale => current.saturating_sub(1),
    }
}

fn resolve(state: &State, op: &Op) -> Command {
    match op {
        Op::Tick => Command::Tick,
        Op::Submit(specs) => Command::Submit {
            tasks: specs
                .iter()
                .map(|spec| NewTask {
                    queue: QUEUES[spec.queue].to_string(),
                    payload: format!("{{\"p\":{}}}", spec.priority),
                    priority: spec.priority,
                    deadline_ms: spec.deadline_ms,
                    max_attempts: spec.max_attempts,
                    idempotency_key: spec.key.map(|k| format!("key-{k}")),
                    parent_id: None,
                    parent_fence: None,
                    // Some tasks share a conversation, so that retention's
                    // removal of a conversation with its last task is exercised.
                    conversation_id: (spec.priority < 4).then(|| format!("c{}", spec.priority % 2)),
                    ..NewTask::new("", "")
                })
                .collect(),
        },
        Op::Register { agent, queues, capacity } => Command::RegisterAgent {
            agent_id: AGENTS[*agent].to_string(),
            capabilities: queue_set(*queues).into_iter().collect::<BTreeSet<_>>(),
            capacity: *capacity,
            session: String::new(),
        },
        Op::Deregister { agent, epoch } => {
            Command::DeregisterAgent { agent_id: AGENTS[*agent].to_string(), epoch: agent_epoch(state, *agent, *epoch) }
        }
        Op::Expire { agent, epoch } => {
            Command::ExpireAgent { agent_id: AGENTS[*agent].to_string(), epoch: agent_epoch(state, *agent, *epoch) }
        }
        Op::Lease { agent, epoch, queues, capable, tasks_max, lease_ttl_ms } => {
            let mut asked = queue_set(*queues);
            if let Some(serving) = state.agent(AGENTS[*agent]).filter(|_| *capable) {
                asked.retain(|q| serving.capabilities.contains(q));
                if asked.is_empty() {
                    asked = serving.capabilities.iter().cloned().collect();
                }
            }
            Command::Lease {
                agent_id: AGENTS[*agent].to_string(),
                epoch: agent_epoch(state, *agent, *epoch),
                queues: asked,
                tasks_max: *tasks_max,
                lease_ttl_ms: *lease_ttl_ms,
            }
        }
        Op::Complete { task, fence } => {
            let task_id = task_id(state, *task);
            Command::Complete {
                task_id,
                fence: fence_value(state, task_id, fence),
                result: format!("\"r{task_id}\""),
                usage: None,
            }
        }
        Op::Fail { task, fence, retryable } => {
            let task_id = task_id(state, *task);
            let fence = fence_value(state, task_id, fence);
            Command::Fail { task_id, fence, error: "boom".into(), retryable: *retryable, usage: None }
        }
        Op::Extend { task, fence, lease_ttl_ms } => {
            let task_id = task_id(state, *task);
            Command::Extend { task_id, fence: fence_value(state, task_id, fence), lease_ttl_ms: *lease_ttl_ms }
        }
        Op::Cancel { task } => Command::Cancel { task_id: task_id(state, *task) },
        Op::ContextPut { conversation, key, expected, writer } => {
            let mut conversation_id = format!("c{conversation}");
            let writer = writer.as_ref().map(|(task, fence, own)| {
                let task_id = task_id(state, *task);
                if let Some(own) =
                    state.task(task_id).and_then(|t| t.conversation_id().map(str::to_string)).filter(|_| *own)
                {
                    conversation_id = own;
                }
                Writer { task_id, fence: fence_value(state, task_id, fence) }
            });
            Command::ContextPut {
                conversation_id,
                key: format!("k{key}"),
                value: "v".repeat(*key as usize + 1),
                expected_version: expected.map(u64::from),
                writer,
            }
        }
        Op::Delegate { parent, fence, fenced, queue, step, key, again } => {
            // A leased parent whenever there is one: delegating is what a holder does.
            let leased: Vec<u64> =
                state.tasks(None, Some(TaskState::Leased), 0, usize::MAX).iter().map(|t| t.id).collect();
            let parent_id = match leased.len() {
                0 => task_id(state, *parent),
                n if parent.leased => leased[parent.n as usize % n],
                _ => task_id(state, *parent),
            };
            let fence = fence_value(state, parent_id, fence);
            let children = state.children_of_any(parent_id);
            let (queue, payload) = match children.get(parent.n as usize % children.len().max(1)) {
                Some(child) if *again => (child.queue.clone(), child.payload.clone()),
                _ => (QUEUES[*queue].to_string(), format!("{{\"step\":{step}}}")),
            };
            Command::Submit {
                tasks: vec![NewTask {
                    parent_id: Some(parent_id),
                    parent_fence: fenced.then_some(fence),
                    // Two keys shared with roots (conflicts), the others for children alone.
                    idempotency_key: key.map(|k| if k < 2 { format!("key-{k}") } else { format!("child-{k}") }),
                    ..NewTask::new(queue, payload)
                }],
            }
        }
        Op::Wait { task, fence, on, timeout_ms } => {
            let task_id = task_id(state, *task);
            Command::Wait {
                task_id,
                fence: fence_value(state, task_id, fence),
                on: on.iter().map(|pick| self::task_id(state, *pick)).collect(),
                timeout_ms: *timeout_ms,
            }
        }
        Op::ContextDelete { conversation } => Command::ContextDelete { conversation_id: format!("c{conversation}") },
        Op::Progress { task, fence } => {
            let task_id = task_id(state, *task);
            Command::Progress { task_id, fence: fence_value(state, task_id, fence) }
        }
        Op::Policy { stall_timeout_ms, stale, rollback_to } => match rollback_to {
            Some(to) => Command::RollbackPolicy {
                to_version: u64::from(*to) + 1,
                note: "rollback".into(),
                by_client: true,
                force: false,
                // A stale rollback is refused, as a stale change is.
                expected_version: Some(state.policy_version() - u64::from(*stale)),
            },
            None => Command::SetPolicy {
                policy: phalanx_core::Limits { stall_timeout_ms: *stall_timeout_ms, ..state.limits().clone() },
                expected_version: state.policy_version() - u64::from(*stale),
                note: "change".into(),
                force: false,
            },
        },
    }
}

/// The fenced commands and the fence each carries.
fn fenced(command: &Command) -> Option<(u64, u64)> {
    match command {
        Command::Complete { task_id, fence, .. }
        | Command::Fail { task_id, fence, .. }
        | Command::Extend { task_id, fence, .. }
        | Command::Progress { task_id, fence } => Some((*task_id, *fence)),
        _ => None,
    }
}

// ---- replaying ----

/// What the checks see of one applied entry.
struct Applied<'a> {
    spec: &'a EntrySpec,
    before: &'a State,
    index: u64,
    request: &'a Request,
    response: &'a Response,
    after: &'a State,
}

/// Applies a history from a fresh state, checking after every entry what
/// must always hold, then `check`. Returns the final state and every
/// (index, request, response) applied.
fn replay(history: &[EntrySpec], check: impl FnMut(&Applied)) -> (State, Vec<(u64, Request, Response)>) {
    replay_with(Limits::default(), history, check)
}

/// `replay` under other limits.
fn replay_with(
    limits: Limits,
    history: &[EntrySpec],
    mut check: impl FnMut(&Applied),
) -> (State, Vec<(u64, Request, Response)>) {
    let mut state = State::new(limits);
    let mut clock_ms: i64 = 1_000_000;
    let mut index = 0;
    let mut log = Vec::new();
    for spec in history {
        clock_ms += spec.clock_step_ms;
        index += spec.index_gap;
        let commands = spec.ops.iter().map(|op| resolve(&state, op)).collect();
        let request = Request { now_ms: clock_ms as u64, commands };
        let before = state.clone();
        let response = state.apply(index, &request);
        state.check_invariants();
        assert_eq!(state.last_index(), index);
        assert_eq!(state.now_ms(), before.now_ms().max(request.now_ms), "log time is the maximum of the stamps");
        assert_eq!(response.outcomes.len(), request.commands.len());
        check(&Applied { spec, before: &before, index, request: &request, response: &response, after: &state });
        log.push((index, request, response));
    }
    (state, log)
}

/// The state as JSON without what a superseded report may change.
fn without_superseded_counters(state: &State, task_id: u64) -> Value {
    let mut value = serde_json::to_value(state).unwrap();
    let object = value.as_object_mut().unwrap();
    object.remove("last_index");
    object["counters"].as_object_mut().unwrap().remove("superseded");
    if let Some(task) = object["tasks"].get_mut(task_id.to_string()) {
        task.as_object_mut().unwrap().remove("superseded_count");
    }
    value
}

/// `cases` unless `PROPTEST_CASES` asks for more (a longer soak), which an
/// explicit `cases` field would silently override.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

proptest! {
    #![proptest_config(config(96))]

    /// (a) At most one lease per task, each held by exactly one agent of the
    /// lease's epoch, and no agent over its capacity.
    #[test]
    fn a_task_never_has_two_live_leases(history in history()) {
        replay(&history, |applied| {
            let after = applied.after;
            let mut holder: BTreeMap<u64, &str> = BTreeMap::new();
            for agent in after.agents() {
                assert!(agent.leased_task_ids.len() as u32 <= agent.capacity, "agent {} over capacity", agent.id);
                for id in &agent.leased_task_ids {
                    if let Some(other) = holder.insert(*id, &agent.id) {
                        panic!("task {id} held by {other} and {}", agent.id);
                    }
                    let lease = after.task(*id).unwrap().lease.as_ref().expect("a held task has a lease");
                    assert_eq!(lease.agent_id, agent.id);
                    assert_eq!(lease.agent_epoch, agent.epoch);
                }
            }
            for task in after.tasks(None, None, 0, usize::MAX) {
                assert_eq!(task.lease.is_some(), holder.contains_key(&task.id), "task {} lease without holder", task.id);
                assert_eq!(task.lease.is_some(), task.state == TaskState::Leased);
            }
            // Within one entry a task is granted at most once.
            let mut granted = BTreeSet::new();
            for outcome in &applied.response.outcomes {
                if let Outcome::Leased { grants } = outcome {
                    for grant in grants {
                        assert!(granted.insert(grant.task.id), "task {} granted twice in one entry", grant.task.id);
                    }
                }
            }
        });
    }

    /// (b) Every grant's fence is its entry's index and greater than any
    /// fence granted before on the same task.
    #[test]
    fn fencing_tokens_strictly_increase(history in history()) {
        let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
        replay(&history, |applied| {
            for outcome in &applied.response.outcomes {
                let Outcome::Leased { grants } = outcome else { continue };
                for grant in grants {
                    assert_eq!(grant.fence, applied.index, "the fence is the granting entry's index");
                    assert_eq!(grant.task.last_fence, grant.fence);
                    if let Some(previous) = newest.insert(grant.task.id, grant.fence) {
                        assert!(grant.fence > previous, "task {}: fence {previous} then {}", grant.task.id, grant.fence);
                    }
                }
            }
            for (id, fence) in &newest {
                if let Some(task) = applied.after.task(*id) {
                    assert_eq!(task.last_fence, *fence, "task {id} remembers its newest fence");
                }
            }
        });
    }

    /// (d) Every task id a submit acknowledged stays readable for the whole
    /// run, and a finished task never changes again (but for the count of
    /// superseded reports about it).
    #[test]
    fn no_acknowledged_task_ever_disappears(history in history()) {
        let mut acknowledged: BTreeSet<u64> = BTreeSet::new();
        let mut finished: BTreeMap<u64, Task> = BTreeMap::new();
        replay(&history, |applied| {
            for outcome in &applied.response.outcomes {
                if let Outcome::Submitted { results } = outcome {
                    acknowledged.extend(results.iter().flatten().map(|submitted| submitted.task_id));
                }
            }
            for id in &acknowledged {
                let task = applied.after.task(*id).unwrap_or_else(|| panic!("acknowledged task {id} disappeared"));
                let mut unfenced = task.clone();
                unfenced.extra_mut().superseded_count = 0;
                match finished.get(id) {
                    Some(was) => assert_eq!(was, &unfenced, "finished task {id} changed"),
                    None if task.state.is_terminal() => {
                        finished.insert(*id, unfenced);
                    }
                    None => {}
                }
            }
        });
    }

    /// (e) Two replicas applying the same entries end byte-identical, also
    /// when one of them is rebuilt from a serialized snapshot midway; and
    /// they answer every entry alike.
    #[test]
    fn replicas_end_byte_identical_even_from_a_snapshot(history in history(), cut in any::<prop::sample::Index>()) {
        replicas_agree(Limits::default(), &history, cut)?;
    }
}

/// (e) for one history: a second replica, restored from a snapshot at `cut`.
fn replicas_agree(limits: Limits, history: &[EntrySpec], cut: prop::sample::Index) -> Result<(), TestCaseError> {
    let (first, log) = replay_with(limits.clone(), history, |_| {});
    let cut = cut.index(log.len());
    let mut replica = State::new(limits);
    for (i, (index, request, response)) in log.iter().enumerate() {
        if i == cut {
            let snapshot = serde_json::to_vec(&replica).unwrap();
            let mut restored: State = serde_json::from_slice(&snapshot).unwrap();
            restored.restore();
            prop_assert_eq!(&restored, &replica);
            replica = restored;
            replica.check_invariants();
        }
        let answered = replica.apply(*index, request);
        prop_assert_eq!(&answered, response, "entry {} answered differently", index);
    }
    prop_assert_eq!(serde_json::to_vec(&first).unwrap(), serde_json::to_vec(&replica).unwrap());
    prop_assert_eq!(first.next_due_ms(), replica.next_due_ms());
    Ok(())
}

proptest! {
    // Each entry of this one also serializes the whole state twice: fewer cases.
    #![proptest_config(config(64))]

    /// (c) Complete, Fail or Extend under a fence that is not current is
    /// refused as superseded and changes nothing but the superseded counters:
    /// probed on a copy after every entry, and checked on the history's own
    /// stale commands.
    #[test]
    fn a_stale_fence_changes_nothing(history in history()) {
        replay(&history, |applied| {
            // The history's own commands with a stale fence (judged against the
            // state before the entry; a fence equal to this entry's index could
            // have become current within it).
            for (command, outcome) in applied.request.commands.iter().zip(&applied.response.outcomes) {
                let Some((task_id, fence)) = fenced(command) else { continue };
                if is_stale(applied.before, task_id, fence) && fence != applied.index {
                    let superseded =
                        matches!(outcome, Outcome::Refused { error: Error::Superseded { task_id: t, fence: f, .. } } if *t == task_id && *f == fence);
                    assert!(superseded, "{command:?} gave {outcome:?}");
                }
            }
            // The probe: one task, one stale fence, one command, on a copy.
            let after = applied.after;
            let probe = &applied.spec.probe;
            let task_id = task_id(after, probe.task);
            let Some(task) = after.task(task_id) else { return };
            let mut fence = fence_value(after, task_id, &probe.fence);
            if fence == task.last_fence && task.last_fence != 0 {
                fence += 1;
            }
            let command = match probe.kind {
                0 => Command::Complete { task_id, fence, result: "\"stale\"".into(), usage: None },
                1 => Command::Fail { task_id, fence, error: "stale".into(), retryable: true, usage: None },
                _ => Command::Extend { task_id, fence, lease_ttl_ms: 1_000 },
            };
            let mut copy = after.clone();
            let request = Request { now_ms: after.now_ms(), commands: vec![command.clone()] };
            let response = copy.apply(after.last_index() + 1, &request);
            let refusal = Error::Superseded { task_id, fence, current: task.last_fence };
            assert_eq!(response.outcomes, vec![Outcome::Refused { error: refusal }], "{command:?}");
            assert_eq!(copy.counters().superseded, after.counters().superseded + 1);
            assert_eq!(copy.task(task_id).unwrap().superseded_count(), task.superseded_count() + 1);
            let expected = without_superseded_counters(after, task_id);
            assert_eq!(without_superseded_counters(&copy, task_id), expected, "{command:?} changed the state");
        });
    }
}

/// The state as JSON without `last_index`.
fn without_last_index(state: &State) -> Value {
    let mut value = serde_json::to_value(state).unwrap();
    value.as_object_mut().unwrap().remove("last_index");
    value
}

proptest! {
    // Each probe clones and serializes the whole state: fewer cases.
    #![proptest_config(config(48))]

    /// (f) The edge refuses exactly what apply refuses: a command `check`
    /// refuses is refused by apply with the same error and changes nothing,
    /// and a command apply refuses was refused by `check`, except the two
    /// refusals that must reach the log because applying them records
    /// something (a stale fence, a delegation loop). The same for each task
    /// of a one-task submit and `check_new_task`. Probed on a copy after
    /// every entry, with that entry's templates resolved again.
    #[test]
    fn the_edge_refuses_exactly_what_apply_refuses(history in history()) {
        replay(&history, edge_agrees);
    }

    /// (f) on delegation trees, under tight retention.
    #[test]
    fn the_edge_refuses_exactly_what_apply_refuses_in_trees(history in tree_history()) {
        replay_with(tight(), &history, edge_agrees);
    }
}

/// (f) after one entry: each of its templates, resolved again, judged by the
/// edge and applied on a copy.
fn edge_agrees(applied: &Applied) {
    let after = applied.after;
    for op in &applied.spec.ops {
        let command = resolve(after, op);
        let mut copy = after.clone();
        let request = Request { now_ms: after.now_ms(), commands: vec![command.clone()] };
        let outcome = copy.apply(after.last_index() + 1, &request).outcomes.pop().unwrap();
        match (after.check(&command), &outcome) {
            (Err(error), Outcome::Refused { error: refused }) => {
                assert_eq!(&error, refused, "{command:?}");
                assert_eq!(without_last_index(after), without_last_index(&copy), "{command:?} changed the state");
            }
            (Err(error), other) => panic!("{command:?}: check refused with {error:?}, apply gave {other:?}"),
            (Ok(()), Outcome::Refused { error }) => assert!(
                matches!(error, Error::Superseded { .. } | Error::LoopDetected { .. }),
                "{command:?}: check let through what apply refused with {error:?}"
            ),
            (Ok(()), _) => {}
        }
        let (Command::Submit { tasks }, Outcome::Submitted { results }) = (&command, &outcome) else { continue };
        if let ([task], [result]) = (tasks.as_slice(), results.as_slice()) {
            match (after.check_new_task(task), result) {
                (Err(error), Err(refused)) => {
                    assert_eq!(&error, refused, "{task:?}");
                    assert_eq!(without_last_index(after), without_last_index(&copy), "{task:?} changed the state");
                }
                (Err(error), Ok(_)) => panic!("{task:?}: check_new_task refused with {error:?}, apply accepted"),
                (Ok(()), Err(Error::LoopDetected { .. })) => {}
                (Ok(()), Err(error)) => panic!("{task:?}: check_new_task let through {error:?}"),
                (Ok(()), Ok(_)) => {}
            }
        }
    }
}

/// Limits under which retention runs all the time: few finished tasks kept,
/// not for long, and a small task table.
fn tight() -> Limits {
    Limits {
        finished_tasks_max: 4,
        finished_task_ttl_ms: 20_000,
        tasks_max: 100,
        queue_tasks_max: 100,
        children_per_task_max: 4,
        ..Limits::default()
    }
}

/// Every delegation a submit in this entry accepted: (parent, the fence it
/// carried, the child, whether it was adopted).
fn delegations(applied: &Applied) -> Vec<(u64, Option<u64>, u64, bool)> {
    let mut accepted = Vec::new();
    for (command, outcome) in applied.request.commands.iter().zip(&applied.response.outcomes) {
        let (Command::Submit { tasks }, Outcome::Submitted { results }) = (command, outcome) else { continue };
        for (task, result) in tasks.iter().zip(results) {
            if let (Some(parent), Ok(submitted)) = (task.parent_id, result) {
                accepted.push((parent, task.parent_fence, submitted.task_id, submitted.adopted));
            }
        }
    }
    accepted
}

proptest! {
    #![proptest_config(config(96))]

    /// (e) on delegation trees: the derived indexes (children, open tasks
    /// per tree, finished trees, context writers) are rebuilt alike.
    #[test]
    fn replicas_of_trees_end_byte_identical_even_from_a_snapshot(history in tree_history(), cut in any::<prop::sample::Index>()) {
        replicas_agree(tight(), &history, cut)?;
    }

    /// (g) Retention keeps trees whole: every task's parent is in the state,
    /// live or finished, under limits that compact all the time.
    #[test]
    fn no_child_without_a_live_or_finished_parent(history in tree_history()) {
        let mut compacted = 0;
        let (state, _) = replay_with(tight(), &history, |applied| {
            for task in applied.after.tasks(None, None, 0, usize::MAX) {
                if let Some(parent) = task.parent_id() {
                    assert!(applied.after.task(parent).is_some(), "task {} lost its parent {parent}", task.id);
                }
            }
            compacted = applied.after.counters().compacted;
        });
        prop_assert_eq!(compacted, state.counters().compacted);
    }

    /// (h) A delegation is accepted only with the parent's current fence,
    /// under a lease held when the entry began (or granted within it), and
    /// the child records that fence (or the adoption does).
    #[test]
    fn no_delegation_accepted_without_the_parents_current_fence(history in tree_history()) {
        replay_with(tight(), &history, |applied| {
            for (parent_id, fence, child_id, adopted) in delegations(applied) {
                let fence = fence.unwrap_or_else(|| panic!("delegation to {parent_id} accepted without parent_fence"));
                let held = applied.before.task(parent_id).is_some_and(|parent| {
                    parent.last_fence == fence && parent.lease.as_ref().is_some_and(|lease| lease.fence == fence)
                });
                assert!(held || fence == applied.index, "child {child_id} of {parent_id} under fence {fence}, not the current one");
                let (Some(parent), Some(child)) = (applied.after.task(parent_id), applied.after.task(child_id)) else { continue };
                assert_eq!(child.parent_id(), Some(parent_id));
                if adopted {
                    assert!(parent.adopted().get(&child_id).is_some_and(|adoption| adoption.fence >= fence));
                }
                assert!(applied.after.owner_fence(parent, child).is_some_and(|owner| owner >= fence));
            }
        });
    }

    /// (i) Every child of a finished parent is finished, or belongs to the
    /// attempt whose report ended the parent (created or adopted by it); a
    /// cancelled parent has no open child, and a child cancelled with its
    /// parent says why.
    #[test]
    fn every_child_of_a_finished_parent_is_adopted_finished_or_cancelled(history in tree_history()) {
        replay_with(tight(), &history, |applied| {
            let after = applied.after;
            for child in after.tasks(None, None, 0, usize::MAX) {
                let Some(parent) = child.parent_id().and_then(|id| after.task(id)) else { continue };
                if !parent.state.is_terminal() {
                    continue;
                }
                if !child.state.is_terminal() {
                    assert_ne!(parent.state, TaskState::Cancelled, "open child {} of a cancelled parent", child.id);
                    assert_eq!(after.owner_fence(parent, child), Some(parent.last_fence), "open child {} of finished {} is its accepted attempt's", child.id, parent.id);
                }
                if child.state == TaskState::Cancelled && child.error().is_some_and(|e| e.starts_with("orphaned")) {
                    assert_ne!(after.owner_fence(parent, child), Some(parent.last_fence).filter(|_| matches!(parent.state, TaskState::Succeeded | TaskState::Failed)));
                }
            }
        });
    }
}
