//! The redb store at its boundary: openraft's own storage suite, and restarts
//! (drop every handle, reopen the same directory) that must find the vote,
//! the committed log id, the log, the snapshot and the state machine again.
//! Durability across a real SIGKILL is left to the real-process tests in
//! `crates/phalanx-cli/tests/crash.rs`.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine, StorageHelper};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogState, Membership, RaftLogReader, RaftSnapshotBuilder, Vote,
};
use phalanx_core::{Command, NewTask, Request};
use phalanx_server::raft_types::{LogId, Member, StorageError, TypeConfig};
use phalanx_server::store::{self, LogStore, StateMachineStore};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    /// A fresh directory per build; the `TempDir` is the suite's guard, so the
    /// directory outlives the store that uses it.
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, state_machine) = store::open(dir.path()).expect("open store");
        Ok((dir, log, state_machine))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft's storage suite passes");
}

// ---- restarts ----

const TERM: u64 = 2;
const NODE: u64 = 1;

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(TERM, NODE), index)
}

fn membership() -> Membership<u64, Member> {
    let nodes = BTreeMap::from([(NODE, Member::new("127.0.0.1:7001", "127.0.0.1:7101"))]);
    Membership::new(vec![BTreeSet::from([NODE])], nodes)
}

/// A log as a leader writes it: its blank entry, the membership, then
/// `submit_count` entries each submitting one task.
fn entries(submit_count: u64) -> Vec<Entry<TypeConfig>> {
    let mut entries = vec![
        Entry { log_id: log_id(1), payload: EntryPayload::Blank },
        Entry { log_id: log_id(2), payload: EntryPayload::Membership(membership()) },
    ];
    for n in 0..submit_count {
        let task = NewTask {
            queue: "work".to_string(),
            payload: format!("job {n}"),
            priority: 5,
            deadline_ms: None,
            max_attempts: 3,
            idempotency_key: Some(format!("key-{n}")),
            parent_id: None,
            parent_fence: None,
            conversation_id: None,
            concurrency_key: None,
            cost_estimate: None,
            budget: None,
            traceparent: None,
        };
        let request = Request { now_ms: 1_000 + n, commands: vec![Command::Submit { tasks: vec![task] }] };
        entries.push(Entry { log_id: log_id(3 + n), payload: EntryPayload::Normal(request) });
    }
    entries
}

/// Entries compared by their stored form (`Entry` has no `PartialEq`).
fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("serialisable")
}

fn state_json(state_machine: &StateMachineStore) -> String {
    json(&state_machine.shared().data.read().expect("lock").state)
}

fn reopen(dir: &Path) -> (LogStore, StateMachineStore) {
    store::open(dir).expect("reopen store")
}

#[tokio::test]
async fn restart_finds_vote_committed_log_snapshot_and_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let all = entries(6); // indexes 1..=8
    let vote = Vote::new_committed(TERM, NODE);

    let (snapshot_meta, snapshot_bytes, snapshot_state, final_state) = {
        let (mut log, mut state_machine) = store::open(dir.path()).expect("open store");
        log.save_vote(&vote).await.expect("save vote");
        log.blocking_append(all.clone()).await.expect("append");
        log.save_committed(Some(log_id(8))).await.expect("save committed");

        let responses = state_machine.apply(all[..5].to_vec()).await.expect("apply 1..=5");
        assert_eq!(responses.len(), 5);
        assert_eq!(responses[4].outcomes.len(), 1, "one outcome per command");
        let snapshot = state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(5)));
        assert_eq!(snapshot.meta.snapshot_id, format!("{TERM}-5-1"));
        let snapshot_state = state_json(&state_machine);
        // openraft keeps only the meta of a built snapshot; the bytes are
        // read back from disk, as when one is sent to a follower.
        let mut stored = state_machine.get_current_snapshot().await.expect("read snapshot").expect("a snapshot");
        assert_eq!(stored.meta, snapshot.meta);
        let bytes = stored.snapshot.read_all().await.expect("the snapshot's bytes");
        assert!(bytes.starts_with(store::SNAPSHOT_MAGIC), "a snapshot of the current format has its header");
        assert_eq!(bytes[8..12], store::SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        log.purge(log_id(3)).await.expect("purge");

        state_machine.apply(all[5..].to_vec()).await.expect("apply 6..=8");
        assert_eq!(*state_machine.shared().applied_tx.borrow(), 8);
        (snapshot.meta, bytes, snapshot_state, state_json(&state_machine))
        // Every handle on the database drops here, closing the file.
    };

    let (mut log, mut state_machine) = reopen(dir.path());
    assert_eq!(log.read_vote().await.expect("read vote"), Some(vote));
    assert_eq!(log.read_committed().await.expect("read committed"), Some(log_id(8)));
    assert_eq!(
        log.get_log_state().await.expect("log state"),
        LogState { last_purged_log_id: Some(log_id(3)), last_log_id: Some(log_id(8)) }
    );
    let stored = log.try_get_log_entries(0..100).await.expect("read log");
    assert_eq!(json(&stored), json(&all[3..]), "entries after the purge point, as written");

    let mut snapshot = state_machine.get_current_snapshot().await.expect("read snapshot").expect("a snapshot");
    assert_eq!(snapshot.meta, snapshot_meta);
    assert_eq!(snapshot.snapshot.read_all().await.expect("the snapshot's bytes"), snapshot_bytes);

    // Before replay the state machine is the snapshot's...
    let (last_applied, last_membership) = state_machine.applied_state().await.expect("applied state");
    assert_eq!(last_applied, Some(log_id(5)));
    assert_eq!(last_membership.log_id(), &Some(log_id(2)));
    assert_eq!(last_membership.membership(), &membership());
    assert_eq!(state_json(&state_machine), snapshot_state);
    assert_eq!(*state_machine.shared().applied_tx.borrow(), 5);

    // ...and openraft's startup re-applies the committed log after it.
    StorageHelper::new(&mut log, &mut state_machine).get_initial_state().await.expect("initial state");
    assert_eq!(state_machine.applied_state().await.expect("applied state").0, Some(log_id(8)));
    assert_eq!(state_json(&state_machine), final_state, "byte-identical state after replay");
    assert_eq!(*state_machine.shared().applied_tx.borrow(), 8);

    // The snapshot counter carries on from the stored id, so ids stay distinct.
    let next = state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    assert_eq!(next.meta.snapshot_id, format!("{TERM}-8-2"));
}

#[tokio::test]
async fn installed_snapshot_survives_restart() {
    let leader_dir = tempfile::tempdir().expect("temp dir");
    let (_leader_log, mut leader) = store::open(leader_dir.path()).expect("open leader store");
    leader.apply(entries(3)).await.expect("apply");
    leader.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    let mut snapshot = leader.get_current_snapshot().await.expect("read snapshot").expect("a snapshot");
    let bytes = snapshot.snapshot.read_all().await.expect("the snapshot's bytes");

    let follower_dir = tempfile::tempdir().expect("temp dir");
    {
        let (_log, mut follower) = store::open(follower_dir.path()).expect("open follower store");
        let mut receiving = follower.begin_receiving_snapshot().await.expect("receive");
        tokio::io::AsyncWriteExt::write_all(&mut receiving, &bytes).await.expect("write");
        tokio::io::AsyncWriteExt::shutdown(&mut receiving).await.expect("a known header");
        follower.install_snapshot(&snapshot.meta, receiving).await.expect("install");
        assert_eq!(*follower.shared().applied_tx.borrow(), 5);
        assert_eq!(state_json(&follower), state_json(&leader));
    }

    let (_log, mut follower) = reopen(follower_dir.path());
    let mut stored = follower.get_current_snapshot().await.expect("read snapshot").expect("a snapshot");
    assert_eq!(stored.meta, snapshot.meta);
    assert_eq!(stored.snapshot.read_all().await.expect("the snapshot's bytes"), bytes);
    assert_eq!(follower.applied_state().await.expect("applied state").0, Some(log_id(5)));
    assert_eq!(state_json(&follower), state_json(&leader));
}
