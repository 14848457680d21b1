//! `phalanx bench overload` and `phalanx bench backlog`.
//!
//! Overload: measure capacity (closed loop), then offer open-loop load at
//! 1x, 2x, 5x and 10x of it from many named clients, and report the rate
//! actually offered, goodput, shed rate, latency of admitted requests and of
//! refusals, elections, and peak memory; then drop back to 1x and time how
//! long the p99 takes to return to normal. Writes a CSV and an SVG chart.
//!
//! Two populations can offer the load (`--client-kind`): raw open-loop
//! clients that ignore `Retry-After`, and the Rust SDK's clients (adaptive
//! throttling, docs/sdk.md 10; retry budget; `Retry-After`). Each
//! population's capacity is measured with its own client (the SDK's costs
//! more CPU on the cores it shares with the nodes), and its levels are
//! multiples of that; the CSV says which (`capacity_per_s`). Each level also
//! prints the nodes' refusals (from their `/metrics`), and the CPU a
//! refusal and a served task cost the nodes, fitted over the levels.
//!
//! Backlog: clients and agents run; every node is stopped (SIGSTOP) for a
//! while; then the cluster resumes and the backlog drains. Reports the drain
//! time, the tasks dead-lettered as expired, and the latency of fresh
//! high-priority work during the drain.

use crate::bench::{cluster_term, percentile, BenchArgs};
use crate::launcher::{process_cpu_seconds, LocalCluster};
use crate::rawhttp::{Failure, Pool};
use phalanx_agent::{handler, Agent, AgentConfig};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests in flight from the generator at most; past this it counts the
/// requests it could not send (so a generator that cannot keep up says so).
const GENERATOR_IN_FLIGHT_MAX: u64 = 4_096;
const CLIENTS: usize = 50;
const LEVEL_SECONDS: u64 = 5;

#[derive(Default, Clone)]
struct Sample {
    class: usize,
    status: u16,
    latency_us: u64,
}

struct Level {
    /// `raw` or `sdk`.
    kind: &'static str,
    multiple: f64,
    /// The population's own closed-loop capacity, which `multiple` multiplies.
    capacity: f64,
    target: f64,
    offered: f64,
    not_sent: u64,
    goodput: f64,
    goodput_by_class: [f64; 3],
    /// Of the high-priority calls offered (launched), the share acknowledged, in %.
    high_served_pct: f64,
    shed: f64,
    timeouts: u64,
    broken: u64,
    admitted_p50_ms: f64,
    admitted_p99_ms: f64,
    refused_p99_ms: f64,
    elections: u64,
    /// CPU used during the level, in % of one core: all nodes together, and
    /// this process (the generator and the draining agents).
    nodes_cpu_pct: f64,
    generator_cpu_pct: f64,
    /// Refused by the client itself (SDK clients' throttling), per second.
    throttled: f64,
    /// Refusals the nodes answered during the level (their `/metrics`), and
    /// the tasks served (acknowledged submits), and the nodes' CPU seconds.
    node_refusals: u64,
    served: u64,
    nodes_cpu_s: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Agents that complete everything at once, so queues drain and stay bounded.
async fn start_drain_agents(
    addrs: &[String],
    queue: &str,
    count: usize,
) -> anyhow::Result<(Arc<tokio::sync::Notify>, Vec<tokio::task::JoinHandle<()>>)> {
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut handles = Vec::new();
    for i in 0..count {
        let mut config = AgentConfig::new(addrs.to_vec(), format!("drain-{queue}-{i}"), vec![queue.to_string()]);
        config.concurrency = 64;
        config.poll_wait_ms = 1_000;
        let agent = Agent::new(config, handler(|_context| async { Ok(Value::Null) }))?;
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            let _ = agent.run_until(async move { stop.notified().await }).await;
        }));
    }
    Ok((stop, handles))
}

/// Pseudo-statuses of a submit that got no answer: none within 10 s; not
/// sent because every connection to that node was busy (the generator's
/// bound, counted as not sent); a connection that broke.
const NO_ANSWER: u16 = 0;
const NOT_SENT: u16 = 1;
const BROKEN: u16 = 2;
/// Refused by the SDK client itself (adaptive throttling): nothing was sent.
const THROTTLED: u16 = 3;

/// One submit through the generator's own HTTP client (`rawhttp`).
async fn submit_one(pool: &Pool, client: usize, priority: u8, n: u64, queue: &str) -> (u16, u64) {
    let start = Instant::now();
    let headers = format!("x-phalanx-client: client-{client}\r\nx-phalanx-priority: {priority}\r\n");
    let body = json!({"queue": queue, "payload": n, "priority": priority}).to_string();
    let answer = tokio::time::timeout(Duration::from_secs(10), pool.post("/v1/tasks", &headers, body.as_bytes())).await;
    let status = match answer {
        Ok(Ok(status)) => status,
        Ok(Err(Failure::PoolFull)) => NOT_SENT,
        Ok(Err(failure)) => {
            tracing::debug!(%failure, "submit got no answer");
            BROKEN
        }
        Err(_) => NO_ANSWER,
    };
    (status, start.elapsed().as_micros() as u64)
}

/// One connection pool per node, sharing the generator's in-flight bound.
fn pools(addrs: &[String]) -> anyhow::Result<Vec<Arc<Pool>>> {
    let per_node = GENERATOR_IN_FLIGHT_MAX as usize / addrs.len();
    addrs.iter().map(|addr| Ok(Arc::new(Pool::new(addr.parse()?, per_node)))).collect()
}

/// Closed loop, 256 callers of `load`'s kind back to back: the acknowledged
/// rate. Each population is measured with its own client, since on shared
/// cores a heavier client leaves the nodes less.
/// Answers the rate and the nodes' CPU (in cores) over the measured seconds.
async fn capacity(load: &Load, seconds: u64, cluster: &LocalCluster) -> (f64, f64) {
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..256 {
        let (load, acked, stop) = (load.clone(), acked.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let status = match &load {
                    Load::Raw(pools) => submit_one(&pools[i % pools.len()], i, 5, n, "load").await.0,
                    Load::Sdk(clients) => submit_sdk(&clients[i % clients.len()], 5, n).await.0,
                };
                if status == 201 {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, cpu, start) = (acked.load(Ordering::Relaxed), nodes_cpu_seconds(cluster), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let rate = (acked.load(Ordering::Relaxed) - before) as f64 / elapsed;
    let cores = (nodes_cpu_seconds(cluster) - cpu) / elapsed;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        let _ = handle.await;
    }
    (rate, cores)
}

/// Open loop at `rate` requests/s for `seconds`: requests leave on schedule
/// whether or not earlier ones were answered.
async fn open_loop(pools: &[Arc<Pool>], rate: f64, seconds: u64) -> (Vec<Sample>, u64, u64, f64) {
    open_loop_with(&Load::Raw(pools.to_vec()), rate, seconds, MIXED).await
}

/// The priorities of the open-loop load's three classes, in equal shares.
const MIXED: [u8; 3] = [2, 5, 8];

/// Who sends the open-loop load.
#[derive(Clone)]
enum Load {
    Raw(Vec<Arc<Pool>>),
    /// One SDK client per named client, each with the whole node list.
    Sdk(Vec<Arc<phalanx_agent::Client>>),
}

/// One submit of the SDK population: a status as the raw population reports it.
async fn submit_sdk(client: &phalanx_agent::Client, priority: u8, n: u64) -> (u16, u64) {
    let start = Instant::now();
    let request = phalanx_agent::SubmitRequest::new("load", json!(n)).with_priority(priority);
    let status = match tokio::time::timeout(Duration::from_secs(10), client.submit(&request)).await {
        Ok(Ok(_)) => 201,
        Ok(Err(error)) if error.to_string().contains("throttled by the client") => THROTTLED,
        Ok(Err(error)) => error.status().unwrap_or(BROKEN),
        Err(_) => NO_ANSWER,
    };
    (status, start.elapsed().as_micros() as u64)
}

async fn open_loop_with(load: &Load, rate: f64, seconds: u64, priorities: [u8; 3]) -> (Vec<Sample>, u64, u64, f64) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let total = (rate * seconds as f64) as u64;
    let start = Instant::now();
    let mut launched = 0u64;
    let mut not_sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while launched + not_sent < total {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while launched + not_sent < due {
            let n = launched + not_sent;
            if in_flight.load(Ordering::Relaxed) >= GENERATOR_IN_FLIGHT_MAX {
                not_sent += 1;
                continue;
            }
            launched += 1;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let class = (n % 3) as usize;
            let priority = priorities[class];
            let (load, samples, in_flight) = (load.clone(), samples.clone(), in_flight.clone());
            tokio::spawn(async move {
                let (status, latency_us) = match &load {
                    Load::Raw(pools) => {
                        submit_one(&pools[n as usize % pools.len()], n as usize % CLIENTS, priority, n, "load").await
                    }
                    Load::Sdk(clients) => submit_sdk(&clients[n as usize % clients.len()], priority, n).await,
                };
                samples.lock().unwrap().push(Sample { class, status, latency_us });
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    let window = start.elapsed().as_secs_f64();
    let waiting = Instant::now();
    while in_flight.load(Ordering::Relaxed) > 0 && waiting.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let samples = samples.lock().unwrap().clone();
    (samples, launched, not_sent, window)
}

fn summarise(
    multiple: f64,
    target: f64,
    samples: &[Sample],
    launched: u64,
    not_sent: u64,
    window: f64,
    elections: u64,
) -> Level {
    let mut admitted: Vec<u64> = samples.iter().filter(|s| s.status == 201).map(|s| s.latency_us).collect();
    let mut refused: Vec<u64> =
        samples.iter().filter(|s| s.status == 429 || s.status == 503).map(|s| s.latency_us).collect();
    admitted.sort_unstable();
    refused.sort_unstable();
    let mut by_class = [0f64; 3];
    for sample in samples.iter().filter(|s| s.status == 201) {
        by_class[sample.class] += 1.0 / window;
    }
    let pool_full = samples.iter().filter(|s| s.status == NOT_SENT).count() as u64;
    let high_offered = samples.iter().filter(|s| s.class == 2 && s.status != NOT_SENT).count();
    let high_served = samples.iter().filter(|s| s.class == 2 && s.status == 201).count();
    Level {
        kind: "raw",
        multiple,
        capacity: target / multiple,
        target,
        offered: (launched - pool_full) as f64 / window,
        not_sent: not_sent + pool_full,
        goodput: admitted.len() as f64 / window,
        goodput_by_class: by_class,
        high_served_pct: 100.0 * high_served as f64 / high_offered.max(1) as f64,
        shed: refused.len() as f64 / window,
        timeouts: samples.iter().filter(|s| s.status == NO_ANSWER).count() as u64,
        broken: samples.iter().filter(|s| s.status == BROKEN).count() as u64,
        admitted_p50_ms: ms(percentile(&admitted, 0.5)),
        admitted_p99_ms: ms(percentile(&admitted, 0.99)),
        refused_p99_ms: ms(percentile(&refused, 0.99)),
        elections,
        nodes_cpu_pct: 0.0,
        generator_cpu_pct: 0.0,
        throttled: samples.iter().filter(|s| s.status == THROTTLED).count() as f64 / window,
        node_refusals: 0,
        served: admitted.len() as u64,
        nodes_cpu_s: 0.0,
    }
}

/// Tasks of `queue` not finished yet (pending or leased), as the first node
/// that answers reports them (`/metrics`); `None` when none answers.
async fn unfinished(http: &reqwest::Client, addrs: &[String], queue: &str) -> Option<u64> {
    for addr in addrs {
        let Ok(answer) = http.get(format!("http://{addr}/metrics")).timeout(Duration::from_secs(2)).send().await else {
            continue;
        };
        let Ok(text) = answer.text().await else { continue };
        let count = |state: &str| {
            let prefix = format!("phalanx_tasks{{queue=\"{queue}\",state=\"{state}\"}} ");
            text.lines().find_map(|line| line.strip_prefix(&prefix)?.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        return Some(count("pending") + count("leased"));
    }
    None
}

/// Waits (at most `DRAIN_WAIT_MAX`) until the agents have drained the load
/// queue, so that each level starts from an empty queue: one that a level
/// left full would refuse the next level's submits (`queue_full`) for reasons
/// of its own.
async fn wait_drained(http: &reqwest::Client, addrs: &[String]) {
    let start = Instant::now();
    let mut left = None;
    while start.elapsed() < DRAIN_WAIT_MAX {
        left = unfinished(http, addrs, "load").await;
        if left == Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("(the queue still held {left:?} unfinished tasks after {DRAIN_WAIT_MAX:?}; the level starts anyway)");
}

/// How long the bench waits for the queue to drain between levels, at most.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(30);

/// The nodes' refusals by admission control so far, summed (`/metrics`).
async fn node_refusals(http: &reqwest::Client, addrs: &[String]) -> u64 {
    let mut total = 0;
    for addr in addrs {
        let Ok(response) = http.get(format!("http://{addr}/metrics")).send().await else { continue };
        let text = response.text().await.unwrap_or_default();
        total += text
            .lines()
            .find(|l| l.starts_with("phalanx_refused_overload_total"))
            .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// CPU seconds per served task and per refusal, fitted by least squares
/// over the levels (`cpu = a * served + b * refused`), in microseconds.
fn cpu_costs(levels: &[&Level]) -> Option<(f64, f64)> {
    let (mut ss, mut sr, mut rr, mut sc, mut rc) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for l in levels {
        let (s, r, c) = (l.served as f64, l.node_refusals as f64, l.nodes_cpu_s);
        ss += s * s;
        sr += s * r;
        rr += r * r;
        sc += s * c;
        rc += r * c;
    }
    let det = ss * rr - sr * sr;
    if det.abs() < 1e-9 {
        return None;
    }
    Some((1e6 * (sc * rr - rc * sr) / det, 1e6 * (rc * ss - sc * sr) / det))
}

pub async fn overload(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let cluster = LocalCluster::start(args.node_count, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).tcp_nodelay(true).build()?;
    let (stop_agents, agents) = start_drain_agents(&addrs, "load", 4).await?;
    println!(
        "cluster: {} node(s); measuring capacity (closed loop, 256 clients, single-task submits) ...",
        args.node_count
    );
    let pools = pools(&addrs)?;
    let (raw_capacity, _) = capacity(&Load::Raw(pools.clone()), 4, &cluster).await;
    println!("capacity: {raw_capacity:.0} submits/s acknowledged");
    let kinds: &[&'static str] = match args.client_kind.as_str() {
        "both" => &["raw", "sdk"],
        "sdk" => &["sdk"],
        _ => &["raw"],
    };
    let mut levels = Vec::new();
    for kind in kinds {
        let load = if *kind == "sdk" {
            let clients = (0..CLIENTS)
                .map(|i| {
                    let client = phalanx_agent::Client::new(addrs.clone(), None)?.with_name(format!("client-{i}"));
                    Ok(Arc::new(match args.sdk_throttle_window_ms {
                        0 => client,
                        ms => client.with_throttle_window(Duration::from_millis(ms)),
                    }))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Load::Sdk(clients)
        } else {
            Load::Raw(pools.clone())
        };
        // Load and goodput are multiples of what this population gets served closed-loop.
        wait_drained(&http, &addrs).await;
        let capacity = if *kind == "sdk" {
            let (sdk_capacity, _) = capacity(&load, 4, &cluster).await;
            println!(
                "capacity with SDK clients (closed loop, 256 callers): {sdk_capacity:.0} submits/s acknowledged ({:.0}% of the raw clients'); the SDK levels are multiples of it",
                100.0 * sdk_capacity / raw_capacity
            );
            sdk_capacity
        } else {
            raw_capacity
        };
        println!("clients: {kind}");
        for multiple in [1.0, 2.0, 5.0, 10.0] {
            wait_drained(&http, &addrs).await;
            let term = cluster_term(&http, &addrs).await;
            let refusals_before = node_refusals(&http, &addrs).await;
            let cpu_before = (cluster.cpu_seconds(), process_cpu_seconds("self").unwrap_or(0.0));
            let level_start = Instant::now();
            let (samples, launched, not_sent, window) =
                open_loop_with(&load, capacity * multiple, LEVEL_SECONDS, MIXED).await;
            let cpu_after = (cluster.cpu_seconds(), process_cpu_seconds("self").unwrap_or(0.0));
            let refusals = node_refusals(&http, &addrs).await.saturating_sub(refusals_before);
            let elections = cluster_term(&http, &addrs).await.saturating_sub(term);
            let nodes_cpu: f64 =
                cpu_after.0.iter().map(|(_, s)| s).sum::<f64>() - cpu_before.0.iter().map(|(_, s)| s).sum::<f64>();
            let mut level = summarise(multiple, capacity * multiple, &samples, launched, not_sent, window, elections);
            level.kind = kind;
            level.capacity = capacity;
            // Over the level and the wait for its last answers, so a little more than `window`.
            let elapsed = level_start.elapsed().as_secs_f64();
            level.nodes_cpu_pct = 100.0 * nodes_cpu / elapsed;
            level.generator_cpu_pct = 100.0 * (cpu_after.1 - cpu_before.1) / elapsed;
            level.node_refusals = refusals;
            level.nodes_cpu_s = nodes_cpu;
            println!(
                "{kind} {:>4}x: offered {:>7.0}/s (target {:>7.0}, not sent {}), goodput {:>6.0}/s ({:.0}% of capacity; low/normal/high {:.0}/{:.0}/{:.0}; high served {:.1}% of its offered), shed {:>7.0}/s, throttled by clients {:.0}/s, node refusals {:.0}/s, timeouts {}, broken {}, admitted p50 {:.1} ms p99 {:.1} ms, refusals p99 {:.1} ms, elections {}, CPU nodes {:.0}% generator+agents {:.0}%",
                level.multiple, level.offered, level.target, level.not_sent, level.goodput, 100.0 * level.goodput / capacity,
                level.goodput_by_class[0], level.goodput_by_class[1], level.goodput_by_class[2], level.high_served_pct,
                level.shed, level.throttled, level.node_refusals as f64 / window, level.timeouts, level.broken, level.admitted_p50_ms, level.admitted_p99_ms, level.refused_p99_ms, level.elections,
                level.nodes_cpu_pct, level.generator_cpu_pct
            );
            levels.push(level);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if *kind == "sdk" {
            sdk_recovery(&load, capacity, &http, &addrs).await;
        }
        let these: Vec<&Level> = levels.iter().filter(|l| l.kind == *kind).collect();
        match cpu_costs(&these) {
            Some((served_us, refusal_us)) => println!(
                "{kind}: node CPU per served task {served_us:.0} us, per refusal {refusal_us:.1} us ({:.0}% of a served task; least squares over the levels)",
                100.0 * refusal_us / served_us
            ),
            None => println!("{kind}: node CPU per request: not enough refusals to tell served from refused"),
        }
    }
    // Recovery: back to 1x, p99 per second until it is within 1.5x of the 1x level's.
    let normal_p99 = levels[0].admitted_p99_ms.max(1.0);
    let mut recovered_after = None;
    for second in 1..=10u64 {
        let (samples, launched, not_sent, window) = open_loop(&pools, raw_capacity, 1).await;
        let level = summarise(1.0, raw_capacity, &samples, launched, not_sent, window, 0);
        if level.admitted_p99_ms <= normal_p99 * 1.5 {
            recovered_after = Some(second);
            break;
        }
    }
    match recovered_after {
        Some(seconds) => println!(
            "after the load dropped: p99 back within 1.5x of normal ({normal_p99:.1} ms) in the {seconds}. second"
        ),
        None => println!("after the load dropped: p99 not back within 1.5x of normal in 10 s"),
    }
    let peaks = cluster.peak_rss_kib();
    let peak = peaks.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    println!("peak RSS of a node: {:.1} MiB ({peaks:?} KiB)", peak as f64 / 1024.0);
    stop_agents.notify_waiters();
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    write_outputs(&args.out_dir, args.node_count, raw_capacity, &levels, peak)?;
    Ok(())
}

/// Seconds the SDK clients are watched after their 10x level, at most.
const SDK_RECOVERY_SECONDS_MAX: u64 = 30;

/// Right after the 10x level, the SDK clients' load falls to half their
/// capacity, which the nodes serve whole: how long the clients' memory of
/// the overload (their throttle's window) goes on refusing calls locally,
/// second by second, until under 1% of calls are; and beside each, the
/// refusals the nodes still answered (a backlog left by the overload can keep
/// them refusing, and then the clients are right to hold back).
async fn sdk_recovery(load: &Load, capacity: f64, http: &reqwest::Client, addrs: &[String]) {
    let mut shares = Vec::new();
    let mut recovered = None;
    for second in 1..=SDK_RECOVERY_SECONDS_MAX {
        let refusals_before = node_refusals(http, addrs).await;
        let (samples, _, _, _) = open_loop_with(load, capacity * 0.5, 1, MIXED).await;
        let refused = node_refusals(http, addrs).await.saturating_sub(refusals_before);
        let throttled = samples.iter().filter(|s| s.status == THROTTLED).count() as f64 / samples.len().max(1) as f64;
        shares.push(format!("{:.0}%/{refused}", 100.0 * throttled));
        if throttled < 0.01 {
            recovered = Some(second);
            break;
        }
    }
    let when = match recovered {
        Some(second) => format!("under 1% in the {second}. second"),
        None => format!("not under 1% within {SDK_RECOVERY_SECONDS_MAX} s"),
    };
    println!(
        "sdk after 10x, load back to 0.5x: calls the clients refused themselves {when} (per second, refused by the clients / refusals the nodes answered: {})",
        shares.join(" ")
    );
}

/// The nodes' CPU seconds so far, summed.
fn nodes_cpu_seconds(cluster: &LocalCluster) -> f64 {
    cluster.cpu_seconds().iter().map(|(_, seconds)| seconds).sum()
}

/// `phalanx bench refusals`: the CPU one node spends per refused request and
/// per served task, each measured on its own rather than fitted over mixed
/// levels. Served: a node drained by four agents while 256 closed-loop raw
/// clients submit (submit, lease and complete per task). Refused: a node with
/// `--requests-in-flight-max 1`, where a low-priority submit's share of the
/// door's slots is none, offered low-priority submits open-loop, so that
/// every one is refused at the door. The idle node's own CPU is taken out.
pub async fn refusal_cost(args: BenchArgs) -> anyhow::Result<()> {
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let seconds = args.seconds.max(2);
    let served_us = {
        let dir = tempfile::tempdir()?;
        let cluster = LocalCluster::start(1, dir.path(), &server_args).await?;
        let addrs = cluster.addrs();
        let (stop_agents, agents) = start_drain_agents(&addrs, "load", 4).await?;
        let (rate, cores) = capacity(&Load::Raw(pools(&addrs)?), seconds, &cluster).await;
        stop_agents.notify_waiters();
        for agent in agents {
            let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
        }
        let served_us = 1e6 * cores / rate.max(1.0);
        println!(
            "served: {rate:.0} tasks/s (submitted closed-loop, leased and completed), node CPU {:.0}%, {served_us:.1} us per task",
            100.0 * cores
        );
        served_us
    };
    let dir = tempfile::tempdir()?;
    let mut refusing_args = server_args.clone();
    refusing_args.extend(["--requests-in-flight-max".to_string(), "1".to_string()]);
    let cluster = LocalCluster::start(1, dir.path(), &refusing_args).await?;
    let addrs = cluster.addrs();
    let http = reqwest::Client::new();
    let pools = pools(&addrs)?;
    // What the idle node spends (its timers, Raft's ticks) is not the refusals'.
    let (cpu, start) = (nodes_cpu_seconds(&cluster), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_per_second = (nodes_cpu_seconds(&cluster) - cpu) / start.elapsed().as_secs_f64();
    println!("idle: node CPU {:.1}%", 100.0 * idle_per_second);
    for rate in [5_000.0, 10_000.0, 20_000.0, 40_000.0] {
        let (cpu, refused_before, start) =
            (nodes_cpu_seconds(&cluster), node_refusals(&http, &addrs).await, Instant::now());
        let (samples, launched, not_sent, _) =
            open_loop_with(&Load::Raw(pools.clone()), rate, seconds, [2, 2, 2]).await;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = nodes_cpu_seconds(&cluster) - cpu;
        let refused = node_refusals(&http, &addrs).await.saturating_sub(refused_before);
        let mut latencies: Vec<u64> = samples.iter().filter(|s| s.status == 429).map(|s| s.latency_us).collect();
        latencies.sort_unstable();
        let refusal_us = 1e6 * (cpu - idle_per_second * elapsed).max(0.0) / refused.max(1) as f64;
        println!(
            "refused: {:.0}/s sent ({not_sent} not sent), {:.0}/s refused at the door, node CPU {:.0}%, {refusal_us:.1} us per refusal ({:.0}% of a served task), refusals p50 {:.1} ms p99 {:.1} ms, other answers {}",
            launched as f64 / elapsed,
            refused as f64 / elapsed,
            100.0 * cpu / elapsed,
            100.0 * refusal_us / served_us,
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            samples.iter().filter(|s| s.status != 429).count()
        );
    }
    Ok(())
}

fn write_outputs(
    dir: &std::path::Path,
    nodes: u64,
    capacity: f64,
    levels: &[Level],
    peak_kib: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from(
        "clients,nodes,multiple,target_per_s,offered_per_s,not_sent,goodput_per_s,goodput_low,goodput_normal,goodput_high,shed_per_s,timeouts,broken,admitted_p50_ms,admitted_p99_ms,refused_p99_ms,elections,nodes_cpu_pct,generator_cpu_pct,peak_rss_kib,capacity_per_s,high_served_pct\n",
    );
    for l in levels {
        let _ = writeln!(
            csv,
            "{},{nodes},{},{:.0},{:.0},{},{:.0},{:.0},{:.0},{:.0},{:.0},{},{},{:.2},{:.2},{:.2},{},{:.0},{:.0},{peak_kib},{:.0},{:.1}",
            l.kind,
            l.multiple,
            l.target,
            l.offered,
            l.not_sent,
            l.goodput,
            l.goodput_by_class[0],
            l.goodput_by_class[1],
            l.goodput_by_class[2],
            l.shed,
            l.timeouts,
            l.broken,
            l.admitted_p50_ms,
            l.admitted_p99_ms,
            l.refused_p99_ms,
            l.elections,
            l.nodes_cpu_pct,
            l.generator_cpu_pct,
            l.capacity,
            l.high_served_pct
        );
    }
    let csv_path = dir.join(format!("overload-{nodes}node.csv"));
    std::fs::write(&csv_path, csv)?;
    let svg_path = dir.join(format!("overload-{nodes}node.svg"));
    std::fs::write(&svg_path, svg(nodes, capacity, levels))?;
    println!("wrote {} and {}", csv_path.display(), svg_path.display());
    Ok(())
}

/// A two-axis line chart: goodput (left axis) and admitted p99 (right axis) against offered load.
fn svg(nodes: u64, capacity: f64, levels: &[Level]) -> String {
    let (width, height, margin) = (640.0, 360.0, 60.0);
    let x_max = levels.iter().map(|l| l.offered).fold(capacity, f64::max) * 1.05;
    let y_max = levels.iter().map(|l| l.goodput).fold(capacity, f64::max) * 1.2;
    let p99_max = levels.iter().map(|l| l.admitted_p99_ms).fold(1.0, f64::max) * 1.2;
    let x = |v: f64| margin + v / x_max * (width - 2.0 * margin);
    let y = |v: f64, max: f64| height - margin - v / max * (height - 2.0 * margin);
    let line =
        |points: Vec<(f64, f64)>| points.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect::<Vec<_>>().join(" ");
    let goodput = line(levels.iter().map(|l| (x(l.offered), y(l.goodput, y_max))).collect());
    let p99 = line(levels.iter().map(|l| (x(l.offered), y(l.admitted_p99_ms, p99_max))).collect());
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">Phalanx under overload, {nodes} node(s): capacity {capacity:.0}/s</text>
<line x1="{margin}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{}" stroke="black"/>
<line x1="{}" y1="{margin}" x2="{}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">offered load (requests/s)</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle" fill="#1f77b4">goodput (tasks/s)</text>
<text x="{}" y="{}" transform="rotate(90 {} {})" text-anchor="middle" fill="#d62728">admitted p99 (ms)</text>
<line x1="{margin}" y1="{}" x2="{}" y2="{}" stroke="#1f77b4" stroke-dasharray="4 4"/>
<polyline points="{goodput}" fill="none" stroke="#1f77b4" stroke-width="2"/>
<polyline points="{p99}" fill="none" stroke="#d62728" stroke-width="2"/>
"##,
        width / 2.0,
        height - margin,
        width - margin,
        height - margin,
        height - margin,
        width - margin,
        width - margin,
        height - margin,
        width / 2.0,
        height - 20.0,
        height / 2.0,
        height / 2.0,
        width - 15.0,
        height / 2.0,
        width - 15.0,
        height / 2.0,
        y(capacity, y_max),
        width - margin,
        y(capacity, y_max),
    );
    for l in levels {
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#1f77b4"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}x</text>
<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>
"##,
            x(l.offered),
            y(l.goodput, y_max),
            x(l.offered),
            height - margin + 15.0,
            l.multiple,
            x(l.offered),
            y(l.admitted_p99_ms, p99_max)
        );
    }
    let _ = write!(out, r##"<text x="{}" y="{}" fill="#555">{:.0}/s</text>"##, width - margin + 4.0, margin, p99_max);
    out.push_str("</svg>\n");
    out
}

pub async fn backlog(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let cluster = LocalCluster::start(args.node_count, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    // Agents take 5 ms per task; 8 agents x 8 slots: about 12,800 tasks/s at most.
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut agents = Vec::new();
    for i in 0..8 {
        let mut config = AgentConfig::new(addrs.clone(), format!("worker-{i}"), vec!["work".to_string()]);
        config.concurrency = 8;
        config.poll_wait_ms = 1_000;
        config.orchestrator_timeout_ms = 2_000;
        let agent = Agent::new(
            config,
            handler(|_context| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(Value::Null)
            }),
        )?;
        let stop = stop.clone();
        agents.push(tokio::spawn(async move {
            let _ = agent.run_until(async move { stop.notified().await }).await;
        }));
    }
    // Clients: 400 tasks/s, low priority, deadline 20 s; queued locally and retried during the outage.
    let producing = Arc::new(AtomicBool::new(true));
    let submitted = Arc::new(AtomicU64::new(0));
    let producer = {
        let (http, addrs, producing, submitted) = (http.clone(), addrs.clone(), producing.clone(), submitted.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut ticker = tokio::time::interval(Duration::from_millis(50));
            while producing.load(Ordering::Relaxed) {
                ticker.tick().await;
                let tasks: Vec<Value> = (0..20)
                    .map(|i| json!({"queue": "work", "payload": n + i, "priority": 2, "deadline_ms": 20_000, "idempotency_key": format!("bl-{}", n + i)}))
                    .collect();
                n += 20;
                let (http, addrs, submitted) = (http.clone(), addrs.clone(), submitted.clone());
                tokio::spawn(async move {
                    // Keyed submits: safe to retry until the cluster is back.
                    for attempt in 0..200usize {
                        let addr = &addrs[attempt % addrs.len()];
                        let answer = http
                            .post(format!("http://{addr}/v1/tasks/batch"))
                            .json(&json!({ "tasks": tasks }))
                            .timeout(Duration::from_secs(2))
                            .send()
                            .await;
                        if answer.is_ok_and(|r| r.status().is_success()) {
                            submitted.fetch_add(20, Ordering::Relaxed);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                });
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outage = Duration::from_secs(15);
    println!("steady state reached; stopping every node (SIGSTOP) for {} s", outage.as_secs());
    for id in cluster.nodes.keys() {
        cluster.signal(*id, "STOP");
    }
    tokio::time::sleep(outage).await;
    for id in cluster.nodes.keys() {
        cluster.signal(*id, "CONT");
    }
    let resumed = Instant::now();
    println!("cluster resumed; draining while fresh high-priority work arrives");
    // Fresh high-priority work during the drain: submit -> completed latency.
    let fresh = Arc::new(Mutex::new(Vec::new()));
    let probe = {
        let (http, addr, fresh) = (http.clone(), addrs[0].clone(), fresh.clone());
        tokio::spawn(async move {
            for i in 0..100u64 {
                let start = Instant::now();
                let body = json!({"queue": "work", "payload": format!("fresh-{i}"), "priority": 9});
                let Ok(response) = http.post(format!("http://{addr}/v1/tasks")).json(&body).send().await else {
                    continue;
                };
                let Ok(answer) = response.json::<Value>().await else { continue };
                let Some(id) = answer["task_id"].as_u64() else { continue };
                loop {
                    let Ok(task) = http.get(format!("http://{addr}/v1/tasks/{id}")).send().await else { break };
                    let task: Value = task.json().await.unwrap_or_default();
                    if task["state"] == "succeeded" {
                        fresh.lock().unwrap().push(start.elapsed().as_micros() as u64);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Drained: the pending count back to what steady state holds (under 200).
    let mut drained_after = None;
    let mut oldest_max = 0u64;
    while resumed.elapsed() < Duration::from_secs(120) {
        if let Ok(response) = http.get(format!("http://{}/v1/status", addrs[0])).send().await {
            if let Ok(status) = response.json::<Value>().await {
                let pending = status["queues"]["work"]["pending"].as_u64().unwrap_or(0);
                oldest_max = oldest_max.max(status["oldest_pending_age_ms"].as_u64().unwrap_or(0));
                if pending < 200 && resumed.elapsed() > Duration::from_secs(2) {
                    drained_after = Some(resumed.elapsed());
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = probe.await;
    producing.store(false, Ordering::Relaxed);
    let _ = producer.await;
    let status: Value = http.get(format!("http://{}/v1/status", addrs[0])).send().await?.json().await?;
    let mut latencies = fresh.lock().unwrap().clone();
    latencies.sort_unstable();
    match drained_after {
        Some(after) => println!("backlog drained {:.1} s after the cluster resumed", after.as_secs_f64()),
        None => println!("backlog not drained within 120 s"),
    }
    println!(
        "fresh priority-9 work during the drain, submit -> succeeded: p50 {:.1} ms, p99 {:.1} ms ({} samples)",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        latencies.len()
    );
    println!(
        "oldest pending task seen: {:.1} s; dead-lettered (expired deadlines and other): {}; submitted {}",
        oldest_max as f64 / 1000.0,
        status["counters"]["dead"],
        submitted.load(Ordering::Relaxed)
    );
    stop.notify_waiters();
    for agent in agents {
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    Ok(())
}
