"""A small, independent writer of random-weight Qwen3-MoE GGUF files.

It shares no code with ``moesnap.model.synth``: it writes straight through
``gguf.GGUFWriter`` with keys from gguf-py's constants, so the harnesses can
be checked against each other (transformers vs llama.cpp) on a file moesnap
did not write, and moesnap's loader can be checked on a file it did not write.
All tensors are F32 unless ``qtypes`` maps a tensor role (e.g.
``"ffn_down_exps"``) to a type gguf-py can quantize (Q8_0, Q4_0, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, Keys, MODEL_ARCH, MODEL_ARCH_NAMES, quants
from gguf.constants import TokenType

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]


@dataclass(frozen=True)
class GenSpec:
    n_layer: int = 2
    hidden: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    expert_ff: int = 64
    vocab_size: int = 300
    rope_base: float = 1e4
    rms_eps: float = 1e-6
    context_length: int = 256
    seed: int = 0
    qtypes: dict[str, GGMLQuantizationType] = field(default_factory=dict)

    def with_(self, **kw) -> "GenSpec":
        return replace(self, **kw)


def _vocab(n: int) -> tuple[list[str], list[int]]:
    """``<unk> <s> </s>``, the 256 byte tokens, then filler tokens up to ``n``."""
    if n < 259:
        raise ValueError(f"vocab_size={n} must be >= 259 (3 specials + 256 byte tokens)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"tok{i}" for i in range(len(tokens), n)]
    types += [TokenType.NORMAL] * (n - len(types))
    return tokens, [int(t) for t in types]


def write_gguf(path: str | Path, spec: GenSpec) -> Path:
    """Write a random-weight qwen3moe GGUF to ``path``; return the path."""
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    H, D, E, F, V = spec.hidden, spec.head_dim, spec.n_expert, spec.expert_ff, spec.vocab_size
    qd, kvd = spec.n_head * D, spec.n_head_kv * D

    def mat(*shape: int, fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((V, H)).astype(np.float32)}
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        tensors.update({
            p + "attn_norm.weight": norm(H),
            p + "attn_q.weight": mat(qd, H, fan_in=H),
            p + "attn_k.weight": mat(kvd, H, fan_in=H),
            p + "attn_v.weight": mat(kvd, H, fan_in=H),
            p + "attn_output.weight": mat(H, qd, fan_in=qd),
            p + "attn_q_norm.weight": norm(D),
            p + "attn_k_norm.weight": norm(D),
            p + "ffn_norm.weight": norm(H),
            # a wide router spread keeps top-k decisions far from ties
            p + "ffn_gate_inp.weight": mat(E, H, fan_in=H) * 4.0,
            p + "ffn_gate_exps.weight": mat(E, F, H, fan_in=H),
            p + "ffn_up_exps.weight": mat(E, F, H, fan_in=H),
            p + "ffn_down_exps.weight": mat(E, H, F, fan_in=F),
        })
    tensors["output_norm.weight"] = norm(H)
    tensors["output.weight"] = mat(V, H, fan_in=H)

    w = GGUFWriter(str(path), ARCH)
    a = lambda k: k.format(arch=ARCH)  # noqa: E731
    w.add_uint32(a(Keys.LLM.BLOCK_COUNT), spec.n_layer)
    w.add_uint32(a(Keys.LLM.CONTEXT_LENGTH), spec.context_length)
    w.add_uint32(a(Keys.LLM.EMBEDDING_LENGTH), H)
    w.add_uint32(a(Keys.LLM.FEED_FORWARD_LENGTH), F * spec.n_expert_used)
    w.add_uint32(a(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), F)
    w.add_uint32(a(Keys.LLM.EXPERT_COUNT), E)
    w.add_uint32(a(Keys.LLM.EXPERT_USED_COUNT), spec.n_expert_used)
    w.add_uint32(a(Keys.Attention.HEAD_COUNT), spec.n_head)
    w.add_uint32(a(Keys.Attention.HEAD_COUNT_KV), spec.n_head_kv)
    w.add_uint32(a(Keys.Attention.KEY_LENGTH), D)
    w.add_uint32(a(Keys.Attention.VALUE_LENGTH), D)
    w.add_float32(a(Keys.Attention.LAYERNORM_RMS_EPS), spec.rms_eps)
    w.add_float32(a(Keys.Rope.FREQ_BASE), spec.rope_base)
    w.add_uint32(Keys.General.FILE_TYPE, 0)
    tokens, types = _vocab(V)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * V)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, arr in tensors.items():
        role = name.split(".")[-2]
        qt = spec.qtypes.get(role, GGMLQuantizationType.F32)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
