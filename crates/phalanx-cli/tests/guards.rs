//! Logic-failure guards on a real node: a delegation ping-pong is caught at
//! its first repeat, a wait cycle is refused with the cycle named, and a
//! parent whose awaited children are all dead is dead-lettered at once.

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};

struct Agent<'a> {
    cluster: &'a Cluster,
    id: String,
    epoch: u64,
    session: Value,
}

impl<'a> Agent<'a> {
    async fn register(cluster: &'a Cluster, id: &str, queues: &[&str]) -> Agent<'a> {
        let body = json!({"agent_id": id, "capabilities": queues, "capacity": 10});
        let (status, answer) = cluster.post(1, "/v1/agents/register", &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        Agent {
            cluster,
            id: id.to_string(),
            epoch: answer["epoch"].as_u64().unwrap(),
            session: answer["session"].clone(),
        }
    }

    /// Leases one task of `queue`; returns (task id, fence).
    async fn lease(&self, queue: &str) -> (u64, u64) {
        let body = json!({"epoch": self.epoch, "session": self.session, "queues": [queue], "wait_ms": 1000});
        let (status, answer) = self.cluster.post(1, &format!("/v1/agents/{}/poll", self.id), &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let lease = &answer["leases"][0];
        (lease["task"]["id"].as_u64().expect("a lease"), lease["fence"].as_u64().unwrap())
    }
}

async fn submit(cluster: &Cluster, body: Value) -> (u16, Value) {
    cluster.post(1, "/v1/tasks", &body).await.unwrap()
}

#[tokio::test]
async fn a_ping_pong_delegation_is_caught_at_its_first_repeat() {
    let cluster = Cluster::start(1, &[]).await;
    let agent = Agent::register(&cluster, "pinger", &["plan", "review"]).await;
    submit(&cluster, json!({"queue": "plan", "payload": {"doc": 1}})).await;
    let (root, root_fence) = agent.lease("plan").await;
    let (status, child) = submit(
        &cluster,
        json!({"queue": "review", "payload": {"doc": 1, "step": "review"}, "parent_id": root, "parent_fence": root_fence}),
    )
    .await;
    assert_eq!(status, 201, "{child}");
    let (child_id, child_fence) = agent.lease("review").await;
    assert_eq!(child_id, child["task_id"].as_u64().unwrap());
    // The reviewer hands the same work back to the planner: A -> B -> A.
    let answer = submit(
        &cluster,
        json!({"queue": "plan", "payload": {"doc": 1}, "parent_id": child_id, "parent_fence": child_fence}),
    )
    .await;
    assert_error(&answer, 422, "loop_detected");
    let (_, task) = cluster.get(1, &format!("/v1/tasks/{child_id}")).await.unwrap();
    assert_eq!(task["state"], "dead");
    let reason = task["dead_reason"].as_str().unwrap();
    assert!(reason.starts_with("loop_detected: plan -> review -> plan"), "{reason}");
    assert_eq!(task["hop_count"], 1, "caught at the first repeat, long before delegation_hops_max");
    // A delegation from a stale lease of the root is refused as superseded.
    let answer =
        submit(&cluster, json!({"queue": "review", "payload": 2, "parent_id": root, "parent_fence": root_fence - 1}))
            .await;
    assert_error(&answer, 409, "superseded");
}

#[tokio::test]
async fn a_three_task_wait_cycle_is_refused_and_named() {
    let cluster = Cluster::start(1, &[]).await;
    let agent = Agent::register(&cluster, "waiter", &["w"]).await;
    let mut held = Vec::new();
    for i in 0..3 {
        submit(&cluster, json!({"queue": "w", "payload": i})).await;
        held.push(agent.lease("w").await);
    }
    let [(a, fa), (b, fb), (c, fc)] = [held[0], held[1], held[2]];
    let wait = |task: u64, fence: u64, on: u64| {
        let cluster = &cluster;
        async move {
            let body = json!({"fence": fence, "on": [on], "timeout_ms": 60_000});
            cluster.post(1, &format!("/v1/tasks/{task}/wait"), &body).await.unwrap()
        }
    };
    assert_eq!(wait(a, fa, b).await.0, 200);
    assert_eq!(wait(b, fb, c).await.0, 200);
    let before = cluster.get(1, &format!("/v1/tasks/{c}")).await.unwrap();
    let answer = wait(c, fc, a).await;
    assert_error(&answer, 422, "deadlock");
    let message = answer.1["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("{c} -> {a} -> {b} -> {c}")), "{message}");
    assert_eq!(cluster.get(1, &format!("/v1/tasks/{c}")).await.unwrap(), before, "a refused wait changes nothing");
}

#[tokio::test]
async fn a_parent_whose_children_are_all_dead_fails_at_once() {
    let cluster = Cluster::start(1, &[]).await;
    let agent = Agent::register(&cluster, "parent-agent", &["parent", "child"]).await;
    submit(&cluster, json!({"queue": "parent", "payload": "p"})).await;
    let (parent, parent_fence) = agent.lease("parent").await;
    let mut children = Vec::new();
    for i in 0..2 {
        let body = json!({"queue": "child", "payload": i, "parent_id": parent, "parent_fence": parent_fence, "max_attempts": 1});
        children.push(submit(&cluster, body).await.1["task_id"].as_u64().unwrap());
    }
    let body = json!({"fence": parent_fence, "on": children, "timeout_ms": 3_600_000});
    let (status, waiting) = cluster.post(1, &format!("/v1/tasks/{parent}/wait"), &body).await.unwrap();
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["pending"].as_array().unwrap().len(), 2);
    for _ in 0..2 {
        let (child, fence) = agent.lease("child").await;
        let (status, task) = cluster
            .post(1, &format!("/v1/tasks/{child}/fail"), &json!({"fence": fence, "error": "boom"}))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(task["state"], "dead", "one attempt only");
    }
    let (_, task) = cluster.get(1, &format!("/v1/tasks/{parent}")).await.unwrap();
    assert_eq!(task["state"], "dead", "the parent does not wait out its hour: {task}");
    assert!(task["dead_reason"].as_str().unwrap().starts_with("dependencies_dead"));
}

#[tokio::test]
async fn a_stalled_but_alive_agent_is_detected_and_its_task_completed_by_another() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, answer) = cluster.put(1, "/v1/config", &json!({"set": {"stall_timeout_ms": 1000}})).await;
    assert_eq!(status, 200, "{answer}");
    let stuck = Agent::register(&cluster, "stuck-agent", &["slow"]).await;
    let (_, submitted) = submit(&cluster, json!({"queue": "slow", "payload": "work"})).await;
    let (task, stale_fence) = stuck.lease("slow").await;
    assert_eq!(Some(task), submitted["task_id"].as_u64());
    // The stuck agent keeps heartbeating (it is alive) but reports no progress.
    let healthy = Agent::register(&cluster, "healthy-agent", &["slow"]).await;
    let mut taken = None;
    for _ in 0..40 {
        let beat = json!({"epoch": stuck.epoch, "session": stuck.session});
        assert_eq!(cluster.post(1, "/v1/agents/stuck-agent/heartbeat", &beat).await.unwrap().0, 200);
        let body = json!({"epoch": healthy.epoch, "session": healthy.session, "queues": ["slow"], "wait_ms": 100});
        let (_, answer) = cluster.post(1, "/v1/agents/healthy-agent/poll", &body).await.unwrap();
        if let Some(lease) = answer["leases"].as_array().and_then(|l| l.first()) {
            taken = Some(lease["fence"].as_u64().unwrap());
            break;
        }
    }
    let fence = taken.expect("the task was re-granted to the healthy agent");
    let (_, status_body) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(status_body["stuck_agents"], json!(["stuck-agent"]), "{status_body}");
    let done = cluster.post(1, &format!("/v1/tasks/{task}/complete"), &json!({"fence": fence, "result": "ok"})).await;
    assert_eq!(done.unwrap().0, 200);
    let late =
        cluster.post(1, &format!("/v1/tasks/{task}/complete"), &json!({"fence": stale_fence, "result": "late"})).await;
    assert_error(&late.unwrap(), 409, "superseded");
    let (_, final_task) = cluster.get(1, &format!("/v1/tasks/{task}")).await.unwrap();
    assert_eq!(final_task["result"], "ok");
}

#[tokio::test]
async fn a_queue_no_agent_serves_is_reported_then_its_tasks_carry_an_error() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, answer) = cluster.put(1, "/v1/config", &json!({"set": {"unserved_grace_ms": 300}})).await;
    assert_eq!(status, 200, "{answer}");
    Agent::register(&cluster, "someone-else", &["other"]).await;
    let (_, submitted) = submit(&cluster, json!({"queue": "nobody", "payload": 1})).await;
    let id = submitted["task_id"].as_u64().unwrap();
    let (_, status_body) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(status_body["unserved_queues"], json!(["nobody"]), "reported at once: {status_body}");
    let start = std::time::Instant::now();
    loop {
        let (_, task) = cluster.get(1, &format!("/v1/tasks/{id}")).await.unwrap();
        if let Some(error) = task["error"].as_str() {
            assert!(error.starts_with("unserved: no registered agent serves queue \"nobody\""), "{error}");
            assert_eq!(task["state"], "pending", "still waiting: an agent may yet come");
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no error after the grace period: {task}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // An agent for the queue arrives: it is served, and no longer reported.
    let agent = Agent::register(&cluster, "finally", &["nobody"]).await;
    let (leased, _) = agent.lease("nobody").await;
    assert_eq!(leased, id);
    let (_, status_body) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!(status_body["unserved_queues"], json!([]));
}
