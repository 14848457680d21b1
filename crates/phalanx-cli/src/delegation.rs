//! `phalanx bench delegation`: delegation trees whose planners are replaced,
//! under leader faults, on a local cluster of real processes, and a checker
//! of what the cluster kept.
//!
//! Roots (queue `plan`, 3 to 5 steps each) are planned by planners that
//! delegate one child per step (queue `research`), wait for them, write a
//! summary into the root's conversation (only if absent) and complete the
//! root with the aggregate of their results. Researchers write their step's
//! note into the same conversation and complete. While the faults run,
//! planners crash mid-delegation and after waiting and writing their
//! summary (they stop, and their lease lapses), some turn zombie (paused
//! past their lease, they carry on as if nothing happened: a refused act
//! ends the attempt as a handler error would), researchers crash, and the
//! leader is killed
//! (SIGKILL, restarted) and paused (SIGSTOP, SIGCONT) in turn. Then the
//! faults stop and the open roots drain.
//!
//! The checker, over the final state and what the agents recorded: each
//! root accepted once; each root's aggregate equal to the accepted results
//! of the children of the accepting attempt; no step run twice (a second
//! child of a step succeeds only if the first did not: an adopted step is
//! never duplicated); conversations holding only entries of accepted or live
//! attempts. Figures: the work wasted on superseded attempts (children, and
//! research runs, for nobody). The same client runs against a build that
//! predates fenced delegation (`PHALANX_SERVER_BIN`), writing its context
//! unfenced there, so that the figures compare.

use crate::bench::BenchArgs;
use crate::launcher::LocalCluster;
use phalanx_agent::client::{Client, Error, LeaseGrant, SubmitRequest, Task, TaskState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PLANNERS: usize = 6;
const RESEARCHERS: usize = 4;
/// Roots open at once: the submitter waits while this many are.
const ROOTS_OPEN_MAX: u64 = 6;
const PLANNER_LEASE_MS: u64 = 1_500;
const RESEARCHER_LEASE_MS: u64 = 1_500;
/// A lease is extended every third of its time-to-live.
const EXTEND_EVERY_MS: u64 = 400;
/// Seconds between two leader faults (a kill, then a pause, and so on).
const FAULT_EVERY_S: u64 = 5;
const FAULT_LENGTH_MS: u64 = 1_500;
/// The drain after the faults: how long open roots get to finish.
const DRAIN_MAX_S: u64 = 30;
/// A planner's chances, per attempt while the faults run.
const CRASH_MID_DELEGATION: f64 = 0.2;
const CRASH_AFTER_WAITING: f64 = 0.1;
const ZOMBIE: f64 = 0.1;
const RESEARCHER_CRASH: f64 = 0.1;

/// What a planner does with one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Normal,
    /// Stops after delegating this many steps.
    CrashMidDelegation(u64),
    /// Stops once every child has finished and it wrote its summary, before it completes.
    CrashAfterWaiting,
    /// Pauses past its lease after this many steps (one past the last:
    /// after waiting), then carries on.
    Zombie(u64),
}

/// One attempt of a planner on a root, as the planner saw it.
#[derive(Clone, Debug)]
struct Attempt {
    root: u64,
    fence: u64,
    fate: Fate,
    /// Children the lease listed (what earlier attempts had delegated).
    listed: usize,
    /// (step, child, adopted) for every delegation the cluster accepted.
    children: Vec<(u64, u64, bool)>,
    /// The result it completed the root with, and whether that was accepted.
    completed: Option<(Value, bool)>,
}

#[derive(Default)]
struct Record {
    attempts: Vec<Attempt>,
    /// Research runs that reported a result: (child, fence, accepted).
    research_runs: Vec<(u64, u64, bool)>,
    /// Root task id -> (root number, steps).
    roots: BTreeMap<u64, (u64, u64)>,
}

#[derive(Default)]
struct Counters {
    zombie_acts_accepted: AtomicU64,
    zombie_acts_refused: AtomicU64,
    summary_conflicts: AtomicU64,
    researcher_crashes: AtomicU64,
    refused_mid_attempt: AtomicU64,
    kills: AtomicU64,
    pauses: AtomicU64,
}

struct Run {
    nodes: Vec<String>,
    seed: u64,
    /// The nodes predate fenced context writes: write unfenced there.
    legacy: bool,
    faults_on: AtomicBool,
    submitting: AtomicBool,
    stop: AtomicBool,
    record: Mutex<Record>,
    counters: Counters,
}

impl Run {
    fn client(&self, name: &str) -> anyhow::Result<Client> {
        Ok(Client::new(self.nodes.clone(), None)?.with_name(name))
    }
}

pub async fn delegation(args: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server_args: Vec<String> = args.server_args.split_whitespace().map(String::from).collect();
    let nodes = args.node_count.max(1);
    let mut cluster = LocalCluster::start(nodes, dir.path(), &server_args).await?;
    let addrs = cluster.addrs();
    let probe = Client::new(addrs.clone(), None)?;
    // A fenced write for a task that does not exist: 404 where writes are
    // fenced, 400 (an unknown field) on a build from before.
    let legacy = matches!(
        probe.context_put_as((0, 0), "probe", "probe", &json!(0), None).await,
        Err(Error::Api { status: 400, .. })
    );
    let server = std::env::var("PHALANX_SERVER_BIN").unwrap_or_else(|_| "this build".into());
    println!(
        "cluster: {nodes} node(s) at {} ({server}{}); {PLANNERS} planners, {RESEARCHERS} researchers, \
         {ROOTS_OPEN_MAX} roots open at once, faults for {} s (seed {})",
        addrs.join(","),
        if legacy { ", context written unfenced: it has no fenced writes" } else { "" },
        args.seconds,
        args.seed
    );
    let run = Arc::new(Run {
        nodes: addrs,
        seed: args.seed,
        legacy,
        faults_on: AtomicBool::new(true),
        submitting: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        record: Mutex::default(),
        counters: Counters::default(),
    });
    let mut workers = Vec::new();
    for index in 0..PLANNERS {
        workers.push(tokio::spawn(planner_loop(run.clone(), index)));
    }
    for index in 0..RESEARCHERS {
        workers.push(tokio::spawn(researcher_loop(run.clone(), index)));
    }
    let submitter = tokio::spawn(submit_loop(run.clone()));
    let started = Instant::now();
    let mut next_fault = started + Duration::from_secs(FAULT_EVERY_S);
    let mut faults = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        if nodes > 1 && Instant::now() >= next_fault {
            if let Some(leader) = cluster.leader().await {
                if faults.is_multiple_of(2) {
                    cluster.kill(leader);
                    run.counters.kills.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(FAULT_LENGTH_MS)).await;
                    cluster.spawn(leader)?;
                } else {
                    cluster.signal(leader, "STOP");
                    run.counters.pauses.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(FAULT_LENGTH_MS)).await;
                    cluster.signal(leader, "CONT");
                }
                faults += 1;
            }
            next_fault = Instant::now() + Duration::from_secs(FAULT_EVERY_S);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The drain: no new roots, no faults; the open roots finish.
    run.faults_on.store(false, Ordering::SeqCst);
    run.submitting.store(false, Ordering::SeqCst);
    let _ = submitter.await;
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let drain = Instant::now();
    let mut open = u64::MAX;
    while drain.elapsed() < Duration::from_secs(DRAIN_MAX_S) {
        open = open_roots(&probe).await.unwrap_or(open);
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the last research runs report, then stop everyone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }
    println!(
        "faults: {} leader kills, {} leader pauses, {} planner attempts refused mid-way, {} researcher crashes; drain {:.1} s",
        run.counters.kills.load(Ordering::Relaxed),
        run.counters.pauses.load(Ordering::Relaxed),
        run.counters.refused_mid_attempt.load(Ordering::Relaxed),
        run.counters.researcher_crashes.load(Ordering::Relaxed),
        drain.elapsed().as_secs_f64()
    );
    let tasks = all_tasks(&probe).await?;
    let mut conversations = BTreeMap::new();
    for task in tasks.iter().filter(|t| t.queue == "plan") {
        if let Some(id) = &task.conversation_id {
            if let Ok(conversation) = probe.context_get(id).await {
                conversations.insert(id.clone(), conversation.entries);
            }
        }
    }
    let record = run.record.lock().expect("record lock");
    let verdict = check(&record, &run.counters, &tasks, &conversations);
    verdict.print();
    if args.check && verdict.violations() > 0 {
        anyhow::bail!("the checker found {} violations", verdict.violations());
    }
    Ok(())
}

/// Roots not finished yet, as the cluster counts them.
async fn open_roots(client: &Client) -> Result<u64, Error> {
    let status = client.status().await?;
    let plan = &status["queues"]["plan"];
    Ok(plan["pending"].as_u64().unwrap_or(0) + plan["leased"].as_u64().unwrap_or(0))
}

/// Every task, page by page.
async fn all_tasks(client: &Client) -> anyhow::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    let mut after = None;
    loop {
        let page = client.list_tasks(None, None, after, Some(1000)).await?;
        let last = page.tasks.last().map(|t| t.id);
        tasks.extend(page.tasks);
        match (page.next_after, last) {
            (Some(next), _) => after = Some(next),
            _ => return Ok(tasks),
        }
    }
}

async fn submit_loop(run: Arc<Run>) {
    let Ok(client) = run.client("submitter") else { return };
    let mut number = 0u64;
    while run.submitting.load(Ordering::SeqCst) {
        match open_roots(&client).await {
            Ok(open) if open < ROOTS_OPEN_MAX => {
                let steps = 3 + number % 3;
                let request = SubmitRequest::new("plan", json!({"root": number, "steps": steps}))
                    .with_idempotency_key(format!("root-{number}"))
                    .with_conversation(format!("tree-{number}"))
                    .with_max_attempts(50);
                if let Ok(submitted) = client.submit(&request).await {
                    run.record.lock().expect("record lock").roots.insert(submitted.task_id, (number, steps));
                    number += 1;
                    continue;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers (again) until the cluster answers; the new epoch.
async fn register(run: &Run, client: &Client, agent_id: &str, queue: &str) -> Option<u64> {
    while !run.stop.load(Ordering::SeqCst) {
        if let Ok(registered) = client.register(agent_id, &[queue.to_string()], 1).await {
            return Some(registered.epoch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Heartbeats for the agent's current epoch until the run stops.
fn heartbeats(run: Arc<Run>, client: Arc<Client>, agent_id: String, epoch: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while !run.stop.load(Ordering::SeqCst) {
            let _ = client.heartbeat(&agent_id, epoch.load(Ordering::SeqCst)).await;
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    });
}

/// Polls one lease at a time for `queue`, registering again when the
/// session is lost, and hands each lease to `work`.
async fn serve<F, Fut>(run: Arc<Run>, agent_id: String, queue: &str, lease_ttl_ms: u64, mut work: F)
where
    F: FnMut(Arc<Client>, LeaseGrant) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Ok(client) = run.client(&agent_id) else { return };
    let client = Arc::new(client);
    let Some(first) = register(&run, &client, &agent_id, queue).await else { return };
    let epoch = Arc::new(AtomicU64::new(first));
    heartbeats(run.clone(), client.clone(), agent_id.clone(), epoch.clone());
    while !run.stop.load(Ordering::SeqCst) {
        let current = epoch.load(Ordering::SeqCst);
        match client.poll(&agent_id, current, 1, 500, lease_ttl_ms).await {
            Ok(grants) => {
                for grant in grants {
                    work(client.clone(), grant).await;
                }
            }
            Err(error) if matches!(error.code(), Some("agent_not_found" | "stale_epoch")) => {
                if let Some(again) = register(&run, &client, &agent_id, queue).await {
                    epoch.store(again, Ordering::SeqCst);
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Extends a lease every `EXTEND_EVERY_MS` until aborted; sets `lost` when
/// the cluster refuses (the lease is gone).
fn extender(
    client: Arc<Client>,
    task_id: u64,
    fence: u64,
    ttl_ms: u64,
    lost: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(EXTEND_EVERY_MS)).await;
            match client.extend(task_id, fence, ttl_ms).await {
                Ok(_) | Err(Error::Api { status: 429 | 503, .. }) => {}
                Err(Error::Api { .. }) => {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                Err(_) => {}
            }
        }
    })
}

async fn planner_loop(run: Arc<Run>, index: usize) {
    let mut rng = StdRng::seed_from_u64(run.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
    let agent_id = format!("planner-{index}");
    let work_run = run.clone();
    serve(run, agent_id, "plan", PLANNER_LEASE_MS, move |client, grant| {
        let steps = grant.task.payload["steps"].as_u64().unwrap_or(3);
        let roll: f64 = rng.gen();
        let fate = if !work_run.faults_on.load(Ordering::SeqCst) {
            Fate::Normal
        } else if roll < CRASH_MID_DELEGATION {
            Fate::CrashMidDelegation(rng.gen_range(0..steps))
        } else if roll < CRASH_MID_DELEGATION + CRASH_AFTER_WAITING {
            Fate::CrashAfterWaiting
        } else if roll < CRASH_MID_DELEGATION + CRASH_AFTER_WAITING + ZOMBIE {
            Fate::Zombie(rng.gen_range(0..=steps + 1))
        } else {
            Fate::Normal
        };
        plan(work_run.clone(), client, grant, fate)
    })
    .await;
}

/// One planner attempt on one root.
async fn plan(run: Arc<Run>, client: Arc<Client>, grant: LeaseGrant, fate: Fate) {
    let root = grant.task.id;
    let fence = grant.fence;
    let steps = grant.task.payload["steps"].as_u64().unwrap_or(3);
    let number = grant.task.payload["root"].as_u64().unwrap_or(0);
    let conversation = grant.task.conversation_id.clone().unwrap_or_default();
    let slot = {
        let mut record = run.record.lock().expect("record lock");
        record.attempts.push(Attempt {
            root,
            fence,
            fate,
            listed: grant.children.len(),
            children: Vec::new(),
            completed: None,
        });
        record.attempts.len() - 1
    };
    let lost = Arc::new(AtomicBool::new(false));
    let mut extending = Some(extender(client.clone(), root, fence, PLANNER_LEASE_MS, lost.clone()));
    let mut zombie = false;
    // Acting after the lease was lost: a zombie's acts are counted.
    let judge = |run: &Run, zombie: bool, accepted: bool| {
        if zombie {
            let counter = if accepted { &run.counters.zombie_acts_accepted } else { &run.counters.zombie_acts_refused };
            counter.fetch_add(1, Ordering::Relaxed);
        } else if !accepted {
            run.counters.refused_mid_attempt.fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut children = Vec::new();
    for step in 0..=steps {
        if fate == Fate::CrashMidDelegation(step) {
            // Crashed: it stops, and its lease lapses.
            if let Some(handle) = extending.take() {
                handle.abort();
            }
            return;
        }
        if fate == Fate::Zombie(step) {
            // Paused past its lease (a GC pause, a stopped VM), it carries on.
            if let Some(handle) = extending.take() {
                handle.abort();
            }
            tokio::time::sleep(Duration::from_millis(PLANNER_LEASE_MS + 1_500)).await;
            zombie = true;
        }
        if step == steps {
            break;
        }
        let request = SubmitRequest::new("research", json!({"root": number, "step": step}))
            .with_parent(root, fence)
            .with_idempotency_key(format!("child-{root}-{fence}-{step}"))
            .with_max_attempts(20);
        match client.submit(&request).await {
            Ok(submitted) => {
                judge(&run, zombie, true);
                children.push((step, submitted.task_id, submitted.adopted));
                run.record.lock().expect("record lock").attempts[slot].children = children.clone();
            }
            Err(error) => {
                judge(&run, zombie, false);
                give_up(&client, root, fence, &error, extending).await;
                return;
            }
        }
    }
    // Wait for the children (declared to the cluster, then read).
    let ids: Vec<u64> = children.iter().map(|(_, id, _)| *id).collect();
    if let Err(error) = client.wait(root, fence, &ids, 60_000).await {
        judge(&run, zombie, false);
        give_up(&client, root, fence, &error, extending).await;
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        if run.stop.load(Ordering::SeqCst) || Instant::now() > deadline || (lost.load(Ordering::SeqCst) && !zombie) {
            if let Some(handle) = extending.take() {
                handle.abort();
            }
            return;
        }
        let mut finished = Vec::new();
        for id in &ids {
            match client.get_task(*id, false).await {
                Ok(task) if task.state.is_terminal() => finished.push(task),
                _ => break,
            }
        }
        if finished.len() == ids.len() {
            break finished;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if fate == Fate::Zombie(steps + 1) {
        if let Some(handle) = extending.take() {
            handle.abort();
        }
        tokio::time::sleep(Duration::from_millis(PLANNER_LEASE_MS + 1_500)).await;
        zombie = true;
    }
    if let Some(failed) = finished.iter().find(|task| task.state != TaskState::Succeeded) {
        let error = Error::Decode(format!("child {} ended {:?}", failed.id, failed.state));
        give_up(&client, root, fence, &error, extending).await;
        return;
    }
    let sum: u64 =
        finished.iter().map(|task| task.result.as_ref().map_or(0, |r| r["value"].as_u64().unwrap_or(0))).sum();
    let summary = json!({"task": root, "fence": fence, "sum": sum});
    let written = if run.legacy {
        client.context_put(&conversation, "summary", &summary, Some(0)).await
    } else {
        client.context_put_as((root, fence), &conversation, "summary", &summary, Some(0)).await
    };
    match written {
        Ok(_) => judge(&run, zombie, true),
        // An earlier attempt's summary stands in the way.
        Err(error) if error.code() == Some("version_conflict") => {
            run.counters.summary_conflicts.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            judge(&run, zombie, false);
            give_up(&client, root, fence, &error, extending).await;
            return;
        }
    }
    if fate == Fate::CrashAfterWaiting {
        if let Some(handle) = extending.take() {
            handle.abort();
        }
        return;
    }
    let result = json!({"children": ids, "sum": sum, "fence": fence});
    let answer = client.complete(root, fence, &result).await;
    judge(&run, zombie, answer.is_ok());
    run.record.lock().expect("record lock").attempts[slot].completed = Some((result, answer.is_ok()));
    if let Some(handle) = extending {
        handle.abort();
    }
}

/// A refused act ends the attempt as a handler error would in the SDK: a
/// retryable failure reported under the attempt's fence.
async fn give_up(
    client: &Client,
    root: u64,
    fence: u64,
    error: &Error,
    extending: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(handle) = extending {
        handle.abort();
    }
    let _ = client.fail(root, fence, &format!("planner gave up: {error}"), true).await;
}

async fn researcher_loop(run: Arc<Run>, index: usize) {
    let rng =
        Arc::new(Mutex::new(StdRng::seed_from_u64(run.seed.wrapping_mul(7_919).wrapping_add(1_000 + index as u64))));
    let agent_id = format!("researcher-{index}");
    let work_run = run.clone();
    serve(run, agent_id, "research", RESEARCHER_LEASE_MS, move |client, grant| {
        research(work_run.clone(), client, grant, rng.clone())
    })
    .await;
}

/// The value a research step answers: what the aggregate must add up.
fn step_value(number: u64, step: u64) -> u64 {
    number * 100 + step + 1
}

async fn research(run: Arc<Run>, client: Arc<Client>, grant: LeaseGrant, rng: Arc<Mutex<StdRng>>) {
    let id = grant.task.id;
    let fence = grant.fence;
    let number = grant.task.payload["root"].as_u64().unwrap_or(0);
    let step = grant.task.payload["step"].as_u64().unwrap_or(0);
    let (crash, work_ms) = {
        let mut rng = rng.lock().expect("rng lock");
        (run.faults_on.load(Ordering::SeqCst) && rng.gen_bool(RESEARCHER_CRASH), rng.gen_range(50..250))
    };
    if crash {
        run.counters.researcher_crashes.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let lost = Arc::new(AtomicBool::new(false));
    let extending = extender(client.clone(), id, fence, RESEARCHER_LEASE_MS, lost);
    let value = step_value(number, step);
    let conversation = grant.task.conversation_id.clone().unwrap_or_default();
    let note = json!({"task": id, "fence": fence, "value": value});
    let key = format!("step-{step}");
    let written = if run.legacy {
        client.context_put(&conversation, &key, &note, None).await
    } else {
        client.context_put_as((id, fence), &conversation, &key, &note, None).await
    };
    if let Err(error) = written {
        extending.abort();
        let _ = client.fail(id, fence, &format!("researcher gave up: {error}"), true).await;
        return;
    }
    tokio::time::sleep(Duration::from_millis(work_ms)).await;
    let answer = client.complete(id, fence, &json!({"value": value})).await;
    extending.abort();
    run.record.lock().expect("record lock").research_runs.push((id, fence, answer.is_ok()));
}

/// What the checker found, and the figures.
#[derive(Default)]
struct Verdict {
    roots: u64,
    roots_succeeded: u64,
    roots_unfinished: u64,
    attempts: u64,
    attempts_by_fate: BTreeMap<&'static str, u64>,
    attempts_handed_children: u64,
    adopted: u64,
    children: u64,
    children_needed: u64,
    children_cancelled: u64,
    children_for_nobody: u64,
    research_runs: u64,
    research_runs_for_nobody: u64,
    entries: u64,
    zombie_acts_accepted: u64,
    zombie_acts_refused: u64,
    summary_conflicts: u64,
    /// Check name -> the first few violations (and their count).
    violations: BTreeMap<&'static str, (u64, Vec<String>)>,
}

impl Verdict {
    fn violate(&mut self, check: &'static str, what: String) {
        let entry = self.violations.entry(check).or_default();
        entry.0 += 1;
        if entry.1.len() < 5 {
            entry.1.push(what);
        }
    }

    fn violations(&self) -> u64 {
        self.violations.values().map(|(count, _)| count).sum()
    }

    fn print(&self) {
        let fates: Vec<String> = self.attempts_by_fate.iter().map(|(fate, n)| format!("{n} {fate}")).collect();
        println!(
            "roots: {} submitted, {} succeeded, {} unfinished; planner attempts: {} ({}), {} handed children of an earlier attempt, {} children adopted",
            self.roots,
            self.roots_succeeded,
            self.roots_unfinished,
            self.attempts,
            fates.join(", "),
            self.attempts_handed_children,
            self.adopted
        );
        println!(
            "children: {} created for {} steps of the roots; {} cancelled; {} ran for nobody (succeeded, in no accepted aggregate)",
            self.children, self.children_needed, self.children_cancelled, self.children_for_nobody
        );
        let share = if self.research_runs == 0 {
            0.0
        } else {
            100.0 * self.research_runs_for_nobody as f64 / self.research_runs as f64
        };
        println!(
            "research runs: {} reported, {} accepted for children in no accepted aggregate ({share:.1}% of the work wasted on superseded attempts)",
            self.research_runs, self.research_runs_for_nobody
        );
        println!(
            "zombie acts: {} accepted, {} refused; summaries refused by an earlier attempt's entry: {}; conversation entries checked: {}",
            self.zombie_acts_accepted, self.zombie_acts_refused, self.summary_conflicts, self.entries
        );
        for (check, (count, examples)) in &self.violations {
            println!("VIOLATION {check}: {count}");
            for example in examples {
                println!("  {example}");
            }
        }
        println!("violations: {}", self.violations());
    }
}

fn check(
    record: &Record,
    counters: &Counters,
    tasks: &[Task],
    conversations: &BTreeMap<String, BTreeMap<String, phalanx_agent::ContextEntry>>,
) -> Verdict {
    let mut verdict = Verdict {
        zombie_acts_accepted: counters.zombie_acts_accepted.load(Ordering::Relaxed),
        zombie_acts_refused: counters.zombie_acts_refused.load(Ordering::Relaxed),
        summary_conflicts: counters.summary_conflicts.load(Ordering::Relaxed),
        ..Verdict::default()
    };
    let by_id: BTreeMap<u64, &Task> = tasks.iter().map(|t| (t.id, t)).collect();
    let roots: Vec<&Task> = tasks.iter().filter(|t| t.queue == "plan").collect();
    let research: Vec<&Task> = tasks.iter().filter(|t| t.queue == "research").collect();
    verdict.roots = roots.len() as u64;
    verdict.attempts = record.attempts.len() as u64;
    for attempt in &record.attempts {
        let fate = match attempt.fate {
            Fate::Normal => "normal",
            Fate::CrashMidDelegation(_) => "crashed mid-delegation",
            Fate::CrashAfterWaiting => "crashed after waiting",
            Fate::Zombie(_) => "zombie",
        };
        *verdict.attempts_by_fate.entry(fate).or_default() += 1;
        verdict.attempts_handed_children += (attempt.listed > 0) as u64;
        verdict.adopted += attempt.children.iter().filter(|(_, _, adopted)| *adopted).count() as u64;
    }
    // The accepted aggregates: root -> the children of its accepting attempt.
    let mut aggregated: BTreeSet<u64> = BTreeSet::new();
    for root in &roots {
        if root.state != TaskState::Succeeded {
            verdict.roots_unfinished += 1;
            if root.state.is_terminal() {
                verdict.violate("each root accepted once", format!("root {} ended {:?}", root.id, root.state));
            }
            continue;
        }
        verdict.roots_succeeded += 1;
        let steps = record.roots.get(&root.id).map_or(0, |(_, steps)| *steps);
        verdict.children_needed += steps;
        // (1) Accepted once: the root holds the result of the attempt under
        // its last fence (whose complete may have been answered or not: a
        // leader killed mid-request leaves the outcome unknown), and no
        // other attempt was told its result was accepted.
        let result = root.result.clone().unwrap_or(Value::Null);
        let attempt = record.attempts.iter().find(|a| {
            a.root == root.id && a.fence == root.last_fence && a.completed.as_ref().is_some_and(|(r, _)| *r == result)
        });
        let told: BTreeSet<u64> = record
            .attempts
            .iter()
            .filter(|a| a.root == root.id && a.completed.as_ref().is_some_and(|(_, ok)| *ok))
            .map(|a| a.fence)
            .collect();
        let Some(attempt) = attempt else {
            verdict.violate(
                "each root accepted once",
                format!(
                    "root {} holds {result} under fence {}, which no attempt completed with",
                    root.id, root.last_fence
                ),
            );
            continue;
        };
        if told.iter().any(|fence| *fence != attempt.fence) {
            verdict.violate(
                "each root accepted once",
                format!("root {}: results accepted under fences {told:?}", root.id),
            );
        }
        // (2) The aggregate is the accepted results of that attempt's children.
        let ids: Vec<u64> = attempt.children.iter().map(|(_, id, _)| *id).collect();
        let mut sum = 0;
        let mut whole = ids.len() as u64 == steps;
        for id in &ids {
            aggregated.insert(*id);
            match by_id.get(id) {
                Some(child) if child.state == TaskState::Succeeded && child.parent_id == Some(root.id) => {
                    sum += child.result.as_ref().map_or(0, |r| r["value"].as_u64().unwrap_or(0));
                }
                other => {
                    whole = false;
                    verdict.violate(
                        "aggregate = accepted results of the accepting attempt's children",
                        format!("root {}: child {id} is {:?}", root.id, other.map(|c| (c.state, c.parent_id))),
                    );
                }
            }
        }
        if result["sum"] != json!(sum) || result["children"] != json!(ids) || !whole {
            verdict.violate(
                "aggregate = accepted results of the accepting attempt's children",
                format!("root {}: result {result}, children {ids:?} add up to {sum}", root.id),
            );
        }
    }
    // (3) No step ran twice: per (root, step), at most one child succeeded.
    let mut succeeded_per_step: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    for child in &research {
        verdict.children += 1;
        if child.state == TaskState::Cancelled {
            verdict.children_cancelled += 1;
        }
        if child.state == TaskState::Succeeded {
            let step = (child.parent_id.unwrap_or(0), child.payload["step"].as_u64().unwrap_or(0));
            succeeded_per_step.entry(step).or_default().push(child.id);
            if !aggregated.contains(&child.id) {
                verdict.children_for_nobody += 1;
            }
        }
    }
    for ((root, step), ids) in &succeeded_per_step {
        if ids.len() > 1 {
            verdict.violate("no step ran twice", format!("root {root} step {step}: children {ids:?} all succeeded"));
        }
    }
    for (id, _, accepted) in &record.research_runs {
        if *accepted {
            verdict.research_runs += 1;
            verdict.research_runs_for_nobody += !aggregated.contains(id) as u64;
        }
    }
    // (4) Conversations hold only entries of accepted or live attempts.
    for (conversation, entries) in conversations {
        for (key, entry) in entries {
            verdict.entries += 1;
            let (Some(task_id), Some(fence)) = (entry.value["task"].as_u64(), entry.value["fence"].as_u64()) else {
                continue;
            };
            let ok = by_id.get(&task_id).is_some_and(|task| match task.state {
                TaskState::Succeeded | TaskState::Failed => task.last_fence == fence,
                TaskState::Leased => task.lease.as_ref().is_some_and(|lease| lease.fence == fence),
                _ => false,
            });
            if !ok {
                let state = by_id.get(&task_id).map(|t| (t.state, t.last_fence));
                verdict.violate(
                    "conversations hold only accepted or live attempts' entries",
                    format!("{conversation}/{key}: written by task {task_id} under fence {fence}, now {state:?}"),
                );
            }
        }
    }
    verdict
}
