//! The `phalanx` binary: runs a node (`server`), talks to a cluster (`task`,
//! `status`), runs a built-in agent (`agent run`), and drives the `demo` and
//! the `bench`. Argument parsing and printing live here; everything else is in
//! the library crates.

/// mimalloc instead of glibc's malloc: under overload a node spent a fifth of
/// its CPU in glibc's allocator (BENCHMARKS.md, "Overload").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns to the system the memory that a node's start freed. Loading a
/// large state frees about as much as the state itself (openraft reads the
/// snapshot file whole to learn its meta; decoding collects and sorts the
/// tasks before building their map; the invariants are checked against a
/// second count of every index), and mimalloc keeps freed memory resident
/// until later allocations get round to purging it, which a node at rest
/// never does. One forced collection, once, after the start.
fn release_freed_memory() {
    extern "C" {
        /// mimalloc's `mi_collect`, linked with the allocator above.
        fn mi_collect(force: bool);
    }
    // SAFETY: a C function of the linked allocator with no precondition,
    // safe to call from any thread at any time.
    unsafe { mi_collect(true) }
}

mod bench;
mod budget;
mod client_commands;
mod delegation;
mod demo;
mod exec_agent;
mod failover;
mod fairness;
mod launcher;
mod netns;
mod overload;
mod rawhttp;
mod restart;
mod sim;
mod steady;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "phalanx", version, about = "A replicated orchestrator for multi-agent systems")]
struct Cli {
    /// Print the cluster's answers as JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Commands,
}

/// The client port a node listens on unless told otherwise (`--listen`),
/// and the port a client assumes when an address names none.
pub const CLIENT_PORT_DEFAULT: u16 = 7070;

/// How client commands find the cluster.
#[derive(Args, Clone)]
pub struct Connect {
    /// Comma-separated node addresses, HOST[:PORT] (port 7070 when left
    /// out); any node will do, the others are tried when one does not answer.
    #[arg(long, env = "PHALANX_NODES", default_value = "127.0.0.1:7070", global = true)]
    pub nodes: String,
    /// Client token, when the cluster requires one.
    #[arg(long, env = "PHALANX_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The PEM CA file `https://` nodes are verified by (default: the
    /// system's roots).
    #[arg(long, env = "PHALANX_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

impl Connect {
    /// The node addresses as `host:port`, or why one is not an address.
    pub fn node_list(&self) -> anyhow::Result<Vec<String>> {
        let nodes: Vec<String> = self
            .nodes
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .map(node_address)
            .collect::<anyhow::Result<_>>()?;
        anyhow::ensure!(!nodes.is_empty(), "--nodes (or PHALANX_NODES) names no node");
        Ok(nodes)
    }
}

/// One `--nodes` entry as `host:port` (plain HTTP) or `https://host:port`
/// (TLS): an `http://` prefix and a trailing `/` are dropped, a missing port
/// is the client port default. Any other scheme is refused rather than misread.
fn node_address(node: &str) -> anyhow::Result<String> {
    let (bare, prefix) = match node.split_once("://") {
        Some(("http", rest)) => (rest, ""),
        Some(("https", rest)) => (rest, "https://"),
        Some((scheme, _)) => anyhow::bail!(
            "{node:?} in --nodes: nodes speak http:// or https://, not {scheme}:// (give HOST[:PORT], e.g. 127.0.0.1:7070)"
        ),
        None => (node, ""),
    };
    let bare = bare.trim_end_matches('/');
    anyhow::ensure!(
        !bare.is_empty() && !bare.contains('/') && !bare.contains(char::is_whitespace),
        "{node:?} in --nodes is not HOST[:PORT] (e.g. 127.0.0.1:7070)"
    );
    // `[::1]:7070` and `[::1]` for IPv6; a bare IPv6 address needs the brackets.
    let (host, port) = if let Some(rest) = bare.strip_prefix('[') {
        let (host, after) =
            rest.split_once(']').with_context(|| format!("{node:?} in --nodes: an unclosed [ in an IPv6 address"))?;
        (format!("[{host}]"), after.strip_prefix(':').map(str::to_string))
    } else {
        match bare.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                anyhow::bail!("{node:?} in --nodes: write an IPv6 address in brackets, e.g. [::1]:7070")
            }
            Some((host, port)) => (host.to_string(), Some(port.to_string())),
            None => (bare.to_string(), None),
        }
    };
    anyhow::ensure!(!host.is_empty() && host != "[]", "{node:?} in --nodes names no host");
    let port = match port {
        None => CLIENT_PORT_DEFAULT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .with_context(|| format!("{node:?} in --nodes: {port:?} is not a port (1 to 65535)"))?,
    };
    Ok(format!("{prefix}{host}:{port}"))
}

#[derive(Subcommand)]
enum Commands {
    /// Run a node. Alone, it runs a one-node cluster in ./phalanx-data.
    Server(Box<ServerArgs>),
    /// Submit, inspect and cancel tasks.
    Task {
        #[command(flatten)]
        connect: Connect,
        #[command(subcommand)]
        command: client_commands::TaskCommand,
    },
    /// Show the cluster: each node up or down, the leader, the term, each
    /// node's lag and readiness, and the queues.
    Status {
        #[command(flatten)]
        connect: Connect,
        /// Wait up to this many seconds until a leader is known and every
        /// node is up and ready (e.g. right after starting the nodes); exit
        /// with status 1 if that does not happen.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Change cluster membership.
    Cluster {
        #[command(flatten)]
        connect: Connect,
        #[command(subcommand)]
        command: client_commands::ClusterCommand,
    },
    /// Flow control: per-key concurrency, rate, token and weight limits.
    Limits {
        #[command(flatten)]
        connect: Connect,
        #[command(subcommand)]
        command: client_commands::LimitsCommand,
    },
    /// Read and change the replicated policy.
    Config {
        #[command(flatten)]
        connect: Connect,
        #[command(subcommand)]
        command: client_commands::ConfigCommand,
    },
    /// Run built-in agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Start a local cluster with agents and a multi-agent workload, and report.
    Demo(demo::DemoArgs),
    /// Benchmark a local cluster: throughput, overload, backlog, failover,
    /// soak, steady or delegation (`phalanx bench --help` says what each does).
    Bench(bench::BenchArgs),
    /// Simulate a whole cluster under faults from a seed, and check its invariants.
    Sim(sim::SimArgs),
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run CMD once per task: payload on stdin, stdout is the result.
    Run(exec_agent::ExecAgentArgs),
}

#[derive(Args)]
pub struct ServerArgs {
    /// This node's id in the cluster: a positive number, unique, never reused.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: u64,
    /// The address clients (and agents) connect to, IP:PORT.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address others use to reach this node (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Where this node keeps its log and state (created if missing; one
    /// directory per node).
    #[arg(long, default_value = "./phalanx-data")]
    pub data_dir: PathBuf,
    /// Initial voters, e.g. 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003;
    /// with separate Raft listeners, ID=API_ADDR/RAFT_ADDR.
    #[arg(long, default_value = "")]
    pub peers: String,
    /// A separate listener for Raft RPCs, served by dedicated threads so that
    /// client load cannot starve consensus (recommended for clusters).
    #[arg(long)]
    pub raft_listen: Option<SocketAddr>,
    /// The secret clients must present (16 to 512 printable bytes); without
    /// it the node listens on loopback only.
    #[arg(long, env = "PHALANX_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// The secret shared by the nodes of a cluster (16 to 512 printable
    /// bytes, the same on every node); required with more than one node.
    #[arg(long, env = "PHALANX_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Raft leader keep-alive period (not an agent heartbeat).
    #[arg(long, default_value_t = 30)]
    pub raft_keepalive_ms: u64,
    /// A follower that hears no leader for a random time between this and
    /// `--election-timeout-max-ms` asks for an election.
    #[arg(long, default_value_t = 100)]
    pub election_timeout_min_ms: u64,
    /// See `--election-timeout-min-ms`.
    #[arg(long, default_value_t = 200)]
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken after this many log entries since the last one.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot for followers that lag a little.
    #[arg(long, default_value_t = 1_000)]
    pub snapshot_logs_kept: u64,
    /// How long a leader waits for a snapshot chunk to be taken, and for the
    /// last one to be installed, before it sends the snapshot again
    /// (installing takes about 1.5 s per million tasks).
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
    pub snapshot_install_timeout_ms: u64,
    /// A bootstrap file of `key = value` lines (the flags' names with `_`);
    /// its values override the flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Per-client sustained request rate (token bucket), requests per second.
    #[arg(long, default_value_t = 20_000.0)]
    pub client_rate_per_second: f64,
    /// Per-client burst (token bucket size).
    #[arg(long, default_value_t = 40_000.0)]
    pub client_burst: f64,
    /// New-work requests (submits) served at once; past it, 429 at once.
    /// Low priorities may use half, normal four fifths (`X-Phalanx-Priority`).
    #[arg(long, default_value_t = 1024)]
    pub requests_in_flight_max: usize,
    /// The door lowers that bound while proposals wait this much longer in the
    /// proposal queue than when it is unloaded (90th percentile over 100 ms),
    /// and raises it back as the wait goes; 0 keeps it fixed (otherwise 10..=60000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub admission_delay_target_ms: u64,
    /// Client connections served at once (idle keep-alive ones included);
    /// past it a new connection is answered 503 before it is read.
    /// (capped at start by what the descriptor limit leaves).
    #[arg(long, default_value_t = 16_384)]
    pub connections_max: usize,
    /// A node whose wall clock is further than this from the majority's is
    /// not ready, does not campaign and hands leadership over.
    #[arg(long, default_value_t = 500)]
    pub clock_skew_max_ms: u64,
    /// New work is refused with 507 disk_full while the data directory's file
    /// system has less free space than this many bytes...
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub disk_free_min_bytes: u64,
    /// ...or than this share of the file system, in percent.
    #[arg(long, default_value_t = 1)]
    pub disk_free_min_percent: u64,
    /// Client connections from one IP address at once.
    #[arg(long, default_value_t = 8_192)]
    pub connections_per_address_max: usize,
    /// Time to send a whole request head; the connection is closed past it.
    #[arg(long, default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Time to send a request body once its head is read; past it, 408.
    #[arg(long, default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    #[arg(long, default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Bytes of a request head; past it, 431.
    #[arg(long, default_value_t = 16 * 1024)]
    pub header_bytes_max: usize,
    /// Bytes of a request target (path and query); past it, 414.
    #[arg(long, default_value_t = 8 * 1024)]
    pub uri_bytes_max: usize,
    /// Bytes of one list answer; a longer list is cut and says where to continue.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub list_bytes_max: usize,
    /// Serve TLS with this PEM certificate chain, on both listeners, and
    /// speak TLS to every peer (the whole cluster is TLS or none is).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Make the Raft listener mutual: peers must present a certificate this
    /// PEM CA signed (each node presents its `--tls-cert`). Needs `--raft-listen`.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The PEM CA that signed the nodes' certificates, to verify peers by
    /// (default: `--tls-client-ca`).
    #[arg(long, env = "PHALANX_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Export spans over OTLP/HTTP (JSON) to this collector (`{URL}/v1/traces`);
    /// off when unset. The flag wins over the environment variable.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Spans waiting for export at once; past it, new ones are dropped and counted.
    #[arg(long, default_value_t = 8_192)]
    pub spans_queued_max: usize,
    /// `text` (one line per event; colours only on a terminal) or `json` (one object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl ServerArgs {
    pub fn config(&self) -> anyhow::Result<phalanx_server::NodeConfig> {
        let mut config = phalanx_server::NodeConfig::new(self.node_id, self.listen, self.data_dir.clone());
        config.advertise = self.advertise.clone();
        config.peers = phalanx_server::config::parse_peers(&self.peers).map_err(anyhow::Error::msg)?;
        config.client_token = self.client_token.clone();
        config.raft_listen = self.raft_listen;
        config.peer_token = self.peer_token.clone();
        config.raft_keepalive_ms = self.raft_keepalive_ms;
        config.election_timeout_min_ms = self.election_timeout_min_ms;
        config.election_timeout_max_ms = self.election_timeout_max_ms;
        config.snapshot_logs_since_last = self.snapshot_logs_since_last;
        config.snapshot_logs_kept = self.snapshot_logs_kept;
        config.snapshot_install_timeout_ms = self.snapshot_install_timeout_ms;
        config.client_rate_per_second = self.client_rate_per_second;
        config.client_burst = self.client_burst;
        config.requests_in_flight_max = self.requests_in_flight_max;
        config.admission_delay_target_ms = self.admission_delay_target_ms;
        config.connections_max = self.connections_max;
        config.clock_skew_max_ms = self.clock_skew_max_ms;
        config.disk_free_min_bytes = self.disk_free_min_bytes;
        config.disk_free_min_percent = self.disk_free_min_percent;
        config.connections_per_address_max = self.connections_per_address_max;
        config.header_read_timeout_ms = self.header_read_timeout_ms;
        config.body_read_timeout_ms = self.body_read_timeout_ms;
        config.idle_timeout_ms = self.idle_timeout_ms;
        config.header_bytes_max = self.header_bytes_max;
        config.uri_bytes_max = self.uri_bytes_max;
        config.list_bytes_max = self.list_bytes_max;
        config.tls = phalanx_server::tls::Files {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            // PHALANX_CA_FILE may be set for the CLI's own use; a node
            // without a certificate ignores it.
            ca: self.ca_file.clone().filter(|_| self.tls_cert.is_some()),
        };
        config.otlp_endpoint = self.otlp_endpoint.clone().filter(|endpoint| !endpoint.is_empty());
        config.spans_queued_max = self.spans_queued_max;
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the config file {} (--config)", path.display()))?;
            config.apply_file(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?;
        }
        if config.advertise.is_some() && !config.peers.is_empty() {
            let me = config.member();
            config.peers.entry(self.node_id).or_insert(me);
        }
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

/// The default filter of `phalanx server`. openraft logs every failed RPC
/// (thousands of lines a minute while a peer is down); the transport logs a
/// peer's loss and return once each instead (`network.rs`), and a stopped
/// Raft shows in `/health/ready`. `PHALANX_LOG` overrides it.
const SERVER_LOG_FILTER: &str = "info,openraft=off";

fn init_tracing(default: &str) {
    init_tracing_as(default, "text");
}

/// Logs to stderr, as text (with ANSI colours only when stderr is a
/// terminal) or as JSON lines.
fn init_tracing_as(default: &str, format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PHALANX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().with_ansi(false).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// A panic anywhere in a server is a broken invariant: the process stops at
/// once (and its supervisor restarts it from disk) instead of running on with
/// a dead Raft task or apply loop that health checks might not notice.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("phalanx: a panic in a server is fatal: aborting");
        std::process::abort();
    }));
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The simulation runs each seed on a runtime of its own, with a paused clock.
    if let Commands::Sim(args) = cli.command {
        return sim::run(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let json = cli.json;
    let result = runtime.block_on(async move {
        match cli.command {
            Commands::Server(args) => {
                init_tracing_as(SERVER_LOG_FILTER, &args.log_format);
                abort_on_panic();
                let config = args.config()?;
                let running = phalanx_server::start(config).await?;
                release_freed_memory();
                running.wait_for_signal().await
            }
            Commands::Task { connect, command } => {
                init_tracing("warn");
                client_commands::run_task(&connect, command, json).await
            }
            Commands::Status { connect, wait } => {
                init_tracing("warn");
                client_commands::status(&connect, wait, json).await
            }
            Commands::Cluster { connect, command } => {
                init_tracing("warn");
                client_commands::run_cluster(&connect, command, json).await
            }
            Commands::Limits { connect, command } => {
                init_tracing("warn");
                client_commands::run_limits(&connect, command, json).await
            }
            Commands::Config { connect, command } => {
                init_tracing("warn");
                client_commands::run_config(&connect, command, json).await
            }
            Commands::Agent { command: AgentCommand::Run(args) } => {
                init_tracing("info");
                exec_agent::run(args).await
            }
            Commands::Demo(args) => {
                init_tracing("warn");
                demo::run(args).await
            }
            Commands::Bench(args) => {
                init_tracing("warn");
                bench::run(args).await
            }
            Commands::Sim(_) => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A node whose Raft has stopped on a storage error ends at once with
        // its own status, without waiting for blocked storage threads: its
        // supervisor restarts it, and it recovers from its fsynced log.
        Err(error) if error.downcast_ref::<phalanx_server::node::RaftStopped>().is_some() => {
            eprintln!("phalanx: {error:#}");
            std::process::exit(phalanx_server::node::EXIT_RAFT_STOPPED.into());
        }
        Err(error) => {
            eprintln!("phalanx: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command and every argument a user can see says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            for argument in command.get_arguments() {
                let builtin = matches!(argument.get_id().as_str(), "help" | "version");
                if !builtin && !argument.is_hide_set() && argument.get_help().is_none() {
                    missing.push(format!("{path} {}", argument.get_id()));
                }
            }
            for subcommand in command.get_subcommands() {
                if subcommand.get_name() != "help" && subcommand.get_about().is_none() {
                    missing.push(format!("{path} {} (the command itself)", subcommand.get_name()));
                }
                walk(subcommand, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let mut command = Cli::command();
        command.build();
        walk(&command, "", &mut missing);
        assert!(missing.is_empty(), "arguments without help:\n{}", missing.join("\n"));
    }

    /// Within a command, a flag name means one thing wherever it appears:
    /// `--nodes` is always a list of addresses, never a count.
    #[test]
    fn nodes_is_always_a_list_of_addresses() {
        fn walk(command: &clap::Command, path: &str, found: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            for argument in command.get_arguments().filter(|a| a.get_long() == Some("nodes")) {
                let help = argument.get_help().map(|h| h.to_string()).unwrap_or_default();
                if !help.contains("addresses") {
                    found.push(format!("{path}: --nodes is {help:?}"));
                }
            }
            for subcommand in command.get_subcommands() {
                walk(subcommand, &path, found);
            }
        }
        let mut found = Vec::new();
        let mut command = Cli::command();
        command.build();
        walk(&command, "", &mut found);
        assert!(found.is_empty(), "{}", found.join("\n"));
    }

    fn check_node(input: &str, expected: Result<&str, &str>) {
        match (node_address(input), expected) {
            (Ok(address), Ok(expected)) => assert_eq!(address, expected, "{input:?}"),
            (Err(error), Err(expected)) => assert!(error.to_string().contains(expected), "{input:?}: {error}"),
            (got, expected) => panic!("{input:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn node_addresses() {
        check_node("localhost", Ok("localhost:7070"));
        check_node("127.0.0.1:7001", Ok("127.0.0.1:7001"));
        check_node("http://10.0.0.1", Ok("10.0.0.1:7070"));
        check_node("http://10.0.0.1:7002/", Ok("10.0.0.1:7002"));
        check_node("[::1]", Ok("[::1]:7070"));
        check_node("[::1]:7003", Ok("[::1]:7003"));
        check_node("https://example.com", Ok("https://example.com:7070"));
        check_node("https://127.0.0.1:7443/", Ok("https://127.0.0.1:7443"));
        check_node("ftp://example.com:21", Err("not ftp://"));
        check_node("::1", Err("in brackets"));
        check_node("host:http", Err("\"http\" is not a port"));
        check_node("host:0", Err("is not a port"));
        check_node(":7070", Err("names no host"));
        check_node("host/path", Err("is not HOST[:PORT]"));
        let connect = |nodes: &str| Connect { nodes: nodes.into(), token: None, ca_file: None }.node_list();
        assert_eq!(connect(" a, b:1 ,").unwrap(), ["a:7070", "b:1"]);
        assert!(connect(" , ").unwrap_err().to_string().contains("names no node"));
    }
}
