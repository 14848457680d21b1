//! Admission control at the door of every node: per-client token buckets and
//! request deadlines. Refusals are cheap and immediate (429 or 503 with
//! `Retry-After`), never a timeout.
//!
//! The proposal queue's own bound and the shedding of low priorities first
//! live in `proposer.rs`; per-queue depth (`queue_tasks_max`) is decided by
//! the replicated state.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
