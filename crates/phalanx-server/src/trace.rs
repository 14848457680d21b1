//! OpenTelemetry traces: W3C Trace Context (`traceparent`) parsed at the
//! edge, the spans a node records for the requests it serves (submit,
//! delegation, lease, complete, fail, extend), and their export over
//! OTLP/HTTP in its JSON encoding.
//!
//! The exporter is written here rather than taken from the `opentelemetry`
//! crates: what a node needs is a bounded queue and one `POST /v1/traces` a
//! second, which `reqwest` (already a dependency, for forwarding) does, and
//! the SDK with its OTLP exporter would add a protobuf and gRPC stack to
//! every build for it.
//!
//! With export off (the default) the `Tracer` holds no queue: a handler asks
//! `Tracer::start` for a start time and gets `None`, so it builds no span and
//! allocates nothing for one. Only the ids a submit stores on its task are
//! drawn either way, because the task carries its `traceparent` whether or
//! not anything is exported. Ids are drawn here, at the edge: the state
//! machine draws no random numbers.
//!
//! What this module leaves to others: which request makes which span, and
//! with what attributes, is the handlers' (`api.rs`); the counters are
//! rendered by `metrics.rs`.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Longest `traceparent` accepted (header or body field). A version-00
/// value is 55 bytes; later versions may append fields, within this bound.
pub const TRACEPARENT_BYTES_MAX: usize = 512;
/// Longest `--otlp-endpoint` accepted.
pub const OTLP_ENDPOINT_BYTES_MAX: usize = 2048;
/// Spans sent in one export request, at most.
pub const SPANS_PER_EXPORT_MAX: usize = 512;
/// How often the exporter sends what was queued.
pub const EXPORT_INTERVAL_MS: u64 = 1_000;
/// How long one export may take, connection included, before it counts as failed.
pub const EXPORT_TIMEOUT_MS: u64 = 5_000;
/// How long the exporter waits to connect to the collector.
const EXPORT_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// The W3C Trace Context of one span: which trace, which span, and the
/// trace flags (bit 0: sampled) as the caller sent them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` strictly (W3C Trace Context §3.2): two hex
    /// digits of version (not `ff`), 32 of trace id, 16 of parent id and 2
    /// of flags, lowercase, separated by `-`, neither id all zeros. Version
    /// 00 is exactly 55 bytes; a later version may append `-`-separated
    /// fields, which are ignored (§4.3), within `TRACEPARENT_BYTES_MAX`.
    pub fn parse(text: &str) -> Result<TraceContext, String> {
        let bytes = text.as_bytes();
        let shape = "must be <2 hex version>-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lowercase";
        if bytes.len() > TRACEPARENT_BYTES_MAX {
            return Err(format!("is {} bytes, more than {TRACEPARENT_BYTES_MAX}", bytes.len()));
        }
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(shape.into());
        }
        let hex = |range: std::ops::Range<usize>| {
            let field = &bytes[range];
            field.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)).then_some(field)
        };
        let (Some(version), Some(trace), Some(parent), Some(flags)) = (hex(0..2), hex(3..35), hex(36..52), hex(53..55))
        else {
            return Err(shape.into());
        };
        if version == b"ff" {
            return Err("version ff is invalid".into());
        }
        if version == b"00" && bytes.len() != 55 {
            return Err("a version 00 traceparent is exactly 55 bytes".into());
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return Err(shape.into());
        }
        // Every byte is a hex digit here: the conversions cannot fail.
        let number = |field: &[u8]| u128::from_str_radix(std::str::from_utf8(field).unwrap_or("0"), 16).unwrap_or(0);
        let context =
            TraceContext { trace_id: number(trace), span_id: number(parent) as u64, flags: number(flags) as u8 };
        if context.trace_id == 0 {
            return Err("the trace id is all zeros".into());
        }
        if context.span_id == 0 {
            return Err("the parent id is all zeros".into());
        }
        Ok(context)
    }

    /// The context as a version-00 `traceparent`.
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    /// A new span in this trace: same trace id and flags, a fresh span id.
    pub fn child(&self) -> TraceContext {
        TraceContext { span_id: span_id(), ..*self }
    }

    /// The first span of a new trace (sampled).
    pub fn root() -> TraceContext {
        let trace_id = loop {
            let id = rand::random::<u128>();
            if id != 0 {
                break id;
            }
        };
        TraceContext { trace_id, span_id: span_id(), flags: 1 }
    }
}

/// A random, non-zero span id.
fn span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// Wall-clock time in nanoseconds since the Unix epoch, as OTLP wants it.
/// Span times are for people reading traces; nothing is decided by them.
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// An attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue {
    Text(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for AttributeValue {
    fn from(text: &str) -> AttributeValue {
        AttributeValue::Text(text.to_string())
    }
}
impl From<String> for AttributeValue {
    fn from(text: String) -> AttributeValue {
        AttributeValue::Text(text)
    }
}
impl From<u64> for AttributeValue {
    fn from(value: u64) -> AttributeValue {
        AttributeValue::Int(value.min(i64::MAX as u64) as i64)
    }
}
impl From<u32> for AttributeValue {
    fn from(value: u32) -> AttributeValue {
        AttributeValue::Int(value as i64)
    }
}
impl From<bool> for AttributeValue {
    fn from(value: bool) -> AttributeValue {
        AttributeValue::Bool(value)
    }
}

/// One finished span, as recorded by the node that served the request.
#[derive(Clone, Debug)]
pub struct Span {
    pub name: &'static str,
    /// This span's trace and id.
    pub context: TraceContext,
    /// The span it is a child of, in the same trace (`None`: a root).
    pub parent_span_id: Option<u64>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    /// The error code of a refusal; `None` when the request was served.
    pub error: Option<String>,
}

/// What the exporter did, for `/metrics`.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans handed to a collector that answered 2xx.
    pub spans_exported: AtomicU64,
    /// Spans dropped because `spans_queued_max` were waiting already.
    pub spans_dropped_queue_full: AtomicU64,
    /// Spans dropped because their export failed (not retried: the
    /// collector is told the next second's spans instead).
    pub spans_dropped_export_failed: AtomicU64,
    /// Export requests that failed (no connection, timeout, non-2xx).
    pub exports_failed: AtomicU64,
}

struct Queue {
    spans: Mutex<VecDeque<Span>>,
    spans_queued_max: usize,
    /// Wakes the exporter early when a whole export's worth is waiting.
    full_batch: Notify,
}

/// Records spans into a bounded queue that the exporter drains, or, with
/// export off, records nothing.
pub struct Tracer {
    queue: Option<Arc<Queue>>,
    pub stats: Arc<TraceStats>,
}

impl Tracer {
    /// A tracer that records nothing (no `--otlp-endpoint`).
    pub fn off() -> Tracer {
        Tracer { queue: None, stats: Arc::default() }
    }

    /// A tracer exporting to `endpoint` (`http(s)://host:port[/path]`, to
    /// which `/v1/traces` is appended), as node `node_id`. Spawns the
    /// exporter on the current runtime; it stops when `shutdown` says so.
    pub fn exporting(
        endpoint: &str,
        node_id: u64,
        spans_queued_max: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Tracer> {
        let queue = Arc::new(Queue { spans: Mutex::new(VecDeque::new()), spans_queued_max, full_batch: Notify::new() });
        let stats = Arc::new(TraceStats::default());
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(EXPORT_CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(EXPORT_TIMEOUT_MS))
            .build()?;
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        tokio::spawn(export_loop(queue.clone(), stats.clone(), client, url, node_id, shutdown));
        Ok(Tracer { queue: Some(queue), stats })
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// The start time of a span about to be recorded, or `None` with export
    /// off: the handler then builds no span at all.
    pub fn start(&self) -> Option<u64> {
        self.queue.as_ref().map(|_| unix_nanos())
    }

    /// Queues a finished span for export, or drops it (counted) when
    /// `spans_queued_max` are waiting. Never waits: a slow or absent
    /// collector costs a request nothing.
    pub fn record(&self, span: Span) {
        let Some(queue) = &self.queue else { return };
        let Ok(mut spans) = queue.spans.lock() else { return };
        if spans.len() >= queue.spans_queued_max {
            self.stats.spans_dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        spans.push_back(span);
        if spans.len() == SPANS_PER_EXPORT_MAX {
            queue.full_batch.notify_one();
        }
    }
}

/// Sends the queued spans every `EXPORT_INTERVAL_MS` (sooner when a full
/// export's worth waits), one export at a time, each bounded by
/// `EXPORT_TIMEOUT_MS`. A failure is logged when the collector goes from
/// reachable (or unknown) to failing and when it comes back, not per export.
async fn export_loop(
    queue: Arc<Queue>,
    stats: Arc<TraceStats>,
    client: reqwest::Client,
    url: String,
    node_id: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut healthy: Option<bool> = None;
    let mut interval = tokio::time::interval(Duration::from_millis(EXPORT_INTERVAL_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = queue.full_batch.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        loop {
            let batch: Vec<Span> = match queue.spans.lock() {
                Ok(mut spans) => {
                    let count = spans.len().min(SPANS_PER_EXPORT_MAX);
                    spans.drain(..count).collect()
                }
                Err(_) => return,
            };
            if batch.is_empty() {
                break;
            }
            let count = batch.len() as u64;
            let body = encode(&batch, node_id);
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|error| error.to_string())
                .and_then(|response| {
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("the collector answered {}", response.status()))
                    }
                });
            match sent {
                Ok(()) => {
                    stats.spans_exported.fetch_add(count, Ordering::Relaxed);
                    if healthy != Some(true) {
                        tracing::info!(%url, "exporting spans");
                    }
                    healthy = Some(true);
                }
                Err(error) => {
                    stats.exports_failed.fetch_add(1, Ordering::Relaxed);
                    stats.spans_dropped_export_failed.fetch_add(count, Ordering::Relaxed);
                    if healthy != Some(false) {
                        tracing::warn!(%url, %error, "span export failed; spans are dropped (and counted) until it works");
                    }
                    healthy = Some(false);
                    // What is left waits for the next turn rather than
                    // failing again at once.
                    break;
                }
            }
            if count < SPANS_PER_EXPORT_MAX as u64 {
                break;
            }
        }
    }
}

/// OTLP/HTTP JSON of an `ExportTraceServiceRequest`
/// (opentelemetry-proto `trace/v1/trace.proto`, JSON mapping of the OTLP
/// spec): ids as hex, 64-bit integers as decimal strings, enums as numbers.
pub fn encode(spans: &[Span], node_id: u64) -> Vec<u8> {
    let attribute = |key: &str, value: &AttributeValue| {
        let value = match value {
            AttributeValue::Text(text) => json!({ "stringValue": text }),
            AttributeValue::Int(int) => json!({ "intValue": int.to_string() }),
            AttributeValue::Bool(flag) => json!({ "boolValue": flag }),
        };
        json!({ "key": key, "value": value })
    };
    let spans: Vec<Value> = spans
        .iter()
        .map(|span| {
            let mut encoded = json!({
                "traceId": format!("{:032x}", span.context.trace_id),
                "spanId": format!("{:016x}", span.context.span_id),
                "name": span.name,
                // SPAN_KIND_SERVER: the node serves a client's or an agent's request.
                "kind": 2,
                "startTimeUnixNano": span.start_unix_nanos.to_string(),
                "endTimeUnixNano": span.end_unix_nanos.to_string(),
                "attributes": span.attributes.iter().map(|(key, value)| attribute(key, value)).collect::<Vec<_>>(),
                // STATUS_CODE_ERROR (2) for a refusal, STATUS_CODE_UNSET (0) otherwise.
                "status": match &span.error {
                    Some(code) => json!({ "code": 2, "message": code }),
                    None => json!({ "code": 0 }),
                },
                "flags": 0x100 | u32::from(span.context.flags),
            });
            if let Some(parent) = span.parent_span_id {
                encoded["parentSpanId"] = json!(format!("{parent:016x}"));
            }
            encoded
        })
        .collect();
    let resource = [
        ("service.name", AttributeValue::from("phalanx")),
        ("service.instance.id", AttributeValue::from(node_id.to_string())),
        ("service.version", AttributeValue::from(env!("CARGO_PKG_VERSION"))),
    ];
    let request = json!({
        "resourceSpans": [{
            "resource": { "attributes": resource.iter().map(|(key, value)| attribute(key, value)).collect::<Vec<_>>() },
            "scopeSpans": [{
                "scope": { "name": "phalanx", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&request).unwrap_or_default()
}

/// Checks `--otlp-endpoint`: an `http://` or `https://` URL with a host,
/// within `OTLP_ENDPOINT_BYTES_MAX`.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.len() > OTLP_ENDPOINT_BYTES_MAX {
        return Err(format!("otlp_endpoint must be at most {OTLP_ENDPOINT_BYTES_MAX} bytes"));
    }
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("otlp_endpoint {endpoint:?} must start with http:// or https://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || endpoint.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("otlp_endpoint {endpoint:?} must name a host, without spaces"));
    }
    if endpoint.contains(['?', '#']) {
        return Err(format!("otlp_endpoint {endpoint:?} must have no query or fragment (/v1/traces is appended)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_strictly() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(good).unwrap();
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(context.span_id, 0x00f067aa0ba902b7);
        assert_eq!(context.flags, 1);
        assert_eq!(context.header(), good);
        // A later version may carry more fields; only the first four are read.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(TraceContext::parse(later).unwrap().span_id, 0x00f067aa0ba902b7);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é",
        ] {
            assert!(TraceContext::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}", "a".repeat(600));
        assert!(TraceContext::parse(&long).is_err());
    }

    #[test]
    fn a_child_keeps_the_trace_and_draws_a_new_span() {
        let root = TraceContext::root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert!(phalanx_core::state::valid_traceparent(&child.header()));
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(validate_endpoint("http://127.0.0.1:4318").is_ok());
        assert!(validate_endpoint("https://collector.example/otlp").is_ok());
        for bad in ["127.0.0.1:4318", "ftp://x", "http://", "http:///x", "http://a b", "http://x?y=1"] {
            assert!(validate_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
