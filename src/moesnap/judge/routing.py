"""Routing: did each token choose the same experts as the golden, up to near ties?

:func:`classify_routing` compares top-k expert ids as *sets* per token (its docstring gives the
near-tie rule: a flip between experts whose golden router logits lie within ``tie_tol`` is
``ROUTING_TIE``, a wider one ``DIVERGE``); :func:`tie_gap` measures that distance;
:func:`align_topk_weights` puts per-expert arrays in expert-id order to compare them consistently;
:func:`expert_scale_errors` estimates each expert's relative scale error over the tokens routed to it.
Numpy, like :mod:`moesnap.judge.classify`, whose verdicts and formatting (:mod:`moesnap.judge.verdict`) it shares
(the expert-scale sums also in torch: :func:`moesnap.judge.torch_rows.device_pair_sums`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ToleranceError
from .pool import map_chunks
from .verdict import Metrics, Result, Verdict, fmt, json_float

_DETAIL_FLIPS = 8

@dataclass(frozen=True)
class Flip:
    """One token whose expert set differs between golden and candidate."""

    token: int
    golden_only: tuple[int, ...]
    candidate_only: tuple[int, ...]
    gap: float    # see classify_routing; +inf for invalid ids, NaN for non-finite logits
    tie: bool

    def to_dict(self) -> dict:
        return {"token": self.token, "golden_only": list(self.golden_only),
                "candidate_only": list(self.candidate_only), "gap": json_float(self.gap),
                "tie": self.tie}


@dataclass(frozen=True)
class RoutingResult:
    verdict: Verdict
    flipped_tokens: tuple[int, ...]
    tie_tokens: tuple[int, ...]
    diverged_tokens: tuple[int, ...]
    detail: str
    max_gap: float
    flips: tuple[Flip, ...] = ()

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def as_result(self, metrics: Metrics | None = None) -> Result:
        """This routing judgement as a stage :class:`Result` (for ``topk_ids``)."""
        return Result(self.verdict, metrics, self.detail, flipped_tokens=self.flipped_tokens)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict.name, "flipped_tokens": list(self.flipped_tokens),
                "tie_tokens": list(self.tie_tokens), "diverged_tokens": list(self.diverged_tokens),
                "detail": self.detail, "max_gap": json_float(self.max_gap),
                "flips": [f.to_dict() for f in self.flips]}


def tie_gap(logits_row: np.ndarray, chosen: np.ndarray) -> float:
    """The near-tie gap of choosing experts ``chosen`` under router logits ``logits_row`` [E]:
    ``max(l[e] for e not chosen) - min(l[e] for e chosen)`` (<= 0 when ``chosen`` is a top-k of
    the row; see :func:`classify_routing`).  +inf for invalid or repeated ids, NaN for non-finite
    logits."""
    row = np.asarray(logits_row, dtype=np.float64)
    ids = np.asarray(chosen)
    n = row.shape[0]
    if ids.size == 0 or not _valid_rows(ids.reshape(1, -1), n)[0] or ids.size >= n:
        return math.inf if ids.size and not _valid_rows(ids.reshape(1, -1), n)[0] else 0.0
    if not np.isfinite(row).all():
        return math.nan
    mask = np.zeros(n, dtype=bool)
    mask[ids.astype(np.int64)] = True
    return float(row[~mask].max() - row[mask].min())


#: (token, slot) pairs whose contribution is below this share of the token's total are left out of
#: the expert-scale estimate: a 90 % error of a 0.1 % contribution is below what the total's own
#: rounding shows (a near-tie slot at layer 26 of the 48-layer H200 run did just that)
MIN_SHARE = 0.05

#: values of a block of tokens whose per-pair sums one chunk-tier task computes (:func:`expert_pair_sums`)
PAIR_CHUNK_VALUES = 1 << 19


def expert_scale_errors(ids: np.ndarray, contrib: np.ndarray, resid: np.ndarray,
                        exclude_tokens: Collection[int] = (), total: np.ndarray | None = None
                        ) -> list[tuple[int, float, float, int, int]]:
    """Per expert, the least-squares relative scale of the candidate's error along the golden's
    contribution of that expert: ``eps_e = sum <r, a> / sum |a|^2`` over the (token, slot) pairs
    routed to ``e`` (``a = contrib[t, j]``, ``r = resid[t, j]`` or ``resid[t]`` when ``resid`` is
    ``[T, H]``).  A candidate whose expert ``e`` computes ``(1 + f) x`` the right output gives
    ``eps_e ~= f``; rounding noise, uncorrelated with ``a``, averages out over ``H`` elements and
    the tokens.  Returns ``(expert, eps, se, pairs, first token)`` for every expert with a non-zero
    contribution, where ``se`` is the standard error ``eps`` would have if the residual were noise
    of random sign in every element, of the magnitudes it has (``sqrt(sum r_i^2 a_i^2) / sum |a|^2``):
    an expert that gets only a few low-weight tokens has a large ``se`` and must not be judged on
    ``eps`` alone, and neither must one whose contribution and residual both sit in a few outlier
    elements (rounding error grows with magnitude: a formula that assumed the noise spread evenly
    over ``H`` elements underestimated ``se`` 45-fold there and raised false alarms).  With
    ``total`` (``[T, H]``, what the contributions sum to) pairs below :data:`MIN_SHARE` of their
    token's total are left out.  Non-finite
    pairs and excluded tokens are left out."""
    dots, sq, var, keep = expert_pair_sums(ids, contrib, resid, exclude_tokens, total)
    return per_expert(ids, dots, sq, var, keep)


def expert_pair_sums(ids: np.ndarray, contrib: np.ndarray, resid: np.ndarray, exclude_tokens: Collection[int] = (),
                     total: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sums over ``H`` of :func:`expert_scale_errors`, per (token, slot) ``[T, k]``: ``<r, a>``,
    ``|a|^2``, ``sum r_i^2 a_i^2``, and which pairs count (finite, not excluded, not below
    :data:`MIN_SHARE` of their token's total).  The device judge computes the same
    (:func:`moesnap.judge.torch_rows.device_pair_sums`).  In blocks of tokens on the chunk tier (each of
    :data:`PAIR_CHUNK_VALUES` values or so), every pair's sums the same whichever block holds it (until the
    eleventh session they were einsum's, in another order of summation: figures may move in the last bit)."""
    ids = np.asarray(ids)
    T, k = ids.shape
    a_all = np.asarray(contrib).reshape(T, k, -1)
    r_all = np.asarray(resid)
    r_all = r_all.reshape(T, 1, -1) if r_all.ndim == 2 else r_all.reshape(T, k, -1)
    tot_all = None if total is None else np.asarray(total).reshape(T, -1)
    per = max(1, PAIR_CHUNK_VALUES // max(1, k * a_all.shape[-1]))

    def block(lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The sums of tokens ``lo .. lo + per``, in float64 (each pair's the same whichever block holds it)."""
        a = a_all[lo:lo + per].astype(np.float64)          # a copy: squared in place below
        r = r_all[lo:lo + per].astype(np.float64)
        # numpy's pairwise sums along H: a pair's sums do not depend on the pairs beside it (einsum's did, for
        # some shapes: a block of one token, k = 1 and H = 9000 summed in another order)
        with np.errstate(over="ignore", invalid="ignore"):
            ra = np.multiply(r, a)                                             # [t, k, H]
            dots = ra.sum(axis=-1)                                             # [t, k]
            ra *= ra                                                           # (r a)^2 = r^2 a^2
            var = ra.sum(axis=-1)                                              # [t, k]
            a *= a
            sq = a.sum(axis=-1)                                                # [t, k]
            tsq = None
            if tot_all is not None:
                tot = tot_all[lo:lo + per].astype(np.float64)
                tot *= tot
                tsq = tot.sum(axis=-1)
        return dots, sq, var, tsq

    parts = map_chunks(block, list(range(0, T, per)))
    if parts:
        dots, sq, var = (np.concatenate([p[j] for p in parts]) for j in range(3))
    else:
        dots = sq = var = np.zeros((0, k))
    keep = np.ones((T, k), dtype=bool)
    if exclude_tokens:
        keep[np.asarray(sorted(exclude_tokens), dtype=np.int64)] = False
    keep &= np.isfinite(dots) & np.isfinite(sq) & np.isfinite(var)
    if tot_all is not None:   # ``resid`` is ``[T, H]``: each pair against the norm of its token's total
        tsq = np.concatenate([p[3] for p in parts])[:, None] if parts else np.zeros((0, 1))
        with np.errstate(over="ignore", invalid="ignore"):
            keep &= sq >= (MIN_SHARE ** 2) * tsq
    return dots, sq, var, keep


def per_expert(ids: np.ndarray, dots: np.ndarray, sq: np.ndarray, var: np.ndarray, keep: np.ndarray
               ) -> list[tuple[int, float, float, int, int]]:
    """:func:`expert_scale_errors`' answer from its per-pair sums (:func:`expert_pair_sums`)."""
    ids = np.asarray(ids)
    out = []
    for e in np.unique(ids[keep]).tolist():
        sel = keep & (ids == e)
        den = float(sq[sel].sum())
        if den > 0:
            se = math.sqrt(float(var[sel].sum())) / den
            out.append((int(e), float(dots[sel].sum()) / den, se, int(sel.sum()),
                        int(np.flatnonzero(sel.any(axis=1))[0])))
    return out


def _routing_fail(verdict: Verdict, detail: str) -> RoutingResult:
    return RoutingResult(verdict, (), (), (), detail, math.nan)


def _valid_rows(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """Per token: every id an integer in [0, E) and no id repeated."""
    if ids.dtype.kind in "iu":
        valid = ((ids >= 0) & (ids < n_experts)).all(axis=1)
    elif ids.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            valid = (np.isfinite(ids) & (ids == np.floor(ids)) & (ids >= 0) & (ids < n_experts)).all(axis=1)
    else:
        return np.zeros(ids.shape[0], dtype=bool)
    srt = np.sort(ids, axis=1)
    return valid & (np.diff(srt, axis=1) != 0).all(axis=1)


def classify_routing(
    golden_ids: np.ndarray | None,
    candidate_ids: np.ndarray | None,
    golden_router_logits: np.ndarray | None,
    tie_tol: float,
) -> RoutingResult:
    """Compare top-k expert ids ``[T, k]`` as sets per token.

    A token whose set differs is a *flip*.  For a flip with candidate set C
    and golden router logits l (softmax is monotone, so logits order experts
    as the probabilities do) its **gap** is::

        gap = max(l[e] for e not in C) - min(l[e] for e in C)

    and the flip is a tolerated **tie** iff ``gap <= tie_tol``: exactly when C
    is a top-k choice of *some* logits within ``tie_tol / 2`` of the golden's
    in every component (raise C by tie_tol/2, lower the rest).  When the
    golden ids G are the golden's own top-k, the max is taken on G \\ C and
    the min on C \\ G: every expert the candidate picked instead lies within
    tie_tol below the golden's k-th largest logit (the selection threshold)
    *and* every expert it dropped within tie_tol above it, which rejects
    dropping a clear winner for an expert just under the threshold.  Equal
    logits are ties even at ``tie_tol == 0``.

    Any non-tie flip gives ``DIVERGE``, only tie flips ``ROUTING_TIE``, none
    ``MATCH``.  A row with an id outside [0, E), a non-integer or a repeated
    id on either side is a non-tie flip (gap +inf), and so is a flip whose
    golden logits are not finite (gap NaN).  ``None`` input is ``MISSING``;
    ids not ``[T, k]`` alike, or logits not ``[T, E]`` with ``k <= E``, are
    ``SHAPE_MISMATCH``.  Bad data never raises; a negative or non-finite
    ``tie_tol`` raises ToleranceError.  ``max_gap`` is the largest gap over
    flips (0.0 without flips, NaN if one is NaN).
    """
    if not (isinstance(tie_tol, (int, float)) and math.isfinite(tie_tol) and tie_tol >= 0):
        raise ToleranceError(f"{tie_tol=} must be a finite number >= 0")
    named = {"golden_ids": golden_ids, "candidate_ids": candidate_ids,
             "golden_router_logits": golden_router_logits}
    missing = [name for name, a in named.items() if a is None]
    if missing:
        return _routing_fail(Verdict.MISSING, f"{', '.join(missing)} missing")
    gi, ci, logits = (np.asarray(a) for a in named.values())
    if gi.ndim != 2:
        return _routing_fail(Verdict.SHAPE_MISMATCH, f"golden_ids shape {gi.shape} is not [T, k]")
    if gi.shape != ci.shape:
        return _routing_fail(Verdict.SHAPE_MISMATCH,
                             f"golden_ids shape {gi.shape} != candidate_ids shape {ci.shape}")
    n_tokens, k = gi.shape
    if logits.ndim != 2 or logits.shape[0] != n_tokens or logits.shape[1] < k:
        return _routing_fail(Verdict.SHAPE_MISMATCH,
                             f"golden_router_logits shape {logits.shape} is not [T={n_tokens}, E>={k}]")
    if logits.dtype.kind not in "biuf":
        return _routing_fail(Verdict.DIVERGE, f"golden_router_logits dtype {logits.dtype} is not real")
    n_experts = logits.shape[1]
    vg, vc = _valid_rows(gi, n_experts), _valid_rows(ci, n_experts)
    flipped = ~(vg & vc)
    both = vg & vc
    if both.any() and k:
        same = (np.sort(gi[both], axis=1) == np.sort(ci[both], axis=1)).all(axis=1)
        flipped[np.flatnonzero(both)[~same]] = True

    flips: list[Flip] = []
    for t in np.flatnonzero(flipped).tolist():
        g_set = {int(e) for e in gi[t] if _is_int(e)}
        c_set = {int(e) for e in ci[t] if _is_int(e)}
        golden_only = tuple(sorted(g_set - c_set))
        candidate_only = tuple(sorted(c_set - g_set))
        if not (vg[t] and vc[t]):
            flips.append(Flip(t, golden_only, candidate_only, math.inf, False))
            continue
        gap = tie_gap(logits[t], ci[t])
        flips.append(Flip(t, golden_only, candidate_only, gap, gap <= tie_tol))

    tie_tokens = tuple(f.token for f in flips if f.tie)
    diverged = tuple(f.token for f in flips if not f.tie)
    gaps = [f.gap for f in flips]
    max_gap = 0.0 if not gaps else (math.nan if any(math.isnan(x) for x in gaps) else max(gaps))
    verdict = (Verdict.DIVERGE if diverged else Verdict.ROUTING_TIE if tie_tokens else Verdict.MATCH)
    if not flips:
        detail = f"all {n_tokens} tokens pick the same {k} experts"
    else:
        shown = "; ".join(
            f"token {f.token}: golden-only {list(f.golden_only)}, candidate-only "
            f"{list(f.candidate_only)}, gap {fmt(f.gap)} ({'tie' if f.tie else 'not a tie'})"
            for f in flips[:_DETAIL_FLIPS])
        more = f"; ... {len(flips) - _DETAIL_FLIPS} more" if len(flips) > _DETAIL_FLIPS else ""
        detail = (f"{len(flips)} of {n_tokens} tokens flipped ({len(tie_tokens)} near ties "
                  f"within tie_tol={tie_tol:g}, {len(diverged)} not): {shown}{more}")
    return RoutingResult(verdict, tuple(f.token for f in flips), tie_tokens, diverged, detail,
                         max_gap, tuple(flips))


def _is_int(e: Any) -> bool:
    try:
        return math.isfinite(float(e)) and float(e) == int(float(e))
    except (TypeError, ValueError, OverflowError):
        return False


def _sort_by_ids(ids: np.ndarray | None, values: np.ndarray | None) -> np.ndarray | None:
    if ids is None or values is None:
        return values
    ids, values = np.asarray(ids), np.asarray(values)
    if ids.ndim != 2 or values.shape[:2] != ids.shape or ids.dtype.kind not in "biuf":
        return values
    order = np.argsort(ids, axis=1, kind="stable")
    if values.ndim == 2:
        return np.take_along_axis(values, order, axis=1)
    # [T, k, ...]: whole rows gathered (take_along_axis would build an index per element: 6x slower on a
    # 2048-token expert_out of width 2048)
    T, k = ids.shape
    rows = (np.arange(T, dtype=np.intp)[:, None] * k + order).reshape(-1)
    return values.reshape((T * k,) + values.shape[2:])[rows].reshape(values.shape)


def align_topk_weights(
    golden_ids: np.ndarray | None,
    golden_w: np.ndarray | None,
    cand_ids: np.ndarray | None,
    cand_w: np.ndarray | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Reorder each side's per-expert values ``[T, k, ...]`` (``topk_weights``,
    ``expert_out``) by ascending expert id, so that position j holds the same
    expert on both sides wherever the expert sets agree.  A side whose ids
    cannot index its values (None, shapes not ``[T, k]`` / ``[T, k, ...]``,
    non-numeric ids) is returned as given: classify_routing and classify
    report the shape problem."""
    return _sort_by_ids(golden_ids, golden_w), _sort_by_ids(cand_ids, cand_w)
