//! The policy: every bound the state machine enforces (named `*_max`) and the
//! timings the leader's runtime follows.
//!
//! The policy is part of the replicated state, versioned, so every replica
//! refuses the same command for the same reason and a bad change can be
//! rolled back; `validate` runs before a change is proposed and again when
//! it is applied, and names the offending field.

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
    /// And none is kept longer than this after it finished. A task's
    /// idempotency key leaves with it: keys live this long past the task's end.
    pub finished_task_ttl_ms: u64,
    /// Tasks one wait may name, and the longest wait.
    pub wait_tasks_max: usize,
    pub wait_ms_max: u64,
    /// Agent liveness: an agent that sends no heartbeat for `agent_ttl_ms` is
    /// expired; agents are told to heartbeat every `agent_heartbeat_interval_ms`.
    pub agent_ttl_ms: u64,
    pub agent_heartbeat_interval_ms: u64,
    /// A queue with waiting tasks and no registered agent that serves it is
    /// reported at once; after this long its waiting tasks carry an error.
    pub unserved_grace_ms: u64,
    /// After a policy change, how long the leader watches for dispatch to
    /// stall before rolling the change back.
    pub policy_guard_ms: u64,
    /// A lease whose holder reports no progress for this long is revoked and
    /// the task granted elsewhere (the agent is marked stuck).
    pub stall_timeout_ms: u64,
    /// Bytes of the replicated state as a whole: task payloads, results and
    /// errors, and conversation contexts. A write that would pass it is
    /// refused (`state_full`); counts alone let 100,000 conversations of
    /// 1 MiB each through. Policies written before it existed read the default.
    #[serde(default = "default_state_bytes_max")]
    pub state_bytes_max: usize,
    /// A conversation not written for this long is deleted (it also leaves
    /// with the last task that carries its id).
    #[serde(default = "default_conversation_ttl_ms")]
    pub conversation_ttl_ms: u64,
}

fn default_state_bytes_max() -> usize {
    Limits::default().state_bytes_max
}

fn default_conversation_ttl_ms() -> u64 {
    Limits::default().conversation_ttl_ms
}

/// A policy change refused by validation, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Limits {
    /// Range and cross-field checks. Every field must be positive, and:
    /// lease time-to-live bounds ordered and above the heartbeat interval
    /// (an agent must be able to extend a lease before it lapses), agent
    /// time-to-live more than twice the heartbeat interval, backoff ordered.
    pub fn validate(&self) -> Result<(), Invalid> {
        let fail = |field: &'static str, reason: String| Err(Invalid { field, reason });
        let positive: [(&'static str, u64); 31] = [
            ("payload_bytes_max", self.payload_bytes_max as u64),
            ("result_bytes_max", self.result_bytes_max as u64),
            ("queue_tasks_max", self.queue_tasks_max as u64),
            ("tasks_max", self.tasks_max as u64),
            ("batch_tasks_max", self.batch_tasks_max as u64),
            ("leases_per_agent_max", self.leases_per_agent_max as u64),
            ("agents_max", self.agents_max as u64),
            ("capabilities_per_agent_max", self.capabilities_per_agent_max as u64),
            ("queue_name_bytes_max", self.queue_name_bytes_max as u64),
            ("id_bytes_max", self.id_bytes_max as u64),
            ("attempts_max", self.attempts_max as u64),
            ("lease_ttl_ms_min", self.lease_ttl_ms_min),
            ("lease_ttl_ms_max", self.lease_ttl_ms_max),
            ("lease_ttl_ms_default", self.lease_ttl_ms_default),
            ("retry_backoff_ms_base", self.retry_backoff_ms_base),
            ("retry_backoff_ms_max", self.retry_backoff_ms_max),
            ("conversations_max", self.conversations_max as u64),
            ("conversation_bytes_max", self.conversation_bytes_max as u64),
            ("idempotency_keys_max", self.idempotency_keys_max as u64),
            ("delegation_hops_max", self.delegation_hops_max as u64),
            ("finished_tasks_max", self.finished_tasks_max as u64),
            ("finished_task_ttl_ms", self.finished_task_ttl_ms),
            ("wait_tasks_max", self.wait_tasks_max as u64),
            ("wait_ms_max", self.wait_ms_max),
            ("agent_ttl_ms", self.agent_ttl_ms),
            ("agent_heartbeat_interval_ms", self.agent_heartbeat_interval_ms),
            ("policy_guard_ms", self.policy_guard_ms),
            ("unserved_grace_ms", self.unserved_grace_ms),
            ("stall_timeout_ms", self.stall_timeout_ms),
            ("state_bytes_max", self.state_bytes_max as u64),
            ("conversation_ttl_ms", self.conversation_ttl_ms),
        ];
        for (field, value) in positive {
            if value == 0 {
                return fail(field, "must be positive".into());
            }
        }
        if self.lease_ttl_ms_min > self.lease_ttl_ms_max {
            return fail("lease_ttl_ms_min", format!("must not exceed lease_ttl_ms_max ({})", self.lease_ttl_ms_max));
        }
        if !(self.lease_ttl_ms_min..=self.lease_ttl_ms_max).contains(&self.lease_ttl_ms_default) {
            return fail("lease_ttl_ms_default", "must lie within lease_ttl_ms_min..=lease_ttl_ms_max".into());
        }
        if self.lease_ttl_ms_default <= self.agent_heartbeat_interval_ms {
            return fail(
                "lease_ttl_ms_default",
                format!("must be greater than agent_heartbeat_interval_ms ({})", self.agent_heartbeat_interval_ms),
            );
        }
        if self.agent_ttl_ms <= 2 * self.agent_heartbeat_interval_ms {
            return fail(
                "agent_ttl_ms",
                format!("must be more than twice agent_heartbeat_interval_ms ({})", self.agent_heartbeat_interval_ms),
            );
        }
        if self.retry_backoff_ms_base > self.retry_backoff_ms_max {
            return fail("retry_backoff_ms_base", "must not exceed retry_backoff_ms_max".into());
        }
        // The budget must hold at least one task of the largest payload and
        // result, and one full conversation: below that, a write every other
        // limit allows could never be stored.
        let one_task = self.payload_bytes_max as u64 + self.result_bytes_max as u64;
        if (self.state_bytes_max as u64) < one_task.max(self.conversation_bytes_max as u64) {
            return fail(
                "state_bytes_max",
                format!(
                    "must be at least payload_bytes_max + result_bytes_max ({one_task}) and conversation_bytes_max ({})",
                    self.conversation_bytes_max
                ),
            );
        }
        if self.finished_tasks_max > self.tasks_max {
            return fail("finished_tasks_max", "must not exceed tasks_max".into());
        }
        Ok(())
    }
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
            finished_task_ttl_ms: 7 * 24 * 3600 * 1000,
            wait_tasks_max: 1_000,
            wait_ms_max: 24 * 3600 * 1000,
            agent_ttl_ms: 10_000,
            agent_heartbeat_interval_ms: 2_000,
            policy_guard_ms: 10_000,
            unserved_grace_ms: 60_000,
            stall_timeout_ms: 10 * 60 * 1000,
            state_bytes_max: 256 * 1024 * 1024,
            conversation_ttl_ms: 7 * 24 * 3600 * 1000,
        }
    }
}
