//! No single request, admin call or setting can take the cluster down: forged
//! Raft RPCs, a claimed `X-Phalanx-Forwarded`, start-up without a peer token
//! and membership calls that would brick the cluster, each against real
//! `phalanx` processes.

mod common;

use common::{assert_error, decode, free_port, wait_until, Cluster, Server, PEER_TOKEN};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use phalanx_core::{Command, NewTask, Request};
use phalanx_server::raft_types::TypeConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn raft_post(cluster: &Cluster, id: u64, route: &str, token: Option<&str>, body: String) -> (u16, Value) {
    let url = format!("http://{}/raft/{route}", cluster.servers[&id].raft_addr);
    let mut request = cluster.http.post(url).header("content-type", "application/json").body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    decode(request.send().await.unwrap()).await.unwrap()
}

fn forged_submit(term: u64, leader: u64, prev_index: u64, payload: &str) -> String {
    let task = NewTask::new("forged", payload);
    let prev = LogId::new(CommittedLeaderId::new(term, leader), prev_index);
    let entry: Entry<TypeConfig> = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, leader), prev_index + 1),
        payload: EntryPayload::Normal(Request { now_ms: 1, commands: vec![Command::Submit { tasks: vec![task] }] }),
    };
    let request: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote: Vote::new_committed(term, leader),
        prev_log_id: Some(prev),
        entries: vec![entry],
        leader_commit: Some(LogId::new(CommittedLeaderId::new(term, leader), prev_index + 1)),
    };
    serde_json::to_string(&request).unwrap()
}

async fn all_ready_with(cluster: &Cluster, task_id: u64) {
    for id in cluster.servers.keys() {
        cluster.wait_ready(*id, Duration::from_secs(10)).await;
        let (status, task) = cluster.get(*id, &format!("/v1/tasks/{task_id}")).await.unwrap();
        assert_eq!(status, 200, "node {id}: {task}");
        assert_eq!(task["payload"], json!({"kept": true}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_requests_neither_crash_nor_rewrite_the_cluster() {
    let cluster = Cluster::start(3, &[]).await;
    let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": {"kept": true}})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let task_id = body["task_id"].as_u64().unwrap();
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    let leader = info["leader_id"].as_u64().unwrap();
    let term = info["term"].as_u64().unwrap();

    let huge_vote = serde_json::to_string(&VoteRequest { vote: Vote::new(u64::MAX, 2), last_log_id: None }).unwrap();
    for id in 1..=3 {
        // Without the peer token nothing reaches openraft.
        let answer = raft_post(&cluster, id, "vote", None, huge_vote.clone()).await;
        assert_error(&answer, 401, "unauthorized");
        // With it (a peer's bug, or a leaked token), an implausible term is
        // refused at the edge instead of overflowing openraft's arithmetic.
        let answer = raft_post(&cluster, id, "vote", Some(PEER_TOKEN), huge_vote.clone()).await;
        assert_error(&answer, 400, "invalid");
        let answer = raft_post(&cluster, id, "append", Some(PEER_TOKEN), "{\"vote\": 1".into()).await;
        assert_error(&answer, 400, "malformed_raft_request");
        // An append that follows the real log, from the real leader, but whose
        // command does not decode into what the state machine serves.
        let (_, info) = cluster.get(id, "/v1/cluster?stale=true").await.unwrap();
        let last = info["last_log_index"].as_u64().unwrap();
        let forged = forged_submit(term, leader, last, "not json {");
        let answer = raft_post(&cluster, id, "append", Some(PEER_TOKEN), forged).await;
        assert_error(&answer, 400, "invalid");
        assert!(answer.1["error"]["message"].as_str().unwrap().contains("not JSON"), "{answer:?}");
    }
    all_ready_with(&cluster, task_id).await;
    let (_, listed) = cluster.get(1, "/v1/tasks?queue=forged").await.unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 0, "no forged task was committed: {listed}");
    let (status, _) = cluster.post(2, "/v1/tasks", &json!({"queue": "q", "payload": 2})).await.unwrap();
    assert_eq!(status, 201, "the cluster still takes writes");
}

#[tokio::test]
async fn a_claimed_forward_needs_the_peer_token() {
    let cluster = Cluster::start(1, &["--client-rate-per-second", "1", "--client-burst", "1"]).await;
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks"))
        .header("x-phalanx-forwarded", "2")
        .json(&json!({"queue": "q", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_error(&decode(response).await.unwrap(), 401, "unauthorized");
    let (_, listed) = cluster.get(1, "/v1/tasks?queue=q").await.unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 0);
}

fn start_fails(args: &[&str], peer_token: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"));
    command.arg("server").args(["--data-dir"]).arg(dir.path()).args(args);
    command.env_remove("PHALANX_CLIENT_TOKEN").env_remove("PHALANX_PEER_TOKEN");
    if let Some(token) = peer_token {
        command.env("PHALANX_PEER_TOKEN", token);
    }
    let mut child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the server started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_node_refuses_to_start_with_an_open_peer_channel() {
    let peers = "1=127.0.0.1:1/127.0.0.1:2,2=127.0.0.1:3/127.0.0.1:4";
    let base = ["--node-id", "1", "--listen", "127.0.0.1:0"];
    let stderr = start_fails(&[&base[..], &["--peers", peers]].concat(), None);
    assert!(stderr.contains("needs a peer token"), "{stderr}");
    let stderr = start_fails(&[&base[..], &["--peers", peers]].concat(), Some(""));
    assert!(stderr.contains("peer token must be"), "an empty token is refused: {stderr}");
    let stderr = start_fails(&[&base[..], &["--raft-listen", "0.0.0.0:0"]].concat(), None);
    assert!(stderr.contains("refusing to listen on non-loopback address 0.0.0.0"), "{stderr}");
    let stderr = start_fails(&[&base[..], &["--client-token", ""]].concat(), None);
    assert!(stderr.contains("client token must be"), "{stderr}");
}

/// A valid number that would break service: a delay target of a millisecond
/// reads ordinary jitter as overload and refuses a healthy node's clients.
#[test]
fn a_node_refuses_to_start_with_a_meaningless_admission_delay_target() {
    let base = ["--node-id", "1", "--listen", "127.0.0.1:0"];
    let stderr = start_fails(&[&base[..], &["--admission-delay-target-ms", "1"]].concat(), None);
    assert!(stderr.contains("admission_delay_target_ms must be 0 (off) or 10..=60000"), "{stderr}");
}

/// openraft's own 200 ms made every large snapshot time out while it was
/// installed and be sent again; a node will not start with less.
#[test]
fn a_node_refuses_to_start_with_a_snapshot_install_timeout_shorter_than_an_install() {
    let base = ["--node-id", "1", "--listen", "127.0.0.1:0"];
    let stderr = start_fails(&[&base[..], &["--snapshot-install-timeout-ms", "50"]].concat(), None);
    assert!(stderr.contains("snapshot-install-timeout-ms"), "{stderr}");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "snapshot_install_timeout_ms = 50\n").unwrap();
    let stderr = start_fails(&[&base[..], &["--config", config.path().to_str().unwrap()]].concat(), None);
    assert!(stderr.contains("snapshot_install_timeout_ms must be 200..=600000"), "{stderr}");
}

#[tokio::test]
async fn a_one_node_server_without_a_peer_token_serves_no_raft_routes() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["server", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .env_remove("PHALANX_PEER_TOKEN")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let start = Instant::now();
    let answer = loop {
        if let Ok(response) = http.post(format!("http://{addr}/raft/vote")).body("{}").send().await {
            break decode(response).await.unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_error(&answer, 404, "not_found");
}

fn voters(info: &Value) -> Vec<u64> {
    info["nodes"].as_array().unwrap().iter().filter(|n| n["voter"] == true).map(|n| n["id"].as_u64().unwrap()).collect()
}

fn members(info: &Value) -> Vec<u64> {
    info["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_calls_cannot_brick_the_cluster() {
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await.unwrap();
    let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": {"kept": true}})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let task_id = body["task_id"].as_u64().unwrap();

    // Node 4 under node 2's addresses: the same node under a second id.
    let node2 = &cluster.servers[&2];
    let twin = json!({"node_id": 4, "addr": node2.addr, "raft_addr": node2.raft_addr});
    assert_error(&cluster.post(1, "/v1/cluster/members", &twin).await.unwrap(), 409, "address_in_use");
    // An address that does not parse, and one where nothing runs.
    let bad = json!({"node_id": 5, "addr": "not an address"});
    assert_error(&cluster.post(1, "/v1/cluster/members", &bad).await.unwrap(), 400, "invalid");
    let nobody = json!({"node_id": 5, "addr": format!("127.0.0.1:{}", free_port())});
    assert_error(&cluster.post(1, "/v1/cluster/members", &nobody).await.unwrap(), 409, "member_unreachable");
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert_eq!(members(&info), [1, 2, 3], "nothing changed: {info}");

    // A node that runs but cannot catch up (its peer token is wrong) stays a
    // learner, and a learner can be removed.
    let addr = format!("127.0.0.1:{}", free_port());
    let raft_addr = format!("127.0.0.1:{}", free_port());
    let mut node6 = Server {
        id: 6,
        addr: addr.clone(),
        raft_addr: raft_addr.clone(),
        data_dir: cluster.dir.path().join("node-6"),
        peers: format!("1={}/{},6={addr}/{raft_addr}", cluster.addr(1), cluster.servers[&1].raft_addr),
        extra: vec!["--peer-token".into(), "a-different-peer-token-9876".into()],
        child: None,
    };
    node6.spawn();
    let started = Instant::now();
    while cluster.http.get(format!("http://{addr}/health/live")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "node 6 did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let add6 = json!({"node_id": 6, "addr": addr, "raft_addr": raft_addr});
    assert_error(&cluster.post(1, "/v1/cluster/members", &add6).await.unwrap(), 503, "learner_lagging");
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert_eq!((members(&info), voters(&info)), (vec![1, 2, 3, 6], vec![1, 2, 3]), "{info}");
    let response = cluster.http.delete(cluster.url(1, "/v1/cluster/members/6")).send().await.unwrap();
    let answer = decode(response).await.unwrap();
    assert_eq!(answer.0, 200, "a learner can be removed: {answer:?}");
    let (_, info) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert_eq!(members(&info), [1, 2, 3], "{info}");
    drop(node6);

    // With one follower down, removing the other would leave a voter set
    // with no live majority: refused at once, and writes go on.
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    cluster.servers.get_mut(&followers[0]).unwrap().kill9();
    // The leader counts a voter healthy while it answered within the last
    // second (`VOTER_CONTACT_MS_MAX`).
    let down = followers[0];
    wait_until(Duration::from_secs(10), &format!("the leader to see node {down} silent for over 1 s"), async || {
        let (_, info) = cluster.get(leader, "/v1/cluster").await.unwrap();
        let nodes = info["nodes"].as_array().cloned().unwrap_or_default();
        let node = nodes.iter().find(|node| node["id"].as_u64() == Some(down)).cloned().unwrap_or_default();
        node["last_contact_ms"].as_u64().is_none_or(|ms| ms > 1_000)
    })
    .await;
    let started = Instant::now();
    let url = cluster.url(leader, &format!("/v1/cluster/members/{}", followers[1]));
    let answer = decode(cluster.http.delete(url).send().await.unwrap()).await.unwrap();
    assert_error(&answer, 409, "unsafe_membership_change");
    assert!(started.elapsed() < Duration::from_secs(2), "answered within a bound: {:?}", started.elapsed());
    let (status, _) = cluster.post(leader, "/v1/tasks", &json!({"queue": "q", "payload": 3})).await.unwrap();
    assert_eq!(status, 201, "writes go on");
    cluster.servers.get_mut(&followers[0]).unwrap().spawn();
    all_ready_with(&cluster, task_id).await;
    let (_, info) = cluster.get(leader, "/v1/cluster").await.unwrap();
    assert_eq!(voters(&info), [1, 2, 3]);
}
