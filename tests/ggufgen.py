"""Write small all-F32 qwen3moe GGUFs with controlled defects, for error-path tests."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np


def write_gguf(path: Path, *, arch: str = "qwen3moe", drop_keys: tuple[str, ...] = (),
               override_keys: dict | None = None, bad_shape: str | None = None, n_layer: int = 2,
               hidden: int = 32, n_head: int = 4, n_head_kv: int = 2, head_dim: int = 8, n_expert: int = 4,
               n_used: int = 2, expert_ff: int = 16, vocab: int = 270, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        f"{arch}.block_count": (n_layer, "u32"), f"{arch}.context_length": (512, "u32"),
        f"{arch}.embedding_length": (hidden, "u32"), f"{arch}.feed_forward_length": (64, "u32"),
        f"{arch}.expert_feed_forward_length": (expert_ff, "u32"), f"{arch}.expert_count": (n_expert, "u32"),
        f"{arch}.expert_used_count": (n_used, "u32"), f"{arch}.attention.head_count": (n_head, "u32"),
        f"{arch}.attention.head_count_kv": (n_head_kv, "u32"), f"{arch}.attention.key_length": (head_dim, "u32"),
        f"{arch}.attention.value_length": (head_dim, "u32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, "f32"), f"{arch}.rope.freq_base": (1e6, "f32"),
    }
    for k, v in (override_keys or {}).items():
        keys[k] = v
    for k, (v, kind) in keys.items():
        if k in drop_keys:
            continue
        {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "i32": w.add_int32}[kind](k, v)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                     + [f"t{i}" for i in range(vocab - 259)])

    def t(*s, sc=None):
        return (rng.standard_normal(s) * (sc or 1 / np.sqrt(s[-1]))).astype(np.float32)

    H, D, E, F = hidden, head_dim, n_expert, expert_ff
    tensors = {"token_embd": t(vocab, H, sc=1), "output_norm": 1 + t(H, sc=.1), "output": t(vocab, H)}
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors.update({
            p + "attn_norm": 1 + t(H, sc=.1), p + "attn_q": t(n_head * D, H), p + "attn_k": t(n_head_kv * D, H),
            p + "attn_v": t(n_head_kv * D, H), p + "attn_output": t(H, n_head * D),
            p + "attn_q_norm": 1 + t(D, sc=.1), p + "attn_k_norm": 1 + t(D, sc=.1), p + "ffn_norm": 1 + t(H, sc=.1),
            p + "ffn_gate_inp": t(E, H, sc=.5), p + "ffn_gate_exps": t(E, F, H), p + "ffn_up_exps": t(E, F, H),
            p + "ffn_down_exps": t(E, H, F),
        })
    if bad_shape:
        a = tensors[bad_shape]
        tensors[bad_shape] = np.zeros((*a.shape[:-1], a.shape[-1] + 1), np.float32)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def absurd_header(path: Path, *, n_tensors: int = 0, n_kv: int = 0, array_len: int | None = None,
                  dim: int | None = None) -> Path:
    """A GGUF header whose counts or sizes are absurd (2^60 tensors, a 2^40 dimension...)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv))
    if array_len is not None:  # one KV: an array of uint8 claiming array_len items
        key = b"general.junk"
        out += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, array_len)
    if dim is not None:  # one tensor info with a huge dimension
        name = b"token_embd"
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 32, dim)
        out += struct.pack("<IQ", 0, 0)
    out += b"\0" * 64
    path.write_bytes(bytes(out))
    return path
