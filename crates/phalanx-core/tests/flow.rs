//! Flow control, one rule per test, built only through `State::apply` with
//! public commands: a key's concurrency, rate (a token bucket in log time)
//! and tokens per minute hold tasks pending and say why; wildcards apply
//! per key; fair dispatch by deficit round robin within a priority band,
//! priorities strict above it; usage, tree budgets and the paused state;
//! operator pause and resume; replay; per-queue retry policy; the edge's
//! checks agreeing with apply on the new commands; and entries, tasks and
//! states written before flow control still decoding. Random histories
//! are `flow_properties.rs`'s.

use phalanx_core::command::Submitted;
use phalanx_core::flow::QueuePolicy;
use phalanx_core::{
    Budget, Command, Error, Grant, KeyLimits, Limit, Limits, NewTask, OnExhausted, Outcome, PauseCause, Request, State,
    Task, TaskState, Usage,
};
use std::collections::BTreeMap;

struct Sim {
    state: State,
    index: u64,
    now_ms: u64,
}

impl Sim {
    fn new() -> Sim {
        Sim::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Sim {
        Sim { state: State::new(limits), index: 0, now_ms: 1_000_000 }
    }

    fn one(&mut self, command: Command) -> Outcome {
        self.index += 1;
        let request = Request { now_ms: self.now_ms, commands: vec![command] };
        let mut response = self.state.apply(self.index, &request);
        self.state.check_invariants();
        response.outcomes.pop().unwrap()
    }

    fn entry(&mut self, commands: Vec<Command>) -> Vec<Outcome> {
        self.index += 1;
        let response = self.state.apply(self.index, &Request { now_ms: self.now_ms, commands });
        self.state.check_invariants();
        response.outcomes
    }

    /// `command` must be accepted, and the edge must have let it through.
    fn ok(&mut self, command: Command) -> Outcome {
        assert_eq!(self.state.check(&command), Ok(()), "{command:?} at the edge");
        let outcome = self.one(command);
        assert!(!matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
        outcome
    }

    /// `command` is refused with `expected` by the edge and by apply alike,
    /// changing nothing but the applied index.
    fn refused(&mut self, command: Command, expected: Error) {
        assert_eq!(self.state.check(&command).as_ref(), Err(&expected), "{command:?} at the edge");
        let before = without_last_index(&self.state);
        assert_eq!(self.one(command.clone()), Outcome::Refused { error: expected }, "{command:?}");
        assert_eq!(without_last_index(&self.state), before, "{command:?} changed the state");
    }

    fn submit(&mut self, new: NewTask) -> u64 {
        match self.one(Command::Submit { tasks: vec![new] }) {
            Outcome::Submitted { results } => match &results[0] {
                Ok(Submitted { task_id, .. }) => *task_id,
                Err(error) => panic!("submit refused: {error}"),
            },
            other => panic!("{other:?}"),
        }
    }

    fn register(&mut self, agent_id: &str, queues: &[&str], capacity: u32) -> u64 {
        let command = Command::RegisterAgent {
            agent_id: agent_id.into(),
            capabilities: queues.iter().map(|q| q.to_string()).collect(),
            capacity,
            session: String::new(),
        };
        match self.one(command) {
            Outcome::Registered { epoch } => epoch,
            other => panic!("{other:?}"),
        }
    }

    fn lease(&mut self, agent_id: &str, epoch: u64, queue: &str, tasks_max: u32) -> Vec<Grant> {
        let command = Command::Lease {
            agent_id: agent_id.into(),
            epoch,
            queues: vec![queue.into()],
            tasks_max,
            lease_ttl_ms: 60_000,
        };
        match self.one(command) {
            Outcome::Leased { grants } => grants,
            other => panic!("{other:?}"),
        }
    }

    fn complete(&mut self, grant: &Grant, usage: Option<Usage>) {
        let command =
            Command::Complete { task_id: grant.task.id, fence: grant.fence, result: "\"done\"".into(), usage };
        assert!(matches!(self.ok(command), Outcome::Completed { .. }));
    }

    fn set_limits(&mut self, key: &str, limits: KeyLimits) {
        assert_eq!(self.ok(Command::SetKeyLimits { key: key.into(), limits }), Outcome::KeyLimitsSet);
    }

    fn task(&self, id: u64) -> &Task {
        self.state.task(id).unwrap()
    }
}

fn without_last_index(state: &State) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap();
    value.as_object_mut().unwrap().remove("last_index");
    value
}

fn keyed(queue: &str, key: &str) -> NewTask {
    NewTask { concurrency_key: Some(key.into()), ..NewTask::new(queue, "{}") }
}

fn ids(grants: &[Grant]) -> Vec<u64> {
    grants.iter().map(|grant| grant.task.id).collect()
}

fn keys_of(grants: &[Grant]) -> Vec<String> {
    grants.iter().map(|grant| grant.task.concurrency_key().unwrap_or_default().to_string()).collect()
}

#[test]
fn a_key_at_its_concurrency_max_keeps_its_tasks_pending_and_says_why() {
    let mut sim = Sim::new();
    sim.set_limits("llm", KeyLimits { concurrency_max: Some(2), ..KeyLimits::default() });
    let tasks: Vec<u64> = (0..4).map(|_| sim.submit(keyed("q", "llm"))).collect();
    let other = sim.submit(keyed("q", "browser"));
    let epoch = sim.register("a", &["q"], 10);
    let grants = sim.lease("a", epoch, "q", 10);
    // Key order within the round: browser, then llm, then llm again (browser has no more).
    assert_eq!(ids(&grants), vec![other, tasks[0], tasks[1]], "two of llm, and browser's in its turn");
    let waiting = sim.state.waiting_on(tasks[2]).expect("held back");
    assert_eq!((waiting.key.as_str(), waiting.limit, waiting.rule.as_str()), ("llm", Limit::ConcurrencyMax, "llm"));
    assert_eq!(sim.state.grantable("a", epoch, &["q".into()], 10, 60_000), Ok(0), "a long-poll proposes nothing");
    assert!(!sim.state.dispatch_possible(), "nothing is stalled: the key is at its limit");
    let status = sim.state.key_status("llm").unwrap();
    assert_eq!((status.held, status.open_tasks), (2, 4));
    sim.complete(&grants[1], None);
    assert_eq!(sim.state.waiting_on(tasks[2]), None);
    assert_eq!(ids(&sim.lease("a", epoch, "q", 10)), vec![tasks[2]]);
}

#[test]
fn a_wildcard_applies_to_each_key_it_matches_on_its_own() {
    let mut sim = Sim::new();
    sim.set_limits("tenant:*", KeyLimits { concurrency_max: Some(1), ..KeyLimits::default() });
    sim.set_limits("tenant:big", KeyLimits { concurrency_max: Some(3), ..KeyLimits::default() });
    for key in ["tenant:a", "tenant:a", "tenant:b", "tenant:b", "tenant:big", "tenant:big", "tenant:big", "other"] {
        sim.submit(keyed("q", key));
    }
    sim.submit(keyed("q", "other"));
    let epoch = sim.register("a", &["q"], 100);
    let mut granted: BTreeMap<String, usize> = BTreeMap::new();
    for key in keys_of(&sim.lease("a", epoch, "q", 100)) {
        *granted.entry(key).or_default() += 1;
    }
    let expected = [("other", 2), ("tenant:a", 1), ("tenant:b", 1), ("tenant:big", 3)];
    assert_eq!(granted, expected.iter().map(|(k, n)| (k.to_string(), *n)).collect());
    assert_eq!(sim.state.limits_of_key("tenant:a").map(|(rule, _)| rule), Some("tenant:*"));
    assert_eq!(sim.state.limits_of_key("tenant:big").map(|(rule, _)| rule), Some("tenant:big"));
    assert_eq!(sim.state.limits_of_key("other"), None);
}

#[test]
fn a_rate_is_a_token_bucket_refilled_in_log_time() {
    let mut sim = Sim::new();
    // Two grants per second, a burst of three.
    let limits = KeyLimits { rate_per_second_milli: Some(2_000), burst: Some(3), ..KeyLimits::default() };
    sim.set_limits("api", limits);
    let tasks: Vec<u64> = (0..10).map(|_| sim.submit(keyed("q", "api"))).collect();
    let epoch = sim.register("a", &["q"], 100);
    assert_eq!(sim.state.grantable("a", epoch, &["q".into()], 100, 60_000), Ok(3), "what the bucket holds");
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 3, "the burst");
    let waiting = sim.state.waiting_on(tasks[3]).unwrap();
    assert_eq!(waiting.limit, Limit::RatePerSecond);
    assert_eq!(sim.state.key_status("api").unwrap().rate_tokens_left, Some(0));
    assert_eq!(sim.state.next_due_ms(), Some(sim.now_ms + 500), "the leader ticks when a grant is due");
    sim.now_ms += 499;
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 0, "not before 500 ms");
    sim.now_ms += 1;
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 1);
    sim.now_ms += 2_000;
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 3, "refilled up to the burst, not past it");
    // A leader clock going back does not refill the bucket.
    sim.now_ms -= 5_000;
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 0);
}

#[test]
fn tokens_per_minute_counts_the_window_and_the_estimates_of_leased_work() {
    let mut sim = Sim::new();
    sim.set_limits("llm", KeyLimits { tokens_per_minute: Some(1_000), ..KeyLimits::default() });
    let estimate = |n| NewTask { cost_estimate: Some(n), ..keyed("q", "llm") };
    let first = sim.submit(estimate(400));
    let second = sim.submit(estimate(400));
    let third = sim.submit(estimate(400));
    let epoch = sim.register("a", &["q"], 100);
    let grants = sim.lease("a", epoch, "q", 100);
    assert_eq!(ids(&grants), vec![first, second], "800 estimated; 1200 would pass 1000");
    assert_eq!(sim.state.waiting_on(third).unwrap().limit, Limit::TokensPerMinute);
    // The first reports 700 used: 700 in the window + 400 leased > 1000.
    sim.complete(&grants[0], Some(Usage { tokens_in: 500, tokens_out: 200, cost: 0 }));
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 0);
    assert_eq!(sim.state.key_status("llm").unwrap().tokens_in_window, 700);
    sim.complete(&grants[1], Some(Usage { tokens_in: 100, tokens_out: 0, cost: 0 }));
    assert_eq!(sim.lease("a", epoch, "q", 100).len(), 0, "800 + 400 > 1000");
    // A minute later the window is empty again.
    sim.now_ms += 60_000;
    assert_eq!(ids(&sim.lease("a", epoch, "q", 100)), vec![third]);
    assert_eq!(sim.state.key_status("llm").unwrap().tokens_in_window, 0);
}

#[test]
fn a_task_whose_estimate_alone_passes_the_limit_still_runs_when_the_key_is_idle() {
    let mut sim = Sim::new();
    sim.set_limits("llm", KeyLimits { tokens_per_minute: Some(100), ..KeyLimits::default() });
    let big = sim.submit(NewTask { cost_estimate: Some(500), ..keyed("q", "llm") });
    let epoch = sim.register("a", &["q"], 10);
    assert_eq!(ids(&sim.lease("a", epoch, "q", 10)), vec![big]);
}

/// Jain's fairness index of the shares: 1 when equal, 1/n when one takes all.
fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|share| share * share).sum();
    sum * sum / (shares.len() as f64 * squares)
}

#[test]
fn fair_dispatch_gives_a_key_with_ten_times_the_backlog_a_tenth_of_the_grants() {
    let mut sim = Sim::new();
    // The heavy tenant submits first: first come, first served would give
    // it every grant until its backlog is gone.
    sim.one(Command::Submit { tasks: vec![keyed("q", "tenant:heavy"); 1_000] });
    for light in 0..9 {
        sim.one(Command::Submit { tasks: vec![keyed("q", &format!("tenant:light{light}")); 100] });
    }
    let epoch = sim.register("a", &["q"], 10);
    let mut granted: BTreeMap<String, u32> = BTreeMap::new();
    // While every tenant is backlogged (the light ones hold 100 each).
    for _ in 0..90 {
        let grants = sim.lease("a", epoch, "q", 10);
        let mut completions = Vec::new();
        for grant in &grants {
            *granted.entry(grant.task.concurrency_key().unwrap().to_string()).or_default() += 1;
            completions.push(Command::Complete {
                task_id: grant.task.id,
                fence: grant.fence,
                result: "1".into(),
                usage: None,
            });
        }
        sim.entry(completions);
    }
    assert_eq!(granted.values().sum::<u32>(), 900);
    let shares: Vec<f64> = granted.values().map(|n| f64::from(*n) / 900.0).collect();
    assert_eq!(shares.len(), 10);
    let heavy = f64::from(granted["tenant:heavy"]) / 900.0;
    assert!((heavy - 0.1).abs() < 0.01, "the heavy tenant's share is {heavy}");
    let index = jain(&shares);
    assert!(index >= 0.95, "Jain's index {index}");
}

#[test]
fn a_key_is_granted_in_proportion_to_its_weight() {
    let mut sim = Sim::new();
    sim.set_limits("gold", KeyLimits { weight: Some(3), ..KeyLimits::default() });
    for _ in 0..30 {
        sim.submit(keyed("q", "gold"));
        sim.submit(keyed("q", "silver"));
        sim.submit(NewTask::new("q", "{}"));
    }
    let epoch = sim.register("a", &["q"], 50);
    let keys = keys_of(&sim.lease("a", epoch, "q", 50));
    let count = |key: &str| keys.iter().filter(|k| k.as_str() == key).count();
    // Tasks without a key are one key ("") of weight 1.
    assert_eq!((count("gold"), count("silver"), count("")), (30, 10, 10));
    assert_eq!(&keys[..5], ["", "gold", "gold", "gold", "silver"]);
}

#[test]
fn priorities_stay_strict_above_fairness() {
    let mut sim = Sim::new();
    let low: Vec<u64> = (0..3).map(|_| sim.submit(NewTask { priority: 1, ..keyed("q", "a") })).collect();
    let high: Vec<u64> = (0..3).map(|_| sim.submit(NewTask { priority: 9, ..keyed("q", "b") })).collect();
    let epoch = sim.register("w", &["q"], 10);
    let grants = ids(&sim.lease("w", epoch, "q", 10));
    assert_eq!(grants, [high.clone(), low.clone()].concat());
    // A band whose keys are all held back lets the next band go.
    let mut sim = Sim::new();
    sim.set_limits("b", KeyLimits { concurrency_max: Some(1), ..KeyLimits::default() });
    let high: Vec<u64> = (0..2).map(|_| sim.submit(NewTask { priority: 9, ..keyed("q", "b") })).collect();
    let low = sim.submit(NewTask { priority: 1, ..keyed("q", "a") });
    let epoch = sim.register("w", &["q"], 10);
    assert_eq!(ids(&sim.lease("w", epoch, "q", 10)), vec![high[0], low]);
}

fn budgeted_root(sim: &mut Sim, budget: Budget) -> (u64, u64, Grant) {
    let root = sim.submit(NewTask { budget: Some(budget), ..NewTask::new("plan", "{}") });
    let epoch = sim.register("planner", &["plan", "step"], 10);
    let grant = sim.lease("planner", epoch, "plan", 1).pop().unwrap();
    (root, epoch, grant)
}

fn child(root: u64, fence: u64, step: u32) -> NewTask {
    NewTask { parent_id: Some(root), parent_fence: Some(fence), ..NewTask::new("step", format!("{{\"step\":{step}}}")) }
}

#[test]
fn a_tree_that_reaches_its_budget_is_paused_and_its_held_leases_run_to_their_end() {
    let mut sim = Sim::new();
    let (root, epoch, root_grant) = budgeted_root(&mut sim, Budget { tokens_max: Some(1_000), cost_max: None });
    let children: Vec<u64> = (0..3).map(|step| sim.submit(child(root, root_grant.fence, step))).collect();
    let running = sim.lease("planner", epoch, "step", 1).pop().unwrap();
    assert_eq!(running.task.id, children[0]);
    sim.complete(&running, Some(Usage { tokens_in: 600, tokens_out: 400, cost: 3 }));
    assert_eq!(sim.state.tree_usage(root), Usage { tokens_in: 600, tokens_out: 400, cost: 3 });
    for id in &children[1..] {
        let task = sim.task(*id);
        assert_eq!(task.state, TaskState::Paused, "not dead-lettered");
        let pause = task.pause().unwrap();
        assert_eq!(pause.cause, PauseCause::Budget);
        assert!(pause.reason.contains("1000 tokens used of tokens_max 1000"), "{}", pause.reason);
    }
    assert_eq!(sim.task(root).state, TaskState::Leased, "the root's lease runs on");
    assert!(sim.lease("planner", epoch, "step", 10).is_empty(), "a paused tree grants no lease");
    // A new delegation into the tree comes paused.
    let late = sim.submit(child(root, root_grant.fence, 9));
    assert_eq!(sim.task(late).state, TaskState::Paused);
    // Resume is refused while the budget is still exhausted.
    let reason = sim.task(late).pause().unwrap().reason.clone();
    sim.refused(Command::Resume { task_id: late }, Error::BudgetExhausted { task_id: late, root_id: root, reason });
    // Raising the budget resumes the tree's budget-paused tasks.
    let raised = Budget { tokens_max: Some(5_000), cost_max: None };
    let Outcome::BudgetSet { resumed } = sim.ok(Command::SetBudget { task_id: root, budget: Some(raised) }) else {
        panic!()
    };
    assert_eq!(resumed, vec![children[1], children[2], late]);
    assert_eq!(sim.lease("planner", epoch, "step", 10).len(), 3);
    // Lowering it below what is spent pauses again what is pending.
    sim.ok(Command::SetBudget { task_id: root, budget: Some(Budget { tokens_max: None, cost_max: Some(3) }) });
    assert_eq!(sim.task(root).state, TaskState::Leased);
}

#[test]
fn a_task_that_comes_back_to_pending_in_an_exhausted_tree_is_paused() {
    let mut sim = Sim::new();
    let (root, epoch, root_grant) = budgeted_root(&mut sim, Budget { tokens_max: None, cost_max: Some(10) });
    let a = sim.submit(child(root, root_grant.fence, 0));
    let b = sim.submit(child(root, root_grant.fence, 1));
    let grants = sim.lease("planner", epoch, "step", 2);
    sim.complete(&grants[0], Some(Usage { cost: 10, ..Usage::default() }));
    let retry =
        Command::Fail { task_id: b, fence: grants[1].fence, error: "\"429\"".into(), retryable: true, usage: None };
    sim.ok(retry);
    assert_eq!(sim.task(a).state, TaskState::Succeeded);
    assert_eq!(sim.task(b).state, TaskState::Paused);
}

#[test]
fn an_operator_pauses_and_resumes_a_task() {
    let mut sim = Sim::new();
    let id = sim.submit(NewTask::new("q", "{}"));
    let leased = sim.submit(NewTask::new("q", "{}"));
    sim.ok(Command::Pause { task_id: id });
    assert_eq!(sim.task(id).state, TaskState::Paused);
    assert_eq!(sim.task(id).pause().unwrap().cause, PauseCause::Operator);
    let epoch = sim.register("a", &["q"], 10);
    let grant = sim.lease("a", epoch, "q", 10).pop().unwrap();
    assert_eq!(grant.task.id, leased, "a paused task is not granted");
    // Pausing a leased task lets its lease run; it is paused if it comes back.
    sim.ok(Command::Pause { task_id: leased });
    assert_eq!(sim.task(leased).state, TaskState::Leased);
    let retry =
        Command::Fail { task_id: leased, fence: grant.fence, error: "\"x\"".into(), retryable: true, usage: None };
    sim.ok(retry);
    assert_eq!(sim.task(leased).state, TaskState::Paused);
    sim.ok(Command::Resume { task_id: id });
    assert_eq!(sim.task(id).state, TaskState::Pending);
    assert_eq!(ids(&sim.lease("a", epoch, "q", 10)), vec![id]);
    sim.refused(Command::Resume { task_id: id }, Error::NotPaused { task_id: id, state: TaskState::Leased });
    sim.refused(Command::Pause { task_id: 99 }, Error::TaskNotFound { task_id: 99 });
}

#[test]
fn a_queue_policy_pauses_tasks_that_used_their_attempts_and_sets_their_backoff() {
    let policy = QueuePolicy {
        retry_backoff_ms_base: Some(5_000),
        retry_backoff_ms_max: Some(5_000),
        max_attempts: Some(2),
        on_exhausted: OnExhausted::Pause,
    };
    let limits = Limits { queues: BTreeMap::from([("q".to_string(), policy)]), ..Limits::default() };
    let mut sim = Sim::with_limits(limits);
    let id = sim.submit(NewTask { max_attempts: 5, ..NewTask::new("q", "{}") });
    let epoch = sim.register("a", &["q"], 1);
    let fail = |grant: &Grant| Command::Fail {
        task_id: grant.task.id,
        fence: grant.fence,
        error: "\"flaky\"".into(),
        retryable: true,
        usage: None,
    };
    let first = sim.lease("a", epoch, "q", 1).pop().unwrap();
    sim.ok(fail(&first));
    assert_eq!(sim.task(id).not_before_ms, sim.now_ms + 5_000, "the queue's backoff");
    sim.now_ms += 5_000;
    let second = sim.lease("a", epoch, "q", 1).pop().unwrap();
    sim.ok(fail(&second));
    let task = sim.task(id);
    assert_eq!(task.state, TaskState::Paused, "capped at the queue's 2 attempts, paused not dead");
    assert_eq!(task.pause().unwrap().cause, PauseCause::AttemptsExhausted);
    // Resuming counts the attempts anew.
    sim.ok(Command::Resume { task_id: id });
    assert_eq!((sim.task(id).state, sim.task(id).attempts), (TaskState::Pending, 0));
    // A lapsed last lease is paused too.
    let third = sim.lease("a", epoch, "q", 1).pop().unwrap();
    sim.ok(fail(&third));
    sim.now_ms += 5_000;
    sim.lease("a", epoch, "q", 1);
    sim.now_ms += 60_001;
    sim.one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Paused);
}

#[test]
fn replay_moves_dead_and_paused_tasks_back_keeping_their_trail_and_never_a_succeeded_one() {
    let mut sim = Sim::new();
    let dead = sim.submit(NewTask { max_attempts: 1, ..keyed("q", "k") });
    let done = sim.submit(NewTask::new("q", "{}"));
    let paused = sim.submit(NewTask::new("q", "{}"));
    let epoch = sim.register("a", &["q"], 10);
    let grants = sim.lease("a", epoch, "q", 3);
    let grant_of = |id: u64| grants.iter().find(|grant| grant.task.id == id).unwrap();
    let first_fence = grants[0].fence;
    let fail = |id: u64| Command::Fail {
        task_id: id,
        fence: grant_of(id).fence,
        error: "\"boom\"".into(),
        retryable: true,
        usage: None,
    };
    sim.ok(fail(dead));
    sim.complete(grant_of(done), None);
    sim.ok(Command::Pause { task_id: paused });
    let retry = fail(paused);
    sim.ok(retry);
    assert_eq!(sim.task(dead).state, TaskState::Dead);
    assert_eq!(sim.task(paused).state, TaskState::Paused);
    let trail = sim.task(dead).trail().into_owned();
    // Only dead or paused tasks: a succeeded one is never replayed.
    let replay = |state| Command::Replay { queue: None, state, concurrency_key: None, since_ms: None, limit: 10 };
    sim.refused(
        replay(TaskState::Succeeded),
        Error::Invalid { field: "state".into(), reason: "replay takes dead or paused tasks".into() },
    );
    let filtered = Command::Replay {
        queue: Some("q".into()),
        state: TaskState::Dead,
        concurrency_key: Some("k".into()),
        since_ms: Some(sim.now_ms),
        limit: 10,
    };
    assert_eq!(sim.ok(filtered), Outcome::Replayed { task_ids: vec![dead] });
    let task = sim.task(dead);
    assert_eq!((task.state, task.attempts, task.replays(), &*task.trail()), (TaskState::Pending, 0, 1, &*trail));
    assert_eq!(task.dead_reason(), None);
    assert_eq!(sim.ok(replay(TaskState::Paused)), Outcome::Replayed { task_ids: vec![paused] });
    let regrants = sim.lease("a", epoch, "q", 10);
    // Tasks without a key come first in the round's key order.
    assert_eq!(ids(&regrants), vec![paused, dead]);
    assert!(regrants[1].fence > first_fence, "a fresh fence");
    assert_eq!(sim.task(done).state, TaskState::Succeeded);
    assert_eq!(sim.ok(replay(TaskState::Dead)), Outcome::Replayed { task_ids: vec![] });
}

#[test]
fn the_edge_refuses_bad_flow_commands_as_apply_does() {
    let mut sim = Sim::with_limits(Limits { limit_keys_max: 1, ..Limits::default() });
    sim.set_limits("a", KeyLimits::default());
    sim.refused(
        Command::SetKeyLimits { key: "b".into(), limits: KeyLimits::default() },
        Error::LimitReached { limit: "limit_keys_max".into(), max: 1 },
    );
    sim.refused(
        Command::SetKeyLimits { key: "a".into(), limits: KeyLimits { burst: Some(3), ..KeyLimits::default() } },
        Error::Invalid {
            field: "burst".into(),
            reason: "is the size of a rate's bucket: set rate_per_second too".into(),
        },
    );
    sim.refused(
        Command::SetKeyLimits { key: "a*b".into(), limits: KeyLimits::default() },
        Error::Invalid { field: "key".into(), reason: "character '*' is not allowed (use A-Z a-z 0-9 . _ - :)".into() },
    );
    sim.refused(Command::DeleteKeyLimits { key: "b".into() }, Error::LimitsNotFound { key: "b".into() });
    assert_eq!(sim.ok(Command::DeleteKeyLimits { key: "a".into() }), Outcome::KeyLimitsDeleted);
    sim.set_limits("*", KeyLimits { concurrency_max: Some(1), ..KeyLimits::default() });
    let id = sim.submit(NewTask::new("q", "{}"));
    let epoch = sim.register("w", &["q"], 1);
    let grant = sim.lease("w", epoch, "q", 1).pop().unwrap();
    let too_much = Usage { tokens_in: u64::MAX, ..Usage::default() };
    sim.refused(
        Command::Complete { task_id: id, fence: grant.fence, result: "1".into(), usage: Some(too_much) },
        Error::Invalid { field: "usage.tokens_in".into(), reason: format!("{} is over 1000000000000", u64::MAX) },
    );
    let child = NewTask {
        parent_id: Some(id),
        parent_fence: Some(grant.fence),
        budget: Some(Budget::default()),
        ..NewTask::new("q", "{}")
    };
    let refusal = Error::Invalid {
        field: "budget".into(),
        reason: "only a root carries a budget: it covers the whole delegation tree".into(),
    };
    assert_eq!(sim.state.check_new_task(&child), Err(refusal));
    sim.refused(
        Command::SetBudget { task_id: id, budget: Some(Budget { tokens_max: Some(0), cost_max: None }) },
        Error::Invalid { field: "budget.tokens_max".into(), reason: "0 must be 1..=1000000000000".into() },
    );
}

#[test]
fn a_queue_policy_is_validated_with_the_policy() {
    let with =
        |policy: QueuePolicy| Limits { queues: BTreeMap::from([("q".to_string(), policy)]), ..Limits::default() };
    let invalid = with(QueuePolicy { max_attempts: Some(0), ..QueuePolicy::default() }).validate().unwrap_err();
    assert_eq!(invalid.field, "queues");
    let invalid = with(QueuePolicy { retry_backoff_ms_base: Some(120_000), ..QueuePolicy::default() }).validate();
    assert!(invalid.unwrap_err().reason.contains("must not exceed retry_backoff_ms_max 60000"));
    with(QueuePolicy {
        retry_backoff_ms_base: Some(120_000),
        retry_backoff_ms_max: Some(120_000),
        ..QueuePolicy::default()
    })
    .validate()
    .unwrap();
    let too_many = Limits {
        queue_policies_max: 1,
        queues: (0..2).map(|n| (format!("q{n}"), QueuePolicy::default())).collect(),
        ..Limits::default()
    };
    assert!(too_many.validate().unwrap_err().reason.contains("over queue_policies_max"));
    // A policy without queues reads and writes as before.
    let json = serde_json::to_value(Limits::default()).unwrap();
    assert!(json.get("queues").is_none());
}

#[test]
fn entries_tasks_and_states_written_before_flow_control_still_decode() {
    // A completion and a task as written before usage, keys and budgets.
    let complete: Command = serde_json::from_str(r#"{"type":"complete","task_id":1,"fence":2,"result":"1"}"#).unwrap();
    assert_eq!(complete, Command::Complete { task_id: 1, fence: 2, result: "1".into(), usage: None });
    let new: NewTask = serde_json::from_str(
        r#"{"queue":"q","payload":"{}","priority":5,"deadline_ms":null,"max_attempts":3,"idempotency_key":null,"parent_id":null,"conversation_id":null}"#,
    )
    .unwrap();
    assert_eq!(new, NewTask::new("q", "{}"));
    // A whole state, with a task, less every field flow control added.
    let mut sim = Sim::new();
    let id = sim.submit(NewTask::new("q", "{}"));
    let epoch = sim.register("a", &["q"], 1);
    sim.lease("a", epoch, "q", 1);
    let mut old = serde_json::to_value(&sim.state).unwrap();
    let object = old.as_object_mut().unwrap();
    for field in ["key_limits", "key_usage", "drr"] {
        object.remove(field).unwrap();
    }
    for field in ["paused", "resumed", "replayed"] {
        object["counters"].as_object_mut().unwrap().remove(field).unwrap();
    }
    let task = object["tasks"][id.to_string()].as_object_mut().unwrap();
    for field in ["concurrency_key", "cost_estimate", "budget", "usage", "pause", "replays"] {
        task.remove(field).unwrap();
    }
    for policy in object["policy_history"].as_array_mut().unwrap() {
        let policy = policy["policy"].as_object_mut().unwrap();
        policy.remove("limit_keys_max").unwrap();
        policy.remove("queue_policies_max").unwrap();
    }
    object["limits"].as_object_mut().unwrap().remove("limit_keys_max").unwrap();
    let mut restored: State = serde_json::from_value(old).unwrap();
    restored.restore();
    restored.check_invariants();
    assert_eq!(restored, sim.state);
}
