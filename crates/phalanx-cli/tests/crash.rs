//! Durability of a one-node cluster: everything acknowledged before a SIGKILL
//! is there after a restart from the same data directory, including after
//! snapshots compacted the log.

mod common;

use common::Cluster;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test]
async fn acknowledged_tasks_survive_sigkill_and_restart() {
    // A small snapshot threshold so the restart goes through snapshot + log replay.
    let mut cluster = Cluster::start(1, &["--snapshot-logs-since-last", "50"]).await;
    let mut acknowledged = BTreeMap::new();
    for i in 0..120 {
        let (status, body) =
            cluster.post(1, "/v1/tasks", &json!({"queue": "work", "payload": {"i": i}})).await.unwrap();
        assert_eq!(status, 201, "{body}");
        acknowledged.insert(body["task_id"].as_u64().unwrap(), i);
    }
    let (_, registered) = cluster
        .post(1, "/v1/agents/register", &json!({"agent_id": "w1", "capabilities": ["work"], "capacity": 10}))
        .await
        .unwrap();
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].clone();
    let (_, polled) = cluster
        .post(1, "/v1/agents/w1/poll", &json!({"epoch": epoch, "session": session, "max_tasks": 10, "wait_ms": 1000}))
        .await
        .unwrap();
    let leases = polled["leases"].as_array().unwrap().clone();
    assert_eq!(leases.len(), 10);
    let mut completed = BTreeMap::new();
    for lease in &leases[..5] {
        let id = lease["task"]["id"].as_u64().unwrap();
        let fence = lease["fence"].as_u64().unwrap();
        let (status, _) =
            cluster.post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence, "result": id})).await.unwrap();
        assert_eq!(status, 200);
        completed.insert(id, fence);
    }

    cluster.servers.get_mut(&1).unwrap().kill9();
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;

    for (id, i) in &acknowledged {
        let (status, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(status, 200, "task {id} lost after restart: {task}");
        assert_eq!(task["payload"], json!({"i": i}));
        if completed.contains_key(id) {
            assert_eq!(task["state"], "succeeded");
            assert_eq!(task["result"], json!(id));
        }
    }
    // Leases survive too: the held-but-unfinished ones can still be completed with their fence.
    for lease in &leases[5..] {
        let id = lease["task"]["id"].as_u64().unwrap();
        let fence = lease["fence"].as_u64().unwrap();
        let (status, task) =
            cluster.post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": fence, "result": 0})).await.unwrap();
        assert_eq!(status, 200, "{task}");
    }
    let (_, metrics) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert!(metrics["snapshot_index"].as_u64().unwrap_or(0) > 0, "a snapshot was taken: {metrics}");
}
