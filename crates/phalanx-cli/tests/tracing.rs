//! OpenTelemetry traces against real `phalanx server` processes (issue 17):
//! a node started with `--otlp-endpoint` exports the spans of a task tree,
//! submitted under a caller's `traceparent`, leased and delegated by the
//! Rust agent and completed with usage, to a collector this test runs (a
//! real HTTP server on loopback that parses the OTLP/HTTP JSON it gets):
//! one trace, parent links as the task's stored `traceparent` says, GenAI
//! usage attributes; refused reports, fail and extend have spans too, and a
//! submit through a follower is one span, on the leader. Without the flag,
//! the task still carries its context and nothing is sent anywhere; with a
//! collector that never answers, requests stay prompt and the lost spans are
//! counted; a malformed `traceparent` is refused and creates nothing.

mod common;

use common::{assert_error, decode, wait_for, wait_until, Cluster};
use phalanx_agent::{handler, Agent, AgentConfig, HandlerError, TaskContext};
use phalanx_api::Usage;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The caller's span: its trace id and span id.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn caller_traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

/// (trace id, span id) of a `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    (fields[1].to_string(), fields[2].to_string())
}

/// (task id, `traceparent`) as each handler saw them.
type Seen = Vec<(u64, Option<String>)>;

/// How the collector answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    /// Reads the request and never answers (a collector that hangs).
    Never,
}

/// An OTLP/HTTP receiver on loopback: keeps the JSON body of every
/// `POST /v1/traces` it is sent.
struct Collector {
    addr: String,
    requests: Arc<Mutex<Vec<Value>>>,
    connections: Arc<AtomicU64>,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(answer: Answer) -> Collector {
        Collector::on(TcpListener::bind("127.0.0.1:0").await.unwrap(), answer)
    }

    fn on(listener: TcpListener, answer: Answer) -> Collector {
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (kept, counted) = (requests.clone(), connections.clone());
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(stream, kept.clone(), answer));
            }
        });
        Collector { addr, requests, connections, server }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, each with its resource's attributes.
    fn spans(&self) -> Vec<(Value, Value)> {
        let mut spans = Vec::new();
        for request in self.requests.lock().unwrap().iter() {
            for resource in request["resourceSpans"].as_array().expect("resourceSpans") {
                for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
                    for span in scope["spans"].as_array().expect("spans") {
                        spans.push((resource["resource"].clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One HTTP/1.1 connection: requests with a `content-length` body, answered
/// `200 {}` (or never), kept alive.
async fn serve(mut stream: TcpStream, requests: Arc<Mutex<Vec<Value>>>, answer: Answer) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or("").to_string();
        let length: usize = lines
            .filter_map(|line| line.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer[head_end..head_end + length].to_vec();
        buffer.drain(..head_end + length);
        assert!(request_line.starts_with("POST /v1/traces "), "the exporter asked for {request_line:?}");
        assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
        let parsed: Value = serde_json::from_slice(&body).expect("the export is JSON");
        requests.lock().unwrap().push(parsed);
        if answer == Answer::Never {
            // Holds the connection open without a word until the exporter gives up.
            let _ = stream.read(&mut [0u8; 1]).await;
            return;
        }
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// An attribute's value as the OTLP JSON encodes it (`intValue` is a string).
fn attribute(span: &Value, key: &str) -> Value {
    let found = span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == key);
    match found {
        Some(attribute) => {
            let value = &attribute["value"];
            ["stringValue", "intValue", "boolValue"]
                .iter()
                .find_map(|kind| value.get(*kind).cloned())
                .unwrap_or_else(|| panic!("{key}: unknown value {value}"))
        }
        None => Value::Null,
    }
}

async fn submit_with_header(cluster: &Cluster, traceparent: &str, body: &Value) -> (u16, Value) {
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks"))
        .header("traceparent", traceparent)
        .json(body)
        .send()
        .await
        .unwrap();
    decode(response).await.unwrap()
}

async fn metrics_text(cluster: &Cluster) -> String {
    cluster.http.get(cluster.url(1, "/metrics")).send().await.unwrap().text().await.unwrap()
}

/// A sample's value, the line found by its full name and labels.
fn sample(text: &str, name: &str) -> u64 {
    let line =
        text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} in /metrics"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

#[tokio::test]
async fn sdk_12_a_task_tree_is_one_trace_under_the_callers_span() {
    let collector = Collector::start(Answer::Ok).await;
    let cluster = Cluster::start(1, &["--otlp-endpoint", &collector.url()]).await;
    let (status, submitted) = submit_with_header(&cluster, &caller_traceparent(), &json!({"queue": "plan"})).await;
    assert_eq!(status, 201, "{submitted}");
    let root_id = submitted["task_id"].as_u64().unwrap();
    let stored = submitted["traceparent"].as_str().expect("the submit answers the stored traceparent").to_string();
    let (trace, submit_span_id) = ids(&stored);
    assert_eq!(trace, CALLER_TRACE, "the task stays in the caller's trace");
    assert_ne!(submit_span_id, CALLER_SPAN, "the task names the node's submit span, not the caller's");
    let (_, task) = cluster.get(1, &format!("/v1/tasks/{root_id}")).await.unwrap();
    assert_eq!(task["traceparent"], json!(stored));

    // The agent plans (delegates a child), then works the child; each
    // attempt reports usage. What the handlers saw is kept.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let kept = seen.clone();
    let mut config = AgentConfig::new(vec![cluster.addr(1).to_string()], "tracer", vec!["plan".into(), "work".into()]);
    config.poll_wait_ms = 200;
    let agent = Agent::new(
        config,
        handler(move |context: TaskContext| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push((context.task.id, context.traceparent().map(str::to_string)));
                if context.task.queue == "plan" {
                    context
                        .delegate("work", json!({"step": 1}))
                        .await
                        .map_err(|e| HandlerError::fatal(e.to_string()))?;
                    context.report_usage(Usage { tokens_in: 120, tokens_out: 45, cost: 7 });
                } else {
                    context.report_usage(Usage { tokens_in: 3, tokens_out: 4, cost: 5 });
                }
                Ok::<Value, HandlerError>(json!({"done": context.task.id}))
            }
        }),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.clone().run_until(async move {
        let _ = stopped.await;
    }));
    wait_until(Duration::from_secs(20), "both tasks succeeded", async || {
        agent.stats.completed.load(Ordering::Relaxed) == 2
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();

    let child_id = root_id + 1;
    let (_, child) = cluster.get(1, &format!("/v1/tasks/{child_id}")).await.unwrap();
    assert_eq!(child["parent_id"], json!(root_id), "{child}");
    let child_stored = child["traceparent"].as_str().expect("the child carries a traceparent").to_string();
    let (child_trace, delegation_span_id) = ids(&child_stored);
    assert_eq!(child_trace, CALLER_TRACE, "a child without a context of its own joins its parent's trace");
    // Each handler saw its own task's stored context.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&(root_id, Some(stored.clone()))), "{seen:?}");
    assert!(seen.contains(&(child_id, Some(child_stored.clone()))), "{seen:?}");

    // Submit, delegation, two leases, two completes: exported within a few seconds.
    let names = [
        "phalanx.submit",
        "phalanx.delegation",
        "phalanx.lease",
        "phalanx.lease",
        "phalanx.complete",
        "phalanx.complete",
    ];
    let spans = wait_for(Duration::from_secs(10), "the six spans at the collector", async || {
        let spans = collector.spans();
        let mut got: Vec<String> = spans.iter().map(|(_, s)| s["name"].as_str().unwrap().to_string()).collect();
        got.sort();
        let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        want.sort();
        (got == want).then_some(spans)
    })
    .await;
    let find = |name: &str, task_id: u64| {
        spans
            .iter()
            .map(|(_, span)| span)
            .find(|span| span["name"] == name && attribute(span, "phalanx.task.id") == json!(task_id.to_string()))
            .unwrap_or_else(|| panic!("no {name} span of task {task_id} in {spans:?}"))
            .clone()
    };
    for (resource, span) in &spans {
        assert_eq!(span["traceId"], CALLER_TRACE, "one trace for all: {span}");
        assert_eq!(span["kind"], 2, "{span}");
        assert_eq!(attribute(span, "phalanx.node.id"), json!("1"), "{span}");
        assert_eq!(attribute(span, "phalanx.outcome"), json!("ok"), "{span}");
        let start: u64 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && start <= end, "{span}");
        assert_eq!(attribute(resource, "service.name"), json!("phalanx"));
        assert_eq!(attribute(resource, "service.instance.id"), json!("1"));
    }
    let submit = find("phalanx.submit", root_id);
    assert_eq!(submit["parentSpanId"], CALLER_SPAN, "the submit span is a child of the caller's");
    assert_eq!(submit["spanId"], json!(submit_span_id), "the stored traceparent names the submit span");
    assert_eq!(attribute(&submit, "phalanx.queue"), json!("plan"));
    let delegation = find("phalanx.delegation", child_id);
    assert_eq!(
        delegation["parentSpanId"],
        json!(submit_span_id),
        "a delegation is a child of its parent's submit span"
    );
    assert_eq!(
        delegation["spanId"],
        json!(delegation_span_id),
        "the child's stored traceparent names its delegation span"
    );
    assert_eq!(attribute(&delegation, "phalanx.parent.id"), json!(root_id.to_string()));
    for (task_id, parent_span, queue, usage) in
        [(root_id, &submit_span_id, "plan", (120, 45, 7)), (child_id, &delegation_span_id, "work", (3, 4, 5))]
    {
        let lease = find("phalanx.lease", task_id);
        assert_eq!(lease["parentSpanId"], json!(parent_span), "{lease}");
        assert_eq!(attribute(&lease, "phalanx.queue"), json!(queue));
        assert_eq!(attribute(&lease, "phalanx.agent.id"), json!("tracer"));
        assert_eq!(attribute(&lease, "phalanx.attempt"), json!("1"));
        let fence = attribute(&lease, "phalanx.fence");
        assert!(fence.as_str().is_some_and(|f| f.parse::<u64>().unwrap() > 0), "{lease}");
        let complete = find("phalanx.complete", task_id);
        assert_eq!(complete["parentSpanId"], json!(parent_span), "{complete}");
        assert_eq!(attribute(&complete, "phalanx.fence"), fence, "the complete names the lease's fence");
        assert_eq!(attribute(&complete, "gen_ai.usage.input_tokens"), json!(usage.0.to_string()));
        assert_eq!(attribute(&complete, "gen_ai.usage.output_tokens"), json!(usage.1.to_string()));
        assert_eq!(attribute(&complete, "phalanx.usage.cost"), json!(usage.2.to_string()));
    }
    // A refused report has its span too, with the refusal's code as its
    // outcome: one alone, one in a batch of results.
    let stale = json!({"fence": 1, "result": "late"});
    let (status, single) = cluster.post(1, &format!("/v1/tasks/{root_id}/complete"), &stale).await.unwrap();
    assert_eq!(status, 409, "{single}");
    let batch = json!({"results": [{"task_id": child_id, "fence": 1, "result": "late"}]});
    let (status, many) = cluster.post(1, "/v1/tasks/complete", &batch).await.unwrap();
    assert_eq!(status, 200, "{many}");
    for (task_id, code) in [(root_id, &single["error"]["code"]), (child_id, &many["results"][0]["error"]["code"])] {
        assert!(code.is_string(), "{single} {many}");
        let refused = wait_for(Duration::from_secs(10), "the refused report's span", async || {
            collector.spans().into_iter().map(|(_, span)| span).find(|span| {
                span["name"] == "phalanx.complete"
                    && attribute(span, "phalanx.task.id") == json!(task_id.to_string())
                    && attribute(span, "phalanx.outcome") != json!("ok")
            })
        })
        .await;
        assert_eq!(&attribute(&refused, "phalanx.outcome"), code, "{refused}");
        assert_eq!(refused["status"]["code"], 2, "{refused}");
        assert_eq!(refused["traceId"], CALLER_TRACE, "{refused}");
    }
    let text = metrics_text(&cluster).await;
    assert!(sample(&text, "phalanx_spans_exported_total") >= 6);
    assert_eq!(sample(&text, "phalanx_spans_dropped_total{reason=\"queue_full\"}"), 0);
}

#[tokio::test]
async fn without_an_endpoint_the_task_carries_its_context_and_nothing_is_sent() {
    // A collector on the OTLP/HTTP default port: a node without
    // --otlp-endpoint must not fall back to it (or to anything else).
    let Ok(listener) = TcpListener::bind("127.0.0.1:4318").await else {
        eprintln!("port 4318 is taken here: the default-endpoint check is skipped");
        return;
    };
    let collector = Collector::on(listener, Answer::Ok);
    let cluster = Cluster::start(1, &[]).await;
    let (status, submitted) = submit_with_header(&cluster, &caller_traceparent(), &json!({"queue": "q"})).await;
    assert_eq!(status, 201, "{submitted}");
    let stored = submitted["traceparent"].as_str().expect("stored without export").to_string();
    assert_eq!(ids(&stored).0, CALLER_TRACE);
    // Without a context, a task starts a trace of its own.
    let (status, alone) = cluster.post(1, "/v1/tasks", &json!({"queue": "q"})).await.unwrap();
    assert_eq!(status, 201, "{alone}");
    let (own_trace, _) = ids(alone["traceparent"].as_str().expect("a new trace"));
    assert_ne!(own_trace, CALLER_TRACE);
    // A lease grant shows it to the agent.
    let register = json!({"agent_id": "a", "capabilities": ["q"], "capacity": 1});
    let (_, session) = cluster.post(1, "/v1/agents/register", &register).await.unwrap();
    let poll = json!({"epoch": session["epoch"], "session": session["session"], "wait_ms": 1000});
    let (status, polled) = cluster.post(1, "/v1/agents/a/poll", &poll).await.unwrap();
    assert_eq!(status, 200, "{polled}");
    assert_eq!(polled["leases"][0]["task"]["traceparent"], json!(stored), "{polled}");
    // Longer than two export intervals: time must pass to show that nothing is sent.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(collector.connections.load(Ordering::Relaxed), 0, "a node without --otlp-endpoint connected");
    let text = metrics_text(&cluster).await;
    assert_eq!(sample(&text, "phalanx_spans_exported_total"), 0);
    assert_eq!(sample(&text, "phalanx_span_exports_failed_total"), 0);
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    let collector = Collector::start(Answer::Never).await;
    let cluster = Cluster::start(1, &["--otlp-endpoint", &collector.url(), "--spans-queued-max", "8"]).await;
    // Many more spans than the queue holds, while the exporter waits on a
    // collector that read its request and says nothing.
    let mut slowest = Duration::ZERO;
    for i in 0..40 {
        let started = Instant::now();
        let (status, body) =
            submit_with_header(&cluster, &caller_traceparent(), &json!({"queue": "q", "payload": i})).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 201, "{body}");
        // The first export is under way: the rest are queued behind it.
        if i == 0 {
            wait_until(Duration::from_secs(5), "the first export reached the collector", async || {
                !collector.requests.lock().unwrap().is_empty()
            })
            .await;
        }
    }
    assert!(slowest < Duration::from_secs(1), "a submit took {slowest:?} while the collector hung");
    let text = metrics_text(&cluster).await;
    assert!(sample(&text, "phalanx_spans_dropped_total{reason=\"queue_full\"}") >= 25, "{text}");
    // The hung export times out (5 s) and is counted, its spans with it.
    wait_until(Duration::from_secs(15), "the hung export counted as failed", async || {
        let text = metrics_text(&cluster).await;
        sample(&text, "phalanx_span_exports_failed_total") >= 1
            && sample(&text, "phalanx_spans_dropped_total{reason=\"export_failed\"}") >= 1
    })
    .await;
}

#[tokio::test]
async fn a_collector_that_refuses_connections_is_counted_and_requests_go_on() {
    // A port nothing listens on.
    let closed = common::free_port();
    let cluster = Cluster::start(1, &["--otlp-endpoint", &format!("http://127.0.0.1:{closed}")]).await;
    for i in 0..10 {
        let started = Instant::now();
        let (status, body) = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "payload": i})).await.unwrap();
        assert_eq!(status, 201, "{body}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    wait_until(Duration::from_secs(10), "failed exports counted", async || {
        let text = metrics_text(&cluster).await;
        sample(&text, "phalanx_span_exports_failed_total") >= 1
            && sample(&text, "phalanx_spans_dropped_total{reason=\"export_failed\"}") >= 1
    })
    .await;
}

#[tokio::test]
async fn a_malformed_traceparent_is_refused_and_creates_nothing() {
    let cluster = Cluster::start(1, &[]).await;
    let long = format!("cc-{CALLER_TRACE}-{CALLER_SPAN}-01-{}", "a".repeat(600));
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        long.as_str(),
    ] {
        let answer = submit_with_header(&cluster, bad, &json!({"queue": "q"})).await;
        assert_error(&answer, 400, "invalid");
        let answer = cluster.post(1, "/v1/tasks", &json!({"queue": "q", "traceparent": bad})).await.unwrap();
        assert_error(&answer, 400, "invalid");
        assert!(answer.1["error"]["message"].as_str().unwrap().contains("traceparent"), "{answer:?}");
    }
    let (_, page) = cluster.get(1, "/v1/tasks").await.unwrap();
    assert_eq!(page["tasks"], json!([]), "a refused submit created a task");
    // The body's context wins over the header's.
    let body_traceparent = format!("00-{}-{CALLER_SPAN}-01", "1".repeat(32));
    let (status, submitted) =
        submit_with_header(&cluster, &caller_traceparent(), &json!({"queue": "q", "traceparent": body_traceparent}))
            .await;
    assert_eq!(status, 201, "{submitted}");
    assert_eq!(ids(submitted["traceparent"].as_str().unwrap()).0, "1".repeat(32));
    // A batch takes each task's own; a malformed one is refused in its slot alone.
    let batch = json!({"tasks": [
        {"queue": "q", "traceparent": "nope"},
        {"queue": "q", "traceparent": body_traceparent},
        {"queue": "q"},
    ]});
    let response = cluster
        .http
        .post(cluster.url(1, "/v1/tasks/batch"))
        .header("traceparent", caller_traceparent())
        .json(&batch)
        .send()
        .await
        .unwrap();
    let (status, answer) = decode(response).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["error"]["code"], "invalid", "{answer}");
    assert_eq!(ids(answer["results"][1]["traceparent"].as_str().unwrap()).0, "1".repeat(32), "{answer}");
    assert_eq!(ids(answer["results"][2]["traceparent"].as_str().unwrap()).0, CALLER_TRACE, "{answer}");
    let (_, page) = cluster.get(1, "/v1/tasks").await.unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 3, "{page}");
}

#[tokio::test]
async fn sdk_12_the_rust_client_submits_with_a_traceparent_and_reads_it_back() {
    let cluster = Cluster::start(1, &[]).await;
    let client = phalanx_agent::Client::new(vec![cluster.addr(1).to_string()], None).unwrap();
    let request = phalanx_api::SubmitRequest::new("q", json!({"n": 1})).with_traceparent(caller_traceparent());
    let submitted = client.submit(&request).await.unwrap();
    let stored = submitted.traceparent.clone().expect("the answer says what the task keeps");
    assert_eq!(ids(&stored).0, CALLER_TRACE);
    let task = client.get_task(submitted.task_id, false).await.unwrap();
    assert_eq!(task.traceparent.as_deref(), Some(stored.as_str()));
    // Sent again (same generated key on a retry, or the same key on purpose):
    // the first submit's context is answered.
    let keyed = request.with_idempotency_key("k-1");
    let first = client.submit(&keyed).await.unwrap();
    let again =
        client.submit(&keyed.with_traceparent(format!("00-{}-{CALLER_SPAN}-01", "2".repeat(32)))).await.unwrap();
    assert!(again.deduplicated);
    assert_eq!(again.traceparent, first.traceparent, "a deduplicated submit answers the stored context");
}

#[tokio::test]
async fn a_submit_through_a_follower_is_one_span_on_the_leader_in_the_callers_trace() {
    let collector = Collector::start(Answer::Ok).await;
    let cluster = Cluster::start(3, &["--otlp-endpoint", &collector.url()]).await;
    let leader = wait_for(Duration::from_secs(10), "a leader", async || cluster.leader().await).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let response = cluster
        .http
        .post(cluster.url(follower, "/v1/tasks"))
        .header("traceparent", caller_traceparent())
        .json(&json!({"queue": "q"}))
        .send()
        .await
        .unwrap();
    let (status, submitted) = decode(response).await.unwrap();
    assert_eq!(status, 201, "{submitted}");
    let (trace, span_id) = ids(submitted["traceparent"].as_str().unwrap());
    assert_eq!(trace, CALLER_TRACE, "the follower forwards the caller's traceparent");
    let spans = wait_for(Duration::from_secs(10), "the submit span", async || {
        let spans = collector.spans();
        (!spans.is_empty()).then_some(spans)
    })
    .await;
    // Two more export intervals: time must pass to show no second span comes.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(collector.spans().len(), spans.len(), "one request, one span: {:?}", collector.spans());
    assert_eq!(spans.len(), 1, "one request, one span: {spans:?}");
    let (resource, span) = &spans[0];
    assert_eq!(span["spanId"], json!(span_id));
    assert_eq!(span["parentSpanId"], CALLER_SPAN);
    assert_eq!(attribute(span, "phalanx.node.id"), json!(leader.to_string()), "the leader records it");
    assert_eq!(attribute(resource, "service.instance.id"), json!(leader.to_string()));
}

#[tokio::test]
async fn fail_and_extend_have_spans_in_the_tasks_trace() {
    let collector = Collector::start(Answer::Ok).await;
    let cluster = Cluster::start(1, &["--otlp-endpoint", &collector.url()]).await;
    let (status, submitted) = submit_with_header(&cluster, &caller_traceparent(), &json!({"queue": "q"})).await;
    assert_eq!(status, 201, "{submitted}");
    let task_id = submitted["task_id"].as_u64().unwrap();
    let (_, submit_span_id) = ids(submitted["traceparent"].as_str().unwrap());
    let register = json!({"agent_id": "a", "capabilities": ["q"], "capacity": 1});
    let (_, session) = cluster.post(1, "/v1/agents/register", &register).await.unwrap();
    let poll = json!({"epoch": session["epoch"], "session": session["session"], "wait_ms": 1000});
    let (_, polled) = cluster.post(1, "/v1/agents/a/poll", &poll).await.unwrap();
    let fence = polled["leases"][0]["fence"].as_u64().expect("a lease");
    let (status, body) =
        cluster.post(1, &format!("/v1/tasks/{task_id}/extend"), &json!({"fence": fence})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let fail = json!({"fence": fence, "error": "no", "retryable": false, "usage": {"tokens_in": 11, "tokens_out": 22, "cost": 33}});
    let (status, body) = cluster.post(1, &format!("/v1/tasks/{task_id}/fail"), &fail).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let spans = wait_for(Duration::from_secs(10), "the extend and fail spans", async || {
        let spans: Vec<Value> = collector.spans().into_iter().map(|(_, span)| span).collect();
        let named = |name: &str| spans.iter().find(|span| span["name"] == name).cloned();
        Some((named("phalanx.extend")?, named("phalanx.fail")?))
    })
    .await;
    for span in [&spans.0, &spans.1] {
        assert_eq!(span["traceId"], CALLER_TRACE, "{span}");
        assert_eq!(span["parentSpanId"], json!(submit_span_id), "{span}");
        assert_eq!(attribute(span, "phalanx.task.id"), json!(task_id.to_string()));
        assert_eq!(attribute(span, "phalanx.fence"), json!(fence.to_string()));
        assert_eq!(attribute(span, "phalanx.outcome"), json!("ok"));
    }
    let failed = &spans.1;
    assert_eq!(attribute(failed, "phalanx.retryable"), json!(false));
    assert_eq!(attribute(failed, "gen_ai.usage.input_tokens"), json!("11"));
    assert_eq!(attribute(failed, "gen_ai.usage.output_tokens"), json!("22"));
    assert_eq!(attribute(failed, "phalanx.usage.cost"), json!("33"));
}
