//! `/metrics` in the Prometheus text format: Raft progress, task counts per
//! queue and state, the replicated counters, and this node's own counters.

use crate::node::Node;
use std::fmt::Write;
use std::sync::atomic::Ordering;

pub fn render(node: &Node) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    };
    let (term, leader, is_leader, last_applied, last_log, snapshot) = {
        let metrics = node.raft.metrics();
        let m = metrics.borrow();
        (
            m.current_term,
            m.current_leader.unwrap_or(0),
            (m.current_leader == Some(node.id())) as u64,
            m.last_applied.map(|l| l.index).unwrap_or(0),
            m.last_log_index.unwrap_or(0),
            m.snapshot.map(|l| l.index).unwrap_or(0),
        )
    };
    gauge("phalanx_raft_term", "Current Raft term.", term);
    gauge("phalanx_raft_leader_id", "Id of the leader this node knows (0: none).", leader);
    gauge("phalanx_raft_is_leader", "1 if this node leads.", is_leader);
    gauge("phalanx_raft_last_applied_index", "Last log index applied to the state machine.", last_applied);
    gauge("phalanx_raft_last_log_index", "Last log index in this node's log.", last_log);
    gauge("phalanx_raft_snapshot_index", "Last log index covered by the snapshot.", snapshot);
    let stats = &node.stats;
    gauge(
        "phalanx_http_requests_total",
        "HTTP requests served by this node.",
        stats.http_requests.load(Ordering::Relaxed),
    );
    gauge("phalanx_forwarded_total", "Requests forwarded to the leader.", stats.forwarded.load(Ordering::Relaxed));
    gauge(
        "phalanx_refused_overload_total",
        "Requests refused by admission control.",
        stats.refused_overload.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_connections_refused_total",
        "Connections answered 503 at once because connections_max (or connections_per_address_max) were open.",
        node.listener_stats.connections_refused.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_connections_timed_out_total",
        "Connections closed because a request head was too slow or they stayed idle.",
        node.listener_stats.connections_timed_out.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_agents_expired_total",
        "Agents expired by this node as leader.",
        stats.agents_expired.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_submits_accepted_total",
        "Submitted tasks this node accepted as leader.",
        stats.submits_accepted.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_submits_refused_total",
        "Submitted tasks this node refused as leader for what the policy allows (watched by the policy guard).",
        stats.submits_refused.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_leaderships_total",
        "Terms in which this node became leader.",
        stats.leader_changes.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_early_elections_total",
        "Elections this node asked for as soon as its silent leader's lease was over everywhere it could see.",
        stats.early_elections.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_log_entries_proposed_total",
        "Log entries proposed here.",
        node.proposer.stats.entries.load(Ordering::Relaxed),
    );
    gauge(
        "phalanx_commands_proposed_total",
        "Commands proposed here (entries x batch size).",
        node.proposer.stats.commands.load(Ordering::Relaxed),
    );

    let data = node.shared.data.read().expect("state lock");
    let state = &data.state;
    let counters = state.counters();
    for (name, value) in [
        ("submitted", counters.submitted),
        ("deduplicated", counters.deduplicated),
        ("leases_granted", counters.leases_granted),
        ("leases_expired", counters.leases_expired),
        ("succeeded", counters.succeeded),
        ("failed", counters.failed),
        ("cancelled", counters.cancelled),
        ("dead", counters.dead),
        ("superseded", counters.superseded),
        ("compacted", counters.compacted),
    ] {
        let _ = writeln!(out, "phalanx_tasks_{name}_total {value}");
    }
    let _ = writeln!(out, "# TYPE phalanx_tasks gauge");
    for (queue, counts) in state.queue_stats() {
        for (i, state_name) in
            ["pending", "leased", "succeeded", "failed", "cancelled", "dead", "paused"].iter().enumerate()
        {
            let _ = writeln!(out, "phalanx_tasks{{queue=\"{queue}\",state=\"{state_name}\"}} {}", counts[i]);
        }
    }
    let _ = writeln!(out, "phalanx_agents {}", state.agents().count());
    let _ = writeln!(out, "phalanx_agents_stuck {}", state.agents().filter(|a| a.stuck_count > 0).count());
    let _ = writeln!(out, "phalanx_queues_unserved {}", state.unserved_queues().len());
    let _ = writeln!(out, "phalanx_policy_version {}", state.policy_version());
    let _ = writeln!(out, "phalanx_oldest_pending_age_ms {}", state.oldest_pending_age_ms().unwrap_or(0));
    out
}
