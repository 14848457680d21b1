//! Client-side adaptive throttling (docs/sdk.md, 10; Google's SRE book,
//! "Handling Overload"): per node and per priority class, a request is
//! refused locally with probability
//! `max(0, (requests - K * accepts) / (requests + 1))`, K = 2, over a
//! sliding window of `WINDOW` in `BUCKET_COUNT` buckets. So when a node
//! refuses most of what it is sent, the client stops sending most of it, and
//! the node sees about one refusal per request it serves instead of ten.
//!
//! Pure: the caller passes the time and the random draw, so tests replay any
//! sequence. What to do with a local refusal (fail the call fast) is the
//! client's business (`client.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How many times its accepts a node may be sent before the client refuses locally.
pub const K: f64 = 2.0;
/// How far back requests and accepts count.
pub const WINDOW: Duration = Duration::from_secs(120);
/// Buckets of the window (so each is `WINDOW / BUCKET_COUNT` long).
pub const BUCKET_COUNT: usize = 24;
/// Nodes × classes tracked at most; past it the least recently used is forgotten.
pub const KEYS_MAX: usize = 1024;

/// The priority classes of docs/api.md's door: 0–3 low, 4–6 normal, 7–9 high.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Low,
    Normal,
    High,
}

impl Class {
    pub fn of_priority(priority: u64) -> Class {
        match priority {
            0..=3 => Class::Low,
            4..=6 => Class::Normal,
            _ => Class::High,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which bucket of time this is (`elapsed / bucket length`).
    epoch: u64,
    requests: u64,
    accepts: u64,
}

#[derive(Clone)]
struct Window {
    buckets: [Bucket; BUCKET_COUNT],
    used: Instant,
}

impl Window {
    fn bucket(&mut self, epoch: u64) -> &mut Bucket {
        let bucket = &mut self.buckets[(epoch % BUCKET_COUNT as u64) as usize];
        if bucket.epoch != epoch {
            *bucket = Bucket { epoch, requests: 0, accepts: 0 };
        }
        bucket
    }

    fn totals(&self, epoch: u64) -> (u64, u64) {
        let live = |b: &&Bucket| b.epoch + (BUCKET_COUNT as u64) > epoch && b.epoch <= epoch;
        self.buckets.iter().filter(live).fold((0, 0), |(r, a), b| (r + b.requests, a + b.accepts))
    }
}

/// The throttle of one client: a window per (node, class).
pub struct Throttle {
    start: Instant,
    windows: BTreeMap<(String, Class), Window>,
}

impl Throttle {
    pub fn new(start: Instant) -> Throttle {
        Throttle { start, windows: BTreeMap::new() }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let bucket = WINDOW.as_millis() as u64 / BUCKET_COUNT as u64;
        now.saturating_duration_since(self.start).as_millis() as u64 / bucket
    }

    fn window(&mut self, node: &str, class: Class, now: Instant) -> &mut Window {
        let key = (node.to_string(), class);
        if !self.windows.contains_key(&key) && self.windows.len() >= KEYS_MAX {
            let oldest = self.windows.iter().min_by_key(|(_, w)| w.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.windows.remove(&oldest);
            }
        }
        let window =
            self.windows.entry(key).or_insert(Window { buckets: [Bucket::default(); BUCKET_COUNT], used: now });
        window.used = now;
        window
    }

    /// The probability that the next request to `node` in `class` is refused locally.
    pub fn reject_probability(&mut self, node: &str, class: Class, now: Instant) -> f64 {
        let epoch = self.epoch(now);
        let (requests, accepts) = self.window(node, class, now).totals(epoch);
        ((requests as f64 - K * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
    }

    /// Whether to send a request (`draw` uniform in `[0, 1)`). A local
    /// refusal counts as a request, as in the SRE book: so the probability
    /// falls again only when the node accepts what is sent.
    pub fn admit(&mut self, node: &str, class: Class, now: Instant, draw: f64) -> bool {
        if draw < self.reject_probability(node, class, now) {
            let epoch = self.epoch(now);
            self.window(node, class, now).bucket(epoch).requests += 1;
            return false;
        }
        true
    }

    /// Records a request the node answered: `accepted` unless it refused for
    /// overload (`overloaded`, `rate_limited`). A request that got no answer
    /// is not recorded: a dead node is failover's business, not the throttle's.
    pub fn answered(&mut self, node: &str, class: Class, now: Instant, accepted: bool) {
        let epoch = self.epoch(now);
        let bucket = self.window(node, class, now).bucket(epoch);
        bucket.requests += 1;
        bucket.accepts += u64::from(accepted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_10_no_local_refusal_while_the_node_accepts() {
        let start = Instant::now();
        let mut throttle = Throttle::new(start);
        for _ in 0..1000 {
            assert!(throttle.admit("a:1", Class::Normal, start, 0.0));
            throttle.answered("a:1", Class::Normal, start, true);
        }
        assert_eq!(throttle.reject_probability("a:1", Class::Normal, start), 0.0);
    }

    #[test]
    fn sdk_10_refusals_raise_the_probability_per_node_and_class() {
        let start = Instant::now();
        let mut throttle = Throttle::new(start);
        // 100 accepted, then 900 refused: (1000 - 200) / 1001.
        for i in 0..1000 {
            throttle.answered("a:1", Class::Low, start, i < 100);
        }
        let p = throttle.reject_probability("a:1", Class::Low, start);
        assert!((p - 800.0 / 1001.0).abs() < 1e-9, "{p}");
        assert!(!throttle.admit("a:1", Class::Low, start, 0.5));
        assert!(throttle.admit("a:1", Class::Low, start, 0.9));
        // Other nodes and classes are untouched.
        assert_eq!(throttle.reject_probability("b:1", Class::Low, start), 0.0);
        assert_eq!(throttle.reject_probability("a:1", Class::High, start), 0.0);
    }

    #[test]
    fn sdk_10_the_window_forgets_after_two_minutes() {
        let start = Instant::now();
        let mut throttle = Throttle::new(start);
        for _ in 0..100 {
            throttle.answered("a:1", Class::Normal, start, false);
        }
        assert!(throttle.reject_probability("a:1", Class::Normal, start) > 0.9);
        let later = start + WINDOW + Duration::from_secs(5);
        assert_eq!(throttle.reject_probability("a:1", Class::Normal, later), 0.0);
    }
}
