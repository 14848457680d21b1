//! Example-based scenarios of the state machine, one feature per test, each
//! built only through `State::apply` with public commands: leases and
//! results, fencing, retries and dead letters, deadlines, priorities,
//! idempotency, limits, delegation, agent sessions, context compare-and-set,
//! and the validation of new tasks. Every refusal is checked to change
//! nothing, and refused alike by the edge's check before proposing.
//! Delegation trees too: adoption by a new attempt, orphans cancelled,
//! fenced delegation and context, retention of whole trees. Random
//! histories are `properties.rs`'s job, not this file's.

use phalanx_core::command::Submitted;
use phalanx_core::{Command, Error, Grant, Limits, NewTask, Outcome, Request, State, Task, TaskState, Writer};
use serde_json::Value;
use std::collections::BTreeSet;

/// A replica driven one entry at a time: log indexes increase by one, log
/// time only moves when a test says so.
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
        Sim { state: State::new(limits), index: 0, now_ms: 1_000 }
    }

    /// Moves the leader's clock (possibly backwards: log time must not follow).
    fn at(&mut self, now_ms: u64) -> &mut Sim {
        self.now_ms = now_ms;
        self
    }

    fn entry(&mut self, commands: Vec<Command>) -> Vec<Outcome> {
        self.index += 1;
        let request = Request { now_ms: self.now_ms, commands };
        let response = self.state.apply(self.index, &request);
        self.state.check_invariants();
        assert_eq!(response.outcomes.len(), request.commands.len());
        response.outcomes
    }

    fn one(&mut self, command: Command) -> Outcome {
        self.entry(vec![command]).pop().unwrap()
    }

    fn submit(&mut self, new: NewTask) -> u64 {
        match self.submit_result(new) {
            Ok(Submitted { task_id, .. }) => task_id,
            Err(error) => panic!("submit refused: {error}"),
        }
    }

    fn submit_result(&mut self, new: NewTask) -> Result<Submitted, Error> {
        match self.one(Command::Submit { tasks: vec![new] }) {
            Outcome::Submitted { mut results } => results.pop().unwrap(),
            other => panic!("expected Submitted, got {other:?}"),
        }
    }

    fn register(&mut self, agent_id: &str, queues: &[&str], capacity: u32) -> u64 {
        let capabilities = queues.iter().map(|q| q.to_string()).collect();
        match self.one(Command::RegisterAgent {
            agent_id: agent_id.into(),
            capabilities,
            capacity,
            session: String::new(),
        }) {
            Outcome::Registered { epoch } => epoch,
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    fn lease(&mut self, agent_id: &str, epoch: u64, queues: &[&str], tasks_max: u32, lease_ttl_ms: u64) -> Vec<Grant> {
        match self.one(lease(agent_id, epoch, queues, tasks_max, lease_ttl_ms)) {
            Outcome::Leased { grants } => {
                for grant in &grants {
                    assert_eq!(grant.fence, self.index, "the fence is the granting entry's index");
                }
                grants
            }
            other => panic!("expected Leased, got {other:?}"),
        }
    }

    fn leased_ids(&mut self, agent_id: &str, epoch: u64, queues: &[&str], tasks_max: u32) -> Vec<u64> {
        self.lease(agent_id, epoch, queues, tasks_max, 1_000).iter().map(|g| g.task.id).collect()
    }

    fn task(&self, id: u64) -> &Task {
        self.state.task(id).unwrap_or_else(|| panic!("task {id} not found"))
    }

    /// Lets log time reach the clock first, so that a comparison around a
    /// refusal sees only what the refused command did.
    fn catch_up(&mut self) {
        if self.state.now_ms() < self.now_ms {
            self.one(Command::Tick);
        }
    }

    /// Applies a command that must be refused with `expected`, and checks that
    /// the state is unchanged apart from `last_index` and the listed JSON
    /// paths (e.g. `counters.superseded`).
    fn check_refused(&mut self, command: Command, expected: Error, changed: &[&str]) {
        self.catch_up();
        check_at_the_edge(self.state.check(&command), &expected);
        let before = comparable(&self.state, changed);
        match self.one(command) {
            Outcome::Refused { error } => assert_eq!(error, expected),
            other => panic!("expected Refused {{ {expected:?} }}, got {other:?}"),
        }
        assert_eq!(before, comparable(&self.state, changed), "a refusal changed the state");
    }

    /// Submits a task that must be refused with `expected`; the state must not change.
    fn check_submit_refused(&mut self, new: NewTask, expected: Error) {
        self.catch_up();
        // A stale parent fence records nothing: only a loop is left to the log.
        match &expected {
            Error::LoopDetected { .. } => assert_eq!(self.state.check_new_task(&new), Ok(())),
            _ => assert_eq!(self.state.check_new_task(&new).as_ref(), Err(&expected), "refused at the edge"),
        }
        let before = comparable(&self.state, &[]);
        assert_eq!(self.submit_result(new), Err(expected));
        assert_eq!(before, comparable(&self.state, &[]), "a refused submit changed the state");
    }
}

/// What the edge's check (`State::check`) must say
/// of a command that applying refuses with `expected`: the same refusal, so
/// that it costs no log entry, unless applying records it (a stale fence is
/// counted, a delegation loop dead-letters its parent).
fn check_at_the_edge(checked: Result<(), Error>, expected: &Error) {
    match expected {
        Error::Superseded { .. } | Error::LoopDetected { .. } => assert_eq!(checked, Ok(()), "left to the log"),
        _ => assert_eq!(checked.as_ref(), Err(expected), "refused at the edge as when applied"),
    }
}

/// The state as JSON without `last_index` and the given dotted paths.
fn comparable(state: &State, ignored: &[&str]) -> Value {
    let mut value = serde_json::to_value(state).unwrap();
    for path in std::iter::once(&"last_index").chain(ignored) {
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().unwrap();
        let mut at = &mut value;
        for part in parts {
            at = &mut at[part];
        }
        if let Some(object) = at.as_object_mut() {
            object.remove(last);
        }
    }
    value
}

fn new_task(queue: &str) -> NewTask {
    NewTask::new(queue, "{}")
}

fn lease(agent_id: &str, epoch: u64, queues: &[&str], tasks_max: u32, lease_ttl_ms: u64) -> Command {
    Command::Lease {
        agent_id: agent_id.into(),
        epoch,
        queues: queues.iter().map(|q| q.to_string()).collect(),
        tasks_max,
        lease_ttl_ms,
    }
}

fn complete(task_id: u64, fence: u64, result: &str) -> Command {
    Command::Complete { task_id, fence, result: result.into(), usage: None }
}

fn fail(task_id: u64, fence: u64, retryable: bool) -> Command {
    Command::Fail { task_id, fence, error: "boom".into(), retryable, usage: None }
}

fn superseded(task_id: u64, fence: u64, current: u64) -> Error {
    Error::Superseded { task_id, fence, current }
}

fn check_stale_refused(sim: &mut Sim, command: Command, expected: Error) {
    let Error::Superseded { task_id, .. } = expected else { panic!("not a superseded error") };
    let counted_before = sim.state.counters().superseded;
    let task_before = sim.state.task(task_id).map(|t| t.superseded_count());
    let task_counter = format!("tasks.{task_id}.superseded_count");
    sim.check_refused(command, expected, &["counters.superseded", &task_counter]);
    assert_eq!(sim.state.counters().superseded, counted_before + 1);
    assert_eq!(sim.state.task(task_id).map(|t| t.superseded_count()), task_before.map(|n| n + 1));
}

// ---- leases and results ----

#[test]
fn lease_then_complete() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 2);
    let grants = sim.lease("a", epoch, &["q"], 5, 1_000);
    assert_eq!(grants.len(), 1);
    let fence = grants[0].fence;
    assert_eq!(grants[0].valid_until_ms, sim.state.now_ms() + 1_000);
    assert_eq!(sim.task(id).state, TaskState::Leased);
    assert_eq!(sim.task(id).attempts, 1);
    assert!(sim.state.agent("a").unwrap().leased_task_ids.contains(&id));

    let Outcome::Completed { task } = sim.one(complete(id, fence, "\"done\"")) else { panic!() };
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.result(), Some("\"done\""));
    assert!(task.lease.is_none());
    assert!(sim.state.agent("a").unwrap().leased_task_ids.is_empty());
    assert_eq!(sim.state.counters().succeeded, 1);

    // The same result again under the same fence (a retried request) is answered as before.
    let before = comparable(&sim.state, &[]);
    assert_eq!(sim.one(complete(id, fence, "\"done\"")), Outcome::Completed { task: task.clone() });
    assert_eq!(before, comparable(&sim.state, &[]));
    // A different result under the same fence is refused: the task is finished.
    sim.check_refused(
        complete(id, fence, "\"other\""),
        Error::AlreadyTerminal { task_id: id, state: TaskState::Succeeded },
        &[],
    );
}

#[test]
fn an_old_fence_is_superseded_once_another_agent_took_the_task() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch_a = sim.register("a", &["q"], 1);
    let epoch_b = sim.register("b", &["q"], 1);
    let old = sim.lease("a", epoch_a, &["q"], 1, 500)[0].fence;
    // a's lease lapses (valid_until is inclusive) and b takes the task.
    sim.at(1_500);
    assert!(sim.lease("b", epoch_b, &["q"], 1, 500).is_empty(), "still a's at valid_until");
    sim.at(1_501);
    let new = sim.lease("b", epoch_b, &["q"], 1, 500)[0].fence;
    assert!(new > old);
    assert_eq!(sim.task(id).lease.as_ref().unwrap().agent_id, "b");
    assert_eq!(sim.task(id).attempts, 2);

    // a's late result while b holds the lease: superseded, b's lease untouched.
    check_stale_refused(&mut sim, complete(id, old, "\"a\""), superseded(id, old, new));
    check_stale_refused(&mut sim, fail(id, old, true), superseded(id, old, new));
    let extend = Command::Extend { task_id: id, fence: old, lease_ttl_ms: 500 };
    check_stale_refused(&mut sim, extend, superseded(id, old, new));
    check_stale_refused(&mut sim, Command::Progress { task_id: id, fence: old }, superseded(id, old, new));

    // b's result is accepted; a's again afterwards changes nothing.
    assert!(matches!(sim.one(complete(id, new, "\"b\"")), Outcome::Completed { .. }));
    check_stale_refused(&mut sim, complete(id, old, "\"a\""), superseded(id, old, new));
    assert_eq!(sim.task(id).result(), Some("\"b\""));
    assert_eq!(sim.task(id).state, TaskState::Succeeded);
    assert_eq!(sim.task(id).superseded_count(), 5);
    // Neither a fence never granted nor zero is current.
    check_stale_refused(&mut sim, complete(id, new + 1, "\"x\""), superseded(id, new + 1, new));
    let fresh = sim.submit(new_task("q"));
    check_stale_refused(&mut sim, complete(fresh, 0, "\"x\""), superseded(fresh, 0, 0));
}

#[test]
fn a_late_result_with_the_current_fence_is_accepted_until_someone_else_takes_the_task() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 500)[0].fence;
    sim.at(5_000);
    sim.one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Pending, "the lease expired");
    assert!(sim.task(id).lease.is_none());
    assert_eq!(sim.state.counters().leases_expired, 1);
    // Extending a lapsed lease is refused; the result itself still counts.
    sim.check_refused(
        Command::Extend { task_id: id, fence, lease_ttl_ms: 500 },
        Error::LeaseExpired { task_id: id },
        &[],
    );
    assert!(matches!(sim.one(complete(id, fence, "\"late\"")), Outcome::Completed { .. }));
    assert_eq!(sim.task(id).state, TaskState::Succeeded);
    assert_eq!(sim.task(id).result(), Some("\"late\""));
    assert!(sim.lease("a", epoch, &["q"], 1, 500).is_empty(), "nothing left to lease");
}

#[test]
fn extend_moves_the_lease_end_and_never_shortens_it() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    sim.at(1_800);
    let extended = sim.one(Command::Extend { task_id: id, fence, lease_ttl_ms: 1_000 });
    assert_eq!(extended, Outcome::Extended { valid_until_ms: 2_800 });
    let shorter = sim.one(Command::Extend { task_id: id, fence, lease_ttl_ms: 100 });
    assert_eq!(shorter, Outcome::Extended { valid_until_ms: 2_800 });
    sim.at(2_500);
    sim.one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Leased, "extended past the first lease end");
    sim.check_refused(
        Command::Extend { task_id: id, fence, lease_ttl_ms: 1 },
        Error::Invalid { field: "lease_ttl_ms".into(), reason: "must be 100..=86400000".into() },
        &[],
    );
}

// ---- retries, dead letters, deadlines ----

#[test]
fn a_retryable_failure_goes_back_to_pending_after_a_backoff() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    let Outcome::Failed { task } = sim.one(fail(id, fence, true)) else { panic!() };
    let base = Limits::default().retry_backoff_ms_base;
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(task.error(), Some("boom"));
    assert_eq!(task.not_before_ms, 1_000 + base);
    assert!(sim.state.agent("a").unwrap().leased_task_ids.is_empty());
    assert_eq!(sim.state.next_due_ms(), Some(1_000 + base));

    sim.at(1_000 + base - 1);
    assert!(sim.lease("a", epoch, &["q"], 1, 1_000).is_empty(), "not leasable before not_before_ms");
    sim.at(1_000 + base);
    let second = sim.lease("a", epoch, &["q"], 1, 1_000);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].task.attempts, 2);
    // The second failure waits twice as long.
    sim.one(fail(id, second[0].fence, true));
    assert_eq!(sim.task(id).not_before_ms, 1_000 + base + 2 * base);
}

#[test]
fn exhausted_attempts_dead_letter_the_task() {
    let mut sim = Sim::new();
    let id = sim.submit(NewTask { max_attempts: 2, ..new_task("q") });
    let epoch = sim.register("a", &["q"], 1);
    let first = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    sim.one(fail(id, first, true));
    sim.at(10_000);
    let second = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    let Outcome::Failed { task } = sim.one(fail(id, second, true)) else { panic!() };
    assert_eq!(task.state, TaskState::Dead);
    assert_eq!(task.dead_reason(), Some("attempts_exhausted: 2 attempts"));
    assert_eq!(sim.state.counters().dead, 1);

    // A lease that lapses on the last attempt dead-letters the task too.
    let id = sim.submit(NewTask { max_attempts: 1, ..new_task("q") });
    sim.lease("a", epoch, &["q"], 1, 1_000);
    sim.at(20_000);
    sim.one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Dead);
    assert_eq!(sim.task(id).dead_reason(), Some("attempts_exhausted: lease expired on attempt 1"));

    // A non-retryable failure is final at once, whatever attempts remain.
    let id = sim.submit(new_task("q"));
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    let Outcome::Failed { task } = sim.one(fail(id, fence, false)) else { panic!() };
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.dead_reason(), None);
}

#[test]
fn a_passed_deadline_dead_letters_the_task_as_expired() {
    let mut sim = Sim::new();
    let held = sim.submit(NewTask { deadline_ms: Some(500), ..new_task("q") });
    let queued = sim.submit(NewTask { deadline_ms: Some(500), ..new_task("q") });
    let relaxed = sim.submit(NewTask { deadline_ms: Some(5_000), ..new_task("q") });
    assert_eq!(sim.task(held).deadline_ms, Some(1_500));
    let epoch = sim.register("a", &["q"], 1);
    let grants = sim.lease("a", epoch, &["q"], 1, 10_000);
    assert_eq!(grants[0].task.id, held, "same priority: oldest first");
    sim.at(1_500);
    sim.one(Command::Tick);
    assert_eq!(sim.task(held).state, TaskState::Leased, "a deadline is inclusive");
    sim.at(1_501);
    sim.one(Command::Tick);
    for id in [held, queued] {
        assert_eq!(sim.task(id).state, TaskState::Dead);
        assert_eq!(sim.task(id).dead_reason(), Some("expired"));
    }
    assert_eq!(sim.task(relaxed).state, TaskState::Pending);
    assert!(sim.state.agent("a").unwrap().leased_task_ids.is_empty(), "the expired task's lease is released");
    // The agent's late result is refused: the task is finished.
    sim.check_refused(
        complete(held, grants[0].fence, "\"late\""),
        Error::AlreadyTerminal { task_id: held, state: TaskState::Dead },
        &[],
    );
}

#[test]
fn log_time_never_goes_back() {
    let mut sim = Sim::new();
    sim.at(5_000).one(Command::Tick);
    sim.at(2_000);
    let id = sim.submit(NewTask { deadline_ms: Some(100), ..new_task("q") });
    assert_eq!(sim.state.now_ms(), 5_000);
    assert_eq!(sim.task(id).created_ms, 5_000);
    assert_eq!(sim.task(id).deadline_ms, Some(5_100));
    sim.at(5_100).one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Pending);
    sim.at(5_101).one(Command::Tick);
    assert_eq!(sim.task(id).state, TaskState::Dead);
}

// ---- ordering, deduplication, limits ----

/// Submits tasks of the given (queue, priority) in order, then leases one at
/// a time from `queues`: the tasks must come out in `expected` order
/// (indexes into `tasks`).
fn check_lease_order(tasks: &[(&str, u8)], queues: &[&str], expected: &[usize]) {
    let mut sim = Sim::new();
    let ids: Vec<u64> =
        tasks.iter().map(|(queue, priority)| sim.submit(NewTask { priority: *priority, ..new_task(queue) })).collect();
    let epoch = sim.register("a", queues, 100);
    let mut order = Vec::new();
    loop {
        let got = sim.leased_ids("a", epoch, queues, 1);
        if got.is_empty() {
            break;
        }
        order.extend(got);
    }
    let expected: Vec<u64> = expected.iter().map(|&i| ids[i]).collect();
    assert_eq!(order, expected);
}

#[test]
fn higher_priority_first_then_oldest() {
    check_lease_order(&[("q", 1), ("q", 9), ("q", 5), ("q", 9), ("q", 0)], &["q"], &[1, 3, 2, 0, 4]);
    check_lease_order(&[("x", 3), ("y", 3), ("x", 7), ("y", 8)], &["x", "y"], &[3, 2, 0, 1]);
    check_lease_order(&[("x", 9), ("y", 3)], &["y"], &[1]);
    // One lease entry takes several tasks in the same order.
    let mut sim = Sim::new();
    let low = sim.submit(NewTask { priority: 0, ..new_task("q") });
    let high = sim.submit(NewTask { priority: 9, ..new_task("q") });
    let epoch = sim.register("a", &["q"], 5);
    assert_eq!(sim.leased_ids("a", epoch, &["q"], 5), vec![high, low]);
}

#[test]
fn an_idempotency_key_deduplicates_the_same_request_and_refuses_another() {
    let mut sim = Sim::new();
    let keyed =
        |payload: &str| NewTask { idempotency_key: Some("order-42".into()), payload: payload.into(), ..new_task("q") };
    let first = sim.submit_result(keyed("{\"n\":1}")).unwrap();
    assert!(!first.deduplicated);
    let again = sim.submit_result(keyed("{\"n\":1}")).unwrap();
    assert_eq!(again, Submitted { task_id: first.task_id, deduplicated: true, adopted: false });
    assert_eq!(sim.state.task_count(), 1);
    assert_eq!(sim.state.counters().deduplicated, 1);
    // The key names one request: another payload or queue under it is a
    // conflict, never the first request's answer.
    let conflict = |field: &str| Error::IdempotencyConflict {
        key: "order-42".into(),
        task_id: first.task_id,
        field: field.into(),
    };
    sim.check_submit_refused(keyed("{\"n\":2}"), conflict("payload"));
    sim.check_submit_refused(NewTask { queue: "other".into(), ..keyed("{\"n\":1}") }, conflict("queue"));
    // Within one batch too, and after the task finished.
    let Outcome::Submitted { results } =
        sim.one(Command::Submit { tasks: vec![keyed("{\"n\":1}"), keyed("{\"n\":1}")] })
    else {
        panic!()
    };
    assert!(results.iter().all(|r| r.as_ref().unwrap().task_id == first.task_id));
    sim.one(Command::Cancel { task_id: first.task_id });
    assert_eq!(sim.submit_result(keyed("{\"n\":1}")).unwrap(), again);
    assert_eq!(sim.state.task_count(), 1);
}

#[test]
fn a_full_queue_refuses_new_tasks() {
    let mut sim = Sim::with_limits(Limits { queue_tasks_max: 2, ..Limits::default() });
    let first = sim.submit(new_task("q"));
    sim.submit(new_task("q"));
    sim.check_submit_refused(new_task("q"), Error::QueueFull { queue: "q".into(), max: 2 });
    sim.submit(new_task("other"));
    // Finished tasks do not count: room again.
    sim.one(Command::Cancel { task_id: first });
    sim.submit(new_task("q"));
    sim.check_submit_refused(new_task("q"), Error::QueueFull { queue: "q".into(), max: 2 });
    // A batch over batch_tasks_max is refused as a whole.
    let mut sim = Sim::with_limits(Limits { batch_tasks_max: 2, ..Limits::default() });
    sim.check_refused(
        Command::Submit { tasks: vec![new_task("q"), new_task("q"), new_task("q")] },
        Error::LimitReached { limit: "batch_tasks_max".into(), max: 2 },
        &[],
    );
}

#[test]
fn an_agent_holds_at_most_its_capacity() {
    let mut sim = Sim::new();
    for _ in 0..5 {
        sim.submit(new_task("q"));
    }
    let epoch = sim.register("a", &["q"], 2);
    assert_eq!(sim.leased_ids("a", epoch, &["q"], 10).len(), 2);
    assert!(sim.leased_ids("a", epoch, &["q"], 10).is_empty());
    sim.check_refused(
        lease("a", epoch, &["other"], 1, 1_000),
        Error::NotCapable { agent_id: "a".into(), queue: "other".into() },
        &[],
    );
    sim.check_refused(lease("b", 1, &["q"], 1, 1_000), Error::AgentNotFound { agent_id: "b".into() }, &[]);
}

// ---- delegation ----

#[test]
fn delegation_counts_hops_and_stops_past_the_limit() {
    let mut sim = Sim::with_limits(Limits { delegation_hops_max: 2, ..Limits::default() });
    let epoch = sim.register("a", &["q0", "q1", "q2", "q3"], 10);
    let root = sim.submit(new_task("q0"));
    let mut parent = root;
    let mut fence = sim.lease("a", epoch, &["q0"], 1, 10_000)[0].fence;
    for hop in 1..=2u32 {
        let queue = format!("q{hop}");
        let child = sim.submit(NewTask { parent_id: Some(parent), parent_fence: Some(fence), ..new_task(&queue) });
        let record = sim.task(child);
        assert_eq!(record.hop_count(), hop);
        assert_eq!(record.parent_id(), Some(parent));
        assert_eq!(record.trail().len() as u32, hop + 1);
        assert_eq!(record.trail().last().unwrap().agent_id.as_deref(), Some("a"));
        parent = child;
        fence = sim.lease("a", epoch, &[&queue], 1, 10_000)[0].fence;
    }
    // A delegation under a stale parent fence is refused and changes nothing.
    let stale = NewTask { parent_id: Some(parent), parent_fence: Some(fence - 1), ..new_task("q3") };
    sim.check_submit_refused(stale, superseded(parent, fence - 1, fence));
    // The third hop passes delegation_hops_max: refused, and the parent is dead-lettered.
    let too_deep = NewTask { parent_id: Some(parent), parent_fence: Some(fence), ..new_task("q3") };
    let Err(Error::LoopDetected { task_id, trail }) = sim.submit_result(too_deep) else { panic!() };
    assert_eq!(task_id, parent);
    assert_eq!(trail, "q0 -> q1 -> q2 -> q3 passes delegation_hops_max 2");
    assert_eq!(sim.task(parent).state, TaskState::Dead);
    assert!(sim.task(parent).dead_reason().unwrap().starts_with("loop_detected: q0 -> q1 -> q2 -> q3"));
    assert_eq!(sim.task(root).state, TaskState::Leased, "only the delegating task is dead-lettered");
}

#[test]
fn delegating_the_same_step_again_is_a_loop() {
    let mut sim = Sim::new();
    let epoch = sim.register("a", &["q0", "q1"], 10);
    let root = sim.submit(new_task("q0"));
    let fence = sim.lease("a", epoch, &["q0"], 1, 10_000)[0].fence;
    let child = sim.submit(NewTask { parent_id: Some(root), parent_fence: Some(fence), ..new_task("q1") });
    let child_fence = sim.lease("a", epoch, &["q1"], 1, 10_000)[0].fence;
    let back = NewTask { parent_id: Some(child), parent_fence: Some(child_fence), ..new_task("q0") };
    let Err(Error::LoopDetected { trail, .. }) = sim.submit_result(back) else { panic!() };
    assert_eq!(trail, "q0 -> q1 -> q0 repeats a step already on its trail");
    assert_eq!(sim.task(child).state, TaskState::Dead);
}

// ---- delegation trees: a planner replaced ----

/// A delegation of `queue`/`payload` from `parent` under `fence`.
fn child_of(parent: u64, fence: u64, queue: &str, payload: &str) -> NewTask {
    NewTask { parent_id: Some(parent), parent_fence: Some(fence), ..NewTask::new(queue, payload) }
}

/// A planner's root leased with a short lease, three steps delegated; the
/// lease then lapses. Returns (sim, epoch, root, first fence, children).
fn planner_replaced() -> (Sim, u64, u64, u64, Vec<u64>) {
    let mut sim = Sim::new();
    let epoch = sim.register("a", &["plan", "step"], 10);
    let root = sim.submit(NewTask { conversation_id: Some("c".into()), ..new_task("plan") });
    let first = sim.lease("a", epoch, &["plan"], 1, 1_000)[0].fence;
    let children: Vec<u64> =
        (0..3).map(|i| sim.submit(child_of(root, first, "step", &format!("{{\"i\":{i}}}")))).collect();
    sim.at(3_000).one(Command::Tick);
    assert_eq!(sim.task(root).state, TaskState::Pending, "the first planner's lease lapsed");
    (sim, epoch, root, first, children)
}

#[test]
fn a_new_attempt_is_handed_the_children_and_adopts_the_same_steps() {
    let (mut sim, epoch, root, first, children) = planner_replaced();
    let grant = sim.lease("a", epoch, &["plan"], 1, 10_000).pop().unwrap();
    let listed: Vec<(u64, Option<u64>, Option<u64>)> =
        grant.children.iter().map(|c| (c.task_id, c.parent_fence, c.adopted_fence)).collect();
    assert_eq!(listed, children.iter().map(|id| (*id, Some(first), None)).collect::<Vec<_>>());
    assert_eq!(grant.children[0].payload_hash, phalanx_core::payload_hash("{\"i\":0}"));
    // The same step again, with a new key: the existing child, adopted.
    let keyed =
        NewTask { idempotency_key: Some("second-0".into()), ..child_of(root, grant.fence, "step", "{\"i\":0}") };
    let answer = sim.submit_result(keyed.clone()).unwrap();
    assert_eq!(answer, Submitted { task_id: children[0], deduplicated: true, adopted: true });
    // Retried, the request finds the same child through its key; it is no
    // second adoption, and the same step once more is a new child.
    assert_eq!(
        sim.submit_result(keyed).unwrap(),
        Submitted { task_id: children[0], deduplicated: true, adopted: false }
    );
    let twice = sim.submit_result(child_of(root, grant.fence, "step", "{\"i\":0}")).unwrap();
    assert!(!twice.deduplicated && twice.task_id > children[2], "a second identical step of one attempt is its own");
    // A step the earlier attempt delegated under its own key: adopted through the key.
    let adopted_by_key = sim.submit_result(child_of(root, grant.fence, "step", "{\"i\":1}")).unwrap();
    assert_eq!(adopted_by_key, Submitted { task_id: children[1], deduplicated: true, adopted: true });
    assert_eq!(sim.state.counters().adopted, 2);
    let listed = sim.state.children_of(root);
    assert_eq!(listed[0].adopted_fence, Some(grant.fence));
    assert_eq!(listed[2].adopted_fence, None);
    // The root ends: the child nobody adopted is cancelled, the others go on.
    sim.one(complete(root, grant.fence, "\"done\""));
    assert_eq!(sim.task(children[2]).state, TaskState::Cancelled);
    assert!(sim.task(children[2]).error().unwrap().starts_with("orphaned: parent"));
    assert_eq!(sim.task(children[0]).state, TaskState::Pending);
    assert_eq!(sim.task(twice.task_id).state, TaskState::Pending);
    assert_eq!(sim.state.counters().orphans_cancelled, 1);
}

#[test]
fn a_failed_or_dead_child_is_not_adopted_by_the_same_step() {
    let (mut sim, epoch, root, _, children) = planner_replaced();
    let child_fence = sim.lease("a", epoch, &["step"], 1, 10_000)[0].fence;
    sim.one(fail(children[0], child_fence, false));
    let fence = sim.lease("a", epoch, &["plan"], 1, 10_000)[0].fence;
    let again = sim.submit_result(child_of(root, fence, "step", "{\"i\":0}")).unwrap();
    assert!(!again.deduplicated, "the step is done again, not handed back failed");
}

#[test]
fn cancelling_a_task_cancels_its_tree_and_a_hand_off_outlives_its_parent() {
    let mut sim = Sim::new();
    let epoch = sim.register("a", &["q0", "q1", "q2"], 10);
    let root = sim.submit(new_task("q0"));
    let fence = sim.lease("a", epoch, &["q0"], 1, 10_000)[0].fence;
    let child = sim.submit(child_of(root, fence, "q1", "{}"));
    let child_fence = sim.lease("a", epoch, &["q1"], 1, 10_000)[0].fence;
    let grandchild = sim.submit(child_of(child, child_fence, "q2", "{}"));
    sim.one(Command::Cancel { task_id: root });
    assert_eq!(sim.task(child).state, TaskState::Cancelled);
    assert_eq!(sim.task(grandchild).state, TaskState::Cancelled);
    // A task that hands work off and succeeds: the child is its accepted attempt's.
    let root = sim.submit(new_task("q0"));
    let fence = sim.lease("a", epoch, &["q0"], 1, 10_000)[0].fence;
    let hand_off = sim.submit(child_of(root, fence, "q1", "{}"));
    sim.one(complete(root, fence, "\"handed off\""));
    assert_eq!(sim.task(hand_off).state, TaskState::Pending);
}

#[test]
fn a_delegation_is_fenced_before_anything_else() {
    let mut sim = Sim::new();
    let epoch = sim.register("a", &["q0", "q1"], 10);
    let root = sim.submit(new_task("q0"));
    let fence = sim.lease("a", epoch, &["q0"], 1, 1_000)[0].fence;
    // Without a fence, even a step that would loop changes nothing: the
    // parent is not dead-lettered on the word of a request without its lease.
    let unfenced = NewTask { parent_id: Some(root), ..new_task("q0") };
    sim.check_submit_refused(
        unfenced,
        invalid("parent_fence", "required with parent_id: the fence of the parent's lease"),
    );
    sim.check_submit_refused(child_of(root, fence + 1, "q0", "{}"), superseded(root, fence + 1, fence));
    assert_eq!(sim.task(root).state, TaskState::Leased);
    // The lease lapses: the fence is still the newest, but the lease is not held.
    sim.at(5_000);
    sim.check_submit_refused(child_of(root, fence, "q1", "{}"), Error::LeaseExpired { task_id: root });
    let fence = sim.lease("a", epoch, &["q0"], 1, 10_000)[0].fence;
    sim.one(complete(root, fence, "\"r\""));
    sim.check_submit_refused(
        child_of(root, fence, "q1", "{}"),
        Error::AlreadyTerminal { task_id: root, state: TaskState::Succeeded },
    );
}

#[test]
fn an_idempotency_key_is_checked_after_the_fence_and_against_the_request() {
    let mut sim = Sim::new();
    let epoch = sim.register("a", &["q0", "q1"], 10);
    let first = sim.submit(new_task("q0"));
    let second = sim.submit(new_task("q0"));
    let grants = sim.lease("a", epoch, &["q0"], 2, 10_000);
    let fence = grants[0].fence;
    let keyed = |parent| NewTask { idempotency_key: Some("k".into()), ..child_of(parent, fence, "q1", "{}") };
    let child = sim.submit_result(keyed(first)).unwrap().task_id;
    sim.check_submit_refused(
        keyed(second),
        Error::IdempotencyConflict { key: "k".into(), task_id: child, field: "parent_id".into() },
    );
    sim.check_submit_refused(
        NewTask { parent_fence: Some(fence - 1), ..keyed(first) },
        superseded(first, fence - 1, fence),
    );
    sim.check_submit_refused(
        NewTask { parent_id: None, parent_fence: None, ..keyed(first) },
        Error::IdempotencyConflict { key: "k".into(), task_id: child, field: "parent_id".into() },
    );
}

#[test]
fn context_writes_are_fenced_and_a_superseded_attempts_entries_are_discarded() {
    let (mut sim, epoch, root, first, _) = planner_replaced();
    let put_as = |fence: u64, key: &str, expected_version: Option<u64>| Command::ContextPut {
        conversation_id: "c".into(),
        key: key.into(),
        value: "\"v\"".into(),
        expected_version,
        writer: Some(Writer { task_id: root, fence }),
    };
    // The lapsed lease writes nothing, even though its fence is still the newest.
    sim.check_refused(put_as(first, "draft", Some(0)), Error::LeaseExpired { task_id: root }, &[]);
    let second = sim.lease("a", epoch, &["plan"], 1, 1_000)[0].fence;
    assert_eq!(sim.one(put_as(second, "draft", Some(0))), Outcome::ContextWritten { version: 1 });
    assert_eq!(sim.one(put("note", "\"client\"", None)), Outcome::ContextWritten { version: 1 });
    sim.at(6_000);
    // A third attempt: the second's entry is discarded, the client's stays,
    // and the accepted attempt can write "only if absent" again.
    let third = sim.lease("a", epoch, &["plan"], 1, 10_000)[0].fence;
    let context = sim.state.conversation("c").unwrap();
    assert_eq!(context.entries.keys().collect::<Vec<_>>(), vec!["note"]);
    assert_eq!(sim.state.counters().context_entries_discarded, 1);
    // A stale fence on a context write is refused at the edge: nothing is recorded of it.
    let stale = put_as(second, "draft", None);
    assert_eq!(sim.state.check(&stale), Err(superseded(root, second, third)));
    let before = comparable(&sim.state, &[]);
    assert_eq!(sim.one(stale), Outcome::Refused { error: superseded(root, second, third) });
    assert_eq!(before, comparable(&sim.state, &[]));
    assert_eq!(sim.one(put_as(third, "draft", Some(0))), Outcome::ContextWritten { version: 1 });
    assert_eq!(sim.state.conversation("c").unwrap().writers["draft"], Writer { task_id: root, fence: third });
    // Only to its own conversation.
    let elsewhere = Command::ContextPut {
        conversation_id: "other".into(),
        key: "x".into(),
        value: "1".into(),
        expected_version: None,
        writer: Some(Writer { task_id: root, fence: third }),
    };
    sim.check_refused(
        elsewhere,
        invalid("conversation_id", &format!("task {root} writes on its own behalf only to its own conversation (c)")),
        &[],
    );
    sim.one(complete(root, third, "\"r\""));
    assert!(sim.state.conversation("c").unwrap().entries.contains_key("draft"), "the accepted attempt's entry stays");
}

#[test]
fn a_task_has_at_most_children_per_task_max_children_and_a_lease_lists_them() {
    let mut sim = Sim::with_limits(Limits { children_per_task_max: 2, ..Limits::default() });
    let epoch = sim.register("a", &["plan", "step"], 10);
    let root = sim.submit(new_task("plan"));
    let fence = sim.lease("a", epoch, &["plan"], 1, 10_000)[0].fence;
    for i in 0..2 {
        sim.submit(child_of(root, fence, "step", &format!("{{\"i\":{i}}}")));
    }
    sim.check_submit_refused(
        child_of(root, fence, "step", "{\"i\":2}"),
        Error::LimitReached { limit: "children_per_task_max".into(), max: 2 },
    );
    assert_eq!(sim.state.children_of(root).len(), 2);
}

#[test]
fn a_succeeded_task_carries_no_earlier_error() {
    let mut sim = Sim::with_limits(Limits { retry_backoff_ms_base: 1, ..Limits::default() });
    let epoch = sim.register("a", &["q"], 1);
    let id = sim.submit(new_task("q"));
    let fence = sim.lease("a", epoch, &["q"], 1, 10_000)[0].fence;
    sim.one(fail(id, fence, true));
    assert!(sim.task(id).error().is_some());
    sim.at(2_000);
    let fence = sim.lease("a", epoch, &["q"], 1, 10_000)[0].fence;
    sim.one(complete(id, fence, "\"r\""));
    assert_eq!(sim.task(id).error(), None);
}

#[test]
fn retention_keeps_trees_whole_and_takes_a_finished_tree_as_one() {
    let mut sim = Sim::with_limits(Limits { finished_tasks_max: 1, ..Limits::default() });
    let epoch = sim.register("a", &["plan", "step", "other"], 10);
    let root = sim.submit(new_task("plan"));
    let fence = sim.lease("a", epoch, &["plan"], 1, 10_000)[0].fence;
    let child = sim.submit(child_of(root, fence, "step", "{}"));
    // The root fails by its holder's report: its child is that attempt's, and goes on.
    sim.one(fail(root, fence, false));
    for _ in 0..3 {
        let id = sim.submit(new_task("other"));
        let fence = sim.lease("a", epoch, &["other"], 1, 10_000)[0].fence;
        sim.one(complete(id, fence, "\"r\""));
    }
    assert_eq!(sim.task(root).state, TaskState::Failed, "kept while its child is at work");
    assert_eq!(sim.task(child).state, TaskState::Pending);
    let fence = sim.lease("a", epoch, &["step"], 1, 10_000)[0].fence;
    sim.one(complete(child, fence, "\"r\""));
    let id = sim.submit(new_task("other"));
    let fence = sim.lease("a", epoch, &["other"], 1, 10_000)[0].fence;
    sim.one(complete(id, fence, "\"r\""));
    assert!(sim.state.task(root).is_none() && sim.state.task(child).is_none(), "the tree left as one");
}

// ---- agent sessions ----

#[test]
fn re_registering_voids_the_old_sessions_leases() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let old = sim.register("a", &["q"], 1);
    sim.lease("a", old, &["q"], 1, 10_000);
    let new = sim.register("a", &["q"], 1);
    assert_eq!(new, old + 1);
    assert_eq!(sim.task(id).state, TaskState::Pending, "the old session's lease is void");
    assert_eq!(sim.task(id).attempts, 1, "the attempt stays counted");
    let stale_epoch = Error::StaleEpoch { agent_id: "a".into(), epoch: old, current: new };
    sim.check_refused(lease("a", old, &["q"], 1, 1_000), stale_epoch.clone(), &[]);
    sim.check_refused(Command::ExpireAgent { agent_id: "a".into(), epoch: old }, stale_epoch.clone(), &[]);
    sim.check_refused(Command::DeregisterAgent { agent_id: "a".into(), epoch: old }, stale_epoch, &[]);
    let grants = sim.lease("a", new, &["q"], 1, 1_000);
    assert_eq!(grants[0].task.id, id);
    assert_eq!(grants[0].task.attempts, 2);
}

#[test]
fn an_expired_or_deregistered_agent_releases_its_leases() {
    let mut sim = Sim::new();
    let first = sim.submit(new_task("q"));
    let second = sim.submit(new_task("q"));
    let epoch_a = sim.register("a", &["q"], 1);
    let epoch_b = sim.register("b", &["q"], 1);
    sim.lease("a", epoch_a, &["q"], 1, 10_000);
    sim.lease("b", epoch_b, &["q"], 1, 10_000);
    assert_eq!(sim.one(Command::ExpireAgent { agent_id: "a".into(), epoch: epoch_a }), Outcome::Expired);
    assert!(sim.state.agent("a").is_none());
    assert_eq!(sim.task(first).state, TaskState::Pending);
    assert_eq!(sim.one(Command::DeregisterAgent { agent_id: "b".into(), epoch: epoch_b }), Outcome::Deregistered);
    assert_eq!(sim.task(second).state, TaskState::Pending);
    // Epochs are never reused, even after the agent left.
    assert_eq!(sim.register("a", &["q"], 1), epoch_a + 1);
}

/// Regression: one entry (the leader batches commands of many clients) that
/// leases a task, voids that lease and leases again used to grant the task
/// twice with the same fence, tripping the "fences must increase" assertion
/// on every replica. A task is granted at most once per entry.
#[test]
fn a_task_is_granted_at_most_once_per_entry() {
    for void in ["expire", "deregister", "register"] {
        let mut sim = Sim::new();
        let id = sim.submit(new_task("q"));
        let epoch_a = sim.register("a", &["q"], 1);
        let epoch_b = sim.register("b", &["q"], 1);
        let voiding = match void {
            "expire" => Command::ExpireAgent { agent_id: "a".into(), epoch: epoch_a },
            "deregister" => Command::DeregisterAgent { agent_id: "a".into(), epoch: epoch_a },
            _ => Command::RegisterAgent {
                agent_id: "a".into(),
                capabilities: BTreeSet::from(["q".into()]),
                capacity: 1,
                session: String::new(),
            },
        };
        let outcomes =
            sim.entry(vec![lease("a", epoch_a, &["q"], 1, 1_000), voiding, lease("b", epoch_b, &["q"], 1, 1_000)]);
        let Outcome::Leased { grants } = &outcomes[0] else { panic!("{outcomes:?}") };
        assert_eq!(grants.len(), 1);
        let fence = grants[0].fence;
        assert_eq!(outcomes[2], Outcome::Leased { grants: Vec::new() }, "{void}: granted twice in one entry");
        assert_eq!(sim.task(id).state, TaskState::Pending);
        // The next entry grants it under a new fence; the voided one is superseded.
        let again = sim.lease("b", epoch_b, &["q"], 1, 1_000);
        assert_eq!(again[0].task.id, id);
        assert!(again[0].fence > fence);
        check_stale_refused(&mut sim, complete(id, fence, "\"a\""), superseded(id, fence, again[0].fence));
    }
}

// ---- conversation context ----

fn put(key: &str, value: &str, expected_version: Option<u64>) -> Command {
    Command::ContextPut {
        conversation_id: "c".into(),
        key: key.into(),
        value: value.into(),
        expected_version,
        writer: None,
    }
}

#[test]
fn context_compare_and_set() {
    let mut sim = Sim::new();
    assert_eq!(sim.one(put("k", "1", Some(0))), Outcome::ContextWritten { version: 1 });
    sim.check_refused(put("k", "2", Some(0)), Error::VersionConflict { key: "k".into(), expected: 0, current: 1 }, &[]);
    sim.check_refused(put("k", "2", Some(7)), Error::VersionConflict { key: "k".into(), expected: 7, current: 1 }, &[]);
    sim.check_refused(put("x", "2", Some(1)), Error::VersionConflict { key: "x".into(), expected: 1, current: 0 }, &[]);
    assert_eq!(sim.one(put("k", "2", Some(1))), Outcome::ContextWritten { version: 2 });
    assert_eq!(sim.one(put("k", "3", None)), Outcome::ContextWritten { version: 3 });
    let conversation = sim.state.conversation("c").unwrap();
    assert_eq!(conversation.entries["k"], (3, "3".to_string()));
    assert_eq!(conversation.bytes, 2);
    // Over the context size: refused, nothing written.
    let mut sim = Sim::with_limits(Limits { conversation_bytes_max: 10, ..Limits::default() });
    sim.one(put("k", "12345", None));
    sim.check_refused(
        put("j", "1234", None),
        Error::TooLarge { field: "conversation context".into(), bytes: 10 + 1, max: 10 },
        &[],
    );
    assert_eq!(sim.one(put("k", "1234567", None)), Outcome::ContextWritten { version: 2 });
}

// ---- validation ----

/// A new task edited by `edit` must be refused with `expected` and change nothing.
fn check_invalid_task(edit: impl FnOnce(&mut NewTask), expected: Error) {
    let mut sim = Sim::with_limits(Limits { payload_bytes_max: 16, queue_name_bytes_max: 8, ..Limits::default() });
    sim.submit(new_task("q"));
    let mut new = new_task("q");
    edit(&mut new);
    sim.check_submit_refused(new, expected);
}

fn invalid(field: &str, reason: &str) -> Error {
    Error::Invalid { field: field.into(), reason: reason.into() }
}

#[test]
fn invalid_new_tasks_are_refused() {
    let bad_char = |c: char| invalid("queue", &format!("character {c:?} is not allowed (use A-Z a-z 0-9 . _ - :)"));
    check_invalid_task(|t| t.queue = String::new(), invalid("queue", "must not be empty"));
    check_invalid_task(|t| t.queue = "123456789".into(), Error::TooLarge { field: "queue".into(), bytes: 9, max: 8 });
    check_invalid_task(|t| t.queue = "a b".into(), bad_char(' '));
    check_invalid_task(|t| t.queue = "a/b".into(), bad_char('/'));
    check_invalid_task(|t| t.queue = "é".into(), bad_char('é'));
    check_invalid_task(|t| t.payload = "x".repeat(17), Error::TooLarge { field: "payload".into(), bytes: 17, max: 16 });
    check_invalid_task(|t| t.priority = 10, invalid("priority", "must be 0..=9"));
    check_invalid_task(|t| t.max_attempts = 0, invalid("max_attempts", "must be 1..=100"));
    check_invalid_task(|t| t.max_attempts = 101, invalid("max_attempts", "must be 1..=100"));
    check_invalid_task(|t| t.deadline_ms = Some(0), invalid("deadline_ms", "must be positive"));
    check_invalid_task(
        |t| t.idempotency_key = Some("no spaces".into()),
        invalid("idempotency_key", "character ' ' is not allowed (use A-Z a-z 0-9 . _ - :)"),
    );
    check_invalid_task(
        |t| t.parent_id = Some(99),
        invalid("parent_fence", "required with parent_id: the fence of the parent's lease"),
    );
    check_invalid_task(|t| t.parent_fence = Some(1), invalid("parent_fence", "only with parent_id"));
    check_invalid_task(
        |t| {
            t.parent_id = Some(99);
            t.parent_fence = Some(1)
        },
        Error::TaskNotFound { task_id: 99 },
    );
    // At the limits exactly, accepted.
    let mut sim = Sim::with_limits(Limits { payload_bytes_max: 16, queue_name_bytes_max: 8, ..Limits::default() });
    sim.submit(NewTask { payload: "x".repeat(16), priority: 9, max_attempts: 100, ..new_task("A-z.0_9:") });
}

#[test]
fn every_refused_command_changes_nothing() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    sim.check_refused(Command::Cancel { task_id: 77 }, Error::TaskNotFound { task_id: 77 }, &[]);
    sim.check_refused(complete(77, fence, "\"r\""), Error::TaskNotFound { task_id: 77 }, &[]);
    sim.check_refused(lease("a", epoch, &["q"], 1, 99), invalid("lease_ttl_ms", "must be 100..=86400000"), &[]);
    sim.check_refused(lease("a", epoch, &[], 1, 1_000), invalid("queues", "must name at least one queue"), &[]);
    sim.check_refused(
        complete(id, fence, &"x".repeat(Limits::default().result_bytes_max + 1)),
        Error::TooLarge { field: "result".into(), bytes: 256 * 1024 + 1, max: 256 * 1024 },
        &[],
    );
    sim.check_refused(
        Command::RegisterAgent {
            agent_id: "b".into(),
            capabilities: BTreeSet::new(),
            capacity: 1,
            session: String::new(),
        },
        invalid("capabilities", "must name at least one queue"),
        &[],
    );
    sim.check_refused(
        Command::RegisterAgent {
            agent_id: "a".into(),
            capabilities: BTreeSet::from(["q".into()]),
            capacity: 0,
            session: String::new(),
        },
        invalid("capacity", "must be 1..=1000"),
        &[],
    );
    assert_eq!(sim.task(id).state, TaskState::Leased, "a refused re-registration voids nothing");
    sim.one(Command::Cancel { task_id: id });
    sim.check_refused(
        Command::Cancel { task_id: id },
        Error::AlreadyTerminal { task_id: id, state: TaskState::Cancelled },
        &[],
    );
    sim.check_refused(fail(id, fence, true), Error::AlreadyTerminal { task_id: id, state: TaskState::Cancelled }, &[]);
}

// ---- robustness at the edges of the ranges ----

/// Regression: with several tasks finishing at the same log time, retention
/// (`finished_tasks_max`) could compact the very task being completed before
/// its outcome was read, crashing the replica.
#[test]
fn retention_never_drops_the_task_being_finished() {
    let mut sim = Sim::with_limits(Limits { finished_tasks_max: 1, ..Limits::default() });
    let low = sim.submit(new_task("q"));
    let high = sim.submit(new_task("q"));
    let outcomes = sim.entry(vec![Command::Cancel { task_id: high }, Command::Cancel { task_id: low }]);
    let Outcome::Cancelled { task } = &outcomes[1] else { panic!("{outcomes:?}") };
    assert_eq!(task.id, low);
    assert_eq!(sim.state.task_count(), 1, "retention keeps one finished task");
    assert_eq!(sim.state.counters().compacted, 1);
}

/// Regression: a far deadline (or a policy ttl of u64::MAX) overflowed
/// `next_due_ms`, which panics in debug and, wrapped to 0, makes the leader
/// tick without pause in release.
#[test]
fn next_due_ms_survives_far_times() {
    let mut sim = Sim::new();
    sim.submit(NewTask { deadline_ms: Some(u64::MAX), ..new_task("q") });
    let due = sim.state.next_due_ms();
    assert!(due.is_none_or(|due| due > sim.state.now_ms()), "{due:?}");
    let mut sim = Sim::with_limits(Limits { finished_task_ttl_ms: u64::MAX, ..Limits::default() });
    let id = sim.submit(new_task("q"));
    sim.one(Command::Cancel { task_id: id });
    let due = sim.state.next_due_ms();
    assert!(due.is_none_or(|due| due > sim.state.now_ms()), "{due:?}");
}

#[test]
fn next_due_ms_covers_every_timer() {
    let mut sim = Sim::new();
    assert_eq!(sim.state.next_due_ms(), None);
    let epoch = sim.register("a", &["q"], 2);
    let waiter = sim.submit(new_task("q"));
    let awaited = sim.submit(new_task("q"));
    let grants = sim.lease("a", epoch, &["q"], 2, 50_000);
    assert_eq!(sim.state.next_due_ms(), Some(1_000 + 50_001));
    let fence = grants[0].fence;
    let wait = Command::Wait { task_id: waiter, fence, on: vec![awaited], timeout_ms: 500 };
    assert_eq!(sim.one(wait), Outcome::Waiting { pending: vec![awaited] });
    assert_eq!(sim.state.next_due_ms(), Some(1_501), "a wait's timeout is due too");
    sim.at(1_501).one(Command::Tick);
    assert!(sim.state.wait_of(waiter).is_none());
    assert_eq!(sim.task(waiter).error(), Some("wait_timeout: the awaited tasks did not finish in time"));
}

#[test]
fn a_retried_failure_is_answered_as_before_and_changes_nothing() {
    let mut sim = Sim::new();
    let id = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    let Outcome::Failed { task: first } = sim.one(fail(id, fence, true)) else { panic!() };
    assert_eq!(first.state, TaskState::Pending);

    // The answer was lost and the agent sends the same failure again, later:
    // same answer, no second backoff, no second entry in the delay queue.
    sim.at(1_050);
    sim.catch_up();
    let before = comparable(&sim.state, &[]);
    let Outcome::Failed { task: again } = sim.one(fail(id, fence, true)) else { panic!() };
    assert_eq!(again, first);
    assert_eq!(before, comparable(&sim.state, &[]), "a retried failure changed the state");

    // The same for a final failure.
    let id = sim.submit(new_task("r"));
    let epoch = sim.register("b", &["r"], 1);
    let fence = sim.lease("b", epoch, &["r"], 1, 1_000)[0].fence;
    let Outcome::Failed { task: first } = sim.one(fail(id, fence, false)) else { panic!() };
    assert_eq!(first.state, TaskState::Failed);
    let before = comparable(&sim.state, &[]);
    let Outcome::Failed { task: again } = sim.one(fail(id, fence, false)) else { panic!() };
    assert_eq!(again, first);
    assert_eq!(before, comparable(&sim.state, &[]));
}

#[test]
fn an_agent_leaving_on_the_last_attempt_dead_letters_its_task() {
    let mut sim = Sim::new();
    let id = sim.submit(NewTask { max_attempts: 1, ..new_task("q") });
    let epoch = sim.register("a", &["q"], 1);
    sim.lease("a", epoch, &["q"], 1, 1_000);
    assert_eq!(sim.one(Command::DeregisterAgent { agent_id: "a".into(), epoch }), Outcome::Deregistered);
    assert_eq!(sim.task(id).state, TaskState::Dead);
    assert_eq!(sim.task(id).dead_reason(), Some("attempts_exhausted: agent left on attempt 1"));
}

// ---- the byte budget of the state, and conversations that leave ----

/// Limits where the whole state may hold 64 bytes: a payload of up to 16,
/// a result of up to 16, a context of up to 32.
fn small_budget() -> Limits {
    Limits {
        payload_bytes_max: 16,
        result_bytes_max: 16,
        conversation_bytes_max: 32,
        state_bytes_max: 64,
        ..Limits::default()
    }
}

#[test]
fn a_write_past_state_bytes_max_is_refused_and_changes_nothing() {
    let mut sim = Sim::with_limits(small_budget());
    let payload = format!("\"{}\"", "x".repeat(14)); // 16 bytes
    for _ in 0..3 {
        sim.submit(NewTask { payload: payload.clone(), ..new_task("q") });
    }
    assert_eq!(sim.state.state_bytes(), 48);
    // What still fits is taken: 16 bytes of context reach exactly 64.
    let value = format!("\"{}\"", "v".repeat(13)); // 15 bytes, with key "k": 16
    assert_eq!(sim.one(put("k", &value, None)), Outcome::ContextWritten { version: 1 });
    assert_eq!(sim.state.state_bytes(), 64);
    sim.check_submit_refused(NewTask { payload, ..new_task("q") }, Error::StateFull { bytes: 80, max: 64 });
    sim.check_refused(put("j", "1", None), Error::StateFull { bytes: 66, max: 64 }, &[]);
    // A smaller value in place of a larger one always fits.
    assert_eq!(sim.one(put("k", "1", None)), Outcome::ContextWritten { version: 2 });
    assert_eq!(sim.state.state_bytes(), 48 + 2);
}

#[test]
fn a_result_makes_room_by_compacting_finished_tasks_and_is_refused_only_without_any() {
    let mut sim = Sim::with_limits(small_budget());
    let epoch = sim.register("a", &["q"], 2);
    let sixteen = format!("\"{}\"", "x".repeat(14));
    let first = sim.submit(NewTask { payload: sixteen.clone(), ..new_task("q") });
    let second = sim.submit(NewTask { payload: sixteen.clone(), ..new_task("q") });
    let grants = sim.lease("a", epoch, &["q"], 2, 10_000);
    let fence = grants[0].fence;
    // 32 of payloads + 16 of result: fits.
    sim.one(complete(first, fence, &sixteen));
    assert_eq!(sim.state.state_bytes(), 48);
    // Another 16 of result would reach 64: still fits.
    sim.submit(NewTask { payload: "{}".into(), ..new_task("q") });
    assert_eq!(sim.state.state_bytes(), 50);
    // 50 + 16 = 66 > 64: the finished first task (32 bytes) is compacted to make room.
    let Outcome::Completed { task } = sim.one(complete(second, fence, &sixteen)) else { panic!() };
    assert_eq!(task.state, TaskState::Succeeded);
    assert!(sim.state.task(first).is_none(), "the oldest finished task made room");
    assert_eq!(sim.state.state_bytes(), 50 - 32 + 16);
    // With nothing finished to compact, a result that cannot fit is refused.
    let mut sim = Sim::with_limits(small_budget());
    let epoch = sim.register("a", &["q"], 4);
    let ids: Vec<u64> = (0..4).map(|_| sim.submit(NewTask { payload: sixteen.clone(), ..new_task("q") })).collect();
    let fence = sim.lease("a", epoch, &["q"], 4, 10_000)[0].fence;
    sim.check_refused(complete(ids[0], fence, "1"), Error::StateFull { bytes: 65, max: 64 }, &[]);
}

#[test]
fn a_conversation_can_be_deleted() {
    let mut sim = Sim::new();
    sim.one(put("k", "\"hello\"", None));
    assert_eq!(sim.state.state_bytes(), 8);
    assert_eq!(sim.one(Command::ContextDelete { conversation_id: "c".into() }), Outcome::ContextDeleted);
    assert!(sim.state.conversation("c").is_none());
    assert_eq!(sim.state.state_bytes(), 0);
    sim.check_refused(
        Command::ContextDelete { conversation_id: "c".into() },
        Error::ConversationNotFound { conversation_id: "c".into() },
        &[],
    );
    // Written again, it starts over at version 1.
    assert_eq!(sim.one(put("k", "1", None)), Outcome::ContextWritten { version: 1 });
}

#[test]
fn a_conversation_expires_after_its_ttl_counted_from_its_last_write() {
    let mut sim = Sim::with_limits(Limits { conversation_ttl_ms: 1_000, ..Limits::default() });
    sim.at(1_000).one(put("k", "1", None));
    assert_eq!(sim.state.next_due_ms(), Some(2_001));
    sim.at(1_800).one(put("k", "2", None));
    sim.at(2_500).one(Command::Tick);
    assert!(sim.state.conversation("c").is_some(), "the second write restarted the clock");
    assert_eq!(sim.state.next_due_ms(), Some(2_801));
    sim.at(2_801).one(Command::Tick);
    assert!(sim.state.conversation("c").is_none());
    assert_eq!(sim.state.state_bytes(), 0);
}

#[test]
fn a_conversation_leaves_with_the_last_task_that_carries_it() {
    let mut sim = Sim::with_limits(Limits { finished_tasks_max: 1, ..Limits::default() });
    let with = |conversation: &str| NewTask { conversation_id: Some(conversation.into()), ..new_task("q") };
    sim.one(put("k", "1", None));
    let root = sim.submit(with("c"));
    let other = sim.submit(with("c"));
    sim.one(Command::Cancel { task_id: root });
    sim.submit(new_task("q"));
    let unrelated = sim.submit(new_task("q"));
    // Retention keeps one finished task: cancelling another compacts the root.
    sim.one(Command::Cancel { task_id: unrelated });
    assert!(sim.state.task(root).is_none());
    assert!(sim.state.conversation("c").is_some(), "a task of the conversation is still there");
    sim.one(Command::Cancel { task_id: other });
    sim.submit(new_task("q"));
    let last = sim.submit(new_task("q"));
    sim.one(Command::Cancel { task_id: last });
    assert!(sim.state.task(other).is_none());
    assert!(sim.state.conversation("c").is_none(), "gone with its last task");
}

#[test]
fn the_byte_count_and_conversation_indexes_survive_a_snapshot() {
    let mut sim = Sim::new();
    sim.one(put("k", "\"v\"", None));
    sim.submit(NewTask { payload: "[1,2,3]".into(), conversation_id: Some("c".into()), ..new_task("q") });
    let text = serde_json::to_string(&sim.state).unwrap();
    let mut restored: State = serde_json::from_str(&text).unwrap();
    restored.restore();
    restored.check_invariants();
    assert_eq!(restored, sim.state);
    assert_eq!(restored.state_bytes(), 4 + 7);
    // A snapshot written before budgets existed: no `written_ms`, no new policy keys.
    let mut old: Value = serde_json::from_str(&text).unwrap();
    old["conversations"]["c"].as_object_mut().unwrap().remove("written_ms");
    let limits = old["limits"].as_object_mut().unwrap();
    limits.remove("state_bytes_max");
    limits.remove("conversation_ttl_ms");
    let mut restored: State = serde_json::from_value(old).unwrap();
    restored.restore();
    restored.check_invariants();
    assert_eq!(restored.limits(), &Limits::default());
    assert_eq!(restored.conversation("c").unwrap().written_ms, None);
    assert_eq!(restored.state_bytes(), 4 + 7);
}

#[test]
fn the_edge_check_of_the_budget_lets_a_known_idempotency_key_through() {
    let mut sim = Sim::with_limits(small_budget());
    let sixteen = format!("\"{}\"", "x".repeat(14));
    let keyed = NewTask { payload: sixteen.clone(), idempotency_key: Some("once".into()), ..new_task("q") };
    for _ in 0..3 {
        sim.submit(NewTask { payload: sixteen.clone(), ..new_task("q") });
    }
    sim.submit(keyed.clone());
    assert_eq!(sim.state.state_bytes(), 64);
    let fresh = NewTask { payload: sixteen, ..new_task("q") };
    assert_eq!(sim.state.check_new_task(&fresh), Err(Error::StateFull { bytes: 80, max: 64 }));
    // The same submit again creates nothing, so it is not refused: it answers as before.
    assert_eq!(sim.state.check_new_task(&keyed), Ok(()));
    assert!(sim.submit_result(keyed).unwrap().deduplicated);
}

/// A copy of the state (what a snapshot encodes) shares its tasks with the
/// state instead of copying them, and keeps the tasks as they were when it
/// was made while the state goes on changing (copy on write).
#[test]
fn a_copy_of_the_state_shares_its_tasks_and_keeps_them_as_they_were() {
    let mut sim = Sim::new();
    let ids: Vec<u64> = (0..3).map(|_| sim.submit(new_task("q"))).collect();
    let copy = sim.state.clone();
    for id in &ids {
        assert!(std::ptr::eq(copy.task(*id).unwrap(), sim.task(*id)), "task {id} shared, not copied");
    }
    let before = comparable(&copy, &[]);
    let epoch = sim.register("a", &["q"], 1);
    let fence = sim.lease("a", epoch, &["q"], 1, 1_000)[0].fence;
    let leased = ids.iter().copied().find(|id| sim.task(*id).state == TaskState::Leased).unwrap();
    sim.one(complete(leased, fence, "\"done\""));
    assert_eq!(sim.task(leased).state, TaskState::Succeeded);
    assert_eq!(copy.task(leased).unwrap().state, TaskState::Pending, "the copy keeps the task as it was");
    assert_eq!(before, comparable(&copy, &[]), "nothing of the copy changed");
    assert!(!std::ptr::eq(copy.task(leased).unwrap(), sim.task(leased)), "the changed task was copied");
    let untouched = ids.iter().copied().find(|id| *id != leased).unwrap();
    assert!(std::ptr::eq(copy.task(untouched).unwrap(), sim.task(untouched)), "the others still shared");
    copy.check_invariants();
}
