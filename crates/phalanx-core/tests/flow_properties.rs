//! Property tests of flow control over random histories: a key's
//! `concurrency_max` is never exceeded; its rate is never exceeded over any
//! window of log time; a tree whose budget is exhausted is granted no
//! lease; replay never brings back a task that succeeded; the edge's
//! checks refuse exactly what applying refuses on the new commands; and two
//! replicas, one restored from a snapshot midway, end byte-identical (the
//! round-robin turns, buckets and windows are replicated state).
//! `State::check_invariants` runs after every entry (no pending task in an
//! exhausted tree, key records agreeing with their tasks, pauses with their
//! states). Example-based tests are in `flow.rs`.

use phalanx_core::flow::QueuePolicy;
use phalanx_core::{
    Budget, Command, Error, KeyLimits, Limits, NewTask, OnExhausted, Outcome, Request, Response, State, TaskState,
    Usage,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const QUEUES: [&str; 2] = ["q0", "q1"];
const AGENTS: [&str; 2] = ["a0", "a1"];
/// Keys with fixed limits (set by the first entry), one whose limits the
/// history changes (`k3`), and tasks without a key (`None`).
const KEYS: [&str; 6] = ["k0", "k1", "k2", "tenant:x", "tenant:y", "k3"];

/// The fixed limits: (rule, limits).
fn fixed_limits() -> Vec<(&'static str, KeyLimits)> {
    vec![
        ("k0", KeyLimits { concurrency_max: Some(2), ..KeyLimits::default() }),
        ("k1", KeyLimits { rate_per_second_milli: Some(1_500), burst: Some(2), ..KeyLimits::default() }),
        ("k2", KeyLimits { tokens_per_minute: Some(1_000), ..KeyLimits::default() }),
        (
            "tenant:*",
            KeyLimits {
                concurrency_max: Some(1),
                rate_per_second_milli: Some(3_000),
                burst: Some(1),
                weight: Some(2),
                tokens_per_minute: None,
            },
        ),
    ]
}

/// Queue q1 pauses what used its attempts, with a short backoff of its own.
fn limits() -> Limits {
    let policy = QueuePolicy {
        retry_backoff_ms_base: Some(50),
        retry_backoff_ms_max: Some(400),
        max_attempts: Some(2),
        on_exhausted: OnExhausted::Pause,
    };
    Limits { queues: BTreeMap::from([("q1".to_string(), policy)]), ..Limits::default() }
}

#[derive(Clone, Copy, Debug)]
struct Pick {
    leased: bool,
    n: u16,
}

#[derive(Clone, Debug)]
enum Op {
    Tick,
    Submit { queue: usize, key: Option<usize>, estimate: Option<u64>, budget: Option<u64>, priority: u8, attempts: u32 },
    Delegate { parent: Pick, queue: usize, key: Option<usize>, step: u8 },
    Register { agent: usize, capacity: u32 },
    Expire { agent: usize },
    Lease { agent: usize, queues: u8, tasks_max: u32 },
    Complete { task: Pick, tokens: u64, cost: u64 },
    Fail { task: Pick, retryable: bool, tokens: u64 },
    Pause { task: Pick },
    Resume { task: Pick },
    Replay { state: u8, key: Option<usize>, limit: u32 },
    SetBudget { task: Pick, tokens_max: Option<u64> },
    SetK3 { concurrency_max: Option<u32>, weight: Option<u32>, delete: bool },
}

#[derive(Clone, Debug)]
struct EntrySpec {
    clock_step_ms: i64,
    ops: Vec<Op>,
}

fn pick() -> impl Strategy<Value = Pick> {
    (prop::bool::weighted(0.7), any::<u16>()).prop_map(|(leased, n)| Pick { leased, n })
}

fn key() -> impl Strategy<Value = Option<usize>> {
    prop::option::weighted(0.8, 0..KEYS.len())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Tick),
        5 => (0..QUEUES.len(), key(), prop::option::weighted(0.5, 0..600u64), prop::option::weighted(0.3, 200..3_000u64), 0..3u8, 1..=3u32)
            .prop_map(|(queue, key, estimate, budget, priority, attempts)| Op::Submit { queue, key, estimate, budget, priority, attempts }),
        3 => (pick(), 0..QUEUES.len(), key(), 0..4u8).prop_map(|(parent, queue, key, step)| Op::Delegate { parent, queue, key, step }),
        2 => (0..AGENTS.len(), 1..=4u32).prop_map(|(agent, capacity)| Op::Register { agent, capacity }),
        1 => (0..AGENTS.len()).prop_map(|agent| Op::Expire { agent }),
        6 => (0..AGENTS.len(), 1..4u8, 1..=4u32).prop_map(|(agent, queues, tasks_max)| Op::Lease { agent, queues, tasks_max }),
        4 => (pick(), 0..600u64, 0..4u64).prop_map(|(task, tokens, cost)| Op::Complete { task, tokens, cost }),
        3 => (pick(), prop::bool::weighted(0.8), 0..400u64).prop_map(|(task, retryable, tokens)| Op::Fail { task, retryable, tokens }),
        1 => pick().prop_map(|task| Op::Pause { task }),
        1 => pick().prop_map(|task| Op::Resume { task }),
        1 => (0..3u8, key(), 1..5u32).prop_map(|(state, key, limit)| Op::Replay { state, key, limit }),
        1 => (pick(), prop::option::weighted(0.8, 100..5_000u64)).prop_map(|(task, tokens_max)| Op::SetBudget { task, tokens_max }),
        1 => (prop::option::of(1..3u32), prop::option::of(1..4u32), prop::bool::weighted(0.2))
            .prop_map(|(concurrency_max, weight, delete)| Op::SetK3 { concurrency_max, weight, delete }),
    ]
}

fn history() -> impl Strategy<Value = Vec<EntrySpec>> {
    let entry =
        (prop_oneof![1 => -300..0i64, 10 => 0..1_500i64, 1 => 1_500..30_000i64], prop::collection::vec(op(), 1..=4))
            .prop_map(|(clock_step_ms, ops)| EntrySpec { clock_step_ms, ops });
    prop::collection::vec(entry, 30..90)
}

fn task_id(state: &State, pick: Pick) -> u64 {
    let all = state.tasks(None, None, 0, usize::MAX);
    let leased: Vec<u64> = all.iter().filter(|t| t.state == TaskState::Leased).map(|t| t.id).collect();
    let candidates: Vec<u64> =
        if pick.leased && !leased.is_empty() { leased } else { all.iter().map(|t| t.id).collect() };
    let n = pick.n as usize % (candidates.len() + 1);
    candidates.get(n).copied().unwrap_or(1_000_000)
}

fn fence(state: &State, task_id: u64) -> u64 {
    state.task(task_id).map_or(0, |task| task.last_fence)
}

fn resolve(state: &State, op: &Op) -> Command {
    let key_of = |key: &Option<usize>| key.map(|k| KEYS[k].to_string());
    match op {
        Op::Tick => Command::Tick,
        Op::Submit { queue, key, estimate, budget, priority, attempts } => Command::Submit {
            tasks: vec![NewTask {
                priority: *priority,
                max_attempts: *attempts,
                concurrency_key: key_of(key),
                cost_estimate: *estimate,
                budget: budget.map(|tokens| Budget { tokens_max: Some(tokens), cost_max: Some(20) }),
                ..NewTask::new(QUEUES[*queue], "{}")
            }],
        },
        Op::Delegate { parent, queue, key, step } => {
            let parent_id = task_id(state, *parent);
            Command::Submit {
                tasks: vec![NewTask {
                    parent_id: Some(parent_id),
                    parent_fence: Some(fence(state, parent_id)),
                    concurrency_key: key_of(key),
                    ..NewTask::new(QUEUES[*queue], format!("{{\"step\":{step}}}"))
                }],
            }
        }
        Op::Register { agent, capacity } => Command::RegisterAgent {
            agent_id: AGENTS[*agent].into(),
            capabilities: QUEUES.iter().map(|q| q.to_string()).collect(),
            capacity: *capacity,
            session: String::new(),
        },
        Op::Expire { agent } => Command::ExpireAgent {
            agent_id: AGENTS[*agent].into(),
            epoch: state.agent(AGENTS[*agent]).map_or(1, |agent| agent.epoch),
        },
        Op::Lease { agent, queues, tasks_max } => Command::Lease {
            agent_id: AGENTS[*agent].into(),
            epoch: state.agent(AGENTS[*agent]).map_or(1, |agent| agent.epoch),
            queues: QUEUES
                .iter()
                .enumerate()
                .filter(|(i, _)| queues & (1 << i) != 0)
                .map(|(_, q)| q.to_string())
                .collect(),
            tasks_max: *tasks_max,
            lease_ttl_ms: 3_000,
        },
        Op::Complete { task, tokens, cost } => {
            let task_id = task_id(state, *task);
            let usage = Usage { tokens_in: *tokens / 2, tokens_out: *tokens - *tokens / 2, cost: *cost };
            Command::Complete { task_id, fence: fence(state, task_id), result: "1".into(), usage: Some(usage) }
        }
        Op::Fail { task, retryable, tokens } => {
            let task_id = task_id(state, *task);
            let usage = Usage { tokens_in: *tokens, ..Usage::default() };
            Command::Fail {
                task_id,
                fence: fence(state, task_id),
                error: "\"x\"".into(),
                retryable: *retryable,
                usage: Some(usage),
            }
        }
        Op::Pause { task } => Command::Pause { task_id: task_id(state, *task) },
        Op::Resume { task } => Command::Resume { task_id: task_id(state, *task) },
        Op::Replay { state: which, key, limit } => Command::Replay {
            queue: None,
            state: [TaskState::Dead, TaskState::Paused, TaskState::Succeeded][*which as usize],
            concurrency_key: key_of(key),
            since_ms: None,
            limit: *limit,
        },
        Op::SetBudget { task, tokens_max } => Command::SetBudget {
            task_id: task_id(state, *task),
            budget: tokens_max.map(|tokens| Budget { tokens_max: Some(tokens), cost_max: None }),
        },
        Op::SetK3 { delete: true, .. } => Command::DeleteKeyLimits { key: "k3".into() },
        Op::SetK3 { concurrency_max, weight, .. } => Command::SetKeyLimits {
            key: "k3".into(),
            limits: KeyLimits { concurrency_max: *concurrency_max, weight: *weight, ..KeyLimits::default() },
        },
    }
}

struct Applied<'a> {
    spec: Option<&'a EntrySpec>,
    before: &'a State,
    request: &'a Request,
    response: &'a Response,
    after: &'a State,
}

/// Applies the fixed limits, then the history; checks the invariants after
/// every entry, then `check`.
fn replay(history: &[EntrySpec], mut check: impl FnMut(&Applied)) -> (State, Vec<(u64, Request, Response)>) {
    let mut state = State::new(limits());
    let mut clock_ms: i64 = 1_000_000;
    let mut log = Vec::new();
    let setup: Vec<Command> =
        fixed_limits().into_iter().map(|(key, limits)| Command::SetKeyLimits { key: key.into(), limits }).collect();
    let mut index = 0;
    let mut entries: Vec<(Option<&EntrySpec>, i64)> = vec![(None, 0)];
    entries.extend(history.iter().map(|spec| (Some(spec), spec.clock_step_ms)));
    for (spec, step) in entries {
        clock_ms += step;
        index += 1;
        let commands = match spec {
            None => setup.clone(),
            Some(spec) => spec.ops.iter().map(|op| resolve(&state, op)).collect(),
        };
        let request = Request { now_ms: clock_ms as u64, commands };
        let before = state.clone();
        let response = state.apply(index, &request);
        state.check_invariants();
        check(&Applied { spec, before: &before, request: &request, response: &response, after: &state });
        log.push((index, request, response));
    }
    (state, log)
}

fn grants(response: &Response) -> impl Iterator<Item = &phalanx_core::Grant> {
    response.outcomes.iter().flat_map(|outcome| match outcome {
        Outcome::Leased { grants } => grants.as_slice(),
        _ => &[],
    })
}

fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

proptest! {
    #![proptest_config(config(64))]

    /// A key never holds more leases than its `concurrency_max` (the fixed
    /// ones), each distinct key under a wildcard on its own; and a key whose
    /// limit was lowered below what it holds is granted nothing more.
    #[test]
    fn a_keys_concurrency_max_is_never_exceeded(history in history()) {
        replay(&history, |applied| {
            let held = |state: &State, key: &str| {
                state.tasks(None, Some(TaskState::Leased), 0, usize::MAX)
                    .iter()
                    .filter(|task| task.concurrency_key() == Some(key))
                    .count() as u32
            };
            for (key, max) in [("k0", 2), ("tenant:x", 1), ("tenant:y", 1)] {
                let now = held(applied.after, key);
                assert!(now <= max, "key {key} holds {now} leases, over {max}");
                assert_eq!(applied.after.key_status(key).map_or(0, |status| status.held), now);
            }
            // Judged only across entries that left k3's limit as it was.
            let k3_max = |state: &State| state.limits_of_key("k3").and_then(|(_, limits)| limits.concurrency_max);
            if let Some(max) = k3_max(applied.after).filter(|max| k3_max(applied.before) == Some(*max)) {
                let (before, after) = (held(applied.before, "k3"), held(applied.after, "k3"));
                assert!(after <= max.max(before), "k3 went from {before} to {after} leases under a limit of {max}");
            }
        });
    }

    /// Over any window of log time [t1, t2], a rate-limited key is granted
    /// at most burst + (t2 - t1) × rate.
    #[test]
    fn a_keys_rate_is_never_exceeded_over_any_window(history in history()) {
        let mut granted: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        replay(&history, |applied| {
            for grant in grants(applied.response) {
                if let Some(key) = grant.task.concurrency_key() {
                    if let Some(key) = ["k1", "tenant:x", "tenant:y"].into_iter().find(|k| *k == key) {
                        granted.entry(key).or_default().push(applied.after.now_ms());
                    }
                }
            }
        });
        let limits: BTreeMap<&str, KeyLimits> = fixed_limits().into_iter().collect();
        for (key, times) in &granted {
            let rule = if key.starts_with("tenant:") { "tenant:*" } else { key };
            let (rate, burst) = (limits[rule].rate_per_second_milli.unwrap(), u64::from(limits[rule].burst.unwrap()));
            for i in 0..times.len() {
                for j in i..times.len() {
                    let count = (j - i + 1) as u64;
                    let allowed_millionths = burst * 1_000_000 + (times[j] - times[i]) * rate;
                    prop_assert!(
                        count * 1_000_000 <= allowed_millionths,
                        "key {} granted {} times between {} and {}", key, count, times[i], times[j]
                    );
                }
            }
        }
    }

    /// No lease is granted to a task of a tree whose budget was exhausted
    /// when the entry began (unless the entry raised the budget); and a
    /// task that succeeded stays succeeded (replay never resurrects it).
    #[test]
    fn a_paused_tree_grants_no_lease_and_replay_never_resurrects_a_success(history in history()) {
        let mut succeeded: BTreeSet<u64> = BTreeSet::new();
        replay(&history, |applied| {
            let budget_set = applied.request.commands.iter().any(|c| matches!(c, Command::SetBudget { .. }));
            for grant in grants(applied.response) {
                let Some(root) = applied.before.root_of_task(grant.task.id) else { continue };
                if !budget_set {
                    assert_eq!(applied.before.budget_exhausted(root), None, "task {} of an exhausted tree granted", grant.task.id);
                }
            }
            for id in &succeeded {
                if let Some(task) = applied.after.task(*id) {
                    assert_eq!(task.state, TaskState::Succeeded, "task {id} succeeded, then became {:?}", task.state);
                }
            }
            succeeded.extend(
                applied.after.tasks(None, Some(TaskState::Succeeded), 0, usize::MAX).iter().map(|task| task.id),
            );
            for outcome in &applied.response.outcomes {
                if let Outcome::Replayed { task_ids } = outcome {
                    for id in task_ids {
                        // (It may have died or paused earlier in the same entry.)
                        assert_ne!(applied.before.task(*id).map(|t| t.state), Some(TaskState::Succeeded));
                        assert!(applied.after.task(*id).is_some_and(|t| t.replays() > 0));
                    }
                }
            }
        });
    }

    /// The edge refuses exactly what apply refuses, on a copy after every
    /// entry, with that entry's templates resolved again (flow commands,
    /// usage reports, keyed and budgeted submits).
    #[test]
    fn the_edge_refuses_exactly_what_apply_refuses(history in history()) {
        replay(&history, |applied| {
            let Some(spec) = applied.spec else { return };
            let after = applied.after;
            for op in &spec.ops {
                let command = resolve(after, op);
                let mut copy = after.clone();
                let request = Request { now_ms: after.now_ms(), commands: vec![command.clone()] };
                let outcome = copy.apply(after.last_index() + 1, &request).outcomes.pop().unwrap();
                match (after.check(&command), &outcome) {
                    (Err(error), Outcome::Refused { error: refused }) => {
                        assert_eq!(&error, refused, "{command:?}");
                        let (mut was, mut now) = (serde_json::to_value(after).unwrap(), serde_json::to_value(&copy).unwrap());
                        was.as_object_mut().unwrap().remove("last_index");
                        now.as_object_mut().unwrap().remove("last_index");
                        assert_eq!(was, now, "{command:?} changed the state");
                    }
                    (Err(error), other) => panic!("{command:?}: check refused with {error:?}, apply gave {other:?}"),
                    (Ok(()), Outcome::Refused { error }) => assert!(
                        matches!(error, Error::Superseded { .. } | Error::LoopDetected { .. }),
                        "{command:?}: check let through what apply refused with {error:?}"
                    ),
                    (Ok(()), _) => {}
                }
            }
        });
    }

    /// Two replicas end byte-identical, one restored from a snapshot midway.
    #[test]
    fn replicas_end_byte_identical_even_from_a_snapshot(history in history(), cut in any::<prop::sample::Index>()) {
        let (first, log) = replay(&history, |_| {});
        let cut = cut.index(log.len());
        let mut replica = State::new(limits());
        for (i, (index, request, response)) in log.iter().enumerate() {
            if i == cut {
                let snapshot = serde_json::to_vec(&replica).unwrap();
                let mut restored: State = serde_json::from_slice(&snapshot).unwrap();
                restored.restore();
                prop_assert_eq!(&restored, &replica);
                replica = restored;
            }
            let answered = replica.apply(*index, request);
            prop_assert_eq!(&answered, response);
        }
        prop_assert_eq!(serde_json::to_vec(&first).unwrap(), serde_json::to_vec(&replica).unwrap());
        prop_assert_eq!(first.next_due_ms(), replica.next_due_ms());
    }
}
