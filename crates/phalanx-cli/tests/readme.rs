//! README.md's walk-through, run for real: every fenced block marked with a
//! `<!-- walkthrough -->` line is run, in order, as one bash script with
//! the built `phalanx` first on the `PATH`, in a temporary directory, each
//! `127.0.0.1:PORT` of the text moved to a free port. A command that fails
//! (or a node that never becomes ready) fails the test, so the README cannot
//! drift from what the binary accepts.
//!
//! What the commands do is tested elsewhere (`cli.rs`, the cluster tests);
//! this only holds the README to the truth.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "<!-- walkthrough -->";
/// The whole walk-through, with its waits of at most 30 s each, takes a
/// few seconds on an idle machine.
const WALKTHROUGH_TIMEOUT: Duration = Duration::from_secs(240);

/// The fenced blocks that follow a `MARK` line, in order.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if line.trim() != MARK {
            continue;
        }
        let fence = lines.next().unwrap_or_default();
        assert!(fence.starts_with("```"), "{MARK} must be followed by a fenced block, not {fence:?}");
        let block: Vec<&str> = lines.by_ref().take_while(|line| !line.starts_with("```")).collect();
        blocks.push(block.join("\n"));
    }
    blocks
}

/// The text with every `127.0.0.1:PORT` moved to a free port (the same
/// port for the same number everywhere).
fn with_free_ports(text: &str) -> String {
    const HOST: &str = "127.0.0.1:";
    let mut ports = std::collections::BTreeMap::new();
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(HOST) {
        out.push_str(&rest[..at + HOST.len()]);
        rest = &rest[at + HOST.len()..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            let port = ports.entry(rest[..digits].to_string()).or_insert_with(common::free_port);
            out.push_str(&port.to_string());
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// Kills the walk-through's whole process group (nodes and agents it left
/// in the background) however the test ends.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0)]).status();
    }
}

#[test]
fn the_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let blocks = walkthrough_blocks(&readme);
    let script = blocks.join("\n");
    for step in ["phalanx server", "phalanx status --wait", "phalanx task submit", "cluster add", "cluster remove"] {
        assert!(script.contains(step), "the walk-through should show `{step}`:\n{script}");
    }
    // A restart: some node's `phalanx server` command (its log aside) appears twice.
    let servers: Vec<&str> = script
        .lines()
        .filter(|l| l.starts_with("phalanx server"))
        .map(|l| l.split(" 2>").next().unwrap_or(l))
        .collect();
    assert!(
        servers.iter().enumerate().any(|(i, line)| servers[..i].contains(line)),
        "the walk-through should restart a node"
    );

    let dir = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_phalanx"));
    let path = format!("{}:{}", binary.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    // -e: any failing command fails the run; -u: a misspelt variable too.
    let script = format!("set -euo pipefail\n{}\n", with_free_ports(&script));
    // Output to files, not pipes: the nodes left in the background hold
    // the files open, and the test waits for bash alone.
    let out = |name: &str| Stdio::from(std::fs::File::create(dir.path().join(name)).unwrap());
    let mut command = Command::new("bash");
    command
        .args(["-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .stdout(out("stdout.txt"))
        .stderr(out("stderr.txt"))
        .process_group(0);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PHALANX_")) {
        command.env_remove(name);
    }
    let mut child = command.spawn().expect("bash runs");
    let _group = Group(child.id());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > WALKTHROUGH_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(dir.path().join("stdout.txt")).unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap_or_default();
    let logs: String = ["node1", "node2", "node3", "node4", "agent"]
        .iter()
        .map(|name| {
            let log = std::fs::read_to_string(dir.path().join(format!("phalanx-walkthrough/{name}.log")));
            format!("--- {name}.log\n{}\n", log.unwrap_or_default())
        })
        .collect();
    let how = status.map(|status| status.to_string()).unwrap_or_else(|| "still running".into());
    assert!(
        status.is_some_and(|status| status.success()),
        "the walk-through failed ({how}) after {:?}\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n{logs}",
        started.elapsed()
    );
    // What the text says the reader will see.
    assert!(stdout.contains("added: a voter now"), "{stdout}");
    assert!(stdout.contains("DOWN"), "a stopped node shows as down:\n{stdout}");
    assert!(logs.contains("succeeded in"), "the agent ran the task:\n{logs}");
}

#[test]
fn blocks_and_ports() {
    let readme =
        format!("text\n{MARK}\n```sh\na 127.0.0.1:7001\nb\n```\nmore\n```sh\nnot this\n```\n{MARK}\n```sh\nc\n```\n");
    assert_eq!(walkthrough_blocks(&readme), ["a 127.0.0.1:7001\nb", "c"]);
    let moved = with_free_ports("x=127.0.0.1:7001,127.0.0.1:7001/127.0.0.1:8001 127.0.0.1:");
    let ports: Vec<&str> = moved.split("127.0.0.1:").skip(1).collect();
    assert_eq!(ports[0].trim_end_matches(','), ports[1].trim_end_matches(['/']), "{moved}");
    assert!(!moved.contains(":7001") && !moved.contains(":8001"), "{moved}");
}
