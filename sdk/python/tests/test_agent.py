"""The agent against a real server: handling, delegation, lease extension,
graceful stop, and the outbox across a SIGKILLed server and a restarted agent."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

from phalanx import Agent, AsyncAgent, Outbox, SyncTaskContext, TaskContext, TaskFailed, payload_hash

FAST = dict(poll_wait_ms=300, orchestrator_timeout_s=1.0)


async def wait_for(predicate, within_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {within_s} s"
        await asyncio.sleep(0.05)


def sleeper(seconds: float):
    async def handler(context: TaskContext):
        await asyncio.sleep(seconds)
        return {"slept": seconds, "fence": context.fence, "payload": context.payload}

    return handler


def test_a_blocking_agent_runs_plain_handlers_end_to_end(server, client):
    good = [client.submit("echo", {"x": i}) for i in range(4)]
    retryable = client.submit("echo", "boom", max_attempts=2)
    permanent = client.submit("echo", "fatal")
    seen_fences = []  # one fence per lease entry: tasks leased together share it

    def handler(context: SyncTaskContext):
        seen_fences.append((context.task_id, context.fence))
        assert context.remaining_s() > 0 and context.task_id == context.task["id"]
        if context.payload == "boom":
            raise TaskFailed("boom", retryable=True)
        if context.payload == "fatal":
            raise TaskFailed("cannot ever work", retryable=False)
        return {"echo": context.payload}

    agent = Agent(server.addr, "py-echo", ["echo"], handler, concurrency=3, poll_wait_ms=300)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while any(client.get_task(t)["state"] in ("pending", "leased") for t in good + [retryable, permanent]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        agent.stop()
        agent.join(10)
    assert [client.get_task(t)["result"] for t in good] == [{"echo": {"x": i}} for i in range(4)]
    dead = client.get_task(retryable)
    assert dead["state"] == "dead" and dead["attempts"] == 2 and dead["error"] == "boom"
    failed = client.get_task(permanent)
    assert failed["state"] == "failed" and failed["attempts"] == 1
    assert agent.stats.completed == 4 and agent.stats.failed == 3 and agent.stats.superseded == 0
    assert agent.state == "connected" and len(seen_fences) == len(set(seen_fences)) == 7
    assert all(a["agent_id"] != "py-echo" for a in client.agents()), "deregistered on stop"


async def test_delegation_spawns_children_awaits_and_combines(server, client):
    root = client.submit("plan", {"topic": "raft"}, conversation_id="conv-raft")

    async def planner(context: TaskContext):
        await context.context_put("topic", context.payload["topic"])
        children = [await context.spawn_child("part", {"i": i}) for i in range(2)]
        done = await context.await_tasks(children, 20)
        return {"sum": sum(task["result"] for task in done), "children": children}

    async def worker(context: TaskContext):
        topic = await context.context_get("topic")
        return context.payload["i"] + 10 + (0 if topic and topic["value"] == "raft" else 1000)

    agents = [AsyncAgent(server.addr, "py-planner", ["plan"], planner, **FAST),
              AsyncAgent(server.addr, "py-worker", ["part"], worker, concurrency=2, **FAST)]
    running = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await wait_for(lambda: client.get_task(root)["state"] == "succeeded", what="the root succeeded")
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*running)
    result = client.get_task(root)["result"]
    assert result["sum"] == 21
    for child_id in result["children"]:
        child = client.get_task(child_id)
        assert (child["parent_id"], child["hop_count"], child["conversation_id"]) == (root, 1, "conv-raft")


async def test_a_replaced_planner_adopts_the_children_of_the_earlier_attempt(server, client):
    root = client.submit("plan", {"topic": "fences"}, conversation_id="conv-fences", max_attempts=5)
    seen: list[dict] = []

    async def planner(context: TaskContext):
        seen.append({"attempt": context.attempts, "children": context.children, "fence": context.fence})
        await context.context_put("plan", {"attempt": context.attempts})
        children = []
        for i in range(3):
            children.append(await context.spawn_child("part", {"i": i}))
            if context.attempts == 1 and i == 1:
                raise TaskFailed("the planner crashed after two steps")
        done = await context.await_tasks(children, 20)
        return {"sum": sum(task["result"] for task in done), "children": children, "adopted": context.adopted}

    async def worker(context: TaskContext):
        return context.payload["i"] + 10

    agents = [AsyncAgent(server.addr, "py-planner", ["plan"], planner, **FAST),
              AsyncAgent(server.addr, "py-worker", ["part"], worker, concurrency=2, **FAST)]
    running = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await wait_for(lambda: client.get_task(root)["state"] == "succeeded", what="the root succeeded")
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*running)
    result = client.get_task(root)["result"]
    assert result["sum"] == 33
    # The second attempt was handed the first one's two children and adopted them.
    first, second = seen
    assert first["children"] == []
    listed = second["children"]
    assert [c["task_id"] for c in listed] == result["children"][:2] == result["adopted"]
    assert [c["payload_hash"] for c in listed] == [payload_hash({"i": i}) for i in range(2)]
    assert all(c["parent_fence"] == first["fence"] for c in listed)
    assert len(client.list_tasks(queue="part")["tasks"]) == 3, "no step was delegated twice"
    # The crashed attempt's context entry is gone; the accepted one's says who wrote it.
    entry = client.context_get("conv-fences")["entries"]["plan"]
    assert entry["value"] == {"attempt": 2} and entry["task_id"] == root and entry["fence"] == second["fence"]


async def test_a_long_task_keeps_its_lease_by_extending_it(server, client):
    task_id = client.submit("slow", 1)
    agent = AsyncAgent(server.addr, "py-long", ["slow"], sleeper(2.5), lease_ttl_ms=1000, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: client.get_task(task_id)["state"] == "succeeded", what="the long task succeeded")
    finally:
        agent.stop()
        await running
    task = client.get_task(task_id)
    assert task["attempts"] == 1 and task["superseded_count"] == 0 and task["result"]["fence"] == task["last_fence"]
    assert agent.stats.leases_lost == 0


async def test_stop_finishes_running_handlers_reports_and_deregisters(server, client):
    task_id = client.submit("slow", 1)
    agent = AsyncAgent(server.addr, "py-stopper", ["slow"], sleeper(1.0), **FAST)
    running = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.stats.tasks_started == 1, what="the handler started")
    agent.stop()
    await asyncio.wait_for(running, 10)
    assert client.get_task(task_id)["state"] == "succeeded"
    assert all(a["agent_id"] != "py-stopper" for a in client.agents())


async def test_a_cut_off_agent_outboxes_its_result_and_reconciles(server, client, tmp_path):
    task_id = client.submit("slow", "cut-off")
    outbox_path = str(tmp_path / "agent.outbox")
    agent = AsyncAgent(server.addr, "py-cut-off", ["slow"], sleeper(2.0), lease_ttl_ms=3000,
                       outbox_path=outbox_path, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.stats.tasks_started == 1, what="the handler started")
        server.kill()
        await wait_for(lambda: len(agent.outbox) == 1 and agent.state == "autonomous", what="result outboxed")
        with open(outbox_path) as file:
            records = [json.loads(line) for line in file]
        assert len(records) == 1
        stored = records[0]["entry"]
        assert (stored["task_id"], stored["kind"], stored["result"]["payload"]) == (task_id, "complete", "cut-off")
        server.start()
        await wait_for(lambda: len(agent.outbox) == 0 and agent.state == "connected", what="outbox reconciled")
    finally:
        agent.stop()
        await asyncio.wait_for(running, 15)
    task = client.get_task(task_id)
    assert task["state"] == "succeeded" and task["result"]["fence"] == stored["fence"] == task["last_fence"]
    assert agent.stats.reconciled == 1 and agent.stats.superseded == 0 and agent.stats.autonomous_periods >= 1
    assert [(o.task_id, o.answer, o.via_outbox) for o in agent.recent_outcomes] == [(task_id, "accepted", True)]
    assert [state for _, state in agent.state_history][-3:] == ["autonomous", "reconciling", "connected"]


async def test_a_stale_outbox_entry_is_superseded_and_changes_nothing(server, client, tmp_path):
    task_id = client.submit("slow", 1)
    old_epoch = client.register("py-late", ["slow"])["epoch"]
    old_fence = client.poll("py-late", old_epoch, wait_ms=1000, lease_ttl_ms=300)[0]["fence"]
    # The lease lapses; another agent is given the task with a newer fence and finishes it.
    rescuer_epoch = client.register("py-rescuer", ["slow"])["epoch"]
    deadline = time.monotonic() + 20
    while not (leases := client.poll("py-rescuer", rescuer_epoch, wait_ms=500, lease_ttl_ms=5000)):
        assert time.monotonic() < deadline
    assert leases[0]["fence"] > old_fence
    client.complete(task_id, leases[0]["fence"], "rescued")
    # The late agent comes back with an outbox holding its result under the old fence.
    outbox_path = str(tmp_path / "late.outbox")
    with Outbox(outbox_path) as outbox:
        outbox.push({"task_id": task_id, "fence": old_fence, "kind": "complete", "result": "late"})
    agent = AsyncAgent(server.addr, "py-late", ["slow"], sleeper(0), outbox_path=outbox_path, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: len(agent.outbox) == 0, what="outbox delivered")
    finally:
        agent.stop()
        await running
    assert agent.stats.superseded == 1 and agent.stats.reconciled == 1 and agent.stats.completed == 0
    assert [(o.answer, o.code) for o in agent.recent_outcomes] == [("superseded", "superseded")]
    task = client.get_task(task_id)
    assert task["state"] == "succeeded" and task["result"] == "rescued" and task["superseded_count"] == 1


async def test_an_outbox_survives_a_restart_of_the_agent(server, client, tmp_path):
    task_id = client.submit("slow", "survivor")
    outbox_path = str(tmp_path / "agent.outbox")
    first = AsyncAgent(server.addr, "py-restarted", ["slow"], sleeper(1.5), outbox_path=outbox_path, **FAST)
    running = asyncio.create_task(first.run())
    await wait_for(lambda: first.stats.tasks_started == 1, what="the handler started")
    server.kill()
    await wait_for(lambda: len(first.outbox) == 1, what="result outboxed")
    first.stop()
    await asyncio.wait_for(running, 15)

    # A new agent object (as after a process restart) finds the result and delivers it first.
    second = AsyncAgent(server.addr, "py-restarted", ["slow"], sleeper(0), outbox_path=outbox_path, **FAST)
    assert [e["task_id"] for e in second.outbox.entries()] == [task_id]
    server.start()
    running = asyncio.create_task(second.run())
    try:
        await wait_for(lambda: len(second.outbox) == 0, what="outbox delivered")
    finally:
        second.stop()
        await asyncio.wait_for(running, 15)
    task = client.get_task(task_id)
    assert task["state"] == "succeeded" and task["result"]["payload"] == "survivor"
    assert second.stats.reconciled == 1 and second.stats.completed == 1
    assert [state for _, state in second.state_history][:2] == ["reconciling", "connected"], "delivered first"
    assert second.stats.registrations == 1


async def test_autonomous_work_stays_within_its_budget(server, tmp_path):
    runs: list[float] = []

    async def local_work():
        runs.append(time.monotonic())

    server.kill()
    agent = AsyncAgent(server.addr, "py-alone", ["q"], sleeper(0), outbox_path=str(tmp_path / "o.outbox"),
                       autonomous_handler=local_work, autonomy_tasks_max=3, autonomy_seconds_max=60, **FAST)
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: len(runs) == 3, what="three autonomous runs")
        assert agent.state == "autonomous"
        await asyncio.sleep(1.0)
        assert len(runs) == 3, "the autonomy budget holds"
    finally:
        agent.stop()
        await asyncio.wait_for(running, 10)


AGENT_PROCESS = """
import sys, time
from phalanx import Agent

def handler(context):
    open(sys.argv[2], "w").close()  # the handler runs
    time.sleep(1.0)
    return {"done": context.payload}

Agent(sys.argv[1], "py-sigterm", ["slow"], handler, poll_wait_ms=300).run()
"""


def test_sigterm_stops_an_agent_process_gracefully(server, client, tmp_path):
    task_id = client.submit("slow", "graceful")
    started = tmp_path / "started"
    process = subprocess.Popen([sys.executable, "-c", AGENT_PROCESS, server.addr, str(started)])
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    task = client.get_task(task_id)
    assert task["state"] == "succeeded" and task["result"] == {"done": "graceful"}
    assert all(a["agent_id"] != "py-sigterm" for a in client.agents()), "deregistered"
