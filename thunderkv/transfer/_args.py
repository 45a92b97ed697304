"""Argument checks shared by the transfer objects: a wrong argument raises TypeError (wrong
type) or ValueError (bad value) before anything changes, never a TransferError."""

from __future__ import annotations

import math
import numbers
import operator

MAX_TIMEOUT_S = 1e9  # ~31 years; larger values overflow the platform's timed waits
_U64 = (1 << 64) - 1


def timeout_arg(value, name: str = "timeout") -> float:
    """A connection timeout: a finite number of seconds in (0, MAX_TIMEOUT_S]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise ValueError(f"{name} must be a finite number of seconds > 0 (at most "
                         f"{MAX_TIMEOUT_S:.0f}), got {value!r}")
    return seconds


def wait_arg(value, name: str = "timeout") -> float | None:
    """How long a consumer call may block: None (or inf, or anything past MAX_TIMEOUT_S)
    waits without limit; a negative number is 0 (as for threading's waits)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{name} must be None or a number of seconds, got nan")
    return None if seconds > MAX_TIMEOUT_S else max(0.0, seconds)


def int_arg(value, name: str, lo: int = 0, hi: int | None = None) -> int:
    """An integer (not a bool) in [lo, hi]."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if number < lo or (hi is not None and number > hi):
        rule = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rule}, got {number}")
    return number


def request_id_arg(value) -> int:
    """A request id as the wire carries it: an int in [0, 2**64 - 1]."""
    return int_arg(value, "request_id", 0, _U64)
