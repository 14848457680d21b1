//! Refusals at the edge, against a real server process: what the state
//! machine would refuse is refused before it is proposed (the Raft log does
//! not grow), a long-poll at full capacity waits without proposing, only the
//! agent's own session (its secret, not just its public epoch) may heartbeat,
//! poll or deregister, and the refusals axum answers by itself (405, a path
//! parameter that does not decode) come in the JSON error format.

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The node's last Raft log index.
async fn log_index(cluster: &Cluster) -> u64 {
    let (status, body) = cluster.get(1, "/v1/cluster").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["last_log_index"].as_u64().expect("a log index")
}

/// Registers an agent; its registration answer (epoch and session secret).
async fn register(cluster: &Cluster, agent_id: &str, queues: &[&str], capacity: u32) -> Value {
    let body = json!({"agent_id": agent_id, "capabilities": queues, "capacity": capacity});
    let (status, registered) = cluster.post(1, "/v1/agents/register", &body).await.unwrap();
    assert_eq!(status, 200, "{registered}");
    assert!(registered["session"].as_str().is_some_and(|s| s.len() == 32), "a session secret: {registered}");
    registered
}

async fn submit(cluster: &Cluster, queue: &str) -> u64 {
    let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": queue, "payload": 1})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    body["task_id"].as_u64().unwrap()
}

#[tokio::test]
async fn refused_requests_cost_no_log_entry() {
    let cluster = Cluster::start(1, &[]).await;
    let registered = register(&cluster, "worker", &["q"], 1).await;
    let (epoch, session) = (registered["epoch"].as_u64().unwrap(), registered["session"].clone());
    let task_id = submit(&cluster, "q").await;
    let (status, polled) = cluster
        .post(1, "/v1/agents/worker/poll", &json!({"epoch": epoch, "session": session, "wait_ms": 1000}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{polled}");
    let fence = polled["leases"][0]["fence"].as_u64().expect("a lease");
    let capabilities: Vec<String> = (0..30_000).map(|i| format!("q{i}")).collect();
    let oversized_result = "x".repeat(256 * 1024 + 1);
    let before = log_index(&cluster).await;
    let rounds = 5;
    let alive = json!({"epoch": epoch, "session": session});
    for _ in 0..rounds {
        // Heartbeats are not log entries; they keep the agent from expiring (which would be one).
        assert_eq!(cluster.post(1, "/v1/agents/worker/heartbeat", &alive).await.unwrap().0, 200);
        let cases: Vec<((u16, Value), u16, &str)> = vec![
            (
                cluster
                    .post(1, "/v1/agents/register", &json!({"agent_id": "many", "capabilities": capabilities}))
                    .await
                    .unwrap(),
                429,
                "limit_reached",
            ),
            (
                cluster
                    .post(1, "/v1/agents/register", &json!({"agent_id": "w", "capabilities": ["q"], "capacity": 0}))
                    .await
                    .unwrap(),
                400,
                "invalid",
            ),
            (cluster.post(1, "/v1/tasks/999/cancel", &json!({})).await.unwrap(), 404, "task_not_found"),
            (
                cluster.post(1, "/v1/tasks/999/complete", &json!({"fence": 1, "result": 1})).await.unwrap(),
                404,
                "task_not_found",
            ),
            (
                cluster
                    .post(
                        1,
                        &format!("/v1/tasks/{task_id}/complete"),
                        &json!({"fence": fence, "result": oversized_result}),
                    )
                    .await
                    .unwrap(),
                413,
                "too_large",
            ),
            (
                cluster
                    .post(1, &format!("/v1/tasks/{task_id}/extend"), &json!({"fence": fence, "lease_ttl_ms": 1}))
                    .await
                    .unwrap(),
                400,
                "invalid",
            ),
            (
                cluster
                    .post(
                        1,
                        &format!("/v1/tasks/{task_id}/wait"),
                        &json!({"fence": fence, "on": [999], "timeout_ms": 100}),
                    )
                    .await
                    .unwrap(),
                404,
                "task_not_found",
            ),
            (cluster.post(1, "/v1/tasks/999/progress", &json!({"fence": 1})).await.unwrap(), 404, "task_not_found"),
            (
                cluster
                    .post(1, "/v1/agents/worker/deregister", &json!({"epoch": epoch + 1, "session": session}))
                    .await
                    .unwrap(),
                409,
                "stale_epoch",
            ),
            (
                cluster.put(1, "/v1/conversations/c/k", &json!({"value": 1, "expected_version": 3})).await,
                409,
                "version_conflict",
            ),
            (cluster.post(1, "/v1/config/rollback", &json!({"version": 99})).await.unwrap(), 400, "invalid"),
        ];
        for (answer, status, code) in &cases {
            assert_error(answer, *status, code);
        }
    }
    let after = log_index(&cluster).await;
    assert_eq!(after, before, "{} refused requests added {} log entries", rounds * 11, after - before);
    // A refusal in a batch is answered in its slot; the rest is proposed.
    let batch = json!({"tasks": [{"queue": "q", "payload": 1}, {"queue": "q", "payload": 2, "parent_id": 999, "parent_fence": 1}]});
    let (status, answer) = cluster.post(1, "/v1/tasks/batch", &batch).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(answer["results"][0]["task_id"].as_u64().is_some(), "{answer}");
    assert_eq!(answer["results"][1]["error"]["code"], "task_not_found", "{answer}");
}

#[tokio::test]
async fn a_long_poll_at_capacity_proposes_nothing_and_wakes_when_a_lease_ends() {
    let cluster = Cluster::start(1, &[]).await;
    let registered = register(&cluster, "busy", &["q"], 1).await;
    let session = json!({"epoch": registered["epoch"], "session": registered["session"]});
    for _ in 0..3 {
        submit(&cluster, "q").await;
    }
    let poll = |wait_ms: u64| {
        let mut body = session.clone();
        body["wait_ms"] = json!(wait_ms);
        body
    };
    let (_, first) = cluster.post(1, "/v1/agents/busy/poll", &poll(1000)).await.unwrap();
    let lease = first["leases"][0].clone();
    let fence = lease["fence"].as_u64().expect("a lease");
    // At capacity, with two tasks ready: the poll waits out its time and proposes nothing.
    let before = log_index(&cluster).await;
    let started = Instant::now();
    let (status, answer) = cluster.post(1, "/v1/agents/busy/poll", &poll(1500)).await.unwrap();
    assert_eq!((status, answer["leases"].as_array().map(Vec::len)), (200, Some(0)), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(1400), "the poll waited");
    let grown = log_index(&cluster).await - before;
    assert!(grown <= 2, "a 1.5 s poll at capacity added {grown} log entries");
    // A lease ending wakes it: the next task is granted at once, not at the end of the wait.
    let waiting = {
        let (http, url, body) = (cluster.http.clone(), cluster.url(1, "/v1/agents/busy/poll"), poll(10_000));
        tokio::spawn(async move {
            let started = Instant::now();
            let answer: Value = http.post(url).json(&body).send().await.unwrap().json().await.unwrap();
            (started.elapsed(), answer)
        })
    };
    // Lets the poll start waiting. A fixed wait: nothing a client can see
    // says a poll is waiting (and one that was not yet would be granted at
    // once, which the bound below also accepts).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task_id = lease["task"]["id"].as_u64().unwrap();
    let (status, done) =
        cluster.post(1, &format!("/v1/tasks/{task_id}/complete"), &json!({"fence": fence, "result": 1})).await.unwrap();
    assert_eq!(status, 200, "{done}");
    let (waited, answer) = waiting.await.unwrap();
    assert_eq!(answer["leases"].as_array().map(Vec::len), Some(1), "{answer}");
    assert!(waited < Duration::from_secs(5), "woken by the lease's end, after {waited:?}");
}

#[tokio::test]
async fn forged_session_requests_for_another_agent_are_refused_and_harm_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    let registered = register(&cluster, "victim", &["v"], 4).await;
    let (epoch, session) = (registered["epoch"].as_u64().unwrap(), registered["session"].clone());
    // The epoch is public: anyone can read it from the agent list.
    let (_, agents) = cluster.get(1, "/v1/agents").await.unwrap();
    assert_eq!(agents["agents"][0]["epoch"], epoch);
    for forged_session in [Value::Null, json!("0123456789abcdef0123456789abcdef")] {
        let forged = json!({"epoch": epoch, "session": forged_session});
        for action in ["heartbeat", "poll", "deregister"] {
            let answer = cluster.post(1, &format!("/v1/agents/victim/{action}"), &forged).await.unwrap();
            assert_error(&answer, 403, "wrong_session");
        }
    }
    // While a forger keeps trying, every round of the victim's work succeeds.
    let forger = {
        let (http, base) = (cluster.http.clone(), format!("http://{}", cluster.addr(1)));
        tokio::spawn(async move {
            let forged = json!({"epoch": epoch});
            loop {
                for action in ["heartbeat", "poll", "deregister"] {
                    let _ = http.post(format!("{base}/v1/agents/victim/{action}")).json(&forged).send().await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let own = json!({"epoch": epoch, "session": session});
    let own_poll = json!({"epoch": epoch, "session": session, "max_tasks": 1, "wait_ms": 1000});
    for round in 0..20 {
        let task_id = submit(&cluster, "v").await;
        assert_eq!(cluster.post(1, "/v1/agents/victim/heartbeat", &own).await.unwrap().0, 200, "round {round}");
        let (status, polled) = cluster.post(1, "/v1/agents/victim/poll", &own_poll).await.unwrap();
        assert_eq!(status, 200, "round {round}: {polled}");
        let lease = &polled["leases"][0];
        assert_eq!(lease["task"]["id"].as_u64(), Some(task_id), "round {round}: {polled}");
        let complete = json!({"fence": lease["fence"], "result": round});
        let (status, done) = cluster.post(1, &format!("/v1/tasks/{task_id}/complete"), &complete).await.unwrap();
        assert_eq!(status, 200, "round {round}: {done}");
    }
    forger.abort();
    let (status, _) = cluster.post(1, "/v1/agents/victim/deregister", &own).await.unwrap();
    assert_eq!(status, 200, "the agent itself may deregister");
}

#[tokio::test]
async fn refusals_axum_answers_by_itself_are_json() {
    let cluster = Cluster::start(1, &[]).await;
    let url = |path: &str| cluster.url(1, path);
    let requests = [
        (cluster.http.get(url("/v1/tasks/1/cancel")), 405, "method_not_allowed", Some("POST")),
        (cluster.http.delete(url("/v1/tasks")), 405, "method_not_allowed", Some("GET")),
        (cluster.http.post(url("/v1/status")), 405, "method_not_allowed", Some("GET")),
        (cluster.http.put(url("/health/live")), 405, "method_not_allowed", Some("GET")),
        (cluster.http.post(url("/metrics")), 405, "method_not_allowed", Some("GET")),
        (cluster.http.get(url("/v1/conversations/%FF")), 400, "invalid", None),
        (cluster.http.post(url("/v1/agents/%FF%FE/heartbeat")).body("{}"), 400, "invalid", None),
        (cluster.http.put(url("/v1/conversations/c/%C3%28")).body("{}"), 400, "invalid", None),
    ];
    for (request, status, code, allowed) in requests {
        let response = request.send().await.unwrap();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
        let answer = common::decode(response).await.unwrap();
        assert_error(&answer, status, code);
        assert_eq!(content_type.as_deref(), Some("application/json"), "{answer:?}");
        if let Some(method) = allowed {
            assert!(allow.as_deref().is_some_and(|a| a.contains(method)), "Allow: {allow:?} for {answer:?}");
        }
    }
    // A body without a content type is read as JSON all the same: no rejection to map.
    let response = cluster.http.post(url("/v1/tasks")).body(r#"{"queue": "q", "payload": 1}"#).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 201);
}

#[tokio::test]
async fn refusals_forwarded_by_a_follower_cost_no_log_entry_either() {
    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await.expect("a leader");
    let follower = *cluster.servers.keys().find(|id| **id != leader).unwrap();
    let index = |cluster: &Cluster| {
        let url = cluster.url(leader, "/v1/cluster");
        let http = cluster.http.clone();
        async move {
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            body["last_log_index"].as_u64().unwrap()
        }
    };
    let before = index(&cluster).await;
    for node in [follower, leader] {
        for _ in 0..10 {
            let answer = cluster.post(node, "/v1/tasks/999/cancel", &json!({})).await.unwrap();
            assert_error(&answer, 404, "task_not_found");
            let answer = cluster.post(node, "/v1/agents/ghost/deregister", &json!({"epoch": 1})).await.unwrap();
            assert_error(&answer, 404, "agent_not_found");
        }
    }
    let after = index(&cluster).await;
    assert_eq!(after, before, "40 refusals added {} log entries", after - before);
}
