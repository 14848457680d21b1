"""HTTP client for Phalanx: any node of a node list, failover on error,
exponential backoff with full jitter, Retry-After honoured, and a retry budget
(retries at most about a tenth of requests) so a struggling cluster is not
buried under retries.

A write whose outcome is unknown (timed out after it was sent) is retried only
when repeating it is harmless (reads, fenced results, keyed submits); otherwise
`Unknown` is raised and the caller decides.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import httpx

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
RETRIES_MAX = 8


class PhalanxError(Exception):
    """The cluster refused the request; nothing changed."""

    def __init__(self, status: int, code: str, message: str, leader_hint: Optional[str] = None,
                 retry_after_ms: Optional[int] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.leader_hint = leader_hint
        self.retry_after_ms = retry_after_ms

    @property
    def is_superseded(self) -> bool:
        return self.code == "superseded"


class Unavailable(Exception):
    """No node could be reached."""


class Unknown(Exception):
    """The request may or may not have taken effect."""


def backoff(attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 16))))


class RetryBudget:
    """Every request earns 0.1 token, a retry spends one, at most `tokens_max`."""

    def __init__(self, tokens_max: float = 10.0) -> None:
        self.tokens = tokens_max
        self.tokens_max = tokens_max
        self._lock = threading.Lock()

    def on_request(self) -> None:
        with self._lock:
            self.tokens = min(self.tokens_max, self.tokens + 0.1)

    def try_retry(self) -> bool:
        with self._lock:
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


def parse_nodes(nodes: str | Sequence[str] | None) -> list[str]:
    if nodes is None:
        nodes = os.environ.get("PHALANX_NODES", "127.0.0.1:7070")
    if isinstance(nodes, str):
        nodes = nodes.split(",")
    parsed = [n.strip().removeprefix("http://") for n in nodes if n.strip()]
    if not parsed:
        raise ValueError("the node list is empty")
    return parsed


@dataclass
class _Plan:
    """One request: method, path, body, and whether repeating it is harmless."""

    method: str
    path: str
    body: Optional[dict[str, Any]] = None
    safe: bool = True
    timeout_s: float = 15.0


class _Core:
    """State shared by the sync and async clients: nodes, token, budget."""

    def __init__(self, nodes: str | Sequence[str] | None, token: Optional[str], name: Optional[str]) -> None:
        self.nodes = parse_nodes(nodes)
        self.current = random.randrange(len(self.nodes))
        self.token = token if token is not None else os.environ.get("PHALANX_TOKEN")
        self.name = name
        self.budget = RetryBudget()

    def url(self, path: str) -> str:
        return f"http://{self.nodes[self.current % len(self.nodes)]}{path}"

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self.name:
            headers["x-phalanx-client"] = self.name
        return headers

    def move_on(self, hint: Optional[str] = None) -> None:
        if hint and hint in self.nodes:
            self.current = self.nodes.index(hint)
        else:
            self.current += 1

    def judge(self, plan: _Plan, response: Optional[httpx.Response], error: Optional[Exception]):
        """Returns ("done", value) or ("retry", exception, wait_s) or ("raise", exception)."""
        if error is not None:
            self.move_on()
            if isinstance(error, httpx.ConnectError):
                return ("retry", Unavailable(str(error)), None)
            if not plan.safe:
                return ("raise", Unknown(str(error)))
            return ("retry", Unavailable(str(error)), None)
        assert response is not None
        if 200 <= response.status_code < 300:
            return ("done", response.json())
        try:
            body = response.json().get("error", {})
        except ValueError:
            body = {}
        api = PhalanxError(response.status_code, body.get("code", "unknown"), body.get("message", response.text),
                           body.get("leader_hint"), body.get("retry_after_ms"))
        wait = api.retry_after_ms / 1000 if api.retry_after_ms else None
        if response.status_code == 429:
            return ("retry", api, wait)
        if response.status_code == 503:
            if api.code in ("no_leader", "not_leader", "not_ready", "overloaded") or plan.safe:
                self.move_on(api.leader_hint)
                return ("retry", api, wait)
            return ("raise", Unknown(str(api)))
        return ("raise", api)


def _task_query(queue: Optional[str], state: Optional[str], after: Optional[int], limit: Optional[int]) -> str:
    parts = []
    for key, value in (("queue", queue), ("state", state), ("after", after), ("limit", limit)):
        if value is not None:
            parts.append(f"{key}={value}")
    return "/v1/tasks?" + "&".join(parts)


class _Api:
    """Every endpoint as a plan; the sync and async clients execute them."""

    @staticmethod
    def submit(queue: str, payload: Any, priority: int = 5, idempotency_key: Optional[str] = None,
               deadline_ms: Optional[int] = None, max_attempts: int = 3, parent_id: Optional[int] = None,
               parent_fence: Optional[int] = None, conversation_id: Optional[str] = None) -> _Plan:
        body: dict[str, Any] = {"queue": queue, "payload": payload, "priority": priority, "max_attempts": max_attempts}
        for key, value in (("idempotency_key", idempotency_key), ("deadline_ms", deadline_ms),
                           ("parent_id", parent_id), ("parent_fence", parent_fence),
                           ("conversation_id", conversation_id)):
            if value is not None:
                body[key] = value
        return _Plan("POST", "/v1/tasks", body, safe=idempotency_key is not None)


class Client:
    """Synchronous client."""

    def __init__(self, nodes: str | Sequence[str] | None = None, token: Optional[str] = None,
                 name: Optional[str] = None) -> None:
        self._core = _Core(nodes, token, name)
        self._http = httpx.Client(timeout=15.0)

    def close(self) -> None:
        self._http.close()

    def _run(self, plan: _Plan) -> Any:
        core = self._core
        core.budget.on_request()
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = self._http.request(plan.method, core.url(plan.path), json=plan.body,
                                              headers=core.headers(), timeout=plan.timeout_s)
            except httpx.HTTPError as exc:
                error = exc
            verdict = core.judge(plan, response, error)
            if verdict[0] == "done":
                return verdict[1]
            if verdict[0] == "raise":
                raise verdict[1]
            attempt += 1
            if attempt > RETRIES_MAX or not core.budget.try_retry():
                raise verdict[1]
            time.sleep(max(backoff(attempt), min(verdict[2] or 0, BACKOFF_CAP_S)))

    def submit(self, queue: str, payload: Any = None, **options: Any) -> int:
        return self._run(_Api.submit(queue, payload, **options))["task_id"]

    def submit_batch(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        safe = all("idempotency_key" in t for t in tasks)
        return self._run(_Plan("POST", "/v1/tasks/batch", {"tasks": tasks}, safe=safe))["results"]

    def get_task(self, task_id: int, stale: bool = False) -> dict[str, Any]:
        return self._run(_Plan("GET", f"/v1/tasks/{task_id}" + ("?stale=true" if stale else "")))

    def list_tasks(self, queue: Optional[str] = None, state: Optional[str] = None, after: Optional[int] = None,
                   limit: Optional[int] = None) -> dict[str, Any]:
        return self._run(_Plan("GET", _task_query(queue, state, after, limit)))

    def cancel(self, task_id: int) -> dict[str, Any]:
        return self._run(_Plan("POST", f"/v1/tasks/{task_id}/cancel", {}))

    def register(self, agent_id: str, capabilities: Sequence[str], capacity: int = 1) -> dict[str, Any]:
        body = {"agent_id": agent_id, "capabilities": list(capabilities), "capacity": capacity}
        return self._run(_Plan("POST", "/v1/agents/register", body))

    def heartbeat(self, agent_id: str, epoch: int) -> None:
        self._run(_Plan("POST", f"/v1/agents/{agent_id}/heartbeat", {"epoch": epoch}))

    def deregister(self, agent_id: str, epoch: int) -> None:
        self._run(_Plan("POST", f"/v1/agents/{agent_id}/deregister", {"epoch": epoch}))

    def poll(self, agent_id: str, epoch: int, max_tasks: int = 1, wait_ms: int = 0,
             lease_ttl_ms: Optional[int] = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"epoch": epoch, "max_tasks": max_tasks, "wait_ms": wait_ms}
        if lease_ttl_ms is not None:
            body["lease_ttl_ms"] = lease_ttl_ms
        plan = _Plan("POST", f"/v1/agents/{agent_id}/poll", body, timeout_s=15.0 + wait_ms / 1000)
        return self._run(plan)["leases"]

    def complete(self, task_id: int, fence: int, result: Any) -> dict[str, Any]:
        return self._run(_Plan("POST", f"/v1/tasks/{task_id}/complete", {"fence": fence, "result": result}))

    def fail(self, task_id: int, fence: int, error: str, retryable: bool = True) -> dict[str, Any]:
        body = {"fence": fence, "error": error, "retryable": retryable}
        return self._run(_Plan("POST", f"/v1/tasks/{task_id}/fail", body))

    def extend(self, task_id: int, fence: int, lease_ttl_ms: Optional[int] = None) -> int:
        body: dict[str, Any] = {"fence": fence}
        if lease_ttl_ms is not None:
            body["lease_ttl_ms"] = lease_ttl_ms
        return self._run(_Plan("POST", f"/v1/tasks/{task_id}/extend", body))["valid_until_ms"]

    def context_get(self, conversation_id: str) -> dict[str, Any]:
        return self._run(_Plan("GET", f"/v1/conversations/{conversation_id}"))

    def context_put(self, conversation_id: str, key: str, value: Any, expected_version: Optional[int] = None) -> int:
        body: dict[str, Any] = {"value": value}
        if expected_version is not None:
            body["expected_version"] = expected_version
        return self._run(_Plan("PUT", f"/v1/conversations/{conversation_id}/{key}", body))["version"]

    def cluster(self) -> dict[str, Any]:
        return self._run(_Plan("GET", "/v1/cluster"))


class AsyncClient:
    """Asyncio client with the same methods and semantics as `Client`."""

    def __init__(self, nodes: str | Sequence[str] | None = None, token: Optional[str] = None,
                 name: Optional[str] = None) -> None:
        self._core = _Core(nodes, token, name)
        self._http = httpx.AsyncClient(timeout=15.0)
        self.retries_max = RETRIES_MAX

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, plan: _Plan) -> Any:
        core = self._core
        core.budget.on_request()
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = await self._http.request(plan.method, core.url(plan.path), json=plan.body,
                                                    headers=core.headers(), timeout=plan.timeout_s)
            except httpx.HTTPError as exc:
                error = exc
            verdict = core.judge(plan, response, error)
            if verdict[0] == "done":
                return verdict[1]
            if verdict[0] == "raise":
                raise verdict[1]
            attempt += 1
            if attempt > self.retries_max or not core.budget.try_retry():
                raise verdict[1]
            await asyncio.sleep(max(backoff(attempt), min(verdict[2] or 0, BACKOFF_CAP_S)))

    async def submit(self, queue: str, payload: Any = None, **options: Any) -> int:
        return (await self._run(_Api.submit(queue, payload, **options)))["task_id"]

    async def get_task(self, task_id: int, stale: bool = False) -> dict[str, Any]:
        return await self._run(_Plan("GET", f"/v1/tasks/{task_id}" + ("?stale=true" if stale else "")))

    async def list_tasks(self, queue: Optional[str] = None, state: Optional[str] = None,
                         after: Optional[int] = None, limit: Optional[int] = None) -> dict[str, Any]:
        return await self._run(_Plan("GET", _task_query(queue, state, after, limit)))

    async def register(self, agent_id: str, capabilities: Sequence[str], capacity: int = 1) -> dict[str, Any]:
        body = {"agent_id": agent_id, "capabilities": list(capabilities), "capacity": capacity}
        return await self._run(_Plan("POST", "/v1/agents/register", body))

    async def heartbeat(self, agent_id: str, epoch: int) -> None:
        await self._run(_Plan("POST", f"/v1/agents/{agent_id}/heartbeat", {"epoch": epoch}))

    async def deregister(self, agent_id: str, epoch: int) -> None:
        await self._run(_Plan("POST", f"/v1/agents/{agent_id}/deregister", {"epoch": epoch}))

    async def poll(self, agent_id: str, epoch: int, max_tasks: int = 1, wait_ms: int = 0,
                   lease_ttl_ms: Optional[int] = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"epoch": epoch, "max_tasks": max_tasks, "wait_ms": wait_ms}
        if lease_ttl_ms is not None:
            body["lease_ttl_ms"] = lease_ttl_ms
        plan = _Plan("POST", f"/v1/agents/{agent_id}/poll", body, timeout_s=15.0 + wait_ms / 1000)
        return (await self._run(plan))["leases"]

    async def complete(self, task_id: int, fence: int, result: Any) -> dict[str, Any]:
        return await self._run(_Plan("POST", f"/v1/tasks/{task_id}/complete", {"fence": fence, "result": result}))

    async def fail(self, task_id: int, fence: int, error: str, retryable: bool = True) -> dict[str, Any]:
        body = {"fence": fence, "error": error, "retryable": retryable}
        return await self._run(_Plan("POST", f"/v1/tasks/{task_id}/fail", body))

    async def extend(self, task_id: int, fence: int, lease_ttl_ms: Optional[int] = None) -> int:
        body: dict[str, Any] = {"fence": fence}
        if lease_ttl_ms is not None:
            body["lease_ttl_ms"] = lease_ttl_ms
        return (await self._run(_Plan("POST", f"/v1/tasks/{task_id}/extend", body)))["valid_until_ms"]

    async def wait(self, task_id: int, fence: int, on: Sequence[int], timeout_ms: int) -> list[int]:
        body = {"fence": fence, "on": list(on), "timeout_ms": timeout_ms}
        return (await self._run(_Plan("POST", f"/v1/tasks/{task_id}/wait", body)))["pending"]

    async def context_get(self, conversation_id: str) -> dict[str, Any]:
        return await self._run(_Plan("GET", f"/v1/conversations/{conversation_id}"))

    async def context_put(self, conversation_id: str, key: str, value: Any,
                          expected_version: Optional[int] = None) -> int:
        body: dict[str, Any] = {"value": value}
        if expected_version is not None:
            body["expected_version"] = expected_version
        return (await self._run(_Plan("PUT", f"/v1/conversations/{conversation_id}/{key}", body)))["version"]

    async def await_tasks(self, ids: Sequence[int], timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        done: dict[int, dict[str, Any]] = {}
        delay = 0.02
        while True:
            for task_id in ids:
                if task_id not in done:
                    task = await self.get_task(task_id)
                    if task["state"] not in ("pending", "leased"):
                        done[task_id] = task
            if len(done) == len(ids):
                return [done[i] for i in ids]
            if time.monotonic() > deadline:
                raise Unknown(f"tasks {list(ids)} did not finish within {timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
