//! Flow control inside the state machine: which ready task of a queue is
//! granted next (strict priority bands, then deficit round robin over
//! concurrency keys by weight, every key's limits gating), what each key
//! holds and has used, usage reports and tree budgets, and the pause,
//! resume, replay and budget commands.
//!
//! The records and the arithmetic are in `crate::flow`; the indexes the
//! grant path reads (`fair_ready`, by queue, band and key) are kept by
//! `ready_insert` and `ready_remove` in `state.rs`, so a grant looks at the
//! keys of one band, never at every pending task. A key over a limit is
//! passed over at the cost of one look at its record; only the head of a
//! key's line is judged (a key's tasks stay in order).

use super::{invalid, validate_name, Error, State};
use crate::command::Outcome;
use crate::flow::{
    wildcard_prefix, Budget, Drr, KeyLimits, KeyStatus, KeyUsage, Limit, OnExhausted, Pause, PauseCause, Usage,
    WaitingOn, WINDOW_SLOT_MS,
};
use crate::task::{Task, TaskState};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Excluded, Included, Unbounded};

/// The task a band's round grants next, and how the round moves.
pub(super) struct Turn {
    pub band: u8,
    pub task_id: u64,
    key: String,
    /// The key being served goes on with its credit (else the round moves to it).
    continuing: bool,
}

impl State {
    // ---- the limits table ----

    /// The limits in force for a concurrency key, and the table's entry
    /// they come from: the key's own, else the longest wildcard matching it.
    pub fn limits_of_key(&self, key: &str) -> Option<(&str, &KeyLimits)> {
        if key.is_empty() || self.key_limits.is_empty() {
            return None;
        }
        if let Some((rule, limits)) = self.key_limits.get_key_value(key) {
            return Some((rule, limits));
        }
        let mut rule = String::with_capacity(key.len() + 1);
        for end in (0..=key.len()).rev().filter(|end| key.is_char_boundary(*end)) {
            rule.clear();
            rule.push_str(&key[..end]);
            rule.push('*');
            if let Some((rule, limits)) = self.key_limits.get_key_value(&rule) {
                return Some((rule, limits));
            }
        }
        None
    }

    /// The limits table, entry by entry.
    pub fn key_limits(&self) -> &BTreeMap<String, KeyLimits> {
        &self.key_limits
    }

    pub(super) fn check_set_key_limits(&self, key: &str, limits: &KeyLimits) -> Result<(), Error> {
        match wildcard_prefix(key) {
            // `*` alone is every key's default.
            Some("") => {}
            Some(prefix) => validate_name("key", prefix, self.limits.id_bytes_max.saturating_sub(1))?,
            None => validate_name("key", key, self.limits.id_bytes_max)?,
        }
        limits.validate().map_err(|(field, reason)| invalid(field, reason))?;
        if !self.key_limits.contains_key(key) && self.key_limits.len() >= self.limits.limit_keys_max {
            return Err(Error::LimitReached { limit: "limit_keys_max".into(), max: self.limits.limit_keys_max as u64 });
        }
        Ok(())
    }

    pub(super) fn check_delete_key_limits(&self, key: &str) -> Result<(), Error> {
        if !self.key_limits.contains_key(key) {
            return Err(Error::LimitsNotFound { key: key.to_string() });
        }
        Ok(())
    }

    // ---- dispatch ----

    /// Whether a key's limits let its task be granted now, or the limit
    /// that holds it back and the table's entry that set it.
    fn admits(&self, key: &str, task: &Task) -> Result<(), (Limit, &str)> {
        let Some((rule, limits)) = self.limits_of_key(key) else { return Ok(()) };
        let default = KeyUsage::default();
        let usage = self.key_usage.get(key).unwrap_or(&default);
        if limits.concurrency_max.is_some_and(|max| usage.held >= max) {
            return Err((Limit::ConcurrencyMax, rule));
        }
        if limits.rate_per_second_milli.is_some() && usage.bucket_at(limits, self.now_ms) < 1000 {
            return Err((Limit::RatePerSecond, rule));
        }
        if let Some(tokens_per_minute) = limits.tokens_per_minute {
            if !usage.admits_tokens(tokens_per_minute, task.cost_estimate().unwrap_or(0), self.now_ms) {
                return Err((Limit::TokensPerMinute, rule));
            }
        }
        Ok(())
    }

    /// The first task of a key's line that this entry may grant (not one it
    /// granted and lost again), if the key's limits let it go.
    fn eligible(&self, key: &str, ids: &BTreeSet<u64>, index: u64) -> Option<u64> {
        let id = ids.iter().copied().find(|id| self.tasks[id].last_fence < index)?;
        self.admits(key, &self.tasks[&id]).ok()?;
        Some(id)
    }

    /// Deficit round robin in one band: the key being served goes on while
    /// it has credit; then the next key in key order (wrapping round) that
    /// may be granted gets its weight's worth. Keys passed over (over a
    /// limit) lose any credit, so only the key served can hold some.
    fn band_turn(&self, queue: &str, band: u8, keys: &BTreeMap<String, BTreeSet<u64>>, index: u64) -> Option<Turn> {
        let round = self.drr.get(queue).and_then(|rounds| rounds.get(&band));
        let turn = |key: &str, task_id: u64, continuing: bool| Turn { band, task_id, key: key.to_string(), continuing };
        if let Some(round) = round.filter(|round| round.deficit > 0) {
            if let Some(id) = keys.get(&round.cursor).and_then(|ids| self.eligible(&round.cursor, ids, index)) {
                return Some(turn(&round.cursor, id, true));
            }
        }
        let after: Box<dyn Iterator<Item = (&String, &BTreeSet<u64>)>> = match round {
            Some(round) => {
                let cursor = round.cursor.as_str();
                Box::new(
                    keys.range::<str, _>((Excluded(cursor), Unbounded))
                        .chain(keys.range::<str, _>((Unbounded, Included(cursor)))),
                )
            }
            None => Box::new(keys.iter()),
        };
        for (key, ids) in after {
            if let Some(id) = self.eligible(key, ids, index) {
                return Some(turn(key, id, false));
            }
        }
        None
    }

    /// The task of `queue` to grant next: the first band (highest priority)
    /// with a task its key lets go, and in it the round's turn.
    pub(super) fn queue_candidate(&self, queue: &str, index: u64) -> Option<Turn> {
        let bands = self.fair_ready.get(queue)?;
        bands.iter().find_map(|(band, keys)| self.band_turn(queue, *band, keys, index))
    }

    /// Moves the band's round past a grant.
    pub(super) fn take_turn(&mut self, queue: &str, turn: &Turn) {
        let weight = self.limits_of_key(&turn.key).map_or(1, |(_, limits)| limits.weight());
        let round = self.drr.entry(queue.to_string()).or_default().entry(turn.band).or_default();
        if turn.continuing {
            round.deficit -= 1;
        } else {
            *round = Drr { cursor: turn.key.clone(), deficit: weight - 1 };
        }
    }

    /// Whether a queue has a ready task that its key lets go now.
    pub(super) fn queue_has_eligible(&self, queue: &str) -> bool {
        self.eligible_count(queue, 1) > 0
    }

    /// How many grants a key's concurrency and rate leave now (`None`: no
    /// limit); tokens per minute depend on each task's estimate, so a key
    /// with that limit counts one.
    fn grants_left(&self, key: &str) -> Option<u64> {
        let (_, limits) = self.limits_of_key(key)?;
        let default = KeyUsage::default();
        let usage = self.key_usage.get(key).unwrap_or(&default);
        let mut left = u64::MAX;
        if let Some(max) = limits.concurrency_max {
            left = left.min(u64::from(max.saturating_sub(usage.held)));
        }
        if limits.rate_per_second_milli.is_some() {
            left = left.min(usage.bucket_at(limits, self.now_ms) / 1000);
        }
        if limits.tokens_per_minute.is_some() {
            left = left.min(1);
        }
        Some(left)
    }

    /// Up to `enough` of a queue's ready tasks that could be granted now,
    /// each key counting what its limits leave (an estimate: applying may
    /// grant fewer).
    pub(super) fn eligible_count(&self, queue: &str, enough: u32) -> u32 {
        let mut count: u32 = 0;
        let Some(bands) = self.fair_ready.get(queue) else { return 0 };
        for keys in bands.values() {
            for (key, ids) in keys {
                if count >= enough {
                    return count;
                }
                if self.eligible(key, ids, u64::MAX).is_none() {
                    continue;
                }
                let add = self.grants_left(key).map_or(ids.len() as u64, |left| left.min(ids.len() as u64));
                count = count.saturating_add(add.min(u64::from(u32::MAX)) as u32);
            }
        }
        count.min(enough)
    }

    /// Why a pending task is not granted although it is ready: its key and
    /// the limit it is over. `None` for a task that is not pending and ready,
    /// has no key, or whose key lets it go (it waits for an agent).
    pub fn waiting_on(&self, task_id: u64) -> Option<WaitingOn> {
        let task = self.tasks.get(&task_id)?;
        if task.state != TaskState::Pending || !self.ready.get(&task.queue)?.contains(&(9 - task.priority, task_id)) {
            return None;
        }
        let key = task.concurrency_key()?;
        let (limit, rule) = self.admits(key, task).err()?;
        Some(WaitingOn { key: key.to_string(), limit, rule: rule.to_string() })
    }

    /// The next log time at which a key held back by its rate or its tokens
    /// per minute may be granted again (only keys with tasks not leased).
    pub(super) fn next_key_due_ms(&self) -> Option<u64> {
        let now = self.now_ms;
        let mut due: Option<u64> = None;
        for (key, usage) in &self.key_usage {
            if usage.open_tasks <= u64::from(usage.held) {
                continue;
            }
            let Some((_, limits)) = self.limits_of_key(key) else { continue };
            let mut at = None;
            if limits.rate_per_second_milli.is_some() {
                at = Some(usage.next_grant_ms(limits, now)).filter(|at| *at > now);
            }
            if limits.tokens_per_minute.is_some() && !usage.window.is_empty() {
                let next_slot = (now / WINDOW_SLOT_MS + 1) * WINDOW_SLOT_MS;
                at = Some(at.map_or(next_slot, |at: u64| at.min(next_slot)));
            }
            if let Some(at) = at {
                due = Some(due.map_or(at, |due| due.min(at)));
            }
        }
        due
    }

    // ---- what each key holds and has used ----

    pub(super) fn key_opened(&mut self, key: &str) {
        let usage = self.key_usage.entry(key.to_string()).or_default();
        usage.open_tasks += 1;
        if let Some(at) = usage.idle_from_ms.take() {
            self.key_idle.remove(&(at, key.to_string()));
        }
    }

    /// The key's last open task finished: its record goes once its bucket
    /// is full and its window empty (sooner, a new task could pass the rate).
    pub(super) fn key_closed(&mut self, key: &str) {
        let limits = self.limits_of_key(key).map(|(_, limits)| limits.clone()).unwrap_or_default();
        let now = self.now_ms;
        let usage = self.key_usage.get_mut(key).expect("an open task's key has a record");
        usage.open_tasks -= 1;
        if usage.open_tasks == 0 {
            let at = usage.idle_from(&limits, now);
            usage.idle_from_ms = Some(at);
            self.key_idle.insert((at, key.to_string()));
        }
    }

    /// Drops the records of keys idle long enough (judged again under the
    /// limits in force now, which may have changed since).
    pub(super) fn forget_idle_keys(&mut self) {
        let now = self.now_ms;
        // Strictly after `at`, as every timer here: an entry at the same log
        // time as the last one changes nothing by time alone.
        while let Some((at, key)) = self.key_idle.first().cloned() {
            if at >= now {
                break;
            }
            self.key_idle.pop_first();
            let limits = self.limits_of_key(&key).map(|(_, limits)| limits.clone()).unwrap_or_default();
            let usage = self.key_usage.get_mut(&key).expect("an idle key has a record");
            let later = usage.idle_from(&limits, now);
            if later >= now {
                usage.idle_from_ms = Some(later);
                self.key_idle.insert((later, key));
            } else {
                self.key_usage.remove(&key);
            }
        }
    }

    pub(super) fn key_granted(&mut self, task_id: u64) {
        let task = &self.tasks[&task_id];
        let Some(key) = task.concurrency_key().map(str::to_string) else { return };
        let estimate = task.cost_estimate().unwrap_or(0);
        let limits = self.limits_of_key(&key).map(|(_, limits)| limits.clone());
        let now = self.now_ms;
        let usage = self.key_usage.get_mut(&key).expect("an open task's key has a record");
        usage.held += 1;
        usage.leased_estimate += estimate;
        if let Some(limits) = limits {
            usage.take_grant(&limits, now);
        }
    }

    /// What a key holds and has used now, as status shows it.
    pub fn key_status(&self, key: &str) -> Option<KeyStatus> {
        let usage = self.key_usage.get(key);
        let found = self.limits_of_key(key);
        if usage.is_none() && found.is_none() {
            return None;
        }
        let default = KeyUsage::default();
        let usage = usage.unwrap_or(&default);
        let rate_tokens_left = found
            .filter(|(_, limits)| limits.rate_per_second_milli.is_some())
            .map(|(_, limits)| usage.bucket_at(limits, self.now_ms) / 1000);
        Some(KeyStatus {
            key: key.to_string(),
            rule: found.map(|(rule, _)| rule.to_string()),
            limits: found.map(|(_, limits)| limits.clone()),
            held: usage.held,
            rate_tokens_left,
            tokens_in_window: usage.window_tokens(self.now_ms),
            leased_estimate: usage.leased_estimate,
            open_tasks: usage.open_tasks,
        })
    }

    /// Every key in use (or recently used), in key order.
    pub fn key_statuses(&self) -> Vec<KeyStatus> {
        self.key_usage.keys().filter_map(|key| self.key_status(key)).collect()
    }

    // ---- usage and budgets ----

    /// Adds an attempt's reported usage to its task, its key's window and
    /// its tree; a tree that reaches its budget is paused.
    pub(super) fn record_usage(&mut self, task_id: u64, usage: &Usage) {
        if usage.is_zero() {
            return;
        }
        let now = self.now_ms;
        let task = self.tasks.get_mut(&task_id).expect("checked: the task exists");
        task.extra_mut().usage.add(usage);
        if let Some(key) = task.concurrency_key() {
            let record = self.key_usage.get_mut(key).expect("an open task's key has a record");
            record.add_tokens(now, usage.tokens());
        }
        let root = self.root_of(task_id);
        self.tree_usage.entry(root).or_default().add(usage);
        if let Some(reason) = self.budget_exhausted(root) {
            self.pause_tree(root, &reason);
        }
    }

    /// Why the tree under `root` may not go on, if its budget is reached.
    pub fn budget_exhausted(&self, root: u64) -> Option<String> {
        let budget = *self.tasks.get(&root)?.budget()?;
        budget.exhausted_by(self.tree_usage.get(&root).unwrap_or(&Usage::default()))
    }

    /// What the tree under `root` has reported it consumed.
    pub fn tree_usage(&self, root: u64) -> Usage {
        self.tree_usage.get(&root).copied().unwrap_or_default()
    }

    /// Usage of every tree that reported some, by root.
    pub fn tree_usages(&self) -> &BTreeMap<u64, Usage> {
        &self.tree_usage
    }

    /// The root of a task's delegation tree (the task itself for a root).
    pub fn root_of_task(&self, task_id: u64) -> Option<u64> {
        self.tasks.contains_key(&task_id).then(|| self.root_of(task_id))
    }

    /// Pauses the pending tasks of a tree (its leased ones run on, and are
    /// paused if they come back to pending while the budget is exhausted).
    fn pause_tree(&mut self, root: u64, reason: &str) {
        for id in self.tree(root) {
            if self.tasks[&id].state == TaskState::Pending {
                self.pause_pending(id, PauseCause::Budget, reason.to_string());
            }
        }
    }

    /// A pending task (ready, delayed, or just released) to paused.
    pub(super) fn pause_pending(&mut self, task_id: u64, cause: PauseCause, reason: String) {
        self.remove_ready(task_id);
        let now = self.now_ms;
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        assert_eq!(task.state, TaskState::Pending, "only a pending task is paused");
        assert!(task.lease.is_none());
        task.state = TaskState::Paused;
        task.extra_mut().pause = Some(Pause { cause, reason, since_ms: now });
        task.updated_ms = now;
        self.counters.paused += 1;
    }

    /// A paused task (or one just replayed) back to pending.
    fn unpause(&mut self, task_id: u64, fresh_attempts: bool) {
        let task = self.tasks.get_mut(&task_id).expect("task exists");
        task.take_pause();
        task.state = TaskState::Pending;
        task.updated_ms = self.now_ms;
        if fresh_attempts {
            task.attempts = 0;
            task.not_before_ms = 0;
        }
        self.requeue(task_id);
    }

    // ---- retry policy ----

    /// The attempts a task may use: its own, capped by its queue's policy.
    pub fn max_attempts_of(&self, task: &Task) -> u32 {
        let cap = self.limits.queue_policy(&task.queue).and_then(|policy| policy.max_attempts);
        cap.map_or(task.max_attempts, |cap| cap.min(task.max_attempts))
    }

    pub(super) fn on_exhausted(&self, queue: &str) -> OnExhausted {
        self.limits.queue_policy(queue).map_or(OnExhausted::Dead, |policy| policy.on_exhausted)
    }

    /// A queue's backoff (base, cap), its own or the policy's global one.
    pub(super) fn backoff_of(&self, queue: &str) -> (u64, u64) {
        let policy = self.limits.queue_policy(queue);
        (
            policy.and_then(|policy| policy.retry_backoff_ms_base).unwrap_or(self.limits.retry_backoff_ms_base),
            policy.and_then(|policy| policy.retry_backoff_ms_max).unwrap_or(self.limits.retry_backoff_ms_max),
        )
    }

    // ---- pause, resume, replay, budgets ----

    /// An open task is paused at once if pending; a leased one is marked,
    /// and paused when its lease ends without a result. Pausing a paused
    /// task changes nothing.
    pub(super) fn pause(&mut self, task_id: u64) -> Outcome {
        let now = self.now_ms;
        let reason = "paused by an operator".to_string();
        match self.tasks[&task_id].state {
            TaskState::Pending => self.pause_pending(task_id, PauseCause::Operator, reason),
            TaskState::Leased => {
                let task = self.tasks.get_mut(&task_id).expect("checked");
                task.extra_mut().pause = Some(Pause { cause: PauseCause::Operator, reason, since_ms: now });
            }
            _ => {}
        }
        Outcome::Paused { task: self.tasks[&task_id].clone() }
    }

    pub(super) fn check_resume(&self, task_id: u64) -> Result<(), Error> {
        let task = self.open_task(task_id)?;
        let Some(pause) = task.pause() else {
            return Err(Error::NotPaused { task_id, state: task.state });
        };
        if task.state == TaskState::Paused && pause.cause == PauseCause::Budget {
            let root_id = self.root_of(task_id);
            if let Some(reason) = self.budget_exhausted(root_id) {
                return Err(Error::BudgetExhausted { task_id, root_id, reason });
            }
        }
        Ok(())
    }

    /// A paused task back to pending (with its attempts anew if it had
    /// used them), or a leased task's pending pause withdrawn.
    pub(super) fn resume(&mut self, task_id: u64) -> Outcome {
        let task = self.tasks.get_mut(&task_id).expect("checked");
        let cause = task.pause().as_ref().expect("checked: paused").cause;
        if task.state == TaskState::Leased {
            task.take_pause();
        } else {
            self.unpause(task_id, cause == PauseCause::AttemptsExhausted);
        }
        self.counters.resumed += 1;
        Outcome::Resumed { task: self.tasks[&task_id].clone() }
    }

    pub(super) fn check_replay(
        &self,
        queue: Option<&str>,
        state: TaskState,
        concurrency_key: Option<&str>,
        limit: u32,
    ) -> Result<(), Error> {
        if !matches!(state, TaskState::Dead | TaskState::Paused) {
            return Err(invalid("state", "replay takes dead or paused tasks"));
        }
        if limit == 0 || limit as usize > self.limits.batch_tasks_max {
            return Err(invalid("limit", format!("must be 1..={} (batch_tasks_max)", self.limits.batch_tasks_max)));
        }
        if let Some(queue) = queue {
            validate_name("queue", queue, self.limits.queue_name_bytes_max)?;
        }
        if let Some(key) = concurrency_key {
            validate_name("concurrency_key", key, self.limits.id_bytes_max)?;
        }
        Ok(())
    }

    /// The tasks a replay moves, oldest first: in the state asked, matching
    /// the filter, with no finished parent (nobody would take the result),
    /// not in a tree whose budget is exhausted, and (for dead tasks, which
    /// open again) within their queue's `queue_tasks_max`.
    fn replay_candidates(
        &self,
        queue: Option<&str>,
        state: TaskState,
        concurrency_key: Option<&str>,
        since_ms: Option<u64>,
        limit: u32,
    ) -> Vec<u64> {
        let mut opened: BTreeMap<&str, u64> = BTreeMap::new();
        let mut chosen = Vec::new();
        for task in self.tasks.values() {
            if chosen.len() >= limit as usize {
                break;
            }
            let matches = task.state == state
                && queue.is_none_or(|queue| task.queue == queue)
                && concurrency_key.is_none_or(|key| task.concurrency_key() == Some(key))
                && since_ms.is_none_or(|since| task.updated_ms >= since);
            if !matches {
                continue;
            }
            let parent_finished = task
                .parent_id()
                .and_then(|parent| self.tasks.get(&parent))
                .is_some_and(|parent| parent.state.is_terminal());
            if parent_finished || self.budget_exhausted(self.root_of(task.id)).is_some() {
                continue;
            }
            if state == TaskState::Dead {
                let open = self.open_per_queue.get(&task.queue).copied().unwrap_or(0);
                let more = opened.entry(&task.queue).or_default();
                if open + *more >= self.limits.queue_tasks_max as u64 {
                    continue;
                }
                *more += 1;
            }
            chosen.push(task.id);
        }
        chosen
    }

    pub(super) fn replay(
        &mut self,
        queue: Option<&str>,
        state: TaskState,
        concurrency_key: Option<&str>,
        since_ms: Option<u64>,
        limit: u32,
    ) -> Outcome {
        let task_ids = self.replay_candidates(queue, state, concurrency_key, since_ms, limit);
        for &task_id in &task_ids {
            if self.tasks[&task_id].state == TaskState::Dead {
                self.reopen(task_id);
            }
            let task = self.tasks.get_mut(&task_id).expect("a candidate exists");
            task.extra_mut().replays += 1;
            self.unpause(task_id, true);
            self.counters.replayed += 1;
        }
        Outcome::Replayed { task_ids }
    }

    /// A dead task open again (for replay): out of `finished`, counted in
    /// its queue, its tree and its key again, its deadline dropped if it
    /// has passed (replaying is asking for the work after all).
    fn reopen(&mut self, task_id: u64) {
        let now = self.now_ms;
        let root = self.root_of(task_id);
        if !self.tree_open.contains_key(&root) {
            // The whole tree had finished: retention may no longer take it.
            let tree = self.tree(root);
            let finished_ms = tree.iter().map(|id| self.tasks[id].updated_ms).max().expect("a tree has a root");
            assert!(self.compactable.remove(&(finished_ms, root)), "a finished tree is compactable");
            self.compactable_tasks -= tree.len() as u64;
        }
        *self.tree_open.entry(root).or_default() += 1;
        let task = self.tasks.get_mut(&task_id).expect("a candidate exists");
        assert_eq!(task.state, TaskState::Dead);
        assert!(self.finished.remove(&(task.updated_ms, task_id)), "a finished task is indexed");
        task.state = TaskState::Pending;
        task.extra_mut().dead_reason = None;
        task.updated_ms = now;
        match task.deadline_ms {
            Some(deadline) if deadline >= now => {
                self.deadlines.insert((deadline, task_id));
            }
            Some(_) => task.deadline_ms = None,
            None => {}
        }
        *self.open_per_queue.entry(task.queue.clone()).or_default() += 1;
        if let Some(key) = task.concurrency_key().map(str::to_string) {
            self.key_opened(&key);
        }
    }

    pub(super) fn check_set_budget(&self, task_id: u64, budget: Option<&Budget>) -> Result<(), Error> {
        let task = self.tasks.get(&task_id).ok_or(Error::TaskNotFound { task_id })?;
        if task.parent_id().is_some() {
            return Err(invalid("task_id", format!("task {task_id} is not a root: a budget covers a whole tree")));
        }
        if let Some(budget) = budget {
            budget.validate().map_err(|(field, reason)| invalid(&format!("budget.{field}"), reason))?;
        }
        Ok(())
    }

    /// Sets a root's budget; the tree is paused if the new budget is
    /// exhausted, or its budget-paused tasks resume if it no longer is.
    pub(super) fn set_budget(&mut self, root: u64, budget: Option<Budget>) -> Outcome {
        self.tasks.get_mut(&root).expect("checked").extra_mut().budget = budget;
        if let Some(reason) = self.budget_exhausted(root) {
            self.pause_tree(root, &reason);
            return Outcome::BudgetSet { resumed: Vec::new() };
        }
        let resumed: Vec<u64> = self
            .tree(root)
            .into_iter()
            .filter(|id| {
                let task = &self.tasks[id];
                task.state == TaskState::Paused && task.pause().as_ref().is_some_and(|p| p.cause == PauseCause::Budget)
            })
            .collect();
        for &id in &resumed {
            self.unpause(id, false);
            self.counters.resumed += 1;
        }
        Outcome::BudgetSet { resumed }
    }

    // ---- invariants ----

    /// Flow control's part of `check_invariants`: pauses and states agree,
    /// no pending task in a tree past its budget, each key's record agrees
    /// with its tasks, the rounds name bands that have ready tasks.
    pub(super) fn check_flow_invariants(&self) {
        let mut keys: BTreeMap<&str, (u32, u64, u64)> = BTreeMap::new();
        for task in self.tasks.values() {
            match task.state {
                TaskState::Paused => assert!(task.pause().is_some(), "paused task {} says why", task.id),
                TaskState::Leased => {}
                _ => assert!(task.pause().is_none(), "task {} is {:?} with a pause", task.id, task.state),
            }
            if task.state == TaskState::Pending {
                let root = self.root_of(task.id);
                assert!(self.budget_exhausted(root).is_none(), "pending task {} in a tree past its budget", task.id);
            }
            if task.budget().is_some() {
                assert!(task.parent_id().is_none(), "task {} carries a budget and is not a root", task.id);
            }
            if let Some(key) = task.concurrency_key() {
                let entry = keys.entry(key).or_default();
                if !task.state.is_terminal() {
                    entry.2 += 1;
                }
                if task.state == TaskState::Leased {
                    entry.0 += 1;
                    entry.1 += task.cost_estimate().unwrap_or(0);
                }
            }
        }
        for (key, (held, estimate, open)) in &keys {
            if *open == 0 {
                continue;
            }
            let usage = self.key_usage.get(*key).unwrap_or_else(|| panic!("key {key:?} of open tasks has a record"));
            assert_eq!((usage.held, usage.leased_estimate, usage.open_tasks), (*held, *estimate, *open), "key {key:?}");
        }
        for (key, usage) in &self.key_usage {
            assert_eq!(usage.idle_from_ms.is_some(), usage.open_tasks == 0, "key {key:?} idle exactly when unused");
            if usage.open_tasks == 0 {
                assert_eq!((usage.held, usage.leased_estimate), (0, 0), "idle key {key:?} holds nothing");
            }
            assert!(usage.window.len() as u64 <= crate::flow::WINDOW_SLOTS);
        }
        for (rule, limits) in &self.key_limits {
            assert!(limits.validate().is_ok(), "limits of {rule:?} valid");
        }
        for (queue, rounds) in &self.drr {
            for (band, round) in rounds {
                let keys = self.fair_ready.get(queue).and_then(|bands| bands.get(band));
                let keys = keys.unwrap_or_else(|| panic!("a round of queue {queue:?} band {band} without ready tasks"));
                if round.deficit > 0 {
                    assert!(keys.contains_key(&round.cursor), "credit for key {:?} with nothing ready", round.cursor);
                }
            }
        }
    }
}
