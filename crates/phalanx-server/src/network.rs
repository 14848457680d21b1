//! The Raft transport, client side: openraft's RPCs as HTTP POSTs to a
//! peer's `/raft/*` routes (served in `api.rs`), over kept-alive connections,
//! in the Raft message format of `raft_wire.rs` (format 2, MessagePack; a
//! peer that cannot read it, a node of the previous main, gets format 1,
//! JSON, until it is next unreachable, as a restarted, upgraded peer is).
//!
//! Leaves retries to openraft (it resends on the next keep-alive or after
//! `backoff`) and leaves authentication of the receiving side to `api.rs`.
//! Logs a peer's reachability once per change (lost, and back with how long
//! it was out), not once per failed RPC: openraft retries every 100 ms.

use crate::raft_types::Member;
use crate::raft_types::{NodeId, TypeConfig};
use crate::raft_wire::{Format, RAFT_FORMAT_HEADER};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
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
    /// Peers that cannot read the current Raft message format: sent format 1.
    older: Arc<Mutex<BTreeSet<NodeId>>>,
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
        Ok(Network {
            http,
            scheme,
            peer_token,
            contacts: Arc::default(),
            unreachable: Arc::default(),
            older: Arc::default(),
        })
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
    fn format(&self) -> Format {
        if self.network.older.lock().expect("older lock").contains(&self.target) {
            Format::Json
        } else {
            Format::MessagePack
        }
    }

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
        let format = self.format();
        match self.exchange(route, body, option, format).await {
            // A node of the previous main decodes every body as JSON and
            // refuses this one as malformed: it is sent format 1 from now on.
            Err(Refused::Malformed(text)) if format == Format::MessagePack => {
                tracing::info!(peer = self.target, addr = %self.addr, %text, "peer reads Raft message format 1 only; sending it that");
                self.network.older.lock().expect("older lock").insert(self.target);
                self.exchange(route, body, option, Format::Json).await.map_err(|refused| self.failed(refused))
            }
            answer => answer.map_err(|refused| self.failed(refused)),
        }
    }

    fn failed<Err: std::error::Error>(
        &self,
        refused: Refused<Err>,
    ) -> RPCError<NodeId, Member, RaftError<NodeId, Err>> {
        match refused {
            Refused::Malformed(text) => {
                let error = std::io::Error::other(format!("peer {} refused the request: {text}", self.target));
                self.network.peer_failed(self.target, &self.addr, &error);
                RPCError::Network(NetworkError::new(&error))
            }
            Refused::Rpc(error) => error,
        }
    }

    async fn exchange<Req, Resp, Err>(
        &self,
        route: &str,
        body: &Req,
        option: &RPCOption,
        format: Format,
    ) -> Result<Resp, Refused<Err>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        Err: std::error::Error + DeserializeOwned,
    {
        let bytes = format.encode(body).map_err(|why| {
            Refused::Rpc(RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
                "encoding a Raft request: {why}"
            )))))
        })?;
        let url = format!("{}://{}/raft/{route}", self.network.scheme, self.addr);
        let mut request = self
            .network
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, format.content_type())
            .body(bytes)
            .timeout(option.hard_ttl());
        if format != Format::Json {
            request = request.header(RAFT_FORMAT_HEADER, format.version());
        }
        if let Some(token) = &self.network.peer_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|error| {
            self.network.peer_failed(self.target, &self.addr, &error);
            if error.is_connect() {
                // Perhaps restarted on a newer build: try the current format again.
                self.network.older.lock().expect("older lock").remove(&self.target);
                Refused::Rpc(RPCError::Unreachable(Unreachable::new(&error)))
            } else {
                Refused::Rpc(RPCError::Network(NetworkError::new(&error)))
            }
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::BAD_REQUEST && text.contains("malformed_raft_request") {
                return Err(Refused::Malformed(text));
            }
            let error = std::io::Error::other(format!("peer {} answered {status}: {text}", self.target));
            self.network.peer_failed(self.target, &self.addr, &error);
            return Err(Refused::Rpc(RPCError::Network(NetworkError::new(&error))));
        }
        // An answer is in the request's format; its header says so.
        let decoded = match Format::of(response.headers()) {
            Ok(answered_in) => match response.bytes().await {
                Ok(bytes) => answered_in.decode::<Result<Resp, RaftError<NodeId, Err>>>(&bytes),
                Err(error) => Err(error.to_string()),
            },
            Err(why) => Err(why),
        };
        let result = decoded.map_err(|why| {
            let error = std::io::Error::other(format!("peer {}'s answer: {why}", self.target));
            self.network.peer_failed(self.target, &self.addr, &error);
            Refused::Rpc(RPCError::Network(NetworkError::new(&error)))
        })?;
        self.network.peer_answered(self.target, &self.addr);
        result.map_err(|error| Refused::Rpc(RPCError::RemoteError(RemoteError::new(self.target, error))))
    }
}

/// Why an exchange failed: the peer could not decode the request (and may
/// read an older format), or anything else.
enum Refused<Err: std::error::Error> {
    Malformed(String),
    Rpc(RPCError<NodeId, Member, RaftError<NodeId, Err>>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;
    use openraft::raft::VoteResponse;
    use openraft::{LogId, Vote};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A peer of the previous main: it decodes every Raft body as JSON,
    /// refuses anything else as malformed, and answers in JSON.
    async fn older_peer(packed: Arc<AtomicU64>, plain: Arc<AtomicU64>) -> String {
        let route = move |headers: HeaderMap, body: axum::body::Bytes| {
            let (packed, plain) = (packed.clone(), plain.clone());
            async move {
                let counter = if headers.contains_key(RAFT_FORMAT_HEADER) { &packed } else { &plain };
                counter.fetch_add(1, Ordering::SeqCst);
                match serde_json::from_slice::<VoteRequest<NodeId>>(&body) {
                    Ok(request) => {
                        let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
                            Ok(VoteResponse { vote: request.vote, vote_granted: true, last_log_id: None });
                        axum::Json(answer).into_response()
                    }
                    Err(error) => {
                        let body = serde_json::json!({"error": {"code": "malformed_raft_request", "message": format!("Raft request: {error}")}});
                        (axum::http::StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
                    }
                }
            }
        };
        use axum::response::IntoResponse;
        let router = axum::Router::new().route("/raft/vote", axum::routing::post(route));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn a_peer_of_the_previous_format_is_sent_json_after_its_first_refusal() {
        let (packed, plain) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let addr = older_peer(packed.clone(), plain.clone()).await;
        let mut network = Network::new(None, None).unwrap();
        let mut connection = network.new_client(2, &Member::new(addr.clone(), addr)).await;
        let option = RPCOption::new(Duration::from_secs(5));
        for term in [3, 4] {
            let request =
                VoteRequest { vote: Vote::new(term, 1), last_log_id: Some(LogId::new(Default::default(), 1)) };
            let answer = connection.vote(request, option.clone()).await.expect("the older peer answers");
            assert!(answer.vote_granted);
            assert_eq!(answer.vote, Vote::new(term, 1));
        }
        assert_eq!(packed.load(Ordering::SeqCst), 1, "format 2 tried once");
        assert_eq!(plain.load(Ordering::SeqCst), 2, "then format 1 for every request");
        assert!(network.unreachable.lock().unwrap().is_empty(), "a format fallback is not an outage");
    }
}
