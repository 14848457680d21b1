//! `phalanx bench failover`: the write outage clients see when the leader
//! fails, on a local 3-node cluster of real processes.
//!
//! Clients built on the Rust SDK with its default settings submit one task
//! at a time, continuously, starting on every node in turn. Each round does
//! one fault to the leader (`kill`: SIGKILL, `pause`: SIGSTOP), and measures
//! per client the outage: from the fault to the first acknowledged write that
//! was sent after it (a write already in flight proves nothing). Printed per
//! fault: the outage of the first client to recover, of every client, and of
//! the last one (p50 and max over the rounds), the calls that failed by outcome, the elections,
//! and the acknowledged tasks missing afterwards (which must be 0).
//! `isolate` (nothing passes between the leader and its peers) and `one-way`
//! (the leader's peers hear it, it does not hear them) run the nodes in
//! network namespaces and cut with iptables (`netns.rs`); where that is
//! impossible (not root, no iptables) they say they skipped.

use crate::bench::{cluster_term, percentile, BenchArgs};
use crate::launcher::LocalCluster;
use crate::netns::Cut;
use anyhow::Context;
use phalanx_agent::client::{Client, Outcome, SubmitRequest};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after a fault the clients keep submitting.
const ROUND_AFTER_FAULT_MS: u64 = 3_000;
/// Submitting before the fault, so every client has found its way.
const ROUND_BEFORE_FAULT_MS: u64 = 1_000;
/// A pause between one client's submits, so that a round stays well under
/// `queue_tasks_max` while still resolving the outage to a few milliseconds.
const CLIENT_PAUSE_MS: u64 = 5;

/// What one client saw in one round.
#[derive(Default)]
struct ClientLog {
    /// (sent, acknowledged, task id) of every acknowledged submit.
    acks: Vec<(Instant, Instant, u64)>,
    not_done: u64,
    unknown: u64,
}

#[derive(Default)]
struct FaultFigures {
    first_ms: Vec<u64>,
    last_ms: Vec<u64>,
    /// Every client's outage in every round.
    every_ms: Vec<u64>,
    /// Rounds in which some client had no acknowledged write after the fault.
    clients_without_ack: u64,
    not_done: u64,
    unknown: u64,
    elections: u64,
    acknowledged: BTreeSet<u64>,
    queues: Vec<String>,
}

pub async fn failover(args: BenchArgs) -> anyhow::Result<()> {
    let faults: Vec<String> = args.fault.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect();
    if let Some(bad) = faults.iter().find(|f| !["kill", "pause", "isolate", "one-way"].contains(&f.as_str())) {
        anyhow::bail!("unknown fault {bad:?}: use kill, pause, isolate or one-way");
    }
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let partitions = faults.iter().any(|f| f == "isolate" || f == "one-way");
    let mut cannot_partition = None;
    let mut cluster = if partitions {
        match LocalCluster::start_partitionable(3, dir.path(), &server_args).await {
            Ok(cluster) => cluster,
            Err(why) => {
                cannot_partition = Some(why.to_string());
                LocalCluster::start(3, dir.path(), &server_args).await?
            }
        }
    } else {
        LocalCluster::start(3, dir.path(), &server_args).await?
    };
    let token = cluster.client_token();
    let addrs = cluster.addrs();
    let clients = args.clients.max(3);
    println!(
        "cluster: 3 nodes at {}; {clients} SDK clients (default settings) submitting one task at a time, \
         starting on every node in turn; {} round(s) per fault",
        addrs.join(","),
        args.repeat
    );
    let http = crate::launcher::http_client(token.as_deref())?;
    let mut rows = Vec::new();
    for fault in &faults {
        if let Some(why) = cannot_partition.as_ref().filter(|_| fault == "isolate" || fault == "one-way") {
            println!("{fault}: skipped: {why}");
            continue;
        }
        let mut figures = FaultFigures::default();
        for round in 0..args.repeat {
            cluster.wait_for_leader(Duration::from_secs(30)).await?;
            // Let the cluster settle after the previous round's recovery.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let term_before = cluster_term(&http, &addrs).await;
            let queue = format!("failover-{fault}-{round}");
            figures.queues.push(queue.clone());
            let stop = Arc::new(AtomicBool::new(false));
            let mut handles = Vec::new();
            for i in 0..clients {
                let client =
                    Client::new(addrs.clone(), token.clone())?.starting_at(i).with_name(format!("failover-client-{i}"));
                handles.push(tokio::spawn(submit_loop(client, queue.clone(), stop.clone())));
            }
            tokio::time::sleep(Duration::from_millis(ROUND_BEFORE_FAULT_MS)).await;
            // The leader as it is now, just before the fault.
            let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
            // The fault counts from the moment it is complete: a cut is one
            // atomic rule change, measured from when it has returned.
            let mut fault_at = Instant::now();
            match fault.as_str() {
                "kill" => cluster.kill(leader),
                "pause" => cluster.signal(leader, "STOP"),
                "isolate" => cluster.cut(leader, Cut::Both)?,
                _ => cluster.cut(leader, Cut::Inbound)?,
            }
            if fault == "isolate" || fault == "one-way" {
                fault_at = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(ROUND_AFTER_FAULT_MS)).await;
            stop.store(true, Ordering::SeqCst);
            let mut first: Option<u64> = None;
            let mut last: Option<u64> = Some(0);
            for handle in handles {
                let log = handle.await.context("client")?;
                figures.not_done += log.not_done;
                figures.unknown += log.unknown;
                figures.acknowledged.extend(log.acks.iter().map(|(_, _, id)| *id));
                let recovered = log
                    .acks
                    .iter()
                    .filter(|(sent, _, _)| *sent >= fault_at)
                    .map(|(_, acked, _)| acked.duration_since(fault_at).as_millis() as u64)
                    .min();
                figures.every_ms.extend(recovered);
                first = match (first, recovered) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                last = match (last, recovered) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            match fault.as_str() {
                "kill" => cluster.spawn(leader)?,
                "pause" => cluster.signal(leader, "CONT"),
                _ => cluster.heal(leader)?,
            }
            cluster.wait_for_leader(Duration::from_secs(30)).await?;
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            let elections = cluster_term(&http, &addrs).await.saturating_sub(term_before);
            figures.elections += elections;
            let show = |ms: Option<u64>| ms.map_or("none".to_string(), |ms| format!("{ms} ms"));
            println!(
                "{fault} {}: leader {leader}; outage first client {}, last client {}; elections {elections}",
                round + 1,
                show(first),
                show(last)
            );
            figures.first_ms.extend(first);
            match last {
                Some(ms) => figures.last_ms.push(ms),
                None => figures.clients_without_ack += 1,
            }
        }
        let lost = missing_tasks(&addrs, token.clone(), &figures).await?;
        rows.push((fault.clone(), figures, lost));
    }
    println!();
    println!(
        "fault  rounds  outage first client p50/max  outage every client p50/max  outage last client p50/max  \
         failed calls not_done/unknown  elections  acknowledged  lost"
    );
    for (fault, figures, lost) in &mut rows {
        figures.first_ms.sort_unstable();
        figures.last_ms.sort_unstable();
        figures.every_ms.sort_unstable();
        let pair = |sorted: &[u64]| format!("{} / {} ms", percentile(sorted, 0.5), sorted.last().copied().unwrap_or(0));
        let without = if figures.clients_without_ack > 0 {
            format!(" ({} round(s) with a client that never recovered)", figures.clients_without_ack)
        } else {
            String::new()
        };
        println!(
            "{fault:<6} {:>6}  {:>27}  {:>27}  {:>26}{without}  {:>15} / {:<13}  {:>9}  {:>12}  {:>4}",
            figures.first_ms.len().max(figures.last_ms.len()),
            pair(&figures.first_ms),
            pair(&figures.every_ms),
            pair(&figures.last_ms),
            figures.not_done,
            figures.unknown,
            figures.elections,
            figures.acknowledged.len(),
            lost
        );
    }
    Ok(())
}

/// Submits one task at a time until told to stop, recording every
/// acknowledgement and every failed call by its outcome.
async fn submit_loop(client: Client, queue: String, stop: Arc<AtomicBool>) -> ClientLog {
    let mut log = ClientLog::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        match client.submit(&SubmitRequest::new(queue.clone(), json!(n))).await {
            Ok(submitted) => log.acks.push((sent, Instant::now(), submitted.task_id)),
            Err(error) => match error.outcome() {
                Outcome::NotDone => log.not_done += 1,
                Outcome::Unknown => log.unknown += 1,
            },
        }
        tokio::time::sleep(Duration::from_millis(CLIENT_PAUSE_MS)).await;
    }
    log
}

/// Acknowledged tasks that no longer exist (linearizable reads, every queue
/// of the fault's rounds): must be none.
async fn missing_tasks(addrs: &[String], token: Option<String>, figures: &FaultFigures) -> anyhow::Result<usize> {
    let client = Client::new(addrs.to_vec(), token)?;
    let mut present = BTreeSet::new();
    for queue in &figures.queues {
        let mut after = None;
        loop {
            let page = client.list_tasks(Some(queue), None, after, Some(1000)).await?;
            present.extend(page.tasks.iter().map(|t| t.id));
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    Ok(figures.acknowledged.difference(&present).count())
}
