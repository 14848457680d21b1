"""A fleet of agents calling a rate-limited LLM provider, without and with Phalanx's flow control.

The provider is simulated by a small HTTP server in this script: per API key it allows `--rpm` requests and
`--tpm` tokens in any 60 s window (a request's tokens counted when it is made, as providers count `max_tokens`),
and answers 429 past them. A fleet of agents works through a backlog of tasks, each one provider call of a few
hundred tokens; a 429 fails the attempt (retryable, so the task is tried again after a backoff).

The same backlog runs twice, each time on a fresh API key (so the provider's windows start empty):

1. without limits: the fleet calls as fast as it can, and the provider refuses most calls;
2. with `PUT /v1/limits/{key}` set to the provider's limits: `tokens_per_minute` = tpm (each task carries its
   tokens as `cost_estimate`, and reports them as usage), and a token bucket that never passes rpm in any 60 s:
   `rate_per_second` = rpm / 120 with a `burst` of rpm / 2 (at most rpm / 2 + 60 x rpm / 120 = rpm grants in any
   minute). Dispatch grants no more than the provider takes: the 429s drop to zero, and the fleet is served as
   much as the provider allows (here the tokens bind: tpm / 200 tokens a call = 150 calls a minute).

Phalanx's minute is six slots of 10 s, so it forgets a token report 50 to 60 s after it, where this provider
forgets at exactly 60 s: runs of under 50 s, as here, cannot tell the difference.

Run from the repository root (starts a one-node cluster with the release binary, or PHALANX_BIN, unless
`--nodes` or PHALANX_NODES names one):

    cargo build --release -p phalanx-cli && pip install -e sdk/python && python3 examples/flow_control/fleet.py

Each run lasts `--seconds` (default 10): the whole example takes well under a minute. With `--json` the last line
is the figures as JSON (the test in sdk/python/tests/test_flow.py reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import httpx

from phalanx import AsyncAgent, Client, TaskContext, TaskFailed

WINDOW_S = 60.0


class Provider:
    """Requests and tokens per API key over a sliding 60 s window; 429 past either limit."""

    def __init__(self, rpm: int, tpm: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.lock = threading.Lock()
        # key -> deque of (time, tokens) of accepted requests
        self.calls: dict[str, collections.deque[tuple[float, int]]] = collections.defaultdict(collections.deque)
        self.accepted: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.tokens: collections.Counter[str] = collections.Counter()

    def call(self, key: str, tokens: int) -> bool:
        now = time.monotonic()
        with self.lock:
            calls = self.calls[key]
            while calls and calls[0][0] <= now - WINDOW_S:
                calls.popleft()
            used = sum(t for _, t in calls)
            if len(calls) + 1 > self.rpm or used + tokens > self.tpm:
                self.rejected[key] += 1
                return False
            calls.append((now, tokens))
            self.accepted[key] += 1
            self.tokens[key] += tokens
            return True

    def serve(self) -> tuple[str, ThreadingHTTPServer]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                ok = provider.call(key, int(body["max_tokens"]))
                answer = {"usage": {"prompt_tokens": int(body["max_tokens"]) // 2,
                                    "completion_tokens": int(body["max_tokens"]) - int(body["max_tokens"]) // 2}}
                payload = json.dumps(answer if ok else {"error": "rate_limited"}).encode()
                self.send_response(200 if ok else 429)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}", server


def start_node() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
    binary = os.environ.get("PHALANX_BIN", "target/release/phalanx")
    process = subprocess.Popen([binary, "server", "--listen", addr, "--data-dir", tempfile.mkdtemp()],
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{addr}/health/ready").status_code == 200:
                return addr, process
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{binary} did not become ready at {addr}")


async def run_fleet(nodes: str, provider_url: str, provider: Provider, key: str, limited: bool, seconds: float,
                    args: argparse.Namespace) -> dict[str, Any]:
    """One run: the backlog on queue `llm-<key>`, the fleet for `seconds`, the provider's counts for `key`."""
    client = Client(nodes)
    queue = f"llm-{key.replace(':', '-')}"
    if limited:
        client.set_key_limits(key, {"rate_per_second": round(args.rpm / (2 * WINDOW_S), 3),
                                    "burst": max(1, args.rpm // 2), "tokens_per_minute": args.tpm})
    rng = random.Random(7)
    for i in range(0, args.tasks, 100):
        specs = []
        for j in range(i, min(i + 100, args.tasks)):
            tokens = rng.randint(100, 300)
            specs.append({"queue": queue, "payload": {"prompt": f"question {j}", "max_tokens": tokens},
                          "concurrency_key": key, "cost_estimate": tokens, "max_attempts": 50})
        client.submit_batch(specs)  # type: ignore[arg-type]

    http = httpx.AsyncClient(timeout=10)

    async def call_provider(context: TaskContext) -> Any:
        tokens = context.payload["max_tokens"]
        answer = await http.post(f"{provider_url}/v1/complete", json={"prompt": context.payload["prompt"],
                                                                      "max_tokens": tokens},
                                 headers={"Authorization": f"Bearer {key}"})
        if answer.status_code == 429:
            raise TaskFailed("provider: 429 rate limited", retryable=True)
        usage = answer.json()["usage"]
        context.report_usage(tokens_in=usage["prompt_tokens"], tokens_out=usage["completion_tokens"])
        return {"tokens": tokens}

    agents = [AsyncAgent(nodes, f"fleet-{queue}-{i}", [queue], call_provider, concurrency=args.concurrency,
                         poll_wait_ms=200) for i in range(args.agents)]
    running = [asyncio.create_task(agent.run()) for agent in agents]
    await asyncio.sleep(seconds)
    for agent in agents:
        agent.stop()
    await asyncio.gather(*running)
    await http.aclose()
    client.close()
    accepted = provider.accepted[key]
    return {"limits": limited, "accepted": accepted, "rejected_429": provider.rejected[key],
            "tokens": provider.tokens[key], "requests_per_second": round(accepted / seconds, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default=os.environ.get("PHALANX_NODES"), help="a running cluster's nodes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rpm", type=int, default=300, help="the provider's requests per minute per key")
    parser.add_argument("--tpm", type=int, default=30_000, help="the provider's tokens per minute per key")
    parser.add_argument("--tasks", type=int, default=600, help="the backlog of each run")
    parser.add_argument("--agents", type=int, default=4, help="agents in the fleet")
    parser.add_argument("--concurrency", type=int, default=4, help="tasks each agent runs at once")
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = parser.parse_args()
    process: Optional[subprocess.Popen[bytes]] = None
    nodes = args.nodes
    if nodes is None:
        nodes, process = start_node()
    provider = Provider(args.rpm, args.tpm)
    provider_url, server = provider.serve()
    print(f"provider at {provider_url}: {args.rpm} requests and {args.tpm} tokens per minute per key; "
          f"cluster at {nodes}; {args.agents} agents x {args.concurrency}; {args.seconds:g} s per run")
    try:
        # A fresh key per run, so that each starts with the provider's windows empty.
        without = await run_fleet(nodes, provider_url, provider, f"openai:key-{os.getpid()}-a", False,
                                  args.seconds, args)
        print(f"without limits: {without['accepted']} calls served, {without['rejected_429']} answered 429, "
              f"{without['requests_per_second']} calls/s")
        with_limits = await run_fleet(nodes, provider_url, provider, f"openai:key-{os.getpid()}-b", True,
                                      args.seconds, args)
        print(f"with limits:    {with_limits['accepted']} calls served, {with_limits['rejected_429']} answered 429, "
              f"{with_limits['requests_per_second']} calls/s (the provider allows {args.rpm} calls "
              f"and {args.tpm} tokens a minute; {with_limits['tokens']} tokens used)")
        if args.json:
            print(json.dumps({"without_limits": without, "with_limits": with_limits,
                              "provider": {"rpm": args.rpm, "tpm": args.tpm}}))
    finally:
        server.shutdown()
        if process is not None:
            process.kill()


if __name__ == "__main__":
    asyncio.run(main())
