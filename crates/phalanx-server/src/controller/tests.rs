//! The controller driven with simulated time: every scenario is built from
//! the facts a runtime would observe, and checked on the actions returned.

use super::*;

const ELECTION_TIMEOUT_MAX_MS: u64 = 200;

/// Actions, one a line, in a form short enough to compare whole.
fn show(actions: &[Action]) -> String {
    let lines: Vec<String> = actions
        .iter()
        .map(|action| match action {
            Action::KeepAlives(on) => format!("keep-alives {}", if *on { "on" } else { "off" }),
            Action::Elections(allowed) => format!("elections {}", if *allowed { "allowed" } else { "forbidden" }),
            Action::ElectNow => "elect now".to_string(),
            Action::HandingOver(Some(why)) => format!("handing over: {why}"),
            Action::HandingOver(None) => "handing over no more".to_string(),
            Action::ResetLogClock => "reset log clock".to_string(),
            Action::LeadershipBegan { term } => format!("leads in term {term}"),
            Action::ExpireAgent { agent_id, epoch } => format!("expire {agent_id}@{epoch}"),
            Action::Tick => "tick".to_string(),
            Action::ProbeReadiness => "probe readiness".to_string(),
            Action::RollbackPolicy { to_version, note } => format!("rollback to {to_version}: {note}"),
        })
        .collect();
    lines.join("\n")
}

fn controller() -> Controller {
    Controller::new(Settings { election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS })
}

fn role(leading_term: Option<u64>, stall: Option<&str>) -> Role {
    Role { leading_term, stall: stall.map(str::to_string) }
}

/// A node and what its runtime would observe; each `turn` is one turn of
/// the timer loop.
struct Node {
    controller: Controller,
    leading_term: Option<u64>,
    stall: Option<String>,
    agents: Vec<(String, u64)>,
    agent_ttl_ms: u64,
    next_due_ms: Option<u64>,
    log_now_ms: u64,
    policy: PolicyFacts,
    submits: Submits,
    readiness: Option<ClusterReadiness>,
    readiness_probe_running: bool,
}

impl Node {
    /// A leader in term 1 with agent `a` (epoch 1), a time-to-live of 1 s,
    /// nothing due, and the first policy version (nothing to watch).
    fn leader() -> Node {
        Node {
            controller: controller(),
            leading_term: Some(1),
            stall: None,
            agents: vec![("a".to_string(), 1)],
            agent_ttl_ms: 1_000,
            next_due_ms: None,
            log_now_ms: 0,
            policy: PolicyFacts { version: 1, guard_ms: 10_000, ..PolicyFacts::default() },
            submits: Submits::default(),
            readiness: None,
            readiness_probe_running: false,
        }
    }

    fn turn(&mut self, now_ms: u64) -> String {
        let role = Role { leading_term: self.leading_term, stall: self.stall.clone() };
        let turn = self.controller.observe_role(now_ms, &role);
        let mut actions = turn.actions;
        if turn.leads {
            let log_now_ms = self.log_now_ms;
            let duties = Duties {
                agents: &self.agents,
                agent_ttl_ms: self.agent_ttl_ms,
                next_due_ms: self.next_due_ms,
                log_now_ms: &|| log_now_ms,
                policy: self.policy.clone(),
                submits: self.submits,
                readiness: self.readiness.clone(),
                readiness_probe_running: self.readiness_probe_running,
            };
            actions.extend(self.controller.lead(now_ms, &duties));
        }
        show(&actions)
    }

    /// A turn whose actions are only what the policy guard decided.
    fn guard_turn(&mut self, now_ms: u64) -> String {
        let actions = self.turn(now_ms);
        let guard: Vec<&str> = actions.lines().filter(|line| line.starts_with("rollback")).collect();
        guard.join("\n")
    }
}

// ---- agent liveness ----

#[test]
fn an_agent_expires_after_its_time_to_live_and_not_before() {
    let mut node = Node::leader();
    assert_eq!(node.turn(0), "reset log clock\nleads in term 1");
    assert_eq!(node.turn(1_000), "", "exactly the time-to-live is not past it");
    assert_eq!(node.turn(1_001), "expire a@1");
    // Until the expiry applies, every turn asks again (idempotent by epoch).
    assert_eq!(node.turn(1_100), "expire a@1");
}

#[test]
fn a_heartbeat_renews_the_time_to_live() {
    let mut node = Node::leader();
    node.turn(0);
    node.controller.heartbeat(800, "a", 1);
    assert_eq!(node.turn(1_500), "");
    assert_eq!(node.turn(1_800), "");
    assert_eq!(node.turn(1_801), "expire a@1");
}

#[test]
fn a_new_session_starts_a_fresh_time_to_live() {
    let mut node = Node::leader();
    node.turn(0);
    // The agent registered again (epoch 2) and this leader saw no heartbeat of it.
    node.agents = vec![("a".to_string(), 2)];
    assert_eq!(node.turn(900), "");
    assert_eq!(node.turn(1_900), "");
    assert_eq!(node.turn(1_901), "expire a@2");
}

#[test]
fn an_agent_first_seen_by_a_leader_gets_a_full_time_to_live() {
    let mut node = Node::leader();
    node.agents.clear();
    node.turn(0);
    node.agents.push(("b".to_string(), 7));
    assert_eq!(node.turn(5_000), "", "registered long after leadership began");
    assert_eq!(node.turn(6_001), "expire b@7");
}

#[test]
fn an_agent_the_state_no_longer_holds_is_forgotten() {
    let mut node = Node::leader();
    node.turn(0);
    node.controller.heartbeat(0, "a", 1);
    node.agents.clear();
    assert_eq!(node.turn(2_000), "");
    // Registered again later: its old sighting does not count against it.
    node.agents.push(("a".to_string(), 1));
    assert_eq!(node.turn(2_500), "");
    assert_eq!(node.turn(3_501), "expire a@1");
}

#[test]
fn new_leadership_gives_every_agent_a_fresh_time_to_live() {
    let mut node = Node::leader();
    node.turn(0);
    node.leading_term = None;
    assert_eq!(node.turn(500), "reset log clock");
    assert_eq!(node.turn(600), "", "the log clock is reset once");
    // Leads again in term 3, long after the agent was last seen: no one expires.
    node.leading_term = Some(3);
    assert_eq!(node.turn(5_000), "reset log clock\nleads in term 3");
    assert_eq!(node.turn(6_000), "");
    assert_eq!(node.turn(6_001), "expire a@1");
}

#[test]
fn heartbeats_seen_before_leading_do_not_outlive_the_reset() {
    let mut node = Node::leader();
    node.leading_term = None;
    node.controller.heartbeat(0, "a", 1);
    node.turn(0);
    node.leading_term = Some(2);
    node.turn(3_000);
    assert_eq!(node.turn(4_000), "");
    assert_eq!(node.turn(4_001), "expire a@1");
}

// ---- ticks ----

#[test]
fn a_tick_is_proposed_when_something_is_due_by_log_time() {
    let mut node = Node::leader();
    node.agents.clear();
    node.turn(0);
    node.next_due_ms = Some(50_000);
    node.log_now_ms = 49_999;
    assert_eq!(node.turn(100), "");
    node.log_now_ms = 50_000;
    assert_eq!(node.turn(200), "tick");
    // `now_ms` plays no part: far past the due time on this node's clock, not by log time.
    node.log_now_ms = 10;
    assert_eq!(node.turn(10_000_000), "");
}

#[test]
fn the_log_clock_is_read_only_when_something_is_due() {
    // Reading the log clock anchors a new leader's log time.
    let mut controller = controller();
    assert!(controller.observe_role(0, &role(Some(1), None)).leads);
    let duties = Duties {
        agents: &[],
        agent_ttl_ms: 1_000,
        next_due_ms: None,
        log_now_ms: &|| panic!("the log clock was read with nothing due"),
        policy: PolicyFacts::default(),
        submits: Submits::default(),
        readiness: None,
        readiness_probe_running: false,
    };
    assert_eq!(show(&controller.lead(100, &duties)), "");
}

#[test]
fn a_follower_has_no_duties() {
    let mut node = Node::leader();
    node.leading_term = None;
    node.next_due_ms = Some(0);
    assert_eq!(node.turn(0), "");
    assert_eq!(node.turn(10_000), "", "no tick and no expiry on a follower");
}

// ---- stall: hand-over and leading again ----

#[test]
fn a_stalled_leader_hands_over_and_leads_again_after_five_election_timeouts() {
    let mut node = Node::leader();
    node.agents.clear();
    node.turn(0);
    node.stall = Some("storage write stalled for 2100 ms".to_string());
    assert_eq!(
        node.turn(1_000),
        "keep-alives off\nelections forbidden\nhanding over: storage write stalled for 2100 ms"
    );
    // Still stalled: it waits, whatever the time.
    node.next_due_ms = Some(0);
    assert_eq!(node.turn(1_100), "", "no duties while handing over");
    assert_eq!(node.turn(9_000), "");
    // The stall is over, but not five election timeouts after the hand-over began.
    node.stall = None;
    node.next_due_ms = None;
    assert_eq!(node.turn(1_000 + 5 * ELECTION_TIMEOUT_MAX_MS - 1).as_str(), "");
    // Then no one has taken over: lead again, in the same term (no fresh liveness).
    assert_eq!(
        node.turn(1_000 + 5 * ELECTION_TIMEOUT_MAX_MS),
        "keep-alives on\nelections allowed\nhanding over no more"
    );
    assert_eq!(node.turn(2_100), "");
}

#[test]
fn a_stall_that_lasts_keeps_the_leader_handing_over() {
    let mut node = Node::leader();
    node.turn(0);
    node.stall = Some("apply stalled".to_string());
    node.turn(100);
    assert_eq!(node.turn(100 + 5 * ELECTION_TIMEOUT_MAX_MS), "");
    assert_eq!(node.turn(60_000), "");
}

#[test]
fn a_leader_that_was_replaced_stops_handing_over() {
    let mut node = Node::leader();
    node.turn(0);
    node.stall = Some("clock skew".to_string());
    node.turn(100);
    // Another node won the election: keep-alives back on for the day this
    // node leads again; whether it campaigns is `campaign`'s to decide.
    node.leading_term = None;
    assert_eq!(node.turn(400), "keep-alives on\nhanding over no more\nreset log clock");
    assert_eq!(node.turn(500), "");
}

#[test]
fn a_leader_that_stalls_in_its_first_turn_begins_its_term_once_it_leads_again() {
    let mut controller = controller();
    let turn = controller.observe_role(0, &role(Some(4), Some("apply stalled")));
    assert!(!turn.leads);
    assert_eq!(show(&turn.actions), "keep-alives off\nelections forbidden\nhanding over: apply stalled");
    let turn = controller.observe_role(5 * ELECTION_TIMEOUT_MAX_MS, &role(Some(4), None));
    assert!(turn.leads);
    assert_eq!(
        show(&turn.actions),
        "keep-alives on\nelections allowed\nhanding over no more\nreset log clock\nleads in term 4"
    );
}

// ---- the policy guard ----

/// A leader that has served ordinary traffic (`accepted`, `refused` per
/// second) for 10 s under version 1, then sees version 2 at 10 100 ms, set
/// at log time 100 000 (the applied state's log time too): watched until
/// 20 100 ms on this node's clock.
fn changed_policy(accepted_per_s: u64, refused_per_s: u64) -> Node {
    let mut node = Node::leader();
    node.agents.clear();
    node.readiness_probe_running = true;
    for second in 0..=10 {
        node.submits = Submits { accepted: accepted_per_s * second, refused: refused_per_s * second };
        node.turn(second * 1_000);
    }
    node.policy = PolicyFacts {
        version: 2,
        set_ms: 100_000,
        applied_ms: 100_000,
        guard_ms: 10_000,
        rollback_to: Some(1),
        ..PolicyFacts::default()
    };
    assert_eq!(node.guard_turn(10_100), "");
    node
}

#[test]
fn the_guard_rolls_back_a_change_after_which_refusals_jump() {
    let mut node = changed_policy(10, 0);
    // 19 submits judged since the change, all refused: too few to count.
    node.submits = Submits { accepted: 100, refused: 19 };
    assert_eq!(node.guard_turn(10_200), "");
    // The baseline is the 10 s before the change was seen: 90 accepted.
    node.submits = Submits { accepted: 105, refused: 20 };
    assert_eq!(
        node.guard_turn(10_300),
        "rollback to 1: refused submits jumped from 0% (0 of 90 in the 10000 ms before) to 80% (20 of 25) after version 2"
    );
}

#[test]
fn refusals_before_the_guard_sees_a_change_count_after_it() {
    // Light traffic (one accepted submit a second), then a change that
    // refuses everything: a client is refused ten times before the guard's
    // next turn sees the change. Counted in the baseline, they made it 53%
    // and the jump to 100% too small to roll back, for good.
    let mut node = changed_policy(1, 0);
    node.policy.version = 3;
    node.policy.rollback_to = Some(2);
    node.submits = Submits { accepted: 10, refused: 10 };
    assert_eq!(node.guard_turn(11_000), "");
    node.submits = Submits { accepted: 10, refused: 20 };
    assert_eq!(
        node.guard_turn(11_100),
        "rollback to 2: refused submits jumped from 0% (0 of 9 in the 10000 ms before) to 100% (20 of 20) after version 3"
    );
}

#[test]
fn the_guard_measures_the_jump_against_the_refusals_before_the_change() {
    // Half the submits were refused before the change: 90% after is a rise
    // of 40 points, under the jump that means a broken service.
    let mut node = changed_policy(5, 5);
    node.submits = Submits { accepted: 52, refused: 68 };
    assert_eq!(node.guard_turn(10_500), "");
    // From nothing refused to 50%: a jump.
    let mut node = changed_policy(10, 0);
    node.submits = Submits { accepted: 110, refused: 10 };
    assert!(node.guard_turn(10_500).contains("to 50% (10 of 20)"));
}

#[test]
fn the_guard_rolls_back_when_dispatch_stalls_for_two_seconds() {
    let mut node = changed_policy(0, 0);
    node.policy.dispatch_possible = true;
    node.policy.leases_granted = 7;
    assert_eq!(node.guard_turn(11_000), "");
    assert_eq!(node.guard_turn(12_000), "");
    // A lease granted: dispatch works, the stall starts over.
    node.policy.leases_granted = 8;
    assert_eq!(node.guard_turn(13_000), "");
    assert_eq!(node.guard_turn(14_000), "");
    assert_eq!(node.guard_turn(15_999), "");
    assert_eq!(node.guard_turn(16_000), "rollback to 1: dispatch stalled for 2000 ms after version 2");
}

#[test]
fn nothing_to_dispatch_is_not_a_stall() {
    let mut node = changed_policy(0, 0);
    node.policy.dispatch_possible = false;
    for now_ms in (10_200..20_000).step_by(100) {
        assert_eq!(node.guard_turn(now_ms), "");
    }
}

#[test]
fn the_guard_watches_for_policy_guard_ms_of_log_time_from_the_change() {
    // Version 3 reaches this node when 9 of its 10 s of log time are gone:
    // watched for the 1 s left, on this node's clock.
    let mut node = changed_policy(0, 0);
    node.policy = PolicyFacts { version: 3, set_ms: 100_000, applied_ms: 109_000, rollback_to: Some(2), ..node.policy };
    node.policy.dispatch_possible = true;
    assert_eq!(node.guard_turn(11_000), "");
    assert_eq!(node.guard_turn(12_000), "");
    // Past the window: a stall of 2 s no longer counts.
    assert_eq!(node.guard_turn(12_001), "");
    assert_eq!(node.guard_turn(13_000), "");
}

#[test]
fn a_rollback_is_not_watched() {
    let mut node = changed_policy(10, 0);
    node.policy.rollback_to = None;
    node.policy.dispatch_possible = true;
    node.submits = Submits { accepted: 100, refused: 1_000 };
    for now_ms in (10_200..15_000).step_by(100) {
        assert_eq!(node.turn(now_ms), "");
    }
}

#[test]
fn the_guard_probes_readiness_and_rolls_back_when_a_majority_stays_unready() {
    // The first probe was asked for when the change was seen (10 100).
    let mut node = changed_policy(0, 0);
    node.readiness_probe_running = false;
    assert_eq!(node.turn(10_500), "", "one probe per READINESS_PROBE_MS");
    node.readiness_probe_running = true;
    assert_eq!(node.turn(11_000), "", "one probe at a time");
    node.readiness_probe_running = false;
    assert_eq!(node.turn(11_100), "probe readiness");
    node.readiness_probe_running = true;
    // Learnt before the change: ignored.
    let unready = vec![(2, "apply stalled".to_string()), (3, "no answer".to_string())];
    node.readiness = Some(ClusterReadiness { at_ms: 9_000, voters: 3, not_ready: unready.clone() });
    assert_eq!(node.guard_turn(11_200), "");
    assert_eq!(node.guard_turn(14_000), "");
    // A minority unready is no reason.
    node.readiness = Some(ClusterReadiness { at_ms: 14_100, voters: 3, not_ready: unready[..1].to_vec() });
    assert_eq!(node.guard_turn(15_000), "");
    // A majority, for two seconds counted from when it was learnt.
    node.readiness = Some(ClusterReadiness { at_ms: 15_000, voters: 3, not_ready: unready });
    assert_eq!(node.guard_turn(16_999), "");
    assert_eq!(
        node.guard_turn(17_000),
        "rollback to 1: readiness lost on 2 of 3 voters for 2000 ms after version 2 \
         (node 2: apply stalled; node 3: no answer)"
    );
}

#[test]
fn policy_facts_come_from_the_applied_state() {
    let mut state = State::new(phalanx_core::Limits::default());
    assert_eq!(PolicyFacts::of(&state).rollback_to, None, "the first version is not watched");
    let mut policy = state.limits().clone();
    policy.agent_ttl_ms *= 2;
    let set = Command::SetPolicy { policy, expected_version: 1, note: "set by client".into(), force: false };
    state.apply(1, &phalanx_core::Request { now_ms: 5_000, commands: vec![set] });
    let facts = PolicyFacts::of(&state);
    assert_eq!((facts.version, facts.set_ms, facts.applied_ms, facts.rollback_to), (2, 5_000, 5_000, Some(1)));
    let back = Command::RollbackPolicy {
        to_version: 1,
        note: "test".into(),
        by_client: true,
        force: false,
        expected_version: None,
    };
    state.apply(2, &phalanx_core::Request { now_ms: 6_000, commands: vec![back] });
    assert_eq!(PolicyFacts::of(&state).rollback_to, None, "a rollback is not rolled back");
}

// ---- campaigning ----

fn campaign(
    controller: &mut Controller,
    now_ms: u64,
    stall: Option<&str>,
    leading: bool,
    contact_age_ms: u64,
) -> Campaign {
    let answers = BTreeMap::from([(3, election_guard::PeerAnswer { at_ms: now_ms, leader_contact_age_ms: None })]);
    let facts = CampaignFacts {
        guard: election_guard::Input {
            now_ms,
            me: 2,
            voters: &[1, 2, 3],
            answers: &answers,
            answer_fresh_ms: 250,
            leader_alive_ms: 100,
            clock_skew_ms: None,
            clock_skew_max_ms: 500,
        },
        silence: election_guard::Silence {
            leader: Some(1),
            contact_age_ms: Some(contact_age_ms),
            lease_ms: ELECTION_TIMEOUT_MAX_MS,
            stagger_ms: 50,
            leader_unanswering: true,
            lagging: false,
        },
        stall: stall.map(str::to_string),
        leading,
    };
    controller.campaign(now_ms, &facts)
}

#[test]
fn a_stalled_node_holds_back_from_elections_until_the_stall_is_over() {
    let mut controller = controller();
    let held = campaign(&mut controller, 0, Some("apply stalled"), false, 50);
    assert_eq!(
        (show(&held.actions).as_str(), held.hold_back.as_deref()),
        ("elections forbidden", Some("apply stalled"))
    );
    let held = campaign(&mut controller, 10, Some("apply stalled"), false, 60);
    assert_eq!(show(&held.actions), "", "said once");
    let free = campaign(&mut controller, 20, None, false, 70);
    assert_eq!((show(&free.actions).as_str(), free.hold_back), ("elections allowed", None));
}

#[test]
fn an_early_election_is_asked_for_at_most_once_per_election_timeout() {
    let mut controller = controller();
    let lease_over = ELECTION_TIMEOUT_MAX_MS + election_guard::LEASE_MARGIN_MS + 1;
    assert_eq!(show(&campaign(&mut controller, 1_000, None, false, lease_over).actions), "elect now");
    assert_eq!(show(&campaign(&mut controller, 1_010, None, false, lease_over + 10).actions), "");
    let again = 1_000 + ELECTION_TIMEOUT_MAX_MS + 1;
    assert_eq!(show(&campaign(&mut controller, again, None, false, lease_over + 201).actions), "elect now");
}

#[test]
fn a_leader_replaced_after_its_hand_over_may_campaign_again() {
    let mut controller = controller();
    let turn = controller.observe_role(0, &role(Some(1), Some("apply stalled")));
    assert_eq!(show(&turn.actions), "keep-alives off\nelections forbidden\nhanding over: apply stalled");
    // The stall clears as another node takes over: this follower's elections,
    // turned off by the hand-over, are turned on again.
    controller.observe_role(10, &role(None, None));
    let free = campaign(&mut controller, 20, None, false, 20);
    assert_eq!(show(&free.actions), "elections allowed");
}

#[test]
fn a_leader_that_leads_again_gives_every_agent_a_fresh_time_to_live() {
    let mut node = Node::leader();
    node.turn(0);
    node.stall = Some("apply stalled".to_string());
    node.turn(100);
    node.stall = None;
    // Agent a's last heartbeat is from before the hand-over; it could not
    // send one since (the leader refused them), so leading again renews it.
    let back = 100 + 5 * ELECTION_TIMEOUT_MAX_MS;
    assert_eq!(node.turn(back), "keep-alives on\nelections allowed\nhanding over no more");
    assert_eq!(node.turn(back + 999), "", "a fresh time-to-live from leading again");
    assert_eq!(node.turn(back + 1_001), "expire a@1");
}

#[test]
fn a_leader_is_left_to_its_hand_over() {
    let mut controller = controller();
    let lease_over = ELECTION_TIMEOUT_MAX_MS + election_guard::LEASE_MARGIN_MS + 1;
    let turn = campaign(&mut controller, 0, Some("storage write stalled"), true, lease_over);
    assert_eq!(show(&turn.actions), "");
    assert_eq!(turn.hold_back.as_deref(), Some("storage write stalled"), "still reported");
}

// ---- stall and readiness ----

#[test]
fn a_log_write_that_does_not_return_is_a_stall() {
    let progress = |now_ms, write_started_ms| Progress { now_ms, write_started_ms, ..Progress::default() };
    assert_eq!(stall(&progress(10_000, 0)), None, "no write in progress");
    assert_eq!(stall(&progress(10_000, 10_000 - STORAGE_STALL_MS)), None);
    assert_eq!(
        stall(&progress(10_000, 10_000 - STORAGE_STALL_MS - 1)).as_deref(),
        Some("storage write stalled for 2001 ms")
    );
}

#[test]
fn an_applied_index_standing_still_behind_the_committed_one_is_a_stall() {
    let mut apply = ApplyProgress::default();
    let check = |apply: ApplyProgress, now_ms, committed_index| {
        stall(&Progress { now_ms, write_started_ms: 0, apply, committed_index })
    };
    // Idle: applied all that is committed, for as long as it likes.
    assert_eq!(check(apply.observe(0, 5, 5), 0, 5), None);
    assert_eq!(check(apply.observe(60_000, 5, 5), 60_000, 5), None);
    // Behind and moving: catching up is no stall.
    assert_eq!(check(apply.observe(61_000, 6, 9), 61_000, 9), None);
    assert_eq!(check(apply.observe(62_000, 7, 9), 62_000, 9), None);
    assert_eq!(check(apply.observe(64_000, 7, 9), 64_000, 9), None, "exactly APPLY_STALL_MS");
    assert_eq!(
        check(apply.observe(64_001, 7, 9), 64_001, 9).as_deref(),
        Some("apply stalled for 2001 ms at index 7 (committed 9)")
    );
    // It moves again: the stall is over.
    assert_eq!(check(apply.observe(64_100, 8, 9), 64_100, 9), None);
}

#[test]
fn readiness_lists_every_reason() {
    let ready = Health { me: 1, leader: Some(2), election_timeout_max_ms: 200, ..Health::default() };
    assert_eq!(problems(&ready), Vec::<String>::new());
    let everything = Health {
        raft_stopped: Some("storage error".into()),
        leader: None,
        applied_index: 5,
        last_log_index: 5 + APPLY_LAG_ENTRIES_MAX + 1,
        stall: Some("apply stalled".into()),
        clock_problem: clock_problem(Some(-900), 500),
        disk_problem: Some("disk space low".into()),
        event_loop_lag_ms: [EVENT_LOOP_LAG_MS_MAX + 1, EVENT_LOOP_LAG_MS_MAX],
        ..ready.clone()
    };
    assert_eq!(
        problems(&everything),
        [
            "raft stopped: storage error",
            "no leader known",
            "apply lag 10001 entries",
            "apply stalled",
            "clock skew: this node's clock is -900 ms from the majority's, past clock_skew_max_ms 500",
            "disk space low",
            "api event loop stalled 1001 ms",
        ]
    );
    // A leader out of touch with its quorum for three election timeouts.
    let alone = Health { leader: Some(1), quorum_ack_ms: Some(601), ..ready.clone() };
    assert_eq!(problems(&alone), ["leader has had no quorum contact for 601 ms"]);
    let fine = Health { leader: Some(1), quorum_ack_ms: Some(600), ..ready };
    assert_eq!(problems(&fine), Vec::<String>::new());
}

#[test]
fn a_clock_is_judged_only_against_a_known_majority() {
    assert_eq!(clock_problem(None, 500), None);
    assert_eq!(clock_problem(Some(500), 500), None);
    assert!(clock_problem(Some(501), 500).is_some());
}
