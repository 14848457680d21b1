//! The openraft type configuration: what a log entry carries and how nodes are named.
//!
//! A log entry's application data is a `phalanx_core::Request` (a batch of
//! commands with the leader's time stamp); its response is the batch's outcomes.

use std::io::Cursor;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = phalanx_core::Request,
        R = phalanx_core::Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
