"""Flow control through the SDK against a real server (docs/api.md, "Flow control"): submit with a key, a cost
estimate and a budget; the limits table; a held-back task's `waiting_on`; pause, resume and replay; usage reported
by `complete` and by a handler through `report_usage`; and the example of `examples/flow_control`, run briefly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phalanx import Agent, Conflict, InvalidRequest, NotFound, SyncTaskContext

REPO = Path(__file__).resolve().parents[3]


def test_limits_waiting_on_pause_resume_and_replay(server, client):
    rule = client.set_key_limits("tenant:*", {"concurrency_max": 1, "rate_per_second": 2.5, "weight": 2})
    assert rule == {"key": "tenant:*", "limits": {"concurrency_max": 1, "rate_per_second": 2.5, "weight": 2}}
    with pytest.raises(InvalidRequest):
        client.set_key_limits("tenant:*", {"weight": 0})
    first = client.submit("llm", "a", concurrency_key="tenant:x", cost_estimate=100, budget={"tokens_max": 10_000})
    second = client.submit("llm", "b", concurrency_key="tenant:x", max_attempts=1)
    registration = client.register("py-flow", ["llm"], capacity=4)
    leases = client.poll("py-flow", registration["epoch"], max_tasks=4)
    assert [lease["task"]["id"] for lease in leases] == [first], "concurrency_max=1 per tenant key"
    waiting = client.get_task(second)
    assert waiting["waiting_on"] == {"key": "tenant:x", "limit": "concurrency_max", "rule": "tenant:*"}
    table = client.limits()
    assert [rule["key"] for rule in table["rules"]] == ["tenant:*"]
    assert client.key_limits("tenant:x")["held"] == 1
    usage = {"tokens_in": 30, "tokens_out": 20, "cost": 3}
    done = client.complete(first, leases[0]["fence"], "ok", usage=usage)
    assert done["usage"] == usage
    assert client.key_limits("tenant:x")["tokens_in_window"] == 50
    assert any(tree["root_id"] == first for tree in client.status()["trees"])

    assert client.pause(second)["state"] == "paused"
    assert client.get_task(second)["pause"]["cause"] == "operator"
    assert client.resume(second)["state"] == "pending"
    with pytest.raises(Conflict) as refused:
        client.resume(second)
    assert refused.value.code == "not_paused"
    lease = client.poll("py-flow", registration["epoch"], max_tasks=4)[0]
    client.fail(second, lease["fence"], "boom", usage={"tokens_in": 5})
    assert client.get_task(second)["state"] == "dead"
    assert client.replay("dead", 10, queue="llm", concurrency_key="tenant:x") == [second]
    replayed = client.get_task(second)
    assert (replayed["state"], replayed["attempts"], replayed["replays"]) == ("pending", 0, 1)
    assert client.replay("dead", 10) == []
    with pytest.raises(InvalidRequest):
        client.replay("succeeded", 10)

    assert client.set_budget(first, {"tokens_max": 20_000}) == []
    assert client.get_task(first)["budget"] == {"tokens_max": 20_000}
    client.delete_key_limits("tenant:*")
    with pytest.raises(NotFound):
        client.delete_key_limits("tenant:*")


def test_a_handler_reports_usage_and_a_budget_pauses_the_tree(server, client):
    root = client.submit("plan", "go", budget={"tokens_max": 100})

    def handler(context: SyncTaskContext):
        if context.queue == "plan":
            context.spawn_child("work", "step")
            context.report_usage(tokens_in=70, tokens_out=50, cost=9)
            return "planned"
        return "worked"

    agent = Agent(server.addr, "py-planner", ["plan"], handler, poll_wait_ms=300)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while client.get_task(root)["state"] != "succeeded":
            assert time.monotonic() < deadline, client.get_task(root)
            time.sleep(0.05)
    finally:
        agent.stop()
        agent.join(10)
    assert client.get_task(root)["usage"] == {"tokens_in": 70, "tokens_out": 50, "cost": 9}
    child = client.list_tasks(queue="work")["tasks"][0]
    assert child["state"] == "paused" and child["pause"]["cause"] == "budget"
    with pytest.raises(Conflict) as refused:
        client.resume(child["id"])
    assert refused.value.code == "budget_exhausted"
    assert client.set_budget(root, {"tokens_max": 1_000}) == [child["id"]]
    assert client.get_task(child["id"])["state"] == "pending"


def test_the_flow_control_example_sees_no_429_with_limits(server):
    """`examples/flow_control/fleet.py`, briefly, against the test's node."""
    script = REPO / "examples" / "flow_control" / "fleet.py"
    answer = subprocess.run(
        [sys.executable, str(script), "--nodes", server.addr, "--seconds", "6", "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "sdk" / "python")},
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    import json
    report = json.loads(answer.stdout.strip().splitlines()[-1])
    assert report["with_limits"]["rejected_429"] == 0, report
    assert report["without_limits"]["rejected_429"] > 0, report
    assert report["with_limits"]["accepted"] > 0, report
