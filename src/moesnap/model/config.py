"""Qwen3-MoE hyper-parameters, read from GGUF metadata only.

Every value comes from a metadata key named by gguf-py's constants; a missing
or invalid key is an error naming the file and the key, never a default.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

from .tensors import Dims
from ..errors import ModelFileError
from ..gguf.reader import GGUFFile

ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]  # "qwen3moe"


@dataclass(frozen=True)
class Qwen3MoeConfig:
    n_layer: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    vocab_size: int
    rope_base: float
    rms_eps: float
    context_length: int

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def dims(self) -> Dims:
        """What tensor shapes depend on (:mod:`moesnap.model.tensors`)."""
        return Dims(self.hidden, self.q_dim, self.kv_dim, self.head_dim, self.n_expert, self.expert_ff,
                    self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> Qwen3MoeConfig:
        arch = gf.get(Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise ModelFileError(
                f"{gf.path}: architecture is {reprlib.repr(arch)}, moesnap supports {ARCH!r} (Qwen3-MoE)"
            )

        def key(template: str) -> str:
            return template.format(arch=ARCH)

        def pos_int(template: str) -> int:
            k = key(template)
            v = gf.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(v)} must be a positive integer")
            return int(v)

        def pos_float(template: str) -> float:
            k = key(template)
            v = gf.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(v)} must be a positive finite number")
            return float(v)

        n_head = pos_int(Keys.Attention.HEAD_COUNT)
        n_head_kv = pos_int(Keys.Attention.HEAD_COUNT_KV)
        key_len = pos_int(Keys.Attention.KEY_LENGTH)
        val_len = pos_int(Keys.Attention.VALUE_LENGTH)
        n_expert = pos_int(Keys.LLM.EXPERT_COUNT)
        n_used = pos_int(Keys.LLM.EXPERT_USED_COUNT)
        if n_head % n_head_kv:
            raise ModelFileError(
                f"{gf.path}: {key(Keys.Attention.HEAD_COUNT)!r} = {n_head} is not a multiple of "
                f"{key(Keys.Attention.HEAD_COUNT_KV)!r} = {n_head_kv}"
            )
        if key_len != val_len:
            raise ModelFileError(
                f"{gf.path}: {key(Keys.Attention.KEY_LENGTH)!r} = {key_len} differs from "
                f"{key(Keys.Attention.VALUE_LENGTH)!r} = {val_len}"
            )
        if key_len % 2:
            raise ModelFileError(f"{gf.path}: {key(Keys.Attention.KEY_LENGTH)!r} = {key_len} must be even for RoPE")
        if n_used > n_expert:
            raise ModelFileError(
                f"{gf.path}: {key(Keys.LLM.EXPERT_USED_COUNT)!r} = {n_used} exceeds "
                f"{key(Keys.LLM.EXPERT_COUNT)!r} = {n_expert}"
            )
        embd = gf.tensor("token_embd")
        if len(embd.shape) != 2:
            raise ModelFileError(f"{gf.path}: tensor 'token_embd' has {len(embd.shape)} dimensions, expected 2")
        vocab = int(embd.shape[1])  # ggml order: [H, V]
        return cls(
            n_layer=pos_int(Keys.LLM.BLOCK_COUNT),
            hidden=pos_int(Keys.LLM.EMBEDDING_LENGTH),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=key_len,
            n_expert=n_expert,
            n_expert_used=n_used,
            expert_ff=pos_int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
            vocab_size=vocab,
            rope_base=pos_float(Keys.Rope.FREQ_BASE),
            rms_eps=pos_float(Keys.Attention.LAYERNORM_RMS_EPS),
            context_length=pos_int(Keys.LLM.CONTEXT_LENGTH),
        )
