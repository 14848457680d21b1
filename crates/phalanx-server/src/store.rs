//! redb storage for openraft: the log, the vote, the committed index and
//! snapshots, all in one file per node (`phalanx.redb`).
//!
//! Every write is one redb transaction committed with `Durability::Immediate`
//! (fsync) before openraft hears it is done; `append` writes a whole batch of
//! entries in one transaction, so one fsync serves a batch (group commit).
//! The state machine itself lives in memory: it is made durable by snapshots,
//! written to redb before openraft may purge the log they cover, plus replay
//! of the fsynced log after the snapshot on restart.
//! redb is synchronous, so every call runs on tokio's blocking threads.

use crate::raft_types::{LogId, Member, NodeId, StorageError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership, Vote,
};
use phalanx_core::{Limits, Response, State};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// A snapshot larger than this is refused rather than loaded into memory.
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;

type Result<T> = std::result::Result<T, StorageError>;

fn read_error(error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read(&error).into()
}
fn write_error(error: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write(&error).into()
}

/// Runs a redb call on a blocking thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(write_error)?
}

pub struct StateMachineData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership<NodeId, Member>,
    pub state: State,
}

pub struct StateMachineShared {
    pub data: RwLock<StateMachineData>,
    /// The last applied log index, sent after every apply batch; long-polls
    /// and read-index waits watch it.
    pub applied_tx: tokio::sync::watch::Sender<u64>,
}

/// The serialised form of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Member>,
    state: State,
}

/// Opens (or creates) `phalanx.redb` in `data_dir` and returns both halves.
pub fn open(data_dir: &Path) -> anyhow::Result<(LogStore, StateMachineStore)> {
    let db = Arc::new(Database::create(data_dir.join("phalanx.redb"))?);
    let txn = db.begin_write()?;
    txn.open_table(LOG)?;
    txn.open_table(META)?;
    txn.open_table(SNAPSHOT)?;
    txn.commit()?;
    let mut data = StateMachineData {
        last_applied: None,
        last_membership: StoredMembership::default(),
        state: State::new(Limits::default()),
    };
    let mut snapshot_counter = 0;
    if let Some((meta, bytes)) = read_snapshot(&db)? {
        let body: SnapshotBody = serde_json::from_slice(&bytes)?;
        data = StateMachineData {
            last_applied: body.last_applied,
            last_membership: body.last_membership,
            state: body.state,
        };
        data.state.check_invariants();
        snapshot_counter = meta.snapshot_id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    }
    let applied = data.last_applied.map(|l| l.index).unwrap_or(0);
    let shared =
        Arc::new(StateMachineShared { data: RwLock::new(data), applied_tx: tokio::sync::watch::channel(applied).0 });
    let state_machine =
        StateMachineStore { db: db.clone(), shared, snapshot_counter: Arc::new(AtomicU64::new(snapshot_counter)) };
    let log =
        LogStore { db, health: Arc::default(), stall_failpoint: Arc::new(data_dir.join("failpoint-stall-storage")) };
    Ok((log, state_machine))
}

fn read_snapshot(db: &Database) -> anyhow::Result<Option<(SnapshotMeta<NodeId, Member>, Vec<u8>)>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (table.get("meta")?, table.get("data")?) else { return Ok(None) };
    let meta = serde_json::from_slice(meta.value())?;
    Ok(Some((meta, data.value().to_vec())))
}

fn write_snapshot(db: &Database, meta: &SnapshotMeta<NodeId, Member>, bytes: &[u8]) -> Result<()> {
    let signature = Some(meta.signature());
    let fail = |error: &dyn std::error::Error| -> StorageError {
        StorageIOError::write_snapshot(signature.clone(), openraft::AnyError::error(error.to_string())).into()
    };
    let meta_bytes = serde_json::to_vec(meta).map_err(|e| fail(&e))?;
    let txn = db.begin_write().map_err(|e| fail(&e))?;
    {
        let mut table = txn.open_table(SNAPSHOT).map_err(|e| fail(&e))?;
        table.insert("meta", meta_bytes.as_slice()).map_err(|e| fail(&e))?;
        table.insert("data", bytes).map_err(|e| fail(&e))?;
    }
    txn.commit().map_err(|e| fail(&e))
}

// ---- the log ----

/// How storage is doing, read by readiness: a write that has been in progress
/// for long means a node that looks alive but cannot make progress.
#[derive(Default)]
pub struct StorageHealth {
    /// Wall-clock milliseconds when the log write in progress started (0: none).
    pub write_started_ms: AtomicU64,
    /// Duration of the last completed log write, in microseconds.
    pub last_write_us: AtomicU64,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    pub health: Arc<StorageHealth>,
    /// Failpoint for tests of "up but not working": while this file exists in
    /// the data directory, log writes wait, as on a disk that has stalled.
    stall_failpoint: Arc<std::path::PathBuf>,
}

impl LogStore {
    fn get_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>> {
        let txn = db.begin_read().map_err(read_error)?;
        let table = txn.open_table(META).map_err(read_error)?;
        match table.get(key).map_err(read_error)? {
            Some(value) => Ok(Some(serde_json::from_slice(value.value()).map_err(read_error)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(write_error)?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(write_error)?;
            txn.open_table(META).map_err(write_error)?.insert(key, bytes.as_slice()).map_err(write_error)?;
            txn.commit().map_err(write_error)
        })
        .await
    }

    /// Deletes the log entries whose index is in `range`.
    async fn delete_range(&self, range: impl RangeBounds<u64> + Send + 'static) -> Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(write_error)?;
            {
                let mut table = txn.open_table(LOG).map_err(write_error)?;
                table.retain_in(range, |_, _| false).map_err(write_error)?;
            }
            txn.commit().map_err(write_error)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let db = self.db.clone();
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        blocking(move || {
            let txn = db.begin_read().map_err(read_error)?;
            let table = txn.open_table(LOG).map_err(read_error)?;
            let mut entries = Vec::new();
            for item in table.range::<u64>((start, end)).map_err(read_error)? {
                let (_, value) = item.map_err(read_error)?;
                entries.push(serde_json::from_slice(value.value()).map_err(read_error)?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged_log_id: Option<LogId> = LogStore::get_meta(&db, "last_purged")?;
            let txn = db.begin_read().map_err(read_error)?;
            let table = txn.open_table(LOG).map_err(read_error)?;
            let last = match table.last().map_err(read_error)? {
                Some((_, value)) => {
                    let entry: Entry<TypeConfig> = serde_json::from_slice(value.value()).map_err(read_error)?;
                    Some(entry.log_id)
                }
                None => last_purged_log_id,
            };
            Ok(LogState { last_purged_log_id, last_log_id: last })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta("vote", vote).await.map_err(|e| StorageIOError::write_vote(openraft::AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        let db = self.db.clone();
        blocking(move || LogStore::get_meta(&db, "vote")).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<()> {
        self.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>> {
        let db = self.db.clone();
        blocking(move || Ok(LogStore::get_meta::<Option<LogId>>(&db, "committed")?.flatten())).await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((entry.log_id.index, serde_json::to_vec(&entry).map_err(write_error)?));
        }
        let db = self.db.clone();
        let health = self.health.clone();
        let failpoint = self.stall_failpoint.clone();
        let result = blocking(move || {
            let started = std::time::Instant::now();
            health.write_started_ms.store(wall_ms(), Ordering::Relaxed);
            while failpoint.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let outcome = (|| {
                let txn = db.begin_write().map_err(write_error)?;
                {
                    let mut table = txn.open_table(LOG).map_err(write_error)?;
                    for (index, bytes) in &encoded {
                        table.insert(*index, bytes.as_slice()).map_err(write_error)?;
                    }
                }
                // Commit with Durability::Immediate (redb's default): fsynced on return.
                txn.commit().map_err(write_error)
            })();
            health.last_write_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            health.write_started_ms.store(0, Ordering::Relaxed);
            outcome
        })
        .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(error) => callback.log_io_completed(Err(std::io::Error::other(error.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<()> {
        self.delete_range(log_id.index..).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<()> {
        // The purge point is recorded first: a crash between the two leaves
        // entries that are merely ignored, never a hole.
        self.put_meta("last_purged", &log_id).await?;
        self.delete_range(..=log_id.index).await
    }
}

// ---- the state machine ----

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    shared: Arc<StateMachineShared>,
    snapshot_counter: Arc<AtomicU64>,
}

impl StateMachineStore {
    pub fn shared(&self) -> Arc<StateMachineShared> {
        self.shared.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        // Clone under the read lock (memory copy only), serialise and write off it.
        let (last_applied, last_membership, state) = {
            let data = self.shared.data.read().expect("state lock");
            (data.last_applied, data.last_membership.clone(), data.state.clone())
        };
        let counter = self.snapshot_counter.fetch_add(1, Ordering::SeqCst) + 1;
        let snapshot_id = format!(
            "{}-{}-{counter}",
            last_applied.map(|l| l.leader_id.term).unwrap_or(0),
            last_applied.map(|l| l.index).unwrap_or(0)
        );
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: last_membership.clone(), snapshot_id };
        let db = self.db.clone();
        let meta_for_write = meta.clone();
        let bytes = blocking(move || {
            let body = SnapshotBody { last_applied, last_membership, state };
            let bytes = serde_json::to_vec(&body).map_err(write_error)?;
            if bytes.len() > SNAPSHOT_BYTES_MAX {
                return Err(write_error(std::io::Error::other(format!(
                    "snapshot of {} bytes exceeds SNAPSHOT_BYTES_MAX",
                    bytes.len()
                ))));
            }
            write_snapshot(&db, &meta_for_write, &bytes)?;
            Ok(bytes)
        })
        .await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, Member>)> {
        let data = self.shared.data.read().expect("state lock");
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let last_index = {
            let mut data = self.shared.data.write().expect("state lock");
            for entry in entries {
                data.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(Response::default()),
                    EntryPayload::Normal(request) => responses.push(data.state.apply(entry.log_id.index, &request)),
                    EntryPayload::Membership(membership) => {
                        data.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        responses.push(Response::default());
                    }
                }
            }
            data.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.shared.applied_tx.send_replace(last_index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let bytes = snapshot.into_inner();
        if bytes.len() > SNAPSHOT_BYTES_MAX {
            return Err(read_error(std::io::Error::other("received snapshot exceeds SNAPSHOT_BYTES_MAX")));
        }
        let db = self.db.clone();
        let meta_for_write = meta.clone();
        let body = blocking(move || {
            let body: SnapshotBody = serde_json::from_slice(&bytes).map_err(read_error)?;
            write_snapshot(&db, &meta_for_write, &bytes)?;
            Ok(body)
        })
        .await?;
        body.state.check_invariants();
        let index = {
            let mut data = self.shared.data.write().expect("state lock");
            *data = StateMachineData {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                state: body.state,
            };
            meta.last_log_id.map(|l| l.index).unwrap_or(0)
        };
        self.shared.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let stored =
            blocking(move || read_snapshot(&db).map_err(|e| read_error(std::io::Error::other(e.to_string())))).await?;
        Ok(stored.map(|(meta, bytes)| Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}
