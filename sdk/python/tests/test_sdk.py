"""The behaviours of docs/sdk.md, one test (or more) per numbered item, named `test_sdk_N_...` after it.

The Rust SDK's tests of the same items are named `sdk_N_...` (`grep -rn sdk_4_` finds both sides).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import re
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest

from conftest import REPO, free_port
from phalanx import (Agent, AsyncAgent, Client, FenceMemory, InvalidRequest, OutboxLocked, PhalanxError, SyncTaskContext,
                     TaskContext, TaskId, Unavailable)
from phalanx._errors import ERROR_CODES
from phalanx.agent import agent_state, lease_margin_s, lease_startable, poll_wait_ms

FAST = dict(poll_wait_ms=300, orchestrator_timeout_s=1.0)


async def wait_for(predicate: Callable[[], bool], within_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {within_s} s"
        await asyncio.sleep(0.05)


def scripted(nodes: list[str], answers: list[Callable[[httpx.Request], httpx.Response]],
             seen: list[httpx.Request]) -> Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)(request)

    client = Client(nodes, rng=random.Random(1), transport=httpx.MockTransport(handle))
    client._core.current = 0
    client._core.policy.backoff_base_s = 0.001
    return client


def refusal(status: int, code: str, **extra: object) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json={"error": {"code": code, "message": code, **extra}})


def created(task_id: int) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(201, json={"task_id": task_id, "deduplicated": False})


# ---- 1. nodes and TLS ----


def test_sdk_1_an_https_node_is_spoken_to_over_tls_never_plain_http():
    seen: list[httpx.Request] = []
    client = scripted(["https://n1:1", "n2:2"], [refusal(503, "not_leader", leader_hint="n1:1"), created(4),
                                                 created(5)], seen)
    client._core.current = 1
    assert client.submit("q", 1) == 4
    assert [(r.url.scheme, r.url.host) for r in seen] == [("http", "n2"), ("https", "n1")], \
        "the hint names host:port; the node keeps its scheme"
    assert client.nodes == ["https://n1:1", "n2:2"]
    with pytest.raises(ValueError, match="ftp://"):
        Client("ftp://n1:1")


def test_sdk_1_https_to_a_plain_http_node_fails_instead_of_downgrading(server):
    with Client(f"https://{server.addr}", retries_max=1) as client:
        with pytest.raises(Unavailable) as failed:
            client.get_task(1)
    assert "TLS" in failed.value.message, failed.value.message


def test_sdk_1_a_tls_node_is_verified_by_the_ca_file(tls_server, monkeypatch):
    monkeypatch.delenv("PHALANX_CA_FILE", raising=False)
    with Client(f"https://{tls_server.addr}", ca_file=tls_server.ca_file) as client:
        task_id = client.submit("q", {"over": "tls"})
        assert client.get_task(task_id)["payload"] == {"over": "tls"}
    monkeypatch.setenv("PHALANX_CA_FILE", tls_server.ca_file)
    with Client(f"https://{tls_server.addr}") as client:
        assert client.get_task(task_id)["payload"] == {"over": "tls"}
    # Without the CA, the system's roots do not know the node: refused, not downgraded.
    monkeypatch.delenv("PHALANX_CA_FILE")
    with Client(f"https://{tls_server.addr}", retries_max=1) as client:
        with pytest.raises(Unavailable):
            client.get_task(task_id)
    # And plain HTTP to the TLS node is not served.
    with Client(tls_server.addr, retries_max=1) as client:
        with pytest.raises(PhalanxError):
            client.get_task(task_id)


def test_sdk_1_a_ca_file_that_cannot_be_read_fails_at_construction(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="ca_file"):
        Client("https://n1:1", ca_file=str(tmp_path / "missing.pem"))
    monkeypatch.setenv("PHALANX_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="missing.pem"):
        Client("https://n1:1")


# ---- 2. lease safety margin ----


def test_sdk_2_lease_margin_is_a_tenth_of_the_ttl_within_200ms_and_1s():
    assert [lease_margin_s(ttl) for ttl in (100, 1_000, 5_000, 30_000)] == [0.2, 0.2, 0.5, 1.0]
    assert lease_startable(100.0, 1_000, 100.799, lease_margin_s(1_000))
    assert not lease_startable(100.0, 1_000, 100.8, lease_margin_s(1_000))
    assert not lease_startable(100.0, 5_000, 104.6, lease_margin_s(5_000)), "a 5 s lease keeps 0.5 s"
    assert not lease_startable(100.0, 200, 100.0, lease_margin_s(200)), "never started within the floor"


def test_sdk_2_a_poll_waits_at_most_half_the_lease():
    assert poll_wait_ms(10_000, 1_000) == 500
    assert poll_wait_ms(300, 30_000) == 300


# ---- 3. fence memory and results ----


def test_sdk_3_fence_memory_forgets_the_least_recently_seen_task():
    fences = FenceMemory(entries_max=3)
    assert fences.accept(1, 10) and fences.accept(2, 1) and fences.accept(3, 1)
    assert fences.accept(1, 10), "task 1 seen again: now the most recent"
    assert fences.accept(4, 1), "task 2 is forgotten"
    assert not fences.accept(1, 9)
    assert fences.accept(2, 0)


def test_sdk_3_only_a_refusal_that_is_not_transient_is_a_definite_answer():
    def definite(status: int, code: str) -> bool:
        return PhalanxError(status, code, "m").is_definite

    assert definite(409, "superseded") and definite(409, "lease_expired") and definite(500, "internal")
    assert not definite(408, "body_timeout"), "the node did not get the body in time: send it again"
    assert not definite(507, "disk_full") and not definite(429, "queue_full") and not definite(503, "no_leader")
    assert not Unavailable(0, "unreachable", "m").is_definite, "no answer is not an answer"


# ---- 4. retry classification ----


def rust_error_table() -> dict[str, tuple[int, str, bool]]:
    """The `error_codes!` table of crates/phalanx-api/src/error.rs."""
    text = (REPO / "crates" / "phalanx-api" / "src" / "error.rs").read_text()
    table = text[text.index("error_codes! {"):]
    rows = re.findall(r'^\s*[A-Z]\w*\s*=\s*"([a-z_]+)",\s*(\d{3}),\s*(NotDone|Unknown),\s*(true|false);', table, re.M)
    assert len(rows) > 40, "the table was found and parsed"
    return {code: (int(status), "not_done" if outcome == "NotDone" else "unknown", transient == "true")
            for code, status, outcome, transient in rows}


def test_sdk_4_the_error_code_table_equals_the_rust_one():
    assert ERROR_CODES == rust_error_table()
    assert list(ERROR_CODES) == list(rust_error_table()), "in the same order"


def test_sdk_4_transient_refusals_are_repeated_and_the_rest_are_not():
    for status, code in [(408, "body_timeout"), (507, "disk_full"), (503, "from_the_future")]:
        seen: list[httpx.Request] = []
        client = scripted(["n1:1", "n2:2"], [refusal(status, code), created(5)], seen)
        assert client.submit("q", 1) == 5, f"{status} {code} is transient"
        assert len(seen) == 2
    seen = []
    client = scripted(["n1:1"], [refusal(500, "internal"), created(5)], seen)
    with pytest.raises(PhalanxError) as internal:
        client.submit("q", 1)
    assert internal.value.code == "internal" and internal.value.outcome == "unknown" and len(seen) == 1
    seen = []
    client = scripted(["n1:1"], [refusal(409, "from_the_future"), created(5)], seen)
    with pytest.raises(PhalanxError) as newer:
        client.submit("q", 1)
    assert newer.value.outcome == "unknown" and not newer.value.transient and len(seen) == 1


def test_sdk_4_retry_after_is_honoured_up_to_10_s():
    assert Client("n1:1")._core.policy.retry_after_max_s == 10.0


# ---- 5. "no node answered" ----


def test_sdk_5_no_node_answered_lists_every_node_tried_with_its_reason():
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with Client([first, second], retries_max=2, rng=random.Random(1)) as client:
        client._core.current = 0
        with pytest.raises(Unavailable) as unavailable:
            client.get_task(1)
    assert unavailable.value.status == 0 and unavailable.value.outcome == "not_done"
    assert unavailable.value.message == (
        f"no node answered after 3 attempts: {first}: connection refused (2 times); {second}: connection refused")


def test_sdk_5_a_node_that_answered_says_what_it_answered():
    seen: list[httpx.Request] = []

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = scripted(["n1:1", "n2:2"], [refusal(503, "no_leader"), refused], seen)
    client.retries_max = 1
    with pytest.raises(Unavailable) as unavailable:
        client.get_task(1)
    assert unavailable.value.message == "no node answered after 2 attempts: n1:1: 503 no_leader; n2:2: connection refused"


# ---- 6. agent state ----


def test_sdk_6_agent_state_follows_silence_and_the_outbox():
    assert agent_state(0.0, 0.5, 0) == "connected"
    assert agent_state(0.499, 0.5, 0) == "connected"
    assert agent_state(0.0, 0.5, 3) == "reconciling"
    assert agent_state(0.5, 0.5, 0) == "autonomous"
    assert agent_state(0.5, 0.5, 3) == "autonomous"


async def test_sdk_6_without_an_outbox_path_the_agent_reconciles_and_is_connected_again(server, client):
    task_id = client.submit("slow", "in-memory")

    async def slow(context: TaskContext) -> str:
        await asyncio.sleep(1.5)
        return "done"

    agent = AsyncAgent(server.addr, "py-no-outbox", ["slow"], slow, lease_ttl_ms=10_000, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.stats.tasks_started == 1, what="the handler started")
        server.kill()
        await wait_for(lambda: len(agent.outbox) == 1 and agent.state == "autonomous", what="kept in memory")
        assert not agent.outbox.durable
        server.start()
        await wait_for(lambda: agent.state == "connected", what="connected again")
    finally:
        agent.stop()
        await asyncio.wait_for(running, 15)
    assert client.get_task(task_id)["result"] == "done"
    assert [state for _, state in agent.state_history][-3:] == ["autonomous", "reconciling", "connected"]


# ---- 7. autonomy budget ----


async def test_sdk_7_autonomy_budget_is_per_outage(server, tmp_path):
    runs: list[float] = []

    async def local_work() -> None:
        runs.append(time.monotonic())

    agent = AsyncAgent(server.addr, "py-outages", ["q"], lambda context: None,
                       outbox_path=str(tmp_path / "o.outbox"), autonomous_handler=local_work,
                       autonomy_tasks_max=2, autonomy_seconds_max=60, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.stats.registrations == 1, what="registered")
        for outage in (1, 2):
            server.kill()
            await wait_for(lambda: len(runs) == 2 * outage, what=f"two runs in outage {outage}")
            await asyncio.sleep(1.0)
            assert len(runs) == 2 * outage and agent.state == "autonomous", "the budget of this outage holds"
            server.start()
            await wait_for(lambda: agent.state == "connected", what="connected again")
    finally:
        agent.stop()
        await asyncio.wait_for(running, 15)
    assert agent.stats.autonomous_periods == 2 and agent.stats.autonomous_runs == 4


# ---- 8. outbox: one owner, durable ----


def test_sdk_8_a_second_agent_on_the_same_outbox_fails_loudly(tmp_path):
    path = str(tmp_path / "twin.outbox")
    first = AsyncAgent("127.0.0.1:1", "twin", ["q"], lambda context: None, outbox_path=path)
    with pytest.raises(OutboxLocked, match="twin.outbox is in use"):
        Agent("127.0.0.1:1", "twin", ["q"], lambda context: None, outbox_path=path)
    first.outbox.close()
    Agent("127.0.0.1:1", "twin", ["q"], lambda context: None, outbox_path=path).outbox.close()


def test_sdk_8_an_entry_is_fsynced_with_its_directory_before_it_counts(tmp_path, monkeypatch):
    import os

    from phalanx import Outbox

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "new" / "a.outbox"
    with Outbox(str(path)) as outbox:
        assert synced == [str(path), str(path.parent)], "a new file, then its directory"
        synced.clear()
        outbox.push({"task_id": 1, "fence": 1, "kind": "complete", "result": 1})
        assert synced == [str(path)], "the entry's bytes before push returns"


# ---- 9. submits ----


def test_sdk_9_a_submit_says_whether_it_was_deduplicated(server, client):
    first = client.submit("q", {"n": 1}, idempotency_key="k-1")
    again = client.submit("q", {"n": 1}, idempotency_key="k-1")
    assert isinstance(first, int) and isinstance(first, TaskId)
    assert first == again and again.task_id == first
    assert first.deduplicated is False and again.deduplicated is True
    assert json.dumps({"id": again}) == f'{{"id": {int(again)}}}', "still an int to JSON"
    assert f"/v1/tasks/{again}" == f"/v1/tasks/{int(again)}" == "/v1/tasks/" + str(again), "and to text"
    assert f"{again:>5}" == f"{int(again):>5}"


# ---- 12. trace context ----

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


def test_sdk_12_traceparent_round_trips_through_submit_and_the_agents_context(server, client):
    task_id = client.submit("traced", {"n": 1}, traceparent=CALLER_TRACEPARENT)
    stored = task_id.traceparent
    assert stored is not None and stored.split("-")[1] == CALLER_TRACE, "the task stays in the caller's trace"
    assert stored.split("-")[2] != "b7ad6b7169203331", "and names the node's submit span"
    assert client.get_task(task_id)["traceparent"] == stored
    seen: list[object] = []

    def handler(context: SyncTaskContext):
        seen.append(context.traceparent)
        return {"ok": True}

    agent = Agent(server.addr, "py-tracer", ["traced"], handler, poll_wait_ms=300)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while client.get_task(task_id)["state"] != "succeeded":
            assert time.monotonic() < deadline, "the task did not succeed"
            time.sleep(0.05)
    finally:
        agent.stop()
        agent.join(10)
    assert seen == [stored], "the handler sees the task's stored context"


def test_sdk_12_a_malformed_traceparent_is_refused_and_creates_nothing(server, client):
    with pytest.raises(InvalidRequest) as refused:
        client.submit("traced", {"n": 1}, traceparent="00-not-a-trace-01")
    assert "traceparent" in str(refused.value)
    assert client.list_tasks()["tasks"] == []


def test_sdk_12_a_submit_inside_an_opentelemetry_span_carries_its_context(server, client):
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(trace_id=int(CALLER_TRACE, 16), span_id=0x00F067AA0BA902B7, is_remote=False,
                                trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(context)):
        task_id = client.submit("traced", {"n": 2})
    assert task_id.traceparent is not None and task_id.traceparent.split("-")[1] == CALLER_TRACE
    # Outside any span, a task starts a trace of its own.
    alone = client.submit("traced", {"n": 3})
    assert alone.traceparent is not None and alone.traceparent.split("-")[1] != CALLER_TRACE


# ---- the sync Agent's options ----


def test_the_blocking_agent_takes_the_same_typed_options_as_the_async_one():
    def keywords(function: Callable[..., object]) -> dict[str, tuple[object, object]]:
        parameters = inspect.signature(function).parameters.values()
        return {p.name: (p.annotation, p.default) for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert keywords(Agent.__init__) == keywords(AsyncAgent.__init__)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(Agent.__init__).parameters.values())
    with pytest.raises(TypeError):
        Agent("127.0.0.1:1", "typo", ["q"], lambda context: None, concurency=2)  # type: ignore[call-arg]


def test_the_tables_path_is_this_repository():
    assert (Path(REPO) / "docs" / "sdk.md").exists()
