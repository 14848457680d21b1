//! The openraft type configuration: what a log entry carries and how nodes are named.
//!
//! A log entry's application data is a `phalanx_core::Request` (a batch of
//! commands with the leader's time stamp); its response is the batch's outcomes.

use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// A member of the cluster: where clients reach it, and where its Raft RPCs
/// go. With a separate Raft listener, consensus traffic has its own socket and
/// threads, so client load cannot delay it into a spurious election.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub api: String,
    pub raft: String,
}

impl Member {
    pub fn new(api: impl Into<String>, raft: impl Into<String>) -> Member {
        Member { api: api.into(), raft: raft.into() }
    }
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.api, self.raft)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = phalanx_core::Request,
        R = phalanx_core::Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
