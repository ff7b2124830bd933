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

Each tensor is dequantized on the device where moesnap's torch decoder knows its type, else by gguf-py
on the host (bit-identical in float32) and moved there.  As ``from_pretrained`` does in float16 (the
model's ``_keep_in_fp32_modules``), the RMSNorm weights stay float32 in a float16 model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..model.config import ModelConfig


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


def gpt_oss_from_weights(model: Any, *, device: torch.device | str, dtype: torch.dtype,
                         extra: dict[str, Any]) -> nn.Module:
    """``GptOssForCausalLM`` holding ``model``'s weights (a :class:`~moesnap.model.weights.ModelWeights`
    of a gpt-oss file), built on ``device`` in ``dtype``, one layer's tensors at a time."""
    try:
        from transformers import GptOssForCausalLM
    except ImportError:
        raise UsageError("transformers is not installed, or too old for gpt-oss (pip install "
                         "'moesnap[transformers]')") from None
    from ..gguf import quants_torch

    c: ModelConfig = model.config
    cfg = hf_config(c, dtype, extra)
    with torch.device("meta"):
        hf = GptOssForCausalLM(cfg)
    experts: Any = hf.model.layers[0].mlp.experts if c.n_layer else None
    for want, attr in ((c.swiglu_limit, "limit"), (c.swiglu_alpha, "alpha")):
        value = getattr(experts, attr, want)
        if float(value) != float(want):     # transformers before 5.2x fixes limit 7.0 and alpha 1.702 in code
            raise UsageError(f"{model.path}: this transformers' GptOssExperts uses {attr} = {value}, the model "
                             f"{want}: its clamped SwiGLU cannot be built here")
    norm_dtype = torch.float32 if dtype == torch.float16 else dtype

    def w(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
        if model.tensor_type(name) in quants_torch.SUPPORTED:
            return model.on_device(name, device, as_dtype)
        return model.dense(name, torch.float32).to(device=device, dtype=as_dtype)

    def assign(sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
        if unexpected:
            raise UsageError(f"transformers capture: unexpected parameters {unexpected[:3]}")

    assign({"model.embed_tokens.weight": w("token_embd"), "model.norm.weight": w("output_norm", norm_dtype),
            "lm_head.weight": w("output")})
    for i in range(c.n_layer):
        g, m = f"blk.{i}.", f"model.layers.{i}."
        sd = {m + "input_layernorm.weight": w(g + "attn_norm", norm_dtype),
              m + "post_attention_layernorm.weight": w(g + "post_attention_norm", norm_dtype),
              m + "self_attn.sinks": w(g + "attn_sinks"),
              m + "mlp.router.weight": w(g + "ffn_gate_inp"),                          # [E, H]
              m + "mlp.router.bias": w(g + "ffn_gate_inp.bias")}                       # [E]
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                             ("attn_output", "o_proj")):
            sd[m + f"self_attn.{theirs}.weight"] = w(g + ours)
            sd[m + f"self_attn.{theirs}.bias"] = w(g + ours + ".bias")
        assign(sd)
        gate_up = _interleave(w(g + "ffn_gate_exps").transpose(1, 2), w(g + "ffn_up_exps").transpose(1, 2))
        assign({m + "mlp.experts.gate_up_proj": gate_up.contiguous(),                     # [E, H, 2F]
                m + "mlp.experts.gate_up_proj_bias": _interleave(w(g + "ffn_gate_exps.bias"),
                                                                 w(g + "ffn_up_exps.bias")).contiguous(),
                m + "mlp.experts.down_proj": w(g + "ffn_down_exps").transpose(1, 2).contiguous(),  # [E, F, H]
                m + "mlp.experts.down_proj_bias": w(g + "ffn_down_exps.bias")})           # [E, H]
        del gate_up, sd
        model.release_layer(i)
    still_meta = [n for n, p in hf.named_parameters() if p.is_meta]
    if still_meta:
        raise UsageError(f"transformers capture: parameters not loaded from {model.path}: {still_meta[:3]}")
    # rotary inv_freq buffers are non-persistent and were created on meta: rebuild them on the device
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf.eval()
