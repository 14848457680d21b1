//! `/metrics` in the Prometheus text format: Raft progress, task counts per
//! queue and state, the replicated counters, this node's own counters, and
//! the request and commit latency histograms (`histogram.rs`).
//!
//! Conventions (checked by `crates/phalanx-cli/tests/metrics.rs`): every
//! family has `# HELP` and `# TYPE`, once; a counter's name ends in `_total`;
//! units are in the name, in base units (`_seconds`, `_bytes`).

use crate::node::Node;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Times every request this node answers, into
/// `phalanx_http_request_duration_seconds`. Long-polls (which wait for work
/// by design, up to 30 s) are kept apart, labelled `long_poll="true"`, so
/// they do not hide the latency of everything else.
pub async fn time_requests(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    let long_poll = request.uri().path().ends_with("/poll") as usize;
    let started = Instant::now();
    let response = next.run(request).await;
    node.stats.http_request_duration[long_poll].observe(started.elapsed());
    response
}

/// Writes a label value with `\`, `"` and newlines escaped, as the text
/// format requires (queue names are the operator's).
fn label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(node: &Node) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    };
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        debug_assert!(name.ends_with("_total"), "{name}: a counter's name ends in _total");
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
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
    let o = &mut out;
    gauge(o, "phalanx_raft_term", "Current Raft term.", term);
    gauge(o, "phalanx_raft_leader_id", "Id of the leader this node knows (0: none).", leader);
    gauge(o, "phalanx_raft_is_leader", "1 if this node leads.", is_leader);
    gauge(o, "phalanx_raft_last_applied_index", "Last log index applied to the state machine.", last_applied);
    gauge(o, "phalanx_raft_last_log_index", "Last log index in this node's log.", last_log);
    gauge(o, "phalanx_raft_snapshot_index", "Last log index covered by the snapshot.", snapshot);
    let copy_us = node.shared.snapshot_copy_us_last.load(std::sync::atomic::Ordering::Relaxed);
    family(
        o,
        "phalanx_snapshot_copy_seconds",
        "gauge",
        "How long the last snapshot's copy of the state held apply back.",
    );
    let _ = writeln!(o, "phalanx_snapshot_copy_seconds {}", copy_us as f64 / 1e6);
    let received = node.shared.snapshots_received.load(std::sync::atomic::Ordering::Relaxed);
    family(o, "phalanx_snapshots_received_total", "counter", "Snapshots a leader began to send to this node.");
    let _ = writeln!(o, "phalanx_snapshots_received_total {received}");
    let installed = node.shared.snapshots_installed.load(std::sync::atomic::Ordering::Relaxed);
    family(o, "phalanx_snapshots_installed_total", "counter", "Snapshots received and installed on this node.");
    let _ = writeln!(o, "phalanx_snapshots_installed_total {installed}");
    gauge(
        o,
        "phalanx_disk_free_bytes",
        "Free bytes on this node's data directory's file system.",
        node.disk_free_bytes(),
    );
    gauge(
        o,
        "phalanx_disk_free_min_bytes",
        "The watermark under which new work is refused (507 disk_full).",
        node.disk_free_min_bytes(),
    );
    gauge(
        o,
        "phalanx_admission_limit",
        "New-work requests the door admits at once now (at most requests_in_flight_max; lowered while admitted work is delayed).",
        node.admission_limit.limit() as u64,
    );
    let stats = &node.stats;
    let load = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    counter(o, "phalanx_http_requests_total", "HTTP requests served by this node.", load(&stats.http_requests));
    counter(o, "phalanx_forwarded_total", "Requests forwarded to the leader.", load(&stats.forwarded));
    counter(
        o,
        "phalanx_refused_overload_total",
        "Requests refused by admission control.",
        load(&stats.refused_overload),
    );
    counter(
        o,
        "phalanx_connections_refused_total",
        "Connections answered 503 at once because connections_max (or connections_per_address_max) were open.",
        load(&node.listener_stats.connections_refused),
    );
    counter(
        o,
        "phalanx_connections_timed_out_total",
        "Connections closed because a request head was too slow or they stayed idle.",
        load(&node.listener_stats.connections_timed_out),
    );
    counter(o, "phalanx_agents_expired_total", "Agents expired by this node as leader.", load(&stats.agents_expired));
    counter(
        o,
        "phalanx_submits_accepted_total",
        "Submitted tasks this node accepted as leader.",
        load(&stats.submits_accepted),
    );
    counter(
        o,
        "phalanx_submits_refused_total",
        "Submitted tasks this node refused as leader for what the policy allows (watched by the policy guard).",
        load(&stats.submits_refused),
    );
    counter(o, "phalanx_leaderships_total", "Terms in which this node became leader.", load(&stats.leader_changes));
    counter(
        o,
        "phalanx_early_elections_total",
        "Elections this node asked for as soon as its silent leader's lease was over everywhere it could see.",
        load(&stats.early_elections),
    );
    counter(
        o,
        "phalanx_raft_requests_refused_total",
        "Raft RPCs refused at the edge (undecodable or implausible).",
        load(&stats.raft_refused),
    );
    counter(o, "phalanx_log_entries_proposed_total", "Log entries proposed here.", load(&node.proposer.stats.entries));
    counter(
        o,
        "phalanx_commands_proposed_total",
        "Commands proposed here (entries x batch size).",
        load(&node.proposer.stats.commands),
    );

    let traces = &node.tracer.stats;
    counter(o, "phalanx_spans_exported_total", "Spans accepted by the OTLP collector.", load(&traces.spans_exported));
    family(o, "phalanx_spans_dropped_total", "counter", "Spans dropped before a collector took them, by reason.");
    let _ =
        writeln!(o, "phalanx_spans_dropped_total{{reason=\"queue_full\"}} {}", load(&traces.spans_dropped_queue_full));
    let _ = writeln!(
        o,
        "phalanx_spans_dropped_total{{reason=\"export_failed\"}} {}",
        load(&traces.spans_dropped_export_failed)
    );
    counter(
        o,
        "phalanx_span_exports_failed_total",
        "Span export requests that failed (no connection, timeout or a non-2xx answer).",
        load(&traces.exports_failed),
    );
    family(
        o,
        "phalanx_http_request_duration_seconds",
        "histogram",
        "Time from a request's head to its answer on this node (long_poll: agent polls, which wait for work).",
    );
    for (i, long_poll) in ["false", "true"].iter().enumerate() {
        let labels = format!("long_poll=\"{long_poll}\"");
        stats.http_request_duration[i].render(o, "phalanx_http_request_duration_seconds", &labels);
    }
    family(
        o,
        "phalanx_commit_duration_seconds",
        "histogram",
        "Time from proposing a log entry here (as leader) to its being committed and applied.",
    );
    node.proposer.stats.commit_duration.render(o, "phalanx_commit_duration_seconds", "");

    let data = node.shared.data.read().expect("state lock");
    let state = &data.state;
    let counters = state.counters();
    for (name, help, value) in [
        ("submitted", "Tasks submitted (the replicated count).", counters.submitted),
        ("deduplicated", "Submits answered with the task their idempotency key made.", counters.deduplicated),
        ("leases_granted", "Leases granted.", counters.leases_granted),
        ("leases_expired", "Leases that lapsed.", counters.leases_expired),
        ("succeeded", "Tasks that succeeded.", counters.succeeded),
        ("failed", "Tasks that failed for good.", counters.failed),
        ("cancelled", "Tasks cancelled.", counters.cancelled),
        ("dead", "Tasks dead-lettered.", counters.dead),
        ("superseded", "Reports refused for a stale fence.", counters.superseded),
        ("compacted", "Finished tasks compacted by retention.", counters.compacted),
    ] {
        counter(o, &format!("phalanx_tasks_{name}_total"), help, value);
    }
    family(o, "phalanx_tasks", "gauge", "Tasks kept, by queue and state.");
    for (queue, counts) in state.queue_stats() {
        let queue = label_value(&queue);
        for (i, state_name) in
            ["pending", "leased", "succeeded", "failed", "cancelled", "dead", "paused"].iter().enumerate()
        {
            let _ = writeln!(o, "phalanx_tasks{{queue=\"{queue}\",state=\"{state_name}\"}} {}", counts[i]);
        }
    }
    gauge(o, "phalanx_agents", "Registered agents.", state.agents().count() as u64);
    gauge(
        o,
        "phalanx_agents_stuck",
        "Agents with a lease revoked for want of progress.",
        state.agents().filter(|a| a.stuck_count > 0).count() as u64,
    );
    gauge(
        o,
        "phalanx_queues_unserved",
        "Queues with pending work that no agent serves.",
        state.unserved_queues().len() as u64,
    );
    gauge(o, "phalanx_policy_version", "Version of the replicated policy.", state.policy_version());
    family(o, "phalanx_oldest_pending_age_seconds", "gauge", "Age of the oldest pending task (0: none).");
    let oldest_seconds = state.oldest_pending_age_ms().unwrap_or(0) as f64 / 1000.0;
    let _ = writeln!(o, "phalanx_oldest_pending_age_seconds {oldest_seconds}");
    out
}
