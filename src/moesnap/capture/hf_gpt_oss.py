"""transformers' ``GptOssForCausalLM`` built from a gpt-oss model moesnap opened (GGUF or checkpoint).

The config comes from moesnap's :class:`~moesnap.model.config.ModelConfig` (shapes, the sliding
window and which layers slide, YaRN with the file's own ``truncate`` choice, the clamped SwiGLU's
limit and alpha); the weights from the same tensors the reference reads, mapped as transformers 5.x
lays them out (``modeling_gpt_oss.py``; convert_hf_to_gguf's ``GptOssModel`` does the inverse)::

    blk.N.attn_q/k/v/output (.bias)     -> self_attn.q_proj/k_proj/v_proj/o_proj .weight (.bias)
    blk.N.attn_sinks         [Hq]       -> self_attn.sinks
    blk.N.attn_norm / post_attention_norm -> input_layernorm / post_attention_layernorm
    blk.N.ffn_gate_inp (.bias) [E, H]   -> mlp.router.weight (.bias)
    blk.N.ffn_gate_exps, ffn_up_exps [E, F, H] -> mlp.experts.gate_up_proj [E, H, 2F]: transposed,
                                           gate and up *interleaved* (gate at even columns)
    blk.N.ffn_gate_exps.bias, ffn_up_exps.bias [E, F] -> gate_up_proj_bias [E, 2F], interleaved
    blk.N.ffn_down_exps      [E, H, F]  -> mlp.experts.down_proj [E, F, H] (transposed), .bias [E, H]

:mod:`moesnap.capture.hf_build` builds the model from these (each tensor dequantized on the device
where moesnap's torch decoder knows its type, else by gguf-py on the host; as ``from_pretrained`` does
in float16, the model's ``_keep_in_fp32_modules``, the RMSNorm weights stay float32 in a float16 model).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..model.config import ModelConfig
from .hf_families import Get, Has


def hf_config(c: ModelConfig, dtype: torch.dtype, extra: dict[str, Any]) -> Any:
    """transformers' ``GptOssConfig`` of the model ``c`` describes."""
    from transformers import GptOssConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_base}
    if c.rope_scaling == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": c.rope_base, "factor": c.rope_factor,
                "original_max_position_embeddings": c.rope_orig_context, "beta_fast": c.rope_beta_fast,
                "beta_slow": c.rope_beta_slow, "truncate": c.rope_yarn_truncate}
    return GptOssConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.expert_ff, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_head_kv, head_dim=c.head_dim,
        num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_used, rms_norm_eps=c.rms_eps,
        sliding_window=c.sliding_window or None, max_position_embeddings=c.context_length,
        layer_types=["sliding_attention" if c.slides(i) else "full_attention" for i in range(c.n_layer)],
        rope_parameters=rope, swiglu_limit=c.swiglu_limit, swiglu_alpha=c.swiglu_alpha, attention_bias=True,
        tie_word_embeddings=False, dtype=dtype, **extra,
    )


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` gate and up -> ``[..., 2F]``, the gate at even positions (transformers' layout)."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


def gpt_oss_layer(get: Get, has: Has, hc: Any, i: int) -> dict[str, torch.Tensor]:  # noqa: ARG001
    """A gpt-oss decoder layer's parameters (the table above; :mod:`moesnap.capture.hf_families`'s
    signature)."""
    g, m = f"blk.{i}.", f"model.layers.{i}."
    sd = {m + "input_layernorm.weight": get(g + "attn_norm"),
          m + "post_attention_layernorm.weight": get(g + "post_attention_norm"),
          m + "self_attn.sinks": get(g + "attn_sinks"),
          m + "mlp.router.weight": get(g + "ffn_gate_inp"),                            # [E, H]
          m + "mlp.router.bias": get(g + "ffn_gate_inp.bias"),                         # [E]
          m + "mlp.experts.gate_up_proj": _interleave(get(g + "ffn_gate_exps").transpose(1, 2),
                                                      get(g + "ffn_up_exps").transpose(1, 2)).contiguous(),  # [E, H, 2F]
          m + "mlp.experts.gate_up_proj_bias": _interleave(get(g + "ffn_gate_exps.bias"),
                                                           get(g + "ffn_up_exps.bias")).contiguous(),       # [E, 2F]
          m + "mlp.experts.down_proj": get(g + "ffn_down_exps").transpose(1, 2).contiguous(),             # [E, F, H]
          m + "mlp.experts.down_proj_bias": get(g + "ffn_down_exps.bias")}                                # [E, H]
    for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
        sd[m + f"self_attn.{theirs}.weight"] = get(g + ours)
        sd[m + f"self_attn.{theirs}.bias"] = get(g + ours + ".bias")
    return sd


def check(hf: Any, c: ModelConfig, path: Any) -> None:
    """Refuse (one line) a transformers whose ``GptOssExperts`` fixes another clamp than the model's."""
    experts: Any = hf.model.layers[0].mlp.experts if c.n_layer else None
    for want, attr in ((c.swiglu_limit, "limit"), (c.swiglu_alpha, "alpha")):
        value = getattr(experts, attr, want)
        if float(value) != float(want):     # transformers before 5.2x fixes limit 7.0 and alpha 1.702 in code
            raise UsageError(f"{path}: this transformers' GptOssExperts uses {attr} = {value}, the model "
                             f"{want}: its clamped SwiGLU cannot be built here")
