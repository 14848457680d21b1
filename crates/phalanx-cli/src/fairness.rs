//! `phalanx bench fairness`: one queue, ten tenants, tenant 0 offering ten
//! times the load of each other one, agents with less capacity than the
//! backlog; each tenant's share of the grants while every tenant is
//! backlogged, Jain's fairness index over them, and the throughput, with
//! fair dispatch (`concurrency_key` per tenant, equal weights from
//! `PUT /v1/limits/tenant:*`) against FIFO (the same tasks without a key).
//!
//! Both runs use the same local cluster (`-n`, one node by default), each on
//! a queue of its own, with the whole backlog submitted before the agents
//! start: tenant 0's tasks and the others' interleaved as they would arrive
//! (ten of tenant 0 for one of each other), so that FIFO serves them in
//! proportion to their load. The measurement window is the first half of
//! the grants, while every tenant still has work waiting in both runs.

use crate::bench::BenchArgs;
use crate::launcher::LocalCluster;
use anyhow::Context;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TENANTS: usize = 10;
/// Tenant 0 offers this many times the load of each other tenant.
const HEAVY_FACTOR: usize = 10;
/// Tasks per submit request.
const SUBMIT_BATCH: usize = 50;

/// Jain's fairness index of `shares`: 1 when all are equal, 1/n when one
/// takes everything.
pub fn jain_index(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

/// What one run saw.
struct Run {
    /// Grants per tenant within the window.
    grants: [u64; TENANTS],
    tasks_per_second: f64,
}

pub async fn fairness(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let cluster = LocalCluster::start(args.node_count, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    // Each light tenant's backlog; tenant 0 has ten times as much.
    let light = (args.tasks as usize).clamp(20, 2_000);
    println!(
        "cluster: {} node(s); one queue per run; tenant 0 offers {HEAVY_FACTOR}x the load: {} tasks, tenants 1..9 {light} each; \
         {} agents x {} leases",
        args.node_count,
        light * HEAVY_FACTOR,
        args.agents,
        args.lease_batch
    );
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build()?;
    let limits = http
        .put(format!("http://{}/v1/limits/tenant:*", addrs[0]))
        .json(&json!({"weight": 1}))
        .send()
        .await
        .context("PUT /v1/limits/tenant:*")?;
    anyhow::ensure!(limits.status().is_success(), "PUT /v1/limits/tenant:* answered {}", limits.status());
    let fifo = run(&http, &addrs, &args, "fairness-fifo", false, light).await?;
    let fair = run(&http, &addrs, &args, "fairness-fair", true, light).await?;
    println!();
    println!("{:<8} {:>10} {:>10}", "tenant", "fifo", "fair");
    let share = |run: &Run, tenant: usize| run.grants[tenant] as f64 / run.grants.iter().sum::<u64>().max(1) as f64;
    for tenant in 0..TENANTS {
        println!(
            "{:<8} {:>9.1}% {:>9.1}%",
            format!("tenant:{tenant}"),
            100.0 * share(&fifo, tenant),
            100.0 * share(&fair, tenant)
        );
    }
    let jain = |run: &Run| jain_index(&(0..TENANTS).map(|t| share(run, t)).collect::<Vec<_>>());
    println!("Jain's index over the 10 backlogged tenants: fifo {:.3}, fair {:.3}", jain(&fifo), jain(&fair));
    println!(
        "throughput (grants completed per second in the window): fifo {:.0}/s, fair {:.0}/s, cost of fair dispatch {:+.1}%",
        fifo.tasks_per_second,
        fair.tasks_per_second,
        100.0 * (fifo.tasks_per_second - fair.tasks_per_second) / fifo.tasks_per_second.max(1.0)
    );
    Ok(())
}

/// Submits the backlog to `queue` (with keys when `keyed`), runs the agents
/// until every task is done, and measures the first half of the grants.
async fn run(
    http: &reqwest::Client,
    addrs: &[String],
    args: &BenchArgs,
    queue: &str,
    keyed: bool,
    light: usize,
) -> anyhow::Result<Run> {
    // Arrival order: in each round, ten of tenant 0 then one of each other.
    let mut tasks = Vec::new();
    for round in 0..light {
        let tenants = std::iter::repeat_n(0, HEAVY_FACTOR).chain(1..TENANTS);
        for tenant in tenants {
            let mut task = json!({"queue": queue, "payload": {"tenant": tenant, "round": round}, "max_attempts": 10});
            if keyed {
                task["concurrency_key"] = json!(format!("tenant:{tenant}"));
            }
            tasks.push(task);
        }
    }
    let total = tasks.len();
    for (i, chunk) in tasks.chunks(SUBMIT_BATCH).enumerate() {
        let addr = &addrs[i % addrs.len()];
        let answer = http.post(format!("http://{addr}/v1/tasks/batch")).json(&json!({"tasks": chunk})).send().await?;
        anyhow::ensure!(answer.status().is_success(), "submit answered {}", answer.status());
        let body: Value = answer.json().await?;
        let refused = body["results"].as_array().into_iter().flatten().filter(|r| r.get("error").is_some()).count();
        anyhow::ensure!(refused == 0, "{refused} tasks of a batch refused: {body}");
    }
    let grants: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let addr = addrs[i % addrs.len()].clone();
        let agent_id = format!("{queue}-agent-{i}");
        agents.push(tokio::spawn(agent(
            http.clone(),
            addr,
            agent_id,
            queue.to_string(),
            args.lease_batch,
            grants.clone(),
            stop.clone(),
        )));
    }
    let started = Instant::now();
    loop {
        let done = grants.lock().expect("grants lock").len();
        if done >= total {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "{queue}: {done} of {total} done in 600 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for agent in agents {
        let _ = agent.await;
    }
    let mut seen = grants.lock().expect("grants lock").clone();
    seen.sort_by_key(|(at, _)| *at);
    // Every tenant is backlogged in both runs for the first half: FIFO
    // reaches the light tenants' last tasks only at the end, fair dispatch
    // when 10 x `light` grants are made, past half of the 19 x `light`.
    let window = &seen[..total / 2];
    let mut counts = [0u64; TENANTS];
    for (_, tenant) in window {
        counts[*tenant] += 1;
    }
    let elapsed = window.last().map(|(at, _)| *at).unwrap_or(started).duration_since(window[0].0);
    let tasks_per_second = window.len() as f64 / elapsed.as_secs_f64().max(1e-3);
    println!(
        "{queue}: {total} tasks in {:.1} s; window: the first {} completions, {:.0}/s",
        started.elapsed().as_secs_f64(),
        window.len(),
        tasks_per_second
    );
    Ok(Run { grants: counts, tasks_per_second })
}

/// A bench agent over raw HTTP: polls for up to `capacity` leases and
/// completes them at once, recording each completed grant's tenant.
async fn agent(
    http: reqwest::Client,
    addr: String,
    agent_id: String,
    queue: String,
    capacity: u32,
    grants: Arc<Mutex<Vec<(Instant, usize)>>>,
    stop: Arc<AtomicBool>,
) {
    let base = format!("http://{addr}");
    let register = json!({"agent_id": agent_id, "capabilities": [queue], "capacity": capacity});
    let (epoch, session) = loop {
        match http.post(format!("{base}/v1/agents/register")).json(&register).send().await {
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await.unwrap_or_default();
                break (body["epoch"].as_u64().unwrap_or(0), body["session"].clone());
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let poll = json!({"epoch": epoch, "session": session, "max_tasks": capacity, "wait_ms": 200});
    while !stop.load(Ordering::Relaxed) {
        let Ok(response) = http.post(format!("{base}/v1/agents/{agent_id}/poll")).json(&poll).send().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(body) = response.json::<Value>().await else { continue };
        let leases = body["leases"].as_array().cloned().unwrap_or_default();
        let completes = leases.iter().map(|lease| {
            let (http, base, grants) = (http.clone(), base.clone(), grants.clone());
            let id = lease["task"]["id"].as_u64().unwrap_or(0);
            let fence = lease["fence"].as_u64().unwrap_or(0);
            let tenant = lease["task"]["payload"]["tenant"].as_u64().unwrap_or(0) as usize;
            let granted_at = Instant::now();
            async move {
                let url = format!("{base}/v1/tasks/{id}/complete");
                let answer = http.post(url).json(&json!({"fence": fence, "result": "ok"})).send().await;
                if answer.is_ok_and(|r| r.status().is_success()) {
                    grants.lock().expect("grants lock").push((granted_at, tenant.min(TENANTS - 1)));
                }
            }
        });
        futures::future::join_all(completes).await;
    }
    let _ = http
        .post(format!("{base}/v1/agents/{agent_id}/deregister"))
        .json(&json!({"epoch": epoch, "session": session}))
        .send()
        .await;
}

#[cfg(test)]
mod tests {
    use super::jain_index;

    #[test]
    fn jain_index_of_equal_and_skewed_shares() {
        assert!((jain_index(&[0.1; 10]) - 1.0).abs() < 1e-9);
        let one_takes_all: Vec<f64> = std::iter::once(1.0).chain(std::iter::repeat_n(0.0, 9)).collect();
        assert!((jain_index(&one_takes_all) - 0.1).abs() < 1e-9);
        // Ten times the load served first-come first-served.
        let fifo: Vec<f64> = std::iter::once(10.0).chain(std::iter::repeat_n(1.0, 9)).collect();
        assert!((jain_index(&fifo) - 361.0 / 1090.0).abs() < 1e-9);
    }
}
