//! The adversarial suite: a 3-node cluster under malformed, oversized,
//! forged and slow traffic while honest clients keep submitting, for a fixed
//! budget (`ADVERSARIAL_SECS`, default 15 s). Afterwards every node must be
//! alive and ready, every acknowledged task present on every node, and each
//! node's resident memory under `RSS_BYTES_MAX`.

mod common;

use common::{Cluster, PEER_TOKEN};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resident memory each node must stay under after the run.
const RSS_BYTES_MAX: u64 = 400 * 1024 * 1024;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Writes raw bytes to `addr` and reads whatever comes back (bounded).
async fn raw(addr: &str, bytes: &[u8], read_for: Duration) {
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(bytes)).await;
    let mut buffer = vec![0u8; 4096];
    let _ = tokio::time::timeout(read_for, stream.read(&mut buffer)).await;
}

/// One hostile request of a kind chosen by `rng`.
async fn attack(rng: &mut rand::rngs::StdRng, http: &reqwest::Client, api: &str, raft: &str) {
    match rng.gen_range(0..12) {
        // Garbage on the client and Raft ports.
        0 => {
            let bytes: Vec<u8> = (0..rng.gen_range(1..2048)).map(|_| rng.gen()).collect();
            raw(api, &bytes, Duration::from_millis(200)).await;
        }
        1 => {
            let bytes: Vec<u8> = (0..rng.gen_range(1..2048)).map(|_| rng.gen()).collect();
            raw(raft, &bytes, Duration::from_millis(200)).await;
        }
        // A huge header, a huge URI.
        2 => {
            let request = format!("GET /v1/tasks HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(400 * 1024));
            raw(api, request.as_bytes(), Duration::from_millis(500)).await;
        }
        3 => {
            let request = format!("GET /v1/tasks/{} HTTP/1.1\r\nhost: x\r\n\r\n", "9".repeat(100 * 1024));
            raw(api, request.as_bytes(), Duration::from_millis(500)).await;
        }
        // An oversized body, declared and sent.
        4 => {
            let body = format!(r#"{{"queue": "q", "payload": "{}"}}"#, "x".repeat(6 * 1024 * 1024));
            let _ = http.post(format!("http://{api}/v1/tasks")).body(body).send().await;
        }
        // A body that claims more than it sends, then stalls.
        5 => {
            let request = "POST /v1/tasks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"queue\":";
            raw(api, request.as_bytes(), Duration::from_millis(300)).await;
        }
        // Forged Raft traffic: no token, a wrong token, the token with an absurd term.
        6 => {
            let vote = json!({"vote": {"leader_id": {"term": u64::MAX, "voted_for": 2}, "committed": false}, "last_log_id": null});
            let _ = http.post(format!("http://{raft}/raft/vote")).json(&vote).send().await;
            let _ = http
                .post(format!("http://{raft}/raft/append"))
                .bearer_auth("wrong-token-0123456789")
                .json(&vote)
                .send()
                .await;
            let _ = http.post(format!("http://{raft}/raft/vote")).bearer_auth(PEER_TOKEN).json(&vote).send().await;
        }
        7 => {
            let append = json!({"vote": {"leader_id": {"term": 1u64 << 50, "voted_for": 1}, "committed": true},
                "prev_log_id": {"leader_id": u64::MAX, "index": u64::MAX}, "entries": [], "leader_commit": null});
            let _ = http.post(format!("http://{raft}/raft/append")).bearer_auth(PEER_TOKEN).json(&append).send().await;
        }
        // A client claiming to be a peer.
        8 => {
            let _ = http
                .post(format!("http://{api}/v1/tasks"))
                .header("x-phalanx-forwarded", "1")
                .json(&json!({"queue": "forged", "payload": 1}))
                .send()
                .await;
        }
        // Bodies with the wrong shapes and extreme values.
        9 => {
            let bodies = [
                json!({"queue": "", "payload": null}),
                json!({"queue": "q", "payload": 1, "priority": u64::MAX, "deadline_ms": u64::MAX}),
                json!({"queue": "q".repeat(10_000), "payload": 1}),
                json!({"tasks": vec![json!({"queue": "q", "payload": 1}); 50_000]}),
                json!({"agent_id": "a", "capabilities": (0..30_000).map(|i| format!("c{i}")).collect::<Vec<_>>(), "capacity": 1}),
            ];
            let routes = ["/v1/tasks", "/v1/tasks", "/v1/tasks", "/v1/tasks/batch", "/v1/agents/register"];
            let pick = rng.gen_range(0..bodies.len());
            let _ = http.post(format!("http://{api}{}", routes[pick])).json(&bodies[pick]).send().await;
        }
        // Membership calls an operator might get wrong.
        10 => {
            let _ = http
                .post(format!("http://{api}/v1/cluster/members"))
                .json(&json!({"node_id": 2, "addr": api}))
                .send()
                .await;
            let _ = http.delete(format!("http://{api}/v1/cluster/members/99")).send().await;
        }
        // Settings that would break service.
        _ => {
            let _ = http
                .put(format!("http://{api}/v1/config"))
                .json(&json!({"set": {"agent_heartbeat_interval_ms": 1u64 << 63}}))
                .send()
                .await;
            let _ = http.put(format!("http://{api}/v1/config")).json(&json!({"set": {"tasks_max": 0}})).send().await;
        }
    }
}

/// Connections that send a request line and then one header byte at a
/// time, slowly, for as long as the node keeps them open.
async fn slow_client(addr: String, stop: Arc<AtomicBool>) {
    let Ok(mut stream) = TcpStream::connect(&addr).await else { return };
    if stream.write_all(b"POST /v1/tasks HTTP/1.1\r\nhost: x\r\nx-slow: ").await.is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        if stream.write_all(b"a").await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_hostile_traffic_stays_alive_ready_and_whole() {
    let budget = Duration::from_secs(std::env::var("ADVERSARIAL_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(15));
    let cluster = Arc::new(Cluster::start(3, &[]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<u64>::new()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    // Honest clients, through every node.
    let mut honest = Vec::new();
    for worker in 0..2u64 {
        let (cluster, stop, acknowledged) = (cluster.clone(), stop.clone(), acknowledged.clone());
        honest.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let node = 1 + (i + worker) % 3;
                let key = format!("honest-{worker}-{i}");
                let body = json!({"queue": "honest", "payload": {"i": i}, "idempotency_key": key});
                if let Ok((201, answer)) = cluster.post(node, "/v1/tasks", &body).await {
                    acknowledged.lock().unwrap().push(answer["task_id"].as_u64().unwrap());
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Slow clients hold connections on every node.
    let mut slow = Vec::new();
    for id in 1..=3 {
        for _ in 0..100 {
            slow.push(tokio::spawn(slow_client(cluster.addr(id).to_string(), stop.clone())));
        }
    }
    // Attackers, seeded so a failure can be replayed.
    let mut attackers = Vec::new();
    for seed in 0..3u64 {
        let (cluster, stop, http) = (cluster.clone(), stop.clone(), http.clone());
        attackers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut count = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = 1 + rng.gen_range(0..3u64);
                let (api, raft) = (cluster.addr(id).to_string(), cluster.servers[&id].raft_addr.clone());
                attack(&mut rng, &http, &api, &raft).await;
                count += 1;
            }
            count
        }));
    }
    // The hostile traffic runs for its whole budget: time passing is the test.
    tokio::time::sleep(budget).await;
    stop.store(true, Ordering::Relaxed);
    let mut attacks = 0;
    for attacker in attackers {
        attacks += attacker.await.unwrap();
    }
    for task in honest.into_iter().chain(slow) {
        task.await.unwrap();
    }

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 20, "honest clients got through: {}", acknowledged.len());
    for id in 1..=3 {
        let server = &cluster.servers[&id];
        let pid = server.child.as_ref().unwrap().id();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "node {id} is alive");
        cluster.wait_ready(id, Duration::from_secs(10)).await;
        let rss = rss_bytes(pid);
        assert!(rss < RSS_BYTES_MAX, "node {id} holds {rss} bytes resident");
        eprintln!("adversarial: node {id} RSS {} MiB after {attacks} attacks", rss / (1024 * 1024));
    }
    // Every acknowledged task is on every node, and nothing forged is.
    for id in 1..=3 {
        for task in &acknowledged {
            let (status, body) = cluster.get(id, &format!("/v1/tasks/{task}?stale=true")).await.unwrap();
            assert_eq!(status, 200, "node {id} lost acknowledged task {task}: {body}");
        }
        let (_, forged) = cluster.get(id, "/v1/tasks?queue=forged&stale=true").await.unwrap();
        assert_eq!(forged["tasks"].as_array().map(Vec::len), Some(0), "a forged request was committed: {forged}");
    }
    let (status, _) = cluster.post(1, "/v1/tasks", &json!({"queue": "after", "payload": 1})).await.unwrap();
    assert_eq!(status, 201, "the cluster still takes writes");
}
