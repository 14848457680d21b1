//! The run: boot the cluster, start the clients, agents, ticker, reader,
//! policy changer and nemesis, let the faults go for `fault_ms`, heal
//! everything, demand progress within `recover_ms`, then check the converged
//! cluster against the history.

use crate::cluster::{self, Failure};
use crate::history::History;
use crate::{Options, Plant, Report, Shared};
use phalanx_core::{Command, NewTask, Outcome};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

type Log = Arc<Mutex<History>>;

fn history(log: &Log) -> std::sync::MutexGuard<'_, History> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pick_node(shared: &Shared) -> u64 {
    let mut world = shared.lock();
    let ids = world.ids();
    *ids.choose(&mut world.rng).expect("a cluster has nodes")
}

fn draw(shared: &Shared, low: u64, high: u64) -> u64 {
    shared.lock().rng.gen_range(low..=high)
}

async fn pause_ms(shared: &Shared, low: u64, high: u64) {
    let ms = draw(shared, low, high);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn count(shared: &Shared, what: &'static str) {
    shared.lock().count(what);
}

pub async fn run(shared: Shared, seed: u64, options: &Options) -> Report {
    cluster::boot(&shared).await;
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let faults_over = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..2 {
        tasks.push(tokio::spawn(submitter(shared.clone(), log.clone(), stop.clone(), client)));
    }
    for agent in 0..3 {
        tasks.push(tokio::spawn(agent_loop(shared.clone(), log.clone(), stop.clone(), agent)));
    }
    tasks.push(tokio::spawn(ticker(shared.clone(), stop.clone())));
    tasks.push(tokio::spawn(reader(shared.clone(), log.clone(), stop.clone())));
    tasks.push(tokio::spawn(policy_changer(shared.clone(), stop.clone())));
    tasks.push(tokio::spawn(digest_watch(shared.clone(), log.clone(), stop.clone())));
    let nemesis = tokio::spawn(nemesis(shared.clone(), faults_over.clone(), options.fault_ms));

    let _ = nemesis.await;
    heal_all(&shared).await;
    // Liveness: one leader, and a write acknowledged, within recover_ms.
    let healed_at = Instant::now();
    let mut recovered = false;
    while healed_at.elapsed() < Duration::from_millis(options.recover_ms) {
        let via = pick_node(&shared);
        let tick = cluster::write(&shared, via, vec![Command::Tick]).await;
        if tick.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !recovered {
        history(&log).liveness(format!("no write acknowledged within {} ms of healing", options.recover_ms));
    } else {
        let ms = healed_at.elapsed().as_millis() as u64;
        shared.lock().counts.insert("recovery_ms", ms);
    }
    // Let the workload run on a healthy cluster, then stop it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    final_checks(&shared, &log, recovered).await;

    let mut world = shared.lock();
    let failures = std::mem::take(&mut world.failures);
    let mut history = history(&log);
    for failure in failures {
        history.cluster_failure(failure);
    }
    world.counts.insert("submits_acknowledged", history.acked.len() as u64);
    world.counts.insert("results_accepted", history.results_accepted() as u64);
    world.counts.insert("leases_granted", history.grants_seen() as u64);
    let term = world.ids().iter().filter_map(|id| world.raft(*id)).map(|r| r.metrics().borrow().current_term).max();
    world.counts.insert("term", term.unwrap_or(0));
    Report {
        seed,
        nodes: options.nodes,
        counts: world.counts.clone(),
        violations: history.violations.clone(),
        simulated_ms: world.now_ms(),
    }
}

/// Submits tasks through random nodes, each with its own idempotency key,
/// retrying a failed one with the same key (so a retry can never create a
/// second task).
async fn submitter(shared: Shared, log: Log, stop: Arc<AtomicBool>, client: u64) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("c{client}-{n}");
        let queue = if draw(&shared, 0, 3) == 0 { "plan" } else { "work" };
        let mut task = NewTask::new(queue, format!("{n}"));
        task.idempotency_key = Some(key.clone());
        for _ in 0..5 {
            let via = pick_node(&shared);
            match cluster::write(&shared, via, vec![Command::Submit { tasks: vec![task.clone()] }]).await {
                Ok(outcomes) => {
                    if let Some(Outcome::Submitted { results }) = outcomes.first() {
                        if let Some(Ok(submitted)) = results.first() {
                            history(&log).submitted(submitted.task_id, &key);
                            count(&shared, "submit_calls_acknowledged");
                        }
                    }
                    break;
                }
                Err(Failure::NotDone(_)) => count(&shared, "refusals_not_done"),
                Err(Failure::Unknown(_)) => count(&shared, "outcomes_unknown"),
            }
            pause_ms(&shared, 20, 100).await;
        }
        pause_ms(&shared, 10, 80).await;
    }
}

/// One agent: registers, polls for leases, and for each one works a while,
/// then completes, fails, extends, or walks away; a plan delegates two
/// children and waits on them first.
async fn agent_loop(shared: Shared, log: Log, stop: Arc<AtomicBool>, agent: u64) {
    let agent_id = format!("agent-{agent}");
    let capabilities: BTreeSet<String> = ["work", "plan", "child"].iter().map(|s| s.to_string()).collect();
    let mut epoch = None;
    while !stop.load(Ordering::Relaxed) {
        let via = pick_node(&shared);
        let Some(current) = epoch else {
            let register = Command::RegisterAgent {
                agent_id: agent_id.clone(),
                capabilities: capabilities.clone(),
                capacity: 4,
                session: format!("secret-{agent}"),
            };
            if let Ok(outcomes) = cluster::write(&shared, via, vec![register]).await {
                if let Some(Outcome::Registered { epoch: e }) = outcomes.first() {
                    epoch = Some(*e);
                }
            }
            pause_ms(&shared, 20, 100).await;
            continue;
        };
        let poll = Command::Lease {
            agent_id: agent_id.clone(),
            epoch: current,
            queues: vec!["plan".into(), "work".into(), "child".into()],
            tasks_max: 2,
            lease_ttl_ms: 1_500,
        };
        let sent = Instant::now();
        let grants = match cluster::write(&shared, via, vec![poll]).await {
            Ok(outcomes) => match outcomes.into_iter().next() {
                Some(Outcome::Leased { grants }) => grants,
                Some(Outcome::Refused { .. }) => {
                    epoch = None;
                    Vec::new()
                }
                _ => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        let grants = {
            let mut world = shared.lock();
            if world.plant() == Some(Plant::DoubleGrant) {
                // The planted bug: a poll's grants also go to the next poller.
                let mut handed = grants.clone();
                handed.extend(std::mem::take(&mut world.last_grants));
                world.last_grants = grants;
                handed
            } else {
                grants
            }
        };
        for grant in grants {
            history(&log).granted(grant.task.id, grant.fence, &agent_id, sent);
            tokio::spawn(work(shared.clone(), log.clone(), grant.task.id, grant.task.queue.clone(), grant.fence));
        }
        pause_ms(&shared, 20, 150).await;
    }
}

async fn work(shared: Shared, log: Log, task_id: u64, queue: String, fence: u64) {
    // Some work outlasts the lease (1.5 s): its result comes from a zombie.
    pause_ms(&shared, 20, 2_500).await;
    if queue == "plan" {
        let children: Vec<NewTask> = (0..2)
            .map(|i| {
                let mut child = NewTask::new("child", format!("{{\"of\":{task_id},\"step\":{i}}}"));
                child.parent_id = Some(task_id);
                child.parent_fence = Some(fence);
                child.idempotency_key = Some(format!("child-{task_id}-{fence}-{i}"));
                child
            })
            .collect();
        let via = pick_node(&shared);
        if let Ok(outcomes) = cluster::write(&shared, via, vec![Command::Submit { tasks: children }]).await {
            let mut ids = Vec::new();
            if let Some(Outcome::Submitted { results }) = outcomes.first() {
                for (i, result) in results.iter().enumerate() {
                    if let Ok(submitted) = result {
                        history(&log).submitted(submitted.task_id, &format!("child-{task_id}-{fence}-{i}"));
                        ids.push(submitted.task_id);
                    }
                }
            }
            if !ids.is_empty() {
                let wait = Command::Wait { task_id, fence, on: ids, timeout_ms: 2_000 };
                if cluster::write(&shared, pick_node(&shared), vec![wait]).await.is_ok() {
                    count(&shared, "waits");
                }
            }
        }
        pause_ms(&shared, 20, 300).await;
    }
    let choice = draw(&shared, 0, 99);
    let via = pick_node(&shared);
    if choice < 5 {
        count(&shared, "leases_walked_away_from");
        return;
    }
    if choice < 15 {
        let fail = Command::Fail { task_id, fence, error: "\"flaky tool\"".into(), retryable: true, usage: None };
        let _ = cluster::write(&shared, via, vec![fail]).await;
        return;
    }
    if choice < 25 {
        let extend = Command::Extend { task_id, fence, lease_ttl_ms: 1_500 };
        let _ = cluster::write(&shared, via, vec![extend]).await;
        pause_ms(&shared, 20, 400).await;
    }
    let result = format!("\"done by fence {fence}\"");
    // A result is retried with its fence until the cluster answers it.
    for _ in 0..5 {
        let sent = Instant::now();
        let complete = Command::Complete { task_id, fence, result: result.clone(), usage: None };
        match cluster::write(&shared, pick_node(&shared), vec![complete]).await {
            Ok(outcomes) => {
                if let Some(Outcome::Completed { task }) = outcomes.first() {
                    // The task as accepted: its result, under the fence it names.
                    let accepted = task.result().map(str::to_string).unwrap_or_default();
                    history(&log).completed(task_id, fence, &accepted, sent);
                }
                return;
            }
            Err(_) => pause_ms(&shared, 50, 200).await,
        }
    }
}

/// What a real leader's timer does: a `Tick` when something is due by log
/// time (lease expiry, deadlines, waits).
async fn ticker(shared: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let via = pick_node(&shared);
        let due = shared.lock().state_of(via).and_then(|s| s.data.read().expect("state lock").state.next_due_ms());
        if due.is_some() {
            let _ = cluster::write(&shared, via, vec![Command::Tick]).await;
        }
    }
}

/// Linearizable reads of tasks whose submit was acknowledged before the
/// read was sent: each must be found.
async fn reader(shared: Shared, log: Log, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        pause_ms(&shared, 20, 60).await;
        let candidate = {
            let history = history(&log);
            let newest: Vec<u64> = history.acked.keys().rev().take(20).copied().collect();
            drop(history);
            let mut world = shared.lock();
            newest.choose(&mut world.rng).copied()
        };
        let Some(task_id) = candidate else { continue };
        let via = pick_node(&shared);
        match cluster::read(&shared, via, |state| state.task(task_id).is_some()).await {
            Ok(true) => count(&shared, "reads"),
            Ok(false) => history(&log).read_missed(task_id, via),
            Err(_) => count(&shared, "reads_refused"),
        }
    }
}

/// Now and then, a policy change (the same limits under a new note) with
/// the version this node has seen; a stale version is refused.
async fn policy_changer(shared: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        pause_ms(&shared, 1_000, 4_000).await;
        let via = pick_node(&shared);
        let Some(state) = shared.lock().state_of(via) else { continue };
        let (policy, version) = {
            let data = state.data.read().expect("state lock");
            (data.state.limits().clone(), data.state.policy_version())
        };
        let change = Command::SetPolicy { policy, expected_version: version, note: "sim".into(), force: false };
        if let Ok(outcomes) = cluster::write(&shared, via, vec![change]).await {
            if matches!(outcomes.first(), Some(Outcome::PolicySet { .. })) {
                count(&shared, "policy_changes");
            }
        }
    }
}

/// Compares the state of replicas at the same applied index, as it goes.
async fn digest_watch(shared: Shared, log: Log, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (node, applied, digest) in cluster::digests(&shared) {
            history(&log).digest(node, applied, digest);
        }
    }
}

/// Faults, one every 0.2 to 1.5 s, for `fault_ms`.
async fn nemesis(shared: Shared, over: Arc<AtomicBool>, fault_ms: u64) {
    let started = Instant::now();
    let ids = shared.lock().ids();
    let majority = ids.len() / 2 + 1;
    while started.elapsed() < Duration::from_millis(fault_ms) {
        pause_ms(&shared, 200, 1_500).await;
        let kind = draw(&shared, 0, 99);
        let down: Vec<u64> = ids.iter().copied().filter(|id| !shared.lock().is_up(*id)).collect();
        match kind {
            // A symmetric partition: a minority on one side.
            0..=14 => {
                let mut world = shared.lock();
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut world.rng);
                let side = world.rng.gen_range(1..majority);
                let (minority, rest) = shuffled.split_at(side);
                for a in minority {
                    for b in rest {
                        world.faults.cut.insert((*a, *b));
                        world.faults.cut.insert((*b, *a));
                    }
                }
                world.count("partitions");
            }
            // One way: a node's messages to the others are lost, theirs arrive.
            15..=22 => {
                let mut world = shared.lock();
                let node = *ids.choose(&mut world.rng).expect("nodes");
                for other in ids.iter().filter(|o| **o != node) {
                    world.faults.cut.insert((node, *other));
                }
                world.count("one_way_cuts");
            }
            // Partial: one link, both ways.
            23..=30 => {
                let mut world = shared.lock();
                let pair: Vec<u64> = ids.choose_multiple(&mut world.rng, 2).copied().collect();
                world.faults.cut.insert((pair[0], pair[1]));
                world.faults.cut.insert((pair[1], pair[0]));
                world.count("partial_cuts");
            }
            31..=45 => shared.lock().faults.cut.clear(),
            // A crash; rarely the whole cluster (a power cut).
            46..=57 => {
                let victim = {
                    let mut world = shared.lock();
                    ids.choose(&mut world.rng).copied().expect("nodes")
                };
                cluster::crash(&shared, victim).await;
            }
            58..=60 => {
                for id in &ids {
                    cluster::crash(&shared, *id).await;
                }
                shared.lock().count("power_cuts");
            }
            61..=75 => {
                if let Some(id) = down.first() {
                    cluster::start(&shared, *id).await;
                    shared.lock().count("restarts");
                }
            }
            76..=83 => {
                let mut world = shared.lock();
                let node = *ids.choose(&mut world.rng).expect("nodes");
                world.faults.paused.insert(node);
                world.count("pauses");
            }
            84..=89 => shared.lock().faults.paused.clear(),
            _ => {
                let mut world = shared.lock();
                let loss = world.rng.gen_range(0..=100);
                let duplicate = world.rng.gen_range(0..=50);
                let high = world.rng.gen_range(5..=150);
                world.faults.loss_per_mille = loss;
                world.faults.duplicate_per_mille = duplicate;
                world.faults.delay_ms = (1, high);
                world.count("network_changes");
            }
        }
    }
    over.store(true, Ordering::SeqCst);
}

/// The faults stop: links heal, paused nodes resume, crashed nodes restart.
async fn heal_all(shared: &Shared) {
    let ids = {
        let mut world = shared.lock();
        world.faults = crate::net::Faults::calm();
        world.ids()
    };
    for id in ids {
        if !shared.lock().is_up(id) {
            cluster::start(shared, id).await;
        }
    }
}

/// After the run: every node converged on the same applied state, which
/// holds every acknowledged task and accepted result, and keeps the state
/// machine's own invariants.
async fn final_checks(shared: &Shared, log: &Log, recovered: bool) {
    // Converge: all nodes at the same applied index (bounded wait).
    let started = Instant::now();
    loop {
        let digests = cluster::digests(shared);
        let same = digests.windows(2).all(|w| w[0].1 == w[1].1);
        if same && digests.len() == shared.lock().ids().len() || started.elapsed() > Duration::from_secs(20) {
            if !same && recovered {
                history(log).liveness(format!("replicas did not converge: {digests:?}"));
            }
            for (node, applied, digest) in &digests {
                history(log).digest(*node, *applied, *digest);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked: Vec<u64> = history(log).acked.keys().copied().collect();
    let ids = shared.lock().ids();
    for id in ids {
        let Some(state) = shared.lock().state_of(id) else { continue };
        let data = state.data.read().expect("state lock");
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| data.state.check_invariants())) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            history(log).broken(format!("node {id}: {why}"));
        }
        if !recovered {
            continue;
        }
        for task_id in &acked {
            let found = data
                .state
                .task(*task_id)
                .map(|task| (task.state == phalanx_core::TaskState::Succeeded, task.result().map(str::to_string)));
            // Retention (200,000 finished tasks, a day) compacts nothing in a run this short.
            history(log).final_task(*task_id, found);
        }
    }
}
