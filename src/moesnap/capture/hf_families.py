"""GGUF tensors onto transformers' parameters, and moesnap's config onto transformers' config, for
Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE and DeepSeek-V2/V3 (gpt-oss: :mod:`moesnap.capture.hf_gpt_oss`).

Each ``*_layer(get, has, hc, i)`` maps decoder layer ``i`` (convert_hf_to_gguf does the inverse):
``get(name)`` is the GGUF tensor ``name`` (``blk.3.attn_q``, a bias ``blk.3.attn_q.bias``) in its
logical numpy shape as a torch tensor, ``has(name)`` whether the file holds it, ``hc`` the transformers
config; it returns ``{parameter name: tensor}``.  :mod:`moesnap.capture.hf_build` builds a model from
them with tensors moesnap dequantized; the cross-check's loaders (``tests/crosscheck``) with tensors
gguf-py dequantized, from configs they read from the file's metadata themselves.  Layout
(transformers 5.x)::

    blk.N.attn_norm / ffn_norm          -> input_layernorm / post_attention_layernorm
    blk.N.attn_q/k/v/output (.bias)     -> self_attn.q_proj/k_proj/v_proj/o_proj .weight (.bias)
    blk.N.attn_q_norm / attn_k_norm     -> self_attn.q_norm / k_norm (Qwen3-MoE per head [D];
                                           OLMoE over the projection [Hq*D], [Hkv*D])
    blk.N.ffn_gate_inp   [E, H]         -> mlp.gate.weight
    blk.N.ffn_gate_exps, ffn_up_exps [E, F, H] -> mlp.experts.gate_up_proj [E, 2F, H] (gate rows first)
    blk.N.ffn_down_exps  [E, H, F]      -> mlp.experts.down_proj
    Qwen2-MoE: ffn_gate/up/down_shexp   -> mlp.shared_expert.gate_proj/up_proj/down_proj
               ffn_gate_inp_shexp [H]   -> mlp.shared_expert_gate.weight [1, H]
    Mixtral: attn_q / attn_k rows un-permuted (:func:`unpermute`)
    DeepSeek: attn_q (or attn_q_a, attn_q_a_norm, attn_q_b) -> self_attn.q_proj (q_a_proj, q_a_layernorm,
              q_b_proj); attn_kv_a_mqa, attn_kv_a_norm -> kv_a_proj_with_mqa, kv_a_layernorm; attn_kv_b
              (or attn_k_b + attn_v_b, joined) -> kv_b_proj; a dense layer's ffn_gate/up/down -> mlp.*_proj;
              a MoE layer's ffn_*_shexp -> mlp.shared_experts.*_proj, exp_probs_b.bias ->
              mlp.gate.e_score_correction_bias (V3; zeros where the file has none)

Mixtral: convert_hf_to_gguf permutes the rows of ``q_proj``/``k_proj`` of every ``llama`` model per
head (``LlamaModel.permute``: ``reshape(heads, 2, D/2, H).swapaxes(1, 2)``), so llama.cpp's RoPE on
adjacent pairs equals transformers' on halves; :func:`unpermute` undoes it for transformers, and
:func:`interleave` puts transformers' per-head q/k values back into the file's order, in which the
reference keeps them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import UsageError
from ..model.config import ModelConfig
from ..model.weights import join_kv_b

#: ``get(name)``: a GGUF tensor in its logical shape; ``has(name)``: whether the file holds it
Get = Callable[[str], torch.Tensor]
Has = Callable[[str], bool]
#: one decoder layer's parameters: ``(get, has, transformers config, layer) -> {name: tensor}``
LayerMap = Callable[[Get, Has, Any, int], dict[str, torch.Tensor]]


def top(get: Get) -> dict[str, torch.Tensor]:
    """The embedding, the final norm and the lm head (every family's)."""
    return {"model.embed_tokens.weight": get("token_embd"), "model.norm.weight": get("output_norm"),
            "lm_head.weight": get("output")}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a GGUF ``attn_q``/``attn_k`` ``[heads*D, H]`` in HF's order (undoes ``LlamaModel.permute``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def interleave(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` in HF's per-head order (halves) -> the GGUF's (pairs): element ``2i + j`` is ``j*D/2 + i``."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


def _swiglu(get: Get, to: str, ours: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """A SwiGLU MLP's three matrices (``ours``: gate, up, down) as ``to.gate_proj``/``up_proj``/``down_proj``."""
    return {f"{to}.{theirs}.weight": get(name) for name, theirs in zip(ours, ("gate_proj", "up_proj", "down_proj"))}


def qwen3_moe_layer(get: Get, has: Has, hc: Any, i: int) -> dict[str, torch.Tensor]:  # noqa: ARG001
    """A Qwen3-MoE layer; also the attention, norms, router and routed experts of Qwen2-MoE, Mixtral
    and OLMoE (biases and q/k norms where the file holds them)."""
    g, m = f"blk.{i}.", f"model.layers.{i}."
    a = m + "self_attn."
    sd = {m + "input_layernorm.weight": get(g + "attn_norm"), m + "post_attention_layernorm.weight": get(g + "ffn_norm"),
          m + "mlp.gate.weight": get(g + "ffn_gate_inp"),                                        # [E, H]
          m + "mlp.experts.gate_up_proj": torch.cat([get(g + "ffn_gate_exps"), get(g + "ffn_up_exps")], dim=1),
          m + "mlp.experts.down_proj": get(g + "ffn_down_exps")}                               # [E, H, F]
    for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
        sd[a + f"{theirs}.weight"] = get(g + ours)
        if has(g + ours + ".bias"):
            sd[a + f"{theirs}.bias"] = get(g + ours + ".bias")
    if has(g + "attn_q_norm"):
        sd[a + "q_norm.weight"], sd[a + "k_norm.weight"] = get(g + "attn_q_norm"), get(g + "attn_k_norm")
    return sd


def qwen2_moe_layer(get: Get, has: Has, hc: Any, i: int) -> dict[str, torch.Tensor]:
    """A Qwen2-MoE layer: Qwen3-MoE's (with q/k/v biases) and the shared expert and its gate."""
    g, m = f"blk.{i}.", f"model.layers.{i}.mlp."
    return {**qwen3_moe_layer(get, has, hc, i),
            **_swiglu(get, m + "shared_expert", (g + "ffn_gate_shexp", g + "ffn_up_shexp", g + "ffn_down_shexp")),
            m + "shared_expert_gate.weight": get(g + "ffn_gate_inp_shexp")[None, :]}             # [1, H]


def mixtral_layer(get: Get, has: Has, hc: Any, i: int) -> dict[str, torch.Tensor]:
    """A Mixtral layer: q/k rows un-permuted (the module docstring)."""
    sd, a = qwen3_moe_layer(get, has, hc, i), f"model.layers.{i}.self_attn."
    sd[a + "q_proj.weight"] = unpermute(sd[a + "q_proj.weight"], hc.num_attention_heads)
    sd[a + "k_proj.weight"] = unpermute(sd[a + "k_proj.weight"], hc.num_key_value_heads)
    return sd


def deepseek_layer(get: Get, has: Has, hc: Any, i: int) -> dict[str, torch.Tensor]:
    """A DeepSeek-V2/V3 layer (dense or MoE, with or without a q LoRA, ``kv_b`` whole or split)."""
    g, m = f"blk.{i}.", f"model.layers.{i}."
    a = m + "self_attn."
    sd = {m + "input_layernorm.weight": get(g + "attn_norm"), m + "post_attention_layernorm.weight": get(g + "ffn_norm"),
          a + "kv_a_proj_with_mqa.weight": get(g + "attn_kv_a_mqa"), a + "kv_a_layernorm.weight": get(g + "attn_kv_a_norm"),
          a + "kv_b_proj.weight": get(g + "attn_kv_b") if has(g + "attn_kv_b") else join_kv_b(get(g + "attn_k_b"),
                                                                                            get(g + "attn_v_b")),
          a + "o_proj.weight": get(g + "attn_output")}
    if hc.q_lora_rank:
        sd.update({a + "q_a_proj.weight": get(g + "attn_q_a"), a + "q_a_layernorm.weight": get(g + "attn_q_a_norm"),
                   a + "q_b_proj.weight": get(g + "attn_q_b")})
    else:
        sd[a + "q_proj.weight"] = get(g + "attn_q")
    if i < hc.first_k_dense_replace:
        return {**sd, **_swiglu(get, m + "mlp", (g + "ffn_gate", g + "ffn_up", g + "ffn_down"))}
    sd.update({m + "mlp.gate.weight": get(g + "ffn_gate_inp"),
               m + "mlp.experts.gate_up_proj": torch.cat([get(g + "ffn_gate_exps"), get(g + "ffn_up_exps")], dim=1),
               m + "mlp.experts.down_proj": get(g + "ffn_down_exps"),
               **_swiglu(get, m + "mlp.shared_experts", (g + "ffn_gate_shexp", g + "ffn_up_shexp", g + "ffn_down_shexp"))})
    if hc.model_type == "deepseek_v3":    # the selection's correction bias: a buffer of zeros where the file has none
        router = sd[m + "mlp.gate.weight"]
        sd[m + "mlp.gate.e_score_correction_bias"] = get(g + "exp_probs_b.bias") if has(g + "exp_probs_b.bias") \
            else torch.zeros(router.shape[0], dtype=torch.float32, device=router.device)
    return sd


#: per transformers ``model_type``: the layer map
LAYERS: dict[str, LayerMap] = {"qwen3_moe": qwen3_moe_layer, "qwen2_moe": qwen2_moe_layer, "mixtral": mixtral_layer,
                               "olmoe": qwen3_moe_layer, "deepseek_v2": deepseek_layer, "deepseek_v3": deepseek_layer}


def state_dict(get: Get, has: Has, hc: Any) -> dict[str, torch.Tensor]:
    """Every parameter of a model of config ``hc`` (its ``model_type``'s layer map over every layer)."""
    layer = LAYERS[hc.model_type]
    sd = top(get)
    for i in range(hc.num_hidden_layers):
        sd.update(layer(get, has, hc, i))
    return sd


# ---------------------------------------------------------------- configs from moesnap's ModelConfig


def _common(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> dict[str, Any]:
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                num_key_value_heads=c.n_head_kv, num_experts_per_tok=c.n_expert_used, rms_norm_eps=c.rms_eps,
                max_position_embeddings=c.context_length, tie_word_embeddings=False, dtype=dtype,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_base}, **extra)


def qwen3_moe_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    """Qwen3-MoE: all layers sparse, top-k renormalised (transformers ignores ``expert_feed_forward_length``)."""
    from transformers import Qwen3MoeConfig

    # head_dim is no declared field of Qwen3MoeConfig: the class takes it through **kwargs
    return Qwen3MoeConfig(  # type: ignore[call-arg]
        **_common(c, dtype, extra), intermediate_size=c.expert_ff * c.n_expert_used, moe_intermediate_size=c.expert_ff,
        head_dim=c.head_dim, num_experts=c.n_expert, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        attention_bias=False, use_sliding_window=False)


def qwen2_moe_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(**_common(c, dtype, extra), intermediate_size=c.shared_expert_ff,
                         moe_intermediate_size=c.expert_ff, shared_expert_intermediate_size=c.shared_expert_ff,
                         num_experts=c.n_expert, norm_topk_prob=c.gating == "softmax_topk_renorm", decoder_sparse_step=1,
                         mlp_only_layers=[], qkv_bias=True, use_sliding_window=False)
    cfg.head_dim = c.head_dim
    return cfg


def mixtral_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**_common(c, dtype, extra), intermediate_size=c.expert_ff, num_local_experts=c.n_expert,
                         head_dim=c.head_dim, router_jitter_noise=0.0, sliding_window=None)


def olmoe_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(**_common(c, dtype, extra), intermediate_size=c.expert_ff, num_experts=c.n_expert,
                      norm_topk_prob=c.gating == "softmax_topk_renorm", clip_qkv=None)
    cfg.head_dim = c.head_dim
    return cfg


def deepseek_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    """DeepSeek-V3 where the gating is sigmoid (``noaux_tc``), V2 otherwise (``group_limited_greedy``
    where groups drop experts).  GGUF carries V3's ``mscale_all_dim`` as ``0.1 * yarn_log_multiplier`` and
    no ``mscale``; DeepSeek's releases set both equal."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    v3 = c.gating == "sigmoid_grouped"
    if not v3 and c.topk_norm:
        raise UsageError("transformers' DeepseekV2 router never renormalises its top-k weights; this DeepSeek-V2 "
                         "file's expert_weights_norm is true, so transformers cannot run it")
    common = _common(c, dtype, extra)
    common["num_key_value_heads"] = c.n_head       # the file's 1 is llama.cpp's MQA view of MLA
    if c.rope_scaling == "yarn":
        mscale = c.yarn_log_mul / 0.1
        common["rope_parameters"] = {"rope_type": "yarn", "rope_theta": c.rope_base, "factor": c.rope_factor,
                                     "original_max_position_embeddings": c.rope_orig_context,
                                     "beta_fast": c.rope_beta_fast, "beta_slow": c.rope_beta_slow,
                                     "mscale": mscale, "mscale_all_dim": mscale}
    fields: dict[str, Any] = dict(intermediate_size=c.dense_ff or c.expert_ff, moe_intermediate_size=c.expert_ff,
                  n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_expert, routed_scaling_factor=c.routed_scale,
                  kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None, qk_rope_head_dim=c.qk_rope_dim,
                  v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_dim, n_group=c.n_group, topk_group=c.n_group_used,
                  first_k_dense_replace=c.n_dense_layers, norm_topk_prob=c.topk_norm, attention_bias=False)
    if v3:
        return DeepseekV3Config(**common, **fields, rope_interleave=True)
    return DeepseekV2Config(**common, **fields,
                            topk_method="group_limited_greedy" if c.n_group_used < c.n_group else "greedy")
