"""The reference forward of the MoE families moesnap knows: plain PyTorch on the CPU, written to be read.

Everything else in moesnap is judged against this file.  For Qwen3-MoE it follows HF
transformers' ``modeling_qwen3_moe.py``: RMSNorm, q/k/v projections without
bias, per-head RMSNorm on q and k over ``head_dim`` *before* NeoX RoPE,
causal grouped-query attention, o projection, residual; RMSNorm, router
logits, softmax over all experts in float32 (float64 when the whole forward
is float64), top-k, renormalised top-k weights, SwiGLU experts, weighted sum,
residual; final RMSNorm and the lm head.

For gpt-oss it follows ``modeling_gpt_oss.py``: q/k/v/o projections with biases, no q/k norm,
NeoX RoPE with YaRN frequencies and attention factor, attention with one learned sink logit per
head in each softmax, over a sliding window of positions on every other layer (the even ones);
router logits with a bias, top-k of the logits and a softmax over those k; experts with biases and
the clamped SwiGLU ``(up + 1) * gate * sigmoid(1.702 gate)``.

For Qwen2-MoE it follows ``modeling_qwen2_moe.py`` (q/k/v biases, no q/k norm, top-k of the softmax
not renormalised, one shared expert scaled by the sigmoid of its own gate); for Mixtral
``modeling_mixtral.py`` (RoPE on adjacent pairs of the GGUF's permuted q/k rows: see
:mod:`moesnap.model.config`); for OLMoE ``modeling_olmoe.py`` (q/k RMSNorm over the whole projection,
top-k not renormalised).

For DeepSeek-V2/V3 it follows ``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py``:
multi-head latent attention (:class:`LatentAttention`: q through its LoRA or one projection, the
compressed kv and its decoupled rope key, RoPE on the rope parts only, interleaved), a dense SwiGLU
MLP in the leading dense layers, and in the others the routed experts chosen by softmax (V2) or
biased sigmoid (V3) scores within the best groups, plus the shared experts.  Where the families differ
the forward calls a small function of :mod:`moesnap.model.families`, chosen by a config field.

Every stage is handed to an explicit recorder (``rec.save(stage, layer, x)``).
Weights are dequantized lazily by :class:`~moesnap.model.weights.GGUFModel`: one
layer at a time, only the experts the router selected.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import ModelConfig
from .families import (apply_rope, attention_mask, expert_act, rope_attention_factor, rope_inv_freq, route,
                       route_grouped, softmax_scale, softmax_with_sinks)
from .ggml import identity
from .recorder import NullRecorder, Recorder
from .weights import GGUFModel, LayerWeights, ModelWeights

LM_HEAD_CHUNK = 2048  # vocab rows dequantized at a time for the lm head (DEQUANT_THREADS chunks in flight)
# Threads that dequantize experts ahead of the (serial) expert maths; results arrive in order.
DEQUANT_THREADS = max(1, min(16, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(max_workers=DEQUANT_THREADS, thread_name_prefix="moesnap-dequant")


_T = TypeVar("_T")
_R = TypeVar("_R")


def _prefetch(fn: Callable[[_T], _R], items: Sequence[_T], depth: int = 2 * DEQUANT_THREADS) -> Iterator[_R]:
    """``map(fn, items)`` computed on the pool, at most ``depth`` results ahead (bounds memory)."""
    pending = deque(_POOL.submit(fn, it) for it in items[:depth])
    for i in range(len(items)):
        result = pending.popleft().result()   # the future is dropped once read
        if i + depth < len(items):
            pending.append(_POOL.submit(fn, items[i + depth]))
        yield result


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rope_cos_sin(cfg: ModelConfig, n_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary tables for positions 0..T-1, computed in float64 (YaRN: its frequencies, and both
    tables scaled by its attention factor)."""
    inv_freq = rope_inv_freq(cfg)                                                        # [D/2]
    angles = torch.outer(torch.arange(n_tokens, dtype=torch.float64), inv_freq)        # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)                                         # [T, D]
    cos, sin = angles.cos(), angles.sin()
    if (m := rope_attention_factor(cfg)) != 1.0:
        cos, sin = cos * m, sin * m
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]                        # [T, 1, D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def causal_attention(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int = 0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of roped ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv, Dv]``
    -> ``[T, Hq*Dv]`` (within the sliding window on a sliding ``layer``; with ``sinks [Hq]`` in each
    softmax; scaled by :func:`~moesnap.model.families.softmax_scale`)."""
    T = q.shape[0]
    group = cfg.n_head // cfg.n_head_kv
    k = k.repeat_interleave(group, dim=1)                    # [T, Hq, D]
    v = v.repeat_interleave(group, dim=1)                    # [T, Hq, Dv]
    scores = torch.einsum("thd,shd->hts", q, k)              # [Hq, T, T]
    scale = softmax_scale(cfg)
    scores = scores / math.sqrt(cfg.head_dim) if scale is None else scores * scale
    allowed = attention_mask(cfg, layer, T).to(q.device)     # [T, T] (q's device: the local re-reference's GPU)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = softmax_with_sinks(scores, sinks)                # [Hq, T, T]
    return torch.einsum("hts,shd->thd", probs, v).reshape(T, -1)  # [T, Hq*Dv]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w.T if b is None else x @ w.T + b


#: ``aq(x, tensor_name)``: the activation a matmul with weight ``tensor_name`` sees
#: (:mod:`moesnap.model.ggml`: ggml's rounding; :func:`~moesnap.model.ggml.identity` for the reference)
ActQuant = Callable[[torch.Tensor, str], torch.Tensor]


def expert_outputs(cfg: ModelConfig, w: LayerWeights, x: torch.Tensor, topk_ids: torch.Tensor,
                   aq: ActQuant = identity) -> torch.Tensor:
    """Each selected expert's unweighted SwiGLU output ``[T, k, H]`` for ``x [T, H]`` and ``topk_ids [T, k]``."""
    T, k = topk_ids.shape
    p = f"blk.{w.index}."
    xg, xu = aq(x, p + "ffn_gate_exps"), aq(x, p + "ffn_up_exps")
    expert_out = x.new_zeros(T, k, cfg.hidden)                     # [T, k, H]
    selected = torch.unique(topk_ids).tolist()

    assert w.experts is not None, f"layer {w.index} is dense: it has no experts"
    bank = w.experts

    def run(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate, up, down = bank.expert(e)
        bg, bu, bd = bank.bias(e) or (None, None, None)
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)         # tokens routed to e
        h = expert_act(cfg, _linear(xg[tok], gate, bg), _linear(xu[tok], up, bu))  # [n, F]
        return tok, slot, _linear(aq(h, p + "ffn_down_exps"), down, bd)            # [n, H]

    # each expert dequantized and run on the pool's threads (numpy and torch release the GIL); every
    # (token, slot) belongs to one expert, so the order the results are written in changes no value
    for tok, slot, out in _prefetch(run, selected):
        expert_out[tok, slot] = out
    return expert_out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: LayerWeights, aq: ActQuant = identity) -> None:
        super().__init__()
        self.cfg, self.w, self.aq = cfg, w, aq
        self.q_norm = None if w.q_norm is None else RMSNorm(w.q_norm, cfg.rms_eps)
        self.k_norm = None if w.k_norm is None else RMSNorm(w.k_norm, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, rec: Recorder) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        T, aq, p = x.shape[0], self.aq, f"blk.{layer}."
        q = _linear(aq(x, p + "attn_q"), w.wq, w.bq).view(T, cfg.n_head, cfg.head_dim)      # [T, Hq, D]
        k = _linear(aq(x, p + "attn_k"), w.wk, w.bk).view(T, cfg.n_head_kv, cfg.head_dim)   # [T, Hkv, D]
        v = _linear(aq(x, p + "attn_v"), w.wv, w.bv).view(T, cfg.n_head_kv, cfg.head_dim)   # [T, Hkv, D]
        rec.save("q", layer, q)
        rec.save("k", layer, k)
        rec.save("v", layer, v)
        if self.q_norm is not None and self.k_norm is not None:    # families without q/k norm: no such stage
            if cfg.qk_norm_whole:      # OLMoE: over every head at once, then back to heads
                q = self.q_norm(q.reshape(T, -1)).view(T, cfg.n_head, cfg.head_dim)        # [T, Hq, D]
                k = self.k_norm(k.reshape(T, -1)).view(T, cfg.n_head_kv, cfg.head_dim)     # [T, Hkv, D]
            else:
                q, k = self.q_norm(q), self.k_norm(k)
            rec.save("q_norm", layer, q)
            rec.save("k_norm", layer, k)
        q = apply_rope(cfg, q, cos, sin)       # NeoX halves; Mixtral: pairs of the file's permuted rows
        k = apply_rope(cfg, k, cos, sin)
        rec.save("q_rope", layer, q)
        rec.save("k_rope", layer, k)

        attn = causal_attention(cfg, q, k, v, layer, w.sinks)   # [T, Hq*D]
        rec.save("attn", layer, attn)
        out = _linear(aq(attn, p + "attn_output"), w.wo, w.bo)  # [T, H]
        rec.save("attn_out", layer, out)
        return out


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention (transformers' ``DeepseekV2Attention``)."""

    def __init__(self, cfg: ModelConfig, w: LayerWeights, aq: ActQuant = identity) -> None:
        super().__init__()
        self.cfg, self.w, self.aq = cfg, w, aq
        # transformers builds both latent norms with its default eps 1e-6 (llama.cpp: the file's eps);
        # DeepSeek's releases use 1e-6 throughout, the same number
        self.q_a_norm = None if w.q_a_norm is None else RMSNorm(w.q_a_norm, cfg.rms_eps)
        self.kv_a_norm = RMSNorm(w.kv_a_norm, cfg.rms_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, rec: Recorder) -> torch.Tensor:
        cfg, w, aq, p = self.cfg, self.w, self.aq, f"blk.{layer}."
        T, Hq, Dn, Dr, Rkv = x.shape[0], cfg.n_head, cfg.qk_nope_dim, cfg.rope_dim, cfg.kv_lora_rank
        assert w.wkv_a is not None and w.wkv_b is not None
        if self.q_a_norm is None:
            assert w.wq is not None
            q = aq(x, p + "attn_q") @ w.wq.T                                    # [T, Hq*D]
        else:
            assert w.wq_a is not None and w.wq_b is not None
            q_latent = aq(x, p + "attn_q_a") @ w.wq_a.T                          # [T, Rq]
            rec.save("q_latent", layer, q_latent)
            q_latent = self.q_a_norm(q_latent)
            rec.save("q_latent_norm", layer, q_latent)
            q = aq(q_latent, p + "attn_q_b") @ w.wq_b.T                          # [T, Hq*D]
        q = q.view(T, Hq, Dn + Dr)                                              # [T, Hq, D]
        kv_latent = aq(x, p + "attn_kv_a_mqa") @ w.wkv_a.T                       # [T, Rkv+Dr]
        rec.save("kv_latent", layer, kv_latent)
        compressed, k_pe = kv_latent.split([Rkv, Dr], dim=-1)                    # [T, Rkv], [T, Dr]
        compressed = self.kv_a_norm(compressed)
        rec.save("kv_latent_norm", layer, compressed)
        kv = (aq(compressed, p + "attn_kv_b") @ w.wkv_b.T).view(T, Hq, -1)       # [T, Hq, Dn+Dv]
        k_nope, v = kv.split([Dn, cfg.v_dim], dim=-1)                            # [T, Hq, Dn], [T, Hq, Dv]
        k_pe = k_pe[:, None, :].expand(T, Hq, Dr)                                # [T, Hq, Dr] one per token
        k = torch.cat([k_nope, k_pe], dim=-1)                                    # [T, Hq, D]
        rec.save("q", layer, q)
        rec.save("k", layer, k)
        rec.save("v", layer, v)
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)
        q = torch.cat([q_nope, apply_rope(cfg, q_pe, cos, sin)], dim=-1)         # [T, Hq, D]
        k = torch.cat([k_nope, apply_rope(cfg, k_pe, cos, sin)], dim=-1)         # [T, Hq, D]
        rec.save("q_rope", layer, q)
        rec.save("k_rope", layer, k)

        attn = causal_attention(cfg, q, k, v, layer)                             # [T, Hq*Dv]
        rec.save("attn", layer, attn)
        out = aq(attn, p + "attn_output") @ w.wo.T                               # [T, H]
        rec.save("attn_out", layer, out)
        return out


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, aq: ActQuant,
               names: tuple[str, str, str]) -> torch.Tensor:
    """A dense SwiGLU MLP ``down(silu(gate x) * up x)`` of ``x [T, H]`` (DeepSeek's dense layers and
    shared experts); ``names``: the three tensors' GGUF names, for ``aq``."""
    h = F.silu(aq(x, names[0]) @ gate.T) * (aq(x, names[1]) @ up.T)             # [T, F]
    return aq(h, names[2]) @ down.T                                             # [T, H]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, w: LayerWeights, aq: ActQuant = identity) -> None:
        super().__init__()
        self.cfg, self.w, self.aq = cfg, w, aq

    def forward(self, x: torch.Tensor, layer: int, rec: Recorder) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        k = cfg.n_expert_used
        router_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        bias = None if w.router_bias is None else w.router_bias.to(router_dtype)
        assert w.router is not None
        logits = _linear(self.aq(x, f"blk.{layer}.ffn_gate_inp").to(router_dtype), w.router.to(router_dtype), bias)  # [T, E]
        rec.save("router_logits", layer, logits)
        if cfg.gating in ("softmax_grouped", "sigmoid_grouped"):
            probs_bias = None if w.probs_bias is None else w.probs_bias.to(router_dtype)
            topk_w, topk_ids, select = route_grouped(cfg, logits, k, probs_bias)  # [T, k], [T, k], [T, E]
            rec.save("router_select", layer, select)
        else:
            topk_w, topk_ids = route(cfg, logits, k)                   # [T, k], [T, k]
        topk_w = topk_w.to(x.dtype)
        rec.save("topk_ids", layer, topk_ids)
        rec.save("topk_weights", layer, topk_w)

        expert_out = expert_outputs(cfg, w, x, topk_ids, self.aq)      # [T, k, H]
        rec.save("expert_out", layer, expert_out)
        out = (expert_out * topk_w[..., None]).sum(dim=1)              # [T, H]
        if w.shexp is not None:                                        # DeepSeek's, Qwen2-MoE's shared experts
            p = f"blk.{layer}."
            shared = swiglu_mlp(x, *w.shexp, self.aq, (p + "ffn_gate_shexp", p + "ffn_up_shexp", p + "ffn_down_shexp"))
            rec.save("shared_expert_out", layer, shared)
            if w.shexp_gate is not None:                               # Qwen2-MoE: gated per token
                gate = self.aq(x, p + "ffn_gate_inp_shexp") @ w.shexp_gate[:, None]   # [T, 1] logit
                rec.save("shared_gate", layer, gate)
                shared = torch.sigmoid(gate) * shared
            out = out + shared
        rec.save("moe_out", layer, out)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: LayerWeights, aq: ActQuant = identity) -> None:
        super().__init__()
        self.w, self.aq = w, aq
        self.attn_norm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.attention: nn.Module = LatentAttention(cfg, w, aq) if cfg.mla else Attention(cfg, w, aq)
        self.ffn_norm = RMSNorm(w.ffn_norm, cfg.rms_eps)
        self.moe = MoE(cfg, w, aq)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, rec: Recorder) -> torch.Tensor:
        h = self.attn_norm(x)
        rec.save("attn_norm", layer, h)
        h = x + self.attention(h, cos, sin, layer, rec)
        rec.save("attn_resid", layer, h)
        m = self.ffn_norm(h)
        rec.save("ffn_norm", layer, m)
        w = self.w
        if w.experts is None:          # DeepSeek's leading dense layers: no router, no experts
            assert w.ffn_gate is not None and w.ffn_up is not None and w.ffn_down is not None
            p = f"blk.{layer}."
            dense = swiglu_mlp(m, w.ffn_gate, w.ffn_up, w.ffn_down, self.aq, (p + "ffn_gate", p + "ffn_up", p + "ffn_down"))
            rec.save("dense_ffn_out", layer, dense)
            out = h + dense
        else:
            out = h + self.moe(m, layer, rec)
        rec.save("layer_out", layer, out)
        return out


class Transformer(nn.Module):
    """The whole model; builds one :class:`Block` at a time from lazily loaded weights.

    ``aq`` rounds each matmul's input (:data:`ActQuant`); the reference leaves it as is.
    """

    def __init__(self, model: ModelWeights, dtype: torch.dtype = torch.float32, aq: ActQuant = identity) -> None:
        super().__init__()
        self.model, self.cfg, self.dtype, self.aq = model, model.config, dtype, aq

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, rec: Recorder | None = None,
                layer_inputs: dict[int, torch.Tensor] | None = None, progress=None) -> torch.Tensor:
        """Logits ``[T, V]`` for ``tokens`` ``[T]``.

        ``layer_inputs`` (replay) maps a layer index to the hidden state that
        layer should receive instead of the previous layer's output.
        """
        rec = rec or NullRecorder()
        cfg, dtype = self.cfg, self.dtype
        self.model.check_tokens(tokens.numpy())
        rec.save("tokens", None, tokens)
        x = self.model.rows("token_embd", tokens.numpy(), dtype)       # [T, H]
        rec.save("embed", None, x)
        cos, sin = rope_cos_sin(cfg, tokens.shape[0], dtype)
        for i in range(cfg.n_layer):
            if layer_inputs is not None and i in layer_inputs:
                x = layer_inputs[i].to(dtype)
            block = Block(cfg, self.model.layer(i, dtype), self.aq)
            x = block(x, cos, sin, i, rec)
            del block
            self.model.release_layer(i)
            if progress is not None:
                progress(i + 1, cfg.n_layer)
        x = self.final_norm(x)
        rec.save("final_norm", None, x)
        logits = self.lm_head(x)
        rec.save("logits", None, logits)
        return logits

    @torch.no_grad()
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNorm(self.model.dense("output_norm", self.dtype), self.cfg.rms_eps)(x.to(self.dtype))

    @torch.no_grad()
    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> logits ``[T, V]``, the vocabulary dequantized in chunks of rows on the
        dequantizing threads, ahead of the matmuls (one thread took ~0.2 s per 10^4 rows of Q6_K)."""
        x = self.aq(x.to(self.dtype), "output")
        n = self.model.n_rows("output")
        starts = list(range(0, n, LM_HEAD_CHUNK))
        blocks = _prefetch(lambda s: self.model.rows("output", np.arange(s, min(s + LM_HEAD_CHUNK, n)), self.dtype),
                           starts, depth=DEQUANT_THREADS)
        return torch.cat([x @ w.T for w in blocks], dim=-1)


def run_reference(path: str | Path | ModelWeights, tokens: Sequence[int] | np.ndarray | torch.Tensor, *,
                  dtype: torch.dtype = torch.float32, recorder: Recorder | None = None,
                  progress=None, aq: ActQuant = identity) -> torch.Tensor:
    """Open ``path`` (or use an open model) and return the logits ``[T, V]`` for ``tokens``.

    ``aq``: round each matmul's input (``ActivationQuant(model.qtypes())`` computes what a correct
    ggml engine computes); the reference itself leaves activations as they are."""
    model = path if isinstance(path, ModelWeights) else GGUFModel.open(path)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    return Transformer(model, dtype, aq)(ids, recorder, progress=progress)
