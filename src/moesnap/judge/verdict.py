"""What a comparison concluded, as values: the :class:`Verdict`, the :class:`Metrics` it was decided
on and the :class:`Result` that carries both with its detail (STYLE.md §8), and the few words of
formatting every report shares.  :mod:`moesnap.judge.classify` decides them; this module only holds
them, so that routing, the reports and the rest of the package read verdicts without the arithmetic.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

#: bad tokens listed at most in :attr:`Metrics.bad_tokens` (``n_bad_tokens`` counts them all)
MAX_BAD_TOKENS = 64


class Verdict(enum.Enum):
    """What a comparison concluded; the names are the JSON strings."""

    MATCH = "MATCH"
    DIVERGE = "DIVERGE"
    NAN_CANDIDATE = "NAN_CANDIDATE"
    NAN_GOLDEN = "NAN_GOLDEN"
    NAN_BOTH = "NAN_BOTH"
    MISSING = "MISSING"
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    ROUTING_TIE = "ROUTING_TIE"

    @property
    def passed(self) -> bool:
        return self in (Verdict.MATCH, Verdict.ROUTING_TIE)


def json_float(x: float) -> float | str | None:
    """NaN -> None, +-inf -> "inf"/"-inf", else a plain float."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def fmt(x: float) -> str:
    return f"{x:.6g}"


def bad_tokens_text(m: "Metrics") -> str:
    """``3 bad tokens, the first is token 5`` / ``1 bad token: token 5`` / ``no bad token``."""
    if m.first_bad_token is None:
        return "no bad token"
    if m.n_bad_tokens == 1:
        return f"1 bad token: token {m.first_bad_token}"
    return f"{m.n_bad_tokens} bad tokens, the first is token {m.first_bad_token}"


@dataclass(frozen=True)
class Metrics:
    n: int
    cosine: float
    rel_l2: float
    nmse: float
    max_abs: float
    mean_abs: float
    max_rel: float
    frac_outside: float
    n_outside: int
    nan_golden: int
    nan_candidate: int
    inf_golden: int
    inf_candidate: int
    worst_index: tuple[int, ...] | None
    first_bad_token: int | None
    bad_tokens: tuple[int, ...]
    n_bad_tokens: int
    max_row_rel_l2: float = 0.0      # largest relative L2 error of a judged row (see Tolerance.row_rel_l2)
    n_bad_rows: int = 0              # rows beyond row_rel_l2
    closeness: float = 0.0           # error ÷ tolerance of the element deciding the elementwise rule (> 1: fails)
    token_closeness: tuple[float, ...] = ()   # per token, its largest element error ÷ tolerance

    def to_dict(self) -> dict:
        """JSON-safe: floats NaN -> None, +-inf -> "inf"/"-inf"; plain ints.  ``token_closeness``
        (one number per token) is left out."""
        def plain(value):
            if isinstance(value, float):
                return json_float(value)
            if isinstance(value, tuple):
                return [int(v) for v in value]
            return None if value is None else int(value)

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__ if name != "token_closeness"}


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    metrics: Metrics | None
    detail: str = ""
    flipped_tokens: tuple[int, ...] = ()
    excluded_tokens: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict.name,
            "metrics": self.metrics.to_dict() if self.metrics is not None else None,
            "detail": self.detail,
            "flipped_tokens": [int(t) for t in self.flipped_tokens],
            "excluded_tokens": [int(t) for t in self.excluded_tokens],
        }
