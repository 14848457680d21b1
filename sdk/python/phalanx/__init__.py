"""Phalanx client and agent SDK.

`Client` / `AsyncClient` talk to any node of a cluster (failover, backoff with
full jitter, Retry-After, a retry budget). `AsyncAgent` / `Agent` run a handler
for leased tasks with fencing, lease extension, delegation, a durable outbox
and autonomous fallback when no node answers.
"""

from .client import AsyncClient, Client, PhalanxError, Unavailable, Unknown
from .agent import Agent, AsyncAgent, TaskContext, TaskFailed
from .outbox import Outbox

__all__ = [
    "Agent",
    "AsyncAgent",
    "AsyncClient",
    "Client",
    "Outbox",
    "PhalanxError",
    "TaskContext",
    "TaskFailed",
    "Unavailable",
    "Unknown",
]
