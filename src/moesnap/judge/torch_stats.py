"""The elementwise statistics of :func:`moesnap.judge.classify.classify` in torch, on any device.

Same rules as the numpy paths (:mod:`moesnap.judge.classify` states them): every quantity is taken in
float64 by the same correctly rounded operations, so the counts, the elementwise verdict, the maxima,
the worst and first-non-finite indices, the bad tokens and ``closeness`` (a k-th largest ratio) are
identical to numpy's, and the sums (cosine, rel_l2, nmse, mean_abs) differ at most in their last bits,
being added in another order.  ``|g| * rtol + atol`` is two operations, as in numpy, never a fused
multiply-add.

The arrays go to the device in slices of at most :data:`BUDGET` elements (whole token rows where
per-token figures are kept), so that a long prompt's logits never hold more than a few hundred MiB of
float64 temporaries beside the model.  Each slice's figures stay on the device; the host reads them
once per stage (a second time only for float64 inputs, whose sums of squares are taken at a power-of-two
scale that needs the maxima first, as numpy's general path does).

Where the float64 difference of a float64 pair overflows (values beyond 8e307),
:func:`device_metrics` returns None and the numpy path judges the pair.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .device import stream_on, to_device
from .ratios import admitted
from .tolerances import Tolerance
from .verdict import MAX_BAD_TOKENS, Metrics

#: elements per slice on the device (about a dozen float64 temporaries each: ~200 MiB per judge thread)
BUDGET = 1 << 21


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** k`` (float64) for integer ``k`` in [-1074, 1023], built from its bits."""
    k = k.to(torch.int64)
    normal = torch.bitwise_left_shift(k.clamp(-1022, 1023) + 1023, 52)
    sub = torch.bitwise_left_shift(torch.ones_like(k), (k + 1074).clamp(0, 51))
    return torch.where(k >= -1022, normal, sub).view(torch.float64)


def times_pow2(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x * 2**k`` rounded once (``np.ldexp``) for integer ``k >= -1074``: a plain multiply while
    ``2**k`` is a float64, else two (the first exact, scaling up)."""
    a = k.clamp(-1074, 1023)
    return x * pow2(a) * pow2(k - a)


def _times_pow2_int(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`times_pow2` for a Python integer ``k``, as numpy's ``_times_pow2`` does it."""
    if -1074 <= k <= 1023:
        return x * math.ldexp(1.0, k)
    return x * math.ldexp(1.0, 1023) * math.ldexp(1.0, k - 1023)


def _slices(n: int, inner: int, rows: bool) -> list[tuple[int, int]]:
    """``[start, stop)`` of each slice of ``n`` flat elements: whole rows of ``inner`` elements when
    ``rows``, at most :data:`BUDGET` elements each (at least one row)."""
    if n == 0:
        return []
    if rows and inner > 0:
        per = max(1, BUDGET // inner) * inner
    else:
        per = BUDGET
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def device_metrics(golden: Any, candidate: Any, tol: Tolerance, axis: int | None, excluded: tuple[int, ...],
                   exact: bool, device: Any) -> Metrics | None:
    """The :class:`Metrics` of ``golden`` against ``candidate`` (one shape; numpy arrays or torch
    tensors), computed on ``device``; None where the numpy path must judge (a float64 difference
    overflowed).  ``axis`` is the token axis (normalised, or None), ``excluded`` the tokens left out,
    ``exact`` whether both sides are integers (compared exactly)."""
    with stream_on(device):
        return _device_metrics(golden, candidate, tol, axis, excluded, exact, device)


def _device_metrics(golden: Any, candidate: Any, tol: Tolerance, axis: int | None, excluded: tuple[int, ...],
                    exact: bool, device: Any) -> Metrics | None:
    shape = tuple(int(s) for s in golden.shape)
    N = int(np.prod(shape, dtype=np.int64))
    per_token = axis is not None
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) if axis is not None else N
    n_tok = shape[axis] if axis is not None else 1
    rows = N // inner if inner else 0
    outer = rows // n_tok if n_tok else 0
    n = N if not excluded else (n_tok - len(excluded)) * (N // n_tok)
    mfo = 0.0 if exact else tol.max_frac_outside
    k0 = admitted(n, mfo) + 1
    if N == 0:
        return _empty(n_tok if per_token else None)
    dev = torch.device(device)
    wide = str(golden.dtype) == "float64" or str(candidate.dtype) == "float64"
    keep = None
    if excluded:
        keep_np = np.ones(n_tok, dtype=np.bool_)
        keep_np[list(excluded)] = False
        keep = torch.as_tensor(keep_np, device=dev)
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=dev)
    acc = {name: zero.clone() for name in ("n_out", "nnf", "nan_g", "inf_g", "nan_c", "inf_c", "m", "gmax",
                                           "cmax", "max_rel", "sgg", "scc", "sgc", "sdd", "sd")}
    dmaxes: list[torch.Tensor] = []
    dargs: list[torch.Tensor] = []
    nf_first = torch.full((), float(N), dtype=f64, device=dev)
    tops: list[torch.Tensor] = []
    row_r = torch.zeros(rows, dtype=f64, device=dev) if per_token else None
    row_bad = torch.zeros(rows, dtype=torch.bool, device=dev) if per_token else None
    row_nf = torch.zeros(rows, dtype=torch.bool, device=dev) if per_token else None
    for s, e in _slices(N, inner, per_token):
        gx, cx = to_device(golden, dev, s, e), to_device(candidate, dev, s, e)
        g, c = gx.to(f64), cx.to(f64)
        fin = torch.isfinite(g) & torch.isfinite(c)
        nonfin = ~fin
        for name, side in (("g", g), ("c", c)):
            acc[f"nan_{name}"] += torch.isnan(side).sum()
            acc[f"inf_{name}"] += torch.isinf(side).sum()
        sel = fin
        judged = None
        if keep is not None:
            r0, r1 = s // inner, e // inner
            tok = torch.arange(r0, r1, device=dev) % n_tok
            judged = keep[tok][:, None].expand(r1 - r0, inner).reshape(-1)
            sel = fin & judged
        acc["nnf"] += (nonfin if judged is None else nonfin & judged).sum()
        acc["m"] += sel.sum()
        any_nf = nonfin.any()
        nf_at = torch.argmax(nonfin.to(torch.uint8)).to(f64) + s
        nf_first = torch.minimum(nf_first, torch.where(any_nf, nf_at, nf_first))
        d = (c - g).abs()
        ag = g.abs()
        dz = torch.where(sel, d, zero)
        if exact:
            outside = sel & (gx != cx)
            ratio = torch.where(outside, math.inf, zero)
        else:
            thr = ag * tol.rtol
            thr = thr + tol.atol
            outside = sel & (d > thr)
            ratio = d / thr
            ratio = torch.where(torch.isnan(ratio), torch.where(outside, math.inf, zero), ratio)
            ratio = torch.where(sel, ratio, zero)
        acc["n_out"] += outside.sum()
        acc["gmax"] = torch.maximum(acc["gmax"], torch.where(sel, ag, zero).max())
        acc["cmax"] = torch.maximum(acc["cmax"], torch.where(sel, c.abs(), zero).max())
        k = torch.argmax(dz)
        dmaxes.append(dz[k])
        dargs.append(k.to(f64) + s)
        q = d / ag
        acc["max_rel"] = torch.maximum(acc["max_rel"], torch.where(sel & ~torch.isnan(q), q, zero).max())
        if not wide:     # float32 squares neither overflow nor underflow in float64: no scaling
            gz, cz = torch.where(sel, g, zero), torch.where(sel, c, zero)
            acc["sgg"] += torch.dot(gz, gz)
            acc["scc"] += torch.dot(cz, cz)
            acc["sgc"] += torch.dot(gz, cz)
            acc["sdd"] += torch.dot(dz, dz)
            acc["sd"] += dz.sum()
        ranked = torch.where(sel, ratio, -1.0)
        tops.append(ranked.max().reshape(1) if k0 == 1 else ranked.topk(min(k0, ranked.numel())).values)
        if per_token:
            assert row_r is not None and row_bad is not None and row_nf is not None
            r0, r1 = s // inner, e // inner
            row_r[r0:r1] = ratio.view(r1 - r0, inner).amax(1)
            row_nf[r0:r1] = nonfin.view(r1 - r0, inner).any(1)
            row_bad[r0:r1] = (outside | nonfin).view(r1 - r0, inner).any(1)
    top = torch.cat(tops)
    top = top.topk(min(k0, top.numel())).values
    dmax_all = torch.stack(dmaxes)
    first = torch.argmax(dmax_all)
    names = list(acc)
    parts = [torch.stack([acc[x] for x in names]), torch.stack([dmax_all[first], torch.stack(dargs)[first],
                                                                nf_first, top[-1] if top.numel() >= k0 else
                                                                torch.full((), -1.0, dtype=f64, device=dev)])]
    if per_token:
        assert row_r is not None and row_bad is not None and row_nf is not None
        tok_nf = row_nf.view(outer, n_tok).any(0)
        per = torch.where(tok_nf, math.inf, row_r.view(outer, n_tok).amax(0))
        parts += [per, row_bad.view(outer, n_tok).any(0).to(f64)]
    host = torch.cat(parts).cpu().numpy()
    v = dict(zip(names, host[:len(names)].tolist()))
    max_abs, worst_flat, nf_at0, kth0 = host[len(names):len(names) + 4].tolist()
    rest = host[len(names) + 4:]
    m = int(v["m"])
    nnf = int(v["nnf"])
    if wide and m and not math.isfinite(max_abs):
        return None                  # |c - g| overflowed float64: numpy's joint-scale path judges it
    counts = tuple(int(v[x]) for x in ("nan_g", "inf_g", "nan_c", "inf_c"))
    any_nonfinite = any(counts)
    if n == 0:
        closeness = 0.0
    else:
        kk = k0 - nnf
        if kk <= 0:
            closeness = math.inf
        elif kk > m:
            closeness = 0.0
        elif kk == k0:
            closeness = float(kth0)
        else:
            closeness = float(top[kk - 1].item())
    if wide and m:
        sums = _scaled_sums(golden, candidate, dev, keep, inner, n_tok, N, v["gmax"], v["cmax"], max_abs)
    else:
        sums = (v["sgg"], v["scc"], v["sgc"], v["sdd"], v["sd"], 0, 0, 0)
    if m:
        with np.errstate(over="ignore", under="ignore"):       # a metric beyond float64 is +inf, as in numpy
            cosine, rel_l2, nmse, mean_abs, max_rel = _float_metrics(m, v["gmax"], v["cmax"], max_abs,
                                                                     v["max_rel"], sums)
    else:
        one, z = (1.0, 0.0) if n == 0 else (math.nan, math.nan)
        cosine, rel_l2, nmse, max_abs, mean_abs, max_rel = one, z, z, z, z, z
    n_outside = int(v["n_out"]) + nnf
    worst: tuple[int, ...] | None = None
    if any_nonfinite:
        worst = tuple(int(i) for i in np.unravel_index(int(nf_at0), shape))
    elif m and max_abs > 0:
        worst = tuple(int(i) for i in np.unravel_index(int(worst_flat), shape))
    token_close: tuple[float, ...] = ()
    bad_tok = np.zeros(0, dtype=np.int64)
    if per_token:
        token_close = tuple(rest[:n_tok].tolist())
        bad_tok = np.flatnonzero(rest[n_tok:] != 0)
    nan_golden, inf_golden, nan_candidate, inf_candidate = counts
    return Metrics(
        n=n, cosine=cosine, rel_l2=rel_l2, nmse=nmse, max_abs=max_abs, mean_abs=mean_abs,
        max_rel=max_rel, frac_outside=n_outside / n if n else 0.0, n_outside=n_outside,
        nan_golden=nan_golden, nan_candidate=nan_candidate, inf_golden=inf_golden, inf_candidate=inf_candidate,
        worst_index=worst, first_bad_token=int(bad_tok[0]) if bad_tok.size else None,
        bad_tokens=tuple(int(t) for t in bad_tok[:MAX_BAD_TOKENS]), n_bad_tokens=int(bad_tok.size),
        closeness=closeness, token_closeness=token_close,
    )


def _empty(n_tok: int | None) -> Metrics:
    """The metrics of an empty pair (nothing judged), as the numpy path gives them."""
    return Metrics(n=0, cosine=1.0, rel_l2=0.0, nmse=0.0, max_abs=0.0, mean_abs=0.0, max_rel=0.0,
                   frac_outside=0.0, n_outside=0, nan_golden=0, nan_candidate=0, inf_golden=0, inf_candidate=0,
                   worst_index=None, first_bad_token=None, bad_tokens=(), n_bad_tokens=0, closeness=0.0,
                   token_closeness=(0.0,) * n_tok if n_tok is not None else ())


def _exp(x: float) -> int:
    """e with x < 2**e (x > 0 finite), as numpy's ``_pow2_above``."""
    return math.frexp(x)[1]


def _scaled_sums(golden: Any, candidate: Any, dev: torch.device, keep: torch.Tensor | None, inner: int,
                 n_tok: int, N: int, gmax: float, cmax: float, max_abs: float
                 ) -> tuple[float, float, float, float, float, int, int, int]:
    """(sum g_n^2, sum c_n^2, sum g_n c_n, sum d_n^2, sum d_n, eg, ec, ed) over the judged finite
    elements, each side divided by the power of two just above its largest magnitude (numpy's general
    path: no overflow or underflow whatever the float64 values)."""
    eg = _exp(gmax) if gmax > 0 else 0
    ec = _exp(cmax) if cmax > 0 else 0
    ed = _exp(max_abs) if max_abs > 0 else 0
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=dev)
    acc = torch.zeros(5, dtype=f64, device=dev)
    for s, e in _slices(N, inner, keep is not None):
        g = to_device(golden, dev, s, e).to(f64)
        c = to_device(candidate, dev, s, e).to(f64)
        sel = torch.isfinite(g) & torch.isfinite(c)
        if keep is not None:
            r0, r1 = s // inner, e // inner
            sel &= keep[torch.arange(r0, r1, device=dev) % n_tok][:, None].expand(r1 - r0, inner).reshape(-1)
        d = torch.where(sel, (c - g).abs(), zero)
        gn = _times_pow2_int(torch.where(sel, g, zero), -eg)
        cn = _times_pow2_int(torch.where(sel, c, zero), -ec)
        dn = _times_pow2_int(d, -ed)
        acc += torch.stack([torch.dot(gn, gn), torch.dot(cn, cn), torch.dot(gn, cn), torch.dot(dn, dn), dn.sum()])
    sg, sc, sgc, sd, sdm = acc.cpu().tolist()
    return sg, sc, sgc, sd, sdm, eg, ec, ed


def _float_metrics(m: int, gmax: float, cmax: float, max_abs: float, max_rel: float,
                   sums: tuple[float, float, float, float, float, int, int, int]
                   ) -> tuple[float, float, float, float, float]:
    """(cosine, rel_l2, nmse, mean_abs, max_rel) of ``m > 0`` judged finite elements, by the rules of
    numpy's ``_float_metrics`` (sums at scales 2**-eg, 2**-ec, 2**-ed; all 0: unscaled)."""
    sg, sc, sgc, sd, sdm, eg, ec, ed = sums
    if gmax == 0.0 and cmax == 0.0:
        return 1.0, 0.0, 0.0, 0.0, 0.0
    mean_abs = float(np.ldexp(sdm / m, ed))
    if gmax == 0.0:
        return 0.0, math.inf, math.inf, mean_abs, math.inf
    if cmax == 0.0:
        cosine = 0.0
    elif max_abs == 0.0:
        cosine = 1.0
    else:
        cosine = min(1.0, max(-1.0, sgc / math.sqrt(sg * sc)))
    if max_abs == 0.0 or sd == 0.0:
        rel_l2 = nmse = 0.0
    else:
        rel_l2 = float(np.ldexp(math.sqrt(sd) / math.sqrt(sg), ed - eg))
        nmse = float(np.ldexp(sd / sg, 2 * (ed - eg)))
    return cosine, rel_l2, nmse, 0.0 if max_abs == 0.0 else mean_abs, max_rel
