//! TLS for a node: the certificate it serves, the CA it trusts, and the
//! clients it makes to reach its peers (rustls, ring provider).
//!
//! A node is all TLS or not at all: with `--tls-cert`/`--tls-key` both its
//! client listener and its Raft listener speak TLS only, and it speaks
//! `https://` to every peer (Raft RPCs, election probes, forwarded requests,
//! readiness probes), verifying their certificates against `--ca-file` (or,
//! without it, `--tls-client-ca`): never against the system's roots, since
//! a cluster's CA is its own, and never downgraded to plain HTTP. With
//! `--tls-client-ca` the Raft listener is mutual: a peer must present a
//! certificate that CA signed (every node presents its own certificate as a
//! client), besides the peer token, which stays required. The client
//! listener never asks clients for certificates: clients authenticate with
//! the client token.
//!
//! What a TLS connection is bounded by (handshakes in flight, the handshake
//! timeout) is here; the client listener's other bounds stay in
//! `listener.rs`, which calls `Tls::accept` once it has given a connection a
//! slot.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Bytes of one certificate, key or CA file: a PEM chain is a few KiB.
pub const TLS_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// TLS handshakes being done at once on the Raft listener; past it a new
/// connection waits to be accepted (peers are few and reconnect rarely).
const RAFT_HANDSHAKES_IN_FLIGHT_MAX: usize = 64;
/// Time a connecting peer has to finish its handshake.
const RAFT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a node's TLS material is (from `NodeConfig`).
#[derive(Clone, Debug, Default)]
pub struct Files {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl Files {
    /// Whether TLS is on, and the flags make sense together (checked by
    /// `NodeConfig::validate`; the files themselves are read by `Tls::load`).
    pub fn validate(&self, raft_listen: bool) -> Result<bool, String> {
        match (&self.cert, &self.key) {
            (None, None) => {
                if self.client_ca.is_some() || self.ca.is_some() {
                    return Err("--tls-client-ca and --ca-file need --tls-cert and --tls-key: a node without its own \
                                certificate speaks plain HTTP"
                        .into());
                }
                Ok(false)
            }
            (Some(_), None) | (None, Some(_)) => Err("--tls-cert and --tls-key go together".into()),
            (Some(_), Some(_)) => {
                if self.client_ca.is_some() && !raft_listen {
                    return Err("--tls-client-ca makes the Raft listener mutual: give the Raft RPCs a listener of \
                                their own with --raft-listen"
                        .into());
                }
                if self.ca.is_none() && self.client_ca.is_none() {
                    return Err("with --tls-cert, give --ca-file (or --tls-client-ca): the CA that signed the nodes' \
                                certificates, to verify the other nodes by"
                        .into());
                }
                Ok(true)
            }
        }
    }
}

/// A node's loaded TLS material: the acceptors of its two listeners and what
/// its own clients present and trust.
pub struct Tls {
    client: TlsAcceptor,
    raft: TlsAcceptor,
    /// The CA certificates peers are verified against (PEM).
    ca_pem: Vec<u8>,
    /// This node's key and certificate chain (PEM), presented to peers.
    identity_pem: Vec<u8>,
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    let size = std::fs::metadata(path).map_err(|error| format!("{what} {}: {error}", path.display()))?.len();
    if size > TLS_FILE_BYTES_MAX {
        return Err(format!("{what} {}: {size} bytes is more than {TLS_FILE_BYTES_MAX}", path.display()));
    }
    std::fs::read(path).map_err(|error| format!("{what} {}: {error}", path.display()))
}

fn certificates(what: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{what} {}: not PEM certificates: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{what} {}: holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

fn roots(what: &str, path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for certificate in certificates(what, path, pem)? {
        store
            .add(certificate)
            .map_err(|error| format!("{what} {}: not a usable CA certificate: {error}", path.display()))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks the files; `None` when TLS is off. Every error names
    /// the flag and the file.
    pub fn load(files: &Files) -> Result<Option<Arc<Tls>>, String> {
        let (Some(cert_path), Some(key_path)) = (&files.cert, &files.key) else { return Ok(None) };
        let cert_pem = read_file("--tls-cert", cert_path)?;
        let chain = certificates("--tls-cert", cert_path, &cert_pem)?;
        let key_pem = read_file("--tls-key", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|error| format!("--tls-key {}: no PEM private key: {error}", key_path.display()))?;
        let ca_path = files.ca.as_ref().or(files.client_ca.as_ref()).ok_or("no CA file")?;
        let ca_pem = read_file(if files.ca.is_some() { "--ca-file" } else { "--tls-client-ca" }, ca_path)?;
        roots("--ca-file", ca_path, &ca_pem)?;

        let server = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>| {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|error| format!("TLS settings: {error}"))?;
            let builder = match verifier {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|error| format!("--tls-key {} does not fit --tls-cert: {error}", key_path.display()))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok::<_, String>(TlsAcceptor::from(Arc::new(config)))
        };
        let client = server(None)?;
        let raft = match &files.client_ca {
            None => server(None)?,
            Some(path) => {
                let pem = read_file("--tls-client-ca", path)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("--tls-client-ca", path, &pem)?),
                    provider(),
                )
                .build()
                .map_err(|error| format!("--tls-client-ca {}: {error}", path.display()))?;
                server(Some(verifier))?
            }
        };
        let mut identity_pem = key_pem;
        identity_pem.push(b'\n');
        identity_pem.extend_from_slice(&cert_pem);
        Ok(Some(Arc::new(Tls { client, raft, ca_pem, identity_pem })))
    }

    /// Makes `builder` speak TLS only, trusting the cluster's CA alone and
    /// presenting this node's certificate (for a mutual Raft listener).
    pub fn client(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
        let mut builder = builder.use_rustls_tls().https_only(true).tls_built_in_root_certs(false);
        for certificate in
            reqwest::Certificate::from_pem_bundle(&self.ca_pem).map_err(|error| format!("--ca-file: {error}"))?
        {
            builder = builder.add_root_certificate(certificate);
        }
        let identity = reqwest::Identity::from_pem(&self.identity_pem)
            .map_err(|error| format!("--tls-cert/--tls-key as a client identity: {error}"))?;
        Ok(builder.identity(identity))
    }

    /// Does the handshake of an accepted client connection.
    pub async fn accept_client(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.client.accept(stream).await
    }

    /// The Raft listener, with handshakes done off the accept loop.
    pub fn raft_listener(self: &Arc<Tls>, inner: TcpListener) -> RaftListener {
        let (tx, rx) = tokio::sync::mpsc::channel(RAFT_HANDSHAKES_IN_FLIGHT_MAX);
        let local_addr = inner.local_addr();
        let tls = self.clone();
        let handshakes = Arc::new(Semaphore::new(RAFT_HANDSHAKES_IN_FLIGHT_MAX));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let (stream, addr) = match inner.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a Raft connection failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let tls = tls.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(RAFT_HANDSHAKE_TIMEOUT, tls.raft.accept(stream)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, addr)).await;
                        }
                        Ok(Err(error)) => tracing::warn!(%addr, %error, "a Raft connection failed its TLS handshake"),
                        Err(_) => tracing::warn!(%addr, "a Raft connection did not finish its TLS handshake in time"),
                    }
                });
            }
        });
        RaftListener { rx, local_addr, _accepting: AbortOnDrop(accepting) }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The Raft listener's TLS connections, handshakes done, for `axum::serve`.
pub struct RaftListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: io::Result<SocketAddr>,
    _accepting: AbortOnDrop,
}

impl axum::serve::Listener for RaftListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The accepting task ends only when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.local_addr {
            Ok(addr) => Ok(*addr),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        }
    }
}
