"""The Python agent against a real server: handling, delegation, and the
outbox across a cluster outage and an agent restart."""

import asyncio
import json
import os
import time

from phalanx import AsyncAgent, Client, TaskContext, TaskFailed


async def wait_for(predicate, within=20.0):
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def run_agent(agent):
    return asyncio.create_task(agent.run())


async def test_agent_handles_tasks_and_failures(server):
    client = Client(server.addr)
    good = client.submit("echo", {"x": 1})
    bad = client.submit("echo", "boom", max_attempts=1)

    async def handler(context: TaskContext):
        if context.task["payload"] == "boom":
            raise TaskFailed("boom", retryable=True)
        return {"echo": context.task["payload"], "fence": context.fence}

    agent = AsyncAgent(server.addr, "py-echo", ["echo"], handler, concurrency=2, poll_wait_ms=300)
    running = await run_agent(agent)
    await wait_for(lambda: client.get_task(good)["state"] == "succeeded" and client.get_task(bad)["state"] == "dead")
    assert client.get_task(good)["result"]["echo"] == {"x": 1}
    agent.stop()
    await running


async def test_delegation_fans_out_and_in(server):
    client = Client(server.addr)
    root = client.submit("plan", {"topic": "raft"})

    async def planner(context: TaskContext):
        children = [await context.spawn_child("part", {"i": i}) for i in range(2)]
        done = await context.await_tasks(children, 20)
        return sum(task["result"] for task in done)

    async def worker(context: TaskContext):
        return context.task["payload"]["i"] + 10

    agents = [AsyncAgent(server.addr, "py-planner", ["plan"], planner, poll_wait_ms=300),
              AsyncAgent(server.addr, "py-worker", ["part"], worker, concurrency=2, poll_wait_ms=300)]
    running = [await run_agent(a) for a in agents]
    await wait_for(lambda: client.get_task(root)["state"] == "succeeded")
    assert client.get_task(root)["result"] == 21
    children = client.list_tasks(queue="part")["tasks"]
    assert all(t["parent_id"] == root and t["hop_count"] == 1 for t in children)
    for agent in agents:
        agent.stop()
    await asyncio.gather(*running)


async def slow(context: TaskContext):
    await asyncio.sleep(1.5)
    return {"fence": context.fence}


async def test_cut_off_agent_keeps_result_in_outbox_and_reconciles(server, tmp_path):
    client = Client(server.addr)
    task_id = client.submit("slow", 1)
    outbox = str(tmp_path / "agent.outbox")
    agent = AsyncAgent(server.addr, "py-cut-off", ["slow"], slow, poll_wait_ms=300,
                       orchestrator_timeout_s=0.5, outbox_path=outbox)
    running = await run_agent(agent)
    await wait_for(lambda: client.get_task(task_id)["state"] == "leased")
    server.kill()
    await wait_for(lambda: len(agent.outbox) == 1)
    assert agent.state == "autonomous"
    with open(outbox) as file:
        assert json.loads(file.readline())["task_id"] == task_id
    server.start()
    await wait_for(lambda: len(agent.outbox) == 0)
    assert Client(server.addr).get_task(task_id)["state"] == "succeeded"
    assert agent.stats.reconciled == 1 and agent.stats.superseded == 0
    agent.stop()
    await running


async def test_restarted_agent_delivers_its_outbox_and_a_stale_entry_is_superseded(server, tmp_path):
    client = Client(server.addr)
    task_id = client.submit("slow", 2)
    outbox = str(tmp_path / "agent.outbox")
    first = AsyncAgent(server.addr, "py-late", ["slow"], slow, poll_wait_ms=300, lease_ttl_ms=1000,
                       orchestrator_timeout_s=0.5, outbox_path=outbox)
    running = await run_agent(first)
    await wait_for(lambda: client.get_task(task_id)["state"] == "leased")
    server.kill()
    await wait_for(lambda: len(first.outbox) == 1)
    first.stop()
    await running

    server.start()
    client = Client(server.addr)
    epoch = client.register("rescuer", ["slow"])["epoch"]
    deadline = time.monotonic() + 20
    while True:
        leases = client.poll("rescuer", epoch, wait_ms=500)
        if leases:
            break
        assert time.monotonic() < deadline
    client.complete(task_id, leases[0]["fence"], "rescued")

    restarted = AsyncAgent(server.addr, "py-late", ["slow"], slow, poll_wait_ms=300,
                           orchestrator_timeout_s=0.5, outbox_path=outbox)
    assert len(restarted.outbox) == 1, "the outbox survived the restart"
    running = await run_agent(restarted)
    await wait_for(lambda: len(restarted.outbox) == 0)
    assert restarted.stats.superseded == 1
    task = client.get_task(task_id)
    assert task["result"] == "rescued" and task["superseded_count"] == 1
    restarted.stop()
    await running
    assert os.path.exists(outbox)


async def test_autonomous_work_stays_within_its_budget(server, tmp_path):
    runs = []

    async def local_work():
        runs.append(time.monotonic())

    async def handler(context: TaskContext):
        return None

    server.kill()
    agent = AsyncAgent(server.addr, "py-alone", ["q"], handler, poll_wait_ms=300, orchestrator_timeout_s=0.3,
                       outbox_path=str(tmp_path / "o.outbox"), autonomous_handler=local_work,
                       autonomy_tasks_max=3, autonomy_seconds_max=60)
    running = await run_agent(agent)
    await wait_for(lambda: len(runs) == 3)
    await asyncio.sleep(1.0)
    assert len(runs) == 3, "the autonomy budget holds"
    assert agent.state == "autonomous"
    agent.stop()
    await asyncio.wait_for(running, 10)
