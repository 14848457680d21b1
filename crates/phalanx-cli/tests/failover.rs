//! Failover as clients see it, with real processes: a follower does not hold
//! requests for a leader that stopped answering, says precisely whether a
//! refused request was done ("nothing done" versus "outcome unknown"), and
//! the CLI's submit, retried through a leader kill, creates one task.

mod common;

use common::Cluster;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The leader and the other nodes, once a leader is known.
async fn roles(cluster: &Cluster) -> (u64, Vec<u64>) {
    let started = Instant::now();
    loop {
        if let Some(leader) = cluster.leader().await {
            let followers = cluster.servers.keys().copied().filter(|id| *id != leader).collect();
            return (leader, followers);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts until a node other than `not` answers 2xx (the cluster may still
/// be electing), and returns that answer.
async fn post_until_done(cluster: &Cluster, not: u64, path: &str, body: &Value) -> Value {
    let started = Instant::now();
    loop {
        for id in cluster.servers.keys().copied().filter(|id| *id != not) {
            if let Ok((200..=299, answer)) = cluster.post(id, path, body).await {
                return answer;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no node served {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tasks of a queue, read (linearizably) from a node other than `not`
/// once one can serve the read.
async fn tasks_in_queue(cluster: &Cluster, not: u64, queue: &str) -> Vec<Value> {
    let started = Instant::now();
    loop {
        for id in cluster.servers.keys().copied().filter(|id| *id != not) {
            if let Ok((200, page)) = cluster.get(id, &format!("/v1/tasks?queue={queue}&limit=1000")).await {
                return page["tasks"].as_array().unwrap().clone();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no node served the read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_paused_leader_does_not_hold_the_requests_a_follower_forwarded() {
    let cluster = Cluster::start(3, &[]).await;
    let (leader, followers) = roles(&cluster).await;
    let follower = followers[0];
    // One forward first, so the follower holds a pooled connection to the leader.
    let (status, body) = cluster.post(follower, "/v1/tasks", &json!({"queue": "warm"})).await.unwrap();
    assert_eq!(status, 201, "{body}");

    cluster.servers[&leader].signal("STOP");
    let sends = (0..8).map(|i| {
        let cluster = &cluster;
        async move {
            let started = Instant::now();
            let body = json!({"queue": "paused", "payload": i, "idempotency_key": format!("paused-{i}")});
            let answer = cluster.post(follower, "/v1/tasks", &body).await.unwrap();
            (started.elapsed(), answer)
        }
    });
    let answers = futures::future::join_all(sends).await;
    cluster.servers[&leader].signal("CONT");

    for (elapsed, answer) in &answers {
        assert!(*elapsed < Duration::from_secs(1), "answered after {elapsed:?}: {answer:?}");
        if answer.0 != 201 {
            assert_eq!(answer.0, 503, "{answer:?}");
            let outcome = answer.1["error"]["outcome"].as_str();
            assert!(matches!(outcome, Some("unknown" | "not_done")), "{answer:?}");
        }
    }
    assert!(
        answers.iter().any(|(_, a)| a.1["error"]["code"] == "leader_changed" && a.1["error"]["outcome"] == "unknown"),
        "the forwards in flight were abandoned when the leadership moved: {answers:?}"
    );

    // The same keys again, once a leader serves: one task per key, whatever
    // became of the first attempts.
    for i in 0..8 {
        let body = json!({"queue": "paused", "payload": i, "idempotency_key": format!("paused-{i}")});
        post_until_done(&cluster, leader, "/v1/tasks", &body).await;
    }
    assert_eq!(tasks_in_queue(&cluster, leader, "paused").await.len(), 8);
}

/// A submit sent to `node` with a deadline (the SDK sends its attempt's).
async fn post_with_deadline(cluster: &Cluster, node: u64, body: &Value, deadline_ms: u64) -> (u16, Value) {
    let response = cluster
        .http
        .post(cluster.url(node, "/v1/tasks"))
        .header("x-phalanx-deadline-ms", deadline_ms.to_string())
        .json(body)
        .send()
        .await
        .unwrap();
    common::decode(response).await.unwrap()
}

#[tokio::test]
async fn a_refused_connection_to_the_leader_is_answered_nothing_done() {
    let mut cluster = Cluster::start(3, &[]).await;
    let (leader, followers) = roles(&cluster).await;
    let follower = followers[0];
    cluster.servers.get_mut(&leader).unwrap().kill9();

    // At once, before the follower notices: its connection to the leader is
    // refused, and the deadline is too short to wait for the next leader.
    let mut answers = Vec::new();
    let mut created = 0;
    for i in 0..20 {
        let answer = post_with_deadline(&cluster, follower, &json!({"queue": "refused", "payload": i}), 60).await;
        if answer.0 == 201 {
            created += 1;
        } else {
            assert_eq!(answer.0, 503, "{answer:?}");
            assert_eq!(answer.1["error"]["outcome"], "not_done", "{answer:?}");
        }
        answers.push(answer);
    }
    let refused: Vec<&(u16, Value)> = answers.iter().filter(|a| a.1["error"]["code"] == "leader_unreachable").collect();
    assert!(!refused.is_empty(), "{answers:?}");
    assert!(refused[0].1["error"]["retry_after_ms"].as_u64().is_some(), "{refused:?}");

    // Nothing done means nothing done: only the answered submits exist.
    assert_eq!(tasks_in_queue(&cluster, leader, "refused").await.len(), created);
}

#[tokio::test]
async fn a_request_the_dead_leader_refused_goes_to_the_next_leader() {
    let mut cluster = Cluster::start(3, &[]).await;
    let (leader, followers) = roles(&cluster).await;
    let follower = followers[0];
    cluster.servers.get_mut(&leader).unwrap().kill9();
    let killed = Instant::now();

    // Sent at once, with a deadline long enough for an election: the
    // follower's connection to the dead leader is refused (nothing sent), so
    // it waits for the next leader and forwards the same request there.
    let answer = post_with_deadline(&cluster, follower, &json!({"queue": "moved", "payload": 1}), 1_500).await;
    assert_eq!(answer.0, 201, "{answer:?}");
    assert!(killed.elapsed() < Duration::from_millis(1_500), "answered after {:?}", killed.elapsed());
    assert_eq!(tasks_in_queue(&cluster, leader, "moved").await.len(), 1);
}

#[tokio::test]
async fn the_cli_submit_retried_through_a_leader_kill_creates_one_task() {
    let mut cluster = Cluster::start(3, &[]).await;
    let (leader, followers) = roles(&cluster).await;
    // The leader commits the submit but never applies it, so no answer comes
    // back: the CLI's first attempt ends with an unknown outcome.
    std::fs::write(cluster.servers[&leader].data_dir.join("failpoint-stall-apply"), b"").unwrap();
    let nodes: Vec<&str> = cluster.servers.keys().map(|id| cluster.addr(*id)).collect();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["--json", "task", "submit", "--nodes", &nodes.join(","), "--queue", "once", "--payload", r#"{"n": 1}"#])
        .env("PHALANX_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Committed (a follower applied it), then the leader dies.
    let started = Instant::now();
    loop {
        let (status, page) = cluster.get(followers[0], "/v1/tasks?queue=once&stale=true").await.unwrap();
        if status == 200 && !page["tasks"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the submit never committed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.servers.get_mut(&leader).unwrap().kill9();

    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stdout {stdout}, stderr {}", String::from_utf8_lossy(&output.stderr));
    let submitted: Value = serde_json::from_str(&stdout).unwrap();
    let tasks = tasks_in_queue(&cluster, leader, "once").await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["id"], submitted["task_id"]);
    assert!(tasks[0]["idempotency_key"].as_str().is_some_and(|k| k.starts_with("auto-")), "{tasks:?}");
}

#[tokio::test]
async fn a_stale_read_that_finds_nothing_is_labelled_stale() {
    let cluster = Cluster::start(1, &[]).await;
    let response = cluster.http.get(cluster.url(1, "/v1/tasks/424242?stale=true")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(response.headers().get("x-phalanx-stale").and_then(|v| v.to_str().ok()), Some("true"));
    let response = cluster.http.get(cluster.url(1, "/v1/tasks/424242")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(response.headers().get("x-phalanx-stale").is_none(), "a linearizable read is not stale");
}

#[tokio::test]
async fn server_logs_are_json_lines_without_colours_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["server", "--listen", &addr, "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("PHALANX_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).find(|line| line.contains("node serving"))
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line).await.expect("logged in time").unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line.expect("a line saying the node serves");
    assert!(!line.contains('\u{1b}'), "no ANSI escapes: {line:?}");
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["level"], "INFO", "{event}");
    assert_eq!(event["fields"]["message"], "node serving", "{event}");
}

/// Three nodes with the server's default log filter, stderr kept in files.
struct LoggedCluster {
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    peers: String,
    children: Vec<Option<std::process::Child>>,
}

impl LoggedCluster {
    fn start() -> LoggedCluster {
        let dir = tempfile::tempdir().unwrap();
        let pairs: Vec<(String, String)> = (0..3)
            .map(|_| (format!("127.0.0.1:{}", common::free_port()), format!("127.0.0.1:{}", common::free_port())))
            .collect();
        let peers = pairs.iter().enumerate().map(|(i, (a, r))| format!("{}={a}/{r}", i + 1)).collect::<Vec<_>>();
        let mut cluster = LoggedCluster {
            dir,
            addrs: pairs.iter().map(|(a, _)| a.clone()).collect(),
            peers: peers.join(","),
            children: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let id = (i + 1).to_string();
        let (_, raft) = self.peers.split(',').nth(i).unwrap().split_once('/').unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(["server", "--node-id", &id, "--listen", &self.addrs[i], "--raft-listen", raft])
            .args(["--peers", &self.peers, "--peer-token", common::PEER_TOKEN])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")))
            .env_remove("PHALANX_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node-{}.log", i + 1))).unwrap_or_default()
    }
}

impl Drop for LoggedCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

#[tokio::test]
async fn a_peer_that_is_down_costs_the_leader_two_log_lines_not_one_per_retry() {
    let mut cluster = LoggedCluster::start();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let started = Instant::now();
    let leader = loop {
        let mut found = None;
        for addr in &cluster.addrs {
            if let Ok(response) = http.get(format!("http://{addr}/health/ready")).send().await {
                if let Ok(body) = response.json::<Value>().await {
                    found = found.or(body["leader_id"].as_u64());
                }
            }
        }
        if let Some(leader) = found {
            break leader as usize - 1;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let follower = (leader + 1) % 3;
    let before = cluster.log(leader).lines().count();
    cluster.kill(follower);
    // The peer stays down for 3 s on purpose: long enough for many retries,
    // which must not each be logged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.spawn(follower);
    let restarted = Instant::now();
    // Lines from before the kill (a peer not yet up at the start) do not count.
    while !cluster.log(leader).lines().skip(before).any(|line| line.contains("peer reachable again")) {
        assert!(restarted.elapsed() < Duration::from_secs(20), "the return of the peer was not logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let log = cluster.log(leader);
    let lines: Vec<&str> = log.lines().skip(before).collect();
    // Lines about the peer that was down: on a loaded machine the other
    // peer may miss an RPC too, which is logged as it should be.
    let peer = format!("peer={}", follower + 1);
    let about: Vec<&&str> = lines.iter().filter(|l| l.contains(&peer)).collect();
    let down: Vec<&&&str> = about.iter().filter(|l| l.contains("peer unreachable")).collect();
    let back: Vec<&&&str> = about.iter().filter(|l| l.contains("peer reachable again")).collect();
    assert_eq!(down.len(), 1, "{lines:#?}");
    assert_eq!(back.len(), 1, "{lines:#?}");
    assert!(back[0].contains("out_ms="), "says how long the peer was out: {}", back[0]);
    assert!(about.len() <= 2, "3 s of a peer down, and the leader logged {} lines about it: {lines:#?}", about.len());
    assert!(lines.len() <= 8, "the leader logged {} lines in 3 s: {lines:#?}", lines.len());
    assert!(!log.contains('\u{1b}'), "no ANSI colours when stderr is a file");
}
