//! Byte budgets and timeouts on a real node: slow, idle and oversized
//! clients cannot hold memory or connection slots, the replicated state has
//! a byte budget, conversations can be deleted and expire, and list answers
//! are bounded in bytes.

mod common;

use common::{assert_error, wait_until, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Resident memory of a node's process, in bytes (`VmRSS` in /proc).
fn rss_bytes(cluster: &Cluster, id: u64) -> u64 {
    let pid = cluster.servers[&id].child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// Reads until the server closes the connection (true), or `within` passes (false).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// One request on a fresh connection; the answer's status line and JSON body.
async fn raw_request(addr: &str, request: &[u8]) -> (String, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_string())))
}

async fn metric(cluster: &Cluster, name: &str) -> u64 {
    let text = cluster.http.get(cluster.url(1, "/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} is exported"))
}

/// 400 connections stop in the middle of a request head. With the default
/// `header_read_timeout_ms` (10 s) the node closes every one of them, stays
/// ready and serves new clients all the while, and its memory stays bounded.
#[tokio::test]
async fn connections_stalled_in_a_request_head_are_closed_and_the_node_stays_ready() {
    let cluster = Cluster::start(1, &[]).await;
    let addr = cluster.addr(1).to_string();
    let partial = format!("GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: {}", "a".repeat(12 * 1024));
    let mut stalled = Vec::new();
    for _ in 0..400 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(partial.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let started = Instant::now();
    // Meanwhile the node is ready and serves others.
    cluster.wait_ready(1, Duration::from_secs(2)).await;
    let (status, _) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": 1})).await.unwrap();
    assert_eq!(status, 201);
    let rss = rss_bytes(&cluster, 1);
    assert!(rss < 200 * 1024 * 1024, "400 stalled heads of 12 KiB: RSS {rss} bytes");
    for stream in &mut stalled {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        assert!(closed_within(stream, left).await, "a stalled connection was not closed within 20 s");
    }
    assert!(started.elapsed() >= Duration::from_secs(9), "closed before the header timeout");
    assert!(metric(&cluster, "phalanx_connections_timed_out_total").await >= 400);
    // Other tests of this file load the same two cores meanwhile: readiness
    // may take a moment to catch up with its event-loop probe.
    cluster.wait_ready(1, Duration::from_secs(5)).await;
}

/// Connections that send nothing, or nothing more after a request, are
/// closed after their timeout, and the slots they held serve new clients.
#[tokio::test]
async fn idle_connections_are_closed_and_free_their_slots() {
    let flags = ["--connections-max", "20", "--header-read-timeout-ms", "1000", "--idle-timeout-ms", "1500"];
    let cluster = Cluster::start(1, &flags).await;
    let addr = cluster.addr(1).to_string();
    // Keep-alive idle after one request.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(format!("GET /health/live HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let read = kept.read(&mut answer).await.unwrap();
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"));
    let idle_since = Instant::now();
    // Silent from the start: every remaining slot.
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    let (status, body) = raw_request(&addr, b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 503"), "every slot is taken: {status} {body}");
    for stream in &mut silent {
        // The ten past connections_max were refused at once; the rest time out.
        assert!(closed_within(stream, Duration::from_secs(5)).await, "a silent connection was not closed");
    }
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await, "the idle keep-alive connection stayed open");
    assert!(idle_since.elapsed() >= Duration::from_millis(1400), "closed before the idle timeout");
    let (status, body) = raw_request(&addr, b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "the slots were given back: {status} {body}");
}

#[tokio::test]
async fn past_connections_per_address_max_a_client_gets_a_json_503_at_once() {
    let cluster = Cluster::start(1, &["--connections-per-address-max", "4"]).await;
    let addr = cluster.addr(1).to_string();
    // The harness's own client may hold a pooled connection: fill what is left.
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= 4, "more than connections_per_address_max connections were served");
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(format!("GET /health/live HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).to_string();
        if answer.starts_with("HTTP/1.1 503") {
            assert!(started.elapsed() < Duration::from_secs(1), "answered at once");
            break answer;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    };
    let body: Value = serde_json::from_str(refused.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(body["error"]["message"].as_str().unwrap().contains("connections_per_address_max"));
    assert!(refused.contains("retry-after: 1"), "{refused}");
    drop(held);
    // Closing them gives their slots back: a new connection is served.
    wait_until(Duration::from_secs(5), "a connection served once the held ones closed", async || {
        let (status, _) =
            raw_request(&addr, b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        status.starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn oversized_heads_and_targets_get_json_errors() {
    let cluster = Cluster::start(1, &[]).await;
    let addr = cluster.addr(1).to_string();
    // A head over header_bytes_max (16 KiB by default): 431 with our JSON body.
    let big = format!("GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "b".repeat(20 * 1024));
    let (status, body) = raw_request(&addr, big.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    assert_error(&(431, body), 431, "header_too_large");
    // A target over uri_bytes_max (8 KiB by default), within the head bound: 414 JSON.
    let long = format!("GET /v1/tasks/{} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", "1".repeat(10 * 1024));
    let (status, body) = raw_request(&addr, long.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 414"), "{status}");
    assert_error(&(414, body), 414, "uri_too_long");
    cluster.wait_ready(1, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_a_json_408_and_submits_nothing() {
    let cluster = Cluster::start(1, &["--body-read-timeout-ms", "1000"]).await;
    let addr = cluster.addr(1).to_string();
    // A body that stops arriving: 408 JSON after body_read_timeout_ms, and nothing submitted.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let head = "POST /v1/tasks HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    stream.write_all(format!("{head}{{\"queue\": \"q\",").as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer[..read]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let body: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_error(&(408, body), 408, "body_timeout");
    let (_, status) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(status["tasks"], 0);
    cluster.wait_ready(1, Duration::from_secs(1)).await;
}

async fn set_policy(cluster: &Cluster, set: Value) {
    let (status, body) = cluster.put(1, "/v1/config", &json!({ "set": set })).await;
    assert_eq!(status, 200, "{body}");
}

/// With `state_bytes_max` of 8 MiB, conversations of 1 MiB fill it: the next
/// write is refused with `429 state_full` and changes nothing, memory stays
/// bounded, and deleting a conversation makes room again.
#[tokio::test]
async fn the_state_byte_budget_refuses_writes_clearly_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    set_policy(
        &cluster,
        json!({"state_bytes_max": "8388608", "conversation_bytes_max": "1048576", "payload_bytes_max": "262144", "result_bytes_max": "262144"}),
    )
    .await;
    let value = "c".repeat(1024 * 1024 - 64);
    let mut written = 0;
    let refused = loop {
        assert!(written < 20, "the budget never refused a write");
        let (status, body) =
            cluster.put(1, &format!("/v1/conversations/c{written}/k"), &json!({ "value": value })).await;
        if status != 200 {
            break (status, body);
        }
        written += 1;
    };
    assert_eq!(written, 8, "eight conversations of just under 1 MiB fit in 8 MiB");
    assert_error(&refused, 429, "state_full");
    let (_, before) = cluster.get(1, "/v1/status").await.unwrap();
    // A task payload that does not fit either; nothing changes.
    let payload = "p".repeat(200 * 1024);
    let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": payload})).await.unwrap();
    assert_error(&answer, 429, "state_full");
    let (status, _) = cluster.get(1, &format!("/v1/conversations/c{written}")).await.unwrap();
    assert_eq!(status, 404, "the refused write created nothing");
    let (_, after) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(before["state_bytes"], after["state_bytes"]);
    assert_eq!(after["tasks"], 0);
    assert_eq!(after["conversations"], 8);
    let rss = rss_bytes(&cluster, 1);
    assert!(rss < 300 * 1024 * 1024, "8 MiB of state: RSS {rss} bytes");
    // Deleting one makes room for the task.
    let response = cluster.http.delete(cluster.url(1, "/v1/conversations/c0")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": payload})).await.unwrap();
    assert_eq!(answer.0, 201, "{answer:?}");
}

#[tokio::test]
async fn a_conversation_can_be_deleted_and_expires_after_its_ttl() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, _) = cluster.put(1, "/v1/conversations/talk/topic", &json!({"value": "budgets"})).await;
    assert_eq!(status, 200);
    let response = cluster.http.delete(cluster.url(1, "/v1/conversations/talk")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer = cluster.get(1, "/v1/conversations/talk").await.unwrap();
    assert_error(&answer, 404, "not_found");
    let response = cluster.http.delete(cluster.url(1, "/v1/conversations/talk")).send().await.unwrap();
    assert_error(&common::decode(response).await.unwrap(), 404, "not_found");
    // Expiry: a conversation not written for conversation_ttl_ms is gone.
    set_policy(&cluster, json!({"conversation_ttl_ms": "1500"})).await;
    let (status, _) = cluster.put(1, "/v1/conversations/brief/topic", &json!({"value": 1})).await;
    assert_eq!(status, 200);
    let (status, _) = cluster.get(1, "/v1/conversations/brief").await.unwrap();
    assert_eq!(status, 200);
    let start = Instant::now();
    loop {
        let (status, _) = cluster.get(1, "/v1/conversations/brief").await.unwrap();
        if status == 404 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the conversation did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(1000), "expired before its ttl");
}

/// 24 tasks of 200 KiB (4.8 MB of payloads) do not fit one list answer of
/// `list_bytes_max` (4 MiB by default): the answer is cut, says so, and its
/// cursor continues where it stopped.
#[tokio::test]
async fn a_big_list_is_cut_in_bytes_and_continues_from_its_cursor() {
    let cluster = Cluster::start(1, &[]).await;
    let payload = "t".repeat(200 * 1024);
    for _ in 0..24 {
        let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": payload})).await.unwrap();
        assert_eq!(answer.0, 201, "{answer:?}");
    }
    let response = cluster.http.get(cluster.url(1, "/v1/tasks?limit=1000")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(text.len() <= 4 * 1024 * 1024, "answer of {} bytes", text.len());
    let first: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(first["truncated"], true);
    let count = first["tasks"].as_array().unwrap().len();
    assert!((15..24).contains(&count), "{count} tasks in the first answer");
    let next = first["next_after"].as_u64().unwrap();
    assert_eq!(next, first["tasks"][count - 1]["id"].as_u64().unwrap());
    let (status, second) = cluster.get(1, &format!("/v1/tasks?limit=1000&after={next}")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(second["truncated"], false);
    assert_eq!(second["next_after"], Value::Null);
    assert_eq!(count + second["tasks"].as_array().unwrap().len(), 24);
}
