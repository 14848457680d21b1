//! The HTTP API of a real one-node `phalanx server` process: the task life
//! cycle, and one test per kind of bad input, each checking that the refusal
//! is a JSON error with the right status and that nothing changed.

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};

/// Everything a client can observe of the state, to compare before and after a refusal.
async fn snapshot(cluster: &Cluster) -> Value {
    let (status, tasks) = cluster.get(1, "/v1/tasks?limit=1000").await.unwrap();
    assert_eq!(status, 200);
    tasks
}

/// The new session's epoch and secret.
async fn register(cluster: &Cluster, agent: &str, queues: &[&str]) -> (u64, Value) {
    let (status, body) = cluster
        .post(1, "/v1/agents/register", &json!({"agent_id": agent, "capabilities": queues, "capacity": 4}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    (body["epoch"].as_u64().unwrap(), body["session"].clone())
}

async fn poll(cluster: &Cluster, agent: &str, (epoch, session): &(u64, Value)) -> Vec<Value> {
    let body = json!({"epoch": epoch, "session": session, "max_tasks": 4, "wait_ms": 1000});
    let (status, body) = cluster.post(1, &format!("/v1/agents/{agent}/poll"), &body).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["leases"].as_array().unwrap().clone()
}

#[tokio::test]
async fn task_life_cycle_and_fencing() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, body) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "summarise", "payload": {"text": "hello"}})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let id = body["task_id"].as_u64().unwrap();

    let session = register(&cluster, "agent-a", &["summarise"]).await;
    let leases = poll(&cluster, "agent-a", &session).await;
    assert_eq!(leases.len(), 1);
    let fence = leases[0]["fence"].as_u64().unwrap();
    assert_eq!(leases[0]["task"]["payload"], json!({"text": "hello"}));
    assert_eq!(leases[0]["task"]["state"], "leased");

    // A wrong fence is superseded and changes nothing.
    let before = snapshot(&cluster).await;
    let answer = cluster.post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence - 1, "result": 1})).await;
    assert_error(&answer.unwrap(), 409, "superseded");
    let mut after = snapshot(&cluster).await;
    after["tasks"][0]["superseded_count"] = before["tasks"][0]["superseded_count"].clone();
    assert_eq!(before, after);

    let (status, task) = cluster
        .post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence, "result": {"n": 1}}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "succeeded");
    assert_eq!(task["result"], json!({"n": 1}));

    // Completing again with the same result is answered as before; cancelling a finished task is refused.
    let again =
        cluster.post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence, "result": {"n": 1}})).await;
    assert_eq!(again.unwrap().0, 200);
    assert_error(
        &cluster.post(1, &format!("/v1/tasks/{id}/cancel"), &json!({})).await.unwrap(),
        409,
        "already_terminal",
    );

    // A stale read is labelled as such.
    let response = cluster.http.get(cluster.url(1, &format!("/v1/tasks/{id}?stale=true"))).send().await.unwrap();
    assert_eq!(response.headers()["x-phalanx-stale"], "true");
}

#[tokio::test]
async fn batch_submit_idempotency_and_cancel() {
    let cluster = Cluster::start(1, &[]).await;
    let tasks = json!({"tasks": [
        {"queue": "a", "payload": 1, "idempotency_key": "k1"},
        {"queue": "bad queue", "payload": 2},
        {"queue": "a", "payload": 3, "priority": 9}
    ]});
    let (status, body) = cluster.post(1, "/v1/tasks/batch", &tasks).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert!(results[0]["task_id"].is_u64());
    assert_eq!(results[1]["error"]["code"], "invalid");
    assert!(results[2]["task_id"].is_u64());

    let (status, again) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "a", "payload": 1, "idempotency_key": "k1"})).await.unwrap();
    assert_eq!(status, 201);
    assert_eq!(again["task_id"], results[0]["task_id"]);
    assert_eq!(again["deduplicated"], true);

    let id = results[2]["task_id"].as_u64().unwrap();
    let (status, task) = cluster.post(1, &format!("/v1/tasks/{id}/cancel"), &json!({})).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(task["state"], "cancelled");
    let (_, listed) = cluster.get(1, "/v1/tasks?state=cancelled").await.unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_is_refused_with_json_errors_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": 0})).await.unwrap();
    let (epoch, session) = register(&cluster, "agent-a", &["q"]).await;
    let before = snapshot(&cluster).await;

    let cases: Vec<((u16, Value), u16, &str)> = vec![
        (cluster.post_raw(1, "/v1/tasks", "{not json").await, 400, "malformed_json"),
        (cluster.post_raw(1, "/v1/tasks", r#"{"queue": "q", "priorty": 1}"#).await, 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "", "payload": 1})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "a/b", "payload": 1})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "q".repeat(200)})).await.unwrap(), 413, "too_large"),
        (
            cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": "x".repeat(300_000)})).await.unwrap(),
            413,
            "too_large",
        ),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "q", "priority": 10})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "q", "priority": -1})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "q", "max_attempts": 0})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks", &json!({"queue": "q", "parent_id": 999})).await.unwrap(), 400, "invalid"),
        (
            cluster.post(1, "/v1/tasks", &json!({"queue": "q", "parent_id": 999, "parent_fence": 1})).await.unwrap(),
            404,
            "task_not_found",
        ),
        (cluster.post(1, "/v1/tasks/batch", &json!({"tasks": []})).await.unwrap(), 400, "invalid"),
        (cluster.get(1, "/v1/tasks/999").await.unwrap(), 404, "task_not_found"),
        (cluster.get(1, "/v1/tasks/abc").await.unwrap(), 400, "invalid"),
        (cluster.get(1, "/v1/tasks?state=bogus").await.unwrap(), 400, "invalid"),
        (cluster.get(1, "/v1/tasks?limit=0").await.unwrap(), 400, "invalid"),
        (cluster.get(1, "/v1/tasks?colour=red").await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks/999/cancel", &json!({})).await.unwrap(), 404, "task_not_found"),
        (
            cluster.post(1, "/v1/tasks/1/complete", &json!({"fence": 12345, "result": 1})).await.unwrap(),
            409,
            "superseded",
        ),
        (
            cluster.post(1, "/v1/tasks/999/complete", &json!({"fence": 1, "result": 1})).await.unwrap(),
            404,
            "task_not_found",
        ),
        (cluster.post(1, "/v1/tasks/1/complete", &json!({"result": 1})).await.unwrap(), 400, "invalid"),
        (cluster.post(1, "/v1/tasks/1/fail", &json!({"fence": 12345, "error": "x"})).await.unwrap(), 409, "superseded"),
        (cluster.post(1, "/v1/tasks/1/extend", &json!({"fence": 12345})).await.unwrap(), 409, "superseded"),
        (
            cluster.post(1, "/v1/agents/register", &json!({"agent_id": "b", "capabilities": []})).await.unwrap(),
            400,
            "invalid",
        ),
        (
            cluster.post(1, "/v1/agents/register", &json!({"agent_id": "b c", "capabilities": ["q"]})).await.unwrap(),
            400,
            "invalid",
        ),
        (
            cluster
                .post(1, "/v1/agents/register", &json!({"agent_id": "b", "capabilities": ["q"], "capacity": 0}))
                .await
                .unwrap(),
            400,
            "invalid",
        ),
        (cluster.post(1, "/v1/agents/ghost/poll", &json!({"epoch": 1})).await.unwrap(), 404, "agent_not_found"),
        (cluster.post(1, "/v1/agents/agent-a/poll", &json!({"epoch": epoch + 1})).await.unwrap(), 409, "stale_epoch"),
        (
            cluster.post(1, "/v1/agents/agent-a/poll", &json!({"epoch": epoch, "wait_ms": 3_600_000})).await.unwrap(),
            400,
            "invalid",
        ),
        (
            cluster
                .post(1, "/v1/agents/agent-a/poll", &json!({"epoch": epoch, "session": session, "queues": ["other"]}))
                .await
                .unwrap(),
            400,
            "not_capable",
        ),
        (cluster.post(1, "/v1/agents/ghost/heartbeat", &json!({"epoch": 1})).await.unwrap(), 404, "agent_not_found"),
        (
            cluster.put(1, "/v1/conversations/c1/k", &json!({"value": 1, "expected_version": 3})).await,
            409,
            "version_conflict",
        ),
        (cluster.get(1, "/v1/conversations/none").await.unwrap(), 404, "not_found"),
        (cluster.get(1, "/no/such/route").await.unwrap(), 404, "not_found"),
    ];
    for (i, (answer, status, code)) in cases.iter().enumerate() {
        assert_eq!(answer.0, *status, "case {i}: {answer:?}");
        assert_error(answer, *status, code);
    }
    let mut after = snapshot(&cluster).await;
    // Stale fences are counted on the task, and nothing else moves.
    after["tasks"][0]["superseded_count"] = before["tasks"][0]["superseded_count"].clone();
    assert_eq!(before, after);

    // A request body past request_bytes_max is refused before it is parsed.
    let huge = format!(r#"{{"queue": "q", "payload": "{}"}}"#, "x".repeat(5 * 1024 * 1024));
    assert_error(&cluster.post_raw(1, "/v1/tasks", &huge).await, 413, "too_large");
}

#[tokio::test]
async fn tokens_are_required_when_configured() {
    let cluster =
        Cluster::start(1, &["--client-token", "secret-client-0123456789", "--peer-token", "secret-peer-0123456789"])
            .await;
    let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q"})).await.unwrap();
    assert_error(&answer, 401, "unauthorized");
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks"))
        .bearer_auth("secret-client-0123456789")
        .json(&json!({"queue": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    // The client token does not open the Raft routes (on the Raft listener),
    // and the client port serves none.
    let raft_url = format!("http://{}/raft/vote", cluster.servers[&1].raft_addr);
    let response = cluster.http.post(raft_url).bearer_auth("secret-client-0123456789").body("{}").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = cluster
        .http
        .post(cluster.url(1, "/raft/vote"))
        .bearer_auth("secret-peer-0123456789")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[test]
fn refuses_a_public_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["server", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("PHALANX_CLIENT_TOKEN")
        .env_remove("PHALANX_PEER_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing to listen on non-loopback"), "{stderr}");
}
