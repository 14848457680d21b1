//! The Raft transport, client side: openraft's RPCs as HTTP/JSON POSTs to a
//! peer's `/raft/*` routes (served in `api.rs`).
//!
//! Leaves retries to openraft (it resends on the next keep-alive or after
//! `backoff`) and leaves authentication of the receiving side to `api.rs`.
//! Logs a peer's reachability once per change (lost, and back with how long
//! it was out), not once per failed RPC: openraft retries every 100 ms.

use crate::raft_types::Member;
use crate::raft_types::{NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds one connection per peer; all share one HTTP client (connection pool).
#[derive(Clone)]
pub struct Network {
    http: reqwest::Client,
    /// `https` when the node has TLS (`tls.rs`), else `http`.
    scheme: &'static str,
    peer_token: Option<String>,
    /// When each peer last answered a Raft RPC (shown by `/v1/cluster`).
    pub contacts: Arc<Mutex<BTreeMap<NodeId, Instant>>>,
    /// Peers whose last Raft RPC failed: since when, and how many failed.
    unreachable: Arc<Mutex<BTreeMap<NodeId, (Instant, u64)>>>,
}

impl Network {
    /// Notes a failed RPC; only the first failure after a success is logged.
    fn peer_failed(&self, target: NodeId, addr: &str, error: &dyn std::fmt::Display) {
        let mut unreachable = self.unreachable.lock().expect("unreachable lock");
        match unreachable.get_mut(&target) {
            Some((_, failures)) => *failures += 1,
            None => {
                unreachable.insert(target, (Instant::now(), 1));
                tracing::warn!(peer = target, %addr, %error, "peer unreachable");
            }
        }
    }

    /// Notes an answered RPC; logs the peer's return if it was out.
    fn peer_answered(&self, target: NodeId, addr: &str) {
        let now = Instant::now();
        self.contacts.lock().expect("contacts lock").insert(target, now);
        let back = self.unreachable.lock().expect("unreachable lock").remove(&target);
        if let Some((since, failures)) = back {
            let out_ms = now.duration_since(since).as_millis() as u64;
            tracing::info!(peer = target, %addr, out_ms, failed_rpcs = failures, "peer reachable again");
        }
    }
}

impl Network {
    pub fn new(peer_token: Option<String>, tls: Option<&crate::tls::Tls>) -> Result<Network, String> {
        let mut http = reqwest::Client::builder()
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500));
        if let Some(tls) = tls {
            http = tls.client(http)?;
        }
        let http = http.build().map_err(|error| format!("the Raft client: {error}"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Network { http, scheme, peer_token, contacts: Arc::default(), unreachable: Arc::default() })
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        Connection { network: self.clone(), target, addr: node.raft.clone() }
    }
}

pub struct Connection {
    network: Network,
    target: NodeId,
    addr: String,
}

impl Connection {
    async fn post<Req, Resp, Err>(
        &self,
        route: &str,
        body: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, Err>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        Err: std::error::Error + DeserializeOwned,
    {
        let url = format!("{}://{}/raft/{route}", self.network.scheme, self.addr);
        let mut request = self.network.http.post(url).json(body).timeout(option.hard_ttl());
        if let Some(token) = &self.network.peer_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|error| {
            self.network.peer_failed(self.target, &self.addr, &error);
            if error.is_connect() {
                RPCError::Unreachable(Unreachable::new(&error))
            } else {
                RPCError::Network(NetworkError::new(&error))
            }
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let error = std::io::Error::other(format!("peer {} answered {status}: {text}", self.target));
            self.network.peer_failed(self.target, &self.addr, &error);
            return Err(RPCError::Network(NetworkError::new(&error)));
        }
        let result: Result<Resp, RaftError<NodeId, Err>> = response.json().await.map_err(|error| {
            self.network.peer_failed(self.target, &self.addr, &error);
            RPCError::Network(NetworkError::new(&error))
        })?;
        self.network.peer_answered(self.target, &self.addr);
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.post("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.post("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.post("vote", &rpc, &option).await
    }

    /// An unreachable peer is retried soon: a restarted node should rejoin
    /// within a few heartbeats, not after openraft's default 500 ms.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
