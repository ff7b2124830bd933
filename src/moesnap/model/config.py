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
* ``qk_norm``: RMSNorm of q and k before RoPE (the ``q_norm``/``k_norm`` stages exist): per head,
  over ``head_dim`` (Qwen3-MoE), or with ``qk_norm_whole`` over the whole projection, every head at
  once (OLMoE: ``attn_q_norm`` has ``n_head * head_dim`` weights).
* ``attn_bias``: the attention projections carry biases (gpt-oss: q/k/v/o; Qwen2-MoE: q/k/v; the
  tensor table says which).
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
* ``gating``: ``"softmax_topk_renorm"`` (Qwen3, Mixtral: softmax over all experts, top-k, the k
  weights renormalised), ``"softmax_topk"`` (Qwen2-MoE, OLMoE: the same without renormalising, their
  ``norm_topk_prob: false``, which llama.cpp hard-codes for both) or ``"topk_softmax"`` (gpt-oss: top-k of the logits, softmax over the k selected).
* ``ffn_act``: ``"swiglu"`` (``silu(gate) * up``) or ``"swiglu_oai"`` (gpt-oss: gate clamped above at
  ``swiglu_limit``, up clamped to ``±swiglu_limit``, ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``).

DeepSeek-V2/V3 (gguf-py's ``deepseek2``, which llama.cpp uses for both):

* multi-head latent attention: ``kv_lora_rank`` (0: none; the other families) is the width of the
  compressed kv, ``q_lora_rank`` that of the compressed q (0: q is one projection, as V2-Lite),
  ``qk_rope_dim`` the decoupled RoPE part of each q/k head (``head_dim`` is ``qk_nope + qk_rope``,
  the key length llama.cpp calls ``key_length_mla``), ``v_head_dim`` the value head width.  The
  file says ``head_count_kv = 1`` (llama.cpp runs MLA as MQA over the latent); after ``kv_b`` every
  head has its own k and v, so ``n_head_kv`` is ``n_head`` here, as in transformers.
  ``kv_b_split``: the file stores ``kv_b`` as ``attn_k_b`` (transposed) and ``attn_v_b``, as
  recent converters write it, rather than one ``attn_kv_b``.
* ``rope_interleaved``: RoPE rotates the pairs ``(x0, x1), (x2, x3), …`` (llama.cpp's ``NORM`` mode,
  DeepSeek's own layout, transformers' ``rope_interleave``; the converter leaves the weights as they
  are) instead of NeoX's halves; the roped values keep their interleaved layout.
* ``n_dense_layers`` leading layers run a dense SwiGLU MLP of width ``dense_ff`` instead of the MoE
  (``leading_dense_block_count``); they have no router stages.
* ``n_shared_experts``: a SwiGLU of width ``n_shared_experts * expert_ff`` every token goes through,
  added to the routed mixture.
* ``gating`` ``"softmax_grouped"`` (V2: softmax over every expert, groups scored by their best
  expert — transformers' ``group_limited_greedy`` —, top-k of the probabilities) or
  ``"sigmoid_grouped"`` (V3 ``noaux_tc``: sigmoid scores; the correction bias ``exp_probs_b``
  added for the selection only, groups scored by the sum of their two best biased scores, top-k
  of the biased scores, weights the unbiased scores); ``n_group`` groups of which ``n_group_used``
  are kept (1 and 1: no groups); ``topk_norm``: the k weights renormalised
  (``expert_weights_norm``), then times ``routed_scale`` (``expert_weights_scale``,
  transformers' ``routed_scaling_factor``); ``router_probs_bias``: the file has ``exp_probs_b``.
* ``yarn_log_mul`` (DeepSeek's YaRN, ``rope.scaling.yarn_log_multiplier`` = 0.1 ``mscale_all_dim``):
  the softmax scale is multiplied by ``(1 + yarn_log_mul ln factor)^2`` and cos/sin by
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (transformers); GGUF carries no
  ``mscale``, and every DeepSeek release has ``mscale == mscale_all_dim``, so that factor is 1, as
  llama.cpp takes it.  DeepSeek's config has no ``truncate``: transformers truncates, as llama.cpp.

Qwen2-MoE (``qwen2moe``): q/k/v biases, no q/k norm, ``softmax_topk`` gating and one shared expert
of width ``shared_expert_ff`` (``expert_shared_feed_forward_length``) whose output is scaled per token
by ``sigmoid(ffn_gate_inp_shexp · x)`` (``shared_expert_gate``) before it joins the routed mixture.

Mixtral (``llama`` with ``ffn_*_exps``): no q/k norm, no biases, ``softmax_topk_renorm``; the experts'
width is ``feed_forward_length`` (llama.cpp reads no expert key for ``llama``).  RoPE is
``rope_interleaved``: convert_hf_to_gguf permutes the rows of ``q_proj``/``k_proj`` of every ``llama``
model back to Meta's layout, in which llama.cpp turns adjacent pairs (its ``NORM`` mode); transformers
turns halves (NeoX) of the un-permuted rows.  The two agree on every attention score (the same
permutation of each head's dimensions on q and k), so the reference turns pairs of the file's rows,
and its ``q``/``k``/``q_rope``/``k_rope`` are in the file's row order (llama.cpp's), which
transformers' equal after the converter's permutation.

OLMoE (``olmoe``): q/k RMSNorm over the whole projection (``qk_norm_whole``), ``softmax_topk`` gating;
the experts' width is ``feed_forward_length``, as for ``llama``.

These three files carry ``attention.key_length`` only where the checkpoint's config.json names a
``head_dim``; without it a head is ``embedding_length / head_count`` wide (llama.cpp's rule).
``rope.dimension_count``, where present, must be the head width (no partial RoPE), and a file with
RoPE scaling is refused.

Keys a DeepSeek file may leave out mean what llama.cpp's loader makes of them: no ``q_lora_rank``:
no q LoRA; no ``expert_gating_func``: softmax (files older than V3); no ``expert_weights_norm``:
false, no ``expert_weights_scale``: 1; no group keys: no groups (the converter writes these only
where the checkpoint sets them).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, ExpertGatingFuncType, Keys, RopeScalingType

from .tensors import Dims
from ..errors import ModelFileError
from ..gguf.reader import GGUFFile

QWEN3MOE = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]  # "qwen3moe"
GPT_OSS = MODEL_ARCH_NAMES[MODEL_ARCH.GPT_OSS]    # "gpt-oss"
DEEPSEEK2 = MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]  # "deepseek2": DeepSeek-V2 and V3
QWEN2MOE = MODEL_ARCH_NAMES[MODEL_ARCH.QWEN2MOE]    # "qwen2moe": Qwen1.5-MoE, Qwen2-MoE
LLAMA = MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA]          # "llama": Mixtral (a llama file with experts)
OLMOE = MODEL_ARCH_NAMES[MODEL_ARCH.OLMOE]          # "olmoe"
ARCH = QWEN3MOE  # the first family; kept for the code written for it

GATINGS: tuple[str, ...] = ("softmax_topk_renorm", "softmax_topk", "topk_softmax", "softmax_grouped", "sigmoid_grouped")
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
    # -- DeepSeek-V2/V3 ----------------------------------------------------------------------
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    kv_b_split: bool = False
    rope_interleaved: bool = False
    n_dense_layers: int = 0
    dense_ff: int = 0
    n_shared_experts: int = 0
    n_group: int = 1
    n_group_used: int = 1
    topk_norm: bool = False
    routed_scale: float = 1.0
    router_probs_bias: bool = False
    yarn_log_mul: float = 0.0
    # -- Qwen2-MoE, OLMoE ----------------------------------------------------------------------
    shared_expert_ff: int = 0          # the shared experts' width; 0: n_shared_experts * expert_ff
    shared_expert_gate: bool = False   # the shared expert's output times sigmoid(ffn_gate_inp_shexp · x)
    qk_norm_whole: bool = False        # q/k RMSNorm over the whole projection, not per head

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek): q/kv compressed, the RoPE part decoupled."""
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """How many dimensions of a head RoPE turns: the decoupled part under MLA, else the whole head."""
        return self.qk_rope_dim if self.mla else self.head_dim

    @property
    def qk_nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def v_dim(self) -> int:
        """One head's value width (MLA: ``v_head_dim``; otherwise ``head_dim``)."""
        return self.v_head_dim if self.mla else self.head_dim

    def layer_where(self, layer: int) -> frozenset[str]:
        """Which conditional tensor kinds layer ``layer`` holds (:data:`moesnap.model.tensors.WHEN`)."""
        if not self.mla:
            return frozenset()
        where = {"q_lora" if self.q_lora_rank else "no_q_lora", "kv_split" if self.kv_b_split else "kv_b",
                 "dense" if self.dense(layer) else "moe"}
        if self.router_probs_bias and not self.dense(layer):
            where.add("probs_bias")
        return frozenset(where)

    def dense(self, layer: int) -> bool:
        """Layer ``layer`` runs a dense MLP, not the MoE (DeepSeek's leading dense layers)."""
        return layer < self.n_dense_layers

    @property
    def dims(self) -> Dims:
        """What tensor shapes depend on (:mod:`moesnap.model.tensors`)."""
        return Dims(self.hidden, self.q_dim, self.kv_dim, self.head_dim, self.n_expert, self.expert_ff,
                    self.vocab_size, n_head=self.n_head, o_dim=self.n_head * self.v_dim,
                    q_lora=self.q_lora_rank, kv_lora=self.kv_lora_rank, rope_dim=self.rope_dim,
                    v_dim=self.v_dim, dense_ff=self.dense_ff,
                    shexp_ff=self.shared_expert_ff or self.n_shared_experts * self.expert_ff,
                    qk_norm_whole=self.qk_norm_whole)

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
    DEEPSEEK2: {"name": "DeepSeek-V2/V3", "fixed": {"qk_norm": False, "rope_interleaved": True}},
    QWEN2MOE: {"name": "Qwen2-MoE", "fixed": {
        "qk_norm": False, "attn_bias": True, "gating": "softmax_topk", "n_shared_experts": 1,
        "shared_expert_gate": True}},
    LLAMA: {"name": "Mixtral", "fixed": {"qk_norm": False, "rope_interleaved": True}},
    OLMOE: {"name": "OLMoE", "fixed": {"qk_norm_whole": True, "gating": "softmax_topk"}},
}
#: the families whose files give a head's width by ``key_length`` only where it is not
#: ``embedding_length / head_count`` and whose experts' width may be ``feed_forward_length``
_LLAMA_LIKE = (QWEN2MOE, LLAMA, OLMOE)


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

    if arch == LLAMA and not gf.has(key(Keys.LLM.EXPERT_COUNT)):
        raise ModelFileError(f"{gf.path}: a 'llama' file without {key(Keys.LLM.EXPERT_COUNT)!r} is a dense model; "
                             f"moesnap reads MoE models (Mixtral: llama with experts)")
    n_head = pos_int(Keys.Attention.HEAD_COUNT)
    n_head_kv = pos_int(Keys.Attention.HEAD_COUNT_KV)
    if arch in _LLAMA_LIKE:
        key_len, val_len = _llama_like_head(gf, key, pos_int, n_head)
    else:
        key_len = pos_int(Keys.Attention.KEY_LENGTH)
        val_len = pos_int(Keys.Attention.VALUE_LENGTH)
    n_expert = pos_int(Keys.LLM.EXPERT_COUNT)
    n_used = pos_int(Keys.LLM.EXPERT_USED_COUNT)
    if n_head % n_head_kv:
        raise ModelFileError(
            f"{gf.path}: {key(Keys.Attention.HEAD_COUNT)!r} = {n_head} is not a multiple of "
            f"{key(Keys.Attention.HEAD_COUNT_KV)!r} = {n_head_kv}"
        )
    if arch == DEEPSEEK2:
        return _deepseek2(gf, key, pos_int, pos_float)
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
        family.update(_yarn(gf, key, pos_int, pos_float, arch))
    expert_ff = _llama_like_ffn(gf, key, pos_int, n_used, family) if arch in _LLAMA_LIKE \
        else pos_int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    return ModelConfig(
        n_layer=pos_int(Keys.LLM.BLOCK_COUNT),
        hidden=pos_int(Keys.LLM.EMBEDDING_LENGTH),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=key_len,
        n_expert=n_expert,
        n_expert_used=n_used,
        expert_ff=expert_ff,
        vocab_size=vocab,
        rope_base=pos_float(Keys.Rope.FREQ_BASE),
        rms_eps=pos_float(Keys.Attention.LAYERNORM_RMS_EPS),
        context_length=pos_int(Keys.LLM.CONTEXT_LENGTH),
        arch=arch,
        **family,
    )


def _llama_like_head(gf: GGUFFile, key, pos_int, n_head: int) -> tuple[int, int]:
    """A head's key and value widths in a Qwen2-MoE, Mixtral or OLMoE file: ``key_length`` /
    ``value_length`` where the file has them, else ``embedding_length / head_count``; refuses RoPE
    scaling and partial RoPE, which none of these models has and the reference does not compute."""
    hidden = pos_int(Keys.LLM.EMBEDDING_LENGTH)
    if gf.has(key(Keys.Attention.KEY_LENGTH)):
        key_len = pos_int(Keys.Attention.KEY_LENGTH)
        val_len = pos_int(Keys.Attention.VALUE_LENGTH) if gf.has(key(Keys.Attention.VALUE_LENGTH)) else key_len
    elif hidden % n_head:
        raise ModelFileError(f"{gf.path}: no metadata key {key(Keys.Attention.KEY_LENGTH)!r}, and "
                             f"{key(Keys.LLM.EMBEDDING_LENGTH)!r} = {hidden} is not a multiple of "
                             f"{key(Keys.Attention.HEAD_COUNT)!r} = {n_head}")
    else:
        key_len = val_len = hidden // n_head
    rope_k = key(Keys.Rope.DIMENSION_COUNT)
    if gf.has(rope_k) and gf.get(rope_k) != key_len:
        raise ModelFileError(f"{gf.path}: metadata key {rope_k!r} = {reprlib.repr(gf.get(rope_k))} differs from the "
                             f"head width {key_len}: partial RoPE is not supported")
    scaling_k = key(Keys.Rope.SCALING_TYPE)
    if gf.has(scaling_k) and gf.get(scaling_k) != "none":
        raise ModelFileError(f"{gf.path}: metadata key {scaling_k!r} = {reprlib.repr(gf.get(scaling_k))}: RoPE "
                             f"scaling is not supported for {FAMILIES[gf.get(Keys.General.ARCHITECTURE)]['name']}")
    return key_len, val_len


def _llama_like_ffn(gf: GGUFFile, key, pos_int, n_used: int, family: dict[str, Any]) -> int:
    """The experts' width (and Qwen2-MoE's shared expert's, into ``family``), as llama.cpp reads them:
    Mixtral and OLMoE ``feed_forward_length``; Qwen2-MoE ``expert_feed_forward_length`` (without it
    ``feed_forward_length / expert_used_count``) and ``expert_shared_feed_forward_length`` (without it
    ``feed_forward_length``)."""
    arch = gf.get(Keys.General.ARCHITECTURE)
    if arch != QWEN2MOE:
        if arch == LLAMA and "blk.0.ffn_gate.0.weight" in gf.tensors:
            raise ModelFileError(f"{gf.path}: experts stored one tensor each ('blk.0.ffn_gate.0.weight', an old "
                                 f"Mixtral conversion); moesnap reads the merged 'ffn_gate_exps' of current files")
        return pos_int(Keys.LLM.FEED_FORWARD_LENGTH)
    has = lambda t: gf.has(key(t))  # noqa: E731
    ff = pos_int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) if has(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) \
        else pos_int(Keys.LLM.FEED_FORWARD_LENGTH) // n_used
    family["shared_expert_ff"] = pos_int(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH) \
        if has(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH) else pos_int(Keys.LLM.FEED_FORWARD_LENGTH)
    if ff < 1:
        raise ModelFileError(f"{gf.path}: the experts' width {ff} (feed_forward_length / expert_used_count) must be ≥ 1")
    return ff


def _yarn(gf: GGUFFile, key, pos_int, pos_float, arch: str) -> dict[str, Any]:
    """The YaRN keys a gpt-oss (or DeepSeek) file carries (convert_hf_to_gguf writes type, factor and original
    context; beta_fast/beta_slow only where they differ from 32 and 1, which llama.cpp then assumes)."""
    k = key(Keys.Rope.SCALING_TYPE)
    kind = gf.get(k)
    if kind != RopeScalingType.YARN.value:
        raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(kind)} must be "
                             f"{RopeScalingType.YARN.value!r} for {FAMILIES[arch]['name']}")
    return {"rope_scaling": "yarn", "rope_factor": pos_float(Keys.Rope.SCALING_FACTOR),
            "rope_orig_context": pos_int(Keys.Rope.SCALING_ORIG_CTX_LEN),
            "rope_beta_fast": pos_float(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0),
            "rope_beta_slow": pos_float(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)}


def _deepseek2(gf: GGUFFile, key, pos_int, pos_float) -> ModelConfig:
    """A DeepSeek-V2/V3 file's config (the keys convert_hf_to_gguf's ``DeepseekV2Model`` writes)."""
    def count(template: str, default: int | None = None) -> int:
        k = key(template)
        if default is not None and not gf.has(k):
            return default
        v = gf.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ModelFileError(f"{gf.path}: metadata key {k!r} = {reprlib.repr(v)} must be an integer ≥ 0")
        return int(v)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ModelFileError(f"{gf.path}: {msg}")

    n_layer, n_head = pos_int(Keys.LLM.BLOCK_COUNT), pos_int(Keys.Attention.HEAD_COUNT)
    n_expert, n_used = pos_int(Keys.LLM.EXPERT_COUNT), pos_int(Keys.LLM.EXPERT_USED_COUNT)
    kv_lora, rope = pos_int(Keys.Attention.KV_LORA_RANK), pos_int(Keys.Rope.DIMENSION_COUNT)
    head = pos_int(Keys.Attention.KEY_LENGTH_MLA)
    need(head > rope and rope % 2 == 0, f"{key(Keys.Attention.KEY_LENGTH_MLA)!r} = {head} must exceed "
         f"{key(Keys.Rope.DIMENSION_COUNT)!r} = {rope}, which must be even")
    for k, want in ((Keys.Attention.KEY_LENGTH, kv_lora + rope), (Keys.Attention.VALUE_LENGTH, kv_lora)):
        need(pos_int(k) == want, f"{key(k)!r} = {gf.get(key(k))} must be kv_lora_rank + rope dims / kv_lora_rank "
             f"= {want} (the MQA view of MLA)")
    need(n_used <= n_expert, f"{key(Keys.LLM.EXPERT_USED_COUNT)!r} = {n_used} exceeds "
         f"{key(Keys.LLM.EXPERT_COUNT)!r} = {n_expert}")
    n_dense = count(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)
    need(n_dense <= n_layer, f"{key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)!r} = {n_dense} exceeds "
         f"{key(Keys.LLM.BLOCK_COUNT)!r} = {n_layer}")
    gating_key = key(Keys.LLM.EXPERT_GATING_FUNC)
    gating = gf.get(gating_key) if gf.has(gating_key) else int(ExpertGatingFuncType.SOFTMAX)
    need(gating in (int(ExpertGatingFuncType.SOFTMAX), int(ExpertGatingFuncType.SIGMOID)),
         f"metadata key {gating_key!r} = {reprlib.repr(gating)} must be 1 (softmax) or 2 (sigmoid)")
    n_group, n_group_used = count(Keys.LLM.EXPERT_GROUP_COUNT, 1) or 1, count(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1) or 1
    need(n_expert % n_group == 0 and n_group_used <= n_group and n_group_used * (n_expert // n_group) >= n_used,
         f"{key(Keys.LLM.EXPERT_GROUP_COUNT)!r} = {n_group} and {key(Keys.LLM.EXPERT_GROUP_USED_COUNT)!r} = "
         f"{n_group_used} must split {n_expert} experts evenly and keep at least {n_used} of them")
    norm_key = key(Keys.LLM.EXPERT_WEIGHTS_NORM)
    norm = gf.get(norm_key) if gf.has(norm_key) else False
    need(isinstance(norm, bool), f"metadata key {norm_key!r} = {reprlib.repr(norm)} must be a boolean")
    has_bias = "blk.%d.exp_probs_b.bias" % max(n_dense, 0) in gf.tensors
    need(not has_bias or gating == int(ExpertGatingFuncType.SIGMOID),
         f"tensor 'blk.{n_dense}.exp_probs_b.bias' (the score-correction bias) needs sigmoid gating")
    family: dict[str, Any] = dict(FAMILIES[DEEPSEEK2]["fixed"])
    if gf.has(key(Keys.Rope.SCALING_TYPE)) and gf.get(key(Keys.Rope.SCALING_TYPE)) != "none":
        family.update(_yarn(gf, key, pos_int, pos_float, DEEPSEEK2))
        family["yarn_log_mul"] = pos_float(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0) if gf.has(
            key(Keys.Rope.SCALING_YARN_LOG_MUL)) else 0.0
    embd = gf.tensor("token_embd")
    return ModelConfig(
        n_layer=n_layer, hidden=pos_int(Keys.LLM.EMBEDDING_LENGTH), n_head=n_head, n_head_kv=n_head,
        head_dim=head, n_expert=n_expert, n_expert_used=n_used, expert_ff=pos_int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH),
        vocab_size=int(embd.shape[1]), rope_base=pos_float(Keys.Rope.FREQ_BASE),
        rms_eps=pos_float(Keys.Attention.LAYERNORM_RMS_EPS), context_length=pos_int(Keys.LLM.CONTEXT_LENGTH),
        arch=DEEPSEEK2, q_lora_rank=count(Keys.Attention.Q_LORA_RANK, 0), kv_lora_rank=kv_lora, qk_rope_dim=rope,
        v_head_dim=pos_int(Keys.Attention.VALUE_LENGTH_MLA), kv_b_split="blk.0.attn_kv_b.weight" not in gf.tensors,
        n_dense_layers=n_dense, dense_ff=pos_int(Keys.LLM.FEED_FORWARD_LENGTH) if n_dense else 0,
        n_shared_experts=count(Keys.LLM.EXPERT_SHARED_COUNT, 0),
        gating="sigmoid_grouped" if gating == int(ExpertGatingFuncType.SIGMOID) else "softmax_grouped",
        n_group=n_group, n_group_used=n_group_used, topk_norm=norm,
        routed_scale=pos_float(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0), router_probs_bias=has_bias,
        **family,
    )
