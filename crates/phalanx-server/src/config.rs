//! A node's local configuration: identity, addresses, tokens and timings.
//!
//! Only what a node needs before it can reach its peers lives here; limits
//! that every replica must agree on live in the replicated state
//! (`phalanx_core::Limits`).

use crate::raft_types::Member;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Shortest token accepted: a guessable token is no authentication.
pub const TOKEN_BYTES_MIN: usize = 16;
/// Longest token accepted (it travels in a header on every request).
pub const TOKEN_BYTES_MAX: usize = 512;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: u64,
    pub listen: SocketAddr,
    /// The address peers and clients use to reach this node (default: `listen`).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Initial voters, including this node, by id. Empty: a one-node cluster.
    pub peers: BTreeMap<u64, Member>,
    /// A separate listener for Raft RPCs, served by its own threads, so that
    /// client load cannot starve consensus. `None`: Raft shares `listen`.
    pub raft_listen: Option<SocketAddr>,
    /// Token clients and agents must present (`Authorization: Bearer`).
    pub client_token: Option<String>,
    /// Token nodes present to each other on `/raft/*` and forwarded requests.
    pub peer_token: Option<String>,
    /// Raft leader keep-alive period (not an agent heartbeat; see the glossary).
    pub raft_keepalive_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot, for followers that lag a little.
    pub snapshot_logs_kept: u64,
    /// How long a leader waits for one snapshot chunk to be taken, and for
    /// the last to be installed (decoded, fsynced), before it starts the
    /// snapshot again. Installing grows with the state (about 1.5 s per
    /// million tasks here), so openraft's 200 ms made every large snapshot
    /// time out and be sent again.
    pub snapshot_install_timeout_ms: u64,
    /// Period of the leader's timer loop (agent expiry, Tick proposals).
    pub timer_interval_ms: u64,
    /// Commands in one log entry (group commit).
    pub batch_commands_max: usize,
    /// Log entries being proposed at once.
    pub proposals_in_flight_max: usize,
    /// Long-polls waiting at once on this node.
    pub pollers_max: usize,
    /// Other requests being served at once on this node; past it, 429 at once.
    pub requests_in_flight_max: usize,
    /// How much longer than when unloaded proposals may wait in the proposal
    /// queue (90th percentile over 100 ms) before the door lowers its bound on
    /// new work below `requests_in_flight_max` (`admission::AdaptiveLimit`); 0: never.
    pub admission_delay_target_ms: u64,
    /// Bytes of one HTTP request body.
    pub request_bytes_max: usize,
    /// Bytes of one Raft RPC body (a batch of log entries or a snapshot chunk).
    pub raft_request_bytes_max: usize,
    /// How long a write may wait for commit before the client hears `timeout`.
    pub write_timeout_ms: u64,
    /// Per-client token bucket: sustained requests per second and burst.
    pub client_rate_per_second: f64,
    pub client_burst: f64,
    /// Client buckets remembered at once.
    pub clients_tracked_max: usize,
    /// Client connections served at once (idle keep-alive ones included);
    /// past it a new connection gets `503 overloaded` before it is read.
    pub connections_max: usize,
    /// A node whose wall clock is further than this from the majority's is
    /// not ready, does not campaign and hands leadership over (`clock.rs`).
    pub clock_skew_max_ms: u64,
    /// Free space on the data directory's file system below which new work
    /// (submits, registrations) is refused with `507 disk_full`: the larger
    /// of this many bytes and `disk_free_min_percent` of the file system.
    pub disk_free_min_bytes: u64,
    pub disk_free_min_percent: u64,
    /// Client connections from one IP address at once, so that one host
    /// cannot take every slot; past it, `503 overloaded` before it is read.
    pub connections_per_address_max: usize,
    /// Time a client has to send a whole request head, from the moment the
    /// connection is opened or its previous request's first byte arrives.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a request's body once the head is read.
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Bytes of one request head (request line and headers); past it, `431`.
    pub header_bytes_max: usize,
    /// Bytes of one request target (path and query); past it, `414`.
    pub uri_bytes_max: usize,
    /// Bytes of one list answer (`GET /v1/tasks`); a longer list is cut and
    /// says where to continue.
    pub list_bytes_max: usize,
    /// TLS for both listeners and every peer connection (`tls.rs`); all
    /// `None`: plain HTTP.
    pub tls: crate::tls::Files,
    /// OTLP/HTTP collector that spans are exported to (`{URL}/v1/traces`);
    /// `None`, the default, records no span (`trace.rs`).
    pub otlp_endpoint: Option<String>,
    /// Spans waiting for export at once; past it, new spans are dropped and counted.
    pub spans_queued_max: usize,
}

impl NodeConfig {
    pub fn new(node_id: u64, listen: SocketAddr, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            node_id,
            listen,
            advertise: None,
            data_dir,
            peers: BTreeMap::new(),
            raft_listen: None,
            client_token: None,
            peer_token: None,
            raft_keepalive_ms: 30,
            election_timeout_min_ms: 100,
            election_timeout_max_ms: 200,
            snapshot_logs_since_last: 20_000,
            snapshot_logs_kept: 1_000,
            snapshot_install_timeout_ms: 30_000,
            timer_interval_ms: 100,
            batch_commands_max: 1024,
            proposals_in_flight_max: 8,
            pollers_max: 10_000,
            requests_in_flight_max: 1024,
            admission_delay_target_ms: 100,
            request_bytes_max: 4 * 1024 * 1024,
            raft_request_bytes_max: 256 * 1024 * 1024,
            write_timeout_ms: 10_000,
            client_rate_per_second: 20_000.0,
            client_burst: 40_000.0,
            clients_tracked_max: 10_000,
            connections_max: 16_384,
            clock_skew_max_ms: 500,
            disk_free_min_bytes: 64 * 1024 * 1024,
            disk_free_min_percent: 1,
            connections_per_address_max: 8_192,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            header_bytes_max: 16 * 1024,
            uri_bytes_max: 8 * 1024,
            list_bytes_max: 4 * 1024 * 1024,
            tls: crate::tls::Files::default(),
            otlp_endpoint: None,
            spans_queued_max: 8_192,
        }
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// This node as a member: its API address and its Raft address.
    pub fn member(&self) -> Member {
        if let Some(me) = self.peers.get(&self.node_id) {
            return me.clone();
        }
        let api = self.advertise_addr();
        let raft = self.raft_listen.map(|a| a.to_string()).unwrap_or_else(|| api.clone());
        Member::new(api, raft)
    }

    /// Refuses configurations that would run insecurely or cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections_max == 0 || self.requests_in_flight_max == 0 || self.pollers_max == 0 {
            return Err("connections_max, requests_in_flight_max and pollers_max must be positive".into());
        }
        // The bound is judged every 100 ms on the 90th percentile of the
        // queue's wait: a target of a few milliseconds would read ordinary
        // jitter as overload and refuse a healthy node's clients.
        if self.admission_delay_target_ms != 0 && !(10..=60_000).contains(&self.admission_delay_target_ms) {
            return Err("admission_delay_target_ms must be 0 (off) or 10..=60000".into());
        }
        if !(200..=600_000).contains(&self.snapshot_install_timeout_ms) {
            return Err("snapshot_install_timeout_ms must be 200..=600000".into());
        }
        if self.connections_per_address_max == 0 {
            return Err("connections_per_address_max must be positive".into());
        }
        for (name, value) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&value) {
                return Err(format!("{name} must be 100..=3600000 (one hour)"));
            }
        }
        // hyper reads a head in buffers of at least 8 KiB; a bound below one
        // line of ordinary headers would refuse every client.
        if !(1024..=1024 * 1024).contains(&self.header_bytes_max) {
            return Err("header_bytes_max must be 1024..=1048576".into());
        }
        if !(256..=self.header_bytes_max).contains(&self.uri_bytes_max) {
            return Err("uri_bytes_max must be 256..=header_bytes_max".into());
        }
        if self.list_bytes_max < 64 * 1024 {
            return Err("list_bytes_max must be at least 65536".into());
        }
        if self.node_id == 0 {
            return Err("node_id must be positive (0 is reserved)".into());
        }
        for (name, token) in [("client token", &self.client_token), ("peer token", &self.peer_token)] {
            if let Some(token) = token {
                if token.len() < TOKEN_BYTES_MIN || token.len() > TOKEN_BYTES_MAX {
                    return Err(format!(
                        "the {name} must be {TOKEN_BYTES_MIN} to {TOKEN_BYTES_MAX} bytes long (it is {}): \
                         an empty or short token would let anyone in",
                        token.len()
                    ));
                }
                if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
                    return Err(format!("the {name} must be printable ASCII without spaces"));
                }
            }
        }
        let exposed = [Some(self.listen), self.raft_listen].into_iter().flatten().find(|a| !a.ip().is_loopback());
        if let Some(exposed) = exposed {
            if self.client_token.is_none() || self.peer_token.is_none() {
                return Err(format!(
                    "refusing to listen on non-loopback address {exposed} without tokens: set --client-token and \
                     --peer-token (or PHALANX_CLIENT_TOKEN and PHALANX_PEER_TOKEN)"
                ));
            }
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.node_id) {
            return Err(format!("--peers must include this node's own id {}", self.node_id));
        }
        // The peer channel is always authenticated: any local user can reach a
        // loopback port, and one forged Raft request must not be able to
        // rewrite the log.
        if self.peers.len() > 1 && self.peer_token.is_none() {
            return Err("a cluster of more than one node needs a peer token: set --peer-token (or \
                        PHALANX_PEER_TOKEN) to the same secret on every node"
                .into());
        }
        for (id, member) in &self.peers {
            for addr in [&member.api, &member.raft] {
                crate::raft_types::check_addr(addr).map_err(|why| format!("peer {id}: {why}"))?;
            }
        }
        if self.election_timeout_min_ms <= self.raft_keepalive_ms * 2 {
            return Err("election_timeout_min_ms must be more than twice raft_keepalive_ms".into());
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err("election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if self.clock_skew_max_ms == 0 {
            return Err("clock_skew_max_ms must be positive".into());
        }
        if self.disk_free_min_percent > 50 {
            return Err("disk_free_min_percent must be at most 50".into());
        }
        self.tls.validate(self.raft_listen.is_some())?;
        if let Some(endpoint) = &self.otlp_endpoint {
            crate::trace::validate_endpoint(endpoint)?;
        }
        if !(1..=1_000_000).contains(&self.spans_queued_max) {
            return Err("spans_queued_max must be 1..=1000000".into());
        }
        if !(self.client_rate_per_second > 0.0 && self.client_burst >= 1.0) {
            return Err("client_rate_per_second must be positive and client_burst at least 1".into());
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Applies a bootstrap file of `key = value` lines (`#` starts a comment;
    /// values may be quoted). Any line that does not parse stops the node with
    /// a message naming the file and line: a node never starts half-configured.
    pub fn apply_file(&mut self, name: &str, text: &str) -> Result<(), String> {
        for (number, line) in text.lines().enumerate() {
            let at = |why: String| format!("{name} line {}: {why}", number + 1);
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| at(format!("{line:?} is not `key = value`")))?;
            let key = key.trim();
            let value = value.trim().trim_matches('"');
            let number_of =
                |value: &str| value.parse::<u64>().map_err(|_| at(format!("{key}: {value:?} is not a whole number")));
            match key {
                "node_id" => self.node_id = number_of(value)?,
                "listen" => {
                    self.listen = value.parse().map_err(|_| at(format!("listen: {value:?} is not HOST:PORT")))?
                }
                "advertise" => self.advertise = Some(value.to_string()),
                "data_dir" => self.data_dir = PathBuf::from(value),
                "peers" => self.peers = parse_peers(value).map_err(at)?,
                "raft_listen" => {
                    self.raft_listen =
                        Some(value.parse().map_err(|_| at(format!("raft_listen: {value:?} is not HOST:PORT")))?)
                }
                "raft_keepalive_ms" => self.raft_keepalive_ms = number_of(value)?,
                "election_timeout_min_ms" => self.election_timeout_min_ms = number_of(value)?,
                "election_timeout_max_ms" => self.election_timeout_max_ms = number_of(value)?,
                "snapshot_logs_since_last" => self.snapshot_logs_since_last = number_of(value)?,
                "snapshot_logs_kept" => self.snapshot_logs_kept = number_of(value)?,
                "snapshot_install_timeout_ms" => self.snapshot_install_timeout_ms = number_of(value)?,
                "client_rate_per_second" => self.client_rate_per_second = number_of(value)? as f64,
                "client_burst" => self.client_burst = number_of(value)? as f64,
                "connections_max" => self.connections_max = number_of(value)? as usize,
                "admission_delay_target_ms" => self.admission_delay_target_ms = number_of(value)?,
                "clock_skew_max_ms" => self.clock_skew_max_ms = number_of(value)?,
                "disk_free_min_bytes" => self.disk_free_min_bytes = number_of(value)?,
                "disk_free_min_percent" => self.disk_free_min_percent = number_of(value)?,
                "connections_per_address_max" => self.connections_per_address_max = number_of(value)? as usize,
                "header_read_timeout_ms" => self.header_read_timeout_ms = number_of(value)?,
                "body_read_timeout_ms" => self.body_read_timeout_ms = number_of(value)?,
                "idle_timeout_ms" => self.idle_timeout_ms = number_of(value)?,
                "header_bytes_max" => self.header_bytes_max = number_of(value)? as usize,
                "uri_bytes_max" => self.uri_bytes_max = number_of(value)? as usize,
                "list_bytes_max" => self.list_bytes_max = number_of(value)? as usize,
                "tls_cert" => self.tls.cert = Some(PathBuf::from(value)),
                "tls_key" => self.tls.key = Some(PathBuf::from(value)),
                "tls_client_ca" => self.tls.client_ca = Some(PathBuf::from(value)),
                "ca_file" => self.tls.ca = Some(PathBuf::from(value)),
                "otlp_endpoint" => self.otlp_endpoint = Some(value.to_string()),
                "spans_queued_max" => self.spans_queued_max = number_of(value)? as usize,
                other => return Err(at(format!("unknown key {other:?}"))),
            }
        }
        self.validate().map_err(|why| format!("{name}: {why}"))
    }
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`, each address optionally
/// followed by `/RAFT_ADDR` when the node has a separate Raft listener.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, Member>, String> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("peer {part:?} is not ID=ADDR[/RAFT_ADDR]"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("peer id {id:?} is not a number"))?;
        let member = match addr.trim().split_once('/') {
            Some((api, raft)) => Member::new(api.trim(), raft.trim()),
            None => Member::new(addr.trim(), addr.trim()),
        };
        if peers.insert(id, member).is_some() {
            return Err(format!("peer id {id} appears twice"));
        }
    }
    Ok(peers)
}
