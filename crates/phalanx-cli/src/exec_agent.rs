//! `phalanx agent run --queue Q --exec 'CMD'`: a generic agent built on the
//! Rust SDK that runs CMD once per task, with the payload on stdin and
//! `PHALANX_TASK_ID`, `PHALANX_FENCE`, `PHALANX_QUEUE` in its environment.
//! Exit 0: stdout is the result (JSON if it parses, else a string).
//! Non-zero exit: the task fails (retryable) with stderr as the error.
//! It logs one line per task (id, queue, outcome, duration).
//!
//! A command the shell cannot find or run (exit 127 or 126, or no shell) is
//! the agent's fault, not the task's: the agent stops with that error
//! instead of burning every task's attempts. Leasing, reporting and the
//! outbox are the SDK's.

use crate::Connect;
use clap::Args;
use phalanx_agent::{handler, Agent, AgentConfig, HandlerError, TaskContext};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// Bytes of stdout or stderr kept from one run.
const OUTPUT_BYTES_MAX: usize = 256 * 1024;
/// The shell's exit status for a command it cannot find, and for one it
/// found but cannot execute (POSIX, "Command Search and Execution").
const EXIT_NOT_FOUND: i32 = 127;
const EXIT_NOT_EXECUTABLE: i32 = 126;

#[derive(Args)]
pub struct ExecAgentArgs {
    #[command(flatten)]
    pub connect: Connect,
    /// Queues (capabilities) to serve; repeat or comma-separate.
    #[arg(long, required = true, value_delimiter = ',')]
    pub queue: Vec<String>,
    /// Shell command (`sh -c`) run once per task: the payload (JSON) on
    /// stdin, stdout is the result; a non-zero exit fails the attempt.
    #[arg(long)]
    pub exec: String,
    /// Agent id (default: exec-<pid>).
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Lease time-to-live asked for each task; the agent extends it while
    /// the command runs.
    #[arg(long, default_value_t = 30_000)]
    pub lease_ttl_ms: u64,
    /// Where undeliverable results are kept (fsynced) until a node answers.
    #[arg(long)]
    pub outbox_dir: Option<PathBuf>,
    /// Past this long without an answer from any node, the agent holds its
    /// results in the outbox and works on alone.
    #[arg(long, default_value_t = 5_000)]
    pub orchestrator_timeout_ms: u64,
}

/// Why a run did not give a result.
enum RunError {
    /// The task's own failure: its attempt fails, the agent goes on.
    Task(String),
    /// The command cannot run at all: the agent stops.
    Command(String),
}

pub async fn run(args: ExecAgentArgs) -> anyhow::Result<()> {
    let agent_id = args.agent_id.clone().unwrap_or_else(|| format!("exec-{}", std::process::id()));
    check_command(&args.exec).await?;
    let mut config = AgentConfig::new(args.connect.node_list()?, agent_id.clone(), args.queue.clone());
    config.token = args.connect.token.clone();
    config.ca_file = args.connect.ca_file.clone();
    config.concurrency = args.concurrency;
    config.lease_ttl_ms = args.lease_ttl_ms;
    config.outbox_dir = args.outbox_dir.clone();
    config.orchestrator_timeout_ms = args.orchestrator_timeout_ms;
    let command = args.exec.clone();
    // The first error that stops the agent, and the signal to stop it.
    let broken: Arc<Mutex<Option<String>>> = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let agent = {
        let (broken, stop) = (broken.clone(), stop.clone());
        Agent::new(config, handler(move |context| run_task(command.clone(), context, broken.clone(), stop.clone())))?
    };
    tracing::info!(%agent_id, queues = ?args.queue, "agent running; SIGTERM drains");
    let shutdown = async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = stop.notified() => {}
        }
    };
    agent.clone().run_until(shutdown).await?;
    let stats = &agent.stats;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        completed = stats.completed.load(Relaxed),
        failed = stats.failed.load(Relaxed),
        superseded = stats.superseded.load(Relaxed),
        "agent stopped"
    );
    let broken = broken.lock().expect("broken lock").take();
    match broken {
        Some(why) => anyhow::bail!("{why}; the agent stopped so as not to fail every task"),
        None => Ok(()),
    }
}

/// Refuses, before any task is leased, a command whose first word the
/// shell cannot find (`command -v`), when that word is a plain program name
/// or path (anything fancier is left to the shell at run time).
async fn check_command(command: &str) -> anyhow::Result<()> {
    let Some(program) = command.split_whitespace().next() else {
        anyhow::bail!("--exec is empty: give the command to run per task");
    };
    let plain = program.chars().all(|c| c.is_ascii_alphanumeric() || "-_./+".contains(c));
    if !plain {
        return Ok(());
    }
    let found = tokio::process::Command::new("sh")
        .args(["-c", "command -v \"$1\"", "sh", program])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|error| anyhow::anyhow!("cannot start sh to run --exec: {error}"))?;
    anyhow::ensure!(found.success(), "--exec {command:?}: {program:?} is not a command sh can find (check PATH)");
    Ok(())
}

/// One task: runs the command and logs one line with its outcome.
async fn run_task(
    command: String,
    context: TaskContext,
    broken: Arc<Mutex<Option<String>>>,
    stop: Arc<tokio::sync::Notify>,
) -> Result<Value, HandlerError> {
    let (id, queue, fence) = (context.task.id, context.task.queue.clone(), context.fence);
    let started = Instant::now();
    let outcome = run_command(&command, &context).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(result) => {
            tracing::info!("task {id} ({queue}, fence {fence}): succeeded in {duration_ms} ms");
            Ok(result)
        }
        Err(RunError::Task(error)) => {
            tracing::warn!("task {id} ({queue}, fence {fence}): failed in {duration_ms} ms: {error}");
            Err(HandlerError::retryable(error))
        }
        Err(RunError::Command(error)) => {
            tracing::error!("task {id} ({queue}, fence {fence}): not run: {error}");
            broken.lock().expect("broken lock").get_or_insert_with(|| error.clone());
            stop.notify_one();
            // Retryable: another agent (or this one, fixed) can still do it.
            Err(HandlerError::retryable(format!("agent could not run its command: {error}")))
        }
    }
}

async fn run_command(command: &str, context: &TaskContext) -> Result<Value, RunError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PHALANX_TASK_ID", context.task.id.to_string())
        .env("PHALANX_FENCE", context.fence.to_string())
        .env("PHALANX_QUEUE", &context.task.queue)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| RunError::Command(format!("could not start sh for {command:?}: {error}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let payload = serde_json::to_vec(&context.task.payload).expect("JSON serialises");
    // A command that does not read its stdin is fine: ignore a broken pipe.
    let _ = stdin.write_all(&payload).await;
    drop(stdin);
    let output =
        child.wait_with_output().await.map_err(|error| RunError::Task(format!("waiting for {command:?}: {error}")))?;
    let keep = |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_BYTES_MAX)]).trim().to_string();
    match output.status.code() {
        Some(0) => {
            let text = keep(&output.stdout);
            Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }
        Some(code @ (EXIT_NOT_FOUND | EXIT_NOT_EXECUTABLE)) => {
            let why = if code == EXIT_NOT_FOUND { "not found" } else { "not executable" };
            Err(RunError::Command(format!("{command:?} exited {code} (command {why}): {}", keep(&output.stderr))))
        }
        _ => Err(RunError::Task(format!("{} ({})", keep(&output.stderr), output.status))),
    }
}
