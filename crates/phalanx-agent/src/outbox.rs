//! The outbox: results an agent could not deliver, kept until the cluster
//! gives a definite answer for each (docs/sdk.md, items 6 and 8).
//!
//! On disk it is a JSON-lines file: an entry counts as stored once its line
//! is fsynced (and the file's directory, when the file was created);
//! removing the delivered head rewrites the file to a temporary name, fsyncs
//! it and renames it over the old one, then fsyncs the directory, so a crash
//! leaves either the old or the new file, never a torn one. A torn last line
//! (a crash mid-append) is dropped at open and the file rewritten before the
//! next append. One agent owns a file at a time: an exclusive `flock` on
//! `<file>.lock`, held until the outbox is dropped. Survives the agent's own
//! restart. Without a file (`Outbox::in_memory`) the same queue is kept in
//! memory only, so an agent without an outbox directory behaves the same
//! until its process ends.
//!
//! Leaves to the agent (`agent.rs`) when to store, send and remove entries.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Entries kept at most; past this a result is refused (and logged) rather than grow without bound.
pub const OUTBOX_ENTRIES_MAX: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    Complete {
        result: Value,
        /// What the attempt consumed, as the handler reported it (absent in
        /// entries written before usage was reported).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<phalanx_api::Usage>,
    },
    Fail {
        error: String,
        retryable: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<phalanx_api::Usage>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub task_id: u64,
    pub fence: u64,
    pub report: Report,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another agent, in this process or another, holds the outbox.
    #[error("outbox {path} is in use by another agent (lock file {path}.lock)")]
    Locked { path: PathBuf },
    #[error("the outbox holds OUTBOX_ENTRIES_MAX ({OUTBOX_ENTRIES_MAX}) entries")]
    Full,
    #[error("outbox {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub struct Outbox {
    /// `None`: kept in memory only.
    path: Option<PathBuf>,
    entries: Mutex<VecDeque<Entry>>,
    /// Holds the exclusive lock for as long as the outbox lives.
    _lock: Option<File>,
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn line_of(entry: &Entry) -> Vec<u8> {
    let mut line = serde_json::to_vec(entry).expect("entry serialises");
    line.push(b'\n');
    line
}

/// Writes `entries` to a temporary file, fsyncs it, renames it over `path`
/// and fsyncs the directory: the old file or the new, never a mix.
fn rewrite(path: &Path, entries: &VecDeque<Entry>) -> std::io::Result<()> {
    let temporary = path.with_extension("outbox.tmp");
    {
        let mut file = File::create(&temporary)?;
        for entry in entries {
            file.write_all(&line_of(entry))?;
        }
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    sync_dir(path)
}

impl Outbox {
    /// Opens (or creates) the outbox file, takes its lock and loads what it
    /// holds. A torn last line (a crash mid-append, before its fsync
    /// returned) was never acknowledged as stored: it is dropped, and the
    /// file rewritten without it so that the next append starts a line.
    pub fn open(path: &Path) -> Result<Outbox, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(Error::Locked { path: path.to_path_buf() }),
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        let mut entries = VecDeque::new();
        if path.exists() {
            let mut text = String::new();
            File::open(path).and_then(|mut file| file.read_to_string(&mut text)).map_err(io)?;
            let mut clean = text.is_empty() || text.ends_with('\n');
            for line in text.lines() {
                match serde_json::from_str::<Entry>(line) {
                    Ok(entry) => entries.push_back(entry),
                    Err(error) => {
                        clean = false;
                        tracing::error!(path = %path.display(), %error, "outbox: an unreadable line is dropped");
                    }
                }
            }
            if !clean {
                rewrite(path, &entries).map_err(io)?;
            }
        } else {
            File::create(path).and_then(|file| file.sync_all()).map_err(io)?;
            sync_dir(path).map_err(io)?;
        }
        Ok(Outbox { path: Some(path.to_path_buf()), entries: Mutex::new(entries), _lock: Some(lock) })
    }

    /// An outbox kept in memory only: the same queue, lost with the process.
    pub fn in_memory() -> Outbox {
        Outbox { path: None, entries: Mutex::new(VecDeque::new()), _lock: None }
    }

    /// Whether entries survive the process (a file backs them).
    pub fn is_durable(&self) -> bool {
        self.path.is_some()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("outbox lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().expect("outbox lock").iter().cloned().collect()
    }

    /// Appends and fsyncs; returns only once the entry is durable.
    pub fn push(&self, entry: &Entry) -> Result<(), Error> {
        let mut entries = self.entries.lock().expect("outbox lock");
        if entries.len() >= OUTBOX_ENTRIES_MAX {
            return Err(Error::Full);
        }
        if let Some(path) = &self.path {
            let io = |source| Error::Io { path: path.clone(), source };
            let mut file = OpenOptions::new().append(true).open(path).map_err(io)?;
            file.write_all(&line_of(entry)).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        entries.push_back(entry.clone());
        Ok(())
    }

    pub fn front(&self) -> Option<Entry> {
        self.entries.lock().expect("outbox lock").front().cloned()
    }

    /// Removes the delivered head, durably.
    pub fn pop_front(&self) -> Result<(), Error> {
        let mut entries = self.entries.lock().expect("outbox lock");
        let mut remaining = entries.clone();
        remaining.pop_front();
        if let Some(path) = &self.path {
            rewrite(path, &remaining).map_err(|source| Error::Io { path: path.clone(), source })?;
        }
        *entries = remaining;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_pops_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.outbox");
        let outbox = Outbox::open(&path).unwrap();
        for task_id in 1..=3 {
            outbox
                .push(&Entry {
                    task_id,
                    fence: 7,
                    report: Report::Complete { result: Value::from(task_id), usage: None },
                })
                .unwrap();
        }
        outbox.pop_front().unwrap();
        drop(outbox);
        let reopened = Outbox::open(&path).unwrap();
        let ids: Vec<u64> = reopened.entries().iter().map(|e| e.task_id).collect();
        assert_eq!(ids, [2, 3]);
    }

    fn failed(task_id: u64) -> Entry {
        Entry { task_id, fence: 1, report: Report::Fail { error: "x".into(), retryable: true, usage: None } }
    }

    /// docs/sdk.md, 8: a torn last line is dropped, and the next entry is
    /// not glued to it (it would be unreadable at the next open).
    #[test]
    fn sdk_8_a_torn_last_line_is_dropped_and_the_next_entry_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.outbox");
        let outbox = Outbox::open(&path).unwrap();
        outbox.push(&failed(1)).unwrap();
        drop(outbox);
        OpenOptions::new().append(true).open(&path).unwrap().write_all(br#"{"task_id": 2, "fen"#).unwrap();
        let reopened = Outbox::open(&path).unwrap();
        assert_eq!(reopened.len(), 1);
        reopened.push(&failed(3)).unwrap();
        drop(reopened);
        let ids: Vec<u64> = Outbox::open(&path).unwrap().entries().iter().map(|e| e.task_id).collect();
        assert_eq!(ids, [1, 3]);
    }

    /// docs/sdk.md, 8: one owner per outbox file; the lock goes with the outbox.
    #[test]
    fn sdk_8_a_second_agent_on_the_same_outbox_fails_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.outbox");
        let first = Outbox::open(&path).unwrap();
        let second = Outbox::open(&path).err().expect("the outbox is held");
        assert!(matches!(second, Error::Locked { .. }), "{second:?}");
        assert!(second.to_string().contains("c.outbox is in use by another agent"), "{second}");
        drop(first);
        Outbox::open(&path).expect("free again once the first is dropped");
    }

    #[test]
    fn an_outbox_in_memory_keeps_the_same_queue() {
        let outbox = Outbox::in_memory();
        assert!(!outbox.is_durable());
        outbox.push(&failed(1)).unwrap();
        outbox.push(&failed(2)).unwrap();
        outbox.pop_front().unwrap();
        assert_eq!(outbox.front().map(|e| e.task_id), Some(2));
    }
}
