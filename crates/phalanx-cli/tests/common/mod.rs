//! Test harness: real `phalanx server` processes on loopback, killed with real
//! signals, and a small JSON HTTP client.
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The peer token every test cluster shares (a cluster of more than one
/// node needs one).
pub const PEER_TOKEN: &str = "test-peer-token-0123456789";

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().unwrap().port()
}

pub struct Server {
    pub id: u64,
    pub addr: String,
    pub raft_addr: String,
    pub data_dir: PathBuf,
    pub peers: String,
    pub extra: Vec<String>,
    pub child: Option<Child>,
}

impl Server {
    pub fn spawn(&mut self) {
        self.spawn_with(&Environment::default());
    }

    /// Starts the node in a changed environment: its process started
    /// through `wrapper` (e.g. `prlimit --nofile=256:256 --`) with `env`
    /// added (e.g. libfaketime's `LD_PRELOAD` and `FAKETIME`).
    pub fn spawn_with(&mut self, environment: &Environment) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let mut command = match environment.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_phalanx"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_phalanx")),
        };
        command.envs(environment.env.iter().map(|(k, v)| (k, v)));
        command
            .args([
                "server",
                "--node-id",
                &self.id.to_string(),
                "--listen",
                &self.addr,
                "--raft-listen",
                &self.raft_addr,
            ])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--peers", &self.peers])
            .args(&self.extra)
            .env("PHALANX_PEER_TOKEN", PEER_TOKEN)
            .env("PHALANX_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(server_log(&self.data_dir));
        self.child = Some(command.spawn().expect("spawn phalanx server"));
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
        }
    }
}

/// A server's stderr: `PHALANX_TEST_LOGS=DIR` keeps it in DIR (one file per
/// data directory), otherwise it is dropped.
fn server_log(data_dir: &std::path::Path) -> Stdio {
    let Ok(dir) = std::env::var("PHALANX_TEST_LOGS") else { return Stdio::null() };
    let name = data_dir.to_string_lossy().replace('/', "_");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::OpenOptions::new().create(true).append(true).open(format!("{dir}/{name}.log")).unwrap();
    Stdio::from(file)
}

/// How a node's process is started, when not as usual (`Server::spawn_with`).
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub servers: BTreeMap<u64, Server>,
    pub http: reqwest::Client,
    /// The cluster's CA and certificate, when it speaks TLS (`start_tls`).
    pub pki: Option<Pki>,
}

/// A test CA and one certificate it signed, valid for 127.0.0.1 and
/// localhost as a server and as a client, written as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Makes a CA named `name` and a certificate for loopback in `dir`.
    pub fn create(dir: &std::path::Path, name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} node"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let pki = Pki {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    /// The `phalanx server` flags of a mutual-TLS node with this material.
    pub fn server_args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        ["--tls-cert", &path(&self.cert), "--tls-key", &path(&self.key), "--tls-client-ca", &path(&self.ca)]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// A client trusting this CA alone.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let pem = std::fs::read(&self.ca).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
    }
}

impl Cluster {
    /// Starts `n` nodes (n = 1: a one-node cluster without --peers).
    pub async fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, |_| Environment::default()).await
    }

    /// Starts `n` nodes, each in the environment `environment(id)` gives;
    /// waits for readiness only of those started as usual (a node whose
    /// environment is at fault may never be ready).
    pub async fn start_with(n: u64, extra: &[&str], environment: impl Fn(u64) -> Environment) -> Cluster {
        Cluster::start_in(tempfile::tempdir().unwrap(), None, n, extra, environment).await
    }

    /// Starts `n` nodes speaking mutual TLS (a fresh CA; one certificate
    /// for every node); `http` trusts that CA alone.
    pub async fn start_tls(n: u64, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki"), "cluster");
        let mut args: Vec<String> = pki.server_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Cluster::start_in(dir, Some(pki), n, &args, |_| Environment::default()).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        pki: Option<Pki>,
        n: u64,
        extra: &[&str],
        environment: impl Fn(u64) -> Environment,
    ) -> Cluster {
        let addrs: BTreeMap<u64, (String, String)> = (1..=n)
            .map(|id| (id, (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()))))
            .collect();
        let peers = if n == 1 {
            String::new()
        } else {
            addrs.iter().map(|(id, (api, raft))| format!("{id}={api}/{raft}")).collect::<Vec<_>>().join(",")
        };
        let mut servers = BTreeMap::new();
        let mut usual = Vec::new();
        for (id, (addr, raft_addr)) in &addrs {
            let mut server = Server {
                id: *id,
                addr: addr.clone(),
                raft_addr: raft_addr.clone(),
                data_dir: dir.path().join(format!("node-{id}")),
                peers: peers.clone(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            let environment = environment(*id);
            if environment.wrapper.is_empty() && environment.env.is_empty() {
                usual.push(*id);
            }
            server.spawn_with(&environment);
            servers.insert(*id, server);
        }
        let http = pki.as_ref().map_or_else(reqwest::Client::builder, Pki::client_builder);
        let http = http.timeout(Duration::from_secs(20)).build().unwrap();
        let cluster = Cluster { dir, servers, http, pki };
        for id in &usual {
            cluster.wait_ready(*id, Duration::from_secs(30)).await;
        }
        cluster
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.servers[&id].addr
    }

    /// One node on `data_dir`, not started (`servers[&1].spawn()` starts
    /// it), for tests that prepare or keep its data directory themselves.
    pub fn one_node_on(data_dir: PathBuf, extra: &[&str]) -> Cluster {
        let server = Server {
            id: 1,
            addr: format!("127.0.0.1:{}", free_port()),
            raft_addr: format!("127.0.0.1:{}", free_port()),
            data_dir,
            peers: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        Cluster { dir: tempfile::tempdir().unwrap(), servers: BTreeMap::from([(1, server)]), http, pki: None }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn url(&self, id: u64, path: &str) -> String {
        format!("{}://{}{}", self.scheme(), self.addr(id), path)
    }

    /// A client for this cluster's nodes (trusting its CA when it has one).
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        self.pki.as_ref().map_or_else(reqwest::Client::builder, Pki::client_builder)
    }

    pub async fn wait_ready(&self, id: u64, within: Duration) {
        wait_until(within, &format!("node {id} ready"), async || {
            let answer = self.http.get(self.url(id, "/health/ready")).send().await;
            answer.is_ok_and(|response| response.status().is_success())
        })
        .await;
    }

    pub async fn leader(&self) -> Option<u64> {
        for id in self.servers.keys() {
            if self.servers[id].child.is_none() {
                continue;
            }
            if let Ok((200, body)) = self.get(*id, "/v1/cluster").await {
                if let Some(leader) = body["leader_id"].as_u64() {
                    return Some(leader);
                }
            }
        }
        None
    }

    pub async fn post(&self, id: u64, path: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        let response = self.http.post(self.url(id, path)).json(body).send().await?;
        decode(response).await
    }

    pub async fn post_raw(&self, id: u64, path: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(id, path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        decode(response).await.unwrap()
    }

    pub async fn put(&self, id: u64, path: &str, body: &Value) -> (u16, Value) {
        let response = self.http.put(self.url(id, path)).json(body).send().await.unwrap();
        decode(response).await.unwrap()
    }

    pub async fn get(&self, id: u64, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let response = self.http.get(self.url(id, path)).send().await?;
        decode(response).await
    }
}

/// `phalanx ARGS` with no `PHALANX_*` from the test's own environment.
pub fn phalanx(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phalanx"));
    command.args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PHALANX_")) {
        command.env_remove(name);
    }
    command
}

/// How often `wait_until` and `wait_for` look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Waits until `condition` holds, looking every `POLL_INTERVAL`; fails the
/// test, naming `what` it waited for, if it does not within `within`. A test
/// waits on what it can observe rather than sleeping a fixed time: no longer
/// than the machine needs, and on a slow machine as long as it needs.
pub async fn wait_until(within: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    wait_for(within, what, async || condition().await.then_some(())).await
}

/// Waits until `observe` sees something, and answers it (see `wait_until`).
pub async fn wait_for<T>(within: Duration, what: &str, mut observe: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(seen) = observe().await {
            return seen;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub async fn decode(response: reqwest::Response) -> Result<(u16, Value), reqwest::Error> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

/// Asserts a JSON error with this status and code.
pub fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "status of {answer:?}");
    assert_eq!(answer.1["error"]["code"], code, "code of {answer:?}");
    assert!(answer.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "message of {answer:?}");
}
