//! Storage formats across versions, with the real binary: a data directory
//! written by the previous format (the fixture `fixtures/v1-data-dir.tar.xz`,
//! see `fixtures/README.md`) is read and upgraded, and a database or a
//! snapshot of a format this binary does not know stops the server with
//! exit status 1 and a message naming both versions, changing nothing.

mod common;

use common::{wait_until, Cluster, Environment};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A few seconds after the fixture was written: its node resumes at that
/// wall clock time, so that no lease, finished task or policy ages out of a
/// fixture made once and read for years.
const FIXTURE_RESUME_TIME: &str = "@2026-11-30 18:49:25";

/// The node's environment for the fixture: its wall clock at
/// `FIXTURE_RESUME_TIME`. Where libfaketime is missing the test says it
/// skipped, unless `PHALANX_REQUIRE_ENV_FAULTS=1` (set by `scripts/test`).
fn fixture_clock() -> Option<Environment> {
    if !Path::new(FAKETIME_LIBRARY).exists() {
        assert!(
            std::env::var("PHALANX_REQUIRE_ENV_FAULTS").as_deref() != Ok("1"),
            "PHALANX_REQUIRE_ENV_FAULTS=1 but libfaketime is unavailable"
        );
        eprintln!("skipped: libfaketime is unavailable");
        return None;
    }
    let env =
        [("LD_PRELOAD", FAKETIME_LIBRARY), ("FAKETIME_DONT_FAKE_MONOTONIC", "1"), ("FAKETIME", FIXTURE_RESUME_TIME)];
    Some(Environment { wrapper: Vec::new(), env: env.map(|(k, v)| (k.to_string(), v.to_string())).to_vec() })
}

/// Asserts that `actual` tasks are `expected`, but for one change time may
/// bring: the fixture's agent no longer heartbeats, so after its time to
/// live (real time, not the wall clock) its leases are revoked and its
/// leased task is pending again, with the same fence and attempts.
fn assert_same_tasks(actual: &[Value], expected: &[Value], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: {actual:#?}");
    for (actual, expected) in actual.iter().zip(expected) {
        let mut revoked = expected.clone();
        revoked["state"] = json!("pending");
        revoked["lease"] = Value::Null;
        assert!(
            actual == expected || (expected["state"] == "leased" && *actual == revoked),
            "{what}: {actual:#} is not {expected:#}"
        );
    }
}

/// A one-node cluster on `data_dir` (not started), taking a snapshot every
/// eight log entries so that the tests see new snapshots soon.
fn one_node_on(data_dir: PathBuf) -> Cluster {
    Cluster::one_node_on(data_dir, &["--snapshot-logs-since-last", "8", "--snapshot-logs-kept", "0"])
}

fn unpack_fixture(into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(into)
        .arg("-xJf")
        .arg(format!("{FIXTURES}/v1-data-dir.tar.xz"))
        .status()
        .expect("tar");
    assert!(status.success(), "unpacking the fixture");
}

/// The snapshot body files in a data directory.
fn snapshot_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "phx"))
        .collect();
    files.sort();
    files
}

/// What a task must keep across versions.
fn essentials(task: &Value) -> Value {
    json!({
        "id": task["id"], "state": task["state"], "payload": task["payload"], "queue": task["queue"],
        "priority": task["priority"], "last_fence": task["last_fence"], "attempts": task["attempts"],
        "lease": task["lease"], "result": task["result"], "error": task["error"],
    })
}

async fn tasks(cluster: &Cluster) -> Vec<Value> {
    let (status, body) = cluster.get(1, "/v1/tasks?limit=100").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut tasks: Vec<Value> = body["tasks"].as_array().expect("tasks").iter().map(essentials).collect();
    tasks.sort_by_key(|task| task["id"].as_u64());
    tasks
}

/// Runs `phalanx server` on `data_dir` until it exits (at most 20 s) and
/// answers its exit status and standard error.
fn server_exit(data_dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["server", "--node-id", "1", "--listen", &format!("127.0.0.1:{}", common::free_port())])
        .arg("--data-dir")
        .arg(data_dir)
        .env("PHALANX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn assert_unchanged(data_dir: &Path, before: &BTreeMap<String, Vec<u8>>) {
    let after = contents(data_dir);
    let changed: Vec<&String> =
        before.keys().chain(after.keys()).filter(|name| before.get(*name) != after.get(*name)).collect();
    assert!(changed.is_empty(), "nothing changed on disk, but {changed:?} did");
}

/// Every file of a directory with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_file())
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_previous_format_is_read_then_written_in_the_new_one() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/v1-data-dir.tasks.json")).unwrap()).unwrap();
    let mut expected: Vec<Value> = expected["tasks"].as_array().unwrap().iter().map(essentials).collect();
    expected.sort_by_key(|task| task["id"].as_u64());
    assert_eq!(expected.len(), 6, "the fixture's tasks");
    let states: std::collections::BTreeSet<&str> = expected.iter().map(|t| t["state"].as_str().unwrap()).collect();
    assert!(states.len() >= 5, "tasks in several states: {states:?}");

    let Some(clock) = fixture_clock() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    unpack_fixture(&data_dir);
    assert!(snapshot_files(&data_dir).is_empty(), "format 1 keeps its snapshot inside the database");
    let mut cluster = one_node_on(data_dir.clone());
    cluster.servers.get_mut(&1).unwrap().spawn_with(&clock);
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    assert_same_tasks(&tasks(&cluster).await, &expected, "every task, with its state, fence and payload");

    // Enough new entries for a snapshot: it is written in the new format.
    for i in 0..20 {
        let (status, body) =
            cluster.post(1, "/v1/tasks", &json!({"queue": "after", "payload": {"i": i}})).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    wait_until(Duration::from_secs(20), "a snapshot in the new format", async || snapshot_files(&data_dir).len() == 1)
        .await;
    let snapshot = std::fs::read(&snapshot_files(&data_dir)[0]).unwrap();
    assert_eq!(&snapshot[..8], phalanx_server::store::SNAPSHOT_MAGIC);
    assert_eq!(snapshot[8..12], phalanx_server::store::SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    let before = tasks(&cluster).await;
    assert_eq!(before.len(), 26);

    // And a restart reads it back.
    cluster.servers.get_mut(&1).unwrap().signal("TERM");
    cluster.servers.get_mut(&1).unwrap().child.take().unwrap().wait().unwrap();
    cluster.servers.get_mut(&1).unwrap().spawn_with(&clock);
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    assert_same_tasks(&tasks(&cluster).await, &before, "the same tasks after a restart on the new format");
}

/// Sets the database's recorded storage format version.
fn set_format_version(data_dir: &Path, version: u32) {
    let db = redb::Database::create(data_dir.join("phalanx.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("meta")).unwrap();
        meta.insert("format_version", version.to_string().as_bytes()).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_database_of_a_newer_format_is_refused_naming_both_versions_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    unpack_fixture(&data_dir);
    set_format_version(&data_dir, 99);
    let before = contents(&data_dir);
    let (status, stderr) = server_exit(&data_dir);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("version 99") && stderr.contains("versions 1 to 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_unchanged(&data_dir, &before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_an_unknown_format_is_refused_at_start_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let mut cluster = one_node_on(data_dir.clone());
    cluster.servers.get_mut(&1).unwrap().spawn();
    cluster.wait_ready(1, Duration::from_secs(30)).await;
    for i in 0..20 {
        let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": {"i": i}})).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    wait_until(Duration::from_secs(20), "a snapshot", async || snapshot_files(&data_dir).len() == 1).await;
    // Stopped cleanly: after a crash redb repairs the file at the next
    // open, a change on disk that is redb's own.
    cluster.servers.get_mut(&1).unwrap().signal("TERM");
    cluster.servers.get_mut(&1).unwrap().child.take().unwrap().wait().unwrap();

    // A node's exit may leave the database to be repaired at the next open,
    // which is redb's own change on disk: done here, before the comparison.
    drop(redb::Database::create(data_dir.join("phalanx.redb")).unwrap());
    let file = snapshot_files(&data_dir).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let before = contents(&data_dir);
    let (status, stderr) = server_exit(&data_dir);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("snapshot format version 7") && stderr.contains("versions 1 to 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_unchanged(&data_dir, &before);
}
