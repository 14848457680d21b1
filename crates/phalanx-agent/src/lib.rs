//! The Rust agent SDK and client for Phalanx.
//!
//! `client` talks to any node of a cluster (failover, backoff with full
//! jitter, Retry-After, a retry budget); `agent` runs handlers for leased
//! tasks with fencing, lease extension, delegation (fenced, with the
//! children of earlier attempts handed to the next one) and graceful drain;
//! `outbox` keeps results durable while no node can be reached. Both SDKs,
//! this one and `sdk/python`, follow the numbered list of `docs/sdk.md`;
//! refusals are classified with the contract's `phalanx_api::ErrorCode`.

pub mod agent;
pub mod batch;
pub mod client;
pub mod outbox;
pub mod throttle;

pub use agent::{handler, Agent, AgentConfig, AgentStats, AutonomousHandler, Handler, HandlerError, Mode, TaskContext};
pub use batch::{CompleteBatcher, SubmitBatcher};
pub use client::{
    parse_nodes, payload_hash, Child, Client, ClusterInfo, ClusterNode, ContextEntry, Conversation, Error, LeaseGrant,
    Outcome, Refusal, Registered, SubmitRequest, Submitted, Task, TaskLease, TaskPage, TaskState,
};
