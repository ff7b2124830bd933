"""Model hyper-parameters, read from GGUF metadata: one config class for every MoE family.

Every value comes from a metadata key named by gguf-py's constants; a missing or invalid key is an
error naming the file and the key, never a default.  What a family fixes in its code rather than its
files (llama.cpp hard-codes it per architecture too) is the family's constant, kept in
:data:`FAMILIES`.

Fields (:class:`ModelConfig`); the shape fields have no default, the family fields default to
Qwen3-MoE's values, so a config built for Qwen3-MoE reads as before:

* ``n_layer``, ``hidden``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_expert``, ``n_expert_used``,
  ``expert_ff``, ``vocab_size``, ``rope_base``, ``rms_eps``, ``context_length``: the shapes and
  constants every family has.
* ``arch``: gguf-py's architecture name (``MODEL_ARCH_NAMES``): ``"qwen3moe"``, ``"gpt-oss"``.
* ``qk_norm``: per-head RMSNorm of q and k before RoPE (the ``q_norm``/``k_norm`` stages exist).
* ``attn_bias``: q/k/v/o projections carry biases.
* ``attn_sinks``: a learned per-head logit joins each softmax's denominator and is dropped after.
* ``sliding_window`` (0: none) and ``swa_pattern``: layer ``i`` attends to the last
  ``sliding_window`` positions only when ``swa_pattern`` and ``i % swa_pattern < swa_pattern - 1``
  (llama.cpp's ``set_swa_pattern``; gpt-oss: pattern 2, the even layers slide, as transformers'
  ``layer_types``).
* ``rope_scaling`` (``"none"``/``"yarn"``), ``rope_factor``, ``rope_orig_context``,
  ``rope_beta_fast``, ``rope_beta_slow``, ``rope_yarn_truncate``: YaRN's frequency blend and its
  attention factor ``0.1 ln(factor) + 1`` (transformers' ``_compute_yarn_parameters``); with
  ``rope_yarn_truncate`` the correction range is widened to whole dimensions (floor / ceil), as
  transformers does by default and llama.cpp always does; gpt-oss's config.json says ``truncate:
  false``, which the reference follows (llama.cpp then differs from it at every position > 0).
* ``router_bias``: the router adds a bias to its logits.
* ``expert_bias``: each expert's gate, up and down projections add a bias.
* ``gating``: ``"softmax_topk_renorm"`` (Qwen3: softmax over all experts, top-k, the k weights
  renormalised) or ``"topk_softmax"`` (gpt-oss: top-k of the logits, softmax over the k selected).
* ``ffn_act``: ``"swiglu"`` (``silu(gate) * up``) or ``"swiglu_oai"`` (gpt-oss: gate clamped above at
  ``swiglu_limit``, up clamped to ``±swiglu_limit``, ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys, RopeScalingType

from .tensors import Dims
from ..errors import ModelFileError
from ..gguf.reader import GGUFFile

QWEN3MOE = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]  # "qwen3moe"
GPT_OSS = MODEL_ARCH_NAMES[MODEL_ARCH.GPT_OSS]    # "gpt-oss"
ARCH = QWEN3MOE  # the first family; kept for the code written for it

GATINGS: tuple[str, ...] = ("softmax_topk_renorm", "topk_softmax")
FFN_ACTS: tuple[str, ...] = ("swiglu", "swiglu_oai")


@dataclass(frozen=True)
class ModelConfig:
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
    # -- what families vary by (defaults: Qwen3-MoE) ------------------------------------------
    arch: str = QWEN3MOE
    qk_norm: bool = True
    attn_bias: bool = False
    attn_sinks: bool = False
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_orig_context: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_yarn_truncate: bool = True
    router_bias: bool = False
    expert_bias: bool = False
    gating: str = "softmax_topk_renorm"
    ffn_act: str = "swiglu"
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.0

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

    def slides(self, layer: int) -> bool:
        """Layer ``layer`` attends to a sliding window of :attr:`sliding_window` positions."""
        return bool(self.sliding_window and self.swa_pattern and layer % self.swa_pattern < self.swa_pattern - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_gguf(cls, gf: GGUFFile) -> ModelConfig:
        arch = gf.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or arch not in FAMILIES:
            known = ", ".join(f"{a!r} ({f['name']})" for a, f in FAMILIES.items())
            raise ModelFileError(f"{gf.path}: architecture is {reprlib.repr(arch)}, moesnap supports {known}")
        return _from_gguf(gf, arch)


#: the fields every family has, before the family fields
SHAPE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelConfig))[:12]

#: the one config class of every family, under the name moesnap first gave it
Qwen3MoeConfig = ModelConfig


#: per family: its name in messages and the fields its files do not carry (llama.cpp fixes them in
#: its graph of the architecture too: ``llm_build_openai_moe_iswa`` calls ``ggml_swiglu_oai`` with
#: alpha 1.702 and limit 7.0 and ``set_swa_pattern(2)``)
FAMILIES: dict[str, dict[str, Any]] = {
    QWEN3MOE: {"name": "Qwen3-MoE", "fixed": {}},
    GPT_OSS: {"name": "gpt-oss", "fixed": {
        "qk_norm": False, "attn_bias": True, "attn_sinks": True, "swa_pattern": 2, "rope_yarn_truncate": False,
        "router_bias": True, "expert_bias": True, "gating": "topk_softmax", "ffn_act": "swiglu_oai",
        "swiglu_limit": 7.0, "swiglu_alpha": 1.702}},
}


def _from_gguf(gf: GGUFFile, arch: str) -> ModelConfig:
    def key(template: str) -> str:
        return template.format(arch=arch)

    def pos_int(template: str) -> int:
        k = key(template)
        v = gf.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(v)} must be a positive integer")
        return int(v)

    def pos_float(template: str, default: float | None = None) -> float:
        k = key(template)
        if default is not None and not gf.has(k):
            return default
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
    family: dict[str, Any] = dict(FAMILIES[arch]["fixed"])
    if arch == GPT_OSS:
        family["sliding_window"] = pos_int(Keys.Attention.SLIDING_WINDOW)
        family.update(_yarn(gf, key, pos_int, pos_float))
    return ModelConfig(
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
        arch=arch,
        **family,
    )


def _yarn(gf: GGUFFile, key, pos_int, pos_float) -> dict[str, Any]:
    """The YaRN keys a gpt-oss file carries (convert_hf_to_gguf writes type, factor and original
    context; beta_fast/beta_slow only where they differ from 32 and 1, which llama.cpp then assumes)."""
    k = key(Keys.Rope.SCALING_TYPE)
    kind = gf.get(k)
    if kind != RopeScalingType.YARN.value:
        raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(kind)} must be "
                             f"{RopeScalingType.YARN.value!r} for {FAMILIES[GPT_OSS]['name']}")
    return {"rope_scaling": "yarn", "rope_factor": pos_float(Keys.Rope.SCALING_FACTOR),
            "rope_orig_context": pos_int(Keys.Rope.SCALING_ORIG_CTX_LEN),
            "rope_beta_fast": pos_float(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0),
            "rope_beta_slow": pos_float(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)}
