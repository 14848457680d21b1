//! A running node: opens storage, starts the Raft replica, the proposer, the
//! leader's timer loop and the HTTP server, and wires them together.
//!
//! The timer loop is the only place that turns time into commands: it
//! proposes `ExpireAgent` when an agent's heartbeat time-to-live runs out
//! (monotonic time) and `Tick` when a lease, backoff or deadline falls due
//! (log time, `clock.rs`). Agent liveness is
//! soft state here, rebuilt (everyone gets a fresh time-to-live) whenever this
//! node becomes leader, so a failover never expires the fleet.

use crate::config::NodeConfig;
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

/// When each agent session last showed it is alive (heartbeat or poll).
#[derive(Default)]
pub struct Liveness {
    /// agent id -> (epoch, last seen)
    seen: BTreeMap<String, (u64, Instant)>,
}

impl Liveness {
    pub fn touch(&mut self, agent_id: &str, epoch: u64) {
        self.seen.insert(agent_id.to_string(), (epoch, Instant::now()));
    }
}

/// What the election guard (`election_guard.rs`) knows: the peers' latest
/// probe answers and when this node last heard from a leader.
pub struct Elections {
    /// The origin of the guard's monotonic milliseconds.
    pub origin: Instant,
    pub answers: BTreeMap<u64, crate::election_guard::PeerAnswer>,
    /// When an append or snapshot from a leader was last accepted here.
    pub leader_contact: Option<Instant>,
    /// Why this node holds back from campaigning, if it does.
    pub hold_back: Option<String>,
    /// How many probes of each peer have failed in a row (refused, timed
    /// out, or answered as someone else) since it last answered.
    pub probe_failures: BTreeMap<u64, u32>,
}

impl Default for Elections {
    fn default() -> Elections {
        Elections {
            origin: Instant::now(),
            answers: BTreeMap::new(),
            leader_contact: None,
            hold_back: None,
            probe_failures: BTreeMap::new(),
        }
    }
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
}

pub struct Node {
    pub config: NodeConfig,
    pub raft: Raft,
    pub shared: Arc<StateMachineShared>,
    pub proposer: Proposer,
    /// For forwarding requests to the leader.
    pub http: reqwest::Client,
    pub liveness: Mutex<Liveness>,
    pub storage_health: Arc<crate::store::StorageHealth>,
    /// Worst scheduling delay seen recently on the API threads [0] and the
    /// consensus threads [1]: a stalled event loop is a node that looks alive.
    pub event_loop_lag_ms: [AtomicU64; 2],
    /// The applied index and since when it has stood still behind the
    /// committed index, if it has (see `observe_apply`).
    pub apply_progress: Mutex<(u64, Option<Instant>)>,
    /// What the policy guard last learnt of every voter's readiness.
    pub cluster_readiness: Mutex<Option<ClusterReadiness>>,
    /// When each peer last answered this node's Raft RPCs.
    pub peer_contacts: Arc<Mutex<BTreeMap<u64, Instant>>>,
    pub pollers: Arc<Semaphore>,
    pub requests_in_flight: Arc<Semaphore>,
    pub rate_limiter: crate::admission::RateLimiter,
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
    /// Notes that a leader's append or snapshot was accepted here.
    pub fn heard_from_leader(&self) {
        self.elections.lock().expect("elections lock").leader_contact = Some(Instant::now());
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
    /// The threads that run consensus when Raft has its own listener.
    raft_runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(runtime) = self.raft_runtime.take() {
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
        // With the proposer's BATCH_BYTES_MAX this bounds one append RPC to
        // about 32 x (1 MiB + one request) bytes, under raft_request_bytes_max.
        max_payload_entries: 32,
        ..Default::default()
    };
    Ok(raft_config.validate()?)
}

pub async fn start(config: NodeConfig) -> anyhow::Result<Running> {
    config.validate().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (log_store, state_machine) =
        store::open(&config.data_dir).with_context(|| format!("opening storage in {}", config.data_dir.display()))?;
    let shared = state_machine.shared();
    let log_clock = Arc::new(crate::clock::LogClock::new(config.node_id, config.clock_skew_max_ms, shared.clone()));
    let mut config = config;
    let descriptors = raise_descriptor_limit(&mut config);
    let storage_health = log_store.health.clone();
    let raft_config = Arc::new(raft_config(&config)?);
    let network = Network::new(config.peer_token.clone());
    let peer_contacts = network.contacts.clone();

    // With a Raft listener of its own, consensus (the Raft core, storage,
    // apply, the proposer, the timers and the Raft RPC server) runs on
    // dedicated threads: client load on the API threads cannot delay a
    // keep-alive into an election.
    let raft_runtime = match config.raft_listen {
        Some(_) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("phalanx-raft")
                .enable_all()
                .build()
                .context("starting the Raft threads")?,
        ),
        None => None,
    };
    let consensus = raft_runtime.as_ref().map(|r| r.handle().clone()).unwrap_or_else(tokio::runtime::Handle::current);
    let node_id = config.node_id;
    let raft = consensus
        .spawn(async move { Raft::new(node_id, raft_config, network, log_store, state_machine).await })
        .await??;

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let raft_listener = match config.raft_listen {
        Some(raft_listen) => Some(
            consensus
                .spawn(async move { tokio::net::TcpListener::bind(raft_listen).await })
                .await?
                .with_context(|| format!("binding the Raft listener {raft_listen}"))?,
        ),
        None => None,
    };
    let raft_addr = raft_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    if config.advertise.is_none() {
        config.advertise = Some(addr.to_string());
    }
    if let Some(raft_addr) = raft_addr {
        config.raft_listen = Some(raft_addr);
    }

    initialize_if_first(&raft, &config).await?;

    let proposer = {
        let _inside = consensus.enter();
        Proposer::start(
            raft.clone(),
            log_clock.clone(),
            config.batch_commands_max,
            config.proposals_in_flight_max,
            config.write_timeout_ms,
        )
    };
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .connect_timeout(Duration::from_millis(crate::api::FORWARD_CONNECT_TIMEOUT_MS))
        .build()?;
    let node = Arc::new(Node {
        pollers: Arc::new(Semaphore::new(config.pollers_max)),
        requests_in_flight: Arc::new(Semaphore::new(config.requests_in_flight_max)),
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
        liveness: Mutex::new(Liveness::default()),
        peer_contacts,
        storage_health,
        event_loop_lag_ms: [AtomicU64::new(0), AtomicU64::new(0)],
        apply_progress: Mutex::new((0, None)),
        listener_stats: Arc::default(),
        cluster_readiness: Mutex::new(None),
        stats: NodeStats::default(),
        elections: Mutex::default(),
        log_clock,
        disk: DiskSpace::default(),
        stepping_down: AtomicBool::new(false),
        descriptors,
    });
    // Measured once before serving, so the first request already knows.
    measure_disk(&node);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    consensus.spawn(timer_loop(node.clone(), shutdown_rx.clone()));
    consensus.spawn(election_loop(node.clone(), shutdown_rx.clone()));
    tokio::spawn(disk_loop(node.clone(), shutdown_rx.clone()));
    tokio::spawn(watchdog(node.clone(), 0, shutdown_rx.clone()));
    consensus.spawn(watchdog(node.clone(), 1, shutdown_rx.clone()));
    if let Some(raft_listener) = raft_listener {
        let router = crate::api::raft_router(node.clone());
        let mut raft_shutdown = shutdown_rx.clone();
        consensus.spawn(async move {
            let _ = axum::serve(raft_listener, router)
                .with_graceful_shutdown(async move {
                    let _ = raft_shutdown.wait_for(|stop| *stop).await;
                })
                .await;
        });
    }
    let router = crate::api::router(node.clone());
    let settings = crate::listener::Settings::of(&node.config);
    let listener = crate::listener::BoundedListener::new(listener, settings, node.listener_stats.clone());
    let server = tokio::spawn(crate::listener::serve(listener, router, shutdown_rx));
    tracing::info!(node_id = node.id(), %addr, ?raft_addr, "node serving");
    Ok(Running { node, addr, raft_addr, shutdown_tx, server, raft_runtime })
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
        let skew = self.log_clock.own_skew_ms()?;
        (skew.unsigned_abs() > self.config.clock_skew_max_ms).then(|| {
            format!(
                "clock skew: this node's clock is {skew} ms from the majority's, past clock_skew_max_ms {}",
                self.config.clock_skew_max_ms
            )
        })
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

/// Event loop lag past which a node is not ready.
pub const EVENT_LOOP_LAG_MS_MAX: u64 = 1_000;
/// A log write in progress for longer than this is a stalled disk.
pub const STORAGE_STALL_MS: u64 = 2_000;
/// Committed entries waiting this long with the applied index standing still
/// is a stalled apply loop.
pub const APPLY_STALL_MS: u64 = 2_000;

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
            node.observe_apply();
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
    /// (a wedged apply loop). Such a node refuses writes at once, and as
    /// leader hands leadership over.
    pub fn stall(&self) -> Option<String> {
        let started = self.storage_health.write_started_ms.load(Ordering::Relaxed);
        let writing_ms = crate::store::monotonic_ms().saturating_sub(started);
        if started != 0 && writing_ms > STORAGE_STALL_MS {
            return Some(format!("storage write stalled for {writing_ms} ms"));
        }
        let (applied, behind_since) = self.observe_apply();
        let still = behind_since.map_or(0, |since| since.elapsed().as_millis() as u64);
        if still > APPLY_STALL_MS {
            let committed = self.storage_health.committed_index.load(Ordering::Relaxed);
            return Some(format!("apply stalled for {still} ms at index {applied} (committed {committed})"));
        }
        None
    }

    /// Notes the applied index and since when it has stood still behind the
    /// committed one (the watchdog calls this every 100 ms, readiness on
    /// every probe). Only standing still while behind counts: an idle node
    /// is not stalled, and neither is one whose committed index has just
    /// jumped (catching up after a partition heals).
    fn observe_apply(&self) -> (u64, Option<Instant>) {
        let applied = *self.shared.applied_tx.borrow();
        let behind = self.storage_health.committed_index.load(Ordering::Relaxed) > applied;
        let mut progress = self.apply_progress.lock().expect("apply progress lock");
        if progress.0 != applied || !behind {
            *progress = (applied, None);
        }
        if behind && progress.1.is_none() {
            progress.1 = Some(Instant::now());
        }
        *progress
    }

    /// Why this node is not useful right now, if it is not: no leader known,
    /// apply far behind, a stalled disk or event loop, or (as leader) no
    /// contact with a quorum.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let (running, leader, applied, last_log, quorum_ack) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (
                m.running_state.clone().err().map(|e| e.to_string()),
                m.current_leader,
                m.last_applied.map(|l| l.index).unwrap_or(0),
                m.last_log_index.unwrap_or(0),
                m.millis_since_quorum_ack,
            )
        };
        if let Some(fatal) = running {
            problems.push(format!("raft stopped: {fatal}"));
        }
        if leader.is_none() {
            problems.push("no leader known".into());
        }
        if last_log.saturating_sub(applied) > 10_000 {
            problems.push(format!("apply lag {} entries", last_log - applied));
        }
        problems.extend(self.stall());
        problems.extend(self.clock_problem());
        problems.extend(self.disk_problem());
        for (slot, name) in ["api", "consensus"].iter().enumerate() {
            let lag = self.event_loop_lag_ms[slot].load(Ordering::Relaxed);
            if lag > EVENT_LOOP_LAG_MS_MAX {
                problems.push(format!("{name} event loop stalled {lag} ms"));
            }
        }
        if leader == Some(self.id()) {
            let limit = self.config.election_timeout_max_ms * 3;
            if quorum_ack.is_some_and(|ms| ms > limit) {
                problems.push(format!("leader has had no quorum contact for {} ms", quorum_ack.unwrap_or(0)));
            }
        }
        problems
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

async fn timer_loop(node: Arc<Node>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(node.config.timer_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_term: Option<u64> = None;
    let mut guard = PolicyGuard::default();
    let mut stepped_down: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (state, term, leader) = {
            let metrics = node.raft.server_metrics();
            let metrics = metrics.borrow();
            (metrics.state, metrics.vote.leader_id().term, metrics.current_leader)
        };
        // A leader whose clock is off hands over like a stalled one: it is
        // not ready, and its clients would see it refuse.
        let stall = node.stall().or_else(|| node.clock_problem());
        if state != ServerState::Leader || leader != Some(node.id()) {
            if stepped_down.take().is_some() {
                node.raft.runtime_config().heartbeat(true);
                node.stepping_down.store(false, Ordering::Relaxed);
            }
            if leading_term.is_some() {
                node.log_clock.reset();
            }
            // Whether a follower campaigns is `election_loop`'s to decide.
            leading_term = None;
            continue;
        }
        // A leader whose disk or apply loop has stalled hands leadership over:
        // it stops its keep-alives so a healthy follower times out and is elected.
        if let Some(why) = stall.as_ref().filter(|_| stepped_down.is_none()) {
            tracing::error!(%why, "the leader cannot serve: stepping down");
            node.raft.runtime_config().heartbeat(false);
            node.raft.runtime_config().elect(false);
            node.stepping_down.store(true, Ordering::Relaxed);
            stepped_down = Some(Instant::now());
            continue;
        }
        if let Some(at) = stepped_down {
            if stall.is_some() || at.elapsed() < Duration::from_millis(node.config.election_timeout_max_ms * 5) {
                continue;
            }
            // No one took over (a one-node cluster, or no healthy peer): lead again.
            node.raft.runtime_config().heartbeat(true);
            node.raft.runtime_config().elect(true);
            node.stepping_down.store(false, Ordering::Relaxed);
            stepped_down = None;
        }
        if leading_term != Some(term) {
            // New leadership: every agent starts with a fresh time-to-live.
            leading_term = Some(term);
            node.log_clock.reset();
            node.stats.leader_changes.fetch_add(1, Ordering::Relaxed);
            node.liveness.lock().expect("liveness lock").seen.clear();
        }
        let (agents, next_due_ms, ttl) = {
            let data = node.shared.data.read().expect("state lock");
            let agents: Vec<(String, u64)> = data.state.agents().map(|a| (a.id.clone(), a.epoch)).collect();
            (agents, data.state.next_due_ms(), Duration::from_millis(data.state.limits().agent_ttl_ms))
        };
        let mut expired = Vec::new();
        {
            let mut liveness = node.liveness.lock().expect("liveness lock");
            let now = Instant::now();
            let known: std::collections::BTreeSet<&String> = agents.iter().map(|(id, _)| id).collect();
            liveness.seen.retain(|id, _| known.contains(id));
            for (agent_id, epoch) in &agents {
                let entry = liveness.seen.entry(agent_id.clone()).or_insert((*epoch, now));
                if entry.0 != *epoch {
                    *entry = (*epoch, now);
                }
                if now.duration_since(entry.1) > ttl {
                    expired.push((agent_id.clone(), *epoch));
                }
            }
        }
        for (agent_id, epoch) in expired {
            tracing::warn!(%agent_id, epoch, "agent missed its heartbeats: expiring it and releasing its leases");
            node.stats.agents_expired.fetch_add(1, Ordering::Relaxed);
            let node = node.clone();
            tokio::spawn(async move {
                let _ = node.proposer.propose(Command::ExpireAgent { agent_id, epoch }).await;
            });
        }
        // Log time against log time: this node's wall clock plays no part.
        if next_due_ms.is_some_and(|due| due <= node.log_clock.now_ms()) {
            let _ = node.proposer.propose(Command::Tick).await;
        }
        if let Some(command) = guard.check(&node) {
            tracing::error!(?command, "the policy guard rolls a change back");
            let _ = node.proposer.propose(command).await;
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
    let mut campaigning = true;
    let mut ticks = 0u64;
    let mut asked_at: Option<Instant> = None;
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
                let mut request = node.http.get(format!("http://{raft_addr}/raft/probe")).timeout(probe_timeout);
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
                let at_ms = elections.origin.elapsed().as_millis() as u64;
                elections.probe_failures.remove(&peer);
                let leader_contact_age_ms = answer["leader_contact_age_ms"].as_u64();
                elections.answers.insert(peer, crate::election_guard::PeerAnswer { at_ms, leader_contact_age_ms });
            });
        }
        let decision = {
            let mut elections = node.elections.lock().expect("elections lock");
            elections.answers.retain(|id, _| voters.contains(id));
            let input = crate::election_guard::Input {
                now_ms: elections.origin.elapsed().as_millis() as u64,
                me: node.id(),
                voters: &voters,
                answers: &elections.answers,
                answer_fresh_ms: ELECTION_PROBE_MS * 5,
                leader_alive_ms: node.config.election_timeout_min_ms,
                clock_skew_ms: node.log_clock.own_skew_ms(),
                clock_skew_max_ms: node.config.clock_skew_max_ms,
            };
            // A node that cannot make progress does not campaign either: it
            // would only win leadership it cannot use.
            let decision = match node.stall() {
                Some(why) => crate::election_guard::Decision::HoldBack(why),
                None => crate::election_guard::decide(&input),
            };
            let why = match &decision {
                crate::election_guard::Decision::Campaign => None,
                crate::election_guard::Decision::HoldBack(why) => Some(why.clone()),
            };
            if why.is_some() != elections.hold_back.is_some() {
                match &why {
                    Some(why) => tracing::info!(%why, "holding back from elections"),
                    None => tracing::info!("may campaign again"),
                }
            }
            let silence = crate::election_guard::Silence {
                leader,
                contact_age_ms: elections.leader_contact.map(|at| at.elapsed().as_millis() as u64),
                lease_ms: node.config.election_timeout_max_ms,
                stagger_ms: ELECTION_STAGGER_MS,
                // Two failed probes in a row: one late answer is not enough.
                leader_unanswering: leader
                    .is_some_and(|leader| elections.probe_failures.get(&leader).is_some_and(|failures| *failures >= 2)),
                lagging: node.event_loop_lag_ms.iter().any(|lag| lag.load(Ordering::Relaxed) > ELECTION_LAG_MAX_MS),
            };
            let early = decision == crate::election_guard::Decision::Campaign
                && crate::election_guard::elect_now(&input, &silence)
                && asked_at.is_none_or(|at| at.elapsed() > Duration::from_millis(node.config.election_timeout_max_ms));
            elections.hold_back = why;
            (decision, early)
        };
        let (decision, early) = decision;
        let allowed = decision == crate::election_guard::Decision::Campaign;
        let leading = node.is_leader();
        if allowed != campaigning && !leading {
            campaigning = allowed;
            node.raft.runtime_config().elect(allowed);
        }
        if early && !leading {
            asked_at = Some(Instant::now());
            tracing::info!(
                ?leader,
                "the leader is silent past its lease everywhere this node can see: asking for an election"
            );
            node.stats.early_elections.fetch_add(1, Ordering::Relaxed);
            let _ = node.raft.trigger().elect().await;
        }
    }
}

/// What the leader last learnt of every voter's readiness (its own
/// `problems()`, the others' `/health/ready`, an unanswered probe counting
/// as not ready).
#[derive(Clone, Debug)]
pub struct ClusterReadiness {
    pub at: Instant,
    pub voters: usize,
    pub not_ready: Vec<(u64, String)>,
}

/// How often the guard probes the voters' readiness inside its window.
const READINESS_PROBE_MS: u64 = 500;

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
                .get(format!("http://{api}/health/ready"))
                .timeout(Duration::from_millis(READINESS_PROBE_MS * 2))
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
    let readiness = ClusterReadiness { at: Instant::now(), voters: voters.len(), not_ready };
    *node.cluster_readiness.lock().expect("readiness lock") = Some(readiness);
}

/// Watches the cluster for `policy_guard_ms` after each policy change (by
/// log time, so a new leader takes over the watch where the old one left
/// it). If dispatch stalls (work is ready, an agent has room, and no lease
/// is granted), or a majority of the voters is not ready, for
/// `POLICY_STALL_MS`, or the share of refused submits jumps (see
/// `REFUSED_SHARE_JUMP`), the change is rolled back to the previous version
/// and the rollback recorded with the reason.
///
/// Clocks: the window's remaining length is read once, when this node first
/// sees the version, as log time against log time (`set_ms` and the
/// state's `now_ms`); from then on every duration is measured on this
/// node's monotonic clock. No wall-clock reading is compared with log time.
#[derive(Default)]
struct PolicyGuard {
    watch: Watch,
    /// Samples of this node's submit counters, `(when, accepted, refused)`,
    /// oldest first, spanning at most `REFUSAL_WINDOW_MS`.
    submits: std::collections::VecDeque<(Instant, u64, u64)>,
    probe: Option<(Instant, tokio::task::JoinHandle<()>)>,
}

/// What the guard knows of the version it watches.
#[derive(Default)]
struct Watch {
    version: u64,
    /// When this node first saw the version, and when its watch ends
    /// (`None`: never).
    seen_at: Option<Instant>,
    until: Option<Instant>,
    leases_granted: u64,
    stalled_since: Option<Instant>,
    unready_since: Option<Instant>,
    /// Submits accepted and refused in the `REFUSAL_WINDOW_MS` before the
    /// version was seen, and the counters when it was seen.
    submits_before: (u64, u64),
    submits_at_change: (u64, u64),
}

/// How long dispatch may stall, or a majority stay unready, inside the guard
/// window before a rollback.
const POLICY_STALL_MS: u64 = 2_000;

/// The window before a change whose refused share of submits is the
/// baseline: long enough to hold a sample of ordinary traffic, short enough
/// to describe the traffic just before the change.
const REFUSAL_WINDOW_MS: u64 = 10_000;

/// Submits judged after a change before a jump counts. With fewer, one
/// client's handful of bad requests would be a large share; at 20, a jump of
/// `REFUSED_SHARE_JUMP` is at least 10 submits refused beyond the baseline.
const REFUSED_SUBMITS_MIN: u64 = 20;

/// How far the refused share of submits must rise over its baseline for a
/// rollback. Half of all submits newly refused is a service broken by its
/// own policy, not a tightened limit that turns some clients away; measured
/// against the baseline, so a client that sent only bad requests before the
/// change cannot trigger it, and a busy node (`overloaded`, `rate_limited`)
/// is not counted as refusing at all.
const REFUSED_SHARE_JUMP: f64 = 0.5;

impl PolicyGuard {
    fn check(&mut self, node: &Arc<Node>) -> Option<Command> {
        let now = Instant::now();
        let submits =
            (node.stats.submits_accepted.load(Ordering::Relaxed), node.stats.submits_refused.load(Ordering::Relaxed));
        let window = Duration::from_millis(REFUSAL_WINDOW_MS);
        while self.submits.front().is_some_and(|(at, _, _)| now.duration_since(*at) > window) {
            self.submits.pop_front();
        }
        let oldest = self.submits.front().map_or(submits, |(_, accepted, refused)| (*accepted, *refused));
        self.submits.push_back((now, submits.0, submits.1));

        let data = node.shared.data.read().expect("state lock");
        let state = &data.state;
        let version = state.policy_version();
        let granted = state.counters().leases_granted;
        let history = state.policy_history();
        let set_ms = history.last().map_or(0, |v| v.set_ms);
        if version != self.watch.version {
            let remaining_ms = set_ms.saturating_add(state.limits().policy_guard_ms).saturating_sub(state.now_ms());
            self.watch = Watch {
                version,
                seen_at: Some(now),
                // `None` (a window past what `Instant` can count) never ends.
                until: now.checked_add(Duration::from_millis(remaining_ms)),
                leases_granted: granted,
                submits_before: (submits.0.saturating_sub(oldest.0), submits.1.saturating_sub(oldest.1)),
                submits_at_change: submits,
                ..Watch::default()
            };
        }
        // Only a change made by a client is watched: a rollback is not rolled back.
        let watched = history.len() >= 2 && history.last().is_some_and(|v| !v.note.starts_with("rollback"));
        if !watched || self.watch.until.is_some_and(|until| now > until) {
            return None;
        }
        let previous = history[history.len() - 2].version;
        let rollback = |note: String| {
            tracing::error!(%note, "rolling the policy back to version {previous}");
            Some(Command::RollbackPolicy { to_version: previous, note, by_client: false, force: false })
        };

        // Dispatch.
        if granted != self.watch.leases_granted || !state.dispatch_possible() {
            self.watch.leases_granted = granted;
            self.watch.stalled_since = None;
        } else {
            let stalled = now.duration_since(*self.watch.stalled_since.get_or_insert(now));
            if stalled >= Duration::from_millis(POLICY_STALL_MS) {
                self.watch.version = 0;
                return rollback(format!("dispatch stalled for {} ms after version {version}", stalled.as_millis()));
            }
        }
        drop(data);

        // Refused submits. A failed rollback proposal is retried at the next
        // check, from the same counts.
        if let Some(why) = self.refusal_jump(submits) {
            return rollback(format!("{why} after version {version}"));
        }

        // Readiness of the voters, probed in the background.
        if self
            .probe
            .as_ref()
            .is_none_or(|(at, probe)| probe.is_finished() && at.elapsed() >= Duration::from_millis(READINESS_PROBE_MS))
        {
            self.probe = Some((now, tokio::spawn(probe_readiness(node.clone()))));
        }
        let readiness = node.cluster_readiness.lock().expect("readiness lock").clone()?;
        if self.watch.seen_at.is_some_and(|seen_at| readiness.at < seen_at) {
            return None; // learnt before the change
        }
        if readiness.not_ready.len() * 2 <= readiness.voters {
            self.watch.unready_since = None;
            return None;
        }
        let unready = now.duration_since(*self.watch.unready_since.get_or_insert(readiness.at));
        if unready < Duration::from_millis(POLICY_STALL_MS) {
            return None;
        }
        self.watch.version = 0;
        let who: Vec<String> = readiness.not_ready.iter().map(|(id, why)| format!("node {id}: {why}")).collect();
        rollback(format!(
            "readiness lost on {} of {} voters for {} ms after version {version} ({})",
            readiness.not_ready.len(),
            readiness.voters,
            unready.as_millis(),
            who.join("; ")
        ))
    }

    /// The refused share of submits since the change, if it rose by
    /// `REFUSED_SHARE_JUMP` or more over the share in the window before it
    /// (over at least `REFUSED_SUBMITS_MIN` submits), said in a sentence.
    fn refusal_jump(&self, submits: (u64, u64)) -> Option<String> {
        let (at_accepted, at_refused) = self.watch.submits_at_change;
        let refused = submits.1.saturating_sub(at_refused);
        let total = submits.0.saturating_sub(at_accepted).saturating_add(refused);
        if total < REFUSED_SUBMITS_MIN {
            return None;
        }
        let (before_accepted, before_refused) = self.watch.submits_before;
        let before_total = before_accepted.saturating_add(before_refused);
        let share_before = if before_total == 0 { 0.0 } else { before_refused as f64 / before_total as f64 };
        let share_after = refused as f64 / total as f64;
        if share_after - share_before < REFUSED_SHARE_JUMP {
            return None;
        }
        Some(format!(
            "refused submits jumped from {:.0}% ({before_refused} of {before_total} in the {REFUSAL_WINDOW_MS} ms before) to {:.0}% ({refused} of {total})",
            share_before * 100.0,
            share_after * 100.0
        ))
    }
}
