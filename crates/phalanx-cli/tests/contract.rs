//! The contract (`phalanx-api`) as a real node keeps it: the OpenAPI
//! document it serves, answers that parse as the contract's types, and the
//! contract's fixes (a rollback safe to repeat, list queries percent-decoded).

mod common;

use common::{assert_error, Cluster};
use serde_json::{json, Value};

#[tokio::test]
async fn the_node_serves_the_committed_openapi_document_covering_every_route() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, served) = cluster.get(1, "/v1/openapi.json").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(served["openapi"], "3.1.0");
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed, "the node serves docs/openapi.json");
    // Every route the guide documents is in the document, with its method.
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let mut documented = 0;
    for method in ["GET", "POST", "PUT", "DELETE"] {
        for part in guide.split(&format!("`{method} /")).skip(1) {
            let path = format!("/{}", &part[..part.find(['`', ' ', '?', '[']).unwrap()]);
            let operation = &served["paths"][&path][method.to_lowercase()];
            assert!(operation.is_object(), "docs/api.md documents {method} {path}, the OpenAPI document does not");
            documented += 1;
        }
    }
    assert!(documented >= 25, "only {documented} routes found in docs/api.md");
    // And every route of the document answers something other than "no such route".
    for route in phalanx_api::openapi::ROUTES {
        let path = route.path.replace("{id}", "1").replace("{agent_id}", "a").replace("{key}", "k");
        let request = reqwest::Client::new().request(route.method.parse().unwrap(), cluster.url(1, &path));
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.unwrap_or(Value::Null);
        assert!(
            !(status == 404 && body["error"]["message"] == "no such route"),
            "{} {path}: the node has no such route",
            route.method
        );
    }
}

#[tokio::test]
async fn answers_parse_as_the_contract_types() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, body) = cluster
        .post(1, "/v1/tasks", &json!({"queue": "q", "payload": {"a": 1}, "concurrency_key": "tenant:a"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let submitted: phalanx_api::Submitted = serde_json::from_value(body).unwrap();
    let (_, task) = cluster.get(1, &format!("/v1/tasks/{}", submitted.task_id)).await.unwrap();
    let task: phalanx_api::Task = serde_json::from_value(task.clone()).unwrap_or_else(|e| panic!("{e}: {task}"));
    assert!(task.other.is_empty(), "fields the contract does not name: {:?}", task.other);
    assert_eq!(task.concurrency_key.as_deref(), Some("tenant:a"));
    let (_, page) = cluster.get(1, "/v1/tasks").await.unwrap();
    let _: phalanx_api::TaskPage = serde_json::from_value(page).unwrap();
    let (_, status_body) = cluster.get(1, "/v1/status").await.unwrap();
    let _: phalanx_api::Status = serde_json::from_value(status_body).unwrap();
    let (_, cluster_body) = cluster.get(1, "/v1/cluster").await.unwrap();
    let _: phalanx_api::ClusterInfo = serde_json::from_value(cluster_body).unwrap();
    let (_, config) = cluster.get(1, "/v1/config").await.unwrap();
    let _: phalanx_api::Config = serde_json::from_value(config).unwrap();
    let (_, history) = cluster.get(1, "/v1/config/history").await.unwrap();
    let _: phalanx_api::ConfigHistory = serde_json::from_value(history).unwrap();
    let (_, agents) = cluster.get(1, "/v1/agents").await.unwrap();
    let _: phalanx_api::Agents = serde_json::from_value(agents).unwrap();
    let (status, error) = cluster.get(1, "/v1/tasks/999").await.unwrap();
    assert_eq!(status, 404);
    let error: phalanx_api::ErrorEnvelope = serde_json::from_value(error).unwrap();
    assert_eq!(error.error.code, phalanx_api::ErrorCode::TaskNotFound);
}

/// A rollback names the version it replaces: sent again (as a client does
/// after an unknown outcome), it is refused instead of rolling back twice.
#[tokio::test]
async fn a_rollback_sent_twice_rolls_back_once() {
    let cluster = Cluster::start(1, &[]).await;
    for value in [7, 9] {
        let (status, body) = cluster.put(1, "/v1/config", &json!({"set": {"attempts_max": value}})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, config) = cluster.get(1, "/v1/config").await.unwrap();
    let current = config["version"].as_u64().unwrap();
    let rollback = json!({"expected_version": current});
    let (status, body) = cluster.post(1, "/v1/config/rollback", &rollback).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rolled_back_to"], current - 1);
    let (_, config) = cluster.get(1, "/v1/config").await.unwrap();
    assert_eq!(config["policy"]["attempts_max"], 7);
    let again = cluster.post(1, "/v1/config/rollback", &rollback).await.unwrap();
    assert_error(&again, 409, "version_conflict");
    let (_, config) = cluster.get(1, "/v1/config").await.unwrap();
    assert_eq!(config["policy"]["attempts_max"], 7, "the repeat changed nothing");
    assert_eq!(config["version"], current + 1);
}

#[tokio::test]
async fn a_listed_queue_name_is_percent_decoded() {
    let cluster = Cluster::start(1, &[]).await;
    let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "team:a", "payload": 1})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, page) = cluster.get(1, "/v1/tasks?queue=team%3Aa").await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
    let bad = cluster.get(1, "/v1/tasks?queue=team%3").await.unwrap();
    assert_error(&bad, 400, "invalid");
}

/// docs/api.md names every code a node answers with.
#[test]
fn every_error_code_is_documented() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let missing: Vec<&str> = phalanx_api::ErrorCode::ALL
        .iter()
        .map(|code| code.as_str())
        .filter(|code| !guide.contains(&format!("`{code}`")))
        .collect();
    assert!(missing.is_empty(), "docs/api.md does not name {missing:?}");
}

/// A request handler never aborts on an outcome it did not expect: the
/// server's request paths have no `unreachable!`, `todo!` or `unimplemented!`.
#[test]
fn request_paths_do_not_abort_on_a_mismatch() {
    let server = concat!(env!("CARGO_MANIFEST_DIR"), "/../phalanx-server/src/");
    for file in ["api.rs", "error.rs", "listener.rs", "admission.rs"] {
        let text = std::fs::read_to_string(format!("{server}{file}")).unwrap();
        let code: String =
            text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        for banned in ["unreachable!(", "todo!(", "unimplemented!("] {
            assert!(!code.contains(banned), "{file} uses {banned}");
        }
    }
}
