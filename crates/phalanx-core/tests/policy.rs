//! The policy's validation for meaning: every key has a lower and an upper
//! bound, the cross-field rules use checked arithmetic (no value, however
//! large, wraps into a valid one), and a change that would refuse all new
//! work of some kind or delete retained tasks needs `force`, is refused
//! without it (changing nothing) and is recorded as forced with it.
//! Built only through `Limits::validate` and `State::apply` with public
//! commands.

use phalanx_core::limits::{Bound, BOUNDS};
use phalanx_core::{Command, Error, Limits, NewTask, Outcome, Request, State};
use proptest::prelude::*;
use serde_json::Value;
use std::collections::BTreeSet;

/// Every key of the policy as it is serialised (what `PUT /v1/config` takes).
fn keys() -> Vec<String> {
    let Value::Object(map) = serde_json::to_value(Limits::default()).unwrap() else { panic!("an object") };
    map.keys().cloned().collect()
}

/// The default policy with one key set to `value`, if the key's type holds it.
fn try_with(key: &str, value: u64) -> Option<Limits> {
    let mut policy = serde_json::to_value(Limits::default()).unwrap();
    policy[key] = Value::from(value);
    serde_json::from_value(policy).ok()
}

fn with(key: &str, value: u64) -> Limits {
    try_with(key, value).unwrap()
}

fn check_refused(policy: &Limits, field: &str, words: &[&str]) {
    let invalid = policy.validate().expect_err("refused");
    assert_eq!(invalid.field, field, "{invalid:?}");
    for word in words {
        assert!(invalid.reason.contains(word), "{:?} says {word:?}", invalid.reason);
    }
}

#[test]
fn every_key_has_bounds_and_the_values_list_matches_the_policy() {
    let keys = keys();
    let listed: Vec<String> = Limits::default().values().iter().map(|(field, _)| field.to_string()).collect();
    assert_eq!(
        keys.iter().collect::<BTreeSet<_>>(),
        listed.iter().collect::<BTreeSet<_>>(),
        "Limits::values names every key"
    );
    let bounded: BTreeSet<&str> = BOUNDS.iter().map(|bound| bound.field).collect();
    assert_eq!(bounded.len(), BOUNDS.len(), "one row per key");
    for key in &keys {
        assert!(bounded.contains(key.as_str()), "{key} has bounds in limits::BOUNDS");
    }
    for Bound { field, min, max } in BOUNDS {
        assert!(0 < *min && min < max, "{field}: a *_max is never 0 and the range is not empty");
        assert!(*max <= u64::MAX / 1024, "{field}: far from the end of u64, so sums with log time stay safe");
    }
    Limits::default().validate().expect("the default policy is valid");
}

#[test]
fn the_values_of_the_findings_are_refused_naming_field_value_and_bound() {
    check_refused(
        &with("agent_heartbeat_interval_ms", 1 << 63),
        "agent_heartbeat_interval_ms",
        &["9223372036854775808", "upper bound"],
    );
    check_refused(&with("agent_ttl_ms", 1), "agent_ttl_ms", &["1 is below the lower bound 1000"]);
    check_refused(&with("queue_name_bytes_max", 1), "queue_name_bytes_max", &["lower bound 16"]);
    check_refused(&with("tasks_max", 1), "tasks_max", &["lower bound 100"]);
    for key in keys().iter().filter(|key| key.ends_with("_max")) {
        // The largest value the key's type holds (u64, usize or u32).
        let (policy, largest) = match try_with(key, u64::MAX) {
            Some(policy) => (policy, u64::MAX),
            None => (with(key, u32::MAX as u64), u32::MAX as u64),
        };
        check_refused(&policy, key, &[&largest.to_string(), "upper bound"]);
        check_refused(&with(key, 0), key, &["0 is below the lower bound"]);
    }
}

#[test]
fn an_agent_time_to_live_spans_at_least_three_heartbeats() {
    let policy = Limits { agent_heartbeat_interval_ms: 2_000, agent_ttl_ms: 5_999, ..Limits::default() };
    check_refused(&policy, "agent_ttl_ms", &["5999", "3 times", "2000"]);
    let policy = Limits { agent_heartbeat_interval_ms: 2_000, agent_ttl_ms: 6_000, ..Limits::default() };
    policy.validate().unwrap();
    // The largest heartbeat interval allowed still leaves a time-to-live within bounds.
    let interval = Limits::bound("agent_heartbeat_interval_ms").unwrap().max;
    let ttl = Limits::bound("agent_ttl_ms").unwrap().max;
    assert!(interval * 3 <= ttl);
}

proptest! {
    /// Whatever value one key takes, validation answers (it never panics, in
    /// a debug build with overflow checks, nor wraps, in release), refuses a
    /// value outside the key's bounds naming that key, and accepts nothing
    /// that breaks a cross-field rule.
    #[test]
    fn validation_is_total_and_bounds_name_their_key(
        key_index in 0..BOUNDS.len(),
        value in prop_oneof![any::<u64>(), 0u64..100_000, Just(u64::MAX), Just(1 << 63), Just(u64::MAX / 2 + 1)],
    ) {
        let bound = BOUNDS[key_index];
        let policy = try_with(bound.field, value);
        prop_assume!(policy.is_some(), "the key's type does not hold the value");
        let policy = policy.unwrap();
        let answer = policy.validate();
        if value < bound.min || value > bound.max {
            let invalid = answer.expect_err("out of bounds");
            prop_assert_eq!(invalid.field, bound.field);
            prop_assert!(invalid.reason.contains(&value.to_string()));
        } else if answer.is_ok() {
            prop_assert!(policy.agent_ttl_ms / 3 >= policy.agent_heartbeat_interval_ms);
            prop_assert!(policy.lease_ttl_ms_min <= policy.lease_ttl_ms_default);
            prop_assert!(policy.lease_ttl_ms_default <= policy.lease_ttl_ms_max);
            prop_assert!(policy.finished_tasks_max <= policy.tasks_max);
        }
    }
}

/// A replica driven one entry at a time.
struct Sim {
    state: State,
    index: u64,
    now_ms: u64,
}

impl Sim {
    fn new() -> Sim {
        Sim { state: State::new(Limits::default()), index: 0, now_ms: 1_000 }
    }

    fn one(&mut self, command: Command) -> Outcome {
        self.index += 1;
        let response = self.state.apply(self.index, &Request { now_ms: self.now_ms, commands: vec![command] });
        self.state.check_invariants();
        response.outcomes.into_iter().next().unwrap()
    }

    fn set(&mut self, policy: Limits, force: bool) -> Outcome {
        let expected_version = self.state.policy_version();
        self.one(Command::SetPolicy { policy, expected_version, note: "set by a test".into(), force })
    }

    fn submit(&mut self, queue: &str) -> u64 {
        let task = NewTask::new(queue, "1");
        match self.one(Command::Submit { tasks: vec![task] }) {
            Outcome::Submitted { mut results } => results.pop().unwrap().unwrap().task_id,
            other => panic!("{other:?}"),
        }
    }

    fn register(&mut self, agent_id: &str) {
        let capabilities = BTreeSet::from(["q".to_string()]);
        let outcome = self.one(Command::RegisterAgent {
            agent_id: agent_id.into(),
            capabilities,
            capacity: 1,
            session: String::new(),
        });
        assert!(matches!(outcome, Outcome::Registered { .. }), "{outcome:?}");
    }
}

/// Refused without force naming `field` and the words, nothing changed;
/// accepted with force and recorded as forced.
fn check_force(sim: &mut Sim, policy: Limits, field: &str, words: &[&str]) {
    let before = sim.state.clone();
    let reasons = sim.state.force_reasons(&policy);
    assert_eq!(reasons.first().map(|(f, _)| *f), Some(field), "{reasons:?}");
    match sim.set(policy.clone(), false) {
        Outcome::Refused { error: Error::ForceRequired { field: named, reason } } => {
            assert_eq!(named, field);
            for word in words {
                assert!(reason.contains(word), "{reason:?} says {word:?}");
            }
        }
        other => panic!("expected force_required, got {other:?}"),
    }
    let mut unchanged = before.clone();
    // Only the entry's index moved.
    unchanged.apply(sim.index, &Request { now_ms: sim.now_ms, commands: vec![] });
    assert_eq!(sim.state, unchanged, "a refused change changes nothing");
    let outcome = sim.set(policy.clone(), true);
    assert!(matches!(outcome, Outcome::PolicySet { .. }), "{outcome:?}");
    let last = sim.state.policy_history().last().unwrap();
    assert!(last.forced, "{last:?}");
    assert!(last.note.contains("forced") && last.note.contains(field), "{}", last.note);
    assert_eq!(sim.state.limits(), &policy);
}

#[test]
fn lowering_agents_max_below_the_registered_agents_needs_force() {
    let mut sim = Sim::new();
    for agent in ["a", "b", "c"] {
        sim.register(agent);
    }
    check_force(&mut sim, Limits { agents_max: 1, ..Limits::default() }, "agents_max", &["3 agents registered"]);
    // Registered agents keep working; a fourth is refused.
    let capabilities = BTreeSet::from(["q".to_string()]);
    let outcome =
        sim.one(Command::RegisterAgent { agent_id: "d".into(), capabilities, capacity: 1, session: String::new() });
    assert!(matches!(outcome, Outcome::Refused { error: Error::LimitReached { .. } }), "{outcome:?}");
    // A change of another key does not need force again.
    let policy = Limits { agents_max: 1, attempts_max: 50, ..Limits::default() };
    assert!(matches!(sim.set(policy, false), Outcome::PolicySet { .. }));
    assert!(!sim.state.policy_history().last().unwrap().forced);
}

#[test]
fn lowering_finished_tasks_max_below_the_finished_tasks_needs_force_and_then_deletes_them() {
    let mut sim = Sim::new();
    let ids: Vec<u64> = (0..3).map(|_| sim.submit("q")).collect();
    for id in &ids {
        assert!(matches!(sim.one(Command::Cancel { task_id: *id }), Outcome::Cancelled { .. }));
    }
    // Raising it, or lowering it to what is kept, needs no force.
    assert!(matches!(sim.set(Limits { finished_tasks_max: 3, ..Limits::default() }, false), Outcome::PolicySet { .. }));
    check_force(
        &mut sim,
        Limits { finished_tasks_max: 1, ..Limits::default() },
        "finished_tasks_max",
        &["2 of them would be deleted"],
    );
    assert_eq!(sim.state.task_count(), 1);
}

#[test]
fn shortening_finished_task_ttl_ms_past_finished_tasks_needs_force() {
    let mut sim = Sim::new();
    let id = sim.submit("q");
    sim.one(Command::Cancel { task_id: id });
    sim.now_ms = 60_000;
    // Shorter, but the task finished more recently than that: no force.
    assert!(matches!(
        sim.set(Limits { finished_task_ttl_ms: 100_000, ..Limits::default() }, false),
        Outcome::PolicySet { .. }
    ));
    check_force(
        &mut sim,
        Limits { finished_task_ttl_ms: 1_000, ..Limits::default() },
        "finished_task_ttl_ms",
        &["delete 1 finished tasks"],
    );
}

#[test]
fn lowering_tasks_max_to_the_open_tasks_or_a_name_limit_below_names_in_use_needs_force() {
    let mut sim = Sim::new();
    for _ in 0..100 {
        sim.submit("a-queue-name-of-29-bytes-long");
    }
    let small = Limits { tasks_max: 100, queue_tasks_max: 100, finished_tasks_max: 100, ..Limits::default() };
    check_force(&mut sim, small, "tasks_max", &["100 open tasks"]);
    let mut sim = Sim::new();
    sim.submit("a-queue-name-of-29-bytes-long");
    check_force(
        &mut sim,
        Limits { queue_name_bytes_max: 16, ..Limits::default() },
        "queue_name_bytes_max",
        &["29 bytes"],
    );
    let mut sim = Sim::new();
    sim.submit("q");
    sim.submit("q");
    check_force(&mut sim, Limits { queue_tasks_max: 1, ..Limits::default() }, "queue_tasks_max", &["2 open tasks"]);
}

#[test]
fn a_guard_rollback_is_never_refused_for_want_of_force_a_client_rollback_is() {
    let mut sim = Sim::new();
    sim.register("a");
    // Version 2 allows one agent (one is registered: no force needed).
    assert!(matches!(sim.set(Limits { agents_max: 1, ..Limits::default() }, false), Outcome::PolicySet { .. }));
    let rollback = |to_version: u64, by_client: bool, force: bool| Command::RollbackPolicy {
        to_version,
        note: "test".into(),
        by_client,
        force,
        expected_version: None,
    };
    let outcome = sim.one(rollback(1, true, false));
    assert!(matches!(outcome, Outcome::PolicySet { version: 3 }), "{outcome:?}");
    sim.register("b");
    // Back to version 2 with two agents registered: a client's rollback
    // needs force like a change, the policy guard's does not.
    let outcome = sim.one(rollback(2, true, false));
    assert!(matches!(outcome, Outcome::Refused { error: Error::ForceRequired { .. } }), "{outcome:?}");
    let outcome = sim.one(rollback(2, false, false));
    assert!(matches!(outcome, Outcome::PolicySet { version: 4 }), "{outcome:?}");
    assert_eq!(sim.state.limits().agents_max, 1);
    assert!(!sim.state.policy_history().last().unwrap().forced);
}

#[test]
fn a_change_applied_with_an_out_of_bounds_value_is_refused_on_apply_too() {
    let mut sim = Sim::new();
    let policy = Limits { agent_heartbeat_interval_ms: 1 << 63, ..Limits::default() };
    match sim.set(policy, true) {
        Outcome::Refused { error: Error::Invalid { field, reason } } => {
            assert_eq!(field, "agent_heartbeat_interval_ms");
            assert!(reason.contains("upper bound"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.state.policy_version(), 1);
}
