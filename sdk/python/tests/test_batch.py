"""Issue 16 in the Python SDK: client-side adaptive throttling (docs/sdk.md, 10) against a scripted node
that refuses for load, and batched completes against a real node (a stale fence in the middle of a batch
refused alone; the agent sends its results together, each acknowledged on its own)."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from phalanx import AsyncAgent, AsyncClient, Client, Overloaded, PhalanxError, TaskContext
from phalanx._batch import CompleteBatcher, SubmitBatcher
from phalanx._errors import Superseded
from phalanx._throttle import WINDOW_S, AdaptiveThrottle, class_of_priority

from conftest import read_request
from test_sdk import FAST, refusal, wait_for


# ---- 10. adaptive throttling ----


def test_sdk_10_the_probability_follows_requests_and_accepts_per_node_and_class():
    now = [0.0]
    throttle = AdaptiveThrottle(clock=lambda: now[0])
    for i in range(1000):
        throttle.answered("a:1", "low", accepted=i < 100)
    assert throttle.reject_probability("a:1", "low") == pytest.approx(800 / 1001)
    assert not throttle.admit("a:1", "low", 0.5) and throttle.admit("a:1", "low", 0.9)
    assert throttle.reject_probability("b:1", "low") == 0.0 and throttle.reject_probability("a:1", "high") == 0.0
    for _ in range(1000):
        throttle.answered("c:1", "normal", accepted=True)
    assert throttle.reject_probability("c:1", "normal") == 0.0
    now[0] = WINDOW_S + 5
    assert throttle.reject_probability("a:1", "low") == 0.0, "the window forgets after its length"
    assert [class_of_priority(p) for p in (0, 3, 4, 6, 7, 9)] == ["low", "low", "normal", "normal", "high", "high"]


def test_sdk_10_a_client_stops_refusing_its_own_calls_within_30_s_of_an_overload_passing():
    # As the Rust test: 60 s at 10x (the node accepts one call in ten), then
    # half of what the node serves, all accepted; seconds until under 1% of
    # calls are refused locally. Draws from a fixed sequence.
    now = [0.0]
    throttle = AdaptiveThrottle(clock=lambda: now[0])
    draws = random.Random(7)
    for tick in range(6_000):
        now[0] = tick / 100
        served = 0
        for _ in range(10):
            if throttle.admit("a:1", "normal", draws.random()):
                throttle.answered("a:1", "normal", accepted=served < 1)
                served += 1
    refused = calls = 0
    recovered = None
    for tick in range(6_000, 12_000):
        now[0] = tick / 100
        if tick % 2 == 0:
            calls += 1
            if throttle.admit("a:1", "normal", draws.random()):
                throttle.answered("a:1", "normal", accepted=True)
            else:
                refused += 1
        if (tick + 1) % 100 == 0:
            if refused * 100 < calls:
                recovered = (tick + 1 - 6_000) // 100
                break
            refused = calls = 0
    assert recovered is not None and recovered <= 30, recovered


def test_sdk_10_a_node_refusing_for_load_is_throttled_by_the_client():
    seen: list[httpx.Request] = []
    overloaded = refusal(429, "overloaded", outcome="not_done")

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return overloaded(request)

    client = Client(["n1:1"], rng=random.Random(1), retries_max=0, transport=httpx.MockTransport(handle))
    throttled = 0
    for _ in range(100):
        with pytest.raises(Overloaded) as error:
            client.submit("q", 1, priority=2)
        assert error.value.code == "overloaded" and error.value.outcome == "not_done"
        throttled += "throttled by the client" in error.value.message
    assert throttled + len(seen) == 100, "a throttled request never reaches the node"
    assert throttled >= 80 and len(seen) >= 1
    # The high class has a window of its own: its first request is sent.
    before = len(seen)
    with pytest.raises(Overloaded) as error:
        client.submit("q", 1, priority=8)
    assert "throttled" not in error.value.message and len(seen) == before + 1
    # Turned off, every request is sent.
    client.throttling = False
    before = len(seen)
    for _ in range(5):
        with pytest.raises(Overloaded):
            client.submit("q", 1, priority=2)
    assert len(seen) == before + 5


# ---- batched completes, real node ----


def lease_all(client: Client, agent_id: str, count: int) -> list[tuple[int, int]]:
    registration = client.register(agent_id, ["q"], capacity=count)
    leases = client.poll(agent_id, registration["epoch"], max_tasks=count, wait_ms=1000)
    return sorted((lease["task"]["id"], lease["fence"]) for lease in leases)


def test_a_batch_of_results_refuses_a_stale_fence_alone(server, client):
    ids = [client.submit("q", i) for i in range(5)]
    leases = lease_all(client, "py-batch", 5)
    assert [task_id for task_id, _ in leases] == sorted(ids)
    items = [{"task_id": task_id, "fence": fence, "result": task_id} for task_id, fence in leases]
    items[2]["fence"] -= 1
    answers = client.complete_many(items)
    assert [a.get("ok") for a in answers] == [True, True, None, True, True]
    assert answers[2]["task_id"] == leases[2][0] and answers[2]["error"]["code"] == "superseded"
    assert client.get_task(leases[0][0])["state"] == "succeeded"
    assert client.get_task(leases[2][0])["state"] == "leased"


async def test_the_batcher_answers_each_caller_with_its_own_item(server, client):
    for i in range(4):
        client.submit("q", i)
    leases = lease_all(client, "py-batcher", 4)
    async with AsyncClient(server.addr) as async_client:
        batcher = CompleteBatcher(async_client)
        calls = [batcher.complete(task_id, fence - (1 if n == 1 else 0), "r") for n, (task_id, fence) in
                 enumerate(leases)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
    assert isinstance(outcomes[1], Superseded)
    assert batcher.requests == 1 and batcher.results == 4


async def test_the_submit_batcher_answers_each_caller_with_its_own_task(server, client):
    async with AsyncClient(server.addr) as async_client:
        batcher = SubmitBatcher(async_client)
        first = await batcher.submit("q", {"n": 0}, idempotency_key="same")
        calls = [batcher.submit("q", {"n": i}) for i in range(1, 100)]
        # The same key and request again: the first task, deduplicated; another request under it: refused alone.
        calls.append(batcher.submit("q", {"n": 0}, idempotency_key="same"))
        calls.append(batcher.submit("q", {"n": 1}, idempotency_key="same"))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    ids = outcomes[:99]
    assert all(isinstance(task_id, int) and not task_id.deduplicated for task_id in ids), outcomes
    assert len(set(ids)) == 99 and first not in ids
    again = outcomes[99]
    assert isinstance(again, int) and again == first and again.deduplicated
    assert isinstance(outcomes[100], PhalanxError) and outcomes[100].code == "idempotency_conflict"
    # 101 submits in at most a few requests (64 a batch), each task as submitted.
    assert batcher.submits == 102 and batcher.requests <= 4, (batcher.requests, batcher.submits)
    assert client.get_task(ids[41])["payload"] == {"n": 42}


async def test_calls_past_the_batchers_bound_are_refused_at_once(monkeypatch):
    """Past BATCH_CALLS_MAX calls waiting, a call is refused at once (overloaded, nothing sent)."""
    import phalanx._batch as batch
    monkeypatch.setattr(batch, "BATCH_CALLS_MAX", 8)
    sent = asyncio.Event()

    class Silent(SubmitBatcher):
        async def _request(self, items):  # a node that never answers
            sent.set()
            await asyncio.sleep(3600)

    batcher = Silent(None)  # type: ignore[arg-type]
    waiting = [asyncio.ensure_future(batcher.submit("q", i)) for i in range(8)]
    await asyncio.wait_for(sent.wait(), 5)
    assert batcher.waiting == 8
    with pytest.raises(PhalanxError) as refused:
        await batcher.submit("q", "one more")
    assert (refused.value.status, refused.value.code, refused.value.outcome) == (429, "overloaded", "not_done")
    for call in waiting:
        call.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert batcher.waiting == 0


async def test_the_agent_sends_its_results_in_batches(server, client):
    ids = [client.submit("q", i) for i in range(200)]

    async def handle(context: TaskContext) -> int:
        return context.task_id

    agent = AsyncAgent(server.addr, "py-batching", ["q"], handle, concurrency=64, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.stats.completed == 200, what="every result acknowledged")
    finally:
        agent.stop()
        await asyncio.wait_for(running, 15)
    assert client.get_task(ids[123])["result"] == ids[123]
    assert agent.batcher.results == 200 and agent.batcher.requests < 100, (agent.batcher.requests, "requests")


# ---- 11. requests in flight ----


def test_sdk_11_requests_past_the_bound_wait_in_the_client():
    from phalanx.client import REQUESTS_IN_FLIGHT_MAX
    seen = {"open": 0, "most": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        seen["open"] += 1
        seen["most"] = max(seen["most"], seen["open"])
        await asyncio.sleep(0.02)
        seen["open"] -= 1
        return httpx.Response(201, json={"task_id": 1, "deduplicated": False})

    async def main() -> None:
        async with AsyncClient("n1:1", transport=httpx.MockTransport(handler), write_timeout_s=5.0) as client:
            client.throttling = False
            ids = await asyncio.gather(*(client.submit("q", i) for i in range(3 * REQUESTS_IN_FLIGHT_MAX)))
        assert ids == [1] * (3 * REQUESTS_IN_FLIGHT_MAX)

    asyncio.run(main())
    assert REQUESTS_IN_FLIGHT_MAX // 2 < seen["most"] <= REQUESTS_IN_FLIGHT_MAX, seen


def test_sdk_11_a_call_whose_budget_ends_while_it_waits_is_not_sent():
    from phalanx.client import REQUESTS_IN_FLIGHT_MAX
    sent = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        await asyncio.sleep(0.5)
        return httpx.Response(201, json={"task_id": 1, "deduplicated": False})

    async def main() -> list[object]:
        async with AsyncClient("n1:1", transport=httpx.MockTransport(handler), write_timeout_s=5.0,
                               call_timeout_s=0.2) as client:
            client.throttling = False
            return await asyncio.gather(*(client.submit("q", i) for i in range(REQUESTS_IN_FLIGHT_MAX + 4)),
                                        return_exceptions=True)

    answers = asyncio.run(main())
    waited = [a for a in answers if isinstance(a, Overloaded)]
    assert len(waited) == 4 and len(sent) == REQUESTS_IN_FLIGHT_MAX, (answers, len(sent))
    assert all(a.outcome == "not_done" and "nothing was sent" in a.message for a in waited)


def test_sdk_11_the_pool_reuses_connections_and_drops_closed_ones():
    """The asyncio client's own pool (phalanx._pool): connections are reused, at most one per request in
    flight; a connection the node closes is not reused, and nothing is lost."""

    async def main(close_each: bool) -> tuple[int, list[int]]:
        connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            try:
                while True:
                    await read_request(reader)
                    await asyncio.sleep(0.005)
                    body = b'{"task_id": 7, "deduplicated": false}'
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(body)).encode() + (b"\r\nconnection: close" if close_each else b"")
                                 + b"\r\n\r\n" + body)
                    await writer.drain()
                    if close_each:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with AsyncClient(f"127.0.0.1:{port}", write_timeout_s=5.0) as client:
            client.throttling = False
            slots = asyncio.Semaphore(8)

            async def one(i: int) -> int:
                async with slots:
                    return await client.submit("q", i)

            ids = await asyncio.gather(*(one(i) for i in range(200)))
        server.close()
        await server.wait_closed()
        return connections, ids

    connections, ids = asyncio.run(main(close_each=False))
    assert ids == [7] * 200 and connections <= 8, connections
    connections, ids = asyncio.run(main(close_each=True))
    assert ids == [7] * 200 and connections == 200, connections
