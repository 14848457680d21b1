//! `phalanx task ...`, `phalanx status`, `phalanx cluster ...` and
//! `phalanx config ...`: thin commands over the client of `phalanx-agent`.
//!
//! Each prints text for people by default (an id, a table, a short summary)
//! and, with the global `--json`, the cluster's answers as JSON for scripts.
//! What the cluster does is left to the cluster; only reading the answers
//! and laying them out lives here.

use crate::Connect;
use anyhow::Context;
use clap::Subcommand;
use phalanx_agent::client::{
    Budget, Client, KeyLimits, KeyStatus, Outcome, ReplayRequest, SubmitRequest, Task, TaskState,
};
use serde_json::Value;
use std::time::Duration;

/// The highest task priority the cluster accepts (0 is the lowest).
const PRIORITY_MAX: u8 = 9;
/// Tasks one list answer holds at most (docs/api.md, `GET /v1/tasks`).
const LIST_LIMIT_MAX: u64 = 1000;
/// How long `status` waits for one node's answer before calling it down.
const STATUS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `cluster add` keeps asking while the new node does not answer
/// yet (it was started a moment before).
const MEMBER_START_WAIT: Duration = Duration::from_secs(5);
/// How often `status --wait` and `cluster add` ask again.
const STATUS_WAIT_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Submit one task; prints its id. Without `--idempotency-key` a key is
    /// generated, so the retries after an unknown outcome create one task.
    Submit {
        /// The queue (capability) of the agents that should do the task.
        #[arg(long)]
        queue: String,
        /// The task's input as JSON, e.g. '{"text": "hi"}'. Text that does
        /// not start like JSON ({, [ or ") is sent as a JSON string.
        #[arg(long, default_value = "null", conflicts_with = "payload_text")]
        payload: String,
        /// The task's input as plain text, sent as a JSON string as it is.
        #[arg(long)]
        payload_text: Option<String>,
        /// 0 (lowest) to 9 (highest); higher priorities are leased first and
        /// shed last under overload (the cluster's default is 5).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=PRIORITY_MAX as i64))]
        priority: Option<u8>,
        /// Submitting again with the same key answers the first task
        /// instead of creating another (generated when left out).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Relative deadline in milliseconds: past it the task is
        /// dead-lettered (`expired`) instead of run.
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Leases the task may have in all before it fails for good (the
        /// cluster's default when left out).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// The flow-control key its limits are counted under (`phalanx limits`),
        /// e.g. `tenant:acme` or `openai:key-1`.
        #[arg(long)]
        concurrency_key: Option<String>,
        /// Tokens the task is expected to use, counted against its key's
        /// `tokens_per_minute` while it is leased.
        #[arg(long)]
        cost_estimate: Option<u64>,
        /// For a root task: the tokens its whole delegation tree may use;
        /// the tree is paused when its reported usage reaches them.
        #[arg(long)]
        budget_tokens: Option<u64>,
        /// For a root task: the cost its whole delegation tree may use (in
        /// the fleet's unit); the tree is paused when reached.
        #[arg(long)]
        budget_cost: Option<u64>,
    },
    /// Show one task.
    Get {
        /// The task's id, as `task submit` printed it.
        id: u64,
    },
    /// List tasks in id order, optionally by queue and state.
    List {
        /// Only the tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only the tasks in this state.
        #[arg(long, value_parser = ["pending", "leased", "succeeded", "failed", "cancelled", "dead", "paused"])]
        state: Option<String>,
        /// Tasks listed at most (1 to 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=LIST_LIMIT_MAX))]
        limit: u64,
        /// List from the first task after this id (where a cut list says to continue).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Cancel a task that has not finished.
    Cancel {
        /// The task's id.
        id: u64,
    },
    /// Pause a task: a pending one at once, a leased one when its lease
    /// ends without a result.
    Pause {
        /// The task's id.
        id: u64,
    },
    /// Make a paused task pending again.
    Resume {
        /// The task's id.
        id: u64,
    },
    /// Move dead or paused tasks back to pending, oldest first (trail kept,
    /// attempts counted anew); prints the ids moved.
    Replay {
        /// Which tasks: `dead` or `paused`.
        #[arg(long, value_parser = ["dead", "paused"])]
        state: String,
        /// Only the tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only the tasks of this concurrency key.
        #[arg(long = "key")]
        concurrency_key: Option<String>,
        /// Only tasks that reached their state at or after this log time (ms).
        #[arg(long)]
        since_ms: Option<u64>,
        /// Tasks moved at most (1 to the policy's `batch_tasks_max`).
        #[arg(long)]
        limit: u32,
    },
    /// Set or remove a root task's budget for its delegation tree; a tree
    /// paused by its budget resumes when the new one is not reached.
    Budget {
        /// The root task's id.
        id: u64,
        /// Tokens the tree may use.
        #[arg(long)]
        tokens: Option<u64>,
        /// Cost the tree may use.
        #[arg(long)]
        cost: Option<u64>,
        /// Remove the budget (the tree may use anything).
        #[arg(long, conflicts_with_all = ["tokens", "cost"])]
        clear: bool,
    },
}

#[derive(Subcommand)]
pub enum LimitsCommand {
    /// List the limits table and every concurrency key in use.
    List,
    /// Show the limits in force for a key and what it uses now.
    Get {
        /// A concurrency key, or a table entry such as `tenant:*`.
        key: String,
    },
    /// Set the limits of a key, a wildcard (`tenant:*`, each matching key
    /// separately) or `*`, replacing its entry:
    /// `phalanx limits set 'tenant:*' concurrency_max=4 rate_per_second=2.5 weight=1`.
    Set {
        /// A concurrency key, a prefix followed by `*`, or `*`.
        key: String,
        /// FIELD=VALUE pairs: concurrency_max, rate_per_second (a decimal),
        /// burst, weight, tokens_per_minute.
        #[arg(required = true)]
        assignments: Vec<String>,
    },
    /// Delete an entry of the limits table.
    Delete {
        /// The entry's key, as `limits list` shows it.
        key: String,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Add a node (learner first, then voter). Start the node first, with
    /// `--peers` naming the cluster and itself. Node ids are never reused.
    Add {
        /// The new node's id (its `phalanx server --node-id`).
        #[arg(long)]
        node_id: u64,
        /// The node's client address.
        #[arg(long)]
        addr: String,
        /// The node's Raft address, when it has a separate `--raft-listen`.
        #[arg(long)]
        raft_addr: Option<String>,
    },
    /// Remove a voter or a learner (its id can never be used again).
    Remove {
        /// The id of the node to remove.
        #[arg(long)]
        node_id: u64,
    },
}

pub fn client(connect: &Connect) -> anyhow::Result<Client> {
    let client = Client::new(connect.node_list()?, connect.token.clone()).context("building the client")?;
    match &connect.ca_file {
        Some(path) => client.with_ca_file(path).context("--ca-file (PHALANX_CA_FILE)"),
        None => Ok(client),
    }
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON prints"));
}

/// What `--payload` or `--payload-text` asks to send. Text that starts like
/// JSON but does not parse is refused: sending it as a string would store
/// a typo without a word.
pub fn payload_of(payload: &str, payload_text: Option<String>) -> anyhow::Result<Value> {
    if let Some(text) = payload_text {
        return Ok(Value::String(text));
    }
    match serde_json::from_str(payload) {
        Ok(value) => Ok(value),
        Err(error) if payload.trim_start().starts_with(['{', '[', '"']) => Err(anyhow::anyhow!(
            "--payload is not valid JSON: {error}\n(to send text as it is, use --payload-text instead)"
        )),
        Err(_) => Ok(Value::String(payload.to_string())),
    }
}

pub async fn run_task(connect: &Connect, command: TaskCommand, json: bool) -> anyhow::Result<()> {
    // Parsed before the client is built: a malformed payload is the user's
    // to fix, whether or not a node answers.
    let payload = match &command {
        TaskCommand::Submit { payload, payload_text, .. } => Some(payload_of(payload, payload_text.clone())?),
        _ => None,
    };
    let client = client(connect)?;
    match command {
        TaskCommand::Submit {
            queue,
            priority,
            idempotency_key,
            deadline_ms,
            max_attempts,
            concurrency_key,
            cost_estimate,
            budget_tokens,
            budget_cost,
            ..
        } => {
            let mut request = SubmitRequest::new(queue, payload.expect("parsed above"));
            request.priority = priority.or(request.priority);
            // A key of our own, so that a retry after an unknown outcome
            // (ours, or the user's with the key we print) creates one task.
            let key = idempotency_key.unwrap_or_else(phalanx_agent::client::generated_idempotency_key);
            request.idempotency_key = Some(key.clone());
            request.deadline_ms = deadline_ms;
            request.max_attempts = max_attempts.or(request.max_attempts);
            request.concurrency_key = concurrency_key;
            request.cost_estimate = cost_estimate;
            if budget_tokens.is_some() || budget_cost.is_some() {
                request.budget = Some(Budget { tokens_max: budget_tokens, cost_max: budget_cost });
            }
            let submitted = client.submit(&request).await.map_err(|error| match error.outcome() {
                Outcome::Unknown => anyhow::anyhow!(
                    "{error}; the task may exist: repeat with --idempotency-key {key} to submit it at most once"
                ),
                Outcome::NotDone => anyhow::anyhow!("{error}; nothing was done"),
            })?;
            if json {
                print_json(&serde_json::to_value(submitted)?);
            } else {
                println!("{}", submitted.task_id);
                if submitted.deduplicated {
                    eprintln!("(deduplicated: task {} already existed with this idempotency key)", submitted.task_id);
                }
            }
        }
        TaskCommand::Get { id } => {
            let task = client.get_task(id, false).await?;
            if json {
                print_json(&serde_json::to_value(task)?);
            } else {
                print!("{}", task_text(&task, now_ms()));
            }
        }
        TaskCommand::List { queue, state, limit, after } => {
            let page = client.list_tasks(queue.as_deref(), state.as_deref(), after, Some(limit as usize)).await?;
            if json {
                print_json(&serde_json::to_value(page)?);
            } else {
                print!("{}", task_table(&page.tasks, now_ms()));
                if let Some(next) = page.next_after {
                    eprintln!("(more tasks: continue with --after {next})");
                }
            }
        }
        TaskCommand::Cancel { id } => {
            let task = client.cancel(id).await?;
            if json {
                print_json(&serde_json::to_value(task)?);
            } else {
                println!("task {id}: {}", state_name(&task));
            }
        }
        TaskCommand::Pause { id } | TaskCommand::Resume { id } => {
            let task = if matches!(command, TaskCommand::Pause { .. }) {
                client.pause(id).await?
            } else {
                client.resume(id).await?
            };
            if json {
                print_json(&serde_json::to_value(task)?);
            } else {
                let pending_pause = task.state == TaskState::Leased && task.pause.is_some();
                let note = if pending_pause { " (paused when its lease ends)" } else { "" };
                println!("task {id}: {}{note}", state_name(&task));
            }
        }
        TaskCommand::Replay { state, queue, concurrency_key, since_ms, limit } => {
            let state = TaskState::parse(&state).expect("clap allows dead or paused only");
            let request = ReplayRequest { queue, state, concurrency_key, since_ms, limit };
            let task_ids = client.replay(&request).await?;
            if json {
                print_json(&serde_json::json!({ "task_ids": task_ids }));
            } else if task_ids.is_empty() {
                println!("no task replayed");
            } else {
                let ids: Vec<String> = task_ids.iter().map(u64::to_string).collect();
                println!("replayed {} tasks: {}", task_ids.len(), ids.join(" "));
            }
        }
        TaskCommand::Budget { id, tokens, cost, clear } => {
            anyhow::ensure!(clear || tokens.is_some() || cost.is_some(), "give --tokens, --cost or --clear");
            let budget = (!clear).then_some(Budget { tokens_max: tokens, cost_max: cost });
            let resumed = client.set_budget(id, budget).await?;
            if json {
                print_json(&serde_json::json!({ "resumed": resumed }));
            } else if resumed.is_empty() {
                println!("task {id}: budget set");
            } else {
                println!("task {id}: budget set; {} paused tasks resumed", resumed.len());
            }
        }
    }
    Ok(())
}

/// `FIELD=VALUE` pairs of `limits set` as the limits they name; an unknown
/// field or a value that is not a number is the user's to fix.
pub fn key_limits_of(assignments: &[String]) -> anyhow::Result<KeyLimits> {
    let mut limits = KeyLimits::default();
    for assignment in assignments {
        let (field, value) = assignment
            .split_once('=')
            .with_context(|| format!("{assignment:?} is not FIELD=VALUE (e.g. concurrency_max=4)"))?;
        let (field, value) = (field.trim(), value.trim());
        let whole = || value.parse::<u64>().with_context(|| format!("{field}: {value:?} is not a whole number"));
        let small = || -> anyhow::Result<u32> {
            u32::try_from(whole()?).with_context(|| format!("{field}: {value} is too large"))
        };
        match field {
            "concurrency_max" => limits.concurrency_max = Some(small()?),
            "rate_per_second" => {
                limits.rate_per_second =
                    Some(value.parse().with_context(|| format!("rate_per_second: {value:?} is not a number"))?)
            }
            "burst" => limits.burst = Some(small()?),
            "weight" => limits.weight = Some(small()?),
            "tokens_per_minute" => limits.tokens_per_minute = Some(whole()?),
            other => anyhow::bail!(
                "unknown field {other:?}: use concurrency_max, rate_per_second, burst, weight or tokens_per_minute"
            ),
        }
    }
    Ok(limits)
}

/// One rule's limits in a line: `concurrency_max=4 rate_per_second=2.5`.
fn limits_text(limits: &KeyLimits) -> String {
    let mut parts = Vec::new();
    if let Some(value) = limits.concurrency_max {
        parts.push(format!("concurrency_max={value}"));
    }
    if let Some(value) = limits.rate_per_second {
        parts.push(format!("rate_per_second={value}"));
    }
    if let Some(value) = limits.burst {
        parts.push(format!("burst={value}"));
    }
    if let Some(value) = limits.weight {
        parts.push(format!("weight={value}"));
    }
    if let Some(value) = limits.tokens_per_minute {
        parts.push(format!("tokens_per_minute={value}"));
    }
    if parts.is_empty() {
        "(no limit)".into()
    } else {
        parts.join(" ")
    }
}

/// What each key holds and uses, one line per key.
fn key_table(keys: &[KeyStatus]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|key| {
            let limit = key.limits.as_ref().and_then(|l| l.concurrency_max).map_or("-".into(), |max| max.to_string());
            vec![
                key.key.clone(),
                key.rule.clone().unwrap_or_else(|| "-".into()),
                format!("{}/{limit}", key.held),
                key.open_tasks.to_string(),
                key.rate_tokens_left.map_or("-".into(), |left| left.to_string()),
                key.tokens_in_window.to_string(),
            ]
        })
        .collect();
    table(&["KEY", "RULE", "HELD/MAX", "OPEN", "RATE LEFT", "TOKENS/MIN"], &rows)
}

pub async fn run_limits(connect: &Connect, command: LimitsCommand, json: bool) -> anyhow::Result<()> {
    // Parsed before the client is built, as a payload is.
    let limits = match &command {
        LimitsCommand::Set { assignments, .. } => Some(key_limits_of(assignments)?),
        _ => None,
    };
    let client = client(connect)?;
    match command {
        LimitsCommand::List => {
            let table_answer = client.limits().await?;
            if json {
                print_json(&serde_json::to_value(table_answer)?);
                return Ok(());
            }
            if table_answer.rules.is_empty() {
                println!("no limits set");
            } else {
                let rows: Vec<Vec<String>> =
                    table_answer.rules.iter().map(|rule| vec![rule.key.clone(), limits_text(&rule.limits)]).collect();
                print!("{}", table(&["RULE", "LIMITS"], &rows));
            }
            if !table_answer.keys.is_empty() {
                println!();
                print!("{}", key_table(&table_answer.keys));
            }
        }
        LimitsCommand::Get { key } => {
            let status = client.key_limits(&key).await?;
            if json {
                print_json(&serde_json::to_value(status)?);
                return Ok(());
            }
            match (&status.rule, &status.limits) {
                (Some(rule), Some(limits)) => println!("{key}: {} (from rule {rule})", limits_text(limits)),
                _ => println!("{key}: no limits apply"),
            }
            print!("{}", key_table(std::slice::from_ref(&status)));
        }
        LimitsCommand::Set { key, .. } => {
            let rule = client.set_key_limits(&key, &limits.expect("parsed above")).await?;
            if json {
                print_json(&serde_json::to_value(rule)?);
            } else {
                println!("{}: {}", rule.key, limits_text(&rule.limits));
            }
        }
        LimitsCommand::Delete { key } => {
            client.delete_key_limits(&key).await?;
            if json {
                print_json(&serde_json::json!({ "ok": true }));
            } else {
                println!("{key}: deleted");
            }
        }
    }
    Ok(())
}

/// The task's state as the API names it (`pending`, `leased`, ...).
fn state_name(task: &Task) -> String {
    serde_json::to_value(task.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A span of time in the unit a person would use: `850 ms`, `4.2 s`,
/// `12 min`, `3 h 5 min`, `2 d`.
pub fn duration_text(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        3_600_000..86_400_000 => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

/// Rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// `task list`: one line per task.
pub fn task_table(tasks: &[Task], now_ms: u64) -> String {
    if tasks.is_empty() {
        return "no tasks\n".to_string();
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|task| {
            vec![
                task.id.to_string(),
                task.queue.clone(),
                state_name(task),
                task.priority.to_string(),
                format!("{}/{}", task.attempts, task.max_attempts),
                duration_text(now_ms.saturating_sub(task.created_ms)),
                task.lease.as_ref().map(|lease| lease.agent_id.clone()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["ID", "QUEUE", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "AGENT"], &rows)
}

/// `task get`: the fields a person asks about, one per line.
pub fn task_text(task: &Task, now_ms: u64) -> String {
    let compact = |value: &Value| serde_json::to_string(value).expect("JSON prints");
    let mut lines = vec![
        ("task", task.id.to_string()),
        ("queue", task.queue.clone()),
        ("state", state_name(task)),
        ("priority", task.priority.to_string()),
        ("attempts", format!("{} of {}", task.attempts, task.max_attempts)),
        ("age", duration_text(now_ms.saturating_sub(task.created_ms))),
    ];
    if let Some(lease) = &task.lease {
        lines.push(("agent", format!("{} (fence {})", lease.agent_id, lease.fence)));
    }
    if let Some(parent) = task.parent_id {
        lines.push(("parent", parent.to_string()));
    }
    if let Some(conversation) = &task.conversation_id {
        lines.push(("conversation", conversation.clone()));
    }
    lines.push(("payload", compact(&task.payload)));
    if let Some(result) = &task.result {
        lines.push(("result", compact(result)));
    }
    if let Some(error) = &task.error {
        lines.push(("error", error.clone()));
    }
    if let Some(reason) = &task.dead_reason {
        lines.push(("dead because", reason.clone()));
    }
    if let Some(key) = &task.concurrency_key {
        lines.push(("key", key.clone()));
    }
    if let Some(waiting) = &task.waiting_on {
        lines.push(("waiting on", format!("{} of key {} (rule {})", waiting.limit, waiting.key, waiting.rule)));
    }
    if let Some(pause) = &task.pause {
        let cause = serde_json::to_value(pause.cause).ok().and_then(|v| v.as_str().map(str::to_string));
        lines.push(("paused", format!("{} ({})", pause.reason, cause.unwrap_or_default())));
    }
    if let Some(estimate) = task.cost_estimate {
        lines.push(("estimate", format!("{estimate} tokens")));
    }
    if task.usage != Default::default() {
        let usage = &task.usage;
        lines.push(("usage", format!("{} tokens in, {} out, cost {}", usage.tokens_in, usage.tokens_out, usage.cost)));
    }
    if let Some(budget) = &task.budget {
        let tokens = budget.tokens_max.map_or("-".into(), |max| max.to_string());
        let cost = budget.cost_max.map_or("-".into(), |max| max.to_string());
        lines.push(("tree budget", format!("tokens {tokens}, cost {cost}")));
    }
    lines.iter().map(|(name, value)| format!("{:<13}{value}\n", format!("{name}:"))).collect()
}

pub async fn run_cluster(connect: &Connect, command: ClusterCommand, json: bool) -> anyhow::Result<()> {
    let client = client(connect)?;
    let (answer, done) = match command {
        ClusterCommand::Add { node_id, addr, raft_addr } => {
            // A node started a moment ago may not answer yet; the refusal
            // changed nothing, so asking again is safe.
            let deadline = std::time::Instant::now() + MEMBER_START_WAIT;
            let answer = loop {
                match client.add_member(node_id, &addr, raft_addr.as_deref()).await {
                    Err(error)
                        if error.code() == Some("member_unreachable") && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(STATUS_WAIT_INTERVAL).await
                    }
                    answer => break answer?,
                }
            };
            (answer, format!("node {node_id} ({addr}) added: a voter now"))
        }
        ClusterCommand::Remove { node_id } => {
            (client.remove_member(node_id).await?, format!("node {node_id} removed from the cluster"))
        }
    };
    if json {
        print_json(&answer);
    } else {
        println!("{done}");
    }
    Ok(())
}

/// One node as `status` saw it.
enum Health {
    Ready,
    NotReady(String),
    Down(String),
}

/// How `status` asks each member on its own: members are listed as
/// `host:port`, spoken to in the scheme of `--nodes` (a cluster is all TLS
/// or none), verified by `--ca-file` when given.
struct Probes {
    client: reqwest::Client,
    scheme: &'static str,
}

impl Probes {
    fn new(connect: &Connect) -> anyhow::Result<Probes> {
        let tls = connect.node_list()?.iter().any(|node| node.starts_with("https://"));
        let mut builder = reqwest::Client::builder().use_rustls_tls().timeout(STATUS_PROBE_TIMEOUT);
        if let Some(path) = &connect.ca_file {
            let pem = std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?;
            builder = builder.tls_built_in_root_certs(false);
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca-file {}: not PEM certificates", path.display()))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        Ok(Probes { client: builder.build()?, scheme: if tls { "https" } else { "http" } })
    }
}

/// Asks one node whether it is ready (`GET /health/ready`), once: failing
/// over would answer for another node.
async fn probe(http: &Probes, token: Option<&str>, addr: &str) -> Health {
    let mut request = http.client.get(format!("{}://{addr}/health/ready", http.scheme));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => Health::Ready,
        Ok(response) => {
            let status = response.status();
            let body: Value = response.json().await.unwrap_or_default();
            match body["error"]["message"].as_str() {
                Some(reasons) if body["error"]["code"] == "not_ready" => Health::NotReady(reasons.to_string()),
                Some(message) => Health::NotReady(format!("{status}: {message}")),
                None => Health::NotReady(format!("answered {status}")),
            }
        }
        Err(error) if error.is_timeout() => {
            Health::Down(format!("no answer within {} s", STATUS_PROBE_TIMEOUT.as_secs()))
        }
        Err(error) if error.is_connect() => Health::Down("connection refused".into()),
        Err(error) => Health::Down(error.to_string()),
    }
}

/// `GET /v1/cluster` of one named node, once.
async fn cluster_view(http: &Probes, token: Option<&str>, addr: &str) -> Option<Value> {
    let mut request = http.client.get(format!("{}://{addr}/v1/cluster", http.scheme));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// What `status` gathered: the answering node's cluster view, the
/// leader's (which knows each node's lag), the work view, and each member's
/// readiness as it answered itself.
struct Gathered {
    cluster: Value,
    leader_view: Option<Value>,
    work: Value,
    nodes: Vec<Value>,
    healths: Vec<Health>,
}

impl Gathered {
    /// A leader is known and every member answers ready.
    fn all_ready(&self) -> bool {
        self.cluster["leader_id"].as_u64().is_some() && self.healths.iter().all(|h| matches!(h, Health::Ready))
    }
}

async fn gather(client: &Client, http: &Probes, token: Option<&str>) -> anyhow::Result<Gathered> {
    let cluster = serde_json::to_value(client.cluster().await?)?;
    let work = client.status().await?;
    // The leader's own view knows how far each node's log matches its own.
    let leader_id = cluster["leader_id"].as_u64();
    let nodes: Vec<Value> = cluster["nodes"].as_array().cloned().unwrap_or_default();
    let leader_addr = nodes
        .iter()
        .find(|node| leader_id.is_some() && node["id"].as_u64() == leader_id)
        .and_then(|node| node["addr"].as_str().map(str::to_string));
    let leader_view = match (&leader_addr, leader_id == cluster["node_id"].as_u64()) {
        (_, true) => Some(cluster.clone()),
        (Some(addr), false) => cluster_view(http, token, addr).await,
        (None, false) => None,
    };
    let healths = futures::future::join_all(
        nodes.iter().map(|node| probe(http, token, node["addr"].as_str().unwrap_or_default())),
    )
    .await;
    Ok(Gathered { cluster, leader_view, work, nodes, healths })
}

/// Cluster view and work view: each node up or down and why, the leader,
/// the term, each node's lag behind the leader, the queues, stuck agents,
/// unserved queues and the oldest pending task's age. With `wait_s`, asks
/// again until a leader is known and every node is up and ready, and fails
/// if that does not happen within `wait_s` seconds.
pub async fn status(connect: &Connect, wait_s: Option<u64>, json: bool) -> anyhow::Result<()> {
    let client = client(connect)?;
    let http = Probes::new(connect)?;
    let token = connect.token.as_deref();
    let deadline = wait_s.map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let gathered = loop {
        let gathered = gather(&client, &http, token).await;
        match (deadline, &gathered) {
            (None, _) => break gathered?,
            (Some(_), Ok(seen)) if seen.all_ready() => break gathered?,
            (Some(deadline), _) if std::time::Instant::now() >= deadline => {
                let seen = gathered.context(format!("the cluster did not answer within {} s", wait_s.unwrap_or(0)))?;
                show(&seen, json);
                anyhow::bail!("not every node was up and ready within {} s", wait_s.unwrap_or(0));
            }
            (Some(_), _) => tokio::time::sleep(STATUS_WAIT_INTERVAL).await,
        }
    };
    show(&gathered, json);
    Ok(())
}

fn show(gathered: &Gathered, json: bool) {
    if json {
        print_json(&serde_json::json!({ "cluster": gathered.cluster, "work": gathered.work }));
    } else {
        print!(
            "{}",
            status_text(
                &gathered.cluster,
                gathered.leader_view.as_ref(),
                &gathered.nodes,
                &gathered.healths,
                &gathered.work
            )
        );
    }
}

fn status_text(
    cluster: &Value,
    leader_view: Option<&Value>,
    nodes: &[Value],
    healths: &[Health],
    work: &Value,
) -> String {
    let mut text = String::new();
    let leader_id = cluster["leader_id"].as_u64();
    match leader_id {
        Some(leader) => text.push_str(&format!("leader: node {leader}, term {}\n", cluster["term"])),
        None => text.push_str(&format!(
            "leader: none known (term {}): the cluster takes no writes until a majority of voters elects one\n",
            cluster["term"]
        )),
    }
    let leader_last = leader_view.and_then(|view| view["last_log_index"].as_u64());
    let mut rows = Vec::new();
    for (node, health) in nodes.iter().zip(healths) {
        let id = node["id"].as_u64().unwrap_or_default();
        let seen = leader_view
            .and_then(|view| view["nodes"].as_array())
            .and_then(|nodes| nodes.iter().find(|n| n["id"].as_u64() == Some(id)));
        let role = if Some(id) == leader_id {
            "leader"
        } else if node["voter"].as_bool().unwrap_or(false) {
            "follower"
        } else {
            "learner"
        };
        let lag = match (leader_last, seen.and_then(|n| n["matched_index"].as_u64())) {
            (Some(last), Some(matched)) => match last.saturating_sub(matched) {
                1 => "1 entry".to_string(),
                entries => format!("{entries} entries"),
            },
            _ => "?".into(),
        };
        let contact = match seen.and_then(|n| n["last_contact_ms"].as_u64()) {
            _ if Some(id) == leader_id => "-".to_string(),
            Some(ms) => format!("{} ago", duration_text(ms)),
            None => "never".into(),
        };
        let mut state = match health {
            Health::Ready => "up, ready".to_string(),
            Health::NotReady(why) => format!("up, NOT READY: {why}"),
            Health::Down(why) => format!("DOWN ({why})"),
        };
        if node["clock_skewed"].as_bool() == Some(true) {
            state.push_str(&format!("; clock off by {} ms", node["clock_skew_ms"]));
        }
        rows.push(vec![
            id.to_string(),
            role.to_string(),
            node["addr"].as_str().unwrap_or("?").to_string(),
            lag,
            contact,
            state,
        ]);
    }
    text.push_str(&table(&["NODE", "ROLE", "ADDRESS", "LAG", "LAST CONTACT", "STATE"], &rows));
    let down = healths.iter().filter(|h| matches!(h, Health::Down(_))).count();
    if leader_view.is_none() && leader_id.is_some() {
        text.push_str("(lag and last contact unknown: the leader did not answer)\n");
    }
    if down > 0 {
        text.push_str(&format!("{down} of {} nodes down\n", nodes.len()));
    }

    text.push('\n');
    let oldest = match work["oldest_pending_age_ms"].as_u64() {
        Some(ms) => format!("oldest pending task {}", duration_text(ms)),
        None => "no pending task".into(),
    };
    text.push_str(&format!(
        "tasks: {}, agents: {}, {oldest}, policy version {}\n",
        work["tasks"], work["agents"], work["policy_version"]
    ));
    if let Some(queues) = work["queues"].as_object().filter(|q| !q.is_empty()) {
        let states = ["pending", "leased", "paused", "succeeded", "failed", "dead", "cancelled"];
        let rows: Vec<Vec<String>> = queues
            .iter()
            .map(|(name, counts)| {
                std::iter::once(name.clone()).chain(states.iter().map(|s| counts[s].to_string())).collect()
            })
            .collect();
        text.push_str(&table(
            &["QUEUE", "PENDING", "LEASED", "PAUSED", "SUCCEEDED", "FAILED", "DEAD", "CANCELLED"],
            &rows,
        ));
    }
    let names = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
            .collect()
    };
    let keys: Vec<KeyStatus> = serde_json::from_value(work["keys"].clone()).unwrap_or_default();
    if !keys.is_empty() {
        text.push_str(&key_table(&keys));
    }
    if let Some(trees) = work["trees"].as_array().filter(|trees| !trees.is_empty()) {
        let rows: Vec<Vec<String>> = trees
            .iter()
            .map(|tree| {
                let budget = |field: &str| tree["budget"][field].as_u64().map_or("-".into(), |max| max.to_string());
                let usage = &tree["usage"];
                let tokens = usage["tokens_in"].as_u64().unwrap_or(0) + usage["tokens_out"].as_u64().unwrap_or(0);
                vec![
                    tree["root_id"].to_string(),
                    format!("{tokens}/{}", budget("tokens_max")),
                    format!("{}/{}", usage["cost"].as_u64().unwrap_or(0), budget("cost_max")),
                    tree["exhausted"].as_str().map_or("".into(), |why| format!("PAUSED: {why}")),
                ]
            })
            .collect();
        text.push_str(&table(&["TREE", "TOKENS/BUDGET", "COST/BUDGET", ""], &rows));
    }
    let unserved = names(&work["unserved_queues"]);
    if !unserved.is_empty() {
        text.push_str(&format!("queues no agent serves: {}\n", unserved.join(", ")));
    }
    let stuck = names(&work["stuck_agents"]);
    if !stuck.is_empty() {
        text.push_str(&format!("stuck agents: {}\n", stuck.join(", ")));
    }
    text
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Show the current policy and its version.
    Get,
    /// Change policy keys: `phalanx config set queue_tasks_max=5000 stall_timeout_ms=60000`.
    Set {
        /// KEY=VALUE pairs (the keys `config get` shows).
        #[arg(required = true)]
        assignments: Vec<String>,
        /// Make a change that would refuse all new work of some kind or
        /// delete retained tasks (it is recorded as forced in the history).
        #[arg(long)]
        force: bool,
    },
    /// List earlier versions, with why each was set.
    History,
    /// Make an earlier version current again (default: the previous one).
    Rollback {
        /// The version to make current (`config history` lists them).
        version: Option<u64>,
        /// Roll back even to a version that would refuse all new work of
        /// some kind or delete retained tasks.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run_config(connect: &Connect, command: ConfigCommand, json: bool) -> anyhow::Result<()> {
    let client = client(connect)?;
    let answer = match &command {
        ConfigCommand::Get => client.config_get().await?,
        ConfigCommand::Set { assignments, force } => {
            let mut set = serde_json::Map::new();
            for assignment in assignments {
                let (key, value) =
                    assignment.split_once('=').with_context(|| format!("{assignment:?} is not KEY=VALUE"))?;
                set.insert(key.trim().to_string(), Value::String(value.trim().to_string()));
            }
            client.config_set(set, *force).await?
        }
        ConfigCommand::History => client.config_history().await?,
        ConfigCommand::Rollback { version, force } => client.config_rollback(*version, *force).await?,
    };
    if json {
        print_json(&answer);
        return Ok(());
    }
    match command {
        ConfigCommand::Get => {
            println!("policy version {}", answer["version"]);
            if let Some(policy) = answer["policy"].as_object() {
                for (key, value) in policy {
                    println!("{key} = {value}");
                }
            }
        }
        ConfigCommand::History => {
            let rows: Vec<Vec<String>> = answer["history"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|entry| {
                    vec![
                        entry["version"].to_string(),
                        if entry["forced"].as_bool() == Some(true) { "forced" } else { "" }.to_string(),
                        entry["note"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            print!("{}", table(&["VERSION", "FORCED", "NOTE"], &rows));
        }
        ConfigCommand::Set { .. } | ConfigCommand::Rollback { .. } => {
            println!("policy version {} is current", answer["version"]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_payload(payload: &str, expected: Result<Value, &str>) {
        match (payload_of(payload, None), expected) {
            (Ok(value), Ok(expected)) => assert_eq!(value, expected, "{payload:?}"),
            (Err(error), Err(expected)) => assert!(error.to_string().contains(expected), "{payload:?}: {error}"),
            (got, expected) => panic!("{payload:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn payloads() {
        check_payload(r#"{"text": "hi"}"#, Ok(serde_json::json!({"text": "hi"})));
        check_payload("[1, 2]", Ok(serde_json::json!([1, 2])));
        check_payload("42", Ok(serde_json::json!(42)));
        check_payload("hello there", Ok(serde_json::json!("hello there")));
        check_payload(r#"{"text": "hi""#, Err("--payload is not valid JSON: EOF while parsing"));
        check_payload("[1,", Err("not valid JSON"));
        check_payload(r#""unclosed"#, Err("not valid JSON"));
        check_payload(r#"  {oops}"#, Err("use --payload-text"));
        assert_eq!(payload_of("ignored", Some("{not json".into())).unwrap(), serde_json::json!("{not json"));
    }

    #[test]
    fn limits_assignments() {
        let limits =
            key_limits_of(&["concurrency_max=4".into(), "rate_per_second=2.5".into(), "weight=2".into()]).unwrap();
        assert_eq!(limits.concurrency_max, Some(4));
        assert_eq!(limits.rate_per_second, Some(2.5));
        assert_eq!(limits.weight, Some(2));
        assert!(key_limits_of(&["speed=3".into()]).unwrap_err().to_string().contains("unknown field"));
        assert!(key_limits_of(&["burst=lots".into()]).unwrap_err().to_string().contains("not a whole number"));
        assert!(key_limits_of(&["weight".into()]).unwrap_err().to_string().contains("FIELD=VALUE"));
    }

    #[test]
    fn durations() {
        for (ms, text) in [
            (0, "0 ms"),
            (999, "999 ms"),
            (4_250, "4.2 s"),
            (61_000, "1 min"),
            (3_600_000 + 5 * 60_000, "1 h 5 min"),
            (3 * 86_400_000, "3 d"),
        ] {
            assert_eq!(duration_text(ms), text);
        }
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![vec!["1".to_string(), "summarise".to_string()], vec!["12".into(), "q".into()]];
        assert_eq!(table(&["ID", "QUEUE"], &rows), "ID  QUEUE\n1   summarise\n12  q\n");
    }
}
