"""Requests sent together (issue 16): completes (`CompleteBatcher`) or submits
(`SubmitBatcher`) collected for a few milliseconds (`BATCH_WAIT_S`, or
`BATCH_MAX` of them) and sent in one `POST /v1/tasks/complete` (with a minimal
answer) or one `POST /v1/tasks/batch`.

What an acknowledgement means does not change: each caller hears its own
item's answer, as a single request would have answered it (accepted, or that
item's refusal raised as its `PhalanxError`), and a failure of the request as
a whole is raised to every caller of the batch (docs/sdk.md, 3). A submit's
idempotency key is drawn when it is called, so a batch sent again is
harmless (docs/sdk.md, 9). Leaves the outbox and the counting to `agent.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, Optional, TypeVar

from ._errors import ERROR_CODES, PhalanxError, error_from_answer
from ._transport import generated_idempotency_key
from .client import AsyncClient
from .types import BatchResult, TaskId, TaskSpec, Usage

BATCH_WAIT_S = 0.005
BATCH_MAX = 64
# Calls waiting in one batcher at most (pending or sent); past it a call is refused at once, nothing sent.
BATCH_CALLS_MAX = 16_384

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class _Batcher(Generic[Item, Answer]):
    """What both batchers share: items collected for `wait_s` (or `batch_max` of them) and sent by a task of
    their own, each caller answered by its own slot of the answer, a whole request's failure raised to all."""

    def __init__(self, client: AsyncClient, wait_s: float, batch_max: int) -> None:
        self.client = client
        self.wait_s = wait_s
        self.batch_max = batch_max
        self._pending: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._full: Optional[asyncio.Event] = None
        self._senders: set[asyncio.Task[None]] = set()
        self._waiting = 0
        # Requests sent and items they carried, for benches and tests.
        self.requests = 0
        self.items = 0

    async def _add(self, item: Item) -> Answer:
        if self._waiting >= BATCH_CALLS_MAX:
            raise PhalanxError(429, "overloaded", f"{BATCH_CALLS_MAX} calls already wait in this batcher; nothing was sent",
                               outcome="not_done")
        self._waiting += 1
        try:
            return await self._add_counted(item)
        finally:
            self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Calls waiting (pending or sent)."""
        return self._waiting

    async def _add_counted(self, item: Item) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            self._full = asyncio.Event()
            # On a task of its own, so that a caller that gives up does not strand the others.
            sender = asyncio.ensure_future(self._send_after_wait(self._full))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        elif len(self._pending) >= self.batch_max and self._full is not None:
            self._full.set()
        return await asyncio.shield(future)

    async def _send_after_wait(self, full: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(full.wait(), self.wait_s)
        except asyncio.TimeoutError:
            pass
        batch, self._pending = self._pending, []
        for start in range(0, len(batch), self.batch_max):
            await self._send(batch[start:start + self.batch_max])

    async def _request(self, items: list[Item]) -> list[Any]:
        """One request for `items`: their answers, one per item, in order."""
        raise NotImplementedError

    def _accepted(self, answer: Any) -> Optional[Answer]:
        """An item's answer if it was accepted, else None (its `error` is then raised to its caller)."""
        raise NotImplementedError

    async def _send(self, chunk: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        self.requests += 1
        self.items += len(chunk)
        try:
            answers = await self._request([item for item, _ in chunk])
            if len(answers) != len(chunk):
                raise PhalanxError(200, "bad_answer", f"{len(answers)} answers for {len(chunk)} items")
        except BaseException as error:  # noqa: BLE001 - every caller hears the request's failure
            for _, future in chunk:
                if not future.done():
                    future.set_exception(error if isinstance(error, Exception) else
                                         PhalanxError(0, "cancelled", "the batch was cancelled", outcome="unknown"))
            if not isinstance(error, Exception):
                raise
            return
        for (_, future), answer in zip(chunk, answers):
            if future.done():
                continue
            accepted = self._accepted(answer)
            if accepted is not None:
                future.set_result(accepted)
            else:
                refusal: Any = answer.get("error") or {}
                status = ERROR_CODES.get(str(refusal.get("code")), (400, "not_done", False))[0]
                future.set_exception(error_from_answer(status, {"error": refusal}))


class CompleteBatcher(_Batcher[dict[str, Any], bool]):
    """`complete` calls sent together in `POST /v1/tasks/complete` with a minimal answer."""

    def __init__(self, client: AsyncClient, wait_s: float = BATCH_WAIT_S, batch_max: int = BATCH_MAX) -> None:
        super().__init__(client, wait_s, batch_max)

    @property
    def results(self) -> int:
        return self.items

    async def complete(self, task_id: int, fence: int, result: Any, usage: Optional[Usage] = None) -> None:
        """Sends this result with whatever else arrives within the wait; returns when its own item is
        accepted, raises its own refusal (or the whole request's failure) otherwise."""
        await self._add({"task_id": task_id, "fence": fence, "result": result, "usage": usage})

    async def _request(self, items: list[dict[str, Any]]) -> list[Any]:
        try:
            return await self.client.complete_many(items)
        except PhalanxError as error:
            if error.status not in (404, 405):
                raise
        # A node older than the batch route: one complete each.
        answers: list[Any] = []
        for item in items:
            try:
                await self.client.complete(item["task_id"], item["fence"], item["result"], item["usage"])
                answers.append({"task_id": item["task_id"], "ok": True})
            except PhalanxError as refused:
                answers.append({"task_id": item["task_id"], "error": {"code": refused.code, "message": refused.message}})
        return answers

    def _accepted(self, answer: Any) -> Optional[bool]:
        return True if answer.get("ok") else None


class SubmitBatcher(_Batcher[TaskSpec, TaskId]):
    """`submit` calls of one client sent together in `POST /v1/tasks/batch`; each caller gets its own
    task's `TaskId`, or its own refusal raised."""

    def __init__(self, client: AsyncClient, wait_s: float = BATCH_WAIT_S, batch_max: int = BATCH_MAX) -> None:
        super().__init__(client, wait_s, batch_max)

    @property
    def submits(self) -> int:
        return self.items

    async def submit(self, queue: str, payload: Any = None, priority: int = 5,
                     idempotency_key: Optional[str] = None, **fields: Any) -> TaskId:
        """As `AsyncClient.submit` (the other fields by name: `deadline_ms`, `max_attempts`, `parent_id`,
        `parent_fence`, `conversation_id`, `concurrency_key`, `cost_estimate`, `budget`, `traceparent`)."""
        spec: dict[str, Any] = {"queue": queue, "payload": payload, "priority": priority,
                                "idempotency_key": idempotency_key or generated_idempotency_key()}
        spec.update({name: value for name, value in fields.items() if value is not None})
        return await self._add(spec)  # type: ignore[arg-type]

    async def _request(self, items: list[TaskSpec]) -> list[Any]:
        return list(await self.client.submit_batch(items))

    def _accepted(self, answer: Any) -> Optional[TaskId]:
        if "task_id" not in answer:
            return None
        return TaskId(answer["task_id"], bool(answer.get("deduplicated")), bool(answer.get("adopted")),
                      answer.get("traceparent"))


__all__ = ["BATCH_CALLS_MAX", "BATCH_MAX", "BATCH_WAIT_S", "CompleteBatcher", "SubmitBatcher"]
