"""The agent runtime: register, heartbeat, long-poll through any node, run the
handler with bounded concurrency, extend long leases, report results under the
lease's fence, and drain on stop.

Fencing on the agent side: a lease already past its local deadline is never
started, and a lease older than one already seen for the same task is refused.
When no node answers for `orchestrator_timeout_s` the agent goes autonomous:
results go to the durable outbox, an optional autonomous handler may do local
work within a budget, and on reconnect the outbox is reconciled (accepted, or
recorded as superseded).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence

from .client import AsyncClient, PhalanxError, Unavailable, Unknown
from .outbox import Outbox

log = logging.getLogger("phalanx.agent")

LEASE_MARGIN_S = 0.2
SEEN_FENCES_MAX = 10_000


class TaskFailed(Exception):
    """Raise from a handler to fail the task; `retryable=False` fails it for good."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass
class TaskContext:
    task: dict[str, Any]
    fence: int
    valid_until: float  # time.monotonic() deadline
    client: AsyncClient

    async def spawn_child(self, queue: str, payload: Any) -> int:
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        key = f"child-{self.task['id']}-{queue}-{digest}"
        return await self.client.submit(queue, payload, parent_id=self.task["id"], parent_fence=self.fence,
                                        idempotency_key=key)

    async def await_tasks(self, ids: Sequence[int], timeout_s: float = 60.0) -> list[dict[str, Any]]:
        await self.client.wait(self.task["id"], self.fence, ids, max(1, int(timeout_s * 1000)))
        return await self.client.await_tasks(ids, timeout_s)

    async def context_get(self) -> Optional[dict[str, Any]]:
        conversation = self.task.get("conversation_id")
        if not conversation:
            return None
        try:
            return await self.client.context_get(conversation)
        except PhalanxError as error:
            if error.status == 404:
                return None
            raise

    async def context_put(self, key: str, value: Any, expected_version: Optional[int] = None) -> int:
        conversation = self.task.get("conversation_id")
        if not conversation:
            raise ValueError("the task has no conversation_id")
        return await self.client.context_put(conversation, key, value, expected_version)


Handler = Callable[[TaskContext], Awaitable[Any]]


@dataclass
class Stats:
    completed: int = 0
    failed: int = 0
    superseded: int = 0
    rejected: int = 0
    refused_expired: int = 0
    refused_stale: int = 0
    outboxed: int = 0
    reconciled: int = 0
    autonomous_runs: int = 0


@dataclass
class AsyncAgent:
    nodes: str | Sequence[str] | None
    agent_id: str
    capabilities: Sequence[str]
    handler: Handler
    concurrency: int = 1
    lease_ttl_ms: int = 30_000
    poll_wait_ms: int = 10_000
    orchestrator_timeout_s: float = 5.0
    outbox_path: Optional[str] = None
    token: Optional[str] = None
    autonomous_handler: Optional[Callable[[], Awaitable[Any]]] = None
    autonomy_tasks_max: int = 0
    autonomy_seconds_max: float = 0.0
    state: str = "connected"
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.client = AsyncClient(self.nodes, self.token, name=self.agent_id)
        self.client.retries_max = 2
        self.outbox = Outbox(self.outbox_path) if self.outbox_path else None
        self.epoch = 0
        self._seen: OrderedDict[int, int] = OrderedDict()
        self._last_contact = time.monotonic()
        self._autonomous_since: Optional[float] = None
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._running: set[asyncio.Task[None]] = set()

    # ---- connection state ----

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.warning("agent %s: %s -> %s", self.agent_id, self.state, state)
            self.state = state
            self._autonomous_since = time.monotonic() if state == "autonomous" else None

    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        if self.state == "autonomous":
            self._set_state("reconciling")

    def _unreachable(self) -> None:
        if time.monotonic() - self._last_contact >= self.orchestrator_timeout_s:
            self._set_state("autonomous")

    def accept_fence(self, task_id: int, fence: int) -> bool:
        seen = self._seen.get(task_id)
        if seen is not None and seen > fence:
            return False
        self._seen[task_id] = fence
        self._seen.move_to_end(task_id)
        while len(self._seen) > SEEN_FENCES_MAX:
            self._seen.popitem(last=False)
        return True

    # ---- the loop ----

    async def _register(self) -> int:
        answer = await self.client.register(self.agent_id, self.capabilities, self.concurrency)
        self.epoch = answer["epoch"]
        self._contact()
        return answer["heartbeat_interval_ms"]

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        heartbeat_ms = None
        while heartbeat_ms is None and not self._stopping.is_set():
            try:
                heartbeat_ms = await self._register()
            except (Unavailable, Unknown, PhalanxError):
                self._unreachable()
                await self._autonomy_step()
                await asyncio.sleep(0.2)
        if heartbeat_ms is None:
            await self.client.aclose()
            return
        background = [asyncio.create_task(self._heartbeats(heartbeat_ms)), asyncio.create_task(self._flusher())]
        while not self._stopping.is_set():
            free = self._slots._value  # noqa: SLF001 - free slots, read only
            if free == 0:
                await asyncio.sleep(0.01)
                continue
            sent_at = time.monotonic()
            try:
                leases = await self.client.poll(self.agent_id, self.epoch, free, self.poll_wait_ms, self.lease_ttl_ms)
                self._contact()
            except PhalanxError as error:
                if error.code in ("agent_not_found", "stale_epoch"):
                    await self._register()
                else:
                    await asyncio.sleep(0.1)
                continue
            except (Unavailable, Unknown):
                self._unreachable()
                await self._autonomy_step()
                await asyncio.sleep(0.1)
                continue
            for lease in leases:
                self._start(lease, sent_at)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.outbox is not None and len(self.outbox):
            await self._flush_once()
        try:
            await self.client.deregister(self.agent_id, self.epoch)
        except (Unavailable, Unknown, PhalanxError):
            pass
        await self.client.aclose()

    def _start(self, lease: dict[str, Any], sent_at: float) -> None:
        task, fence = lease["task"], lease["fence"]
        valid_until = sent_at + lease["lease_ttl_ms"] / 1000
        if valid_until <= time.monotonic() + LEASE_MARGIN_S:
            self.stats.refused_expired += 1
            log.warning("refusing task %s: its lease (fence %s) is already past", task["id"], fence)
            return
        if not self.accept_fence(task["id"], fence):
            self.stats.refused_stale += 1
            log.warning("refusing task %s: fence %s is older than one already seen", task["id"], fence)
            return
        running = asyncio.create_task(self._handle(TaskContext(task, fence, valid_until, self.client)))
        self._running.add(running)
        running.add_done_callback(self._running.discard)

    async def _handle(self, context: TaskContext) -> None:
        async with self._slots:
            extender = asyncio.create_task(self._extend(context.task["id"], context.fence))
            try:
                result = await self.handler(context)
                entry = {"task_id": context.task["id"], "fence": context.fence, "type": "complete", "result": result}
            except TaskFailed as failure:
                entry = {"task_id": context.task["id"], "fence": context.fence, "type": "fail",
                         "error": failure.message, "retryable": failure.retryable}
            except Exception as error:  # a handler bug fails the attempt, retryably
                entry = {"task_id": context.task["id"], "fence": context.fence, "type": "fail",
                         "error": repr(error), "retryable": True}
            finally:
                extender.cancel()
            await self._report(entry)

    async def _extend(self, task_id: int, fence: int) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.lease_ttl_ms / 3000))
            try:
                await self.client.extend(task_id, fence, self.lease_ttl_ms)
                self._contact()
            except PhalanxError:
                return
            except (Unavailable, Unknown):
                self._unreachable()

    async def _send(self, entry: dict[str, Any]) -> bool:
        """True when the cluster gave a definite answer (accepted, superseded, refused)."""
        try:
            if entry["type"] == "complete":
                await self.client.complete(entry["task_id"], entry["fence"], entry["result"])
                self.stats.completed += 1
            else:
                await self.client.fail(entry["task_id"], entry["fence"], entry["error"], entry["retryable"])
                self.stats.failed += 1
            self._contact()
            return True
        except PhalanxError as error:
            if error.status in (429, 503):
                return False
            self._contact()
            if error.is_superseded:
                self.stats.superseded += 1
                log.info("result for task %s superseded (fence %s)", entry["task_id"], entry["fence"])
            else:
                self.stats.rejected += 1
            return True
        except (Unavailable, Unknown):
            self._unreachable()
            return False

    async def _report(self, entry: dict[str, Any]) -> None:
        try:
            delivered = await asyncio.wait_for(self._send(entry), self.orchestrator_timeout_s)
        except asyncio.TimeoutError:
            delivered = False
        if delivered:
            return
        self._set_state("autonomous")
        if self.outbox is None:
            log.error("could not report task %s and no outbox is set", entry["task_id"])
            return
        self.outbox.push(entry)
        self.stats.outboxed += 1

    async def _flush_once(self) -> None:
        assert self.outbox is not None
        while (entry := self.outbox.front()) is not None:
            try:
                delivered = await asyncio.wait_for(self._send(entry), self.orchestrator_timeout_s)
            except asyncio.TimeoutError:
                delivered = False
            if not delivered:
                return
            self.outbox.pop_front()
            self.stats.reconciled += 1

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.outbox is not None and len(self.outbox) and self.state != "autonomous":
                self._set_state("reconciling")
                await self._flush_once()
            if self.state == "reconciling" and (self.outbox is None or not len(self.outbox)):
                self._set_state("connected")

    async def _heartbeats(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(max(0.1, interval_ms / 1000))
            try:
                await self.client.heartbeat(self.agent_id, self.epoch)
                self._contact()
            except PhalanxError as error:
                if error.code in ("agent_not_found", "stale_epoch"):
                    await self._register()
            except (Unavailable, Unknown):
                self._unreachable()

    async def _autonomy_step(self) -> None:
        """While autonomous, run the declared local work within its budget."""
        if self.state != "autonomous" or self.autonomous_handler is None or self._autonomous_since is None:
            return
        if self.stats.autonomous_runs >= self.autonomy_tasks_max:
            return
        if time.monotonic() - self._autonomous_since > self.autonomy_seconds_max:
            return
        self.stats.autonomous_runs += 1
        await self.autonomous_handler()


class Agent:
    """Synchronous wrapper: `Agent(...).run()` blocks until `stop()` or SIGTERM."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self.inner: Optional[AsyncAgent] = None

    def run(self) -> None:
        import signal

        async def main() -> None:
            self.inner = AsyncAgent(*self._args, **self._kwargs)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.inner.stop)
            await self.inner.run()

        asyncio.run(main())

    def stop(self) -> None:
        if self.inner is not None:
            self.inner.stop()


__all__ = ["Agent", "AsyncAgent", "TaskContext", "TaskFailed", "Stats"]
