"""Phalanx client and agent SDK (docs/api.md).

`Client` / `AsyncClient` talk to any node of a cluster: failover, backoff with
full jitter, `Retry-After`, a retry budget. `AsyncAgent` / `Agent` run a
handler for leased tasks with fencing, lease extension and delegation, and
keep working when no node answers: results go to a durable outbox and are
reconciled on reconnect. Execution is at least once; the cluster accepts
exactly one result per task. Both SDKs follow the numbered list of
docs/sdk.md.
"""

from .agent import (
    Agent,
    AgentState,
    AsyncAgent,
    FenceMemory,
    ReportOutcome,
    Stats,
    SyncTaskContext,
    TaskContext,
    TaskFailed,
)
from .client import (
    AsyncClient,
    BatchResult,
    Child,
    Client,
    ClusterInfo,
    Conflict,
    ContextEntry,
    Conversation,
    InvalidRequest,
    Lease,
    NotFound,
    OutcomeUnknown,
    Overloaded,
    payload_hash,
    PhalanxError,
    Registration,
    RetryBudget,
    RetryPolicy,
    Submitted,
    Superseded,
    Task,
    TaskId,
    TaskPage,
    TaskSpec,
    TERMINAL_STATES,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from .outbox import Outbox, OutboxEntry, OutboxFull, OutboxLocked

__all__ = [
    "Agent",
    "AgentState",
    "AsyncAgent",
    "AsyncClient",
    "BatchResult",
    "Child",
    "Client",
    "ClusterInfo",
    "Conflict",
    "ContextEntry",
    "Conversation",
    "FenceMemory",
    "InvalidRequest",
    "Lease",
    "NotFound",
    "OutcomeUnknown",
    "Outbox",
    "OutboxEntry",
    "OutboxFull",
    "OutboxLocked",
    "Overloaded",
    "PhalanxError",
    "payload_hash",
    "Registration",
    "ReportOutcome",
    "RetryBudget",
    "RetryPolicy",
    "Stats",
    "Submitted",
    "Superseded",
    "SyncTaskContext",
    "TERMINAL_STATES",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskId",
    "TaskPage",
    "TaskSpec",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
]
