"""A task queue from one asyncio Python process (issue 16): 20,000 tasks, 256 submits in flight, 4 consumers
taking 64 at a time and acknowledging each task. Prints tasks/s and the client's CPU, for:

- `phalanx-batched`: the Python SDK as agents use it now: each task acknowledged by its own
  `CompleteBatcher.complete` call, sent together (`POST /v1/tasks/complete`, `Prefer: return=minimal`);
- `phalanx-single`: the same, one `complete` request per task answered with the whole task (the path
  before issue 16), for a ratio in the same run;
- `phalanx-batched-submits`: the same, the submits also sent together (`SubmitBatcher`: what arrives within
  5 ms, up to 64, in one `POST /v1/tasks/batch`, each caller answered by its own task's slot);
- `redis`: a reliable queue on Redis (LPUSH; LMOVE to a processing list, 64 in one pipeline; LREM to
  acknowledge each task, pipelined), the server started here with `--appendonly yes --appendfsync always`,
  when `redis-server` and redis-py are installed.

Usage: python bench/python/queue_bench.py [--phalanx-bin target/release/phalanx] [--tasks 20000]
       [--systems phalanx-batched,phalanx-batched-submits,phalanx-single,redis] [--rounds 1]
Each system runs against a fresh server on a temporary directory; with --rounds N the systems alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "sdk" / "python"))

from phalanx import AsyncClient, PhalanxError  # noqa: E402
from phalanx._batch import CompleteBatcher, SubmitBatcher  # noqa: E402

SUBMITS_IN_FLIGHT = 256
CONSUMERS = 4
TAKE = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {within_s} s")


async def submit_all(tasks: int, submit: Callable[[int], Awaitable[Any]]) -> None:
    next_task = 0

    async def worker() -> None:
        nonlocal next_task
        while next_task < tasks:
            n = next_task
            next_task += 1
            for attempt in range(10):
                try:
                    await submit(n)
                    break
                except PhalanxError:
                    # Keyed: sending it again is harmless (a loaded machine may time an attempt out).
                    if attempt == 9:
                        raise

    await asyncio.gather(*(worker() for _ in range(SUBMITS_IN_FLIGHT)))


def measure(name: str, run: Callable[[], Awaitable[int]]) -> dict[str, float]:
    cpu = time.process_time()
    start = time.monotonic()
    done = asyncio.run(run())
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu
    result = {"tasks_per_s": done / wall, "cpu_pct": 100 * cpu / wall, "seconds": wall, "tasks": done}
    print(f"{name:>16}: {done} tasks in {wall:.2f} s = {done / wall:,.0f} tasks/s, client CPU {100 * cpu / wall:.0f}% "
          f"of a core ({1e6 * cpu / done:.0f} us per task)", flush=True)
    return result


# ---- Phalanx ----


def phalanx_run(binary: str, tasks: int, batched: bool, batched_submits: bool = False) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        # A loaded machine (three engineers on two cores) answers slowly: long attempts, no failover to do.
        async with AsyncClient(ADDR, write_timeout_s=10.0, timeout_s=30.0) as client:
            acked = 0
            finished = asyncio.Event()

            async def consumer(i: int) -> None:
                nonlocal acked
                agent_id = f"bench-{i}"
                registration = await client.register(agent_id, ["bench"], capacity=TAKE)
                epoch = registration["epoch"]
                batcher = CompleteBatcher(client)

                async def heartbeats() -> None:
                    while not finished.is_set():
                        await asyncio.sleep(1.0)
                        await client.heartbeat(agent_id, epoch)

                beating = asyncio.create_task(heartbeats())
                beating.add_done_callback(lambda _: None)
                while not finished.is_set():
                    leases = await client.poll(agent_id, epoch, max_tasks=TAKE, wait_ms=200)
                    complete = batcher.complete if batched else client.complete
                    answers = await asyncio.gather(*(complete(lease["task"]["id"], lease["fence"], "ok")
                                                     for lease in leases), return_exceptions=True)
                    # A result not acknowledged is leased again when its lease lapses.
                    acked += sum(1 for answer in answers if not isinstance(answer, BaseException))
                    if acked >= tasks:
                        finished.set()

            consumers = [asyncio.create_task(consumer(i)) for i in range(CONSUMERS)]
            if batched_submits:
                submitter = SubmitBatcher(client)
                await submit_all(tasks, lambda n: submitter.submit("bench", n, idempotency_key=f"k-{n}"))
            else:
                await submit_all(tasks, lambda n: client.submit("bench", n, idempotency_key=f"k-{n}"))
            await asyncio.wait_for(finished.wait(), 300)
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            return acked

    return run


ADDR = ""


def with_phalanx(binary: str, body: Callable[[], dict[str, float]]) -> dict[str, float]:
    global ADDR
    directory = tempfile.mkdtemp(prefix="queue-bench-phalanx-")
    ADDR = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([binary, "server", "--node-id", "1", "--listen", ADDR, "--data-dir",
                                os.path.join(directory, "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://{ADDR}/health/ready")
        return body()
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


# ---- Redis ----


def redis_run(port: int, tasks: int) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        import redis.asyncio as redis

        # Blocking: a request past the pool's connections waits for one (as the Phalanx client's do,
        # docs/sdk.md, 11) instead of failing with "Too many connections".
        pool = redis.BlockingConnectionPool(port=port, max_connections=SUBMITS_IN_FLIGHT + 2 * CONSUMERS, timeout=30)
        connection = redis.Redis(connection_pool=pool)
        acked = 0
        finished = asyncio.Event()

        async def consumer(i: int) -> None:
            nonlocal acked
            processing = f"processing-{i}"
            while not finished.is_set():
                pipe = connection.pipeline(transaction=False)
                for _ in range(TAKE):
                    pipe.lmove("queue", processing, "RIGHT", "LEFT")
                taken = [t for t in await pipe.execute() if t is not None]
                if not taken:
                    await asyncio.sleep(0.001)
                    continue

                async def ack(task: bytes) -> None:
                    await connection.lrem(processing, 1, task)

                await asyncio.gather(*(ack(task) for task in taken))
                acked += len(taken)
                if acked >= tasks:
                    finished.set()

        consumers = [asyncio.create_task(consumer(i)) for i in range(CONSUMERS)]
        await submit_all(tasks, lambda n: connection.lpush("queue", f"task-{n}"))
        await asyncio.wait_for(finished.wait(), 300)
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await connection.aclose()
        return acked

    return run


def with_redis(body: Callable[[int], dict[str, float]]) -> dict[str, float]:
    directory = tempfile.mkdtemp(prefix="queue-bench-redis-")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--dir", directory, "--appendonly", "yes",
                                "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return body(port)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phalanx-bin", default=str(REPO / "target" / "release" / "phalanx"))
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--systems", default="phalanx-batched,phalanx-single,redis")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"{args.tasks} tasks, {SUBMITS_IN_FLIGHT} submits in flight, {CONSUMERS} consumers taking {TAKE} at a "
          f"time; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for system in args.systems.split(","):
            if system == "redis":
                if shutil.which("redis-server") is None:
                    print("redis: redis-server is not installed; skipped")
                    continue
                try:
                    import redis  # noqa: F401
                except ImportError:
                    print("redis: redis-py is not installed; skipped")
                    continue
                result = with_redis(lambda port: measure("redis", redis_run(port, args.tasks)))
            else:
                if system not in ("phalanx-batched", "phalanx-single", "phalanx-batched-submits"):
                    raise SystemExit(f"unknown system {system}")
                batched = system != "phalanx-single"
                batched_submits = system == "phalanx-batched-submits"
                result = with_phalanx(args.phalanx_bin, lambda: measure(
                    system, phalanx_run(args.phalanx_bin, args.tasks, batched, batched_submits)))
            results.setdefault(system, []).append(result)
    if "phalanx-batched" in results:
        best = max(r["tasks_per_s"] for r in results["phalanx-batched"])
        for other, runs in results.items():
            if other != "phalanx-batched":
                print(f"phalanx-batched / {other}: {best / max(r['tasks_per_s'] for r in runs):.2f}x (best of each)")


if __name__ == "__main__":
    main()
