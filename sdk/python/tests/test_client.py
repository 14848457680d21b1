"""The Python client against a real server: task life cycle, fencing, errors."""

import pytest

from phalanx import Client, PhalanxError


def test_submit_get_list_cancel(server):
    client = Client(server.addr)
    first = client.submit("summarise", {"text": "hello"}, idempotency_key="k1")
    assert client.submit("summarise", {"text": "hello"}, idempotency_key="k1") == first
    second = client.submit("summarise", 2, priority=9)
    assert client.get_task(first)["payload"] == {"text": "hello"}
    assert [t["id"] for t in client.list_tasks(queue="summarise")["tasks"]] == [first, second]
    assert client.cancel(second)["state"] == "cancelled"
    assert client.get_task(second, stale=True)["state"] == "cancelled"


def test_lease_complete_and_a_stale_fence_is_superseded(server):
    client = Client(server.addr)
    task_id = client.submit("work", {"n": 1})
    epoch = client.register("py-agent", ["work"], capacity=2)["epoch"]
    leases = client.poll("py-agent", epoch, max_tasks=2, wait_ms=1000)
    assert len(leases) == 1 and leases[0]["task"]["id"] == task_id
    fence = leases[0]["fence"]
    with pytest.raises(PhalanxError) as refused:
        client.complete(task_id, fence - 1, "late")
    assert refused.value.is_superseded and refused.value.status == 409
    assert client.get_task(task_id)["state"] == "leased"
    assert client.complete(task_id, fence, {"ok": True})["result"] == {"ok": True}


def test_bad_input_is_a_clear_error(server):
    client = Client(server.addr)
    with pytest.raises(PhalanxError) as invalid:
        client.submit("bad queue", 1)
    assert invalid.value.status == 400 and invalid.value.code == "invalid"
    with pytest.raises(PhalanxError) as missing:
        client.get_task(999)
    assert missing.value.status == 404 and missing.value.code == "task_not_found"
    assert client.list_tasks()["tasks"] == []
