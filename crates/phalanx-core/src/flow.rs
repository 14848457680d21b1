//! Flow control's records and its arithmetic: per-key limits (concurrency,
//! a token bucket in log time, tokens per minute, a weight for fair
//! dispatch), what a key has used, reported usage and tree budgets, pauses,
//! and per-queue retry policy.
//!
//! Plain data and pure functions of log time; the state machine
//! (`state.rs` and `state/flow.rs`) decides with them. All arithmetic is in
//! integers (thousandths of a grant for the bucket) so that every replica
//! computes the same figures, and saturates: limits are bounded, but log
//! time and usage sums are not compared against anything that could wrap.

use serde::{Deserialize, Serialize};

/// The most one usage figure (tokens in, tokens out, cost) or one cost
/// estimate may be: far above any real report, far below `u64::MAX`, so
/// that sums over a tree cannot wrap.
pub const USAGE_VALUE_MAX: u64 = 1_000_000_000_000;

/// Bounds of the fields of `KeyLimits` (inclusive).
pub const CONCURRENCY_MAX_BOUND: u32 = 1_000_000;
/// Thousandths of a grant per second: 1 is one grant per 1000 s, the top is
/// a million grants per second.
pub const RATE_PER_SECOND_MILLI_BOUND: u64 = 1_000_000_000;
pub const BURST_BOUND: u32 = 1_000_000;
pub const WEIGHT_BOUND: u32 = 1_000;
pub const TOKENS_PER_MINUTE_BOUND: u64 = USAGE_VALUE_MAX;
/// A bucket must refill from empty within this much log time: an idle
/// key's record is kept until its bucket is full again, so this bounds
/// how long a key nobody uses stays in the state.
pub const BUCKET_REFILL_MS_MAX: u64 = 24 * 3600 * 1000;

/// The tokens-per-minute window is kept in slots of this many ms; the
/// window is the last `WINDOW_SLOTS` slots (so it slides in 10 s steps).
pub const WINDOW_SLOT_MS: u64 = 10_000;
pub const WINDOW_SLOTS: u64 = 6;

/// The limits of one concurrency key, or of every key matching a wildcard
/// (`tenant:*` applies to each distinct key starting `tenant:`, separately).
/// Every field is optional; an absent one does not limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// Leases held at once on tasks of the key.
    #[serde(default)]
    pub concurrency_max: Option<u32>,
    /// Grants per second in thousandths (1500 = 1.5 grants per second): a
    /// token bucket refilled in log time. The API speaks `rate_per_second`
    /// as a decimal and converts.
    #[serde(default)]
    pub rate_per_second_milli: Option<u64>,
    /// The bucket's size in grants (only with a rate). Default: one
    /// second's worth of the rate, at least one.
    #[serde(default)]
    pub burst: Option<u32>,
    /// The key's share in fair dispatch within a priority band (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Tokens (in + out) per minute: the window's reported usage plus the
    /// cost estimates of the key's leased tasks stay within it.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl KeyLimits {
    /// Bounds and cross-field rules; names the offending field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        fn within(field: &'static str, value: u64, max: u64) -> Result<(), (&'static str, String)> {
            if value == 0 || value > max {
                return Err((field, format!("{value} must be 1..={max}")));
            }
            Ok(())
        }
        if let Some(value) = self.concurrency_max {
            within("concurrency_max", value.into(), CONCURRENCY_MAX_BOUND.into())?;
        }
        if let Some(value) = self.rate_per_second_milli {
            within("rate_per_second_milli", value, RATE_PER_SECOND_MILLI_BOUND)?;
        }
        if let Some(value) = self.burst {
            within("burst", value.into(), BURST_BOUND.into())?;
            if self.rate_per_second_milli.is_none() {
                return Err(("burst", "is the size of a rate's bucket: set rate_per_second too".into()));
            }
        }
        if let Some(value) = self.weight {
            within("weight", value.into(), WEIGHT_BOUND.into())?;
        }
        if let Some(value) = self.tokens_per_minute {
            within("tokens_per_minute", value, TOKENS_PER_MINUTE_BOUND)?;
        }
        if let Some(rate) = self.rate_per_second_milli {
            let refill_ms = self.bucket_milli() * 1000 / rate;
            if refill_ms > BUCKET_REFILL_MS_MAX {
                return Err((
                    "burst",
                    format!(
                        "a bucket of {} grants at this rate takes {refill_ms} ms to refill, over {BUCKET_REFILL_MS_MAX}",
                        self.bucket_milli() / 1000
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }

    /// The bucket's capacity in thousandths of a grant (0 without a rate).
    pub fn bucket_milli(&self) -> u64 {
        let Some(rate) = self.rate_per_second_milli else { return 0 };
        let burst = self.burst.map_or(rate.div_ceil(1000).max(1), u64::from);
        burst * 1000
    }
}

/// A key of the limits table: a concurrency key, or a prefix followed by
/// `*` (a wildcard default; `*` alone matches every key).
pub fn wildcard_prefix(rule: &str) -> Option<&str> {
    rule.strip_suffix('*')
}

/// Which limit holds a task back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    ConcurrencyMax,
    RatePerSecond,
    TokensPerMinute,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ConcurrencyMax => "concurrency_max",
            Limit::RatePerSecond => "rate_per_second",
            Limit::TokensPerMinute => "tokens_per_minute",
        }
    }
}

/// Why a pending task is not granted although it is ready: its key and the
/// limit it is over (`State::waiting_on`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingOn {
    pub key: String,
    pub limit: Limit,
    /// The table's entry that set the limit (the key itself or a wildcard).
    pub rule: String,
}

/// What one concurrency key uses now. `held`, `leased_estimate` and
/// `open_tasks` follow from the tasks (checked by `check_invariants`); the
/// bucket and the window are history, and replicated as such.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Leases held now on tasks of the key.
    pub held: u32,
    /// Cost estimates (tokens) of those leases.
    pub leased_estimate: u64,
    /// Tasks of the key that have not finished (pending, leased, paused).
    pub open_tasks: u64,
    /// The token bucket in thousandths of a grant, as of `refilled_ms`;
    /// `None` is full (a key that has never been limited by rate).
    pub bucket_milli: Option<u64>,
    pub refilled_ms: u64,
    /// Tokens reported per window slot: (log time / `WINDOW_SLOT_MS`,
    /// tokens), oldest first, at most `WINDOW_SLOTS` of them.
    pub window: Vec<(u64, u64)>,
    /// With no open task left: from when the record may go (its bucket is
    /// full and its window empty by then).
    pub idle_from_ms: Option<u64>,
}

impl KeyUsage {
    /// The bucket at `now_ms`, refilled at the key's rate up to its size.
    pub fn bucket_at(&self, limits: &KeyLimits, now_ms: u64) -> u64 {
        let capacity = limits.bucket_milli();
        let Some(rate) = limits.rate_per_second_milli else { return capacity };
        let Some(bucket) = self.bucket_milli else { return capacity };
        let elapsed = now_ms.saturating_sub(self.refilled_ms);
        bucket.saturating_add(elapsed.saturating_mul(rate) / 1000).min(capacity)
    }

    /// Log time at which the bucket holds one whole grant again (`now_ms`
    /// if it does already).
    pub fn next_grant_ms(&self, limits: &KeyLimits, now_ms: u64) -> u64 {
        let bucket = self.bucket_at(limits, now_ms);
        match limits.rate_per_second_milli {
            Some(rate) if bucket < 1000 => now_ms.saturating_add(((1000 - bucket) * 1000).div_ceil(rate)),
            _ => now_ms,
        }
    }

    /// Takes one grant from the bucket (the caller saw one there).
    pub fn take_grant(&mut self, limits: &KeyLimits, now_ms: u64) {
        if limits.rate_per_second_milli.is_none() {
            return;
        }
        let bucket = self.bucket_at(limits, now_ms);
        assert!(bucket >= 1000, "a grant is taken only from a bucket that holds one");
        self.bucket_milli = Some(bucket - 1000);
        self.refilled_ms = now_ms;
    }

    /// Tokens reported within the window ending at `now_ms`.
    pub fn window_tokens(&self, now_ms: u64) -> u64 {
        let first = (now_ms / WINDOW_SLOT_MS).saturating_sub(WINDOW_SLOTS - 1);
        self.window.iter().filter(|(slot, _)| *slot >= first).map(|(_, tokens)| *tokens).fold(0, u64::saturating_add)
    }

    /// Records reported tokens at `now_ms`, dropping slots out of the window.
    pub fn add_tokens(&mut self, now_ms: u64, tokens: u64) {
        let slot = now_ms / WINDOW_SLOT_MS;
        let first = slot.saturating_sub(WINDOW_SLOTS - 1);
        self.window.retain(|(at, _)| *at >= first);
        match self.window.last_mut() {
            Some((at, sum)) if *at >= slot => *sum = sum.saturating_add(tokens),
            _ => self.window.push((slot, tokens)),
        }
        assert!(self.window.len() as u64 <= WINDOW_SLOTS);
    }

    /// When the record of a key with no open task may go: once its bucket
    /// is full again and its last reported tokens have left the window.
    pub fn idle_from(&self, limits: &KeyLimits, now_ms: u64) -> u64 {
        let full = match (limits.rate_per_second_milli, self.bucket_milli) {
            (Some(rate), Some(_)) => {
                let missing = limits.bucket_milli() - self.bucket_at(limits, now_ms);
                now_ms.saturating_add((missing * 1000).div_ceil(rate))
            }
            _ => now_ms,
        };
        let window_end = self.window.last().map_or(0, |(slot, _)| (slot + WINDOW_SLOTS) * WINDOW_SLOT_MS);
        full.max(window_end)
    }

    /// Whether a task of estimate `estimate` fits the tokens-per-minute
    /// limit now. A task whose estimate alone passes the limit is admitted
    /// when the key has nothing leased and nothing in its window, or it
    /// would never run.
    pub fn admits_tokens(&self, tokens_per_minute: u64, estimate: u64, now_ms: u64) -> bool {
        let committed = self.window_tokens(now_ms).saturating_add(self.leased_estimate);
        if committed == 0 {
            return true;
        }
        let total = committed.saturating_add(estimate);
        total <= tokens_per_minute && (estimate > 0 || committed < tokens_per_minute)
    }
}

/// What an attempt reports it consumed. `cost` is an integer in a unit the
/// fleet chooses (micro-dollars, say); tokens are the provider's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    #[serde(default)]
    pub cost: u64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    pub fn add(&mut self, other: &Usage) {
        self.tokens_in = self.tokens_in.saturating_add(other.tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(other.tokens_out);
        self.cost = self.cost.saturating_add(other.cost);
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [("tokens_in", self.tokens_in), ("tokens_out", self.tokens_out), ("cost", self.cost)] {
            if value > USAGE_VALUE_MAX {
                return Err((field, format!("{value} is over {USAGE_VALUE_MAX}")));
            }
        }
        Ok(())
    }
}

/// What a delegation tree may consume, carried by its root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default)]
    pub tokens_max: Option<u64>,
    #[serde(default)]
    pub cost_max: Option<u64>,
}

impl Budget {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [("tokens_max", self.tokens_max), ("cost_max", self.cost_max)] {
            if let Some(value) = value {
                if value == 0 || value > USAGE_VALUE_MAX {
                    return Err((field, format!("{value} must be 1..={USAGE_VALUE_MAX}")));
                }
            }
        }
        Ok(())
    }

    /// Why `used` has reached this budget, if it has.
    pub fn exhausted_by(&self, used: &Usage) -> Option<String> {
        if let Some(max) = self.tokens_max.filter(|max| used.tokens() >= *max) {
            return Some(format!("budget: {} tokens used of tokens_max {max}", used.tokens()));
        }
        if let Some(max) = self.cost_max.filter(|max| used.cost >= *max) {
            return Some(format!("budget: cost {} used of cost_max {max}", used.cost));
        }
        None
    }
}

/// Why a task is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// Its tree's budget is exhausted; resumed when the budget is raised.
    Budget,
    /// An operator's `Pause`.
    Operator,
    /// It used its attempts and its queue's policy says `on_exhausted: pause`.
    AttemptsExhausted,
}

/// A pause in force (state `paused`), or asked for a leased task (which
/// runs to the end of its lease and is paused if it comes back to pending).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub cause: PauseCause,
    pub reason: String,
    pub since_ms: u64,
}

/// What happens to a task that used all its attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Dead-lettered (`attempts_exhausted`), as before queues had a policy.
    #[default]
    Dead,
    /// Paused, for an operator to resume or replay.
    Pause,
}

/// One queue's retry policy; an absent field falls back to the policy's
/// global value (`retry_backoff_ms_base`, `retry_backoff_ms_max`) or, for
/// `max_attempts`, to the task's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePolicy {
    #[serde(default)]
    pub retry_backoff_ms_base: Option<u64>,
    #[serde(default)]
    pub retry_backoff_ms_max: Option<u64>,
    /// A cap on the attempts of the queue's tasks: a task submitted with
    /// fewer keeps its own (a task sent with one attempt may have side
    /// effects that must not repeat).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

/// Deficit round robin within one priority band of one queue. Every key is
/// granted `weight` tasks per round; only the key being served (`cursor`)
/// can have credit left (`deficit`), every other key is reset as the round
/// passes it, so the whole scheduler state of a band is these two fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drr {
    pub cursor: String,
    pub deficit: u32,
}

/// A key's usage as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    pub key: String,
    /// The limits in force and the table entry they come from, if any.
    pub rule: Option<String>,
    pub limits: Option<KeyLimits>,
    pub held: u32,
    /// Whole grants left in the bucket now (`None`: no rate limit).
    pub rate_tokens_left: Option<u64>,
    /// Tokens reported within the last minute.
    pub tokens_in_window: u64,
    /// Cost estimates of the key's leased tasks.
    pub leased_estimate: u64,
    pub open_tasks: u64,
}
