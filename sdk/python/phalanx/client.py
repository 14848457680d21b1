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

The rules are the numbered items of docs/sdk.md, which the Rust SDK follows
too. This module holds the two clients; the rest lives by concern:
`types.py` (the shapes of the API), `_errors.py` (the error-code table and
the exceptions), `_retry.py` (backoff, budget, write timeout) and
`_transport.py` (nodes and TLS, endpoints, the judgement of each attempt).
Every name that was importable from here still is.

Leaves to others: what to do with the answers (the agent runtime in
`agent.py`).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import Any, Awaitable, Optional, Sequence, Union

import httpx

from . import _pool
from ._errors import (
    ERROR_CODES,
    OUTCOME_UNKNOWN_CODES,
    Conflict,
    InvalidRequest,
    NotFound,
    Outcome,
    OutcomeUnknown,
    Overloaded,
    PhalanxError,
    Superseded,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    _parse_retry_after_ms,
    error_from_answer,
)
from ._retry import WRITE_TIMEOUT_FLOOR_S, RetryBudget, RetryPolicy, _Latency
from ._transport import (
    Retry,
    T,
    _Core,
    _Done,
    _door_priority,
    _Endpoints,
    _Raise,
    _Request,
    _Retry,
    _Tried,
    _Verdict,
    generated_idempotency_key,
    node_url,
    parse_nodes,
    tls_verify,
)
from .types import (
    TERMINAL_STATES,
    BatchResult,
    Budget,
    KeyLimits,
    KeyStatus,
    LimitRule,
    LimitsTable,
    Usage,
    Child,
    ClusterInfo,
    ClusterNode,
    ContextEntry,
    Conversation,
    ErrorBody,
    Lease,
    LeaseInfo,
    Registration,
    Submitted,
    Task,
    TaskId,
    TaskPage,
    TaskSpec,
    TaskState,
    payload_hash,
)


# Requests a client has in flight at once (docs/sdk.md, 11); past it a call waits in the client's own queue
# (a semaphore: constant work per request). The wait counts against the call's budget (`call_timeout_s`),
# not against an attempt's timeout: it is the client's queue, not the node's slowness. Long-polls have slots
# of their own, so that waiting agents sharing a client cannot hold every slot while their polls wait. The
# asyncio client keeps its connections in a pool of its own (`_pool.py`): httpcore's re-examines every
# connection and every queued request on each request started or ended, which at 256 in flight cost 9.4 ms
# of client CPU per task. The blocking client keeps httpx's pool, sized to the same bound.
REQUESTS_IN_FLIGHT_MAX = 64
POLLS_IN_FLIGHT_MAX = 16
_CONNECTIONS_MAX = REQUESTS_IN_FLIGHT_MAX + POLLS_IN_FLIGHT_MAX
_LIMITS = httpx.Limits(max_connections=_CONNECTIONS_MAX, max_keepalive_connections=_CONNECTIONS_MAX)


def _no_slot() -> PhalanxError:
    return Overloaded(429, "overloaded", f"the client's {REQUESTS_IN_FLIGHT_MAX} requests in flight left no room "
                                         "before the call's deadline; nothing was sent", outcome="not_done")


class _ClientBase:
    def __init__(self, nodes: Union[str, Sequence[str], None], token: Optional[str], name: Optional[str],
                 timeout_s: float, write_timeout_s: float, connect_timeout_s: float, call_timeout_s: Optional[float],
                 retries_max: int, retry_budget: Optional[RetryBudget], rng: Optional[random.Random],
                 ca_file: Optional[str]) -> None:
        # docs/sdk.md, 1: `https://` nodes get TLS, verified against `ca_file` (or PHALANX_CA_FILE).
        self._verify = tls_verify(ca_file)
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

    @property
    def throttling(self) -> bool:
        """Whether client-side adaptive throttling may refuse requests locally (docs/sdk.md, 10; on by default)."""
        return self._core.throttling

    @throttling.setter
    def throttling(self, value: bool) -> None:
        self._core.throttling = value


class Client(_ClientBase):
    """Blocking client. `nodes`: a list or `host:port,host:port` (default `PHALANX_NODES`);
    `token`: bearer token (default `PHALANX_TOKEN`); `name`: the `X-Phalanx-Client` rate-limit key;
    `timeout_s`: per attempt of reads and administrative calls; `write_timeout_s`: per attempt of task
    and agent writes (a long-poll adds its wait), after which the next node is tried;
    `call_timeout_s`: a budget for one call including its retries (sent as `X-Phalanx-Deadline-Ms`);
    `ca_file`: the CA certificates `https://` nodes are verified against (default `PHALANX_CA_FILE`, else the
    system's roots). A node given as `https://` is always spoken to over TLS (docs/sdk.md, 1)."""

    def __init__(self, nodes: Union[str, Sequence[str], None] = None, token: Optional[str] = None,
                 name: Optional[str] = None, *, timeout_s: float = 15.0, write_timeout_s: float = 0.5,
                 connect_timeout_s: float = 1.0, call_timeout_s: Optional[float] = None, retries_max: int = 8,
                 retry_budget: Optional[RetryBudget] = None, rng: Optional[random.Random] = None,
                 transport: Optional[httpx.BaseTransport] = None, ca_file: Optional[str] = None) -> None:
        super().__init__(nodes, token, name, timeout_s, write_timeout_s, connect_timeout_s, call_timeout_s,
                         retries_max, retry_budget, rng, ca_file)
        self._http = httpx.Client(transport=transport, verify=self._verify, limits=_LIMITS)
        self._slots = threading.BoundedSemaphore(REQUESTS_IN_FLIGHT_MAX)
        self._poll_slots = threading.BoundedSemaphore(POLLS_IN_FLIGHT_MAX)

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
        tried = _Tried()
        while True:
            index = core.node()
            verdict: _Verdict
            refused = core.throttled(request, index)
            if refused is not None:
                raise core.give_up(refused, maybe_done)
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            slots = self._poll_slots if request.wait_s > 0 else self._slots
            if not slots.acquire(timeout=wait_s):
                raise core.give_up(_no_slot(), maybe_done)
            try:
                sent = time.monotonic()
                timeout = core.timeout(request, deadline)
                try:
                    response = self._http.request(request.method, core.url(index, request.path),
                                                  params=request.query, json=request.body,
                                                  headers=core.headers(deadline, request), timeout=timeout)
                except httpx.HTTPError as error:
                    verdict = core.judge_exception(request, index, error, tried, timeout.read)
                else:
                    verdict = core.judge_response(request, index, response, tried)
            finally:
                slots.release()
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
               conversation_id: Optional[str] = None, parent_fence: Optional[int] = None, *,
               concurrency_key: Optional[str] = None, cost_estimate: Optional[int] = None,
               budget: Optional[Budget] = None, traceparent: Optional[str] = None) -> TaskId:
        """Submits a task; returns its id, a `TaskId` (an `int`) whose `deduplicated` says whether
        `idempotency_key` named an existing task (then nothing new was created). `concurrency_key` counts it under
        that key's limits, `cost_estimate` (tokens) against the key's `tokens_per_minute` while leased; `budget`
        (`{"tokens_max": ..., "cost_max": ...}`) covers the whole tree a root task starts. `traceparent` (W3C
        Trace Context; by default the current OpenTelemetry span's, if `opentelemetry` is installed) puts the
        task's spans in the caller's trace; the answer's `traceparent` is the one the task keeps."""
        return self._call(_Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms, max_attempts,
                                            parent_id, parent_fence, conversation_id, concurrency_key,
                                            cost_estimate, budget, traceparent))

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

    def complete(self, task_id: int, fence: int, result: Any = None, usage: Optional[Usage] = None) -> Task:
        """`usage` (`{"tokens_in", "tokens_out", "cost"}`): what the attempt consumed, counted against its key's
        `tokens_per_minute` and its tree's budget."""
        return self._call(_Endpoints.complete(task_id, fence, result, usage))

    def complete_many(self, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Reports many results (`{task_id, fence, result, usage?}` each) in one request and one log entry; the
        answer has one slot per result, in order: `{task_id, ok: True, state}` or `{task_id?, error: {code,
        message}}`, that result's own refusal (a stale fence is `superseded` for that item alone)."""
        return self._call(_Endpoints.complete_many(results))

    def fail(self, task_id: int, fence: int, error: str, retryable: bool = True,
             usage: Optional[Usage] = None) -> Task:
        return self._call(_Endpoints.fail(task_id, fence, error, retryable, usage))

    def extend(self, task_id: int, fence: int, lease_ttl_ms: Optional[int] = None) -> int:
        """Returns the new `valid_until_ms` (log time)."""
        return self._call(_Endpoints.extend(task_id, fence, lease_ttl_ms))

    def wait(self, task_id: int, fence: int, on: Sequence[int], timeout_ms: int) -> list[int]:
        """Declares that the task waits on others; returns those still pending (422 `deadlock` on a cycle)."""
        return self._call(_Endpoints.wait(task_id, fence, on, timeout_ms))

    def progress(self, task_id: int, fence: int) -> None:
        self._call(_Endpoints.progress(task_id, fence))

    # ---- flow control ----

    def limits(self) -> LimitsTable:
        """The limits table and every concurrency key in use."""
        return self._call(_Endpoints.limits())

    def key_limits(self, key: str) -> KeyStatus:
        """The limits in force for `key` and what it uses now (404 `not_found` for a key with neither)."""
        return self._call(_Endpoints.key_limits(key))

    def set_key_limits(self, key: str, limits: KeyLimits) -> LimitRule:
        """Sets (replaces) the limits of a key, a wildcard (`tenant:*`) or `*`."""
        return self._call(_Endpoints.set_key_limits(key, limits))

    def delete_key_limits(self, key: str) -> None:
        self._call(_Endpoints.delete_key_limits(key))

    def pause(self, task_id: int) -> Task:
        """Pauses a task: a pending one at once, a leased one when its lease ends without a result."""
        return self._call(_Endpoints.pause(task_id))

    def resume(self, task_id: int) -> Task:
        return self._call(_Endpoints.resume(task_id))

    def replay(self, state: str, limit: int, queue: Optional[str] = None, concurrency_key: Optional[str] = None,
               since_ms: Optional[int] = None) -> list[int]:
        """Moves up to `limit` `dead` or `paused` tasks matching the filter back to pending; returns their ids."""
        return self._call(_Endpoints.replay(state, limit, queue, concurrency_key, since_ms))

    def set_budget(self, task_id: int, budget: Optional[Budget]) -> list[int]:
        """Sets (or with `None` removes) a root task's budget; returns the budget-paused tasks it resumed."""
        return self._call(_Endpoints.set_budget(task_id, budget))

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
        address = parse_nodes([node])[0] if node is not None else self._core.nodes[self._core.node()]
        try:
            response = self._http.get(node_url(address, "/health/ready"), timeout=self._core.connect_timeout_s + 1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


class _GaveUp(Exception):
    """A patient attempt left its node: it answered nothing else for a whole period."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no answer within {waited_s:g} s")
        self.waited_s = waited_s


async def _patiently(sending: Awaitable[httpx.Response], core: _Core, index: int, period_s: float,
                     ceiling_s: float) -> httpx.Response:
    """docs/sdk.md, 4: waits for an attempt's answer while its node keeps answering other requests: each time
    `period_s` (the adaptive write timeout) passes, another period if the node answered anything during the last
    one, up to `ceiling_s` in all; otherwise `_GaveUp` (and the request is abandoned)."""
    task = asyncio.ensure_future(sending)
    start = period_start = time.monotonic()
    try:
        while True:
            period_end = min(period_start + period_s, start + ceiling_s)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, period_end - time.monotonic()))
            if done:
                return task.result()
            if period_end >= start + ceiling_s or not core.answering_since(index, period_start):
                raise _GaveUp(round(period_end - start, 3))
            period_start = period_end
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class AsyncClient(_ClientBase):
    """Asyncio client with the same methods, arguments and semantics as `Client`."""

    def __init__(self, nodes: Union[str, Sequence[str], None] = None, token: Optional[str] = None,
                 name: Optional[str] = None, *, timeout_s: float = 15.0, write_timeout_s: float = 0.5,
                 connect_timeout_s: float = 1.0, call_timeout_s: Optional[float] = None, retries_max: int = 8,
                 retry_budget: Optional[RetryBudget] = None, rng: Optional[random.Random] = None,
                 transport: Optional[httpx.AsyncBaseTransport] = None, ca_file: Optional[str] = None) -> None:
        super().__init__(nodes, token, name, timeout_s, write_timeout_s, connect_timeout_s, call_timeout_s,
                         retries_max, retry_budget, rng, ca_file)
        if transport is None and _pool.available():
            transport = _pool.AsyncPool(self._verify, _CONNECTIONS_MAX)
        self._http = httpx.AsyncClient(transport=transport, verify=self._verify, limits=_LIMITS)
        self._slots = asyncio.BoundedSemaphore(REQUESTS_IN_FLIGHT_MAX)
        self._poll_slots = asyncio.BoundedSemaphore(POLLS_IN_FLIGHT_MAX)

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
        tried = _Tried()
        while True:
            index = core.node()
            verdict: _Verdict
            refused = core.throttled(request, index)
            if refused is not None:
                raise core.give_up(refused, maybe_done)
            slots = self._poll_slots if request.wait_s > 0 else self._slots
            try:
                if deadline is None:
                    await slots.acquire()
                else:
                    await asyncio.wait_for(slots.acquire(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise core.give_up(_no_slot(), maybe_done) from None
            try:
                sent = time.monotonic()
                patient = core.patient(request)
                period_s = core.attempt_s(request)
                ceiling_s = core.patient_s(request, deadline) if patient else None
                timeout = core.timeout(request, deadline, ceiling_s)
                waited_s: Optional[float] = timeout.read
                try:
                    sending = self._http.request(request.method, core.url(index, request.path),
                                                 params=request.query, json=request.body,
                                                 headers=core.headers(deadline, request, ceiling_s), timeout=timeout)
                    if ceiling_s is None:
                        response = await sending
                    else:
                        response = await _patiently(sending, core, index, period_s, ceiling_s)
                except _GaveUp as gave_up:
                    waited_s = gave_up.waited_s
                    verdict = core.judge_exception(request, index, httpx.ReadTimeout(str(gave_up)), tried, waited_s)
                except httpx.HTTPError as error:
                    verdict = core.judge_exception(request, index, error, tried, waited_s)
                else:
                    verdict = core.judge_response(request, index, response, tried)
            finally:
                slots.release()
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
                     conversation_id: Optional[str] = None, parent_fence: Optional[int] = None, *,
                     concurrency_key: Optional[str] = None, cost_estimate: Optional[int] = None,
                     budget: Optional[Budget] = None, traceparent: Optional[str] = None) -> TaskId:
        return await self._call(_Endpoints.submit(queue, payload, priority, idempotency_key, deadline_ms,
                                                  max_attempts, parent_id, parent_fence, conversation_id,
                                                  concurrency_key, cost_estimate, budget, traceparent))

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

    async def complete(self, task_id: int, fence: int, result: Any = None, usage: Optional[Usage] = None) -> Task:
        return await self._call(_Endpoints.complete(task_id, fence, result, usage))

    async def complete_many(self, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """As `Client.complete_many`."""
        return await self._call(_Endpoints.complete_many(results))

    async def fail_minimal(self, task_id: int, fence: int, error: str, retryable: bool = True,
                           usage: Optional[Usage] = None) -> None:
        """A failure asking for an acknowledgement without the task (`Prefer: return=minimal`)."""
        await self._call(_Endpoints.fail(task_id, fence, error, retryable, usage, minimal=True))

    async def fail(self, task_id: int, fence: int, error: str, retryable: bool = True,
                   usage: Optional[Usage] = None) -> Task:
        return await self._call(_Endpoints.fail(task_id, fence, error, retryable, usage))

    # ---- flow control ----

    async def limits(self) -> LimitsTable:
        return await self._call(_Endpoints.limits())

    async def key_limits(self, key: str) -> KeyStatus:
        return await self._call(_Endpoints.key_limits(key))

    async def set_key_limits(self, key: str, limits: KeyLimits) -> LimitRule:
        return await self._call(_Endpoints.set_key_limits(key, limits))

    async def delete_key_limits(self, key: str) -> None:
        await self._call(_Endpoints.delete_key_limits(key))

    async def pause(self, task_id: int) -> Task:
        return await self._call(_Endpoints.pause(task_id))

    async def resume(self, task_id: int) -> Task:
        return await self._call(_Endpoints.resume(task_id))

    async def replay(self, state: str, limit: int, queue: Optional[str] = None,
                     concurrency_key: Optional[str] = None, since_ms: Optional[int] = None) -> list[int]:
        return await self._call(_Endpoints.replay(state, limit, queue, concurrency_key, since_ms))

    async def set_budget(self, task_id: int, budget: Optional[Budget]) -> list[int]:
        return await self._call(_Endpoints.set_budget(task_id, budget))

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
        address = parse_nodes([node])[0] if node is not None else self._core.nodes[self._core.node()]
        try:
            response = await self._http.get(node_url(address, "/health/ready"),
                                            timeout=self._core.connect_timeout_s + 1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


# The names this module exported before it was split by concern, importable from here as before.
__all__ = [
    "AsyncClient", "BatchResult", "Child", "Client", "ClusterInfo", "ClusterNode", "Conflict", "ContextEntry",
    "Conversation", "ERROR_CODES", "ErrorBody", "InvalidRequest", "Lease", "LeaseInfo", "NotFound",
    "OUTCOME_UNKNOWN_CODES", "Outcome", "OutcomeUnknown", "Overloaded", "PhalanxError", "Registration", "Retry",
    "RetryBudget", "RetryPolicy", "Submitted", "Superseded", "TERMINAL_STATES", "Task", "TaskId", "TaskPage",
    "TaskSpec", "TaskState", "TooLarge", "Unauthorized", "Unavailable", "Unprocessable", "WRITE_TIMEOUT_FLOOR_S",
    "_Latency", "_Request", "_door_priority", "_parse_retry_after_ms", "error_from_answer",
    "generated_idempotency_key", "parse_nodes", "payload_hash",
]
