"""Synthetic Qwen2-MoE, Mixtral and OLMoE files: their presets, their metadata as convert_hf_to_gguf
writes it, and what a spec of theirs must satisfy (:mod:`moesnap.model.synth` writes the tensors).

What the converter writes for these three (and what the writer below therefore writes):

* ``feed_forward_length``: Qwen2-MoE the checkpoint's ``intermediate_size`` (the spec's ``dense_ff``,
  which no layer uses), Mixtral and OLMoE the experts' width (llama.cpp reads their experts by it);
* Qwen2-MoE only: ``expert_feed_forward_length`` and ``expert_shared_feed_forward_length``;
* ``attention.key_length`` / ``value_length`` only where a head is not ``hidden / n_head`` wide
  (config.json names a ``head_dim`` then); Mixtral (``llama``) also ``rope.dimension_count`` and
  ``vocab_size``.

Quant mixes of the full-shape presets follow llama.cpp's Q4_K_M rule as we read it (not a copy of a
published file): Q4_K almost everywhere, Q6_K for ``output``, ``attn_v`` and half of the down
projections (the other half Q4_K: the spec's ``down_exps_alternate``); a K-quant whose rows are no
multiple of 256 falls back (Q4_K -> Q5_0, Q6_K -> Q8_0: Qwen1.5-MoE's experts' down projections,
rows of 1408); a model of exactly 8 experts (Mixtral) gets Q8_0 for ``attn_k`` and ``attn_v``.
"""

from __future__ import annotations

from typing import Any, Callable

from gguf import GGMLQuantizationType, GGUFWriter

from .config import FAMILIES, LLAMA, OLMOE, QWEN2MOE, ModelConfig
from .tensors import table

QT = GGMLQuantizationType
#: the families this module writes
LLAMA_LIKE: tuple[str, ...] = (QWEN2MOE, LLAMA, OLMOE)


def add_metadata(w: GGUFWriter, spec: Any) -> None:
    """The shape keys of a Qwen2-MoE, Mixtral or OLMoE file (module docstring), after the embedding length."""
    c: ModelConfig = spec.config
    w.add_feed_forward_length(spec.dense_ff if c.arch == QWEN2MOE else c.expert_ff)
    if c.arch == QWEN2MOE:
        w.add_expert_feed_forward_length(c.expert_ff)
        w.add_expert_shared_feed_forward_length(c.shared_expert_ff)
    w.add_expert_count(c.n_expert)
    w.add_expert_used_count(c.n_expert_used)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    if c.hidden % c.n_head or c.head_dim != c.hidden // c.n_head:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if c.arch == LLAMA:
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)


def validate(spec: Any, bad: Callable[[str], Exception]) -> None:
    """Raise ``bad(message)`` where ``spec`` is no model of its family."""
    c: ModelConfig = spec.config
    fixed = {k: v for k, v in FAMILIES[c.arch]["fixed"].items() if getattr(c, k) != v}
    if fixed:
        raise bad(f"{', '.join(f'{k}={getattr(c, k)!r}' for k in fixed)} must be "
                  f"{', '.join(f'{v!r}' for v in fixed.values())} for {FAMILIES[c.arch]['name']}")
    if c.arch == QWEN2MOE and not (isinstance(c.shared_expert_ff, int) and c.shared_expert_ff >= 1):
        raise bad(f"shared_expert_ff={c.shared_expert_ff!r} must be an integer ≥ 1 for Qwen2-MoE")
    if c.rope_scaling != "none" or c.sliding_window or c.n_dense_layers or c.mla:
        raise bad(f"{FAMILIES[c.arch]['name']} has no RoPE scaling, sliding window, dense layers or latent attention")


# ---------------------------------------------------------------- presets

def _qwen2moe(n_layer: int, hidden: int, n_head: int, n_head_kv: int, n_expert: int, n_used: int, expert_ff: int,
              shared_ff: int, vocab: int, context: int) -> ModelConfig:
    return ModelConfig(n_layer=n_layer, hidden=hidden, n_head=n_head, n_head_kv=n_head_kv, head_dim=hidden // n_head,
                       n_expert=n_expert, n_expert_used=n_used, expert_ff=expert_ff, vocab_size=vocab,
                       rope_base=1_000_000.0, rms_eps=1e-6, context_length=context, arch=QWEN2MOE,
                       shared_expert_ff=shared_ff, **FAMILIES[QWEN2MOE]["fixed"])


def _mixtral(n_layer: int, hidden: int, n_head: int, n_head_kv: int, n_expert: int, expert_ff: int, vocab: int,
             context: int) -> ModelConfig:
    return ModelConfig(n_layer=n_layer, hidden=hidden, n_head=n_head, n_head_kv=n_head_kv, head_dim=hidden // n_head,
                       n_expert=n_expert, n_expert_used=2, expert_ff=expert_ff, vocab_size=vocab,
                       rope_base=1_000_000.0, rms_eps=1e-5, context_length=context, arch=LLAMA,
                       **FAMILIES[LLAMA]["fixed"])


def _olmoe(n_layer: int, hidden: int, n_head: int, n_expert: int, n_used: int, expert_ff: int, vocab: int,
           context: int) -> ModelConfig:
    return ModelConfig(n_layer=n_layer, hidden=hidden, n_head=n_head, n_head_kv=n_head, head_dim=hidden // n_head,
                       n_expert=n_expert, n_expert_used=n_used, expert_ff=expert_ff, vocab_size=vocab,
                       rope_base=10_000.0, rms_eps=1e-5, context_length=context, arch=OLMOE,
                       **FAMILIES[OLMOE]["fixed"])


def _all(arch: str, base: GGMLQuantizationType, **over: GGMLQuantizationType) -> dict[str, GGMLQuantizationType]:
    """``base`` for every kind of ``arch`` a spec chooses a type for (those not F32 in real files), then ``over``."""
    tab = table(arch)
    return {**{k: base for k in tab.by_name if k not in tab.f32_tensors}, **over}


def presets(spec_cls: Any) -> dict[str, Any]:
    """The presets of the three families, as ``spec_cls`` (:class:`~moesnap.model.synth.SynthSpec`) values."""
    q4km = {"output": QT.Q6_K, "attn_v": QT.Q6_K}
    return {
        # 3 layers, GQA 4/2 heads of 16, 8 experts top-4 (Qwen1.5-MoE's top-4), a shared expert twice as wide
        "qwen2-moe-tiny": spec_cls(_qwen2moe(3, 64, 4, 2, 8, 4, 64, 128, 272, 4096), dense_ff=128,
                                   qtypes=_all(QWEN2MOE, QT.Q8_0), seed=0, name="moesnap-qwen2-moe-tiny"),
        # Qwen/Qwen1.5-MoE-A2.7B's config.json: 24 layers, hidden 2048, 16 heads (MHA) of 128, 60 experts of
        # 1408, top-4, a shared expert of 5632 (= intermediate_size), vocab 151936, rope 1e6, context 8192
        "qwen1.5-moe-a2.7b": spec_cls(
            _qwen2moe(24, 2048, 16, 16, 60, 4, 1408, 5632, 151936, 8192), dense_ff=5632,
            qtypes=_all(QWEN2MOE, QT.Q4_K, **q4km, ffn_down_exps=QT.Q8_0, ffn_down_shexp=QT.Q6_K),
            down_exps_alternate=QT.Q5_0, seed=0, name="moesnap-qwen1.5-moe-a2.7b"),
        # 3 layers, GQA 4/2 heads of 16, 8 experts top-2
        "mixtral-tiny": spec_cls(_mixtral(3, 64, 4, 2, 8, 128, 272, 4096), dense_ff=128,
                                 qtypes=_all(LLAMA, QT.Q8_0), seed=0, name="moesnap-mixtral-tiny"),
        # mistralai/Mixtral-8x7B-v0.1's config.json: 32 layers, hidden 4096, 32 / 8 heads of 128, 8 experts of
        # 14336, top-2, vocab 32000, rope 1e6, context 32768
        "mixtral-8x7b": spec_cls(
            _mixtral(32, 4096, 32, 8, 8, 14336, 32000, 32768), dense_ff=14336,
            qtypes=_all(LLAMA, QT.Q4_K, **{**q4km, "attn_k": QT.Q8_0, "attn_v": QT.Q8_0}, ffn_down_exps=QT.Q6_K),
            down_exps_alternate=QT.Q4_K, seed=0, name="moesnap-mixtral-8x7b"),
        # 3 layers, 4 heads of 16, 16 experts top-4 (no renormalisation)
        "olmoe-tiny": spec_cls(_olmoe(3, 64, 4, 16, 4, 64, 272, 4096), dense_ff=64,
                               qtypes=_all(OLMOE, QT.Q8_0), seed=0, name="moesnap-olmoe-tiny"),
        # allenai/OLMoE-1B-7B-0924's config.json: 16 layers, hidden 2048, 16 heads (MHA) of 128, 64 experts of
        # 1024, top-8, vocab 50304, rope 1e4, context 4096
        "olmoe-1b-7b": spec_cls(
            _olmoe(16, 2048, 16, 64, 8, 1024, 50304, 4096), dense_ff=1024,
            qtypes=_all(OLMOE, QT.Q4_K, **q4km, ffn_down_exps=QT.Q6_K),
            down_exps_alternate=QT.Q4_K, seed=0, name="moesnap-olmoe-1b-7b"),
    }
