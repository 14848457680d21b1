//! `/metrics` follows the Prometheus conventions, read from a real node after
//! some traffic: every sample belongs to a family declared once with
//! `# HELP` and `# TYPE`; counters end in `_total`; no name carries a unit
//! other than a base one; the two latency histograms are there, with
//! cumulative buckets ending in `+Inf` equal to `_count`.

mod common;

use common::Cluster;
use serde_json::json;
use std::collections::BTreeMap;

/// Checks the exposition text; answers the families and their types.
fn check(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    let mut samples: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "family {name} declared twice");
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("# HELP name text");
            assert!(!help.trim().is_empty(), "{line}");
            assert!(helps.insert(name.to_string(), ()).is_none(), "HELP of {name} twice");
        } else if !line.is_empty() {
            assert!(!line.starts_with('#'), "unknown comment {line}");
            let (series, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().unwrap_or_else(|_| panic!("value of {line}"));
            let name = series.split('{').next().unwrap().to_string();
            samples.push((name, line.to_string()));
        }
    }
    for (name, kind) in &types {
        assert!(helps.contains_key(name), "{name} has no HELP");
        assert!(name.starts_with("phalanx_"), "{name}: our namespace");
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} ({kind}): counters, and only counters, end in _total"
        );
        for unit in ["_ms", "_millis", "_milliseconds", "_us", "_kb", "_mb", "_mib"] {
            assert!(!name.contains(&format!("{unit}_")) && !name.ends_with(unit), "{name}: base units only");
        }
    }
    for (name, line) in &samples {
        let family = [name.as_str()]
            .into_iter()
            .chain(["_bucket", "_sum", "_count"].iter().filter_map(|suffix| name.strip_suffix(suffix)))
            .find(|family| types.contains_key(*family))
            .unwrap_or_else(|| panic!("sample without a # TYPE: {line}"));
        if family != name {
            assert_eq!(types[family], "histogram", "{line}");
        }
    }
    types
}

/// A histogram's buckets for one label set are cumulative and end at `_count`.
fn check_histogram(text: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}_bucket{{{labels}{}le=\"", if labels.is_empty() { "" } else { "," });
    let buckets: Vec<(String, u64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let (le, count) = rest.split_once("\"} ").unwrap();
            (le.to_string(), count.parse().unwrap())
        })
        .collect();
    assert!(buckets.len() > 5, "{name}{{{labels}}}: buckets in\n{text}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{name}: cumulative {buckets:?}");
    assert_eq!(buckets.last().unwrap().0, "+Inf");
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let count: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}_count{braces} ")))
        .unwrap_or_else(|| panic!("{name}_count"))
        .parse()
        .unwrap();
    assert_eq!(buckets.last().unwrap().1, count, "{name}: +Inf is the count");
    count
}

#[tokio::test]
async fn metrics_follow_the_prometheus_conventions() {
    let cluster = Cluster::start(1, &[]).await;
    for i in 0..5 {
        let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "metrics-q", "payload": i})).await.unwrap();
        assert_eq!(status, 201, "{body}");
    }
    let text = cluster.http.get(cluster.url(1, "/metrics")).send().await.unwrap().text().await.unwrap();
    let types = check(&text);
    for (name, kind) in [
        ("phalanx_http_requests_total", "counter"),
        ("phalanx_tasks_submitted_total", "counter"),
        ("phalanx_tasks", "gauge"),
        ("phalanx_oldest_pending_age_seconds", "gauge"),
        ("phalanx_http_request_duration_seconds", "histogram"),
        ("phalanx_commit_duration_seconds", "histogram"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    assert!(check_histogram(&text, "phalanx_http_request_duration_seconds", "long_poll=\"false\"") >= 5);
    check_histogram(&text, "phalanx_http_request_duration_seconds", "long_poll=\"true\"");
    assert!(check_histogram(&text, "phalanx_commit_duration_seconds", "") >= 1);
    assert!(text.contains(r#"phalanx_tasks{queue="metrics-q",state="pending"} 5"#), "{text}");
}

#[test]
fn the_checker_catches_what_it_should() {
    for bad in [
        "phalanx_x_total 1\n",                                                         // no TYPE
        "# HELP phalanx_x x\n# TYPE phalanx_x counter\nphalanx_x 1\n",                 // counter without _total
        "# HELP phalanx_x_total x\n# TYPE phalanx_x_total gauge\nphalanx_x_total 1\n", // _total gauge
        "# HELP phalanx_a_ms x\n# TYPE phalanx_a_ms gauge\nphalanx_a_ms 1\n",          // a unit not in base units
        "# HELP phalanx_a x\n# TYPE phalanx_a gauge\n# HELP phalanx_a x\n# TYPE phalanx_a gauge\nphalanx_a 1\n", // twice
    ] {
        assert!(std::panic::catch_unwind(|| check(bad)).is_err(), "not caught:\n{bad}");
    }
    check("# HELP phalanx_a_seconds x\n# TYPE phalanx_a_seconds histogram\nphalanx_a_seconds_bucket{le=\"+Inf\"} 0\nphalanx_a_seconds_sum 0\nphalanx_a_seconds_count 0\n");
}
