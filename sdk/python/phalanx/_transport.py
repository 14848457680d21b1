"""What both clients share about requests: the node list and its schemes
(TLS, docs/sdk.md item 1), every endpoint as a request description, and
the judgement of each attempt: repeat it (where, after how long) or give
up (items 4 and 5).

Leaves the sending itself to `client.py` (`Client` blocks, `AsyncClient`
awaits) and the numbers of backoff and budget to `_retry.py`.
"""

from __future__ import annotations

import errno
import os
import random
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, Optional, Sequence, TypeVar, Union

import httpx

from ._errors import Overloaded, OutcomeUnknown, PhalanxError, Unavailable, error_from_answer
from ._retry import SLOW_NODE_WAIT_MAX_S, WRITE_TIMEOUT_FLOOR_S, RetryBudget, RetryPolicy, _Latency
from ._throttle import AdaptiveThrottle, Class, class_of_priority
from ._trace import current_traceparent
from .types import (
    BatchResult,
    Budget,
    ClusterInfo,
    Conversation,
    KeyLimits,
    KeyStatus,
    Lease,
    LimitRule,
    LimitsTable,
    Registration,
    Submitted,
    Task,
    TaskId,
    TaskPage,
    TaskSpec,
    Usage,
)

T = TypeVar("T")

# "safe": repeating the request is harmless, so it is retried whatever happened.
# "if_not_sent": retried only when it surely never took effect.
Retry = Literal["safe", "if_not_sent"]


# ---- nodes ----


def parse_nodes(nodes: Union[str, Sequence[str], None]) -> list[str]:
    """`host:port,host:port` or a list; `None` reads `PHALANX_NODES` (default `127.0.0.1:7070`).
    `http://` is dropped (plain HTTP is the default); `https://` is kept, so the node is spoken to over TLS;
    any other scheme is refused (docs/sdk.md, 1)."""
    if nodes is None:
        nodes = os.environ.get("PHALANX_NODES") or "127.0.0.1:7070"
    if isinstance(nodes, str):
        nodes = nodes.split(",")
    parsed = []
    for node in nodes:
        node = node.strip().rstrip("/")
        if node.startswith("http://"):
            node = node[len("http://"):]
        elif "://" in node and not node.startswith("https://"):
            raise ValueError(f"node {node}: the scheme is not http:// or https://")
        if node:
            parsed.append(node)
    if not parsed:
        raise ValueError("the node list is empty")
    return parsed


def node_address(node: str) -> str:
    """`host:port`, whatever the scheme (a `leader_hint` has none)."""
    return node[len("https://"):] if node.startswith("https://") else node


def node_url(node: str, path: str) -> str:
    """A node's URL: TLS for an `https://` node, plain HTTP otherwise; never one for the other."""
    return f"{node}{path}" if node.startswith("https://") else f"http://{node}{path}"


def tls_verify(ca_file: Optional[str]) -> Union[bool, ssl.SSLContext]:
    """How `https://` nodes are verified: against `ca_file` (or `PHALANX_CA_FILE`), else the system's roots.
    A file that cannot be read fails here, at construction, not at the first request."""
    ca_file = ca_file if ca_file is not None else os.environ.get("PHALANX_CA_FILE") or None
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"ca_file {ca_file}: cannot be used to verify nodes: {error}") from error


# ---- requests: one description, executed by either client ----


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
    # Ask for an acknowledgement without the task body (`Prefer: return=minimal`).
    minimal: bool = False


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


def _class_of(request: _Request[Any]) -> Class:
    """The throttle's class: the door's, from a submit's priority; other requests are normal."""
    priority = _door_priority(request)
    return class_of_priority(priority if priority is not None else 5)


def _segment(value: Union[str, int]) -> str:
    return urllib.parse.quote(str(value), safe="")


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


class _Endpoints:
    """Every endpoint of docs/api.md as a request description."""

    @staticmethod
    def submit(queue: str, payload: Any, priority: int, idempotency_key: Optional[str], deadline_ms: Optional[int],
               max_attempts: int, parent_id: Optional[int], parent_fence: Optional[int],
               conversation_id: Optional[str], concurrency_key: Optional[str] = None,
               cost_estimate: Optional[int] = None, budget: Optional[Budget] = None,
               traceparent: Optional[str] = None) -> _Request[TaskId]:
        # One key for every attempt of this call: the cluster keeps one task per key.
        if idempotency_key is None:
            idempotency_key = generated_idempotency_key()
        if traceparent is None:
            traceparent = current_traceparent()
        body = _drop_none({"queue": queue, "payload": payload, "priority": priority,
                           "idempotency_key": idempotency_key, "deadline_ms": deadline_ms,
                           "max_attempts": max_attempts, "parent_id": parent_id, "parent_fence": parent_fence,
                           "conversation_id": conversation_id, "concurrency_key": concurrency_key,
                           "cost_estimate": cost_estimate, "budget": dict(budget) if budget is not None else None,
                           "traceparent": traceparent})
        body["payload"] = payload
        return _Request("POST", "/v1/tasks", body, retry="safe", decode=TaskId.of, fast=True)

    @staticmethod
    def delegate(parent_id: int, parent_fence: int, queue: str, payload: Any, priority: int,
                 idempotency_key: Optional[str], deadline_ms: Optional[int], max_attempts: int,
                 conversation_id: Optional[str], concurrency_key: Optional[str] = None,
                 cost_estimate: Optional[int] = None) -> _Request[Submitted]:
        request = _Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms, max_attempts, parent_id,
                                    parent_fence, conversation_id, concurrency_key, cost_estimate)
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
    def complete(task_id: int, fence: int, result: Any, usage: Optional[Usage] = None) -> _Request[Task]:
        body: dict[str, Any] = {"fence": fence, "result": result}
        if usage is not None:
            body["usage"] = dict(usage)
        return _Request("POST", f"/v1/tasks/{int(task_id)}/complete", body, fast=True)

    @staticmethod
    def complete_many(results: Sequence[dict[str, Any]]) -> _Request[list[dict[str, Any]]]:
        """Many results in one request and one log entry, answered item by item (minimal)."""
        items = [_drop_none({"task_id": int(r["task_id"]), "fence": int(r["fence"]), "result": r.get("result"),
                             "usage": r.get("usage")}) for r in results]
        return _Request("POST", "/v1/tasks/complete", {"results": items},
                        decode=lambda answer: answer["results"], fast=True, minimal=True)

    @staticmethod
    def fail(task_id: int, fence: int, error: str, retryable: bool, usage: Optional[Usage] = None,
             minimal: bool = False) -> _Request[Task]:
        body: dict[str, Any] = {"fence": fence, "error": error, "retryable": retryable}
        if usage is not None:
            body["usage"] = dict(usage)
        return _Request("POST", f"/v1/tasks/{int(task_id)}/fail", body, fast=True, minimal=minimal)

    # ---- flow control ----

    @staticmethod
    def limits() -> _Request[LimitsTable]:
        return _Request("GET", "/v1/limits")

    @staticmethod
    def key_limits(key: str) -> _Request[KeyStatus]:
        return _Request("GET", f"/v1/limits/{_segment(key)}")

    @staticmethod
    def set_key_limits(key: str, limits: KeyLimits) -> _Request[LimitRule]:
        # A PUT of the whole entry: repeating it is harmless.
        return _Request("PUT", f"/v1/limits/{_segment(key)}", _drop_none(dict(limits)), retry="safe", fast=True)

    @staticmethod
    def delete_key_limits(key: str) -> _Request[None]:
        return _Request("DELETE", f"/v1/limits/{_segment(key)}", retry="if_not_sent", decode=lambda _: None,
                        fast=True)

    @staticmethod
    def pause(task_id: int) -> _Request[Task]:
        return _Request("POST", f"/v1/tasks/{int(task_id)}/pause", {}, retry="if_not_sent", fast=True)

    @staticmethod
    def resume(task_id: int) -> _Request[Task]:
        return _Request("POST", f"/v1/tasks/{int(task_id)}/resume", {}, retry="if_not_sent", fast=True)

    @staticmethod
    def replay(state: str, limit: int, queue: Optional[str], concurrency_key: Optional[str],
               since_ms: Optional[int]) -> _Request[list[int]]:
        body = _drop_none({"state": state, "limit": limit, "queue": queue, "concurrency_key": concurrency_key,
                           "since_ms": since_ms})
        return _Request("POST", "/v1/tasks/replay", body, retry="if_not_sent",
                        decode=lambda answer: answer["task_ids"], fast=True)

    @staticmethod
    def set_budget(task_id: int, budget: Optional[Budget]) -> _Request[list[int]]:
        body = {"budget": dict(budget) if budget is not None else None}
        return _Request("PUT", f"/v1/tasks/{int(task_id)}/budget", body, retry="safe",
                        decode=lambda answer: answer["resumed"], fast=True)

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


def failure_reason(error: Exception, timeout_s: Optional[float] = None) -> str:
    """Why an exchange failed, in a few words (docs/sdk.md, 5): the OS error underneath when there is one
    ("connection refused"), not the transport library's wrapper."""
    if isinstance(error, httpx.ConnectTimeout):
        return "connect timed out"
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s" if timeout_s is not None else "no answer in time"
    cause: Optional[BaseException] = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        if isinstance(cause, OSError) and cause.errno is not None:
            return _ERRNO_REASONS.get(cause.errno) or (cause.strerror or str(cause)).lower()
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, httpx.RemoteProtocolError):
        return f"connection closed before an answer ({error})"
    text = str(error)
    return text.lower() if text else type(error).__name__


_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


@dataclass
class _Tried:
    """The nodes one call tried, in the order first tried, with the last thing each said and how often
    it was tried (docs/sdk.md, 5)."""

    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)
    attempts: int = 0

    def record(self, node: str, reason: str) -> None:
        self.attempts += 1
        _, count = self.nodes.get(node, ("", 0))
        self.nodes[node] = (reason, count + 1)

    def __str__(self) -> str:
        plural = "" if self.attempts == 1 else "s"
        listed = "; ".join(f"{node}: {reason}" + (f" ({count} times)" if count > 1 else "")
                           for node, (reason, count) in self.nodes.items())
        return f"no node answered after {self.attempts} attempt{plural}: {listed}"


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
    # docs/sdk.md, 10: adaptive throttling per node and priority class.
    throttle: AdaptiveThrottle = field(default_factory=AdaptiveThrottle)
    throttling: bool = True

    def __post_init__(self) -> None:
        self.current = self.rng.randrange(len(self.nodes))
        self._lock = threading.Lock()
        # When each node (by index) last answered below 500 (served, or refused for the request or for load):
        # docs/sdk.md, 4, a node that answers so is slow, not lost.
        self.last_answer: dict[int, float] = {}

    def patient(self, request: _Request[Any]) -> bool:
        """docs/sdk.md, 4: whether an attempt of `request` waits past its timeout while its node answers others
        (writes, long-polls aside)."""
        return request.fast and request.wait_s == 0

    def patient_s(self, request: _Request[Any], deadline: Optional[float]) -> float:
        """How long a patient attempt may wait in all: `SLOW_NODE_WAIT_MAX_S`, within the call's deadline."""
        ceiling_s = max(SLOW_NODE_WAIT_MAX_S, self.attempt_s(request))
        if deadline is not None:
            ceiling_s = max(0.001, min(ceiling_s, deadline - time.monotonic()))
        return ceiling_s

    def answering_since(self, index: int, since: float) -> bool:
        return self.last_answer.get(index, float("-inf")) > since

    def node(self) -> int:
        return self.current % len(self.nodes)

    def url(self, index: int, path: str) -> str:
        return node_url(self.nodes[index], path)

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

    def headers(self, deadline: Optional[float], request: Optional[_Request[Any]] = None,
                attempt_s: Optional[float] = None) -> dict[str, str]:
        headers = {}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self.name:
            headers["x-phalanx-client"] = self.name
        if request is not None and request.fast:
            # The node refuses at once (changing nothing) what it cannot
            # propose within this attempt, instead of leaving the outcome open.
            attempt_end = time.monotonic() + (attempt_s if attempt_s is not None else self.attempt_s(request))
            deadline = attempt_end if deadline is None else min(deadline, attempt_end)
        if deadline is not None:
            headers["x-phalanx-deadline-ms"] = str(max(1, int((deadline - time.monotonic()) * 1000)))
        priority = _door_priority(request) if request is not None else None
        if priority is not None:
            headers["x-phalanx-priority"] = str(priority)
        if request is not None and request.minimal:
            headers["prefer"] = "return=minimal"
        return headers

    def throttled(self, request: _Request[Any], index: int) -> Optional[PhalanxError]:
        """docs/sdk.md, 10: the error of a request the client refuses itself (nothing is sent), or None."""
        if not self.throttling:
            return None
        node = self.nodes[index]
        if self.throttle.admit(node, _class_of(request), self.rng.random()):
            return None
        return Overloaded(429, "overloaded", f"throttled by the client: {node} refuses most requests of this "
                                             "class lately; nothing was sent", outcome="not_done")

    def timeout(self, request: _Request[Any], deadline: Optional[float],
                read_s: Optional[float] = None) -> httpx.Timeout:
        read_s = self.attempt_s(request) if read_s is None else read_s
        if deadline is not None:
            read_s = max(0.001, min(read_s, deadline - time.monotonic()))
        return httpx.Timeout(read_s, connect=min(self.connect_timeout_s, read_s))

    def move_on(self, failed: int, hint: Optional[str] = None) -> None:
        """After node `failed` did not serve: the hinted leader if known (whatever its scheme), else the next
        node. Only the first of several concurrent failures on the same node moves on."""
        with self._lock:
            addresses = [node_address(node) for node in self.nodes]
            if hint is not None and node_address(hint) in addresses:
                self.current = addresses.index(node_address(hint))
            elif self.node() == failed:
                self.current = failed + 1

    def judge_exception(self, request: _Request[Any], index: int, error: Exception, tried: _Tried,
                        timeout_s: Optional[float] = None) -> _Verdict:
        self.move_on(index)
        tried.record(self.nodes[index], failure_reason(error, timeout_s))
        if isinstance(error, _NOT_SENT):
            return _Retry(Unavailable(0, "unreachable", str(tried), outcome="not_done"))
        if request.retry == "if_not_sent":
            where = f"{self.nodes[index]}: {failure_reason(error, timeout_s)}"
            return _Raise(OutcomeUnknown(0, "outcome_unknown", f"the request may have taken effect: {where}"))
        return _Retry(Unavailable(0, "no_answer", str(tried), outcome="unknown"))

    def judge_response(self, request: _Request[Any], index: int, response: httpx.Response,
                       tried: _Tried) -> _Verdict:
        status = response.status_code
        if status < 500:
            # A 5xx (not ready, no leader) says the node cannot make progress: no reason to wait on it longer.
            self.last_answer[index] = time.monotonic()
        if 200 <= status < 300:
            self.throttle.answered(self.nodes[index], _class_of(request), True)
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
        # Only a refusal for load counts against the node (the book's "accepts").
        refused_for_load = status in (429, 503) and error.code in ("overloaded", "rate_limited")
        self.throttle.answered(self.nodes[index], _class_of(request), not refused_for_load)
        tried.record(self.nodes[index], f"{status} {error.code}")
        # docs/sdk.md, 4: the code's table decides.
        if not error.transient:
            return _Raise(error)
        if request.retry == "if_not_sent" and error.is_outcome_unknown:
            return _Raise(OutcomeUnknown(status, error.code, error.message, error.leader_hint, error.retry_after_ms))
        wait_s = (error.retry_after_ms or 0) / 1000
        if status == 429:
            return _Retry(error, wait_s, failover=False)
        self.move_on(index, error.leader_hint)
        return _Retry(error, wait_s)

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


__all__ = ["Retry", "generated_idempotency_key", "node_address", "node_url", "parse_nodes", "tls_verify"]
