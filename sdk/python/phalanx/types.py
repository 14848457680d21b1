"""The shapes of the API's requests and answers (docs/api.md), as typed
dicts, and `TaskId`: what `submit` answers.

Owns no behaviour beyond `payload_hash` (the cluster's FNV-1a of a payload).
Leaves the requests themselves to `_transport.py`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, TypedDict

TaskState = Literal["pending", "leased", "succeeded", "failed", "cancelled", "dead", "paused"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "dead"})


class _LeaseInfoRequired(TypedDict):
    agent_id: str
    agent_epoch: int
    fence: int
    valid_until_ms: int


class LeaseInfo(_LeaseInfoRequired, total=False):
    """The lease a task is under, as part of a task."""

    progress_ms: int


class Usage(TypedDict, total=False):
    """What an attempt consumed: tokens and a cost in the fleet's own unit."""

    tokens_in: int
    tokens_out: int
    cost: int


class Budget(TypedDict, total=False):
    """What a delegation tree may consume, carried by its root."""

    tokens_max: int
    cost_max: int


class WaitingOn(TypedDict):
    """Which flow-control limit holds a pending task back."""

    key: str
    # `concurrency_max`, `rate_per_second` or `tokens_per_minute`.
    limit: str
    # The limits table's entry that set it (the key itself or a wildcard).
    rule: str


class Pause(TypedDict):
    # `budget`, `operator` or `attempts_exhausted`.
    cause: str
    reason: str
    since_ms: int


class KeyLimits(TypedDict, total=False):
    """The limits of a concurrency key (`PUT /v1/limits/{key}`); an absent field does not limit."""

    concurrency_max: int
    rate_per_second: float
    burst: int
    weight: int
    tokens_per_minute: int


class LimitRule(TypedDict):
    key: str
    limits: KeyLimits


class KeyStatus(TypedDict):
    """What a concurrency key holds and has used now."""

    key: str
    rule: Optional[str]
    limits: Optional[KeyLimits]
    held: int
    rate_tokens_left: Optional[int]
    tokens_in_window: int
    leased_estimate: int
    open_tasks: int


class LimitsTable(TypedDict):
    rules: list[LimitRule]
    keys: list[KeyStatus]


class _TaskRequired(TypedDict):
    id: int
    queue: str
    payload: Any
    priority: int
    state: TaskState
    created_ms: int
    updated_ms: int
    deadline_ms: Optional[int]
    max_attempts: int
    attempts: int
    idempotency_key: Optional[str]
    parent_id: Optional[int]
    conversation_id: Optional[str]
    hop_count: int
    lease: Optional[LeaseInfo]
    last_fence: int
    result: Any
    error: Optional[str]
    dead_reason: Optional[str]
    superseded_count: int


class Task(_TaskRequired, total=False):
    """`GET /v1/tasks/{id}`."""

    trail: list[dict[str, Any]]
    # For a delegation: the fence of the parent's lease that created it.
    parent_fence: Optional[int]
    # Flow control (docs/api.md, "Flow control").
    concurrency_key: Optional[str]
    cost_estimate: Optional[int]
    budget: Optional[Budget]
    usage: Usage
    pause: Optional[Pause]
    replays: int
    # On a pending task its key's limits hold back (`GET /v1/tasks/{id}`).
    waiting_on: WaitingOn
    # W3C Trace Context naming the node's submit span of the task (docs/sdk.md item 12).
    traceparent: Optional[str]


class _SubmittedRequired(TypedDict):
    task_id: int
    deduplicated: bool


class Submitted(_SubmittedRequired, total=False):
    """What a submit created or found; `adopted`: a child of an earlier attempt of the parent, taken over."""

    adopted: bool
    traceparent: str


class Child(TypedDict):
    """A child of a leased task, as the lease lists it (`lease["children"]`)."""

    task_id: int
    queue: str
    # FNV-1a of the payload's JSON text (`payload_hash`).
    payload_hash: int
    state: TaskState
    # The fence of the parent's lease that created it, and of the latest attempt that adopted it.
    parent_fence: Optional[int]
    adopted_fence: Optional[int]


def payload_hash(payload: Any) -> int:
    """FNV-1a of a payload's JSON text as the cluster writes it (keys sorted, no spaces), as in
    `Child.payload_hash` and the trail. Floats may be written otherwise: compare their steps by queue and id."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


class ErrorBody(TypedDict):
    code: str
    message: str


class BatchResult(TypedDict, total=False):
    """One slot of `POST /v1/tasks/batch`: `task_id` and `deduplicated`, or `error`."""

    task_id: int
    deduplicated: bool
    adopted: bool
    traceparent: str
    error: ErrorBody


class _TaskSpecRequired(TypedDict):
    queue: str


class TaskSpec(_TaskSpecRequired, total=False):
    """A task to submit, as `submit_batch` takes it."""

    payload: Any
    priority: int
    idempotency_key: str
    deadline_ms: int
    max_attempts: int
    parent_id: int
    parent_fence: int
    conversation_id: str
    concurrency_key: str
    cost_estimate: int
    budget: Budget
    traceparent: str


class TaskPage(TypedDict):
    tasks: list[Task]
    next_after: Optional[int]


class Registration(TypedDict):
    agent_id: str
    epoch: int
    # The session's secret: the client presents it on the session's
    # heartbeats, polls and deregistration by itself (the epoch is public).
    session: str
    heartbeat_interval_ms: int
    agent_ttl_ms: int


class _LeaseRequired(TypedDict):
    task: Task
    fence: int
    valid_until_ms: int
    lease_ttl_ms: int


class Lease(_LeaseRequired, total=False):
    """One lease handed out by `poll`; `children`: what earlier attempts of the task delegated."""

    children: list[Child]


class _ContextEntryRequired(TypedDict):
    version: int
    value: Any


class ContextEntry(_ContextEntryRequired, total=False):
    """One key of a conversation; `task_id` and `fence` say which attempt wrote it, for a write on a task's behalf."""

    task_id: int
    fence: int


class Conversation(TypedDict):
    conversation_id: str
    entries: dict[str, ContextEntry]


class _ClusterNodeRequired(TypedDict):
    id: int
    addr: str
    voter: bool
    matched_index: Optional[int]
    last_contact_ms: Optional[int]


class ClusterNode(_ClusterNodeRequired, total=False):
    raft_addr: Optional[str]


class _ClusterInfoRequired(TypedDict):
    node_id: int
    leader_id: Optional[int]
    term: int
    state: str
    last_log_index: Optional[int]
    last_applied: Optional[int]
    snapshot_index: Optional[int]
    nodes: list[ClusterNode]


class ClusterInfo(_ClusterInfoRequired, total=False):
    millis_since_quorum_ack: Optional[int]


class TaskId(int):
    """What `submit` answers: the task's id (an `int`, usable wherever the id is) that also says whether
    the submit was `deduplicated` (its idempotency key named a task that existed already: nothing new was
    created) and, for a delegation, `adopted` (a child of an earlier attempt of the parent, taken over).
    `traceparent` is the task's stored W3C Trace Context (`None` from a node that keeps none)."""

    deduplicated: bool
    adopted: bool
    traceparent: Optional[str]

    def __new__(cls, task_id: int, deduplicated: bool = False, adopted: bool = False,
                traceparent: Optional[str] = None) -> "TaskId":
        value = super().__new__(cls, task_id)
        value.deduplicated = deduplicated
        value.adopted = adopted
        value.traceparent = traceparent
        return value

    @property
    def task_id(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"TaskId({int(self)}, deduplicated={self.deduplicated}, adopted={self.adopted})"

    def __str__(self) -> str:
        # Printed and formatted as the plain id, as the `int` submit used to answer.
        return int.__repr__(self)

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    @classmethod
    def of(cls, submitted: Submitted) -> "TaskId":
        return cls(submitted["task_id"], bool(submitted.get("deduplicated", False)),
                   bool(submitted.get("adopted", False)), submitted.get("traceparent"))


__all__ = [
    "BatchResult", "Child", "ClusterInfo", "ClusterNode", "ContextEntry", "Conversation", "ErrorBody", "Lease",
    "LeaseInfo", "Registration", "Submitted", "Task", "TaskId", "TaskPage", "TaskSpec", "TaskState",
    "TERMINAL_STATES", "payload_hash",
]
