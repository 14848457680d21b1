//! Admission control at the door of every node: per-client token buckets,
//! request deadlines, and the bound on new work in flight, which follows the
//! delay admitted work meets (`AdaptiveLimit`). Refusals are cheap and
//! immediate (429 or 503 with `Retry-After`), never a timeout.
//!
//! The proposal queue's own bound and the shedding of low priorities first
//! live in `proposer.rs`; per-queue depth (`queue_tasks_max`) is decided by
//! the replicated state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

tokio::task_local! {
    /// The instant after which the current request's client no longer wants
    /// an answer (from the `X-Phalanx-Deadline-Ms` header).
    pub static DEADLINE: Option<Instant>;
}

/// The current request's deadline, if it carries one.
pub fn current_deadline() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok().flatten()
}

/// How many of `requests_in_flight_max` slots new work of `priority` may
/// find taken and still be admitted: low work (0..=3) half of them, normal
/// work (4..=6) four fifths, high work (7..=9) all. Under pressure the low
/// class is refused first, then the normal one, and high work keeps a fifth
/// of the slots to itself.
pub fn in_flight_share(priority: u8, requests_in_flight_max: usize) -> usize {
    match priority {
        0..=3 => requests_in_flight_max / 2,
        4..=6 => requests_in_flight_max * 4 / 5,
        _ => requests_in_flight_max,
    }
}

/// How often the door's bound is reconsidered, at most.
pub const LIMIT_INTERVAL: Duration = Duration::from_millis(100);
/// The bound never falls below this many requests (nor above
/// `requests_in_flight_max`): a node keeps admitting some work, and the
/// delay of what it admits is how it learns that the pressure has gone.
pub const LIMIT_FLOOR: usize = 16;
/// Latencies one interval keeps at most (the rest of a busy interval adds
/// nothing a thousand samples do not already say).
const WINDOW_SAMPLES_MAX: usize = 1024;
/// An interval is judged once it has this many latencies, not before.
const WINDOW_SAMPLES_MIN: usize = 4;
/// Intervals over which the node's unloaded latency (the smallest latency
/// of an interval) is remembered: about 3 s.
const BASE_WINDOWS: usize = 32;
/// The most one interval may cut the bound by (to a quarter).
const DECREASE_MAX: f64 = 0.25;

/// The door's slots for new work in flight, and their bound, which follows the
/// delay work meets in the node's own queue (as CoDel does): each interval of
/// `LIMIT_INTERVAL` the 90th percentile of the time proposals waited in the
/// proposal queue (`proposer.rs`: from being queued to being handed to Raft)
/// is compared with that queue's unloaded wait (the smallest of the last
/// `BASE_WINDOWS` intervals). Past it by more than the target, admitted work
/// is queueing and the bound is cut in proportion (target / delay, at most to
/// a quarter); otherwise, while at least half of it is in use, it grows by a
/// tenth. So a node past its capacity refuses at the door instead of holding
/// work longer than its clients' attempt timeouts (docs/sdk.md, 1: 250-500
/// ms), after which they would count it lost and send it again. Only the
/// leader proposes, so a follower's bound stays at its ceiling; the leader's
/// door bounds what followers forward to it.
///
/// The signal is the queue the bound controls, not a request's whole latency:
/// a node whose cores are taken by refusing (or by anything else) is slow
/// whatever it admits, and a bound cut for that would only refuse more and
/// serve less (measured: goodput fell from about a third of capacity to 2% at
/// 10x open-loop load when the bound followed whole latencies).
pub struct AdaptiveLimit {
    slots: Arc<Semaphore>,
    limit: AtomicUsize,
    ceiling: usize,
    /// `None`: the bound stays at `ceiling`.
    target: Option<Duration>,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    latencies_us: Vec<u64>,
    /// The most requests in flight seen at an admission in this interval.
    busiest: usize,
    /// The smallest latency of each of the last intervals judged.
    minima_us: std::collections::VecDeque<u64>,
}

impl AdaptiveLimit {
    pub fn new(ceiling: usize, target: Option<Duration>, now: Instant) -> AdaptiveLimit {
        assert!(ceiling > 0);
        AdaptiveLimit {
            slots: Arc::new(Semaphore::new(ceiling)),
            limit: AtomicUsize::new(ceiling),
            ceiling,
            target,
            window: Mutex::new(Window {
                started: now,
                latencies_us: Vec::new(),
                busiest: 0,
                minima_us: std::collections::VecDeque::new(),
            }),
        }
    }

    /// How many new-work requests the door admits at once now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// New-work requests in flight now.
    pub fn busy(&self) -> usize {
        self.ceiling - self.slots.available_permits()
    }

    /// A slot for new work of `priority`, held until its answer is sent, or
    /// `None`: the class's share of the bound (`in_flight_share`) is in use.
    pub fn try_admit(&self, priority: u8) -> Option<OwnedSemaphorePermit> {
        if self.busy() >= in_flight_share(priority, self.limit()) {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A proposal waited `delay` in the proposal queue.
    pub fn observe_queue_delay(&self, delay: Duration, now: Instant) {
        self.observe(delay, self.busy(), now)
    }

    /// One delay seen, with `busy` new-work requests in flight.
    fn observe(&self, latency: Duration, busy: usize, now: Instant) {
        let Some(target) = self.target else { return };
        let mut window = self.window.lock().expect("limit lock");
        if window.latencies_us.len() < WINDOW_SAMPLES_MAX {
            window.latencies_us.push(latency.as_micros() as u64);
        }
        window.busiest = window.busiest.max(busy);
        if now.saturating_duration_since(window.started) < LIMIT_INTERVAL
            || window.latencies_us.len() < WINDOW_SAMPLES_MIN
        {
            return;
        }
        let latencies = &mut window.latencies_us;
        latencies.sort_unstable();
        let p90 = latencies[(latencies.len() - 1) * 9 / 10];
        let smallest = latencies[0];
        if window.minima_us.len() == BASE_WINDOWS {
            window.minima_us.pop_front();
        }
        window.minima_us.push_back(smallest);
        let base = window.minima_us.iter().copied().min().unwrap_or(smallest);
        let delay_us = p90.saturating_sub(base);
        let target_us = target.as_micros() as u64;
        let limit = self.limit();
        let next = if delay_us > target_us {
            let ratio = (target_us as f64 / delay_us as f64).max(DECREASE_MAX);
            (limit as f64 * ratio) as usize
        } else if window.busiest * 2 >= limit {
            limit + (limit / 10).max(1)
        } else {
            limit
        };
        let next = next.clamp(LIMIT_FLOOR.min(self.ceiling), self.ceiling);
        if next != limit {
            tracing::debug!(limit, next, p90_us = p90, base_us = base, "admission: bound on new work moved");
        }
        self.limit.store(next, Ordering::Relaxed);
        window.started = now;
        window.latencies_us.clear();
        window.busiest = 0;
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One token bucket per client key (the `X-Phalanx-Client` header, else the
/// peer's IP address), at most `clients_tracked_max` of them: past that the
/// longest idle bucket is forgotten (it was full anyway, or nearly).
pub struct RateLimiter {
    buckets: Mutex<BTreeMap<String, Bucket>>,
    rate_per_second: f64,
    burst: f64,
    clients_tracked_max: usize,
}

impl RateLimiter {
    pub fn new(rate_per_second: f64, burst: f64, clients_tracked_max: usize) -> RateLimiter {
        assert!(rate_per_second > 0.0 && burst >= 1.0 && clients_tracked_max > 0);
        RateLimiter { buckets: Mutex::new(BTreeMap::new()), rate_per_second, burst, clients_tracked_max }
    }

    /// Takes a token for `client`, or says how long until one is available.
    pub fn check(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if !buckets.contains_key(client) && buckets.len() >= self.clients_tracked_max {
            let idle = buckets.iter().min_by_key(|(_, b)| b.updated).map(|(k, _)| k.clone());
            if let Some(idle) = idle {
                buckets.remove(&idle);
            }
        }
        let bucket = buckets.entry(client.to_string()).or_insert(Bucket { tokens: self.burst, updated: now });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate_per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_priorities_get_a_smaller_share_of_the_slots() {
        assert_eq!(in_flight_share(0, 1000), 500);
        assert_eq!(in_flight_share(3, 1000), 500);
        assert_eq!(in_flight_share(5, 1000), 800);
        assert_eq!(in_flight_share(7, 1000), 1000);
        assert_eq!(in_flight_share(9, 1000), 1000);
        for max in [1, 2, 10, 1024] {
            for priority in 0..9 {
                assert!(in_flight_share(priority, max) <= in_flight_share(priority + 1, max));
            }
        }
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Feeds one interval of ten latencies of `latency_ms`, `busy` in
    /// flight, the last at its end, and returns the bound judged then.
    fn interval(limit: &AdaptiveLimit, now: &mut Instant, latency_ms: u64, busy: usize) -> usize {
        for _ in 0..9 {
            limit.observe(ms(latency_ms), busy, *now);
        }
        *now += LIMIT_INTERVAL;
        limit.observe(ms(latency_ms), busy, *now);
        limit.limit()
    }

    #[test]
    fn delay_past_the_target_cuts_the_bound_in_proportion_down_to_the_floor() {
        let mut now = Instant::now();
        let limit = AdaptiveLimit::new(1024, Some(ms(100)), now);
        // Unloaded: 2 ms, the bound in use: it stays at its ceiling.
        assert_eq!(interval(&limit, &mut now, 2, 1000), 1024);
        // 402 ms: 400 ms of delay past the 2 ms base, four times the target.
        assert_eq!(interval(&limit, &mut now, 402, 1000), 256);
        // Never more than a quarter at once, never below the floor.
        assert_eq!(interval(&limit, &mut now, 2_000, 256), 64);
        assert_eq!(interval(&limit, &mut now, 2_000, 64), 16);
        assert_eq!(interval(&limit, &mut now, 2_000, 16), LIMIT_FLOOR);
    }

    #[test]
    fn the_bound_grows_back_while_in_use_and_not_while_idle() {
        let mut now = Instant::now();
        let limit = AdaptiveLimit::new(100, Some(ms(50)), now);
        assert_eq!(interval(&limit, &mut now, 1, 100), 100);
        assert_eq!(interval(&limit, &mut now, 500, 100), 25);
        // Fast again but only a few requests in flight: no reason to grow.
        assert_eq!(interval(&limit, &mut now, 1, 3), 25);
        // Half of it in use: a tenth more per interval, up to the ceiling.
        assert_eq!(interval(&limit, &mut now, 1, 13), 27);
        let mut bound = 27;
        for _ in 0..40 {
            bound = interval(&limit, &mut now, 1, bound);
        }
        assert_eq!(bound, 100);
    }

    #[test]
    fn a_slow_disk_is_not_overload_and_no_target_keeps_the_ceiling() {
        let mut now = Instant::now();
        // Every request takes 300 ms, from the start: no delay past the base.
        let limit = AdaptiveLimit::new(1024, Some(ms(100)), now);
        for _ in 0..5 {
            assert_eq!(interval(&limit, &mut now, 300, 1024), 1024);
        }
        let fixed = AdaptiveLimit::new(1024, None, now);
        assert_eq!(interval(&fixed, &mut now, 5_000, 1024), 1024);
        // Too few latencies, or too soon: no judgment yet.
        let limit = AdaptiveLimit::new(1024, Some(ms(100)), now);
        interval(&limit, &mut now, 1, 1024);
        now += LIMIT_INTERVAL;
        for _ in 0..WINDOW_SAMPLES_MIN - 1 {
            limit.observe(ms(5_000), 1024, now);
        }
        assert_eq!(limit.limit(), 1024);
        limit.observe(ms(5_000), 1024, now);
        assert_eq!(limit.limit(), 256);
        for _ in 0..10 {
            limit.observe(ms(5_000), 1024, now + ms(50));
        }
        assert_eq!(limit.limit(), 256, "judged at most once per interval");
    }

    #[test]
    fn bucket_refuses_past_burst_and_refills_at_rate() {
        let limiter = RateLimiter::new(10.0, 3.0, 2);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", start).is_ok());
        }
        let wait = limiter.check("a", start).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another client has its own bucket.
        assert!(limiter.check("b", start).is_ok());
        assert!(limiter.check("a", start + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn tracked_clients_are_bounded() {
        let limiter = RateLimiter::new(1.0, 1.0, 2);
        let now = Instant::now();
        for client in ["a", "b", "c", "d"] {
            assert!(limiter.check(client, now).is_ok());
        }
        assert_eq!(limiter.buckets.lock().unwrap().len(), 2);
    }
}
