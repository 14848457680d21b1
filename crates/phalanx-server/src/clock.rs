//! Clocks: the log time a leader stamps on each entry, and how far each
//! node's wall clock is from the majority's.
//!
//! Log time advances by the leader's monotonic clock from where the log left
//! off, so a leader whose wall clock is an hour ahead cannot expire every
//! deadline and lease at once, and one an hour behind cannot freeze them.
//! The wall clock only corrects it: towards the majority's time (the median
//! of this node's wall clock and its peers', learnt from the election
//! guard's probes, `/raft/probe`), by at most `SLEW_DIVISOR`th of the time
//! that passed, so no single clock, and no jump of one, can move log time by
//! more than a tenth of the real time that passed.
//!
//! The arithmetic is pure (`majority_ms`, `advance`, `start`) and unit
//! tested; `LogClock` holds the samples and the anchor under one lock.
//! Leaves probing to `node.rs` (`election_loop`) and carrying out what a
//! skewed clock means (not ready, no campaign, step down) to `node.rs` too.

use crate::store::StateMachineShared;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The wall clock may speed log time up or slow it down by at most one
/// `SLEW_DIVISOR`th of the real (monotonic) time that passed.
pub const SLEW_DIVISOR: u64 = 10;

/// A peer's wall clock sample older than this is not used: the peer may have
/// stopped answering, or its clock may have jumped since.
pub const SAMPLE_FRESH_MS: u64 = 5_000;

/// How often the leader's log clock moves its anchor (and so applies a slew).
pub const REANCHOR_MS: u64 = 1_000;

/// The majority's time: the median of this node's wall clock and the
/// estimates of its peers' clocks (lower middle when the count is even), if
/// a majority of the voters' clocks lie within `agree_ms` of it; `None` when
/// fewer are known, or they do not agree (two nodes an hour apart: no one
/// can tell which is right, so no one is judged, and log time runs on the
/// monotonic clock alone).
pub fn majority_ms(own_ms: u64, peers_ms: &[u64], voter_count: usize, agree_ms: u64) -> Option<u64> {
    let mut values: Vec<u64> = std::iter::once(own_ms).chain(peers_ms.iter().copied()).collect();
    let majority = voter_count / 2 + 1;
    values.sort_unstable();
    let median = values[(values.len() - 1) / 2];
    let agreeing = values.iter().filter(|v| v.abs_diff(median) <= agree_ms).count();
    (agreeing >= majority).then_some(median)
}

/// Log time after `elapsed_ms` of monotonic time since it was `last_ms`,
/// corrected towards `reference_ms` (the majority's time) by at most
/// `elapsed_ms / SLEW_DIVISOR` either way. It never runs backwards.
pub fn advance(last_ms: u64, elapsed_ms: u64, reference_ms: Option<u64>) -> u64 {
    let base = last_ms.saturating_add(elapsed_ms);
    let Some(reference) = reference_ms else { return base };
    let slew = elapsed_ms / SLEW_DIVISOR;
    if reference > base {
        base + (reference - base).min(slew)
    } else {
        base - (base - reference).min(slew)
    }
}

/// Where a new leader's log time starts: where the log left off, or the
/// majority's time if that is later (the cluster was idle: no entry has
/// carried time forward). A fresh log (log time 0) with no majority known
/// yet starts at this node's wall clock: there is nothing better.
pub fn start(applied_ms: u64, reference_ms: Option<u64>, own_wall_ms: u64) -> u64 {
    match reference_ms {
        Some(reference) => applied_ms.max(reference),
        None if applied_ms == 0 => own_wall_ms,
        None => applied_ms,
    }
}

/// A peer's wall clock as a probe saw it.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// The middle of the probe's round trip on this node's monotonic clock:
    /// the best estimate of when the peer read its clock (NTP's assumption
    /// of a symmetric path).
    at: Instant,
    wall_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Anchor {
    log_ms: u64,
    at: Instant,
    /// Whether the majority's time was known when the anchor was set; if not,
    /// the first stamp that knows it may move log time forward to it.
    referenced: bool,
    /// The last stamp given out.
    last_ms: u64,
}

#[derive(Default)]
struct Inner {
    samples: BTreeMap<u64, Sample>,
    voters: Vec<u64>,
    anchor: Option<Anchor>,
}

/// This node's view of the cluster's clocks and, while it leads, its log time.
pub struct LogClock {
    me: u64,
    /// `clock_skew_max_ms`: clocks this close agree.
    agree_ms: u64,
    shared: Arc<StateMachineShared>,
    inner: Mutex<Inner>,
}

pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl LogClock {
    pub fn new(me: u64, agree_ms: u64, shared: Arc<StateMachineShared>) -> LogClock {
        LogClock { me, agree_ms, shared, inner: Mutex::new(Inner::default()) }
    }

    /// Records a peer's wall clock, read at `at` on this node's monotonic clock.
    pub fn record(&self, peer: u64, wall_ms: u64, at: Instant) {
        self.inner.lock().expect("clock lock").samples.insert(peer, Sample { at, wall_ms });
    }

    pub fn set_voters(&self, voters: &[u64]) {
        let mut inner = self.inner.lock().expect("clock lock");
        inner.samples.retain(|id, _| voters.contains(id));
        inner.voters = voters.to_vec();
    }

    /// Every known clock projected to now, by node id (this node included).
    fn clocks_now(&self, inner: &Inner) -> BTreeMap<u64, u64> {
        let now = Instant::now();
        let mut clocks: BTreeMap<u64, u64> = inner
            .samples
            .iter()
            .filter(|(id, _)| **id != self.me)
            .filter(|(_, s)| now.duration_since(s.at).as_millis() as u64 <= SAMPLE_FRESH_MS)
            .map(|(id, s)| (*id, s.wall_ms.saturating_add(now.duration_since(s.at).as_millis() as u64)))
            .collect();
        clocks.insert(self.me, wall_clock_ms());
        clocks
    }

    fn reference(&self, inner: &Inner) -> Option<u64> {
        let clocks = self.clocks_now(inner);
        let peers: Vec<u64> = clocks.iter().filter(|(id, _)| **id != self.me).map(|(_, ms)| *ms).collect();
        // A node outside the voters (a learner) counts only itself.
        let voter_count = inner.voters.len().max(1);
        majority_ms(clocks[&self.me], &peers, voter_count, self.agree_ms)
    }

    /// Each known node's wall clock minus the majority's time, in ms
    /// (positive: ahead); empty while no agreeing majority is known.
    pub fn skews_ms(&self) -> BTreeMap<u64, i64> {
        let inner = self.inner.lock().expect("clock lock");
        let Some(reference) = self.reference(&inner) else { return BTreeMap::new() };
        self.clocks_now(&inner).into_iter().map(|(id, ms)| (id, ms as i64 - reference as i64)).collect()
    }

    /// This node's skew from the majority, if known.
    pub fn own_skew_ms(&self) -> Option<i64> {
        self.skews_ms().get(&self.me).copied()
    }

    /// Forgets the anchor: the next stamp starts from where the log left off.
    /// Called whenever leadership begins or ends.
    pub fn reset(&self) {
        self.inner.lock().expect("clock lock").anchor = None;
    }

    /// The log time to stamp on an entry proposed now (see the module
    /// comment). The anchor moves once per `REANCHOR_MS`, so the slew is
    /// computed over whole stretches, not lost to rounding between stamps
    /// that come a millisecond apart.
    pub fn now_ms(&self) -> u64 {
        let applied_ms = self.shared.data.read().expect("state lock").state.now_ms();
        let mut inner = self.inner.lock().expect("clock lock");
        let reference = self.reference(&inner);
        let now = Instant::now();
        let mut anchor = match inner.anchor {
            None => Anchor {
                log_ms: start(applied_ms, reference, wall_clock_ms()),
                at: now,
                referenced: reference.is_some(),
                last_ms: 0,
            },
            Some(anchor) if !anchor.referenced && reference.is_some() => {
                let elapsed_ms = now.duration_since(anchor.at).as_millis() as u64;
                Anchor {
                    log_ms: start(advance(anchor.log_ms, elapsed_ms, None), reference, 0),
                    at: now,
                    referenced: true,
                    ..anchor
                }
            }
            Some(anchor) => anchor,
        };
        let elapsed_ms = now.duration_since(anchor.at).as_millis() as u64;
        let log_ms = advance(anchor.log_ms, elapsed_ms, reference);
        if elapsed_ms >= REANCHOR_MS {
            anchor.log_ms = log_ms;
            anchor.at += std::time::Duration::from_millis(elapsed_ms);
        }
        // Another leader may have carried log time further in the meantime,
        // and a changed reference may pull a little back: stamps never do.
        let stamp = log_ms.max(applied_ms).max(anchor.last_ms);
        anchor.last_ms = stamp;
        inner.anchor = Some(anchor);
        stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_majority_is_the_median_of_a_majority_that_agrees() {
        let hour = 3_600_000;
        // One clock an hour ahead or behind does not move the median.
        assert_eq!(majority_ms(hour + 1_000, &[1_000, 1_010], 3, 500), Some(1_010));
        assert_eq!(majority_ms(hour + 1_000, &[2 * hour, 2 * hour + 10], 3, 500), Some(2 * hour));
        // Two of three voters known and agreeing is a majority; one is not.
        assert_eq!(majority_ms(1_000, &[1_200], 3, 500), Some(1_000));
        assert_eq!(majority_ms(1_000, &[], 3, 500), None);
        // Two clocks an hour apart, or three all apart: no majority agrees.
        assert_eq!(majority_ms(hour + 1_000, &[1_000], 3, 500), None);
        assert_eq!(majority_ms(hour + 1_000, &[1_000], 2, 500), None);
        assert_eq!(majority_ms(0, &[hour, 2 * hour], 3, 500), None);
        // Four voters, one off: the lower middle is one of the three.
        assert_eq!(majority_ms(hour, &[1_000, 1_000, 1_020], 4, 500), Some(1_000));
        assert_eq!(majority_ms(0, &[hour, hour, hour + 20], 4, 500), Some(hour));
        // A one-node cluster is its own majority.
        assert_eq!(majority_ms(1_000, &[], 1, 500), Some(1_000));
    }

    #[test]
    fn log_time_advances_by_real_time_and_slews_at_most_a_tenth() {
        // No reference: real time only.
        assert_eq!(advance(5_000, 1_000, None), 6_000);
        // A wall clock an hour ahead pulls by at most 100 ms per second.
        assert_eq!(advance(5_000, 1_000, Some(5_000 + 3_600_000)), 6_100);
        // An hour behind slows it by at most 100 ms per second, never back.
        assert_eq!(advance(5_000, 1_000, Some(0)), 5_900);
        assert_eq!(advance(5_000, 0, Some(0)), 5_000);
        // A small difference is corrected in full.
        assert_eq!(advance(5_000, 1_000, Some(6_030)), 6_030);
    }

    #[test]
    fn a_new_leader_starts_where_the_log_left_off() {
        // The majority is later (an idle cluster): catch up to it.
        assert_eq!(start(5_000, Some(9_000), 99_999), 9_000);
        // The majority is earlier: log time never goes back.
        assert_eq!(start(5_000, Some(4_000), 99_999), 5_000);
        // No majority known: where the log left off, not this node's wall clock.
        assert_eq!(start(5_000, None, 99_999), 5_000);
        // A fresh log: this node's wall clock is all there is.
        assert_eq!(start(0, None, 99_999), 99_999);
    }
}
