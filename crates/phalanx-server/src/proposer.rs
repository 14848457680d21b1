//! Group commit: many HTTP requests' commands become one Raft log entry.
//!
//! Requests queue their command on a bounded channel; one loop takes what has
//! queued up (at most `batch_commands_max`), stamps it with log time (the
//! leader's `clock::LogClock`) and proposes it as one entry. Up to `proposals_in_flight_max` entries are in
//! flight at once, so while one batch waits for its fsync the next one fills:
//! the busier the node, the bigger the batches and the fewer fsyncs per task.
//!
//! Leaves forwarding to the leader to `api.rs`: a proposal on a follower
//! fails with `Error::NotLeader`.

use crate::raft_types::Raft;
use openraft::error::{ClientWriteError, RaftError};
use phalanx_core::{Command, Outcome, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("this node is not the leader")]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    #[error("too many proposals queued on this node ({0})")]
    Overloaded(usize),
    #[error("no commit within {0} ms: the outcome is unknown")]
    Timeout(u64),
    #[error("the request's deadline passed before it could be proposed; nothing was written")]
    DeadlineExceeded,
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// One request's commands: they go into one log entry together, in order
/// (a batch of results is one entry), and are answered together.
struct Proposal {
    commands: Vec<Command>,
    /// Past this instant the proposal is dropped unproposed: the client has given up.
    deadline: Option<Instant>,
    /// When it was queued: its wait is what the door's bound follows.
    queued: Instant,
    reply: oneshot::Sender<Result<(Vec<Outcome>, u64), Error>>,
}

/// Load-shedding classes: when the proposal queue fills, the lowest class is
/// refused first. Finishing work (complete, fail, extend) is `High`: shedding
/// it would waste work already done and keep leases busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Low,
    Normal,
    High,
}

impl Class {
    /// Priorities 0..=3 are low, 4..=6 normal, 7..=9 high.
    pub fn of_priority(priority: u8) -> Class {
        match priority {
            0..=3 => Class::Low,
            4..=6 => Class::Normal,
            _ => Class::High,
        }
    }

    pub fn of_command(command: &Command) -> Class {
        match command {
            Command::Submit { tasks } => {
                tasks.iter().map(|t| Class::of_priority(t.priority)).max().unwrap_or(Class::Normal)
            }
            Command::Lease { .. } | Command::ContextPut { .. } | Command::RegisterAgent { .. } => Class::Normal,
            _ => Class::High,
        }
    }

    /// The share of the proposal queue that may be in use when a proposal of
    /// this class arrives.
    fn fill_max(self) -> f64 {
        match self {
            Class::Low => 0.5,
            Class::Normal => 0.8,
            Class::High => 1.0,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub entries: AtomicU64,
    pub commands: AtomicU64,
    /// From proposing an entry to its outcome (committed and applied).
    pub commit_duration: crate::histogram::Histogram,
}

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
    queue_max: usize,
    write_timeout: Duration,
    pub stats: Arc<Stats>,
}

impl Proposer {
    pub fn start(
        raft: Raft,
        clock: Arc<crate::clock::LogClock>,
        batch_commands_max: usize,
        in_flight_max: usize,
        write_timeout_ms: u64,
        admission: Arc<crate::admission::AdaptiveLimit>,
    ) -> Proposer {
        let queue_max = batch_commands_max * in_flight_max * 2;
        let (tx, rx) = mpsc::channel(queue_max);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(raft, clock, rx, batch_commands_max, in_flight_max, stats.clone(), admission));
        Proposer { tx, queue_max, write_timeout: Duration::from_millis(write_timeout_ms), stats }
    }

    /// Proposes one command; resolves once its entry is committed and applied,
    /// with the command's outcome and the entry's log index.
    pub async fn propose(&self, command: Command) -> Result<(Outcome, u64), Error> {
        self.propose_by(command, None).await
    }

    /// How full the proposal queue is, 0.0 to 1.0.
    pub fn fill(&self) -> f64 {
        1.0 - self.tx.capacity() as f64 / self.queue_max as f64
    }

    /// Proposes with admission control: refused at once when the queue is
    /// fuller than the command's class allows, dropped unproposed if it is
    /// still queued at `deadline`.
    pub async fn propose_by(&self, command: Command, deadline: Option<Instant>) -> Result<(Outcome, u64), Error> {
        let (mut outcomes, index) = self.propose_all_by(vec![command], deadline).await?;
        assert_eq!(outcomes.len(), 1, "one outcome per command");
        Ok((outcomes.pop().expect("one outcome"), index))
    }

    /// Proposes several commands in one log entry, applied in order, with
    /// one outcome each. Admission is by the highest class among them.
    pub async fn propose_all_by(
        &self,
        commands: Vec<Command>,
        deadline: Option<Instant>,
    ) -> Result<(Vec<Outcome>, u64), Error> {
        assert!(!commands.is_empty(), "a proposal carries at least one command");
        let class = commands.iter().map(Class::of_command).max().expect("not empty");
        if class < Class::High && self.fill() > class.fill_max() {
            return Err(Error::Overloaded(self.queue_max));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(Error::DeadlineExceeded);
        }
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Proposal { commands, deadline, queued: Instant::now(), reply }).map_err(
            |error| match error {
                mpsc::error::TrySendError::Full(_) => Error::Overloaded(self.queue_max),
                mpsc::error::TrySendError::Closed(_) => Error::Fatal("proposer stopped".into()),
            },
        )?;
        match tokio::time::timeout(self.write_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Fatal("proposal dropped".into())),
            Err(_) => Err(Error::Timeout(self.write_timeout.as_millis() as u64)),
        }
    }
}

/// Bytes of commands joined into one log entry, past which the entry closes
/// (it may pass this by one command). With openraft's `max_payload_entries`
/// this bounds one append RPC, which a follower must be able to receive
/// within its `raft_request_bytes_max`.
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;

/// The bytes a command carries, roughly: its free-form text. Enough to bound
/// an entry; the fixed-size fields are noise next to payloads.
fn command_bytes(command: &Command) -> usize {
    let fixed = 64;
    fixed
        + match command {
            Command::Submit { tasks } => tasks.iter().map(|t| fixed + t.payload.len() + t.queue.len()).sum(),
            Command::Complete { result, .. } => result.len(),
            Command::Fail { error, .. } => error.len(),
            Command::ContextPut { key, value, .. } => key.len() + value.len(),
            Command::RegisterAgent { capabilities, .. } => capabilities.iter().map(|c| c.len() + 8).sum(),
            _ => 0,
        }
}

async fn run(
    raft: Raft,
    clock: Arc<crate::clock::LogClock>,
    mut rx: mpsc::Receiver<Proposal>,
    batch_commands_max: usize,
    in_flight_max: usize,
    stats: Arc<Stats>,
    admission: Arc<crate::admission::AdaptiveLimit>,
) {
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    while let Some(first) = rx.recv().await {
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut batch_commands = 0;
        let mut next = Some(first);
        let now = Instant::now();
        while let Some(proposal) = next.take() {
            admission.observe_queue_delay(now.saturating_duration_since(proposal.queued), now);
            if proposal.deadline.is_some_and(|d| d <= now) {
                let _ = proposal.reply.send(Err(Error::DeadlineExceeded));
            } else {
                batch_bytes += proposal.commands.iter().map(command_bytes).sum::<usize>();
                batch_commands += proposal.commands.len();
                batch.push(proposal);
            }
            // A proposal is never split: the entry may pass the bounds by one proposal.
            if batch_commands < batch_commands_max && batch_bytes < BATCH_BYTES_MAX {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        stats.entries.fetch_add(1, Ordering::Relaxed);
        stats.commands.fetch_add(batch_commands as u64, Ordering::Relaxed);
        let raft = raft.clone();
        let now_ms = clock.now_ms();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut commands = Vec::with_capacity(batch_commands);
            let mut replies = Vec::with_capacity(batch.len());
            for proposal in batch {
                replies.push((proposal.commands.len(), proposal.reply));
                commands.extend(proposal.commands);
            }
            let _permit = permit;
            let request = Request { now_ms, commands };
            let proposed = Instant::now();
            match raft.client_write(request).await {
                Ok(response) => {
                    stats.commit_duration.observe(proposed.elapsed());
                    let index = response.log_id.index;
                    assert_eq!(response.data.outcomes.len(), batch_commands, "one outcome per command");
                    let mut outcomes = response.data.outcomes.into_iter();
                    for (count, reply) in replies {
                        let _ = reply.send(Ok((outcomes.by_ref().take(count).collect(), index)));
                    }
                }
                Err(error) => {
                    let error = map_error(error);
                    for (_, reply) in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}

fn map_error(error: RaftError<u64, ClientWriteError<u64, crate::raft_types::Member>>) -> Error {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            Error::NotLeader { leader_id: forward.leader_id, leader_addr: forward.leader_node.map(|node| node.api) }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => Error::Fatal(error.to_string()),
        RaftError::Fatal(fatal) => Error::Fatal(fatal.to_string()),
    }
}
