//! Faults of a node's environment, with real processes: a wall clock an hour
//! ahead or behind, or one that jumps while its node leads (libfaketime); a
//! data directory on a small file system that fills (tmpfs); a low
//! descriptor limit (`prlimit`).
//!
//! Where faketime or root is missing, a test says it skipped, unless
//! `PHALANX_REQUIRE_ENV_FAULTS=1` (set by `scripts/test` where it can), when
//! it fails instead.

mod common;

use common::{Cluster, Environment};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
const HOUR_MS: i64 = 3_600_000;
/// The cluster's `clock_skew_max_ms` (the default).
const CLOCK_SKEW_MAX_MS: u64 = 500;

/// Whether the test can run; if not, it says so, or fails when required.
fn available(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var("PHALANX_REQUIRE_ENV_FAULTS").as_deref() != Ok("1"),
        "PHALANX_REQUIRE_ENV_FAULTS=1 but {what} is unavailable"
    );
    eprintln!("skipped: {what} is unavailable");
    false
}

/// A wall clock moved by libfaketime; the monotonic clock is left alone, as
/// on a real machine whose wall clock is set wrong or stepped.
fn faketime(settings: &[(&str, &str)]) -> Environment {
    let mut env = vec![
        ("LD_PRELOAD".to_string(), FAKETIME_LIBRARY.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_string(), "1".to_string()),
    ];
    env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Environment { wrapper: Vec::new(), env }
}

/// `/v1/cluster` as `asked` sees it, nodes by id.
async fn cluster_view(cluster: &Cluster, asked: u64) -> Option<(Value, BTreeMap<u64, Value>)> {
    let Ok((200, body)) = cluster.get(asked, "/v1/cluster").await else { return None };
    let nodes = body["nodes"].as_array()?.iter().map(|n| (n["id"].as_u64().unwrap(), n.clone())).collect();
    Some((body, nodes))
}

/// Waits until `asked` reports `skewed` as off by about `skew_ms`.
async fn wait_reported(cluster: &Cluster, asked: u64, skewed: u64, skew_ms: i64) {
    let start = Instant::now();
    loop {
        if let Some((_, nodes)) = cluster_view(cluster, asked).await {
            let node = &nodes[&skewed];
            let seen = node["clock_skew_ms"].as_i64();
            if node["clock_skewed"] == json!(true) && seen.is_some_and(|seen| (seen - skew_ms).abs() < 60_000) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "node {skewed} not reported skewed by {asked}: {node}");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "node {asked} gives no cluster view");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader every running node agrees on, waiting for one.
async fn agreed_leader(cluster: &Cluster) -> u64 {
    let start = Instant::now();
    loop {
        let mut leaders = std::collections::BTreeSet::new();
        for (id, server) in &cluster.servers {
            if server.child.is_some() {
                leaders.insert(cluster_view(cluster, *id).await.and_then(|(body, _)| body["leader_id"].as_u64()));
            }
        }
        if leaders.len() == 1 {
            if let Some(Some(leader)) = leaders.into_iter().next() {
                return leader;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no agreed leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Work whose timing the clock faults must not disturb.
struct Work {
    /// Tasks with a deadline 10 minutes away, and tasks without.
    long: Vec<u64>,
    plain: Vec<u64>,
    /// Tasks leased for 10 minutes to an agent that keeps heartbeating, by fence.
    leased: Vec<(u64, u64)>,
    /// A task whose 3 s deadline must pass on time, and when it was acknowledged.
    short: (u64, Instant),
    heartbeating: Arc<AtomicBool>,
}

async fn submit(cluster: &Cluster, at: u64, body: Value) -> u64 {
    let (status, answer) = cluster.post(at, "/v1/tasks", &body).await.unwrap();
    assert_eq!(status, 201, "{answer}");
    answer["task_id"].as_u64().unwrap()
}

async fn start_work(cluster: &Cluster, at: u64) -> Work {
    let mut long = Vec::new();
    let mut plain = Vec::new();
    for i in 0..5 {
        long.push(submit(cluster, at, json!({"queue": "long", "payload": i, "deadline_ms": 600_000})).await);
        plain.push(submit(cluster, at, json!({"queue": "plain", "payload": i})).await);
    }
    for i in 0..3 {
        submit(cluster, at, json!({"queue": "held", "payload": i})).await;
    }
    let (status, registered) = cluster
        .post(at, "/v1/agents/register", &json!({"agent_id": "holder", "capabilities": ["held"], "capacity": 3}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{registered}");
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].as_str().unwrap().to_string();
    let poll = json!({"epoch": epoch, "session": session, "max_tasks": 3, "lease_ttl_ms": 600_000});
    let (status, leases) = cluster.post(at, "/v1/agents/holder/poll", &poll).await.unwrap();
    assert_eq!(status, 200, "{leases}");
    let leased: Vec<(u64, u64)> = leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["task"]["id"].as_u64().unwrap(), l["fence"].as_u64().unwrap()))
        .collect();
    assert_eq!(leased.len(), 3, "{leases}");
    let short_id = submit(cluster, at, json!({"queue": "short", "payload": 0, "deadline_ms": 3_000})).await;
    let short = (short_id, Instant::now());

    // The agent heartbeats to whichever node answers, as a real one would.
    let heartbeating = Arc::new(AtomicBool::new(true));
    let addrs: Vec<String> = cluster.servers.values().map(|s| s.addr.clone()).collect();
    let running = heartbeating.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
        while running.load(Ordering::Relaxed) {
            for addr in &addrs {
                let url = format!("http://{addr}/v1/agents/holder/heartbeat");
                if http
                    .post(url)
                    .json(&json!({"epoch": epoch, "session": session}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    Work { long, plain, leased, short, heartbeating }
}

async fn task(cluster: &Cluster, id: u64) -> Value {
    let start = Instant::now();
    loop {
        for (node, server) in &cluster.servers {
            if server.child.is_none() {
                continue;
            }
            if let Ok((200, body)) = cluster.get(*node, &format!("/v1/tasks/{id}")).await {
                return body;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "task {id} unreadable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The short deadline passes neither early nor late by more than the skew
/// bound (plus the timer's period and a commit).
async fn check_short_deadline(cluster: &Cluster, work: &Work) {
    let (id, acknowledged) = work.short;
    let slack = Duration::from_millis(CLOCK_SKEW_MAX_MS + 500);
    let early = Duration::from_millis(3_000 - CLOCK_SKEW_MAX_MS);
    loop {
        let body = task(cluster, id).await;
        let elapsed = acknowledged.elapsed();
        if body["state"] == "dead" {
            assert!(elapsed >= early, "the 3 s deadline passed after only {elapsed:?}: {body}");
            return;
        }
        assert!(elapsed < Duration::from_millis(3_000) + slack, "the 3 s deadline has not passed after {elapsed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing with a 10-minute deadline or lease has expired.
async fn check_long_work(cluster: &Cluster, work: &Work) {
    for id in work.long.iter().chain(&work.plain) {
        let body = task(cluster, *id).await;
        assert_eq!(body["state"], "pending", "task {id} should still wait: {body}");
    }
    for (id, fence) in &work.leased {
        let body = task(cluster, *id).await;
        assert_eq!(body["state"], "leased", "task {id} should still be leased: {body}");
        assert_eq!(body["lease"]["fence"].as_u64(), Some(*fence), "task {id} was leased again: {body}");
    }
}

/// Three nodes, node 3's wall clock `spec` (e.g. `+1h`) off. Node 3 is
/// reported skewed and not ready; then leadership moves three times (the
/// leader is killed and restarted) and node 3 never leads; no 10-minute
/// deadline or lease expires, and a 3 s deadline passes on time.
async fn skewed_node(spec: &str, skew_ms: i64) {
    if !available("libfaketime", Path::new(FAKETIME_LIBRARY).exists()) {
        return;
    }
    let environment = faketime(&[("FAKETIME", spec)]);
    let mut cluster =
        Cluster::start_with(3, &[], |id| if id == 3 { environment.clone() } else { Environment::default() }).await;
    wait_reported(&cluster, 1, 3, skew_ms).await;
    wait_reported(&cluster, 3, 3, skew_ms).await;
    let (status, ready) = cluster.get(3, "/health/ready").await.unwrap();
    assert_eq!(status, 503, "{ready}");
    assert!(ready["error"]["message"].as_str().unwrap().contains("clock skew"), "{ready}");

    let leader = agreed_leader(&cluster).await;
    assert_ne!(leader, 3, "the skewed node leads");
    let work = start_work(&cluster, leader).await;
    check_short_deadline(&cluster, &work).await;
    for _ in 0..3 {
        let leader = agreed_leader(&cluster).await;
        assert_ne!(leader, 3, "the skewed node leads");
        cluster.servers.get_mut(&leader).unwrap().kill9();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Some((body, _)) = cluster_view(&cluster, 3).await {
                assert_ne!(body["leader_id"].as_u64(), Some(3), "the skewed node took leadership: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.servers.get_mut(&leader).unwrap().spawn();
        cluster.wait_ready(leader, Duration::from_secs(30)).await;
    }
    let leader = agreed_leader(&cluster).await;
    assert_ne!(leader, 3, "the skewed node leads");
    check_long_work(&cluster, &work).await;
    work.heartbeating.store(false, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_an_hour_ahead_is_reported_never_leads_and_expires_nothing() {
    skewed_node("+1h", HOUR_MS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_an_hour_behind_is_reported_never_leads_and_freezes_nothing() {
    skewed_node("-1h", -HOUR_MS).await;
}

/// Every node's wall clock comes from its own file; the leader's jumps an
/// hour ahead while it leads. It is reported, hands leadership over, and no
/// deadline or lease moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_clock_jumps_an_hour_hands_over_and_expires_nothing() {
    if !available("libfaketime", Path::new(FAKETIME_LIBRARY).exists()) {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let file_of = |id: u64| files.path().join(format!("faketime-{id}"));
    for id in 1..=3 {
        std::fs::write(file_of(id), "+0\n").unwrap();
    }
    let cluster = Cluster::start_with(3, &[], |id| {
        let file = file_of(id).display().to_string();
        faketime(&[("FAKETIME_TIMESTAMP_FILE", &file), ("FAKETIME_NO_CACHE", "1")])
    })
    .await;
    for id in 1..=3 {
        cluster.wait_ready(id, Duration::from_secs(30)).await;
    }
    let leader = agreed_leader(&cluster).await;
    let work = start_work(&cluster, leader).await;
    std::fs::write(file_of(leader), "+1h\n").unwrap();
    let other = if leader == 1 { 2 } else { 1 };
    wait_reported(&cluster, other, leader, HOUR_MS).await;
    check_short_deadline(&cluster, &work).await;
    let start = Instant::now();
    loop {
        let now_leading = agreed_leader(&cluster).await;
        if now_leading != leader {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the jumped leader {leader} still leads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It stays handed over: time passes on purpose, to show that it does
    // not take leadership back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(agreed_leader(&cluster).await, leader, "the jumped node took leadership back");
    check_long_work(&cluster, &work).await;
    work.heartbeating.store(false, Ordering::Relaxed);
}

/// A tmpfs mounted for one test and unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn free_bytes(&self) -> u64 {
        let out =
            std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(self.dir.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn one_node_on(data_dir: PathBuf, extra: &[&str]) -> Cluster {
    Cluster::one_node_on(data_dir, extra)
}

/// A payload of about 200 KB (under the default `payload_bytes_max`).
fn big_payload(i: usize) -> Value {
    json!(format!("{i:08}").repeat(25_000))
}

/// The node's data directory is on a 64 MB file system with a 16 MiB
/// watermark. Filled with large tasks, it refuses new work with `507
/// disk_full` while space is left, still serves a complete and reads, and
/// accepts new work again once space is freed; every acknowledged task is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_full_disk_refuses_new_work_serves_completes_and_recovers() {
    let Some(disk) = SmallDisk::mount("64m") else {
        available("root and a tmpfs mount", false);
        return;
    };
    let watermark = 16 * 1024 * 1024u64;
    let mut cluster = one_node_on(
        disk.path().join("node-1"),
        &["--disk-free-min-bytes", &watermark.to_string(), "--disk-free-min-percent", "0"],
    );
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    // Space the test takes and later gives back.
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![7u8; 12 * 1024 * 1024]).unwrap();

    // A leased task, to complete while the disk is full.
    let held = submit(&cluster, 1, json!({"queue": "held", "payload": 0})).await;
    let (_, registered) =
        cluster.post(1, "/v1/agents/register", &json!({"agent_id": "a", "capabilities": ["held"]})).await.unwrap();
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].as_str().unwrap();
    let poll = json!({"epoch": epoch, "session": session});
    let (_, leases) = cluster.post(1, "/v1/agents/a/poll", &poll).await.unwrap();
    let fence = leases["leases"][0]["fence"].as_u64().unwrap();

    let mut acknowledged = vec![held];
    let refused = loop {
        assert!(acknowledged.len() < 2_000, "never refused; {} bytes free", disk.free_bytes());
        let task = json!({"queue": "big", "payload": big_payload(acknowledged.len())});
        let (status, body) = cluster.post(1, "/v1/tasks", &task).await.unwrap();
        match status {
            201 => acknowledged.push(body["task_id"].as_u64().unwrap()),
            _ => break (status, body),
        }
    };
    common::assert_error(&refused, 507, "disk_full");
    let free = disk.free_bytes();
    assert!(free > 4 * 1024 * 1024, "refused only with {free} bytes left");
    let (status, ready) = cluster.get(1, "/health/ready").await.unwrap();
    assert_eq!(status, 503, "{ready}");
    assert!(ready["error"]["message"].as_str().unwrap().contains("disk space low"), "{ready}");
    let register = cluster.post(1, "/v1/agents/register", &json!({"agent_id": "b", "capabilities": ["x"]})).await;
    common::assert_error(&register.unwrap(), 507, "disk_full");

    // Finishing work and reads are served.
    let (status, done) =
        cluster.post(1, &format!("/v1/tasks/{held}/complete"), &json!({"fence": fence, "result": "ok"})).await.unwrap();
    assert_eq!(status, 200, "{done}");
    let (status, _) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(status, 200);

    // Space freed: new work is accepted again.
    std::fs::remove_file(&filler).unwrap();
    let start = Instant::now();
    loop {
        let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "after", "payload": 1})).await.unwrap();
        if status == 201 {
            acknowledged.push(body["task_id"].as_u64().unwrap());
            break;
        }
        common::assert_error(&(status, body), 507, "disk_full");
        assert!(start.elapsed() < Duration::from_secs(5), "new work still refused after space was freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &acknowledged {
        let (status, body) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(status, 200, "acknowledged task {id} missing: {body}");
    }
    cluster.servers.get_mut(&1).unwrap().kill9();
}

/// With the watermark off, the disk fills until a log write fails: the
/// node ends with its own exit status (75) rather than living on with Raft
/// stopped, and after space is freed a restart finds every acknowledged task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_ends_the_node_with_its_own_status_and_a_restart_recovers() {
    let Some(disk) = SmallDisk::mount("48m") else {
        available("root and a tmpfs mount", false);
        return;
    };
    let mut cluster =
        one_node_on(disk.path().join("node-1"), &["--disk-free-min-bytes", "0", "--disk-free-min-percent", "0"]);
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![7u8; 8 * 1024 * 1024]).unwrap();
    let mut acknowledged = Vec::new();
    let mut first_refusal: Option<Instant> = None;
    let status = loop {
        assert!(acknowledged.len() < 2_000, "the disk never filled");
        assert!(
            first_refusal.is_none_or(|at| at.elapsed() < Duration::from_secs(20)),
            "the node lives on, refusing writes, 20 s after its first refusal"
        );
        let exited = cluster.servers.get_mut(&1).unwrap().child.as_mut().unwrap().try_wait().unwrap();
        if let Some(status) = exited {
            break status;
        }
        let body = json!({"queue": "big", "payload": big_payload(acknowledged.len())});
        match cluster.post(1, "/v1/tasks", &body).await {
            Ok((201, answer)) => acknowledged.push(answer["task_id"].as_u64().unwrap()),
            Ok(_) | Err(_) => {
                first_refusal.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    };
    assert_eq!(status.code(), Some(75), "the node should end with status 75, ended {status:?}");
    assert!(!acknowledged.is_empty());
    cluster.servers.get_mut(&1).unwrap().child = None;
    std::fs::remove_file(&filler).unwrap();
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    for id in &acknowledged {
        let (status, body) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(status, 200, "acknowledged task {id} missing after the restart: {body}");
    }
    cluster.servers.get_mut(&1).unwrap().kill9();
}

/// Started under a descriptor limit of 256, a node caps its connections
/// by what the limit leaves: surplus clients get `503 overloaded` at once,
/// never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_a_low_descriptor_limit_refuses_surplus_connections_at_once() {
    let prlimit = std::process::Command::new("prlimit").arg("--version").output().is_ok_and(|o| o.status.success());
    if !available("prlimit", prlimit) {
        return;
    }
    let limited =
        Environment { wrapper: vec!["prlimit".into(), "--nofile=256:256".into(), "--".into()], env: Vec::new() };
    let cluster = Cluster::start_with(1, &[], |_| limited.clone()).await;
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    let addr = cluster.addr(1).to_string();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    // Let the node accept (or refuse) them all. A fixed wait: the only way
    // to observe it is a new connection, which is what is under test.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let start = Instant::now();
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = stream.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        (text, start.elapsed())
    })
    .await
    .unwrap();
    let (text, elapsed) = answer;
    assert!(text.starts_with("HTTP/1.1 503"), "expected 503 at once, got {text:?} after {elapsed:?}");
    assert!(text.contains("overloaded"), "{text}");
    assert!(elapsed < Duration::from_secs(1), "refused only after {elapsed:?}");
    drop(idle);
}
