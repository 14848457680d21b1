//! Every bound the state machine enforces, named `*_max`.
//!
//! The limits are part of the replicated state (so every replica refuses the
//! same command for the same reason); the runtime only reads them.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of one task payload (JSON text).
    pub payload_bytes_max: usize,
    /// Bytes of one result or error text.
    pub result_bytes_max: usize,
    /// Non-terminal tasks in one queue.
    pub queue_tasks_max: usize,
    /// Tasks kept in the state, terminal ones included (retention compacts them).
    pub tasks_max: usize,
    /// Tasks in one submit batch.
    pub batch_tasks_max: usize,
    /// Leases one agent may hold at once, whatever capacity it declares.
    pub leases_per_agent_max: u32,
    /// Registered agents.
    pub agents_max: usize,
    /// Capabilities one agent may declare.
    pub capabilities_per_agent_max: usize,
    pub queue_name_bytes_max: usize,
    pub id_bytes_max: usize,
    pub attempts_max: u32,
    /// Lease time-to-live bounds, in milliseconds of log time.
    pub lease_ttl_ms_min: u64,
    pub lease_ttl_ms_max: u64,
    pub lease_ttl_ms_default: u64,
    /// Retry backoff after a retryable failure: base * 2^(attempt-1), capped.
    pub retry_backoff_ms_base: u64,
    pub retry_backoff_ms_max: u64,
    /// Conversations, and bytes of the context of one conversation.
    pub conversations_max: usize,
    pub conversation_bytes_max: usize,
    pub idempotency_keys_max: usize,
    pub delegation_hops_max: u32,
    /// Terminal tasks kept for reads; the oldest are compacted out past this.
    pub finished_tasks_max: usize,
    /// Tasks one wait may name, and the longest wait.
    pub wait_tasks_max: usize,
    pub wait_ms_max: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            payload_bytes_max: 256 * 1024,
            result_bytes_max: 256 * 1024,
            queue_tasks_max: 100_000,
            tasks_max: 1_000_000,
            batch_tasks_max: 1_000,
            leases_per_agent_max: 1_000,
            agents_max: 10_000,
            capabilities_per_agent_max: 64,
            queue_name_bytes_max: 128,
            id_bytes_max: 128,
            attempts_max: 100,
            lease_ttl_ms_min: 100,
            lease_ttl_ms_max: 24 * 3600 * 1000,
            lease_ttl_ms_default: 30_000,
            retry_backoff_ms_base: 100,
            retry_backoff_ms_max: 60_000,
            conversations_max: 100_000,
            conversation_bytes_max: 1024 * 1024,
            idempotency_keys_max: 1_000_000,
            delegation_hops_max: 25,
            finished_tasks_max: 200_000,
            wait_tasks_max: 1_000,
            wait_ms_max: 24 * 3600 * 1000,
        }
    }
}
