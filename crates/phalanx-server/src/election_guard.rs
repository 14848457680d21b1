//! The election guard: whether this node may campaign, decided from what its
//! peers last told it. openraft 0.9 has no pre-vote (Raft thesis §9.6), so a
//! node that cannot win still raises its term and, when it can talk again,
//! forces a working leader out. This guard gives the same protection from
//! outside openraft: every node probes the voters' Raft listeners
//! (`/raft/probe`) a few times per election timeout, and a node campaigns only
//! if it reaches a majority of the voters and none of the voters it reaches
//! still hears from a leader. The second rule is pre-vote's question ("would
//! you vote for me?") asked in advance: a voter that hears from a leader
//! refuses votes anyway (openraft's leader lease), so campaigning would only
//! raise the term.
//!
//! The same answers also make a faster failure detector than the election
//! timeout alone (`elect_now`). openraft lets a follower campaign only after
//! the leader lease (the maximum election timeout since it last heard from
//! the leader) and then one more randomised election timeout: 300-400 ms of
//! silence with the default settings. Once the lease has run out on this
//! node and on every voter it reaches, a vote cannot be refused for the
//! lease, so the extra timeout is only waiting: this node asks for an
//! election at once. The followers take turns (by id, `stagger_ms` apart) so
//! that two do not split the vote.
//!
//! Pure: it takes times in milliseconds and the probes' answers, and returns
//! a decision; `node.rs` runs the probes and carries the decision out with
//! `runtime_config().elect(..)` and `trigger().elect()`.

use std::collections::BTreeMap;

/// What one peer last answered to a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    /// When the answer arrived (this node's monotonic milliseconds).
    pub at_ms: u64,
    /// How long before answering the peer had last heard from its leader
    /// (0: the peer is the leader); `None`: it knows no leader.
    pub leader_contact_age_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub now_ms: u64,
    pub me: u64,
    pub voters: &'a [u64],
    /// The latest answer of each peer that has answered at all.
    pub answers: &'a BTreeMap<u64, PeerAnswer>,
    /// An answer older than this no longer shows that the peer is reachable.
    pub answer_fresh_ms: u64,
    /// A leader heard from within this is alive (openraft's leader lease
    /// lasts the election timeout).
    pub leader_alive_ms: u64,
    /// This node's wall clock minus the majority's (`clock.rs`), if known.
    pub clock_skew_ms: Option<i64>,
    /// A node whose clock is further than this from the majority's does not
    /// campaign: as leader it would stamp nothing wrong (log time follows the
    /// majority), but it is not ready and would only hand leadership over.
    pub clock_skew_max_ms: u64,
}

/// What `elect_now` needs beyond the guard's input.
#[derive(Clone, Debug)]
pub struct Silence {
    /// The leader this node last followed.
    pub leader: Option<u64>,
    /// How long ago this node last heard from it; `None`: never.
    pub contact_age_ms: Option<u64>,
    /// openraft's leader lease: the maximum election timeout.
    pub lease_ms: u64,
    /// How long each follower waits after the one before it (by id).
    pub stagger_ms: u64,
    /// The leader's last probes failed (refused, or no answer in time; two in
    /// a row) and none has succeeded since: positive evidence, beyond
    /// silence, that it is gone, and not merely slow to send its keep-alives.
    pub leader_unanswering: bool,
    /// This node's own event loop is running late: its sense of silence
    /// cannot be trusted, so it leaves the election to openraft's timer.
    pub lagging: bool,
}

/// Added to the lease, so that clocks read a few milliseconds apart still
/// find it over on every voter.
pub const LEASE_MARGIN_MS: u64 = 10;

/// Whether this node, a follower that has lost its leader, should ask for an
/// election now rather than wait out openraft's election timeout: the guard
/// lets it campaign, the leader fails its probes, the lease is over here and
/// on every voter it reaches (so none refuses the vote for it), the
/// followers before it (by id) had their turn, and this node is not itself
/// running late. A campaign that fails still raises the term, which would
/// unseat a leader that was only slow: hence every condition.
pub fn elect_now(input: &Input, silence: &Silence) -> bool {
    let (Some(leader), Some(contact)) = (silence.leader, silence.contact_age_ms) else {
        // A node that never followed anyone leaves its first election to openraft.
        return false;
    };
    if leader == input.me || !input.voters.contains(&input.me) || decide(input) != Decision::Campaign {
        return false;
    }
    if !silence.leader_unanswering || silence.lagging {
        return false;
    }
    let rank = input.voters.iter().filter(|v| **v != leader && **v < input.me).count() as u64;
    let lease_over = silence.lease_ms + LEASE_MARGIN_MS;
    if contact <= lease_over + rank * silence.stagger_ms {
        return false;
    }
    input.answers.iter().filter(|(peer, _)| input.voters.contains(peer) && **peer != input.me).all(|(_, answer)| {
        let age = input.now_ms.saturating_sub(answer.at_ms);
        // Unreachable peers do not vote; a reachable one must be past the lease.
        age > input.answer_fresh_ms || answer.leader_contact_age_ms.is_none_or(|c| c.saturating_add(age) > lease_over)
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Campaign,
    /// Holding back, and why (for the log and `/v1/cluster`).
    HoldBack(String),
}

pub fn decide(input: &Input) -> Decision {
    if !input.voters.contains(&input.me) {
        // A learner never campaigns; openraft knows that already.
        return Decision::Campaign;
    }
    if let Some(skew) = input.clock_skew_ms.filter(|skew| skew.unsigned_abs() > input.clock_skew_max_ms) {
        return Decision::HoldBack(format!(
            "this node's clock is {skew} ms from the majority's, past clock_skew_max_ms {}",
            input.clock_skew_max_ms
        ));
    }
    let mut reachable = vec![input.me];
    for (peer, answer) in input.answers {
        if *peer == input.me || !input.voters.contains(peer) {
            continue;
        }
        let age = input.now_ms.saturating_sub(answer.at_ms);
        if age > input.answer_fresh_ms {
            continue;
        }
        reachable.push(*peer);
        // The peer's contact age has grown since it answered.
        if let Some(contact) = answer.leader_contact_age_ms {
            if contact.saturating_add(age) < input.leader_alive_ms {
                return Decision::HoldBack(format!("voter {peer} still hears from a leader"));
            }
        }
    }
    let majority = input.voters.len() / 2 + 1;
    if reachable.len() < majority {
        return Decision::HoldBack(format!(
            "reaches {} of {} voters, a majority needs {majority}: campaigning could not win",
            reachable.len(),
            input.voters.len()
        ));
    }
    Decision::Campaign
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(answers: &[(u64, u64, Option<u64>)], now_ms: u64, expected: &str) {
        check_skewed(answers, now_ms, None, expected)
    }

    fn check_skewed(answers: &[(u64, u64, Option<u64>)], now_ms: u64, clock_skew_ms: Option<i64>, expected: &str) {
        let answers: BTreeMap<u64, PeerAnswer> = answers
            .iter()
            .map(|(peer, at_ms, contact)| (*peer, PeerAnswer { at_ms: *at_ms, leader_contact_age_ms: *contact }))
            .collect();
        let input = Input {
            now_ms,
            me: 3,
            voters: &[1, 2, 3],
            answers: &answers,
            answer_fresh_ms: 300,
            leader_alive_ms: 100,
            clock_skew_ms,
            clock_skew_max_ms: 500,
        };
        let got = match decide(&input) {
            Decision::Campaign => "campaign".to_string(),
            Decision::HoldBack(why) => why,
        };
        assert!(got.contains(expected), "{got:?} should contain {expected:?}");
    }

    #[test]
    fn a_node_cut_off_from_the_majority_holds_back() {
        check(&[], 1_000, "reaches 1 of 3");
        // Answers too old to count.
        check(&[(1, 100, None), (2, 100, None)], 1_000, "reaches 1 of 3");
    }

    #[test]
    fn a_node_holds_back_while_a_voter_it_reaches_hears_from_a_leader() {
        // The partial cut: node 3 lost the leader (1), node 2 still hears it.
        check(&[(2, 990, Some(20))], 1_000, "voter 2 still hears from a leader");
        // The leader itself answers.
        check(&[(1, 990, Some(0)), (2, 990, None)], 1_000, "voter 1 still hears");
    }

    #[test]
    fn a_node_campaigns_when_the_leader_is_gone_for_the_majority() {
        check(&[(2, 990, Some(150))], 1_000, "campaign");
        // Node 2 answered 80 ms ago with contact age 40: 120 ms by now.
        check(&[(2, 920, Some(40))], 1_000, "campaign");
        check(&[(2, 990, None)], 1_000, "campaign");
    }

    fn elect_now_at(answers: &[(u64, u64, Option<u64>)], me: u64, contact: Option<u64>) -> bool {
        elect_now_as(answers, me, |silence| Silence { contact_age_ms: contact, ..silence })
    }

    /// `elect_now` at 1,000 ms for node `me` of voters 1-3 (leader 1, a
    /// lease of 200 ms, the leader failing its probes), `adjust`ed.
    fn elect_now_as(answers: &[(u64, u64, Option<u64>)], me: u64, adjust: impl Fn(Silence) -> Silence) -> bool {
        let answers: BTreeMap<u64, PeerAnswer> = answers
            .iter()
            .map(|(peer, at_ms, contact)| (*peer, PeerAnswer { at_ms: *at_ms, leader_contact_age_ms: *contact }))
            .collect();
        let input = Input {
            now_ms: 1_000,
            me,
            voters: &[1, 2, 3],
            answers: &answers,
            answer_fresh_ms: 250,
            leader_alive_ms: 100,
            clock_skew_ms: None,
            clock_skew_max_ms: 500,
        };
        let silence = Silence {
            leader: Some(1),
            contact_age_ms: None,
            lease_ms: 200,
            stagger_ms: 50,
            leader_unanswering: true,
            lagging: false,
        };
        elect_now(&input, &adjust(silence))
    }

    #[test]
    fn no_early_election_without_a_failed_probe_or_while_running_late() {
        let silent = |silence| Silence { contact_age_ms: Some(300), ..silence };
        assert!(elect_now_as(&[(3, 990, None)], 2, silent));
        // Silent but still answering probes: a slow leader, not a gone one.
        assert!(!elect_now_as(&[(3, 990, None)], 2, |s| Silence { leader_unanswering: false, ..silent(s) }));
        // This node's own loop is late: its silence proves nothing.
        assert!(!elect_now_as(&[(3, 990, None)], 2, |s| Silence { lagging: true, ..silent(s) }));
    }

    #[test]
    fn a_follower_asks_for_an_election_once_the_lease_is_over_everywhere_it_reaches() {
        // Leader 1 silent; node 2 (first in turn) last heard it 215 ms ago,
        // and node 3 answered 10 ms ago that it heard it 205 ms before that.
        assert!(elect_now_at(&[(3, 990, Some(205))], 2, Some(215)));
        // Node 3 knows no leader any more: the same.
        assert!(elect_now_at(&[(3, 990, None)], 2, Some(215)));
    }

    #[test]
    fn no_early_election_while_the_lease_may_still_hold() {
        // This node's own lease is not over.
        assert!(!elect_now_at(&[(3, 990, Some(205))], 2, Some(200)));
        // Node 3 heard the leader 150 ms ago: it would refuse the vote.
        assert!(!elect_now_at(&[(3, 990, Some(140))], 2, Some(215)));
        // The leader itself answered recently: alive.
        assert!(!elect_now_at(&[(1, 990, Some(0)), (3, 990, None)], 2, Some(215)));
        // Never followed a leader: openraft's own timer decides.
        assert!(!elect_now_at(&[(3, 990, None)], 2, None));
        // Cannot reach a majority: the guard holds back.
        assert!(!elect_now_at(&[], 2, Some(500)));
    }

    #[test]
    fn followers_take_turns() {
        // Node 3 comes after node 2: it waits one stagger longer.
        assert!(!elect_now_at(&[(2, 990, None)], 3, Some(215)));
        assert!(elect_now_at(&[(2, 990, None)], 3, Some(265)));
    }

    #[test]
    fn a_node_whose_clock_is_off_holds_back() {
        let hour = 3_600_000;
        check_skewed(&[(2, 990, None)], 1_000, Some(hour), "clock is 3600000 ms from the majority's");
        check_skewed(&[(2, 990, None)], 1_000, Some(-hour), "clock is -3600000 ms");
        // Within the bound, or not yet known: the other rules decide.
        check_skewed(&[(2, 990, None)], 1_000, Some(499), "campaign");
        check_skewed(&[(2, 990, None)], 1_000, None, "campaign");
    }
}
