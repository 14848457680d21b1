"""The durable outbox: results an agent could not deliver, kept on local disk
until the cluster gives a definite answer for each.

Owns the file format and its durability. An append-only JSON-lines file of
records, `{"put": SEQ, "entry": {...}}` and `{"remove": SEQ}`. A record counts
as stored once its line is fsynced, and, when the file is created, its
directory too. A torn last line (a crash mid-append, before the fsync returned)
was never acknowledged and is dropped when the file is opened. When removed
records outnumber live ones the file is compacted: the live entries are
written to a temporary file, fsynced, renamed over the old one and the
directory fsynced, so a crash leaves the old or the new file, never a mix.
A lock file keeps two processes from sharing one outbox.

Leaves to the agent (`agent.py`) when to store, send and remove entries.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Literal, Optional, TypedDict, Union

from .types import Usage

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("phalanx.outbox")

OUTBOX_ENTRIES_MAX = 10_000
# Compaction runs when removed records exceed max(this, live entries).
REMOVED_RECORDS_MIN = 64


class _OutboxEntryRequired(TypedDict):
    task_id: int
    fence: int
    kind: Literal["complete", "fail"]


class OutboxEntry(_OutboxEntryRequired, total=False):
    """A result waiting for delivery: `result` for `complete`; `error`, `retryable` for `fail`."""

    result: Any
    error: str
    retryable: bool
    agent_id: str
    stored_ms: int
    # What the attempt consumed, as the handler reported it.
    usage: Usage


class OutboxFull(Exception):
    """The outbox holds `entries_max` entries; nothing was stored."""


class OutboxLocked(Exception):
    """Another process holds this outbox."""


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Durable FIFO of `OutboxEntry`; `path=None` keeps it in memory only (not durable)."""

    def __init__(self, path: Union[str, "os.PathLike[str]", None], entries_max: int = OUTBOX_ENTRIES_MAX) -> None:
        if entries_max < 1:
            raise ValueError("entries_max must be at least 1")
        self.path: Optional[str] = os.fspath(path) if path is not None else None
        self.entries_max = entries_max
        self._lock = threading.Lock()
        self._entries: dict[int, OutboxEntry] = {}  # insertion order = seq order
        self._next_seq = 1
        self._removed_records = 0
        self._file: Any = None
        self._lock_file: Any = None
        if self.path is not None:
            self._open(self.path)

    # ---- opening ----

    def _open(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._take_lock(path)
        created = not os.path.exists(path)
        needs_compaction = False
        if not created:
            with open(path, "rb") as file:
                data = file.read()
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            elif lines:
                needs_compaction = True  # a torn last line: never acknowledged
                log.warning("outbox %s: dropping a torn last line", path)
                lines.pop()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    self._apply(record)
                except (ValueError, KeyError, TypeError):
                    needs_compaction = True
                    log.error("outbox %s: line %d is unreadable and skipped", path, number)
            needs_compaction = needs_compaction or self._removed_records > 0
        if created:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(path)
        elif needs_compaction:
            self._compact_locked()
        self._file = open(path, "ab")

    def _take_lock(self, path: str) -> None:
        if fcntl is None:
            return
        self._lock_file = open(path + ".lock", "a")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self._lock_file.close()
            self._lock_file = None
            raise OutboxLocked(f"outbox {path} is in use by another process or agent") from error

    def _apply(self, record: dict[str, Any]) -> None:
        if "put" in record:
            seq = int(record["put"])
            entry = record["entry"]
            if not isinstance(entry, dict) or "task_id" not in entry or "fence" not in entry:
                raise ValueError("an entry needs task_id and fence")
            self._entries[seq] = entry  # type: ignore[assignment]
            self._next_seq = max(self._next_seq, seq + 1)
        elif "remove" in record:
            self._entries.pop(int(record["remove"]), None)
            self._removed_records += 1
        else:
            raise ValueError("neither put nor remove")

    # ---- writing ----

    def _append_locked(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            raise ValueError(f"outbox {self.path} is closed")
        self._file.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def _compact_locked(self) -> None:
        assert self.path is not None
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as file:
            for seq, entry in self._entries.items():
                file.write((json.dumps({"put": seq, "entry": entry}, separators=(",", ":")) + "\n").encode())
            file.flush()
            os.fsync(file.fileno())
        if self._file is not None:
            self._file.close()
        os.replace(temporary, self.path)
        _fsync_dir(self.path)
        self._removed_records = 0
        if self._file is not None:
            self._file = open(self.path, "ab")

    def push(self, entry: OutboxEntry) -> int:
        """Stores the entry; returns its sequence number once it is durable. Raises `OutboxFull`."""
        with self._lock:
            if len(self._entries) >= self.entries_max:
                raise OutboxFull(f"the outbox holds outbox_entries_max ({self.entries_max}) entries")
            seq = self._next_seq
            self._append_locked({"put": seq, "entry": dict(entry)})
            self._next_seq += 1
            self._entries[seq] = entry
            return seq

    def remove(self, seq: int) -> None:
        """Removes an entry (after a definite answer), durably."""
        with self._lock:
            if seq not in self._entries:
                return
            self._append_locked({"remove": seq})
            del self._entries[seq]
            self._removed_records += 1
            if self.path is not None and self._removed_records > max(REMOVED_RECORDS_MIN, len(self._entries)):
                self._compact_locked()

    # ---- reading ----

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def items(self) -> list[tuple[int, OutboxEntry]]:
        """(sequence number, entry), oldest first."""
        with self._lock:
            return list(self._entries.items())

    def entries(self) -> list[OutboxEntry]:
        with self._lock:
            return list(self._entries.values())

    def front(self) -> Optional[tuple[int, OutboxEntry]]:
        with self._lock:
            for item in self._entries.items():
                return item
            return None

    @property
    def durable(self) -> bool:
        return self.path is not None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
