"""The classifier: is a candidate array the golden one up to float noise?

Numpy; it knows nothing of stores or models.  It is the judge of the whole
tool, so every decision is written down here.  The same statistics are
computed in torch on a device where :mod:`moesnap.judge.device` says so
(``device=``: :mod:`moesnap.judge.torch_stats`, :mod:`moesnap.judge.torch_rows`),
with the same verdicts and numbers (sums up to their last bits).

Inputs
    numpy arrays only (bfloat16 arrives as float32 arrays holding bfloat16
    values).  Real floating, integer and bool dtypes are accepted; any other
    dtype (complex, object, str, void) raises :class:`MoesnapError`.  ``None``
    on either side is ``MISSING``; different shapes are ``SHAPE_MISMATCH``
    (the detail names both shapes); neither carries metrics.

Arithmetic
    Every metric is computed in float64.  Conversion of float16, bfloat16
    (via float32) and float32 to float64 is exact, so inputs that hold the
    same values give identical results whatever their dtype (up to the last
    bit of the summed metrics for arrays above :data:`~moesnap.judge.chunked.CHUNK` elements,
    which float16/float32 inputs sum in parallel chunks, in another order: :mod:`moesnap.judge.chunked`).  ``|c - g|`` is
    the correctly rounded float64 difference; it gives the tolerance test,
    ``max_abs`` and the worst element (+inf only for float64 inputs whose
    difference exceeds the float64 range: rightly outside).  Sums of squares
    are taken after dividing each vector by a power of two just above its
    largest magnitude (exact), so 1e38 (or 1e300 in float64) cannot overflow
    and subnormals cannot underflow into a wrong cosine; the metrics are
    therefore exactly equivariant under scaling both sides by a power of two.
    Where ``|c - g|`` overflowed, norms and ratios use the difference of the
    sides at one joint scale: ``rel_l2`` of [1e308, -1e308] against its
    negation is 2.  Only a metric whose true value is beyond float64 is +inf.

Non-finite dominance
    NaN and Inf are counted apart (``nan_*``, ``inf_*``), over *all*
    elements: a routing flip never excuses a non-finite value, so excluded
    tokens are counted too.  Any NaN/Inf in the candidate only is
    ``NAN_CANDIDATE``, in the golden only ``NAN_GOLDEN``, in both ``NAN_BOTH``
    (also when they sit at the same positions: a non-finite golden is itself
    a fault), whatever the other values are.  The other metrics are still
    computed, on the elements finite on both sides.

The elementwise rule
    An element is *outside* when it is non-finite on either side, or when
    ``|c - g| > atol + rtol * |g|`` (float64, so ``-0.0 == 0.0``).  The verdict
    is ``MATCH`` iff ``frac_outside <= max_frac_outside``, else ``DIVERGE``,
    where ``frac_outside = n_outside / n`` is the correctly rounded float64
    that the report shows (so a max_frac_outside of 1/3 admits 1 of 3).
    ``n`` counts the judged elements (those not in excluded tokens).
    Integer/bool arrays on both sides are compared exactly (tolerance
    ignored): ``MATCH`` iff every judged element is equal; their float
    metrics come from float64 copies (approximate beyond 2**53).  An integer
    array against a float array takes the float rule.

Metrics (on the judged elements finite on both sides, ``m`` of them)
    ``cosine`` = g.c / (|g| |c|), clamped to [-1, 1]; 1.0 when both are all
    zero (or exactly equal), 0.0 when exactly one side is all zero.
    ``rel_l2`` = |c - g| / |g| and ``nmse`` = rel_l2**2 (llama.cpp's NMSE);
    both 0 when c == g and +inf when g is all zero but c is not.
    ``max_abs``, ``mean_abs`` of |c - g|; ``max_rel`` = max |c - g| / |g|,
    where an element with g == 0 counts 0 if c == 0 else +inf.
    ``frac_outside`` = n_outside / n.
    ``closeness``: how near the elementwise rule is to failing, as error ÷
    tolerance: ``r = |c - g| / (atol + rtol * |g|)`` per element (0 where
    both are 0, +inf where only the bound is 0; for exact comparisons 0 or
    +inf), and ``closeness`` is the ``(a + 1)``-th largest ``r``, where ``a``
    is the number of outside elements ``max_frac_outside`` admits (the
    largest ``a`` with ``a / n <= max_frac_outside``; exact comparisons admit
    none), each non-finite judged element taking one of those places first
    (+inf when they alone exceed ``a``; 0.0 when fewer finite elements are
    judged).  So ``closeness > 1`` exactly when the elementwise rule fails,
    and a passing stage shows how much of its tolerance the deciding element
    uses (``max_frac_outside = 0``: the largest ``r``).
    ``token_closeness`` (along the token axis, else ``()``): per token, the
    largest ``r`` of its judged elements finite on both sides, +inf where the
    token holds a non-finite element (excluded or not), 0.0 for an excluded
    token otherwise.  Left out of :meth:`Metrics.to_dict` (one number per
    token; the HTML report draws it).
    When nothing is judged (``n == 0``: an empty array, or every token
    excluded) the verdict is ``MATCH`` (unless non-finite values dominate),
    cosine is 1.0 and the errors (and ``closeness``) are 0.  When elements are judged but none is
    finite on both sides, the float metrics are NaN (``null`` in JSON).

Locations
    ``worst_index`` is the first (C order) element non-finite on either side,
    else the judged element with the largest ``|c - g|`` (first on ties), or
    None when no judged element differs.  Along ``token_axis`` (default 0;
    None, or a 0-d array, means no token axis) a token is *bad* when it holds
    an element that is non-finite on either side (excluded or not) or a judged
    element outside the tolerance: ``first_bad_token`` is the smallest,
    ``bad_tokens`` the first :data:`MAX_BAD_TOKENS` in order, ``n_bad_tokens``
    their number.  Without a token axis they are None, () and 0.

The detail
    One line of prose with the verdict: the rule, the counts, the worst
    element and the bad tokens; where tokens were excluded, how many and why:
    ``absent_tokens`` of them because the candidate does not hold them (an
    imported dump: ``2 of 8 tokens not in the dump, 1 excluded (routing
    flips)``), the rest for routing flips.

The values it returns (:class:`Verdict`, :class:`Metrics`, :class:`Result`) live in
:mod:`moesnap.judge.verdict`, the error ÷ tolerance ratios in :mod:`moesnap.judge.ratios`.
Routing (which experts each token chose) is judged in :mod:`moesnap.judge.routing`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import replace

import numpy as np

from ..errors import MoesnapError
from .chunked import chunked_metrics
from .device import JudgeDevice
from .pool import map_chunks
from .ratios import closeness_of, ratios
from .tolerances import Tolerance
from .verdict import MAX_BAD_TOKENS, Metrics, Result, Verdict, bad_tokens_text, fmt, json_float

__all__ = ["MAX_BAD_TOKENS", "ROW_NORM_FLOOR", "Metrics", "Result", "Verdict", "bad_tokens_text", "classify", "fmt",
           "json_float"]


# ---------------------------------------------------------------- arithmetic


def _pow2_above(m: float) -> int:
    """Exponent e with m < 2**e (m finite > 0)."""
    return math.frexp(m)[1]


def _times_pow2(x: np.ndarray, k: int) -> np.ndarray:
    """x * 2**k, rounded once (a plain multiply while 2**k is a float64)."""
    if -1074 <= k <= 1023:
        return x * math.ldexp(1.0, k)
    return np.ldexp(x, k)


def _absmax(x: np.ndarray) -> float:
    return max(float(x.max()), -float(x.min())) if x.size else 0.0


def _normalised(x: np.ndarray, xmax: float) -> tuple[np.ndarray, float, int]:
    """(x / 2**e, sum((x / 2**e)**2), e) with 2**e just above xmax = max|x| > 0.

    The sum lies in [0.25, n]: no overflow, and an element whose square
    underflows is below 2**-1022 of the largest square, so negligible."""
    e = _pow2_above(xmax)
    xn = _times_pow2(x, -e)
    return xn, float(np.dot(xn, xn)), e


def _float_metrics(gs: np.ndarray, cs: np.ndarray, d: np.ndarray, abs_g: np.ndarray
                   ) -> tuple[float, float, float, float, float, float]:
    """(cosine, rel_l2, nmse, max_abs, mean_abs, max_rel) of finite, non-empty
    gs, cs with d = |cs - gs| and abs_g = |gs|."""
    gmax, cmax = float(abs_g.max()), _absmax(cs)
    max_abs = float(d.max())
    if gmax == 0.0 and cmax == 0.0:
        return 1.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if gmax == 0.0:                          # g all zero, c not: d == |c|
        return 0.0, math.inf, math.inf, max_abs, _scaled_mean(d, max_abs), math.inf
    g_n, sg, eg = _normalised(gs, gmax)
    if cmax == 0.0:
        cosine = 0.0
    elif max_abs == 0.0:
        cosine = 1.0
    else:
        c_n, sc, _ = _normalised(cs, cmax)
        cosine = min(1.0, max(-1.0, float(np.dot(g_n, c_n)) / math.sqrt(sg * sc)))
    rel = d / abs_g
    if max_abs == 0.0:
        sd, ed, mean_abs = 0.0, 0, 0.0
    elif math.isfinite(max_abs):
        _, sd, ed = _normalised(d, max_abs)
        mean_abs = _scaled_mean(d, max_abs)
    else:
        # |c - g| overflowed float64 somewhere: take the difference at one
        # joint power-of-two scale, where it is at most 2.
        e = _pow2_above(max(gmax, cmax))
        g_s = _times_pow2(gs, -e)
        ds = np.abs(_times_pow2(cs, -e) - g_s)
        sd, ed = float(np.dot(ds, ds)), e
        mean_abs = float(np.ldexp(np.mean(ds), e))
        over = np.isinf(d)
        rel[over] = ds[over] / np.abs(g_s[over])
    if sd == 0.0:
        rel_l2 = nmse = 0.0
    else:
        rel_l2 = float(np.ldexp(math.sqrt(sd) / math.sqrt(sg), ed - eg))
        nmse = float(np.ldexp(sd / sg, 2 * (ed - eg)))
    max_rel = float(np.fmax.reduce(rel))     # fmax skips the NaN of 0/0 (c == g == 0)
    return cosine, rel_l2, nmse, max_abs, mean_abs, 0.0 if math.isnan(max_rel) else max_rel


def _scaled_mean(x: np.ndarray, xmax: float) -> float:
    """Mean of non-negative x (max xmax, finite) without overflow in the sum."""
    if xmax == 0.0:
        return 0.0
    e = _pow2_above(xmax)
    # np.mean's own arithmetic (numpy's sum, then one division), without its Python wrapper's cost per call
    return float(np.ldexp(np.add.reduce(_times_pow2(x, -e), axis=None) / x.size, e))


# ---------------------------------------------------------------- classify


def _check_array(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype.kind not in "biuf":
        raise MoesnapError(
            f"cannot compare {name} of dtype {a.dtype}: only real floating, integer and bool arrays"
        )
    return a


def _token_axis(token_axis: int | None, ndim: int) -> int | None:
    if token_axis is None or ndim == 0:
        return None
    if not -ndim <= token_axis < ndim:
        raise ValueError(f"{token_axis=} is out of range for {ndim}-d arrays")
    return token_axis % ndim


def _excluded(exclude_tokens: Collection[int], axis: int | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    excluded = tuple(sorted({int(t) for t in exclude_tokens}))
    if not excluded:
        return ()
    if axis is None:
        raise ValueError(f"exclude_tokens={excluded} needs a token axis")
    bad = [t for t in excluded if not 0 <= t < shape[axis]]
    if bad:
        raise ValueError(f"exclude_tokens {bad} out of range for {shape[axis]} tokens")
    return excluded


def _tokens_of(mask: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    """Sorted token indices along ``axis`` holding a True element of flat ``mask``."""
    if axis is None:
        return np.zeros(0, dtype=np.int64)
    other = tuple(i for i in range(len(shape)) if i != axis)
    return np.flatnonzero(mask.reshape(shape).any(axis=other))


# ---------------------------------------------------------------- classify


def classify(
    golden: np.ndarray | None,
    candidate: np.ndarray | None,
    tol: Tolerance,
    *,
    token_axis: int | None = 0,
    exclude_tokens: Collection[int] = (),
    absent_tokens: int = 0,
    device: JudgeDevice | None = None,
) -> Result:
    """Judge ``candidate`` against ``golden`` under ``tol`` (see the module docstring).

    ``exclude_tokens`` are indices along ``token_axis`` left out of the
    tolerance judgement (tokens whose routing flipped at a near tie); they are
    reported back in ``Result.excluded_tokens``.  Out-of-range indices, or
    indices without a token axis, are a caller bug (ValueError).
    ``absent_tokens``: how many of the excluded tokens are excluded because the
    candidate does not hold them (an imported dump that kept some tokens' rows),
    not for a routing flip; the detail says so.
    ``device``: compute the statistics in torch there (:mod:`moesnap.judge.device`) where it takes the
    pair; the verdict and the numbers the reports print are numpy's.
    """
    n_excluded = len({int(t) for t in exclude_tokens})
    if not 0 <= absent_tokens <= n_excluded:
        raise ValueError(f"{absent_tokens=} must be between 0 and the {n_excluded} excluded tokens")
    res = _classify_elements(golden, candidate, tol, token_axis=token_axis, exclude_tokens=exclude_tokens,
                             absent_tokens=absent_tokens, device=device)
    if res.metrics is None or not math.isfinite(tol.row_rel_l2) or res.verdict not in (Verdict.MATCH, Verdict.DIVERGE):
        return res
    assert golden is not None and candidate is not None   # metrics come from two arrays
    if golden.dtype.kind in "biu" and candidate.dtype.kind in "biu":
        return res
    return _row_rule(res, golden, candidate, tol, _token_axis(token_axis, golden.ndim), device)



#: a row's error is taken relative to at least this fraction of the median row norm, so that rows
#: that are nearly zero (where any rounding is a large relative error) do not decide alone
ROW_NORM_FLOOR = 0.25


def _row_rule(res: Result, golden: np.ndarray, candidate: np.ndarray, tol: Tolerance, axis: int | None,
              device: JudgeDevice | None = None) -> Result:
    """Apply ``tol.row_rel_l2`` to every judged, finite row (a vector along the last axis).

    rel(row) = ||c - g|| / max(||g||, ROW_NORM_FLOOR * median row norm), in float64 at a
    power-of-two scale per row (no overflow).  Arrays with fewer than two axes, or whose
    token axis is the last one, have no rows.  ``device``: the figures computed there
    (:func:`moesnap.judge.torch_rows.device_row_stats`), else by numpy (:func:`row_stats`).
    """
    shape = golden.shape
    if golden.ndim < 2 or axis == golden.ndim - 1 or golden.size == 0:
        return res
    if device is not None and device.takes(golden, candidate):
        from .torch_rows import device_row_stats

        stats = device_row_stats(golden, candidate, tol.row_rel_l2, axis, res.excluded_tokens, ROW_NORM_FLOOR,
                                 device.device)
    else:
        stats = row_stats(golden, candidate, tol.row_rel_l2, axis, res.excluded_tokens)
    n_rows, max_rel, worst_flat, n_bad_rows, bad_row_tok = stats
    if n_rows == 0:
        return res
    m = res.metrics
    assert m is not None   # classify applies the row rule to judged arrays only
    if not n_bad_rows:
        return Result(res.verdict, replace(m, max_row_rel_l2=max_rel), res.detail, res.flipped_tokens,
                      res.excluded_tokens)
    bad_tok = np.unique(np.concatenate([np.asarray(m.bad_tokens, dtype=np.int64), bad_row_tok]))
    n_bad_tokens = max(m.n_bad_tokens, int(bad_tok.size))
    worst_row = tuple(int(i) for i in np.unravel_index(worst_flat, shape[:-1]))
    metrics = replace(m, max_row_rel_l2=max_rel, n_bad_rows=n_bad_rows,
                      first_bad_token=int(bad_tok[0]) if bad_tok.size else m.first_bad_token,
                      bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]), n_bad_tokens=n_bad_tokens)
    detail = (f"{n_bad_rows} of {n_rows} rows with relative L2 error above row_rel_l2={tol.row_rel_l2:g} "
              f"(worst {fmt(max_rel)} at row {worst_row})")
    if res.verdict == Verdict.DIVERGE:
        detail = f"{res.detail}; {detail}"
    else:
        detail = f"{detail}; elementwise: {res.detail}"
    return Result(Verdict.DIVERGE, metrics, detail, res.flipped_tokens, res.excluded_tokens)


#: values of a row rule's chunk of whole rows (a chunk-tier task each)
ROW_CHUNK_VALUES = 1 << 18


def row_stats(golden: np.ndarray, candidate: np.ndarray, limit: float, axis: int | None,
              excluded: tuple[int, ...]) -> tuple[int, float, int, int, np.ndarray]:
    """The row rule's figures, by numpy: (judged rows, largest relative error, flat index over the rows
    of the first row holding it, rows above ``limit``, the sorted tokens of those rows).

    Each row's norms are computed in chunks of whole rows on the chunk tier (every row's figures the same
    whichever chunk holds it, bit for bit); only the median row norm needs every row.  (Until the eleventh
    session the sums of squares were einsum's over the whole array, whose order depended on the rows beside:
    figures may differ from those in the last bit.)"""
    shape = golden.shape
    width = shape[-1]
    g2, c2 = golden.reshape(-1, width), candidate.reshape(-1, width)
    per = max(1, ROW_CHUNK_VALUES // max(width, 1))

    def chunk(lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return _row_norms(g2[lo:lo + per], c2[lo:lo + per])

    parts = map_chunks(chunk, list(range(0, g2.shape[0], per)))
    keep, dn, gn, e = (np.concatenate([p[j] for p in parts]) if parts else np.zeros(0) for j in range(4))
    return row_figures(keep.astype(bool), dn, gn, e.astype(np.int64), shape, limit, axis, excluded)


def row_figures(finite: np.ndarray, dn: np.ndarray, gn: np.ndarray, e: np.ndarray, shape: tuple[int, ...],
                limit: float, axis: int | None, excluded: tuple[int, ...]) -> tuple[int, float, int, int, np.ndarray]:
    """:func:`row_stats`' answer from every row's norms (``finite``: the row is finite on both sides; ``dn``,
    ``gn``: ||c - g|| and ||g|| at the row's scale ``2**-e``): the rows judged (finite, not excluded), each
    one's error against the floor of the median row norm, the worst, and those above ``limit``."""
    keep = finite.copy()
    row_tok = None
    if axis is not None:
        row_tok = np.unravel_index(np.arange(keep.shape[0]), shape[:-1])[axis]
        if excluded:
            keep &= ~np.isin(row_tok, np.asarray(excluded))
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return 0, 0.0, -1, 0, np.zeros(0, np.int64)
    dn, gn, e = dn[rows], gn[rows], e[rows]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        true_gn = np.ldexp(gn, e)
        floor = ROW_NORM_FLOOR * float(np.median(true_gn))
        den = np.maximum(gn, np.ldexp(np.full_like(gn, floor), -e))
        rel = np.where(dn == 0, 0.0, dn / den)
    rel = np.where(np.isnan(rel), np.inf, rel)
    worst = int(np.argmax(rel))
    bad = rel > limit
    bad_tok = np.unique(row_tok[rows[bad]]) if row_tok is not None else np.zeros(0, np.int64)
    return int(rows.size), float(rel[worst]), int(rows[worst]), int(bad.sum()), bad_tok


def _row_norms(golden: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row ``[n, W]``: (finite on both sides, ||c - g|| and ||g|| at the row's scale 2**-e, e), in float64;
    a row that is not finite has norms of no meaning (the caller leaves it out)."""
    g = golden.astype(np.float64, copy=False)
    c = candidate.astype(np.float64, copy=False)
    finite = np.isfinite(g).all(axis=1) & np.isfinite(c).all(axis=1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        top = np.maximum(np.abs(g).max(axis=1), np.abs(c).max(axis=1))
        e = np.frexp(np.where(top > 0, top, 1.0))[1]
        gs, cs = np.ldexp(g, -e[:, None]), np.ldexp(c, -e[:, None])
        # each row's sum of squares by numpy's pairwise sum along the row: the same for a row whatever rows
        # share its chunk (einsum's buffered reduction summed a wide row in another order with more rows)
        d = cs - gs
        d *= d
        dn = np.sqrt(d.sum(axis=1))
        gs *= gs
        gn = np.sqrt(gs.sum(axis=1))
    return finite, dn, gn, e.astype(np.float64)


def _classify_elements(
    golden: np.ndarray | None,
    candidate: np.ndarray | None,
    tol: Tolerance,
    *,
    token_axis: int | None = 0,
    exclude_tokens: Collection[int] = (),
    absent_tokens: int = 0,
    device: JudgeDevice | None = None,
) -> Result:
    if golden is None or candidate is None:
        side = "golden and candidate" if golden is None and candidate is None else (
            "golden" if golden is None else "candidate")
        return Result(Verdict.MISSING, None, f"{side} missing")
    golden = _check_array("golden", golden)
    candidate = _check_array("candidate", candidate)
    if golden.shape != candidate.shape:
        detail = f"golden shape {golden.shape} != candidate shape {candidate.shape}"
        return Result(Verdict.SHAPE_MISMATCH, None, detail)
    shape = golden.shape
    axis = _token_axis(token_axis, golden.ndim)
    excluded = _excluded(exclude_tokens, axis, shape)
    exact = golden.dtype.kind in "biu" and candidate.dtype.kind in "biu"
    metrics = None
    if device is not None and device.takes(golden, candidate):
        from .torch_stats import device_metrics

        metrics = device_metrics(golden, candidate, tol, axis, excluded, exact, device.device)
    if metrics is None:
        metrics = chunked_metrics(golden, candidate, tol, axis, excluded)
    if metrics is None:
        metrics = _general_metrics(golden, candidate, tol, axis, excluded, exact)
    verdict, detail = _judge(metrics, tol, exact, golden, candidate, shape, excluded, axis, absent_tokens)
    return Result(verdict, metrics, detail, excluded_tokens=excluded)


def _general_metrics(golden: np.ndarray, candidate: np.ndarray, tol: Tolerance, axis: int | None,
                     excluded: tuple[int, ...], exact: bool) -> Metrics:
    """The metrics of any pair of one shape (non-finite values, float64, integers), in one pass."""
    shape = golden.shape
    g = golden.astype(np.float64, copy=False).reshape(-1)
    c = candidate.astype(np.float64, copy=False).reshape(-1)
    finite = np.isfinite(g)
    finite &= np.isfinite(c)
    counts: tuple[int, ...]
    if finite.all():
        nonfinite = None
        counts = (0, 0, 0, 0)
    else:
        nonfinite = ~finite
        counts = tuple(int(f(a).sum()) for a in (g, c) for f in (np.isnan, np.isinf))

    judged: np.ndarray | None
    sel: np.ndarray | None
    if excluded:
        assert axis is not None   # _excluded refuses token indices without a token axis
        keep = np.ones(shape[axis], dtype=np.bool_)
        keep[list(excluded)] = False
        view = [1] * len(shape)
        view[axis] = shape[axis]
        judged = np.broadcast_to(keep.reshape(view), shape).reshape(-1)
        n = int(judged.sum())
        sel = judged if nonfinite is None else judged & finite
    else:
        judged = None
        n = g.size
        sel = None if nonfinite is None else finite
    gs, cs = (g, c) if sel is None else (g[sel], c[sel])
    m = gs.size
    n_nonfinite_judged = 0
    if nonfinite is not None:
        n_nonfinite_judged = int(nonfinite.sum() if judged is None else (nonfinite & judged).sum())

    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        d = cs - gs
        np.abs(d, out=d)        # correctly rounded; +inf only past the float64 range
        abs_g = np.abs(gs)
        if exact:
            gi, ci = golden.reshape(-1), candidate.reshape(-1)
            outside = gi != ci if sel is None else gi[sel] != ci[sel]
            ratio = np.where(outside, math.inf, 0.0)
        else:
            thr = abs_g * tol.rtol
            thr += tol.atol
            outside = d > thr
            ratio = ratios(d, thr, outside)
        n_outside = int(outside.sum()) + n_nonfinite_judged
        closeness = closeness_of(ratio, n, n_nonfinite_judged, 0.0 if exact else tol.max_frac_outside)
        if m:
            cosine, rel_l2, nmse, max_abs, mean_abs, max_rel = _float_metrics(gs, cs, d, abs_g)
        else:
            value = 1.0 if n == 0 else math.nan
            zero = 0.0 if n == 0 else math.nan
            cosine, rel_l2, nmse, max_abs, mean_abs, max_rel = value, zero, zero, zero, zero, zero

    if n_outside == 0 and nonfinite is None:
        bad_tok = np.zeros(0, dtype=np.int64)
    else:
        bad = np.zeros(g.size, dtype=bool) if nonfinite is None else nonfinite.copy()
        if sel is None:
            bad |= outside
        else:
            bad[sel] = outside
        bad_tok = _tokens_of(bad, shape, axis)

    token_close: tuple[float, ...] = ()
    if axis is not None:
        full = ratio if sel is None else np.zeros(g.size)
        if sel is not None:
            full[sel] = ratio
        width = int(np.prod(shape, dtype=np.int64)) // shape[axis] if shape[axis] else 0
        by_token = full.reshape(shape[axis], width) if axis == 0 else \
            np.moveaxis(full.reshape(shape), axis, 0).reshape(shape[axis], width)    # (axis 0: a view, no moveaxis)
        per = by_token.max(axis=1, initial=0.0)
        if nonfinite is not None:
            per[_tokens_of(nonfinite, shape, axis)] = math.inf
        token_close = tuple(per.tolist())

    worst: tuple[int, ...] | None = None
    if nonfinite is not None:
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(nonfinite)), shape))
    elif m and max_abs > 0:
        k = int(np.argmax(d))
        flat = k if sel is None else int(np.flatnonzero(sel)[k])
        worst = tuple(int(i) for i in np.unravel_index(flat, shape))

    nan_golden, inf_golden, nan_candidate, inf_candidate = counts
    return Metrics(
        n=n, cosine=cosine, rel_l2=rel_l2, nmse=nmse, max_abs=max_abs, mean_abs=mean_abs,
        max_rel=max_rel, frac_outside=n_outside / n if n else 0.0, n_outside=n_outside,
        nan_golden=nan_golden, nan_candidate=nan_candidate,
        inf_golden=inf_golden, inf_candidate=inf_candidate,
        worst_index=worst,
        first_bad_token=int(bad_tok[0]) if bad_tok.size else None,
        bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]),
        n_bad_tokens=int(bad_tok.size), closeness=closeness, token_closeness=token_close,
    )


def _judge(mt: Metrics, tol: Tolerance, exact: bool, golden: np.ndarray, candidate: np.ndarray,
           shape: tuple[int, ...], excluded: tuple[int, ...], axis: int | None, absent: int) -> tuple[Verdict, str]:
    where = ""
    if mt.worst_index is not None:
        idx = mt.worst_index
        where = (f"; worst at {idx}: golden={fmt(float(golden[idx]))}, "
                 f"candidate={fmt(float(candidate[idx]))}")
        if mt.first_bad_token is not None:
            where += "; " + bad_tokens_text(mt)
    g_bad = mt.nan_golden + mt.inf_golden
    c_bad = mt.nan_candidate + mt.inf_candidate
    if g_bad or c_bad:
        verdict = (Verdict.NAN_BOTH if g_bad and c_bad
                   else Verdict.NAN_GOLDEN if g_bad else Verdict.NAN_CANDIDATE)
        parts = [f"{side}: {nan} NaN, {inf} Inf" if nan or inf else f"{side} finite"
                 for side, nan, inf in (("golden", mt.nan_golden, mt.inf_golden),
                                        ("candidate", mt.nan_candidate, mt.inf_candidate))]
        return verdict, "; ".join(parts) + where
    note = ""
    if excluded and axis is not None:
        flips = len(excluded) - absent
        note = (f"; {len(excluded)} of {shape[axis]} tokens excluded (routing flips)" if not absent else
                f"; {absent} of {shape[axis]} tokens not in the dump" + (f", {flips} excluded (routing flips)"
                                                                         if flips else ""))
    if mt.n == 0:
        return Verdict.MATCH, f"nothing judged: {'all tokens excluded' if excluded else 'empty arrays'}"
    rule = "exact equality" if exact else f"|c-g| <= atol + rtol*|g| ({tol})"
    ok = mt.n_outside == 0 if exact else mt.frac_outside <= tol.max_frac_outside
    stats = f"max_abs={fmt(mt.max_abs)}, max_rel={fmt(mt.max_rel)}, cosine={fmt(mt.cosine)}"
    if mt.n_outside == 0:
        return Verdict.MATCH, f"all {mt.n} elements within {rule}; {stats}{note}"
    counted = f"{mt.n_outside} of {mt.n} elements ({100.0 * mt.frac_outside:.3g}%) outside {rule}"
    if ok:
        allowed = f"{100.0 * tol.max_frac_outside:.3g}%"
        return Verdict.MATCH, f"{counted}, within the allowed {allowed}; {stats}{where}{note}"
    return Verdict.DIVERGE, f"{counted}; {stats}{where}{note}"
