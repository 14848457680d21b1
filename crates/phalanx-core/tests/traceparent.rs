//! The trace context a task carries (`Task::traceparent`): stored as the
//! edge made it, checked on apply like every other field of a new task, and
//! absent from what the previous version wrote, which still loads.

use phalanx_core::{Command, Error, Limits, NewTask, Outcome, Request, State, Task};

/// A task as the version before `traceparent` wrote it into its log and
/// snapshots: every field it had, and no other.
const OLD_TASK_JSON: &str = r#"{"id":7,"queue":"q","payload":"{}","priority":5,"state":"pending",
"created_ms":1001,"updated_ms":1001,"deadline_ms":null,"max_attempts":3,"attempts":0,
"not_before_ms":0,"idempotency_key":null,"parent_id":null,"conversation_id":null,"hop_count":0,
"trail":[{"queue":"q","agent_id":null,"payload_hash":12638153115695167455}],"lease":null,
"last_fence":0,"result":null,"error":null,"dead_reason":null,"superseded_count":0,
"parent_fence":null,"adopted":{},"concurrency_key":null,"cost_estimate":null,"budget":null,
"usage":{"tokens_in":0,"tokens_out":0,"cost":0},"pause":null,"replays":0}"#;

/// A submit entry's command as the previous version wrote it.
const OLD_SUBMIT_JSON: &str = r#"{"type":"submit","tasks":[{"queue":"q","payload":"{}","priority":5,
"deadline_ms":null,"max_attempts":3,"idempotency_key":null,"parent_id":null,"parent_fence":null,
"conversation_id":null,"concurrency_key":null,"cost_estimate":null,"budget":null}]}"#;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn apply(state: &mut State, index: u64, command: Command) -> Outcome {
    let request = Request { now_ms: 1_000 + index, commands: vec![command] };
    let mut response = state.apply(index, &request);
    state.check_invariants();
    response.outcomes.pop().unwrap()
}

#[test]
fn a_task_written_before_traceparent_loads_without_one() {
    let task: Task = serde_json::from_str(OLD_TASK_JSON).expect("the previous version's task decodes");
    assert_eq!(task.traceparent(), None);
    assert_eq!(task.id, 7);
    // And it is written back as it was: no field appears for an absent context.
    let written = serde_json::to_value(&task).unwrap();
    assert_eq!(written, serde_json::from_str::<serde_json::Value>(OLD_TASK_JSON).unwrap());
    let command: Command = serde_json::from_str(OLD_SUBMIT_JSON).expect("the previous version's submit decodes");
    let Command::Submit { tasks } = &command else { panic!("a submit") };
    assert_eq!(tasks[0].traceparent, None);
    let mut state = State::new(Limits::default());
    assert!(matches!(apply(&mut state, 1, command), Outcome::Submitted { .. }));
    assert_eq!(state.task(1).unwrap().traceparent(), None);
}

#[test]
fn a_submitted_traceparent_is_stored_on_the_task() {
    let mut state = State::new(Limits::default());
    let new = NewTask { traceparent: Some(TRACEPARENT.into()), ..NewTask::new("q", "{}") };
    let Outcome::Submitted { results } = apply(&mut state, 1, Command::Submit { tasks: vec![new] }) else {
        panic!("a submit's outcome")
    };
    let task_id = results[0].as_ref().expect("accepted").task_id;
    assert_eq!(state.task(task_id).unwrap().traceparent().as_deref(), Some(TRACEPARENT));
    // A snapshot keeps it.
    let copy: State = serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap();
    assert_eq!(copy.task(task_id).unwrap().traceparent().as_deref(), Some(TRACEPARENT));
}

#[test]
fn a_malformed_traceparent_is_refused_by_check_and_apply_alike() {
    let bad = [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    ];
    for text in bad {
        let mut state = State::new(Limits::default());
        let new = NewTask { traceparent: Some(text.into()), ..NewTask::new("q", "{}") };
        let refused = state.check_new_task(&new);
        assert!(
            matches!(&refused, Err(Error::Invalid { field, .. }) if field == "traceparent"),
            "{text:?}: {refused:?}"
        );
        let outcome = apply(&mut state, 1, Command::Submit { tasks: vec![new] });
        assert_eq!(outcome, Outcome::Submitted { results: vec![Err(refused.unwrap_err())] }, "{text:?}");
        assert_eq!(state.task(1), None, "{text:?} created a task");
    }
}
