//! Local clusters of real `phalanx server` processes, for `demo` and `bench`:
//! start, SIGKILL, SIGSTOP/SIGCONT and restart nodes, and find the leader.

use crate::netns::{Cut, Net};
use anyhow::Context;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalNode {
    pub id: u64,
    pub addr: String,
    pub raft_addr: String,
    data_dir: PathBuf,
    child: Option<Child>,
}

pub struct LocalCluster {
    pub nodes: BTreeMap<u64, LocalNode>,
    peers: String,
    /// A fresh secret per cluster: the peer channel is always authenticated.
    peer_token: String,
    extra: Vec<String>,
    http: reqwest::Client,
    /// Set when the nodes run in network namespaces (`start_partitionable`):
    /// they listen on the bridge, so they need a client token too.
    net: Option<Net>,
    client_token: Option<String>,
}

/// The `phalanx` binary that runs a benchmark's nodes: this one, or
/// PHALANX_SERVER_BIN's (e.g. the previous main), so that a benchmark
/// measures another build the same way.
pub fn server_exe() -> anyhow::Result<PathBuf> {
    match std::env::var_os("PHALANX_SERVER_BIN") {
        Some(path) => Ok(PathBuf::from(path)),
        None => std::env::current_exe().context("finding the phalanx binary"),
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn secret() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)])).collect()
}

impl LocalCluster {
    /// Starts `count` nodes on loopback under `dir` and waits until one leads.
    pub async fn start(count: u64, dir: &Path, extra: &[String]) -> anyhow::Result<LocalCluster> {
        let mut addrs = Vec::new();
        for _ in 1..=count {
            addrs.push((format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?)));
        }
        Self::start_at(addrs, dir, extra, None).await
    }

    /// Starts `count` nodes, each in its own network namespace, so that
    /// `cut` can partition them; `Err` says why that is impossible here.
    pub async fn start_partitionable(count: u64, dir: &Path, extra: &[String]) -> anyhow::Result<LocalCluster> {
        let net = Net::create(count as usize, 0).map_err(|why| anyhow::anyhow!("network namespaces: {why}"))?;
        let addrs =
            (1..=count as usize).map(|i| (format!("{}:7000", net.ip(i)), format!("{}:7001", net.ip(i)))).collect();
        Self::start_at(addrs, dir, extra, Some(net)).await
    }

    async fn start_at(
        addrs: Vec<(String, String)>,
        dir: &Path,
        extra: &[String],
        net: Option<Net>,
    ) -> anyhow::Result<LocalCluster> {
        let count = addrs.len();
        let mut nodes = BTreeMap::new();
        for (id, (addr, raft_addr)) in (1u64..).zip(addrs) {
            nodes.insert(id, LocalNode { id, addr, raft_addr, data_dir: dir.join(format!("node-{id}")), child: None });
        }
        let peers = if count == 1 {
            String::new()
        } else {
            nodes.values().map(|n| format!("{}={}/{}", n.id, n.addr, n.raft_addr)).collect::<Vec<_>>().join(",")
        };
        let client_token = net.is_some().then(secret);
        let http = http_client(client_token.as_deref())?;
        let peer_token = secret();
        let mut cluster = LocalCluster { nodes, peers, peer_token, extra: extra.to_vec(), http, net, client_token };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The client token the nodes require, if any.
    pub fn client_token(&self) -> Option<String> {
        self.client_token.clone()
    }

    /// Cuts node `id` off from every other node (`partitionable` clusters).
    pub fn cut(&self, id: u64, cut: Cut) -> anyhow::Result<()> {
        let net = self.net.as_ref().context("this cluster cannot be partitioned")?;
        let others: Vec<usize> = self.nodes.keys().filter(|n| **n != id).map(|n| *n as usize).collect();
        net.cut(id as usize, &others, cut).map_err(|why| anyhow::anyhow!(why))
    }

    pub fn heal(&self, id: u64) -> anyhow::Result<()> {
        let net = self.net.as_ref().context("this cluster cannot be partitioned")?;
        net.heal(id as usize).map_err(|why| anyhow::anyhow!(why))
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let exe = server_exe()?;
        let node = self.nodes.get_mut(&id).context("no such node")?;
        // PHALANX_NODE_CPUS pins the nodes (e.g. "0"), so a benchmark can keep
        // its load generator off their cores: `taskset -c 1 phalanx bench ...`.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Ok(cpus) = std::env::var("PHALANX_NODE_CPUS") {
            argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        if let Some(net) = &self.net {
            let ns = net.namespaces[id as usize - 1].clone();
            argv.extend(["ip".into(), "netns".into(), "exec".into(), ns.into()]);
        }
        argv.push(exe.into());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        if let Some(token) = &self.client_token {
            command.env("PHALANX_CLIENT_TOKEN", token);
        }
        let child = command
            .args(["server", "--node-id", &id.to_string(), "--listen", &node.addr, "--raft-listen", &node.raft_addr])
            .args(["--peers", &self.peers])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&self.extra)
            .env("PHALANX_PEER_TOKEN", &self.peer_token)
            .env("PHALANX_LOG", std::env::var("PHALANX_LOG").unwrap_or_else(|_| "error,openraft=off".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a node")?;
        node.child = Some(child);
        Ok(())
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, id: u64, signal: &str) {
        if let Some(child) = &self.nodes[&id].child {
            let _ = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status();
        }
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(|c| c.id())
    }

    /// Peak resident memory (VmHWM) of each running node, in KiB.
    pub fn peak_rss_kib(&self) -> Vec<(u64, u64)> {
        let mut peaks = Vec::new();
        for node in self.nodes.values() {
            let Some(child) = &node.child else { continue };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) else { continue };
            let peak = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
                .unwrap_or(0);
            peaks.push((node.id, peak));
        }
        peaks
    }

    /// CPU seconds (user + system) each running node has used so far.
    pub fn cpu_seconds(&self) -> Vec<(u64, f64)> {
        self.nodes
            .values()
            .filter_map(|node| Some((node.id, process_cpu_seconds(&node.child.as_ref()?.id().to_string())?)))
            .collect()
    }

    /// The leader as a running node reports it.
    pub async fn leader(&self) -> Option<u64> {
        for node in self.nodes.values().filter(|n| n.child.is_some()) {
            let url = format!("http://{}/v1/cluster", node.addr);
            if let Ok(response) = self.http.get(url).send().await {
                if let Ok(body) = response.json::<Value>().await {
                    if let Some(leader) = body["leader_id"].as_u64() {
                        if self.nodes.get(&leader).is_some_and(|n| n.child.is_some()) {
                            return Some(leader);
                        }
                    }
                }
            }
        }
        None
    }

    pub async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<u64> {
        let start = Instant::now();
        loop {
            if let Some(leader) = self.leader().await {
                let url = format!("http://{}/health/ready", self.nodes[&leader].addr);
                if self.http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
                    return Ok(leader);
                }
            }
            if start.elapsed() > within {
                anyhow::bail!("no leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A client for the launcher's own calls, with the cluster's token.
pub fn http_client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    }
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(2)).default_headers(headers).build()?)
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.signal(id, "CONT");
            self.kill(id);
        }
    }
}

/// CPU seconds (user + system) used by a process ("self" for this one), from
/// `/proc/PID/stat`, in clock ticks of 1/100 s (Linux's USER_HZ).
pub fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
