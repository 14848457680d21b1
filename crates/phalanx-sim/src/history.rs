//! What the simulated clients and agents were told, and the invariants
//! checked against it:
//!
//! - no acknowledged task lost (a linearizable read after the ack finds it,
//!   and the converged cluster holds it);
//! - an idempotency key names one task;
//! - at most one result accepted per task, and only from the task's current
//!   lease: never from a fence that a later grant had superseded before the
//!   result was sent;
//! - a lease never granted to two holders under one fence, and a task's
//!   fences grow in the order they were granted;
//! - replicas that applied the same entries have the same state (digest);
//! - the state machine's own invariants (`State::check_invariants`, which
//!   covers the wait-for graph's acyclicity and the indexes) on every
//!   replica at the end;
//! - liveness: once the faults stop, one leader is elected and writes are
//!   acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use tokio::time::Instant;

#[derive(Default)]
pub struct History {
    /// Acknowledged submits: task id -> idempotency key.
    pub acked: BTreeMap<u64, String>,
    keys: BTreeMap<String, u64>,
    /// (task, fence) -> the agent it was granted to, and when the grant was acknowledged.
    grants: BTreeMap<(u64, u64), (String, Instant)>,
    /// Accepted results: task -> (fence, result).
    results: BTreeMap<u64, (u64, String)>,
    /// applied index -> (digest, node that first showed it).
    digests: BTreeMap<u64, (u64, u64)>,
    pub violations: Vec<String>,
    reported: BTreeSet<String>,
}

impl History {
    fn violate(&mut self, kind: &str, detail: String) {
        // One report per kind and subject is enough to replay from.
        let line = format!("{kind}: {detail}");
        if self.reported.insert(line.clone()) && self.violations.len() < 50 {
            self.violations.push(line);
        }
    }

    pub fn submitted(&mut self, task_id: u64, key: &str) {
        match self.keys.get(key) {
            Some(id) if *id != task_id => {
                self.violate("idempotency key names two tasks", format!("{key:?}: tasks {id} and {task_id}"))
            }
            _ => {
                self.keys.insert(key.to_string(), task_id);
            }
        }
        self.acked.insert(task_id, key.to_string());
    }

    pub fn granted(&mut self, task_id: u64, fence: u64, agent: &str, poll_sent: Instant) {
        if let Some((other, _)) = self.grants.get(&(task_id, fence)) {
            if other != agent {
                let detail = format!("task {task_id} fence {fence} to {other} and to {agent}");
                self.violate("lease granted to two holders under one fence", detail);
            }
            return;
        }
        // A grant acknowledged before this poll was sent must have a lower fence.
        let earlier_higher = self
            .grants
            .range((task_id, fence + 1)..=(task_id, u64::MAX))
            .find(|(_, (_, acked))| *acked < poll_sent)
            .map(|((_, f), _)| *f);
        if let Some(higher) = earlier_higher {
            let detail = format!("task {task_id} granted fence {fence} after fence {higher}");
            self.violate("fences not increasing", detail);
        }
        self.grants.insert((task_id, fence), (agent.to_string(), Instant::now()));
    }

    /// A result acknowledged for `task_id`, sent at `sent` by the holder of `fence`.
    pub fn completed(&mut self, task_id: u64, fence: u64, result: &str, sent: Instant) {
        let superseding = self
            .grants
            .range((task_id, fence + 1)..=(task_id, u64::MAX))
            .find(|(_, (_, acked))| *acked < sent)
            .map(|((_, f), _)| *f);
        if let Some(newer) = superseding {
            let detail = format!("task {task_id}: the result of fence {fence} after fence {newer} was granted");
            self.violate("result accepted under a superseded fence", detail);
        }
        match self.results.get(&task_id) {
            Some((f, r)) if *f != fence || r != result => {
                let detail = format!("task {task_id}: fence {f} {r:?} and fence {fence} {result:?}");
                self.violate("two results accepted", detail);
            }
            _ => {
                self.results.insert(task_id, (fence, result.to_string()));
            }
        }
    }

    /// A linearizable read, sent after `task_id`'s submit was acknowledged, did not find it.
    pub fn read_missed(&mut self, task_id: u64, via: u64) {
        self.violate("a linearizable read missed an acknowledged task", format!("task {task_id} via node {via}"));
    }

    pub fn digest(&mut self, node: u64, applied: u64, digest: u64) {
        match self.digests.get(&applied) {
            Some((seen, first)) if *seen != digest => {
                let detail = format!("at index {applied}: node {first} and node {node} differ");
                self.violate("replicas diverged", detail);
            }
            Some(_) => {}
            None => {
                self.digests.insert(applied, (digest, node));
            }
        }
    }

    pub fn final_task(&mut self, task_id: u64, found: Option<(bool, Option<String>)>) {
        match found {
            None => self.violate("acknowledged task lost", format!("task {task_id}")),
            Some((succeeded, result)) => {
                if let Some((fence, accepted)) = self.results.get(&task_id).cloned() {
                    if !succeeded || result.as_deref() != Some(accepted.as_str()) {
                        let detail = format!("task {task_id}: accepted {accepted:?} (fence {fence}), now {result:?}");
                        self.violate("accepted result not kept", detail);
                    }
                }
            }
        }
    }

    pub fn liveness(&mut self, detail: String) {
        self.violate("no progress after the faults stopped", detail);
    }

    pub fn broken(&mut self, detail: String) {
        self.violate("state invariant broken", detail);
    }

    pub fn cluster_failure(&mut self, detail: String) {
        self.violate("node failure", detail);
    }

    pub fn results_accepted(&self) -> usize {
        self.results.len()
    }

    pub fn grants_seen(&self) -> usize {
        self.grants.len()
    }
}
