"""The chunked path of :func:`moesnap.judge.classify.classify`: the metrics of a large all-finite
float16/float32 pair, in slices of :data:`CHUNK` elements run on the chunk tier of
:mod:`moesnap.judge.pool` (results equal the general path's up to the order of summation).

Each chunk is a leaf task: it computes and returns, never waits; the chunks' results are combined
in their order, so the outcome does not depend on the threads.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from .pool import map_chunks
from .ratios import admitted, closeness_of, largest, ratios
from .tolerances import Tolerance
from .verdict import MAX_BAD_TOKENS, Metrics

#: arrays above this many elements take the chunked path when it applies
CHUNK = 1 << 17
_SMALL_FLOATS = (np.dtype(np.float16), np.dtype(np.float32))


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
        ratio = ratios(d, thr, outside)
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
                       ratio[::_SAMPLE].copy() if sample else largest(ratio, k_top), run_tok, run_max)


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
        cand = np.concatenate(map_chunks(
            lambda s: _ratios_at_least(g[s:s + CHUNK], c[s:s + CHUNK], s, tol, keep, inner, n_tok, cut), starts))
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
        ratio = ratios(d, thr, d > thr)
    return ratio[ratio >= cut]


def _run_starts(start: int, size: int, inner: int) -> np.ndarray:
    """Offsets in the chunk ``[start, start + size)`` where a run of one token's elements begins
    (flat index a multiple of ``inner``), 0 first."""
    first = -(-start // inner) * inner - start
    starts = np.arange(first, size, inner, dtype=np.int64)
    return starts if first == 0 else np.concatenate([[0], starts])


def chunked_metrics(golden: np.ndarray, candidate: np.ndarray, tol: Tolerance, axis: int | None,
                    excluded: tuple[int, ...]) -> Metrics | None:
    """The metrics of the common case, a large all-finite float16/float32 pair (of one shape), in
    parallel chunks; None where the pair is not that case (the caller takes the general path).

    Squares of float32 values neither overflow nor underflow in float64, so
    no power-of-two scaling is needed; results equal the general path's up to
    the order of summation.  Returns None as soon as a chunk holds a non-finite value.
    """
    if not (golden.size > CHUNK and golden.dtype in _SMALL_FLOATS and candidate.dtype in _SMALL_FLOATS):
        return None
    shape = golden.shape
    g = golden.reshape(-1)
    c = candidate.reshape(-1)
    keep: np.ndarray | None = None
    inner, n_tok = 1, 1
    if axis is not None:
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        n_tok = shape[axis]
    if excluded:
        assert axis is not None   # classify refuses token indices without a token axis
        keep = np.ones(shape[axis], dtype=np.bool_)
        keep[list(excluded)] = False
    n_judged = g.size if keep is None else int(keep.sum()) * (g.size // max(1, n_tok))
    k_top = admitted(n_judged, tol.max_frac_outside) + 1
    per_token = axis is not None and inner > 0
    starts = range(0, g.size, CHUNK)
    two_pass = k_top > _ONE_PASS_K
    stats = map_chunks(
        lambda s: _chunk_stats(g[s:s + CHUNK], c[s:s + CHUNK], s, tol, keep, inner, n_tok, k_top, per_token,
                               sample=two_pass),
        starts)
    parts = [p for p in stats if p is not None]
    if len(parts) < len(stats):   # a chunk holds a non-finite value
        return None
    m = sum(p.n for p in parts)
    assert m == n_judged
    if two_pass:
        closeness = 0.0 if k_top > m else _kth_largest(g, c, starts, tol, keep, inner, n_tok, k_top,
                                                       np.concatenate([p.top for p in parts]))
    else:
        closeness = closeness_of(np.concatenate([p.top for p in parts]), m, 0, tol.max_frac_outside)
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
    return Metrics(
        n=n, cosine=cosine, rel_l2=rel_l2, nmse=nmse, max_abs=max_abs, mean_abs=mean_abs,
        max_rel=max_rel, frac_outside=n_outside / n if n else 0.0, n_outside=n_outside,
        nan_golden=0, nan_candidate=0, inf_golden=0, inf_candidate=0, worst_index=worst,
        first_bad_token=int(bad_tok[0]) if bad_tok.size else None,
        bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]), n_bad_tokens=int(bad_tok.size),
        closeness=closeness, token_closeness=token_close,
    )
