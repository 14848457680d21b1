//! `phalanx bench budget`: delegation trees with token budgets. A planner
//! leases each root and delegates its children (each with a cost estimate);
//! workers complete the children, reporting the tokens each used. When a
//! tree's reported usage reaches its budget, its pending children are
//! paused. Printed: each tree's overshoot (usage past the budget) against
//! what the tasks already leased when the budget was reached could add (the
//! aim: never more), then how long a paused tree takes to run again once its
//! budget is raised (`PUT /v1/tasks/{root}/budget`).
//!
//! Judged in log time, from what the node answers: a grant's log time is
//! its `valid_until_ms - lease_ttl_ms`, a completion's the task's
//! `updated_ms`. Usage adds up in log order, so a tree reaches its budget at
//! its tenth completion (time T); the leases granted by T, less those ten,
//! are the tasks that may still add to it, and no lease may be granted after
//! T. (Log time is in milliseconds: a grant in the same millisecond as T
//! counts as before it.)

use crate::bench::BenchArgs;
use crate::launcher::LocalCluster;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Children each root delegates.
const CHILDREN: usize = 30;
/// Tokens each child reports using (and estimates).
const CHILD_TOKENS: u64 = 100;
/// Each tree's budget: ten children's worth.
const BUDGET_TOKENS: u64 = 1_000;

#[derive(Default)]
struct Tree {
    /// Its children's leases before the raise: (granted, completed) in log time.
    leases: Vec<(u64, Option<u64>)>,
    /// The first grant of one of its children after its budget was raised.
    resumed_after: Option<Duration>,
}

#[derive(Default)]
struct Shared {
    trees: Mutex<BTreeMap<u64, Tree>>,
    /// Root id -> when its budget was raised.
    raised_at: Mutex<BTreeMap<u64, Instant>>,
    grants: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
}

async fn post(http: &reqwest::Client, url: String, body: &Value) -> anyhow::Result<Value> {
    let answer = http.post(&url).json(body).send().await?;
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {body}");
    Ok(body)
}

pub async fn budget(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let cluster = LocalCluster::start(args.node_count, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    let base = format!("http://{}", addrs[0]);
    let trees = (args.tasks as usize).clamp(1, 200);
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).tcp_nodelay(true).build()?;
    println!(
        "cluster: {} node(s); {trees} trees of {CHILDREN} children, each child {CHILD_TOKENS} tokens, budget \
         {BUDGET_TOKENS} tokens per tree; {} workers x {} leases",
        args.node_count, args.agents, args.lease_batch
    );

    // The roots, each with its budget.
    let mut roots = Vec::new();
    for i in 0..trees {
        let body = json!({"queue": "budget-plan", "payload": i, "budget": {"tokens_max": BUDGET_TOKENS}});
        roots.push(post(&http, format!("{base}/v1/tasks"), &body).await?["task_id"].as_u64().unwrap_or(0));
    }
    // The planner: leases every root, delegates its children, completes it.
    let planner = post(
        &http,
        format!("{base}/v1/agents/register"),
        &json!({"agent_id": "planner", "capabilities": ["budget-plan"], "capacity": trees}),
    )
    .await?;
    let session = json!({"epoch": planner["epoch"], "session": planner["session"]});
    let mut planned = 0;
    let started = Instant::now();
    while planned < trees {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the planner got {planned} of {trees} roots");
        let mut poll = session.clone();
        poll["max_tasks"] = json!(trees.min(1000));
        poll["wait_ms"] = json!(500);
        poll["lease_ttl_ms"] = json!(60_000);
        let answer = post(&http, format!("{base}/v1/agents/planner/poll"), &poll).await?;
        for lease in answer["leases"].as_array().into_iter().flatten() {
            let (root, fence) = (lease["task"]["id"].clone(), lease["fence"].clone());
            let children: Vec<Value> = (0..CHILDREN)
                .map(|n| {
                    json!({"queue": "budget-work", "payload": {"root": root, "n": n}, "parent_id": root,
                           "parent_fence": fence, "cost_estimate": CHILD_TOKENS})
                })
                .collect();
            let answer = post(&http, format!("{base}/v1/tasks/batch"), &json!({"tasks": children})).await?;
            let refused =
                answer["results"].as_array().into_iter().flatten().filter(|r| r.get("error").is_some()).count();
            anyhow::ensure!(refused == 0, "{refused} children refused: {answer}");
            post(&http, format!("{base}/v1/tasks/{root}/complete"), &json!({"fence": fence, "result": "planned"}))
                .await?;
            planned += 1;
        }
    }

    let shared = Arc::new(Shared::default());
    shared.trees.lock().expect("trees lock").extend(roots.iter().map(|root| (*root, Tree::default())));
    let mut workers = Vec::new();
    for i in 0..args.agents {
        let addr = addrs[i % addrs.len()].clone();
        workers.push(tokio::spawn(worker(http.clone(), addr, format!("worker-{i}"), args.lease_batch, shared.clone())));
    }
    // Until nothing more is granted: every tree reached its budget, the rest paused.
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let grants = shared.grants.load(Ordering::Relaxed);
        if grants != last.0 {
            last = (grants, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "the trees did not settle in 300 s");
    }
    let status: Value = http.get(format!("{base}/v1/status")).send().await?.json().await?;
    let usage: BTreeMap<u64, u64> = status["trees"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let u = &t["usage"];
            (
                t["root_id"].as_u64().unwrap_or(0),
                u["tokens_in"].as_u64().unwrap_or(0) + u["tokens_out"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let paused = status["queues"]["budget-work"]["paused"].as_u64().unwrap_or(0);
    let mut overshoots = Vec::new();
    let mut violations = 0;
    let mut bounds = Vec::new();
    {
        let trees = shared.trees.lock().expect("trees lock");
        let reach = (BUDGET_TOKENS / CHILD_TOKENS) as usize;
        for (root, tree) in trees.iter() {
            let mut completed: Vec<u64> = tree.leases.iter().filter_map(|(_, done)| *done).collect();
            completed.sort_unstable();
            let used = usage.get(root).copied().unwrap_or(completed.len() as u64 * CHILD_TOKENS);
            let overshoot = used.saturating_sub(BUDGET_TOKENS);
            let Some(&reached) = completed.get(reach - 1) else {
                println!("tree {root}: only {} children completed, under its budget", completed.len());
                violations += 1;
                continue;
            };
            // Granted by T and not among the completions that reached the
            // budget (several completions of one Raft entry share its log time).
            let in_flight = tree.leases.iter().filter(|(granted, _)| *granted <= reached).count().saturating_sub(reach);
            let late = tree.leases.iter().filter(|(granted, _)| *granted > reached).count();
            let bound = in_flight as u64 * CHILD_TOKENS;
            if overshoot > bound || late > 0 {
                violations += 1;
                println!(
                    "tree {root}: used {used}, overshoot {overshoot} (bound {bound}); {late} leases granted after the \
                     budget was reached at {reached}"
                );
            }
            overshoots.push(overshoot);
            bounds.push(bound);
        }
    }
    overshoots.sort_unstable();
    bounds.sort_unstable();
    let pick = |v: &[u64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "budget reached: {} children paused; overshoot per tree p50 {} / max {} tokens; in-flight bound p50 {} / max {} \
         tokens; trees over their bound: {violations} of {trees}",
        paused,
        pick(&overshoots, 0.5),
        pick(&overshoots, 1.0),
        pick(&bounds, 0.5),
        pick(&bounds, 1.0),
    );

    // Raise every budget; time until the tree is granted again.
    let mut answered_ms = Vec::new();
    for root in &roots {
        let at = Instant::now();
        shared.raised_at.lock().expect("raised lock").insert(*root, at);
        let answer = http
            .put(format!("{base}/v1/tasks/{root}/budget"))
            .json(&json!({"budget": {"tokens_max": 1_000_000_000u64}}))
            .send()
            .await?;
        anyhow::ensure!(answer.status().is_success(), "raising the budget of {root} answered {}", answer.status());
        answered_ms.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    let raised = Instant::now();
    loop {
        let waiting = shared.trees.lock().expect("trees lock").values().filter(|t| t.resumed_after.is_none()).count();
        if waiting == 0 {
            break;
        }
        anyhow::ensure!(raised.elapsed() < Duration::from_secs(60), "{waiting} trees not granted 60 s after the raise");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    let mut resumed_ms: Vec<f64> = shared
        .trees
        .lock()
        .expect("trees lock")
        .values()
        .filter_map(|t| t.resumed_after.map(|d| d.as_secs_f64() * 1000.0))
        .collect();
    resumed_ms.sort_by(f64::total_cmp);
    answered_ms.sort_by(f64::total_cmp);
    let pickf = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "budget raised: PUT answered p50 {:.1} / max {:.1} ms (the paused children resume in that entry); \
         first grant of the tree after the raise p50 {:.1} / max {:.1} ms",
        pickf(&answered_ms, 0.5),
        pickf(&answered_ms, 1.0),
        pickf(&resumed_ms, 0.5),
        pickf(&resumed_ms, 1.0),
    );
    anyhow::ensure!(violations == 0, "{violations} trees overshot more than their leases in flight could");
    Ok(())
}

/// Polls children, completes each reporting `CHILD_TOKENS`, and keeps the
/// per-tree counts.
async fn worker(http: reqwest::Client, addr: String, agent_id: String, capacity: u32, shared: Arc<Shared>) {
    let base = format!("http://{addr}");
    let register = json!({"agent_id": agent_id, "capabilities": ["budget-work"], "capacity": capacity});
    let Ok(registered) = post(&http, format!("{base}/v1/agents/register"), &register).await else { return };
    let poll =
        json!({"epoch": registered["epoch"], "session": registered["session"], "max_tasks": capacity, "wait_ms": 200});
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(answer) = post(&http, format!("{base}/v1/agents/{agent_id}/poll"), &poll).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // (root, task id, fence, granted at in log time, slot in the tree's leases)
        let mut leases: Vec<(u64, u64, Value, Option<usize>)> = Vec::new();
        {
            let mut trees = shared.trees.lock().expect("trees lock");
            let raised = shared.raised_at.lock().expect("raised lock");
            for lease in answer["leases"].as_array().into_iter().flatten() {
                let root = lease["task"]["parent_id"].as_u64().unwrap_or(0);
                let granted = lease["valid_until_ms"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(lease["lease_ttl_ms"].as_u64().unwrap_or(0));
                let tree = trees.entry(root).or_default();
                let slot = match raised.get(&root) {
                    Some(at) => {
                        tree.resumed_after.get_or_insert_with(|| at.elapsed());
                        None
                    }
                    None => {
                        tree.leases.push((granted, None));
                        Some(tree.leases.len() - 1)
                    }
                };
                leases.push((root, lease["task"]["id"].as_u64().unwrap_or(0), lease["fence"].clone(), slot));
            }
        }
        shared.grants.fetch_add(leases.len() as u64, Ordering::Relaxed);
        for (root, id, fence, slot) in leases {
            let body = json!({"fence": fence, "result": "done", "usage": {"tokens_out": CHILD_TOKENS}});
            let Ok(task) = post(&http, format!("{base}/v1/tasks/{id}/complete"), &body).await else { continue };
            if let Some(slot) = slot {
                let mut trees = shared.trees.lock().expect("trees lock");
                trees.entry(root).or_default().leases[slot].1 = task["updated_ms"].as_u64();
            }
        }
    }
}
