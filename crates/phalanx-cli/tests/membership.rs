//! Membership at run time on real processes: a node added through the API
//! (learner, then voter) catches up by snapshot; a removed node's id is never
//! accepted again; a node that was down through many snapshots rejoins; a
//! node that does not answer is not added at all; a snapshot that takes long
//! to install is sent once, not again and again.

mod common;

use common::{assert_error, free_port, Cluster, Server};
use serde_json::json;
use std::time::{Duration, Instant};

async fn submit_many(cluster: &Cluster, node: u64, count: usize, tag: &str) {
    for chunk in 0..count / 50 {
        let tasks: Vec<_> = (0..50).map(|i| json!({"queue": "m", "payload": format!("{tag}-{chunk}-{i}")})).collect();
        let (status, body) = cluster.post(node, "/v1/tasks/batch", &json!({ "tasks": tasks })).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

async fn applied(cluster: &Cluster, node: u64) -> u64 {
    cluster.get(node, "/v1/cluster").await.unwrap().1["last_applied"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_by_snapshot_leave_for_good_and_rejoin_after_many_snapshots() {
    // Snapshots every 20 entries, so a late node must catch up by snapshot.
    let extra = ["--snapshot-logs-since-last", "20", "--snapshot-logs-kept", "0"];
    let mut cluster = Cluster::start(3, &extra).await;
    submit_many(&cluster, 1, 500, "before").await;

    // Node 4 joins at run time.
    let addr = format!("127.0.0.1:{}", free_port());
    let raft_addr = format!("127.0.0.1:{}", free_port());
    let mut node4 = Server {
        id: 4,
        addr: addr.clone(),
        raft_addr: raft_addr.clone(),
        data_dir: cluster.dir.path().join("node-4"),
        peers: String::new(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        child: None,
    };
    // A joining node is started without --peers and initialises nothing: it waits to be contacted.
    node4.extra.extend(["--advertise".to_string(), addr.clone()]);
    node4.peers = format!("1={}/{},4={addr}/{raft_addr}", cluster.addr(1), cluster.servers[&1].raft_addr);
    node4.spawn();
    cluster.servers.insert(4, node4);
    // A node is added only once it answers.
    let start = Instant::now();
    while cluster.http.get(format!("http://{addr}/health/live")).send().await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "node 4 did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"node_id": 4, "addr": addr, "raft_addr": raft_addr});
    let (status, body) = cluster.post(2, "/v1/cluster/members", &body).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    let members: Vec<u64> = info["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect();
    assert_eq!(members, [1, 2, 3, 4]);
    let start = Instant::now();
    while applied(&cluster, 4).await < applied(&cluster, 1).await {
        assert!(start.elapsed() < Duration::from_secs(30), "node 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, task) = cluster.get(4, "/v1/tasks/1?stale=true").await.unwrap();
    assert_eq!(task["payload"], "before-0-0", "node 4 holds the state from before it joined");

    // Node 3 is removed; its id can never come back.
    let response = cluster.http.delete(cluster.url(1, "/v1/cluster/members/3")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    cluster.servers.get_mut(&3).unwrap().kill9();
    let again = cluster.post(1, "/v1/cluster/members", &json!({"node_id": 3, "addr": cluster.addr(3)})).await.unwrap();
    assert_error(&again, 409, "node_id_reused");

    // Node 2 goes down through many snapshots, then comes back and catches up.
    cluster.servers.get_mut(&2).unwrap().kill9();
    // One entry per submit: 300 entries, about fifteen snapshots, while node 2 is down.
    for i in 0..300 {
        let (status, _) =
            cluster.post(1, "/v1/tasks", &json!({"queue": "m", "payload": format!("down-{i}")})).await.unwrap();
        assert_eq!(status, 201);
    }
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert!(info["snapshot_index"].as_u64().unwrap() > 250, "snapshots were taken: {info}");
    cluster.servers.get_mut(&2).unwrap().spawn();
    let start = Instant::now();
    loop {
        if let Ok((200, info)) = cluster.get(2, "/v1/cluster").await {
            if info["last_applied"].as_u64().unwrap_or(0) >= applied(&cluster, 1).await {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "node 2 did not rejoin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, listed) = cluster.get(2, "/v1/tasks?stale=true&queue=m&state=pending&limit=1000").await.unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 800, "every task is on the rejoined node");
}

#[tokio::test]
async fn a_node_that_does_not_answer_is_not_added() {
    let cluster = Cluster::start(1, &[]).await;
    // Nothing runs at this address.
    let addr = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let answer = cluster.post(1, "/v1/cluster/members", &json!({"node_id": 9, "addr": addr})).await.unwrap();
    assert_error(&answer, 409, "member_unreachable");
    assert!(start.elapsed() < Duration::from_secs(5));
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert_eq!(info["nodes"].as_array().unwrap().len(), 1, "not even a learner: {info}");
    // The one voter still commits on its own.
    let (status, _) = cluster.post(1, "/v1/tasks", &json!({"queue": "m", "payload": "after"})).await.unwrap();
    assert_eq!(status, 201);
}

/// The node's counter `name` (`/metrics`), or 0.
async fn counter(cluster: &Cluster, node: u64, name: &str) -> u64 {
    let text = cluster.http.get(cluster.url(node, "/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(&format!("{name} "))?.parse().ok()).unwrap_or(0)
}

/// Installing a snapshot takes time that grows with the state (decoding,
/// fsync; about 1.5 s per million tasks). The leader waits for it
/// (`snapshot_install_timeout_ms`) instead of giving up after openraft's
/// 200 ms and sending the snapshot again and again while the first is still
/// being installed. The install is held for 1.5 s here (the apply stall
/// failpoint, which holds installs too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_takes_long_to_install_is_sent_once() {
    let extra = ["--snapshot-logs-since-last", "20", "--snapshot-logs-kept", "0"];
    let mut cluster = Cluster::start(1, &extra).await;
    // 50 entries: snapshots taken, the log behind them purged.
    submit_many(&cluster, 1, 2500, "before").await;
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert!(info["snapshot_index"].as_u64().unwrap() >= 30, "snapshots were taken: {info}");

    let addr = format!("127.0.0.1:{}", free_port());
    let raft_addr = format!("127.0.0.1:{}", free_port());
    let data_dir = cluster.dir.path().join("node-2");
    std::fs::create_dir_all(&data_dir).unwrap();
    let stall = data_dir.join("failpoint-stall-apply");
    std::fs::write(&stall, b"").unwrap();
    let mut node2 = Server {
        id: 2,
        addr: addr.clone(),
        raft_addr: raft_addr.clone(),
        data_dir,
        peers: format!("1={}/{},2={addr}/{raft_addr}", cluster.addr(1), cluster.servers[&1].raft_addr),
        extra: extra.iter().map(|s| s.to_string()).chain(["--advertise".to_string(), addr.clone()]).collect(),
        child: None,
    };
    node2.spawn();
    cluster.servers.insert(2, node2);
    let start = Instant::now();
    while cluster.http.get(format!("http://{addr}/health/live")).send().await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "node 2 did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The add waits for the learner, which cannot install yet: not awaited here.
    let add = {
        let (http, url) = (cluster.http.clone(), cluster.url(1, "/v1/cluster/members"));
        let body = json!({"node_id": 2, "addr": addr, "raft_addr": raft_addr});
        tokio::spawn(async move { http.post(url).json(&body).send().await.map(|answer| answer.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::remove_file(&stall).unwrap();
    let start = Instant::now();
    while applied(&cluster, 2).await < applied(&cluster, 1).await {
        assert!(start.elapsed() < Duration::from_secs(30), "node 2 did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), add).await;
    // Late retries of the leader would show up a little after the install.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter(&cluster, 2, "phalanx_snapshots_installed_total").await, 1);
    assert_eq!(
        counter(&cluster, 2, "phalanx_snapshots_received_total").await,
        1,
        "the leader sent the snapshot once, and waited for its install"
    );
}
