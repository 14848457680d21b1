//! The simulated network: every Raft RPC between two simulated nodes goes
//! through here, as JSON (the bytes a real node would send), through the
//! same checks a real node's Raft listener runs (`raft_edge`), and meets the
//! faults the nemesis set: cut links (symmetric, one-way or partial cuts are
//! sets of directed links), paused or crashed nodes, delay, loss and
//! duplication; reordering follows from the random delays.

use crate::Shared;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use phalanx_server::raft_edge::{self, Receiver};
use phalanx_server::raft_types::{Member, NodeId, Raft, TypeConfig};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Duration;

/// What the nemesis has done to the network.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Directed links that carry nothing: (from, to).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Nodes whose messages, both ways, wait until they are resumed.
    pub paused: BTreeSet<NodeId>,
    /// Per mille of messages lost, and of messages delivered twice.
    pub loss_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// One-way delay, uniformly in this range (milliseconds).
    pub delay_ms: (u64, u64),
}

impl Faults {
    pub fn calm() -> Faults {
        Faults { delay_ms: (1, 5), ..Faults::default() }
    }

    pub fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.contains(&(from, to))
    }
}

/// The fate the network draws for one message.
enum Fate {
    Lost,
    Delivered { delay: Duration, twice: bool },
}

/// Why a message did not arrive: openraft sees `Unreachable` when nothing
/// could have been delivered, a network error when it may have been.
fn unreachable(why: &str) -> RPCError<NodeId, Member, RaftError<NodeId>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why.to_string())))
}

fn lost<E: std::error::Error>(why: &str) -> RPCError<NodeId, Member, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(why.to_string())))
}

#[derive(Clone)]
pub struct SimNetwork {
    pub shared: Shared,
    pub from: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> Connection {
        Connection { shared: self.shared.clone(), from: self.from, to: target }
    }
}

pub struct Connection {
    shared: Shared,
    from: NodeId,
    to: NodeId,
}

impl Connection {
    fn draw(&self) -> Fate {
        let mut world = self.shared.lock();
        let faults = world.faults.clone();
        let rng = &mut world.rng;
        if rng.gen_range(0..1000) < faults.loss_per_mille {
            return Fate::Lost;
        }
        let (low, high) = faults.delay_ms;
        let delay = Duration::from_millis(rng.gen_range(low..=high.max(low)));
        let twice = rng.gen_range(0..1000) < faults.duplicate_per_mille;
        Fate::Delivered { delay, twice }
    }

    /// Carries `request` to the target and its answer back, or fails as the
    /// faults say. `call` delivers it to the target's Raft.
    async fn exchange<Req, Resp, Err, F, Fut>(
        &self,
        request: Req,
        ttl: Duration,
        check: fn(&Receiver, &Req) -> Result<(), String>,
        call: F,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, Err>>>
    where
        Req: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        Resp: Send,
        Err: std::error::Error + Send,
        F: Fn(Raft, Req) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<Resp, RaftError<NodeId, Err>>> + Send,
    {
        let (from, to) = (self.from, self.to);
        let sendable = {
            let world = self.shared.lock();
            world.faults.link_up(from, to) && world.is_up(from)
        };
        if !sendable {
            tokio::time::sleep(ttl).await;
            return Err(lost("link cut"));
        }
        let (delay, twice) = match self.draw() {
            Fate::Lost => {
                tokio::time::sleep(ttl).await;
                return Err(lost("message lost"));
            }
            Fate::Delivered { delay, twice } => (delay, twice),
        };
        // The bytes a real node would send, decoded as the receiver would.
        let bytes = serde_json::to_vec(&request).map_err(|e| lost(&format!("encode: {e}")))?;
        let decoded: Req = serde_json::from_slice(&bytes).map_err(|e| lost(&format!("decode: {e}")))?;
        if twice {
            let (shared, call, copy) = (self.shared.clone(), call.clone(), decoded.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay * 2).await;
                if let Some(raft) = deliverable(&shared, from, to, check, &copy).await {
                    let _ = call(raft, copy).await;
                }
            });
        }
        let answer = tokio::time::timeout(ttl, async {
            tokio::time::sleep(delay).await;
            let raft = deliverable(&self.shared, from, to, check, &decoded).await?;
            let answer = call(raft, decoded).await;
            tokio::time::sleep(delay).await;
            // The answer comes back over the reverse link, if it still carries.
            let world = self.shared.lock();
            (world.faults.link_up(to, from) && world.is_up(from)).then_some(answer)
        })
        .await;
        match answer {
            Ok(Some(Ok(response))) => Ok(response),
            Ok(Some(Err(error))) => Err(RPCError::RemoteError(RemoteError::new(to, error))),
            Ok(None) | Err(_) => Err(lost("no answer")),
        }
    }
}

/// The target's Raft, once the message may be delivered: the link carries,
/// the target is up, not paused (a paused target holds it until resumed),
/// and the target's Raft listener accepts it. `None`: never delivered.
async fn deliverable<Req>(
    shared: &Shared,
    from: NodeId,
    to: NodeId,
    check: fn(&Receiver, &Req) -> Result<(), String>,
    request: &Req,
) -> Option<Raft> {
    loop {
        {
            let mut world = shared.lock();
            if !world.faults.link_up(from, to) {
                return None;
            }
            if !world.faults.paused.contains(&to) && !world.faults.paused.contains(&from) {
                let raft = world.raft(to)?;
                let membership = raft.metrics().borrow().membership_config.clone();
                if let Err(why) = check(&Receiver { membership: &membership }, request) {
                    world.note_refused_rpc(&why);
                    return None;
                }
                return Some(raft);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        self.exchange(rpc, ttl, raft_edge::check_append_request, |raft: Raft, rpc| async move {
            raft.append_entries(rpc).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        if !self.shared.lock().is_up(self.to) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(unreachable("the target is down"));
        }
        self.exchange(rpc, ttl, raft_edge::check_vote_request, |raft: Raft, rpc| async move { raft.vote(rpc).await })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>>
    {
        let ttl = option.hard_ttl();
        self.exchange(rpc, ttl, raft_edge::check_snapshot_request, |raft: Raft, rpc| async move {
            raft.install_snapshot(rpc).await
        })
        .await
    }
}
