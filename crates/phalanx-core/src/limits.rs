//! The policy: every bound the state machine enforces (named `*_max`) and the
//! timings the leader's runtime follows.
//!
//! The policy is part of the replicated state, versioned, so every replica
//! refuses the same command for the same reason and a bad change can be
//! rolled back; `validate` runs before a change is proposed and again when
//! it is applied, and names the offending field, its value and the bound.
//! Every key has a lower and an upper bound (`BOUNDS`); what a change would
//! do to the state as it is now (refuse all new work, delete retained
//! tasks) is judged by `State::force_reasons`, since it needs the state.

use crate::flow::QueuePolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Children one task may have (a delegation past it is refused); a lease
    /// lists at most this many of its task's children.
    #[serde(default = "default_children_per_task_max")]
    pub children_per_task_max: usize,
    /// Entries of the flow-control limits table (keys and wildcards).
    #[serde(default = "default_limit_keys_max")]
    pub limit_keys_max: usize,
    /// Queues with a retry policy of their own in `queues`.
    #[serde(default = "default_queue_policies_max")]
    pub queue_policies_max: usize,
    /// Per-queue retry policy (backoff, a cap on attempts, what happens to a
    /// task that used them all). Not a number, so not in `BOUNDS`: checked
    /// by `validate` against the global keys' bounds. Left out of the
    /// serialised policy while empty, so a policy without one reads as before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub queues: BTreeMap<String, QueuePolicy>,
}

fn default_limit_keys_max() -> usize {
    Limits::default().limit_keys_max
}

fn default_queue_policies_max() -> usize {
    Limits::default().queue_policies_max
}

fn default_children_per_task_max() -> usize {
    Limits::default().children_per_task_max
}

fn default_state_bytes_max() -> usize {
    Limits::default().state_bytes_max
}

fn default_conversation_ttl_ms() -> u64 {
    Limits::default().conversation_ttl_ms
}

/// A policy change refused by validation, naming the field (and, in the
/// reason, the value and the bound it broke).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

/// The lowest and highest value one policy key may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub field: &'static str,
    pub min: u64,
    pub max: u64,
}

impl Bound {
    /// Refuses a value outside the bounds, naming the key, the value and the bound.
    pub fn check(&self, value: u64) -> Result<(), Invalid> {
        if value < self.min {
            return Err(Invalid {
                field: self.field,
                reason: format!("{value} is below the lower bound {}", self.min),
            });
        }
        if value > self.max {
            return Err(Invalid {
                field: self.field,
                reason: format!("{value} is above the upper bound {}", self.max),
            });
        }
        Ok(())
    }
}

const fn bound(field: &'static str, min: u64, max: u64) -> Bound {
    Bound { field, min, max }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SECOND_MS: u64 = 1000;
const HOUR_MS: u64 = 3600 * SECOND_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Every policy key with its bounds, one row per key (docs/api.md has the
/// same table with the reason for each row). A lower bound is the least
/// value with which the system still serves: no `*_max` is 0, no name
/// limit too short for a namespaced name, no time-to-live shorter than the
/// timers that feed it. An upper bound is the most a replica can hold in
/// memory or a timer can usefully wait: values past it are typing mistakes,
/// and keeping every value far below `u64::MAX` is what makes the arithmetic
/// on them (doublings, sums with log time) safe. A test checks that every
/// key of `Limits` has a row.
pub const BOUNDS: &[Bound] = &[
    bound("payload_bytes_max", 64, 64 * MIB),
    bound("result_bytes_max", 64, 64 * MIB),
    bound("queue_tasks_max", 1, 10_000_000),
    bound("tasks_max", 100, 10_000_000),
    bound("batch_tasks_max", 1, 10_000),
    bound("leases_per_agent_max", 1, 100_000),
    bound("agents_max", 1, 1_000_000),
    bound("capabilities_per_agent_max", 1, 1_024),
    bound("queue_name_bytes_max", 16, 1_024),
    bound("id_bytes_max", 16, 1_024),
    bound("attempts_max", 1, 1_000),
    bound("lease_ttl_ms_min", 10, HOUR_MS),
    bound("lease_ttl_ms_max", 100, 7 * DAY_MS),
    bound("lease_ttl_ms_default", 100, 7 * DAY_MS),
    bound("retry_backoff_ms_base", 1, HOUR_MS),
    bound("retry_backoff_ms_max", 1, DAY_MS),
    bound("conversations_max", 1, 10_000_000),
    bound("conversation_bytes_max", KIB, 64 * MIB),
    bound("idempotency_keys_max", 1, 10_000_000),
    bound("delegation_hops_max", 1, 1_000),
    bound("finished_tasks_max", 1, 10_000_000),
    bound("finished_task_ttl_ms", 100, 365 * DAY_MS),
    bound("wait_tasks_max", 1, 100_000),
    bound("wait_ms_max", SECOND_MS, 30 * DAY_MS),
    bound("agent_ttl_ms", SECOND_MS, DAY_MS),
    bound("agent_heartbeat_interval_ms", 100, HOUR_MS),
    bound("unserved_grace_ms", 100, 7 * DAY_MS),
    bound("policy_guard_ms", 5 * SECOND_MS, HOUR_MS),
    bound("stall_timeout_ms", SECOND_MS, 7 * DAY_MS),
    bound("state_bytes_max", MIB, 256 * 1024 * MIB),
    bound("conversation_ttl_ms", SECOND_MS, 365 * DAY_MS),
    bound("children_per_task_max", 1, 100_000),
    bound("limit_keys_max", 1, 1_000_000),
    bound("queue_policies_max", 1, 100_000),
];

/// How many heartbeat intervals an agent's time-to-live spans at least: an
/// agent may miss two heartbeats in a row (a lost packet, a leader
/// election) and still live.
pub const AGENT_TTL_HEARTBEATS_MIN: u64 = 3;

impl Limits {
    /// Every key with its value, widened to `u64`, in declaration order.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        vec![
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
            ("unserved_grace_ms", self.unserved_grace_ms),
            ("policy_guard_ms", self.policy_guard_ms),
            ("stall_timeout_ms", self.stall_timeout_ms),
            ("state_bytes_max", self.state_bytes_max as u64),
            ("conversation_ttl_ms", self.conversation_ttl_ms),
            ("children_per_task_max", self.children_per_task_max as u64),
            ("limit_keys_max", self.limit_keys_max as u64),
            ("queue_policies_max", self.queue_policies_max as u64),
        ]
    }

    /// The bounds of one key, if it is a policy key.
    pub fn bound(field: &str) -> Option<Bound> {
        BOUNDS.iter().find(|bound| bound.field == field).copied()
    }

    /// Bounds, then cross-field rules: lease time-to-live bounds ordered and
    /// the default above the heartbeat interval (an agent must be able to
    /// extend a lease before it lapses), agent time-to-live at least
    /// `AGENT_TTL_HEARTBEATS_MIN` heartbeat intervals, backoff ordered, no
    /// queue or retention larger than the whole task table. All arithmetic
    /// is checked: an overflow is a refusal, never a wrapped value.
    pub fn validate(&self) -> Result<(), Invalid> {
        let fail = |field: &'static str, reason: String| Err(Invalid { field, reason });
        for (field, value) in self.values() {
            let Some(bound) = Limits::bound(field) else {
                return fail(field, "has no bounds (a policy key without a row in limits::BOUNDS)".into());
            };
            bound.check(value)?;
        }
        if self.lease_ttl_ms_min > self.lease_ttl_ms_max {
            return fail(
                "lease_ttl_ms_min",
                format!("{} must not exceed lease_ttl_ms_max ({})", self.lease_ttl_ms_min, self.lease_ttl_ms_max),
            );
        }
        if !(self.lease_ttl_ms_min..=self.lease_ttl_ms_max).contains(&self.lease_ttl_ms_default) {
            return fail(
                "lease_ttl_ms_default",
                format!(
                    "{} must lie within lease_ttl_ms_min..=lease_ttl_ms_max ({}..={})",
                    self.lease_ttl_ms_default, self.lease_ttl_ms_min, self.lease_ttl_ms_max
                ),
            );
        }
        if self.lease_ttl_ms_default <= self.agent_heartbeat_interval_ms {
            return fail(
                "lease_ttl_ms_default",
                format!(
                    "{} must be greater than agent_heartbeat_interval_ms ({})",
                    self.lease_ttl_ms_default, self.agent_heartbeat_interval_ms
                ),
            );
        }
        let ttl_min = self.agent_heartbeat_interval_ms.checked_mul(AGENT_TTL_HEARTBEATS_MIN);
        if ttl_min.is_none_or(|ttl_min| self.agent_ttl_ms < ttl_min) {
            return fail(
                "agent_ttl_ms",
                format!(
                    "{} must be at least {AGENT_TTL_HEARTBEATS_MIN} times agent_heartbeat_interval_ms ({})",
                    self.agent_ttl_ms, self.agent_heartbeat_interval_ms
                ),
            );
        }
        if self.retry_backoff_ms_base > self.retry_backoff_ms_max {
            return fail(
                "retry_backoff_ms_base",
                format!(
                    "{} must not exceed retry_backoff_ms_max ({})",
                    self.retry_backoff_ms_base, self.retry_backoff_ms_max
                ),
            );
        }
        // The budget must hold at least one task of the largest payload and
        // result, and one full conversation: below that, a write every other
        // limit allows could never be stored.
        let one_task = self.payload_bytes_max as u64 + self.result_bytes_max as u64;
        if (self.state_bytes_max as u64) < one_task.max(self.conversation_bytes_max as u64) {
            return fail(
                "state_bytes_max",
                format!(
                    "{} must be at least payload_bytes_max + result_bytes_max ({one_task}) and conversation_bytes_max ({})",
                    self.state_bytes_max, self.conversation_bytes_max
                ),
            );
        }
        if self.finished_tasks_max > self.tasks_max {
            return fail(
                "finished_tasks_max",
                format!("{} must not exceed tasks_max ({})", self.finished_tasks_max, self.tasks_max),
            );
        }
        if self.queue_tasks_max > self.tasks_max {
            return fail(
                "queue_tasks_max",
                format!("{} must not exceed tasks_max ({})", self.queue_tasks_max, self.tasks_max),
            );
        }
        self.validate_queues()
    }

    /// The per-queue retry policies: at most `queue_policies_max`, each
    /// named like a queue, every value within its global key's bounds, the
    /// backoff ordered (against the global value where one is absent) and
    /// the attempts within `attempts_max`.
    fn validate_queues(&self) -> Result<(), Invalid> {
        let fail = |reason: String| Err(Invalid { field: "queues", reason });
        if self.queues.len() > self.queue_policies_max {
            return fail(format!(
                "{} queues have a policy, over queue_policies_max ({})",
                self.queues.len(),
                self.queue_policies_max
            ));
        }
        for (queue, policy) in &self.queues {
            let well_named = !queue.is_empty()
                && queue.len() <= self.queue_name_bytes_max
                && queue.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
            if !well_named {
                return fail(format!(
                    "{queue:?} is not a queue name (1..={} bytes of A-Z a-z 0-9 . _ - :)",
                    self.queue_name_bytes_max
                ));
            }
            for (field, value) in [
                ("retry_backoff_ms_base", policy.retry_backoff_ms_base),
                ("retry_backoff_ms_max", policy.retry_backoff_ms_max),
            ] {
                if let Some(value) = value {
                    let bound = Limits::bound(field).expect("a policy key");
                    if let Err(invalid) = bound.check(value) {
                        return fail(format!("{queue:?}: {field} {}", invalid.reason));
                    }
                }
            }
            let base = policy.retry_backoff_ms_base.unwrap_or(self.retry_backoff_ms_base);
            let max = policy.retry_backoff_ms_max.unwrap_or(self.retry_backoff_ms_max);
            if base > max {
                return fail(format!(
                    "{queue:?}: retry_backoff_ms_base {base} must not exceed retry_backoff_ms_max {max}"
                ));
            }
            if let Some(attempts) = policy.max_attempts {
                if attempts == 0 || attempts > self.attempts_max {
                    return fail(format!("{queue:?}: max_attempts {attempts} must be 1..={}", self.attempts_max));
                }
            }
        }
        Ok(())
    }

    /// The retry policy of a queue, if it has one of its own.
    pub fn queue_policy(&self, queue: &str) -> Option<&QueuePolicy> {
        self.queues.get(queue)
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
            children_per_task_max: 1_000,
            limit_keys_max: 10_000,
            queue_policies_max: 1_000,
            queues: BTreeMap::new(),
        }
    }
}
