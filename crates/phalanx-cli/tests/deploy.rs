//! Lints the deployment recipes in `deploy/` offline: the Kubernetes
//! manifests parse and hold what a cluster needs (a headless Service, probes
//! on the health routes, a peer list built from the pods' stable names, a
//! disruption budget of one), the systemd unit passes `systemd-analyze
//! verify` (where it is installed) and keeps its sandbox, the container
//! recipe builds a static binary in one stage and ships it alone, and the
//! Grafana dashboard asks only for metrics a node exports.

mod common;

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Every document of every manifest, as JSON values.
fn manifests() -> Vec<Value> {
    let mut documents = Vec::new();
    for entry in std::fs::read_dir(deploy("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                for field in ["apiVersion", "kind"] {
                    assert!(value[field].is_string(), "{}: no {field}", path.display());
                }
                assert!(value["metadata"]["name"].is_string(), "{}: no metadata.name", path.display());
                documents.push(value);
            }
        }
    }
    documents
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn kubernetes_manifests_hold_a_cluster() {
    let documents = manifests();
    let sets = of_kind(&documents, "StatefulSet");
    assert_eq!(sets.len(), 1);
    let set = sets[0];
    let replicas = set["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 3 && replicas % 2 == 1, "an odd number of voters, at least 3");
    let labels = &set["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&set["spec"]["selector"]["matchLabels"], labels);

    // The headless Service the peer names go through.
    let service_name = set["spec"]["serviceName"].as_str().expect("serviceName");
    let services = of_kind(&documents, "Service");
    let headless = services.iter().find(|s| s["metadata"]["name"] == service_name).expect("the governing Service");
    assert_eq!(headless["spec"]["clusterIP"], "None", "the governing Service is headless");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true, "peers must find each other before ready");
    assert_eq!(&headless["spec"]["selector"], labels);

    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let probe = |kind: &str| container[kind]["httpGet"]["path"].as_str().map(String::from);
    assert_eq!(probe("readinessProbe").as_deref(), Some("/health/ready"));
    assert_eq!(probe("livenessProbe").as_deref(), Some("/health/live"));

    // The peer list: node i+1 is pod i, by its stable name, API and Raft ports.
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let peers = args.iter().find_map(|a| a.strip_prefix("--peers=")).expect("--peers");
    let members = phalanx_server::config::parse_peers(peers).expect("a peer list the server accepts");
    assert_eq!(members.keys().copied().collect::<Vec<_>>(), (1..=replicas).collect::<Vec<_>>());
    for (id, member) in &members {
        let host = format!("{}-{}.{service_name}.", set["metadata"]["name"].as_str().unwrap(), id - 1);
        assert!(member.api.starts_with(&host) && member.api.ends_with(":7070"), "{member:?}");
        assert!(member.raft.starts_with(&host) && member.raft.ends_with(":7071"), "{member:?}");
    }
    assert!(args.contains(&"--raft-listen=0.0.0.0:7071"));
    let secrets: BTreeSet<&str> =
        container["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(secrets.contains("PHALANX_CLIENT_TOKEN") && secrets.contains("PHALANX_PEER_TOKEN"));

    // The data directory is on the claimed volume.
    let data_dir = args.iter().find_map(|a| a.strip_prefix("--data-dir=")).expect("--data-dir");
    let claim = set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str().expect("a volume claim");
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == claim && m["mountPath"] == data_dir), "{data_dir} on {claim}");

    let budgets = of_kind(&documents, "PodDisruptionBudget");
    assert_eq!(budgets.len(), 1);
    assert_eq!(budgets[0]["spec"]["maxUnavailable"], 1);
    assert_eq!(&budgets[0]["spec"]["selector"]["matchLabels"], labels);
}

#[test]
fn systemd_unit_is_sandboxed_and_verifies() {
    let unit = read("systemd/phalanx.service");
    for directive in [
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/phalanx",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "LimitNOFILE=",
        "Restart=on-failure",
        "--data-dir /var/lib/phalanx",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive:?}");
    }
    let Ok(version) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped systemd-analyze verify: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(version.status.success());
    // verify checks that ExecStart's program exists: point it at the built one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phalanx.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/phalanx", env!("CARGO_BIN_EXE_phalanx"))).unwrap();
    let output =
        std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // verify exits 0 on unknown keys and bad values, and says so on stderr.
    assert!(output.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn container_recipe_ships_a_static_binary_alone() {
    let recipe = read("container/Containerfile");
    let stages: Vec<&str> = recipe.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert!(recipe.contains("x86_64-unknown-linux-musl"), "a static binary");
    assert!(stages[1].contains("distroless/static") || stages[1].contains("scratch"), "{}", stages[1]);
    assert!(recipe.contains("USER 65532"), "not root");
}

/// Every metric the dashboard asks for is one a node exports.
#[tokio::test]
async fn grafana_dashboard_uses_exported_metrics() {
    let dashboard: Value = serde_json::from_str(&read("grafana/phalanx.json")).expect("the dashboard is JSON");
    let cluster = common::Cluster::start(1, &[]).await;
    let text = cluster.http.get(cluster.url(1, "/metrics")).send().await.unwrap().text().await.unwrap();
    let families: BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(panel["title"].is_string());
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("phalanx_"))
            {
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                assert!(families.contains(family), "panel {:?} asks for {name}, which no node exports", panel["title"]);
                asked += 1;
            }
        }
    }
    assert!(asked > 10);
}
