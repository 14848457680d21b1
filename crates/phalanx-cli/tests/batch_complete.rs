//! Batch-first reports against real `phalanx server` processes (issue 16):
//! `POST /v1/tasks/complete` answers each result on its own and in order (a
//! stale fence in the middle of a batch refused alone) in one log entry;
//! `Prefer: return=minimal` on complete, fail, extend and the batch, also
//! through a follower; the Rust agent sends its results in batches and
//! every task ends succeeded.

mod common;

use common::{assert_error, wait_until, Cluster};
use phalanx_agent::{handler, Agent, AgentConfig, HandlerError, TaskContext};
use serde_json::{json, Value};
use std::time::Duration;

async fn submit(cluster: &Cluster, node: u64, count: usize) -> Vec<u64> {
    let tasks: Vec<Value> = (0..count).map(|i| json!({"queue": "q", "payload": i})).collect();
    let (status, body) = cluster.post(node, "/v1/tasks/batch", &json!({ "tasks": tasks })).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["results"].as_array().unwrap().iter().map(|r| r["task_id"].as_u64().unwrap()).collect()
}

/// Leases up to `count` tasks for a fresh agent: (task id, fence) in grant order.
async fn lease(cluster: &Cluster, node: u64, agent: &str, count: usize) -> Vec<(u64, u64)> {
    let register = json!({"agent_id": agent, "capabilities": ["q"], "capacity": count});
    let (status, session) = cluster.post(node, "/v1/agents/register", &register).await.unwrap();
    assert_eq!(status, 200, "{session}");
    let poll = json!({"epoch": session["epoch"], "session": session["session"], "max_tasks": count, "wait_ms": 1000});
    let (status, body) = cluster.post(node, &format!("/v1/agents/{agent}/poll"), &poll).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut leases: Vec<(u64, u64)> = body["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["task"]["id"].as_u64().unwrap(), l["fence"].as_u64().unwrap()))
        .collect();
    leases.sort();
    leases
}

async fn metric(cluster: &Cluster, node: u64, name: &str) -> u64 {
    let text = cluster.http.get(cluster.url(node, "/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in /metrics"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

async fn state(cluster: &Cluster, id: u64) -> Value {
    let (status, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(status, 200, "{task}");
    task
}

#[tokio::test]
async fn a_batch_of_results_is_answered_item_by_item_in_one_entry() {
    let cluster = Cluster::start(1, &[]).await;
    let ids = submit(&cluster, 1, 40).await;
    let leases = lease(&cluster, 1, "agent-a", 40).await;
    assert_eq!(leases.len(), 40);
    // Items: 38 good results, a stale fence in the middle, an unknown task,
    // and an item that does not parse, at the end.
    let mut items: Vec<Value> =
        leases.iter().map(|(id, fence)| json!({"task_id": id, "fence": fence, "result": {"id": id}})).collect();
    let (stale_id, stale_fence) = leases[20];
    items[20] = json!({"task_id": stale_id, "fence": stale_fence - 1, "result": "late"});
    items.push(json!({"task_id": 999_999, "fence": 1, "result": 1}));
    items.push(json!({"task_id": 7, "fence": "not a number"}));
    let entries_before = metric(&cluster, 1, "phalanx_log_entries_proposed_total").await;
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks/complete"))
        .header("prefer", "return=minimal")
        .json(&json!({ "results": items }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["preference-applied"], "return=minimal");
    let (status, body) = common::decode(response).await.unwrap();
    let entries = metric(&cluster, 1, "phalanx_log_entries_proposed_total").await - entries_before;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 42);
    for (i, (id, _)) in leases.iter().enumerate() {
        if i == 20 {
            assert_eq!(results[i]["task_id"], *id);
            assert_eq!(results[i]["error"]["code"], "superseded", "{}", results[i]);
            continue;
        }
        assert_eq!(results[i], json!({"task_id": id, "ok": true, "state": "succeeded"}));
    }
    assert_eq!(results[40]["task_id"], 999_999);
    assert_eq!(results[40]["error"]["code"], "task_not_found");
    assert_eq!(results[41]["task_id"], 7);
    assert_eq!(results[41]["error"]["code"], "invalid");
    // 39 results proposed in one entry (a tick may have been proposed meanwhile).
    assert!(entries <= 2, "{entries} entries for one batch");
    // The stale one changed nothing but its counter: the task is still leased under its fence.
    let stale = state(&cluster, stale_id).await;
    assert_eq!(stale["state"], "leased");
    assert_eq!(stale["superseded_count"], 1);
    assert_eq!(state(&cluster, ids[0]).await["result"], json!({"id": ids[0]}));
    // Sent again (an unknown outcome retried), the accepted ones answer ok again.
    let again = json!({"results": [{"task_id": leases[0].0, "fence": leases[0].1, "result": {"id": leases[0].0}}]});
    let (status, body) = cluster.post(1, "/v1/tasks/complete", &again).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["ok"], true, "{body}");
    // An empty batch, or a body that is not one, is refused as a whole.
    assert_error(&cluster.post(1, "/v1/tasks/complete", &json!({"results": []})).await.unwrap(), 400, "invalid");
    assert_error(&cluster.post(1, "/v1/tasks/complete", &json!({"tasks": []})).await.unwrap(), 400, "invalid");
}

#[tokio::test]
async fn return_minimal_answers_an_acknowledgement_through_a_follower_too() {
    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    submit(&cluster, leader, 3).await;
    let leases = lease(&cluster, follower, "agent-b", 3).await;
    assert_eq!(leases.len(), 3);
    let send = async |path: String, body: Value, minimal: bool| {
        let mut request = cluster.http.post(cluster.url(follower, &path)).json(&body);
        if minimal {
            request = request.header("prefer", "return=minimal");
        }
        let response = request.send().await.unwrap();
        let applied = response.headers().get("preference-applied").map(|v| v.to_str().unwrap().to_string());
        let (status, body) = common::decode(response).await.unwrap();
        assert_eq!(status, 200, "{body}");
        (body, applied)
    };
    let (a, b, c) = (leases[0], leases[1], leases[2]);
    let (body, applied) = send(format!("/v1/tasks/{}/extend", a.0), json!({"fence": a.1}), true).await;
    assert!(body["valid_until_ms"].as_u64().is_some() && applied.as_deref() == Some("return=minimal"));
    let (body, applied) = send(format!("/v1/tasks/{}/complete", a.0), json!({"fence": a.1, "result": 1}), true).await;
    assert_eq!(body, json!({"task_id": a.0, "state": "succeeded"}));
    assert_eq!(applied.as_deref(), Some("return=minimal"));
    let fail = json!({"fence": b.1, "error": "no", "retryable": false});
    let (body, applied) = send(format!("/v1/tasks/{}/fail", b.0), fail, true).await;
    assert_eq!(body, json!({"task_id": b.0, "state": "failed"}));
    assert_eq!(applied.as_deref(), Some("return=minimal"));
    // Without the preference: the whole task, as before.
    let (body, applied) = send(format!("/v1/tasks/{}/complete", c.0), json!({"fence": c.1, "result": 3}), false).await;
    assert_eq!((body["id"].as_u64(), &body["result"], applied), (Some(c.0), &json!(3), None));
}

#[tokio::test]
async fn the_rust_agent_sends_its_results_in_batches() {
    let cluster = Cluster::start(1, &[]).await;
    let ids = submit(&cluster, 1, 300).await;
    let mut config = AgentConfig::new(vec![cluster.addr(1).to_string()], "batcher", vec!["q".into()]);
    config.concurrency = 64;
    config.poll_wait_ms = 200;
    let agent = Agent::new(
        config,
        handler(|context: TaskContext| async move { Ok::<Value, HandlerError>(json!({"done": context.task.id})) }),
    )
    .unwrap();
    let commands_before = metric(&cluster, 1, "phalanx_commands_proposed_total").await;
    let requests_before = metric(&cluster, 1, "phalanx_http_requests_total").await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.clone().run_until(async move {
        let _ = stopped.await;
    }));
    wait_until(Duration::from_secs(30), "every task succeeded", async || {
        agent.stats.completed.load(std::sync::atomic::Ordering::Relaxed) == 300
    })
    .await;
    let requests = metric(&cluster, 1, "phalanx_http_requests_total").await - requests_before;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    for id in [ids[0], ids[150], ids[299]] {
        let task = state(&cluster, id).await;
        assert_eq!((task["state"].as_str(), &task["result"]), (Some("succeeded"), &json!({"done": id})));
    }
    assert!(metric(&cluster, 1, "phalanx_commands_proposed_total").await - commands_before >= 300);
    // Results share requests: fewer batch requests than results (how many
    // share one depends on how the handlers' ends fall within 5 ms).
    let batches = agent.complete_requests();
    assert!(batches > 0 && batches < 300, "{batches} batch requests for 300 results ({requests} requests in all)");
}

/// docs/sdk.md, 3: the Rust SDK's `SubmitBatcher` sends concurrent submits
/// together in `POST /v1/tasks/batch`; each caller hears its own task, a key
/// given twice names one task, and a key reused with another payload is
/// refused alone.
#[tokio::test]
async fn the_submit_batcher_answers_each_caller_with_its_own_task() {
    use phalanx_agent::{Client, SubmitBatcher, SubmitRequest};
    use std::sync::Arc;
    let cluster = Cluster::start(1, &[]).await;
    let client = Arc::new(Client::new(vec![cluster.addr(1).to_string()], None).unwrap());
    client.submit(&SubmitRequest::new("q", json!("taken")).with_idempotency_key("conflict")).await.unwrap();
    let batcher = Arc::new(SubmitBatcher::default());
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..99 {
        let (batcher, client) = (batcher.clone(), client.clone());
        calls.spawn(async move { (i, batcher.submit(&client, SubmitRequest::new("q", json!(i))).await) });
    }
    for (name, payload, key) in [("first", json!("same"), "same"), ("again", json!("same"), "same")] {
        let (batcher, client) = (batcher.clone(), client.clone());
        let request = SubmitRequest::new("q", payload).with_idempotency_key(key);
        calls.spawn(async move { (if name == "first" { 100 } else { 101 }, batcher.submit(&client, request).await) });
    }
    let conflicting = SubmitRequest::new("q", json!("other")).with_idempotency_key("conflict");
    let (batcher_, client_) = (batcher.clone(), client.clone());
    calls.spawn(async move { (102, batcher_.submit(&client_, conflicting).await) });
    let mut answers = std::collections::BTreeMap::new();
    while let Some(joined) = calls.join_next().await {
        let (i, answer) = joined.unwrap();
        answers.insert(i, answer);
    }
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..99 {
        let submitted = answers[&i].as_ref().unwrap_or_else(|e| panic!("submit {i}: {e}"));
        assert!(!submitted.deduplicated);
        assert!(ids.insert(submitted.task_id), "each caller its own task");
        assert_eq!(state(&cluster, submitted.task_id).await["payload"], json!(i));
    }
    let (first, again) = (answers[&100].as_ref().unwrap(), answers[&101].as_ref().unwrap());
    assert_eq!(first.task_id, again.task_id, "one key, one task");
    assert!(first.deduplicated || again.deduplicated);
    let refused = answers[&102].as_ref().unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");
    let requests = batcher.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!((2..=4).contains(&requests), "102 submits in {requests} requests");
    assert_eq!(batcher.waiting(), 0, "every caller answered and forgotten");
}
