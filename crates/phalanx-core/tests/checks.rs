//! The edge's checks: `State::check` and `State::check_new_task` refuse
//! before proposing what applying would refuse, with the same error, so a
//! refusal costs no log entry; and `State::grantable` says when a long-poll
//! has nothing to propose; `State::check_session` accepts only the agent's
//! current session, proven by its secret. One scenario per kind of refusal, each applied
//! too, to show that apply (which runs the same checks) agrees. Random
//! histories are checked the same way in `properties.rs`.

use phalanx_core::{Command, Error, Limits, NewTask, Outcome, Request, State};
use std::collections::BTreeSet;

/// A replica driven one entry at a time.
struct Sim {
    state: State,
    index: u64,
}

impl Sim {
    fn new(limits: Limits) -> Sim {
        Sim { state: State::new(limits), index: 0 }
    }

    fn one(&mut self, command: Command) -> Outcome {
        self.index += 1;
        let request = Request { now_ms: 1_000 + self.index, commands: vec![command] };
        let mut response = self.state.apply(self.index, &request);
        self.state.check_invariants();
        response.outcomes.pop().unwrap()
    }

    fn submit(&mut self, new: NewTask) -> u64 {
        match self.one(Command::Submit { tasks: vec![new] }) {
            Outcome::Submitted { results } => results[0].as_ref().expect("accepted").task_id,
            other => panic!("expected Submitted, got {other:?}"),
        }
    }

    fn register(&mut self, agent_id: &str, queues: &[&str], capacity: u32) -> u64 {
        match self.one(register(agent_id, queues, capacity)) {
            Outcome::Registered { epoch } => epoch,
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    /// Leases one task; its fence.
    fn lease_one(&mut self, agent_id: &str, epoch: u64, queue: &str, lease_ttl_ms: u64) -> (u64, u64) {
        match self.one(lease(agent_id, epoch, &[queue], 1, lease_ttl_ms)) {
            Outcome::Leased { grants } if grants.len() == 1 => (grants[0].task.id, grants[0].fence),
            other => panic!("expected one grant, got {other:?}"),
        }
    }

    /// `command` is refused with `expected` by the check, and by apply with
    /// the same error, changing nothing but the applied index.
    fn check(&mut self, command: Command, expected: Error) {
        assert_eq!(self.state.check(&command).as_ref(), Err(&expected), "{command:?} at the edge");
        let before = without_last_index(&self.state);
        let mut copy = self.state.clone();
        let request = Request { now_ms: self.state.now_ms(), commands: vec![command.clone()] };
        let outcome = copy.apply(self.state.last_index() + 1, &request).outcomes.pop().unwrap();
        assert_eq!(outcome, Outcome::Refused { error: expected }, "{command:?} when applied");
        assert_eq!(without_last_index(&copy), before, "{command:?} changed the state");
    }

    /// A new task refused by `check_new_task` and by apply alike.
    fn check_task(&mut self, new: NewTask, expected: Error) {
        assert_eq!(self.state.check_new_task(&new).as_ref(), Err(&expected), "{new:?} at the edge");
        let mut copy = self.state.clone();
        let request = Request { now_ms: self.state.now_ms(), commands: vec![Command::Submit { tasks: vec![new] }] };
        let outcome = copy.apply(self.state.last_index() + 1, &request).outcomes.pop().unwrap();
        assert_eq!(outcome, Outcome::Submitted { results: vec![Err(expected)] });
    }
}

fn without_last_index(state: &State) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap();
    value.as_object_mut().unwrap().remove("last_index");
    value
}

fn new_task(queue: &str) -> NewTask {
    NewTask::new(queue, "{}")
}

fn register(agent_id: &str, queues: &[&str], capacity: u32) -> Command {
    let capabilities = queues.iter().map(|q| q.to_string()).collect();
    Command::RegisterAgent { agent_id: agent_id.into(), capabilities, capacity, session: secret(agent_id) }
}

/// The secret the leader would have drawn for an agent's session.
fn secret(agent_id: &str) -> String {
    format!("secret-of-{agent_id}")
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

#[test]
fn a_register_with_too_many_capabilities_is_refused_before_proposing() {
    let mut sim = Sim::new(Limits::default());
    let capabilities: BTreeSet<String> = (0..30_000).map(|i| format!("q{i}")).collect();
    let command = Command::RegisterAgent { agent_id: "a".into(), capabilities, capacity: 1, session: String::new() };
    sim.check(command, Error::LimitReached { limit: "capabilities_per_agent_max".into(), max: 64 });
    sim.check(
        register("a b", &["q"], 1),
        invalid("agent_id", "character ' ' is not allowed (use A-Z a-z 0-9 . _ - :)"),
    );
    sim.register("a", &["q"], 1);
    let mut sim = Sim::new(Limits { agents_max: 1, ..Limits::default() });
    sim.register("a", &["q"], 1);
    sim.check(register("b", &["q"], 1), Error::LimitReached { limit: "agents_max".into(), max: 1 });
    // A known agent registering again starts a new session: not a new agent.
    assert_eq!(sim.state.check(&register("a", &["q"], 2)), Ok(()));
}

#[test]
fn agent_sessions_are_checked_before_proposing() {
    let mut sim = Sim::new(Limits::default());
    let old = sim.register("a", &["q"], 1);
    let epoch = sim.register("a", &["q"], 1);
    let stale = Error::StaleEpoch { agent_id: "a".into(), epoch: old, current: epoch };
    sim.check(Command::DeregisterAgent { agent_id: "a".into(), epoch: old }, stale.clone());
    sim.check(lease("a", old, &["q"], 1, 1_000), stale);
    sim.check(Command::ExpireAgent { agent_id: "z".into(), epoch: 1 }, Error::AgentNotFound { agent_id: "z".into() });
    sim.check(lease("a", epoch, &["r"], 1, 1_000), Error::NotCapable { agent_id: "a".into(), queue: "r".into() });
}

#[test]
fn reports_on_a_lapsed_lease_are_refused_before_proposing() {
    let mut sim = Sim::new(Limits::default());
    sim.submit(new_task("q"));
    let other = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 2);
    let (id, fence) = sim.lease_one("a", epoch, "q", 100);
    let (_, other_fence) = sim.lease_one("a", epoch, "q", 10_000);
    // Log time passes the lease's end: the task is pending again, its fence still the newest.
    sim.index += 1;
    sim.state.apply(sim.index, &Request { now_ms: 5_000, commands: vec![Command::Tick] });
    let expired = Error::LeaseExpired { task_id: id };
    sim.check(Command::Extend { task_id: id, fence, lease_ttl_ms: 1_000 }, expired.clone());
    sim.check(Command::Progress { task_id: id, fence }, expired.clone());
    sim.check(Command::Wait { task_id: id, fence, on: vec![other], timeout_ms: 1_000 }, expired);
    // A result under it is still accepted (until another lease is granted).
    assert_eq!(sim.state.check(&Command::Complete { task_id: id, fence, result: "1".into(), usage: None }), Ok(()));
    // A stale fence is left to the log, which counts it.
    assert_eq!(
        sim.state.check(&Command::Complete { task_id: other, fence: 1, result: "1".into(), usage: None }),
        Ok(())
    );
    sim.check(
        Command::Extend { task_id: other, fence: other_fence, lease_ttl_ms: 1 },
        invalid("lease_ttl_ms", "must be 100..=86400000"),
    );
}

#[test]
fn a_wait_that_closes_a_cycle_is_refused_before_proposing() {
    let mut sim = Sim::new(Limits::default());
    sim.submit(new_task("q"));
    sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 2);
    let (first, first_fence) = sim.lease_one("a", epoch, "q", 10_000);
    let (second, second_fence) = sim.lease_one("a", epoch, "q", 10_000);
    let wait = Command::Wait { task_id: first, fence: first_fence, on: vec![second], timeout_ms: 5_000 };
    assert_eq!(sim.one(wait), Outcome::Waiting { pending: vec![second] });
    let back = Command::Wait { task_id: second, fence: second_fence, on: vec![first], timeout_ms: 5_000 };
    sim.check(back, Error::Deadlock { cycle: format!("{second} -> {first} -> {second}") });
    let missing = Command::Wait { task_id: second, fence: second_fence, on: vec![99], timeout_ms: 5_000 };
    sim.check(missing, Error::TaskNotFound { task_id: 99 });
}

#[test]
fn context_and_policy_refusals_are_decided_before_proposing() {
    let mut sim = Sim::new(Limits { conversation_bytes_max: 8, ..Limits::default() });
    let put = |key: &str, value: &str, expected_version| Command::ContextPut {
        conversation_id: "c".into(),
        key: key.into(),
        value: value.into(),
        expected_version,
        writer: None,
    };
    assert_eq!(sim.one(put("k", "1", None)), Outcome::ContextWritten { version: 1 });
    sim.check(put("k", "2", Some(0)), Error::VersionConflict { key: "k".into(), expected: 0, current: 1 });
    sim.check(put("k", "123456789", None), Error::TooLarge { field: "value".into(), bytes: 9, max: 8 });
    sim.check(put("key", "123456", None), Error::TooLarge { field: "conversation context".into(), bytes: 11, max: 8 });
    let policy = Limits::default();
    sim.check(
        Command::SetPolicy { policy: policy.clone(), expected_version: 7, note: String::new(), force: false },
        Error::VersionConflict { key: "policy".into(), expected: 7, current: 1 },
    );
    sim.check(
        Command::SetPolicy {
            policy: Limits { tasks_max: 0, ..policy },
            expected_version: 1,
            note: String::new(),
            force: false,
        },
        invalid("tasks_max", "0 is below the lower bound 100"),
    );
    sim.check(
        Command::RollbackPolicy {
            to_version: 9,
            note: String::new(),
            by_client: true,
            force: false,
            expected_version: None,
        },
        invalid("version", "policy version 9 is not in the history"),
    );
    sim.check(Command::Cancel { task_id: 5 }, Error::TaskNotFound { task_id: 5 });
}

#[test]
fn new_tasks_are_refused_before_proposing_only_when_applying_would_refuse_them() {
    let mut sim = Sim::new(Limits { queue_tasks_max: 2, tasks_max: 3, finished_tasks_max: 3, ..Limits::default() });
    let first = sim.submit(new_task("q"));
    sim.submit(new_task("q"));
    sim.check_task(new_task("q"), Error::QueueFull { queue: "q".into(), max: 2 });
    sim.submit(new_task("r"));
    // Three tasks, all open: no room, retention may drop only finished ones.
    sim.check_task(new_task("s"), Error::LimitReached { limit: "tasks_max".into(), max: 3 });
    sim.one(Command::Cancel { task_id: first });
    assert_eq!(sim.state.check_new_task(&new_task("s")), Ok(()), "a finished task makes room");
    sim.submit(new_task("s"));
    // A known idempotency key is answered with its task, whatever the limits.
    let mut sim = Sim::new(Limits { queue_tasks_max: 1, ..Limits::default() });
    let keyed = NewTask { idempotency_key: Some("k".into()), ..new_task("q") };
    sim.submit(keyed.clone());
    assert_eq!(sim.state.check_new_task(&keyed), Ok(()));
    sim.check_task(new_task("q"), Error::QueueFull { queue: "q".into(), max: 1 });
    // A delegation from a lease that is not the parent's current one.
    let mut sim = Sim::new(Limits::default());
    let parent = sim.submit(new_task("q"));
    let epoch = sim.register("a", &["q"], 1);
    let (_, fence) = sim.lease_one("a", epoch, "q", 10_000);
    let child = NewTask { parent_id: Some(parent), parent_fence: Some(fence - 1), ..new_task("r") };
    sim.check_task(child, Error::Superseded { task_id: parent, fence: fence - 1, current: fence });
    // A loop is left to the log: applying it dead-letters the parent.
    let repeat = NewTask { parent_id: Some(parent), parent_fence: Some(fence), ..new_task("q") };
    assert_eq!(sim.state.check_new_task(&repeat), Ok(()));
}

#[test]
fn grantable_is_zero_at_capacity_or_without_ready_work() {
    let mut sim = Sim::new(Limits::default());
    let epoch = sim.register("a", &["q", "r"], 2);
    let queues = vec!["q".to_string(), "r".to_string()];
    assert_eq!(sim.state.grantable("a", epoch, &queues, 5, 1_000), Ok(0), "nothing ready");
    for _ in 0..3 {
        sim.submit(new_task("q"));
    }
    sim.submit(new_task("r"));
    assert_eq!(sim.state.grantable("a", epoch, &queues, 5, 1_000), Ok(2), "capacity bounds it");
    assert_eq!(sim.state.grantable("a", epoch, &queues, 1, 1_000), Ok(1), "tasks_max bounds it");
    let (id, fence) = sim.lease_one("a", epoch, "q", 10_000);
    sim.lease_one("a", epoch, "r", 10_000);
    assert_eq!(sim.state.grantable("a", epoch, &queues, 5, 1_000), Ok(0), "at capacity with work ready");
    assert_eq!(sim.one(lease("a", epoch, &["q"], 5, 1_000)), Outcome::Leased { grants: vec![] });
    sim.one(Command::Complete { task_id: id, fence, result: "1".into(), usage: None });
    assert_eq!(sim.state.grantable("a", epoch, &queues, 5, 1_000), Ok(1), "a lease ended");
    assert_eq!(
        sim.state.grantable("a", epoch + 1, &queues, 5, 1_000),
        Err(Error::StaleEpoch { agent_id: "a".into(), epoch: epoch + 1, current: epoch })
    );
}

fn invalid(field: &str, reason: &str) -> Error {
    Error::Invalid { field: field.into(), reason: reason.into() }
}

#[test]
fn only_the_current_session_with_its_secret_speaks_for_an_agent() {
    let mut sim = Sim::new(Limits::default());
    let old = sim.register("a", &["q"], 1);
    let epoch = sim.register("a", &["q"], 1);
    let agent = sim.state.check_session("a", epoch, Some(&secret("a"))).expect("the current session");
    assert_eq!(agent.epoch, epoch);
    // The epoch is public: with it alone, or with a guessed secret, nobody speaks for the agent.
    let wrong = Error::WrongSession { agent_id: "a".into(), epoch };
    assert_eq!(sim.state.check_session("a", epoch, None).err(), Some(wrong.clone()));
    assert_eq!(sim.state.check_session("a", epoch, Some("guess")).err(), Some(wrong));
    assert_eq!(
        sim.state.check_session("a", old, Some(&secret("a"))).err(),
        Some(Error::StaleEpoch { agent_id: "a".into(), epoch: old, current: epoch })
    );
    assert_eq!(
        sim.state.check_session("b", 1, Some(&secret("b"))).err(),
        Some(Error::AgentNotFound { agent_id: "b".into() })
    );
    // A session registered before sessions had secrets is checked by its epoch alone.
    sim.one(Command::RegisterAgent {
        agent_id: "legacy".into(),
        capabilities: BTreeSet::from(["q".into()]),
        capacity: 1,
        session: String::new(),
    });
    assert!(sim.state.check_session("legacy", 1, None).is_ok());
}
