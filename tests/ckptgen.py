"""Write HF-style Qwen3-MoE checkpoints for tests, without transformers or safetensors installed.

The safetensors format is written here byte by byte (8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}``, then the data), so tests can also write broken
ones.  Weights come from a GGUF through moesnap's loader (dequantized), named as transformers'
``save_pretrained`` names them (experts one by one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moesnap.model.weights import GGUFModel

HF_NAMES = {
    "attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
    "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
    "ffn_norm": "post_attention_layernorm.weight", "ffn_gate_inp": "mlp.gate.weight",
}
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def hf_config(model: GGUFModel) -> dict:
    c = model.config
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": c.hidden,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head_kv,
            "head_dim": c.head_dim, "num_experts": c.n_expert, "num_experts_per_tok": c.n_expert_used,
            "moe_intermediate_size": c.expert_ff, "intermediate_size": c.expert_ff * c.n_expert_used,
            "vocab_size": c.vocab_size, "rope_theta": c.rope_base, "rms_norm_eps": c.rms_eps,
            "max_position_embeddings": c.context_length, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "tie_word_embeddings": False}


def hf_tensors(model: GGUFModel) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.dense("token_embd"), "model.norm.weight": model.dense("output_norm"),
           "lm_head.weight": model.dense("output")}
    for i in range(model.config.n_layer):
        for ours, theirs in HF_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = model.dense(f"blk.{i}.{ours}")
        for ours, theirs in EXPERTS.items():
            stacked = model.dense(f"blk.{i}.{ours}")
            for e in range(stacked.shape[0]):
                out[f"model.layers.{i}.mlp.experts.{e}.{theirs}.weight"] = stacked[e]
    return out


def _bytes(t: torch.Tensor, dtype: str) -> bytes:
    if dtype == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy().astype("<u2").tobytes()
    if dtype == "F16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    return t.to(torch.float32).numpy().astype("<f4").tobytes()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtype: str = "F32") -> Path:
    header, blobs, pos = {}, [], 0
    for name, t in tensors.items():
        b = _bytes(t, dtype)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    return path


def write_checkpoint(out: Path, model: GGUFModel, *, dtype: str = "F32", shards: int = 1) -> Path:
    """A checkpoint directory holding ``model``'s weights: one file, or ``shards`` files with an index."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf_config(model)))
    tensors = hf_tensors(model)
    if shards == 1:
        write_safetensors(out / "model.safetensors", tensors, dtype)
        return out
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / fname, {n: tensors[n] for n in part}, dtype)
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def as_array(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()
