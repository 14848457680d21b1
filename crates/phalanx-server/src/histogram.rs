//! A Prometheus histogram with fixed buckets, kept in atomics: observing is
//! a few relaxed additions, cheap enough for every request and every commit.
//!
//! Owns the counting and the text of one histogram family; which durations
//! are measured, and where, is left to `metrics.rs` and the callers.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: from a fast fsync (1 ms) to the
/// longest long-poll (30 s).
pub const BUCKETS_SECONDS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last is past every bound.
    counts: [AtomicU64; BUCKETS_SECONDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS_SECONDS.iter().position(|bound| seconds <= *bound).unwrap_or(BUCKETS_SECONDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Writes the samples of this histogram (`name_bucket`, `name_sum`,
    /// `name_count`) with `labels` (`key="value"` pairs, or empty). The
    /// family's `# HELP` and `# TYPE` lines are the caller's, once per family.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = BUCKETS_SECONDS.get(i).map_or("+Inf".to_string(), |bound| bound.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let histogram = Histogram::default();
        for ms in [0, 3, 3, 40, 100_000] {
            histogram.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        histogram.render(&mut out, "x_seconds", "a=\"b\"");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"30\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{a=\"b\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_sum{a=\"b\"} 100.046\n"), "{out}");
        assert!(out.contains("x_seconds_count{a=\"b\"} 5\n"), "{out}");
    }
}
