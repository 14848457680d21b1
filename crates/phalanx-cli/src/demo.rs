//! `phalanx demo`: a local cluster of real node processes, SDK agents, and a
//! multi-agent workload (a planner fans out to a researcher and a writer and
//! combines their results), with the leader SIGKILLed mid-run and restarted.
//! Shows progress and ends with a report: submitted, acknowledged,
//! completed, lost (must be 0), superseded duplicates, each write outage.

use crate::launcher::LocalCluster;
use clap::Args;
use phalanx_agent::{handler, Agent, AgentConfig, Client, HandlerError, SubmitRequest, TaskContext};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// How many nodes the local cluster has.
    #[arg(long, short = 'n', default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub node_count: u64,
    /// Planner tasks to submit (each fans out to two more).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub plans: u32,
    /// Do not kill the leader mid-run.
    #[arg(long)]
    pub no_kill: bool,
}

const TOPICS: [&str; 6] = ["consensus", "fencing tokens", "load shedding", "backpressure", "leases", "snapshots"];

async fn plan(context: TaskContext) -> Result<Value, HandlerError> {
    let topic = context.task.payload["topic"].as_str().unwrap_or("?").to_string();
    let research = context.spawn_child("research", json!({ "topic": topic })).await?;
    let draft = context.spawn_child("write", json!({ "topic": topic, "style": "short" })).await?;
    let children = context.await_tasks(&[research, draft], Duration::from_secs(120)).await?;
    Ok(json!({
        "topic": topic,
        "research": children[0].result,
        "draft": children[1].result,
        "fence": context.fence,
    }))
}

/// Stand-ins for LLM calls: deterministic, with a little latency.
async fn research(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(150)).await;
    let topic = context.task.payload["topic"].as_str().unwrap_or("");
    Ok(json!({ "facts": [format!("{topic} has {} letters", topic.len())], "fence": context.fence }))
}

async fn write(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let topic = context.task.payload["topic"].as_str().unwrap_or("");
    Ok(json!({ "text": format!("A short note on {topic}."), "fence": context.fence }))
}

fn bar(done: usize, total: usize) -> String {
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("starting {} node(s) in {} ...", args.node_count, dir.path().display());
    let mut cluster = LocalCluster::start(args.node_count, dir.path(), &[]).await?;
    let addrs = cluster.addrs();
    println!("cluster up: {} (leader {})", addrs.join(", "), cluster.leader().await.unwrap_or(0));

    let stop_agents = Arc::new(tokio::sync::Notify::new());
    let mut agents = Vec::new();
    let mut agent_handles = Vec::new();
    for (name, queue, function, count) in [
        ("planner", "plan", handler(plan), 2),
        ("researcher", "research", handler(research), 2),
        ("writer", "write", handler(write), 2),
    ] {
        for i in 0..count {
            let mut config = AgentConfig::new(addrs.clone(), format!("{name}-{i}"), vec![queue.to_string()]);
            config.concurrency = 8;
            config.lease_ttl_ms = 5_000;
            config.poll_wait_ms = 2_000;
            config.outbox_dir = Some(dir.path().join("outbox"));
            let agent = Agent::new(config, function.clone())?;
            agents.push(agent.clone());
            let stop = stop_agents.clone();
            agent_handles
                .push(tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await }));
        }
    }

    // The outage probe: a small write every 20 ms, round robin over the nodes.
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(outage_probe(addrs.clone(), probe_stop.clone()));

    let client = Arc::new(Client::new(addrs.clone(), None)?.with_name("demo-client"));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let submitter = {
        let client = client.clone();
        let acknowledged = acknowledged.clone();
        let plans = args.plans;
        tokio::spawn(async move {
            for i in 0..plans {
                let mut request =
                    SubmitRequest::new("plan", json!({ "topic": TOPICS[i as usize % TOPICS.len()], "n": i }));
                request.idempotency_key = Some(format!("demo-plan-{i}"));
                request.conversation_id = Some(format!("demo-{i}"));
                // Keyed submits are safe to retry until the cluster answers.
                loop {
                    match client.submit(&request).await {
                        Ok(submitted) => {
                            acknowledged.lock().unwrap().push(submitted.task_id);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };

    let started = Instant::now();
    let mut killed: Option<(u64, Instant)> = None;
    let mut restarted = false;
    let mut last_done = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let ids = acknowledged.lock().unwrap().clone();
        let done = count_finished(&client, &ids).await.unwrap_or(last_done);
        last_done = done;
        let leader = cluster.leader().await;
        let modes: Vec<&str> = agents.iter().map(|a| a.stats.mode().as_str()).collect();
        let autonomous = modes.iter().filter(|m| **m != "connected").count();
        print!(
            "\r{} {done:>3}/{} plans done | leader {:<4} | agents not connected: {autonomous} | {:>5.1} s   ",
            bar(done, args.plans as usize),
            args.plans,
            leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
        if !args.no_kill && killed.is_none() && done * 3 >= args.plans as usize {
            if let Some(leader) = leader {
                cluster.kill(leader);
                println!("\n>>> SIGKILL leader node {leader}");
                killed = Some((leader, Instant::now()));
            }
        }
        if let Some((node, at)) = killed {
            if !restarted && at.elapsed() > Duration::from_secs(3) {
                cluster.spawn(node)?;
                println!("\n>>> node {node} restarted from its data directory");
                restarted = true;
            }
        }
        if submitter.is_finished() && done >= ids.len() && ids.len() == args.plans as usize {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            println!("\ngiving up after 300 s");
            break;
        }
    }
    println!();
    probe_stop.store(true, Ordering::SeqCst);
    let outages = probe.await?;
    stop_agents.notify_waiters();
    for handle in agent_handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }

    // The report, from the cluster's own linearizable reads.
    let ids = acknowledged.lock().unwrap().clone();
    let (mut succeeded, mut other, mut lost) = (0, 0, Vec::new());
    for id in &ids {
        match client.get_task(*id, false).await {
            Ok(task) if task.state == phalanx_agent::TaskState::Succeeded => succeeded += 1,
            Ok(task) if task.state.is_terminal() => other += 1,
            _ => lost.push(*id),
        }
    }
    let status = client.status().await.unwrap_or_default();
    let counters = &status["counters"];
    println!("---- report ----");
    println!("plans submitted:           {}", args.plans);
    println!("plans acknowledged:        {}", ids.len());
    println!("plans completed:           {succeeded}");
    println!("plans failed or dead:      {other}");
    println!("tasks completed in all:    {} (plans and their children)", counters["succeeded"]);
    println!("lost:                      {}", lost.len());
    println!("superseded duplicates:     {} (late results refused by their fence)", counters["superseded"]);
    println!("leases expired:            {}", counters["leases_expired"]);
    if outages.is_empty() {
        println!("write outages:             none over 100 ms");
    } else {
        let list: Vec<String> = outages.iter().map(|ms| format!("{ms} ms")).collect();
        println!("write outages:             {}", list.join(", "));
    }
    println!("elapsed:                   {:.1} s", started.elapsed().as_secs_f64());
    drop(cluster);
    if !lost.is_empty() {
        anyhow::bail!("{} acknowledged plans were lost: {lost:?}", lost.len());
    }
    Ok(())
}

async fn count_finished(client: &Client, ids: &[u64]) -> Result<usize, phalanx_agent::Error> {
    let mut finished = 0;
    let mut after = None;
    loop {
        let page = client.list_tasks(Some("plan"), None, after, Some(1000)).await?;
        finished += page.tasks.iter().filter(|t| t.state.is_terminal() && ids.contains(&t.id)).count();
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(finished),
        }
    }
}

/// Writes a context key every 20 ms and returns each gap between
/// acknowledged writes longer than 100 ms: the write outages.
async fn outage_probe(addrs: Vec<String>, stop: Arc<AtomicBool>) -> Vec<u64> {
    let http = reqwest::Client::builder().timeout(Duration::from_millis(1000)).build().expect("client");
    let mut outages = Vec::new();
    let mut last_ack: Option<Instant> = None;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let addr = &addrs[i % addrs.len()];
        i += 1;
        let answer = http
            .put(format!("http://{addr}/v1/conversations/demo-probe/tick"))
            .json(&json!({ "value": i }))
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            let now = Instant::now();
            if let Some(last) = last_ack {
                let gap = now.duration_since(last).as_millis() as u64;
                if gap > 100 {
                    outages.push(gap);
                }
            }
            last_ack = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outages
}
