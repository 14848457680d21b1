//! Flow control (docs/api.md, "Flow control") as real nodes serve it: a
//! key's `concurrency_max` holds however an agent polls, a task held back
//! says why, pause, resume and replay over HTTP and the CLI, a budget that
//! pauses a tree and a raise that resumes it, writes sent to a follower, and
//! bad input refused as JSON without changing anything.
//!
//! The decisions themselves are the core's (`phalanx-core/tests/flow.rs`
//! and its property tests); these tests check the edge and the wiring.

mod common;

use common::{assert_error, wait_for, Cluster};
use serde_json::{json, Value};
use std::process::{Command, Output};
use std::time::Duration;

/// An agent session on node `node`: (agent id, epoch, session secret).
struct Session {
    agent_id: String,
    epoch: u64,
    session: Value,
}

async fn register(cluster: &Cluster, node: u64, agent_id: &str, queues: &[&str], capacity: u32) -> Session {
    let body = json!({"agent_id": agent_id, "capabilities": queues, "capacity": capacity});
    let (status, answer) = cluster.post(node, "/v1/agents/register", &body).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    Session { agent_id: agent_id.into(), epoch: answer["epoch"].as_u64().unwrap(), session: answer["session"].clone() }
}

/// One poll that does not wait: the leases it got.
async fn poll(cluster: &Cluster, node: u64, agent: &Session, max_tasks: u32) -> Vec<Value> {
    let body = json!({"epoch": agent.epoch, "session": agent.session, "max_tasks": max_tasks, "wait_ms": 0});
    let (status, answer) = cluster.post(node, &format!("/v1/agents/{}/poll", agent.agent_id), &body).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer["leases"].as_array().unwrap().clone()
}

async fn submit(cluster: &Cluster, node: u64, body: Value) -> u64 {
    let (status, answer) = cluster.post(node, "/v1/tasks", &body).await.unwrap();
    assert_eq!(status, 201, "{answer}");
    answer["task_id"].as_u64().unwrap()
}

async fn task(cluster: &Cluster, id: u64) -> Value {
    let (status, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(status, 200, "{task}");
    task
}

async fn delete(cluster: &Cluster, node: u64, path: &str) -> (u16, Value) {
    common::decode(cluster.http.delete(cluster.url(node, path)).send().await.unwrap()).await.unwrap()
}

/// A node that is not the leader, for writes that must be forwarded.
async fn follower(cluster: &Cluster) -> u64 {
    let leader = wait_for(Duration::from_secs(10), "a leader", async || cluster.leader().await).await;
    *cluster.servers.keys().find(|id| **id != leader).unwrap()
}

#[tokio::test]
async fn concurrency_max_holds_and_a_held_back_task_says_why() {
    let cluster = Cluster::start(3, &[]).await;
    let node = follower(&cluster).await;
    // Set through a follower: the write is forwarded to the leader.
    let (status, rule) = cluster.put(node, "/v1/limits/tenant:a", &json!({"concurrency_max": 2})).await;
    assert_eq!(status, 200, "{rule}");
    assert_eq!(rule, json!({"key": "tenant:a", "limits": {"concurrency_max": 2}}));
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(submit(&cluster, node, json!({"queue": "q", "payload": i, "concurrency_key": "tenant:a"})).await);
    }
    let other = submit(&cluster, node, json!({"queue": "q", "payload": "b", "concurrency_key": "tenant:b"})).await;
    let agent = register(&cluster, node, "wide", &["q"], 20).await;
    // An agent with room for twenty gets two of tenant:a and the one of tenant:b.
    let leases = poll(&cluster, node, &agent, 20).await;
    let keys: Vec<&str> = leases.iter().map(|l| l["task"]["concurrency_key"].as_str().unwrap()).collect();
    assert_eq!(keys.iter().filter(|k| **k == "tenant:a").count(), 2, "{keys:?}");
    assert!(leases.iter().any(|l| l["task"]["id"] == other));
    let pending = *ids.iter().find(|id| !leases.iter().any(|l| l["task"]["id"] == **id)).unwrap();
    let waiting = task(&cluster, pending).await;
    assert_eq!(waiting["state"], "pending");
    assert_eq!(waiting["waiting_on"], json!({"key": "tenant:a", "limit": "concurrency_max", "rule": "tenant:a"}));
    let (_, status_body) = cluster.get(node, "/v1/status").await.unwrap();
    let key = status_body["keys"].as_array().unwrap().iter().find(|k| k["key"] == "tenant:a").unwrap().clone();
    assert_eq!((key["held"].as_u64(), key["open_tasks"].as_u64()), (Some(2), Some(6)), "{key}");
    // Finishing one at a time: each poll gets at most what the limit leaves,
    // and the key never holds more than two.
    let mut held: Vec<Value> = leases.into_iter().filter(|l| l["task"]["concurrency_key"] == "tenant:a").collect();
    let mut done = 0;
    while done < ids.len() {
        let lease = held.remove(0);
        let id = lease["task"]["id"].as_u64().unwrap();
        let (status, answer) = cluster
            .post(node, &format!("/v1/tasks/{id}/complete"), &json!({"fence": lease["fence"], "result": "ok"}))
            .await
            .unwrap();
        assert_eq!(status, 200, "{answer}");
        done += 1;
        held.extend(poll(&cluster, node, &agent, 20).await);
        assert!(held.len() <= 2, "tenant:a holds {} leases, over its concurrency_max of 2", held.len());
        let (_, key) = cluster.get(node, "/v1/limits/tenant:a").await.unwrap();
        assert!(key["held"].as_u64().unwrap() <= 2, "{key}");
    }
    assert!(held.is_empty());
}

#[tokio::test]
async fn pause_resume_and_replay_over_http() {
    let cluster = Cluster::start(1, &[]).await;
    let id = submit(&cluster, 1, json!({"queue": "q", "payload": 1, "max_attempts": 1})).await;
    let (status, paused) = cluster.post(1, &format!("/v1/tasks/{id}/pause"), &json!({})).await.unwrap();
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["pause"]["cause"], "operator");
    let agent = register(&cluster, 1, "a", &["q"], 4).await;
    assert!(poll(&cluster, 1, &agent, 4).await.is_empty(), "a paused task is not granted");
    let (status, resumed) = cluster.post(1, &format!("/v1/tasks/{id}/resume"), &json!({})).await.unwrap();
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "pending");
    assert_error(&cluster.post(1, &format!("/v1/tasks/{id}/resume"), &json!({})).await.unwrap(), 409, "not_paused");

    // A task that uses its one attempt dies; a replay brings it back with its
    // trail, its attempts counted anew, and a fresh fence.
    let leases = poll(&cluster, 1, &agent, 4).await;
    assert_eq!(leases.len(), 1);
    let first_fence = leases[0]["fence"].as_u64().unwrap();
    let (status, _) = cluster
        .post(1, &format!("/v1/tasks/{id}/fail"), &json!({"fence": first_fence, "error": "boom"}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dead = id;
    let before = task(&cluster, dead).await;
    assert_eq!(before["state"], "dead", "{before}");
    let (status, replayed) =
        cluster.post(1, "/v1/tasks/replay", &json!({"state": "dead", "queue": "q", "limit": 10})).await.unwrap();
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["task_ids"], json!([dead]));
    let after = task(&cluster, dead).await;
    assert_eq!(
        (after["state"].as_str(), after["attempts"].as_u64(), after["replays"].as_u64()),
        (Some("pending"), Some(0), Some(1))
    );
    assert_eq!(after["trail"], before["trail"], "the trail is kept");
    let lease =
        wait_for(Duration::from_secs(10), "the replayed task", async || poll(&cluster, 1, &agent, 4).await.pop()).await;
    assert!(lease["fence"].as_u64().unwrap() > before["last_fence"].as_u64().unwrap(), "a fresh fence");
    // Nothing dead is left; a succeeded task is never replayed.
    let (_, again) = cluster.post(1, "/v1/tasks/replay", &json!({"state": "dead", "limit": 10})).await.unwrap();
    assert_eq!(again["task_ids"], json!([]));
    assert_error(
        &cluster.post(1, "/v1/tasks/replay", &json!({"state": "succeeded", "limit": 10})).await.unwrap(),
        400,
        "invalid",
    );
}

#[tokio::test]
async fn a_budget_pauses_its_tree_and_a_raise_resumes_it() {
    let cluster = Cluster::start(1, &[]).await;
    let root = submit(&cluster, 1, json!({"queue": "plan", "payload": 1, "budget": {"tokens_max": 100}})).await;
    let agent = register(&cluster, 1, "planner", &["plan"], 1).await;
    let lease = poll(&cluster, 1, &agent, 1).await.pop().unwrap();
    let fence = lease["fence"].as_u64().unwrap();
    let child =
        submit(&cluster, 1, json!({"queue": "work", "payload": "step", "parent_id": root, "parent_fence": fence}))
            .await;
    let usage = json!({"tokens_in": 80, "tokens_out": 40, "cost": 7});
    let (status, done) = cluster
        .post(1, &format!("/v1/tasks/{root}/complete"), &json!({"fence": fence, "result": "planned", "usage": usage}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["usage"], usage);
    let paused = task(&cluster, child).await;
    assert_eq!(
        (paused["state"].as_str(), paused["pause"]["cause"].as_str()),
        (Some("paused"), Some("budget")),
        "{paused}"
    );
    let (_, status_body) = cluster.get(1, "/v1/status").await.unwrap();
    let tree = status_body["trees"].as_array().unwrap().iter().find(|t| t["root_id"] == root).unwrap().clone();
    assert_eq!(tree["usage"], usage);
    assert_eq!(tree["budget"], json!({"tokens_max": 100}));
    assert!(tree["exhausted"].is_string(), "{tree}");
    assert_error(
        &cluster.post(1, &format!("/v1/tasks/{child}/resume"), &json!({})).await.unwrap(),
        409,
        "budget_exhausted",
    );
    // A budget is a root's: a child's is refused.
    assert_error(
        &cluster.put(1, &format!("/v1/tasks/{child}/budget"), &json!({"budget": {"tokens_max": 5}})).await,
        400,
        "invalid",
    );
    let (status, raised) =
        cluster.put(1, &format!("/v1/tasks/{root}/budget"), &json!({"budget": {"tokens_max": 1000}})).await;
    assert_eq!(status, 200, "{raised}");
    assert_eq!(raised["resumed"], json!([child]));
    assert_eq!(task(&cluster, child).await["state"], "pending");
}

#[tokio::test]
async fn bad_input_is_refused_as_json_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    for body in [
        json!({"concurrency_max": 0}),
        json!({"concurrency_max": -1}),
        json!({"rate_per_second": -1.5}),
        json!({"rate_per_second": 0.0001}),
        json!({"rate_per_second": "fast"}),
        json!({"burst": 3}),
        json!({"weight": 1001}),
        json!({"tokens_per_minute": 0}),
        json!({"concurrency": 3}),
    ] {
        assert_error(&cluster.put(1, "/v1/limits/tenant:a", &body).await, 400, "invalid");
    }
    let malformed = cluster
        .http
        .put(cluster.url(1, "/v1/limits/tenant:a"))
        .header("content-type", "application/json")
        .body("{\"weight\": ")
        .send()
        .await
        .unwrap();
    assert_error(&common::decode(malformed).await.unwrap(), 400, "malformed_json");
    assert_error(&cluster.put(1, "/v1/limits/bad key", &json!({"weight": 1})).await, 400, "invalid");
    let (_, table) = cluster.get(1, "/v1/limits").await.unwrap();
    assert_eq!(table, json!({"rules": [], "keys": []}), "nothing was set");
    assert_error(&delete(&cluster, 1, "/v1/limits/tenant:a").await, 404, "not_found");
    assert_error(&cluster.get(1, "/v1/limits/tenant:a").await.unwrap(), 404, "not_found");
    assert_error(&cluster.post(1, "/v1/tasks/99/pause", &json!({})).await.unwrap(), 404, "task_not_found");
    assert_error(&cluster.post(1, "/v1/tasks/x/resume", &json!({})).await.unwrap(), 400, "invalid");
    assert_error(&cluster.put(1, "/v1/tasks/99/budget", &json!({"budget": null})).await, 404, "task_not_found");
    for body in [json!({"state": "dead", "limit": 0}), json!({"state": "dead"}), json!({"state": "zombie", "limit": 1})]
    {
        assert_error(&cluster.post(1, "/v1/tasks/replay", &body).await.unwrap(), 400, "invalid");
    }
    let (status, answer) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "q", "budget": {"tokens_max": 0}})).await.unwrap();
    assert_eq!(status, 400, "{answer}");
    // A wildcard in the path, percent-encoded, is the table's key as written.
    let (status, rule) = cluster.put(1, "/v1/limits/tenant%3A%2A", &json!({"rate_per_second": 2.5, "burst": 5})).await;
    assert_eq!(status, 200, "{rule}");
    let (_, table) = cluster.get(1, "/v1/limits").await.unwrap();
    assert_eq!(table["rules"], json!([{"key": "tenant:*", "limits": {"rate_per_second": 2.5, "burst": 5}}]));
    let (status, applied) = cluster.get(1, "/v1/limits/tenant:zz").await.unwrap();
    assert_eq!((status, applied["rule"].as_str()), (200, Some("tenant:*")), "{applied}");
    let (status, _) = delete(&cluster, 1, "/v1/limits/tenant:*").await;
    assert_eq!(status, 200);
}

fn phalanx(cluster: &Cluster, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PHALANX_")) {
        command.env_remove(name);
    }
    command.args(args).args(["--nodes", cluster.addr(1)]).output().expect("phalanx runs")
}

fn ok(output: Output) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    assert!(output.status.success(), "{}: {}{}", output.status, text(&output.stdout), text(&output.stderr));
    text(&output.stdout)
}

#[tokio::test]
async fn limits_pause_resume_and_replay_from_the_cli() {
    let cluster = Cluster::start(1, &[]).await;
    let set =
        ok(phalanx(&cluster, &["limits", "set", "tenant:*", "concurrency_max=1", "rate_per_second=0.5", "weight=2"]));
    assert_eq!(set.trim(), "tenant:*: concurrency_max=1 rate_per_second=0.5 weight=2");
    let refused = phalanx(&cluster, &["limits", "set", "tenant:*", "speed=3"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown field"));
    let refused = phalanx(&cluster, &["limits", "set", "tenant:*", "weight=0"]);
    assert!(!refused.status.success(), "the node refuses a weight of 0");
    let submitted = ok(phalanx(
        &cluster,
        &[
            "task",
            "submit",
            "--queue",
            "q",
            "--concurrency-key",
            "tenant:x",
            "--cost-estimate",
            "10",
            "--budget-tokens",
            "500",
        ],
    ));
    let first: u64 = submitted.trim().parse().unwrap();
    let second: u64 = ok(phalanx(&cluster, &["task", "submit", "--queue", "q", "--concurrency-key", "tenant:x"]))
        .trim()
        .parse()
        .unwrap();
    let agent = register(&cluster, 1, "a", &["q"], 4).await;
    assert_eq!(poll(&cluster, 1, &agent, 4).await.len(), 1, "concurrency_max=1 for each tenant key");
    let shown = ok(phalanx(&cluster, &["task", "get", &second.to_string()]));
    assert!(shown.contains("waiting on:  concurrency_max of key tenant:x (rule tenant:*)"), "{shown}");
    let listed: Value = serde_json::from_str(&ok(phalanx(&cluster, &["--json", "limits", "list"]))).unwrap();
    assert_eq!(listed["rules"][0]["key"], "tenant:*");
    assert_eq!(listed["keys"][0]["held"], 1);
    let got = ok(phalanx(&cluster, &["limits", "get", "tenant:x"]));
    assert!(got.contains("(from rule tenant:*)"), "{got}");
    let status = ok(phalanx(&cluster, &["status"]));
    assert!(status.contains("tenant:x") && status.contains("1/1"), "{status}");

    assert_eq!(ok(phalanx(&cluster, &["task", "pause", &second.to_string()])).trim(), format!("task {second}: paused"));
    assert_eq!(task(&cluster, second).await["state"], "paused");
    let replayed = ok(phalanx(&cluster, &["task", "replay", "--state", "paused", "--key", "tenant:x", "--limit", "5"]));
    assert_eq!(replayed.trim(), format!("replayed 1 tasks: {second}"));
    ok(phalanx(&cluster, &["task", "pause", &second.to_string()]));
    assert_eq!(
        ok(phalanx(&cluster, &["task", "resume", &second.to_string()])).trim(),
        format!("task {second}: pending")
    );
    let refused = phalanx(&cluster, &["task", "resume", &second.to_string()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_paused"), "{refused:?}");
    let budget = ok(phalanx(&cluster, &["task", "budget", &first.to_string(), "--tokens", "900"]));
    assert_eq!(budget.trim(), format!("task {first}: budget set"));
    assert_eq!(task(&cluster, first).await["budget"], json!({"tokens_max": 900}));
    assert_eq!(
        ok(phalanx(&cluster, &["task", "replay", "--state", "dead", "--limit", "5"])).trim(),
        "no task replayed"
    );
    assert_eq!(ok(phalanx(&cluster, &["limits", "delete", "tenant:*"])).trim(), "tenant:*: deleted");
}

/// The limits and the leases they count are replicated state: a new leader
/// grants no more of a key than the old one had left.
#[tokio::test]
async fn limits_survive_a_leader_kill() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = wait_for(Duration::from_secs(10), "a leader", async || cluster.leader().await).await;
    let (status, rule) = cluster.put(leader, "/v1/limits/tenant:a", &json!({"concurrency_max": 2})).await;
    assert_eq!(status, 200, "{rule}");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&cluster, leader, json!({"queue": "q", "payload": i, "concurrency_key": "tenant:a"})).await);
    }
    let agent = register(&cluster, leader, "holder", &["q"], 10).await;
    let body =
        json!({"epoch": agent.epoch, "session": agent.session, "max_tasks": 10, "wait_ms": 0, "lease_ttl_ms": 60_000});
    let (status, answer) = cluster.post(leader, "/v1/agents/holder/poll", &body).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let mut held = answer["leases"].as_array().unwrap().clone();
    assert_eq!(held.len(), 2, "{answer}");

    cluster.servers.get_mut(&leader).unwrap().kill9();
    let survivor = *cluster.servers.keys().find(|id| **id != leader).unwrap();
    let new_leader =
        wait_for(Duration::from_secs(10), "a new leader", async || cluster.leader().await.filter(|id| *id != leader))
            .await;
    // Polls through the failover and after it: nothing more of tenant:a.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        if let Ok((200, answer)) = cluster.post(survivor, "/v1/agents/holder/poll", &body).await {
            let got = answer["leases"].as_array().unwrap();
            assert!(got.is_empty(), "the new leader granted {} more of tenant:a: {answer}", got.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, key) = cluster.get(new_leader, "/v1/limits/tenant:a").await.unwrap();
    assert_eq!(key["held"], 2, "{key}");
    // A lease ends: exactly one more is granted.
    let lease = held.remove(0);
    let id = lease["task"]["id"].as_u64().unwrap();
    let (status, answer) = cluster
        .post(new_leader, &format!("/v1/tasks/{id}/complete"), &json!({"fence": lease["fence"], "result": "ok"}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = cluster.post(new_leader, "/v1/agents/holder/poll", &body).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["leases"].as_array().unwrap().len(), 1, "{answer}");
}
