"""The pieces of the reference forward that differ between MoE families, as small pure functions
chosen by :class:`~moesnap.model.config.ModelConfig` fields (never by the family's name):

* :func:`rope_inv_freq` / :func:`rope_attention_factor`: plain RoPE, or YaRN's blend of interpolated
  and extrapolated frequencies with its ``0.1 ln(factor) + 1`` attention factor
  (``rope_scaling``; transformers' ``_compute_yarn_parameters``, the correction range truncated
  or not: ``rope_yarn_truncate``);
* :func:`attention_mask`: causal, or causal within a sliding window (``sliding_window``,
  ``swa_pattern``);
* :func:`softmax_with_sinks`: a learned per-head logit joining each row's softmax and dropped
  after (``attn_sinks``; transformers' ``eager_attention_forward`` of gpt-oss);
* :func:`route`: softmax over every expert then top-k renormalised, or top-k of the logits then a
  softmax over the k (``gating``);
* :func:`expert_act`: SwiGLU, or gpt-oss's clamped variant (``ffn_act``, ``swiglu_limit``,
  ``swiglu_alpha``).

Each is written so that Qwen3-MoE's values come out of the very operations its forward always ran.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[D/2]`` in float64."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))  # [D/2]
    if cfg.rope_scaling == "none":
        return inv_freq

    def correction_dim(n_rot: float) -> float:
        # the dimension whose wavelength turns n_rot times over the original context
        return D * math.log(cfg.rope_orig_context / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.rope_base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, D - 1.0)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # [D/2]
    extrapolate = 1 - ramp            # 1: keep the trained frequency, 0: interpolate by the factor
    return inv_freq / cfg.rope_factor * ramp + inv_freq * extrapolate


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN multiplies cos and sin by (1 without scaling)."""
    if cfg.rope_scaling == "none" or cfg.rope_factor <= 1:
        return 1.0
    return 0.1 * math.log(cfg.rope_factor) + 1.0


def attention_mask(cfg: ModelConfig, layer: int, n_tokens: int) -> torch.Tensor:
    """``[T, T]`` bool, True where query ``t`` may attend to key ``s``: ``s <= t``, and on a sliding
    layer ``t - s < sliding_window`` as well."""
    t = torch.arange(n_tokens)
    allowed = t[None, :] <= t[:, None]                                    # [T, T] causal
    if cfg.slides(layer):
        allowed &= (t[:, None] - t[None, :]) < cfg.sliding_window
    return allowed


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax of ``scores [Hq, T, S]`` over S; with ``sinks [Hq]`` each head's sink logit joins
    every row's denominator and its probability is dropped, so the rows sum to less than 1."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    Hq, T, _ = scores.shape
    sink = sinks.to(scores.dtype).view(Hq, 1, 1).expand(Hq, T, 1)         # [Hq, T, 1]
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)        # [Hq, T, S+1]
    return probs[..., :-1]                                                 # [Hq, T, S]


def route(cfg: ModelConfig, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], ids [T, k])`` from router ``logits [T, E]``, by descending weight, in the
    logits' dtype."""
    if cfg.gating == "topk_softmax":
        top, ids = torch.topk(logits, k, dim=-1)                           # [T, k]
        return torch.softmax(top, dim=-1), ids
    probs = torch.softmax(logits, dim=-1)                                  # [T, E]
    top, ids = torch.topk(probs, k, dim=-1)                                # [T, k]
    return top / top.sum(-1, keepdim=True), ids


def expert_act(cfg: ModelConfig, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation of an expert's ``gate``/``up`` projections ``[n, F]``."""
    if cfg.ffn_act == "swiglu_oai":
        gate = gate.clamp(max=cfg.swiglu_limit)
        up = up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(cfg.swiglu_alpha * gate))
    return F.silu(gate) * up
