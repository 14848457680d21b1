//! The replicated, versioned policy on a real node: an invalid change is
//! refused naming the field and changes nothing, and so is a value outside
//! its key's bounds; a change that would refuse all new work or delete
//! retained tasks needs `force` and is recorded as forced; a change that
//! stalls dispatch, after which a majority of the voters loses readiness, or
//! after which most submits are refused, is rolled back automatically and
//! the rollback recorded with its reason; a bootstrap file that does not
//! parse stops the node at start, naming the line.

mod common;

use common::{assert_error, Cluster};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn an_invalid_policy_is_refused_naming_the_field_and_nothing_changes() {
    let cluster = Cluster::start(1, &[]).await;
    let (_, before) = cluster.get(1, "/v1/config").await.unwrap();
    let cases = [
        (json!({"set": {"lease_ttl_ms_default": 1000}}), "lease_ttl_ms_default"),
        (json!({"set": {"agent_ttl_ms": 3000}}), "agent_ttl_ms"),
        (json!({"set": {"queue_tasks_max": 0}}), "queue_tasks_max"),
        (json!({"set": {"queue_tasks_max": "many"}}), "policy"),
        (json!({"set": {"no_such_key": 1}}), "no_such_key"),
    ];
    for (body, field) in cases {
        let response = cluster.http.put(cluster.url(1, "/v1/config")).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_error(&(status, answer.clone()), 400, "invalid");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message} names {field}");
    }
    let (_, after) = cluster.get(1, "/v1/config").await.unwrap();
    assert_eq!(before, after);

    // A valid change is versioned and can be rolled back by hand.
    let (status, set) = cluster.put(1, "/v1/config", &json!({"set": {"queue_tasks_max": "5"}})).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["version"], 2);
    for i in 0..5 {
        cluster.post(1, "/v1/tasks", &json!({"queue": "small", "payload": i})).await.unwrap();
    }
    let full = cluster.post(1, "/v1/tasks", &json!({"queue": "small", "payload": 5})).await.unwrap();
    assert_error(&full, 429, "queue_full");
    let (status, _) = cluster.post(1, "/v1/config/rollback", &json!({})).await.unwrap();
    assert_eq!(status, 200);
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    assert_eq!(history["version"], 3);
    assert!(history["history"][2]["note"].as_str().unwrap().starts_with("rollback to 1"));
}

#[tokio::test]
async fn a_change_that_stalls_dispatch_is_rolled_back_automatically() {
    let cluster = Cluster::start(1, &[]).await;
    let (_, registered) = cluster
        .post(1, "/v1/agents/register", &json!({"agent_id": "worker", "capabilities": ["q"], "capacity": 2}))
        .await
        .unwrap();
    let epoch = registered["epoch"].as_u64().unwrap();
    let session = registered["session"].clone();
    // Valid on its own, but every running agent asks for 30 s leases: nothing can be dispatched.
    let change = json!({"set": {"lease_ttl_ms_max": 5000, "lease_ttl_ms_default": 4000}});
    let (status, answer) = cluster.put(1, "/v1/config", &change).await;
    assert_eq!(status, 200, "{answer}");
    let (_, submitted) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": 1})).await.unwrap();
    let start = Instant::now();
    let leased = loop {
        assert!(start.elapsed() < Duration::from_secs(15), "no automatic rollback within 15 s");
        let poll = json!({"epoch": epoch, "session": session, "wait_ms": 200, "lease_ttl_ms": 30_000});
        let (status, answer) = cluster.post(1, "/v1/agents/worker/poll", &poll).await.unwrap();
        if status == 200 && !answer["leases"].as_array().unwrap().is_empty() {
            break answer["leases"][0]["task"]["id"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(leased, submitted["task_id"]);
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    let last = &history["history"][2];
    assert!(last["note"].as_str().unwrap().contains("dispatch stalled"), "{history}");
    assert_eq!(last["policy"]["lease_ttl_ms_max"], history["history"][0]["policy"]["lease_ttl_ms_max"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_which_a_majority_loses_readiness_is_rolled_back() {
    let cluster = Cluster::start(3, &[]).await;
    let leader = loop {
        if let Some(leader) = cluster.leader().await {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let followers: Vec<u64> = cluster.servers.keys().copied().filter(|id| *id != leader).collect();
    let (status, answer) = cluster.put(leader, "/v1/config", &json!({"set": {"policy_guard_ms": 30_000}})).await;
    assert_eq!(status, 200, "{answer}");
    // Right after the change both followers' apply loops wedge: their logs
    // still take entries (the leader keeps committing), their state stops.
    let failpoints: Vec<_> =
        followers.iter().map(|id| cluster.servers[id].data_dir.join("failpoint-stall-apply")).collect();
    for failpoint in &failpoints {
        std::fs::write(failpoint, b"stall").unwrap();
    }
    let start = Instant::now();
    let rollback = loop {
        // Writes keep flowing, so that committed entries pile up unapplied.
        let _ = cluster.post(leader, "/v1/tasks", &json!({"queue": "q", "payload": 1})).await;
        let (_, history) = cluster.get(leader, "/v1/config/history").await.unwrap();
        let versions = history["history"].as_array().unwrap();
        if versions.len() == 3 {
            break versions[2].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(25), "no automatic rollback within 25 s: {history}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let note = rollback["note"].as_str().unwrap();
    assert!(note.contains("readiness lost on 2 of 3 voters"), "{note}");
    assert!(note.contains("apply stalled"), "{note}");
    assert_eq!(rollback["policy"]["policy_guard_ms"], 10_000, "back to the previous version");

    // The followers recover, catch up, and hold the same history.
    for failpoint in &failpoints {
        std::fs::remove_file(failpoint).unwrap();
    }
    for id in &followers {
        cluster.wait_ready(*id, Duration::from_secs(20)).await;
        let (_, history) = cluster.get(*id, "/v1/config/history").await.unwrap();
        assert_eq!(history["history"][2]["note"], rollback["note"]);
    }
}

#[test]
fn a_corrupt_bootstrap_file_stops_the_node_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phalanx.conf");
    std::fs::write(&file, "# node settings\nraft_keepalive_ms = 30\nelection_timeout_min_ms = soon\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["server", "--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3") && stderr.contains("election_timeout_min_ms"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was started or written");
}

#[tokio::test]
async fn finished_tasks_and_their_idempotency_keys_leave_after_their_time_to_live() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, answer) = cluster.put(1, "/v1/config", &json!({"set": {"finished_task_ttl_ms": 300}})).await;
    assert_eq!(status, 200, "{answer}");
    let (_, first) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": 1, "idempotency_key": "once"})).await.unwrap();
    let id = first["task_id"].as_u64().unwrap();
    cluster.post(1, &format!("/v1/tasks/{id}/cancel"), &json!({})).await.unwrap();
    let start = Instant::now();
    loop {
        let (status, _) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        if status == 404 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the finished task was kept past its time-to-live");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The key went with it: the same key now creates a new task.
    let (_, again) =
        cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": 1, "idempotency_key": "once"})).await.unwrap();
    assert_eq!(again["deduplicated"], false);
    assert_ne!(again["task_id"].as_u64().unwrap(), id);
}

/// A `PUT /v1/config` refused with `status` and `code`, its message naming
/// every word, and the policy unchanged.
async fn check_refused(cluster: &Cluster, body: serde_json::Value, status: u16, code: &str, words: &[&str]) {
    let (_, before) = cluster.get(1, "/v1/config").await.unwrap();
    let answer = cluster.put(1, "/v1/config", &body).await;
    assert_error(&answer, status, code);
    let message = answer.1["error"]["message"].as_str().unwrap();
    for word in words {
        assert!(message.contains(word), "{message:?} names {word:?}");
    }
    let (_, after) = cluster.get(1, "/v1/config").await.unwrap();
    assert_eq!(before, after, "{body} changed nothing");
}

#[tokio::test]
async fn values_outside_their_bounds_are_refused_naming_field_value_and_bound() {
    let cluster = Cluster::start(1, &[]).await;
    // 2^63: doubled, it used to wrap to 0, so with leases long enough for
    // the other checks an agent time-to-live of 1 ms passed.
    let huge = 1u64 << 63;
    let wrapping = json!({"set": {
        "agent_heartbeat_interval_ms": huge,
        "agent_ttl_ms": 1,
        "lease_ttl_ms_max": u64::MAX,
        "lease_ttl_ms_default": huge + 1,
    }});
    check_refused(
        &cluster,
        wrapping,
        400,
        "invalid",
        &["agent_heartbeat_interval_ms", "9223372036854775808", "upper bound 3600000"],
    )
    .await;
    for (key, value, bound) in [
        ("agent_ttl_ms", 1, "lower bound 1000"),
        ("queue_name_bytes_max", 1, "lower bound 16"),
        ("tasks_max", 1, "lower bound 100"),
        ("agents_max", 0, "lower bound 1"),
    ] {
        check_refused(&cluster, json!({"set": {key: value}}), 400, "invalid", &[key, bound]).await;
    }
    let (_, config) = cluster.get(1, "/v1/config").await.unwrap();
    for key in config["policy"].as_object().unwrap().keys().filter(|key| key.ends_with("_max")) {
        check_refused(&cluster, json!({"set": {key: u64::MAX}}), 400, "invalid", &[key, "18446744073709551615"]).await;
    }
}

#[tokio::test]
async fn lowering_agents_max_below_the_registered_agents_needs_force() {
    let cluster = Cluster::start(1, &[]).await;
    for agent in ["a", "b", "c"] {
        let body = json!({"agent_id": agent, "capabilities": ["q"]});
        assert_eq!(cluster.post(1, "/v1/agents/register", &body).await.unwrap().0, 200);
    }
    check_refused(
        &cluster,
        json!({"set": {"agents_max": 1}}),
        409,
        "force_required",
        &["agents_max", "3 agents registered", "force"],
    )
    .await;
    // The CLI says the same, and forces the change with `--force`.
    let config_set = |force: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx"));
        command.args(["config", "--nodes", cluster.addr(1), "set", "agents_max=1"]);
        if force {
            command.arg("--force");
        }
        command.output().unwrap()
    };
    let refused = config_set(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("force"), "{stderr}");
    let forced = config_set(true);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    let last = &history["history"][1];
    assert_eq!(last["forced"], true, "{history}");
    assert!(last["note"].as_str().unwrap().contains("3 agents registered"), "{history}");
    assert_eq!(history["history"][0]["forced"], false);
}

#[tokio::test]
async fn lowering_finished_tasks_max_needs_force_and_is_recorded_as_forced() {
    let cluster = Cluster::start(1, &[]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, submitted) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": i})).await.unwrap();
        let id = submitted["task_id"].as_u64().unwrap();
        assert_eq!(cluster.post(1, &format!("/v1/tasks/{id}/cancel"), &json!({})).await.unwrap().0, 200);
        ids.push(id);
    }
    check_refused(
        &cluster,
        json!({"set": {"finished_tasks_max": 1}}),
        409,
        "force_required",
        &["finished_tasks_max", "2 of them would be deleted"],
    )
    .await;
    for id in &ids {
        assert_eq!(cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap().0, 200, "task {id} is kept");
    }
    let (status, answer) =
        cluster.put(1, "/v1/config", &json!({"set": {"finished_tasks_max": "1"}, "force": true})).await;
    assert_eq!(status, 200, "{answer}");
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    assert_eq!(history["history"][1]["forced"], true, "{history}");
    assert!(history["history"][1]["note"].as_str().unwrap().contains("forced"), "{history}");
    let kept = statuses_of(&cluster, &ids).await;
    assert_eq!(kept, vec![404, 404, 200], "the oldest two were deleted, as the refusal said");
}

async fn statuses_of(cluster: &Cluster, ids: &[u64]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for id in ids {
        statuses.push(cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap().0);
    }
    statuses
}

#[tokio::test]
async fn a_change_after_which_submits_are_refused_is_rolled_back() {
    let cluster = Cluster::start(1, &[]).await;
    let queue = "a-queue-name-of-29-bytes-long";
    for i in 0..10 {
        let (status, _) = cluster.post(1, "/v1/tasks", &json!({"queue": queue, "payload": i})).await.unwrap();
        assert_eq!(status, 201);
    }
    check_refused(
        &cluster,
        json!({"set": {"queue_name_bytes_max": 16}}),
        409,
        "force_required",
        &["queue_name_bytes_max", "29 bytes"],
    )
    .await;
    let (status, answer) =
        cluster.put(1, "/v1/config", &json!({"set": {"queue_name_bytes_max": 16}, "force": true})).await;
    assert_eq!(status, 200, "{answer}");
    // Every submit to the queue in use is now refused, until the guard rolls the change back.
    let start = Instant::now();
    let mut refused = 0;
    loop {
        let (status, _) = cluster.post(1, "/v1/tasks", &json!({"queue": queue, "payload": "again"})).await.unwrap();
        if status == 201 {
            break;
        }
        assert_eq!(status, 413);
        refused += 1;
        assert!(start.elapsed() < Duration::from_secs(8), "no rollback within 8 s ({refused} refused)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    let rollback = &history["history"][2];
    let note = rollback["note"].as_str().unwrap();
    assert!(note.starts_with("rollback to 1") && note.contains("refused submits jumped from 0%"), "{note}");
    assert_eq!(rollback["policy"]["queue_name_bytes_max"], 128);
    assert_eq!(history["history"][1]["forced"], true);
}
