//! "Up but not working": a leader whose disk stalls (a failpoint file makes
//! its log writes wait), or whose apply loop stalls (another failpoint makes
//! it apply nothing while the log still commits), is reported not ready,
//! hands leadership over, and the cluster keeps acknowledging writes; when
//! the fault clears it catches up and is ready again.

mod common;

use common::{wait_until, Cluster};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_stalled_disk_hands_over_and_writes_continue() {
    stalled_leader_hands_over("failpoint-stall-storage", "storage write stalled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_stalled_apply_loop_hands_over_and_writes_continue() {
    stalled_leader_hands_over("failpoint-stall-apply", "apply stalled").await;
}

async fn stalled_leader_hands_over(failpoint_file: &str, reason: &str) {
    let cluster = Cluster::start(3, &[]).await;
    // The node that says it leads, once every node agrees.
    let old_leader = loop {
        let mut views = Vec::new();
        for id in cluster.servers.keys() {
            let (_, info) = cluster.get(*id, "/v1/cluster").await.unwrap();
            views.push((info["leader_id"].as_u64(), info["state"] == "Leader", *id));
        }
        let leaders: Vec<u64> = views.iter().filter(|v| v.1).map(|v| v.2).collect();
        if leaders.len() == 1 && views.iter().all(|v| v.0 == Some(leaders[0])) {
            break leaders[0];
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let others: Vec<u64> = cluster.servers.keys().copied().filter(|id| *id != old_leader).collect();
    let failpoint = cluster.servers[&old_leader].data_dir.join(failpoint_file);
    std::fs::write(&failpoint, b"stall").unwrap();

    // Clients keep writing, to any node, moving on when one refuses.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writer = {
        let (http, urls) =
            (cluster.http.clone(), cluster.servers.keys().map(|id| cluster.url(*id, "/v1/tasks")).collect::<Vec<_>>());
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let answer = http
                    .post(&urls[i % urls.len()])
                    .json(&json!({"queue": "q", "payload": i}))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if answer.is_ok_and(|r| r.status().as_u16() == 201) {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let start = Instant::now();
    let new_leader = loop {
        let mut found = None;
        for id in &others {
            if let Ok((200, info)) = cluster.get(*id, "/v1/cluster").await {
                if let Some(leader) = info["leader_id"].as_u64().filter(|l| *l != old_leader) {
                    found = Some(leader);
                }
            }
        }
        if let Some(leader) = found {
            break leader;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "leadership never moved off the stalled node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(others.contains(&new_leader));
    // The stall shows in readiness, with its reason, once it has lasted 2 s.
    let start = Instant::now();
    loop {
        let (status, body) = cluster.get(old_leader, "/health/ready").await.unwrap();
        if status == 503 && body["error"]["message"].as_str().unwrap_or("").contains(reason) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the stalled node still says ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Writes are acknowledged after the hand-over.
    let before = acknowledged.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(20), "writes acknowledged by the healthy majority", async || {
        acknowledged.load(Ordering::Relaxed) > before + 10
    })
    .await;

    // The fault clears: the old leader becomes ready again and catches up.
    std::fs::remove_file(&failpoint).unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    cluster.wait_ready(old_leader, Duration::from_secs(20)).await;
}
