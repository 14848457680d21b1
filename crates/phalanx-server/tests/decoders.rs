//! The request decoders and the Raft message decoder under generated input:
//! every client route and every Raft route of a real in-process node gets
//! bodies built from extreme values (u64::MAX, negative and fractional
//! numbers, huge and empty strings, wrong types, deep nesting) in the shape
//! of the real requests, and random bytes. Nothing may panic, every refusal
//! is a JSON error, and afterwards the node is ready, still holds what it
//! acknowledged, and still commits.
//!
//! The number of cases is fixed (`CASES`) and the seed is proptest's
//! deterministic one, so the run has a bounded cost in CI; raise
//! `PROPTEST_CASES` to search longer.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CASES: u32 = 3000;
const PEER_TOKEN: &str = "decoder-test-peer-token";

static PANICS: AtomicU64 = AtomicU64::new(0);

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(1u64 << 53)),
        Just(json!(1e308)),
        Just(json!(0.5)),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!("")),
        Just(json!("q")),
        Just(json!("x".repeat(70_000))),
        Just(json!("\u{0000}\u{ffff}/../\"")),
        Just(json!([])),
        Just(json!({})),
        "[a-z_]{0,12}".prop_map(Value::String),
        any::<u64>().prop_map(|n| json!(n)),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

/// Every field name a client request body knows, so generated bodies reach
/// past "unknown field" into the checks behind it.
const FIELDS: &[&str] = &[
    "queue",
    "payload",
    "priority",
    "deadline_ms",
    "max_attempts",
    "idempotency_key",
    "parent_id",
    "parent_fence",
    "conversation_id",
    "fence",
    "task_id",
    "result",
    "error",
    "retryable",
    "lease_ttl_ms",
    "on",
    "timeout_ms",
    "capabilities",
    "capacity",
    "epoch",
    "wait_ms",
    "tasks_max",
    "agent_id",
    "expected_version",
    "value",
    "policy",
    "note",
    "to_version",
    "node_id",
    "addr",
    "raft_addr",
    "tasks",
    "queues",
    "force",
];

fn body() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(prop::sample::select(FIELDS), value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn log_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (leaf(), leaf()).prop_map(|(term, index)| json!({"leader_id": term, "index": index}))
    ]
}

fn vote() -> impl Strategy<Value = Value> {
    (leaf(), leaf(), any::<bool>()).prop_map(
        |(term, node, committed)| json!({"leader_id": {"term": term, "voted_for": node}, "committed": committed}),
    )
}

/// Raft messages in the shape openraft sends, with extreme values inside.
fn raft_body() -> impl Strategy<Value = Value> {
    let entry = (log_id(), body()).prop_map(|(log_id, task)| {
        json!({"log_id": log_id, "payload": {"Normal": {"now_ms": 1, "commands": [{"type": "submit", "tasks": [task]}]}}})
    });
    prop_oneof![
        (vote(), log_id()).prop_map(|(vote, last)| json!({"vote": vote, "last_log_id": last})),
        (vote(), log_id(), prop::collection::vec(entry, 0..4), log_id()).prop_map(|(vote, prev, entries, commit)| {
            json!({"vote": vote, "prev_log_id": prev, "entries": entries, "leader_commit": commit})
        }),
        (vote(), log_id(), leaf(), value()).prop_map(|(vote, last, offset, data)| {
            json!({"vote": vote, "meta": {"last_log_id": last, "last_membership": {"log_id": null, "membership":
                {"configs": [[1]], "nodes": {"1": {"api": "127.0.0.1:1", "raft": "127.0.0.1:1"}}}},
                "snapshot_id": "s"}, "offset": offset, "data": data, "done": true})
        }),
        value(),
    ]
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/tasks"),
    ("POST", "/v1/tasks/batch"),
    ("POST", "/v1/tasks/{id}/cancel"),
    ("POST", "/v1/tasks/{id}/complete"),
    ("POST", "/v1/tasks/{id}/fail"),
    ("POST", "/v1/tasks/{id}/extend"),
    ("POST", "/v1/tasks/{id}/wait"),
    ("POST", "/v1/tasks/{id}/progress"),
    ("POST", "/v1/agents/register"),
    ("POST", "/v1/agents/{id}/heartbeat"),
    ("POST", "/v1/agents/{id}/deregister"),
    ("PUT", "/v1/conversations/{id}/{id}"),
    ("PUT", "/v1/config"),
    ("POST", "/v1/config/rollback"),
    ("POST", "/v1/cluster/members"),
    ("DELETE", "/v1/cluster/members/{id}"),
    ("GET", "/v1/tasks/{id}"),
    ("GET", "/v1/tasks"),
];

const RAFT_ROUTES: &[&str] = &["/raft/vote", "/raft/append", "/raft/snapshot"];

fn path_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("%00".to_string()),
        "[a-z0-9]{0,20}",
    ]
}

#[derive(Debug, Clone)]
enum Case {
    Client {
        route: usize,
        id: String,
        body: Vec<u8>,
    },
    Raft {
        route: usize,
        body: Vec<u8>,
    },
    /// In the Raft message format 2 (MessagePack, `raft_wire.rs`).
    RaftPacked {
        route: usize,
        body: Vec<u8>,
    },
}

fn case() -> impl Strategy<Value = Case> {
    let json_bytes = |v: Value| serde_json::to_vec(&v).unwrap();
    prop_oneof![
        4 => (0..ROUTES.len(), path_id(), body()).prop_map(move |(route, id, b)| Case::Client { route, id, body: json_bytes(b) }),
        1 => (0..ROUTES.len(), path_id(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(route, id, body)| Case::Client { route, id, body }),
        3 => (0..RAFT_ROUTES.len(), raft_body()).prop_map(move |(route, b)| Case::Raft { route, body: json_bytes(b) }),
        1 => (0..RAFT_ROUTES.len(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(route, body)| Case::Raft { route, body }),
        3 => (0..RAFT_ROUTES.len(), raft_body()).prop_map(|(route, b)| Case::RaftPacked { route, body: rmp_serde::to_vec_named(&b).unwrap() }),
        1 => (0..RAFT_ROUTES.len(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(route, body)| Case::RaftPacked { route, body }),
    ]
}

async fn send(http: &reqwest::Client, base: &str, case: &Case) -> (u16, Vec<u8>) {
    let request = match case {
        Case::Client { route, id, body } => {
            let (method, path) = ROUTES[*route];
            let url = format!("{base}{}", path.replace("{id}", id));
            http.request(method.parse().unwrap(), url).header("content-type", "application/json").body(body.clone())
        }
        Case::Raft { route, body } => http
            .post(format!("{base}{}", RAFT_ROUTES[*route]))
            .bearer_auth(PEER_TOKEN)
            .header("content-type", "application/json")
            .body(body.clone()),
        Case::RaftPacked { route, body } => http
            .post(format!("{base}{}", RAFT_ROUTES[*route]))
            .bearer_auth(PEER_TOKEN)
            .header("content-type", "application/msgpack")
            .header("x-phalanx-raft-format", "2")
            .body(body.clone()),
    };
    let response = request.send().await.expect("the node answers");
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

#[test]
fn generated_requests_get_json_answers_and_never_hurt_the_node() {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        hook(info);
    }));
    let runtime = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (running, base, http, kept) = runtime.block_on(async {
        let mut config = phalanx_server::NodeConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
        config.peer_token = Some(PEER_TOKEN.into());
        let running = phalanx_server::start(config).await.expect("node starts");
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        for _ in 0..100 {
            if http.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let answer = http.post(format!("{base}/v1/tasks")).json(&json!({"queue": "kept", "payload": 7})).send().await;
        let kept: Value = answer.unwrap().json().await.unwrap();
        (running, base, http, kept["task_id"].as_u64().expect("acknowledged"))
    });

    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let outcome = runner.run(&case(), |case| {
        let (status, bytes) = runtime.block_on(send(&http, &base, &case));
        prop_assert!(status < 500 || status == 503, "{case:?} answered {status}");
        if status >= 400 {
            let body: Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{case:?}: {status} is not JSON: {e}")))?;
            prop_assert!(body["error"]["code"].is_string(), "{case:?}: {body}");
            prop_assert!(body["error"]["message"].is_string(), "{case:?}: {body}");
        }
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic while serving {:?}", case);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }

    runtime.block_on(async {
        // A Raft message in a format this node does not read: refused, naming both.
        let newer = http
            .post(format!("{base}/raft/vote"))
            .bearer_auth(PEER_TOKEN)
            .header("x-phalanx-raft-format", "3")
            .body(vec![0x80])
            .send()
            .await
            .unwrap();
        assert_eq!(newer.status().as_u16(), 400);
        let refusal: Value = newer.json().await.unwrap();
        assert_eq!(refusal["error"]["code"], "malformed_raft_request", "{refusal}");
        let message = refusal["error"]["message"].as_str().unwrap();
        assert!(message.contains("format 3") && message.contains("formats 1 to 2"), "{message}");
        let ready = http.get(format!("{base}/health/ready")).send().await.unwrap();
        assert_eq!(ready.status().as_u16(), 200, "{}", ready.text().await.unwrap());
        let task: Value = http.get(format!("{base}/v1/tasks/{kept}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(task["payload"], 7, "the acknowledged task is still there: {task}");
        let answer = http.post(format!("{base}/v1/tasks")).json(&json!({"queue": "after", "payload": 1})).send().await;
        assert_eq!(answer.unwrap().status().as_u16(), 201, "the node still commits");
        running.shutdown().await.unwrap();
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}
