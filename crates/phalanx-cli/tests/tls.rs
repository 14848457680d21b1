//! TLS, tried the unkind ways as well as the kind one: nodes started with
//! certificates serve `https://` only, the Rust SDK and the CLI verify them
//! against a CA file (and fail loudly without it, never downgrading), a
//! mutual Raft listener refuses a peer without a certificate its CA signed,
//! a client that opens a connection and never says hello is closed in time,
//! a refused connection is answered through TLS, and bad TLS settings stop
//! `phalanx server` with a message naming the flag or file.
//! (The history-checked kill test over TLS is in `cluster.rs`.)

mod common;

use common::{free_port, phalanx, Cluster, Pki};
use serde_json::{json, Value};
use std::process::Output;
use std::time::{Duration, Instant};

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn https_nodes(cluster: &Cluster) -> String {
    cluster.servers.values().map(|server| format!("https://{}", server.addr)).collect::<Vec<_>>().join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_https_only_and_clients_verify_it() {
    let cluster = Cluster::start_tls(3, &[]).await;
    let pki = cluster.pki.as_ref().unwrap();
    let addr = cluster.addr(1).to_string();

    // Plain HTTP to a TLS listener is not served (no downgrade on the node's side).
    let plain = reqwest::Client::new().get(format!("http://{addr}/health/live")).send().await;
    assert!(plain.is_err(), "a TLS node answered plain HTTP: {plain:?}");

    // The Rust SDK: https:// nodes verified by the CA file.
    let nodes: Vec<String> = cluster.servers.values().map(|server| format!("https://{}", server.addr)).collect();
    let client = phalanx_agent::Client::new(nodes.clone(), None).unwrap().with_ca_file(&pki.ca).unwrap();
    let request = phalanx_agent::client::SubmitRequest::new("q", json!({"n": 1}));
    let submitted = client.submit(&request).await.expect("a submit over TLS");
    let task = client.get_task(submitted.task_id, false).await.unwrap();
    assert_eq!(task.payload, json!({"n": 1}));

    // Without the CA, the system's roots do not know the cluster's CA: the
    // SDK fails, and does not fall back to plain HTTP.
    let mut unverified = phalanx_agent::Client::new(vec![nodes[0].clone()], None).unwrap();
    unverified.retries_max = 0;
    let error = unverified.get_task(submitted.task_id, false).await.expect_err("an unverified node was trusted");
    assert!(error.is_unreachable(), "{error:?}");

    // The CLI: --ca-file or PHALANX_CA_FILE, `status` probing every member over TLS.
    let https = https_nodes(&cluster);
    let ca = pki.ca.display().to_string();
    let output = phalanx(&["task", "submit", "--queue", "q", "--payload", "{}", "--nodes", &https, "--ca-file", &ca])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let output = phalanx(&["status", "--nodes", &https]).env("PHALANX_CA_FILE", &ca).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let said = text(&output);
    assert_eq!(said.matches("up, ready").count(), 3, "every member probed over TLS: {said}");
    let output = phalanx(&["task", "list", "--nodes", &https]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("no node answered"), "{}", text(&output));
}

#[tokio::test]
async fn a_mutual_raft_listener_refuses_peers_without_a_certificate_of_its_ca() {
    let cluster = Cluster::start_tls(1, &[]).await;
    let pki = cluster.pki.as_ref().unwrap();
    let raft = format!("https://{}/raft/probe", cluster.servers[&1].raft_addr);
    let identity = |pki: &Pki| {
        let mut pem = std::fs::read(&pki.key).unwrap();
        pem.extend(std::fs::read(&pki.cert).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    };

    let anonymous = pki.client_builder().build().unwrap().get(&raft).send().await;
    assert!(anonymous.is_err(), "a peer without a certificate was served: {anonymous:?}");

    let rogue = Pki::create(&cluster.dir.path().join("rogue"), "rogue");
    let forged = pki.client_builder().identity(identity(&rogue)).build().unwrap().get(&raft).send().await;
    assert!(forged.is_err(), "a certificate of another CA was accepted: {forged:?}");

    // The cluster's own certificate gets through TLS; the peer token is still asked for.
    let member = pki.client_builder().identity(identity(pki)).build().unwrap();
    let answer = member.get(&raft).send().await.expect("a member's certificate is accepted");
    assert_eq!(answer.status().as_u16(), 401, "the peer token is still required");
    let answer = member.get(&raft).bearer_auth(common::PEER_TOKEN).send().await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
}

#[tokio::test]
async fn a_silent_or_refused_tls_connection_is_bounded() {
    use tokio::io::AsyncReadExt;
    let cluster = Cluster::start_tls(1, &["--header-read-timeout-ms", "500", "--connections-max", "3"]).await;
    let addr = cluster.addr(1).to_string();

    // A connection that never sends its ClientHello is closed after the head timeout.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "still open after 5 s: {read:?}");
    assert!(start.elapsed() >= Duration::from_millis(400), "closed before its time: {:?}", start.elapsed());
    drop(silent);

    // Past connections_max, a TLS client reads the 503 (not a protocol error).
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= 3, "more than connections_max connections were served");
        let client = cluster.client_builder().pool_max_idle_per_host(1).build().unwrap();
        let response = client.get(cluster.url(1, "/health/live")).send().await.expect("an answer");
        if response.status().as_u16() == 503 {
            break response.json::<Value>().await.unwrap();
        }
        assert_eq!(response.status().as_u16(), 200);
        held.push(client);
    };
    assert_eq!(refused["error"]["code"], "overloaded", "{refused}");
}

#[test]
fn bad_tls_settings_stop_the_server_naming_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"), "node");
    let other = Pki::create(&dir.path().join("other"), "other");
    let listen = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data").display().to_string();
    let path = |p: &std::path::Path| p.display().to_string();
    let missing = dir.path().join("missing.pem");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                path(&pki.cert),
                "--tls-key".into(),
                path(&missing),
                "--ca-file".into(),
                path(&pki.ca),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--tls-cert".into(),
                path(&pki.cert),
                "--tls-key".into(),
                path(&other.key),
                "--ca-file".into(),
                path(&pki.ca),
            ],
            "does not fit --tls-cert",
        ),
        (vec!["--tls-cert".into(), path(&pki.cert), "--tls-key".into(), path(&pki.key)], "--ca-file"),
        (
            vec![
                "--tls-cert".into(),
                path(&pki.cert),
                "--tls-key".into(),
                path(&pki.key),
                "--tls-client-ca".into(),
                path(&pki.ca),
            ],
            "--raft-listen",
        ),
        (
            vec![
                "--tls-cert".into(),
                path(&pki.key),
                "--tls-key".into(),
                path(&pki.key),
                "--ca-file".into(),
                path(&pki.ca),
            ],
            "no PEM certificate",
        ),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["server", "--listen", &listen, "--data-dir", &data];
        args.extend(flags.iter().map(String::as_str));
        let output = phalanx(&args).output().unwrap();
        let said = text(&output);
        assert_eq!(output.status.code(), Some(1), "{flags:?}: {said}");
        assert!(!said.contains("panicked"), "{said}");
        assert!(said.contains(expected), "{flags:?}: expected {expected:?} in {said}");
    }
}
