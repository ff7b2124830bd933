"""The classifier: is a candidate array the golden one up to float noise?

Pure numpy; it knows nothing of stores, models or torch.  It is the judge of
the whole tool, so every decision is written down here.

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
    bit of the summed metrics for arrays above :data:`CHUNK` elements, which
    float16/float32 inputs sum in parallel chunks, in another order).  ``|c - g|`` is
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

Routing (which experts each token chose) is judged in :mod:`moesnap.judge.routing`.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ..errors import MoesnapError
from .tolerances import Tolerance

MAX_BAD_TOKENS = 64
_SMALL_FLOATS = (np.dtype(np.float16), np.dtype(np.float32))


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
    return float(np.ldexp(np.mean(_times_pow2(x, -e)), e))


# ---------------------------------------------------------------- closeness


def _admitted(n: int, max_frac_outside: float) -> int:
    """The most outside elements of ``n`` the rule admits: the largest ``a`` with ``a / n <=
    max_frac_outside`` in float64, as :func:`_judge` compares ``frac_outside``."""
    if n == 0:
        return 0
    a = min(n, int(math.floor(max_frac_outside * n)))
    while a < n and (a + 1) / n <= max_frac_outside:
        a += 1
    while a > 0 and a / n > max_frac_outside:
        a -= 1
    return a


def _ratios(d: np.ndarray, thr: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Per element ``d / thr`` (error ÷ tolerance), 0 where both are 0; above 1 exactly where
    ``outside`` (``d > thr``: correctly rounded division is monotone, and ``d > thr > 0`` gives a
    quotient of at least 1 + 2**-52)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = d / thr
    bad = np.isnan(r)          # 0/0, inf/inf
    if bad.any():
        r[bad] = np.where(outside[bad], math.inf, 0.0)
    return r


def _deciding(top: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``top`` (``k >= 1``; 0.0 when it has fewer values)."""
    if k > top.size:
        return 0.0
    if k == 1:
        return float(top.max())
    return float(np.partition(top, top.size - k)[top.size - k])


def _largest(r: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values of ``r`` (all of them when it has fewer), in no order, in a new array.

    Partitioning a whole chunk costs more than everything else done to it; so the candidates are
    cut first: the k largest values lie in blocks whose maxima are at least the k-th largest
    block maximum ``m`` (k blocks hold k values >= m), so every one of them is >= ``m``.
    """
    if k >= r.size:
        return r.copy()
    if k == 1:
        return np.asarray([r.max()])
    block = min(256, r.size // (8 * k))   # at least 8k blocks, so few values pass the cut
    if block >= 16:
        maxima = np.maximum.reduceat(r, np.arange(0, r.size, block))
        m = np.partition(maxima, maxima.size - k)[maxima.size - k]
        cand = r[r >= m]
        return cand if cand.size <= k else np.partition(cand, cand.size - k)[cand.size - k:]
    return np.partition(r, r.size - k)[r.size - k:]


def _closeness(r: np.ndarray, n: int, n_nonfinite: int, max_frac_outside: float) -> float:
    """``closeness`` (module docstring) from the ratios ``r`` of the judged finite elements."""
    if n == 0:
        return 0.0
    k = _admitted(n, max_frac_outside) + 1 - n_nonfinite
    return math.inf if k <= 0 else _deciding(r, k)


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


# ---------------------------------------------------------------- large arrays

#: arrays above this many elements take the chunked path when it applies
CHUNK = 1 << 17
_CHUNK_POOL = None


def _chunk_pool():
    global _CHUNK_POOL
    if _CHUNK_POOL is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _CHUNK_POOL = ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1)),
                                         thread_name_prefix="moesnap-chunk")
    return _CHUNK_POOL


class _ChunkStats(NamedTuple):
    """Partial statistics of one chunk, in float64, summed or maxed over chunks by the caller."""

    n: int                  # judged elements
    n_outside: int
    outside: np.ndarray     # flat indices of the elements outside the tolerance
    gmax: float             # 0.0 when every |g| is 0 (else 1.0: only zero-ness is needed)
    cmax: float             # likewise for c
    max_abs: float          # max |c - g|
    worst_flat: int         # flat index of max_abs (-1: none)
    sgg: float              # sum g*g
    scc: float              # sum c*c
    sgc: float              # sum g*c
    sdd: float              # sum d*d
    sd: float               # sum |d|
    max_rel: float
    top: np.ndarray         # the largest error ÷ tolerance ratios (as many as closeness needs), or every
                            # _SAMPLE-th ratio when closeness is found in two passes (_kth_largest)
    run_tok: np.ndarray     # token of each run of consecutive elements of one token
    run_max: np.ndarray     # largest ratio of each run (0 for excluded tokens)


_NONE = np.zeros(0, np.int64)
_SCRATCH = threading.local()


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's working buffers for a chunk of ``n`` elements (three float64, one bool),
    reused from chunk to chunk: a fresh megabyte temporary is a fresh mapping whose every page
    faults on first touch, which cost more than the arithmetic done in it."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].size < n:
        m = max(n, CHUNK)
        bufs = (np.empty(m), np.empty(m), np.empty(m), np.empty(m, dtype=np.bool_))
        _SCRATCH.bufs = bufs
    return bufs[0][:n], bufs[1][:n], bufs[2][:n], bufs[3][:n]


def _chunk_stats(g32: np.ndarray, c32: np.ndarray, start: int, tol: Tolerance, keep: np.ndarray | None,
                 inner: int, n_tok: int, k_top: int, per_token: bool, sample: bool = False) -> _ChunkStats | None:
    """Partial statistics of one chunk of flat float16/float32 arrays, in float64; None if non-finite.

    Few passes, each over a chunk that stays in cache, buffers reused in place: the sums of
    squares double as the finiteness test (a float32 value squared cannot overflow float64, so
    they are finite exactly when every element is) and as the all-zero test (``gmax == 0``
    exactly when ``sgg == 0``).
    """
    size = g32.size
    g, c, tmp, flags = _scratch(size)
    np.copyto(g, g32)
    np.copyto(c, c32)
    sgg, scc = float(np.dot(g, g)), float(np.dot(c, c))
    if not (math.isfinite(sgg) and math.isfinite(scc)):
        return None
    idx = None
    if keep is not None:
        tok = (np.arange(start, start + size) // inner) % n_tok
        sel = keep[tok]
        idx = np.flatnonzero(sel)
        g, c = g[sel], c[sel]
        sgg, scc = float(np.dot(g, g)), float(np.dot(c, c))
    run_tok, run_max = _NONE, np.zeros(0)
    if g.size == 0:
        if per_token:   # every token of the chunk excluded: their runs are 0
            starts = _run_starts(start, size, inner)
            run_tok, run_max = ((start + starts) // inner) % n_tok, np.zeros(starts.size)
        return _ChunkStats(0, 0, _NONE, 0.0, 0.0, 0.0, -1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.zeros(0),
                           run_tok, run_max)
    sgc = float(np.dot(g, c))
    d = np.subtract(c, g, out=c)          # c is not needed past its sums
    np.abs(d, out=d)
    abs_g = np.abs(g, out=g)
    with np.errstate(divide="ignore", invalid="ignore"):
        max_rel = float(np.fmax.reduce(np.divide(d, abs_g, out=tmp[:d.size])))
    thr = np.multiply(abs_g, tol.rtol, out=abs_g)
    thr += tol.atol
    outside = np.greater(d, thr, out=flags[:d.size])
    if tol.atol > 0:     # thr > 0 everywhere: no 0/0 to mend
        ratio = np.divide(d, thr, out=thr)
    else:
        ratio = _ratios(d, thr, outside)
    out = np.flatnonzero(outside)
    if idx is not None:
        out = idx[out]
    if per_token:
        full = ratio if idx is None else np.zeros(size)
        if idx is not None:
            full[idx] = ratio
        starts = _run_starts(start, size, inner)
        run_tok, run_max = ((start + starts) // inner) % n_tok, np.maximum.reduceat(full, starts)
    k = int(np.argmax(d))
    pos_k = k if idx is None else int(idx[k])
    return _ChunkStats(g.size, out.size, out + start, 0.0 if sgg == 0.0 else 1.0, 0.0 if scc == 0.0 else 1.0,
                       float(d[k]), start + pos_k, sgg, scc, sgc, float(np.dot(d, d)), float(d.sum()),
                       0.0 if math.isnan(max_rel) else max_rel,
                       ratio[::_SAMPLE].copy() if sample else _largest(ratio, k_top), run_tok, run_max)


#: above this many deciding ratios (k = admitted + 1: float32's rules admit none, so k is 1) closeness
#: is found in two passes rather than by each chunk keeping its k largest
_ONE_PASS_K = 1024
_SAMPLE = 32


def _kth_largest(g: np.ndarray, c: np.ndarray, starts: range, tol: Tolerance, keep: np.ndarray | None,
                 inner: int, n_tok: int, k: int, sample: np.ndarray) -> float:
    """The ``k``-th largest error ÷ tolerance ratio of the judged elements, exactly, when ``k`` is large
    (a low-precision rule admitting 0.5 % of the logits' 19 million elements outside: k ~ 10^5, and each
    chunk partitioning its ratios cost 5x the rest of classifying it).

    ``sample`` holds every :data:`_SAMPLE`-th ratio of each chunk; its value ``t`` of rank about
    2k / _SAMPLE lies below the k-th largest ratio of all but in freak cases.  A second pass keeps
    the ratios >= t; when at least k of them pass, the k largest of all are among them and the
    k-th is exact; otherwise the pass is repeated keeping every ratio.
    """
    rank = min(sample.size, 2 * k // _SAMPLE + 64)
    t = float(np.partition(sample, sample.size - rank)[sample.size - rank])
    for cut in (t, -math.inf):
        cand = np.concatenate(list(_chunk_pool().map(
            lambda s: _ratios_at_least(g[s:s + CHUNK], c[s:s + CHUNK], s, tol, keep, inner, n_tok, cut), starts)))
        if cand.size >= k:
            return float(np.partition(cand, cand.size - k)[cand.size - k])
    return 0.0   # fewer than k judged elements (the caller does not ask then)


def _ratios_at_least(g32: np.ndarray, c32: np.ndarray, start: int, tol: Tolerance, keep: np.ndarray | None,
                     inner: int, n_tok: int, cut: float) -> np.ndarray:
    """The judged elements' ratios ``>= cut`` of one chunk, computed with exactly the operations of
    :func:`_chunk_stats` (so the same values)."""
    size = g32.size
    g, c, _, _ = _scratch(size)
    np.copyto(g, g32)
    np.copyto(c, c32)
    if keep is not None:
        sel = keep[(np.arange(start, start + size) // inner) % n_tok]
        g, c = g[sel], c[sel]
    d = np.subtract(c, g, out=c)
    np.abs(d, out=d)
    thr = np.abs(g, out=g)
    np.multiply(thr, tol.rtol, out=thr)
    thr += tol.atol
    if tol.atol > 0:
        ratio = np.divide(d, thr, out=thr)
    else:
        ratio = _ratios(d, thr, d > thr)
    return ratio[ratio >= cut]


def _run_starts(start: int, size: int, inner: int) -> np.ndarray:
    """Offsets in the chunk ``[start, start + size)`` where a run of one token's elements begins
    (flat index a multiple of ``inner``), 0 first."""
    first = -(-start // inner) * inner - start
    starts = np.arange(first, size, inner, dtype=np.int64)
    return starts if first == 0 else np.concatenate([[0], starts])


def _classify_chunked(golden: np.ndarray, candidate: np.ndarray, tol: Tolerance, axis: int | None,
                      excluded: tuple[int, ...]) -> Result | None:
    """The common case of a large all-finite float16/float32 pair, in parallel chunks.

    Squares of float32 values neither overflow nor underflow in float64, so
    no power-of-two scaling is needed; results equal the general path's up to
    the order of summation.  Returns None (caller takes the general path) as
    soon as a chunk holds a non-finite value.
    """
    shape = golden.shape
    g = golden.reshape(-1)
    c = candidate.reshape(-1)
    keep: np.ndarray | None = None
    inner, n_tok = 1, 1
    if axis is not None:
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        n_tok = shape[axis]
    if excluded:
        assert axis is not None   # _excluded refuses token indices without a token axis
        keep = np.ones(shape[axis], dtype=np.bool_)
        keep[list(excluded)] = False
    n_judged = g.size if keep is None else int(keep.sum()) * (g.size // max(1, n_tok))
    k_top = _admitted(n_judged, tol.max_frac_outside) + 1
    per_token = axis is not None and inner > 0
    starts = range(0, g.size, CHUNK)
    two_pass = k_top > _ONE_PASS_K
    parts = list(_chunk_pool().map(
        lambda s: _chunk_stats(g[s:s + CHUNK], c[s:s + CHUNK], s, tol, keep, inner, n_tok, k_top, per_token,
                               sample=two_pass),
        starts))
    if any(p is None for p in parts):
        return None
    m = sum(p.n for p in parts)
    assert m == n_judged
    if two_pass:
        closeness = 0.0 if k_top > m else _kth_largest(g, c, starts, tol, keep, inner, n_tok, k_top,
                                                       np.concatenate([p.top for p in parts]))
    else:
        closeness = _closeness(np.concatenate([p.top for p in parts]), m, 0, tol.max_frac_outside)
    token_close: tuple[float, ...] = ()
    if axis is not None:
        per = np.zeros(n_tok)
        if per_token:
            np.maximum.at(per, np.concatenate([p.run_tok for p in parts]), np.concatenate([p.run_max for p in parts]))
        token_close = tuple(per.tolist())
    n_outside = sum(p.n_outside for p in parts)
    gmax = max(p.gmax for p in parts)
    cmax = max(p.cmax for p in parts)
    max_abs = max(p.max_abs for p in parts)
    worst_flat = next((p.worst_flat for p in parts if p.n and p.max_abs == max_abs), -1)
    sgg, scc, sgc, sdd, sd = (math.fsum(getattr(p, k) for p in parts) for k in ("sgg", "scc", "sgc", "sdd", "sd"))
    max_rel = max(p.max_rel for p in parts)
    if m == 0:
        cosine, rel_l2, nmse, mean_abs, max_rel = 1.0, 0.0, 0.0, 0.0, 0.0
    elif gmax == 0.0 and cmax == 0.0:
        cosine, rel_l2, nmse, mean_abs, max_rel = 1.0, 0.0, 0.0, 0.0, 0.0
    elif gmax == 0.0:
        cosine, rel_l2, nmse, mean_abs, max_rel = 0.0, math.inf, math.inf, sd / m, math.inf
    else:
        if cmax == 0.0:
            cosine = 0.0
        elif max_abs == 0.0:
            cosine = 1.0
        else:
            cosine = min(1.0, max(-1.0, sgc / math.sqrt(sgg * scc)))
        rel_l2 = math.sqrt(sdd) / math.sqrt(sgg) if sdd else 0.0
        nmse = sdd / sgg if sdd else 0.0
        mean_abs = sd / m
    bad_tok = np.zeros(0, dtype=np.int64)
    if n_outside and axis is not None:
        outs = np.concatenate([p.outside for p in parts if p.n_outside])
        inner_t = int(np.prod(shape[axis + 1:], dtype=np.int64))
        bad_tok = np.unique((outs // inner_t) % shape[axis])
    worst = None
    if m and max_abs > 0 and worst_flat >= 0:
        worst = tuple(int(i) for i in np.unravel_index(worst_flat, shape))
    n = m
    metrics = Metrics(
        n=n, cosine=cosine, rel_l2=rel_l2, nmse=nmse, max_abs=max_abs, mean_abs=mean_abs,
        max_rel=max_rel, frac_outside=n_outside / n if n else 0.0, n_outside=n_outside,
        nan_golden=0, nan_candidate=0, inf_golden=0, inf_candidate=0, worst_index=worst,
        first_bad_token=int(bad_tok[0]) if bad_tok.size else None,
        bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]), n_bad_tokens=int(bad_tok.size),
        closeness=closeness, token_closeness=token_close,
    )
    verdict, detail = _judge(metrics, tol, False, golden, candidate, shape, excluded, axis)
    return Result(verdict, metrics, detail, excluded_tokens=excluded)


def classify(
    golden: np.ndarray | None,
    candidate: np.ndarray | None,
    tol: Tolerance,
    *,
    token_axis: int | None = 0,
    exclude_tokens: Collection[int] = (),
) -> Result:
    """Judge ``candidate`` against ``golden`` under ``tol`` (see the module docstring).

    ``exclude_tokens`` are indices along ``token_axis`` left out of the
    tolerance judgement (tokens whose routing flipped at a near tie); they are
    reported back in ``Result.excluded_tokens``.  Out-of-range indices, or
    indices without a token axis, are a caller bug (ValueError).
    """
    res = _classify_elements(golden, candidate, tol, token_axis=token_axis, exclude_tokens=exclude_tokens)
    if res.metrics is None or not math.isfinite(tol.row_rel_l2) or res.verdict not in (Verdict.MATCH, Verdict.DIVERGE):
        return res
    assert golden is not None and candidate is not None   # metrics come from two arrays
    if golden.dtype.kind in "biu" and candidate.dtype.kind in "biu":
        return res
    return _row_rule(res, golden, candidate, tol, _token_axis(token_axis, golden.ndim))


#: a row's error is taken relative to at least this fraction of the median row norm, so that rows
#: that are nearly zero (where any rounding is a large relative error) do not decide alone
ROW_NORM_FLOOR = 0.25


def _row_rule(res: Result, golden: np.ndarray, candidate: np.ndarray, tol: Tolerance, axis: int | None) -> Result:
    """Apply ``tol.row_rel_l2`` to every judged, finite row (a vector along the last axis).

    rel(row) = ||c - g|| / max(||g||, ROW_NORM_FLOOR * median row norm), in float64 at a
    power-of-two scale per row (no overflow).  Arrays with fewer than two axes, or whose
    token axis is the last one, have no rows.
    """
    shape = golden.shape
    if golden.ndim < 2 or axis == golden.ndim - 1 or golden.size == 0:
        return res
    width = shape[-1]
    g = golden.astype(np.float64, copy=False).reshape(-1, width)
    c = candidate.astype(np.float64, copy=False).reshape(-1, width)
    keep = np.isfinite(g).all(axis=1) & np.isfinite(c).all(axis=1)
    row_tok = None
    if axis is not None:
        row_tok = np.unravel_index(np.arange(g.shape[0]), shape[:-1])[axis]
        if res.excluded_tokens:
            keep &= ~np.isin(row_tok, np.asarray(res.excluded_tokens))
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return res
    g, c = g[rows], c[rows]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        top = np.maximum(np.abs(g).max(axis=1), np.abs(c).max(axis=1))
        e = np.frexp(np.where(top > 0, top, 1.0))[1]
        gs, cs = np.ldexp(g, -e[:, None]), np.ldexp(c, -e[:, None])
        dn = np.sqrt(np.einsum("ij,ij->i", cs - gs, cs - gs))
        gn = np.sqrt(np.einsum("ij,ij->i", gs, gs))
        true_gn = np.ldexp(gn, e)
        floor = ROW_NORM_FLOOR * float(np.median(true_gn))
        den = np.maximum(gn, np.ldexp(np.full_like(gn, floor), -e))
        rel = np.where(dn == 0, 0.0, dn / den)
    rel = np.where(np.isnan(rel), np.inf, rel)
    worst = int(np.argmax(rel))
    max_rel = float(rel[worst])
    bad = rel > tol.row_rel_l2
    m = res.metrics
    assert m is not None   # classify applies the row rule to judged arrays only
    if not bad.any():
        return Result(res.verdict, replace(m, max_row_rel_l2=max_rel), res.detail, res.flipped_tokens,
                      res.excluded_tokens)
    n_bad_rows = int(bad.sum())
    bad_tok = np.unique(np.concatenate([np.asarray(m.bad_tokens, dtype=np.int64),
                                        row_tok[rows[bad]] if row_tok is not None else np.zeros(0, np.int64)]))
    n_bad_tokens = max(m.n_bad_tokens, int(bad_tok.size))
    worst_row = tuple(int(i) for i in np.unravel_index(int(rows[worst]), shape[:-1]))
    metrics = replace(m, max_row_rel_l2=max_rel, n_bad_rows=n_bad_rows,
                      first_bad_token=int(bad_tok[0]) if bad_tok.size else m.first_bad_token,
                      bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]), n_bad_tokens=n_bad_tokens)
    detail = (f"{n_bad_rows} of {rows.size} rows with relative L2 error above row_rel_l2={tol.row_rel_l2:g} "
              f"(worst {fmt(max_rel)} at row {worst_row})")
    if res.verdict == Verdict.DIVERGE:
        detail = f"{res.detail}; {detail}"
    else:
        detail = f"{detail}; elementwise: {res.detail}"
    return Result(Verdict.DIVERGE, metrics, detail, res.flipped_tokens, res.excluded_tokens)


def _classify_elements(
    golden: np.ndarray | None,
    candidate: np.ndarray | None,
    tol: Tolerance,
    *,
    token_axis: int | None = 0,
    exclude_tokens: Collection[int] = (),
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
    if (golden.size > CHUNK and golden.dtype in _SMALL_FLOATS and candidate.dtype in _SMALL_FLOATS):
        fast = _classify_chunked(golden, candidate, tol, axis, excluded)
        if fast is not None:
            return fast

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
            ratio = _ratios(d, thr, outside)
        n_outside = int(outside.sum()) + n_nonfinite_judged
        closeness = _closeness(ratio, n, n_nonfinite_judged, 0.0 if exact else tol.max_frac_outside)
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
        per = np.moveaxis(full.reshape(shape), axis, 0).reshape(shape[axis], width).max(axis=1, initial=0.0)
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
    metrics = Metrics(
        n=n, cosine=cosine, rel_l2=rel_l2, nmse=nmse, max_abs=max_abs, mean_abs=mean_abs,
        max_rel=max_rel, frac_outside=n_outside / n if n else 0.0, n_outside=n_outside,
        nan_golden=nan_golden, nan_candidate=nan_candidate,
        inf_golden=inf_golden, inf_candidate=inf_candidate,
        worst_index=worst,
        first_bad_token=int(bad_tok[0]) if bad_tok.size else None,
        bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]),
        n_bad_tokens=int(bad_tok.size), closeness=closeness, token_closeness=token_close,
    )
    verdict, detail = _judge(metrics, tol, exact, golden, candidate, shape, excluded, axis)
    return Result(verdict, metrics, detail, excluded_tokens=excluded)


def _judge(mt: Metrics, tol: Tolerance, exact: bool, golden: np.ndarray, candidate: np.ndarray,
           shape: tuple[int, ...], excluded: tuple[int, ...], axis: int | None) -> tuple[Verdict, str]:
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
    note = f"; {len(excluded)} of {shape[axis]} tokens excluded (routing flips)" if excluded and axis is not None else ""
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
