//! The simulated nodes (start, crash, restart) and a model of the API's
//! routing: a request enters at one node, goes to the leader that node
//! knows (if the link carries), is proposed there under the leader's log
//! time, and its answer comes back the same way. What a real node's HTTP
//! layer adds beyond routing (admission, batching) is not simulated.

use crate::net::{Faults, SimNetwork};
use crate::{Options, Plant, Shared};
use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::{RaftLogReader, RaftLogStorage};
use phalanx_core::{Command, Outcome, Request, State};
use phalanx_server::raft_types::{Member, NodeId, Raft};
use phalanx_server::store::{self, Io, StateMachineShared};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a simulated client waits for one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One simulated node: its running incarnation, if it is up.
struct Slot {
    raft: Option<Raft>,
    state: Option<Arc<StateMachineShared>>,
    incarnation: u32,
    /// How fast this node's clock runs (1.0: exactly), for its log time as leader.
    clock_rate: f64,
    /// The term it leads in, the log time it started from, and when.
    leading: Option<(u64, u64, Instant)>,
}

pub struct World {
    pub rng: StdRng,
    pub faults: Faults,
    pub options: Options,
    pub origin: Instant,
    root: PathBuf,
    nodes: BTreeMap<NodeId, Slot>,
    pub counts: BTreeMap<&'static str, u64>,
    /// Failures of the simulated cluster itself (a node that cannot restart).
    pub failures: Vec<String>,
    /// The last grants a poll answered with (`Plant::DoubleGrant`).
    pub last_grants: Vec<phalanx_core::Grant>,
}

impl World {
    pub fn new(mut rng: StdRng, root: PathBuf, options: Options) -> World {
        let nodes = (1..=options.nodes)
            .map(|id| {
                let clock_rate = 1.0 + (rng.gen_range(-50..=50) as f64) / 1000.0;
                (id, Slot { raft: None, state: None, incarnation: 0, clock_rate, leading: None })
            })
            .collect();
        World {
            rng,
            faults: Faults::calm(),
            options,
            origin: Instant::now(),
            root,
            nodes,
            counts: BTreeMap::new(),
            failures: Vec::new(),
            last_grants: Vec::new(),
        }
    }

    pub fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    pub fn note_refused_rpc(&mut self, _why: &str) {
        self.count("raft_rpcs_refused_at_the_edge");
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|slot| slot.raft.is_some())
    }

    pub fn raft(&self, id: NodeId) -> Option<Raft> {
        self.nodes.get(&id)?.raft.clone()
    }

    pub fn state_of(&self, id: NodeId) -> Option<Arc<StateMachineShared>> {
        self.nodes.get(&id)?.state.clone()
    }

    pub fn plant(&self) -> Option<Plant> {
        self.options.plant
    }

    pub fn now_ms(&self) -> u64 {
        Instant::now().duration_since(self.origin).as_millis() as u64
    }

    /// The leader's log time for a new entry: as a real node does
    /// (`clock.rs`), the log time it found on taking over plus the time its
    /// own clock says has passed since, never behind what was applied.
    fn stamp(&mut self, leader: NodeId) -> u64 {
        let term = self.raft(leader).map(|raft| raft.metrics().borrow().current_term).unwrap_or(0);
        let applied = self.state_of(leader).map(|s| s.data.read().expect("state lock").state.now_ms()).unwrap_or(0);
        let slot = self.nodes.get_mut(&leader).expect("a node of the cluster");
        let now = Instant::now();
        let (base, since) = match slot.leading {
            Some((t, base, since)) if t == term => (base, since),
            _ => {
                slot.leading = Some((term, applied, now));
                (applied, now)
            }
        };
        let elapsed = now.duration_since(since).as_millis() as f64 * slot.clock_rate;
        (base + elapsed as u64).max(applied)
    }
}

fn raft_config(id: NodeId) -> Arc<openraft::Config> {
    // openraft draws election timeouts from an unseeded generator: a range of
    // one millisecond makes them fixed, and different per node so that two
    // candidates do not keep splitting the vote.
    let election = 300 + 70 * id;
    let config = openraft::Config {
        cluster_name: "phalanx-sim".into(),
        heartbeat_interval: 50,
        election_timeout_min: election,
        election_timeout_max: election + 1,
        // Small, so that runs take and install snapshots and purge logs.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(300),
        max_in_snapshot_log_to_keep: 100,
        max_payload_entries: 32,
        ..Default::default()
    };
    Arc::new(config.validate().expect("a valid Raft configuration"))
}

pub fn member(id: NodeId) -> Member {
    Member::new(format!("10.0.0.{id}:7000"), format!("10.0.0.{id}:7001"))
}

fn data_dir(root: &std::path::Path, id: NodeId, incarnation: u32) -> PathBuf {
    root.join(format!("node-{id}-{incarnation}"))
}

/// Starts node `id` from its current incarnation's data directory.
pub async fn start(shared: &Shared, id: NodeId) {
    let dir = {
        let world = shared.lock();
        data_dir(&world.root, id, world.nodes[&id].incarnation)
    };
    std::fs::create_dir_all(&dir).expect("a node directory");
    let opened = store::open_with(&dir, Io::Inline);
    let (log, state_machine) = match opened {
        Ok(stores) => stores,
        Err(error) => {
            shared.lock().failures.push(format!("node {id} could not open its storage: {error}"));
            return;
        }
    };
    let state = state_machine.shared();
    let network = SimNetwork { shared: shared.clone(), from: id };
    match Raft::new(id, raft_config(id), network, log, state_machine).await {
        Ok(raft) => {
            let mut world = shared.lock();
            let slot = world.nodes.get_mut(&id).expect("a node of the cluster");
            slot.raft = Some(raft);
            slot.state = Some(state);
            slot.leading = None;
        }
        Err(error) => shared.lock().failures.push(format!("node {id} could not start: {error}")),
    }
}

/// Starts every node, and initialises the cluster on node 1.
pub async fn boot(shared: &Shared) {
    let ids = shared.lock().ids();
    for id in &ids {
        start(shared, *id).await;
    }
    let members: BTreeMap<NodeId, Member> = ids.iter().map(|id| (*id, member(*id))).collect();
    let first = shared.lock().raft(1);
    if let Some(raft) = first {
        let _ = tokio::time::timeout(Duration::from_secs(5), raft.initialize(members)).await;
    }
}

/// Crashes node `id`: its process is gone, and what it had written to disk
/// is what the next incarnation finds (a copy of its files). With
/// `Plant::AckBeforeFsync`, the last entries it had acknowledged are lost.
pub async fn crash(shared: &Shared, id: NodeId) {
    let (raft, old_dir, new_dir, lose) = {
        let mut world = shared.lock();
        let lose = match world.plant() {
            Some(Plant::AckBeforeFsync) => world.rng.gen_range(1..=3u64),
            _ => 0,
        };
        let root = world.root.clone();
        let slot = world.nodes.get_mut(&id).expect("a node of the cluster");
        let Some(raft) = slot.raft.take() else { return };
        slot.state = None;
        slot.leading = None;
        let old_dir = data_dir(&root, id, slot.incarnation);
        slot.incarnation += 1;
        (raft, old_dir, data_dir(&root, id, slot.incarnation), lose)
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), raft.shutdown()).await;
    drop(raft);
    std::fs::create_dir_all(&new_dir).expect("a node directory");
    for entry in std::fs::read_dir(&old_dir).expect("the crashed node's directory").flatten() {
        let _ = std::fs::copy(entry.path(), new_dir.join(entry.file_name()));
    }
    if lose > 0 {
        lose_tail(&new_dir, lose).await;
    }
    shared.lock().count("crashes");
}

/// Removes the last `count` log entries from a crash image.
async fn lose_tail(dir: &std::path::Path, count: u64) {
    let Ok((mut log, _)) = store::open_with(dir, Io::Inline) else { return };
    let Ok(state) = log.get_log_state().await else { return };
    let Some(last) = state.last_log_id else { return };
    let first = last.index.saturating_sub(count - 1).max(state.last_purged_log_id.map_or(0, |l| l.index + 1));
    if let Ok(entries) = log.try_get_log_entries(first..=first).await {
        if let Some(entry) = entries.first() {
            let _ = log.truncate(entry.log_id).await;
        }
    }
}

/// Why a request failed, as a client sees it.
#[derive(Clone, Debug)]
pub enum Failure {
    /// Nothing was done (refused before it was proposed).
    NotDone(String),
    /// It may have been done.
    Unknown(String),
}

/// The leader as node `via` knows it, if `via` can serve and the way there
/// carries: (leader id, its Raft).
fn route(shared: &Shared, via: NodeId) -> Result<(NodeId, Raft), Failure> {
    let world = shared.lock();
    let raft_via = world.raft(via).ok_or_else(|| Failure::NotDone(format!("node {via} is down")))?;
    if world.faults.paused.contains(&via) {
        return Err(Failure::NotDone(format!("node {via} is paused")));
    }
    let leader = raft_via.metrics().borrow().current_leader.ok_or_else(|| Failure::NotDone("no leader".into()))?;
    if leader != via && !world.faults.link_up(via, leader) {
        return Err(Failure::NotDone(format!("node {via} cannot reach leader {leader}")));
    }
    let raft = world.raft(leader).ok_or_else(|| Failure::NotDone(format!("leader {leader} is down")))?;
    Ok((leader, raft))
}

/// Waits while node `id` is paused (a paused process answers nothing).
async fn while_paused(shared: &Shared, id: NodeId) {
    while shared.lock().faults.paused.contains(&id) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the answer of `leader` gets back to the client through `via`.
fn answer_returns(shared: &Shared, via: NodeId, leader: NodeId) -> bool {
    let world = shared.lock();
    world.is_up(via) && (via == leader || world.faults.link_up(leader, via))
}

/// Sends `commands` through node `via` and returns their outcomes once
/// committed and applied.
pub async fn write(shared: &Shared, via: NodeId, mut commands: Vec<Command>) -> Result<Vec<Outcome>, Failure> {
    let (leader, raft) = route(shared, via)?;
    if shared.lock().plant() == Some(Plant::StaleFence) {
        // The planted bug: the edge "corrects" a fence to the task's current one.
        let state = shared.lock().state_of(leader);
        if let Some(state) = state {
            let data = state.data.read().expect("state lock");
            for command in &mut commands {
                if let Command::Complete { task_id, fence, .. } = command {
                    if let Some(current) = data.state.task(*task_id).and_then(|t| t.lease.as_ref()).map(|l| l.fence) {
                        *fence = current;
                    }
                }
            }
        }
    }
    let exchange = async {
        while_paused(shared, leader).await;
        let now_ms = shared.lock().stamp(leader);
        raft.client_write(Request { now_ms, commands }).await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(response)) if answer_returns(shared, via, leader) => Ok(response.data.outcomes),
        Ok(Ok(_)) => Err(Failure::Unknown("the answer was lost on the way back".into())),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            Err(Failure::NotDone(format!("node {leader} is no longer the leader")))
        }
        Ok(Err(error)) => Err(Failure::Unknown(error.to_string())),
        Err(_) => Err(Failure::Unknown("no answer in time".into())),
    }
}

/// A linearizable read through node `via`: the leader confirms its
/// leadership and waits until it has applied the read index, then reads.
pub async fn read<T>(shared: &Shared, via: NodeId, look: impl FnOnce(&State) -> T) -> Result<T, Failure> {
    if shared.lock().plant() == Some(Plant::SkipReadBarrier) {
        // The planted bug: whatever node `via` has applied, without a barrier.
        let state = shared.lock().state_of(via).ok_or_else(|| Failure::NotDone(format!("node {via} is down")))?;
        let data = state.data.read().expect("state lock");
        return Ok(look(&data.state));
    }
    let (leader, raft) = route(shared, via)?;
    let barrier = async {
        while_paused(shared, leader).await;
        raft.ensure_linearizable().await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, barrier).await {
        Ok(Ok(_)) if answer_returns(shared, via, leader) => {
            let state = shared.lock().state_of(leader).ok_or_else(|| Failure::NotDone("leader went down".into()))?;
            let data = state.data.read().expect("state lock");
            Ok(look(&data.state))
        }
        Ok(_) => Err(Failure::NotDone("the leader could not confirm its leadership".into())),
        Err(_) => Err(Failure::NotDone("no answer in time".into())),
    }
}

/// The applied index and a digest of the state of every node that is up.
pub fn digests(shared: &Shared) -> Vec<(NodeId, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let world = shared.lock();
    let mut digests = Vec::new();
    for id in world.ids() {
        let Some(state) = world.state_of(id) else { continue };
        let data = state.data.read().expect("state lock");
        let applied = data.last_applied.map_or(0, |l| l.index);
        let bytes = serde_json::to_vec(&data.state).expect("the state serialises");
        // SipHash with fixed keys: the same bytes give the same digest in every run.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        digests.push((id, applied, hasher.finish()));
    }
    digests
}
