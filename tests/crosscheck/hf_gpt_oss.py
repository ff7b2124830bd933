"""HF transformers' GptOssForCausalLM built from a gpt-oss GGUF file, independently of moesnap.

Nothing here imports moesnap.  The GGUF is read with ``gguf.GGUFReader`` and every tensor dequantized
with ``gguf.quants.dequantize`` (MXFP4 experts included), as :mod:`.hf_model` does for Qwen3-MoE.

Layout notes (transformers 5.x, ``modeling_gpt_oss.py``; convert_hf_to_gguf's ``GptOssModel`` does the
inverse):

* The experts are fused and transposed: ``mlp.experts.gate_up_proj`` is ``[E, H, 2F]`` with gate and
  up *interleaved* along the last axis (``gate_up[..., ::2]`` is the gate, ``[..., 1::2]`` the up),
  its bias ``gate_up_proj_bias`` ``[E, 2F]`` interleaved the same way; ``down_proj`` is ``[E, F, H]``
  (the GGUF's ``ffn_down_exps`` ``[E, H, F]`` transposed) with ``down_proj_bias`` ``[E, H]``.
* The router ``mlp.router`` has ``weight [E, H]`` and ``bias [E]``; it returns
  ``(router_logits, top-k scores, top-k indices)``.
* ``self_attn.sinks`` ``[Hq]`` is the GGUF's ``attn_sinks``; ``post_attention_layernorm`` its
  ``post_attention_norm``; q/k/v/o carry ``.bias``.
* Layers alternate ``sliding_attention`` (even) and ``full_attention`` (odd): the default
  ``layer_types``, which llama.cpp's ``swa_pattern`` of 2 matches.
* RoPE is YaRN with ``truncate: False`` as gpt-oss's own config.json says; the GGUF carries the factor
  and the original context, and llama.cpp's default betas 32 and 1 where the file omits them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from gguf import GGUFReader, Keys

from .hf_model import _field, read_tensors

ARCH = "gpt-oss"


def hf_config_from_gguf(reader: GGUFReader, vocab_size: int):
    from transformers import GptOssConfig

    arch = _field(reader, Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise ValueError(f"architecture {arch!r} is not {ARCH!r}")

    def k(tmpl: str, default: Any = None) -> Any:
        key = tmpl.format(arch=ARCH)
        return _field(reader, key) if key in reader.fields or default is None else default

    return GptOssConfig(
        vocab_size=vocab_size,
        hidden_size=int(k(Keys.LLM.EMBEDDING_LENGTH)),
        intermediate_size=int(k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)),
        num_hidden_layers=int(k(Keys.LLM.BLOCK_COUNT)),
        num_attention_heads=int(k(Keys.Attention.HEAD_COUNT)),
        num_key_value_heads=int(k(Keys.Attention.HEAD_COUNT_KV)),
        head_dim=int(k(Keys.Attention.KEY_LENGTH)),
        num_local_experts=int(k(Keys.LLM.EXPERT_COUNT)),
        num_experts_per_tok=int(k(Keys.LLM.EXPERT_USED_COUNT)),
        rms_norm_eps=float(k(Keys.Attention.LAYERNORM_RMS_EPS)),
        sliding_window=int(k(Keys.Attention.SLIDING_WINDOW)),
        max_position_embeddings=int(k(Keys.LLM.CONTEXT_LENGTH)),
        rope_parameters={"rope_type": "yarn", "rope_theta": float(k(Keys.Rope.FREQ_BASE)),
                         "factor": float(k(Keys.Rope.SCALING_FACTOR)),
                         "original_max_position_embeddings": int(k(Keys.Rope.SCALING_ORIG_CTX_LEN)),
                         "beta_fast": float(k(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0)),
                         "beta_slow": float(k(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)), "truncate": False},
        attention_bias=True,
        tie_word_embeddings=False,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
    )


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` gate and up -> ``[..., 2F]`` with the gate at even positions."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


def hf_state_dict(t: dict[str, np.ndarray], n_layer: int) -> dict[str, torch.Tensor]:
    """Map GGUF tensor names onto transformers' GptOssForCausalLM parameter names."""
    T = lambda name: torch.from_numpy(t[name])  # noqa: E731
    sd = {"model.embed_tokens.weight": T("token_embd"), "model.norm.weight": T("output_norm"),
          "lm_head.weight": T("output")}
    for i in range(n_layer):
        g, m = f"blk.{i}.", f"model.layers.{i}."
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            sd[m + f"self_attn.{theirs}.weight"] = T(g + ours)
            sd[m + f"self_attn.{theirs}.bias"] = T(g + ours + ".bias")
        sd.update({
            m + "self_attn.sinks": T(g + "attn_sinks"),
            m + "input_layernorm.weight": T(g + "attn_norm"),
            m + "post_attention_layernorm.weight": T(g + "post_attention_norm"),
            m + "mlp.router.weight": T(g + "ffn_gate_inp"),                           # [E, H]
            m + "mlp.router.bias": T(g + "ffn_gate_inp.bias"),                        # [E]
            m + "mlp.experts.gate_up_proj": _interleave(                                # [E, H, 2F]
                T(g + "ffn_gate_exps").transpose(1, 2), T(g + "ffn_up_exps").transpose(1, 2)).contiguous(),
            m + "mlp.experts.gate_up_proj_bias": _interleave(                           # [E, 2F]
                T(g + "ffn_gate_exps.bias"), T(g + "ffn_up_exps.bias")).contiguous(),
            m + "mlp.experts.down_proj": T(g + "ffn_down_exps").transpose(1, 2).contiguous(),  # [E, F, H]
            m + "mlp.experts.down_proj_bias": T(g + "ffn_down_exps.bias"),           # [E, H]
        })
    return sd


def load_hf_from_gguf(path: str | Path):
    """A float32, eager-attention transformers ``GptOssForCausalLM`` holding the GGUF's weights."""
    from transformers import GptOssForCausalLM

    reader = GGUFReader(str(path))
    tensors = read_tensors(reader)
    cfg = hf_config_from_gguf(reader, vocab_size=tensors["token_embd"].shape[0])
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(tensors, cfg.num_hidden_layers),
                                                strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # non-persistent buffers: rebuild
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model.float().eval()


@torch.no_grad()
def hf_forward(model, tokens) -> dict[str, np.ndarray]:
    """Run ``tokens`` through ``model``; every stage it exposes, by moesnap's stage names, as numpy
    (per-layer ones stacked ``[L, T, ...]``): module outputs by forward hooks, ``attn`` (the o
    projection's input) and ``attn_resid`` (the post-attention norm's input) by pre-hooks, ``q_rope``
    / ``k_rope`` by wrapping the module's ``apply_rotary_pos_emb`` (values passed through unchanged),
    and ``expert_out`` recomputed with the experts module's own parameters and ``_apply_gate``."""
    from transformers.models.gpt_oss import modeling_gpt_oss as mg

    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None, :]  # [1, T]
    T = ids.shape[1]
    names = ("attn_norm", "q", "k", "v", "q_rope", "k_rope", "attn", "attn_out", "attn_resid", "ffn_norm",
             "router_logits", "topk_weights", "topk_ids", "moe_out", "layer_out")
    cap: dict[str, list] = {s: [] for s in names}

    def keep(stage, pick):
        return lambda mod, args, out: cap[stage].append(pick(out).detach().reshape(T, -1).clone())

    def keep_in(stage):
        return lambda mod, args: cap[stage].append(args[0].detach().reshape(T, -1).clone())

    hooks = []
    for layer in model.model.layers:
        a = layer.self_attn
        hooks += [layer.input_layernorm.register_forward_hook(keep("attn_norm", lambda o: o)),
                  a.q_proj.register_forward_hook(keep("q", lambda o: o)),
                  a.k_proj.register_forward_hook(keep("k", lambda o: o)),
                  a.v_proj.register_forward_hook(keep("v", lambda o: o)),
                  a.o_proj.register_forward_pre_hook(keep_in("attn")),
                  a.o_proj.register_forward_hook(keep("attn_out", lambda o: o)),
                  layer.post_attention_layernorm.register_forward_pre_hook(keep_in("attn_resid")),
                  layer.post_attention_layernorm.register_forward_hook(keep("ffn_norm", lambda o: o)),
                  layer.mlp.router.register_forward_hook(keep("router_logits", lambda o: o[0])),
                  layer.mlp.router.register_forward_hook(keep("topk_weights", lambda o: o[1])),
                  layer.mlp.router.register_forward_hook(keep("topk_ids", lambda o: o[2])),
                  layer.mlp.register_forward_hook(keep("moe_out", lambda o: o[0])),
                  layer.register_forward_hook(keep("layer_out", lambda o: o[0] if isinstance(o, tuple) else o))]
    final: list[torch.Tensor] = []
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: final.append(o.detach()[0].clone())))
    real_rope = mg.apply_rotary_pos_emb

    def rope(q, k, cos, sin, *args, **kw):
        qr, kr = real_rope(q, k, cos, sin, *args, **kw)          # [1, H, T, D]
        cap["q_rope"].append(qr[0].transpose(0, 1).reshape(T, -1).clone())
        cap["k_rope"].append(kr[0].transpose(0, 1).reshape(T, -1).clone())
        return qr, kr

    try:
        with mock.patch.object(mg, "apply_rotary_pos_emb", rope):
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if len(cap["q_rope"]) != len(model.model.layers):
        raise RuntimeError(f"RoPE was seen {len(cap['q_rope'])} times for {len(model.model.layers)} layers")
    res = {s: torch.stack(v).numpy() for s, v in cap.items()}
    res["topk_ids"] = res["topk_ids"].astype(np.int32)
    res["expert_out"] = np.stack([_expert_out(layer.mlp.experts, torch.from_numpy(res["ffn_norm"][i]),
                                              torch.from_numpy(res["topk_ids"][i]))
                                  for i, layer in enumerate(model.model.layers)])
    res["logits"] = out.logits[0].float().numpy()
    res["final_norm"] = final[0].float().numpy()
    res["embed"] = out.hidden_states[0][0].float().numpy()
    return res


def _expert_out(experts, x: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """Each selected expert's unweighted output ``[T, k, H]``, by the experts module's own maths."""
    T, k = ids.shape
    out = torch.zeros(T, k, x.shape[-1])
    for t in range(T):
        for s in range(k):
            e = int(ids[t, s])
            gate_up = x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            out[t, s] = experts._apply_gate(gate_up) @ experts.down_proj[e] + experts.down_proj_bias[e]
    return out.numpy()
