//! Admission control on a real node: refusals are immediate JSON errors with
//! Retry-After, expired work is dead-lettered instead of run late, and a
//! burst of load causes no leader election.

mod common;

use common::{assert_error, wait_until, Cluster};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let cluster = Cluster::start(1, &["--client-rate-per-second", "5", "--client-burst", "5"]).await;
    let mut refused = None;
    for i in 0..20 {
        let response = cluster
            .http
            .post(cluster.url(1, "/v1/tasks"))
            .header("x-phalanx-client", "greedy")
            .json(&json!({"queue": "q", "payload": i}))
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 429 {
            refused = Some(response);
            break;
        }
    }
    let response = refused.expect("the sixth request within a second is refused");
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_error(&(429, body.clone()), 429, "rate_limited");
    assert!(body["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    // Another client is not affected.
    let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": "other"})).await.unwrap();
    assert_eq!(answer.0, 201, "{answer:?}");
}

#[tokio::test]
async fn past_connections_max_a_new_connection_gets_503_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(1, &["--connections-max", "3"]).await;
    let addr = cluster.addr(1).to_string();
    let request = format!("GET /health/live HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    // Whatever the harness's own client keeps open, fill every slot with idle connections.
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= 3, "more than connections_max connections were served");
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).to_string();
        if answer.starts_with("HTTP/1.1 503") {
            break answer;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    };
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(refused.contains("\"code\":\"overloaded\""), "{refused}");
    assert!(refused.contains("connection: close"), "{refused}");
    // Closing them frees their slots, and the refusal was counted.
    drop(held);
    let start = Instant::now();
    let metrics = loop {
        let fresh = reqwest::Client::new();
        if let Ok(response) = fresh.get(cluster.url(1, "/metrics")).send().await {
            if response.status().as_u16() == 200 {
                break response.text().await.unwrap();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "slots were not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("phalanx_connections_refused_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the metric is exported");
    assert!(refused >= 1, "{metrics}");
}

#[tokio::test]
async fn a_saturated_queue_answers_429_with_retry_after_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, answer) = cluster.put(1, "/v1/config", &json!({"set": {"queue_tasks_max": 3}})).await;
    assert_eq!(status, 200, "{answer}");
    for i in 0..3 {
        assert_eq!(cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": i})).await.unwrap().0, 201);
    }
    let start = Instant::now();
    let response =
        cluster.http.post(cluster.url(1, "/v1/tasks")).json(&json!({"queue": "q", "payload": 3})).send().await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(1), "the refusal is immediate");
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("1".into()));
    let answer = common::decode(response).await.unwrap();
    assert_error(&answer, 429, "queue_full");
    assert_eq!(answer.1["error"]["retry_after_ms"], 1000);
    // Other queues are not affected, and the full one holds what it held.
    assert_eq!(cluster.post(1, "/v1/tasks", &json!({"queue": "other", "payload": 0})).await.unwrap().0, 201);
    let (_, list) = cluster.get(1, "/v1/tasks?queue=q").await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_door_refuses_low_priority_first_when_slots_run_short() {
    let cluster = Cluster::start(1, &["--requests-in-flight-max", "10"]).await;
    let submit = |priority: &str, payload: u64| submit_at(&cluster, 1, priority, payload);
    assert_error(&common::decode(submit("12", 0).await.unwrap()).await.unwrap(), 400, "invalid");

    // The disk stalls: five high-priority submits wait for it, holding five slots.
    let failpoint = cluster.servers[&1].data_dir.join("failpoint-stall-storage");
    std::fs::write(&failpoint, b"stall").unwrap();
    let proposed = commands_proposed(&cluster, 1).await;
    let waiting: Vec<_> = (1..=5).map(|i| tokio::spawn(submit("8", i))).collect();
    wait_proposed(&cluster, 1, proposed + 5, "five submits waiting for the disk").await;

    // Low work may use half of the ten slots: refused at once, with Retry-After.
    let start = Instant::now();
    let refused = submit("1", 6).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(500), "a refusal is immediate");
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body = common::decode(refused).await.unwrap();
    assert_error(&body, 429, "overloaded");
    assert!(body.1["error"]["message"].as_str().unwrap().contains("priority 1"), "{body:?}");
    // Normal and high work still get in (and wait for the disk like the others).
    let normal = tokio::spawn(submit("5", 7));
    let high = tokio::spawn(submit("9", 8));
    wait_proposed(&cluster, 1, proposed + 7, "the normal and the high submit waiting for the disk too").await;

    std::fs::remove_file(&failpoint).unwrap();
    for answer in waiting.into_iter().chain([normal, high]) {
        assert_eq!(answer.await.unwrap().unwrap().status().as_u16(), 201);
    }
    // The refused one changed nothing: seven tasks, none with payload 6.
    let (_, list) = cluster.get(1, "/v1/tasks?queue=q").await.unwrap();
    let payloads: Vec<u64> = list["tasks"].as_array().unwrap().iter().map(|t| t["payload"].as_u64().unwrap()).collect();
    assert_eq!(payloads.len(), 7, "{list}");
    assert!(!payloads.contains(&6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_submit_keeps_its_priority_at_the_leaders_door() {
    let cluster = Cluster::start(3, &["--requests-in-flight-max", "10"]).await;
    let leader = loop {
        if let Some(leader) = cluster.leader().await {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = cluster.servers.keys().copied().find(|id| *id != leader).unwrap();
    let submit = |node: u64, priority: &str, payload: u64| submit_at(&cluster, node, priority, payload);
    // The leader's disk stalls: five high-priority submits hold five of its ten slots.
    let failpoint = cluster.servers[&leader].data_dir.join("failpoint-stall-storage");
    std::fs::write(&failpoint, b"stall").unwrap();
    let proposed = commands_proposed(&cluster, leader).await;
    let waiting: Vec<_> = (1..=5).map(|i| tokio::spawn(submit(leader, "8", i))).collect();
    wait_proposed(&cluster, leader, proposed + 5, "five submits waiting for the leader's disk").await;
    // A low-priority submit sent to a follower is forwarded with its class,
    // and the leader's door refuses it (low work may use only half the slots).
    let refused = common::decode(submit(follower, "1", 6).await.unwrap()).await.unwrap();
    assert_error(&refused, 429, "overloaded");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("priority 1"), "{refused:?}");
    std::fs::remove_file(&failpoint).unwrap();
    for answer in waiting {
        let _ = answer.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queued_past_the_delay_target_lowers_the_doors_bound_and_it_grows_back() {
    let cluster = Cluster::start(1, &["--requests-in-flight-max", "64", "--admission-delay-target-ms", "100"]).await;
    let cluster = &cluster;
    let submit = |priority: &str, payload: u64| submit_at(cluster, 1, priority, payload);
    let burst = |from: u64, count: u64| futures::future::join_all((from..from + count).map(|i| submit("8", i)));
    // A few intervals of quick submits: the node learns its unloaded latency.
    for round in 0..3 {
        for answer in burst(round * 8, 8).await {
            assert_eq!(answer.unwrap().status().as_u16(), 201);
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    assert_eq!(metric(&cluster, "phalanx_admission_limit").await, 64);

    // The disk stalls: 8 submits, one after the other, take the 8 entries
    // that may be in flight (`proposals_in_flight_max`) and wait for it.
    let failpoint = &cluster.servers[&1].data_dir.join("failpoint-stall-storage");
    let hold = |from: u64| async move {
        std::fs::write(failpoint, b"stall").unwrap();
        let mut held = Vec::new();
        for i in from..from + 8 {
            let proposed = commands_proposed(cluster, 1).await;
            held.push(tokio::spawn(submit("8", i)));
            wait_proposed(cluster, 1, proposed + 1, "a submit waiting for the disk").await;
        }
        held
    };
    let mut held = hold(100).await;
    // 8 more wait in the proposal queue behind them for 800 ms: all are served, late.
    held.extend((108..116).map(|i| tokio::spawn(submit("8", i))));
    tokio::time::sleep(Duration::from_millis(800)).await;
    std::fs::remove_file(failpoint).unwrap();
    for answer in held {
        assert_eq!(answer.await.unwrap().unwrap().status().as_u16(), 201);
    }
    // By the next interval their wait is judged: 800 ms in the queue
    // against an unloaded wait of microseconds is eight times the target,
    // and one interval cuts the bound to a quarter.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(submit("8", 200).await.unwrap().status().as_u16(), 201);
    assert_eq!(metric(&cluster, "phalanx_admission_limit").await, 16);

    // Now low work (half of the bound) is refused at once with 8 in flight,
    // where requests_in_flight_max alone would let in 32, and changes nothing.
    let held = hold(300).await;
    let start = Instant::now();
    let refused = common::decode(submit("1", 999).await.unwrap()).await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(500), "a refusal is immediate");
    assert_error(&refused, 429, "overloaded");
    // Refused before routing, and still counted.
    assert_eq!(metric(cluster, "phalanx_refused_overload_total").await, 1);
    std::fs::remove_file(failpoint).unwrap();
    for answer in held {
        assert_eq!(answer.await.unwrap().unwrap().status().as_u16(), 201);
    }
    let (_, list) = cluster.get(1, "/v1/tasks?queue=q&limit=1000").await.unwrap();
    let payloads: Vec<u64> = list["tasks"].as_array().unwrap().iter().map(|t| t["payload"].as_u64().unwrap()).collect();
    assert_eq!(payloads.len(), 24 + 16 + 1 + 8, "{list}");
    assert!(!payloads.contains(&999));

    // Quick again and in use: the bound grows back.
    let mut payload = 1_000;
    wait_until(Duration::from_secs(20), "the bound grows back past 24", async || {
        for answer in burst(payload, 16).await {
            assert_eq!(answer.unwrap().status().as_u16(), 201);
        }
        payload += 16;
        tokio::time::sleep(Duration::from_millis(110)).await;
        metric(&cluster, "phalanx_admission_limit").await > 24
    })
    .await;
}

async fn metric(cluster: &Cluster, name: &str) -> u64 {
    let text = cluster.http.get(cluster.url(1, "/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is exported"))
}

/// A submit to node `node` announcing `priority` in `X-Phalanx-Priority`.
fn submit_at(
    cluster: &Cluster,
    node: u64,
    priority: &str,
    payload: u64,
) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static {
    cluster
        .http
        .post(cluster.url(node, "/v1/tasks"))
        .header("x-phalanx-priority", priority)
        .json(&json!({"queue": "q", "payload": payload}))
        .send()
}

/// Commands node `id` has proposed: a submit is counted once it is past the
/// door and handed to Raft, where a stalled disk keeps it waiting.
async fn commands_proposed(cluster: &Cluster, id: u64) -> u64 {
    let text = cluster.http.get(cluster.url(id, "/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("phalanx_commands_proposed_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the metric is exported")
}

async fn wait_proposed(cluster: &Cluster, id: u64, count: u64, what: &str) {
    wait_until(Duration::from_secs(10), what, async || commands_proposed(cluster, id).await >= count).await;
}

#[tokio::test]
async fn a_request_whose_deadline_passed_is_refused_and_changes_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks"))
        .header("x-phalanx-deadline-ms", "0")
        .json(&json!({"queue": "q", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "deadline_exceeded");
    let (_, listed) = cluster.get(1, "/v1/tasks").await.unwrap();
    assert!(listed["tasks"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn expired_backlog_is_dead_lettered_not_run_late() {
    let cluster = Cluster::start(1, &[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, body) =
            cluster.post(1, "/v1/tasks", &json!({"queue": "late", "payload": i, "deadline_ms": 300})).await.unwrap();
        assert_eq!(status, 201);
        ids.push(body["task_id"].as_u64().unwrap());
    }
    let (_, fresh) = cluster.post(1, "/v1/tasks", &json!({"queue": "late", "payload": "fresh"})).await.unwrap();
    // Nobody serves the queue until the deadlines have passed (an outage,
    // seen from the tasks) and the leader's tick has dead-lettered them.
    wait_until(Duration::from_secs(10), "the backlog's deadlines to pass", async || {
        for id in &ids {
            let (_, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
            if task["state"] != "dead" {
                return false;
            }
        }
        true
    })
    .await;
    let (_, registered) = cluster
        .post(1, "/v1/agents/register", &json!({"agent_id": "late-agent", "capabilities": ["late"], "capacity": 10}))
        .await
        .unwrap();
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].clone();
    let (_, polled) = cluster
        .post(
            1,
            "/v1/agents/late-agent/poll",
            &json!({"epoch": epoch, "session": session, "max_tasks": 10, "wait_ms": 500}),
        )
        .await
        .unwrap();
    let leased: Vec<u64> =
        polled["leases"].as_array().unwrap().iter().map(|l| l["task"]["id"].as_u64().unwrap()).collect();
    assert_eq!(leased, vec![fresh["task_id"].as_u64().unwrap()], "only the task without a deadline is run");
    for id in ids {
        let (_, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        assert_eq!(task["state"], "dead");
        assert_eq!(task["dead_reason"], "expired");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_load_causes_no_election() {
    let cluster = Cluster::start(3, &[]).await;
    let (_, before) = cluster.get(1, "/v1/cluster").await.unwrap();
    let term = before["term"].as_u64().unwrap();
    let start = Instant::now();
    let mut handles = Vec::new();
    for worker in 0..16 {
        let http = cluster.http.clone();
        let url = cluster.url(1 + worker % 3, "/v1/tasks/batch");
        handles.push(tokio::spawn(async move {
            let tasks: Vec<_> = (0..100).map(|i| json!({"queue": "burst", "payload": i, "priority": i % 10})).collect();
            let mut statuses = Vec::new();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(response) = http.post(&url).json(&json!({"tasks": tasks})).send().await {
                    statuses.push(response.status().as_u16());
                }
            }
            statuses
        }));
    }
    let mut accepted = 0;
    for handle in handles {
        for status in handle.await.unwrap() {
            assert!(matches!(status, 200 | 429 | 503), "burst answered {status}");
            accepted += (status == 200) as u32;
        }
    }
    assert!(accepted > 0);
    for id in 1..=3 {
        let (_, after) = cluster.get(id, "/v1/cluster").await.unwrap();
        assert_eq!(after["term"].as_u64().unwrap(), term, "node {id} saw an election under load: {after}");
        cluster.wait_ready(id, Duration::from_secs(1)).await;
    }
}
