"""What a capture's ``decode``/``continuation`` keywords ask for (shared by the engines' captures)."""

from __future__ import annotations

import operator
from typing import Sequence

import numpy as np

from ..errors import UsageError

__all__ = ["decode_plan"]


def decode_plan(decode: int, continuation: Sequence[int] | None, *, engine: str) -> tuple[int, list[int] | None]:
    """How many decode steps follow the prompt, and the tokens they are fed (None: each step the
    engine's own greedy choice).  ``continuation`` teacher-forces the steps: ``decode=N`` takes its
    first N tokens, ``decode=0`` all of them.  Refused with one line (:class:`UsageError`) naming the
    bad value."""
    if isinstance(decode, bool) or not isinstance(decode, (int, np.integer)) or decode < 0:
        raise UsageError(f"{engine} capture: decode={decode!r} must be a whole number of steps >= 0")
    if continuation is None:
        return int(decode), None
    try:
        ids = [operator.index(t) for t in continuation]
    except TypeError:
        raise UsageError(f"{engine} capture: continuation={continuation!r} must be token ids (whole numbers)") from None
    if not ids:
        raise UsageError(f"{engine} capture: the continuation is empty (leave it out to decode greedily)")
    n = int(decode) or len(ids)
    if n > len(ids):
        raise UsageError(f"{engine} capture: decode={n} needs {n} continuation tokens; the continuation has {len(ids)}")
    return n, ids[:n]
