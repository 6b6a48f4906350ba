"""An append-only results store: one JSON line per finished (sample, method, ratio).

Every result is flushed and synced to disk as soon as it is written, so an interrupted benchmark
loses nothing it finished; running the same command again skips what the store already holds.
Appends hold an exclusive lock on the file, so several processes (the shards of one run) can
share a store.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

KEY_FIELDS = ("model", "benchmark", "length", "task", "index", "seed", "method", "ratio", "query_aware")
"""What identifies a result; two results with the same key are the same measurement."""


def result_key(record: dict) -> tuple:
    return tuple(record[field] for field in KEY_FIELDS)


def sample_key(record: dict) -> tuple:
    """What identifies the sample a result was measured on (its key without method and ratio)."""
    return tuple(record[field] for field in KEY_FIELDS if field not in ("method", "ratio"))


class ResultStore:
    """Results of one benchmark directory, in ``<directory>/results.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "results.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keys = {result_key(record) for record in self}

    def __iter__(self) -> Iterator[dict]:
        """Every stored record; a torn last line (a run killed mid-write) is skipped with a warning."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{number}: skipping an unreadable line", stacklevel=2)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    def add(self, record: dict) -> None:
        """Append one finished result and make it durable before returning."""
        line = json.dumps(record, ensure_ascii=False)
        with self.path.open("a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            if os.fstat(handle.fileno()).st_size and not self._ends_with_newline():
                handle.write("\n")  # seal a torn line left by an earlier interruption
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._keys.add(result_key(record))

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
