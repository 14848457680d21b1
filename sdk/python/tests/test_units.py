"""The SDK's own logic without a server: backoff, retry budget, failover and
unknown outcomes (against a scripted transport), fencing, the outbox file."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Callable

import httpx
import pytest

from phalanx import (
    Client,
    FenceMemory,
    InvalidRequest,
    OutcomeUnknown,
    Outbox,
    OutboxFull,
    OutboxLocked,
    RetryBudget,
    RetryPolicy,
    Superseded,
    Unavailable,
)
from phalanx.agent import lease_margin_s, lease_startable
from phalanx.client import _door_priority, _Latency, _Request, parse_nodes

# ---- backoff and budget ----


def test_full_jitter_stays_within_its_ceiling():
    policy, rng = RetryPolicy(), random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.05 * 2**attempt)
        pauses = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert all(0 <= pause <= ceiling for pause in pauses)
        assert max(pauses) > ceiling / 2, "full jitter spreads over the whole range"


def test_retry_budget_allows_a_tenth_of_requests_plus_a_floor():
    now = [0.0]
    budget = RetryBudget(ratio=0.1, floor_per_s=1.0, tokens_max=10.0, clock=lambda: now[0])
    assert sum(budget.try_retry() for _ in range(50)) == 10, "the floor"
    for _ in range(100):
        budget.on_request()
    assert sum(budget.try_retry() for _ in range(50)) == 10, "a tenth of 100 requests"
    now[0] += 3.0
    assert sum(budget.try_retry() for _ in range(50)) == 3, "the floor trickles back in time"


def test_node_lists():
    assert parse_nodes("a:1, http://b:2/ ,") == ["a:1", "b:2"]
    assert parse_nodes(["c:3"]) == ["c:3"]
    os.environ["PHALANX_NODES"] = "d:4,e:5"
    try:
        assert parse_nodes(None) == ["d:4", "e:5"]
    finally:
        del os.environ["PHALANX_NODES"]
    with pytest.raises(ValueError):
        parse_nodes(" , ")


# ---- requests against a scripted transport ----


def scripted(answers: list[Callable[[httpx.Request], httpx.Response]], seen: list[httpx.Request]) -> Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)(request)

    client = Client(["n1:1", "n2:2", "n3:3"], token="secret", rng=random.Random(1),
                    transport=httpx.MockTransport(handle))
    client._core.current = 0
    client._core.policy.backoff_base_s = 0.001
    return client


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def timed_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("read timed out", request=request)


def answer(status: int, body: object, headers: dict[str, str] | None = None):
    return lambda request: httpx.Response(status, json=body, headers=headers)


def refusal(status: int, code: str, **extra: object):
    return answer(status, {"error": {"code": code, "message": code, **extra}})


def test_a_refused_connection_moves_on_and_retries_a_submit():
    seen: list[httpx.Request] = []
    client = scripted([refused, answer(201, {"task_id": 7, "deduplicated": False})], seen)
    assert client.submit("q", 1) == 7
    assert [r.url.host for r in seen] == ["n1", "n2"]
    assert seen[1].headers["authorization"] == "Bearer secret"
    body = json.loads(seen[1].content)
    assert body.pop("idempotency_key").startswith("auto-")
    assert body == {"queue": "q", "payload": 1, "priority": 5, "max_attempts": 3}


def test_an_unkeyed_submit_that_timed_out_is_repeated_with_the_key_generated_for_it():
    seen: list[httpx.Request] = []
    client = scripted([timed_out, refusal(503, "leader_changed", outcome="unknown", leader_hint="n3:3"),
                       answer(201, {"task_id": 7, "deduplicated": True})], seen)
    assert client.submit("q", 1) == 7
    keys = [json.loads(r.content)["idempotency_key"] for r in seen]
    assert len(keys) == 3 and keys[0].startswith("auto-") and len(set(keys)) == 1, keys
    assert [r.url.host for r in seen] == ["n1", "n2", "n3"], "no answer: the next node; then the hinted leader"
    # Another call is another task: another key.
    seen.clear()
    client = scripted([answer(201, {"task_id": 8, "deduplicated": False}), answer(200, {"results": []})], seen)
    client.submit("q", 1)
    client.submit_batch([{"queue": "q"}, {"queue": "q", "idempotency_key": "mine"}])
    batch_keys = [task["idempotency_key"] for task in json.loads(seen[1].content)["tasks"]]
    assert batch_keys[0].startswith("auto-") and batch_keys[1] == "mine"
    assert json.loads(seen[0].content)["idempotency_key"] not in (keys[0], batch_keys[0])


def test_writes_get_a_short_attempt_timeout_and_reads_the_long_one():
    seen: list[httpx.Request] = []
    client = scripted([answer(201, {"task_id": 1, "deduplicated": False}), answer(200, {"id": 1}),
                       answer(200, {"leases": []})], seen)
    client.submit("q", 1)
    client.get_task(1)
    client.poll("a", 1, wait_ms=2000)
    submit, read, poll = (r.extensions["timeout"]["read"] for r in seen)
    # The first write waits the ceiling; once a fast answer was seen, the floor.
    assert submit == pytest.approx(0.5) and read == pytest.approx(15.0) and poll == pytest.approx(2.25)
    assert 0 < int(seen[0].headers["x-phalanx-deadline-ms"]) <= 500, "the node may refuse what it cannot do in time"


def test_the_write_timeout_follows_the_latency_between_floor_and_ceiling():
    latency = _Latency()
    assert latency.timeout_s(0.25, 0.5) == 0.5
    for _ in range(20):
        latency.record(0.004)
    assert latency.timeout_s(0.25, 0.5) == 0.25
    for i in range(40):
        latency.record(0.15 if i % 2 == 0 else 0.25)
    assert 0.3 < latency.timeout_s(0.25, 0.5) <= 0.5
    assert latency.timeout_s(0.1, 0.1) == 0.1


def test_errors_say_whether_anything_was_done():
    seen: list[httpx.Request] = []
    client = scripted([refusal(503, "leader_unreachable", outcome="not_done", retry_after_ms=1),
                       refusal(503, "leader_changed", outcome="unknown", retry_after_ms=1)], seen)
    # A rollback is not repeated after an unknown outcome, but is after "nothing done".
    with pytest.raises(OutcomeUnknown) as unknown:
        client.config_rollback()
    assert len(seen) == 2 and unknown.value.code == "leader_changed" and unknown.value.outcome == "unknown"
    # Retries that run out after an attempt that may have been done: unknown, not "nothing done".
    seen.clear()
    client = scripted([timed_out] + [refused] * 5, seen)
    client.retries_max = 3
    with pytest.raises(Unavailable) as given_up:
        client.cancel(1)
    assert given_up.value.is_outcome_unknown
    seen.clear()
    client = scripted([refused] * 5, seen)
    client.retries_max = 3
    with pytest.raises(Unavailable) as nothing:
        client.cancel(1)
    assert nothing.value.outcome == "not_done" and not nothing.value.is_outcome_unknown


def test_a_keyed_submit_that_timed_out_is_repeated():
    seen: list[httpx.Request] = []
    client = scripted([timed_out, answer(201, {"task_id": 7, "deduplicated": True})], seen)
    assert client.submit("q", 1, idempotency_key="k") == 7
    assert len(seen) == 2


def test_a_rollback_answered_503_timeout_is_unknown_but_not_leader_is_retried_at_the_hint():
    seen: list[httpx.Request] = []
    client = scripted([refusal(503, "not_leader", leader_hint="n3:3", retry_after_ms=1),
                       refusal(503, "timeout", retry_after_ms=1)], seen)
    with pytest.raises(OutcomeUnknown) as unknown:
        client.config_rollback()
    assert [r.url.host for r in seen] == ["n1", "n3"], "the leader hint is preferred"
    assert unknown.value.code == "timeout"


def test_retry_after_is_honoured():
    seen: list[httpx.Request] = []
    client = scripted([answer(429, {"error": {"code": "queue_full", "message": "full"}}, {"retry-after": "1"}),
                       answer(200, {"id": 3})], seen)
    started = time.monotonic()
    client.get_task(3)
    assert time.monotonic() - started >= 0.95
    assert [r.url.host for r in seen] == ["n1", "n1"], "a 429 is retried on the same node"


def test_no_node_answering_is_unavailable_after_retries_max():
    seen: list[httpx.Request] = []
    client = scripted([refused] * 20, seen)
    client.retries_max = 4
    with pytest.raises(Unavailable) as unavailable:
        client.get_task(1)
    assert len(seen) == 5 and unavailable.value.status == 0


def test_definite_refusals_are_typed_and_not_retried():
    seen: list[httpx.Request] = []
    client = scripted([refusal(409, "superseded"), refusal(400, "invalid")], seen)
    with pytest.raises(Superseded) as superseded:
        client.complete(1, 2, "x")
    assert superseded.value.is_superseded and superseded.value.status == 409 and superseded.value.is_definite
    with pytest.raises(InvalidRequest):
        client.get_task(1)
    assert len(seen) == 2


def test_the_call_budget_bounds_retries_and_is_sent_as_a_deadline():
    seen: list[httpx.Request] = []
    client = scripted([refusal(503, "no_leader", retry_after_ms=400)] * 20, seen)
    client._core.call_timeout_s = 1.0
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.get_task(1)
    assert time.monotonic() - started < 1.2
    assert 0 < int(seen[0].headers["x-phalanx-deadline-ms"]) <= 1000


# ---- agent-side fencing ----


def test_an_older_fence_is_refused_and_the_memory_is_bounded():
    fences = FenceMemory(entries_max=3)
    assert fences.accept(1, 10)
    assert not fences.accept(1, 9)
    assert fences.accept(1, 11)
    for task_id in (2, 3, 4):
        fences.accept(task_id, 1)
    assert len(fences) == 3
    assert fences.accept(1, 5), "the oldest task was forgotten"


def test_a_lease_past_its_local_deadline_is_not_started():
    margin = lease_margin_s(1000)
    assert margin == 0.2
    assert lease_startable(100.0, 1000, 100.5, margin)
    assert not lease_startable(100.0, 1000, 100.85, margin)


# ---- the outbox file ----


def entry(task_id: int, fence: int = 1) -> dict:
    return {"task_id": task_id, "fence": fence, "kind": "complete", "result": {"n": task_id}}


def test_the_outbox_survives_reopening_and_drops_a_torn_last_line(tmp_path):
    path = str(tmp_path / "sub" / "agent.outbox")
    with Outbox(path) as outbox:
        first = outbox.push(entry(1))
        outbox.push(entry(2))
        outbox.remove(first)
    with open(path, "ab") as file:
        file.write(b'{"put": 9, "entry": {"task_id"')  # a crash mid-append
    with Outbox(path) as outbox:
        assert [e["task_id"] for e in outbox.entries()] == [2]
        outbox.push(entry(3))
    with Outbox(path) as outbox:
        assert [e["task_id"] for e in outbox.entries()] == [2, 3]
    with open(path) as file:
        assert all(json.loads(line) for line in file)


def test_the_outbox_is_bounded_compacted_and_exclusive(tmp_path):
    path = str(tmp_path / "agent.outbox")
    outbox = Outbox(path, entries_max=3)
    seqs = [outbox.push(entry(i)) for i in range(3)]
    with pytest.raises(OutboxFull):
        outbox.push(entry(4))
    with pytest.raises(OutboxLocked):
        Outbox(path)
    for _ in range(100):
        outbox.remove(seqs.pop(0))
        seqs.append(outbox.push(entry(5)))
    with open(path) as file:
        assert len(file.readlines()) < 3 + 2 * 70, "removed records are compacted away"
    outbox.close()
    with Outbox(path) as reopened:
        assert len(reopened) == 3


def test_submits_announce_their_priority_to_the_door() -> None:
    assert _door_priority(_Request("POST", "/v1/tasks", body={"queue": "q", "priority": 8})) == 8
    assert _door_priority(_Request("POST", "/v1/tasks", body={"queue": "q"})) == 5
    batch = {"tasks": [{"priority": 2}, {"priority": 7}, {}]}
    assert _door_priority(_Request("POST", "/v1/tasks/batch", body=batch)) == 7
    assert _door_priority(_Request("POST", "/v1/tasks/batch", body={"tasks": []})) is None
    assert _door_priority(_Request("POST", "/v1/agents/a/poll", body={"priority": 9})) is None
