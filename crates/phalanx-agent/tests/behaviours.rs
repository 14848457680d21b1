//! The agent's behaviours of `docs/sdk.md` end to end, against a scripted
//! node that can be taken down and brought back on the same address: the
//! state through an outage with and without an outbox directory, the
//! autonomy budget per outage, a report refused with a transient code, a
//! long-poll's lease, and the outbox's single owner. (The real-node tests
//! are in `crates/phalanx-cli/tests/autonomy.rs`.)

use phalanx_agent::{handler, Agent, AgentConfig, Error, HandlerError, Mode, TaskContext};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted node does and what it saw.
#[derive(Default)]
struct Script {
    /// Tasks to hand out, one per poll, each with this fence.
    tasks: Vec<u64>,
    /// A poll with work answers after `min(wait_ms, grant_delay_ms)`.
    grant_delay_ms: u64,
    /// Answer reports with `507 disk_full` while set.
    disk_full: bool,
    /// Answer a batch of results only after this long.
    report_delay_ms: u64,
    /// Batch-of-results requests received.
    report_requests: u32,
    /// (task id, fence) of every accepted report.
    reports: Vec<(u64, u64)>,
    registrations: u32,
}

struct FakeNode {
    addr: String,
    script: Arc<Mutex<Script>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FakeNode {
    async fn start(script: Script) -> Arc<FakeNode> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = Arc::new(FakeNode {
            addr: listener.local_addr().unwrap().to_string(),
            script: Arc::new(Mutex::new(script)),
            server: Mutex::new(None),
        });
        node.serve(listener);
        node
    }

    fn serve(&self, listener: TcpListener) {
        let script = self.script.clone();
        let server = tokio::spawn(async move {
            // Dropped with the server task: taking the node down ends every exchange.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(answer(stream, script.clone()));
            }
        });
        *self.server.lock().unwrap() = Some(server);
    }

    /// The process is gone: connections are refused.
    fn down(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    async fn up(&self) {
        let listener = loop {
            match TcpListener::bind(&self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn reports(&self) -> Vec<(u64, u64)> {
        self.script.lock().unwrap().reports.clone()
    }
}

fn task(id: u64) -> Value {
    json!({"id": id, "queue": "q", "payload": id, "priority": 5, "state": "leased", "max_attempts": 3,
           "attempts": 1, "hop_count": 0, "last_fence": 7, "superseded_count": 0})
}

async fn answer(mut stream: TcpStream, script: Arc<Mutex<Script>>) {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    let (head, body) = loop {
        let n = stream.read(&mut buffer).await.unwrap_or(0);
        request.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&request).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0usize);
            if request.len() >= end + 4 + length || n == 0 {
                break (text[..end].to_string(), text[end + 4..].to_string());
            }
        }
        if n == 0 {
            return;
        }
    };
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let (status, reply) = if path == "/v1/agents/register" {
        script.lock().unwrap().registrations += 1;
        let agent_id = body["agent_id"].clone();
        (
            200,
            json!({"agent_id": agent_id, "epoch": 1, "session": "s", "heartbeat_interval_ms": 100, "agent_ttl_ms": 3000}),
        )
    } else if path.ends_with("/poll") {
        let wait_ms = body["wait_ms"].as_u64().unwrap_or(0);
        let lease_ttl_ms = body["lease_ttl_ms"].as_u64().unwrap_or(30_000);
        let (work, delay_ms) = {
            let mut script = script.lock().unwrap();
            let work = (!script.tasks.is_empty()).then(|| script.tasks.remove(0));
            (work, script.grant_delay_ms)
        };
        match work {
            Some(id) => {
                tokio::time::sleep(Duration::from_millis(wait_ms.min(delay_ms))).await;
                let lease = json!({"task": task(id), "fence": 7, "valid_until_ms": 0, "lease_ttl_ms": lease_ttl_ms});
                (200, json!({"leases": [lease]}))
            }
            None => {
                tokio::time::sleep(Duration::from_millis(wait_ms.min(100))).await;
                (200, json!({"leases": []}))
            }
        }
    } else if path == "/v1/tasks/complete" {
        // A batch of results: each answered on its own, minimally.
        let delay_ms = {
            let mut script = script.lock().unwrap();
            script.report_requests += 1;
            script.report_delay_ms
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let mut script = script.lock().unwrap();
        if script.disk_full {
            (507, json!({"error": {"code": "disk_full", "message": "scripted", "outcome": "not_done"}}))
        } else {
            let mut results = Vec::new();
            for item in body["results"].as_array().cloned().unwrap_or_default() {
                let id = item["task_id"].as_u64().unwrap_or(0);
                script.reports.push((id, item["fence"].as_u64().unwrap_or(0)));
                results.push(json!({"task_id": id, "ok": true, "state": "succeeded"}));
            }
            (200, json!({ "results": results }))
        }
    } else if path.ends_with("/complete") || path.ends_with("/fail") {
        let id: u64 = path.split('/').nth(3).and_then(|id| id.parse().ok()).unwrap_or(0);
        let mut script = script.lock().unwrap();
        if script.disk_full {
            (507, json!({"error": {"code": "disk_full", "message": "scripted", "outcome": "not_done"}}))
        } else {
            script.reports.push((id, body["fence"].as_u64().unwrap_or(0)));
            (200, task(id))
        }
    } else if path.ends_with("/extend") {
        (200, json!({"valid_until_ms": 0}))
    } else {
        (200, json!({"ok": true}))
    };
    let reply = reply.to_string();
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reply.len()
    );
    let _ = stream.write_all(format!("{head}{reply}").as_bytes()).await;
}

fn config(node: &FakeNode, agent_id: &str) -> AgentConfig {
    let mut config = AgentConfig::new(vec![node.addr.clone()], agent_id, vec!["q".into()]);
    config.poll_wait_ms = 200;
    config.orchestrator_timeout_ms = 500;
    config.lease_ttl_ms = 5_000;
    config
}

async fn quick(_: TaskContext) -> Result<Value, HandlerError> {
    Ok(json!("done"))
}

async fn slow(_: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(800)).await;
    Ok(json!("done"))
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    agent: Arc<Agent>,
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

fn run(agent: Arc<Agent>) -> Running {
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await })
    };
    Running { agent, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.notify_one();
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("stops").unwrap().unwrap();
    }
}

/// docs/sdk.md, 6: without an outbox directory, an undelivered result is
/// kept in memory, delivered when a node answers again, and the agent goes
/// autonomous -> reconciling -> connected (not "reconciling" for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_6_without_an_outbox_dir_the_agent_reconciles_and_is_connected_again() {
    let node = FakeNode::start(Script { tasks: vec![1], ..Script::default() }).await;
    let running = run(Agent::new(config(&node, "no-outbox"), handler(slow)).unwrap());
    let agent = running.agent.clone();
    wait_until("the lease", Duration::from_secs(5), || node.script.lock().unwrap().tasks.is_empty()).await;
    node.down();
    wait_until("the result kept in memory", Duration::from_secs(10), || agent.outbox_len() == 1).await;
    wait_until("autonomous", Duration::from_secs(10), || agent.stats.mode() == Mode::Autonomous).await;
    node.up().await;
    wait_until("connected again", Duration::from_secs(10), || agent.stats.mode() == Mode::Connected).await;
    assert_eq!(node.reports(), [(1, 7)], "delivered with the fence it was produced under");
    assert_eq!(agent.outbox_len(), 0);
    assert_eq!(agent.stats.reconciled.load(Ordering::Relaxed), 1);
    running.stop().await;
}

/// docs/sdk.md, 6: with nothing owed, the first answer after an outage
/// makes the agent connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_6_an_outage_with_nothing_owed_ends_connected() {
    let node = FakeNode::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&node, "idle");
    config.outbox_dir = Some(dir.path().to_path_buf());
    let running = run(Agent::new(config, handler(quick)).unwrap());
    let agent = running.agent.clone();
    wait_until("registered", Duration::from_secs(5), || node.script.lock().unwrap().registrations == 1).await;
    node.down();
    wait_until("autonomous", Duration::from_secs(10), || agent.stats.mode() == Mode::Autonomous).await;
    node.up().await;
    wait_until("connected again", Duration::from_secs(10), || agent.stats.mode() == Mode::Connected).await;
    running.stop().await;
}

/// docs/sdk.md, 7: each outage gets the whole autonomy budget again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_7_autonomy_budget_is_per_outage() {
    let node = FakeNode::start(Script::default()).await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut config = config(&node, "budget");
    let counted = runs.clone();
    config.autonomous_handler = Some(Arc::new(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }));
    config.autonomy_tasks_max = 2;
    config.autonomy_seconds_max = 60;
    let running = run(Agent::new(config, handler(quick)).unwrap());
    let agent = running.agent.clone();
    wait_until("registered", Duration::from_secs(5), || node.script.lock().unwrap().registrations == 1).await;
    for outage in 1..=2 {
        node.down();
        wait_until("two autonomous runs", Duration::from_secs(15), || runs.load(Ordering::SeqCst) == 2 * outage).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2 * outage, "two runs in outage {outage}, no more");
        assert_eq!(agent.stats.mode(), Mode::Autonomous);
        node.up().await;
        wait_until("connected again", Duration::from_secs(10), || agent.stats.mode() == Mode::Connected).await;
    }
    running.stop().await;
}

/// docs/sdk.md, 3 and 4: a report refused with a transient code is not an
/// answer about the result: it is kept and sent again, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_3_a_report_refused_with_a_transient_code_is_kept_and_sent_again() {
    let node = FakeNode::start(Script { tasks: vec![4], disk_full: true, ..Script::default() }).await;
    let running = run(Agent::new(config(&node, "disk-full"), handler(quick)).unwrap());
    let agent = running.agent.clone();
    wait_until("the result kept", Duration::from_secs(15), || agent.outbox_len() == 1).await;
    assert_eq!(agent.stats.mode(), Mode::Reconciling, "the node answers polls: owed, not cut off");
    node.script.lock().unwrap().disk_full = false;
    wait_until("the result delivered", Duration::from_secs(15), || node.reports() == [(4, 7)]).await;
    wait_until("connected", Duration::from_secs(5), || agent.stats.mode() == Mode::Connected).await;
    assert_eq!(agent.stats.rejected.load(Ordering::Relaxed), 0);
    running.stop().await;
}

/// docs/sdk.md, 3: a report whose answer is slower than the agent waits
/// goes to the outbox, and the outbox waits for that same request's answer
/// instead of sending the result again alongside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_3_a_slow_report_is_in_flight_once_not_once_per_retry() {
    // Slower than the agent waits for it (80 ms), within the client's own
    // attempt timeout (at least 250 ms): answered, but late.
    let node = FakeNode::start(Script { tasks: vec![5], report_delay_ms: 200, ..Script::default() }).await;
    let mut config = config(&node, "slow-report");
    config.orchestrator_timeout_ms = 80;
    let running = run(Agent::new(config, handler(quick)).unwrap());
    let agent = running.agent.clone();
    wait_until("the result kept", Duration::from_secs(15), || agent.outbox_len() == 1).await;
    wait_until("the result delivered", Duration::from_secs(15), || agent.outbox_len() == 0).await;
    // Long enough for any second request sent meanwhile to be answered too.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(node.reports(), [(5, 7)]);
    assert_eq!(node.script.lock().unwrap().report_requests, 1, "one request for one result");
    assert_eq!(agent.stats.reconciled.load(Ordering::Relaxed), 1);
    running.stop().await;
}

/// docs/sdk.md, 2: with a poll wait longer than the lease, a lease handed
/// out late in the wait is still startable (the poll waits half the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_2_a_lease_granted_at_the_end_of_a_long_poll_is_started() {
    let node = FakeNode::start(Script { tasks: vec![9], grant_delay_ms: 850, ..Script::default() }).await;
    let mut config = config(&node, "long-poll");
    config.poll_wait_ms = 10_000;
    config.lease_ttl_ms = 1_000;
    let running = run(Agent::new(config, handler(quick)).unwrap());
    let agent = running.agent.clone();
    wait_until("the task done", Duration::from_secs(10), || node.reports() == [(9, 7)]).await;
    assert_eq!(agent.stats.refused_expired.load(Ordering::Relaxed), 0);
    running.stop().await;
}

/// docs/sdk.md, 8: a second agent on the same outbox fails at once.
#[tokio::test]
async fn sdk_8_a_second_agent_on_the_same_outbox_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(vec!["127.0.0.1:1".into()], "twin", vec!["q".into()]);
    config.outbox_dir = Some(dir.path().to_path_buf());
    let first = Agent::new(config.clone(), handler(quick)).unwrap();
    let Err(error) = Agent::new(config.clone(), handler(quick)) else { panic!("a second agent on the same outbox") };
    assert!(matches!(error, Error::Outbox(_)), "{error:?}");
    assert!(error.to_string().contains("twin.outbox is in use by another agent"), "{error}");
    drop(first);
    Agent::new(config, handler(quick)).expect("free once the first agent is gone");
}
