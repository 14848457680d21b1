//! redb storage for openraft: the log, the vote, the committed log id and the
//! current snapshot's meta in one file per node (`phalanx.redb`), the
//! snapshot's body in a file beside it, plus the in-memory state machine that
//! openraft applies committed entries to.
//!
//! Formats. The database records the storage format version that wrote it
//! (`FORMAT_VERSION_KEY`); a database without one was written by format 1.
//! Format 1 kept the snapshot body inside the database as serde_json with no
//! header. Format 2 keeps it in a file of its own, `snapshot-N.phx`, which
//! begins with `SNAPSHOT_MAGIC` and the snapshot format version, then the body
//! in MessagePack. This code reads both, writes format 2, and refuses, naming
//! both versions, a database or a snapshot of a version it does not know.
//!
//! Durability. Every write is one redb write transaction committed with
//! `Durability::Immediate` (redb's default: the file is fsynced before
//! `commit` returns), and openraft hears that a write is done only after the
//! commit returned. `append` writes a whole batch of entries in one
//! transaction, so one fsync serves the batch (group commit). The state
//! machine itself is never written: it lives in memory and is made durable by
//! snapshots, which are on disk before `build_snapshot` returns (openraft
//! purges the log a snapshot covers right after), plus replay of the fsynced
//! log after the snapshot on restart: the committed log id is saved too, so
//! openraft re-applies up to it before the node serves anything.
//!
//! Deliberately left to others: what an entry means (`phalanx_core::State`),
//! when to snapshot and purge (openraft's policy, configured in `node`), and
//! what readiness concludes from `StorageHealth` (`node`, `api`).
//!
//! redb is synchronous, so every redb call runs on tokio's blocking threads:
//! an fsync must never stall the async workers that run Raft's timers.

use crate::raft_types::{LogId, Member, NodeId, StorageError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership, Vote,
};
use phalanx_core::{Limits, Response, State};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::{BufRead, Cursor, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The name of the node's single database file inside its data directory.
pub const DATABASE_FILE_NAME: &str = "phalanx.redb";

/// A snapshot larger than this is refused, whether built, received or found
/// on disk. One is sent and received a chunk at a time (`SnapshotData`), but
/// the state it decodes to is held in memory, and a peer must not be able to
/// fill the disk with one.
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;

/// The storage format this code writes. 1: the snapshot body is serde_json
/// inside the database (no version recorded). 2: the version is recorded and
/// the snapshot body is a file of its own (see the module comment).
pub const FORMAT_VERSION: u32 = 2;

/// The snapshot body format this code writes: 1 is serde_json with no header,
/// 2 is `SNAPSHOT_MAGIC`, the version (u32, little endian), then MessagePack.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;

/// The first bytes of a snapshot body of format 2 and later. A body of format 1
/// is a JSON object, which never starts with these.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"PHXSNAP\0";

/// Snapshot bodies are written and read through buffers of this size.
const SNAPSHOT_BUFFER_BYTES: usize = 1 << 20;

/// Snapshot body files are `snapshot-N.phx` in the data directory.
const SNAPSHOT_FILE_PREFIX: &str = "snapshot-";
const SNAPSHOT_FILE_SUFFIX: &str = ".phx";

/// Set to `1`, a node writes its snapshots in format 1 (serde_json) in place
/// of the current format: `phalanx bench restart` measures both side by side.
pub const SNAPSHOT_WRITE_VERSION_ENV: &str = "PHALANX_SNAPSHOT_WRITE_VERSION";

/// While a file of this name exists in the data directory, log writes wait,
/// as on a disk that has stalled: the failpoint behind the "up but not
/// working" tests (`crates/phalanx-cli/tests/stall.rs`).
pub const STALL_FAILPOINT_FILE_NAME: &str = "failpoint-stall-storage";

/// While a file of this name exists in the data directory, the state machine
/// applies nothing and installs no snapshot, as when the apply loop is
/// wedged: the log still grows and commits, the state stops moving (the
/// "apply stalled" tests, and a snapshot install that takes long).
pub const APPLY_STALL_FAILPOINT_FILE_NAME: &str = "failpoint-stall-apply";

/// Log index -> serde_json of `Entry<TypeConfig>`.
const LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// `FORMAT_VERSION_KEY`, `VOTE_KEY`, `COMMITTED_KEY`, `LAST_PURGED_KEY` -> serde_json of each.
const META_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The one current snapshot: its meta and where its body is (format 2: the
/// file name under `SNAPSHOT_FILE_KEY`; format 1: the bytes under
/// `SNAPSHOT_DATA_KEY`), always replaced together in one transaction, so
/// older snapshots are gone the moment a new one lands.
const SNAPSHOT_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// What openraft records about a snapshot: the log id and membership it covers, and its id.
type StoredSnapshotMeta = SnapshotMeta<NodeId, Member>;

const FORMAT_VERSION_KEY: &str = "format_version";
const VOTE_KEY: &str = "vote";
const COMMITTED_KEY: &str = "committed";
const LAST_PURGED_KEY: &str = "last_purged";
const SNAPSHOT_META_KEY: &str = "meta";
const SNAPSHOT_DATA_KEY: &str = "data";
const SNAPSHOT_FILE_KEY: &str = "file";

const LOCK_POISONED: &str = "state machine lock poisoned: an apply panicked while holding it";

/// An operating error of the store: the disk, the file, or stored bytes that
/// do not decode. Inside the Raft traits it becomes an `openraft::StorageError`
/// whose subject says what was being read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Database(#[from] redb::Error),
    #[error(transparent)]
    Encoding(#[from] serde_json::Error),
    #[error("snapshot body: {0}")]
    SnapshotEncode(#[from] rmp_serde::encode::Error),
    #[error("snapshot body: {0}")]
    SnapshotDecode(#[from] rmp_serde::decode::Error),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the database was written by storage format version {found}, and this binary reads versions 1 to {supported}: \
         run a phalanx that knows version {found}"
    )]
    FormatTooNew { found: u32, supported: u32 },
    #[error(
        "the snapshot is of snapshot format version {found}, and this binary reads versions 1 to {supported}: \
         run a phalanx that knows version {found}"
    )]
    SnapshotFormatUnknown { found: u32, supported: u32 },
    #[error("the snapshot body is neither format 1 (JSON) nor begins with the snapshot header")]
    SnapshotHeader,
    #[error("snapshot of {bytes} bytes exceeds SNAPSHOT_BYTES_MAX ({SNAPSHOT_BYTES_MAX} bytes)")]
    SnapshotTooLarge { bytes: usize },
    #[error("snapshot body was taken at {body:?} but its meta says {meta:?}")]
    SnapshotMismatch { body: Option<LogId>, meta: Option<LogId> },
    #[error("the runtime shut down before the storage work ran")]
    Shutdown,
}

/// redb reports each step with its own error type; all of them are disk or
/// file errors to us, so they fold into `redb::Error`.
macro_rules! from_redb_error {
    ($($source:ty),*) => {$(
        impl From<$source> for Error {
            fn from(error: $source) -> Error {
                Error::Database(error.into())
            }
        }
    )*};
}
from_redb_error!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    Ok(serde_json::to_vec(value)?)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    Ok(serde_json::from_slice(bytes)?)
}

fn check_snapshot_size(bytes: usize) -> Result<(), Error> {
    if bytes > SNAPSHOT_BYTES_MAX {
        return Err(Error::SnapshotTooLarge { bytes });
    }
    Ok(())
}

/// Where the store runs its synchronous redb work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// On tokio's blocking threads, off the async workers (a node).
    Blocking,
    /// On the calling task, in order: the seeded simulation (`phalanx-sim`)
    /// runs every node on one thread in simulated time, where a second
    /// thread would make the order of events depend on the machine.
    Inline,
}

/// Runs synchronous redb work as `io` says.
async fn blocking<T: Send + 'static>(
    io: Io,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    if io == Io::Inline {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        // A panic in storage work is a broken invariant; it goes on unwinding
        // here rather than turning into an error someone might retry.
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(Error::Shutdown),
    }
}

/// Runs `work` in one write transaction and commits it. The commit uses redb's
/// default `Durability::Immediate`, so the data is fsynced when this returns;
/// if `work` fails the transaction is dropped, which aborts it.
fn write<T>(db: &Database, work: impl FnOnce(&WriteTransaction) -> Result<T, Error>) -> Result<T, Error> {
    let txn = db.begin_write()?;
    let value = work(&txn)?;
    txn.commit()?;
    Ok(value)
}

fn read_meta<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, Error> {
    match table.get(key)? {
        Some(value) => Ok(Some(decode(value.value())?)),
        None => Ok(None),
    }
}

/// Writes one meta value in its own transaction, fsynced or not (`durability`).
fn write_meta<T: Serialize>(db: &Database, key: &str, value: &T, durability: redb::Durability) -> Result<(), Error> {
    let bytes = encode(value)?;
    let mut txn = db.begin_write()?;
    txn.set_durability(durability).map_err(|error| Error::Database(error.into()))?;
    txn.open_table(META_TABLE)?.insert(key, bytes.as_slice())?;
    txn.commit()?;
    Ok(())
}

/// Opens (or creates) `phalanx.redb` in `data_dir` and returns the two halves
/// of the store, sharing one database handle. A stored snapshot is loaded into
/// the state machine, so its last applied log id is the snapshot's; openraft
/// then re-applies the committed log after it.
///
/// A database of a storage format this code does not know is refused before
/// anything is written to it; one of an older format is upgraded in place.
///
/// It blocks (file open, one fsync, snapshot decode): call it at startup,
/// before the node serves anything.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), Error> {
    open_with(data_dir, Io::Blocking)
}

/// `open`, with the synchronous work run as `io` says.
pub fn open_with(data_dir: &Path, io: Io) -> Result<(LogStore, StateMachineStore), Error> {
    let path = data_dir.join(DATABASE_FILE_NAME);
    // Read first through a read-only handle, so that a database or a
    // snapshot this code cannot read is refused with nothing changed on disk
    // (a writable open alone writes to the file). After a crash redb must
    // repair the file first, which only a writable open does: the same
    // checks then run after the repair.
    let mut loaded = None;
    if path.exists() {
        match redb::ReadOnlyDatabase::open(&path) {
            Ok(db) => loaded = Some(load(&db, data_dir)?),
            Err(redb::DatabaseError::RepairAborted) => {}
            Err(error) => return Err(Error::Database(error.into())),
        }
    }
    let db = Arc::new(Database::create(&path)?);
    let (stored, found) = match loaded {
        Some(loaded) => loaded,
        None => load(&*db, data_dir)?,
    };
    assert!(found <= FORMAT_VERSION, "load refuses newer formats");
    // Created up front, so that every reader can open every table; the
    // version is recorded on creation and on upgrade alike. An upgraded
    // database may still hold a format 1 snapshot until the next one is taken.
    write(&db, |txn| {
        txn.open_table(LOG_TABLE)?;
        txn.open_table(META_TABLE)?.insert(FORMAT_VERSION_KEY, encode(&FORMAT_VERSION)?.as_slice())?;
        txn.open_table(SNAPSHOT_TABLE)?;
        Ok(())
    })?;

    let mut data = StateMachineData {
        last_applied: None,
        last_membership: StoredMembership::default(),
        state: State::new(Limits::default()),
    };
    let mut snapshot_counter = 0;
    // Files left by a snapshot whose transaction never committed (a crash
    // between the file and the commit, or an older snapshot that lost the race).
    let current_file = match &stored {
        Some((_, Body::File(name), _)) => Some(name.clone()),
        _ => None,
    };
    let mut file_number_max = 0;
    for (number, name) in snapshot_files(data_dir)? {
        file_number_max = file_number_max.max(number);
        if Some(&name) != current_file.as_ref() {
            std::fs::remove_file(data_dir.join(&name))?;
        }
    }
    if let Some((meta, _, body)) = stored {
        data = StateMachineData {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership,
            state: body.state,
        };
        // Only uniqueness of later ids depends on it, so an id this code did not write just restarts the count.
        snapshot_counter = meta.snapshot_id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    }

    let applied_index = data.last_applied.map_or(0, |log_id| log_id.index);
    let shared = Arc::new(StateMachineShared {
        data: RwLock::new(data),
        applied_tx: tokio::sync::watch::channel(applied_index).0,
        snapshot_copy_us_last: AtomicU64::new(0),
        snapshots_received: AtomicU64::new(0),
        snapshots_installed: AtomicU64::new(0),
    });
    let write_version = match std::env::var(SNAPSHOT_WRITE_VERSION_ENV).as_deref() {
        Ok("1") => 1,
        _ => SNAPSHOT_FORMAT_VERSION,
    };
    let state_machine = StateMachineStore {
        io,
        db: db.clone(),
        shared,
        snapshot_counter: Arc::new(AtomicU64::new(snapshot_counter)),
        apply_stall_failpoint: Arc::new(data_dir.join(APPLY_STALL_FAILPOINT_FILE_NAME)),
        data_dir: Arc::new(data_dir.to_path_buf()),
        file_number: Arc::new(AtomicU64::new(file_number_max)),
        write_version,
    };
    let log = LogStore {
        io,
        db,
        health: Arc::default(),
        stall_failpoint: Arc::new(data_dir.join(STALL_FAILPOINT_FILE_NAME)),
    };
    Ok((log, state_machine))
}

/// What a start finds in the database: the current snapshot (its meta, where
/// its body is, and the body decoded and checked) and the storage format.
type Loaded = (Option<(StoredSnapshotMeta, Body, SnapshotBody)>, u32);

/// Reads what `open` needs from `db`, refusing a storage or snapshot format
/// this code does not know. It only reads.
fn load(db: &impl ReadableDatabase, data_dir: &Path) -> Result<Loaded, Error> {
    let found = stored_format_version(db)?;
    if found == 0 || found > FORMAT_VERSION {
        return Err(Error::FormatTooNew { found, supported: FORMAT_VERSION });
    }
    let Some((meta, body)) = read_snapshot(db)? else { return Ok((None, found)) };
    let decoded = decode_stored_snapshot(data_dir, &meta, &body)?;
    Ok((Some((meta, body, decoded)), found))
}

/// The storage format version recorded in `db`: format 1 recorded none, and a
/// new database has nothing in any format yet.
fn stored_format_version(db: &impl ReadableDatabase) -> Result<u32, Error> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(META_TABLE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(FORMAT_VERSION),
        Err(error) => return Err(error.into()),
    };
    Ok(read_meta(&table, FORMAT_VERSION_KEY)?.unwrap_or(1))
}

// ---- snapshots on disk ----

/// The serialised form of a snapshot: what the state machine had applied and
/// the state that resulted.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Member>,
    state: State,
}

/// Where the current snapshot's body is.
enum Body {
    /// Format 1: the bytes, inside the database.
    Inline(Vec<u8>),
    /// Format 2: the name of a file in the data directory.
    File(String),
}

fn snapshot_file_name(number: u64) -> String {
    format!("{SNAPSHOT_FILE_PREFIX}{number:020}{SNAPSHOT_FILE_SUFFIX}")
}

/// The snapshot body files in `data_dir`, by number.
fn snapshot_files(data_dir: &Path) -> Result<Vec<(u64, String)>, Error> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let number = name.strip_prefix(SNAPSHOT_FILE_PREFIX).and_then(|rest| rest.strip_suffix(SNAPSHOT_FILE_SUFFIX));
        if let Some(number) = number.and_then(|number| number.parse::<u64>().ok()) {
            files.push((number, name));
        }
    }
    files.sort();
    Ok(files)
}

/// Whether `name`, read from the database, is a snapshot file this code wrote
/// (never a path that leads out of the data directory).
fn is_snapshot_file_name(name: &str) -> bool {
    name.strip_prefix(SNAPSHOT_FILE_PREFIX)
        .and_then(|rest| rest.strip_suffix(SNAPSHOT_FILE_SUFFIX))
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

fn read_snapshot(db: &impl ReadableDatabase) -> Result<Option<(StoredSnapshotMeta, Body)>, Error> {
    let txn = db.begin_read()?;
    let table = match txn.open_table(SNAPSHOT_TABLE) {
        Ok(table) => table,
        // A database no node has opened yet (tables are created at the first open).
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let Some(meta) = table.get(SNAPSHOT_META_KEY)? else {
        return Ok(None);
    };
    let meta: StoredSnapshotMeta = decode(meta.value())?;
    if let Some(name) = table.get(SNAPSHOT_FILE_KEY)? {
        let name = String::from_utf8_lossy(name.value()).into_owned();
        if !is_snapshot_file_name(&name) {
            return Err(std::io::Error::other(format!("the database names {name:?} as its snapshot file")).into());
        }
        return Ok(Some((meta, Body::File(name))));
    }
    let Some(data) = table.get(SNAPSHOT_DATA_KEY)? else {
        return Ok(None);
    };
    check_snapshot_size(data.value().len())?;
    Ok(Some((meta, Body::Inline(data.value().to_vec()))))
}

/// Opens the stored snapshot file `name` to send it (a chunk at a time).
fn open_snapshot_file(data_dir: &Path, name: &str) -> Result<(std::fs::File, PathBuf), Error> {
    let path = data_dir.join(name);
    let file = std::fs::File::open(&path)?;
    check_snapshot_size(file.metadata()?.len() as usize)?;
    Ok((file, path))
}

/// Decodes the stored snapshot `body` (see `decode_snapshot`), streaming a
/// format 2 file rather than reading it whole.
fn decode_stored_snapshot(data_dir: &Path, meta: &StoredSnapshotMeta, body: &Body) -> Result<SnapshotBody, Error> {
    match body {
        Body::Inline(bytes) => decode_snapshot(meta, bytes),
        Body::File(name) => {
            let file = std::fs::File::open(data_dir.join(name))?;
            check_snapshot_size(file.metadata()?.len() as usize)?;
            let mut reader = std::io::BufReader::with_capacity(SNAPSHOT_BUFFER_BYTES, file);
            let body = match read_header(reader.fill_buf()?)? {
                Some(_) => {
                    reader.consume(SNAPSHOT_HEADER_BYTES);
                    rmp_serde::from_read(&mut reader)?
                }
                None => {
                    let mut bytes = Vec::new();
                    reader.read_to_end(&mut bytes)?;
                    serde_json::from_slice(&bytes)?
                }
            };
            check_snapshot(meta, body)
        }
    }
}

const SNAPSHOT_HEADER_BYTES: usize = SNAPSHOT_MAGIC.len() + 4;

/// The snapshot format version that `head` (the first bytes of a body) says:
/// `Some` for a known header, `None` for format 1 (JSON, no header).
fn read_header(head: &[u8]) -> Result<Option<u32>, Error> {
    if head.first() == Some(&SNAPSHOT_MAGIC[0]) {
        if head.len() < SNAPSHOT_HEADER_BYTES || &head[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
            return Err(Error::SnapshotHeader);
        }
        let mut version = [0; 4];
        version.copy_from_slice(&head[SNAPSHOT_MAGIC.len()..SNAPSHOT_HEADER_BYTES]);
        let version = u32::from_le_bytes(version);
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(Error::SnapshotFormatUnknown { found: version, supported: SNAPSHOT_FORMAT_VERSION });
        }
        return Ok(Some(version));
    }
    match head.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'{') => Ok(None),
        _ => Err(Error::SnapshotHeader),
    }
}

/// Decodes a snapshot of any format this code reads and checks it against
/// its meta and against the state machine's own invariants (a full O(n)
/// check, affordable once per load).
fn decode_snapshot(meta: &StoredSnapshotMeta, bytes: &[u8]) -> Result<SnapshotBody, Error> {
    check_snapshot_size(bytes.len())?;
    let body = match read_header(bytes)? {
        Some(_) => rmp_serde::from_slice(&bytes[SNAPSHOT_HEADER_BYTES..])?,
        None => serde_json::from_slice(bytes)?,
    };
    check_snapshot(meta, body)
}

fn check_snapshot(meta: &StoredSnapshotMeta, mut body: SnapshotBody) -> Result<SnapshotBody, Error> {
    if body.last_applied != meta.last_log_id {
        return Err(Error::SnapshotMismatch { body: body.last_applied, meta: meta.last_log_id });
    }
    body.state.restore_checked();
    Ok(body)
}

/// Counts what goes through it and fails past `SNAPSHOT_BYTES_MAX`, so a
/// snapshot too large is refused while it is written, not after.
struct BoundedWriter<W> {
    inner: W,
    written_bytes: usize,
}

impl<W: Write> Write for BoundedWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.written_bytes + bytes.len() > SNAPSHOT_BYTES_MAX {
            return Err(std::io::Error::other(Error::SnapshotTooLarge { bytes: self.written_bytes + bytes.len() }));
        }
        let written = self.inner.write(bytes)?;
        self.written_bytes += written;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Creates the file `name` in `data_dir` with what `fill` writes, fsyncs it
/// and the directory: durable before any transaction names it.
fn write_snapshot_file(
    data_dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), Error>,
) -> Result<(), Error> {
    let path = data_dir.join(name);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    let mut writer =
        BoundedWriter { inner: std::io::BufWriter::with_capacity(SNAPSHOT_BUFFER_BYTES, file), written_bytes: 0 };
    let outcome = fill(&mut writer).and_then(|()| {
        let file = writer.inner.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()?;
        std::fs::File::open(data_dir)?.sync_all()?;
        Ok(())
    });
    if outcome.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    outcome
}

/// Encodes `body` in snapshot format `version` (1 or the current one).
fn encode_snapshot(writer: &mut dyn Write, body: &SnapshotBody, version: u32) -> Result<(), Error> {
    if version == 1 {
        serde_json::to_writer(writer, body)?;
        return Ok(());
    }
    writer.write_all(SNAPSHOT_MAGIC)?;
    writer.write_all(&version.to_le_bytes())?;
    body.serialize(&mut rmp_serde::Serializer::new(writer))?;
    Ok(())
}

/// Makes the snapshot file `name` (already durable) the current snapshot with
/// `meta`, durably, unless the stored one is newer; returns whether it did.
/// The file it replaces, or the file itself when it lost, is deleted after.
fn store_snapshot(db: &Database, data_dir: &Path, meta: &StoredSnapshotMeta, name: &str) -> Result<bool, Error> {
    let meta_bytes = encode(meta)?;
    let outcome = write(db, |txn| {
        let mut table = txn.open_table(SNAPSHOT_TABLE)?;
        let stored: Option<StoredSnapshotMeta> = read_meta(&table, SNAPSHOT_META_KEY)?;
        // openraft builds snapshots in a task of its own, so a build that
        // cloned the state before an `install_snapshot` can finish after it.
        // Storing that older snapshot would leave, after a restart, a
        // snapshot that ends before the log (purged up to the installed one)
        // begins: a hole.
        if stored.is_some_and(|stored| stored.last_log_id > meta.last_log_id) {
            return Ok(None);
        }
        let previous = table.get(SNAPSHOT_FILE_KEY)?.map(|name| String::from_utf8_lossy(name.value()).into_owned());
        table.insert(SNAPSHOT_META_KEY, meta_bytes.as_slice())?;
        table.insert(SNAPSHOT_FILE_KEY, name.as_bytes())?;
        table.remove(SNAPSHOT_DATA_KEY)?;
        Ok(Some(previous))
    });
    let stale = match &outcome {
        Ok(Some(previous)) => previous.clone().filter(|previous| is_snapshot_file_name(previous)),
        // Not named by the database, whatever happened: gone now, or at the next start.
        Ok(None) | Err(_) => Some(name.to_string()),
    };
    if let Some(stale) = stale {
        let _ = std::fs::remove_file(data_dir.join(stale));
    }
    Ok(outcome?.is_some())
}

/// The bytes of a snapshot in flight between nodes (openraft's
/// `SnapshotData`), read and written a chunk at a time, never whole:
/// - sent: the current snapshot file, opened (`get_current_snapshot`); the
///   leader reads it in chunks of `snapshot_max_chunk_size`;
/// - received: a new snapshot file in the data directory
///   (`begin_receiving_snapshot`), written chunk by chunk as they arrive,
///   and deleted when dropped unless installed (a leader that gave up, a
///   refused chunk); one the process did not live to delete goes at the next
///   start with the other files no transaction names;
/// - in memory: a snapshot of format 1, which lives inside the database, or
///   a test's bytes.
///
/// While written, it refuses to grow past `SNAPSHOT_BYTES_MAX` (a peer cannot
/// fill the disk), and when the last chunk is in (`shutdown`) it refuses a
/// header of a format this code does not read. openraft answers the sender
/// with those errors and the node goes on; an error in `install_snapshot`
/// itself would stop the Raft core.
#[derive(Debug)]
pub struct SnapshotData {
    inner: Inner,
    /// Where the next write lands, so the bound is checked before it.
    position: u64,
    /// The first bytes written (a header's worth): checked at `shutdown`.
    head: Vec<u8>,
}

#[derive(Debug)]
enum Inner {
    Memory(Cursor<Vec<u8>>),
    /// A node's: the work runs on tokio's blocking threads.
    File {
        file: tokio::fs::File,
        path: PathBuf,
        received: Received,
    },
    /// The simulation's (`Io::Inline`): the work runs in place, in order.
    InlineFile {
        file: std::fs::File,
        path: PathBuf,
        received: Received,
    },
}

/// Whether a snapshot file is one being received, to delete unless installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Received {
    No,
    DeleteUnlessInstalled,
    Installed,
}

impl SnapshotData {
    /// Bytes in memory (a snapshot of format 1, or a test's).
    pub fn in_memory(bytes: Vec<u8>) -> SnapshotData {
        SnapshotData { inner: Inner::Memory(Cursor::new(bytes)), position: 0, head: Vec::new() }
    }

    fn file(file: std::fs::File, path: PathBuf, io: Io, received: Received) -> SnapshotData {
        let inner = match io {
            Io::Blocking => Inner::File { file: tokio::fs::File::from_std(file), path, received },
            Io::Inline => Inner::InlineFile { file, path, received },
        };
        SnapshotData { inner, position: 0, head: Vec::new() }
    }

    /// All its bytes, from the start (tests and tools; a node streams them).
    pub async fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        self.seek(std::io::SeekFrom::Start(0)).await?;
        let mut bytes = Vec::new();
        self.take(SNAPSHOT_BYTES_MAX as u64 + 1).read_to_end(&mut bytes).await?;
        check_snapshot_size(bytes.len()).map_err(std::io::Error::other)?;
        Ok(bytes)
    }

    /// What `install_snapshot` installs: the bytes, or the received file's
    /// name (flushed; kept from now on, whatever happens to `self`). A
    /// snapshot file that was not received here (another store's current
    /// one, as openraft's storage suite installs) is read into memory.
    async fn into_installable(mut self) -> std::io::Result<Installable> {
        use tokio::io::AsyncWriteExt;
        self.flush().await?;
        match &mut self.inner {
            Inner::Memory(cursor) => Ok(Installable::Bytes(std::mem::take(cursor.get_mut()))),
            Inner::File { received: Received::No, .. } | Inner::InlineFile { received: Received::No, .. } => {
                Ok(Installable::Bytes(self.read_all().await?))
            }
            Inner::File { path, received, .. } | Inner::InlineFile { path, received, .. } => {
                let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
                if !is_snapshot_file_name(&name) {
                    return Err(std::io::Error::other(format!("{name:?} is not a snapshot file")));
                }
                *received = Received::Installed;
                Ok(Installable::File(name))
            }
        }
    }

    /// Notes the bytes written at `self.position`: the head, and where the next goes.
    fn wrote(&mut self, bytes: &[u8]) {
        let header = SNAPSHOT_HEADER_BYTES as u64;
        if self.position < header {
            let at = self.position as usize;
            let take = bytes.len().min(SNAPSHOT_HEADER_BYTES - at);
            if self.head.len() < at + take {
                self.head.resize(at + take, 0);
            }
            self.head[at..at + take].copy_from_slice(&bytes[..take]);
        }
        self.position += bytes.len() as u64;
    }
}

/// A received snapshot, ready to be checked and installed.
enum Installable {
    Bytes(Vec<u8>),
    /// The name of a snapshot file in the data directory.
    File(String),
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        if let Inner::File { path, received: Received::DeleteUnlessInstalled, .. }
        | Inner::InlineFile { path, received: Received::DeleteUnlessInstalled, .. } = &self.inner
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

type Poll<T> = std::task::Poll<std::io::Result<T>>;
type Context<'a> = std::task::Context<'a>;
type Pinned<'a> = std::pin::Pin<&'a mut SnapshotData>;

impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(self: Pinned<'_>, context: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<()> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Memory(cursor) => std::pin::Pin::new(cursor).poll_read(context, buf),
            Inner::File { file, .. } => std::pin::Pin::new(file).poll_read(context, buf),
            Inner::InlineFile { file, .. } => {
                let read = file.read(buf.initialize_unfilled())?;
                buf.advance(read);
                std::task::Poll::Ready(Ok(()))
            }
        }
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(self: Pinned<'_>, position: std::io::SeekFrom) -> std::io::Result<()> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Memory(cursor) => std::pin::Pin::new(cursor).start_seek(position),
            Inner::File { file, .. } => std::pin::Pin::new(file).start_seek(position),
            Inner::InlineFile { file, .. } => {
                use std::io::Seek;
                this.position = file.seek(position)?;
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pinned<'_>, context: &mut Context<'_>) -> Poll<u64> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Memory(cursor) => std::pin::Pin::new(cursor).poll_complete(context),
            Inner::File { file, .. } => std::pin::Pin::new(file).poll_complete(context),
            Inner::InlineFile { .. } => std::task::Poll::Ready(Ok(this.position)),
        };
        if let std::task::Poll::Ready(Ok(position)) = polled {
            this.position = position;
        }
        polled
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(self: Pinned<'_>, context: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
        let this = self.get_mut();
        let end = (this.position as usize).saturating_add(bytes.len());
        if end > SNAPSHOT_BYTES_MAX {
            return std::task::Poll::Ready(Err(std::io::Error::other(Error::SnapshotTooLarge { bytes: end })));
        }
        let polled = match &mut this.inner {
            Inner::Memory(cursor) => std::pin::Pin::new(cursor).poll_write(context, bytes),
            Inner::File { file, .. } => std::pin::Pin::new(file).poll_write(context, bytes),
            Inner::InlineFile { file, .. } => std::task::Poll::Ready(file.write(bytes)),
        };
        if let std::task::Poll::Ready(Ok(written)) = polled {
            this.wrote(&bytes[..written]);
        }
        polled
    }

    fn poll_flush(self: Pinned<'_>, context: &mut Context<'_>) -> Poll<()> {
        match &mut self.get_mut().inner {
            Inner::Memory(cursor) => std::pin::Pin::new(cursor).poll_flush(context),
            Inner::File { file, .. } => std::pin::Pin::new(file).poll_flush(context),
            Inner::InlineFile { file, .. } => std::task::Poll::Ready(file.flush()),
        }
    }

    /// The last chunk is in: the header must be one this code reads.
    fn poll_shutdown(mut self: Pinned<'_>, context: &mut Context<'_>) -> Poll<()> {
        std::task::ready!(self.as_mut().poll_flush(context))?;
        let this = self.get_mut();
        let head = match &this.inner {
            Inner::Memory(cursor) => cursor.get_ref().as_slice(),
            _ => this.head.as_slice(),
        };
        std::task::Poll::Ready(read_header(head).map(|_| ()).map_err(std::io::Error::other))
    }
}

// ---- the log ----

/// How storage is doing, read by readiness: a write that has been in progress
/// for long means a node that looks alive but cannot make progress.
#[derive(Default)]
pub struct StorageHealth {
    /// When the log write in progress started, in `monotonic_ms` (0: none).
    pub write_started_ms: AtomicU64,
    /// Duration of the last completed log write, in microseconds.
    pub last_write_us: AtomicU64,
    /// The last committed log index openraft reported (`save_committed`):
    /// with the applied index, it tells a stalled apply loop from an idle one.
    pub committed_index: AtomicU64,
}

/// Milliseconds on the monotonic clock since this process first asked, plus
/// one (so 0 can mean "none"): a wall clock that is stepped must not make a
/// write look stalled, or hide a stall.
pub fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

/// The Raft log, the vote and the committed log id. Clones share the database,
/// so `get_log_reader` hands out clones to openraft's replication tasks.
#[derive(Clone)]
pub struct LogStore {
    io: Io,
    db: Arc<Database>,
    pub health: Arc<StorageHealth>,
    /// See `STALL_FAILPOINT_FILE_NAME`.
    stall_failpoint: Arc<PathBuf>,
}

impl LogStore {
    /// Deletes the log entries whose index is in `range`, durably.
    async fn delete_range(&self, range: impl RangeBounds<u64> + Send + 'static) -> Result<(), Error> {
        let db = self.db.clone();
        blocking(self.io, move || {
            write(&db, |txn| {
                txn.open_table(LOG_TABLE)?.retain_in(range, |_, _| false)?;
                Ok(())
            })
        })
        .await
    }

    /// Writes a batch of entries in one transaction: one fsync for the batch.
    /// The batch is bounded by openraft's `max_payload_entries` (set in `node`).
    fn write_entries(db: &Database, entries: &[Entry<TypeConfig>]) -> Result<(), Error> {
        let encoded =
            entries.iter().map(|entry| Ok((entry.log_id.index, encode(entry)?))).collect::<Result<Vec<_>, Error>>()?;
        write(db, |txn| {
            let mut table = txn.open_table(LOG_TABLE)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        // openraft asks for at most `max_payload_entries` at a time, which bounds this vector.
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(self.io, move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG_TABLE)?;
            let mut entries = Vec::new();
            for item in table.range::<u64>(bounds)? {
                let (_, value) = item?;
                entries.push(decode(value.value())?);
            }
            Ok(entries)
        })
        .await
        .map_err(|error| StorageIOError::read_logs(&error).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(self.io, move || {
            // One read transaction, so the purge point and the last entry agree.
            let txn = db.begin_read()?;
            let last_purged_log_id: Option<LogId> = read_meta(&txn.open_table(META_TABLE)?, LAST_PURGED_KEY)?;
            let last_entry = match txn.open_table(LOG_TABLE)?.last()? {
                Some((_, value)) => Some(decode::<Entry<TypeConfig>>(value.value())?.log_id),
                None => None,
            };
            // With every entry purged, the last log id is the purge point (openraft's contract).
            Ok(LogState { last_purged_log_id, last_log_id: last_entry.or(last_purged_log_id) })
        })
        .await
        .map_err(|error| StorageIOError::read_logs(&error).into())
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let (db, vote) = (self.db.clone(), *vote);
        blocking(self.io, move || write_meta(&db, VOTE_KEY, &vote, redb::Durability::Immediate))
            .await
            .map_err(|error| StorageIOError::write_vote(&error).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let db = self.db.clone();
        blocking(self.io, move || read_meta(&db.begin_read()?.open_table(META_TABLE)?, VOTE_KEY))
            .await
            .map_err(|error| StorageIOError::read_vote(&error).into())
    }

    /// Saved so that a restart re-applies the committed entries it can
    /// before the node serves reads: the state machine is only in memory.
    /// openraft awaits this on every commit, inside its core loop, so it is
    /// written without an fsync (`Durability::None`): it becomes durable with
    /// the next log append. Losing the latest value in a crash is harmless:
    /// the entries are in the fsynced log, and the next leader commits them
    /// again.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.health.committed_index.fetch_max(committed.map_or(0, |log_id| log_id.index), Ordering::Relaxed);
        let db = self.db.clone();
        blocking(self.io, move || write_meta(&db, COMMITTED_KEY, &committed, redb::Durability::None))
            .await
            .map_err(|error| StorageIOError::write(&error).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let db = self.db.clone();
        blocking(self.io, move || {
            let committed: Option<Option<LogId>> = read_meta(&db.begin_read()?.open_table(META_TABLE)?, COMMITTED_KEY)?;
            Ok(committed.flatten())
        })
        .await
        .map_err(|error| StorageIOError::read(&error).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        for pair in entries.windows(2) {
            assert_eq!(pair[1].log_id.index, pair[0].log_id.index + 1, "append would leave a hole in the log");
        }
        let db = self.db.clone();
        let health = self.health.clone();
        let failpoint = self.stall_failpoint.clone();
        let result = blocking(self.io, move || {
            let started = std::time::Instant::now();
            health.write_started_ms.store(monotonic_ms(), Ordering::Relaxed);
            // The failpoint waits without limit on purpose: it imitates a disk
            // that has stopped, and only the test that made it ends it.
            while failpoint.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let outcome = LogStore::write_entries(&db, &entries);
            health.last_write_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            health.write_started_ms.store(0, Ordering::Relaxed);
            outcome
        })
        .await;
        // Only now, with the commit (and its fsync) returned, may openraft
        // count these entries as persisted, e.g. towards a quorum.
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(StorageIOError::write_logs(&error).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_range(log_id.index..).await.map_err(|error| StorageIOError::write_logs(&error).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(self.io, move || {
            // The purge point and the deletion commit together: no restart can
            // see entries gone without knowing where the log now starts.
            write(&db, |txn| {
                let mut meta = txn.open_table(META_TABLE)?;
                let previous: Option<LogId> = read_meta(&meta, LAST_PURGED_KEY)?;
                assert!(previous <= Some(log_id), "purge went back: to {log_id} after {previous:?}");
                meta.insert(LAST_PURGED_KEY, encode(&log_id)?.as_slice())?;
                txn.open_table(LOG_TABLE)?.retain_in(..=log_id.index, |_, _| false)?;
                Ok(())
            })
        })
        .await
        .map_err(|error| StorageIOError::write_logs(&error).into())
    }
}

// ---- the state machine ----

/// The state machine and what openraft needs to know about it.
pub struct StateMachineData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership<NodeId, Member>,
    pub state: State,
}

/// The state machine as the rest of the node sees it: readers take the read
/// lock briefly and never across an `.await`.
pub struct StateMachineShared {
    pub data: RwLock<StateMachineData>,
    /// Sends the last applied log index after every apply batch and snapshot
    /// install; the HTTP layer waits on it (long-poll wakeups, read-index waits).
    pub applied_tx: tokio::sync::watch::Sender<u64>,
    /// How long the last snapshot's copy of the state held the read lock
    /// (apply, the writer, waits that long), in microseconds.
    pub snapshot_copy_us_last: AtomicU64,
    /// Snapshots this node began to receive, and installed.
    pub snapshots_received: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

/// openraft's handle on the state machine and on the snapshot stored in redb.
/// Clones share both, so the snapshot builder is a clone.
#[derive(Clone)]
pub struct StateMachineStore {
    io: Io,
    db: Arc<Database>,
    shared: Arc<StateMachineShared>,
    /// The last part of snapshot ids, so that two snapshots taken at the same
    /// log id still have different ids.
    snapshot_counter: Arc<AtomicU64>,
    /// See `APPLY_STALL_FAILPOINT_FILE_NAME`.
    apply_stall_failpoint: Arc<PathBuf>,
    /// Where snapshot files go.
    data_dir: Arc<PathBuf>,
    /// The number of the last snapshot file made: each new file gets the
    /// next, so no file is ever written twice.
    file_number: Arc<AtomicU64>,
    /// The snapshot format written (see `SNAPSHOT_WRITE_VERSION_ENV`).
    write_version: u32,
}

impl StateMachineStore {
    pub fn shared(&self) -> Arc<StateMachineShared> {
        self.shared.clone()
    }
}

impl StateMachineStore {
    fn next_snapshot_file_name(&self) -> String {
        snapshot_file_name(self.file_number.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Clone under the read lock, then encode off it on a blocking thread:
        // a clone is a memory copy, much faster than encoding, so apply (the
        // writer) waits for the copy only. The price is a second copy of the
        // state in memory while the snapshot is built; the encoded bytes are
        // streamed to the file through a fixed buffer, never held whole.
        let started = std::time::Instant::now();
        let body = {
            let data = self.shared.data.read().expect(LOCK_POISONED);
            SnapshotBody {
                last_applied: data.last_applied,
                last_membership: data.last_membership.clone(),
                state: data.state.clone(),
            }
        };
        let copy_us = started.elapsed().as_micros() as u64;
        self.shared.snapshot_copy_us_last.store(copy_us, Ordering::Relaxed);
        tracing::info!(copy_ms = copy_us / 1000, tasks = body.state.task_count(), "snapshot: the state copied");
        let counter = self.snapshot_counter.fetch_add(1, Ordering::Relaxed) + 1;
        let last_applied = body.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: body.last_membership.clone(),
            snapshot_id: format!(
                "{}-{}-{counter}",
                last_applied.map_or(0, |log_id| log_id.leader_id.term),
                last_applied.map_or(0, |log_id| log_id.index)
            ),
        };
        let (db, data_dir, stored_meta, version) =
            (self.db.clone(), self.data_dir.clone(), meta.clone(), self.write_version);
        let name = self.next_snapshot_file_name();
        blocking(self.io, move || {
            write_snapshot_file(&data_dir, &name, |writer| encode_snapshot(writer, &body, version))?;
            drop(body);
            // Durable before openraft hears of it: it purges the log this snapshot covers.
            store_snapshot(&db, &data_dir, &stored_meta, &name)?;
            Ok(())
        })
        .await
        .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), &error))?;
        // openraft 0.9 keeps only the meta of a snapshot it had built
        // (`core/sm/worker.rs`, `build_snapshot`); a follower that needs the
        // bytes gets them from `get_current_snapshot`, read from the file.
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::in_memory(Vec::new())) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, Member>), StorageError> {
        let data = self.shared.data.read().expect(LOCK_POISONED);
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Waits without limit on purpose, like the storage failpoint.
        while self.apply_stall_failpoint.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let entries = entries.into_iter();
        let mut responses = Vec::with_capacity(entries.size_hint().0);
        // One lock acquisition per batch; the guard ends before any `.await`.
        let applied_index = {
            let mut data = self.shared.data.write().expect(LOCK_POISONED);
            for entry in entries {
                assert!(
                    data.last_applied.is_none_or(|last| entry.log_id.index > last.index),
                    "applied {} after {:?}",
                    entry.log_id,
                    data.last_applied
                );
                data.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Normal(request) => data.state.apply(entry.log_id.index, &request),
                    // Blank and membership entries are Raft's own: the core never sees them.
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Membership(membership) => {
                        data.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        Response::default()
                    }
                };
                responses.push(response);
            }
            data.last_applied.map_or(0, |log_id| log_id.index)
        };
        self.shared.applied_tx.send_replace(applied_index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachineStore {
        self.clone()
    }

    /// A new snapshot file, written chunk by chunk as they arrive.
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let (io, path) = (self.io, self.data_dir.join(self.next_snapshot_file_name()));
        let file = {
            let path = path.clone();
            blocking(io, move || Ok(std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?))
        };
        let file = file.await.map_err(|error| StorageIOError::write_snapshot(None, &error))?;
        self.shared.snapshots_received.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(SnapshotData::file(file, path, io, Received::DeleteUnlessInstalled)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &StoredSnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        // Waits without limit on purpose, like apply.
        while self.apply_stall_failpoint.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let installable = snapshot
            .into_installable()
            .await
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), &error))?;
        let (db, data_dir, stored_meta) = (self.db.clone(), self.data_dir.clone(), meta.clone());
        let next_name = self.next_snapshot_file_name();
        // Checked, then persisted, before the state in memory changes: if
        // either fails, the node keeps the state it had, consistent with its
        // disk. The bytes are kept as the leader encoded them (any format
        // this code reads), not encoded again.
        let body = blocking(self.io, move || {
            let (body, name) = match installable {
                Installable::Bytes(bytes) => {
                    let body = decode_snapshot(&stored_meta, &bytes)?;
                    write_snapshot_file(&data_dir, &next_name, |writer| Ok(writer.write_all(&bytes)?))?;
                    (body, next_name)
                }
                Installable::File(name) => {
                    let checked = (|| {
                        std::fs::File::open(data_dir.join(&name))?.sync_all()?;
                        std::fs::File::open(&*data_dir)?.sync_all()?;
                        decode_stored_snapshot(&data_dir, &stored_meta, &Body::File(name.clone()))
                    })();
                    if checked.is_err() {
                        let _ = std::fs::remove_file(data_dir.join(&name));
                    }
                    (checked?, name)
                }
            };
            let stored = store_snapshot(&db, &data_dir, &stored_meta, &name)?;
            // openraft installs only a snapshot beyond its committed log id,
            // and every stored snapshot is at or before it.
            assert!(stored, "installing snapshot {} older than the stored one", stored_meta.snapshot_id);
            Ok(body)
        })
        .await
        .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), &error))?;
        let applied_index = {
            let mut data = self.shared.data.write().expect(LOCK_POISONED);
            *data = StateMachineData {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                state: body.state,
            };
            meta.last_log_id.map_or(0, |log_id| log_id.index)
        };
        self.shared.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        self.shared.applied_tx.send_replace(applied_index);
        Ok(())
    }

    /// The current snapshot, opened to be read a chunk at a time.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let (db, data_dir, io) = (self.db.clone(), self.data_dir.clone(), self.io);
        let stored = blocking(io, move || {
            // A newer snapshot committed between reading the name and opening
            // the file has deleted it: the name is read again, a few times.
            let mut attempts_left = 3;
            loop {
                let Some((meta, body)) = read_snapshot(&*db)? else { return Ok(None) };
                let name = match body {
                    Body::Inline(bytes) => return Ok(Some((meta, SnapshotData::in_memory(bytes)))),
                    Body::File(name) => name,
                };
                match open_snapshot_file(&data_dir, &name) {
                    Err(Error::Io(error)) if error.kind() == std::io::ErrorKind::NotFound && attempts_left > 0 => {
                        attempts_left -= 1;
                    }
                    outcome => {
                        return outcome
                            .map(|(file, path)| Some((meta, SnapshotData::file(file, path, io, Received::No))))
                    }
                }
            }
        })
        .await
        .map_err(|error| StorageIOError::read_snapshot(None, &error))?;
        Ok(stored.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(data) }))
    }
}
