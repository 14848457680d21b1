//! A three-node cluster of real processes under clients and agents, with the
//! leader SIGKILLed three times and SIGSTOPped once. Every request and its
//! outcome is recorded; afterwards the history is checked: every acknowledged
//! task exists and finishes, no task has two accepted results, no result with
//! a stale fence was accepted, and all nodes converge to the same state.
//! A request that timed out is "unknown", never counted as lost.
//! The same run is done over mutual TLS (`tls_...`): certificates change how
//! nodes reach each other after a kill (handshakes on every reconnection),
//! and must not change what is kept.

mod common;

use common::{wait_for, wait_until, Cluster};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct History {
    /// Submits acknowledged with 2xx: task id -> idempotency key.
    acknowledged: BTreeMap<u64, String>,
    unknown_submits: u64,
    /// Completes answered 200: (task id, fence).
    accepted: Vec<(u64, u64)>,
    superseded: u64,
    unknown_completes: u64,
}

struct Ctx {
    /// `scheme://host:port` of each node.
    bases: Vec<String>,
    http: reqwest::Client,
    history: Mutex<History>,
    stop: AtomicBool,
}

async fn post(ctx: &Ctx, node: usize, path: &str, body: &Value) -> Result<(u16, Value), ()> {
    let url = format!("{}{}", ctx.bases[node % ctx.bases.len()], path);
    let response = ctx.http.post(url).json(body).timeout(Duration::from_secs(3)).send().await.map_err(|_| ())?;
    let status = response.status().as_u16();
    let value = response.json().await.map_err(|_| ())?;
    Ok((status, value))
}

async fn writer(ctx: Arc<Ctx>, writer_id: usize) {
    let mut n = 0;
    let mut node = writer_id;
    while !ctx.stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("w{writer_id}-{n}");
        let body = json!({"queue": "work", "payload": {"key": key}, "idempotency_key": key, "max_attempts": 100});
        match post(&ctx, node, "/v1/tasks", &body).await {
            Ok((201, answer)) => {
                let id = answer["task_id"].as_u64().unwrap();
                ctx.history.lock().unwrap().acknowledged.insert(id, key);
            }
            Ok((status, answer)) => {
                // A refusal (no leader, not leader) changed nothing; a timeout is unknown.
                if answer["error"]["code"] == "timeout" {
                    ctx.history.lock().unwrap().unknown_submits += 1;
                }
                assert!(status == 503 || status == 429, "unexpected refusal {status} {answer}");
                node += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(()) => {
                ctx.history.lock().unwrap().unknown_submits += 1;
                node += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn agent(ctx: Arc<Ctx>, agent_id: String) {
    let mut node = 0usize;
    let mut epoch = None;
    let mut session = Value::Null;
    loop {
        if ctx.stop.load(Ordering::Relaxed) && agent_done(&ctx).await {
            return;
        }
        let Some(current) = epoch else {
            let body = json!({"agent_id": agent_id, "capabilities": ["work"], "capacity": 8});
            match post(&ctx, node, "/v1/agents/register", &body).await {
                Ok((200, answer)) => {
                    epoch = answer["epoch"].as_u64();
                    session = answer["session"].clone();
                }
                _ => {
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            continue;
        };
        let poll = json!({"epoch": current, "session": session, "max_tasks": 8, "wait_ms": 500, "lease_ttl_ms": 3000});
        let leases = match post(&ctx, node, &format!("/v1/agents/{agent_id}/poll"), &poll).await {
            Ok((200, answer)) => answer["leases"].as_array().cloned().unwrap_or_default(),
            Ok((404 | 409, _)) => {
                epoch = None;
                continue;
            }
            _ => {
                node += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        for lease in leases {
            let id = lease["task"]["id"].as_u64().unwrap();
            let fence = lease["fence"].as_u64().unwrap();
            let body = json!({"fence": fence, "result": {"by": agent_id, "fence": fence}});
            // An unknown outcome is retried with the same fence and result: idempotent.
            for _attempt in 0..5 {
                match post(&ctx, node, &format!("/v1/tasks/{id}/complete"), &body).await {
                    Ok((200, _)) => {
                        ctx.history.lock().unwrap().accepted.push((id, fence));
                        break;
                    }
                    Ok((409, answer)) if answer["error"]["code"] == "superseded" => {
                        ctx.history.lock().unwrap().superseded += 1;
                        break;
                    }
                    Ok((409, _)) => break,
                    _ => {
                        ctx.history.lock().unwrap().unknown_completes += 1;
                        node += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// The agents keep working after the writers stop until nothing is open.
async fn agent_done(ctx: &Ctx) -> bool {
    for node in 0..ctx.bases.len() {
        let mut open = Vec::new();
        for state in ["pending", "leased"] {
            let url = format!("{}/v1/tasks?state={state}&limit=1", ctx.bases[node]);
            let Ok(response) = ctx.http.get(url).timeout(Duration::from_secs(3)).send().await else { break };
            let Ok(body) = response.json::<Value>().await else { break };
            let Some(tasks) = body["tasks"].as_array() else { break };
            open.push(tasks.len());
        }
        if open.len() == 2 {
            return open == [0, 0];
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_lose_nothing_and_accept_no_stale_result() {
    let cluster = Cluster::start(3, &["--snapshot-logs-since-last", "500"]).await;
    kill_leaders_and_check_the_history(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_leader_kills_lose_nothing_and_accept_no_stale_result() {
    let cluster = Cluster::start_tls(3, &["--snapshot-logs-since-last", "500"]).await;
    assert_eq!(cluster.scheme(), "https");
    kill_leaders_and_check_the_history(cluster).await;
}

async fn kill_leaders_and_check_the_history(mut cluster: Cluster) {
    let bases: Vec<String> = cluster.servers.keys().map(|id| cluster.url(*id, "")).collect();
    let ctx = Arc::new(Ctx {
        bases,
        http: cluster.client_builder().pool_max_idle_per_host(16).build().unwrap(),
        history: Mutex::new(History::default()),
        stop: AtomicBool::new(false),
    });
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(tokio::spawn(writer(ctx.clone(), i)));
    }
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(tokio::spawn(agent(ctx.clone(), format!("agent-{i}"))));
    }

    // Each fault lasts until the cluster has shown it works through it:
    // tasks acknowledged and results accepted, not a fixed time.
    wait_for_work(&ctx, "before the first fault").await;
    for round in 0..3 {
        let leader = wait_leader(&cluster).await;
        eprintln!("round {round}: SIGKILL leader {leader}");
        cluster.servers.get_mut(&leader).unwrap().kill9();
        let successor = wait_leader(&cluster).await;
        wait_for_work(&ctx, &format!("with node {leader} killed and node {successor} leading")).await;
        cluster.servers.get_mut(&leader).unwrap().spawn();
        cluster.wait_ready(leader, Duration::from_secs(30)).await;
        wait_for_work(&ctx, &format!("after node {leader} restarted")).await;
    }
    let leader = wait_leader(&cluster).await;
    eprintln!("SIGSTOP leader {leader}");
    cluster.servers[&leader].signal("STOP");
    // Asked of the others only: the paused node would not answer.
    let others: Vec<u64> = cluster.servers.keys().copied().filter(|id| *id != leader).collect();
    let successor =
        wait_for(Duration::from_secs(30), &format!("a leader other than the paused node {leader}"), async || {
            for id in &others {
                if let Ok((200, info)) = cluster.get(*id, "/v1/cluster").await {
                    if let Some(other) = info["leader_id"].as_u64().filter(|other| *other != leader) {
                        return Some(other);
                    }
                }
            }
            None
        })
        .await;
    wait_for_work(&ctx, &format!("with node {leader} paused and node {successor} leading")).await;
    cluster.servers[&leader].signal("CONT");
    cluster.wait_ready(leader, Duration::from_secs(30)).await;
    wait_for_work(&ctx, &format!("after node {leader} resumed")).await;

    ctx.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let drained = tokio::time::timeout(Duration::from_secs(90), async {
        for agent in agents {
            agent.await.unwrap();
        }
    })
    .await;
    assert!(drained.is_ok(), "agents did not drain the backlog within 90 s");

    // Every node must have applied the same log; wait for followers to catch up.
    let history = std::mem::take(&mut *ctx.history.lock().unwrap());
    eprintln!(
        "history: {} acknowledged, {} unknown submits, {} accepted results, {} superseded, {} unknown completes",
        history.acknowledged.len(),
        history.unknown_submits,
        history.accepted.len(),
        history.superseded,
        history.unknown_completes
    );
    assert!(history.acknowledged.len() > 50, "the run did real work");
    converge(&cluster).await;

    let leader = wait_leader(&cluster).await;
    let mut accepted_fences: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (id, fence) in &history.accepted {
        accepted_fences.entry(*id).or_default().insert(*fence);
    }
    for (id, fences) in &accepted_fences {
        assert_eq!(fences.len(), 1, "task {id} had results accepted under two fences: {fences:?}");
    }
    let mut lost = Vec::new();
    for (id, key) in &history.acknowledged {
        let (status, task) = cluster.get(leader, &format!("/v1/tasks/{id}")).await.unwrap();
        if status != 200 {
            lost.push(*id);
            continue;
        }
        assert_eq!(task["payload"]["key"], json!(key));
        assert_eq!(task["state"], "succeeded", "task {id} did not finish: {task}");
        // The accepted result is the one recorded under the task's newest fence.
        let fence = task["last_fence"].as_u64().unwrap();
        assert_eq!(task["result"]["fence"], json!(fence), "result of task {id} came from a stale fence");
        if let Some(fences) = accepted_fences.get(id) {
            assert!(fences.contains(&fence), "task {id}: accepted {fences:?}, final fence {fence}");
        }
    }
    assert!(lost.is_empty(), "acknowledged tasks lost: {lost:?}");
}

/// Acknowledged submits and accepted results a phase of the run must add
/// before it ends.
const SUBMITS_PER_PHASE: usize = 20;
const RESULTS_PER_PHASE: usize = 5;

/// Waits until the clients have had `SUBMITS_PER_PHASE` more tasks
/// acknowledged and the agents `RESULTS_PER_PHASE` more results accepted.
async fn wait_for_work(ctx: &Ctx, phase: &str) {
    let counts = || {
        let history = ctx.history.lock().unwrap();
        (history.acknowledged.len(), history.accepted.len())
    };
    let (submits, results) = counts();
    let what = format!("{SUBMITS_PER_PHASE} tasks acknowledged and {RESULTS_PER_PHASE} results accepted {phase}");
    wait_until(Duration::from_secs(30), &what, async || {
        let (submits_now, results_now) = counts();
        submits_now >= submits + SUBMITS_PER_PHASE && results_now >= results + RESULTS_PER_PHASE
    })
    .await;
}

async fn wait_leader(cluster: &Cluster) -> u64 {
    let start = Instant::now();
    loop {
        if let Some(leader) = cluster.leader().await {
            if cluster.servers[&leader].child.is_some() {
                return leader;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// All nodes reach the same applied index and hold identical tasks.
async fn converge(cluster: &Cluster) {
    let start = Instant::now();
    loop {
        let mut applied = BTreeSet::new();
        let mut listings = BTreeSet::new();
        for id in cluster.servers.keys() {
            let (_, info) = cluster.get(*id, "/v1/cluster").await.unwrap();
            applied.insert(info["last_applied"].as_u64().unwrap_or(0));
            let mut all = Vec::new();
            let mut after = 0;
            loop {
                let (_, page) =
                    cluster.get(*id, &format!("/v1/tasks?stale=true&limit=1000&after={after}")).await.unwrap();
                let tasks = page["tasks"].as_array().unwrap().clone();
                all.extend(tasks);
                match page["next_after"].as_u64() {
                    Some(next) => after = next,
                    None => break,
                }
            }
            listings.insert(serde_json::to_string(&all).unwrap());
        }
        if applied.len() == 1 && listings.len() == 1 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "nodes did not converge: applied {applied:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
