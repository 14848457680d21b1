//! The node controller: what a node decides beyond the replicated state.
//! Agent liveness and expiry, when to tick, when a stalled leader hands
//! leadership over (and when it leads again), the policy guard, whether to
//! campaign, and readiness.
//!
//! Sans-I/O: it reads no clock, does no I/O, spawns nothing and logs
//! nothing. It takes `now_ms` (this node's monotonic milliseconds,
//! `store::monotonic_ms` in production) and the facts the runtime observed
//! (Raft's view of leadership, the applied state, this node's counters, the
//! probes' answers), and returns actions; `node.rs` gathers the facts, calls
//! in, and carries the actions out. So a unit test, or a simulation, drives
//! it with time of its own.
//!
//! It lives in `phalanx-server`, not in `phalanx-core`, because nothing it
//! decides is replicated: liveness, the guard's samples and the hand-over are
//! this node's soft state, and two nodes may decide differently. Log time
//! enters only as a fact compared with log time (when a tick is due, how long
//! the guard's window still runs); it is never compared with `now_ms`.
//! The election guard's own rules stay in `election_guard.rs` (pure too); the
//! controller only combines them with a stall and rate-limits early
//! elections.

use crate::election_guard;
#[cfg(test)]
use phalanx_core::Command;
use phalanx_core::State;
use std::collections::{BTreeMap, VecDeque};

/// How many maximum election timeouts a leader that handed leadership over
/// waits for a successor before it leads again: long enough for a healthy
/// follower to time out, campaign and win (with a retry of a split vote);
/// short enough that a one-node cluster, or one whose followers cannot take
/// over, is not left without a leader for long.
pub const HAND_OVER_ELECTION_TIMEOUTS: u64 = 5;

/// How long dispatch may stall, or a majority stay unready, inside the guard
/// window before a rollback.
pub const POLICY_STALL_MS: u64 = 2_000;

/// The window before a change whose refused share of submits is the
/// baseline: long enough to hold a sample of ordinary traffic, short enough
/// to describe the traffic just before the change.
pub const REFUSAL_WINDOW_MS: u64 = 10_000;

/// Submits judged after a change before a jump counts. With fewer, one
/// client's handful of bad requests would be a large share; at 20, a jump of
/// `REFUSED_SHARE_JUMP` is at least 10 submits refused beyond the baseline.
pub const REFUSED_SUBMITS_MIN: u64 = 20;

/// How far the refused share of submits must rise over its baseline for a
/// rollback. Half of all submits newly refused is a service broken by its
/// own policy, not a tightened limit that turns some clients away; measured
/// against the baseline, so a client that sent only bad requests before the
/// change cannot trigger it, and a busy node (`overloaded`, `rate_limited`)
/// is not counted as refusing at all.
pub const REFUSED_SHARE_JUMP: f64 = 0.5;

/// How often the guard probes the voters' readiness inside its window.
pub const READINESS_PROBE_MS: u64 = 500;

/// Event loop lag past which a node is not ready.
pub const EVENT_LOOP_LAG_MS_MAX: u64 = 1_000;
/// A log write in progress for longer than this is a stalled disk.
pub const STORAGE_STALL_MS: u64 = 2_000;
/// Committed entries waiting this long with the applied index standing still
/// is a stalled apply loop.
pub const APPLY_STALL_MS: u64 = 2_000;
/// Entries in the log but not yet applied past which a node is not ready:
/// its reads would be far behind.
pub const APPLY_LAG_ENTRIES_MAX: u64 = 10_000;

/// What the runtime is asked to do. Carried out in the order given.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Turn openraft's leader keep-alives on or off. A leader that stops them
    /// lets a healthy follower time out and be elected.
    KeepAlives(bool),
    /// Allow or forbid this node to campaign (openraft's election timer).
    Elections(bool),
    /// Ask openraft for an election now (a follower whose leader is silent
    /// past its lease everywhere this node can see).
    ElectNow,
    /// Mark this node as handing leadership over, and why (`None`: no
    /// longer). While marked it serves no request and its probe answer says
    /// it hears from no leader.
    HandingOver(Option<String>),
    /// Forget the log clock's anchor: leadership began or ended here.
    ResetLogClock,
    /// This node leads in a new term (counted in the metrics).
    LeadershipBegan { term: u64 },
    /// Propose `ExpireAgent`: the agent's session missed its time-to-live.
    /// Proposed without waiting, so that agents expiring together share one
    /// log entry; until it applies, the next turn asks again (expiring is
    /// idempotent by epoch).
    ExpireAgent { agent_id: String, epoch: u64 },
    /// Propose `Tick`: a lease, backoff or deadline fell due by log time.
    /// The runtime waits for it before the next turn, so one due time is
    /// ticked once.
    Tick,
    /// Probe every voter's `/health/ready` in the background and record the
    /// answers as `ClusterReadiness`.
    ProbeReadiness,
    /// Propose rolling the policy back to `to_version` (not forced, not by a
    /// client), with the reason. The runtime waits for it before the next turn.
    RollbackPolicy { to_version: u64, note: String },
}

/// What the controller is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// openraft's maximum election timeout (the leader lease).
    pub election_timeout_max_ms: u64,
}

/// The node-level decisions and the soft state they rest on.
pub struct Controller {
    settings: Settings,
    /// The term this node led in at the last turn it served as leader.
    leading_term: Option<u64>,
    /// When this node, as leader, began handing leadership over.
    handing_over_since_ms: Option<u64>,
    liveness: Liveness,
    guard: PolicyGuard,
    /// Whether the election guard last allowed campaigning (what the last
    /// `Elections` action of `campaign` said; a hand-over's own `Elections`
    /// actions are not counted here).
    campaigning: bool,
    /// When this node last asked for an early election.
    election_asked_ms: Option<u64>,
}

/// What the runtime saw of this node's Raft role at the start of a turn.
#[derive(Clone, Debug, Default)]
pub struct Role {
    /// The term this node leads in; `None` when it does not lead.
    pub leading_term: Option<u64>,
    /// Why this node cannot make progress (a stall, its clock off), if it cannot.
    pub stall: Option<String>,
}

/// What `Controller::observe_role` decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub actions: Vec<Action>,
    /// Whether this node serves as leader this turn: then the leader's
    /// duties (`Controller::lead`) are due.
    pub leads: bool,
}

/// What the leader's duties are decided on.
pub struct Duties<'a> {
    /// Every registered agent and its session's epoch (the applied state).
    pub agents: &'a [(String, u64)],
    pub agent_ttl_ms: u64,
    /// When the next lease, backoff or deadline falls due, in log time.
    pub next_due_ms: Option<u64>,
    /// Reads the log clock (`clock::LogClock::now_ms`). Called only when
    /// something is due: the first reading anchors a new leader's log time.
    pub log_now_ms: &'a dyn Fn() -> u64,
    pub policy: PolicyFacts,
    /// This node's submit counters (as leader), accepted and refused.
    pub submits: Submits,
    /// What the last readiness probe found, if one has finished.
    pub readiness: Option<ClusterReadiness>,
    /// Whether a readiness probe started by `ProbeReadiness` is still running.
    pub readiness_probe_running: bool,
}

/// The submits this node accepted and refused for what the policy allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Submits {
    pub accepted: u64,
    pub refused: u64,
}

/// What the policy guard needs of the applied state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFacts {
    pub version: u64,
    /// When the newest version was set, and the applied state's log time.
    pub set_ms: u64,
    pub applied_ms: u64,
    /// How long a change is watched (`policy_guard_ms`), in log time.
    pub guard_ms: u64,
    /// The version a rollback returns to; `None` when nothing is watched:
    /// the first version, or a newest version that is itself a rollback (a
    /// rollback is not rolled back).
    pub rollback_to: Option<u64>,
    pub leases_granted: u64,
    /// Work is ready and an agent has room for it.
    pub dispatch_possible: bool,
}

impl PolicyFacts {
    pub fn of(state: &State) -> PolicyFacts {
        let history = state.policy_history();
        let rollback_to = match history {
            [.., previous, latest] if !latest.note.starts_with("rollback") => Some(previous.version),
            _ => None,
        };
        PolicyFacts {
            version: state.policy_version(),
            set_ms: history.last().map_or(0, |v| v.set_ms),
            applied_ms: state.now_ms(),
            guard_ms: state.limits().policy_guard_ms,
            rollback_to,
            leases_granted: state.counters().leases_granted,
            dispatch_possible: state.dispatch_possible(),
        }
    }
}

/// What the leader last learnt of every voter's readiness (its own
/// `problems()`, the others' `/health/ready`, an unanswered probe counting
/// as not ready).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterReadiness {
    /// When the probe finished (`now_ms`).
    pub at_ms: u64,
    pub voters: usize,
    pub not_ready: Vec<(u64, String)>,
}

/// What `Controller::campaign` decides on.
pub struct CampaignFacts<'a> {
    pub guard: election_guard::Input<'a>,
    pub silence: election_guard::Silence,
    /// Why this node cannot make progress, if it cannot.
    pub stall: Option<String>,
    pub leading: bool,
}

/// What `Controller::campaign` decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Campaign {
    pub actions: Vec<Action>,
    /// Why this node holds back from campaigning, if it does (shown by
    /// `/v1/cluster`).
    pub hold_back: Option<String>,
}

impl Controller {
    pub fn new(settings: Settings) -> Controller {
        Controller {
            settings,
            leading_term: None,
            handing_over_since_ms: None,
            liveness: Liveness::default(),
            guard: PolicyGuard::default(),
            campaigning: true,
            election_asked_ms: None,
        }
    }

    /// An agent's current session showed it is alive (a heartbeat, a
    /// registration or a poll; the caller checked the session).
    pub fn heartbeat(&mut self, now_ms: u64, agent_id: &str, epoch: u64) {
        self.liveness.touch(now_ms, agent_id, epoch);
    }

    /// Decides what this node's role means this turn. A leader that cannot
    /// make progress hands leadership over: it stops its keep-alives, so a
    /// healthy follower times out and is elected, and refuses every request.
    /// If no one has taken over after `HAND_OVER_ELECTION_TIMEOUTS` (a
    /// one-node cluster, no healthy peer) and the stall is over, it leads
    /// again. A new term gives every agent a fresh time-to-live, so a
    /// failover never expires the fleet.
    pub fn observe_role(&mut self, now_ms: u64, role: &Role) -> Turn {
        let mut actions = Vec::new();
        let Some(term) = role.leading_term else {
            if self.handing_over_since_ms.take().is_some() {
                actions.extend([Action::KeepAlives(true), Action::HandingOver(None)]);
            }
            if self.leading_term.take().is_some() {
                actions.push(Action::ResetLogClock);
            }
            // Whether a follower campaigns is `campaign`'s to decide.
            return Turn { actions, leads: false };
        };
        if let Some(why) = role.stall.as_ref().filter(|_| self.handing_over_since_ms.is_none()) {
            self.handing_over_since_ms = Some(now_ms);
            // `campaign` must know elections are off, to turn them on again
            // once this node is a follower that may campaign.
            self.campaigning = false;
            actions.extend([
                Action::KeepAlives(false),
                Action::Elections(false),
                Action::HandingOver(Some(why.clone())),
            ]);
            return Turn { actions, leads: false };
        }
        if let Some(since) = self.handing_over_since_ms {
            let waited_ms = now_ms.saturating_sub(since);
            let wait_ms = self.settings.election_timeout_max_ms.saturating_mul(HAND_OVER_ELECTION_TIMEOUTS);
            if role.stall.is_some() || waited_ms < wait_ms {
                return Turn { actions, leads: false };
            }
            // No one took over: lead again. The agents' heartbeats were
            // refused while this node handed over, so each gets a fresh
            // time-to-live, as under a new leader.
            self.handing_over_since_ms = None;
            self.campaigning = true;
            self.liveness.clear();
            actions.extend([Action::KeepAlives(true), Action::Elections(true), Action::HandingOver(None)]);
        }
        if self.leading_term != Some(term) {
            self.leading_term = Some(term);
            self.liveness.clear();
            actions.extend([Action::ResetLogClock, Action::LeadershipBegan { term }]);
        }
        Turn { actions, leads: true }
    }

    /// The leader's duties, on a turn `observe_role` said it leads: expire
    /// the agents whose time-to-live ran out, tick when something is due by
    /// log time, and run the policy guard.
    pub fn lead(&mut self, now_ms: u64, duties: &Duties) -> Vec<Action> {
        let mut actions: Vec<Action> = self
            .liveness
            .expired(now_ms, duties.agents, duties.agent_ttl_ms)
            .into_iter()
            .map(|(agent_id, epoch)| Action::ExpireAgent { agent_id, epoch })
            .collect();
        // Log time against log time: this node's clock plays no part.
        if duties.next_due_ms.is_some_and(|due| due <= (duties.log_now_ms)()) {
            actions.push(Action::Tick);
        }
        actions.extend(self.guard.check(now_ms, duties));
        actions
    }

    /// Whether this node may campaign, and whether to ask for an election
    /// now, from the election guard's rules (`election_guard.rs`). A node
    /// that cannot make progress does not campaign either: it would only win
    /// leadership it cannot use. An early election is asked for at most once
    /// per maximum election timeout. A leader is left alone: its own
    /// elections are the hand-over's to decide.
    pub fn campaign(&mut self, now_ms: u64, facts: &CampaignFacts) -> Campaign {
        let decision = match &facts.stall {
            Some(why) => election_guard::Decision::HoldBack(why.clone()),
            None => election_guard::decide(&facts.guard),
        };
        let allowed = decision == election_guard::Decision::Campaign;
        let asked_long_ago =
            self.election_asked_ms.is_none_or(|at| now_ms.saturating_sub(at) > self.settings.election_timeout_max_ms);
        let early = allowed && election_guard::elect_now(&facts.guard, &facts.silence) && asked_long_ago;
        let mut actions = Vec::new();
        if allowed != self.campaigning && !facts.leading {
            self.campaigning = allowed;
            actions.push(Action::Elections(allowed));
        }
        if early && !facts.leading {
            self.election_asked_ms = Some(now_ms);
            actions.push(Action::ElectNow);
        }
        let hold_back = match decision {
            election_guard::Decision::Campaign => None,
            election_guard::Decision::HoldBack(why) => Some(why),
        };
        Campaign { actions, hold_back }
    }
}

/// When each agent session last showed it is alive, in `now_ms`. Soft state
/// on the leader, never in the log; bounded by the registered agents (a
/// heartbeat is recorded only for a checked session, and every leader turn
/// forgets the agents the state no longer holds).
#[derive(Default)]
pub struct Liveness {
    /// agent id -> (epoch, last seen)
    seen: BTreeMap<String, (u64, u64)>,
}

impl Liveness {
    pub fn touch(&mut self, now_ms: u64, agent_id: &str, epoch: u64) {
        self.seen.insert(agent_id.to_string(), (epoch, now_ms));
    }

    fn clear(&mut self) {
        self.seen.clear();
    }

    /// The agents (and epochs) not seen for more than `ttl_ms`. An agent
    /// first seen here, or with a new epoch (a new session), starts its
    /// time-to-live now.
    fn expired(&mut self, now_ms: u64, agents: &[(String, u64)], ttl_ms: u64) -> Vec<(String, u64)> {
        let known: std::collections::BTreeSet<&String> = agents.iter().map(|(id, _)| id).collect();
        self.seen.retain(|id, _| known.contains(id));
        let mut expired = Vec::new();
        for (agent_id, epoch) in agents {
            let entry = self.seen.entry(agent_id.clone()).or_insert((*epoch, now_ms));
            if entry.0 != *epoch {
                *entry = (*epoch, now_ms);
            }
            if now_ms.saturating_sub(entry.1) > ttl_ms {
                expired.push((agent_id.clone(), *epoch));
            }
        }
        expired
    }
}

/// Watches the cluster for `policy_guard_ms` after each policy change (by
/// log time, so a new leader takes over the watch where the old one left
/// it). If dispatch stalls (work is ready, an agent has room, and no lease
/// is granted), or a majority of the voters is not ready, for
/// `POLICY_STALL_MS`, or the share of refused submits jumps (see
/// `REFUSED_SHARE_JUMP`), the change is rolled back to the previous version
/// and the rollback recorded with the reason.
///
/// Clocks: the window's remaining length is read once, when this node first
/// sees the version, as log time against log time (`set_ms` and the
/// applied state's log time); from then on every duration is measured in
/// `now_ms`, this node's monotonic clock. No reading of `now_ms` is
/// compared with log time.
#[derive(Default)]
struct PolicyGuard {
    watch: Watch,
    /// Samples of this node's submit counters, `(when, counters)`, oldest
    /// first, spanning at most `REFUSAL_WINDOW_MS`.
    submits: VecDeque<(u64, Submits)>,
    /// When the last readiness probe was asked for.
    probe_asked_ms: Option<u64>,
}

/// What the guard knows of the version it watches.
#[derive(Default)]
struct Watch {
    version: u64,
    /// When this node first saw the version, and when its watch ends
    /// (`None`: never).
    seen_at_ms: Option<u64>,
    until_ms: Option<u64>,
    leases_granted: u64,
    stalled_since_ms: Option<u64>,
    unready_since_ms: Option<u64>,
    /// Submits in the `REFUSAL_WINDOW_MS` before the version was seen, and
    /// the counters at the change (as of the last turn before it was seen).
    submits_before: Submits,
    submits_at_change: Submits,
}

impl PolicyGuard {
    fn check(&mut self, now_ms: u64, duties: &Duties) -> Vec<Action> {
        let submits = duties.submits;
        while self.submits.front().is_some_and(|(at, _)| now_ms.saturating_sub(*at) > REFUSAL_WINDOW_MS) {
            self.submits.pop_front();
        }
        let oldest = self.submits.front().map_or(submits, |(_, counters)| *counters);
        // A change is seen up to a turn after it was made: what came since the
        // last turn is judged as after it, so that the refusals a change
        // causes at once do not count in the baseline against it.
        let last_turn = self.submits.back().map_or(submits, |(_, counters)| *counters);
        self.submits.push_back((now_ms, submits));

        let policy = &duties.policy;
        let version = policy.version;
        if version != self.watch.version {
            let remaining_ms = policy.set_ms.saturating_add(policy.guard_ms).saturating_sub(policy.applied_ms);
            self.watch = Watch {
                version,
                seen_at_ms: Some(now_ms),
                // `None` (a window past what `u64` counts) never ends.
                until_ms: now_ms.checked_add(remaining_ms),
                leases_granted: policy.leases_granted,
                submits_before: Submits {
                    accepted: last_turn.accepted.saturating_sub(oldest.accepted),
                    refused: last_turn.refused.saturating_sub(oldest.refused),
                },
                submits_at_change: last_turn,
                ..Watch::default()
            };
        }
        let Some(previous) = policy.rollback_to else { return Vec::new() };
        if self.watch.until_ms.is_some_and(|until| now_ms > until) {
            return Vec::new();
        }
        let rollback = |note: String| vec![Action::RollbackPolicy { to_version: previous, note }];

        // Dispatch.
        if policy.leases_granted != self.watch.leases_granted || !policy.dispatch_possible {
            self.watch.leases_granted = policy.leases_granted;
            self.watch.stalled_since_ms = None;
        } else {
            let stalled_ms = now_ms.saturating_sub(*self.watch.stalled_since_ms.get_or_insert(now_ms));
            if stalled_ms >= POLICY_STALL_MS {
                self.watch.version = 0;
                return rollback(format!("dispatch stalled for {stalled_ms} ms after version {version}"));
            }
        }

        // Refused submits. A failed rollback proposal is asked for again at
        // the next check, from the same counts.
        if let Some(why) = self.refusal_jump(submits) {
            return rollback(format!("{why} after version {version}"));
        }

        // Readiness of the voters, probed in the background.
        let mut actions = Vec::new();
        let probe_due = self
            .probe_asked_ms
            .is_none_or(|at| !duties.readiness_probe_running && now_ms.saturating_sub(at) >= READINESS_PROBE_MS);
        if probe_due {
            self.probe_asked_ms = Some(now_ms);
            actions.push(Action::ProbeReadiness);
        }
        let Some(readiness) = &duties.readiness else { return actions };
        if self.watch.seen_at_ms.is_some_and(|seen_at| readiness.at_ms < seen_at) {
            return actions; // learnt before the change
        }
        if readiness.not_ready.len() * 2 <= readiness.voters {
            self.watch.unready_since_ms = None;
            return actions;
        }
        let unready_ms = now_ms.saturating_sub(*self.watch.unready_since_ms.get_or_insert(readiness.at_ms));
        if unready_ms < POLICY_STALL_MS {
            return actions;
        }
        self.watch.version = 0;
        let who: Vec<String> = readiness.not_ready.iter().map(|(id, why)| format!("node {id}: {why}")).collect();
        actions.extend(rollback(format!(
            "readiness lost on {} of {} voters for {unready_ms} ms after version {version} ({})",
            readiness.not_ready.len(),
            readiness.voters,
            who.join("; ")
        )));
        actions
    }

    /// The refused share of submits since the change, if it rose by
    /// `REFUSED_SHARE_JUMP` or more over the share in the window before it
    /// (over at least `REFUSED_SUBMITS_MIN` submits), said in a sentence.
    fn refusal_jump(&self, submits: Submits) -> Option<String> {
        let at_change = self.watch.submits_at_change;
        let refused = submits.refused.saturating_sub(at_change.refused);
        let total = submits.accepted.saturating_sub(at_change.accepted).saturating_add(refused);
        if total < REFUSED_SUBMITS_MIN {
            return None;
        }
        let before = self.watch.submits_before;
        let before_total = before.accepted.saturating_add(before.refused);
        let share_before = if before_total == 0 { 0.0 } else { before.refused as f64 / before_total as f64 };
        let share_after = refused as f64 / total as f64;
        if share_after - share_before < REFUSED_SHARE_JUMP {
            return None;
        }
        Some(format!(
            "refused submits jumped from {:.0}% ({} of {before_total} in the {REFUSAL_WINDOW_MS} ms before) to {:.0}% ({refused} of {total})",
            share_before * 100.0,
            before.refused,
            share_after * 100.0
        ))
    }
}

/// Whether the applied index stands still behind the committed one, and
/// since when. Only standing still while behind counts: an idle node is not
/// stalled, and neither is one whose committed index has just jumped
/// (catching up after a partition heals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyProgress {
    pub applied_index: u64,
    pub behind_since_ms: Option<u64>,
}

impl ApplyProgress {
    /// Notes the applied and committed indexes seen at `now_ms`.
    pub fn observe(&mut self, now_ms: u64, applied_index: u64, committed_index: u64) -> ApplyProgress {
        let behind = committed_index > applied_index;
        if self.applied_index != applied_index || !behind {
            *self = ApplyProgress { applied_index, behind_since_ms: None };
        }
        if behind && self.behind_since_ms.is_none() {
            self.behind_since_ms = Some(now_ms);
        }
        *self
    }
}

/// What a stall is decided on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub now_ms: u64,
    /// When the log write in progress started (`now_ms`; 0: none).
    pub write_started_ms: u64,
    pub apply: ApplyProgress,
    pub committed_index: u64,
}

/// Why this node cannot make progress, if it cannot: a log write that does
/// not return (a stalled disk), or committed entries that are not applied
/// (a wedged apply loop).
pub fn stall(progress: &Progress) -> Option<String> {
    let writing_ms = progress.now_ms.saturating_sub(progress.write_started_ms);
    if progress.write_started_ms != 0 && writing_ms > STORAGE_STALL_MS {
        return Some(format!("storage write stalled for {writing_ms} ms"));
    }
    let still_ms = progress.apply.behind_since_ms.map_or(0, |since| progress.now_ms.saturating_sub(since));
    if still_ms > APPLY_STALL_MS {
        return Some(format!(
            "apply stalled for {still_ms} ms at index {} (committed {})",
            progress.apply.applied_index, progress.committed_index
        ));
    }
    None
}

/// Why this node's clock is not to be trusted, if it is not: further from
/// the majority's than `clock_skew_max_ms`.
pub fn clock_problem(skew_ms: Option<i64>, clock_skew_max_ms: u64) -> Option<String> {
    let skew = skew_ms?;
    (skew.unsigned_abs() > clock_skew_max_ms).then(|| {
        format!("clock skew: this node's clock is {skew} ms from the majority's, past clock_skew_max_ms {clock_skew_max_ms}")
    })
}

/// What readiness is decided on: this node's Raft metrics and its own
/// measurements.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub me: u64,
    /// Why Raft stopped, if it did.
    pub raft_stopped: Option<String>,
    pub leader: Option<u64>,
    pub applied_index: u64,
    pub last_log_index: u64,
    /// As leader: how long since a majority last acknowledged it.
    pub quorum_ack_ms: Option<u64>,
    pub stall: Option<String>,
    pub clock_problem: Option<String>,
    pub disk_problem: Option<String>,
    /// The worst recent event loop lag on the API and the consensus threads.
    pub event_loop_lag_ms: [u64; 2],
    pub election_timeout_max_ms: u64,
}

/// Why this node is not useful right now, if it is not: Raft stopped, no
/// leader known, apply far behind, a stall, a skewed clock, a full disk, a
/// stalled event loop, or (as leader) no contact with a quorum for three
/// election timeouts. Empty: ready.
pub fn problems(health: &Health) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(fatal) = &health.raft_stopped {
        problems.push(format!("raft stopped: {fatal}"));
    }
    if health.leader.is_none() {
        problems.push("no leader known".into());
    }
    let lag = health.last_log_index.saturating_sub(health.applied_index);
    if lag > APPLY_LAG_ENTRIES_MAX {
        problems.push(format!("apply lag {lag} entries"));
    }
    problems.extend(health.stall.clone());
    problems.extend(health.clock_problem.clone());
    problems.extend(health.disk_problem.clone());
    for (slot, name) in ["api", "consensus"].iter().enumerate() {
        let lag = health.event_loop_lag_ms[slot];
        if lag > EVENT_LOOP_LAG_MS_MAX {
            problems.push(format!("{name} event loop stalled {lag} ms"));
        }
    }
    if health.leader == Some(health.me) {
        let limit = health.election_timeout_max_ms * 3;
        if let Some(ms) = health.quorum_ack_ms.filter(|ms| *ms > limit) {
            problems.push(format!("leader has had no quorum contact for {ms} ms"));
        }
    }
    problems
}

#[cfg(test)]
mod tests;
