"""SGLang's own dumper (``sglang/srt/debug_utils/dumper.py``, unmodified, loaded as sglang_tree.py loads it)
driven by module trees named and called as SGLang's Qwen2-MoE (``sglang/srt/models/qwen2_moe.py``) and
DeepSeek-V2/V3 (``deepseek_v2.py``), built from a moesnap model file's weights.  Run as a script (a process
of its own, as sglang_tree.py)::

    python tests/capture/sglang_families.py OUT --model M.gguf --tokens 1,2,3 [--dtype bfloat16] [--decode N]
        [--tp 2 [--port P] [--fault-rank R]] [--fault-cache STEP,LAYER] [--unfused-gate] [--fault-gate LAYER]
        [--fault-shared LAYER]

writes one prefill pass of ``--tokens`` into ``OUT/exp`` (``DUMPER_NON_INTRUSIVE_MODE=all``); the family is
the model file's (sglang_more_families.py adds Mixtral, OLMoE and gpt-oss to this one's).  ``--decode N``: the
prefill runs all but the last N tokens, then N decode passes one token each through the KV cache (the dumper's
``step`` counts the passes); ``--fault-cache S,L``: decode pass S (from 0) of layer L reads its KV cache
without the first row, a decode-only fault.  ``--tp 2`` (Qwen2-MoE, DeepSeek; gloo, one process per rank): q/k/v heads
column parallel (DeepSeek: ``q_proj``/``q_b_proj`` and ``kv_b_proj`` by heads, the latents replicated),
``o_proj`` and the shared experts' (or a dense layer's) ``down_proj`` row parallel (partial sums, as SGLang's
``reduce_results=False``), the routed experts by EP rank, reduced after ``self_attn`` and ``mlp``; the
router and the shared expert's gate replicated; the lm head vocabulary parallel (sglang_more_families.py's
families: the routed experts as SGLang's FusedMoE shards them without EP, every expert's intermediate width
split, ``moe_tp_size`` = 2).  ``--fault-rank R``: the planted ``--fault-*`` on rank R alone.

Qwen2-MoE (``Qwen2MoeSparseMoeBlock.forward`` on CUDA): ``shared_expert`` (``gate_up_proj``, ``act_fn``,
``down_proj``: its output before the gate), ``gate`` -> ``(logits, None)``, ``topk`` (softmax, top-k, not
renormalised: ``norm_topk_prob``), ``experts`` (the routed mixture), then the shared expert's gate and the
add in one fused kernel that calls no module (``fused_gate_sigmoid_mul_add``): ``shared_expert_gate`` is
not dumped.  ``--unfused-gate``: the path where the gate is not fused (CPU AMX, NPU): ``shared_expert_gate``
is called (its ``[T, 1]`` logit dumped) and the gated output added.  Attention: ``qkv_proj`` with biases, no
q/k norm, ``rotary_emb`` (NeoX), ``attn``, ``o_proj``.  ``--fault-gate L``: the shared expert gate's weight
of layer L off by 5 %.

DeepSeek (``DeepseekV2AttentionMLA``'s MHA prefill path, ``forward_normal_prepare``/``_core``): with a q
LoRA ``fused_qkv_a_proj_with_mqa`` (q latent and kv latent side by side), ``q_a_layernorm``, ``q_b_proj``;
without, ``q_proj`` and ``kv_a_proj_with_mqa``; ``kv_a_layernorm``; ``rotary_emb(positions, q_pe, k_pe)`` on
the rope part alone (interleaved pairs; DeepSeek's YaRN), written back into q; ``kv_b_proj``; ``attn_mha(q, k,
v, forward_batch, save_kv_cache=False)`` (k every head's ``[k_nope, k_pe]``); ``o_proj``.  A MoE layer's
``mlp`` (``DeepseekV2MoE.forward_normal``): ``shared_experts`` first, ``gate`` (``MoEGate``: the logits,
float32), ``topk`` (grouped top-k: V2 softmax, a group scores its best expert; V3 sigmoid plus the
correction bias, a group scores its best two; weights not scaled), ``experts`` (the routed mixture), times
``routed_scaling_factor`` after it, plus the shared experts; a leading dense layer's ``mlp`` is
``DeepseekV2MLP``.  A decode pass runs the absorbed path (``forward_absorb_prepare``/``_core``): q's nope
part times ``w_kc`` (kv_b_proj's key half, a bmm, no module), ``rotary_emb`` as above, ``attn_mqa(q_input,
k_input, v_input, forward_batch)`` in the latent space over the latent cache (the MHA prefill writes it
without a module call, as ``set_mla_kv_buffer``), times ``w_vc`` (a bmm), ``o_proj``: no ``attn_mha`` names,
the attention's output only as ``o_proj``'s input.  ``--fault-shared L``: the shared experts' down projection
of layer L off by 5 %.
Layers return ``(hidden_states, None)`` as DeepSeek's do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sglang_tree import (  # noqa: E402
    PARALLEL, REPO, FusedMoE, ForwardBatch, Linear, LogitsProcessor, Parallel, ParallelLMHead, RMSNorm, _all_reduce,
    dumper_path, load_dumper)

FAULT_SCALE = 1.05
#: the forward pass running (``pass``: the decode pass's number from 0, None in the prefill) and the decode-only
#: fault (``cache``: (decode pass, layer), ``--fault-cache``)
FAULTS: dict[str, object] = {"pass": None, "cache": None, "fired": False}


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """This tensor-parallel rank's rows of ``w`` ([n heads * D, ...]): its n / tp_size heads (column parallel)."""
    par = PARALLEL[0]
    per = n // par.tp_size
    return w.reshape(n, -1, *w.shape[1:])[par.tp_rank * per:(par.tp_rank + 1) * per].reshape(-1, *w.shape[1:])


def _cols(w: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's columns of ``w`` [H, n * ...] (row parallel: a partial sum, reduced after the module)."""
    return _heads(w.T, n).T


class _IntermediateSlice:
    """An expert bank as a rank of SGLang's FusedMoE holds it under tensor parallelism without EP
    (``moe_tp_size`` = tp_size, SGLang's default): every expert's gate/up rows and down columns of this
    rank's slice of the intermediate width (``intermediate_size_per_partition``); the down projection's bias
    on rank 0 alone (gpt_oss.py zeroes ``down_proj_bias`` where ``moe_tp_rank != 0``), so the ranks' outputs
    are partial sums."""

    def __init__(self, bank) -> None:
        self.bank = bank

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate, up, down = self.bank.expert(e)
        F_ = gate.shape[0]
        return _heads(gate, F_), _heads(up, F_), _cols(down, F_)

    def bias(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        got = self.bank.bias(e)
        if got is None:
            return None
        bg, bu, bd = got
        down = bd if PARALLEL[0].tp_rank == 0 else torch.zeros_like(bd)
        return _heads(bg, bg.shape[0]), _heads(bu, bu.shape[0]), down


def experts(cfg, w, dtype: torch.dtype, cls: type[FusedMoE] = FusedMoE) -> FusedMoE:
    """This rank's FusedMoE (``cls``): its EP rank's experts (``moe_ep_size`` > 1, sglang_tree's), or, where
    the family's experts shard by the intermediate width (:data:`EXPERTS_TP`, ``moe_tp_size`` > 1), every
    expert's slice (:class:`_IntermediateSlice`); either way a partial sum over the ranks."""
    if PARALLEL[0].moe_tp_size > 1:
        w = SimpleNamespace(experts=_IntermediateSlice(w.experts))
    return cls(cfg, w, dtype)


class LinearBias(Linear):
    """SGLang's QKVParallelLinear with biases: ``(x W^T + b, None)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__(weight)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor):
        return x @ self.weight.T + self.bias, None


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GatedMLP(nn.Module):
    """Qwen2MoeMLP / DeepseekV2MLP: ``gate_up_proj`` (gate rows first), ``act_fn``, ``down_proj``; under
    tensor parallelism this rank's slice of the intermediate width (merged column parallel) and ``down_proj``
    row parallel with ``reduce_results=False``: its output a partial sum."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        F_ = gate.shape[0]
        self.gate_up_proj = Linear(torch.cat([_heads(gate, F_), _heads(up, F_)]))
        self.down_proj = Linear(_cols(down, F_))
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor, forward_batch=None) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class Rotary(nn.Module):
    """SGLang's rotary embedding: NeoX halves, or (``is_neox_style`` False) GPT-J's interleaved pairs, over
    the angles of moesnap's config (DeepSeek's YaRN frequencies included)."""

    def __init__(self, cfg, dtype: torch.dtype) -> None:
        super().__init__()
        from moesnap.model.families import rope_attention_factor, rope_inv_freq

        self.inv_freq, self.mscale = rope_inv_freq(cfg), rope_attention_factor(cfg)
        self.is_neox_style, self.dtype = not cfg.rope_interleaved, dtype

    def _turn(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T, D = positions.shape[0], self.inv_freq.shape[0] * 2
        shape = x.shape
        x = x.reshape(T, -1, D)                                                       # [T, heads, Dr]
        ang = torch.outer(positions.to(torch.float64), self.inv_freq)                 # [T, Dr/2]
        cos = (ang.cos() * self.mscale).to(self.dtype)[:, None, :]
        sin = (ang.sin() * self.mscale).to(self.dtype)[:, None, :]
        if self.is_neox_style:
            x1, x2 = x.chunk(2, -1)
        else:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        a, b = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = torch.cat([a, b], -1) if self.is_neox_style else torch.stack([a, b], -1).flatten(-2)
        return out.reshape(shape)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self._turn(positions, q), self._turn(positions, k)


class RadixAttention(nn.Module):
    """Causal attention over this request's KV cache, q ``[T, Hq*D]``, k ``[T, Hkv*D]``, v ``[T, Hkv*Dv]``;
    ``sliding_window_size`` W >= 0: a query at position t sees keys t-W..t (SGLang's inclusive window,
    gpt-oss's ``sliding_window - 1``); ``sinks [Hq]``: each head's logit joins every softmax's denominator
    (gpt-oss).  ``FAULTS["cache"] = (pass, layer)``: that decode pass of that layer reads its KV cache without
    its first row (a decode kernel's page index off by one), the cache itself intact."""

    def __init__(self, n_head: int, n_kv: int, head_dim: int, v_head_dim: int, scaling: float,
                 sliding_window_size: int = -1, layer_id: int = -1) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.D, self.Dv, self.scaling = n_head, n_kv, head_dim, v_head_dim, scaling
        self.window, self.layer_id = sliding_window_size, layer_id
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q, k, v, forward_batch, save_kv_cache: bool = True, sinks: torch.Tensor | None = None):
        from moesnap.model.families import softmax_with_sinks

        T = q.shape[0]
        q, k, v = q.reshape(T, self.n_head, self.D), k.reshape(T, self.n_kv, self.D), v.reshape(T, self.n_kv, self.Dv)
        if int(forward_batch.positions[0]) == 0 or self.cache is None:
            self.cache = (k, v)
        else:
            self.cache = (torch.cat([self.cache[0], k]), torch.cat([self.cache[1], v]))
        K, V = (c.repeat_interleave(self.n_head // self.n_kv, dim=1) for c in self.cache)
        keys = torch.arange(K.shape[0])
        mask = keys[None, :] <= forward_batch.positions[:, None]
        if self.window >= 0:
            mask &= forward_batch.positions[:, None] - keys[None, :] <= self.window
        if FAULTS["cache"] == (FAULTS["pass"], self.layer_id) and T == 1:
            FAULTS["fired"] = FAULTS["fired"] or bool(mask[:, 0].any())          # the row dropped was one it sees
            K, V, keys, mask = K[1:], V[1:], keys[1:], mask[:, 1:]
        scores = torch.einsum("thd,shd->hts", q, K).float() * self.scaling
        probs = softmax_with_sinks(scores.masked_fill(~mask, float("-inf")), None if sinks is None else sinks.float())
        return torch.einsum("hts,shd->thd", probs.to(q.dtype), V).reshape(T, self.n_head * self.Dv)


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


class TopK(nn.Module):
    """SGLang's TopK: softmax then top-k (renormalised or not), or DeepSeek's grouped top-k."""

    def __init__(self, cfg, correction_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg, self.bias = cfg, correction_bias

    def forward(self, hidden_states, router_logits):
        c = self.cfg
        logits = router_logits.float()
        if c.gating not in ("softmax_grouped", "sigmoid_grouped"):
            w, ids = torch.topk(torch.softmax(logits, -1), c.n_expert_used, dim=-1)
            if c.gating != "softmax_topk":                                   # renormalize=norm_topk_prob
                w = w / w.sum(-1, keepdim=True)
            return TopKOutput(w, ids.to(torch.int32), router_logits)
        T, E, G = logits.shape[0], logits.shape[1], c.n_group
        sigmoid = c.gating == "sigmoid_grouped"
        scores = logits.sigmoid() if sigmoid else torch.softmax(logits, -1)          # [T, E]
        choice = scores + self.bias.float() if self.bias is not None else scores     # biased_grouped_topk
        grouped = choice.view(T, G, E // G)
        group_scores = grouped.topk(2, -1)[0].sum(-1) if sigmoid else grouped.max(-1).values   # [T, G]
        kept = torch.topk(group_scores, c.n_group_used, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, kept, 1).bool()
        mask = mask[:, :, None].expand(T, G, E // G).reshape(T, E)
        ids = torch.topk(choice.masked_fill(~mask, float("-inf") if sigmoid else 0.0), c.n_expert_used, dim=-1,
                         sorted=False)[1]
        w = scores.gather(1, ids)
        if c.topk_norm:
            w = w / w.sum(-1, keepdim=True)
        return TopKOutput(w, ids.to(torch.int32), router_logits)


# --------------------------------------------------------------------------- Qwen2-MoE


class Qwen2MoeAttention(nn.Module):
    """Tensor parallel: this rank's q/k/v heads (weights and biases), ``o_proj`` row parallel."""

    def __init__(self, cfg, w, dtype: torch.dtype, layer_id: int = -1) -> None:
        super().__init__()
        D, tp, Hq, Hkv = cfg.head_dim, PARALLEL[0].tp_size, cfg.n_head, cfg.n_head_kv
        self.q_size, self.kv_size = Hq // tp * D, Hkv // tp * D
        self.qkv_proj = LinearBias(torch.cat([_heads(w.wq, Hq), _heads(w.wk, Hkv), _heads(w.wv, Hkv)]),
                                   torch.cat([_heads(w.bq, Hq), _heads(w.bk, Hkv), _heads(w.bv, Hkv)]))
        self.rotary_emb = Rotary(cfg, dtype)
        self.attn = RadixAttention(Hq // tp, Hkv // tp, D, D, D ** -0.5, layer_id=layer_id)
        self.o_proj = Linear(_cols(w.wo, Hq))

    def forward(self, positions, hidden_states, forward_batch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v, forward_batch))
        return output


class Qwen2MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg, w, dtype: torch.dtype, unfused_gate: bool, fault: bool) -> None:
        super().__init__()
        self.gate = Linear(w.router.float())
        self.topk = TopK(cfg)
        self.experts = FusedMoE(cfg, w, dtype)
        self.shared_expert = GatedMLP(*w.shexp)
        self.shared_expert_gate = nn.Linear(cfg.hidden, 1, bias=False, dtype=dtype)
        self.shared_expert_gate.weight.data.copy_(w.shexp_gate[None, :] * (FAULT_SCALE if fault else 1.0))
        self.shared_expert_gate.requires_grad_(False)
        self.unfused_gate = unfused_gate

    def forward(self, hidden_states, forward_batch=None):
        shared_output = self.shared_expert(hidden_states)
        if self.unfused_gate:
            shared_output = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared_output
        router_logits, _ = self.gate(hidden_states.float())
        topk_output = self.topk(hidden_states, router_logits)
        final = self.experts(hidden_states, topk_output)
        if self.unfused_gate:
            return final + shared_output
        # fused_gate_sigmoid_mul_add: the gate's GEMV, sigmoid, product and add in one kernel, no module call
        gate = hidden_states @ self.shared_expert_gate.weight.T                     # [T, 1]
        return final + torch.sigmoid(gate) * shared_output


class Qwen2MoeDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.self_attn = Qwen2MoeAttention(cfg, w, dtype, layer_id)
        self.mlp = Qwen2MoeSparseMoeBlock(cfg, w, dtype, args.unfused_gate, args.fault_gate == layer_id)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, forward_batch):    # partial sums reduced after the modules
        h = self.input_layernorm(hidden_states)
        attn = _all_reduce(self.self_attn(positions=positions, hidden_states=h, forward_batch=forward_batch))
        h, residual = self.post_attention_layernorm(attn, hidden_states)
        return residual + _all_reduce(self.mlp(h, forward_batch))


# --------------------------------------------------------------------------- DeepSeek-V2/V3


class DeepseekV2AttentionMLA(nn.Module):
    """Tensor parallel: ``q_proj``/``q_b_proj`` and ``kv_b_proj`` this rank's heads (column parallel), the
    latent projections replicated, ``o_proj`` row parallel."""

    def __init__(self, cfg, w, dtype: torch.dtype, layer_id: int = -1) -> None:
        super().__init__()
        from moesnap.model.families import softmax_scale

        H = cfg.n_head
        self.Hq, self.Dn, self.Dr, self.Dv = H // PARALLEL[0].tp_size, cfg.qk_nope_dim, cfg.rope_dim, cfg.v_dim
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        if self.q_lora_rank:
            self.fused_qkv_a_proj_with_mqa = Linear(torch.cat([w.wq_a, w.wkv_a]))
            self.q_a_layernorm = RMSNorm(w.q_a_norm, cfg.rms_eps)
            self.q_b_proj = Linear(_heads(w.wq_b, H))
        else:
            self.q_proj = Linear(_heads(w.wq, H))
            self.kv_a_proj_with_mqa = Linear(w.wkv_a)
        self.kv_b_proj = Linear(_heads(w.wkv_b, H))
        self.o_proj = Linear(_cols(w.wo, H))
        self.kv_a_layernorm = RMSNorm(w.kv_a_norm, cfg.rms_eps)
        self.rotary_emb = Rotary(cfg, dtype)
        self.attn_mha = RadixAttention(self.Hq, self.Hq, self.Dn + self.Dr, self.Dv, softmax_scale(cfg),
                                       layer_id=layer_id)
        # the absorbed path: MQA over the latent cache ([kv_a_normed, k_pe], one kv head), kv_b_proj's halves
        self.attn_mqa = RadixAttention(self.Hq, 1, self.kv_lora_rank + self.Dr, self.kv_lora_rank, softmax_scale(cfg),
                                       layer_id=layer_id)
        kv_b = self.kv_b_proj.weight.view(self.Hq, self.Dn + self.Dv, self.kv_lora_rank)
        self.w_kc, self.w_vc = kv_b[:, :self.Dn], kv_b[:, self.Dn:].transpose(1, 2)     # [H, Dn, Rkv], [H, Rkv, Dv]

    def forward(self, positions, hidden_states, forward_batch):
        T, Hq, Dn, Dr = hidden_states.shape[0], self.Hq, self.Dn, self.Dr
        if self.q_lora_rank:
            q, latent_cache = self.fused_qkv_a_proj_with_mqa(hidden_states)[0].split(
                [self.q_lora_rank, self.kv_lora_rank + Dr], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q))[0].view(-1, Hq, Dn + Dr)
        else:
            q = self.q_proj(hidden_states)[0].view(-1, Hq, Dn + Dr)
            latent_cache = self.kv_a_proj_with_mqa(hidden_states)[0]
        _, q_pe = q.split([Dn, Dr], dim=-1)
        kv_a, _ = latent_cache.split([self.kv_lora_rank, Dr], dim=-1)
        latent_cache = latent_cache.unsqueeze(1)
        kv_a = self.kv_a_layernorm(kv_a)
        k_pe = latent_cache[:, :, self.kv_lora_rank:]
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        latent = (torch.cat([kv_a.unsqueeze(1), k_pe], dim=-1), kv_a.unsqueeze(1))   # [T, 1, Rkv+Dr], [T, 1, Rkv]
        if T == 1 and int(positions[0]) > 0:        # a decode pass: forward_absorb_prepare / _core
            q_nope_out = torch.bmm(q[..., :Dn].transpose(0, 1), self.w_kc).transpose(0, 1)        # [T, H, Rkv]
            attn_output = self.attn_mqa(torch.cat([q_nope_out, q_pe], dim=-1), *latent, forward_batch)
            attn_bmm_output = torch.bmm(attn_output.view(T, Hq, -1).transpose(0, 1), self.w_vc)   # [H, T, Dv]
            output, _ = self.o_proj(attn_bmm_output.transpose(0, 1).flatten(1, 2))
            return output
        self.attn_mqa.cache = latent                # the MHA path writes the latent cache (set_mla_kv_buffer)
        q[..., Dn:] = q_pe
        kv = self.kv_b_proj(kv_a)[0].view(-1, Hq, Dn + self.Dv)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        k = torch.cat([k_nope, k_pe.expand(T, Hq, Dr)], dim=-1)
        attn_output = self.attn_mha(q, k, v, forward_batch, save_kv_cache=False)
        output, _ = self.o_proj(attn_output.reshape(-1, Hq * self.Dv))
        return output


class MoEGate(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)

    def forward(self, hidden_states):
        return F.linear(hidden_states.float(), self.weight)


class DeepseekV2MoE(nn.Module):
    def __init__(self, cfg, w, dtype: torch.dtype, fault: bool) -> None:
        super().__init__()
        self.routed_scaling_factor = cfg.routed_scale
        self.gate = MoEGate(w.router)
        self.topk = TopK(cfg, w.probs_bias)
        self.experts = FusedMoE(cfg, w, dtype)
        gate, up, down = w.shexp
        self.shared_experts = GatedMLP(gate, up, down * (FAULT_SCALE if fault else 1.0))

    def forward(self, hidden_states, forward_batch=None):
        shared_output = self.shared_experts(hidden_states)
        router_logits = self.gate(hidden_states)
        topk_output = self.topk(hidden_states, router_logits)
        final = self.experts(hidden_states, topk_output)
        final = final * self.routed_scaling_factor
        return final + shared_output


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.self_attn = DeepseekV2AttentionMLA(cfg, w, dtype, layer_id)
        if w.experts is not None:
            self.mlp: nn.Module = DeepseekV2MoE(cfg, w, dtype, args.fault_shared == layer_id)
        else:
            self.mlp = GatedMLP(w.ffn_gate, w.ffn_up, w.ffn_down)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, forward_batch):
        h = self.input_layernorm(hidden_states)
        attn = _all_reduce(self.self_attn(positions=positions, hidden_states=h, forward_batch=forward_batch))
        h, residual = self.post_attention_layernorm(attn, hidden_states)
        return residual + _all_reduce(self.mlp(h, forward_batch)), None


# --------------------------------------------------------------------------- the model


#: the decoder layer of each family (gguf-py's architecture name); sglang_more_families.py adds its own
LAYERS: dict[str, type[nn.Module]] = {"qwen2moe": Qwen2MoeDecoderLayer, "deepseek2": DeepseekV2DecoderLayer}
#: the families whose trees shard over tensor-parallel ranks (``--tp``); sglang_more_families.py adds its own
TP_FAMILIES: list[str] = ["qwen2moe", "deepseek2"]
#: the TP families whose routed experts shard by the intermediate width on every rank (SGLang's FusedMoE
#: without ``--ep-size``: ``moe_tp_size`` = tp_size); the others' by EP rank (``moe_ep_size`` = tp_size)
EXPERTS_TP: list[str] = []


class Model(nn.Module):
    def __init__(self, weights, dtype: torch.dtype, args) -> None:
        super().__init__()
        cfg = weights.config
        layer = LAYERS[cfg.arch]
        self.embed_tokens = nn.Embedding.from_pretrained(weights.dense("token_embd", dtype))
        self.layers = nn.ModuleList(layer(cfg, weights.layer(i, dtype), i, dtype, args) for i in range(cfg.n_layer))
        self.norm = RMSNorm(weights.dense("output_norm", dtype), cfg.rms_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            out = layer(positions, hidden_states, forward_batch)
            hidden_states = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden_states)


class ForCausalLM(nn.Module):
    #: the model class (sglang_more_families.py: OLMoE's, whose layers pass the residual along)
    model_class: type[nn.Module] = Model

    def __init__(self, weights, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.model = self.model_class(weights, dtype, args)
        self.lm_head = ParallelLMHead(weights.dense("output", dtype))
        self.logits_processor = LogitsProcessor()

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch):
        hidden_states = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)


#: each family's model class where it is not :class:`Model`
MODELS: dict[str, type[nn.Module]] = {}
#: the family whose tree plants each ``--fault-*`` of a layer (another family's tree never fires it)
FAULT_FAMILIES: dict[str, str] = {"fault_gate": "qwen2moe", "fault_shared": "deepseek2"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--decode", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--port", type=int, default=29651)
    p.add_argument("--fault-rank", type=int, default=None)
    p.add_argument("--fault-cache", default=None)
    p.add_argument("--unfused-gate", action="store_true")
    p.add_argument("--fault-gate", type=int, default=None)
    p.add_argument("--fault-shared", type=int, default=None)
    return p


def serve(rank: int, args: argparse.Namespace) -> None:
    """One rank: the dumper configured from the environment, the tree, the prefill and decode passes."""
    tp = args.tp
    if tp > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=rank, world_size=tp)
    moe = dict(moe_tp_rank=rank, moe_tp_size=tp) if args.arch in EXPERTS_TP else dict(moe_ep_rank=rank, moe_ep_size=tp)
    PARALLEL[0] = Parallel(tp_rank=rank, tp_size=tp, attn_tp_rank=rank, attn_tp_size=tp, **moe)
    if args.fault_rank not in (None, rank):          # the planted faults on that rank alone
        args = argparse.Namespace(**{k: None if k.startswith("fault_") else v for k, v in vars(args).items()})
    torch.set_num_threads(1)
    if args.fault_cache is not None:
        FAULTS["cache"] = tuple(int(x) for x in args.fault_cache.split(","))
    os.environ.update(DUMPER_ENABLE="1", DUMPER_DIR=str(args.out), DUMPER_EXP_NAME="exp",
                      DUMPER_ENABLE_OUTPUT_CONSOLE="0", DUMPER_COLLECTIVE_TIMEOUT="30", DUMPER_NON_INTRUSIVE_MODE="all")
    dumper = load_dumper(Path(args.dumper)).dumper
    sys.path.insert(0, str(REPO / "src"))
    from moesnap.model.load import open_model

    weights = open_model(args.model)
    ForCausalLM.model_class = MODELS.get(weights.config.arch, Model)
    model = ForCausalLM(weights, getattr(torch, args.dtype), args)
    dumper.register_non_intrusive_dumper(model)
    ids = torch.tensor([int(t) for t in args.tokens.split(",")])
    P = ids.shape[0] - args.decode
    passes = [(ids[:P], 0, None)] + [(ids[p:p + 1], p, p - P) for p in range(P, ids.shape[0])]
    for x, start, step in passes:
        FAULTS["pass"] = step
        positions = torch.arange(start, start + x.shape[0])
        model.forward(x, positions, ForwardBatch(x, positions, torch.tensor([start + x.shape[0]]), torch.tensor([0]),
                                                 ["req-0"]))
        dumper.step()
    if FAULTS["cache"] is not None and not FAULTS["fired"]:
        sys.exit(f"--fault-cache {args.fault_cache}: decode pass {FAULTS['cache'][0]} of layer {FAULTS['cache'][1]} "
                 f"never read the row it drops (no such pass or layer, or a sliding window past it): the fault "
                 f"cannot fire")
    if tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None, p: argparse.ArgumentParser | None = None) -> None:
    """Parse ``argv`` with ``p`` (:func:`parser`, or one it made with a family's own faults) and run."""
    args = (p or parser()).parse_args(argv)
    found = dumper_path()
    if found is None:
        sys.exit("sglang's dumper.py not found: pip install --no-deps sglang==0.5.23, or set MOESNAP_SGLANG_DUMPER")
    args.dumper = str(found)
    sys.path.insert(0, str(REPO / "src"))
    from moesnap.model.load import open_model

    cfg = open_model(args.model).config
    arch = args.arch = cfg.arch
    if arch not in LAYERS:
        sys.exit(f"{args.model}: a {arch} model; this tree builds {', '.join(LAYERS)}")
    for key, layer in vars(args).items():        # a planted fault at no layer of the model cannot fire
        if key == "fault_rank" or not key.startswith("fault_") or not isinstance(layer, int):
            continue
        flag = f"--{key.replace('_', '-')} {layer}"
        if not 0 <= layer < cfg.n_layer:
            sys.exit(f"{flag}: {args.model} has layers 0-{cfg.n_layer - 1}")
        if FAULT_FAMILIES.get(key, arch) != arch:
            sys.exit(f"{flag}: a fault of the {FAULT_FAMILIES[key]} tree; {args.model} is a {arch} model")
        if key == "fault_shared" and layer < cfg.n_dense_layers:
            sys.exit(f"{flag}: layer {layer} is dense, it has no shared experts")
    if args.tp > 1 and arch not in TP_FAMILIES:
        sys.exit(f"{args.model}: --tp {args.tp}: this tree shards {', '.join(TP_FAMILIES)} only")
    if args.fault_rank is not None:
        if not 0 <= args.fault_rank < args.tp:
            sys.exit(f"--fault-rank {args.fault_rank}: the run has ranks 0-{args.tp - 1} (--tp {args.tp})")
        if not any(v is not None for k, v in vars(args).items() if k.startswith("fault_") and k != "fault_rank"):
            sys.exit(f"--fault-rank {args.fault_rank}: no fault planted (a --fault-* option) to put on that rank")
    if args.tp > 1:
        os.environ["MASTER_PORT"] = str(args.port)
        torch.multiprocessing.spawn(serve, args=(args,), nprocs=args.tp)
    else:
        serve(0, args)


if __name__ == "__main__":
    main()
