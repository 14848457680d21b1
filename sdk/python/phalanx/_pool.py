"""The asyncio client's connection pool (docs/sdk.md, 11): idle connections per node in a list, so that
starting or ending a request costs the same whatever the number of connections.

httpcore's own pool (httpx's default) re-examines every connection, and every queued request against every
connection, each time a request starts or ends: with tens of requests in flight that was most of a Python
client's CPU. This pool takes the most recently used idle connection of the node (checking that one alone:
still open, not expired, nothing unread), or opens a new one; a connection goes back when its answer has
been read, or is closed. The number of connections is bounded by the client's requests in flight (its
semaphores), and the idle ones by `connections_max`. Each connection is httpcore's (HTTP/1.1, TLS, timeouts
from the request's extensions), and httpcore's errors become httpx's, as httpx's own transport does.
"""

from __future__ import annotations

import ssl
from typing import AsyncIterator, Callable, ContextManager, Optional, Union

import httpcore
import httpx

# httpx's mapping of httpcore's errors to its own (the same for httpx 0.25 to 0.28).
map_httpcore_exceptions: Optional[Callable[[], ContextManager[None]]]
try:
    from httpx._transports.default import map_httpcore_exceptions as _map_errors
    map_httpcore_exceptions = _map_errors
except ImportError:  # pragma: no cover
    map_httpcore_exceptions = None

# An idle connection older than this is closed rather than reused (the node closes idle ones after 60 s).
KEEPALIVE_S = 30.0

_Key = tuple[bytes, bytes, int]


def available() -> bool:
    """Whether this httpx can be given this pool (else the client keeps httpx's own)."""
    return map_httpcore_exceptions is not None


class AsyncPool(httpx.AsyncBaseTransport):
    def __init__(self, verify: Union[bool, ssl.SSLContext], connections_max: int) -> None:
        if isinstance(verify, ssl.SSLContext):
            self._ssl = verify
        else:
            self._ssl = ssl.create_default_context()
        self._connections_max = connections_max
        self._idle: dict[_Key, list[httpcore.AsyncHTTPConnection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert map_httpcore_exceptions is not None
        url = request.url
        scheme = url.raw_scheme
        port = url.port or (443 if scheme == b"https" else 80)
        key = (scheme, url.raw_host, port)
        connection = await self._take(key)
        if connection is None:
            connection = httpcore.AsyncHTTPConnection(
                origin=httpcore.Origin(scheme, url.raw_host, port),
                ssl_context=self._ssl if scheme == b"https" else None, keepalive_expiry=KEEPALIVE_S)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        try:
            with map_httpcore_exceptions():
                response = await connection.handle_async_request(core_request)
        except BaseException:
            await connection.aclose()
            raise
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Body(self, key, connection, response.stream),
                              extensions=response.extensions)

    async def _take(self, key: _Key) -> "httpcore.AsyncHTTPConnection | None":
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.is_idle() and not connection.has_expired():
                return connection
            await connection.aclose()
        return None

    async def _give_back(self, key: _Key, connection: httpcore.AsyncHTTPConnection) -> None:
        idle = self._idle.setdefault(key, [])
        if connection.is_idle() and len(idle) < self._connections_max:
            idle.append(connection)
        else:
            await connection.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()


class _Body(httpx.AsyncByteStream):
    """An answer's body; reading it to the end (or closing it) gives the connection back."""

    def __init__(self, pool: AsyncPool, key: _Key, connection: httpcore.AsyncHTTPConnection,
                 stream: object) -> None:
        self._pool = pool
        self._key = key
        self._connection = connection
        self._stream = stream
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert map_httpcore_exceptions is not None
        with map_httpcore_exceptions():
            async for part in self._stream:  # type: ignore[attr-defined]
                yield part

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        assert map_httpcore_exceptions is not None
        try:
            with map_httpcore_exceptions():
                await self._stream.aclose()  # type: ignore[attr-defined]
        finally:
            await self._pool._give_back(self._key, self._connection)
