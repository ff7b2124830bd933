"""How a stage stands against each rule of its tolerance, as values: a :class:`Margin` per rule (error ÷
limit, above 1 where the rule fails, with its numbers in a few words), for a classified stage
(:func:`margins`) and for routing (:func:`routing_margins`).  The reports show the worst of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .routing import RoutingResult
from .tolerances import Tolerance
from .verdict import Metrics, Result, Verdict, json_float


@dataclass(frozen=True)
class Margin:
    """How one stage stands against one rule of its tolerance: ``ratio`` is error ÷ limit, above 1
    where the rule fails (+inf for what no tolerance admits: NaN/Inf, a missing array, a wrong shape);
    ``text`` says it in a few words with the numbers (``frac_outside 0.8% > max_frac_outside 0.5%``)."""

    rule: str      # non-finite | missing | shape | elementwise | exact | row_rel_l2 | expert_scale | tie_tol
    ratio: float
    text: str

    @property
    def failed(self) -> bool:
        return self.ratio > 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "ratio": json_float(self.ratio), "text": self.text}


def _pct(x: float) -> str:
    return f"{100.0 * x:.2g}%"


def _non_finite_text(m: Metrics) -> str:
    def side(nan: int, inf: int, where: str) -> str:
        return " + ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n) + f" in the {where}"

    parts = [side(nan, inf, where) for nan, inf, where in ((m.nan_candidate, m.inf_candidate, "candidate"),
                                                          (m.nan_golden, m.inf_golden, "golden")) if nan or inf]
    return ", ".join(parts)


def margins(res: Result, tol: Tolerance | None, *, exact: bool = False,
            expert: tuple[int, float, float] | None = None) -> tuple[Margin, ...]:
    """Every rule ``res`` was judged by, as :class:`Margin` values, in the order the rules decide: what
    no tolerance admits, the elementwise rule, the row rule, the expert rule (``expert``: the worst
    expert's id, scale error and the limit it is held to).  ``tol`` None: the verdict's margin alone."""
    v, m = res.verdict, res.metrics
    if v == Verdict.MISSING:
        return (Margin("missing", math.inf, res.detail or "missing"),)
    if v == Verdict.SHAPE_MISMATCH:
        return (Margin("shape", math.inf, res.detail or "shapes differ"),)
    if m is None:
        return ()
    out: list[Margin] = []
    if m.nan_golden or m.nan_candidate or m.inf_golden or m.inf_candidate:
        out.append(Margin("non-finite", math.inf, _non_finite_text(m)))
    if tol is None:
        return tuple(out)
    if exact:
        out.append(Margin("exact", m.closeness, f"{m.n_outside} of {m.n} values differ (compared exactly)"
                          if m.n_outside else "every value equal (compared exactly)"))
    elif m.closeness > 1.0 and tol.max_frac_outside > 0.0:
        out.append(Margin("elementwise", m.closeness, f"frac_outside {_pct(m.frac_outside)} > max_frac_outside "
                          f"{_pct(tol.max_frac_outside)} (atol={tol.atol:g}, rtol={tol.rtol:g})"))
    elif m.closeness > 1.0:
        worst = "NaN/Inf among them" if out and math.isinf(m.closeness) else f"the worst {m.closeness:.3g}×"
        out.append(Margin("elementwise", m.closeness, f"{m.n_outside} of {m.n} elements beyond atol+rtol·|g|, "
                          f"{worst} (atol={tol.atol:g}, rtol={tol.rtol:g})"))
    else:
        out.append(Margin("elementwise", m.closeness, f"|c-g| at {m.closeness:.2g} of atol+rtol·|g| "
                          f"(atol={tol.atol:g}, rtol={tol.rtol:g}"
                          + (f", {_pct(m.frac_outside)} outside of {_pct(tol.max_frac_outside)} allowed"
                             if m.n_outside else "") + ")"))
    if math.isfinite(tol.row_rel_l2) and not exact:
        r = m.max_row_rel_l2 / tol.row_rel_l2
        out.append(Margin("row_rel_l2", r, f"row_rel_l2 {m.max_row_rel_l2:.3g} > limit {tol.row_rel_l2:g} "
                          f"in {m.n_bad_rows} row{'s' if m.n_bad_rows != 1 else ''}" if r > 1.0 else
                          f"row_rel_l2 {m.max_row_rel_l2:.2g} of limit {tol.row_rel_l2:g}"))
    if expert is not None:
        e, eps, limit = expert
        r = abs(eps) / limit if limit > 0 else (math.inf if eps else 0.0)
        out.append(Margin("expert_scale", r, f"expert {e} off by {100 * eps:+.3g}% "
                          + (">" if r > 1.0 else "of") + f" limit {_pct(limit)}"))
    return tuple(out)


def routing_margins(rres: RoutingResult, tie_tol: float, metrics: Metrics | None) -> tuple[Margin, ...]:
    """``topk_ids``'s margins: the widest flip's gap against ``tie_tol`` (no flip: 0)."""
    if rres.verdict in (Verdict.MISSING, Verdict.SHAPE_MISMATCH):
        return margins(rres.as_result(metrics), None)
    gap = rres.max_gap
    r = math.inf if math.isnan(gap) else gap / tie_tol if tie_tol > 0 else (math.inf if gap > 0 else 0.0)
    if not rres.flipped_tokens:
        return (Margin("tie_tol", 0.0, "every token picks the golden's experts"),)
    if rres.verdict == Verdict.DIVERGE:
        n = len(rres.diverged_tokens)
        return (Margin("tie_tol", max(r, math.nextafter(1.0, 2.0)),
                       f"{n} token{'s' if n != 1 else ''} picked other experts beyond tie_tol {tie_tol:g} "
                       f"(widest gap {gap:.3g}; token {rres.diverged_tokens[0]} first)"),)
    n = len(rres.tie_tokens)
    return (Margin("tie_tol", min(r, 1.0), f"{n} near-tie flip{'s' if n != 1 else ''}, widest gap {gap:.3g} "
                   f"of tie_tol {tie_tol:g}"),)
