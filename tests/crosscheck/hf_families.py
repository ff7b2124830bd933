"""HF transformers' Qwen2MoeForCausalLM, MixtralForCausalLM and OlmoeForCausalLM built from a
``qwen2moe``, ``llama`` (with experts) or ``olmoe`` GGUF file, independently of moesnap's reader and
config: the GGUF read with ``gguf.GGUFReader``, every tensor dequantized with ``gguf.quants.dequantize``
(:mod:`.hf_model`), the config from the file's metadata read here; the tensors are put where
transformers wants them by the map ``trace --engine transformers`` uses
(:func:`moesnap.capture.hf_families.state_dict`: the converter's inverse, no part of the reference).

Layout notes (transformers 5.x; convert_hf_to_gguf does the inverse):

* A head is ``key_length`` wide where the file says so, else ``embedding_length / head_count``.
* Qwen2-MoE: ``shared_expert_gate.weight`` ``[1, H]`` is the file's ``ffn_gate_inp_shexp`` ``[H]``;
  ``norm_topk_prob`` false (llama.cpp hard-codes it; Qwen1.5-MoE's config.json says so).
* Mixtral: the converter permuted the rows of ``q_proj``/``k_proj`` per head
  (``LlamaModel.permute``: ``reshape(heads, 2, D/2, H).swapaxes(1, 2)``), so llama.cpp's RoPE on
  adjacent pairs equals transformers' on halves; ``unpermute`` undoes it for transformers, and
  ``interleave`` puts transformers' per-head q/k values back into the file's order for comparison.
  Mixtral's experts' width is the file's ``feed_forward_length``.
* OLMoE: ``q_norm``/``k_norm`` weigh the whole projection (``[Hq*D]``, ``[Hkv*D]``); the experts' width
  is ``feed_forward_length``; ``norm_topk_prob`` false.
* The experts are fused: ``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` (gate rows first), ``down_proj``
  ``[E, H, F]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from gguf import GGUFReader, Keys

from moesnap.capture.hf_families import interleave, state_dict

from .hf_model import _field, read_tensors


def _get(t: dict[str, np.ndarray]):
    return lambda name: torch.from_numpy(t[name])


def _key(reader: GGUFReader, arch: str, tmpl: str, default: Any = None) -> Any:
    key = tmpl.format(arch=arch)
    if key in reader.fields:
        return _field(reader, key)
    if default is None:
        raise KeyError(f"GGUF metadata key {key!r} missing")
    return default


def hf_config_from_gguf(reader: GGUFReader, arch: str, vocab_size: int):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    k = lambda tmpl, default=None: _key(reader, arch, tmpl, default)  # noqa: E731
    hidden, n_head = int(k(Keys.LLM.EMBEDDING_LENGTH)), int(k(Keys.Attention.HEAD_COUNT))
    head_dim = int(k(Keys.Attention.KEY_LENGTH, hidden // n_head))
    ff = int(k(Keys.LLM.FEED_FORWARD_LENGTH))
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=int(k(Keys.LLM.BLOCK_COUNT)),
                  num_attention_heads=n_head, num_key_value_heads=int(k(Keys.Attention.HEAD_COUNT_KV)),
                  num_experts_per_tok=int(k(Keys.LLM.EXPERT_USED_COUNT)),
                  rms_norm_eps=float(k(Keys.Attention.LAYERNORM_RMS_EPS)),
                  max_position_embeddings=int(k(Keys.LLM.CONTEXT_LENGTH)),
                  rope_parameters={"rope_type": "default", "rope_theta": float(k(Keys.Rope.FREQ_BASE))},
                  tie_word_embeddings=False, dtype=torch.float32, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    n_expert = int(k(Keys.LLM.EXPERT_COUNT))
    if arch == "qwen2moe":
        cfg = Qwen2MoeConfig(**common, intermediate_size=ff, moe_intermediate_size=int(k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)),
                             shared_expert_intermediate_size=int(k(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH)),
                             num_experts=n_expert, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                             qkv_bias=True, use_sliding_window=False)
    elif arch == "llama":
        cfg = MixtralConfig(**common, intermediate_size=ff, num_local_experts=n_expert, head_dim=head_dim,
                            router_jitter_noise=0.0, sliding_window=None)
    elif arch == "olmoe":
        cfg = OlmoeConfig(**common, intermediate_size=ff, num_experts=n_expert, norm_topk_prob=False, clip_qkv=None)
    else:
        raise ValueError(f"architecture {arch!r} is none of qwen2moe, llama, olmoe")
    cfg.head_dim = head_dim
    return cfg


def load_hf_from_gguf(path: str | Path):
    """A float32, eager-attention transformers model of the file's family holding its weights."""
    from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

    reader = GGUFReader(str(path))
    arch = str(_field(reader, Keys.General.ARCHITECTURE))
    tensors = read_tensors(reader)
    cfg = hf_config_from_gguf(reader, arch, tensors["token_embd"].shape[0])
    cls = {"qwen2moe": Qwen2MoeForCausalLM, "llama": MixtralForCausalLM, "olmoe": OlmoeForCausalLM}[arch]
    with torch.device("meta"):
        model = cls(cfg)
    missing, unexpected = model.load_state_dict(state_dict(_get(tensors), tensors.__contains__, cfg), strict=False,
                                                assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # non-persistent buffers: rebuild
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model.float().eval()


@torch.no_grad()
def hf_forward(model, tokens) -> dict[str, Any]:
    """Run ``tokens``; every stage transformers exposes, by moesnap's names: per-layer ones as
    ``{layer: [T, ...]}``, ``embed``/``final_norm``/``logits`` as ``[T, ...]``.  Mixtral's q, k and their
    roped values come back in the file's row order (:func:`interleave`); ``q_rope``/``k_rope`` by
    wrapping the module's ``apply_rotary_pos_emb`` (values passed through unchanged);
    ``topk_ids``/``topk_weights`` as the router returns them."""
    from importlib import import_module

    arch = model.config.model_type                      # qwen2_moe, mixtral, olmoe
    mod = import_module(f"transformers.models.{arch}.modeling_{arch}")
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None, :]
    T, D, mixtral = ids.shape[1], model.config.head_dim, arch == "mixtral"
    cap: dict[str, dict[int, torch.Tensor]] = {}
    current = [0]

    def put(stage, x, heads=False):
        x = x.detach().reshape(T, -1, D) if heads else x.detach().reshape(T, -1)
        cap.setdefault(stage, {})[current[0]] = (interleave(x) if heads and mixtral else x).clone()

    def out_hook(stage, pick=lambda o: o, heads=False):
        return lambda mod_, args, out: put(stage, pick(out), heads)

    def in_hook(stage):
        return lambda mod_, args: put(stage, args[0])

    hooks = []
    for i, layer in enumerate(model.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        hooks.append(layer.register_forward_pre_hook(lambda mod_, args, i=i: current.__setitem__(0, i)))
        hooks += [layer.input_layernorm.register_forward_hook(out_hook("attn_norm")),
                  a.q_proj.register_forward_hook(out_hook("q", heads=True)),
                  a.k_proj.register_forward_hook(out_hook("k", heads=True)),
                  a.v_proj.register_forward_hook(out_hook("v")),
                  a.o_proj.register_forward_pre_hook(in_hook("attn")),
                  a.o_proj.register_forward_hook(out_hook("attn_out")),
                  layer.post_attention_layernorm.register_forward_pre_hook(in_hook("attn_resid")),
                  layer.post_attention_layernorm.register_forward_hook(out_hook("ffn_norm")),
                  mlp.gate.register_forward_hook(out_hook("router_logits", lambda o: o[0])),
                  mlp.gate.register_forward_hook(out_hook("topk_weights", lambda o: o[1])),
                  mlp.gate.register_forward_hook(out_hook("topk_ids", lambda o: o[2])),
                  mlp.register_forward_hook(out_hook("moe_out")),
                  layer.register_forward_hook(out_hook("layer_out", lambda o: o[0] if isinstance(o, tuple) else o))]
        if hasattr(a, "q_norm"):
            hooks += [a.q_norm.register_forward_hook(out_hook("q_norm", heads=True)),
                      a.k_norm.register_forward_hook(out_hook("k_norm", heads=True))]
        if hasattr(mlp, "shared_expert"):
            hooks += [mlp.shared_expert.register_forward_hook(out_hook("shared_expert_out")),
                      mlp.shared_expert_gate.register_forward_hook(out_hook("shared_gate"))]
    final: list[torch.Tensor] = []
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: final.append(o.detach()[0].clone())))
    real = mod.apply_rotary_pos_emb

    def rope(q, k, *args, **kw):
        qr, kr = real(q, k, *args, **kw)                       # [1, heads, T, D]
        put("q_rope", qr[0].transpose(0, 1), heads=True)
        put("k_rope", kr[0].transpose(0, 1), heads=True)
        return qr, kr

    try:
        with mock.patch.object(mod, "apply_rotary_pos_emb", rope):
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    res: dict[str, Any] = {s: {i: x.numpy() for i, x in per.items()} for s, per in cap.items()}
    res["logits"] = out.logits[0].numpy()
    res["final_norm"] = final[0].numpy()
    res["embed"] = out.hidden_states[0][0].numpy()
    return res
