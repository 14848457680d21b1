//! `phalanx bench restart --tasks N`: how fast a node with N pending tasks
//! in its snapshot is back, and what each task costs in memory.
//!
//! For each snapshot format (the current one, then format 1, serde_json, as
//! the previous main wrote it, through `PHALANX_SNAPSHOT_WRITE_VERSION=1`):
//! a real one-node cluster is filled with N pending tasks of a 64-byte
//! payload by parallel batch submits, until a snapshot covers them all; the
//! node is stopped with SIGTERM and started again three times on the same
//! data directory. Printed, as medians of the three: the time from process
//! start to `/health/live` and to `/health/ready` answering 200, the
//! resident memory once ready, and the memory per pending task beyond its
//! payload: (RSS with N tasks - RSS of an empty node started the same way)
//! / N - 64 bytes. The snapshot's size on disk is printed too. For the
//! current format, a second node then joins the filled one and catches up
//! by its snapshot: the time, and both nodes' peak resident memory.

use crate::bench::BenchArgs;
use anyhow::Context;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of each task's payload as stored (a JSON string: quotes included).
const PAYLOAD_BYTES: usize = 64;
/// Tasks per submit request (the policy's `batch_tasks_max` at most).
const SUBMIT_BATCH: usize = 10_000;
/// Concurrent submitters during the fill.
const SUBMITTERS: usize = 4;
/// Restarts measured per format; the median is printed.
const RESTARTS: usize = 3;
/// A snapshot every this many entries while filling, so that one covers
/// the tasks soon after the last submit.
const FILL_SNAPSHOT_LOGS: &str = "50";
/// How long a node may take to be ready or to stop before the bench gives up.
const WAIT_MAX: Duration = Duration::from_secs(300);
/// Memory is read this long after readiness, once start-up work has settled.
const RSS_SETTLE: Duration = Duration::from_secs(1);

/// What one start of a node measured.
#[derive(Clone, Copy)]
struct Start {
    live: Duration,
    ready: Duration,
    rss_bytes: u64,
}

/// A `phalanx server` process of this binary, on loopback.
struct Node {
    child: Child,
    api: String,
}

impl Node {
    fn spawn(data_dir: &Path, snapshot_write_version: u32, server_args: &[String]) -> anyhow::Result<Node> {
        Node::spawn_as(1, free_addr()?, data_dir, snapshot_write_version, server_args, &[])
    }

    /// Node `id` on `api`, with `extra` arguments, of `launcher::server_exe`'s build.
    fn spawn_as(
        id: u64,
        api: String,
        data_dir: &Path,
        snapshot_write_version: u32,
        server_args: &[String],
        extra: &[String],
    ) -> anyhow::Result<Node> {
        let mut command = Command::new(crate::launcher::server_exe()?);
        command
            .args(["server", "--node-id", &id.to_string(), "--listen", &api])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--snapshot-logs-since-last", FILL_SNAPSHOT_LOGS, "--snapshot-logs-kept", "0"])
            .args(server_args)
            .args(extra)
            .env("PHALANX_LOG", std::env::var("PHALANX_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if snapshot_write_version == 1 {
            command.env(phalanx_server::store::SNAPSHOT_WRITE_VERSION_ENV, "1");
        }
        Ok(Node { child: command.spawn().context("starting phalanx server")?, api })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Waits until `path` answers 200, polling; fails if the process exits.
    async fn wait_ok(&mut self, http: &reqwest::Client, path: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(response) = http.get(self.url(path)).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the node exited ({status}) before {path} answered 200");
            }
            anyhow::ensure!(start.elapsed() < WAIT_MAX, "{path}: no 200 within {WAIT_MAX:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("VmRSS in /proc/PID/status")?;
        Ok(kib * 1024)
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > WAIT_MAX {
                self.child.kill()?;
                anyhow::bail!("the node did not stop within {WAIT_MAX:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", crate::launcher::free_port()?))
}

/// Starts a node on `data_dir`, measures it, and stops it.
async fn start_once(
    http: &reqwest::Client,
    data_dir: &Path,
    version: u32,
    server_args: &[String],
) -> anyhow::Result<Start> {
    let started = Instant::now();
    let mut node = Node::spawn(data_dir, version, server_args)?;
    node.wait_ok(http, "/health/live").await?;
    let live = started.elapsed();
    node.wait_ok(http, "/health/ready").await?;
    let ready = started.elapsed();
    tokio::time::sleep(RSS_SETTLE).await;
    let rss_bytes = node.rss_bytes()?;
    node.stop().await?;
    Ok(Start { live, ready, rss_bytes })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn json_of(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.with_context(|| format!("{what}: reading the answer"))?;
    anyhow::ensure!(status.is_success(), "{what} answered {status}: {body}");
    Ok(body)
}

/// Refusals a submit may meet while the node is busy (a snapshot of a large
/// state, a step-down and re-election) before the fill gives up.
const SUBMIT_RETRIES_MAX: u32 = 100;

/// One batch submit, retried after the wait a `503` or `429` asks for.
async fn submit(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    for _ in 0..SUBMIT_RETRIES_MAX {
        let response = http.post(url).json(body).send().await?;
        let status = response.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let answer: Value = response.json().await.unwrap_or_default();
            // Only a batch surely not done is sent again, so the count stays exact.
            anyhow::ensure!(
                answer["error"]["outcome"] == "not_done",
                "POST /v1/tasks/batch answered {status}: {answer}"
            );
            let wait_ms = answer["error"]["retry_after_ms"].as_u64().unwrap_or(200).clamp(10, 5_000);
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            continue;
        }
        return json_of(response, "POST /v1/tasks/batch").await;
    }
    anyhow::bail!("POST /v1/tasks/batch: still refused after {SUBMIT_RETRIES_MAX} tries")
}

/// Fills the node with `tasks` pending tasks, then writes until a snapshot
/// covers every one of them.
async fn fill(http: &reqwest::Client, node: &Node, tasks: u64) -> anyhow::Result<()> {
    let policy = json!({"set": {
        "tasks_max": (tasks + 10_000).max(1_000_000),
        "queue_tasks_max": (tasks + 10_000).max(100_000),
        "batch_tasks_max": SUBMIT_BATCH,
        // Payload bytes plus room; the core counts only what clients sized.
        "state_bytes_max": ((tasks as usize) * PAYLOAD_BYTES * 2).max(256 << 20),
        // No agent serves the queue: the tasks must not be marked unserved
        // (an error string on each) while the bench runs.
        "unserved_grace_ms": 7 * 24 * 3_600_000u64,
    }});
    json_of(http.put(node.url("/v1/config")).json(&policy).send().await?, "PUT /v1/config").await?;

    let payload = "x".repeat(PAYLOAD_BYTES - 2);
    let batches = tasks.div_ceil(SUBMIT_BATCH as u64);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (http, url, next, payload) = (http.clone(), node.url("/v1/tasks/batch"), next.clone(), payload.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let batch = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if batch >= batches {
                    return anyhow::Ok(());
                }
                let count = (tasks - batch * SUBMIT_BATCH as u64).min(SUBMIT_BATCH as u64);
                let body = json!({"tasks": (0..count).map(|_| json!({"queue": "restart", "payload": payload})).collect::<Vec<_>>()});
                let answer = submit(&http, &url, &body).await?;
                let refused = answer["results"]
                    .as_array()
                    .map_or(0, |results| results.iter().filter(|result| result.get("error").is_some()).count());
                // The first refusal says why; all of them would be megabytes.
                let first = answer["results"].as_array().and_then(|results| results.iter().find_map(|r| r.get("error")));
                anyhow::ensure!(
                    refused == 0,
                    "{refused} tasks of a batch refused, the first: {} (the policy guard rolls a policy back when \
                     the node stops being ready after it: see the node's log)",
                    first.map(Value::to_string).unwrap_or_default()
                );
            }
        }));
    }
    for submitter in submitters {
        submitter.await??;
    }
    let status = json_of(http.get(node.url("/v1/cluster")).send().await?, "GET /v1/cluster").await?;
    let filled_index = status["last_applied"].as_u64().unwrap_or(0);
    // A few small writes, until a snapshot covers the fill.
    let start = Instant::now();
    for n in 0.. {
        let status = json_of(http.get(node.url("/v1/cluster")).send().await?, "GET /v1/cluster").await?;
        if status["snapshot_index"].as_u64().is_some_and(|index| index >= filled_index) {
            break;
        }
        anyhow::ensure!(start.elapsed() < WAIT_MAX, "no snapshot covered the fill within {WAIT_MAX:?}");
        // A refusal while the node re-elects itself is only waited out.
        let put = http.put(node.url("/v1/conversations/restart-bench/n")).json(&json!({"value": n})).send().await?;
        if put.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
            json_of(put, "PUT /v1/conversations").await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Bytes of the snapshot files in `data_dir` and of its database.
fn disk_bytes(data_dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut snapshot_bytes = 0;
    let mut database_bytes = 0;
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".phx") {
            snapshot_bytes += entry.metadata()?.len();
        } else if name == phalanx_server::store::DATABASE_FILE_NAME {
            database_bytes += entry.metadata()?.len();
        }
    }
    Ok((snapshot_bytes, database_bytes))
}

/// What one format measured, as medians.
struct Outcome {
    version: u32,
    fill: Duration,
    snapshot_bytes: u64,
    database_bytes: u64,
    live_s: f64,
    ready_s: f64,
    rss_bytes: f64,
    empty_rss_bytes: f64,
    join: Option<Join>,
}

/// What a second node joining the filled one measured: it catches up by
/// the snapshot, sent and received a chunk at a time.
struct Join {
    seconds: f64,
    leader_rss_before: u64,
    leader_rss_peak: u64,
    joiner_rss_peak: u64,
}

/// The filled node on `data_dir` is started again and a new, empty node is
/// added to it (`POST /v1/cluster/members`): the time until the new node has
/// applied everything the first had, and both nodes' resident memory,
/// sampled every 10 ms meanwhile.
async fn join(
    http: &reqwest::Client,
    root: &Path,
    data_dir: &Path,
    version: u32,
    server_args: &[String],
) -> anyhow::Result<Join> {
    // Nodes of a cluster of more than one need the same peer token.
    let token = ["--peer-token".to_string(), "restart-bench-join".to_string()];
    let mut leader = Node::spawn_as(1, free_addr()?, data_dir, version, server_args, &token)?;
    leader.wait_ok(http, "/health/ready").await?;
    tokio::time::sleep(RSS_SETTLE).await;
    let leader_rss_before = leader.rss_bytes()?;
    let applied = |node: &Node| {
        let url = node.url("/v1/cluster");
        async move {
            let answer = http.get(url).send().await.ok()?.json::<Value>().await.ok()?;
            answer["last_applied"].as_u64()
        }
    };
    let addr = free_addr()?;
    let peers = format!("1={},2={addr}", leader.api);
    let extra = [&token[..], &["--peers".to_string(), peers, "--advertise".to_string(), addr.clone()]].concat();
    let mut joiner =
        Node::spawn_as(2, addr.clone(), &root.join(format!("join-v{version}")), version, server_args, &extra)?;
    joiner.wait_ok(http, "/health/live").await?;

    let started = Instant::now();
    let add = {
        let (http, url) = (http.clone(), leader.url("/v1/cluster/members"));
        tokio::spawn(async move {
            // A learner still catching up is answered 503 `learner_lagging`: asked again.
            loop {
                let answer = http.post(&url).json(&json!({"node_id": 2, "addr": addr})).send().await?;
                let status = answer.status();
                let body = answer.text().await.unwrap_or_default();
                if status.is_success() {
                    return Ok(());
                }
                anyhow::ensure!(
                    status.as_u16() == 503 && started.elapsed() < WAIT_MAX,
                    "adding node 2: {status} {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let (mut leader_rss_peak, mut joiner_rss_peak) = (leader_rss_before, 0);
    let mut target = None;
    loop {
        leader_rss_peak = leader_rss_peak.max(leader.rss_bytes()?);
        joiner_rss_peak = joiner_rss_peak.max(joiner.rss_bytes()?);
        if target.is_none() && add.is_finished() {
            target = Some(applied(&leader).await.context("node 1's last applied")?);
        }
        if let Some(target) = target {
            if applied(&joiner).await.is_some_and(|index| index >= target) {
                break;
            }
        }
        anyhow::ensure!(started.elapsed() < WAIT_MAX, "node 2 did not catch up within {WAIT_MAX:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    add.await??;
    joiner.stop().await?;
    leader.stop().await?;
    Ok(Join { seconds, leader_rss_before, leader_rss_peak, joiner_rss_peak })
}

async fn measure(
    http: &reqwest::Client,
    root: &Path,
    version: u32,
    tasks: u64,
    server_args: &[String],
) -> anyhow::Result<Outcome> {
    let empty_dir: PathBuf = root.join(format!("empty-v{version}"));
    let mut empty = Vec::new();
    for _ in 0..RESTARTS {
        empty.push(start_once(http, &empty_dir, version, server_args).await?.rss_bytes as f64);
    }

    let data_dir = root.join(format!("full-v{version}"));
    let started = Instant::now();
    let mut node = Node::spawn(&data_dir, version, server_args)?;
    node.wait_ok(http, "/health/ready").await?;
    fill(http, &node, tasks).await?;
    let fill_time = started.elapsed();
    node.stop().await?;
    let (snapshot_bytes, database_bytes) = disk_bytes(&data_dir)?;

    let mut starts = Vec::new();
    for round in 1..=RESTARTS {
        let start = start_once(http, &data_dir, version, server_args).await?;
        println!(
            "  format {version}, restart {round}: live {:.3} s, ready {:.3} s, RSS {:.0} MiB",
            start.live.as_secs_f64(),
            start.ready.as_secs_f64(),
            start.rss_bytes as f64 / (1 << 20) as f64
        );
        starts.push(start);
    }
    let join = if version == phalanx_server::store::SNAPSHOT_FORMAT_VERSION {
        Some(join(http, root, &data_dir, version, server_args).await?)
    } else {
        None
    };
    Ok(Outcome {
        version,
        fill: fill_time,
        snapshot_bytes,
        database_bytes,
        live_s: median(starts.iter().map(|s| s.live.as_secs_f64()).collect()),
        ready_s: median(starts.iter().map(|s| s.ready.as_secs_f64()).collect()),
        rss_bytes: median(starts.iter().map(|s| s.rss_bytes as f64).collect()),
        empty_rss_bytes: median(empty),
        join,
    })
}

pub async fn restart(args: BenchArgs) -> anyhow::Result<()> {
    let tasks = args.tasks.max(1);
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .connect_timeout(Duration::from_millis(200))
        .build()?;
    println!(
        "restart: {tasks} pending tasks of a {PAYLOAD_BYTES}-byte payload, one node, stopped with SIGTERM, \
         {RESTARTS} restarts per format (medians)"
    );
    // A format whose run fails is reported after the others' figures, not
    // instead of them.
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for version in [phalanx_server::store::SNAPSHOT_FORMAT_VERSION, 1] {
        match measure(&http, dir.path(), version, tasks, &server_args).await {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => failures.push(format!("format {version}: {error:#}")),
        }
    }
    anyhow::ensure!(!outcomes.is_empty(), "no format was measured: {}", failures.join("; "));
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>14}",
        "snapshot format", "fill s", "live s", "ready s", "snapshot MiB", "db MiB", "RSS MiB", "B/task beyond"
    );
    for outcome in &outcomes {
        let per_task = (outcome.rss_bytes - outcome.empty_rss_bytes) / tasks as f64 - PAYLOAD_BYTES as f64;
        let name = match outcome.version {
            1 => "1 (serde_json, previous)".to_string(),
            version => format!("{version} (MessagePack, current)"),
        };
        println!(
            "{:<28} {:>10.1} {:>10.3} {:>10.3} {:>12.1} {:>10.1} {:>10.0} {:>14.0}",
            name,
            outcome.fill.as_secs_f64(),
            outcome.live_s,
            outcome.ready_s,
            outcome.snapshot_bytes as f64 / (1 << 20) as f64,
            outcome.database_bytes as f64 / (1 << 20) as f64,
            outcome.rss_bytes / (1 << 20) as f64,
            per_task,
        );
    }
    println!(
        "(empty node RSS: {:.0} MiB; B/task beyond = (RSS - empty RSS) / tasks - {PAYLOAD_BYTES} payload bytes; \
         format 1 kept its snapshot inside the database, written here to a file for the same measure)",
        outcomes[0].empty_rss_bytes / (1 << 20) as f64
    );
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    for outcome in &outcomes {
        if let Some(join) = &outcome.join {
            println!(
                "join (format {}): a new node added to the filled one caught up by snapshot in {:.2} s; \
                 peak RSS meanwhile: the filled node {:.0} MiB (from {:.0} MiB, +{:.0}), the new node {:.0} MiB",
                outcome.version,
                join.seconds,
                mib(join.leader_rss_peak),
                mib(join.leader_rss_before),
                mib(join.leader_rss_peak.saturating_sub(join.leader_rss_before)),
                mib(join.joiner_rss_peak),
            );
        }
    }
    anyhow::ensure!(failures.is_empty(), "not measured: {}", failures.join("; "));
    Ok(())
}
