//! The openraft type configuration: what a log entry carries and how nodes are named.
//!
//! A log entry's application data is a `phalanx_core::Request` (a batch of
//! commands with the leader's time stamp); its response is the batch's outcomes.

use serde::{Deserialize, Serialize};

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

/// Longest member address accepted (`HOST:PORT`).
pub const ADDR_BYTES_MAX: usize = 255;

/// Checks that `addr` is `HOST:PORT` with a port and a plausible host, so a
/// membership never holds an address no peer can dial.
pub fn check_addr(addr: &str) -> Result<(), String> {
    if addr.is_empty() || addr.len() > ADDR_BYTES_MAX {
        return Err(format!("address {addr:?} must be 1 to {ADDR_BYTES_MAX} bytes"));
    }
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("address {addr:?} is not HOST:PORT"))?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 => {}
        _ => return Err(format!("address {addr:?} has no valid port")),
    }
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(format!("address {addr:?} has no valid host name"));
    }
    Ok(())
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = phalanx_core::Request,
        R = phalanx_core::Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::store::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
