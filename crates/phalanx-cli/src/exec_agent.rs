//! `phalanx agent run --queue Q --exec 'CMD'`: a generic agent built on the
//! Rust SDK that runs CMD once per task, with the payload on stdin and
//! `PHALANX_TASK_ID`, `PHALANX_FENCE`, `PHALANX_QUEUE` in its environment.
//! Exit 0: stdout is the result (JSON if it parses, else a string).
//! Non-zero exit: the task fails (retryable) with stderr as the error.

use crate::Connect;
use clap::Args;
use phalanx_agent::{handler, Agent, AgentConfig, HandlerError, TaskContext};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Bytes of stdout or stderr kept from one run.
const OUTPUT_BYTES_MAX: usize = 256 * 1024;

#[derive(Args)]
pub struct ExecAgentArgs {
    #[command(flatten)]
    pub connect: Connect,
    /// Queues (capabilities) to serve; repeat or comma-separate.
    #[arg(long, required = true, value_delimiter = ',')]
    pub queue: Vec<String>,
    /// Shell command run per task.
    #[arg(long)]
    pub exec: String,
    /// Agent id (default: exec-<hostname>-<pid>).
    #[arg(long)]
    pub agent_id: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    #[arg(long, default_value_t = 30_000)]
    pub lease_ttl_ms: u64,
    /// Where undeliverable results are kept (fsynced) until a node answers.
    #[arg(long)]
    pub outbox_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 5_000)]
    pub orchestrator_timeout_ms: u64,
}

pub async fn run(args: ExecAgentArgs) -> anyhow::Result<()> {
    let agent_id = args.agent_id.clone().unwrap_or_else(|| format!("exec-{}", std::process::id()));
    let mut config = AgentConfig::new(
        args.connect.nodes.split(',').map(str::to_string).collect(),
        agent_id.clone(),
        args.queue.clone(),
    );
    config.token = args.connect.token.clone();
    config.concurrency = args.concurrency;
    config.lease_ttl_ms = args.lease_ttl_ms;
    config.outbox_dir = args.outbox_dir.clone();
    config.orchestrator_timeout_ms = args.orchestrator_timeout_ms;
    let command = args.exec.clone();
    let agent = Agent::new(config, handler(move |context| run_command(command.clone(), context)))?;
    tracing::info!(%agent_id, queues = ?args.queue, "agent running; SIGTERM drains");
    agent.clone().run().await?;
    let stats = &agent.stats;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        completed = stats.completed.load(Relaxed),
        failed = stats.failed.load(Relaxed),
        superseded = stats.superseded.load(Relaxed),
        "agent stopped"
    );
    Ok(())
}

async fn run_command(command: String, context: TaskContext) -> Result<Value, HandlerError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("PHALANX_TASK_ID", context.task.id.to_string())
        .env("PHALANX_FENCE", context.fence.to_string())
        .env("PHALANX_QUEUE", &context.task.queue)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| HandlerError::retryable(format!("could not start {command:?}: {error}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let payload = serde_json::to_vec(&context.task.payload).expect("JSON serialises");
    // A command that does not read its stdin is fine: ignore a broken pipe.
    let _ = stdin.write_all(&payload).await;
    drop(stdin);
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| HandlerError::retryable(format!("waiting for {command:?}: {error}")))?;
    let keep = |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_BYTES_MAX)]).trim().to_string();
    if output.status.success() {
        let text = keep(&output.stdout);
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    } else {
        Err(HandlerError::retryable(format!("{} ({})", keep(&output.stderr), output.status)))
    }
}
