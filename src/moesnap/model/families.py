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
* :func:`route`: softmax over every expert then top-k, renormalised (Qwen3-MoE, Mixtral) or not
  (Qwen2-MoE, OLMoE), or top-k of the logits then a softmax over the k (``gating``);
* :func:`expert_act`: SwiGLU, or gpt-oss's clamped variant (``ffn_act``, ``swiglu_limit``,
  ``swiglu_alpha``);
* :func:`apply_rope`: NeoX halves, or DeepSeek's interleaved pairs (``rope_interleaved``);
* :func:`softmax_scale`: ``1/sqrt(D)``, times DeepSeek YaRN's ``mscale^2`` (``yarn_log_mul``);
* :func:`route_grouped`: DeepSeek's selection: softmax (V2) or sigmoid plus the correction bias (V3),
  limited to the best expert groups, weights renormalised or not and scaled (``gating``
  ``softmax_grouped`` / ``sigmoid_grouped``, ``n_group``, ``n_group_used``, ``topk_norm``,
  ``routed_scale``).

Each is written so that Qwen3-MoE's values come out of the very operations its forward always ran.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[Dr/2]`` in float64 (``Dr``: the dimensions RoPE turns, ``cfg.rope_dim``)."""
    D = cfg.rope_dim
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
    """What YaRN multiplies cos and sin by (1 without scaling; DeepSeek's YaRN, which carries
    ``mscale_all_dim`` as ``yarn_log_mul``: ``mscale / mscale_all_dim`` = 1, see the config)."""
    if cfg.rope_scaling == "none" or cfg.rope_factor <= 1 or cfg.yarn_log_mul > 0:
        return 1.0
    return 0.1 * math.log(cfg.rope_factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float | None:
    """What attention multiplies ``q·k`` by where it is not ``1/sqrt(head_dim)`` (None then):
    DeepSeek's YaRN ``(1 + yarn_log_mul ln factor)^2 / sqrt(head_dim)`` (transformers'
    ``yarn_apply_mscale``), and ``1/sqrt(head_dim)`` under MLA without YaRN."""
    if not cfg.mla:
        return None
    scale = cfg.head_dim ** -0.5
    if cfg.rope_scaling != "none" and cfg.yarn_log_mul > 0 and cfg.rope_factor > 1:
        mscale = 1.0 + cfg.yarn_log_mul * math.log(cfg.rope_factor)
        scale *= mscale * mscale
    return scale


def apply_rope(cfg: ModelConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, Dr]`` turned by the tables ``cos``/``sin [T, 1, Dr]`` (the angles twice over):
    NeoX's halves ``(x_i, x_{i+Dr/2})``, or with ``rope_interleaved`` the pairs ``(x_{2i}, x_{2i+1})``,
    which stay interleaved (llama.cpp's NORM mode; DeepSeek-V2's complex form in transformers)."""
    if not cfg.rope_interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]                                # [T, 1, Dr/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]                                    # [T, heads, Dr/2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)   # [T, heads, Dr]


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
    if cfg.gating == "softmax_topk":                                       # Qwen2-MoE, OLMoE: as they are
        return top, ids
    return top / top.sum(-1, keepdim=True), ids


def expert_act(cfg: ModelConfig, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation of an expert's ``gate``/``up`` projections ``[n, F]``."""
    if cfg.ffn_act == "swiglu_oai":
        gate = gate.clamp(max=cfg.swiglu_limit)
        up = up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(cfg.swiglu_alpha * gate))
    return F.silu(gate) * up


def route_grouped(cfg: ModelConfig, logits: torch.Tensor, k: int, bias: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's routing of router ``logits [T, E]``: ``(weights [T, k], ids [T, k], select [T, E])``,
    ids by descending selection score.

    V2 (``softmax_grouped``): scores the softmax over every expert; a group scores its best expert
    (transformers' ``group_limited_greedy``); the experts of the groups not kept score 0.
    V3 (``sigmoid_grouped``, ``noaux_tc``): scores the sigmoid of the logits; the selection ranks
    ``scores + bias`` (the correction bias ``exp_probs_b``), a group scores the sum of its two best;
    the experts of the groups not kept drop out.  Both: top-k of what is left; the weights are the
    (unbiased) scores of the k, renormalised with ``topk_norm``, times ``routed_scale``.

    ``select`` is what the selection ranks, for the near-tie rule (:data:`moesnap.stages.ROUTING_SCORES`):
    each expert of a group not kept lowered by its group's shortfall to the last group kept."""
    T, E = logits.shape
    sigmoid = cfg.gating == "sigmoid_grouped"
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)            # [T, E]
    choice = scores + bias.to(scores.dtype) if bias is not None else scores                 # [T, E]
    select = choice
    if 1 < cfg.n_group and cfg.n_group_used < cfg.n_group:
        grouped = choice.view(T, cfg.n_group, E // cfg.n_group)                              # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if sigmoid else grouped.max(-1).values  # [T, G]
        kept = torch.topk(group_scores, cfg.n_group_used, dim=-1)[1]                        # [T, Gk]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)     # [T, G]
        last = group_scores.gather(1, kept).min(-1, keepdim=True).values                    # [T, 1]
        shortfall = (last - group_scores).clamp(min=0).masked_fill(keep, 0)                 # [T, G]
        select = choice - shortfall.repeat_interleave(E // cfg.n_group, dim=-1)             # [T, E]
        dropped = ~keep.repeat_interleave(E // cfg.n_group, dim=-1)                         # [T, E]
        choice = choice.masked_fill(dropped, float("-inf") if sigmoid else 0.0)
    ids = torch.topk(choice, k, dim=-1)[1]                                                  # [T, k]
    weights = scores.gather(1, ids)                                                         # [T, k]
    if cfg.topk_norm:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * cfg.routed_scale, ids, select
