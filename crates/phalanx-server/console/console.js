// The Phalanx console: one vanilla JavaScript module, no build step.
//
// Each page is a function that reads the JSON API and returns HTML text;
// the page is drawn again every REFRESH_MS, and the DOM is touched only when
// the text changed (so a poll neither flickers nor steals a click). Every
// value from the API goes through `h` before it reaches HTML. Actions are
// buttons with `data-action`, handled in one place (`act`). Every refusal is
// shown as the API's own `error.message`.

const REFRESH_MS = 1500;
// A peer not heard from for this long is shown as down: Raft keep-alives and
// the election guard's probes reach every peer every 50 ms.
const DOWN_AFTER_MS = 1000;
const TOKEN_KEY = "phalanx-token";
const LIST_LIMIT = 100;

// ---- the API ----

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "unreachable", `${method} ${path}: the node did not answer (${e.message})`);
  }
  const text = await response.text();
  let value = text;
  try { value = JSON.parse(text); } catch { /* not JSON: keep the text */ }
  if (!response.ok) {
    const error = value && value.error;
    throw new ApiError(response.status, error ? error.code : "http_" + response.status,
      error ? error.message : `${method} ${path}: HTTP ${response.status} ${text.slice(0, 200)}`);
  }
  return value;
}

const get = (path) => api("GET", path);

// Whether a route this console knows of is served by this build: routes are
// added over time, and an absent one answers 404 "no such route" (or 405 when
// its path matches another route's pattern). The probe sends a body that is
// not JSON, which a present route refuses before doing anything.
const routes = new Map();
async function hasRoute(method, path) {
  if (!routes.has(path)) {
    let present = true;
    try {
      const response = await fetch(path, { method, headers: authHeaders({ "content-type": "application/json" }), body: method === "GET" ? undefined : "probe" });
      const value = await response.json().catch(() => null);
      const code = value && value.error && value.error.code;
      present = !(response.status === 405 || (response.status === 404 && code === "not_found"));
    } catch { present = false; }
    routes.set(path, present);
  }
  return routes.get(path);
}

function authHeaders(extra) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
}

// ---- HTML helpers ----

function h(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
const num = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en"));
const json = (v) => `<pre>${h(JSON.stringify(v, null, 2))}</pre>`;
// Log time is the majority's wall clock (ARCHITECTURE.md), so it reads as a date.
const logTime = (ms) => (ms === null || ms === undefined ? "—" : `${new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC")}`);
const taskLink = (id) => `<a href="#/tasks/${h(id)}">${h(id)}</a>`;

function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7200000) return `${Math.round(ms / 60000)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

function table(columns, rows, empty = "none") {
  if (rows.length === 0) return `<p class="muted">${h(empty)}</p>`;
  const head = columns.map(([title, , cls]) => `<th class="${cls || ""}">${h(title)}</th>`).join("");
  const body = rows.map((row) => `<tr>${columns.map(([, cell, cls]) => `<td class="${cls || ""}">${cell(row)}</td>`).join("")}</tr>`).join("");
  return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function kv(pairs) {
  return `<table class="kv"><tbody>${pairs.map(([k, v]) => `<tr><th>${h(k)}</th><td>${v}</td></tr>`).join("")}</tbody></table>`;
}

const tile = (label, value, cls = "") => `<div class="tile"><span class="muted">${h(label)}</span><b class="${cls}">${value}</b></div>`;

// ---- pages ----

async function clusterPage() {
  const cluster = await get("/v1/cluster");
  // Readiness is this node's own: 503 carries the reasons in error.message.
  let ready;
  try { await get("/health/ready"); ready = `<span class="ok">ready</span>`; }
  catch (e) { ready = `<span class="bad">not ready</span>: ${h(e.message)}`; }
  const leader = cluster.nodes.find((n) => n.id === cluster.leader_id);
  const lastLog = cluster.last_log_index ?? 0;
  // Only the leader talks to every peer all the time (keep-alives), so only
  // its `last_contact_ms` tells up from down; a follower's may be empty or
  // old, and this console says so instead of guessing.
  const leading = cluster.leader_id === cluster.node_id;
  const rows = cluster.nodes.map((n) => {
    const recent = n.last_contact_ms !== null && n.last_contact_ms < DOWN_AFTER_MS;
    const status = n.id === cluster.node_id || recent ? "up" : leading ? "down" : "unknown";
    return { ...n, status, lag: n.matched_index === null ? null : Math.max(0, lastLog - n.matched_index) };
  });
  const leaderConsole = !leading && leader ? `<p class="muted">Up and down are known on the leader: <a href="http://${h(leader.addr)}/ui">its console</a>.</p>` : "";
  const holdBack = cluster.election_hold_back;
  return `<h2>Cluster</h2>
    <div class="tiles">
      ${tile("leader", cluster.leader_id === null ? `<span class="bad">none</span>` : `node ${h(cluster.leader_id)}`)}
      ${tile("term", num(cluster.term))}
      ${tile("this node", `node ${h(cluster.node_id)} (${h(cluster.state)})`)}
      ${tile("applied / log", `${num(cluster.last_applied)} / ${num(cluster.last_log_index)}`)}
      ${tile("quorum ack", cluster.millis_since_quorum_ack === null ? "—" : duration(cluster.millis_since_quorum_ack))}
    </div>
    <p id="readiness">Node ${h(cluster.node_id)}: ${ready}</p>
    ${leaderConsole}
    ${table([
      ["node", (n) => `${h(n.id)}${n.id === cluster.leader_id ? " <span class=\"muted\">leader</span>" : ""}${n.id === cluster.node_id ? " <span class=\"muted\">(this)</span>" : ""}`],
      ["status", (n) => `<span class="${{ up: "ok", down: "bad", unknown: "muted" }[n.status]} node-${n.status}" data-node="${h(n.id)}">${n.status}</span>`],
      ["last contact", (n) => (n.id === cluster.node_id ? "—" : n.last_contact_ms === null ? "never" : duration(n.last_contact_ms)), "num"],
      ["lag (entries)", (n) => (n.lag === null ? `<span class="muted">${leader && cluster.node_id !== cluster.leader_id ? "known on the leader" : "—"}</span>` : num(n.lag)), "num"],
      ["voter", (n) => (n.voter ? "yes" : "learner")],
      ["clock skew", (n) => (n.clock_skew_ms === null || n.clock_skew_ms === undefined ? "—" : `<span class="${n.clock_skewed ? "bad" : ""}">${h(n.clock_skew_ms)} ms</span>`), "num"],
      ["address", (n) => `${h(n.addr)} <span class="muted">raft ${h(n.raft_addr ?? "—")}</span>`],
    ], rows)}
    <h3>Election hold-back</h3>
    ${holdBack === null || holdBack === undefined ? `<p class="muted">none: this node may campaign</p>` : typeof holdBack === "string" ? `<p>${h(holdBack)}</p>` : json(holdBack)}
    <h3>This node</h3>
    ${kv([
      ["disk free", `${num(cluster.disk_free_bytes)} bytes (minimum ${num(cluster.disk_free_min_bytes)})`],
      ["connections max", num(cluster.connections_max)],
      ["descriptor limit", num(cluster.descriptor_limit)],
      ["clock skew max", `${num(cluster.clock_skew_max_ms)} ms`],
    ])}`;
}

// Counters from the previous refresh of the queues page, for throughput.
let previousStatus = null;

async function queuesPage() {
  const status = await get("/v1/status");
  const now = performance.now();
  const seconds = previousStatus ? (now - previousStatus.at) / 1000 : 0;
  const rate = (value, old) => (seconds > 0 && old !== undefined ? (Math.max(0, value - old) / seconds).toFixed(1) : "—");
  const before = previousStatus ? previousStatus.status : null;
  const queues = Object.entries(status.queues).map(([name, counts]) => ({ name, ...counts }));
  const columns = [["queue", (q) => `<a href="#/dead?queue=${encodeURIComponent(q.name)}">${h(q.name)}</a>`]];
  for (const state of ["pending", "leased", "paused", "succeeded", "failed", "cancelled", "dead"]) {
    columns.push([state, (q) => num(q[state]), "num"]);
  }
  columns.push(["done /s", (q) => rate(q.succeeded + q.failed + q.dead + q.cancelled,
    before && before.queues[q.name] ? ["succeeded", "failed", "dead", "cancelled"].reduce((s, k) => s + before.queues[q.name][k], 0) : undefined), "num"]);
  const counters = status.counters;
  const counterRows = Object.entries(counters).map(([name, value]) => ({ name, value, per: rate(value, before ? before.counters[name] : undefined) }));
  previousStatus = { at: now, status };
  return `<h2>Queues</h2>
    <div class="tiles">
      ${tile("tasks", num(status.tasks))}
      ${tile("oldest pending", duration(status.oldest_pending_age_ms))}
      ${tile("agents", num(status.agents))}
      ${tile("stuck agents", num(status.stuck_agents.length), status.stuck_agents.length ? "bad" : "")}
      ${tile("state bytes", `${num(status.state_bytes)} / ${num(status.state_bytes_max)}`)}
      ${tile("policy version", num(status.policy_version))}
    </div>
    ${status.unserved_queues.length ? `<p class="warn">Queues no agent serves: ${status.unserved_queues.map(h).join(", ")}</p>` : ""}
    ${table(columns, queues, "no queues yet")}
    <h3>Throughput (since the last refresh)</h3>
    ${table([["counter", (c) => h(c.name)], ["total", (c) => num(c.value), "num"], ["per second", (c) => c.per, "num"]], counterRows)}`;
}

async function agentsPage() {
  const { agents } = await get("/v1/agents");
  return `<h2>Agents</h2>
    ${table([
      ["agent", (a) => h(a.agent_id)],
      ["session (epoch)", (a) => num(a.epoch), "num"],
      ["capabilities", (a) => a.capabilities.map(h).join(", ")],
      ["leases", (a) => `${num(a.leases)} / ${num(a.capacity)}`, "num"],
      ["stuck", (a) => (a.stuck_count ? `<span class="bad">${num(a.stuck_count)} (${duration(a.stuck_ms)})</span>` : "0"), "num"],
    ], agents, "no agents registered")}`;
}

// Children are found by their parent link: a child's id is above its
// parent's, so the scan starts after it. Scanned again every CHILD_SCAN_MS.
const CHILD_SCAN_MS = 10000;
const CHILD_SCAN_PAGES = 3;
let childScan = { id: null, at: 0, children: [], complete: true };

async function children(id) {
  if (childScan.id === id && performance.now() - childScan.at < CHILD_SCAN_MS) return childScan;
  const found = [];
  let after = id;
  let complete = false;
  for (let page = 0; page < CHILD_SCAN_PAGES; page++) {
    const list = await get(`/v1/tasks?after=${after}&limit=1000`);
    found.push(...list.tasks.filter((t) => t.parent_id === id));
    if (list.next_after === null) { complete = true; break; }
    after = list.next_after;
  }
  childScan = { id, at: performance.now(), children: found, complete };
  return childScan;
}

async function taskPage(id) {
  const task = await get(`/v1/tasks/${encodeURIComponent(id)}`);
  const scan = await children(task.id);
  const lease = task.lease;
  const canResume = task.state === "paused" && await hasRoute("POST", `/v1/tasks/0/resume`);
  const pairs = [
    ["state", `<span id="task-state" class="${task.state === "dead" || task.state === "failed" ? "bad" : task.state === "succeeded" ? "ok" : ""}">${h(task.state)}</span>`],
    ["queue", h(task.queue)],
    ["priority", num(task.priority)],
    ["attempts", `${num(task.attempts)} of ${num(task.max_attempts)}`],
    ["last fence", num(task.last_fence)],
    ["lease", lease ? `agent ${h(lease.agent_id)} (epoch ${num(lease.agent_epoch)}), fence ${num(lease.fence)}, valid until ${logTime(lease.valid_until_ms)}, progress ${logTime(lease.progress_ms)}` : "none"],
    ["superseded reports", num(task.superseded_count)],
    ["parent", task.parent_id === null ? "none (a root)" : `${taskLink(task.parent_id)} (fence ${num(task.parent_fence)})`],
    ["created", logTime(task.created_ms)],
    ["updated", logTime(task.updated_ms)],
    ["idempotency key", h(task.idempotency_key ?? "—")],
    ["conversation", h(task.conversation_id ?? "—")],
  ];
  if (task.waiting_on !== undefined && task.waiting_on !== null) {
    const on = Array.isArray(task.waiting_on) ? task.waiting_on.map(taskLink).join(", ") : json(task.waiting_on);
    pairs.push(["waiting on", on]);
  }
  if (task.result !== null && task.result !== undefined) pairs.push(["result", json(task.result)]);
  if (task.error) pairs.push(["error", `<span class="bad">${h(task.error)}</span>`]);
  if (task.dead_reason) pairs.push(["dead because", `<span class="bad">${h(task.dead_reason)}</span>`]);
  pairs.push(["payload", json(task.payload)]);
  return `<h2>Task ${h(task.id)}</h2>
    ${canResume ? `<div class="actions"><button class="primary" data-action="resume" data-id="${h(task.id)}">Resume</button></div>` : ""}
    ${kv(pairs)}
    <h3>Trail (delegation path from the root)</h3>
    ${table([["hop", (s) => num(s.i)], ["queue", (s) => h(s.queue)], ["agent", (s) => h(s.agent_id ?? "—")], ["payload hash", (s) => h(s.payload_hash)]],
      (task.trail || []).map((s, i) => ({ ...s, i })), "no delegation")}
    <h3>Children</h3>
    ${table([["task", (t) => taskLink(t.id)], ["queue", (t) => h(t.queue)], ["state", (t) => h(t.state)], ["attempt (parent fence)", (t) => num(t.parent_fence), "num"]],
      scan.children, "no children")}
    ${scan.complete ? "" : `<p class="muted">Children searched among the next ${CHILD_SCAN_PAGES * 1000} tasks only.</p>`}`;
}

async function deadPage(params) {
  const queue = params.get("queue");
  const query = `state=dead&limit=${LIST_LIMIT}${queue ? `&queue=${encodeURIComponent(queue)}` : ""}`;
  const list = await get(`/v1/tasks?${query}`);
  const canReplay = await hasRoute("POST", "/v1/tasks/replay");
  let paused = null;
  try { paused = (await get(`/v1/tasks?state=paused&limit=${LIST_LIMIT}${queue ? `&queue=${encodeURIComponent(queue)}` : ""}`)).tasks; }
  catch (e) { if (e.status !== 400) throw e; /* this build has no paused state */ }
  const canResume = paused !== null && paused.length > 0 && await hasRoute("POST", "/v1/tasks/0/resume");
  return `<h2>Dead letters${queue ? ` in ${h(queue)} <a class="muted" href="#/dead">(all queues)</a>` : ""}</h2>
    ${canReplay ? `<div class="actions"><button class="primary" id="replay" data-action="replay" data-queue="${h(queue ?? "")}">Replay ${list.tasks.length ? `these ${list.tasks.length}` : ""} dead tasks</button>
      <span class="muted">back to pending, oldest first (POST /v1/tasks/replay)</span></div>` : ""}
    ${table([
      ["task", (t) => taskLink(t.id)],
      ["queue", (t) => h(t.queue)],
      ["attempts", (t) => num(t.attempts), "num"],
      ["why", (t) => h(t.dead_reason ?? t.error ?? "")],
      ["updated", (t) => logTime(t.updated_ms)],
    ], list.tasks, "no dead letters")}
    ${list.next_after !== null ? `<p class="muted">First ${LIST_LIMIT} shown.</p>` : ""}
    ${paused === null ? "" : `<h3>Paused</h3>${table([
      ["task", (t) => taskLink(t.id)],
      ["queue", (t) => h(t.queue)],
      ["", (t) => (canResume ? `<button data-action="resume" data-id="${h(t.id)}">Resume</button>` : "")],
    ], paused, "no paused tasks")}`}`;
}

async function policyPage() {
  const [config, history] = await Promise.all([get("/v1/config"), get("/v1/config/history")]);
  const entries = [...history.history].reverse();
  return `<h2>Policy, version ${h(config.version)}</h2>
    <div class="actions">
      <button class="danger" id="rollback" data-action="rollback" data-version="${h(config.version)}" ${config.version <= 1 ? "disabled" : ""}>Roll back version ${h(config.version)}</button>
      <span class="muted">restores the version before it (compare-and-set on the current version)</span>
    </div>
    ${table([["key", (e) => h(e[0])], ["value", (e) => num(e[1]), "num"]], Object.entries(config.policy))}
    <h3>History</h3>
    ${table([
      ["version", (e) => num(e.version), "num"],
      ["set at", (e) => logTime(e.set_ms)],
      ["forced", (e) => (e.forced ? `<span class="warn">yes</span>` : "no")],
      ["note", (e) => h(e.note ?? "")],
    ], entries, "no history")}`;
}

async function limitsPage() {
  const limits = await get("/v1/limits");
  // `{rules: [...], keys: [...]}` (docs/api.md): each list of objects is a
  // table of their fields; anything else is shown as it is.
  const lists = Object.entries(limits).filter(([, v]) => Array.isArray(v) && v.every((row) => row && typeof row === "object"));
  if (lists.length === 0) return `<h2>Flow control</h2>${json(limits)}`;
  const cell = (value) => (typeof value === "object" && value !== null ? json(value) : h(value ?? "—"));
  return `<h2>Flow control</h2>` + lists.map(([name, list]) => {
    const fields = [...new Set(list.flatMap(Object.keys))];
    return `<h3>${h(name)}</h3>${table(fields.map((f) => [f, (row) => cell(row[f])]), list, "none")}`;
  }).join("");
}

// ---- actions ----

async function act(button) {
  const action = button.dataset.action;
  if (action === "replay") {
    const body = { state: "dead", limit: LIST_LIMIT };
    if (button.dataset.queue) body.queue = button.dataset.queue;
    const answer = await api("POST", "/v1/tasks/replay", body);
    notice(`Replayed ${answer.task_ids.length} tasks, pending again: ${answer.task_ids.slice(0, 20).join(", ")}`);
  } else if (action === "resume") {
    await api("POST", `/v1/tasks/${encodeURIComponent(button.dataset.id)}/resume`, {});
    notice(`Task ${button.dataset.id} resumed.`);
  } else if (action === "rollback") {
    // Two clicks: the first asks, the second (within 5 s) rolls back.
    if (button.dataset.armed !== "yes") {
      button.dataset.armed = "yes";
      button.textContent = `Click again to roll back version ${button.dataset.version}`;
      setTimeout(() => { button.dataset.armed = ""; lastHtml = ""; }, 5000);
      return;
    }
    const version = Number(button.dataset.version);
    const answer = await api("POST", "/v1/config/rollback", { expected_version: version });
    notice(`Rolled back: the policy is now version ${answer.version}, with the values of version ${answer.rolled_back_to}.`);
  }
}

let noticeText = "";
function notice(text) { noticeText = text; lastHtml = ""; refresh(); }

// ---- routing and refresh ----

const pages = {
  cluster: () => clusterPage(),
  queues: () => queuesPage(),
  agents: () => agentsPage(),
  dead: (rest, params) => deadPage(params),
  policy: () => policyPage(),
  limits: () => limitsPage(),
  tasks: (rest) => taskPage(rest),
};

function route() {
  const [path, query] = (location.hash.replace(/^#\/?/, "") || "cluster").split("?");
  const [name, ...rest] = path.split("/");
  return { name: pages[name] ? name : "cluster", rest: rest.join("/"), params: new URLSearchParams(query || "") };
}

let lastHtml = "";
let refreshing = false;

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  const { name, rest, params } = route();
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.getAttribute("href") === `#/${name}`);
  try {
    const html = (noticeText ? `<p class="notice" id="notice">${h(noticeText)}</p>` : "") + await pages[name](rest, params);
    if (html !== lastHtml) {
      document.getElementById("page").innerHTML = html;
      lastHtml = html;
    }
    showError("");
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
  } catch (e) {
    showError(e.message);
  } finally {
    refreshing = false;
  }
}

async function start() {
  document.getElementById("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    routes.clear();
    lastHtml = "";
    refresh();
  });
  document.getElementById("task-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("task-id").value.trim();
    if (id) location.hash = `#/tasks/${encodeURIComponent(id)}`;
  });
  document.getElementById("page").addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    button.disabled = true;
    try { await act(button); } catch (e) { showError(e.message); } finally { button.disabled = false; }
  });
  window.addEventListener("hashchange", () => { noticeText = ""; lastHtml = ""; previousStatus = null; refresh(); });
  try {
    const live = await get("/health/live");
    document.getElementById("served-by").textContent = `served by node ${live.node_id}`;
  } catch (e) { showError(e.message); }
  hasRoute("GET", "/v1/limits").then((present) => { document.getElementById("nav-limits").hidden = !present; });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

start();
