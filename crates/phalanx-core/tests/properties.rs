//! Property tests of the state machine, over random histories of commands:
//! at most one live lease per task, fences strictly increasing, stale fences
//! changing nothing, acknowledged tasks never disappearing, and two replicas
//! (one rebuilt from a snapshot midway) ending byte-identical.

use phalanx_core::{Command, Limits, NewTask, Outcome, Request, State, TaskState};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// A command template; fences and task ids are resolved against the state
/// when applied, so that some are current and some stale.
#[derive(Clone, Debug)]
enum Step {
    Tick,
    Submit { queue: u8, priority: u8, key: Option<u8>, deadline: Option<u16>, attempts: u8, parent: bool },
    Register { agent: u8 },
    Lease { agent: u8, queue: u8, tasks_max: u8, ttl: u16 },
    Complete { task: u8, stale: bool },
    Fail { task: u8, stale: bool, retryable: bool },
    Extend { task: u8, stale: bool },
    Cancel { task: u8 },
    Expire { agent: u8 },
    Context { key: u8, expected: Option<u8> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Tick),
        (0..3u8, 0..10u8, proptest::option::of(0..4u8), proptest::option::of(1..2000u16), 1..4u8, any::<bool>())
            .prop_map(|(queue, priority, key, deadline, attempts, parent)| Step::Submit {
                queue,
                priority,
                key,
                deadline,
                attempts,
                parent
            }),
        (0..3u8).prop_map(|agent| Step::Register { agent }),
        (0..3u8, 0..3u8, 1..4u8, 100..3000u16).prop_map(|(agent, queue, tasks_max, ttl)| Step::Lease {
            agent,
            queue,
            tasks_max,
            ttl
        }),
        (any::<u8>(), any::<bool>()).prop_map(|(task, stale)| Step::Complete { task, stale }),
        (any::<u8>(), any::<bool>(), any::<bool>()).prop_map(|(task, stale, retryable)| Step::Fail {
            task,
            stale,
            retryable
        }),
        (any::<u8>(), any::<bool>()).prop_map(|(task, stale)| Step::Extend { task, stale }),
        any::<u8>().prop_map(|task| Step::Cancel { task }),
        (0..3u8).prop_map(|agent| Step::Expire { agent }),
        (0..3u8, proptest::option::of(0..3u8)).prop_map(|(key, expected)| Step::Context { key, expected }),
    ]
}

/// An entry: a time step (sometimes backwards) and up to three steps.
fn history() -> impl Strategy<Value = Vec<(i16, Vec<Step>)>> {
    proptest::collection::vec((-50i16..400, proptest::collection::vec(step(), 1..4)), 20..120)
}

fn queue(n: u8) -> String {
    format!("q{n}")
}

/// Resolves a step into a command against the current state.
fn command(state: &State, step: &Step) -> Command {
    let task_ids: Vec<u64> = state.tasks(None, None, 0, usize::MAX).iter().map(|t| t.id).collect();
    let pick = |n: u8| task_ids.get(n as usize % task_ids.len().max(1)).copied().unwrap_or(1);
    let fence_of = |id: u64, stale: bool| {
        let current = state.task(id).map(|t| t.last_fence).unwrap_or(0);
        if stale {
            current.saturating_sub(1 + (id % 3))
        } else {
            current
        }
    };
    match step {
        Step::Tick => Command::Tick,
        Step::Submit { queue: q, priority, key, deadline, attempts, parent } => Command::Submit {
            tasks: vec![NewTask {
                queue: queue(*q),
                payload: format!("{{\"q\":{q}}}"),
                priority: *priority,
                deadline_ms: deadline.map(u64::from),
                max_attempts: *attempts as u32,
                idempotency_key: key.map(|k| format!("key-{k}")),
                parent_id: if *parent && !task_ids.is_empty() { Some(pick(*priority)) } else { None },
                parent_fence: None,
                conversation_id: None,
            }],
        },
        Step::Register { agent } => Command::RegisterAgent {
            agent_id: format!("a{agent}"),
            capabilities: (0..3).map(queue).collect::<BTreeSet<_>>(),
            capacity: 3,
        },
        Step::Lease { agent, queue: q, tasks_max, ttl } => Command::Lease {
            agent_id: format!("a{agent}"),
            epoch: state.agent(&format!("a{agent}")).map(|a| a.epoch).unwrap_or(1),
            queues: vec![queue(*q)],
            tasks_max: *tasks_max as u32,
            lease_ttl_ms: *ttl as u64,
        },
        Step::Complete { task, stale } => {
            let id = pick(*task);
            Command::Complete { task_id: id, fence: fence_of(id, *stale), result: format!("\"r{task}\"") }
        }
        Step::Fail { task, stale, retryable } => {
            let id = pick(*task);
            Command::Fail { task_id: id, fence: fence_of(id, *stale), error: "e".into(), retryable: *retryable }
        }
        Step::Extend { task, stale } => {
            let id = pick(*task);
            Command::Extend { task_id: id, fence: fence_of(id, *stale), lease_ttl_ms: 500 }
        }
        Step::Cancel { task } => Command::Cancel { task_id: pick(*task) },
        Step::Expire { agent } => Command::ExpireAgent {
            agent_id: format!("a{agent}"),
            epoch: state.agent(&format!("a{agent}")).map(|a| a.epoch).unwrap_or(1),
        },
        Step::Context { key, expected } => Command::ContextPut {
            conversation_id: "c".into(),
            key: format!("k{key}"),
            value: "1".into(),
            expected_version: expected.map(u64::from),
        },
    }
}

/// Replays a history; calls `check` after every entry with the state before,
/// the request, the response and the state after.
fn replay(history: &[(i16, Vec<Step>)], mut check: impl FnMut(&State, u64, &Request, &[Outcome], &State)) -> State {
    let mut state = State::new(Limits::default());
    let mut now: i64 = 1_000_000;
    let mut index = 0;
    for (i, (dt, steps)) in history.iter().enumerate() {
        now += *dt as i64;
        index += 1 + (i as u64 % 3);
        let commands: Vec<Command> = steps.iter().map(|s| command(&state, s)).collect();
        let request = Request { now_ms: now as u64, commands };
        let before = state.clone();
        let response = state.apply(index, &request);
        state.check_invariants();
        check(&before, index, &request, &response.outcomes, &state);
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn a_task_never_has_two_live_leases(history in history()) {
        replay(&history, |_, _, _, _, after| {
            // check_invariants asserts one lease per task held by exactly one agent;
            // here, independently: no task id is in two agents' lease sets.
            let mut held = BTreeSet::new();
            for agent in after.agents() {
                for id in &agent.leased_task_ids {
                    assert!(held.insert(*id), "task {id} leased twice");
                }
            }
        });
    }

    #[test]
    fn fencing_tokens_strictly_increase(history in history()) {
        let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
        replay(&history, |_, index, _, outcomes, _| {
            for outcome in outcomes {
                if let Outcome::Leased { grants } = outcome {
                    for grant in grants {
                        assert_eq!(grant.fence, index, "the fence is the granting entry's index");
                        if let Some(previous) = newest.insert(grant.task.id, grant.fence) {
                            assert!(grant.fence > previous, "fence went from {previous} to {}", grant.fence);
                        }
                    }
                }
            }
        });
    }

    #[test]
    fn a_stale_fence_changes_nothing(history in history()) {
        replay(&history, |before, index, request, _, _| {
            // Re-apply each fenced command with a wrong fence to a copy of the state before.
            for command in &request.commands {
                let (task_id, stale) = match command {
                    Command::Complete { task_id, .. } | Command::Fail { task_id, .. } | Command::Extend { task_id, .. } => {
                        let Some(task) = before.task(*task_id) else { continue };
                        (*task_id, task.last_fence + 1)
                    }
                    _ => continue,
                };
                let wrong = match command.clone() {
                    Command::Complete { result, .. } => Command::Complete { task_id, fence: stale, result },
                    Command::Fail { error, retryable, .. } => Command::Fail { task_id, fence: stale, error, retryable },
                    Command::Extend { lease_ttl_ms, .. } => Command::Extend { task_id, fence: stale, lease_ttl_ms },
                    _ => unreachable!(),
                };
                let mut copy = before.clone();
                let response = copy.apply(index, &Request { now_ms: before.now_ms(), commands: vec![wrong] });
                let refused = matches!(&response.outcomes[0], Outcome::Refused { error } if error.code() == "superseded");
                assert!(refused, "{:?}", response.outcomes[0]);
                let mut expected = serde_json::to_value(before).unwrap();
                let mut actual = serde_json::to_value(&copy).unwrap();
                for state in [&mut expected, &mut actual] {
                    state["last_index"] = serde_json::Value::Null;
                    state["counters"]["superseded"] = serde_json::Value::Null;
                    state["tasks"][task_id.to_string()]["superseded_count"] = serde_json::Value::Null;
                }
                assert_eq!(expected, actual);
            }
        });
    }

    #[test]
    fn no_acknowledged_task_ever_disappears(history in history()) {
        let mut acknowledged = BTreeSet::new();
        let mut finished: BTreeMap<u64, String> = BTreeMap::new();
        replay(&history, |_, _, _, outcomes, after| {
            for outcome in outcomes {
                if let Outcome::Submitted { results } = outcome {
                    acknowledged.extend(results.iter().flatten().map(|s| s.task_id));
                }
            }
            for id in &acknowledged {
                let task = after.task(*id).unwrap_or_else(|| panic!("acknowledged task {id} disappeared"));
                let rendered = serde_json::to_string(task).unwrap();
                if let Some(previous) = finished.get(id) {
                    let mut was: serde_json::Value = serde_json::from_str(previous).unwrap();
                    let mut now: serde_json::Value = serde_json::from_str(&rendered).unwrap();
                    was["superseded_count"] = serde_json::Value::Null;
                    now["superseded_count"] = serde_json::Value::Null;
                    assert_eq!(was, now, "a terminal task changed");
                } else if task.state != TaskState::Pending && task.state != TaskState::Leased {
                    finished.insert(*id, rendered);
                }
            }
        });
    }

    #[test]
    fn replicas_end_byte_identical_even_from_a_snapshot(history in history(), cut in 0usize..100) {
        let first = replay(&history, |_, _, _, _, _| {});
        // A second replica applies the first part, is rebuilt from a serialised
        // snapshot, and applies the rest.
        let cut = cut % history.len();
        let mut state = State::new(Limits::default());
        let mut now: i64 = 1_000_000;
        let mut index = 0;
        for (i, (dt, steps)) in history.iter().enumerate() {
            if i == cut {
                let snapshot = serde_json::to_vec(&state).unwrap();
                state = serde_json::from_slice(&snapshot).unwrap();
            }
            now += *dt as i64;
            index += 1 + (i as u64 % 3);
            let commands: Vec<Command> = steps.iter().map(|s| command(&state, s)).collect();
            state.apply(index, &Request { now_ms: now as u64, commands });
        }
        assert_eq!(serde_json::to_vec(&first).unwrap(), serde_json::to_vec(&state).unwrap());
    }
}
