"""DeepSeek-V2/V3 in the candidate forward: multi-head latent attention, the leading dense layers, shared
experts and grouped routing, as device functions :class:`~moesnap.model.candidate.CandidateModel` calls
for a config with ``mla`` (its own code: it shares the config, the stage names and the recorder with the
reference, none of its code paths).

* **Weights** (:class:`Latent`, dequantized on the device from the GGUF bytes, like ``_Dense``): the q
  projection (or the q LoRA's first matrix) and ``attn_kv_a_mqa`` as ONE fused input projection
  (``w_in``), so the hidden state is read once; ``kv_b`` whole, or put back together from the split
  ``attn_k_b`` (stored transposed) and ``attn_v_b``; the dense MLP of a leading dense layer or the
  shared experts of a MoE layer as one fused gate/up matrix and a down matrix (``mlp_*``).
* **Attention** (:func:`attention`): the latents and their RMSNorms, then per head ``k = [k_nope, k_pe]``
  (the rope key is one per token, shared by the heads) and ``v`` from ``kv_b``; RoPE on the rope parts
  only, **interleaved** pairs ``(x_2i, x_2i+1)``, in float32 with float64 tables of ``qk_rope_dim``
  dimensions; softmax scale ``1/sqrt(head_dim)``, times ``(1 + yarn_log_mul ln factor)^2`` under
  DeepSeek's YaRN (cos and sin then unscaled).  Keys are ``head_dim`` wide, values ``v_head_dim``.
* **KV cache**: the expanded, roped ``k`` and ``v`` per head (``k_rope`` and ``v``), not the latent.
  This costs ``Hq x (head_dim + v_head_dim)`` values per token and layer against ``kv_lora + qk_rope``
  (V2-Lite: 5120 against 576), but it is the stages the golden records: stage-local replay of a decode
  step loads the golden's ``k_rope``/``v`` rows into the cache as they are, and the cache, its paged
  blocks, its serving faults and its attention stay the ones every family uses.  An engine that caches
  the latent and absorbs ``kv_b`` into q and o computes the same ``attn``, which is what is judged.
* **Routing** (:func:`route`): softmax (V2) or sigmoid (V3) scores in float32; the correction bias
  ``exp_probs_b`` added for the selection only; groups scored by their best (V2) or two best (V3)
  biased scores, the ``n_group_used`` best kept, the top-k of what is left; weights the unbiased scores
  of the k, renormalised with ``topk_norm``, times ``routed_scale``.  ``router_select`` records the
  ranking scores with each expert of a dropped group lowered by its group's shortfall (the near-tie rule
  of :data:`moesnap.stages.ROUTING_SCORES`); router replay and stage-local replay take the golden's
  experts through the same functions as every family, ordered by ``router_select``, weighted as above.
* **Shared experts**: one SwiGLU of ``n_shared_experts x expert_ff`` every token runs, added to the routed
  mixture in float32 (:func:`moesnap.model.candidate_moe.mixture`, every family's).

Planted faults of the family act through :meth:`~moesnap.model.faults.Faults.off`: ``bias_off`` (the
correction bias dropped: ``router_select``), ``shared_off`` (the shared experts' output left out of
``moe_out``), ``scale_off`` (``routed_scale`` not applied: ``topk_weights``), ``renorm_flip`` (``topk_norm``
the other way: ``topk_weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .candidate_moe import mixture, mlp
from .faults import Faults
from .forward_io import Candidate, _Call, choose_experts
from .kernels import _sdpa_causal
from .kvcache import cached_attention


@dataclass
class Latent:
    """One DeepSeek layer's weights, dequantized on the device (every field a tensor or None)."""

    attn_norm: torch.Tensor            # [H]
    w_in: torch.Tensor                 # [Hq*D or Rq, H] then [Rkv + Dr, H]: q (or q_a) and kv_a, fused
    q_a_norm: torch.Tensor | None      # [Rq] (a q LoRA)
    wq_b: torch.Tensor | None          # [Hq*D, Rq]
    kv_a_norm: torch.Tensor            # [Rkv]
    wkv_b: torch.Tensor                # [Hq*(Dn+Dv), Rkv]: per head Dn key rows, then Dv value rows
    wo: torch.Tensor                   # [H, Hq*Dv]
    ffn_norm: torch.Tensor             # [H]
    mlp_gate_up: torch.Tensor | None   # [2F, H]: the dense MLP (dense layer) or the shared experts (MoE layer)
    mlp_down: torch.Tensor | None      # [H, F]
    router: torch.Tensor | None = None        # [E, H] in the router dtype (MoE layers)
    probs_bias: torch.Tensor | None = None    # [E] the V3 correction bias, router dtype


def weights(cand: Candidate, i: int, faults: Faults) -> Latent:
    """Layer ``i``'s :class:`Latent`, each tensor decoded from its own bytes (planted ``qtype`` faults apply)."""
    cfg, p = cand.cfg, f"blk.{i}."

    def w(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return cand._weight(p + name, faults, i, dtype).reshape(cand.model.shape(p + name))

    q_in = w("attn_q_a") if cfg.q_lora_rank else w("attn_q")
    if cfg.kv_b_split:     # attn_k_b [Hq, Rkv, Dn] (transposed by the converter), attn_v_b [Hq, Dv, Rkv]
        kv_b = torch.cat([w("attn_k_b").transpose(1, 2), w("attn_v_b")], dim=1)   # [Hq, Dn+Dv, Rkv]
        kv_b = kv_b.reshape(-1, cfg.kv_lora_rank).contiguous()
    else:
        kv_b = w("attn_kv_b")
    moe = not cfg.dense(i)
    mlp = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp") if moe else ("ffn_gate", "ffn_up", "ffn_down")
    has_mlp = not moe or cfg.n_shared_experts > 0
    return Latent(
        attn_norm=w("attn_norm"), w_in=torch.cat([q_in, w("attn_kv_a_mqa")]),
        q_a_norm=w("attn_q_a_norm") if cfg.q_lora_rank else None, wq_b=w("attn_q_b") if cfg.q_lora_rank else None,
        kv_a_norm=w("attn_kv_a_norm"), wkv_b=kv_b, wo=w("attn_output"), ffn_norm=w("ffn_norm"),
        mlp_gate_up=torch.cat([w(mlp[0]), w(mlp[1])]) if has_mlp else None,
        mlp_down=w(mlp[2]) if has_mlp else None,
        router=w("ffn_gate_inp", cand.router_dtype) if moe else None,
        probs_bias=w("exp_probs_b.bias", cand.router_dtype) if moe and cfg.router_probs_bias else None,
    )


def softmax_scale(cand: Candidate) -> float:
    """What attention multiplies ``q·k`` by: ``1/sqrt(head_dim)``, times ``mscale^2`` under DeepSeek's YaRN
    (``mscale = 1 + yarn_log_mul ln factor``)."""
    cfg = cand.cfg
    scale = cfg.head_dim ** -0.5
    if cfg.rope_scaling != "none" and cfg.yarn_log_mul > 0 and cfg.rope_factor > 1:
        scale *= (1.0 + cfg.yarn_log_mul * math.log(cfg.rope_factor)) ** 2
    return scale


def attention(cand: Candidate, i: int, x: torch.Tensor, w: Latent, c: _Call) -> torch.Tensor:
    """Multi-head latent attention of ``x [T, H]`` (the normed hidden state) -> ``attn_out [T, H]``."""
    cfg = cand.cfg
    T, Hq, Dn, Dr, Dv = x.shape[0], cfg.n_head, cfg.qk_nope_dim, cfg.rope_dim, cfg.v_dim
    Rkv = cfg.kv_lora_rank
    fused = x @ w.w_in.T                                                       # [T, Rq or Hq*D + Rkv + Dr]
    q_in, kv_latent = fused[:, :-(Rkv + Dr)], fused[:, -(Rkv + Dr):]
    if w.q_a_norm is not None and w.wq_b is not None:                         # the q LoRA
        q_latent = c.emit("q_latent", i, q_in)                                 # [T, Rq]
        q_in = c.emit("q_latent_norm", i, cand._norm(q_latent, w.q_a_norm)) @ w.wq_b.T   # [T, Hq*D]
    kv_latent = c.emit("kv_latent", i, kv_latent)                              # [T, Rkv + Dr]
    compressed = c.emit("kv_latent_norm", i, cand._norm(kv_latent[:, :Rkv], w.kv_a_norm))   # [T, Rkv]
    kv = (compressed @ w.wkv_b.T).view(T, Hq, Dn + Dv)                         # [T, Hq, Dn+Dv]
    k_pe = kv_latent[:, None, Rkv:].expand(T, Hq, Dr)                          # [T, Hq, Dr] one per token
    q = c.emit("q", i, q_in.view(T, Hq, Dn + Dr))                              # [T, Hq, D]
    k = c.emit("k", i, torch.cat([kv[..., :Dn], k_pe], dim=-1))                # [T, Hq, D]
    v = c.emit("v", i, kv[..., Dn:])                                           # [T, Hq, Dv]
    scale = softmax_scale(cand)
    if c.batch is None or c.cache is None:                                     # causal over these rows
        b = None
        cos, sin = cand._rope(T)
    else:                                                                      # through the KV cache
        b = c.faults.layer(i, c.batch)
        cos, sin = cand._rope_at(b.rope_pos, b.max_pos + 1)
    q = c.emit("q_rope", i, torch.cat([q[..., :Dn], cand._apply_rope(i, q[..., Dn:], cos, sin, c)], dim=-1))
    k_rot = cand._apply_rope(i, k[:, :1, Dn:], cos, sin, c).expand(T, Hq, Dr)   # the one rope key, turned once
    k = c.emit("k_rope", i, torch.cat([k[..., :Dn], k_rot], dim=-1))
    if b is None:
        o = _sdpa_causal(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cand.gqa, scale).transpose(0, 1)
    else:
        assert c.cache is not None
        o = cached_attention(q, k, v, c.cache.k[i], c.cache.v[i], b, cand.gqa, scale=scale)   # [T, Hq, Dv]
    attn = c.emit("attn", i, o.reshape(T, Hq * Dv))                           # [T, Hq*Dv]
    return c.emit("attn_out", i, attn @ w.wo.T)                                # [T, H]


def route(cand: Candidate, i: int, x: torch.Tensor, w: Latent, c: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids ``[T, k]`` by descending selection score, topk_weights ``[T, k]`` in the compute dtype)
    of layer ``i``'s grouped routing (module docstring)."""
    cfg = cand.cfg
    assert w.router is not None
    logits = c.emit("router_logits", i, x.to(cand.router_dtype) @ w.router.T)     # [T, E]
    T, E = logits.shape
    sigmoid = cfg.gating == "sigmoid_grouped"
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)  # [T, E] what weighs
    bias = None if w.probs_bias is None or c.faults.off(i, "bias_off") else w.probs_bias
    choice = scores if bias is None else scores + bias                          # [T, E] what selects
    select, rank = choice, choice
    if 1 < cfg.n_group and cfg.n_group_used < cfg.n_group:
        G = cfg.n_group
        grouped = choice.view(T, G, E // G)                                     # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if sigmoid else grouped.amax(-1)   # [T, G]
        kept = group_score.topk(cfg.n_group_used, dim=-1).indices               # [T, Gk]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        last = group_score.gather(1, kept).amin(-1, keepdim=True)               # [T, 1]
        shortfall = (last - group_score).clamp(min=0).masked_fill(keep, 0)      # [T, G]
        select = choice - shortfall.repeat_interleave(E // G, dim=-1)
        rank = choice.masked_fill(~keep.repeat_interleave(E // G, dim=-1), float("-inf") if sigmoid else 0.0)
    select = c.emit("router_select", i, select)
    _, pid = choose_experts(i, rank, select, cfg.n_expert_used, c)              # [T, k]
    weights = scores.gather(1, pid)                                             # [T, k] unbiased
    if cfg.topk_norm != c.faults.off(i, "renorm_flip"):
        weights = weights / weights.sum(-1, keepdim=True)
    if not c.faults.off(i, "scale_off"):
        weights = weights * cfg.routed_scale
    return c.emit("topk_ids", i, pid), c.emit("topk_weights", i, weights.to(cand.dtype))


def ffn(cand: Candidate, i: int, x: torch.Tensor, w: Latent, c: _Call) -> torch.Tensor:
    """What follows ``ffn_norm`` (``x [T, H]``): a dense layer's MLP (``dense_ffn_out``), or the routed
    experts' weighted mixture plus the shared experts (``moe_out``: :func:`~moesnap.model.candidate_moe.mixture`)."""
    if w.router is None:
        assert w.mlp_gate_up is not None and w.mlp_down is not None
        return c.emit("dense_ffn_out", i, mlp(x, w.mlp_gate_up, w.mlp_down))
    ids, weights = route(cand, i, x, w, c)
    shared = None if w.mlp_gate_up is None or w.mlp_down is None else (w.mlp_gate_up, w.mlp_down, None)
    return mixture(cand, i, x, ids, weights, shared, c)
