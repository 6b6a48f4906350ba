"""An append-only results store: one JSON line per finished (sample, method, ratio).

Every result is flushed and synced to disk as soon as it is written, so an interrupted benchmark
loses nothing it finished; running the same command again skips what the store already holds,
except results recorded as errors (``score`` null, the message in ``error``), which it measures
again. Appends hold an exclusive lock on the file, so several processes (the shards of one run) can
share a store. A line that is not a result (torn by a kill, edited by hand, not UTF-8) is skipped
with a warning naming its line number: one bad line never makes the rest unreadable.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from nestedkv.files import check_output_dir, file_error

KEY_FIELDS = ("model", "benchmark", "length", "task", "index", "seed", "method", "ratio", "query_aware")
"""What identifies a result; two results with the same key are the same measurement."""


def result_key(record: dict) -> tuple:
    return tuple(record[field] for field in KEY_FIELDS)


def sample_key(record: dict) -> tuple:
    """What identifies the sample a result was measured on (its key without method and ratio)."""
    return tuple(record[field] for field in KEY_FIELDS if field not in ("method", "ratio"))


def is_error(record: dict) -> bool:
    """Whether ``record`` is a failed measurement (no score; its ``error`` says why)."""
    return record.get("score") is None


def _parse(line: bytes) -> tuple[dict | None, str]:
    """(the result on ``line``, "") or (None, what is wrong with the line)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError:
        return None, "not JSON (torn by an interrupted write?)"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a result"
    missing = [field for field in KEY_FIELDS if field not in record]
    if missing:
        return None, f"a result without {', '.join(missing)}"
    try:
        hash(result_key(record))
    except TypeError:
        return None, "a result whose key holds a list or an object"
    score = record.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
        return None, f"a result whose score {score!r} is not a number"
    return record, ""


class ResultStore:
    """Results of one benchmark directory, in ``<directory>/results.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        directory = check_output_dir(directory, "results directory")
        self.path = directory / "results.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create results directory {directory}: {error.strerror}") from None
        self._warned: set[int] = set()
        self._keys: set[tuple] = set()
        self._errors: set[tuple] = set()
        for record in self:
            self._count(record)

    def __iter__(self) -> Iterator[dict]:
        """Every stored record, in file order; a line that is not one is skipped with a warning (once per store)."""
        if not self.path.exists():
            return
        try:
            handle = self.path.open("rb")  # decoded line by line: one bad byte spoils one line, not the file
        except OSError as error:
            raise file_error(self.path, "results store", error) from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record, problem = _parse(line)
                if record is not None:
                    yield record
                elif number not in self._warned:
                    self._warned.add(number)
                    warnings.warn(f"{self.path}:{number}: skipping an unreadable line: {problem}", stacklevel=2)

    def __len__(self) -> int:
        """Finished results (a result recorded as an error is not finished)."""
        return len(self._keys)

    def __contains__(self, key: tuple) -> bool:
        return key in self._keys

    @property
    def errors(self) -> int:
        """Results recorded only as errors: the next run measures them again."""
        return len(self._errors)

    def _count(self, record: dict) -> None:
        key = result_key(record)
        if not is_error(record):
            self._keys.add(key)
            self._errors.discard(key)
        elif key not in self._keys:
            self._errors.add(key)

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
        self._count(record)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
