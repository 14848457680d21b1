"""A multi-agent pipeline on the Python SDK: a planner fans out to three
researchers and a writer combines their notes. Deterministic stand-ins sit
where an LLM call would be. The first planner of the first question dies
mid-plan; the next attempt is handed the children it delegated
(`context.children`) and adopts them instead of running them twice.

Run from the repository root (starts a one-node cluster in a temporary
directory with the debug binary unless PHALANX_NODES is set):

    cargo build -p phalanx-cli && pip install -e sdk/python && python3 examples/python/pipeline.py
"""

import asyncio
import os
import socket
import subprocess
import tempfile
import time

import httpx

from phalanx import AsyncAgent, Client, TaskContext, TaskFailed


async def planner(context: TaskContext):
    question = context.task["payload"]["question"]
    if context.children:
        print(f"planner, attempt {context.attempts} of task {context.task_id}: "
              f"an earlier attempt delegated {len(context.children)} children")
    research = []
    for aspect in ("history", "mechanism", "trade-offs"):
        research.append(await context.spawn_child("research", {"question": question, "aspect": aspect}))
        # Stand-in for a planner that dies mid-plan: the first attempt of a
        # task marked crash_once gives up after two of its three steps.
        if context.payload.get("crash_once") and context.attempts == 1 and len(research) == 2:
            raise TaskFailed("the planner crashed after delegating two steps")
    if context.adopted:
        print(f"  adopted children {context.adopted} instead of delegating them again")
    notes = [task["result"] for task in await context.await_tasks(research, 60)]
    essay = await context.spawn_child("write", {"question": question, "notes": notes})
    return (await context.await_tasks([essay], 60))[0]["result"]


async def researcher(context: TaskContext):
    await asyncio.sleep(0.1)
    payload = context.task["payload"]
    return f"{payload['aspect']} of {payload['question']}"


async def writer(context: TaskContext):
    payload = context.task["payload"]
    return {"essay": f"On {payload['question']}: " + "; ".join(payload["notes"])}


def start_server() -> tuple[str, subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
    binary = os.environ.get("PHALANX_BIN", "target/debug/phalanx")
    process = subprocess.Popen([binary, "server", "--listen", addr, "--data-dir", tempfile.mkdtemp()],
                               stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(f"http://{addr}/health/ready").status_code == 200:
                return addr, process
        except httpx.HTTPError:
            time.sleep(0.05)


async def main() -> None:
    process = None
    nodes = os.environ.get("PHALANX_NODES")
    if nodes is None:
        nodes, process = start_server()
        print(f"started a one-node cluster at {nodes}")
    agents = [AsyncAgent(nodes, "py-planner", ["plan"], planner, concurrency=4, poll_wait_ms=500),
              AsyncAgent(nodes, "py-researcher", ["research"], researcher, concurrency=4, poll_wait_ms=500),
              AsyncAgent(nodes, "py-writer", ["write"], writer, concurrency=2, poll_wait_ms=500)]
    running = [asyncio.create_task(agent.run()) for agent in agents]
    client = Client(nodes)
    ids = [client.submit("plan", {"question": q, "crash_once": i == 0}, idempotency_key=f"py-pipeline-{i}")
           for i, q in enumerate(["how does Raft elect a leader", "why fence a lease"])]
    while any(client.get_task(i)["state"] in ("pending", "leased") for i in ids):
        await asyncio.sleep(0.1)
    for task_id in ids:
        task = client.get_task(task_id)
        print(f"task {task_id} ({task['state']}): {task['result']}")
    for agent in agents:
        agent.stop()
    await asyncio.gather(*running)
    if process is not None:
        process.kill()


if __name__ == "__main__":
    asyncio.run(main())
