//! The web console (`/ui`) in a real browser against a real 3-node cluster:
//! headless Chromium driven over the DevTools protocol (a small client over
//! its websocket, below), checking what an operator sees.
//!
//! Needs the Debian package `chromium`; `scripts/test` installs it where it
//! can and sets `PHALANX_REQUIRE_BROWSER=1`, so that there a missing browser
//! fails the test; elsewhere it says it skipped. `PHALANX_CONSOLE_SCREENSHOTS=DIR`
//! keeps the screenshots of the main pages (how `docs/console/*.png` were made).

mod common;

use common::{wait_until, Cluster};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const CLIENT_TOKEN: &str = "console-test-token-0123456789";
/// The whole test, cluster start to last check.
const BUDGET: Duration = Duration::from_secs(150);
/// How long the console may take to show what the API already shows: it
/// refreshes every 1.5 s.
const SHOWN_WITHIN: Duration = Duration::from_secs(10);
/// How soon a killed node must show as down ("within a few seconds").
const DOWN_SHOWN_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_in_a_real_browser() {
    let Some(chromium) = find_chromium() else {
        assert!(
            std::env::var("PHALANX_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "PHALANX_REQUIRE_BROWSER=1 but no chromium on PATH"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let started = Instant::now();
    tokio::time::timeout(BUDGET, scenario(&chromium)).await.expect("the console test ran over its budget");
    eprintln!("console test took {:?}", started.elapsed());
}

/// `curl localhost:PORT/ui` answers the page, without a token; so do its
/// two assets, with a content security policy that allows only them.
#[tokio::test]
async fn ui_is_served_without_a_token() {
    let cluster = Cluster::start(1, &["--client-token", CLIENT_TOKEN]).await;
    let page = cluster.http.get(cluster.url(1, "/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    let text = page.text().await.unwrap();
    assert!(text.contains("<title>Phalanx console</title>"), "{text}");
    for (path, content_type) in [("/ui/console.js", "text/javascript"), ("/ui/console.css", "text/css")] {
        let asset = cluster.http.get(cluster.url(1, path)).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert!(asset.headers()["content-type"].to_str().unwrap().starts_with(content_type), "{path}");
    }
    // The API itself still needs the token.
    let (status, body) = cluster.get(1, "/v1/status").await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let curl = Command::new("curl").args(["-sf", &cluster.url(1, "/ui")]).output();
    if let Ok(curl) = curl {
        assert!(curl.status.success() && String::from_utf8_lossy(&curl.stdout).contains("Phalanx console"));
    }
}

async fn scenario(chromium: &Path) {
    let cluster = Cluster::start(3, &["--client-token", CLIENT_TOKEN]).await;
    let api = Api { cluster: &cluster };
    let leader = api.leader().await;
    // A dead letter: one attempt, failed.
    let dead_id = api.dead_letter("console-work").await;
    // Some pending work, so the queues page has something to show.
    for i in 0..3 {
        api.post(leader, "/v1/tasks", json!({"queue": "console-work", "payload": {"n": i}})).await;
    }
    // A policy change, so that there is a version to roll back.
    let (status, answer) = api.put(leader, "/v1/config", json!({"set": {"wait_tasks_max": 5000}})).await;
    assert_eq!(status, 200, "{answer}");

    let screenshots = std::env::var_os("PHALANX_CONSOLE_SCREENSHOTS").map(PathBuf::from);
    let browser = Browser::launch(chromium).await;
    let mut page = browser.page().await;

    // The console on the leader: only the leader knows up from down.
    let base = cluster.url(leader, "/ui");
    page.navigate(&base).await;
    // Without a token, the API's own refusal is what the page shows.
    page.wait_for(
        "#error",
        r#"document.getElementById("error").textContent.includes("missing or wrong bearer token")"#,
    )
    .await;
    page.eval(&format!(
        r#"document.getElementById("token").value = "{CLIENT_TOKEN}";
           document.getElementById("token-form").requestSubmit(); true"#
    ))
    .await;
    page.wait_for("three nodes up", r#"document.querySelectorAll(".node-up").length === 3"#).await;
    page.wait_for("readiness", r#"document.getElementById("readiness").textContent.includes("ready")"#).await;
    page.wait_for("no error", r#"document.getElementById("error").hidden"#).await;
    page.screenshot(&screenshots, "cluster").await;

    page.goto_hash("#/queues").await;
    page.wait_for("the queue", r#"document.getElementById("page").textContent.includes("console-work")"#).await;
    // Throughput needs two refreshes.
    page.wait_for("a rate", r#"/\d+\.\d/.test(document.getElementById("page").textContent)"#).await;
    page.screenshot(&screenshots, "queues").await;

    page.goto_hash("#/agents").await;
    page.wait_for("the agent", r#"document.getElementById("page").textContent.includes("console-agent")"#).await;

    page.goto_hash(&format!("#/tasks/{dead_id}")).await;
    page.wait_for("the dead task", r#"document.getElementById("task-state")?.textContent === "dead""#).await;
    page.wait_for("its reason", r#"document.getElementById("page").textContent.includes("the console test fails it")"#)
        .await;
    page.screenshot(&screenshots, "task").await;

    page.goto_hash("#/dead").await;
    page.wait_for("the dead letter", &format!(r##"!!document.querySelector('a[href="#/tasks/{dead_id}"]')"##)).await;
    page.screenshot(&screenshots, "dead").await;
    if api.has_route(leader, "/v1/tasks/replay").await {
        page.wait_for("the replay button", r#"!!document.getElementById("replay")"#).await;
        page.eval(r#"document.getElementById("replay").click(); true"#).await;
        page.wait_for("the replay notice", r#"document.getElementById("notice")?.textContent.includes("Replayed 1")"#)
            .await;
        eprintln!("replayed the dead letter from the console");
    } else {
        // Give the console time to probe the route, then check it hid the button.
        page.wait_for("the probe", r#"document.getElementById("refreshed").textContent !== """#).await;
        assert_eq!(page.eval(r#"!!document.getElementById("replay")"#).await, json!(false));
        eprintln!("no POST /v1/tasks/replay on this build: the console hides the button (checked)");
    }

    page.goto_hash("#/policy").await;
    page.wait_for("the policy", r#"document.getElementById("page").textContent.includes("wait_tasks_max")"#).await;
    page.screenshot(&screenshots, "policy").await;
    let version = api.get(leader, "/v1/config").await["version"].as_u64().unwrap();
    page.eval(r#"document.getElementById("rollback").click(); true"#).await;
    page.wait_for("the armed button", r#"document.getElementById("rollback").textContent.includes("again")"#).await;
    page.eval(r#"document.getElementById("rollback").click(); true"#).await;
    page.wait_for("the rollback notice", r#"document.getElementById("notice")?.textContent.includes("Rolled back")"#)
        .await;
    assert_eq!(api.get(leader, "/v1/config").await["version"].as_u64(), Some(version + 1));

    // An error from the API is shown as its message: a task that is not there.
    page.goto_hash("#/tasks/987654321").await;
    page.wait_for("the 404 message", r#"document.getElementById("error").textContent.includes("987654321")"#).await;

    // A killed follower shows as down on the leader's console within seconds.
    let victim = *cluster.servers.keys().find(|id| **id != leader).unwrap();
    page.goto_hash("#/cluster").await;
    page.wait_for("three nodes up", r#"document.querySelectorAll(".node-up").length === 3"#).await;
    let mut cluster = cluster;
    cluster.servers.get_mut(&victim).unwrap().kill9();
    let killed = Instant::now();
    let condition = format!(r#"!!document.querySelector('.node-down[data-node="{victim}"]')"#);
    wait_until(DOWN_SHOWN_WITHIN, "the killed node shown down", async || page.eval(&condition).await == json!(true))
        .await;
    eprintln!("node {victim} shown down {:?} after SIGKILL", killed.elapsed());

    let errors = page.errors().await;
    assert!(errors.is_empty(), "the console logged errors: {errors:#?}");
}

// ---- the cluster, through its API ----

struct Api<'a> {
    cluster: &'a Cluster,
}

impl Api<'_> {
    fn request(&self, method: reqwest::Method, id: u64, path: &str) -> reqwest::RequestBuilder {
        self.cluster.http.request(method, self.cluster.url(id, path)).bearer_auth(CLIENT_TOKEN)
    }

    async fn post(&self, id: u64, path: &str, body: Value) -> Value {
        let response = self.request(reqwest::Method::POST, id, path).json(&body).send().await.unwrap();
        let (status, value) = common::decode(response).await.unwrap();
        assert!(status < 300, "POST {path}: {status} {value}");
        value
    }

    async fn put(&self, id: u64, path: &str, body: Value) -> (u16, Value) {
        let response = self.request(reqwest::Method::PUT, id, path).json(&body).send().await.unwrap();
        common::decode(response).await.unwrap()
    }

    async fn get(&self, id: u64, path: &str) -> Value {
        let response = self.request(reqwest::Method::GET, id, path).send().await.unwrap();
        let (status, value) = common::decode(response).await.unwrap();
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    /// The leader, as node 1 knows it (`/v1/cluster` needs the token).
    async fn leader(&self) -> u64 {
        common::wait_for(Duration::from_secs(10), "a leader", async || {
            self.get(1, "/v1/cluster").await["leader_id"].as_u64()
        })
        .await
    }

    /// The console's own rule: a route is absent when it answers 404
    /// `not_found` ("no such route") or 405.
    async fn has_route(&self, id: u64, path: &str) -> bool {
        let response = self
            .request(reqwest::Method::POST, id, path)
            .header("content-type", "application/json")
            .body("probe")
            .send()
            .await
            .unwrap();
        let (status, value) = common::decode(response).await.unwrap();
        !(status == 405 || (status == 404 && value["error"]["code"] == "not_found"))
    }

    /// Submits a task with one attempt, leases it as `console-agent` and
    /// fails it: a dead letter. Answers its id.
    async fn dead_letter(&self, queue: &str) -> u64 {
        let leader = self.leader().await;
        let task = self
            .post(leader, "/v1/tasks", json!({"queue": queue, "payload": {"doomed": true}, "max_attempts": 1}))
            .await;
        let task_id = task["task_id"].as_u64().unwrap();
        let agent = self
            .post(leader, "/v1/agents/register", json!({"agent_id": "console-agent", "capabilities": [queue]}))
            .await;
        let poll = json!({"epoch": agent["epoch"], "session": agent["session"], "wait_ms": 2000});
        let leases = self.post(leader, "/v1/agents/console-agent/poll", poll).await;
        let fence = &leases["leases"][0]["fence"];
        assert_eq!(leases["leases"][0]["task"]["id"].as_u64(), Some(task_id), "{leases}");
        let fail = json!({"fence": fence, "error": "the console test fails it"});
        let failed = self.post(leader, &format!("/v1/tasks/{task_id}/fail"), fail).await;
        assert_eq!(failed["state"], "dead", "{failed}");
        task_id
    }
}

// ---- Chromium over the DevTools protocol ----

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium)
            .args([
                "--headless=new",
                // The test runs as root in CI, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1200,760",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // With port 0 Chromium picks one and writes it into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = common::wait_for(Duration::from_secs(20), "chromium's DevTools port", async || {
            std::fs::read_to_string(&port_file).ok()?.lines().next()?.parse::<u16>().ok()
        })
        .await;
        Browser { child, port, _profile: profile }
    }

    async fn page(&self) -> Page {
        let url = format!("http://127.0.0.1:{}/json/list", self.port);
        let socket = common::wait_for(Duration::from_secs(10), "a page target", async || {
            let targets: Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"].as_str().map(String::from)
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(socket.as_str()).await.expect("DevTools websocket");
        let mut page = Page { socket, next_id: 0, events: Vec::new() };
        for domain in ["Page", "Runtime", "Log"] {
            page.call(&format!("{domain}.enable"), json!({})).await;
        }
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One tab. Commands are answered in order on one websocket; the events that
/// arrive in between are kept for `errors`.
struct Page {
    socket: Socket,
    next_id: u64,
    events: Vec<Value>,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(message)).await.expect("send to chromium");
        loop {
            let message = self.socket.next().await.expect("chromium closed the socket").expect("websocket");
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if value["id"].as_u64() == Some(id) {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
            self.events.push(value);
        }
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            "the page's script",
            r#"document.readyState === "complete" && !!document.getElementById("page")"#,
        )
        .await;
    }

    async fn goto_hash(&mut self, hash: &str) {
        self.eval(&format!("location.hash = {}; true", json!(hash))).await;
    }

    /// Evaluates `expression` in the page (awaiting a promise) and answers its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let answer = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}))
            .await;
        assert!(answer.get("exceptionDetails").is_none(), "{expression}: {answer}");
        answer["result"]["value"].clone()
    }

    async fn wait_for(&mut self, what: &str, condition: &str) {
        let start = Instant::now();
        while self.eval(&format!("!!({condition})")).await != json!(true) {
            if start.elapsed() > SHOWN_WITHIN {
                let shown = self.eval(r#"document.body.innerText"#).await;
                panic!(
                    "the console did not show {what} within {SHOWN_WITHIN:?}; it shows:\n{}",
                    shown.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, dir: &Option<PathBuf>, name: &str) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, shot["data"].as_str().unwrap())
            .expect("base64 screenshot");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
        }
    }

    /// What the page logged as an error: uncaught exceptions,
    /// `console.error`, and browser errors other than HTTP statuses (an API
    /// refusal is an answer the page shows, not a fault of the page; a
    /// content-security-policy violation is).
    async fn errors(&mut self) -> Vec<Value> {
        self.eval("true").await; // gathers the events sent so far
        self.events
            .iter()
            .filter(|event| match event["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => {
                    matches!(event["params"]["type"].as_str(), Some("error" | "assert"))
                }
                Some("Log.entryAdded") => {
                    let entry = &event["params"]["entry"];
                    entry["level"] == "error" && entry["source"] != "network"
                }
                _ => false,
            })
            .cloned()
            .collect()
    }
}
