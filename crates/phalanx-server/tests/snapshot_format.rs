//! Snapshot formats at the store and Raft boundary: a committed snapshot of
//! the current format still decodes to the same state (so a change to the
//! encoded types that the format cannot absorb fails here, and must come
//! with a new snapshot format version and a decoder for this one); and a
//! snapshot of an unknown format sent by a leader is refused with an error
//! naming both versions while the Raft node goes on.
//!
//! The committed snapshot is `fixtures/snapshot-v2.*`; to write it again (only
//! together with a new `SNAPSHOT_FORMAT_VERSION`):
//! `PHALANX_WRITE_FIXTURES=1 cargo test -p phalanx-server --test snapshot_format`.

use openraft::raft::InstallSnapshotRequest;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, Membership, RaftSnapshotBuilder, Vote};
use phalanx_core::{Command, NewTask, Request, State};
use phalanx_server::raft_types::{LogId, Member, Raft, TypeConfig};
use phalanx_server::store::{self, SnapshotData, StateMachineStore};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const TERM: u64 = 2;
const NODE: u64 = 1;
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(TERM, NODE), index)
}

fn new_task(n: u64) -> NewTask {
    NewTask {
        queue: "work".to_string(),
        payload: format!("{{\"job\":{n}}}"),
        priority: (n % 10) as u8,
        deadline_ms: Some(1_000_000 + n),
        max_attempts: 3,
        idempotency_key: Some(format!("key-{n}")),
        parent_id: None,
        parent_fence: None,
        conversation_id: Some("talk".to_string()),
        concurrency_key: Some(format!("tenant:{}", n % 2)),
        cost_estimate: Some(10),
        budget: None,
        traceparent: None,
    }
}

/// A log that leaves tasks in most states, an agent, leases, a context.
fn entries() -> Vec<Entry<TypeConfig>> {
    let nodes = BTreeMap::from([(NODE, Member::new("127.0.0.1:7001", "127.0.0.1:7101"))]);
    let mut entries = vec![
        Entry { log_id: log_id(1), payload: EntryPayload::Blank },
        Entry {
            log_id: log_id(2),
            payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([NODE])], nodes)),
        },
    ];
    let commands = vec![
        Command::Submit { tasks: (0..6).map(new_task).collect() },
        Command::RegisterAgent {
            agent_id: "agent-1".to_string(),
            capabilities: BTreeSet::from(["work".to_string()]),
            capacity: 10,
            session: "secret".to_string(),
        },
        Command::Lease {
            agent_id: "agent-1".to_string(),
            epoch: 1,
            queues: vec!["work".to_string()],
            tasks_max: 4,
            lease_ttl_ms: 60_000,
        },
        Command::ContextPut {
            conversation_id: "talk".to_string(),
            key: "k".to_string(),
            value: "\"v\"".to_string(),
            expected_version: None,
            writer: None,
        },
    ];
    for (n, command) in commands.into_iter().enumerate() {
        let request = Request { now_ms: 1_000 + n as u64, commands: vec![command] };
        entries.push(Entry { log_id: log_id(3 + n as u64), payload: EntryPayload::Normal(request) });
    }
    // The lease entry (index 5) is every grant's fence; the tasks leased
    // are the four of highest priority: 5, 4, 3, 2 (ids 6, 5, 4, 3).
    let reports = vec![
        Command::Complete { task_id: 6, fence: 5, result: "{\"ok\":true}".to_string(), usage: None },
        Command::Fail { task_id: 5, fence: 5, error: "broken".to_string(), retryable: false, usage: None },
        Command::Fail { task_id: 4, fence: 5, error: "again".to_string(), retryable: true, usage: None },
        Command::Cancel { task_id: 1 },
    ];
    for (n, command) in reports.into_iter().enumerate() {
        let index = 7 + n as u64;
        let request = Request { now_ms: 2_000 + n as u64, commands: vec![command] };
        entries.push(Entry { log_id: log_id(index), payload: EntryPayload::Normal(request) });
    }
    entries
}

fn state_value(state_machine: &StateMachineStore) -> serde_json::Value {
    serde_json::to_value(&state_machine.shared().data.read().expect("lock").state).expect("serialisable")
}

/// A leader's state machine after `entries`, with its snapshot taken: the
/// snapshot's meta and bytes.
async fn leader() -> (tempfile::TempDir, StateMachineStore, openraft::SnapshotMeta<u64, Member>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut state_machine) = store::open(dir.path()).expect("open store");
    state_machine.apply(entries()).await.expect("apply");
    state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    let mut snapshot = state_machine.get_current_snapshot().await.expect("read").expect("a snapshot");
    let bytes = snapshot.snapshot.read_all().await.expect("the snapshot's bytes");
    (dir, state_machine, snapshot.meta, bytes)
}

#[tokio::test]
async fn a_committed_snapshot_of_the_current_format_decodes_to_the_same_state() {
    let bytes_path = format!("{FIXTURES}/snapshot-v{}.bin", store::SNAPSHOT_FORMAT_VERSION);
    let meta_path = format!("{FIXTURES}/snapshot-v{}.meta.json", store::SNAPSHOT_FORMAT_VERSION);
    let state_path = format!("{FIXTURES}/snapshot-v{}.state.json", store::SNAPSHOT_FORMAT_VERSION);
    if std::env::var("PHALANX_WRITE_FIXTURES").as_deref() == Ok("1") {
        let (_dir, leader, meta, bytes) = leader().await;
        std::fs::write(&bytes_path, bytes).unwrap();
        std::fs::write(&meta_path, serde_json::to_string_pretty(&meta).unwrap()).unwrap();
        std::fs::write(&state_path, serde_json::to_string_pretty(&state_value(&leader)).unwrap()).unwrap();
    }
    let bytes = std::fs::read(&bytes_path).expect("the committed snapshot");
    assert!(bytes.starts_with(store::SNAPSHOT_MAGIC));
    let meta = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    // The state as JSON, which absorbs fields added with a default: read
    // into today's `State` and written again, it is what the binary
    // snapshot must decode to.
    let state: State = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let expected = serde_json::to_value(&state).unwrap();

    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut follower) = store::open(dir.path()).expect("open store");
    follower.install_snapshot(&meta, Box::new(SnapshotData::in_memory(bytes))).await.unwrap_or_else(|error| {
        panic!(
            "the committed snapshot of format {} no longer decodes ({error}): a change to the \
             snapshot's types that MessagePack cannot absorb (a field inserted before the last, \
             removed, reordered or retyped) needs a new SNAPSHOT_FORMAT_VERSION and a decoder for this one",
            store::SNAPSHOT_FORMAT_VERSION
        )
    });
    assert_eq!(state_value(&follower), expected, "the committed snapshot decodes to its state");
    let tasks = expected["tasks"].as_object().unwrap();
    let states: BTreeSet<&str> = tasks.values().map(|task| task["state"].as_str().unwrap()).collect();
    assert_eq!(states, BTreeSet::from(["cancelled", "failed", "leased", "pending", "succeeded"]));
}

#[tokio::test]
async fn a_received_snapshot_of_an_unknown_format_is_refused_and_the_node_goes_on() {
    let (_leader_dir, leader, meta, good) = leader().await;
    let (dir, raft, shared) = follower().await;
    let mut unknown = good.clone();
    unknown[8..12].copy_from_slice(&7u32.to_le_bytes());
    let request = |data: Vec<u8>| InstallSnapshotRequest {
        vote: Vote::new_committed(TERM, NODE),
        meta: meta.clone(),
        offset: 0,
        data,
        done: true,
    };
    let error = raft.install_snapshot(request(unknown)).await.expect_err("an unknown format is refused");
    let message = error.to_string();
    assert!(message.contains("snapshot format version 7") && message.contains("versions 1 to 2"), "{message}");
    assert!(raft.metrics().borrow().running_state.is_ok(), "the Raft node goes on");
    assert_eq!(*shared.applied_tx.borrow(), 0, "nothing was installed");
    assert!(std::fs::read_dir(dir.path())
        .unwrap()
        .all(|entry| { !entry.unwrap().file_name().to_string_lossy().ends_with(".phx") }));

    // The same snapshot in a known format is then installed.
    raft.install_snapshot(request(good)).await.expect("install");
    let mut applied = shared.applied_tx.subscribe();
    tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|index| *index == 10))
        .await
        .expect("installed within 10 s")
        .expect("applied");
    assert_eq!(
        serde_json::to_value(&shared.data.read().unwrap().state).unwrap(),
        state_value(&leader),
        "the follower has the leader's state"
    );
    raft.shutdown().await.expect("shutdown");
}

/// The `.phx` files (snapshot bodies) in `dir`, with their lengths.
fn snapshot_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".phx"))
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), entry.metadata().unwrap().len()))
        .collect();
    files.sort();
    files
}

/// A follower's Raft node on a fresh directory, and its shared state.
async fn follower() -> (tempfile::TempDir, Raft, Arc<store::StateMachineShared>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, follower) = store::open(dir.path()).expect("open store");
    let shared = follower.shared();
    let config = Arc::new(openraft::Config::default().validate().unwrap());
    let network = phalanx_server::network::Network::new(None, None).expect("a plain HTTP transport");
    let raft = Raft::new(2, config, network, log, follower).await.expect("raft");
    (dir, raft, shared)
}

fn chunk(
    meta: &openraft::SnapshotMeta<u64, Member>,
    id: &str,
    offset: usize,
    data: &[u8],
    done: bool,
) -> InstallSnapshotRequest<TypeConfig> {
    let mut meta = meta.clone();
    meta.snapshot_id = id.to_string();
    InstallSnapshotRequest {
        vote: Vote::new_committed(TERM, NODE),
        meta,
        offset: offset as u64,
        data: data.to_vec(),
        done,
    }
}

/// A snapshot is received into a file of its own as its chunks arrive, not
/// gathered in memory; one the leader abandons for another is deleted; the
/// one that completes is the node's snapshot, and the only file left.
#[tokio::test]
async fn a_received_snapshot_goes_to_a_file_chunk_by_chunk_and_an_abandoned_one_leaves_nothing() {
    let (_leader_dir, leader, meta, bytes) = leader().await;
    let (dir, raft, shared) = follower().await;
    let third = bytes.len() / 3;

    raft.install_snapshot(chunk(&meta, "first", 0, &bytes[..third], false)).await.expect("first chunk");
    // The write is handed to a blocking thread: it lands soon after the answer.
    let started = std::time::Instant::now();
    let files = loop {
        let files = snapshot_files(dir.path());
        if files.len() != 1 || files[0].1 == third as u64 || started.elapsed() > Duration::from_secs(5) {
            break files;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(files.len(), 1, "the chunk is in a file as it arrives: {files:?}");
    assert_eq!(files[0].1, third as u64, "{files:?}");

    // The leader starts over with another snapshot: the first one's file goes.
    raft.install_snapshot(chunk(&meta, "second", 0, &bytes[..third], false)).await.expect("a new stream");
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 1, "the abandoned snapshot's file is deleted: {files:?}");
    raft.install_snapshot(chunk(&meta, "second", third, &bytes[third..2 * third], false)).await.expect("chunk 2");
    raft.install_snapshot(chunk(&meta, "second", 2 * third, &bytes[2 * third..], true)).await.expect("last chunk");

    let mut applied = shared.applied_tx.subscribe();
    tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|index| *index == 10))
        .await
        .expect("installed within 10 s")
        .expect("applied");
    assert_eq!(serde_json::to_value(&shared.data.read().unwrap().state).unwrap(), state_value(&leader));
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::read(dir.path().join(&files[0].0)).unwrap(), bytes, "the file holds the leader's bytes");
    raft.shutdown().await.expect("shutdown");
}

/// A chunk that would take a received snapshot past `SNAPSHOT_BYTES_MAX`
/// (a forged offset) is refused before anything is written: no sparse file
/// of a gigabyte, and the node goes on.
#[tokio::test]
async fn a_chunk_past_the_snapshot_bound_is_refused_before_it_is_written() {
    let (_leader_dir, _leader, meta, bytes) = leader().await;
    let (dir, raft, shared) = follower().await;
    raft.install_snapshot(chunk(&meta, "s", 0, &bytes[..16], false)).await.expect("first chunk");
    let error = raft
        .install_snapshot(chunk(&meta, "s", store::SNAPSHOT_BYTES_MAX, b"x", false))
        .await
        .expect_err("past the bound");
    assert!(error.to_string().contains("SNAPSHOT_BYTES_MAX"), "{error}");
    assert!(raft.metrics().borrow().running_state.is_ok(), "the Raft node goes on");
    assert_eq!(*shared.applied_tx.borrow(), 0, "nothing was installed");
    let files = snapshot_files(dir.path());
    assert!(files.iter().all(|(_, length)| *length <= 16), "{files:?}");
    raft.shutdown().await.expect("shutdown");
}

/// A received snapshot whose header is good but whose body does not decode
/// is refused by the store, which keeps its state and leaves no file.
#[tokio::test]
async fn a_received_snapshot_that_does_not_decode_changes_nothing_and_leaves_no_file() {
    use tokio::io::AsyncWriteExt;
    let (_leader_dir, _leader, meta, bytes) = leader().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut follower) = store::open(dir.path()).expect("open store");
    let mut data = follower.begin_receiving_snapshot().await.expect("begin");
    let mut broken = bytes[..store::SNAPSHOT_MAGIC.len() + 4].to_vec();
    broken.extend_from_slice(&[0xc1; 64]); // 0xc1 is never used in MessagePack
    data.write_all(&broken).await.unwrap();
    data.shutdown().await.expect("a known header");
    assert_eq!(snapshot_files(dir.path()).len(), 1, "received into a file");
    follower.install_snapshot(&meta, data).await.expect_err("does not decode");
    assert_eq!(follower.shared().data.read().unwrap().last_applied, None, "the state is as it was");
    assert_eq!(snapshot_files(dir.path()), vec![], "no file left");
}

/// A follower may still be reading the snapshot it was sent when a newer one
/// replaces it and its file is deleted: what it reads is still the whole of
/// the snapshot it began with.
#[tokio::test]
async fn a_snapshot_being_sent_stays_whole_when_a_newer_one_replaces_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut state_machine) = store::open(dir.path()).expect("open store");
    let entries = entries();
    let (first, rest) = entries.split_at(6);
    state_machine.apply(first.to_vec()).await.expect("apply");
    state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    let mut sending = state_machine.get_current_snapshot().await.expect("read").expect("a snapshot");
    let before = snapshot_files(dir.path());
    state_machine.apply(rest.to_vec()).await.expect("apply");
    state_machine.get_snapshot_builder().await.build_snapshot().await.expect("a newer snapshot");
    assert_ne!(snapshot_files(dir.path()), before, "the first snapshot's file is gone");
    let bytes = sending.snapshot.read_all().await.expect("still readable");
    assert_eq!(bytes.len() as u64, before[0].1, "the whole of the first snapshot");

    let other = tempfile::tempdir().expect("temp dir");
    let (_log, mut follower) = store::open(other.path()).expect("open store");
    follower.install_snapshot(&sending.meta, Box::new(SnapshotData::in_memory(bytes))).await.expect("install");
    assert_eq!(follower.shared().data.read().unwrap().last_applied, Some(log_id(6)));
}
