//! A Phalanx node: openraft replica, redb storage, Raft transport and the HTTP API.

pub mod raft_types;
pub mod store;
