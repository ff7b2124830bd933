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
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UsageError
from .config import Qwen3MoeConfig

__all__ = ["EXPERT_PATHS", "grouped_mm_works", "default_expert_path", "sdpa_takes_enable_gqa", "rope_frequencies",
           "rope_halves", "rope_pairs", "window_mask", "sdpa_masked", "swiglu"]


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


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool,
                 scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention; ``q [Hq, T, D]``, ``k [Hkv, T, D]``, ``v [Hkv, T, Dv]`` -> ``[Hq, T, Dv]``;
    ``gqa``: the kernel repeats key/value heads itself (``enable_gqa``); ``scale``: what ``q·k`` is
    multiplied by (None: ``1/sqrt(D)``)."""
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, heads, T, D]
    kw: dict[str, Any] = {} if scale is None else {"scale": scale}
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw).squeeze(0)
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, **kw).squeeze(0)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw).squeeze(0)


# --------------------------------------------------------------------------- family variants
# What families vary by, as device functions the candidate picks by its config's fields: RoPE's
# frequencies (YaRN), attention's mask (a sliding window) and its sinks, the experts' activation.


def rope_frequencies(head_dim: int, base: float, *, scaling: str = "none", factor: float = 1.0,
                     orig_context: int = 0, beta_fast: float = 32.0, beta_slow: float = 1.0,
                     truncate: bool = True) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies ``[D/2]`` (float64, on the CPU) and the factor cos and sin are
    multiplied by.  ``scaling="yarn"``: YaRN's blend of the interpolated (``/ factor``) and the
    original frequencies by a linear ramp over the dimensions whose wavelength lies between
    ``beta_fast`` and ``beta_slow`` rotations of the original context (with ``truncate`` the range
    widened to whole dimensions, floor and ceiling, as transformers' default and llama.cpp; gpt-oss's
    config says ``truncate: false``), and the attention factor ``0.1 ln(factor) + 1``."""
    half = head_dim // 2
    inv = torch.pow(float(base), -torch.arange(half, dtype=torch.float64) * 2.0 / head_dim)
    if scaling == "none":
        return inv, 1.0
    if scaling != "yarn":
        raise UsageError(f"rope scaling {scaling!r} is not one the candidate computes (none, yarn)")

    def dim_of(rotations: float) -> float:   # the dimension whose wavelength fits `rotations` in the context
        return head_dim * math.log(orig_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)   # 0: keep, 1: interpolate
    inv = inv / factor * ramp + inv * (1 - ramp)
    return inv, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]`` turned by ``cos``/``sin [T, 1, D/2]`` NeoX's way, the halves ``(x_i, x_{i+D/2})``
    paired, in float32 (float64 for float64); the result in ``x``'s dtype."""
    xf = x.to(_opmath(x.dtype))
    half = xf.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]`` turned pair by pair ``(x_2i, x_2i+1)`` by ``cos``/``sin [T, 1, D/2]`` (llama.cpp's
    NORM mode: DeepSeek's rope part, the rows of a Mixtral file), in float32 (float64 for float64); the
    result keeps the interleaved layout and ``x``'s dtype."""
    pairs = x.to(_opmath(x.dtype)).unflatten(-1, (-1, 2))                     # [T, heads, D/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)


def window_mask(q_pos: torch.Tensor, n_keys: int, window: int) -> torch.Tensor:
    """``[..., S]`` boolean: key position ``< n_keys`` within ``window`` positions of each query position
    ``q_pos [...]`` (``q - key < window``: the query itself and the ``window - 1`` before it), causal."""
    kpos = torch.arange(n_keys, device=q_pos.device)
    d = q_pos[..., None] - kpos
    return (d >= 0) & (d < window)


#: the backends masked attention may use: not cuDNN's, which builds an execution plan per shape — a decode
#: step's keys grow by one at every step, so eager decode rebuilt one at every layer of every step (~4.8 ms
#: of host time a call, measured on an H100 with torch 2.11: the largest cost of a decode step)
MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                **kw: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` with an explicit mask, on :data:`MASKED_BACKENDS`."""
    with sdpa_kernel(MASKED_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                sinks: torch.Tensor | None, gqa: bool) -> torch.Tensor:
    """Attention of ``q [B, Hq, Tq, D]`` over ``k``/``v [B, Hkv, S, D]`` where ``mask [B, Tq, S]`` (bool) is
    true.  ``sinks [Hq]``: a learned logit per query head that joins each softmax's denominator and is
    dropped after -- computed as one more key, of zeros (its score is the bias alone), whose additive
    bias is the head's sink, and whose value is zeros.  Returns ``[B, Hq, Tq, D]``.  The per-head bias
    costs ``B x Hq x Tq x (S + 1)`` values of the compute dtype (a 4096-token prefill of gpt-oss-20b's
    64 heads in bfloat16: 2.1 GB; decode steps: ``Tq = 1``)."""
    B, Hq, Tq, _ = q.shape
    if Hq != k.shape[1] and not gqa:
        rep = Hq // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    extra = {"enable_gqa": True} if Hq != k.shape[1] else {}
    if sinks is None:
        return masked_sdpa(q, k, v, mask[:, None], **extra)
    zero = k.new_zeros(*k.shape[:2], 1, k.shape[3])
    k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)            # [B, Hkv, S+1, D]
    bias = torch.zeros(B, Hq, Tq, mask.shape[-1] + 1, dtype=q.dtype, device=q.device)
    bias[..., :-1].masked_fill_(~mask[:, None], float("-inf"))
    bias[..., -1] = sinks.to(q.dtype)[None, :, None]
    return masked_sdpa(q, k, v, bias, **extra)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float = 0.0, alpha: float = 1.0,
           oai: bool = False) -> torch.Tensor:
    """The experts' gated activation: ``silu(gate) * up``, or with ``oai`` gpt-oss's clamped variant:
    gate clamped above at ``limit``, up to ``±limit``, ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    if not oai:
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
