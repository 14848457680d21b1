"""Starts a real `phalanx server` process per test and SIGKILLs it at teardown.

The binary is `PHALANX_BIN`, else `<repo>/target/debug/phalanx`
(`cargo build -p phalanx-cli`). A test may kill the server and start it again
from the same data directory and address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

from phalanx import Client

REPO = Path(__file__).resolve().parents[3]
READY_WITHIN_S = 30.0


def binary() -> str:
    return os.environ.get("PHALANX_BIN", str(REPO / "target" / "debug" / "phalanx"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `phalanx server` node on loopback (no token needed there)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="phalanx-py-")
        self.data_dir = os.path.join(self.dir, "data")
        self.addr = f"127.0.0.1:{free_port()}"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = open(os.path.join(self.dir, f"server-{self.starts}.log"), "wb")
        self.process = subprocess.Popen(
            [binary(), "server", "--node-id", "1", "--listen", self.addr, "--data-dir", self.data_dir],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PHALANX_LOG": os.environ.get("PHALANX_LOG", "warn")},
        )
        log.close()
        deadline = time.monotonic() + READY_WITHIN_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"phalanx server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"http://{self.addr}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"phalanx server not ready within {READY_WITHIN_S} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def log_tail(self, lines: int = 30) -> str:
        path = os.path.join(self.dir, f"server-{self.starts}.log")
        try:
            with open(path, errors="replace") as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def server() -> Iterator[Server]:
    if not os.path.exists(binary()):
        pytest.skip(f"no phalanx binary at {binary()} (cargo build -p phalanx-cli, or set PHALANX_BIN)")
    node = Server()
    node.start()
    try:
        yield node
    finally:
        node.kill()
        shutil.rmtree(node.dir, ignore_errors=True)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.addr) as client:
        yield client
