"""The row rule and the expert-scale sums in torch, on any device: the parts of the judge that numpy spent
most of a low-precision check on (the median of the row norms, the per-row and per-(token, slot) sums).

Same operations as the numpy code they mirror (``_row_rule`` in :mod:`moesnap.judge.classify`,
:func:`moesnap.judge.routing.expert_pair_sums`): the per-row power-of-two scale and the median are exact
alike, the sums differ at most in their last bits (added in another order).  Work goes to the device in
slices of whole rows (:data:`moesnap.judge.torch_stats.BUDGET` elements), and the host reads the few
figures that decide once.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from .device import stream_on, to_device
from .torch_stats import BUDGET, times_pow2


#: what the row rule decides on (as :func:`moesnap.judge.classify.row_stats` returns it): the judged rows,
#: the largest relative error, the flat index (over the rows) of the first row holding it, how many rows
#: exceed the limit, and the tokens (sorted) of those rows
RowStats = tuple[int, float, int, int, np.ndarray]


def _row_slices(n_rows: int, width: int) -> list[tuple[int, int]]:
    per = max(1, BUDGET // max(1, width))
    return [(r, min(n_rows, r + per)) for r in range(0, n_rows, per)]


def device_row_stats(golden: Any, candidate: Any, limit: float, axis: int | None, excluded: tuple[int, ...],
                     floor_share: float, device: Any) -> RowStats:
    """The row rule's figures for ``golden`` against ``candidate`` (rows along the last axis; ``axis``
    the token axis, not the last, or None), rows of ``excluded`` tokens and rows non-finite on either
    side left out; ``floor_share`` is :data:`moesnap.judge.classify.ROW_NORM_FLOOR`."""
    with stream_on(device):
        return _device_row_stats(golden, candidate, limit, axis, excluded, floor_share, device)


def _device_row_stats(golden: Any, candidate: Any, limit: float, axis: int | None, excluded: tuple[int, ...],
                      floor_share: float, device: Any) -> RowStats:
    dev = torch.device(device)
    shape = tuple(int(s) for s in golden.shape)
    width = shape[-1]
    R = int(np.prod(shape[:-1], dtype=np.int64))
    f64 = torch.float64
    keep = torch.zeros(R, dtype=torch.bool, device=dev)
    dn = torch.zeros(R, dtype=f64, device=dev)
    gn = torch.zeros(R, dtype=f64, device=dev)
    ex = torch.zeros(R, dtype=torch.int64, device=dev)
    for r0, r1 in _row_slices(R, width):
        g = to_device(golden, dev, r0 * width, r1 * width).to(f64).view(r1 - r0, width)
        c = to_device(candidate, dev, r0 * width, r1 * width).to(f64).view(r1 - r0, width)
        keep[r0:r1] = torch.isfinite(g).all(1) & torch.isfinite(c).all(1)
        top = torch.maximum(g.abs().amax(1), c.abs().amax(1))
        e = torch.frexp(torch.where(top > 0, top, 1.0))[1].to(torch.int64)
        gs, cs = times_pow2(g, -e[:, None]), times_pow2(c, -e[:, None])
        diff = cs - gs
        dn[r0:r1] = torch.sqrt((diff * diff).sum(1))
        gn[r0:r1] = torch.sqrt((gs * gs).sum(1))
        ex[r0:r1] = e
    tokens = None
    if axis is not None:
        n_tok = shape[axis]
        inner = int(np.prod(shape[axis + 1:-1], dtype=np.int64))
        tokens = (torch.arange(R, device=dev) // inner) % n_tok
        if excluded:
            out = torch.zeros(n_tok, dtype=torch.bool, device=dev)
            out[list(excluded)] = True
            keep &= ~out[tokens]
    K = keep.sum()
    true_gn = torch.where(keep, times_pow2(gn, ex), torch.inf)
    srt = torch.sort(true_gn).values
    lo = srt[((K - 1) // 2).clamp(min=0)]
    hi = srt[(K // 2).clamp(max=R - 1)]
    med = torch.where(K % 2 == 1, lo, (lo + hi) / 2)
    floor = floor_share * med
    den = torch.maximum(gn, times_pow2(floor.expand(R), -ex))
    rel = torch.where(dn == 0, 0.0, dn / den)
    rel = torch.where(torch.isnan(rel), torch.inf, rel)
    ranked = torch.where(keep, rel, -1.0)
    worst = torch.argmax(ranked)
    bad = keep & (rel > limit)
    parts = [torch.stack([K.to(f64), ranked[worst], worst.to(f64), bad.sum().to(f64)])]
    if tokens is not None:
        tok_bad = torch.zeros(shape[axis], dtype=torch.bool, device=dev)  # type: ignore[index]
        tok_bad[tokens[bad]] = True
        parts.append(tok_bad.to(f64))
    host = torch.cat(parts).cpu().numpy()
    n_rows = int(host[0])
    if n_rows == 0:
        return 0, 0.0, -1, 0, np.zeros(0, np.int64)
    return (n_rows, float(host[1]), int(host[2]), int(host[3]),
            np.flatnonzero(host[4:] != 0) if tokens is not None else np.zeros(0, np.int64))


def device_pair_sums(ids: np.ndarray, expert_out: Any, weights: np.ndarray | None, order: np.ndarray | None,
                     golden: Any, candidate: Any, total: Any, exclude_tokens: Collection[int], min_share: float,
                     device: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dots, sq, var, keep), each ``[T, k]``, of the expert-scale rule
    (:func:`moesnap.judge.routing.expert_pair_sums`) computed on ``device``: the contribution of each
    (token, slot) is ``expert_out`` (``[T, k, H]``; with ``order`` ``[T, k]``, its slots taken in that
    order) times ``weights`` (``[T, k]``, or None: as it is), the residual ``candidate - golden``
    (``[T, H]`` or ``[T, k, H]``), both in float64."""
    with stream_on(device):
        return _device_pair_sums(ids, expert_out, weights, order, golden, candidate, total, exclude_tokens,
                                 min_share, device)


def _device_pair_sums(ids: np.ndarray, expert_out: Any, weights: np.ndarray | None, order: np.ndarray | None,
                      golden: Any, candidate: Any, total: Any, exclude_tokens: Collection[int], min_share: float,
                      device: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dev = torch.device(device)
    f64 = torch.float64
    T, k = ids.shape
    H = int(np.prod(expert_out.shape[2:], dtype=np.int64)) if len(expert_out.shape) > 2 else 1
    per_slot = len(candidate.shape) == 3
    rw = k * H if per_slot else H
    dots = torch.zeros(T, k, dtype=f64, device=dev)
    sq = torch.zeros(T, k, dtype=f64, device=dev)
    var = torch.zeros(T, k, dtype=f64, device=dev)
    tsq = torch.zeros(T, dtype=f64, device=dev)
    w = None if weights is None else torch.as_tensor(np.ascontiguousarray(weights), device=dev).to(f64)
    idx = None if order is None else torch.as_tensor(np.ascontiguousarray(order), device=dev).to(torch.int64)
    for t0, t1 in _row_slices(T, k * H):
        a = to_device(expert_out, dev, t0 * k * H, t1 * k * H).to(f64).view(t1 - t0, k, H)
        if idx is not None:
            a = torch.take_along_dim(a, idx[t0:t1, :, None], 1)
        if w is not None:
            a = a * w[t0:t1, :, None]
        r = (to_device(candidate, dev, t0 * rw, t1 * rw).to(f64)
             - to_device(golden, dev, t0 * rw, t1 * rw).to(f64)).view(t1 - t0, k if per_slot else 1, H)
        rb = r.expand(t1 - t0, k, H)
        dots[t0:t1] = (rb * a).sum(-1)
        sq[t0:t1] = (a * a).sum(-1)
        var[t0:t1] = ((rb * rb) * (a * a)).sum(-1)
        if total is not None:
            tot = to_device(total, dev, t0 * H, t1 * H).to(f64).view(t1 - t0, H)
            tsq[t0:t1] = (tot * tot).sum(-1)
    keep = torch.isfinite(dots) & torch.isfinite(sq) & torch.isfinite(var)
    if total is not None:
        keep &= sq >= (min_share ** 2) * tsq[:, None]
    host = torch.stack([dots, sq, var, keep.to(f64)]).cpu().numpy()
    keep_np = host[3] != 0
    if exclude_tokens:
        keep_np[np.asarray(sorted(exclude_tokens), dtype=np.int64)] = False
    return host[0], host[1], host[2], keep_np
