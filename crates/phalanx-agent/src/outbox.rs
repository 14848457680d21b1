//! The durable outbox: results an agent could not deliver, kept on local
//! disk (fsynced) until the cluster gives a definite answer for each.
//!
//! A JSON-lines file: an entry counts as stored once its line is fsynced;
//! removing the delivered head rewrites the file to a temporary name,
//! fsyncs it and renames it over the old one, so a crash leaves either the
//! old or the new file, never a torn one. Survives the agent's own restart.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Entries kept at most; past this a result is refused (and logged) rather than grow without bound.
pub const OUTBOX_ENTRIES_MAX: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    Complete { result: Value },
    Fail { error: String, retryable: bool },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub task_id: u64,
    pub fence: u64,
    pub report: Report,
}

pub struct Outbox {
    path: PathBuf,
    entries: Mutex<VecDeque<Entry>>,
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Outbox {
    /// Opens (or creates) the outbox file and loads what it holds. A torn
    /// last line (a crash mid-append, before its fsync returned) is dropped:
    /// that entry was never acknowledged as stored.
    pub fn open(path: &Path) -> std::io::Result<Outbox> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut entries = VecDeque::new();
        if path.exists() {
            for line in BufReader::new(File::open(path)?).lines() {
                let line = line?;
                if let Ok(entry) = serde_json::from_str::<Entry>(&line) {
                    entries.push_back(entry);
                }
            }
        } else {
            File::create(path)?.sync_all()?;
            sync_dir(path)?;
        }
        Ok(Outbox { path: path.to_path_buf(), entries: Mutex::new(entries) })
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
    pub fn push(&self, entry: &Entry) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("outbox lock");
        if entries.len() >= OUTBOX_ENTRIES_MAX {
            return Err(std::io::Error::other(format!(
                "outbox holds OUTBOX_ENTRIES_MAX ({OUTBOX_ENTRIES_MAX}) entries"
            )));
        }
        let mut file = OpenOptions::new().append(true).open(&self.path)?;
        let mut line = serde_json::to_vec(entry).expect("entry serialises");
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()?;
        entries.push_back(entry.clone());
        Ok(())
    }

    pub fn front(&self) -> Option<Entry> {
        self.entries.lock().expect("outbox lock").front().cloned()
    }

    /// Removes the delivered head, durably.
    pub fn pop_front(&self) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("outbox lock");
        let mut remaining = entries.clone();
        remaining.pop_front();
        let temporary = self.path.with_extension("outbox.tmp");
        {
            let mut file = File::create(&temporary)?;
            for entry in &remaining {
                let mut line = serde_json::to_vec(entry).expect("entry serialises");
                line.push(b'\n');
                file.write_all(&line)?;
            }
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &self.path)?;
        sync_dir(&self.path)?;
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
                .push(&Entry { task_id, fence: 7, report: Report::Complete { result: Value::from(task_id) } })
                .unwrap();
        }
        outbox.pop_front().unwrap();
        drop(outbox);
        let reopened = Outbox::open(&path).unwrap();
        let ids: Vec<u64> = reopened.entries().iter().map(|e| e.task_id).collect();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.outbox");
        let outbox = Outbox::open(&path).unwrap();
        outbox
            .push(&Entry { task_id: 1, fence: 1, report: Report::Fail { error: "x".into(), retryable: true } })
            .unwrap();
        drop(outbox);
        OpenOptions::new().append(true).open(&path).unwrap().write_all(br#"{"task_id": 2, "fen"#).unwrap();
        assert_eq!(Outbox::open(&path).unwrap().len(), 1);
    }
}
