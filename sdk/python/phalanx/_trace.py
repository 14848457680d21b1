"""W3C Trace Context for submits (docs/sdk.md item 12), without depending on OpenTelemetry.

If the `opentelemetry` API is importable and a span is current, a submit that names no `traceparent` sends
that span's context, so the task's spans join the caller's trace. Nothing here imports OpenTelemetry unless it
is installed, and nothing fails when it is not.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional


_UNKNOWN = object()
# The `opentelemetry.trace` module once looked up (`None`: not installed), so that a submit does not search
# the import path again each time.
_trace_module: Any = _UNKNOWN


def _opentelemetry_trace() -> Any:
    global _trace_module
    if _trace_module is _UNKNOWN:
        try:
            _trace_module = importlib.import_module("opentelemetry.trace")
        except ImportError:
            _trace_module = None
    return _trace_module


def current_traceparent() -> Optional[str]:
    """The current OpenTelemetry span's context as a version-00 `traceparent`, or `None` (no OpenTelemetry, no
    current span, or one that is not valid)."""
    trace = _opentelemetry_trace()
    if trace is None:
        return None
    try:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags) & 0xFF:02x}"
    except Exception:  # an OpenTelemetry too unlike the API this was written for: submit without a context
        return None
