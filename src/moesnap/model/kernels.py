"""Device helpers of the candidate forward: the expert matmuls (grouped GEMM or one matmul per
expert), causal GQA attention, and the probes that decide, once per (device, dtype, shapes), which of
them a model uses (cached functions: nothing is flipped when a call fails)."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .config import Qwen3MoeConfig

__all__ = ["EXPERT_PATHS", "grouped_mm_works", "default_expert_path", "sdpa_takes_enable_gqa"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: ways to run the expert matmuls (see :func:`grouped_mm_works`)
EXPERT_PATHS = ("grouped_mm", "loop")


def _grouped(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [N, K]`` rows grouped by ``offs`` (cumulative ends), times ``w [G, M, K]`` transposed -> ``[N, M]``."""
    return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)


def _looped(a: torch.Tensor, w: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Same as :func:`_grouped`, one matmul per group; ``bounds`` = ``[0, end_0, end_1, ...]`` on the host."""
    out = a.new_empty(a.shape[0], w.shape[1])
    for g in range(w.shape[0]):
        s, e = bounds[g], bounds[g + 1]
        out[s:e] = a[s:e] @ w[g].T
    return out


@functools.cache
def _grouped_mm_probe(device: str, dtype: torch.dtype, k: int, m: int, fn: Any) -> bool:
    """One probe of ``fn`` (``torch._grouped_mm`` as it is now: keyed by it, so a build or a test without
    it is probed afresh) against one matmul per group."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = [3, 17, 1, 40]
    n = sum(sizes)
    a = (torch.randn(n + 5, k, generator=gen) / math.sqrt(k)).to(device, dtype)[5:]
    w = torch.randn(len(sizes), m, k, generator=gen).to(device, dtype)
    bounds = np.cumsum([0, *sizes]).tolist()
    offs = torch.tensor(bounds[1:], dtype=torch.int32, device=device)
    try:
        got = fn(a, w.transpose(-2, -1), offs=offs).to(torch.float64)
        want = _looped(a, w, bounds).to(torch.float64)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return bool(torch.isfinite(got).all()) and got.shape == want.shape and \
        bool(((got - want).abs() <= tol * (1 + want.abs())).all())


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype, k: int, m: int) -> bool:
    """Whether ``torch._grouped_mm`` runs on ``device`` in ``dtype`` for ``[N, k] x [G, m, k]^T``
    and agrees with one matmul per group.

    Probed once per (device, dtype, k, m) on random data with uneven groups and
    a row slice that starts mid-buffer, as the expert path uses it.  Seen
    passing: torch 2.13 CPU and torch 2.11 on the H200, each in float32,
    bfloat16 and float16.
    """
    fn = getattr(torch, "_grouped_mm", None)
    return fn is not None and _grouped_mm_probe(str(torch.device(device)), dtype, k, m, fn)


def default_expert_path(device: torch.device | str, dtype: torch.dtype, cfg: Qwen3MoeConfig) -> str:
    """``"grouped_mm"`` where it works for the model's expert shapes on ``device`` in ``dtype``, else ``"loop"``."""
    ok = all(grouped_mm_works(device, dtype, k, m) for k, m in ((cfg.hidden, cfg.expert_ff), (cfg.expert_ff, cfg.hidden)))
    return "grouped_mm" if ok else "loop"


@functools.cache
def sdpa_takes_enable_gqa() -> bool:
    """Whether this torch's ``scaled_dot_product_attention`` takes ``enable_gqa`` (torch >= 2.5)."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Causal GQA attention; ``q [Hq, T, D]``, ``k``/``v`` ``[Hkv, T, D]`` -> ``[Hq, T, D]``; ``gqa``: the
    kernel repeats key/value heads itself (``enable_gqa``)."""
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, heads, T, D]
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(0)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).squeeze(0)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(0)
