"""HTTP client for Phalanx (docs/api.md): `Client` (blocking) and
`AsyncClient` (asyncio) with the same methods and the same request logic.

Owns: the node list and failover (on a connection error or a 503, the next
node, or the node named by `leader_hint`), exponential backoff with full
jitter, `Retry-After` honoured, a retry budget (retries at most about a tenth
of requests plus a small floor) so that a struggling cluster is not buried
under retries, and the typed shapes of requests and answers.

Writes move fast: each attempt of a task or agent write has a short timeout
(long-polls add their wait), a node that does not answer in time is left for
the next one, and `leader_hint` is followed. The timeout adapts to the
latency this client sees, as TCP's does (RFC 6298: the smoothed latency plus
four times its variation), between `WRITE_TIMEOUT_FLOOR_S` (0.25 s) and
`write_timeout_s` (0.5 s): a commit takes milliseconds on a healthy cluster,
so a silent leader is left after a quarter of a second, while a loaded one
that answers slowly is given time. As in the Rust SDK.
Every submit carries an idempotency key (one is generated when the caller
gives none, the same for every attempt), so repeating it is always safe.

A write whose outcome is unknown (it may have arrived: a read timeout, a
dropped connection, a 503 `timeout` or `leader_changed`) is retried only
when repeating it is harmless (reads, fenced results, keyed submits);
otherwise `OutcomeUnknown` is raised and the caller decides. A request that
surely never arrived (the connection was refused, or a 503 whose `outcome`
is `not_done`) is always retried. Every error says which: `outcome` is
`"not_done"` or `"unknown"`.

Leaves to others: what to do with the answers (the agent runtime in
`agent.py`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, Optional, Sequence, TypedDict, TypeVar, Union

import httpx

# ---- shapes of the API (docs/api.md) ----

TaskState = Literal["pending", "leased", "succeeded", "failed", "cancelled", "dead"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "dead"})


class _LeaseInfoRequired(TypedDict):
    agent_id: str
    agent_epoch: int
    fence: int
    valid_until_ms: int


class LeaseInfo(_LeaseInfoRequired, total=False):
    """The lease a task is under, as part of a task."""

    progress_ms: int


class _TaskRequired(TypedDict):
    id: int
    queue: str
    payload: Any
    priority: int
    state: TaskState
    created_ms: int
    updated_ms: int
    deadline_ms: Optional[int]
    max_attempts: int
    attempts: int
    idempotency_key: Optional[str]
    parent_id: Optional[int]
    conversation_id: Optional[str]
    hop_count: int
    lease: Optional[LeaseInfo]
    last_fence: int
    result: Any
    error: Optional[str]
    dead_reason: Optional[str]
    superseded_count: int


class Task(_TaskRequired, total=False):
    """`GET /v1/tasks/{id}`."""

    trail: list[dict[str, Any]]
    # For a delegation: the fence of the parent's lease that created it.
    parent_fence: Optional[int]


class _SubmittedRequired(TypedDict):
    task_id: int
    deduplicated: bool


class Submitted(_SubmittedRequired, total=False):
    """What a submit created or found; `adopted`: a child of an earlier attempt of the parent, taken over."""

    adopted: bool


class Child(TypedDict):
    """A child of a leased task, as the lease lists it (`lease["children"]`)."""

    task_id: int
    queue: str
    # FNV-1a of the payload's JSON text (`payload_hash`).
    payload_hash: int
    state: TaskState
    # The fence of the parent's lease that created it, and of the latest attempt that adopted it.
    parent_fence: Optional[int]
    adopted_fence: Optional[int]


def payload_hash(payload: Any) -> int:
    """FNV-1a of a payload's JSON text as the cluster writes it (keys sorted, no spaces), as in
    `Child.payload_hash` and the trail. Floats may be written otherwise: compare their steps by queue and id."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


class ErrorBody(TypedDict):
    code: str
    message: str


class BatchResult(TypedDict, total=False):
    """One slot of `POST /v1/tasks/batch`: `task_id` and `deduplicated`, or `error`."""

    task_id: int
    deduplicated: bool
    error: ErrorBody


class _TaskSpecRequired(TypedDict):
    queue: str


class TaskSpec(_TaskSpecRequired, total=False):
    """A task to submit, as `submit_batch` takes it."""

    payload: Any
    priority: int
    idempotency_key: str
    deadline_ms: int
    max_attempts: int
    parent_id: int
    parent_fence: int
    conversation_id: str


class TaskPage(TypedDict):
    tasks: list[Task]
    next_after: Optional[int]


class Registration(TypedDict):
    agent_id: str
    epoch: int
    # The session's secret: the client presents it on the session's
    # heartbeats, polls and deregistration by itself (the epoch is public).
    session: str
    heartbeat_interval_ms: int
    agent_ttl_ms: int


class _LeaseRequired(TypedDict):
    task: Task
    fence: int
    valid_until_ms: int
    lease_ttl_ms: int


class Lease(_LeaseRequired, total=False):
    """One lease handed out by `poll`; `children`: what earlier attempts of the task delegated."""

    children: list[Child]


class _ContextEntryRequired(TypedDict):
    version: int
    value: Any


class ContextEntry(_ContextEntryRequired, total=False):
    """One key of a conversation; `task_id` and `fence` say which attempt wrote it, for a write on a task's behalf."""

    task_id: int
    fence: int


class Conversation(TypedDict):
    conversation_id: str
    entries: dict[str, ContextEntry]


class _ClusterNodeRequired(TypedDict):
    id: int
    addr: str
    voter: bool
    matched_index: Optional[int]
    last_contact_ms: Optional[int]


class ClusterNode(_ClusterNodeRequired, total=False):
    raft_addr: Optional[str]


class _ClusterInfoRequired(TypedDict):
    node_id: int
    leader_id: Optional[int]
    term: int
    state: str
    last_log_index: Optional[int]
    last_applied: Optional[int]
    snapshot_index: Optional[int]
    nodes: list[ClusterNode]


class ClusterInfo(_ClusterInfoRequired, total=False):
    millis_since_quorum_ack: Optional[int]


# ---- errors ----


# Codes whose refusal leaves the outcome open: the request may still take effect (docs/api.md).
OUTCOME_UNKNOWN_CODES: frozenset[str] = frozenset(
    {"timeout", "unavailable", "leader_changed", "membership_change_failed", "learner_lagging", "outcome_unknown"})

Outcome = Literal["not_done", "unknown"]


class PhalanxError(Exception):
    """A refusal from the cluster, or no usable answer at all.

    `status` is the HTTP status (0 when no node answered); `code` is the
    machine-readable code of docs/api.md; `outcome` is `"not_done"` (nothing
    was done: repeating is safe) or `"unknown"` (it may have taken effect).
    """

    def __init__(self, status: int, code: str, message: str, leader_hint: Optional[str] = None,
                 retry_after_ms: Optional[int] = None, outcome: Optional[str] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.leader_hint = leader_hint
        self.retry_after_ms = retry_after_ms
        if outcome not in ("not_done", "unknown"):
            outcome = "unknown" if code in OUTCOME_UNKNOWN_CODES else "not_done"
        self.outcome: Outcome = outcome  # type: ignore[assignment]

    @property
    def is_outcome_unknown(self) -> bool:
        """The request may have taken effect (or may still); `False` promises it did not."""
        return self.outcome == "unknown"

    @property
    def is_superseded(self) -> bool:
        """The fence was not the current one: the result was recorded as superseded, nothing else changed."""
        return self.code == "superseded"

    @property
    def is_definite(self) -> bool:
        """The cluster decided (a 4xx other than 429): retrying the same request will not help."""
        return 400 <= self.status < 500 and self.status != 429


class InvalidRequest(PhalanxError):
    """400: `invalid`, `malformed_json`, `not_capable`."""


class Unauthorized(PhalanxError):
    """401: missing or wrong token."""


class NotFound(PhalanxError):
    """404: `task_not_found`, `agent_not_found`, `not_found`."""


class Conflict(PhalanxError):
    """409: the state moved on (`stale_epoch`, `already_terminal`, `lease_expired`, `version_conflict`, ...)."""


class Superseded(Conflict):
    """409 `superseded`: a result or request with an old fence."""


class TooLarge(PhalanxError):
    """413: a payload, result or context value over its `*_max`."""


class Unprocessable(PhalanxError):
    """422: `loop_detected`, `deadlock`."""


class Overloaded(PhalanxError):
    """429: `queue_full`, `limit_reached`, `overloaded`, `rate_limited` (still so after the retries)."""


class Unavailable(PhalanxError):
    """No node answered (status 0), or the cluster cannot serve now (503), after the retries."""


class OutcomeUnknown(PhalanxError):
    """The request may or may not have taken effect (a write that timed out after it was sent).
    Its `outcome` is always `"unknown"`; every other error's `outcome` says which."""

    def __init__(self, status: int, code: str, message: str, leader_hint: Optional[str] = None,
                 retry_after_ms: Optional[int] = None, outcome: Optional[str] = None) -> None:
        super().__init__(status, code, message, leader_hint, retry_after_ms, "unknown")


_ERROR_BY_STATUS: dict[int, type[PhalanxError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: Unprocessable,
    429: Overloaded,
    503: Unavailable,
}


def error_from_answer(status: int, body: Any, text: str = "", retry_after_header: Optional[str] = None) -> PhalanxError:
    """Builds the typed error for a refusal `{"error": {code, message, leader_hint?, retry_after_ms?}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code", "unknown"))
    retry_after_ms = error.get("retry_after_ms")
    if retry_after_ms is None:
        retry_after_ms = _parse_retry_after_ms(retry_after_header)
    kind = Superseded if code == "superseded" else _ERROR_BY_STATUS.get(status, PhalanxError)
    return kind(status, code, str(error.get("message", text)), error.get("leader_hint"), retry_after_ms,
                error.get("outcome"))


def _parse_retry_after_ms(header: Optional[str]) -> Optional[int]:
    """`Retry-After` is seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return int(header) * 1000
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))


# ---- retry policy ----


@dataclass
class RetryPolicy:
    """How often and how long to retry. Full jitter: AWS Architecture Blog, "Exponential Backoff And Jitter"."""

    retries_max: int = 8
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    # The jitter's ceiling when moving to another node (failover, not overload): an election
    # takes a few hundred milliseconds and the node's Retry-After already spaces the retries.
    failover_backoff_cap_s: float = 0.25
    # A server's Retry-After is honoured up to this long.
    retry_after_max_s: float = 30.0

    def backoff_s(self, attempt: int, rng: random.Random, failover: bool = False) -> float:
        """Uniform in [0, min(cap, base * 2^attempt)]."""
        cap = self.failover_backoff_cap_s if failover else self.backoff_cap_s
        return rng.uniform(0.0, min(cap, self.backoff_base_s * (2 ** min(attempt, 30))))


class RetryBudget:
    """Token bucket over retries: every request earns `ratio` token, a retry
    spends one, and `floor_per_s` tokens trickle in each second so that a
    quiet client may still retry; at most `tokens_max` are kept."""

    def __init__(self, ratio: float = 0.1, floor_per_s: float = 1.0, tokens_max: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self.tokens_max = tokens_max
        self.tokens = tokens_max
        self._clock = clock
        self._refilled_at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.tokens_max, self.tokens + (now - self._refilled_at) * self.floor_per_s)
        self._refilled_at = now

    def on_request(self) -> None:
        with self._lock:
            self._refill()
            self.tokens = min(self.tokens_max, self.tokens + self.ratio)

    def try_retry(self) -> bool:
        with self._lock:
            self._refill()
            if self.tokens >= 1.0 - 1e-9:  # ten deposits of 0.1 make one token
                self.tokens = max(0.0, self.tokens - 1.0)
                return True
            return False


def parse_nodes(nodes: Union[str, Sequence[str], None]) -> list[str]:
    """`host:port,host:port` or a list; `None` reads `PHALANX_NODES` (default `127.0.0.1:7070`)."""
    if nodes is None:
        nodes = os.environ.get("PHALANX_NODES") or "127.0.0.1:7070"
    if isinstance(nodes, str):
        nodes = nodes.split(",")
    parsed = []
    for node in nodes:
        node = node.strip()
        for prefix in ("http://", "https://"):
            if node.startswith(prefix):
                node = node[len(prefix):]
        node = node.rstrip("/")
        if node:
            parsed.append(node)
    if not parsed:
        raise ValueError("the node list is empty")
    return parsed


# ---- requests: one description, executed by either client ----

T = TypeVar("T")

# "safe": repeating the request is harmless, so it is retried whatever happened.
# "if_not_sent": retried only when it surely never took effect.
Retry = Literal["safe", "if_not_sent"]


# The adaptive write timeout's floor: a new leader is elected about 0.25 s
# after the old one falls silent.
WRITE_TIMEOUT_FLOOR_S = 0.25


@dataclass
class _Latency:
    """The latency of single write attempts, smoothed as RFC 6298 does."""

    smoothed_s: float = 0.0
    variation_s: float = 0.0
    samples: int = 0

    def record(self, seconds: float) -> None:
        if self.samples == 0:
            self.smoothed_s, self.variation_s = seconds, seconds / 2
        else:
            self.variation_s = 0.75 * self.variation_s + 0.25 * abs(self.smoothed_s - seconds)
            self.smoothed_s = 0.875 * self.smoothed_s + 0.125 * seconds
        self.samples += 1

    def timeout_s(self, floor_s: float, ceiling_s: float) -> float:
        """The timeout of one write attempt: none seen yet, the ceiling."""
        if self.samples == 0 or ceiling_s <= floor_s:
            return ceiling_s
        return min(ceiling_s, max(floor_s, self.smoothed_s + 4 * self.variation_s))


def generated_idempotency_key() -> str:
    """A fresh key for a submit that carries none: 128 random bits."""
    return f"auto-{uuid.uuid4().hex}"


def _identity(value: Any) -> Any:
    return value


@dataclass
class _Request(Generic[T]):
    method: str
    path: str
    body: Any = None
    query: Optional[dict[str, str]] = None
    retry: Retry = "safe"
    # Added to the read timeout and the call budget (a long-poll's wait).
    wait_s: float = 0.0
    decode: Callable[[Any], T] = _identity
    text: bool = False
    # A task or agent write: each attempt gets `write_timeout_s` (plus `wait_s`).
    fast: bool = False


def _door_priority(request: _Request[Any]) -> Optional[int]:
    """The priority a submit announces in `X-Phalanx-Priority`, so that a
    loaded node sheds the lowest classes first before reading bodies (a
    batch announces its highest task's)."""
    if request.method != "POST" or request.path not in ("/v1/tasks", "/v1/tasks/batch"):
        return None
    body = request.body if isinstance(request.body, dict) else {}
    tasks = body.get("tasks") if request.path == "/v1/tasks/batch" else [body]
    priorities = [t.get("priority", 5) for t in tasks or [] if isinstance(t, dict)]
    valid = [p for p in priorities if isinstance(p, int) and 0 <= p <= 9]
    return max(valid) if valid else None


def _segment(value: Union[str, int]) -> str:
    return urllib.parse.quote(str(value), safe="")


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


class _Endpoints:
    """Every endpoint of docs/api.md as a request description."""

    @staticmethod
    def submit(queue: str, payload: Any, priority: int, idempotency_key: Optional[str], deadline_ms: Optional[int],
               max_attempts: int, parent_id: Optional[int], parent_fence: Optional[int],
               conversation_id: Optional[str]) -> _Request[int]:
        # One key for every attempt of this call: the cluster keeps one task per key.
        if idempotency_key is None:
            idempotency_key = generated_idempotency_key()
        body = _drop_none({"queue": queue, "payload": payload, "priority": priority,
                           "idempotency_key": idempotency_key, "deadline_ms": deadline_ms,
                           "max_attempts": max_attempts, "parent_id": parent_id, "parent_fence": parent_fence,
                           "conversation_id": conversation_id})
        body["payload"] = payload
        return _Request("POST", "/v1/tasks", body, retry="safe", decode=lambda answer: answer["task_id"], fast=True)

    @staticmethod
    def delegate(parent_id: int, parent_fence: int, queue: str, payload: Any, priority: int,
                 idempotency_key: Optional[str], deadline_ms: Optional[int], max_attempts: int,
                 conversation_id: Optional[str]) -> _Request[Submitted]:
        request = _Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms, max_attempts, parent_id,
                                    parent_fence, conversation_id)
        return _Request("POST", "/v1/tasks", request.body, retry="safe", decode=_identity, fast=True)

    @staticmethod
    def submit_batch(tasks: Sequence[TaskSpec]) -> _Request[list[BatchResult]]:
        specs = [dict(task) for task in tasks]
        for spec in specs:
            if spec.get("idempotency_key") is None:
                spec["idempotency_key"] = generated_idempotency_key()
        return _Request("POST", "/v1/tasks/batch", {"tasks": specs}, retry="safe",
                        decode=lambda answer: answer["results"], fast=True)

    @staticmethod
    def get_task(task_id: int, stale: bool) -> _Request[Task]:
        return _Request("GET", f"/v1/tasks/{int(task_id)}", query={"stale": "true"} if stale else None)

    @staticmethod
    def list_tasks(queue: Optional[str], state: Optional[str], after: Optional[int], limit: Optional[int],
                   stale: bool) -> _Request[TaskPage]:
        query = _drop_none({"queue": queue, "state": state, "after": after, "limit": limit,
                            "stale": "true" if stale else None})
        return _Request("GET", "/v1/tasks", query={key: str(value) for key, value in query.items()})

    @staticmethod
    def cancel(task_id: int) -> _Request[Task]:
        return _Request("POST", f"/v1/tasks/{int(task_id)}/cancel", {}, fast=True)

    @staticmethod
    def register(agent_id: str, capabilities: Sequence[str], capacity: int) -> _Request[Registration]:
        if isinstance(capabilities, str):
            capabilities = [capabilities]
        body = {"agent_id": agent_id, "capabilities": list(capabilities), "capacity": capacity}
        return _Request("POST", "/v1/agents/register", body, fast=True)

    @staticmethod
    def heartbeat(agent_id: str, epoch: int, session: Optional[str]) -> _Request[None]:
        return _Request("POST", f"/v1/agents/{_segment(agent_id)}/heartbeat",
                        _drop_none({"epoch": epoch, "session": session}), decode=lambda _: None, fast=True)

    @staticmethod
    def deregister(agent_id: str, epoch: int, session: Optional[str]) -> _Request[None]:
        return _Request("POST", f"/v1/agents/{_segment(agent_id)}/deregister",
                        _drop_none({"epoch": epoch, "session": session}), decode=lambda _: None, fast=True)

    @staticmethod
    def poll(agent_id: str, epoch: int, session: Optional[str], max_tasks: int, wait_ms: int,
             lease_ttl_ms: Optional[int], queues: Optional[Sequence[str]]) -> _Request[list[Lease]]:
        body = _drop_none({"epoch": epoch, "session": session,
                           "queues": list(queues) if queues is not None else None,
                           "max_tasks": max_tasks, "wait_ms": wait_ms, "lease_ttl_ms": lease_ttl_ms})
        return _Request("POST", f"/v1/agents/{_segment(agent_id)}/poll", body, wait_s=wait_ms / 1000,
                        decode=lambda answer: answer["leases"], fast=True)

    @staticmethod
    def complete(task_id: int, fence: int, result: Any) -> _Request[Task]:
        return _Request("POST", f"/v1/tasks/{int(task_id)}/complete", {"fence": fence, "result": result}, fast=True)

    @staticmethod
    def fail(task_id: int, fence: int, error: str, retryable: bool) -> _Request[Task]:
        body = {"fence": fence, "error": error, "retryable": retryable}
        return _Request("POST", f"/v1/tasks/{int(task_id)}/fail", body, fast=True)

    @staticmethod
    def extend(task_id: int, fence: int, lease_ttl_ms: Optional[int]) -> _Request[int]:
        body = _drop_none({"fence": fence, "lease_ttl_ms": lease_ttl_ms})
        return _Request("POST", f"/v1/tasks/{int(task_id)}/extend", body,
                        decode=lambda answer: answer["valid_until_ms"], fast=True)

    @staticmethod
    def wait(task_id: int, fence: int, on: Sequence[int], timeout_ms: int) -> _Request[list[int]]:
        body = {"fence": fence, "on": [int(i) for i in on], "timeout_ms": int(timeout_ms)}
        return _Request("POST", f"/v1/tasks/{int(task_id)}/wait", body, decode=lambda answer: answer["pending"], fast=True)

    @staticmethod
    def progress(task_id: int, fence: int) -> _Request[None]:
        return _Request("POST", f"/v1/tasks/{int(task_id)}/progress", {"fence": fence}, decode=lambda _: None, fast=True)

    @staticmethod
    def context_get(conversation_id: str, stale: bool) -> _Request[Conversation]:
        return _Request("GET", f"/v1/conversations/{_segment(conversation_id)}",
                        query={"stale": "true"} if stale else None)

    @staticmethod
    def context_put(conversation_id: str, key: str, value: Any, expected_version: Optional[int],
                    task_id: Optional[int] = None, fence: Optional[int] = None) -> _Request[int]:
        if (task_id is None) != (fence is None):
            raise ValueError("a write on a task's behalf carries both task_id and fence")
        body = _drop_none({"value": value, "expected_version": expected_version, "task_id": task_id, "fence": fence})
        body["value"] = value
        # A repeated compare-and-set would fail against its own first write.
        retry: Retry = "safe" if expected_version is None else "if_not_sent"
        return _Request("PUT", f"/v1/conversations/{_segment(conversation_id)}/{_segment(key)}", body,
                        retry=retry, decode=lambda answer: answer["version"], fast=True)

    @staticmethod
    def context_delete(conversation_id: str) -> _Request[None]:
        # Repeated after it committed, a delete answers 404 `not_found`.
        return _Request("DELETE", f"/v1/conversations/{_segment(conversation_id)}", retry="if_not_sent",
                        decode=lambda _: None)

    @staticmethod
    def cluster() -> _Request[ClusterInfo]:
        return _Request("GET", "/v1/cluster")

    @staticmethod
    def add_member(node_id: int, addr: str, raft_addr: Optional[str]) -> _Request[dict[str, Any]]:
        body = _drop_none({"node_id": node_id, "addr": addr, "raft_addr": raft_addr})
        return _Request("POST", "/v1/cluster/members", body, retry="if_not_sent")

    @staticmethod
    def remove_member(node_id: int) -> _Request[dict[str, Any]]:
        return _Request("DELETE", f"/v1/cluster/members/{int(node_id)}", retry="if_not_sent")

    @staticmethod
    def status() -> _Request[dict[str, Any]]:
        return _Request("GET", "/v1/status")

    @staticmethod
    def agents() -> _Request[list[dict[str, Any]]]:
        return _Request("GET", "/v1/agents", decode=lambda answer: answer["agents"])

    @staticmethod
    def config_get() -> _Request[dict[str, Any]]:
        return _Request("GET", "/v1/config")

    @staticmethod
    def config_set(
        changes: dict[str, Any], expected_version: Optional[int], force: bool = False
    ) -> _Request[dict[str, Any]]:
        body = _drop_none({"set": dict(changes), "expected_version": expected_version, "force": force or None})
        return _Request("PUT", "/v1/config", body, retry="safe" if expected_version is None else "if_not_sent")

    @staticmethod
    def config_history() -> _Request[dict[str, Any]]:
        return _Request("GET", "/v1/config/history")

    @staticmethod
    def config_rollback(version: Optional[int], force: bool = False) -> _Request[dict[str, Any]]:
        body = _drop_none({"version": version, "force": force or None})
        return _Request("POST", "/v1/config/rollback", body, retry="if_not_sent")

    @staticmethod
    def metrics() -> _Request[str]:
        return _Request("GET", "/metrics", text=True)


# ---- the shared judgement of one attempt ----


@dataclass
class _Done:
    value: Any


@dataclass
class _Retry:
    error: PhalanxError
    wait_s: float = 0.0
    # Retried on another node (failover), not on the same one (overload).
    failover: bool = True


@dataclass
class _Raise:
    error: PhalanxError


_Verdict = Union[_Done, _Retry, _Raise]

# Exceptions after which the request surely never reached a server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass
class _Core:
    """What the sync and async clients share: nodes, failover, the judgement
    of each answer, and the pause before a retry."""

    nodes: list[str]
    token: Optional[str]
    name: Optional[str]
    timeout_s: float
    write_timeout_s: float
    connect_timeout_s: float
    call_timeout_s: Optional[float]
    policy: RetryPolicy
    budget: RetryBudget
    rng: random.Random = field(default_factory=random.Random)
    current: int = 0
    latency: _Latency = field(default_factory=_Latency)

    def __post_init__(self) -> None:
        self.current = self.rng.randrange(len(self.nodes))
        self._lock = threading.Lock()

    def node(self) -> int:
        return self.current % len(self.nodes)

    def url(self, index: int, path: str) -> str:
        return f"http://{self.nodes[index]}{path}"

    def deadline(self, request: _Request[Any]) -> Optional[float]:
        if self.call_timeout_s is None:
            return None
        return time.monotonic() + self.call_timeout_s + request.wait_s

    def attempt_s(self, request: _Request[Any]) -> float:
        """How long one attempt may wait for its answer (a long-poll adds its wait)."""
        if not request.fast:
            return self.timeout_s + request.wait_s
        with self._lock:
            write_s = self.latency.timeout_s(min(WRITE_TIMEOUT_FLOOR_S, self.write_timeout_s), self.write_timeout_s)
        return write_s + request.wait_s

    def answered(self, request: _Request[Any], sent: float) -> None:
        """Notes how long a successful write attempt took (long-polls aside)."""
        if request.fast and request.wait_s == 0:
            with self._lock:
                self.latency.record(time.monotonic() - sent)

    def headers(self, deadline: Optional[float], request: Optional[_Request[Any]] = None) -> dict[str, str]:
        headers = {}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self.name:
            headers["x-phalanx-client"] = self.name
        if request is not None and request.fast:
            # The node refuses at once (changing nothing) what it cannot
            # propose within this attempt, instead of leaving the outcome open.
            attempt_end = time.monotonic() + self.attempt_s(request)
            deadline = attempt_end if deadline is None else min(deadline, attempt_end)
        if deadline is not None:
            headers["x-phalanx-deadline-ms"] = str(max(1, int((deadline - time.monotonic()) * 1000)))
        priority = _door_priority(request) if request is not None else None
        if priority is not None:
            headers["x-phalanx-priority"] = str(priority)
        return headers

    def timeout(self, request: _Request[Any], deadline: Optional[float]) -> httpx.Timeout:
        read_s = self.attempt_s(request)
        if deadline is not None:
            read_s = max(0.001, min(read_s, deadline - time.monotonic()))
        return httpx.Timeout(read_s, connect=min(self.connect_timeout_s, read_s))

    def move_on(self, failed: int, hint: Optional[str] = None) -> None:
        """After node `failed` did not serve: the hinted leader if known, else the next node.
        Only the first of several concurrent failures on the same node moves on."""
        with self._lock:
            if hint is not None and hint in self.nodes:
                self.current = self.nodes.index(hint)
            elif self.node() == failed:
                self.current = failed + 1

    def judge_exception(self, request: _Request[Any], index: int, error: Exception) -> _Verdict:
        self.move_on(index)
        where = f"{self.nodes[index]}: {type(error).__name__}: {error}"
        if isinstance(error, _NOT_SENT):
            return _Retry(Unavailable(0, "unreachable", where, outcome="not_done"))
        if request.retry == "if_not_sent":
            return _Raise(OutcomeUnknown(0, "outcome_unknown", f"the request may have taken effect: {where}"))
        return _Retry(Unavailable(0, "no_answer", where, outcome="unknown"))

    def judge_response(self, request: _Request[Any], index: int, response: httpx.Response) -> _Verdict:
        status = response.status_code
        if 200 <= status < 300:
            if request.text:
                return _Done(response.text)
            try:
                return _Done(response.json())
            except ValueError:
                return _Raise(PhalanxError(status, "bad_answer", f"not JSON: {response.text[:200]!r}"))
        try:
            body = response.json()
        except ValueError:
            body = None
        error = error_from_answer(status, body, response.text[:500], response.headers.get("retry-after"))
        wait_s = (error.retry_after_ms or 0) / 1000
        if status == 429:
            return _Retry(error, wait_s, failover=False)
        if status == 503:
            if request.retry == "if_not_sent" and error.is_outcome_unknown:
                return _Raise(OutcomeUnknown(status, error.code, error.message, error.leader_hint,
                                             error.retry_after_ms))
            self.move_on(index, error.leader_hint)
            return _Retry(error, wait_s)
        return _Raise(error)

    @staticmethod
    def give_up(error: PhalanxError, maybe_done: bool) -> PhalanxError:
        """The error a call ends with: unknown when any attempt may have taken effect."""
        # The kind (Unavailable, Overloaded, ...) stays that of the last answer.
        if maybe_done:
            error.outcome = "unknown"
        return error

    def pause_s(self, attempt: int, verdict: _Retry, deadline: Optional[float]) -> Optional[float]:
        """The pause before retry `attempt` (1-based), or None to give up."""
        if attempt > self.policy.retries_max or not self.budget.try_retry():
            return None
        pause = max(self.policy.backoff_s(attempt, self.rng, verdict.failover),
                    min(verdict.wait_s, self.policy.retry_after_max_s))
        if deadline is not None and time.monotonic() + pause >= deadline:
            return None
        return pause


class _ClientBase:
    def __init__(self, nodes: Union[str, Sequence[str], None], token: Optional[str], name: Optional[str],
                 timeout_s: float, write_timeout_s: float, connect_timeout_s: float, call_timeout_s: Optional[float],
                 retries_max: int, retry_budget: Optional[RetryBudget], rng: Optional[random.Random]) -> None:
        self._core = _Core(
            nodes=parse_nodes(nodes),
            token=token if token is not None else os.environ.get("PHALANX_TOKEN") or None,
            name=name,
            timeout_s=timeout_s,
            write_timeout_s=write_timeout_s,
            connect_timeout_s=connect_timeout_s,
            call_timeout_s=call_timeout_s,
            policy=RetryPolicy(retries_max=retries_max),
            budget=retry_budget if retry_budget is not None else RetryBudget(),
            rng=rng if rng is not None else random.Random(),
        )
        # agent id -> (epoch, secret) of each session registered through this client.
        self._sessions: dict[str, tuple[int, str]] = {}
        self._sessions_lock = threading.Lock()

    def _remember(self, registration: Registration) -> Registration:
        if registration.get("session"):
            with self._sessions_lock:
                self._sessions[registration["agent_id"]] = (registration["epoch"], registration["session"])
        return registration

    def _session(self, agent_id: str, epoch: int) -> Optional[str]:
        with self._sessions_lock:
            known = self._sessions.get(agent_id)
        return known[1] if known is not None and known[0] == epoch else None

    @property
    def nodes(self) -> list[str]:
        return list(self._core.nodes)

    @property
    def retries_max(self) -> int:
        return self._core.policy.retries_max

    @retries_max.setter
    def retries_max(self, value: int) -> None:
        self._core.policy.retries_max = value

    @property
    def retry_budget(self) -> RetryBudget:
        return self._core.budget


class Client(_ClientBase):
    """Blocking client. `nodes`: a list or `host:port,host:port` (default `PHALANX_NODES`);
    `token`: bearer token (default `PHALANX_TOKEN`); `name`: the `X-Phalanx-Client` rate-limit key;
    `timeout_s`: per attempt of reads and administrative calls; `write_timeout_s`: per attempt of task
    and agent writes (a long-poll adds its wait), after which the next node is tried;
    `call_timeout_s`: a budget for one call including its retries (sent as `X-Phalanx-Deadline-Ms`)."""

    def __init__(self, nodes: Union[str, Sequence[str], None] = None, token: Optional[str] = None,
                 name: Optional[str] = None, *, timeout_s: float = 15.0, write_timeout_s: float = 0.5,
                 connect_timeout_s: float = 1.0, call_timeout_s: Optional[float] = None, retries_max: int = 8,
                 retry_budget: Optional[RetryBudget] = None, rng: Optional[random.Random] = None,
                 transport: Optional[httpx.BaseTransport] = None) -> None:
        super().__init__(nodes, token, name, timeout_s, write_timeout_s, connect_timeout_s, call_timeout_s,
                         retries_max, retry_budget, rng)
        self._http = httpx.Client(transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _call(self, request: _Request[T]) -> T:
        core = self._core
        core.budget.on_request()
        deadline = core.deadline(request)
        attempt = 0
        maybe_done = False
        while True:
            index = core.node()
            verdict: _Verdict
            sent = time.monotonic()
            try:
                response = self._http.request(request.method, core.url(index, request.path), params=request.query,
                                              json=request.body, headers=core.headers(deadline, request),
                                              timeout=core.timeout(request, deadline))
            except httpx.HTTPError as error:
                verdict = core.judge_exception(request, index, error)
            else:
                verdict = core.judge_response(request, index, response)
            if isinstance(verdict, _Done):
                core.answered(request, sent)
                return request.decode(verdict.value)
            if isinstance(verdict, _Raise):
                raise verdict.error
            maybe_done = maybe_done or verdict.error.is_outcome_unknown
            attempt += 1
            pause = core.pause_s(attempt, verdict, deadline)
            if pause is None:
                raise core.give_up(verdict.error, maybe_done)
            time.sleep(pause)

    # ---- tasks ----

    def submit(self, queue: str, payload: Any = None, priority: int = 5, idempotency_key: Optional[str] = None,
               deadline_ms: Optional[int] = None, max_attempts: int = 3, parent_id: Optional[int] = None,
               conversation_id: Optional[str] = None, parent_fence: Optional[int] = None) -> int:
        """Submits a task; returns its id (an existing id when `idempotency_key` was seen before)."""
        return self._call(_Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms, max_attempts,
                                            parent_id, parent_fence, conversation_id))

    def delegate(self, parent_id: int, parent_fence: int, queue: str, payload: Any = None, priority: int = 5,
                 idempotency_key: Optional[str] = None, deadline_ms: Optional[int] = None, max_attempts: int = 3,
                 conversation_id: Optional[str] = None) -> Submitted:
        """Submits a child of `parent_id` under the fence of the parent's lease; `adopted` in the answer when an
        earlier attempt of the parent had delegated the same step (same queue, same payload)."""
        return self._call(_Endpoints.delegate(parent_id, parent_fence, queue, payload, priority, idempotency_key,
                                              deadline_ms, max_attempts, conversation_id))

    def submit_batch(self, tasks: Sequence[TaskSpec]) -> list[BatchResult]:
        return self._call(_Endpoints.submit_batch(tasks))

    def get_task(self, task_id: int, stale: bool = False) -> Task:
        return self._call(_Endpoints.get_task(task_id, stale))

    def list_tasks(self, queue: Optional[str] = None, state: Optional[str] = None, after: Optional[int] = None,
                   limit: Optional[int] = None, stale: bool = False) -> TaskPage:
        return self._call(_Endpoints.list_tasks(queue, state, after, limit, stale))

    def cancel(self, task_id: int) -> Task:
        return self._call(_Endpoints.cancel(task_id))

    def wait_for_tasks(self, task_ids: Sequence[int], timeout_s: float = 60.0) -> list[Task]:
        """Reads the tasks until every one is finished; raises `TimeoutError` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        finished: dict[int, Task] = {}
        pause = 0.02
        while True:
            for task_id in task_ids:
                if task_id not in finished:
                    task = self.get_task(task_id)
                    if task["state"] in TERMINAL_STATES:
                        finished[task_id] = task
            if len(finished) == len(set(task_ids)):
                return [finished[task_id] for task_id in task_ids]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"tasks {sorted(set(task_ids) - set(finished))} did not finish in {timeout_s} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    # ---- agents ----

    def register(self, agent_id: str, capabilities: Sequence[str], capacity: int = 1) -> Registration:
        return self._remember(self._call(_Endpoints.register(agent_id, capabilities, capacity)))

    def heartbeat(self, agent_id: str, epoch: int) -> None:
        self._call(_Endpoints.heartbeat(agent_id, epoch, self._session(agent_id, epoch)))

    def deregister(self, agent_id: str, epoch: int) -> None:
        self._call(_Endpoints.deregister(agent_id, epoch, self._session(agent_id, epoch)))

    def poll(self, agent_id: str, epoch: int, max_tasks: int = 1, wait_ms: int = 0,
             lease_ttl_ms: Optional[int] = None, queues: Optional[Sequence[str]] = None) -> list[Lease]:
        session = self._session(agent_id, epoch)
        return self._call(_Endpoints.poll(agent_id, epoch, session, max_tasks, wait_ms, lease_ttl_ms, queues))

    def complete(self, task_id: int, fence: int, result: Any = None) -> Task:
        return self._call(_Endpoints.complete(task_id, fence, result))

    def fail(self, task_id: int, fence: int, error: str, retryable: bool = True) -> Task:
        return self._call(_Endpoints.fail(task_id, fence, error, retryable))

    def extend(self, task_id: int, fence: int, lease_ttl_ms: Optional[int] = None) -> int:
        """Returns the new `valid_until_ms` (log time)."""
        return self._call(_Endpoints.extend(task_id, fence, lease_ttl_ms))

    def wait(self, task_id: int, fence: int, on: Sequence[int], timeout_ms: int) -> list[int]:
        """Declares that the task waits on others; returns those still pending (422 `deadlock` on a cycle)."""
        return self._call(_Endpoints.wait(task_id, fence, on, timeout_ms))

    def progress(self, task_id: int, fence: int) -> None:
        self._call(_Endpoints.progress(task_id, fence))

    # ---- conversations ----

    def context_get(self, conversation_id: str, stale: bool = False) -> Conversation:
        return self._call(_Endpoints.context_get(conversation_id, stale))

    def context_put(self, conversation_id: str, key: str, value: Any, expected_version: Optional[int] = None, *,
                    task_id: Optional[int] = None, fence: Optional[int] = None) -> int:
        """Returns the new version; `expected_version=0` writes only if the key does not exist. With `task_id` and
        `fence`, the write is made on that task's behalf under its lease: refused once the lease is not held, and
        discarded if the attempt is superseded."""
        return self._call(_Endpoints.context_put(conversation_id, key, value, expected_version, task_id, fence))

    def context_delete(self, conversation_id: str) -> None:
        """Deletes the conversation and its whole context; 404 `not_found` if there is none."""
        self._call(_Endpoints.context_delete(conversation_id))

    # ---- cluster, policy, health ----

    def cluster(self) -> ClusterInfo:
        return self._call(_Endpoints.cluster())

    def add_member(self, node_id: int, addr: str, raft_addr: Optional[str] = None) -> dict[str, Any]:
        return self._call(_Endpoints.add_member(node_id, addr, raft_addr))

    def remove_member(self, node_id: int) -> dict[str, Any]:
        return self._call(_Endpoints.remove_member(node_id))

    def status(self) -> dict[str, Any]:
        return self._call(_Endpoints.status())

    def agents(self) -> list[dict[str, Any]]:
        return self._call(_Endpoints.agents())

    def config_get(self) -> dict[str, Any]:
        return self._call(_Endpoints.config_get())

    def config_set(
        self, changes: dict[str, Any], expected_version: Optional[int] = None, force: bool = False
    ) -> dict[str, Any]:
        return self._call(_Endpoints.config_set(changes, expected_version, force))

    def config_history(self) -> dict[str, Any]:
        return self._call(_Endpoints.config_history())

    def config_rollback(self, version: Optional[int] = None, force: bool = False) -> dict[str, Any]:
        return self._call(_Endpoints.config_rollback(version, force))

    def metrics(self) -> str:
        return self._call(_Endpoints.metrics())

    def ready(self, node: Optional[str] = None) -> bool:
        """`GET /health/ready` on one node (default: the current one), without retries."""
        address = node if node is not None else self._core.nodes[self._core.node()]
        try:
            response = self._http.get(f"http://{address}/health/ready", timeout=self._core.connect_timeout_s + 1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


class AsyncClient(_ClientBase):
    """Asyncio client with the same methods, arguments and semantics as `Client`."""

    def __init__(self, nodes: Union[str, Sequence[str], None] = None, token: Optional[str] = None,
                 name: Optional[str] = None, *, timeout_s: float = 15.0, write_timeout_s: float = 0.5,
                 connect_timeout_s: float = 1.0, call_timeout_s: Optional[float] = None, retries_max: int = 8,
                 retry_budget: Optional[RetryBudget] = None, rng: Optional[random.Random] = None,
                 transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        super().__init__(nodes, token, name, timeout_s, write_timeout_s, connect_timeout_s, call_timeout_s,
                         retries_max, retry_budget, rng)
        self._http = httpx.AsyncClient(transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def _call(self, request: _Request[T]) -> T:
        core = self._core
        core.budget.on_request()
        deadline = core.deadline(request)
        attempt = 0
        maybe_done = False
        while True:
            index = core.node()
            verdict: _Verdict
            sent = time.monotonic()
            try:
                response = await self._http.request(request.method, core.url(index, request.path),
                                                    params=request.query, json=request.body,
                                                    headers=core.headers(deadline, request),
                                                    timeout=core.timeout(request, deadline))
            except httpx.HTTPError as error:
                verdict = core.judge_exception(request, index, error)
            else:
                verdict = core.judge_response(request, index, response)
            if isinstance(verdict, _Done):
                core.answered(request, sent)
                return request.decode(verdict.value)
            if isinstance(verdict, _Raise):
                raise verdict.error
            maybe_done = maybe_done or verdict.error.is_outcome_unknown
            attempt += 1
            pause = core.pause_s(attempt, verdict, deadline)
            if pause is None:
                raise core.give_up(verdict.error, maybe_done)
            await asyncio.sleep(pause)

    # ---- tasks ----

    async def submit(self, queue: str, payload: Any = None, priority: int = 5, idempotency_key: Optional[str] = None,
                     deadline_ms: Optional[int] = None, max_attempts: int = 3, parent_id: Optional[int] = None,
                     conversation_id: Optional[str] = None, parent_fence: Optional[int] = None) -> int:
        return await self._call(_Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms,
                                                  max_attempts, parent_id, parent_fence, conversation_id))

    async def delegate(self, parent_id: int, parent_fence: int, queue: str, payload: Any = None, priority: int = 5,
                       idempotency_key: Optional[str] = None, deadline_ms: Optional[int] = None,
                       max_attempts: int = 3, conversation_id: Optional[str] = None) -> Submitted:
        return await self._call(_Endpoints.delegate(parent_id, parent_fence, queue, payload, priority,
                                                    idempotency_key, deadline_ms, max_attempts, conversation_id))

    async def submit_batch(self, tasks: Sequence[TaskSpec]) -> list[BatchResult]:
        return await self._call(_Endpoints.submit_batch(tasks))

    async def get_task(self, task_id: int, stale: bool = False) -> Task:
        return await self._call(_Endpoints.get_task(task_id, stale))

    async def list_tasks(self, queue: Optional[str] = None, state: Optional[str] = None,
                         after: Optional[int] = None, limit: Optional[int] = None, stale: bool = False) -> TaskPage:
        return await self._call(_Endpoints.list_tasks(queue, state, after, limit, stale))

    async def cancel(self, task_id: int) -> Task:
        return await self._call(_Endpoints.cancel(task_id))

    async def wait_for_tasks(self, task_ids: Sequence[int], timeout_s: float = 60.0) -> list[Task]:
        deadline = time.monotonic() + timeout_s
        finished: dict[int, Task] = {}
        pause = 0.02
        while True:
            for task_id in task_ids:
                if task_id not in finished:
                    task = await self.get_task(task_id)
                    if task["state"] in TERMINAL_STATES:
                        finished[task_id] = task
            if len(finished) == len(set(task_ids)):
                return [finished[task_id] for task_id in task_ids]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"tasks {sorted(set(task_ids) - set(finished))} did not finish in {timeout_s} s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # ---- agents ----

    async def register(self, agent_id: str, capabilities: Sequence[str], capacity: int = 1) -> Registration:
        return self._remember(await self._call(_Endpoints.register(agent_id, capabilities, capacity)))

    async def heartbeat(self, agent_id: str, epoch: int) -> None:
        await self._call(_Endpoints.heartbeat(agent_id, epoch, self._session(agent_id, epoch)))

    async def deregister(self, agent_id: str, epoch: int) -> None:
        await self._call(_Endpoints.deregister(agent_id, epoch, self._session(agent_id, epoch)))

    async def poll(self, agent_id: str, epoch: int, max_tasks: int = 1, wait_ms: int = 0,
                   lease_ttl_ms: Optional[int] = None, queues: Optional[Sequence[str]] = None) -> list[Lease]:
        session = self._session(agent_id, epoch)
        return await self._call(_Endpoints.poll(agent_id, epoch, session, max_tasks, wait_ms, lease_ttl_ms, queues))

    async def complete(self, task_id: int, fence: int, result: Any = None) -> Task:
        return await self._call(_Endpoints.complete(task_id, fence, result))

    async def fail(self, task_id: int, fence: int, error: str, retryable: bool = True) -> Task:
        return await self._call(_Endpoints.fail(task_id, fence, error, retryable))

    async def extend(self, task_id: int, fence: int, lease_ttl_ms: Optional[int] = None) -> int:
        return await self._call(_Endpoints.extend(task_id, fence, lease_ttl_ms))

    async def wait(self, task_id: int, fence: int, on: Sequence[int], timeout_ms: int) -> list[int]:
        return await self._call(_Endpoints.wait(task_id, fence, on, timeout_ms))

    async def progress(self, task_id: int, fence: int) -> None:
        await self._call(_Endpoints.progress(task_id, fence))

    # ---- conversations ----

    async def context_get(self, conversation_id: str, stale: bool = False) -> Conversation:
        return await self._call(_Endpoints.context_get(conversation_id, stale))

    async def context_put(self, conversation_id: str, key: str, value: Any,
                          expected_version: Optional[int] = None, *, task_id: Optional[int] = None,
                          fence: Optional[int] = None) -> int:
        return await self._call(_Endpoints.context_put(conversation_id, key, value, expected_version, task_id,
                                                       fence))

    async def context_delete(self, conversation_id: str) -> None:
        await self._call(_Endpoints.context_delete(conversation_id))

    # ---- cluster, policy, health ----

    async def cluster(self) -> ClusterInfo:
        return await self._call(_Endpoints.cluster())

    async def add_member(self, node_id: int, addr: str, raft_addr: Optional[str] = None) -> dict[str, Any]:
        return await self._call(_Endpoints.add_member(node_id, addr, raft_addr))

    async def remove_member(self, node_id: int) -> dict[str, Any]:
        return await self._call(_Endpoints.remove_member(node_id))

    async def status(self) -> dict[str, Any]:
        return await self._call(_Endpoints.status())

    async def agents(self) -> list[dict[str, Any]]:
        return await self._call(_Endpoints.agents())

    async def config_get(self) -> dict[str, Any]:
        return await self._call(_Endpoints.config_get())

    async def config_set(
        self, changes: dict[str, Any], expected_version: Optional[int] = None, force: bool = False
    ) -> dict[str, Any]:
        return await self._call(_Endpoints.config_set(changes, expected_version, force))

    async def config_history(self) -> dict[str, Any]:
        return await self._call(_Endpoints.config_history())

    async def config_rollback(self, version: Optional[int] = None, force: bool = False) -> dict[str, Any]:
        return await self._call(_Endpoints.config_rollback(version, force))

    async def metrics(self) -> str:
        return await self._call(_Endpoints.metrics())

    async def ready(self, node: Optional[str] = None) -> bool:
        address = node if node is not None else self._core.nodes[self._core.node()]
        try:
            response = await self._http.get(f"http://{address}/health/ready",
                                            timeout=self._core.connect_timeout_s + 1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200
