"""Starts a real `phalanx server` process per test and SIGKILLs it at teardown.

The binary is `PHALANX_BIN`, else `<repo>/target/debug/phalanx`
(`cargo build -p phalanx-cli`). A test may kill the server and start it again
from the same data directory and address.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
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


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """For the tests' raw HTTP fakes: one request read off `reader` (head and body); its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return head


class Server:
    """One `phalanx server` node on loopback (no token needed there)."""

    def __init__(self, extra_args: Optional[list[str]] = None, ca_file: Optional[str] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="phalanx-py-")
        self.data_dir = os.path.join(self.dir, "data")
        self.addr = f"127.0.0.1:{free_port()}"
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0
        self.extra_args = extra_args or []
        # A node with TLS is probed over https, verified by this CA file.
        self.ca_file = ca_file

    def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = open(os.path.join(self.dir, f"server-{self.starts}.log"), "wb")
        self.process = subprocess.Popen(
            [binary(), "server", "--node-id", "1", "--listen", self.addr, "--data-dir", self.data_dir,
             *self.extra_args],
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
                scheme, verify = ("https", ssl.create_default_context(cafile=self.ca_file)) \
                    if self.ca_file else ("http", True)
                if httpx.get(f"{scheme}://{self.addr}/health/ready", timeout=1, verify=verify).status_code == 200:
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


def make_pki(directory: str) -> tuple[str, str, str]:
    """A test CA and a certificate it signed for 127.0.0.1 (openssl): (ca, cert, key) paths."""
    ca_key, ca, key, csr, cert, ext = (os.path.join(directory, name) for name in
                                      ("ca.key", "ca.pem", "node.key", "node.csr", "node.pem", "node.ext"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
                    "-subj", "/CN=phalanx test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=phalanx test node"],
                   check=True, capture_output=True)
    with open(ext, "w") as file:
        file.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", cert, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return ca, cert, key


@pytest.fixture
def tls_server() -> Iterator[Server]:
    """One node serving TLS with a test CA's certificate (`server.ca_file` verifies it)."""
    if not os.path.exists(binary()):
        pytest.skip(f"no phalanx binary at {binary()} (cargo build -p phalanx-cli, or set PHALANX_BIN)")
    pki = tempfile.mkdtemp(prefix="phalanx-pki-")
    ca, cert, key = make_pki(pki)
    node = Server(["--tls-cert", cert, "--tls-key", key, "--ca-file", ca], ca_file=ca)
    node.start()
    try:
        yield node
    finally:
        node.kill()
        shutil.rmtree(node.dir, ignore_errors=True)
        shutil.rmtree(pki, ignore_errors=True)


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
