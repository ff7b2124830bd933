"""One stage's classification: :func:`~moesnap.judge.classify.classify`, then, for ``expert_out`` and
``moe_out`` under a finite ``expert_scale``, the expert-scale rule (does one expert's output carry a
scale error the elementwise rule admits?); with the result, its margins.  Run by
:func:`moesnap.judge.compare.compare_cases` on the stage tier of :mod:`moesnap.judge.pool`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..case import Case
from .classify import classify
from .margins import Margin, margins
from .device import JudgeDevice
from .routing import MIN_SHARE, expert_scale_errors, per_expert
from .tolerances import Tolerance
from .verdict import Result, Verdict


@dataclass(frozen=True)
class ExpertInputs:
    """The expert rule's golden side, as read from the golden case (the arithmetic is left to the stage
    task, on the host's threads or the judge's device)."""

    ids: np.ndarray                  # [T, k], in the slot order the judged arrays have
    expert_out: np.ndarray           # [T, k, H], the golden's, in its own slot order
    order: np.ndarray | None         # expert_out: the slots in ascending id order (argsort of the golden ids)
    weights: np.ndarray | None       # moe_out: the golden's topk_weights [T, k]
    total: np.ndarray | None         # moe_out: the golden moe_out [T, H], what the contributions sum to

    def contrib(self) -> np.ndarray:
        """The golden contribution of each (token, slot), ``[T, k, H]``, by numpy."""
        if self.order is not None:
            return np.take_along_axis(self.expert_out, self.order[..., None], 1)
        assert self.weights is not None   # expert_inputs gives moe_out its weights
        return self.expert_out.astype(np.float64) * self.weights.astype(np.float64)[..., None]


def expert_inputs(golden: Case, layer: int, stage: str) -> ExpertInputs | None:
    """The golden side of the expert rule for ``stage`` (``expert_out`` is compared in ascending id
    order, ``moe_out`` as it is), or None where the golden lacks what it needs."""
    ids, eo, w = (golden.stage(s, layer) for s in ("topk_ids", "expert_out", "topk_weights"))
    if ids is None or eo is None or ids.ndim != 2 or eo.shape[:2] != ids.shape:
        return None
    if stage == "expert_out":
        order = np.argsort(ids, axis=1)
        return ExpertInputs(np.take_along_axis(ids, order, 1), eo, order, None, None)
    if w is None or w.shape != ids.shape:
        return None
    return ExpertInputs(ids, eo, None, w, golden.stage("moe_out", layer))


#: an expert's scale error counts only beyond this many standard errors of rounding noise
EXPERT_Z = 6.0


def classify_stage(g: np.ndarray | None, c: np.ndarray | None, tol: Tolerance, exclude: tuple[int, ...],
                   experts: ExpertInputs | None, absent: int = 0, device: JudgeDevice | None = None
                   ) -> tuple[Result, tuple[Margin, ...]]:
    """classify, then (``experts`` given, the stage passed) the expert-scale rule of ``tol``; with the
    result, its margins.  ``absent``: how many of the ``exclude`` tokens are left out because the
    candidate does not hold them.  ``device``: where the statistics are computed (None: numpy)."""
    res = classify(g, c, tol, exclude_tokens=exclude, absent_tokens=absent, device=device)
    exact = g is not None and c is not None and g.dtype.kind in "biu" and c.dtype.kind in "biu"
    if experts is None or res.verdict != Verdict.MATCH or g is None or c is None or g.shape != c.shape:
        return res, margins(res, tol, exact=exact)
    ids, total = experts.ids, experts.total
    if experts.expert_out.shape[0] != c.shape[0] or (total is not None and total.shape != c.shape):
        return res, margins(res, tol, exact=exact)
    if device is not None and device.takes(g, c):
        from .torch_rows import device_pair_sums

        sums = device_pair_sums(ids, experts.expert_out, experts.weights, experts.order, g, c, total, exclude,
                                MIN_SHARE, device.device)
        errs = per_expert(ids, *sums)
    else:
        resid = c.astype(np.float64) - g.astype(np.float64)
        errs = expert_scale_errors(ids, experts.contrib(), resid, exclude, total)
    # an expert's error counts beyond expert_scale and beyond EXPERT_Z standard errors of noise
    near = max(errs, key=lambda e: abs(e[1]) / max(tol.expert_scale, EXPERT_Z * e[2]), default=None)
    expert = None if near is None else (near[0], near[1], max(tol.expert_scale, EXPERT_Z * near[2]))
    bad = [e for e in errs if abs(e[1]) > tol.expert_scale and abs(e[1]) > EXPERT_Z * e[2]]
    if not bad:
        return res, margins(res, tol, expert=expert)
    worst = max(bad, key=lambda e: abs(e[1]))
    first = min(e[4] for e in bad)
    detail = (f"expert {worst[0]}: its output is off by {100 * worst[1]:+.3g}% (±{100 * worst[2]:.2g}% noise) over "
              f"{worst[3]} routed (token, slot) pairs (expert_scale={tol.expert_scale:g}); "
              + (f"{len(bad)} experts beyond it; " if len(bad) > 1 else "") + res.detail)
    m = res.metrics
    assert m is not None   # a MATCH always carries metrics
    bad_tokens = sorted(set(m.bad_tokens) | {first})
    metrics = replace(m, first_bad_token=min(bad_tokens), bad_tokens=tuple(bad_tokens[:64]),
                      n_bad_tokens=max(m.n_bad_tokens, len(bad_tokens)))
    out = Result(Verdict.DIVERGE, metrics, detail, res.flipped_tokens, res.excluded_tokens)
    worst_limit = max(tol.expert_scale, EXPERT_Z * worst[2])
    return out, margins(out, tol, expert=(worst[0], worst[1], worst_limit))
