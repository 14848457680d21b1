//! Client-side adaptive throttling (docs/sdk.md, 10; Google's SRE book,
//! "Handling Overload"): per node and per priority class, a request is
//! refused locally with probability
//! `max(0, (requests - K * accepts) / (requests + 1))`, K = 2, over a
//! sliding window of `WINDOW` in `BUCKET_COUNT` buckets. So when a node
//! refuses most of what it is sent, the client stops sending most of it, and
//! the node sees about one refusal per request it serves instead of ten.
//!
//! The window is 10 s, not the book's two minutes. Once a node can serve
//! again, what is sent grows by about K times per window (locally refused
//! requests count as requests, so only accepts bring the probability down):
//! with two minutes, clients went on refusing most of their own calls for
//! minutes after an overload had passed (`sdk_10_…_recovers_within_…`).
//!
//! Pure: the caller passes the time and the random draw, so tests replay any
//! sequence. What to do with a local refusal (fail the call fast) is the
//! client's business (`client.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How many times its accepts a node may be sent before the client refuses locally.
pub const K: f64 = 2.0;
/// How far back requests and accepts count, unless the client says otherwise.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Buckets of the window (so each is `WINDOW / BUCKET_COUNT` long).
pub const BUCKET_COUNT: usize = 20;
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
    bucket_ms: u64,
    windows: BTreeMap<(String, Class), Window>,
}

impl Throttle {
    pub fn new(start: Instant) -> Throttle {
        Throttle::with_window(start, WINDOW)
    }

    /// A throttle whose window is `window` long (at least `BUCKET_COUNT` ms).
    pub fn with_window(start: Instant, window: Duration) -> Throttle {
        let bucket_ms = (window.as_millis() as u64 / BUCKET_COUNT as u64).max(1);
        Throttle { start, bucket_ms, windows: BTreeMap::new() }
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64 / self.bucket_ms
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

    /// A node refuses nine calls in ten for 60 s (offered 10x what it
    /// serves), then the load falls to half what it serves and it accepts
    /// everything: the seconds until the client refuses under 1% of its own
    /// calls locally. Calls are spread evenly, the draws from a fixed sequence.
    fn seconds_to_recover(window: Duration) -> u64 {
        let start = Instant::now();
        let mut throttle = Throttle::with_window(start, window);
        let mut seed = 7u64;
        let mut draw = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let (capacity, step) = (100u64, Duration::from_millis(10));
        for tick in 0..6_000u64 {
            let now = start + step * tick as u32;
            // 10 calls per tick (1,000/s); the node serves 1 per tick of what it is sent.
            let mut served = 0;
            for _ in 0..10 {
                if throttle.admit("a:1", Class::Normal, now, draw()) {
                    let accepted = served < capacity / 100;
                    served += u64::from(accepted);
                    throttle.answered("a:1", Class::Normal, now, accepted);
                }
            }
        }
        let (mut refused, mut calls) = (0u64, 0u64);
        for tick in 6_000..60_000u64 {
            let now = start + step * tick as u32;
            // Half of what it serves: one call every other tick, all accepted.
            if tick % 2 == 0 {
                calls += 1;
                if throttle.admit("a:1", Class::Normal, now, draw()) {
                    throttle.answered("a:1", Class::Normal, now, true);
                } else {
                    refused += 1;
                }
            }
            if (tick + 1) % 100 == 0 {
                if refused * 100 < calls {
                    return (tick + 1 - 6_000) / 100;
                }
                (refused, calls) = (0, 0);
            }
        }
        u64::MAX
    }

    #[test]
    fn sdk_10_a_client_stops_refusing_its_own_calls_within_30_s_of_an_overload_passing() {
        let seconds = seconds_to_recover(WINDOW);
        let book = seconds_to_recover(Duration::from_secs(120));
        println!("recovered in {seconds} s with a window of {WINDOW:?}, in {book} s with two minutes");
        assert!(seconds <= 30, "the client refused 1% or more of its calls for {seconds} s after the overload");
        // The book's two minutes, for the record: minutes.
        assert!(book > 120, "{book} s");
    }

    #[test]
    fn sdk_10_the_window_forgets_after_its_length() {
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
