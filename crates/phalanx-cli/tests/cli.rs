//! The `phalanx` command line as a person meets it, run as real processes
//! against real nodes: what each command prints by default and with
//! `--json`, how it refuses a mistake (broken JSON, a wrong address, a busy
//! port, an unusable data dir or config file, a command that cannot run),
//! and that none of that ends in a panic.
//!
//! What the cluster does with the requests is the other tests' subject.

mod common;

use common::{free_port, phalanx, Cluster, PEER_TOKEN};
use serde_json::Value;
use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a command that should end (an error at start, a stopping agent)
/// may take.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Runs `phalanx ARGS --nodes NODES` to the end.
fn run(nodes: &str, args: &[&str]) -> Output {
    phalanx(args).args(["--nodes", nodes]).output().expect("phalanx runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The output of a command that should succeed.
fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}: {}{}", output.status, text(&output.stdout), text(&output.stderr));
    text(&output.stdout)
}

/// Waits for `child` to end (killing it and failing past `within`) and
/// answers its status and standard error.
fn wait_exit(mut child: Child, within: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
            return (status, stderr);
        }
        if start.elapsed() > within {
            child.kill().unwrap();
            let _ = child.wait();
            let mut stderr = String::new();
            child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
            panic!("still running after {within:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An error for a person: exit status 1 (not a panic's 101 or an abort's
/// 134), no panic message, and `expected` in what it says.
fn assert_clear_error(status: std::process::ExitStatus, stderr: &str, expected: &[&str]) {
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for part in expected {
        assert!(stderr.contains(part), "expected {part:?} in:\n{stderr}");
    }
}

async fn task(cluster: &Cluster, id: u64) -> Value {
    cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_prints_the_id_list_a_table_and_json_the_answers() {
    let cluster = Cluster::start(1, &[]).await;
    let node = cluster.addr(1);

    let submitted =
        run(node, &["task", "submit", "--queue", "q", "--payload", r#"{"n": 1}"#, "--idempotency-key", "k"]);
    let id_text = ok(submitted);
    let id: u64 = id_text.trim().parse().unwrap_or_else(|_| panic!("submit prints the id alone, not {id_text:?}"));
    let again = run(node, &["task", "submit", "--queue", "q", "--payload", r#"{"n": 1}"#, "--idempotency-key", "k"]);
    assert!(text(&again.stderr).contains("deduplicated"), "{}", text(&again.stderr));
    assert_eq!(ok(again).trim(), id.to_string(), "the same key answers the same task");
    ok(run(node, &["task", "submit", "--queue", "q", "--payload-text", "plain words", "--priority", "9"]));

    let table = ok(run(node, &["task", "list"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a line per task:\n{table}");
    for column in ["ID", "QUEUE", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "AGENT"] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert!(lines[1].starts_with(&format!("{id} ")) && lines[1].contains("pending"), "{table}");

    let listed: Value = serde_json::from_str(&ok(run(node, &["--json", "task", "list"]))).expect("--json prints JSON");
    assert_eq!(listed["tasks"].as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed["tasks"][1]["payload"], "plain words");
    assert_eq!(listed["tasks"][1]["priority"], 9);
    let submitted: Value = serde_json::from_str(&ok(run(
        node,
        &["task", "submit", "--json", "--queue", "q", "--payload", r#"{"n": 1}"#, "--idempotency-key", "k"],
    )))
    .unwrap();
    assert_eq!(submitted["deduplicated"], true, "--json is accepted after the subcommand too: {submitted}");

    let shown = ok(run(node, &["task", "get", &id.to_string()]));
    assert!(shown.contains("state:") && shown.contains("pending") && shown.contains(r#"{"n":1}"#), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_looks_like_json_but_does_not_parse_is_refused() {
    let cluster = Cluster::start(1, &[]).await;
    let node = cluster.addr(1);
    for broken in [r#"{"text": "hi""#, "[1, 2", r#""unclosed"#] {
        let output = run(node, &["task", "submit", "--queue", "q", "--payload", broken]);
        assert_clear_error(output.status, &text(&output.stderr), &["--payload is not valid JSON", "--payload-text"]);
    }
    let listed = cluster.get(1, "/v1/tasks").await.unwrap().1;
    assert_eq!(listed["tasks"].as_array().map(Vec::len), Some(0), "nothing was submitted: {listed}");

    let id = ok(run(node, &["task", "submit", "--queue", "q", "--payload-text", r#"{"text": "hi""#]));
    assert_eq!(task(&cluster, id.trim().parse().unwrap()).await["payload"], r#"{"text": "hi""#);
    let output = run(node, &["task", "submit", "--queue", "q", "--payload", "{}", "--payload-text", "x"]);
    assert_eq!(output.status.code(), Some(2), "the two payload flags exclude each other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_a_short_summary_that_names_a_down_node() {
    let mut cluster = Cluster::start(3, &[]).await;
    let nodes = [1, 2, 3].map(|id| cluster.addr(id).to_string()).join(",");
    let leader = cluster.leader().await.expect("a leader");
    let down = if leader == 3 { 2 } else { 3 };
    cluster.servers.get_mut(&down).unwrap().kill9();

    let summary = ok(run(&nodes, &["status"]));
    assert!(summary.lines().count() < 20, "short:\n{summary}");
    assert!(summary.contains(&format!("leader: node {leader}, term ")), "{summary}");
    let line = |id: u64| summary.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_default().to_string();
    assert!(line(down).contains("DOWN"), "{summary}");
    assert!(line(leader).contains("leader") && line(leader).contains("up, ready"), "{summary}");
    assert!(summary.contains("1 of 3 nodes down"), "{summary}");

    let json: Value = serde_json::from_str(&ok(run(&nodes, &["status", "--json"]))).expect("JSON");
    assert_eq!(json["cluster"]["nodes"].as_array().map(Vec::len), Some(3), "{json}");
    assert!(json["work"]["counters"].is_object(), "{json}");

    let waited = run(&nodes, &["status", "--wait", "1"]);
    assert_clear_error(waited.status, &text(&waited.stderr), &["not every node was up and ready within 1 s"]);
    assert!(text(&waited.stdout).contains("DOWN"), "it shows what it saw last");
}

#[test]
fn addresses_default_to_port_7070_and_other_schemes_are_refused() {
    let port = free_port().to_string();
    let output = run(&format!("ws://127.0.0.1:{port}"), &["task", "list"]);
    assert_clear_error(output.status, &text(&output.stderr), &["not ws://"]);
    let output = run("127.0.0.1:http", &["status"]);
    assert_clear_error(output.status, &text(&output.stderr), &["is not a port"]);
    // Nothing may listen on 7070 here, or a node of someone else may: either
    // way the port asked for is 7070, never HTTP's 80.
    let output = run("127.0.0.1", &["task", "list", "--limit", "1"]);
    if !output.status.success() {
        assert_clear_error(output.status, &text(&output.stderr), &["127.0.0.1:7070"]);
    }
    let output = phalanx(&["agent", "run", "--queue", "q", "--exec", "cat", "--nodes", "ftp://x"]).output().unwrap();
    assert_clear_error(output.status, &text(&output.stderr), &["not ftp://"]);
}

/// `phalanx server` in cluster mode, with `extra` flags, until it ends.
fn server_start(listen: &str, raft_listen: &str, data_dir: &std::path::Path, extra: &[&str]) -> Child {
    let peers = format!("1={listen}/{raft_listen},2=127.0.0.1:{}/127.0.0.1:{}", free_port(), free_port());
    phalanx(&["server", "--node-id", "1", "--listen", listen, "--raft-listen", raft_listen, "--peers", &peers])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("PHALANX_PEER_TOKEN", PEER_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_busy_port_stops_the_server_with_an_error_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let free = || format!("127.0.0.1:{}", free_port());

    let child = server_start(&free(), &busy, &dir.path().join("a"), &[]);
    let (status, stderr) = wait_exit(child, EXIT_WITHIN);
    assert_clear_error(status, &stderr, &[&busy, "--raft-listen", "in use"]);

    let child = server_start(&busy, &free(), &dir.path().join("b"), &[]);
    let (status, stderr) = wait_exit(child, EXIT_WITHIN);
    assert_clear_error(status, &stderr, &[&busy, "--listen", "in use"]);
}

#[test]
fn an_unusable_data_dir_or_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let free = || format!("127.0.0.1:{}", free_port());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let (status, stderr) = wait_exit(server_start(&free(), &free(), &file, &[]), EXIT_WITHIN);
    assert_clear_error(status, &stderr, &[&file.display().to_string(), "not a directory"]);

    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("phalanx.redb"), "not a database").unwrap();
    let (status, stderr) = wait_exit(server_start(&free(), &free(), &corrupt, &[]), EXIT_WITHIN);
    assert_clear_error(status, &stderr, &[&corrupt.join("phalanx.redb").display().to_string()]);

    let data = dir.path().join("data");
    for (config, why) in
        [(dir.path().to_path_buf(), "Is a directory"), (dir.path().join("missing.conf"), "No such file")]
    {
        let config = config.display().to_string();
        let (status, stderr) = wait_exit(server_start(&free(), &free(), &data, &["--config", &config]), EXIT_WITHIN);
        assert_clear_error(status, &stderr, &[&format!("config file {config}"), why]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_agent_logs_a_line_per_task() {
    let cluster = Cluster::start(1, &[]).await;
    let (_, submitted) =
        cluster.post(1, "/v1/tasks", &serde_json::json!({"queue": "echo", "payload": {"n": 7}})).await.unwrap();
    let id = submitted["task_id"].as_u64().unwrap();
    let agent = phalanx(&["agent", "run", "--queue", "echo", "--exec", "cat", "--nodes", cluster.addr(1)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_until(Duration::from_secs(20), "the task done", async || {
        task(&cluster, id).await["state"] == "succeeded"
    })
    .await;
    Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap();
    let (status, stderr) = wait_exit(agent, EXIT_WITHIN);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("task {id} (echo, fence ")) && stderr.contains("succeeded in"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_agent_stops_when_its_command_cannot_run() {
    let cluster = Cluster::start(1, &[]).await;
    let (_, submitted) = cluster
        .post(1, "/v1/tasks", &serde_json::json!({"queue": "shell", "payload": 1, "max_attempts": 3}))
        .await
        .unwrap();
    let id = submitted["task_id"].as_u64().unwrap();
    let agent = |exec: &str| {
        phalanx(&["agent", "run", "--queue", "shell", "--exec", exec, "--nodes", cluster.addr(1)])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // A program sh cannot find is refused before any task is leased.
    let (status, stderr) = wait_exit(agent("no-such-program-for-phalanx --flag"), EXIT_WITHIN);
    assert_clear_error(status, &stderr, &["no-such-program-for-phalanx", "not a command sh can find"]);
    assert_eq!(task(&cluster, id).await["attempts"], 0);

    // One the check cannot see (exit 127 at run time) stops the agent after
    // one attempt, instead of failing the task for good.
    let (status, stderr) = wait_exit(agent("exec /no/such/program"), EXIT_WITHIN);
    assert_clear_error(status, &stderr, &["exited 127 (command not found)", "the agent stopped"]);
    let after = task(&cluster, id).await;
    assert_eq!(after["attempts"], 1, "{after}");
    assert_ne!(after["state"], "dead", "the task can still be done: {after}");
}

#[test]
fn help_names_every_scenario_and_node_counts_are_counts() {
    let help = |args: &[&str]| ok(phalanx(args).arg("--help").output().unwrap());
    let bench = help(&["bench"]);
    for scenario in ["throughput", "overload", "backlog", "failover", "soak", "steady", "delegation"] {
        assert!(bench.contains(scenario), "bench --help names {scenario}:\n{bench}");
    }
    for command in [&["bench"][..], &["demo"], &["sim"]] {
        let text = help(command);
        assert!(text.contains("--node-count") && !text.contains("--nodes "), "{command:?}:\n{text}");
    }
    let submit = help(&["task", "submit"]);
    assert!(submit.contains("0 (lowest) to 9"), "{submit}");
    let output = phalanx(&["bench", "--nodes", "3"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "--nodes is not a count: {}", text(&output.stderr));
}
