//! `phalanx bench`: end-to-end throughput (submit → lease → complete) and
//! latency on a local cluster of real node processes, with the disk's own
//! fsync rate measured in the same run as the baseline.
//!
//! Clients submit in batches, agents lease many tasks per poll and report
//! their results together (`--complete-batch`, as the SDK agents do; 1
//! reports each alone); the proposer turns concurrent requests into group
//! commits. The figures
//! printed are what BENCHMARKS.md records.

use crate::launcher::LocalCluster;
use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(default_value = "throughput", value_parser = scenarios())]
    pub scenario: String,
    /// Where `overload` writes its CSV and SVG.
    #[arg(long, default_value = "bench-results")]
    pub out_dir: std::path::PathBuf,
    /// How many nodes the local cluster has (1, 3 or 5).
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub node_count: u64,
    /// Seconds of measurement (after a warm-up of 2 s).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Tasks per submit request.
    #[arg(long, default_value_t = 50)]
    pub submit_batch: usize,
    /// Concurrent agents.
    #[arg(long, default_value_t = 8)]
    pub agents: usize,
    /// Tasks leased per poll.
    #[arg(long, default_value_t = 64)]
    pub lease_batch: u32,
    /// Results an agent reports per request: its leases' results go
    /// together in `POST /v1/tasks/complete` (as the SDK agents send them);
    /// 1 sends each with `POST /v1/tasks/{id}/complete`.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub complete_batch: u32,
    /// Clients stop submitting while this many tasks wait, so the queue stays bounded.
    #[arg(long, default_value_t = 20_000)]
    pub backlog_max: u64,
    /// Tasks pushed through by `soak`; `fairness`: each light tenant's
    /// backlog (20..=2000; tenant 0 has ten times as much).
    #[arg(long, default_value_t = 1_000_000)]
    pub tasks: u64,
    /// Leader SIGKILLs to measure the write outage (cluster mode only).
    #[arg(long, default_value_t = 0)]
    pub kills: u32,
    /// `failover`: the faults done to the leader, comma-separated: `kill`
    /// (SIGKILL), `pause` (SIGSTOP), `isolate`, `one-way`.
    #[arg(long, default_value = "kill,pause")]
    pub fault: String,
    /// `failover`: rounds per fault.
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Extra arguments for every `phalanx server` (e.g. Raft timings), space-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub server_args: String,
    /// `overload`: who offers the load: `raw` (open-loop clients of the
    /// bench's own HTTP client, ignoring Retry-After), `sdk` (the Rust SDK's
    /// clients: adaptive throttling, retry budget, Retry-After), or `both`
    /// (raw levels, then SDK levels, on the same cluster and capacity).
    #[arg(long, default_value = "raw", value_parser = ["raw", "sdk", "both"])]
    pub client_kind: String,
    /// `overload`: the SDK clients' throttle window in ms (docs/sdk.md, 10);
    /// 0 keeps the SDK's default.
    #[arg(long, default_value_t = 0)]
    pub sdk_throttle_window_ms: u64,
    /// `delegation`: exit with status 1 when the checker finds a violation.
    #[arg(long)]
    pub check: bool,
    /// `delegation`: the seed of the planners' and researchers' faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The scenarios of `phalanx bench`, each with the help `--help` shows.
fn scenarios() -> clap::builder::PossibleValuesParser {
    use clap::builder::PossibleValue;
    clap::builder::PossibleValuesParser::new([
        PossibleValue::new("throughput").help("submit -> lease -> complete end to end, against the disk's fsync rate"),
        PossibleValue::new("overload").help("open-loop load at multiples of capacity (CSV and SVG in --out-dir)"),
        PossibleValue::new("backlog").help("an outage under load, then the drain"),
        PossibleValue::new("failover").help("faults to the leader (--fault), as SDK clients see them"),
        PossibleValue::new("soak").help("many tasks (--tasks) through, memory and disk watched"),
        PossibleValue::new("steady").help("a fault-free mixed workload: elections must be 0"),
        PossibleValue::new("delegation").help("planners replaced mid-tree under leader faults, checked (--check)"),
        PossibleValue::new("fairness")
            .help("ten tenants, one with 10x the load: shares, Jain's index and throughput, fair dispatch vs FIFO"),
        PossibleValue::new("budget")
            .help("delegation trees with token budgets (--tasks trees): overshoot per tree, resume after a raise"),
        PossibleValue::new("restart")
            .help("a node with --tasks pending tasks restarted: time to ready, memory per task, both snapshot formats"),
        PossibleValue::new("refusals")
            .help("the CPU one node spends per request refused at the door and per task served, measured apart"),
    ])
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    measuring: AtomicBool,
    submitted: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    /// Task id -> submit acknowledged at.
    submitted_at: Mutex<std::collections::HashMap<u64, Instant>>,
    submit_latency_us: Mutex<Vec<u64>>,
    complete_latency_us: Mutex<Vec<u64>>,
    end_to_end_us: Mutex<Vec<u64>>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario.as_str() {
        "throughput" => throughput(args).await,
        "overload" => crate::overload::overload(args).await,
        "backlog" => crate::overload::backlog(args).await,
        "soak" => soak(args).await,
        "failover" => crate::failover::failover(args).await,
        "steady" => crate::steady::steady(args).await,
        "delegation" => crate::delegation::delegation(args).await,
        "fairness" => crate::fairness::fairness(args).await,
        "budget" => crate::budget::budget(args).await,
        "restart" => crate::restart::restart(args).await,
        "refusals" => crate::overload::refusal_cost(args).await,
        other => {
            anyhow::bail!(
                "unknown scenario {other:?}: use throughput, overload, backlog, soak, failover, steady, delegation, fairness or budget"
            )
        }
    }
}

async fn throughput(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fsync_per_second = measure_fsync(dir.path(), 300)?;
    println!("disk baseline: {fsync_per_second:.0} fsyncs/s (4 KiB write + fdatasync, same file system)");
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let cluster = LocalCluster::start(args.node_count, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    println!("cluster: {} node(s) at {}", args.node_count, addrs.join(","));
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build()?;
    let shared = Arc::new(Shared::default());
    let mut handles = Vec::new();
    for i in 0..args.agents {
        // Agents spread over all nodes: followers forward to the leader.
        let addr = addrs[i % addrs.len()].clone();
        handles.push(tokio::spawn(agent_loop(
            http.clone(),
            addr,
            format!("bench-agent-{i}"),
            args.clone(),
            shared.clone(),
        )));
    }
    for i in 0..args.clients {
        let addr = addrs[i % addrs.len()].clone();
        handles.push(tokio::spawn(client_loop(http.clone(), addr, args.clone(), shared.clone())));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let term_before = cluster_term(&http, &addrs).await;
    shared.measuring.store(true, Ordering::SeqCst);
    let completed_before = shared.completed.load(Ordering::SeqCst);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let completed = shared.completed.load(Ordering::SeqCst) - completed_before;
    shared.measuring.store(false, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    for handle in handles {
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
    let throughput = completed as f64 / elapsed;
    println!(
        "throughput: {throughput:.0} tasks/s end to end ({completed} tasks in {elapsed:.1} s; {} clients x batch {}, {} agents x lease {}, results reported {} per request)",
        args.clients, args.submit_batch, args.agents, args.lease_batch, args.complete_batch
    );
    println!("ratio to the disk's fsync rate: {:.1}x", throughput / fsync_per_second);
    print_percentiles("submit (per request)", &shared.submit_latency_us.lock().unwrap());
    print_percentiles("complete (per result, its request's latency)", &shared.complete_latency_us.lock().unwrap());
    print_percentiles("end to end (submit ack -> complete ack)", &shared.end_to_end_us.lock().unwrap());
    println!("errors: {}", shared.errors.load(Ordering::SeqCst));
    let term_after = cluster_term(&http, &addrs).await;
    println!("leader elections during the measurement: {}", term_after.saturating_sub(term_before));
    if args.kills > 0 {
        drop(shared);
        measure_outages(cluster, &http, args.kills).await?;
    }
    Ok(())
}

/// The highest Raft term any node reports: it grows by one per election.
pub async fn cluster_term(http: &reqwest::Client, addrs: &[String]) -> u64 {
    let mut term = 0;
    for addr in addrs {
        if let Ok(response) = http.get(format!("http://{addr}/v1/cluster")).send().await {
            if let Ok(body) = response.json::<Value>().await {
                term = term.max(body["term"].as_u64().unwrap_or(0));
            }
        }
    }
    term
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            total += if path.is_dir() { dir_bytes(&path) } else { entry.metadata().map(|m| m.len()).unwrap_or(0) };
        }
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Pushes `--tasks` tasks through one node and samples its memory and disk
/// every 5 s: both must level off (finished tasks are compacted past
/// `finished_tasks_max`, the log past each snapshot).
async fn soak(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = LocalCluster::start(1, dir.path(), &[]).await?;
    let addrs = cluster.addrs();
    let pid = cluster.pid(1).context("node pid")?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build()?;
    let shared = Arc::new(Shared::default());
    let mut handles = Vec::new();
    for i in 0..args.agents {
        handles.push(tokio::spawn(agent_loop(
            http.clone(),
            addrs[0].clone(),
            format!("soak-agent-{i}"),
            args.clone(),
            shared.clone(),
        )));
    }
    for _ in 0..args.clients {
        handles.push(tokio::spawn(client_loop(http.clone(), addrs[0].clone(), args.clone(), shared.clone())));
    }
    let started = Instant::now();
    let mut rows = vec!["seconds,tasks_completed,rss_mib,disk_mib,tasks_in_state".to_string()];
    let mut samples = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let done = shared.completed.load(Ordering::Relaxed);
        let rss = rss_kib(pid) as f64 / 1024.0;
        let disk = dir_bytes(dir.path()) as f64 / (1024.0 * 1024.0);
        let in_state = match http.get(format!("http://{}/v1/status?stale=true", addrs[0])).send().await {
            Ok(r) => r.json::<Value>().await.map(|v| v["tasks"].as_u64().unwrap_or(0)).unwrap_or(0),
            Err(_) => 0,
        };
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{seconds:>6.0} s: {done:>8} tasks done, RSS {rss:>7.1} MiB, disk {disk:>7.1} MiB, {in_state} tasks kept"
        );
        rows.push(format!("{seconds:.0},{done},{rss:.1},{disk:.1},{in_state}"));
        samples.push((done as f64, rss, disk));
        if done >= args.tasks {
            break;
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    for handle in handles {
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(args.out_dir.join("soak.csv"), rows.join("\n") + "\n")?;
    std::fs::write(args.out_dir.join("soak.svg"), soak_svg(&samples))?;
    println!("wrote {}/soak.csv and soak.svg", args.out_dir.display());
    Ok(())
}

fn soak_svg(samples: &[(f64, f64, f64)]) -> String {
    let (width, height, margin) = (640.0, 360.0, 60.0);
    let x_max = samples.iter().map(|s| s.0).fold(1.0, f64::max);
    let y_max = samples.iter().map(|s| s.1.max(s.2)).fold(1.0, f64::max) * 1.1;
    let x = |v: f64| margin + v / x_max * (width - 2.0 * margin);
    let y = |v: f64| height - margin - v / y_max * (height - 2.0 * margin);
    let line = |pick: &dyn Fn(&(f64, f64, f64)) -> f64| {
        samples.iter().map(|s| format!("{:.1},{:.1}", x(s.0), y(pick(s)))).collect::<Vec<_>>().join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">Soak: one node, {:.0} tasks</text>
<line x1="{margin}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">tasks completed</text>
<text x="{}" y="{margin}" fill="#555">{:.0} MiB</text>
<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>
<polyline points="{}" fill="none" stroke="#2ca02c" stroke-width="2"/>
<text x="{}" y="40" fill="#1f77b4">resident memory</text>
<text x="{}" y="55" fill="#2ca02c">data directory on disk</text>
</svg>
"##,
        width / 2.0,
        x_max,
        height - margin,
        width - margin,
        height - margin,
        height - margin,
        width / 2.0,
        height - 20.0,
        5.0,
        y_max,
        line(&|s| s.1),
        line(&|s| s.2),
        width - 200.0,
        width - 200.0,
    )
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn print_percentiles(name: &str, samples: &[u64]) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    println!(
        "latency {name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        percentile(&sorted, 0.5) as f64 / 1000.0,
        percentile(&sorted, 0.99) as f64 / 1000.0,
        sorted.last().copied().unwrap_or(0) as f64 / 1000.0,
        sorted.len()
    );
}

/// Writes 4 KiB and fdatasyncs, `count` times: the rate one fsync-per-write design could reach.
pub fn measure_fsync(dir: &std::path::Path, count: u32) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = vec![7u8; 4096];
    let start = Instant::now();
    for _ in 0..count {
        file.write_all(&block)?;
        file.sync_data()?;
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

async fn client_loop(http: reqwest::Client, addr: String, args: BenchArgs, shared: Arc<Shared>) {
    let url = format!("http://{addr}/v1/tasks/batch");
    let tasks: Vec<Value> = (0..args.submit_batch).map(|i| json!({"queue": "bench", "payload": {"n": i}})).collect();
    let body = json!({ "tasks": tasks });
    while !shared.stop.load(Ordering::Relaxed) {
        let backlog = shared.submitted.load(Ordering::Relaxed) - shared.completed.load(Ordering::Relaxed);
        if backlog > args.backlog_max {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let start = Instant::now();
        let answer = http.post(&url).json(&body).timeout(Duration::from_secs(10)).send().await;
        let Ok(response) = answer else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !response.status().is_success() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Ok(body) = response.json::<Value>().await else { continue };
        let now = Instant::now();
        if shared.measuring.load(Ordering::Relaxed) {
            shared.submit_latency_us.lock().unwrap().push(start.elapsed().as_micros() as u64);
        }
        let mut at = shared.submitted_at.lock().unwrap();
        for result in body["results"].as_array().into_iter().flatten() {
            if let Some(id) = result["task_id"].as_u64() {
                at.insert(id, now);
                shared.submitted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn agent_loop(http: reqwest::Client, addr: String, agent_id: String, args: BenchArgs, shared: Arc<Shared>) {
    let base = format!("http://{addr}");
    let register = json!({"agent_id": agent_id, "capabilities": ["bench"], "capacity": args.lease_batch});
    let (epoch, session) = loop {
        match http.post(format!("{base}/v1/agents/register")).json(&register).send().await {
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await.unwrap_or_default();
                break (body["epoch"].as_u64().unwrap_or(0), body["session"].clone());
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let poll = json!({"epoch": epoch, "session": session, "max_tasks": args.lease_batch, "wait_ms": 500});
    while !shared.stop.load(Ordering::Relaxed) {
        let answer = http.post(format!("{base}/v1/agents/{agent_id}/poll")).json(&poll).send().await;
        let Ok(response) = answer else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(body) = response.json::<Value>().await else { continue };
        let leases: Vec<(u64, u64)> = body["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|lease| (lease["task"]["id"].as_u64().unwrap_or(0), lease["fence"].as_u64().unwrap_or(0)))
            .collect();
        let completes = leases.chunks(args.complete_batch as usize).map(|chunk| {
            let (http, base, shared) = (http.clone(), base.clone(), shared.clone());
            async move {
                let start = Instant::now();
                let accepted: Vec<u64> = if let [(id, fence)] = chunk {
                    let url = format!("{base}/v1/tasks/{id}/complete");
                    let answer = http.post(url).json(&json!({"fence": fence, "result": "ok"})).send().await;
                    if answer.is_ok_and(|r| r.status().is_success()) {
                        vec![*id]
                    } else {
                        vec![]
                    }
                } else {
                    let results: Vec<Value> = chunk
                        .iter()
                        .map(|(id, fence)| json!({"task_id": id, "fence": fence, "result": "ok"}))
                        .collect();
                    let answer = http
                        .post(format!("{base}/v1/tasks/complete"))
                        .json(&json!({ "results": results }))
                        .send()
                        .await;
                    let body = match answer {
                        Ok(response) if response.status().is_success() => {
                            response.json::<Value>().await.unwrap_or_default()
                        }
                        _ => Value::Null,
                    };
                    // Each result is judged on its own: count only those accepted.
                    body["results"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|item| item["ok"].as_bool() == Some(true))
                        .filter_map(|item| item["task_id"].as_u64())
                        .collect()
                };
                shared.errors.fetch_add((chunk.len() - accepted.len()) as u64, Ordering::Relaxed);
                let measuring = shared.measuring.load(Ordering::Relaxed);
                for id in accepted {
                    let submitted = shared.submitted_at.lock().unwrap().remove(&id);
                    shared.completed.fetch_add(1, Ordering::Relaxed);
                    if measuring {
                        shared.complete_latency_us.lock().unwrap().push(start.elapsed().as_micros() as u64);
                        if let Some(at) = submitted {
                            shared.end_to_end_us.lock().unwrap().push(at.elapsed().as_micros() as u64);
                        }
                    }
                }
            }
        });
        futures::future::join_all(completes).await;
    }
}

/// Kills the leader `kills` times while a writer submits one task at a time,
/// and reports the longest gap between acknowledged writes around each kill.
async fn measure_outages(mut cluster: LocalCluster, http: &reqwest::Client, kills: u32) -> anyhow::Result<()> {
    let mut outages_ms = Vec::new();
    for round in 0..kills {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        let addrs: Vec<String> = cluster.nodes.values().filter(|n| n.id != leader).map(|n| n.addr.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(outage_writer(http.clone(), addrs, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stop.store(true, Ordering::SeqCst);
        let acks = writer.await.context("writer")?;
        // The outage: from the kill to the first acknowledgement of a write
        // that was sent after the kill (one already in flight proves nothing).
        let first = acks.iter().filter(|(sent, _)| *sent >= killed_at).map(|(_, acked)| *acked).min();
        match first {
            Some(acked) => {
                let ms = acked.duration_since(killed_at).as_millis() as u64;
                println!("kill {}: leader {leader} SIGKILLed, write outage {ms} ms", round + 1);
                outages_ms.push(ms);
            }
            None => println!("kill {}: no write acknowledged within 2.5 s of the kill", round + 1),
        }
        cluster.spawn(leader)?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    outages_ms.sort_unstable();
    println!(
        "write outage after leader SIGKILL: p50 {} ms, max {} ms over {} kills",
        percentile(&outages_ms, 0.5),
        outages_ms.last().copied().unwrap_or(0),
        outages_ms.len()
    );
    Ok(())
}

/// Submits one task at a time to the surviving nodes, round robin, and
/// records when each acknowledged write was sent and acknowledged.
async fn outage_writer(http: reqwest::Client, addrs: Vec<String>, stop: Arc<AtomicBool>) -> Vec<(Instant, Instant)> {
    let mut acks = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        let sent = Instant::now();
        let answer = http
            .post(format!("http://{addr}/v1/tasks"))
            .json(&json!({"queue": "outage", "payload": i}))
            .timeout(Duration::from_millis(1000))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            acks.push((sent, Instant::now()));
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    acks
}
