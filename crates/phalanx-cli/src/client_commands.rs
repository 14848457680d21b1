//! `phalanx task ...`, `phalanx status` and `phalanx cluster ...`: thin
//! commands over the client of `phalanx-agent`, printing JSON.

use crate::Connect;
use anyhow::Context;
use clap::Subcommand;
use phalanx_agent::client::{Client, Outcome, SubmitRequest};
use serde_json::Value;

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Submit one task; prints its id. Without `--idempotency-key` a key is
    /// generated, so the retries after an unknown outcome create one task.
    Submit {
        #[arg(long)]
        queue: String,
        /// JSON payload (a bare string that is not JSON is sent as a JSON string).
        #[arg(long, default_value = "null")]
        payload: String,
        #[arg(long)]
        priority: Option<u8>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Relative deadline in milliseconds.
        #[arg(long)]
        deadline_ms: Option<u64>,
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Show one task.
    Get { id: u64 },
    /// List tasks, optionally by queue and state.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Cancel a task that has not finished.
    Cancel { id: u64 },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Add a node (learner first, then voter). Node ids are never reused.
    Add {
        #[arg(long)]
        node_id: u64,
        /// The node's client address.
        #[arg(long)]
        addr: String,
        /// The node's Raft address, when it has a separate `--raft-listen`.
        #[arg(long)]
        raft_addr: Option<String>,
    },
    /// Remove a voter.
    Remove {
        #[arg(long)]
        node_id: u64,
    },
}

pub fn client(connect: &Connect) -> anyhow::Result<Client> {
    Client::from_nodes_str(&connect.nodes, connect.token.clone()).context("building the client")
}

fn print(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON prints"));
}

pub async fn run_task(connect: &Connect, command: TaskCommand) -> anyhow::Result<()> {
    let client = client(connect)?;
    match command {
        TaskCommand::Submit { queue, payload, priority, idempotency_key, deadline_ms, max_attempts } => {
            let payload: Value = serde_json::from_str(&payload).unwrap_or(Value::String(payload));
            let mut request = SubmitRequest::new(queue, payload);
            request.priority = priority.or(request.priority);
            // A key of our own, so that a retry after an unknown outcome
            // (ours, or the user's with the key we print) creates one task.
            let key = idempotency_key.unwrap_or_else(phalanx_agent::client::generated_idempotency_key);
            request.idempotency_key = Some(key.clone());
            request.deadline_ms = deadline_ms;
            request.max_attempts = max_attempts.or(request.max_attempts);
            let submitted = client.submit(&request).await.map_err(|error| match error.outcome() {
                Outcome::Unknown => anyhow::anyhow!(
                    "{error}; the task may exist: repeat with --idempotency-key {key} to submit it at most once"
                ),
                Outcome::NotDone => anyhow::anyhow!("{error}; nothing was done"),
            })?;
            print(&serde_json::to_value(submitted)?);
        }
        TaskCommand::Get { id } => print(&serde_json::to_value(client.get_task(id, false).await?)?),
        TaskCommand::List { queue, state, limit } => {
            let page = client.list_tasks(queue.as_deref(), state.as_deref(), None, Some(limit)).await?;
            print(&serde_json::to_value(page)?);
        }
        TaskCommand::Cancel { id } => print(&serde_json::to_value(client.cancel(id).await?)?),
    }
    Ok(())
}

pub async fn run_cluster(connect: &Connect, command: ClusterCommand) -> anyhow::Result<()> {
    let client = client(connect)?;
    let answer = match command {
        ClusterCommand::Add { node_id, addr, raft_addr } => {
            client.add_member(node_id, &addr, raft_addr.as_deref()).await?
        }
        ClusterCommand::Remove { node_id } => client.remove_member(node_id).await?,
    };
    print(&answer);
    Ok(())
}

/// Cluster view and work view: leader, members, queues, stuck agents,
/// unserved queues and the oldest pending task's age.
pub async fn status(connect: &Connect) -> anyhow::Result<()> {
    let client = client(connect)?;
    let cluster = client.cluster().await?;
    let status = client.status().await?;
    print(&serde_json::json!({ "cluster": cluster, "work": status }));
    Ok(())
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Show the current policy and its version.
    Get,
    /// Change policy keys: `phalanx config set queue_tasks_max=5000 stall_timeout_ms=60000`.
    Set {
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
        version: Option<u64>,
        /// Roll back even to a version that would refuse all new work of
        /// some kind or delete retained tasks.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run_config(connect: &Connect, command: ConfigCommand) -> anyhow::Result<()> {
    let client = client(connect)?;
    let answer = match command {
        ConfigCommand::Get => client.config_get().await?,
        ConfigCommand::Set { assignments, force } => {
            let mut set = serde_json::Map::new();
            for assignment in assignments {
                let (key, value) =
                    assignment.split_once('=').with_context(|| format!("{assignment:?} is not KEY=VALUE"))?;
                set.insert(key.trim().to_string(), Value::String(value.trim().to_string()));
            }
            client.config_set(set, force).await?
        }
        ConfigCommand::History => client.config_history().await?,
        ConfigCommand::Rollback { version, force } => client.config_rollback(version, force).await?,
    };
    print(&answer);
    Ok(())
}
