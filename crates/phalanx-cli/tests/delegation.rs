//! Delegation trees that hold up when a planner is replaced (issue 13), on
//! real nodes: one test per finding of the issue (each failed on the build
//! before it), and the delegation chaos run (`phalanx bench delegation
//! --check`: planners that crash, zombies, leader kills and pauses) whose
//! checker must find nothing.

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// An agent session driven by hand: register, then lease one task at a time.
struct Agent<'a> {
    cluster: &'a Cluster,
    id: String,
    epoch: u64,
    session: Value,
}

impl<'a> Agent<'a> {
    async fn register(cluster: &'a Cluster, id: &str, queues: &[&str]) -> Agent<'a> {
        let body = json!({"agent_id": id, "capabilities": queues, "capacity": 10});
        let (status, answer) = cluster.post(1, "/v1/agents/register", &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        Agent {
            cluster,
            id: id.to_string(),
            epoch: answer["epoch"].as_u64().unwrap(),
            session: answer["session"].clone(),
        }
    }

    /// Leases one task of `queue` for `lease_ttl_ms`; the lease as the poll answers it.
    async fn lease(&self, queue: &str, lease_ttl_ms: u64) -> Value {
        let body = json!({"epoch": self.epoch, "session": self.session, "queues": [queue], "wait_ms": 2000,
                          "lease_ttl_ms": lease_ttl_ms});
        let (status, answer) = self.cluster.post(1, &format!("/v1/agents/{}/poll", self.id), &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        answer["leases"][0].clone()
    }
}

fn task_id(lease: &Value) -> u64 {
    lease["task"]["id"].as_u64().expect("a lease")
}

fn fence(lease: &Value) -> u64 {
    lease["fence"].as_u64().expect("a lease")
}

async fn submit(cluster: &Cluster, body: Value) -> (u16, Value) {
    cluster.post(1, "/v1/tasks", &body).await.unwrap()
}

async fn task(cluster: &Cluster, id: u64) -> (u16, Value) {
    cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap()
}

async fn task_count(cluster: &Cluster) -> usize {
    let (_, page) = cluster.get(1, "/v1/tasks?limit=1000").await.unwrap();
    page["tasks"].as_array().unwrap().len()
}

async fn complete(cluster: &Cluster, id: u64, fence: u64, result: Value) -> (u16, Value) {
    cluster.post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence, "result": result})).await.unwrap()
}

/// Waits until the task's lease has lapsed and the cluster released it.
async fn until_released(cluster: &Cluster, id: u64) {
    let start = Instant::now();
    loop {
        let (_, view) = task(cluster, id).await;
        if view["state"] == "pending" {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the lease of {id} never lapsed: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 1: a re-leased root is handed the children its first planner
/// delegated; the same steps delegated again (new keys) are adopted, not
/// duplicated; the child nobody adopted is cancelled when the root ends.
#[tokio::test]
async fn a_replaced_planner_adopts_its_predecessors_children() {
    let cluster = Cluster::start(1, &[]).await;
    let first = Agent::register(&cluster, "planner-1", &["plan"]).await;
    let second = Agent::register(&cluster, "planner-2", &["plan"]).await;
    let researcher = Agent::register(&cluster, "researcher", &["research"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {"question": 1}})).await;
    let lease = first.lease("plan", 500).await;
    let (root, first_fence) = (task_id(&lease), fence(&lease));
    let mut children = Vec::new();
    for step in 0..3 {
        let body = json!({"queue": "research", "payload": {"step": step}, "parent_id": root,
                          "parent_fence": first_fence, "idempotency_key": format!("first-{step}")});
        let (status, answer) = submit(&cluster, body).await;
        assert_eq!((status, &answer["deduplicated"]), (201, &json!(false)), "{answer}");
        children.push(answer["task_id"].as_u64().unwrap());
    }
    // The first planner crashes; its lease lapses and another planner takes the root.
    until_released(&cluster, root).await;
    let lease = second.lease("plan", 10_000).await;
    assert_eq!(task_id(&lease), root);
    let second_fence = fence(&lease);
    let listed: Vec<(u64, Value, Value)> = lease["children"]
        .as_array()
        .unwrap_or_else(|| panic!("no children in the lease: {lease}"))
        .iter()
        .map(|child| (child["task_id"].as_u64().unwrap(), child["parent_fence"].clone(), child["state"].clone()))
        .collect();
    assert_eq!(listed, children.iter().map(|id| (*id, json!(first_fence), json!("pending"))).collect::<Vec<_>>());
    for (step, child) in children.iter().enumerate().take(2) {
        let body = json!({"queue": "research", "payload": {"step": step}, "parent_id": root,
                          "parent_fence": second_fence, "idempotency_key": format!("second-{step}")});
        let (status, answer) = submit(&cluster, body).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(without_traceparent(answer), json!({"task_id": child, "deduplicated": true, "adopted": true}));
    }
    assert_eq!(task_count(&cluster).await, 4, "no duplicate was created");
    for _ in 0..2 {
        let lease = researcher.lease("research", 10_000).await;
        assert_eq!(complete(&cluster, task_id(&lease), fence(&lease), json!("found")).await.0, 200);
    }
    assert_eq!(complete(&cluster, root, second_fence, json!("aggregate")).await.0, 200);
    let (_, orphan) = task(&cluster, children[2]).await;
    assert_eq!(orphan["state"], "cancelled", "the step nobody adopted does not run for nobody: {orphan}");
    assert!(orphan["error"].as_str().unwrap().starts_with("orphaned: parent"), "{orphan}");
}

/// Finding 2: `parent_id` without `parent_fence` is refused before anything
/// else: the loop it would make does not dead-letter the holder's task, and
/// no child is added to a task that already succeeded.
#[tokio::test]
async fn a_delegation_without_the_parents_lease_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    let holder = Agent::register(&cluster, "holder", &["plan"]).await;
    let (_, root) = submit(&cluster, json!({"queue": "plan", "payload": {"doc": 4}})).await;
    let root = root["task_id"].as_u64().unwrap();
    let lease = holder.lease("plan", 10_000).await;
    let holder_fence = fence(&lease);
    // A client that holds no lease repeats the root's own step under it.
    let unfenced = json!({"queue": "plan", "payload": {"doc": 4}, "parent_id": root});
    let answer = submit(&cluster, unfenced.clone()).await;
    assert_error(&answer, 400, "invalid");
    assert!(answer.1["error"]["message"].as_str().unwrap().contains("parent_fence"), "{answer:?}");
    let (_, view) = task(&cluster, root).await;
    assert_eq!(view["state"], "leased", "the holder keeps its task: {view}");
    assert_eq!(complete(&cluster, root, holder_fence, json!("done")).await.0, 200);
    // Nor is a child added to a task that succeeded, fenced or not.
    assert_error(&submit(&cluster, json!({"queue": "x", "parent_id": root})).await, 400, "invalid");
    let fenced = json!({"queue": "x", "parent_id": root, "parent_fence": holder_fence});
    assert_error(&submit(&cluster, fenced).await, 409, "already_terminal");
    assert_eq!(task_count(&cluster).await, 1);
}

/// Finding 3: an idempotency key is answered only for the request it names,
/// and only after the parent's fence was checked.
#[tokio::test]
async fn an_idempotency_key_reused_for_another_request_is_a_conflict() {
    let cluster = Cluster::start(1, &[]).await;
    let planner = Agent::register(&cluster, "planner", &["plan"]).await;
    for doc in 0..2 {
        submit(&cluster, json!({"queue": "plan", "payload": {"doc": doc}})).await;
    }
    let (first, other) = (planner.lease("plan", 10_000).await, planner.lease("plan", 10_000).await);
    let child = json!({"queue": "research", "payload": {"step": 1}, "parent_id": task_id(&first),
                       "parent_fence": fence(&first), "idempotency_key": "step-1"});
    let (status, created) = submit(&cluster, child.clone()).await;
    assert_eq!(status, 201, "{created}");
    let mut another_parent = child.clone();
    another_parent["parent_id"] = json!(task_id(&other));
    another_parent["parent_fence"] = json!(fence(&other));
    assert_error(&submit(&cluster, another_parent).await, 409, "idempotency_conflict");
    let mut stale = child.clone();
    stale["parent_fence"] = json!(fence(&first) - 1);
    assert_error(&submit(&cluster, stale).await, 409, "superseded");
    let mut another_payload = child.clone();
    another_payload["payload"] = json!({"step": 2});
    assert_error(&submit(&cluster, another_payload).await, 409, "idempotency_conflict");
    // The same request again is the same child.
    let (status, again) = submit(&cluster, child).await;
    assert_eq!(again["traceparent"], created["traceparent"], "the first submit's trace context");
    let expected = json!({"task_id": created["task_id"], "deduplicated": true, "adopted": false});
    assert_eq!((status, without_traceparent(again)), (201, expected));
    // A root's key too.
    assert_eq!(submit(&cluster, json!({"queue": "q", "payload": 1, "idempotency_key": "order-1"})).await.0, 201);
    let answer = submit(&cluster, json!({"queue": "q", "payload": 2, "idempotency_key": "order-1"})).await;
    assert_error(&answer, 409, "idempotency_conflict");
    assert_eq!(task_count(&cluster).await, 4);
}

/// Finding 4: a planner whose lease lapsed is refused a delegation as an
/// extension is, and nothing is created.
#[tokio::test]
async fn a_planner_whose_lease_lapsed_cannot_delegate() {
    let cluster = Cluster::start(1, &[]).await;
    let planner = Agent::register(&cluster, "planner", &["plan"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {}})).await;
    let lease = planner.lease("plan", 300).await;
    let (root, planner_fence) = (task_id(&lease), fence(&lease));
    until_released(&cluster, root).await;
    let extend = cluster.post(1, &format!("/v1/tasks/{root}/extend"), &json!({"fence": planner_fence})).await;
    assert_error(&extend.unwrap(), 409, "lease_expired");
    for step in 0..4 {
        let body = json!({"queue": "research", "payload": {"step": step}, "parent_id": root,
                          "parent_fence": planner_fence});
        assert_error(&submit(&cluster, body).await, 409, "lease_expired");
    }
    assert_eq!(task_count(&cluster).await, 1);
}

/// Finding 5: a conversation write on a task's behalf carries its fence; a
/// lapsed or superseded attempt writes nothing, its entries go when the task
/// is leased again, and the next attempt's "only if absent" write succeeds.
#[tokio::test]
async fn conversation_writes_are_fenced_and_a_superseded_attempts_entries_go() {
    let cluster = Cluster::start(1, &[]).await;
    let planner = Agent::register(&cluster, "planner", &["plan"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {}, "conversation_id": "conv-5"})).await;
    let lease = planner.lease("plan", 500).await;
    let (root, first) = (task_id(&lease), fence(&lease));
    let put = |fence: u64, expected_version: Option<u64>| {
        let cluster = &cluster;
        let body =
            json!({"value": {"by": fence}, "expected_version": expected_version, "task_id": root, "fence": fence});
        async move { cluster.put(1, "/v1/conversations/conv-5/draft", &body).await }
    };
    assert_eq!(put(first, Some(0)).await, (200, json!({"version": 1})));
    until_released(&cluster, root).await;
    assert_error(&put(first, None).await, 409, "lease_expired");
    let second = fence(&planner.lease("plan", 10_000).await);
    let (_, context) = cluster.get(1, "/v1/conversations/conv-5").await.unwrap();
    assert_eq!(context["entries"], json!({}), "the superseded attempt's entry was discarded");
    assert_error(&put(first, None).await, 409, "superseded");
    assert_eq!(put(second, Some(0)).await, (200, json!({"version": 1})));
    let (_, context) = cluster.get(1, "/v1/conversations/conv-5").await.unwrap();
    assert_eq!(
        context["entries"]["draft"],
        json!({"version": 1, "value": {"by": second}, "task_id": root, "fence": second})
    );
    let half = json!({"value": 1, "task_id": root});
    assert_error(&cluster.put(1, "/v1/conversations/conv-5/x", &half).await, 400, "invalid");
    let elsewhere = json!({"value": 1, "task_id": root, "fence": second});
    assert_error(&cluster.put(1, "/v1/conversations/other/x", &elsewhere).await, 400, "invalid");
}

/// Finding 6: success clears the error of an earlier attempt or of a wait
/// that timed out.
#[tokio::test]
async fn a_succeeded_task_carries_no_earlier_error() {
    let cluster = Cluster::start(1, &[]).await;
    let planner = Agent::register(&cluster, "planner", &["plan"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {}})).await;
    let lease = planner.lease("plan", 10_000).await;
    let (root, root_fence) = (task_id(&lease), fence(&lease));
    let body = json!({"queue": "research", "payload": {}, "parent_id": root, "parent_fence": root_fence});
    let child = submit(&cluster, body).await.1["task_id"].as_u64().unwrap();
    let wait = json!({"fence": root_fence, "on": [child], "timeout_ms": 200});
    assert_eq!(cluster.post(1, &format!("/v1/tasks/{root}/wait"), &wait).await.unwrap().0, 200);
    let start = Instant::now();
    while task(&cluster, root).await.1["error"].is_null() {
        assert!(start.elapsed() < Duration::from_secs(10), "the wait never timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, done) = complete(&cluster, root, root_fence, json!("aggregate")).await;
    assert_eq!((status, &done["state"], &done["error"]), (200, &json!("succeeded"), &Value::Null), "{done}");
    // And the error of a failed earlier attempt.
    submit(&cluster, json!({"queue": "plan", "payload": {"again": true}})).await;
    let lease = planner.lease("plan", 10_000).await;
    let failed = json!({"fence": fence(&lease), "error": "boom", "retryable": true});
    cluster.post(1, &format!("/v1/tasks/{}/fail", task_id(&lease)), &failed).await.unwrap();
    let lease = planner.lease("plan", 10_000).await;
    let (_, done) = complete(&cluster, task_id(&lease), fence(&lease), json!("ok")).await;
    assert_eq!((&done["state"], &done["error"]), (&json!("succeeded"), &Value::Null), "{done}");
}

/// Finding 7: retention never compacts a parent while its child is at work,
/// and compacts a finished tree as one.
#[tokio::test]
async fn retention_keeps_a_tree_whole() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, answer) = cluster.put(1, "/v1/config", &json!({"set": {"finished_tasks_max": 1}})).await;
    assert_eq!(status, 200, "{answer}");
    let agent = Agent::register(&cluster, "worker", &["plan", "research", "other"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {}})).await;
    let lease = agent.lease("plan", 10_000).await;
    let (root, root_fence) = (task_id(&lease), fence(&lease));
    let body = json!({"queue": "research", "payload": {}, "parent_id": root, "parent_fence": root_fence});
    let child = submit(&cluster, body).await.1["task_id"].as_u64().unwrap();
    let failed = json!({"fence": root_fence, "error": "gave up", "retryable": false});
    assert_eq!(cluster.post(1, &format!("/v1/tasks/{root}/fail"), &failed).await.unwrap().0, 200);
    let finish_other = || async {
        submit(&cluster, json!({"queue": "other", "payload": {}})).await;
        let lease = agent.lease("other", 10_000).await;
        assert_eq!(complete(&cluster, task_id(&lease), fence(&lease), json!("r")).await.0, 200);
    };
    for _ in 0..3 {
        finish_other().await;
    }
    let (status, parent) = task(&cluster, root).await;
    assert_eq!((status, &parent["state"]), (200, &json!("failed")), "the parent of a child at work stays: {parent}");
    let (_, pending) = task(&cluster, child).await;
    assert_eq!((&pending["state"], &pending["parent_id"]), (&json!("pending"), &json!(root)));
    let lease = agent.lease("research", 10_000).await;
    assert_eq!(complete(&cluster, child, fence(&lease), json!("r")).await.0, 200);
    finish_other().await;
    assert_eq!(task(&cluster, root).await.0, 404, "the finished tree left as one");
    assert_eq!(task(&cluster, child).await.0, 404);
}

/// The delegation chaos run: planners that crash mid-delegation and after
/// waiting, zombie planners, researchers that crash, leader kills and
/// pauses, on three real nodes, for a fixed time; its checker (each root
/// accepted once, each aggregate the accepted results of the accepting
/// attempt's children, no duplicate run of an adopted step, conversations
/// holding only accepted or live attempts' entries) must find nothing.
#[test]
fn delegation_chaos_finds_no_violation() {
    let seconds = std::env::var("PHALANX_CHAOS_SECONDS").unwrap_or_else(|_| "25".into());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["bench", "delegation", "--node-count", "3", "--seconds", &seconds, "--check"])
        .env("PHALANX_LOG", "error,openraft=off")
        .output()
        .expect("run phalanx bench delegation");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the checker found violations:\n{stdout}");
    assert!(stdout.contains("violations: 0"), "{stdout}");
}

/// A submit's answer without its `traceparent` (a new trace context each
/// time a task is created; docs/api.md, "Tracing"), after checking it has one.
fn without_traceparent(mut answer: Value) -> Value {
    let traceparent = answer.as_object_mut().and_then(|fields| fields.remove("traceparent"));
    assert!(traceparent.as_ref().is_some_and(Value::is_string), "a submit answers its trace context: {answer}");
    answer
}
