//! The encodings of a task, held to a committed fixture: the snapshot
//! format (MessagePack, records as arrays read by position) and the JSON of
//! format 1 snapshots and of answers carrying a task must not change when
//! the in-memory layout of `Task` does. Each case is a task as JSON text (as
//! a replica wrote it, older records without the fields added since
//! included); the fixture holds what it encodes to in JSON and in
//! MessagePack, and both decode back to the same task.
//!
//! The fixture is `fixtures/task_encodings.json`; to write it again (only
//! together with a new snapshot format version):
//! `PHALANX_WRITE_FIXTURES=1 cargo test -p phalanx-core --test task_encoding`.

use phalanx_core::{Grant, Task};
use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/task_encodings.json");

/// (name, the task as JSON text).
fn cases() -> Vec<(&'static str, Value)> {
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    vec![
        (
            // Every field set, none at its default.
            "full",
            json!({
                "id": 42, "queue": "summarise", "payload": "{\"doc\":7}", "priority": 7, "state": "leased",
                "created_ms": 1_000, "updated_ms": 2_000, "deadline_ms": 90_000, "max_attempts": 5,
                "attempts": 2, "not_before_ms": 1_500, "idempotency_key": "key-42", "parent_id": 40,
                "conversation_id": "talk-1", "hop_count": 2,
                "trail": [
                    {"queue": "plan", "agent_id": null, "payload_hash": 11},
                    {"queue": "research", "agent_id": "agent-a", "payload_hash": 12},
                    {"queue": "summarise", "agent_id": "agent-b", "payload_hash": 13}
                ],
                "lease": {"agent_id": "agent-c", "agent_epoch": 3, "fence": 77, "valid_until_ms": 60_000, "progress_ms": 2_000},
                "last_fence": 77, "result": "{\"ok\":true}", "error": "timeout", "dead_reason": "expired",
                "superseded_count": 4, "parent_fence": 31,
                "adopted": {"50": {"fence": 77, "idempotency_key": "adopt-50"}, "51": {"fence": 70, "idempotency_key": null}},
                "concurrency_key": "tenant:a", "cost_estimate": 1_200,
                "budget": {"tokens_max": 10_000, "cost_max": 300},
                "usage": {"tokens_in": 100, "tokens_out": 200, "cost": 3},
                "pause": {"cause": "operator", "reason": "held for review", "since_ms": 1_900},
                "replays": 2, "traceparent": trace
            }),
        ),
        (
            // A root submitted by a client and not yet leased: the common case.
            "pending_root",
            json!({
                "id": 1, "queue": "restart", "payload": "\"xxxx\"", "priority": 5, "state": "pending",
                "created_ms": 10, "updated_ms": 10, "deadline_ms": null, "max_attempts": 3, "attempts": 0,
                "not_before_ms": 0, "idempotency_key": null, "parent_id": null, "conversation_id": null,
                "hop_count": 0, "trail": [{"queue": "restart", "agent_id": null, "payload_hash": 9_876_543_210u64}],
                "lease": null, "last_fence": 0, "result": null, "error": null, "dead_reason": null,
                "superseded_count": 0, "parent_fence": null, "adopted": {}, "concurrency_key": null,
                "cost_estimate": null, "budget": null, "usage": {"tokens_in": 0, "tokens_out": 0, "cost": 0},
                "pause": null, "replays": 0, "traceparent": trace
            }),
        ),
        (
            // Written before tasks carried a trace context, flow control,
            // parent fences or adoptions: the fields added since are absent.
            "older_record",
            json!({
                "id": 2, "queue": "q", "payload": "1", "priority": 0, "state": "succeeded",
                "created_ms": 1, "updated_ms": 2, "deadline_ms": 5, "max_attempts": 1, "attempts": 1,
                "not_before_ms": 0, "idempotency_key": null, "parent_id": null, "conversation_id": null,
                "hop_count": 0, "trail": [{"queue": "q", "agent_id": null, "payload_hash": 3}],
                "lease": null, "last_fence": 9, "result": "2", "error": null, "dead_reason": null,
                "superseded_count": 0
            }),
        ),
        (
            // A root whose one step is not the plain one a submit makes (an
            // agent named, another queue), an empty trail, a trace context
            // not in the form the edge writes: kept exactly as they were.
            "unusual_root",
            json!({
                "id": 3, "queue": "q", "payload": "2", "priority": 9, "state": "dead",
                "created_ms": 1, "updated_ms": 2, "deadline_ms": null, "max_attempts": 1, "attempts": 0,
                "not_before_ms": 0, "idempotency_key": null, "parent_id": null, "conversation_id": null,
                "hop_count": 0, "trail": [{"queue": "q", "agent_id": "someone", "payload_hash": 3}],
                "lease": null, "last_fence": 0, "result": null, "error": null, "dead_reason": "cancelled",
                "superseded_count": 0, "parent_fence": null, "adopted": {}, "concurrency_key": null,
                "cost_estimate": null, "budget": null, "usage": {"tokens_in": 0, "tokens_out": 0, "cost": 0},
                "pause": null, "replays": 0, "traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"
            }),
        ),
        (
            "other_queue_step",
            json!({
                "id": 4, "queue": "q", "payload": "2", "priority": 1, "state": "pending",
                "created_ms": 1, "updated_ms": 1, "deadline_ms": null, "max_attempts": 2, "attempts": 0,
                "not_before_ms": 0, "idempotency_key": null, "parent_id": null, "conversation_id": null,
                "hop_count": 0, "trail": [{"queue": "r", "agent_id": null, "payload_hash": 3}],
                "lease": null, "last_fence": 0, "result": null, "error": null, "dead_reason": null,
                "superseded_count": 0, "parent_fence": null, "adopted": {}, "concurrency_key": null,
                "cost_estimate": null, "budget": null, "usage": {"tokens_in": 0, "tokens_out": 0, "cost": 0},
                "pause": null, "replays": 0, "traceparent": "not a trace context"
            }),
        ),
        (
            "empty_trail",
            json!({
                "id": 5, "queue": "q", "payload": "3", "priority": 1, "state": "pending",
                "created_ms": 1, "updated_ms": 1, "deadline_ms": null, "max_attempts": 2, "attempts": 0,
                "not_before_ms": 0, "idempotency_key": null, "parent_id": null, "conversation_id": null,
                "hop_count": 0, "trail": [],
                "lease": null, "last_fence": 0, "result": null, "error": null, "dead_reason": null,
                "superseded_count": 0, "parent_fence": null, "adopted": {}, "concurrency_key": null,
                "cost_estimate": null, "budget": null, "usage": {"tokens_in": 0, "tokens_out": 0, "cost": 0},
                "pause": null, "replays": 0
            }),
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What one case encodes to: its JSON text and its MessagePack bytes in hex.
fn encodings(input: &Value) -> (Task, String, String) {
    let task: Task = serde_json::from_value(input.clone()).expect("the case decodes");
    let json = serde_json::to_string(&task).unwrap();
    let msgpack = rmp_serde::to_vec(&task).unwrap();
    (task, json, hex(&msgpack))
}

#[test]
fn task_encodings_match_the_fixture() {
    let cases = cases();
    if std::env::var_os("PHALANX_WRITE_FIXTURES").is_some() {
        let fixture: serde_json::Map<String, Value> = cases
            .iter()
            .map(|(name, input)| {
                let (_, json, msgpack) = encodings(input);
                (name.to_string(), json!({"json": json, "msgpack": msgpack}))
            })
            .collect();
        std::fs::write(FIXTURE, serde_json::to_string_pretty(&fixture).unwrap() + "\n").unwrap();
    }
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    assert_eq!(fixture.as_object().unwrap().len(), cases.len(), "one fixture entry per case");
    for (name, input) in cases {
        let expected = &fixture[name];
        let (task, json, msgpack) = encodings(&input);
        assert_eq!(json, expected["json"].as_str().unwrap(), "{name}: JSON");
        assert_eq!(msgpack, expected["msgpack"].as_str().unwrap(), "{name}: MessagePack");
        // Both encodings read back to the same task, which encodes alike again.
        let bytes: Vec<u8> =
            (0..msgpack.len()).step_by(2).map(|at| u8::from_str_radix(&msgpack[at..at + 2], 16).unwrap()).collect();
        let from_msgpack: Task = rmp_serde::from_slice(&bytes).unwrap();
        let from_json: Task = serde_json::from_str(&json).unwrap();
        assert_eq!(from_msgpack, task, "{name}: MessagePack round trip");
        assert_eq!(from_json, task, "{name}: JSON round trip");
        assert_eq!(rmp_serde::to_vec(&from_msgpack).unwrap(), bytes, "{name}: MessagePack again");
        // A task inside a grant (an answer to a lease) encodes as alone.
        let grant = Grant { task: task.clone(), fence: 1, valid_until_ms: 2, children: Vec::new() };
        let grant_json: Value = serde_json::to_value(&grant).unwrap();
        assert_eq!(grant_json["task"], serde_json::from_str::<Value>(&json).unwrap(), "{name}: in a grant");
    }
}
