//! A running node: opens storage, starts the Raft replica, the proposer, the
//! leader's timer loop, the election loop and the HTTP server, and wires them
//! together.
//!
//! The loops here are the runtime of the node controller (`controller.rs`):
//! they gather facts (Raft's metrics, the applied state, counters, the
//! probes' answers), ask the controller, and carry out its actions (propose
//! `ExpireAgent`, `Tick` or a policy rollback, stop keep-alives, allow or
//! forbid elections, probe readiness). What to decide is the controller's;
//! reading clocks, locks, spawning and proposing is left here.

use crate::config::NodeConfig;
use crate::controller::{self, Action, ApplyProgress, ClusterReadiness, Controller};
use crate::network::Network;
use crate::proposer::Proposer;
use crate::raft_types::Member;
use crate::raft_types::Raft;
use crate::store::{self, StateMachineShared};
use anyhow::Context;
use openraft::ServerState;
use phalanx_core::Command;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub use crate::controller::{APPLY_STALL_MS, EVENT_LOOP_LAG_MS_MAX, STORAGE_STALL_MS};

/// What the election guard (`election_guard.rs`) knows: the peers' latest
/// probe answers (their `at_ms` in `store::monotonic_ms`) and when this
/// node last heard from a leader.
#[derive(Default)]
pub struct Elections {
    pub answers: BTreeMap<u64, crate::election_guard::PeerAnswer>,
    /// When an append or snapshot from a leader was last accepted here.
    pub leader_contact: Option<Instant>,
    /// Why this node holds back from campaigning, if it does.
    pub hold_back: Option<String>,
    /// How many probes of each peer have failed in a row (refused, timed
    /// out, or answered as someone else) since it last answered.
    pub probe_failures: BTreeMap<u64, u32>,
}

/// Counters kept by this node only (not replicated).
#[derive(Default)]
pub struct NodeStats {
    pub http_requests: AtomicU64,
    pub forwarded: AtomicU64,
    pub refused_overload: AtomicU64,
    pub agents_expired: AtomicU64,
    pub leader_changes: AtomicU64,
    /// Elections this node asked for early (`election_guard::elect_now`).
    pub early_elections: AtomicU64,
    /// Submitted tasks this node (as leader) accepted, and refused for what
    /// the policy allows; the policy guard compares the refused share before
    /// and after a change.
    pub submits_accepted: AtomicU64,
    pub submits_refused: AtomicU64,
    /// Raft RPCs refused at the edge (`raft_edge.rs`): undecodable or implausible.
    pub raft_refused: AtomicU64,
    /// Request latency: [0] every request but long-polls, [1] long-polls.
    pub http_request_duration: [crate::histogram::Histogram; 2],
}

pub struct Node {
    pub config: NodeConfig,
    pub raft: Raft,
    pub shared: Arc<StateMachineShared>,
    pub proposer: Proposer,
    /// For forwarding requests to the leader, and probing peers.
    pub http: reqwest::Client,
    /// TLS, when the node has a certificate (`tls.rs`).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The node-level decisions and their soft state (agent liveness among
    /// them); the loops below and the agent routes call in.
    pub controller: Mutex<Controller>,
    pub storage_health: Arc<crate::store::StorageHealth>,
    /// Worst scheduling delay seen recently on the API threads [0] and the
    /// consensus threads [1]: a stalled event loop is a node that looks alive.
    pub event_loop_lag_ms: [AtomicU64; 2],
    /// The applied index and since when it has stood still behind the
    /// committed index, if it has (see `observe_apply`).
    pub apply_progress: Mutex<ApplyProgress>,
    /// What the policy guard last learnt of every voter's readiness.
    pub cluster_readiness: Mutex<Option<ClusterReadiness>>,
    /// The readiness probe the guard asked for last (`Action::ProbeReadiness`).
    pub readiness_probe: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When each peer last answered this node's Raft RPCs.
    pub peer_contacts: Arc<Mutex<BTreeMap<u64, Instant>>>,
    pub pollers: Arc<Semaphore>,
    pub rate_limiter: crate::admission::RateLimiter,
    /// The door's slots for new work in flight and their bound, at most
    /// `requests_in_flight_max`, fed by the proposal queue's delay.
    pub admission_limit: Arc<crate::admission::AdaptiveLimit>,
    pub listener_stats: Arc<crate::listener::ListenerStats>,
    pub stats: NodeStats,
    pub elections: Mutex<Elections>,
    /// Log time while this node leads, and every node's clock skew.
    pub log_clock: Arc<crate::clock::LogClock>,
    /// The data directory's file system, as last measured (`disk_loop`).
    pub disk: DiskSpace,
    /// Set while this node, as leader, hands leadership over: it then serves
    /// no request, and its probe answer no longer says it hears from a
    /// leader, so the others may campaign.
    pub stepping_down: AtomicBool,
    /// What `raise_descriptor_limit` found and set at start.
    pub descriptors: Descriptors,
    /// Records the spans of the requests this node serves, and exports them
    /// when `otlp_endpoint` is set (`trace.rs`).
    pub tracer: crate::trace::Tracer,
}

/// Free space on the data directory's file system, measured every
/// `DISK_CHECK_MS` off the async workers.
#[derive(Default)]
pub struct DiskSpace {
    pub free_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
    /// Bytes of new work accepted since the last measurement: counted as
    /// used at once, so a burst cannot run past the watermark between two
    /// measurements (a log entry takes at least its commands' bytes).
    pub written_since_measured: AtomicU64,
    /// Set while free space was under the watermark at the last measurement.
    pub low: AtomicBool,
}

/// The descriptor limit and what it left for client connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct Descriptors {
    pub limit: u64,
    pub connections_max: usize,
}

/// The exit status of a node whose Raft stopped on a storage error
/// (`EX_TEMPFAIL`): a supervisor restarts it, and it recovers from its
/// fsynced log. openraft cannot be restarted in place, and a process that
/// lives on with a stopped Raft is one no supervisor restarts.
pub const EXIT_RAFT_STOPPED: u8 = 75;

/// Why `Running::wait_for_signal` ended without a signal.
#[derive(Debug, thiserror::Error)]
#[error("raft stopped: {0}; exiting with status {EXIT_RAFT_STOPPED} so that a supervisor restarts this node")]
pub struct RaftStopped(pub String);

impl Node {
    /// `http://ADDR` or `https://ADDR`: how this node speaks to a peer's
    /// listener (a cluster is all TLS or none, `tls.rs`).
    pub fn peer_url(&self, addr: &str, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}{path}")
    }

    /// Notes that a leader's append or snapshot was accepted here.
    pub fn heard_from_leader(&self) {
        self.elections.lock().expect("elections lock").leader_contact = Some(Instant::now());
    }

    /// Notes that an agent's current session showed it is alive (a
    /// heartbeat, a registration or a poll, its session checked).
    pub fn heard_from_agent(&self, agent_id: &str, epoch: u64) {
        self.controller().heartbeat(crate::store::monotonic_ms(), agent_id, epoch);
    }

    pub fn controller(&self) -> std::sync::MutexGuard<'_, Controller> {
        self.controller.lock().expect("controller lock")
    }

    /// How long ago this node last heard from its leader, `None` when it
    /// knows no leader. On the leader it is the time since a majority last
    /// acknowledged it: a leader that stopped its keep-alives (a stall hands
    /// leadership over that way) must not keep its followers from electing
    /// another, so its own contact ages like theirs.
    pub fn leader_contact_age_ms(&self) -> Option<u64> {
        let (leader, quorum_ack) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader?, metrics.millis_since_quorum_ack)
        };
        if leader == self.id() {
            // A leader handing over (a stall, a skewed clock) does not count
            // as a live one, also in the moment before `timer_loop` notices
            // a stall, while its (stuck) Raft core still reports contact.
            let handing_over = self.stepping_down.load(Ordering::Relaxed) || self.stall().is_some();
            return quorum_ack.filter(|_| !handing_over);
        }
        let contact = self.elections.lock().expect("elections lock").leader_contact?;
        Some(contact.elapsed().as_millis() as u64)
    }

    pub fn id(&self) -> u64 {
        self.config.node_id
    }

    pub fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow().current_leader == Some(self.config.node_id)
    }

    /// The current leader's id and address, as this node knows it.
    pub fn leader(&self) -> Option<(u64, String)> {
        let metrics = self.raft.server_metrics();
        let metrics = metrics.borrow();
        let leader_id = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader_id)?;
        Some((leader_id, node.api.clone()))
    }
}

/// A node serving HTTP; dropping it does not stop it, `shutdown` does.
pub struct Running {
    pub node: Arc<Node>,
    pub addr: std::net::SocketAddr,
    pub raft_addr: Option<std::net::SocketAddr>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The threads that run consensus when Raft has its own listener, held
    /// only to be shut down when this is dropped.
    _raft_runtime: Option<RaftThreads>,
}

/// The runtime of the consensus threads. Dropping a tokio runtime inside
/// another runtime's async context panics, and `start` may return early from
/// there (a busy port, an unreadable database): this drop never blocks.
struct RaftThreads(Option<tokio::runtime::Runtime>);

impl Drop for RaftThreads {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Running {
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown_tx.send(true);
        let _ = self.node.raft.shutdown().await;
        (&mut self.server).await??;
        Ok(())
    }

    /// Serves until the process receives SIGTERM or SIGINT, or until Raft
    /// stops on a storage error (then `RaftStopped`, at once: no fsync is
    /// retried as if its data were safe; the restarted node recovers from
    /// its log).
    pub async fn wait_for_signal(self) -> anyhow::Result<()> {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut metrics = self.node.raft.metrics();
        let stopped = async move {
            loop {
                if let Err(fatal) = &metrics.borrow().running_state {
                    return fatal.to_string();
                }
                if metrics.changed().await.is_err() {
                    return "the Raft task ended".to_string();
                }
            }
        };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            why = stopped => {
                tracing::error!(%why, "raft stopped: exiting with status {EXIT_RAFT_STOPPED}");
                return Err(RaftStopped(why).into());
            }
        }
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

pub fn raft_config(config: &NodeConfig) -> anyhow::Result<openraft::Config> {
    let raft_config = openraft::Config {
        cluster_name: "phalanx".into(),
        heartbeat_interval: config.raft_keepalive_ms,
        election_timeout_min: config.election_timeout_min_ms,
        election_timeout_max: config.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: config.snapshot_logs_kept,
        install_snapshot_timeout: config.snapshot_install_timeout_ms,
        // With the proposer's BATCH_BYTES_MAX this bounds one append RPC to
        // about 32 x (1 MiB + one request) bytes, under raft_request_bytes_max.
        max_payload_entries: 32,
        ..Default::default()
    };
    Ok(raft_config.validate()?)
}

pub async fn start(config: NodeConfig) -> anyhow::Result<Running> {
    config.validate().map_err(anyhow::Error::msg)?;
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        anyhow::bail!("the data dir {} is not a directory (--data-dir)", config.data_dir.display());
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data dir {} (--data-dir)", config.data_dir.display()))?;
    let tls = crate::tls::Tls::load(&config.tls).map_err(anyhow::Error::msg)?;

    // The listeners first: a busy port is the likeliest mistake, and it is
    // reported before anything is opened or started.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let addr = listener.local_addr()?;
    // With a Raft listener of its own, consensus (the Raft core, storage,
    // apply, the proposer, the timers and the Raft RPC server) runs on
    // dedicated threads: client load on the API threads cannot delay a
    // keep-alive into an election.
    let raft_runtime = match config.raft_listen {
        Some(_) => Some(RaftThreads(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("phalanx-raft")
                .enable_all()
                .build()
                .context("starting the Raft threads")?,
        ))),
        None => None,
    };
    let consensus = raft_runtime
        .as_ref()
        .and_then(|threads| threads.0.as_ref())
        .map(|r| r.handle().clone())
        .unwrap_or_else(tokio::runtime::Handle::current);
    let raft_listener = match config.raft_listen {
        Some(raft_listen) => Some(
            consensus
                .spawn(async move { tokio::net::TcpListener::bind(raft_listen).await })
                .await?
                .with_context(|| format!("cannot listen on {raft_listen} (--raft-listen)"))?,
        ),
        None => None,
    };
    let raft_addr = raft_listener.as_ref().map(|l| l.local_addr()).transpose()?;

    let database = config.data_dir.join(store::DATABASE_FILE_NAME);
    let (log_store, state_machine) =
        store::open(&config.data_dir).with_context(|| format!("opening the database {}", database.display()))?;
    let shared = state_machine.shared();
    let log_clock = Arc::new(crate::clock::LogClock::new(config.node_id, config.clock_skew_max_ms, shared.clone()));
    let mut config = config;
    let descriptors = raise_descriptor_limit(&mut config);
    let storage_health = log_store.health.clone();
    let raft_config = Arc::new(raft_config(&config)?);
    let network = Network::new(config.peer_token.clone(), tls.as_deref()).map_err(anyhow::Error::msg)?;
    let peer_contacts = network.contacts.clone();

    let node_id = config.node_id;
    let raft = consensus
        .spawn(async move { Raft::new(node_id, raft_config, network, log_store, state_machine).await })
        .await??;

    if config.advertise.is_none() {
        config.advertise = Some(addr.to_string());
    }
    if let Some(raft_addr) = raft_addr {
        config.raft_listen = Some(raft_addr);
    }

    initialize_if_first(&raft, &config).await?;

    let admission_limit = Arc::new(crate::admission::AdaptiveLimit::new(
        config.requests_in_flight_max,
        (config.admission_delay_target_ms > 0).then(|| Duration::from_millis(config.admission_delay_target_ms)),
        std::time::Instant::now(),
    ));
    let proposer = {
        let _inside = consensus.enter();
        Proposer::start(
            raft.clone(),
            log_clock.clone(),
            config.batch_commands_max,
            config.proposals_in_flight_max,
            config.write_timeout_ms,
            admission_limit.clone(),
        )
    };
    let mut http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .connect_timeout(Duration::from_millis(crate::api::FORWARD_CONNECT_TIMEOUT_MS));
    if let Some(tls) = &tls {
        http = tls.client(http).map_err(anyhow::Error::msg)?;
    }
    let http = http.build()?;
    let controller = Controller::new(controller::Settings { election_timeout_max_ms: config.election_timeout_max_ms });
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let tracer = match &config.otlp_endpoint {
        Some(endpoint) => {
            tracing::info!(%endpoint, "spans are exported over OTLP/HTTP");
            crate::trace::Tracer::exporting(endpoint, config.node_id, config.spans_queued_max, shutdown_rx.clone())?
        }
        None => crate::trace::Tracer::off(),
    };
    let node = Arc::new(Node {
        pollers: Arc::new(Semaphore::new(config.pollers_max)),
        admission_limit,
        rate_limiter: crate::admission::RateLimiter::new(
            config.client_rate_per_second,
            config.client_burst,
            config.clients_tracked_max,
        ),
        config,
        raft,
        shared,
        proposer,
        http,
        tls: tls.clone(),
        controller: Mutex::new(controller),
        peer_contacts,
        storage_health,
        event_loop_lag_ms: [AtomicU64::new(0), AtomicU64::new(0)],
        apply_progress: Mutex::new(ApplyProgress::default()),
        listener_stats: Arc::default(),
        cluster_readiness: Mutex::new(None),
        readiness_probe: Mutex::new(None),
        stats: NodeStats::default(),
        elections: Mutex::default(),
        log_clock,
        disk: DiskSpace::default(),
        stepping_down: AtomicBool::new(false),
        descriptors,
        tracer,
    });
    // Measured once before serving, so the first request already knows.
    measure_disk(&node);

    consensus.spawn(timer_loop(node.clone(), shutdown_rx.clone()));
    consensus.spawn(election_loop(node.clone(), shutdown_rx.clone()));
    tokio::spawn(disk_loop(node.clone(), shutdown_rx.clone()));
    tokio::spawn(watchdog(node.clone(), 0, shutdown_rx.clone()));
    consensus.spawn(watchdog(node.clone(), 1, shutdown_rx.clone()));
    if let Some(raft_listener) = raft_listener {
        let router = crate::api::raft_router(node.clone());
        let mut raft_shutdown = shutdown_rx.clone();
        let tls = tls.clone();
        consensus.spawn(async move {
            let stop = async move {
                let _ = raft_shutdown.wait_for(|stop| *stop).await;
            };
            let _ = match tls {
                Some(tls) => axum::serve(tls.raft_listener(raft_listener), router).with_graceful_shutdown(stop).await,
                None => axum::serve(raft_listener, router).with_graceful_shutdown(stop).await,
            };
        });
    }
    let router = crate::api::router(node.clone())
        .layer(axum::middleware::from_fn_with_state(node.clone(), crate::metrics::time_requests));
    let settings = crate::listener::Settings::of(&node.config);
    let listener = crate::listener::BoundedListener::new(listener, settings, node.listener_stats.clone(), tls);
    let gate = crate::api::door(node.clone());
    let server = tokio::spawn(crate::listener::serve(listener, router, Some(gate), shutdown_rx));
    tracing::info!(node_id = node.id(), %addr, ?raft_addr, "node serving");
    Ok(Running { node, addr, raft_addr, shutdown_tx, server, _raft_runtime: raft_runtime })
}

/// Descriptors a node needs besides client connections and peers: its
/// database file, listeners, the runtimes' own, and a margin for what the
/// libraries open on their own.
const DESCRIPTORS_RESERVED: u64 = 128;
/// Descriptors kept per peer: the forwarding pool (at most 64 idle
/// connections per host), Raft connections both ways and probes.
const DESCRIPTORS_PER_PEER: u64 = 80;
/// The fewest client connections a node serves, however low its limit: a
/// node that cannot accept a handful of clients is of no use, and says so.
const CONNECTIONS_MIN: u64 = 16;
/// The highest soft limit asked for when the hard limit is unlimited
/// (Linux's default `fs.nr_open`).
const DESCRIPTORS_ASKED_MAX: u64 = 1 << 20;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and caps
/// `connections_max` by what is left after the descriptors the node needs,
/// so that past the cap a client gets `503 overloaded` at once instead of
/// waiting on a listener that cannot accept. Both are logged.
fn raise_descriptor_limit(config: &mut NodeConfig) -> Descriptors {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes into the struct passed, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "cannot read the descriptor limit: connections_max stays as configured");
        return Descriptors { limit: 0, connections_max: config.connections_max };
    }
    let before = limit.rlim_cur;
    let wanted = limit.rlim_max.min(DESCRIPTORS_ASKED_MAX);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = wanted;
        } else {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "cannot raise the soft descriptor limit to {wanted}");
        }
    }
    let peers = config.peers.len().saturating_sub(1) as u64;
    let reserved = DESCRIPTORS_RESERVED + peers * DESCRIPTORS_PER_PEER;
    let room = limit.rlim_cur.saturating_sub(reserved).max(CONNECTIONS_MIN);
    let configured = config.connections_max;
    config.connections_max = configured.min(usize::try_from(room).unwrap_or(usize::MAX));
    tracing::info!(
        soft_limit_before = before,
        soft_limit = limit.rlim_cur,
        hard_limit = limit.rlim_max,
        reserved,
        connections_max = config.connections_max,
        "descriptor limit"
    );
    if config.connections_max < configured {
        tracing::warn!(
            configured,
            connections_max = config.connections_max,
            "connections_max capped by the descriptor limit: raise the hard limit (ulimit -Hn, LimitNOFILE=) to serve more"
        );
    }
    Descriptors { limit: limit.rlim_cur, connections_max: config.connections_max }
}

/// How often the data directory's free space is measured.
const DISK_CHECK_MS: u64 = 100;

/// Free and total bytes of the file system holding `path` (`statvfs`: free
/// means available to this unprivileged process).
fn file_system_space(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: an all-zero statvfs is a valid value of a plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and the struct is ours to write.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = stat.f_frsize as u64;
    Ok((stat.f_bavail as u64 * unit, stat.f_blocks as u64 * unit))
}

impl Node {
    /// The free space under which new work is refused.
    pub fn disk_free_min_bytes(&self) -> u64 {
        let total = self.disk.total_bytes.load(Ordering::Relaxed);
        self.config.disk_free_min_bytes.max(total / 100 * self.config.disk_free_min_percent)
    }

    /// Free bytes as last measured, less the new work accepted since.
    pub fn disk_free_bytes(&self) -> u64 {
        let free = self.disk.free_bytes.load(Ordering::Relaxed);
        free.saturating_sub(self.disk.written_since_measured.load(Ordering::Relaxed))
    }

    /// Why new work is refused for want of disk space, if it is.
    pub fn disk_problem(&self) -> Option<String> {
        let free = self.disk_free_bytes();
        let watermark = self.disk_free_min_bytes();
        if !self.disk.low.load(Ordering::Relaxed) && free >= watermark {
            return None;
        }
        Some(format!(
            "disk space low: {free} bytes free on the data directory's file system, under the watermark of \
             {watermark} bytes (disk_free_min_bytes, disk_free_min_percent)"
        ))
    }

    /// Why this node's clock is not to be trusted, if it is not.
    pub fn clock_problem(&self) -> Option<String> {
        controller::clock_problem(self.log_clock.own_skew_ms(), self.config.clock_skew_max_ms)
    }
}

/// Measures the data directory's file system and sets `disk.low`. Blocking (a system call on a file system that
/// may be slow): never on an async worker.
fn measure_disk(node: &Node) {
    match file_system_space(&node.config.data_dir) {
        Ok((free, total)) => {
            node.disk.free_bytes.store(free, Ordering::Relaxed);
            node.disk.total_bytes.store(total, Ordering::Relaxed);
            node.disk.written_since_measured.store(0, Ordering::Relaxed);
            let low = free < node.disk_free_min_bytes();
            if node.disk.low.swap(low, Ordering::Relaxed) != low {
                match low {
                    true => tracing::error!(free, total, "disk space low: refusing new work until space is freed"),
                    false => tracing::info!(free, total, "disk space recovered: accepting new work again"),
                }
            }
        }
        Err(error) => tracing::warn!(%error, "cannot measure the data directory's free space"),
    }
}

async fn disk_loop(node: Arc<Node>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(DISK_CHECK_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        // No snapshot is forced when space runs low: a snapshot writes the
        // whole state, which can take more space than purging the log frees
        // (a test filling a small disk ran out of space doing just that).
        let node = node.clone();
        let _ = tokio::task::spawn_blocking(move || measure_disk(&node)).await;
    }
}

/// Measures how late a 100 ms timer fires: the worst lag of the last five
/// seconds is what readiness sees.
async fn watchdog(node: Arc<Node>, slot: usize, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let period = Duration::from_millis(100);
    let mut worst = 0u64;
    let mut window = Instant::now();
    loop {
        let before = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let lag = before.elapsed().saturating_sub(period).as_millis() as u64;
        worst = worst.max(lag);
        if slot == 1 {
            node.observe_apply(crate::store::monotonic_ms());
        }
        node.event_loop_lag_ms[slot].fetch_max(worst, Ordering::Relaxed);
        if window.elapsed() > Duration::from_secs(5) {
            node.event_loop_lag_ms[slot].store(worst, Ordering::Relaxed);
            worst = 0;
            window = Instant::now();
        }
    }
}

impl Node {
    /// Why this node cannot make progress, if it cannot: a log write that does
    /// not return (a stalled disk), or committed entries that are not applied
    /// (a wedged apply loop), decided by `controller::stall`. Such a node
    /// refuses writes at once, and as leader hands leadership over.
    pub fn stall(&self) -> Option<String> {
        let now_ms = crate::store::monotonic_ms();
        let write_started_ms = self.storage_health.write_started_ms.load(Ordering::Relaxed);
        let (apply, committed_index) = self.observe_apply(now_ms);
        controller::stall(&controller::Progress { now_ms, write_started_ms, apply, committed_index })
    }

    /// Notes the applied index and the committed one (the watchdog calls
    /// this every 100 ms, readiness on every probe), and answers what
    /// `ApplyProgress` makes of them with the committed index.
    fn observe_apply(&self, now_ms: u64) -> (ApplyProgress, u64) {
        let applied = *self.shared.applied_tx.borrow();
        let committed = self.storage_health.committed_index.load(Ordering::Relaxed);
        let progress = self.apply_progress.lock().expect("apply progress lock").observe(now_ms, applied, committed);
        (progress, committed)
    }

    /// Why this node is not useful right now, if it is not
    /// (`controller::problems` decides on what is gathered here).
    pub fn problems(&self) -> Vec<String> {
        let mut health = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            controller::Health {
                me: self.id(),
                raft_stopped: m.running_state.clone().err().map(|e| e.to_string()),
                leader: m.current_leader,
                applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                last_log_index: m.last_log_index.unwrap_or(0),
                quorum_ack_ms: m.millis_since_quorum_ack,
                election_timeout_max_ms: self.config.election_timeout_max_ms,
                ..controller::Health::default()
            }
        };
        health.stall = self.stall();
        health.clock_problem = self.clock_problem();
        health.disk_problem = self.disk_problem();
        health.event_loop_lag_ms = [0, 1].map(|slot| self.event_loop_lag_ms[slot].load(Ordering::Relaxed));
        controller::problems(&health)
    }
}

/// A fresh cluster is initialised by exactly one node: the lowest id among
/// the initial voters (or the only node). Others wait to be contacted. A node
/// whose storage already holds a log or vote skips this, so restarts are safe.
async fn initialize_if_first(raft: &Raft, config: &NodeConfig) -> anyhow::Result<()> {
    let members: BTreeMap<u64, Member> = if config.peers.is_empty() {
        BTreeMap::from([(config.node_id, config.member())])
    } else {
        config.peers.clone()
    };
    let first = *members.keys().next().expect("at least this node");
    if first != config.node_id {
        return Ok(());
    }
    let already = raft.is_initialized().await?;
    if already {
        return Ok(());
    }
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("initialised a new cluster"),
        Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

/// The leader's timers: every `timer_interval_ms`, tells the controller
/// this node's role and, while it serves as leader, the facts its duties are
/// decided on, and carries out what comes back.
async fn timer_loop(node: Arc<Node>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(node.config.timer_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (leads, term) = {
            let metrics = node.raft.server_metrics();
            let metrics = metrics.borrow();
            let leads = metrics.state == ServerState::Leader && metrics.current_leader == Some(node.id());
            (leads, metrics.vote.leader_id().term)
        };
        // A leader whose clock is off hands over like a stalled one: it is
        // not ready, and its clients would see it refuse.
        let stall = node.stall().or_else(|| node.clock_problem());
        let role = controller::Role { leading_term: leads.then_some(term), stall };
        let turn = node.controller().observe_role(crate::store::monotonic_ms(), &role);
        for action in turn.actions {
            node.carry_out(action).await;
        }
        if !turn.leads {
            continue;
        }
        // Gathered under the state lock, decided after it is let go: reading
        // the log clock takes that lock again.
        let (agents, agent_ttl_ms, next_due_ms, policy) = {
            let data = node.shared.data.read().expect("state lock");
            let state = &data.state;
            let agents: Vec<(String, u64)> = state.agents().map(|a| (a.id.clone(), a.epoch)).collect();
            (agents, state.limits().agent_ttl_ms, state.next_due_ms(), controller::PolicyFacts::of(state))
        };
        let actions = {
            let duties = controller::Duties {
                agents: &agents,
                agent_ttl_ms,
                next_due_ms,
                log_now_ms: &|| node.log_clock.now_ms(),
                policy,
                submits: controller::Submits {
                    accepted: node.stats.submits_accepted.load(Ordering::Relaxed),
                    refused: node.stats.submits_refused.load(Ordering::Relaxed),
                },
                readiness: node.cluster_readiness.lock().expect("readiness lock").clone(),
                readiness_probe_running: node
                    .readiness_probe
                    .lock()
                    .expect("readiness probe lock")
                    .as_ref()
                    .is_some_and(|probe| !probe.is_finished()),
            };
            node.controller().lead(crate::store::monotonic_ms(), &duties)
        };
        for action in actions {
            node.carry_out(action).await;
        }
    }
}

impl Node {
    /// Carries out one of the controller's actions (`controller::Action`
    /// says what each means).
    async fn carry_out(self: &Arc<Node>, action: Action) {
        match action {
            Action::KeepAlives(on) => self.raft.runtime_config().heartbeat(on),
            Action::Elections(allowed) => self.raft.runtime_config().elect(allowed),
            Action::ElectNow => {
                let leader = self.raft.metrics().borrow().current_leader;
                tracing::info!(
                    ?leader,
                    "the leader is silent past its lease everywhere this node can see: asking for an election"
                );
                self.stats.early_elections.fetch_add(1, Ordering::Relaxed);
                let _ = self.raft.trigger().elect().await;
            }
            Action::HandingOver(why) => {
                if let Some(why) = &why {
                    tracing::error!(%why, "the leader cannot serve: stepping down");
                }
                self.stepping_down.store(why.is_some(), Ordering::Relaxed);
            }
            Action::ResetLogClock => self.log_clock.reset(),
            Action::LeadershipBegan { .. } => {
                self.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            Action::ExpireAgent { agent_id, epoch } => {
                tracing::warn!(%agent_id, epoch, "agent missed its heartbeats: expiring it and releasing its leases");
                self.stats.agents_expired.fetch_add(1, Ordering::Relaxed);
                let node = self.clone();
                tokio::spawn(async move {
                    let _ = node.proposer.propose(Command::ExpireAgent { agent_id, epoch }).await;
                });
            }
            Action::Tick => {
                let _ = self.proposer.propose(Command::Tick).await;
            }
            Action::ProbeReadiness => {
                let probe = tokio::spawn(probe_readiness(self.clone()));
                *self.readiness_probe.lock().expect("readiness probe lock") = Some(probe);
            }
            Action::RollbackPolicy { to_version, note } => {
                tracing::error!(%note, "the policy guard rolls the policy back to version {to_version}");
                let command = Command::RollbackPolicy {
                    to_version,
                    note,
                    by_client: false,
                    force: false,
                    expected_version: None,
                };
                let _ = self.proposer.propose(command).await;
            }
        }
    }
}

/// How often a node probes the other voters for the election guard.
const ELECTION_PROBE_MS: u64 = 50;
/// How often it decides (on the answers it has): the early election
/// (`election_guard::elect_now`) starts within this of the lease's end.
const ELECTION_DECIDE_MS: u64 = 10;
/// How long each follower waits after the one before it (by id) before it
/// asks for an early election, so that two do not split the vote.
const ELECTION_STAGGER_MS: u64 = 50;
/// A node whose event loops ran this late (worst in the last few seconds)
/// does not ask for an early election: its own timers may be what is slow.
const ELECTION_LAG_MAX_MS: u64 = 50;

/// Probes every other voter's Raft listener every `ELECTION_PROBE_MS` and
/// decides whether this node may campaign (`election_guard.rs`): a node
/// that cannot make progress (a stall), cannot reach a majority, or reaches
/// a voter that still hears from a leader does not campaign, so it cannot
/// raise its term and disrupt a working leader (pre-vote's aim). And a
/// follower whose leader has gone silent past the lease, everywhere it can
/// see, asks for an election at once instead of waiting out one more
/// election timeout.
async fn election_loop(node: Arc<Node>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(ELECTION_DECIDE_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probe_timeout = Duration::from_millis(node.config.election_timeout_min_ms);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        ticks += 1;
        let (voters, peers, leader): (Vec<u64>, Vec<(u64, String)>, Option<u64>) = {
            let metrics = node.raft.server_metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters = membership.voter_ids().collect();
            let peers = membership
                .nodes()
                .filter(|(id, _)| **id != node.id())
                .map(|(id, member)| (*id, member.raft.clone()))
                .collect();
            (voters, peers, metrics.current_leader)
        };
        node.log_clock.set_voters(&voters);
        let probing = ticks.is_multiple_of(ELECTION_PROBE_MS / ELECTION_DECIDE_MS);
        for (peer, raft_addr) in peers.into_iter().filter(|_| probing) {
            let node = node.clone();
            tokio::spawn(async move {
                let mut request = node.http.get(node.peer_url(&raft_addr, "/raft/probe")).timeout(probe_timeout);
                if let Some(token) = &node.config.peer_token {
                    request = request.bearer_auth(token);
                }
                let sent = Instant::now();
                let failed = || {
                    let mut elections = node.elections.lock().expect("elections lock");
                    *elections.probe_failures.entry(peer).or_default() += 1;
                };
                let Ok(response) = request.send().await else { return failed() };
                let Ok(answer) = response.json::<serde_json::Value>().await else { return failed() };
                if answer["node_id"].as_u64() != Some(peer) {
                    return failed();
                }
                // The peer read its clock, as best this node can tell, half
                // way through the round trip (NTP's offset estimate).
                if let Some(wall_ms) = answer["wall_clock_ms"].as_u64() {
                    node.log_clock.record(peer, wall_ms, sent + sent.elapsed() / 2);
                }
                let mut elections = node.elections.lock().expect("elections lock");
                let at_ms = crate::store::monotonic_ms();
                elections.probe_failures.remove(&peer);
                let leader_contact_age_ms = answer["leader_contact_age_ms"].as_u64();
                elections.answers.insert(peer, crate::election_guard::PeerAnswer { at_ms, leader_contact_age_ms });
            });
        }
        let actions = {
            let mut elections = node.elections.lock().expect("elections lock");
            elections.answers.retain(|id, _| voters.contains(id));
            // Bounded by the membership, like the answers: a removed peer's count goes.
            elections.probe_failures.retain(|id, _| voters.contains(id));
            let now_ms = crate::store::monotonic_ms();
            let facts = controller::CampaignFacts {
                guard: crate::election_guard::Input {
                    now_ms,
                    me: node.id(),
                    voters: &voters,
                    answers: &elections.answers,
                    answer_fresh_ms: ELECTION_PROBE_MS * 5,
                    leader_alive_ms: node.config.election_timeout_min_ms,
                    clock_skew_ms: node.log_clock.own_skew_ms(),
                    clock_skew_max_ms: node.config.clock_skew_max_ms,
                },
                silence: crate::election_guard::Silence {
                    leader,
                    contact_age_ms: elections.leader_contact.map(|at| at.elapsed().as_millis() as u64),
                    lease_ms: node.config.election_timeout_max_ms,
                    stagger_ms: ELECTION_STAGGER_MS,
                    // Two failed probes in a row: one late answer is not enough.
                    leader_unanswering: leader.is_some_and(|leader| {
                        elections.probe_failures.get(&leader).is_some_and(|failures| *failures >= 2)
                    }),
                    lagging: node.event_loop_lag_ms.iter().any(|lag| lag.load(Ordering::Relaxed) > ELECTION_LAG_MAX_MS),
                },
                stall: node.stall(),
                leading: node.is_leader(),
            };
            let campaign = node.controller().campaign(now_ms, &facts);
            if campaign.hold_back.is_some() != elections.hold_back.is_some() {
                match &campaign.hold_back {
                    Some(why) => tracing::info!(%why, "holding back from elections"),
                    None => tracing::info!("may campaign again"),
                }
            }
            elections.hold_back = campaign.hold_back;
            campaign.actions
        };
        for action in actions {
            node.carry_out(action).await;
        }
    }
}

/// Probes every voter's readiness once and records the answer on the node.
async fn probe_readiness(node: Arc<Node>) {
    let voters: Vec<(u64, String)> = {
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voter_ids: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership.nodes().filter(|(id, _)| voter_ids.contains(id)).map(|(id, m)| (*id, m.api.clone())).collect()
    };
    let probes = voters.iter().map(|(id, api)| {
        let node = node.clone();
        async move {
            if *id == node.id() {
                let problems = node.problems();
                return (!problems.is_empty()).then(|| (*id, problems.join("; ")));
            }
            let answer = node
                .http
                .get(node.peer_url(api, "/health/ready"))
                .timeout(Duration::from_millis(controller::READINESS_PROBE_MS * 2))
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => {
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    let why = body["error"]["message"].as_str().unwrap_or("not ready").to_string();
                    Some((*id, why))
                }
                Err(error) => Some((*id, format!("no answer: {error}"))),
            }
        }
    });
    let not_ready: Vec<(u64, String)> = futures::future::join_all(probes).await.into_iter().flatten().collect();
    let readiness = ClusterReadiness { at_ms: crate::store::monotonic_ms(), voters: voters.len(), not_ready };
    *node.cluster_readiness.lock().expect("readiness lock") = Some(readiness);
}
