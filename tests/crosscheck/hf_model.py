"""HF transformers' Qwen3MoeForCausalLM built from a GGUF file, independently of moesnap.

Nothing here imports moesnap.  The GGUF is read with ``gguf.GGUFReader``,
every tensor is dequantized with ``gguf.quants.dequantize`` (the same
dequantization ggml does, bit for bit) and loaded into a transformers model
whose config is built from the file's metadata.  transformers' own GGUF
loader is not used: it ignores ``expert_feed_forward_length`` and would not
be independent of the key names it guesses.

Layout notes (transformers 5.x, ``modeling_qwen3_moe.py``):

* GGUF stores dimensions in ggml order (``ne = [in, out, ...]``); the
  dequantized numpy array already has the logical row-major shape
  (``[out, in]``, experts ``[E, F, H]`` / ``[E, H, F]``), which is the torch
  ``nn.Linear`` weight layout.
* Experts are fused: ``mlp.experts.gate_up_proj`` is ``[E, 2F, H]`` with the
  gate rows first, ``mlp.experts.down_proj`` is ``[E, H, F]``.
* The router ``mlp.gate.weight`` is ``[E, H]``; it returns
  ``(router_logits, top_k_weights, top_k_index)``.
* No q/k permutation: both llama.cpp's qwen3moe graph and transformers use
  NeoX (rotate-half) RoPE on the GGUF's row order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, Keys, quants

ARCH = "qwen3moe"


def _field(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise KeyError(f"GGUF metadata key {key!r} missing")
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return f.contents()
    v = f.contents()
    return v


def read_tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 in its logical (numpy) shape.

    Keys are the GGUF names without a ``.weight`` suffix: converted checkpoints
    (and llama.cpp) say ``blk.0.attn_q.weight``; accept the bare form too.
    """
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
        logical = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml ne reversed
        if tuple(arr.shape) != logical:
            raise ValueError(f"{t.name}: dequantized shape {arr.shape} != logical shape {logical}")
        out[t.name.removesuffix(".weight")] = np.array(arr, dtype=np.float32, order="C", copy=True)
    return out


def hf_config_from_gguf(reader: GGUFReader, vocab_size: int):
    from transformers import Qwen3MoeConfig

    arch = _field(reader, Keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise ValueError(f"architecture {arch!r} is not {ARCH!r}")
    k = lambda tmpl: _field(reader, tmpl.format(arch=ARCH))  # noqa: E731
    n_expert_used = int(k(Keys.LLM.EXPERT_USED_COUNT))
    expert_ff = int(k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH))
    try:
        dense_ff = int(k(Keys.LLM.FEED_FORWARD_LENGTH))
    except KeyError:  # unused: every layer is sparse (decoder_sparse_step=1, mlp_only_layers=[])
        dense_ff = expert_ff * n_expert_used
    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=int(k(Keys.LLM.EMBEDDING_LENGTH)),
        intermediate_size=dense_ff,
        moe_intermediate_size=expert_ff,
        num_hidden_layers=int(k(Keys.LLM.BLOCK_COUNT)),
        num_attention_heads=int(k(Keys.Attention.HEAD_COUNT)),
        num_key_value_heads=int(k(Keys.Attention.HEAD_COUNT_KV)),
        head_dim=int(k(Keys.Attention.KEY_LENGTH)),
        num_experts=int(k(Keys.LLM.EXPERT_COUNT)),
        num_experts_per_tok=n_expert_used,
        rms_norm_eps=float(k(Keys.Attention.LAYERNORM_RMS_EPS)),
        rope_parameters={"rope_type": "default", "rope_theta": float(k(Keys.Rope.FREQ_BASE))},
        max_position_embeddings=int(k(Keys.LLM.CONTEXT_LENGTH)),
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
    )
    return cfg


def hf_state_dict(t: dict[str, np.ndarray], n_layer: int) -> dict[str, torch.Tensor]:
    """Map GGUF tensor names onto transformers' Qwen3MoeForCausalLM parameter names."""
    T = lambda name: torch.from_numpy(t[name])  # noqa: E731
    sd = {
        "model.embed_tokens.weight": T("token_embd"),
        "model.norm.weight": T("output_norm"),
        "lm_head.weight": T("output") if "output" in t else T("token_embd"),
    }
    for i in range(n_layer):
        g, m = f"blk.{i}.", f"model.layers.{i}."
        sd.update({
            m + "input_layernorm.weight": T(g + "attn_norm"),
            m + "self_attn.q_proj.weight": T(g + "attn_q"),
            m + "self_attn.k_proj.weight": T(g + "attn_k"),
            m + "self_attn.v_proj.weight": T(g + "attn_v"),
            m + "self_attn.o_proj.weight": T(g + "attn_output"),
            m + "self_attn.q_norm.weight": T(g + "attn_q_norm"),
            m + "self_attn.k_norm.weight": T(g + "attn_k_norm"),
            m + "post_attention_layernorm.weight": T(g + "ffn_norm"),
            m + "mlp.gate.weight": T(g + "ffn_gate_inp"),                       # [E, H]
            m + "mlp.experts.gate_up_proj": torch.cat(                                  # [E, 2F, H] gate first
                [T(g + "ffn_gate_exps"), T(g + "ffn_up_exps")], dim=1),
            m + "mlp.experts.down_proj": T(g + "ffn_down_exps"),                 # [E, H, F]
        })
    return sd


def load_hf_from_gguf(path: str | Path):
    """A float32, eager-attention transformers ``Qwen3MoeForCausalLM`` holding the GGUF's weights."""
    from transformers import Qwen3MoeForCausalLM

    reader = GGUFReader(str(path))
    tensors = read_tensors(reader)
    cfg = hf_config_from_gguf(reader, vocab_size=tensors["token_embd"].shape[0])
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(tensors, cfg.num_hidden_layers),
                                                strict=False, assign=True)
    # rotary inv_freq buffers are non-persistent and were created on meta: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model.float().eval()


@torch.no_grad()
def hf_forward(model, tokens) -> dict[str, np.ndarray]:
    """Run ``tokens`` through ``model``; return numpy arrays.

    ``logits`` ``[T, V]``; ``router_logits`` ``[L, T, E]``, ``topk_ids`` and
    ``topk_weights`` ``[L, T, k]`` (captured by hooks on each layer's router),
    ``moe_out`` ``[L, T, H]`` (hook on the sparse MoE block), ``attn_out``
    ``[L, T, H]`` (hook on self-attention, after o-projection), ``attn_norm``
    and ``ffn_norm`` ``[L, T, H]``, ``layer_out`` ``[L, T, H]`` (each decoder
    layer's output), ``embed`` ``[T, H]`` and ``final_norm`` ``[T, H]``.
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None, :]  # [1, T]
    cap: dict[str, list] = {s: [] for s in ("router_logits", "topk_ids", "topk_weights", "moe_out",
                                             "attn_out", "attn_norm", "ffn_norm", "layer_out")}
    hooks = []

    def keep(stage, pick):
        return lambda mod, args, out: cap[stage].append(pick(out).detach().reshape(ids.shape[1], -1).clone())

    for layer in model.model.layers:
        gate = layer.mlp.gate
        hooks.append(gate.register_forward_hook(keep("router_logits", lambda o: o[0])))
        hooks.append(gate.register_forward_hook(keep("topk_weights", lambda o: o[1])))
        hooks.append(gate.register_forward_hook(keep("topk_ids", lambda o: o[2])))
        hooks.append(layer.mlp.register_forward_hook(keep("moe_out", lambda o: o)))
        hooks.append(layer.self_attn.register_forward_hook(keep("attn_out", lambda o: o[0])))
        hooks.append(layer.input_layernorm.register_forward_hook(keep("attn_norm", lambda o: o)))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(keep("ffn_norm", lambda o: o)))
        hooks.append(layer.register_forward_hook(keep("layer_out", lambda o: o[0] if isinstance(o, tuple) else o)))
    final = []
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: final.append(o.detach()[0].clone())))
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    res = {s: torch.stack(v).numpy() for s, v in cap.items()}
    res["topk_ids"] = res["topk_ids"].astype(np.int32)
    res["logits"] = out.logits[0].float().numpy()
    res["final_norm"] = final[0].float().numpy()
    # hidden_states: (embeddings, layer 0 out, ..., layer L-1 out) -- the last one may be post-norm
    hs = out.hidden_states
    res["embed"] = hs[0][0].float().numpy()
    res["hidden_states"] = torch.stack([h[0] for h in hs]).float().numpy()
    return res
