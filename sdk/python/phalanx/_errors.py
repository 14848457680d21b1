"""Errors: the table of error codes (docs/sdk.md, 4), the typed exceptions,
and reading a refusal's body.

`ERROR_CODES` is the table of `phalanx_api::ErrorCode`
(`crates/phalanx-api/src/error.rs`) as data: for each code, its HTTP status,
whether the refused request may still take effect (`outcome`) and whether
the same request may succeed later or on another node (`transient`). A test
(`tests/test_units.py`) parses the Rust table and fails when the two differ.

Leaves to `_transport.py` what to do with an error (repeat it or not).
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, Literal, Optional

Outcome = Literal["not_done", "unknown"]

# code -> (status, outcome, transient), in the order of crates/phalanx-api/src/error.rs.
ERROR_CODES: dict[str, tuple[int, Outcome, bool]] = {
    "invalid": (400, "not_done", False),
    "malformed_json": (400, "not_done", False),
    "not_capable": (400, "not_done", False),
    "malformed_raft_request": (400, "not_done", False),
    "unauthorized": (401, "not_done", False),
    "wrong_session": (403, "not_done", False),
    "no_peer_token": (403, "not_done", False),
    "task_not_found": (404, "not_done", False),
    "agent_not_found": (404, "not_done", False),
    "not_found": (404, "not_done", False),
    "method_not_allowed": (405, "not_done", False),
    "body_timeout": (408, "not_done", True),
    "superseded": (409, "not_done", False),
    "stale_epoch": (409, "not_done", False),
    "already_terminal": (409, "not_done", False),
    "lease_expired": (409, "not_done", False),
    "version_conflict": (409, "not_done", False),
    "force_required": (409, "not_done", False),
    "idempotency_conflict": (409, "not_done", False),
    "budget_exhausted": (409, "not_done", False),
    "not_paused": (409, "not_done", False),
    "already_member": (409, "not_done", False),
    "node_id_reused": (409, "not_done", False),
    "unsafe_membership_change": (409, "not_done", False),
    "member_unreachable": (409, "not_done", False),
    "address_in_use": (409, "not_done", False),
    "too_large": (413, "not_done", False),
    "uri_too_long": (414, "not_done", False),
    "unsupported_media_type": (415, "not_done", False),
    "loop_detected": (422, "not_done", False),
    "deadlock": (422, "not_done", False),
    "queue_full": (429, "not_done", True),
    "limit_reached": (429, "not_done", True),
    "overloaded": (429, "not_done", True),
    "rate_limited": (429, "not_done", True),
    "state_full": (429, "not_done", True),
    "header_too_large": (431, "not_done", False),
    "internal": (500, "unknown", False),
    "no_leader": (503, "not_done", True),
    "not_leader": (503, "not_done", True),
    "leader_unreachable": (503, "not_done", True),
    "deadline_exceeded": (503, "not_done", True),
    "not_ready": (503, "not_done", True),
    "leader_changed": (503, "unknown", True),
    "unavailable": (503, "unknown", True),
    "timeout": (503, "unknown", True),
    "membership_change_failed": (503, "unknown", True),
    "learner_lagging": (503, "unknown", True),
    "disk_full": (507, "not_done", True),
}

# Codes whose refusal leaves the outcome open: the request may still take effect (docs/api.md),
# and the client's own `outcome_unknown`.
OUTCOME_UNKNOWN_CODES: frozenset[str] = frozenset(
    {code for code, (_, outcome, _) in ERROR_CODES.items() if outcome == "unknown"} | {"outcome_unknown"})


def code_outcome(code: str) -> Outcome:
    """The table's outcome; a code this SDK does not know (a newer node) leaves it open."""
    known = ERROR_CODES.get(code)
    return known[1] if known is not None else "unknown"


def code_transient(status: int, code: str) -> bool:
    """Whether a refusal may succeed later or on another node: the table's word for a known code; a code
    this SDK does not know is transient when its status is one all of whose known codes are (429, 503)."""
    known = ERROR_CODES.get(code)
    return known[2] if known is not None else status in (429, 503)


class PhalanxError(Exception):
    """A refusal from the cluster, or no usable answer at all.

    `status` is the HTTP status (0 when no node answered); `code` is the
    machine-readable code of docs/api.md; `outcome` is `"not_done"` (nothing
    was done: repeating is safe) or `"unknown"` (it may have taken effect).
    """

    def __init__(self, status: int, code: str, message: str, leader_hint: Optional[str] = None,
                 retry_after_ms: Optional[int] = None, outcome: Optional[str] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.leader_hint = leader_hint
        self.retry_after_ms = retry_after_ms
        # The body's `outcome` is the node's word; without it, the table's.
        self.outcome: Outcome = "not_done" if outcome == "not_done" else "unknown" if outcome == "unknown" else (
            code_outcome(code) if status != 0 else "not_done")

    @property
    def is_outcome_unknown(self) -> bool:
        """The request may have taken effect (or may still); `False` promises it did not."""
        return self.outcome == "unknown"

    @property
    def is_superseded(self) -> bool:
        """The fence was not the current one: the result was recorded as superseded, nothing else changed."""
        return self.code == "superseded"

    @property
    def transient(self) -> bool:
        """A refusal that may succeed later or on another node (docs/sdk.md, 4); False for errors that are
        not refusals (no node answered)."""
        return self.status != 0 and code_transient(self.status, self.code)

    @property
    def is_definite(self) -> bool:
        """The cluster decided (a refusal whose code is not transient): repeating the same request will not
        help, and for a report the result is done with (docs/sdk.md, 3)."""
        return self.status != 0 and not self.transient

    @property
    def is_answer(self) -> bool:
        """A node answered (docs/sdk.md, 6): a 4xx. A 5xx, or no answer at all, says the cluster cannot serve."""
        return 400 <= self.status < 500


class InvalidRequest(PhalanxError):
    """400: `invalid`, `malformed_json`, `not_capable`."""


class Unauthorized(PhalanxError):
    """401: missing or wrong token."""


class NotFound(PhalanxError):
    """404: `task_not_found`, `agent_not_found`, `not_found`."""


class Conflict(PhalanxError):
    """409: the state moved on (`stale_epoch`, `already_terminal`, `lease_expired`, `version_conflict`, ...)."""


class Superseded(Conflict):
    """409 `superseded`: a result or request with an old fence."""


class TooLarge(PhalanxError):
    """413: a payload, result or context value over its `*_max`."""


class Unprocessable(PhalanxError):
    """422: `loop_detected`, `deadlock`."""


class Overloaded(PhalanxError):
    """429: `queue_full`, `limit_reached`, `overloaded`, `rate_limited` (still so after the retries)."""


class Unavailable(PhalanxError):
    """No node answered (status 0: the message lists every node tried and why), or the cluster cannot serve
    now (503, 507), after the retries."""


class OutcomeUnknown(PhalanxError):
    """The request may or may not have taken effect (a write that timed out after it was sent).
    Its `outcome` is always `"unknown"`; every other error's `outcome` says which."""

    def __init__(self, status: int, code: str, message: str, leader_hint: Optional[str] = None,
                 retry_after_ms: Optional[int] = None, outcome: Optional[str] = None) -> None:
        super().__init__(status, code, message, leader_hint, retry_after_ms, "unknown")


_ERROR_BY_STATUS: dict[int, type[PhalanxError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: Unprocessable,
    429: Overloaded,
    503: Unavailable,
    507: Unavailable,
}


def error_from_answer(status: int, body: Any, text: str = "", retry_after_header: Optional[str] = None) -> PhalanxError:
    """Builds the typed error for a refusal `{"error": {code, message, leader_hint?, retry_after_ms?}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code", "unknown"))
    retry_after_ms = error.get("retry_after_ms")
    if retry_after_ms is None:
        retry_after_ms = _parse_retry_after_ms(retry_after_header)
    kind = Superseded if code == "superseded" else _ERROR_BY_STATUS.get(status, PhalanxError)
    return kind(status, code, str(error.get("message", text)), error.get("leader_hint"), retry_after_ms,
                error.get("outcome"))


def _parse_retry_after_ms(header: Optional[str]) -> Optional[int]:
    """`Retry-After` is seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return int(header) * 1000
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))
