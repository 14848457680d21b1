"""The clients against a real server: the task life cycle, leases and fencing,
conversations, errors, failover past a dead node."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import read_request
from phalanx import AsyncClient, Client, Conflict, InvalidRequest, NotFound, PhalanxError, Superseded
from conftest import free_port


def test_submit_get_list_cancel(server, client):
    first = client.submit("summarise", {"text": "hello"}, idempotency_key="doc-1")
    assert client.submit("summarise", {"text": "hello"}, idempotency_key="doc-1") == first, "deduplicated"
    with pytest.raises(Conflict) as conflict:
        client.submit("summarise", {"text": "other"}, idempotency_key="doc-1")
    assert conflict.value.code == "idempotency_conflict", "a key names one request"
    second = client.submit("summarise", 2, priority=9, max_attempts=1, conversation_id="conv-1")
    task = client.get_task(first)
    assert (task["payload"], task["state"], task["priority"], task["idempotency_key"]) == (
        {"text": "hello"}, "pending", 5, "doc-1")
    assert client.get_task(second)["conversation_id"] == "conv-1"
    page = client.list_tasks(queue="summarise")
    assert [t["id"] for t in page["tasks"]] == [first, second] and page["next_after"] is None
    assert [t["id"] for t in client.list_tasks(queue="summarise", limit=1)["tasks"]] == [first]
    assert client.list_tasks(queue="summarise", limit=1)["next_after"] == first
    assert client.cancel(second)["state"] == "cancelled"
    assert client.get_task(second, stale=True)["state"] == "cancelled"
    assert [t["id"] for t in client.list_tasks(state="cancelled")["tasks"]] == [second]
    results = client.submit_batch([{"queue": "summarise", "payload": 3}, {"queue": "bad queue!"}])
    assert "task_id" in results[0] and results[1]["error"]["code"] == "invalid"


def test_register_poll_complete(server, client):
    task_id = client.submit("work", {"n": 1})
    registration = client.register("py-worker", ["work"], capacity=2)
    assert registration["heartbeat_interval_ms"] > 0 and registration["agent_ttl_ms"] > 0
    epoch = registration["epoch"]
    client.heartbeat("py-worker", epoch)
    leases = client.poll("py-worker", epoch, max_tasks=2, wait_ms=1000, lease_ttl_ms=5000)
    assert len(leases) == 1 and leases[0]["task"]["id"] == task_id and leases[0]["lease_ttl_ms"] == 5000
    fence = leases[0]["fence"]
    leased = client.get_task(task_id)
    assert leased["state"] == "leased" and leased["lease"]["fence"] == fence and leased["last_fence"] == fence
    assert client.extend(task_id, fence, 5000) >= leases[0]["valid_until_ms"]
    done = client.complete(task_id, fence, {"ok": True})
    assert done["state"] == "succeeded" and done["result"] == {"ok": True}
    assert client.complete(task_id, fence, {"ok": True})["state"] == "succeeded", "a repeated report is harmless"
    client.deregister("py-worker", epoch)
    with pytest.raises(NotFound) as gone:
        client.heartbeat("py-worker", epoch)
    assert gone.value.code == "agent_not_found"


def test_only_the_registering_client_speaks_for_the_session(server, client):
    task_id = client.submit("work", 1)
    registration = client.register("py-owner", ["work"])
    epoch = registration["epoch"]
    assert len(registration["session"]) == 32
    # Another client knows the public epoch, not the session's secret.
    with Client(server.addr) as forger:
        for act in (lambda: forger.heartbeat("py-owner", epoch), lambda: forger.poll("py-owner", epoch),
                    lambda: forger.deregister("py-owner", epoch)):
            with pytest.raises(PhalanxError) as refused:
                act()
            assert (refused.value.status, refused.value.code) == (403, "wrong_session")
    client.heartbeat("py-owner", epoch)
    assert client.poll("py-owner", epoch, wait_ms=1000)[0]["task"]["id"] == task_id
    client.deregister("py-owner", epoch)


def test_a_stale_fence_is_superseded_and_changes_nothing(server, client):
    task_id = client.submit("work", 1)
    epoch = client.register("py-a", ["work"])["epoch"]
    fence = client.poll("py-a", epoch, wait_ms=1000)[0]["fence"]
    before = client.get_task(task_id)
    with pytest.raises(Superseded) as refused:
        client.complete(task_id, fence - 1, "late")
    assert refused.value.status == 409 and refused.value.is_superseded
    after = client.get_task(task_id)
    assert after["superseded_count"] == before["superseded_count"] + 1
    for field in ("state", "result", "lease", "last_fence", "attempts"):
        assert after[field] == before[field]
    with pytest.raises(Superseded):
        client.fail(task_id, fence + 100, "late")
    client.fail(task_id, fence, "boom", retryable=False)
    assert client.get_task(task_id)["state"] == "failed"


def test_bad_input_is_a_clear_error(server, client):
    with pytest.raises(InvalidRequest) as invalid:
        client.submit("bad queue", 1)
    assert invalid.value.status == 400 and invalid.value.code == "invalid" and invalid.value.message
    with pytest.raises(InvalidRequest):
        client.submit("q", 1, priority=42)
    with pytest.raises(NotFound) as missing:
        client.get_task(999)
    assert missing.value.status == 404 and missing.value.code == "task_not_found"
    with pytest.raises(NotFound):
        client.heartbeat("nobody", 1)
    response = httpx.post(f"http://{server.addr}/v1/tasks", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"
    assert client.list_tasks()["tasks"] == [], "nothing changed"


def test_delegation_is_fenced_and_a_key_names_one_request(server, client):
    root = client.submit("plan", {"doc": 1}, conversation_id="conv-d")
    epoch = client.register("py-p", ["plan"])["epoch"]
    fence = client.poll("py-p", epoch, wait_ms=1000)[0]["fence"]
    with pytest.raises(InvalidRequest):
        client.submit("plan", {"doc": 1}, parent_id=root)
    assert client.get_task(root)["state"] == "leased", "no dead letter on the word of a request without the lease"
    child = client.delegate(root, fence, "part", {"i": 1}, idempotency_key="part-1")
    assert child["deduplicated"] is False and child["adopted"] is False
    assert client.delegate(root, fence, "part", {"i": 1}, idempotency_key="part-1")["task_id"] == child["task_id"]
    with pytest.raises(Conflict) as conflict:
        client.delegate(root, fence, "part", {"i": 2}, idempotency_key="part-1")
    assert conflict.value.code == "idempotency_conflict"
    with pytest.raises(Superseded):
        client.delegate(root, fence - 1, "part", {"i": 1}, idempotency_key="part-1")
    assert client.context_put("conv-d", "k", 1, task_id=root, fence=fence) == 1
    assert client.context_get("conv-d")["entries"]["k"] == {"version": 1, "value": 1, "task_id": root, "fence": fence}
    with pytest.raises(Superseded):
        client.context_put("conv-d", "k", 2, task_id=root, fence=fence - 1)
    with pytest.raises(ValueError):
        client.context_put("conv-d", "k", 2, task_id=root)


def test_conversation_context(server, client):
    with pytest.raises(NotFound):
        client.context_get("conv-9")
    assert client.context_put("conv-9", "plan", {"step": 1}, expected_version=0) == 1
    with pytest.raises(Conflict) as conflict:
        client.context_put("conv-9", "plan", {"step": 2}, expected_version=0)
    assert conflict.value.code == "version_conflict"
    assert client.context_put("conv-9", "plan", {"step": 2}, expected_version=1) == 2
    assert client.context_get("conv-9")["entries"] == {"plan": {"version": 2, "value": {"step": 2}}}
    client.context_delete("conv-9")
    with pytest.raises(NotFound):
        client.context_get("conv-9")
    with pytest.raises(NotFound):
        client.context_delete("conv-9")
    assert client.context_put("conv-9", "plan", {"step": 1}, expected_version=0) == 1


def test_cluster_and_failover_past_a_dead_node(server):
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, server.addr], retries_max=8) as client:
        client._core.current = 0
        info = client.cluster()
        assert info["node_id"] == 1 and info["leader_id"] == 1 and len(info["nodes"]) == 1
        assert client.submit("q", 1) > 0
        assert client.ready() and not client.ready(dead)
        assert "phalanx" in client.metrics()


async def test_the_async_client(server):
    async with AsyncClient(server.addr) as client:
        task_id = await client.submit("q", {"a": 1}, idempotency_key="async-1")
        assert (await client.get_task(task_id))["payload"] == {"a": 1}
        assert len((await client.submit_batch([{"queue": "q", "payload": i} for i in range(3)]))) == 3
        assert len((await client.list_tasks(queue="q"))["tasks"]) == 4
        assert (await client.cancel(task_id))["state"] == "cancelled"
        assert (await client.cluster())["leader_id"] == 1


def _slow_submits_node(slow_s: float, others: bytes = b"404 Not Found") -> tuple[Any, list[int]]:
    """A node whose submits answer after `slow_s` and whose other requests answer at once with `others`;
    counts submits."""
    import asyncio

    submits = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_request(reader)
                if head.startswith(b"POST /v1/tasks "):
                    submits[0] += 1
                    await asyncio.sleep(slow_s)
                    status, body = b"201 Created", b'{"task_id": 7, "deduplicated": false}'
                elif others.startswith(b"503"):
                    status, body = others, b'{"error": {"code": "not_ready", "message": "no", "outcome": "not_done"}}'
                else:
                    status, body = others, b'{"error": {"code": "task_not_found", "message": "no"}}'
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return serve, submits


def test_sdk_4_a_slow_node_that_answers_others_is_waited_for() -> None:
    """docs/sdk.md, 4: the asyncio client's write attempt is not abandoned while its node keeps answering other
    requests (a submit answered after 1.2 s, more than two timeouts, is waited for and sent once); a node that
    answers nothing else, or only 5xx (it cannot make progress), is left after one timeout."""
    import asyncio
    import time

    async def ask_others_until_done(client: AsyncClient, submitting: Any, answers: type[Exception]) -> None:
        # Other requests of the same client, answered (or refused with `answers`) while the submit waits.
        while not submitting.done():
            try:
                await client.get_task(1, stale=True)
            except answers:
                pass
            await asyncio.sleep(0.05)

    async def main() -> None:
        serve, submits = _slow_submits_node(1.2)
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            client.throttling = False
            submitting = asyncio.ensure_future(client.submit("q", 1))
            await ask_others_until_done(client, submitting, NotFound)
            assert await submitting == 7
            assert submits[0] == 1
        async with AsyncClient(f"127.0.0.1:{port}", retries_max=0) as client:
            start = time.monotonic()
            with pytest.raises(PhalanxError) as refused:
                await client.submit("q", 2)
            assert time.monotonic() - start < 0.9
            assert "no answer within 0.5 s" in str(refused.value), refused.value
            assert submits[0] == 2
        server.close()
        await server.wait_closed()
        # Answering others only with 5xx (cannot make progress) is not answering: left after one timeout.
        serve, submits = _slow_submits_node(1.2, b"503 Service Unavailable")
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with AsyncClient(f"127.0.0.1:{port}", retries_max=0) as client:
            client.throttling = False
            start = time.monotonic()
            submitting = asyncio.ensure_future(client.submit("q", 3))
            await ask_others_until_done(client, submitting, PhalanxError)
            with pytest.raises(PhalanxError) as refused:
                await submitting
            assert time.monotonic() - start < 0.9
            assert "no answer within 0.5 s" in str(refused.value), refused.value
        server.close()
        await server.wait_closed()

    asyncio.run(main())
