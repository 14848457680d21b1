//! Checks on Raft RPCs at the edge, before openraft sees them.
//!
//! openraft trusts its peers: a vote with `term` = 2^64-1 overflows its term
//! arithmetic and panics the node (again after every restart, since the vote
//! is persisted), and an append whose commands do not decode as ours would be
//! committed and applied everywhere. The peer token keeps strangers out; these
//! checks keep a peer's bug, a corrupted message or a forged one that carries
//! the token from reaching openraft in a shape it cannot survive. What is
//! checked: the sender is a member (or may become one, see `sender_plausible`),
//! every term and index is far below any value whose arithmetic could
//! overflow, log ids are contiguous and ordered, and every command decodes
//! into something the state machine can store and serve.
//!
//! Authentication (the peer token) is `api.rs`'s; the body-size bound too.

use crate::raft_types::{check_addr, Member, NodeId, TypeConfig};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{EntryPayload, LogId, Membership, StoredMembership, Vote};
use phalanx_core::Command;

/// Highest term accepted from a peer. A healthy cluster adds one term per
/// election: 2^40 terms is one election a millisecond for 34 years, and it
/// leaves openraft's `term + 1` a factor of a million away from overflow.
pub const RAFT_TERM_MAX: u64 = 1 << 40;
/// Highest log index accepted from a peer (same reasoning as the term).
pub const RAFT_INDEX_MAX: u64 = 1 << 48;
/// Entries in one append (openraft sends at most `max_payload_entries`).
pub const RAFT_APPEND_ENTRIES_MAX: usize = 4096;
/// Members in one membership (a Raft group of this many is already absurd).
pub const RAFT_MEMBERS_MAX: usize = 64;

/// What the receiving node knows, to judge the sender by.
pub struct Receiver<'a> {
    /// The membership this node has (empty before it is first contacted).
    pub membership: &'a StoredMembership<NodeId, Member>,
}

fn check_vote(vote: &Vote<NodeId>) -> Result<NodeId, String> {
    let term = vote.leader_id.term;
    if term > RAFT_TERM_MAX {
        return Err(format!("term {term} is above the plausible maximum {RAFT_TERM_MAX}"));
    }
    vote.leader_id.voted_for().ok_or_else(|| "the vote names no node".to_string())
}

fn check_log_id(what: &str, log_id: &Option<LogId<NodeId>>, vote_term: u64) -> Result<(), String> {
    if let Some(log_id) = log_id {
        if log_id.index > RAFT_INDEX_MAX {
            return Err(format!("{what} index {} is above the plausible maximum {RAFT_INDEX_MAX}", log_id.index));
        }
        if log_id.leader_id.term > vote_term {
            return Err(format!("{what} term {} is above the sender's term {vote_term}", log_id.leader_id.term));
        }
    }
    Ok(())
}

fn check_membership(membership: &Membership<NodeId, Member>) -> Result<(), String> {
    let count = membership.nodes().count();
    if count > RAFT_MEMBERS_MAX {
        return Err(format!("a membership of {count} nodes is more than {RAFT_MEMBERS_MAX}"));
    }
    for (id, member) in membership.nodes() {
        if *id == 0 {
            return Err("node id 0 is reserved".into());
        }
        check_addr(&member.api).and_then(|()| check_addr(&member.raft)).map_err(|why| format!("node {id}: {why}"))?;
    }
    Ok(())
}

/// A sender is plausible if it is in this node's membership, or this node
/// knows no membership yet (it waits to be contacted when added), or the
/// sender's term is newer than the entry that made this node's membership:
/// a node that was down while another joined and became leader holds an old
/// membership without the new leader, and must still accept its appends to
/// learn of it (a leader's term is always above the entry that added it).
fn sender_plausible(receiver: &Receiver, sender: NodeId, term: u64) -> Result<(), String> {
    let membership = receiver.membership;
    if membership.membership().get_node(&sender).is_some() || membership.log_id().is_none() {
        return Ok(());
    }
    let known_term = membership.log_id().map(|l| l.leader_id.term).unwrap_or(0);
    if term > known_term {
        return Ok(());
    }
    Err(format!("node {sender} is not a member of this cluster"))
}

/// Checks that every command of a normal entry is one the state machine can
/// apply and serve: the JSON it stores must parse, because reads hand it out
/// as JSON. (Everything else about a command is decided by `apply`, which
/// refuses what the state does not allow on every replica alike.)
pub fn check_commands(commands: &[Command]) -> Result<(), String> {
    let json = |what: &str, text: &str| -> Result<(), String> {
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(|_| ())
            .map_err(|error| format!("{what} is not JSON: {error}"))
    };
    for command in commands {
        match command {
            Command::Submit { tasks } => {
                for task in tasks {
                    json("a submitted payload", &task.payload)?;
                }
            }
            Command::Complete { result, .. } => json("a result", result)?,
            Command::ContextPut { value, .. } => json("a context value", value)?,
            _ => {}
        }
    }
    Ok(())
}

pub fn check_vote_request(receiver: &Receiver, request: &VoteRequest<NodeId>) -> Result<(), String> {
    let candidate = check_vote(&request.vote)?;
    check_log_id("last_log_id", &request.last_log_id, request.vote.leader_id.term)?;
    // A candidate this node does not know cannot lead it: refusing its vote
    // costs nothing (it still needs a majority of members it does know).
    if receiver.membership.log_id().is_some() && receiver.membership.membership().get_node(&candidate).is_none() {
        return Err(format!("candidate {candidate} is not a member of this cluster"));
    }
    Ok(())
}

pub fn check_append_request(receiver: &Receiver, request: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let leader = check_vote(&request.vote)?;
    let term = request.vote.leader_id.term;
    sender_plausible(receiver, leader, term)?;
    check_log_id("prev_log_id", &request.prev_log_id, term)?;
    check_log_id("leader_commit", &request.leader_commit, term)?;
    if request.entries.len() > RAFT_APPEND_ENTRIES_MAX {
        return Err(format!("{} entries in one append is more than {RAFT_APPEND_ENTRIES_MAX}", request.entries.len()));
    }
    // Raft §5.3: the entries follow prev_log_id, one index after another, in
    // terms that never go down.
    let mut previous = request.prev_log_id;
    for entry in &request.entries {
        check_log_id("entry", &Some(entry.log_id), term)?;
        let expected = previous.map(|p| p.index + 1).unwrap_or(0);
        if entry.log_id.index != expected {
            return Err(format!("entry index {} does not follow {expected}", entry.log_id.index));
        }
        if previous.is_some_and(|p| p.leader_id.term > entry.log_id.leader_id.term) {
            return Err(format!("entry {} has a term below the entry before it", entry.log_id.index));
        }
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(request) => {
                check_commands(&request.commands).map_err(|why| format!("entry {}: {why}", entry.log_id.index))?
            }
            EntryPayload::Membership(membership) => {
                check_membership(membership).map_err(|why| format!("entry {}: {why}", entry.log_id.index))?
            }
        }
        previous = Some(entry.log_id);
    }
    Ok(())
}

pub fn check_snapshot_request(receiver: &Receiver, request: &InstallSnapshotRequest<TypeConfig>) -> Result<(), String> {
    let leader = check_vote(&request.vote)?;
    let term = request.vote.leader_id.term;
    sender_plausible(receiver, leader, term)?;
    check_log_id("snapshot last_log_id", &request.meta.last_log_id, term)?;
    check_log_id("snapshot membership log id", request.meta.last_membership.log_id(), term)?;
    check_membership(request.meta.last_membership.membership())?;
    if request.meta.snapshot_id.len() > 256 {
        return Err("snapshot_id is longer than 256 bytes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry};
    use phalanx_core::{NewTask, Request};
    use std::collections::{BTreeMap, BTreeSet};

    fn membership(ids: &[u64]) -> StoredMembership<NodeId, Member> {
        let nodes: BTreeMap<u64, Member> =
            ids.iter().map(|id| (*id, Member::new(format!("127.0.0.1:70{id:02}"), "127.0.0.1:8000"))).collect();
        let voters: BTreeSet<u64> = ids.iter().copied().collect();
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 1);
        StoredMembership::new(Some(log_id), Membership::new(vec![voters], nodes))
    }

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn submit(payload: &str) -> Entry<TypeConfig> {
        let task = NewTask::new("q", payload);
        Entry {
            log_id: log_id(2, 5),
            payload: EntryPayload::Normal(Request { now_ms: 0, commands: vec![Command::Submit { tasks: vec![task] }] }),
        }
    }

    fn append(
        term: u64,
        from: u64,
        prev: Option<LogId<NodeId>>,
        entries: Vec<Entry<TypeConfig>>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: Vote::new_committed(term, from), prev_log_id: prev, entries, leader_commit: None }
    }

    #[test]
    fn a_term_near_overflow_is_refused() {
        let known = membership(&[1, 2, 3]);
        let receiver = Receiver { membership: &known };
        let vote = VoteRequest { vote: Vote::new(u64::MAX, 2), last_log_id: None };
        assert!(check_vote_request(&receiver, &vote).unwrap_err().contains("plausible maximum"));
        let request = append(u64::MAX, 2, None, vec![]);
        assert!(check_append_request(&receiver, &request).is_err());
        let fine = VoteRequest { vote: Vote::new(7, 2), last_log_id: Some(log_id(6, 100)) };
        check_vote_request(&receiver, &fine).unwrap();
    }

    #[test]
    fn a_stranger_cannot_vote_or_append_but_a_newer_leader_can() {
        let known = membership(&[1, 2, 3]);
        let receiver = Receiver { membership: &known };
        let vote = VoteRequest { vote: Vote::new(7, 9), last_log_id: None };
        assert!(check_vote_request(&receiver, &vote).is_err());
        // Term 1 is the term of the entry that made this node's membership.
        assert!(check_append_request(&receiver, &append(1, 9, None, vec![])).is_err());
        check_append_request(&receiver, &append(2, 9, None, vec![])).unwrap();
        let empty = StoredMembership::default();
        check_append_request(&Receiver { membership: &empty }, &append(1, 9, None, vec![])).unwrap();
    }

    #[test]
    fn entries_must_follow_and_decode() {
        let known = membership(&[1, 2, 3]);
        let receiver = Receiver { membership: &known };
        check_append_request(&receiver, &append(2, 1, Some(log_id(2, 4)), vec![submit("{\"a\": 1}")])).unwrap();
        let not_json = check_append_request(&receiver, &append(2, 1, Some(log_id(2, 4)), vec![submit("not json")]));
        assert!(not_json.unwrap_err().contains("not JSON"));
        let gap = check_append_request(&receiver, &append(2, 1, Some(log_id(2, 2)), vec![submit("1")]));
        assert!(gap.unwrap_err().contains("does not follow"));
        let future = check_append_request(&receiver, &append(1, 1, Some(log_id(1, 4)), vec![submit("1")]));
        assert!(future.unwrap_err().contains("above the sender's term"));
    }
}
