//! The Phalanx orchestrator state machine: commands in, outcomes out.
//!
//! Owns tasks, queues, leases, agents, conversations, dead letters,
//! idempotency keys, and flow control (per-key limits, fair dispatch,
//! budgets, pause and replay). Deliberately leaves everything else to the runtime
//! (`phalanx-server`): no I/O, no clock, no threads, no randomness, and no
//! `HashMap` (its iteration order would differ between replicas).
//! Time enters only as the leader-stamped `now_ms` of each log entry.

pub mod command;
pub mod flow;
pub mod limits;
pub mod state;
pub mod task;

pub use command::{Command, NewTask, Outcome, Request, Response, Writer};
pub use flow::{
    Budget, KeyLimits, KeyStatus, KeyUsage, Limit, OnExhausted, Pause, PauseCause, QueuePolicy, Usage, WaitingOn,
};
pub use limits::Limits;
pub use state::{Error, State};
pub use task::{payload_hash, Adoption, Agent, Child, Grant, Lease, Task, TaskState, TrailStep};
