//! The Rust agent SDK against real node processes: an agent cut off from
//! every node finishes its task, keeps the result in its durable outbox and
//! is reconciled when the cluster returns; a late result whose lease moved on
//! is superseded and the accepted result stays; an agent restarted while
//! autonomous still delivers its outbox; an expired instruction is refused;
//! and the built-in exec agent runs a command per task.

mod common;

use common::Cluster;
use phalanx_agent::{handler, Agent, AgentConfig, HandlerError, Mode, TaskContext};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(cluster: &Cluster, agent_id: &str, outbox: &std::path::Path) -> AgentConfig {
    let mut config = AgentConfig::new(vec![cluster.addr(1).to_string()], agent_id, vec!["slow".to_string()]);
    config.concurrency = 2;
    config.poll_wait_ms = 300;
    config.orchestrator_timeout_ms = 500;
    config.outbox_dir = Some(outbox.to_path_buf());
    config
}

async fn slow(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(json!({"done_by_fence": context.fence}))
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn task(cluster: &Cluster, id: u64) -> Value {
    cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_agent_keeps_its_result_and_is_reconciled() {
    let mut cluster = Cluster::start(1, &[]).await;
    let outbox = cluster.dir.path().join("outbox");
    let (_, submitted) = cluster.post(1, "/v1/tasks", &json!({"queue": "slow", "payload": 1})).await.unwrap();
    let id = submitted["task_id"].as_u64().unwrap();
    let mut agent_config = config(&cluster, "cut-off", &outbox);
    agent_config.lease_ttl_ms = 30_000;
    // Local work while cut off, within a budget of two runs.
    agent_config.autonomous_handler = Some(Arc::new(|| Box::pin(async {})));
    agent_config.autonomy_tasks_max = 2;
    agent_config.autonomy_seconds_max = 60;
    let agent = Agent::new(agent_config, handler(slow)).unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await })
    };
    let started = Instant::now();
    loop {
        if task(&cluster, id).await["state"] == "leased" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every node gone mid-task.
    cluster.servers.get_mut(&1).unwrap().kill9();
    wait_until("the result reaching the outbox", Duration::from_secs(10), || agent.outbox_len() == 1).await;
    assert_eq!(agent.stats.mode(), Mode::Autonomous);
    wait_until("autonomous work", Duration::from_secs(10), || agent.stats.autonomous_runs.load(Ordering::Relaxed) == 2)
        .await;
    // Time passes on purpose: no third run may start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.stats.autonomous_runs.load(Ordering::Relaxed), 2, "the autonomy budget holds");
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    wait_until("the outbox draining", Duration::from_secs(20), || agent.outbox_len() == 0).await;
    let finished = task(&cluster, id).await;
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert_eq!(agent.stats.reconciled.load(Ordering::Relaxed), 1);
    assert_eq!(agent.stats.superseded.load(Ordering::Relaxed), 0);
    stop.notify_waiters();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_is_superseded_and_a_restarted_agent_still_delivers_its_outbox() {
    let mut cluster = Cluster::start(1, &[]).await;
    let outbox = cluster.dir.path().join("outbox");
    let (_, submitted) = cluster.post(1, "/v1/tasks", &json!({"queue": "slow", "payload": 2})).await.unwrap();
    let id = submitted["task_id"].as_u64().unwrap();
    let mut agent_config = config(&cluster, "late", &outbox);
    agent_config.lease_ttl_ms = 1_000;
    let agent = Agent::new(agent_config.clone(), handler(slow)).unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await })
    };
    let started = Instant::now();
    let first_fence = loop {
        let current = task(&cluster, id).await;
        if current["state"] == "leased" {
            break current["last_fence"].as_u64().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.servers.get_mut(&1).unwrap().kill9();
    wait_until("the result reaching the outbox", Duration::from_secs(10), || agent.outbox_len() == 1).await;
    // The agent process "restarts": this instance stops while still autonomous.
    stop.notify_waiters();
    running.await.unwrap().unwrap();
    drop(agent);

    // Meanwhile the cluster returns, the lease has lapsed, and another agent does the task.
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    let (_, registered) = cluster
        .post(1, "/v1/agents/register", &json!({"agent_id": "rescuer", "capabilities": ["slow"]}))
        .await
        .unwrap();
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].clone();
    let rescue_fence = loop {
        let (_, polled) = cluster
            .post(1, "/v1/agents/rescuer/poll", &json!({"epoch": epoch, "session": session, "wait_ms": 500}))
            .await
            .unwrap();
        if let Some(lease) = polled["leases"].as_array().and_then(|l| l.first()) {
            break lease["fence"].as_u64().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the lapsed lease was never re-granted");
    };
    assert!(rescue_fence > first_fence);
    let accepted = json!({"done_by": "rescuer"});
    let (status, _) = cluster
        .post(1, &format!("/v1/tasks/{id}/complete"), &json!({"fence": rescue_fence, "result": accepted}))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // The restarted agent finds its outbox on disk and reconciles it: superseded.
    let restarted = Agent::new(agent_config, handler(slow)).unwrap();
    assert_eq!(restarted.outbox_len(), 1, "the outbox survived the restart");
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (agent, stop) = (restarted.clone(), stop.clone());
        tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await })
    };
    wait_until("the outbox draining", Duration::from_secs(20), || restarted.outbox_len() == 0).await;
    assert_eq!(restarted.stats.superseded.load(Ordering::Relaxed), 1);
    let finished = task(&cluster, id).await;
    assert_eq!(finished["result"], accepted, "the accepted result is unchanged");
    assert_eq!(finished["superseded_count"], 1);
    stop.notify_waiters();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_instruction_is_refused() {
    let cluster = Cluster::start(1, &[]).await;
    let outbox = cluster.dir.path().join("outbox");
    cluster.post(1, "/v1/tasks", &json!({"queue": "slow", "payload": 3})).await.unwrap();
    // A lease of 150 ms is inside the agent's safety margin: never worth starting.
    let mut agent_config = config(&cluster, "careful", &outbox);
    agent_config.lease_ttl_ms = 150;
    let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = ran.clone();
    let agent = Agent::new(
        agent_config,
        handler(move |_context| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(json!(null))
            }
        }),
    )
    .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let running = {
        let (agent, stop) = (agent.clone(), stop.clone());
        tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await })
    };
    wait_until("a refusal", Duration::from_secs(10), || agent.stats.refused_expired.load(Ordering::Relaxed) > 0).await;
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler never ran an expired instruction");
    stop.notify_waiters();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_agent_runs_a_command_per_task_and_drains_on_sigterm() {
    let cluster = Cluster::start(1, &[]).await;
    let (_, ok) = cluster.post(1, "/v1/tasks", &json!({"queue": "shell", "payload": {"x": 1}})).await.unwrap();
    let (_, bad) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "shell", "payload": "fail", "max_attempts": 1})).await.unwrap();
    let script = r#"input=$(cat); if [ "$input" = '"fail"' ]; then echo broken >&2; exit 3; fi; echo "$input""#;
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["agent", "run", "--queue", "shell", "--exec", script, "--nodes", cluster.addr(1)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let done = task(&cluster, ok["task_id"].as_u64().unwrap()).await;
        let failed = task(&cluster, bad["task_id"].as_u64().unwrap()).await;
        if done["state"] == "succeeded" && failed["state"] == "dead" {
            assert_eq!(done["result"], json!({"x": 1}));
            assert!(failed["error"].as_str().unwrap().contains("broken"), "{failed}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{done} {failed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::process::Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = agent.wait().unwrap();
    assert!(exit.success(), "the agent drained and exited cleanly: {exit}");
    let (_, agents) = cluster.get(1, "/v1/agents").await.unwrap();
    assert!(agents["agents"].as_array().unwrap().is_empty(), "the agent deregistered: {agents}");
}
