"""One place for the checks that settings get at construction: a choice among names, a number in range.

Every check raises a ``ValueError`` whose message names the setting, so the CLI can print it as
it is (one line, exit code 2) and the library refuses bad settings before any compute.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else a ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number in the given range.

    ``low``/``high`` bound the range (``None``: unbounded), open on a side when ``low_open`` /
    ``high_open``; ``integer`` asks for a whole count (``bool`` is refused: ``True`` is no count).
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_range_text(low, high, low_open, high_open)}, got {value}")


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_ratio(compression_ratio: float) -> None:
    """Raise a clear ``ValueError`` unless ``0 <= compression_ratio < 1`` (kvpress's convention:
    the fraction of the context's KV pairs removed)."""
    if isinstance(compression_ratio, (int, float)) and not isinstance(compression_ratio, bool):
        if not 0 <= compression_ratio < 1:  # also false for NaN
            raise ValueError(
                f"compression_ratio must be in [0, 1) (fraction of KV removed), got {compression_ratio}"
            )
        return
    raise ValueError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
