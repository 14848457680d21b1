//! A multi-agent pipeline on the Rust SDK: a planner splits a question into
//! three research tasks (fan-out), three researchers answer them, and a
//! writer combines the answers (fan-in). Deterministic stand-in functions sit
//! where an LLM call would be. The first planner of the first question dies
//! mid-plan; the next attempt adopts the children it had delegated.
//!
//! Run: `cargo run -p phalanx-cli --example pipeline` (starts a one-node
//! cluster in a temporary directory), or point it at a running cluster with
//! `PHALANX_NODES=127.0.0.1:7070`.

use phalanx_agent::{handler, Agent, AgentConfig, Client, HandlerError, SubmitRequest, TaskContext};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Splits the question, delegates, waits, and hands the pieces to the writer.
/// It survives being replaced: a later attempt of the same task is handed
/// the children the earlier one delegated (`context.children`), and
/// delegating the same step again adopts the child instead of running it twice.
async fn planner(context: TaskContext) -> Result<Value, HandlerError> {
    let question = context.task.payload["question"].as_str().unwrap_or_default().to_string();
    if !context.children.is_empty() {
        println!(
            "planner, attempt {} of task {}: an earlier attempt delegated {} children",
            context.task.attempts,
            context.task.id,
            context.children.len()
        );
    }
    let mut research = Vec::new();
    for aspect in ["history", "mechanism", "trade-offs"] {
        let child = context.delegate("research", json!({ "question": question, "aspect": aspect })).await?;
        if child.adopted {
            println!("  adopted child {} ({aspect}) instead of delegating it again", child.task_id);
        }
        research.push(child.task_id);
        // Stand-in for a planner that dies mid-plan: the first attempt of a
        // task marked `crash_once` gives up after two of its three steps.
        if context.task.payload["crash_once"] == json!(true) && context.task.attempts == 1 && research.len() == 2 {
            return Err(HandlerError::retryable("the planner crashed after delegating two steps"));
        }
    }
    let answers = context.await_tasks(&research, Duration::from_secs(60)).await?;
    let notes: Vec<Value> = answers.iter().map(|task| task.result.clone().unwrap_or(Value::Null)).collect();
    let essay = context.spawn_child("write", json!({ "question": question, "notes": notes })).await?;
    let written = context.await_tasks(&[essay], Duration::from_secs(60)).await?;
    Ok(written[0].result.clone().unwrap_or(Value::Null))
}

/// Stand-in for an LLM researching one aspect.
async fn researcher(context: TaskContext) -> Result<Value, HandlerError> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let aspect = context.task.payload["aspect"].as_str().unwrap_or_default();
    let question = context.task.payload["question"].as_str().unwrap_or_default();
    Ok(json!(format!("{aspect} of {question}: {} words considered", question.split_whitespace().count() * 7)))
}

/// Stand-in for an LLM writing from notes; records its draft in the conversation.
async fn writer(context: TaskContext) -> Result<Value, HandlerError> {
    let notes = context.task.payload["notes"].as_array().cloned().unwrap_or_default();
    let text: Vec<String> = notes.iter().filter_map(|n| n.as_str().map(str::to_string)).collect();
    let essay =
        format!("Answer to {:?}: {}.", context.task.payload["question"].as_str().unwrap_or(""), text.join("; "));
    context.context_put("draft", &json!(essay), None).await?;
    Ok(json!({ "essay": essay }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _dir;
    let _node;
    let nodes: Vec<String> = match std::env::var("PHALANX_NODES") {
        Ok(nodes) => nodes.split(',').map(str::to_string).collect(),
        Err(_) => {
            let dir = tempfile::tempdir()?;
            let config = phalanx_server::NodeConfig::new(1, "127.0.0.1:0".parse()?, dir.path().to_path_buf());
            let running = phalanx_server::start(config).await?;
            let addr = running.addr.to_string();
            println!("started a one-node cluster at {addr}");
            (_dir, _node) = (dir, running);
            vec![addr]
        }
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut agents = Vec::new();
    for (id, queue, function, concurrency) in [
        ("planner", "plan", handler(planner), 4),
        ("researcher-1", "research", handler(researcher), 4),
        ("researcher-2", "research", handler(researcher), 4),
        ("writer", "write", handler(writer), 2),
    ] {
        let mut config = AgentConfig::new(nodes.clone(), id, vec![queue.to_string()]);
        config.concurrency = concurrency;
        config.poll_wait_ms = 1_000;
        let agent = Agent::new(config, function)?;
        let stop = stop.clone();
        agents.push(tokio::spawn(async move { agent.run_until(async move { stop.notified().await }).await }));
    }
    let client = Client::new(nodes, None)?;
    let questions = ["how does Raft elect a leader", "why fence a lease", "what is load shedding"];
    let mut ids = Vec::new();
    for (i, question) in questions.iter().enumerate() {
        // The first planner of the first question is replaced mid-plan.
        let mut request = SubmitRequest::new("plan", json!({ "question": question, "crash_once": i == 0 }));
        request.conversation_id = Some(format!("pipeline-{i}"));
        request.idempotency_key = Some(format!("pipeline-{i}"));
        ids.push(client.submit(&request).await?.task_id);
    }
    for task in client.await_tasks(&ids, Duration::from_secs(120)).await? {
        println!("task {} ({:?}): {}", task.id, task.state, task.result.unwrap_or(Value::Null));
    }
    stop.notify_waiters();
    for agent in agents {
        let _ = agent.await;
    }
    Ok(())
}
