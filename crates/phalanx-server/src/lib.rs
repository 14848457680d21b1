//! A Phalanx node: openraft replica, redb storage, Raft transport and the HTTP API.
//!
//! `node::start` is the entry point; `api` is the HTTP surface; `proposer`
//! turns requests into batched log entries; `store` keeps the log, the vote
//! and snapshots in redb; `network` carries Raft RPCs between nodes.

pub mod admission;
pub mod api;
pub mod clock;
pub mod config;
pub mod console;
pub mod controller;
pub mod election_guard;
pub mod error;
pub mod histogram;
pub mod listener;
pub mod metrics;
pub mod network;
pub mod node;
pub mod proposer;
pub mod raft_edge;
pub mod raft_types;
pub mod raft_wire;
pub mod store;
pub mod tls;
pub mod trace;

pub use config::NodeConfig;
pub use node::{start, Running};
