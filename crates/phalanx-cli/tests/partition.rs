//! A real network partition: three `phalanx server` processes, each in its
//! own network namespace on a bridge, and the leader cut off from the other
//! two by iptables inside its namespace while clients can still reach it (the
//! seed's "orchestrator running but can't reach anyone").
//!
//! Checked: the cut-off leader acknowledges nothing and says it is not
//! ready; the majority elects a leader and keeps acknowledging writes; a
//! lease granted before the cut is re-granted on the majority side with a
//! higher fence, and the old fence is superseded for good; after healing,
//! every node holds every acknowledged task and the same applied state.
//!
//! And a partial cut (the leader and one follower cannot reach each other,
//! the third node reaches both): the cut-off follower does not raise its
//! term (the election guard holds it back), so healing costs no election.
//!
//! Needs root, `ip` (iproute2) and `iptables`. Without them the test says so
//! and passes, unless `PHALANX_REQUIRE_NETNS=1` (set by `scripts/test`, so
//! CI always runs it).

mod common;
#[path = "../src/netns.rs"]
mod netns;

use netns::{Cut, Net};

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT_TOKEN: &str = "partition-client-token";
const PEER_TOKEN: &str = "partition-peer-token";
const API_PORT: u16 = 7000;
const RAFT_PORT: u16 = 7001;

/// A node process inside its namespace; SIGKILLed when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(net: &Net, node: usize, dir: &Path) -> Node {
    let peers = (1..=net.namespaces.len())
        .map(|i| format!("{i}={ip}:{API_PORT}/{ip}:{RAFT_PORT}", ip = net.ip(i)))
        .collect::<Vec<_>>()
        .join(",");
    let ip = net.ip(node);
    let child = Command::new("ip")
        .args(["netns", "exec", &net.namespaces[node - 1], env!("CARGO_BIN_EXE_phalanx"), "server"])
        .args(["--node-id", &node.to_string()])
        .args(["--listen", &format!("{ip}:{API_PORT}"), "--raft-listen", &format!("{ip}:{RAFT_PORT}")])
        .args(["--peers", &peers, "--client-token", CLIENT_TOKEN, "--peer-token", PEER_TOKEN])
        .arg("--data-dir")
        .arg(dir.join(format!("node-{node}")))
        .env("PHALANX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn phalanx server in its namespace");
    Node(child)
}

struct Client {
    http: reqwest::Client,
    net_prefix: String,
}

impl Client {
    fn url(&self, node: usize, path: &str) -> String {
        format!("http://{}.{node}:{API_PORT}{path}", self.net_prefix)
    }

    /// `None` when no answer came within `timeout`.
    async fn call(
        &self,
        node: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Option<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, self.url(node, path))
            .bearer_auth(CLIENT_TOKEN)
            .timeout(timeout)
            .header("x-phalanx-deadline-ms", timeout.as_millis().to_string());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.ok()?;
        common::decode(response).await.ok()
    }

    async fn post(&self, node: usize, path: &str, body: &Value) -> Option<(u16, Value)> {
        self.call(node, "POST", path, Some(body), Duration::from_secs(2)).await
    }

    async fn get(&self, node: usize, path: &str) -> Option<(u16, Value)> {
        self.call(node, "GET", path, None, Duration::from_secs(2)).await
    }

    /// Retries on the given nodes until one acknowledges with `status`.
    async fn until(&self, nodes: &[usize], path: &str, body: &Value, status: u16, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            for node in nodes {
                if let Some((got, answer)) = self.post(*node, path, body).await {
                    if got == status {
                        return answer;
                    }
                }
            }
            assert!(start.elapsed() < within, "no {status} for POST {path} from nodes {nodes:?} within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self, node: usize) -> bool {
        matches!(self.get(node, "/health/ready").await, Some((200, _)))
    }

    async fn wait_all_ready(&self) {
        let start = Instant::now();
        for node in 1..=3 {
            while !self.ready(node).await {
                assert!(start.elapsed() < Duration::from_secs(30), "node {node} never became ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Three namespaces for a test, or `None` (the test skips) where they cannot
/// be made and `PHALANX_REQUIRE_NETNS=1` is not set.
async fn three_nodes(salt: u32) -> Option<(Net, tempfile::TempDir, Client)> {
    let net = match Net::create(3, salt) {
        Ok(net) => net,
        Err(why) if std::env::var("PHALANX_REQUIRE_NETNS").as_deref() != Ok("1") => {
            eprintln!("skipped: network namespaces unavailable ({why}); PHALANX_REQUIRE_NETNS=1 makes this a failure");
            return None;
        }
        Err(why) => panic!("network namespaces unavailable: {why}"),
    };
    let client = Client { http: reqwest::Client::new(), net_prefix: net.prefix.clone() };
    Some((net, tempfile::tempdir().unwrap(), client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_acknowledges_nothing_and_the_majority_carries_on() {
    let Some((net, dir, client)) = three_nodes(0).await else { return };
    // Declared after `net`, so the processes end before their namespaces go.
    let _nodes: Vec<Node> = (1..=3).map(|i| start(&net, i, dir.path())).collect();
    client.wait_all_ready().await;
    let leader = client.get(1, "/v1/cluster").await.unwrap().1["leader_id"].as_u64().unwrap() as usize;
    let majority: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();

    // Before the cut: an agent leases a task through the leader.
    let mut acknowledged = Vec::new();
    let task = client
        .until(&[leader], "/v1/tasks", &json!({"queue": "p", "payload": "held"}), 201, Duration::from_secs(10))
        .await;
    let held = task["task_id"].as_u64().unwrap();
    acknowledged.push(held);
    let register = json!({"agent_id": "before", "capabilities": ["p"], "capacity": 1});
    let registered = client.until(&[leader], "/v1/agents/register", &register, 200, Duration::from_secs(10)).await;
    let poll =
        json!({"epoch": registered["epoch"], "session": registered["session"], "max_tasks": 1, "lease_ttl_ms": 1500});
    let leases = client.until(&[leader], "/v1/agents/before/poll", &poll, 200, Duration::from_secs(10)).await;
    assert_eq!(leases["leases"][0]["task"]["id"].as_u64(), Some(held), "{leases}");
    let old_fence = leases["leases"][0]["fence"].as_u64().unwrap();
    for i in 0..10 {
        let node = 1 + i % 3;
        let answer = client
            .until(&[node], "/v1/tasks", &json!({"queue": "q", "payload": i}), 201, Duration::from_secs(10))
            .await;
        acknowledged.push(answer["task_id"].as_u64().unwrap());
    }

    // The cut: the leader still answers the test, but not its peers.
    net.cut(leader, &majority, Cut::Both).unwrap();
    let cut_at = Instant::now();

    // The majority elects a new leader.
    let new_leader = loop {
        let mut found = None;
        for node in &majority {
            if let Some((200, info)) = client.get(*node, "/v1/cluster").await {
                found = found.or(info["leader_id"].as_u64().filter(|l| *l as usize != leader));
            }
        }
        if let Some(found) = found {
            break found as usize;
        }
        assert!(cut_at.elapsed() < Duration::from_secs(15), "the majority elected no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(majority.contains(&new_leader));
    let elected_after = cut_at.elapsed();

    // The cut-off node acknowledges nothing, and says it is not ready.
    for i in 0..5 {
        if let Some((status, answer)) =
            client.post(leader, "/v1/tasks", &json!({"queue": "q", "payload": format!("lost-{i}")})).await
        {
            assert!(!(200..300).contains(&status), "the cut-off node acknowledged a write: {status} {answer}");
        }
    }
    let complete = json!({"fence": old_fence, "result": "from the cut-off side"});
    if let Some((status, answer)) = client.post(leader, &format!("/v1/tasks/{held}/complete"), &complete).await {
        assert!(!(200..300).contains(&status), "the cut-off node accepted a result: {status} {answer}");
    }
    let start = Instant::now();
    while client.ready(leader).await {
        assert!(start.elapsed() < Duration::from_secs(10), "the cut-off node still says ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The majority keeps acknowledging writes, and re-grants the held task
    // (its holder is gone) with a higher fence.
    for i in 0..10 {
        let body = json!({"queue": "q", "payload": format!("after-{i}")});
        let answer = client.until(&majority, "/v1/tasks", &body, 201, Duration::from_secs(10)).await;
        acknowledged.push(answer["task_id"].as_u64().unwrap());
    }
    let register = json!({"agent_id": "after", "capabilities": ["p"], "capacity": 1});
    let registered = client.until(&majority, "/v1/agents/register", &register, 200, Duration::from_secs(10)).await;
    let start = Instant::now();
    let new_fence = loop {
        let poll = json!({
            "epoch": registered["epoch"],
            "session": registered["session"],
            "max_tasks": 1,
            "wait_ms": 500,
            "lease_ttl_ms": 5000,
        });
        if let Some((200, leases)) = client.post(new_leader, "/v1/agents/after/poll", &poll).await {
            if let Some(fence) = leases["leases"][0]["fence"].as_u64() {
                assert_eq!(leases["leases"][0]["task"]["id"].as_u64(), Some(held));
                break fence;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the held task was never granted again");
    };
    assert!(new_fence > old_fence);
    let done = json!({"fence": new_fence, "result": "from the majority"});
    client.until(&majority, &format!("/v1/tasks/{held}/complete"), &done, 200, Duration::from_secs(10)).await;

    // Heal: the old leader rejoins as a follower and catches up.
    net.heal(leader).unwrap();
    let start = Instant::now();
    loop {
        let mut views = Vec::new();
        for node in 1..=3 {
            if let Some((200, info)) = client.get(node, "/v1/cluster").await {
                views.push((info["leader_id"].as_u64(), info["last_applied"].as_u64()));
            }
        }
        if views.len() == 3 && views.iter().all(|v| *v == views[0]) && views[0].0 == Some(new_leader as u64) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the cluster did not converge after healing: {views:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The late result from before the cut is superseded for good, the
    // accepted one stands, and every node holds every acknowledged task.
    let late = client.post(leader, &format!("/v1/tasks/{held}/complete"), &complete).await.unwrap();
    common::assert_error(&late, 409, "superseded");
    for node in 1..=3 {
        for id in &acknowledged {
            let (status, task) = client.get(node, &format!("/v1/tasks/{id}?stale=true")).await.unwrap();
            assert_eq!(status, 200, "node {node} lost acknowledged task {id}: {task}");
            if *id == held {
                assert_eq!(task["state"], "succeeded");
                assert_eq!(task["result"], "from the majority");
            }
        }
    }
    eprintln!("partition: a new leader was elected {} ms after the cut", elected_after.as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_leader_alone_does_not_raise_its_term() {
    let Some((net, dir, client)) = three_nodes(1).await else { return };
    // Declared after `net`, so the processes end before their namespaces go.
    let _nodes: Vec<Node> = (1..=3).map(|i| start(&net, i, dir.path())).collect();
    client.wait_all_ready().await;
    let info = client.get(1, "/v1/cluster").await.unwrap().1;
    let leader = info["leader_id"].as_u64().unwrap() as usize;
    let term = info["term"].as_u64().unwrap();
    let followers: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    let (cut_off, bridge) = (followers[0], followers[1]);

    net.cut(cut_off, &[leader], Cut::Both).unwrap();
    let cut_at = Instant::now();
    let mut acknowledged = 0;
    while cut_at.elapsed() < Duration::from_secs(4) {
        let body = json!({"queue": "q", "payload": "during"});
        if let Some((201, _)) = client.post(bridge, "/v1/tasks", &body).await {
            acknowledged += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(acknowledged > 0, "the leader and the bridging node kept committing");
    let info = client.get(cut_off, "/v1/cluster").await.unwrap().1;
    assert_eq!(info["term"].as_u64(), Some(term), "the cut-off node raised its term: {info}");
    assert!(info["election_hold_back"].is_string(), "{info}");

    net.heal(cut_off).unwrap();
    // Time passes on purpose: healing must not force an election within it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in 1..=3 {
        let info = client.get(node, "/v1/cluster").await.unwrap().1;
        assert_eq!(info["leader_id"].as_u64(), Some(leader as u64), "healing forced an election: {info}");
        assert_eq!(info["term"].as_u64(), Some(term), "healing forced an election: {info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_hears_nothing_from_its_peers_is_replaced() {
    let Some((net, dir, client)) = three_nodes(2).await else { return };
    // Declared after `net`, so the processes end before their namespaces go.
    let _nodes: Vec<Node> = (1..=3).map(|i| start(&net, i, dir.path())).collect();
    client.wait_all_ready().await;
    let leader = client.get(1, "/v1/cluster").await.unwrap().1["leader_id"].as_u64().unwrap() as usize;
    let majority: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();

    // One way: the peers still receive what the leader sends on connections
    // already open, the leader receives nothing from them.
    net.cut(leader, &majority, Cut::Inbound).unwrap();
    let cut_at = Instant::now();
    let body = json!({"queue": "one-way", "payload": "after"});
    let answer = client.until(&majority, "/v1/tasks", &body, 201, Duration::from_secs(10)).await;
    let id = answer["task_id"].as_u64().unwrap();
    let info = client.get(majority[0], "/v1/cluster").await.unwrap().1;
    assert_ne!(info["leader_id"].as_u64(), Some(leader as u64), "{info}");
    eprintln!("one-way cut: the majority acknowledged a write {} ms after the cut", cut_at.elapsed().as_millis());
    // The old leader acknowledges nothing while it hears nothing.
    if let Some((status, answer)) =
        client.post(leader, "/v1/tasks", &json!({"queue": "one-way", "payload": "lost"})).await
    {
        assert!(!(200..300).contains(&status), "the deaf leader acknowledged a write: {status} {answer}");
    }

    net.heal(leader).unwrap();
    let start = Instant::now();
    loop {
        if let Some((200, task)) = client.get(leader, &format!("/v1/tasks/{id}?stale=true")).await {
            assert_eq!(task["payload"], "after");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the old leader never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the chaos test's clients and agents were told, checked by the same
/// history as the simulation (`phalanx_sim::history`).
type Log = std::sync::Arc<std::sync::Mutex<phalanx_sim::history::History>>;

fn logged(log: &Log) -> std::sync::MutexGuard<'_, phalanx_sim::history::History> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Submits keyed tasks through every node in turn, retrying each with its key.
async fn chaos_submitter(
    client: std::sync::Arc<Client>,
    log: Log,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    n: usize,
) {
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let key = format!("chaos-{n}-{i}");
        let body = json!({"queue": "chaos", "payload": i, "idempotency_key": key});
        for attempt in 0..6 {
            let node = 1 + (n + i + attempt) % 3;
            if let Some((201, answer)) =
                client.call(node, "POST", "/v1/tasks", Some(&body), Duration::from_millis(800)).await
            {
                logged(&log).submitted(answer["task_id"].as_u64().unwrap(), &key);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// An agent: registers, polls through every node in turn, and completes each
/// lease after a while (longer than its lease now and then: a zombie).
async fn chaos_agent(
    client: std::sync::Arc<Client>,
    log: Log,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    n: usize,
) {
    let agent = format!("chaos-agent-{n}");
    let mut session: Option<(Value, Value)> = None;
    let mut i = n;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let node = 1 + i % 3;
        let Some((epoch, secret)) = session.clone() else {
            let register = json!({"agent_id": agent, "capabilities": ["chaos"], "capacity": 4});
            if let Some((200, answer)) = client.post(node, "/v1/agents/register", &register).await {
                session = Some((answer["epoch"].clone(), answer["session"].clone()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let poll = json!({"epoch": epoch, "session": secret, "max_tasks": 2, "wait_ms": 200, "lease_ttl_ms": 1500});
        let sent = tokio::time::Instant::now();
        let path = format!("/v1/agents/{agent}/poll");
        match client.call(node, "POST", &path, Some(&poll), Duration::from_millis(1500)).await {
            Some((200, answer)) => {
                for lease in answer["leases"].as_array().cloned().unwrap_or_default() {
                    let (task, fence) = (lease["task"]["id"].as_u64().unwrap(), lease["fence"].as_u64().unwrap());
                    logged(&log).granted(task, fence, &agent, sent);
                    let (client, log) = (client.clone(), log.clone());
                    tokio::spawn(async move {
                        // Now and then longer than the lease: the result of a zombie.
                        let work = if (task + fence) % 7 == 0 { 2_000 } else { 50 + (task % 5) * 40 };
                        tokio::time::sleep(Duration::from_millis(work)).await;
                        let result = format!("by fence {fence}");
                        let body = json!({"fence": fence, "result": result});
                        for attempt in 0..5 {
                            let sent = tokio::time::Instant::now();
                            let path = format!("/v1/tasks/{task}/complete");
                            match client
                                .call(
                                    1 + (task as usize + attempt) % 3,
                                    "POST",
                                    &path,
                                    Some(&body),
                                    Duration::from_millis(800),
                                )
                                .await
                            {
                                Some((200, done)) => {
                                    logged(&log).completed(task, fence, done["result"].as_str().unwrap_or(""), sent);
                                    return;
                                }
                                Some((409, _)) | Some((404, _)) => return,
                                _ => tokio::time::sleep(Duration::from_millis(150)).await,
                            }
                        }
                    });
                }
            }
            Some((status, _)) if (400..500).contains(&status) => session = None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_kills_pauses_and_cuts_keeps_the_history_sound() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some((net, dir, client)) = three_nodes(3).await else { return };
    // Declared after `net`, so the processes end before their namespaces go.
    let mut nodes: Vec<Option<Node>> = (1..=3).map(|i| Some(start(&net, i, dir.path()))).collect();
    client.wait_all_ready().await;
    let seed: u64 = std::env::var("PHALANX_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let seconds: u64 = std::env::var("PHALANX_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    eprintln!("chaos: seed {seed}, {seconds} s (PHALANX_CHAOS_SEED, PHALANX_CHAOS_SECONDS)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let client = Arc::new(client);
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for n in 0..3 {
        workers.push(tokio::spawn(chaos_submitter(client.clone(), log.clone(), stop.clone(), n)));
    }
    for n in 0..2 {
        workers.push(tokio::spawn(chaos_agent(client.clone(), log.clone(), stop.clone(), n)));
    }
    let started = Instant::now();
    let mut faults = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2_000))).await;
        let victim = rng.gen_range(1..=3usize);
        let others: Vec<usize> = (1..=3).filter(|n| *n != victim).collect();
        let hold = Duration::from_millis(rng.gen_range(300..2_500));
        match rng.gen_range(0..4) {
            0 => {
                faults.push(format!("kill {victim}"));
                nodes[victim - 1] = None;
                tokio::time::sleep(hold).await;
                nodes[victim - 1] = Some(start(&net, victim, dir.path()));
            }
            1 => {
                faults.push(format!("pause {victim}"));
                let pid = nodes[victim - 1].as_ref().unwrap().0.id().to_string();
                let _ = Command::new("kill").args(["-STOP", &pid]).status();
                tokio::time::sleep(hold).await;
                let _ = Command::new("kill").args(["-CONT", &pid]).status();
            }
            2 => {
                faults.push(format!("isolate {victim}"));
                net.cut(victim, &others, Cut::Both).unwrap();
                tokio::time::sleep(hold).await;
                net.heal(victim).unwrap();
            }
            _ => {
                faults.push(format!("one-way {victim}"));
                net.cut(victim, &others, Cut::Inbound).unwrap();
                tokio::time::sleep(hold).await;
                net.heal(victim).unwrap();
            }
        }
    }
    eprintln!("chaos: faults {}", faults.join(", "));
    // The faults stop; the workload runs on a healed cluster a little longer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.wait_all_ready().await;

    // Every node holds every acknowledged task, and every accepted result.
    let acked: Vec<u64> = logged(&log).acked.keys().copied().collect();
    assert!(acked.len() > 50, "too little work got through to mean anything: {}", acked.len());
    for node in 1..=3 {
        let start = Instant::now();
        for id in &acked {
            let found = loop {
                match client.get(node, &format!("/v1/tasks/{id}?stale=true")).await {
                    Some((200, task)) => {
                        break Some((task["state"] == "succeeded", task["result"].as_str().map(String::from)))
                    }
                    Some((404, _)) if start.elapsed() > Duration::from_secs(20) => break None,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            logged(&log).final_task(*id, found);
        }
    }
    let history = logged(&log);
    eprintln!(
        "chaos: {} tasks acknowledged, {} leases granted, {} results accepted",
        acked.len(),
        history.grants_seen(),
        history.results_accepted()
    );
    assert!(history.violations.is_empty(), "seed {seed}: {:#?}", history.violations);
}
