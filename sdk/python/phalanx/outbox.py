"""The durable outbox: results an agent could not deliver, kept on local disk
until the cluster gives a definite answer for each.

A JSON-lines file. An entry counts as stored once its line is fsynced (and,
when the file is created, its directory). Removing the delivered head writes
the rest to a temporary file, fsyncs it and renames it over the old one, so a
crash leaves the old or the new file, never a torn one. A torn last line (a
crash mid-append, before the fsync returned) was never acknowledged and is
dropped on open. Survives a restart of the agent process.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

OUTBOX_ENTRIES_MAX = 10_000


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    def __init__(self, path: str, entries_max: int = OUTBOX_ENTRIES_MAX) -> None:
        self.path = path
        self.entries_max = entries_max
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                for line in file:
                    try:
                        self._entries.append(json.loads(line))
                    except ValueError:
                        pass
        else:
            with open(path, "w", encoding="utf-8") as file:
                file.flush()
                os.fsync(file.fileno())
            _fsync_dir(path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries)

    def push(self, entry: dict[str, Any]) -> None:
        """Appends and fsyncs; returns only once the entry is durable."""
        with self._lock:
            if len(self._entries) >= self.entries_max:
                raise OverflowError(f"outbox holds entries_max ({self.entries_max}) entries")
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")
                file.flush()
                os.fsync(file.fileno())
            self._entries.append(entry)

    def front(self) -> dict[str, Any] | None:
        with self._lock:
            return self._entries[0] if self._entries else None

    def pop_front(self) -> None:
        """Removes the delivered head, durably."""
        with self._lock:
            remaining = self._entries[1:]
            temporary = self.path + ".tmp"
            with open(temporary, "w", encoding="utf-8") as file:
                for entry in remaining:
                    file.write(json.dumps(entry) + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            _fsync_dir(self.path)
            self._entries = remaining
