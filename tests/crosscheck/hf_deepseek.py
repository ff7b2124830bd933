"""HF transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM built from a deepseek2 GGUF file,
independently of moesnap's reader and config: the GGUF read with ``gguf.GGUFReader``, every tensor
dequantized with ``gguf.quants.dequantize`` (:mod:`.hf_model`), the config from the file's metadata read
here; the tensors put where transformers wants them by the map ``trace --engine transformers`` uses
(:func:`moesnap.capture.hf_families.state_dict`: the converter's inverse, no part of the reference).

Layout notes (transformers 5.x, ``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py``;
convert_hf_to_gguf's ``DeepseekV2Model`` does the inverse):

* The GGUF says ``head_count_kv = 1`` and key/value lengths of the latent (MLA as MQA); transformers
  wants ``num_key_value_heads = num_attention_heads`` and the real head sizes, which the file keeps as
  ``key_length_mla`` (``qk_nope + qk_rope``), ``value_length_mla`` and ``rope.dimension_count``.
* ``kv_b_proj.weight`` ``[Hq*(Dn+Dv), Rkv]``: the file's ``attn_kv_b``, or (recent converters)
  ``attn_k_b`` ``[Hq, Rkv, Dn]`` (the converter transposed it) and ``attn_v_b`` ``[Hq, Dv, Rkv]``.
* The file carries V3's selection rule as ``expert_gating_func`` 2 (sigmoid) and ``exp_probs_b.bias``
  (``e_score_correction_bias``); V2 (softmax) becomes ``DeepseekV2Config`` with ``topk_method``
  ``group_limited_greedy`` where the file has groups, ``greedy`` otherwise.  transformers' V2 router
  does not renormalise the k weights whatever ``norm_topk_prob`` says (V2 checkpoints say false).
* YaRN: the file carries ``0.1 * mscale_all_dim`` as ``yarn_log_multiplier`` and no ``mscale``;
  DeepSeek's releases set both equal, so the config gets ``mscale = mscale_all_dim``.
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

from moesnap.capture.hf_families import state_dict

from .hf_model import _field, read_tensors

ARCH = "deepseek2"


def _key(reader: GGUFReader, tmpl: str, default: Any = None) -> Any:
    key = tmpl.format(arch=ARCH)
    if key in reader.fields:
        return _field(reader, key)
    if default is None:
        raise KeyError(f"GGUF metadata key {key!r} missing")
    return default


def hf_config_from_gguf(reader: GGUFReader, vocab_size: int, *, v3: bool):
    from transformers import DeepseekV2Config, DeepseekV3Config

    k = lambda tmpl, default=None: _key(reader, tmpl, default)  # noqa: E731
    rope = int(k(Keys.Rope.DIMENSION_COUNT))
    q_lora = int(k(Keys.Attention.Q_LORA_RANK, 0))
    n_group, used = int(k(Keys.LLM.EXPERT_GROUP_COUNT, 1)), int(k(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(k(Keys.Rope.FREQ_BASE))}
    if k(Keys.Rope.SCALING_TYPE, "none") == "yarn":
        mscale = float(k(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0)) / 0.1
        rope_parameters = {**rope_parameters, "rope_type": "yarn", "factor": float(k(Keys.Rope.SCALING_FACTOR)),
                           "original_max_position_embeddings": int(k(Keys.Rope.SCALING_ORIG_CTX_LEN)),
                           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}
    n_head = int(k(Keys.Attention.HEAD_COUNT))
    common = dict(
        vocab_size=vocab_size, hidden_size=int(k(Keys.LLM.EMBEDDING_LENGTH)),
        intermediate_size=int(k(Keys.LLM.FEED_FORWARD_LENGTH)), moe_intermediate_size=int(k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)),
        num_hidden_layers=int(k(Keys.LLM.BLOCK_COUNT)), num_attention_heads=n_head, num_key_value_heads=n_head,
        n_shared_experts=int(k(Keys.LLM.EXPERT_SHARED_COUNT, 0)), n_routed_experts=int(k(Keys.LLM.EXPERT_COUNT)),
        routed_scaling_factor=float(k(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)), kv_lora_rank=int(k(Keys.Attention.KV_LORA_RANK)),
        q_lora_rank=q_lora or None, qk_rope_head_dim=rope, v_head_dim=int(k(Keys.Attention.VALUE_LENGTH_MLA)),
        qk_nope_head_dim=int(k(Keys.Attention.KEY_LENGTH_MLA)) - rope, n_group=n_group, topk_group=used,
        num_experts_per_tok=int(k(Keys.LLM.EXPERT_USED_COUNT)),
        first_k_dense_replace=int(k(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
        norm_topk_prob=bool(k(Keys.LLM.EXPERT_WEIGHTS_NORM, False)), rms_norm_eps=float(k(Keys.Attention.LAYERNORM_RMS_EPS)),
        max_position_embeddings=int(k(Keys.LLM.CONTEXT_LENGTH)), rope_parameters=rope_parameters,
        tie_word_embeddings=False, attention_bias=False, dtype=torch.float32,
    )
    if v3:
        return DeepseekV3Config(**common, rope_interleave=True)
    return DeepseekV2Config(**common, topk_method="group_limited_greedy" if used < n_group else "greedy")


def load_hf_from_gguf(path: str | Path):
    """A float32, eager-attention transformers DeepSeek model holding the GGUF's weights (V3 where the
    file's gating is sigmoid, V2 otherwise)."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    reader = GGUFReader(str(path))
    tensors = read_tensors(reader)
    v3 = int(_key(reader, Keys.LLM.EXPERT_GATING_FUNC, 1)) == 2
    cfg = hf_config_from_gguf(reader, tensors["token_embd"].shape[0], v3=v3)
    cls = DeepseekV3ForCausalLM if v3 else DeepseekV2ForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    sd = state_dict(lambda name: torch.from_numpy(tensors[name]), tensors.__contains__, cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # non-persistent buffers: rebuild
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    return model.float().eval()


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """transformers' V3 returns the roped pairs de-interleaved (all first members, then all second);
    put them back in the file's interleaved order, in which llama.cpp and moesnap keep them."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


@torch.no_grad()
def hf_forward(model, tokens) -> dict[str, dict[int, np.ndarray] | np.ndarray]:
    """Run ``tokens``; every stage transformers exposes, by moesnap's names: per-layer ones as
    {layer: [T, ...]} (a dense layer has no router stages), ``logits`` ``[T, V]``.  ``k`` is
    ``[k_nope, k_pe]`` per head from ``kv_b_proj``'s output and the rope key of ``kv_a_proj_with_mqa``'s;
    ``q_rope``/``k_rope`` by wrapping the module's rope function (values passed through unchanged);
    ``topk_ids``/``topk_weights`` as the router returns them (unsorted: compare them as sets)."""
    cfg = model.config
    v3 = type(model).__name__.startswith("DeepseekV3")
    if v3:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod
        rope_name = "apply_rotary_pos_emb_interleave"
    else:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod  # type: ignore[no-redef]
        rope_name = "apply_rotary_emb"
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None, :]
    T, Hq, Dn, Dr = ids.shape[1], cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    cap: dict[str, dict[int, torch.Tensor]] = {}
    current = [0]

    def put(stage, x):
        cap.setdefault(stage, {})[current[0]] = x.detach().reshape(T, -1).clone()

    def out_hook(stage, pick=lambda o: o):
        return lambda mod_, args, out: put(stage, pick(out))

    def in_hook(stage):
        return lambda mod_, args: put(stage, args[0])

    hooks = []
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        hooks.append(layer.register_forward_pre_hook(lambda mod_, args, i=i: current.__setitem__(0, i)))
        hooks += [layer.input_layernorm.register_forward_hook(out_hook("attn_norm")),
                  a.kv_a_proj_with_mqa.register_forward_hook(out_hook("kv_latent")),
                  a.kv_a_layernorm.register_forward_hook(out_hook("kv_latent_norm")),
                  a.kv_b_proj.register_forward_hook(out_hook("kv_b")),
                  a.o_proj.register_forward_pre_hook(in_hook("attn")),
                  a.o_proj.register_forward_hook(out_hook("attn_out")),
                  layer.post_attention_layernorm.register_forward_pre_hook(in_hook("attn_resid")),
                  layer.post_attention_layernorm.register_forward_hook(out_hook("ffn_norm")),
                  layer.register_forward_hook(out_hook("layer_out", lambda o: o[0] if isinstance(o, tuple) else o))]
        if a.q_a_proj is not None:
            hooks += [a.q_a_proj.register_forward_hook(out_hook("q_latent")),
                      a.q_a_layernorm.register_forward_hook(out_hook("q_latent_norm")),
                      a.q_b_proj.register_forward_hook(out_hook("q"))]
        else:
            hooks.append(a.q_proj.register_forward_hook(out_hook("q")))
        if i < cfg.first_k_dense_replace:
            hooks.append(layer.mlp.register_forward_hook(out_hook("dense_ffn_out")))
        else:
            hooks += [layer.mlp.gate.register_forward_hook(out_hook("router_logits", lambda o: o[0])),
                      layer.mlp.gate.register_forward_hook(out_hook("topk_weights", lambda o: o[1])),
                      layer.mlp.gate.register_forward_hook(out_hook("topk_ids", lambda o: o[2])),
                      layer.mlp.shared_experts.register_forward_hook(out_hook("shared_expert_out")),
                      layer.mlp.register_forward_hook(out_hook("moe_out"))]
    real = getattr(mod, rope_name)

    def rope(q, k, *args, **kw):
        qr, kr = real(q, k, *args, **kw)                       # [1, H, T, Dr], [1, 1, T, Dr]
        put("q_pe", (_interleave(qr) if v3 else qr)[0].transpose(0, 1))
        put("k_pe", (_interleave(kr) if v3 else kr)[0].transpose(0, 1))
        return qr, kr

    try:
        with mock.patch.object(mod, rope_name, rope):
            logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"logits": logits.numpy()}
    for stage in ("attn_norm", "q_latent", "q_latent_norm", "kv_latent", "kv_latent_norm", "attn", "attn_out",
                  "attn_resid", "ffn_norm", "dense_ffn_out", "router_logits", "topk_weights", "topk_ids",
                  "shared_expert_out", "moe_out", "layer_out"):
        if stage in cap:
            out[stage] = {i: x.numpy() for i, x in cap[stage].items()}
    out["q"], out["k"], out["v"], out["q_rope"], out["k_rope"] = {}, {}, {}, {}, {}
    for i in cap["q"]:
        q = cap["q"][i].view(T, Hq, Dn + Dr)
        kv = cap["kv_b"][i].view(T, Hq, -1)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        k_pe = cap["kv_latent"][i][:, -Dr:][:, None, :].expand(T, Hq, Dr)
        out["q"][i], out["v"][i] = q.numpy(), v.numpy()
        out["k"][i] = torch.cat([k_nope, k_pe], -1).numpy()
        out["q_rope"][i] = torch.cat([q[..., :Dn], cap["q_pe"][i].view(T, Hq, Dr)], -1).numpy()
        out["k_rope"][i] = torch.cat([k_nope, cap["k_pe"][i].view(T, 1, Dr).expand(T, Hq, Dr)], -1).numpy()
    return out
