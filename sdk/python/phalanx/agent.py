"""The agent runtime: register, heartbeat, long-poll through any node, run
the handler with bounded concurrency, extend long leases, report results
under the lease's fence, and stop gracefully.

Fencing on the agent side: a lease already past its local deadline (poll
sent + `lease_ttl_ms` - a safety margin) is never started, and a lease older
than one already seen for the same task is refused.

Autonomy (DESIGN.md, "Agent autonomy"): when no node answers for
`orchestrator_timeout_s`, the agent goes `autonomous`: it finishes the tasks
it holds and stores their results in the durable outbox (`outbox.py`), and it
may run a declared autonomous handler within an autonomy budget. When a node
answers again it is `reconciling`: each stored result is sent with its fence
and removed only after a definite answer (accepted, superseded, rejected);
then it is `connected` again. An agent that starts with a non-empty outbox
delivers it before it registers.

The rules (lease margin, fence memory, state, autonomy budget, outbox) are
the numbered items of docs/sdk.md, which the Rust SDK follows too; the
decisions are the pure functions `lease_margin_s`, `lease_startable`,
`agent_state` and `FenceMemory`.

Execution is at least once; the cluster accepts exactly one result per task.
Leaves to `client.py` the transport, failover and retries of each request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import inspect
import json
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Literal, Optional, Sequence, TypeVar, Union, overload

from ._batch import CompleteBatcher
from ._errors import NotFound, PhalanxError
from .client import AsyncClient
from .types import Child, ContextEntry, Lease, Submitted, Task, Usage
from .outbox import OUTBOX_ENTRIES_MAX, Outbox, OutboxEntry, OutboxFull

log = logging.getLogger("phalanx.agent")

AgentState = Literal["connected", "autonomous", "reconciling"]
Answer = Literal["accepted", "superseded", "rejected"]

FENCES_REMEMBERED_MAX = 10_000
RECENT_OUTCOMES_MAX = 1_000
STATES_KEPT_MAX = 100

T = TypeVar("T")


class TaskFailed(Exception):
    """Raise from a handler to fail the task; `retryable=False` fails it for good."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass
class Stats:
    """Counters of one agent object (not persisted)."""

    leases_received: int = 0
    tasks_started: int = 0
    # Definite answers to reports, direct or from the outbox.
    completed: int = 0
    failed: int = 0
    superseded: int = 0
    rejected: int = 0
    # Leases not started: past their local deadline, or older than a fence already seen.
    refused_expired: int = 0
    refused_stale_fence: int = 0
    # Leases found lost while the handler ran (an extension was refused).
    leases_lost: int = 0
    outboxed: int = 0
    outbox_dropped: int = 0
    reconciled: int = 0
    registrations: int = 0
    autonomous_periods: int = 0
    autonomous_runs: int = 0


@dataclass(frozen=True)
class ReportOutcome:
    """The cluster's definite answer to one reported result."""

    task_id: int
    fence: int
    kind: Literal["complete", "fail"]
    answer: Answer
    code: Optional[str]
    via_outbox: bool


class FenceMemory:
    """The highest fence seen per task id, for at most `entries_max` tasks (least recently seen forgotten first)."""

    def __init__(self, entries_max: int = FENCES_REMEMBERED_MAX) -> None:
        self.entries_max = entries_max
        self._fences: collections.OrderedDict[int, int] = collections.OrderedDict()

    def accept(self, task_id: int, fence: int) -> bool:
        """False when a newer fence was already seen for this task: the instruction is stale."""
        seen = self._fences.get(task_id)
        if seen is not None and fence < seen:
            return False
        self._fences[task_id] = fence
        self._fences.move_to_end(task_id)
        while len(self._fences) > self.entries_max:
            self._fences.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._fences)


def lease_margin_s(lease_ttl_ms: int) -> float:
    """How close to a lease's local deadline work is no longer started (docs/sdk.md, 2): a tenth of the lease,
    at least 0.2 s and at most 1 s."""
    return min(1.0, max(0.2, lease_ttl_ms / 10_000))


def poll_wait_ms(poll_wait_ms: int, lease_ttl_ms: int) -> int:
    """How long a poll may wait for work (docs/sdk.md, 2): at most half the lease, so that a lease granted at
    the end of the wait still has half its time."""
    return max(0, min(poll_wait_ms, lease_ttl_ms // 2))


def agent_state(silent_s: float, orchestrator_timeout_s: float, outbox_len: int) -> AgentState:
    """The agent's state from two facts (docs/sdk.md, 6): how long no node has answered, and whether results
    are owed."""
    if silent_s >= orchestrator_timeout_s:
        return "autonomous"
    return "reconciling" if outbox_len > 0 else "connected"


def lease_startable(sent_at: float, lease_ttl_ms: int, now: float, margin_s: float) -> bool:
    """A lease counts from when its poll was sent (docs/api.md): start only before that + ttl - margin."""
    return sent_at + lease_ttl_ms / 1000 - margin_s > now


# ---- what a handler gets ----


class _ContextBase:
    def __init__(self, agent: "AsyncAgent", task: Task, fence: int, valid_until: float,
                 children: Optional[list[Child]] = None) -> None:
        self.task = task
        self.fence = fence
        self._agent = agent
        self._valid_until = valid_until
        self._lease_lost = False
        self._children_spawned = 0
        self._children = list(children or [])
        self._adopted: list[int] = []
        self._usage: Optional[Usage] = None

    def report_usage(self, tokens_in: int = 0, tokens_out: int = 0, cost: int = 0) -> None:
        """Adds to what this attempt consumed; the sum goes with its result or failure, counted against the
        task's key's `tokens_per_minute` and its tree's budget."""
        usage = self._usage if self._usage is not None else Usage(tokens_in=0, tokens_out=0, cost=0)
        usage["tokens_in"] = usage.get("tokens_in", 0) + int(tokens_in)
        usage["tokens_out"] = usage.get("tokens_out", 0) + int(tokens_out)
        usage["cost"] = usage.get("cost", 0) + int(cost)
        self._usage = usage

    @property
    def usage(self) -> Optional[Usage]:
        """What the attempt has reported it consumed so far (`None`: nothing)."""
        return self._usage

    @property
    def children(self) -> list[Child]:
        """The task's children when the lease was granted (`lease["children"]`): what earlier attempts delegated.
        Delegating the same step again (same queue, same payload) adopts the child instead of duplicating it."""
        return self._children

    @property
    def adopted(self) -> list[int]:
        """Children of earlier attempts that this attempt's delegations took over, in order."""
        return self._adopted

    @property
    def task_id(self) -> int:
        return self.task["id"]

    @property
    def traceparent(self) -> Optional[str]:
        """The task's W3C Trace Context (docs/sdk.md item 12): the node's submit span of the task. Spans the
        handler records as its children join the submitter's trace. `None` from a node that keeps none."""
        return self.task.get("traceparent")

    @property
    def queue(self) -> str:
        return self.task["queue"]

    @property
    def payload(self) -> Any:
        return self.task["payload"]

    @property
    def priority(self) -> int:
        return self.task["priority"]

    @property
    def attempts(self) -> int:
        return self.task["attempts"]

    @property
    def max_attempts(self) -> int:
        return self.task["max_attempts"]

    @property
    def parent_id(self) -> Optional[int]:
        return self.task.get("parent_id")

    @property
    def conversation_id(self) -> Optional[str]:
        return self.task.get("conversation_id")

    @property
    def agent_id(self) -> str:
        return self._agent.agent_id

    @property
    def valid_until(self) -> float:
        """`time.monotonic()` instant after which the lease may have lapsed (moved on by each extension)."""
        return self._valid_until

    def remaining_s(self) -> float:
        return self._valid_until - time.monotonic()

    @property
    def lease_lost(self) -> bool:
        """True once the cluster refused an extension: the result will be recorded as superseded."""
        return self._lease_lost

    def _child_request(self, queue: str, payload: Any, idempotency_key: Optional[str]) -> dict[str, Any]:
        # One key per delegation of this attempt (parent, fence, spawn order,
        # content), so that a retried request finds its child. A later attempt
        # sends other keys: the cluster matches its steps to the children of
        # earlier attempts by queue and payload, and answers them adopted.
        self._children_spawned += 1
        if idempotency_key is None:
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
            idempotency_key = f"child-{self.task_id}-{self.fence}-{queue}-{self._children_spawned}-{digest}"
        return {"parent_id": self.task_id, "parent_fence": self.fence, "conversation_id": self.conversation_id,
                "idempotency_key": idempotency_key}

    def _delegated(self, submitted: Submitted) -> int:
        if submitted.get("adopted"):
            self._adopted.append(submitted["task_id"])
        return submitted["task_id"]

    def _conversation(self) -> str:
        if not self.conversation_id:
            raise ValueError(f"task {self.task_id} has no conversation_id")
        return self.conversation_id


class TaskContext(_ContextBase):
    """What an async handler gets: the task, its fence and deadline, and helpers."""

    @property
    def client(self) -> AsyncClient:
        return self._agent.client

    async def spawn_child(self, queue: str, payload: Any = None, *, priority: int = 5,
                          deadline_ms: Optional[int] = None, max_attempts: int = 3,
                          idempotency_key: Optional[str] = None) -> int:
        """Delegates under this lease's fence: submits a child task (parent = this task, same conversation);
        returns its id. A step an earlier attempt delegated already is answered with that child (see `adopted`).
        Refused (`Superseded`, 409 `lease_expired`) once the lease is lost."""
        extra = self._child_request(queue, payload, idempotency_key)
        submitted = await self.client.delegate(extra["parent_id"], extra["parent_fence"], queue, payload,
                                               priority=priority, idempotency_key=extra["idempotency_key"],
                                               deadline_ms=deadline_ms, max_attempts=max_attempts,
                                               conversation_id=extra["conversation_id"])
        return self._delegated(submitted)

    async def await_tasks(self, task_ids: Sequence[int], timeout_s: float = 60.0) -> list[Task]:
        """Waits until the tasks finish; returns them in order. The wait is declared to the cluster
        first, so a wait that would deadlock is refused at once (422 `deadlock`)."""
        await self.client.wait(self.task_id, self.fence, list(task_ids), max(1, int(timeout_s * 1000)))
        return await self.client.wait_for_tasks(task_ids, timeout_s)

    @overload
    async def context_get(self) -> dict[str, ContextEntry]: ...

    @overload
    async def context_get(self, key: str) -> Optional[ContextEntry]: ...

    async def context_get(self, key: Optional[str] = None) -> Union[dict[str, ContextEntry], Optional[ContextEntry]]:
        """The conversation's entries (`{}` when it has none), or one entry (`None` when absent)."""
        try:
            entries = (await self.client.context_get(self._conversation()))["entries"]
        except NotFound:
            entries = {}
        return entries if key is None else entries.get(key)

    async def context_put(self, key: str, value: Any, expected_version: Optional[int] = None) -> int:
        """Writes a key of the task's conversation on the task's behalf under this lease; returns its new version
        (409 `version_conflict`). Refused once the lease is lost; discarded if this attempt is superseded."""
        return await self.client.context_put(self._conversation(), key, value, expected_version,
                                             task_id=self.task_id, fence=self.fence)

    async def progress(self) -> None:
        """Tells the cluster the work moves (a lease without progress for `stall_timeout_ms` is revoked)."""
        await self.client.progress(self.task_id, self.fence)


class SyncTaskContext(_ContextBase):
    """What a plain (blocking) handler gets; it runs in a worker thread and these helpers block."""

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        loop = self._agent._loop
        assert loop is not None, "the agent runs"
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coroutine.close()
            raise RuntimeError("SyncTaskContext helpers block: call them from the handler's thread")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def _async(self) -> TaskContext:
        context = TaskContext(self._agent, self.task, self.fence, self._valid_until, self._children)
        context._children_spawned = self._children_spawned
        return context

    def spawn_child(self, queue: str, payload: Any = None, *, priority: int = 5, deadline_ms: Optional[int] = None,
                    max_attempts: int = 3, idempotency_key: Optional[str] = None) -> int:
        extra = self._child_request(queue, payload, idempotency_key)
        submitted = self._run(self._agent.client.delegate(extra["parent_id"], extra["parent_fence"], queue, payload,
                                                          priority=priority, idempotency_key=extra["idempotency_key"],
                                                          deadline_ms=deadline_ms, max_attempts=max_attempts,
                                                          conversation_id=extra["conversation_id"]))
        return self._delegated(submitted)

    def await_tasks(self, task_ids: Sequence[int], timeout_s: float = 60.0) -> list[Task]:
        return self._run(self._async().await_tasks(task_ids, timeout_s))

    @overload
    def context_get(self) -> dict[str, ContextEntry]: ...

    @overload
    def context_get(self, key: str) -> Optional[ContextEntry]: ...

    def context_get(self, key: Optional[str] = None) -> Union[dict[str, ContextEntry], Optional[ContextEntry]]:
        return self._run(self._async().context_get(key))  # type: ignore[arg-type]

    def context_put(self, key: str, value: Any, expected_version: Optional[int] = None) -> int:
        return self._run(self._async().context_put(key, value, expected_version))

    def progress(self) -> None:
        self._run(self._async().progress())


Handler = Union[Callable[[TaskContext], Awaitable[Any]], Callable[[SyncTaskContext], Any]]
AutonomousHandler = Callable[[], Any]


def _is_async(function: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None))


# ---- the runtime ----


class AsyncAgent:
    """An agent on asyncio. `await agent.run()` serves until `stop()` (or SIGTERM with `handle_signals`).

    `handler` is an async function of a `TaskContext` or a plain function of a
    `SyncTaskContext` (run in a worker thread); it returns a JSON-able result or
    raises `TaskFailed`. `autonomous_handler` (no arguments, plain or async) is
    local work run while autonomous, at most `autonomy_tasks_max` times and for
    `autonomy_seconds_max` seconds per autonomous period.
    """

    def __init__(self, nodes: Union[str, Sequence[str], None], agent_id: str, capabilities: Sequence[str],
                 handler: Handler, *, concurrency: int = 1, lease_ttl_ms: int = 30_000, poll_wait_ms: int = 10_000,
                 orchestrator_timeout_s: float = 5.0, outbox_path: Optional[str] = None,
                 outbox_entries_max: int = OUTBOX_ENTRIES_MAX, token: Optional[str] = None,
                 autonomous_handler: Optional[AutonomousHandler] = None, autonomy_tasks_max: int = 0,
                 autonomy_seconds_max: float = 0.0, fences_remembered_max: int = FENCES_REMEMBERED_MAX,
                 ca_file: Optional[str] = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if isinstance(capabilities, str):
            capabilities = [capabilities]
        self.agent_id = agent_id
        self.capabilities = list(capabilities)
        self.handler = handler
        self.concurrency = concurrency
        self.lease_ttl_ms = lease_ttl_ms
        self.poll_wait_ms = poll_wait_ms
        self.orchestrator_timeout_s = orchestrator_timeout_s
        self.autonomous_handler = autonomous_handler
        self.autonomy_tasks_max = autonomy_tasks_max
        self.autonomy_seconds_max = autonomy_seconds_max
        self.lease_margin_s = lease_margin_s(lease_ttl_ms)
        # Each call, retries included, ends within the orchestrator timeout, so "no answer" is noticed in time.
        self.client = AsyncClient(nodes, token, name=agent_id, timeout_s=max(orchestrator_timeout_s, 0.5),
                                  call_timeout_s=orchestrator_timeout_s, ca_file=ca_file)
        if outbox_path is None:
            log.warning("agent %s has no outbox_path: undelivered results are kept in memory only", agent_id)
        self.outbox = Outbox(outbox_path, outbox_entries_max)
        # Completes are sent together, a few milliseconds' worth at a time, each acknowledged on its own.
        self.batcher = CompleteBatcher(self.client)
        self.stats = Stats()
        self.recent_outcomes: collections.deque[ReportOutcome] = collections.deque(maxlen=RECENT_OUTCOMES_MAX)
        self.state: AgentState = "connected"
        # (time.monotonic(), state) of the latest changes of state.
        self.state_history: collections.deque[tuple[float, AgentState]] = collections.deque(maxlen=STATES_KEPT_MAX)
        self.epoch: Optional[int] = None
        self.fences = FenceMemory(fences_remembered_max)
        self._handler_is_async = _is_async(handler)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                               thread_name_prefix=f"phalanx-{agent_id}")
        self._running: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._heartbeat_interval_s = 2.0
        self._heartbeats: Optional[asyncio.Task[None]] = None
        self._last_answer = time.monotonic()
        self._state_watch: Optional[asyncio.Task[None]] = None
        self._autonomous_since: Optional[float] = None
        self._autonomy: Optional[asyncio.Future[None]] = None
        self._idle_s = 0.05
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping: Optional[asyncio.Event] = None
        self._stop_requested = False
        self._slot_freed: Optional[asyncio.Event] = None
        self._rng = random.Random()

    # ---- state ----

    def _set_state(self, state: AgentState) -> None:
        if state == self.state:
            return
        level = logging.WARNING if state == "autonomous" else logging.INFO
        log.log(level, "agent %s: %s -> %s (outbox: %d entries)", self.agent_id, self.state, state, len(self.outbox))
        self.state = state
        self.state_history.append((time.monotonic(), state))
        if state == "autonomous":
            self.stats.autonomous_periods += 1
            self._autonomous_since = time.monotonic()
            if self.autonomous_handler is not None and (self._autonomy is None or self._autonomy.done()):
                self._autonomy = asyncio.ensure_future(self._autonomy_loop())

    def _refresh_state(self) -> None:
        """Sets the state from the facts (docs/sdk.md, 6)."""
        silent_s = time.monotonic() - self._last_answer
        self._set_state(agent_state(silent_s, self.orchestrator_timeout_s, len(self.outbox)))

    def _contact(self) -> None:
        """A node answered."""
        self._last_answer = time.monotonic()
        self._idle_s = 0.05
        self._refresh_state()

    def _no_answer(self, started: float) -> None:
        """A request sent at `started` got no usable answer; the silence counts from the last answer."""
        self._refresh_state()

    def _answered(self, error: PhalanxError, started: float) -> None:
        """Sorts a refusal: a 4xx (429 included) is an answer, the rest is no answer."""
        if error.is_answer:
            self._contact()
        else:
            self._no_answer(started)

    async def _watch_state(self) -> None:
        """Keeps the state current while nothing else happens (a long-poll in flight): every 0.2 s."""
        while True:
            self._refresh_state()
            await asyncio.sleep(0.2)

    def _session_lost(self, epoch: int) -> None:
        if self.epoch == epoch:
            log.warning("agent %s: session %s is gone; registering again", self.agent_id, epoch)
            self.epoch = None

    # ---- control ----

    def stop(self) -> None:
        """Stops polling, lets the running handlers finish and report, then deregisters. Thread-safe."""
        self._stop_requested = True
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            stopping.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    async def run(self, handle_signals: bool = False) -> None:
        """Serves until `stop()`. With `handle_signals`, SIGTERM and SIGINT call `stop()`."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        installed = []
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._loop.add_signal_handler(signum, self.stop)
                    installed.append(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    log.warning("agent %s: cannot handle signal %s here", self.agent_id, signum)
        self._state_watch = asyncio.create_task(self._watch_state())
        try:
            await self._serve()
            await self._drain()
        finally:
            for signum in installed:
                self._loop.remove_signal_handler(signum)
            for running in list(self._running.values()):
                running.cancel()
            for background in (self._heartbeats, self._autonomy, self._state_watch):
                if background is not None:
                    background.cancel()
            await self.client.aclose()
            self.outbox.close()
            self._executor.shutdown(wait=False)

    async def _serve(self) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            if len(self.outbox):
                if not await self._flush():
                    await self._idle()
                    continue
            if self.state == "autonomous" and not await self._probe():
                await self._idle()
                continue
            if self.epoch is None and not await self._register():
                await self._idle()
                continue
            await self._poll_once()

    async def _drain(self) -> None:
        """Graceful stop: the handlers finish and report, the outbox gets one more try, deregister."""
        if self._running:
            log.info("agent %s: stopping; waiting for %d running tasks", self.agent_id, len(self._running))
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if len(self.outbox) and self.state != "autonomous":
            await self._flush()
        if self.epoch is not None and self.state != "autonomous":
            try:
                await self.client.deregister(self.agent_id, self.epoch)
                self.epoch = None
            except PhalanxError as error:
                log.info("agent %s: deregister: %s", self.agent_id, error)

    async def _sleep_or_stop(self, seconds: float) -> None:
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _idle(self) -> None:
        await self._sleep_or_stop(self._rng.uniform(0, self._idle_s) + 0.02)
        self._idle_s = min(self._idle_s * 2, 1.0)

    # ---- session ----

    async def _register(self) -> bool:
        started = time.monotonic()
        try:
            answer = await self.client.register(self.agent_id, self.capabilities, self.concurrency)
        except PhalanxError as error:
            if error.is_definite:
                raise  # a wrong agent id or capability list: a configuration error
            self._answered(error, started)
            return False
        self.epoch = answer["epoch"]
        self._heartbeat_interval_s = max(0.05, answer["heartbeat_interval_ms"] / 1000)
        self.stats.registrations += 1
        self._contact()
        log.info("agent %s registered (epoch %s)", self.agent_id, self.epoch)
        if self._heartbeats is None or self._heartbeats.done():
            self._heartbeats = asyncio.create_task(self._heartbeat_loop())
        return True

    async def _heartbeat_once(self, epoch: int) -> bool:
        started = time.monotonic()
        try:
            await self.client.heartbeat(self.agent_id, epoch)
        except PhalanxError as error:
            self._answered(error, started)
            if error.status in (404, 409):
                self._session_lost(epoch)
                return True
            return False
        self._contact()
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            epoch = self.epoch
            # While autonomous the main loop probes; after a 404/409 it registers again.
            if epoch is not None and self.state != "autonomous":
                await self._heartbeat_once(epoch)

    async def _probe(self) -> bool:
        """While autonomous with an empty outbox: does a node answer now?"""
        if self.epoch is None:
            return True  # registering is the probe
        return await self._heartbeat_once(self.epoch)

    # ---- leases ----

    async def _poll_once(self) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        free = self.concurrency - len(self._running)
        if free <= 0:
            self._slot_freed.clear()
            waiters = [asyncio.ensure_future(self._slot_freed.wait()), asyncio.ensure_future(self._stopping.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            return
        epoch = self.epoch
        assert epoch is not None
        # A lease granted at the end of a long wait must still be startable (it counts from the poll's sending).
        wait_ms = poll_wait_ms(self.poll_wait_ms, self.lease_ttl_ms)
        started = time.monotonic()
        polling = asyncio.ensure_future(
            self.client.poll(self.agent_id, epoch, free, wait_ms, self.lease_ttl_ms))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([polling, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not polling.done():
            # Stopping: leases granted to an abandoned poll go back to pending on deregister.
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
            return
        try:
            leases = polling.result()
        except PhalanxError as error:
            self._answered(error, started)
            if error.status in (404, 409):
                self._session_lost(epoch)
            elif error.is_definite:
                log.error("agent %s: poll refused: %s", self.agent_id, error)
                await self._idle()
            else:
                await self._idle()
            return
        self._contact()
        for lease in leases:
            self._start(lease, started)

    def _start(self, lease: Lease, sent_at: float) -> None:
        assert self._slot_freed is not None
        self.stats.leases_received += 1
        task, fence = lease["task"], lease["fence"]
        ttl_ms = lease.get("lease_ttl_ms", self.lease_ttl_ms)
        if not lease_startable(sent_at, ttl_ms, time.monotonic(), self.lease_margin_s):
            self.stats.refused_expired += 1
            log.warning("agent %s: not starting task %s: its lease (fence %s) is past its local deadline",
                        self.agent_id, task["id"], fence)
            return
        if not self.fences.accept(task["id"], fence):
            self.stats.refused_stale_fence += 1
            log.warning("agent %s: not starting task %s: fence %s is older than one already seen",
                        self.agent_id, task["id"], fence)
            return
        self.stats.tasks_started += 1
        valid_until = sent_at + ttl_ms / 1000
        context: _ContextBase
        children = lease.get("children", [])
        if self._handler_is_async:
            context = TaskContext(self, task, fence, valid_until, children)
        else:
            context = SyncTaskContext(self, task, fence, valid_until, children)
        key = (task["id"], fence)
        running = asyncio.ensure_future(self._handle(context))
        self._running[key] = running

        def finished(_: "asyncio.Future[None]") -> None:
            self._running.pop(key, None)
            assert self._slot_freed is not None
            self._slot_freed.set()

        running.add_done_callback(finished)

    async def _call_handler(self, context: _ContextBase) -> Any:
        if self._handler_is_async:
            return await self.handler(context)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self.handler, context)  # type: ignore[arg-type]
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _handle(self, context: _ContextBase) -> None:
        extender = asyncio.ensure_future(self._extend_loop(context))
        entry: OutboxEntry
        try:
            result = await self._call_handler(context)
            try:
                json.dumps(result)
                entry = {"task_id": context.task_id, "fence": context.fence, "kind": "complete", "result": result}
            except (TypeError, ValueError) as error:
                entry = {"task_id": context.task_id, "fence": context.fence, "kind": "fail",
                         "error": f"the handler's result is not JSON: {error}", "retryable": False}
        except TaskFailed as failure:
            entry = {"task_id": context.task_id, "fence": context.fence, "kind": "fail",
                     "error": failure.message, "retryable": failure.retryable}
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a handler bug fails this attempt, retryably
            log.exception("agent %s: handler raised on task %s", self.agent_id, context.task_id)
            entry = {"task_id": context.task_id, "fence": context.fence, "kind": "fail",
                     "error": f"{type(error).__name__}: {error}", "retryable": True}
        finally:
            extender.cancel()
        if context.usage is not None:
            entry["usage"] = context.usage
        await self._report(entry)

    async def _extend_loop(self, context: _ContextBase) -> None:
        period_s = max(0.05, self.lease_ttl_ms / 3000)
        while True:
            await asyncio.sleep(period_s)
            started = time.monotonic()
            try:
                await self.client.extend(context.task_id, context.fence, self.lease_ttl_ms)
            except PhalanxError as error:
                self._answered(error, started)
                if error.is_definite:
                    context._lease_lost = True
                    self.stats.leases_lost += 1
                    log.warning("agent %s: lease of task %s (fence %s) lost: %s", self.agent_id, context.task_id,
                                context.fence, error.code)
                    return
                continue
            self._contact()
            context._valid_until = started + self.lease_ttl_ms / 1000

    # ---- results ----

    async def _report(self, entry: OutboxEntry) -> None:
        entry["agent_id"] = self.agent_id
        entry["stored_ms"] = int(time.time() * 1000)
        if self.state != "autonomous" and await self._send(entry, via_outbox=False) is not None:
            return
        await self._store(entry)

    async def _store(self, entry: OutboxEntry) -> None:
        try:
            await asyncio.to_thread(self.outbox.push, entry)
        except OutboxFull as error:
            # The lease will lapse and the task be leased again: at least once still holds.
            self.stats.outbox_dropped += 1
            log.error("agent %s: result of task %s dropped: %s", self.agent_id, entry["task_id"], error)
            return
        self.stats.outboxed += 1
        self._refresh_state()
        log.info("agent %s: result of task %s (fence %s) stored in the outbox", self.agent_id, entry["task_id"],
                 entry["fence"])

    async def _send(self, entry: OutboxEntry, via_outbox: bool) -> Optional[Answer]:
        """Reports a result; the cluster's definite answer, or None when there was none."""
        started = time.monotonic()
        code: Optional[str] = None
        try:
            if entry["kind"] == "complete":
                await self.batcher.complete(entry["task_id"], entry["fence"], entry.get("result"), entry.get("usage"))
                self.stats.completed += 1
            else:
                await self.client.fail_minimal(entry["task_id"], entry["fence"], entry.get("error", ""),
                                               entry.get("retryable", True), entry.get("usage"))
                self.stats.failed += 1
            answer: Answer = "accepted"
        except PhalanxError as error:
            self._answered(error, started)
            if not error.is_definite:
                return None
            code = error.code
            if error.is_superseded:
                answer = "superseded"
                self.stats.superseded += 1
                log.info("agent %s: result of task %s superseded (fence %s)", self.agent_id, entry["task_id"],
                         entry["fence"])
            else:
                answer = "rejected"
                self.stats.rejected += 1
                log.warning("agent %s: result of task %s rejected: %s", self.agent_id, entry["task_id"], error)
        else:
            self._contact()
        self.recent_outcomes.append(ReportOutcome(entry["task_id"], entry["fence"], entry["kind"], answer, code,
                                                  via_outbox))
        return answer

    async def _flush(self) -> bool:
        """Delivers the outbox, oldest first; False when some entry got no definite answer."""
        self._refresh_state()
        while (item := self.outbox.front()) is not None:
            seq, entry = item
            if await self._send(entry, via_outbox=True) is None:
                return False
            await asyncio.to_thread(self.outbox.remove, seq)
            self.stats.reconciled += 1
            self._refresh_state()
        return True

    # ---- autonomy ----

    async def _autonomy_loop(self) -> None:
        """While autonomous: the declared local work, run after run, within the budget of this period."""
        assert self.autonomous_handler is not None and self._autonomous_since is not None
        handler, since, runs = self.autonomous_handler, self._autonomous_since, 0
        while self.state == "autonomous" and not self._stop_requested and runs < self.autonomy_tasks_max:
            remaining_s = self.autonomy_seconds_max - (time.monotonic() - since)
            if remaining_s <= 0:
                break
            runs += 1
            self.stats.autonomous_runs += 1
            try:
                if _is_async(handler):
                    await asyncio.wait_for(handler(), remaining_s)
                else:
                    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, handler), remaining_s)
            except asyncio.TimeoutError:
                log.warning("agent %s: autonomous work ran past the autonomy budget (%s s)", self.agent_id,
                            self.autonomy_seconds_max)
                break
            except Exception:
                log.exception("agent %s: autonomous handler raised", self.agent_id)
            await asyncio.sleep(0.01)
        if self.state == "autonomous":
            log.info("agent %s: autonomy budget spent (%d runs)", self.agent_id, runs)


class Agent:
    """Blocking wrapper of `AsyncAgent` (the same arguments, typed the same): `run()` serves in the
    calling thread until `stop()` or SIGTERM; `start()` serves in a background
    thread. Handlers may be plain functions of a `SyncTaskContext`."""

    def __init__(self, nodes: Union[str, Sequence[str], None], agent_id: str, capabilities: Sequence[str],
                 handler: Handler, *, concurrency: int = 1, lease_ttl_ms: int = 30_000, poll_wait_ms: int = 10_000,
                 orchestrator_timeout_s: float = 5.0, outbox_path: Optional[str] = None,
                 outbox_entries_max: int = OUTBOX_ENTRIES_MAX, token: Optional[str] = None,
                 autonomous_handler: Optional[AutonomousHandler] = None, autonomy_tasks_max: int = 0,
                 autonomy_seconds_max: float = 0.0, fences_remembered_max: int = FENCES_REMEMBERED_MAX,
                 ca_file: Optional[str] = None) -> None:
        self.inner = AsyncAgent(nodes, agent_id, capabilities, handler, concurrency=concurrency,
                                lease_ttl_ms=lease_ttl_ms, poll_wait_ms=poll_wait_ms,
                                orchestrator_timeout_s=orchestrator_timeout_s, outbox_path=outbox_path,
                                outbox_entries_max=outbox_entries_max, token=token,
                                autonomous_handler=autonomous_handler, autonomy_tasks_max=autonomy_tasks_max,
                                autonomy_seconds_max=autonomy_seconds_max,
                                fences_remembered_max=fences_remembered_max, ca_file=ca_file)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def state(self) -> AgentState:
        return self.inner.state

    @property
    def stats(self) -> Stats:
        return self.inner.stats

    @property
    def outbox(self) -> Outbox:
        return self.inner.outbox

    @property
    def recent_outcomes(self) -> "collections.deque[ReportOutcome]":
        return self.inner.recent_outcomes

    @property
    def state_history(self) -> "collections.deque[tuple[float, AgentState]]":
        return self.inner.state_history

    def run(self, handle_signals: bool = True) -> None:
        """Serves until `stop()` (or SIGTERM / SIGINT when `handle_signals` and in the main thread)."""
        handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
        asyncio.run(self.inner.run(handle_signals=handle_signals))

    def start(self) -> None:
        """Serves in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the agent is already started")

        def serve() -> None:
            try:
                self.run(handle_signals=False)
            except BaseException as error:  # surfaced by join()
                self._error = error
                log.exception("agent %s stopped on an error", self.inner.agent_id)

        self._thread = threading.Thread(target=serve, name=f"phalanx-agent-{self.inner.agent_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.inner.stop()

    def join(self, timeout_s: Optional[float] = None) -> None:
        """Waits for a started agent to stop; raises the error it stopped on, if any."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"agent {self.inner.agent_id} did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error


__all__ = [
    "Agent",
    "AgentState",
    "AsyncAgent",
    "FenceMemory",
    "ReportOutcome",
    "Stats",
    "SyncTaskContext",
    "TaskContext",
    "TaskFailed",
    "agent_state",
    "lease_margin_s",
    "lease_startable",
    "poll_wait_ms",
]
