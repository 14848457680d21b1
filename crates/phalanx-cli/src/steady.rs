//! `phalanx bench steady`: a fault-free mixed workload on a local cluster,
//! to show that nothing but a fault moves the leadership.
//!
//! SDK agents with long polls (planners that delegate two children and wait
//! for them, researchers, writers, a note taker), SDK clients submitting
//! plans and notes at a steady rate, and a reader doing linearizable reads,
//! for `--seconds`. Printed every 10 s and at the end: the elections (terms
//! gained, which counts failed campaigns too), the calls that failed after
//! the SDK's retries, and the work done.

use crate::bench::{cluster_term, percentile, BenchArgs};
use crate::launcher::LocalCluster;
use phalanx_agent::{handler, Agent, AgentConfig, Client, HandlerError, SubmitRequest, TaskContext};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Between one client's plan submits, and between its note submits.
const PLAN_EVERY_MS: u64 = 250;
const NOTE_EVERY_MS: u64 = 25;
const READ_EVERY_MS: u64 = 50;

/// The sum over the nodes of one counter of their `/metrics`.
async fn metric_sum(http: &reqwest::Client, addrs: &[String], name: &str) -> u64 {
    let mut sum = 0;
    for addr in addrs {
        let Ok(response) = http.get(format!("http://{addr}/metrics")).send().await else { continue };
        let Ok(text) = response.text().await else { continue };
        sum += text
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    sum
}

async fn plan(context: TaskContext) -> Result<Value, HandlerError> {
    let n = context.task.payload["n"].clone();
    let research = context.spawn_child("steady-research", json!({ "n": n })).await?;
    let draft = context.spawn_child("steady-write", json!({ "n": n })).await?;
    let children = context.await_tasks(&[research, draft], Duration::from_secs(60)).await?;
    Ok(json!({ "research": children[0].result, "draft": children[1].result }))
}

/// Stand-ins for model calls: a little latency, a deterministic answer.
async fn research(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(json!({ "facts": context.task.payload["n"] }))
}

async fn write(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(80)).await;
    Ok(json!({ "text": context.task.payload["n"] }))
}

async fn note(context: TaskContext) -> Result<Value, HandlerError> {
    Ok(context.task.payload.clone())
}

#[derive(Default)]
struct Counts {
    plans: AtomicU64,
    notes: AtomicU64,
    reads: AtomicU64,
    /// Calls that failed after the SDK's retries.
    failed: AtomicU64,
    submit_ms: Mutex<Vec<u64>>,
    last_id: AtomicU64,
}

pub async fn steady(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let nodes = args.node_count.max(3);
    let cluster = LocalCluster::start(nodes, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    let http = crate::launcher::http_client(None)?;
    println!(
        "cluster: {nodes} nodes; {} clients submitting a plan every {PLAN_EVERY_MS} ms and a note every \
         {NOTE_EVERY_MS} ms, a reader every {READ_EVERY_MS} ms, long-polling SDK agents; {} s, no faults",
        args.clients, args.seconds
    );
    let stop_agents = Arc::new(tokio::sync::Notify::new());
    let mut agent_handles = Vec::new();
    for (name, queue, function, count) in [
        ("planner", "steady-plan", handler(plan), 2),
        ("researcher", "steady-research", handler(research), 2),
        ("writer", "steady-write", handler(write), 2),
        ("noter", "steady-note", handler(note), 2),
    ] {
        for i in 0..count {
            let mut config = AgentConfig::new(addrs.clone(), format!("steady-{name}-{i}"), vec![queue.to_string()]);
            config.concurrency = 16;
            config.lease_ttl_ms = 10_000;
            config.poll_wait_ms = 2_000;
            config.outbox_dir = Some(dir.path().join("outbox"));
            let agent = Agent::new(config, function.clone())?;
            let stop = stop_agents.clone();
            agent_handles
                .push(tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let term_before = cluster_term(&http, &addrs).await;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..args.clients.max(1) {
        let client = Arc::new(Client::new(addrs.clone(), None)?.with_name(format!("steady-client-{i}")));
        for (queue, every_ms) in [("steady-plan", PLAN_EVERY_MS), ("steady-note", NOTE_EVERY_MS)] {
            let (client, counts, stop) = (client.clone(), counts.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sent = Instant::now();
                    match client.submit(&SubmitRequest::new(queue, json!({ "n": n, "client": i }))).await {
                        Ok(submitted) => {
                            counts.submit_ms.lock().expect("latency lock").push(sent.elapsed().as_millis() as u64);
                            counts.last_id.fetch_max(submitted.task_id, Ordering::Relaxed);
                            let counter = if queue == "steady-plan" { &counts.plans } else { &counts.notes };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(every_ms)).await;
                }
            }));
        }
    }
    {
        let client = Client::new(addrs.clone(), None)?.with_name("steady-reader");
        let (counts, stop) = (counts.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let last = counts.last_id.load(Ordering::Relaxed);
                if last > 0 {
                    let id = 1 + rand::random::<u64>() % last;
                    match client.get_task(id, false).await {
                        Ok(_) | Err(phalanx_agent::Error::Api { status: 404, .. }) => {
                            counts.reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(READ_EVERY_MS)).await;
            }
        }));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(args.seconds))).await;
        let term = cluster_term(&http, &addrs).await;
        println!(
            "{:>5.0} s: elections {}, plans {}, notes {}, reads {}, failed calls {}",
            started.elapsed().as_secs_f64(),
            term.saturating_sub(term_before),
            counts.plans.load(Ordering::Relaxed),
            counts.notes.load(Ordering::Relaxed),
            counts.reads.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
        );
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let term = cluster_term(&http, &addrs).await;
    let early = metric_sum(&http, &addrs, "phalanx_early_elections_total").await;
    stop_agents.notify_waiters();
    for handle in agent_handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }
    let mut latencies = std::mem::take(&mut *counts.submit_ms.lock().expect("latency lock"));
    latencies.sort_unstable();
    println!();
    println!(
        "steady, {nodes} nodes, {elapsed:.0} s: elections {} (asked for early: {early}), failed calls {}, plans {} \
         ({:.1}/s), notes {} ({:.1}/s), reads {}, submit p50 {} ms p99 {} ms max {} ms, load average {}",
        term.saturating_sub(term_before),
        counts.failed.load(Ordering::Relaxed),
        counts.plans.load(Ordering::Relaxed),
        counts.plans.load(Ordering::Relaxed) as f64 / elapsed,
        counts.notes.load(Ordering::Relaxed),
        counts.notes.load(Ordering::Relaxed) as f64 / elapsed,
        counts.reads.load(Ordering::Relaxed),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?"),
    );
    drop(cluster);
    Ok(())
}
