//! The seeded simulation of a whole Phalanx cluster, in one process and in
//! simulated time.
//!
//! Three or five nodes run the real state machine (`phalanx-core`), the real
//! openraft and the real storage code (`phalanx-server::store`, redb in a
//! temporary directory, its work run inline), over a simulated network
//! (`net.rs`) that partitions (symmetric, one-way, partial), delays, loses,
//! duplicates and so reorders messages. A nemesis crashes nodes (a restart
//! reads what the crashed node had written to disk), pauses them, cuts links
//! and heals; clients and agents (`workload.rs`) submit, lease, extend, fail,
//! complete, delegate, wait, read and change the policy through a model of
//! the API's routing (`cluster.rs`), and every answer goes into a history
//! (`history.rs`) that the invariants are checked against, as the run goes
//! and at its end.
//!
//! Every random choice comes from one seed, and time is tokio's paused
//! clock on one thread: the same seed replays the same run, and its report
//! (standard output) is the same byte for byte. openraft draws its election
//! timeouts from an unseeded generator, so each node gets a fixed timeout of
//! its own instead (different per node, so elections still resolve).
//!
//! `Plant` puts a known bug into the simulated cluster, to show that the
//! invariants catch it.

pub mod cluster;
pub mod history;
pub mod net;
pub mod workload;

use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub use cluster::World;

/// A known bug, planted on purpose (`phalanx sim --plant NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// The API takes the task's current fence instead of checking the
    /// client's: a result from a superseded lease is accepted.
    StaleFence,
    /// A log write is acknowledged before it is durable: a crash loses the
    /// last entries the node had acknowledged.
    AckBeforeFsync,
    /// A "linearizable" read is served from the node's own state without
    /// confirming leadership and waiting for the read index.
    SkipReadBarrier,
    /// Leases granted by one poll are handed to the next poller as well.
    DoubleGrant,
}

impl Plant {
    pub const ALL: [Plant; 4] = [Plant::StaleFence, Plant::AckBeforeFsync, Plant::SkipReadBarrier, Plant::DoubleGrant];

    pub fn name(self) -> &'static str {
        match self {
            Plant::StaleFence => "stale-fence",
            Plant::AckBeforeFsync => "ack-before-fsync",
            Plant::SkipReadBarrier => "skip-read-barrier",
            Plant::DoubleGrant => "double-grant",
        }
    }

    pub fn parse(name: &str) -> Option<Plant> {
        Plant::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What one simulated run does.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u64,
    /// Simulated milliseconds of faults; then everything heals, and the
    /// cluster must elect a leader and serve writes within `recover_ms`.
    pub fault_ms: u64,
    pub recover_ms: u64,
    pub plant: Option<Plant>,
}

impl Default for Options {
    fn default() -> Options {
        Options { nodes: 3, fault_ms: 20_000, recover_ms: 15_000, plant: None }
    }
}

/// The outcome of one run: what happened (counts) and what went wrong.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub counts: BTreeMap<&'static str, u64>,
    /// Each broken invariant, described; empty when the run is sound.
    pub violations: Vec<String>,
    pub simulated_ms: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report as printed: one line of counts, then one line per
    /// violation. Only simulated facts: the same seed prints the same bytes.
    pub fn render(&self) -> String {
        let counts: Vec<String> = self.counts.iter().map(|(name, n)| format!("{name}={n}")).collect();
        let mut text = format!(
            "seed {} nodes {}: {} in {} simulated ms; {}\n",
            self.seed,
            self.nodes,
            if self.ok() { "ok".to_string() } else { format!("{} violation(s)", self.violations.len()) },
            self.simulated_ms,
            counts.join(" ")
        );
        for violation in &self.violations {
            text.push_str(&format!("  violation: {violation}\n"));
        }
        text
    }
}

/// The world every simulated task shares. One thread, never locked across
/// an `.await`.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<World>>);

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, World> {
        // A panic while locked is a bug the run reports; the state stays readable.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs one seed to the end and reports. Builds its own single-threaded
/// runtime with a paused clock, so runs do not share anything.
pub fn run(seed: u64, options: &Options) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    let root = scratch_dir();
    let rng = rand::rngs::StdRng::seed_from_u64(seed);
    let report = runtime.block_on(async {
        let shared = Shared(Arc::new(Mutex::new(World::new(rng, root.path().to_path_buf(), options.clone()))));
        workload::run(shared, seed, options).await
    });
    // openraft's tasks of crashed incarnations end with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    report
}

/// A fresh directory for a run's data, in memory where the machine has a
/// tmpfs (fsync then costs nothing and the run is fast), else in the
/// system's temporary directory.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("phalanx-sim-").tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::Builder::new().prefix("phalanx-sim-").tempdir().expect("a temporary directory")
}
