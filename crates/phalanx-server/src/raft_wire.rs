//! The Raft message format: how a Raft RPC's body and its answer are
//! encoded, and the version that names the encoding.
//!
//! - Format 1 (the previous main's, still read): JSON, with no version
//!   header. A request without `x-phalanx-raft-format` is format 1.
//! - Format 2 (written now): MessagePack with named fields (self-describing,
//!   so a field appended later with a default reads back, and openraft's
//!   types and our tagged commands decode as they do from JSON), sent with
//!   `x-phalanx-raft-format: 2`. Payloads and results are JSON text inside
//!   commands: MessagePack carries them as plain strings where JSON escapes
//!   every quote, and a snapshot chunk's bytes as one or two bytes each
//!   rather than as decimal text.
//!
//! A node answers in the format it was asked in, so a node of the previous
//! main still reads every answer it gets. A node sends format 2 and falls
//! back to format 1 for a peer that cannot read it (`network.rs`); a format
//! it does not know is refused with a message naming both versions.

use axum::http::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The header naming a Raft message's format (absent: format 1).
pub const RAFT_FORMAT_HEADER: &str = "x-phalanx-raft-format";
/// The format this node writes.
pub const RAFT_FORMAT_VERSION: u32 = 2;
/// The oldest format this node reads.
pub const RAFT_FORMAT_OLDEST: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Format 1: JSON.
    Json,
    /// Format 2: MessagePack with named fields.
    MessagePack,
}

impl Format {
    pub fn version(self) -> u32 {
        match self {
            Format::Json => 1,
            Format::MessagePack => 2,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::MessagePack => "application/msgpack",
        }
    }

    /// The format of a message from its headers; a version this node cannot
    /// read is refused naming both.
    pub fn of(headers: &HeaderMap) -> Result<Format, String> {
        let Some(value) = headers.get(RAFT_FORMAT_HEADER) else { return Ok(Format::Json) };
        let text = value.to_str().unwrap_or("");
        match text.trim().parse::<u32>() {
            Ok(1) => Ok(Format::Json),
            Ok(2) => Ok(Format::MessagePack),
            Ok(version) => Err(format!(
                "Raft message format {version} is not one this node reads: it reads formats \
                 {RAFT_FORMAT_OLDEST} to {RAFT_FORMAT_VERSION} (a newer node must not send it to an older one)"
            )),
            Err(_) => Err(format!("{RAFT_FORMAT_HEADER} {text:?} is not a format version")),
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, String> {
        match self {
            Format::Json => serde_json::to_vec(value).map_err(|error| error.to_string()),
            Format::MessagePack => rmp_serde::to_vec_named(value).map_err(|error| error.to_string()),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            Format::Json => serde_json::from_slice(bytes).map_err(|error| error.to_string()),
            Format::MessagePack => rmp_serde::from_slice(bytes).map_err(|error| error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_types::{Member, TypeConfig};
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
    use phalanx_core::{Command, NewTask, Request};
    use std::collections::{BTreeMap, BTreeSet};

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn membership() -> Membership<u64, Member> {
        let nodes: BTreeMap<u64, Member> = [(1, Member::new("127.0.0.1:7001", "127.0.0.1:8001"))].into();
        Membership::new(vec![BTreeSet::from([1])], nodes)
    }

    /// Every command the state machine has, as the fuzzers and the
    /// simulation build them, survives format 2 exactly as format 1.
    fn commands() -> Vec<Command> {
        let mut task = NewTask::new("q", "{\"quote\": \"\\\"\", \"n\": 18446744073709551615}");
        task.idempotency_key = Some("k".into());
        task.priority = 9;
        serde_json::from_value(serde_json::json!([
            {"type": "submit", "tasks": [serde_json::to_value(&task).unwrap()]},
            {"type": "complete", "task_id": 3, "fence": 7, "result": "{\"ok\": true}"},
            {"type": "cancel", "task_id": 4},
            {"type": "tick"},
            {"type": "register_agent", "agent_id": "a", "capabilities": ["q"], "capacity": 4, "session": "s"},
            {"type": "lease", "agent_id": "a", "epoch": 2, "queues": ["q"], "tasks_max": 64, "lease_ttl_ms": 30000},
            {"type": "fail", "task_id": 5, "fence": 8, "error": "e", "retryable": true}
        ]))
        .unwrap()
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        for format in [Format::Json, Format::MessagePack] {
            let bytes = format.encode(value).unwrap();
            let back: T = format.decode(&bytes).unwrap();
            assert_eq!(&back, value, "{format:?}");
        }
    }

    #[test]
    fn every_rpc_and_answer_reads_back_in_both_formats() {
        let entries = vec![
            Entry::<TypeConfig> { log_id: log_id(2, 5), payload: EntryPayload::Blank },
            Entry { log_id: log_id(2, 6), payload: EntryPayload::Normal(Request { now_ms: 9, commands: commands() }) },
            Entry { log_id: log_id(2, 7), payload: EntryPayload::Membership(membership()) },
        ];
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(2, 4)),
            entries,
            leader_commit: Some(log_id(1, 3)),
        };
        let bytes = Format::MessagePack.encode(&append).unwrap();
        let back: AppendEntriesRequest<TypeConfig> = Format::MessagePack.decode(&bytes).unwrap();
        assert_eq!(format!("{back:?}"), format!("{append:?}"));
        assert!(bytes.len() < Format::Json.encode(&append).unwrap().len());
        round_trip(&VoteRequest { vote: Vote::new(3, 2), last_log_id: Some(log_id(2, 9)) });
        let answer: Result<AppendEntriesResponse<u64>, openraft::error::RaftError<u64>> =
            Ok(AppendEntriesResponse::HigherVote(Vote::new(4, 3)));
        round_trip(&answer);
        let snapshot = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(2, 7)),
                last_membership: StoredMembership::new(Some(log_id(2, 7)), membership()),
                snapshot_id: "2-7".into(),
            },
            offset: 0,
            data: (0..=255).collect(),
            done: true,
        };
        let bytes = Format::MessagePack.encode(&snapshot).unwrap();
        let back: InstallSnapshotRequest<TypeConfig> = Format::MessagePack.decode(&bytes).unwrap();
        assert_eq!(back.data, snapshot.data);
        assert!(bytes.len() < Format::Json.encode(&snapshot).unwrap().len());
    }

    #[test]
    fn the_header_names_the_format_and_an_unknown_one_is_refused_naming_both() {
        let mut headers = HeaderMap::new();
        assert_eq!(Format::of(&headers), Ok(Format::Json), "the previous main sends no header");
        headers.insert(RAFT_FORMAT_HEADER, "2".parse().unwrap());
        assert_eq!(Format::of(&headers), Ok(Format::MessagePack));
        headers.insert(RAFT_FORMAT_HEADER, "3".parse().unwrap());
        let refused = Format::of(&headers).unwrap_err();
        assert!(refused.contains("format 3") && refused.contains("formats 1 to 2"), "{refused}");
        headers.insert(RAFT_FORMAT_HEADER, "two".parse().unwrap());
        assert!(Format::of(&headers).is_err());
    }

    #[test]
    fn a_malformed_message_pack_body_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\xc1", b"\x81\xa4vote\xcf", &[0xdc, 0xff, 0xff]] {
            assert!(Format::MessagePack.decode::<VoteRequest<u64>>(bytes).is_err());
            assert!(Format::MessagePack.decode::<AppendEntriesRequest<TypeConfig>>(bytes).is_err());
        }
    }
}
