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
//! Pure: it takes times in milliseconds and the probes' answers, and returns
//! a decision; `node.rs` runs the probes and carries the decision out with
//! `runtime_config().elect(..)`.

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
        let answers: BTreeMap<u64, PeerAnswer> = answers
            .iter()
            .map(|(peer, at_ms, contact)| (*peer, PeerAnswer { at_ms: *at_ms, leader_contact_age_ms: *contact }))
            .collect();
        let input =
            Input { now_ms, me: 3, voters: &[1, 2, 3], answers: &answers, answer_fresh_ms: 300, leader_alive_ms: 100 };
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
}
