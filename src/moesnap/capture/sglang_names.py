"""What each name in an SGLang (or vLLM) dump is, for the golden model's family.

The dumper's non-intrusive hooks name a tensor by the module path of the engine's model code
(``model.layers.3.mlp.shared_expert.output``); :mod:`moesnap.capture.sglang` takes ``model.layers.N.`` off
and asks :func:`stage_of` for what is left.  The answer comes from data, chosen by the golden's family
(:attr:`~moesnap.capture._flat.Like.family`, its recorded ``arch``) and the engine that wrote the dump:

1. the family's table, :data:`moesnap.stages.DUMPER_ALIASES` (vLLM's
   :data:`~moesnap.stages.VLLM_ALIASES` over it): SGLang's module paths of that family where they are
   another stage than Qwen3-MoE's, or none.  Qwen2-MoE's ``mlp.experts.output`` is the routed mixture
   alone (its shared expert is added after the module), so no stage there, where Qwen3-MoE's is
   ``moe_out``; an entry naming several stages is the first of them the layer has by the golden's
   stages of that layer (DeepSeek's ``mlp.output``: ``moe_out`` in a MoE layer, ``dense_ffn_out`` in a
   leading dense one);
2. SGLang's source-patch names (:data:`SOURCE_PATCH`);
3. moesnap's own stage names and :data:`moesnap.stages.ALIASES`.

A name holding several stages side by side (``self_attn.qkv_proj.output``: q, k, v; DeepSeek's
``self_attn.fused_qkv_a_proj_with_mqa.output``: the q latent, then the kv latent with its rope key) is
:data:`moesnap.stages.DUMPER_SPLITS`, cut by :func:`split`.

Mixtral (``llama``): the engines load transformers' checkpoint, whose q/k rows convert_hf_to_gguf
permutes per head for llama.cpp's RoPE on adjacent pairs; the golden keeps the file's order, so a dump's
``q``, ``k``, ``q_rope``, ``k_rope`` are put into it (:func:`to_file_order`: each head's halves
interleaved, as :func:`moesnap.capture.hf_families.interleave`; a reordering, no arithmetic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GoldenError
from ..stages import DUMPER_ALIASES, DUMPER_SPLITS, VLLM_ALIASES, DumperAlias, canonical
from ._flat import Like

#: SGLang's own names for stages: its Qwen3-MoE source-patch test (test_engine_dumper_comparator_e2e.py)
SOURCE_PATCH: dict[str, str] = {
    "attn_output": "attn_out",
    "pre_mlp_residual": "attn_resid",
    "mlp_output": "moe_out",
    "attn_pre_o_proj": "attn",
    "moe_router_logits": "router_logits",
    "moe_expert_output": "moe_out",
    "logits_processor.output": "logits",   # vLLM's port: compute_logits's rows (the requests' last tokens)
}

#: families whose q/k values an engine holds in transformers' per-head order, not the GGUF's (module docstring)
PAIRED_QK_FAMILIES: frozenset[str] = frozenset({"llama"})
#: the stages :func:`to_file_order` reorders
PAIRED_STAGES: frozenset[str] = frozenset({"q", "k", "q_rope", "k_rope"})

#: the engines whose dumps this reads (vLLM's dumper is a port of SGLang's)
ENGINES: tuple[str, ...] = ("sglang", "vllm")


def names_of(family: str, engine: str) -> dict[str, DumperAlias]:
    """The names of ``family``'s dumps by ``engine`` that :data:`~moesnap.stages.ALIASES` does not say."""
    if engine not in ENGINES:
        raise ValueError(f"{engine=} is none of {ENGINES}")
    names = dict(DUMPER_ALIASES.get(family, {}))
    if engine == "vllm":
        names.update(VLLM_ALIASES.get(family, {}))
    return names


def stage_of(name: str, names: dict[str, DumperAlias], like: Like, layer: int | None) -> str | None:
    """The stage dumper name ``name`` (``model.layers.N.`` taken off) holds at ``layer``, or None (module
    docstring)."""
    if name in names:
        got = names[name]
        if got is None or isinstance(got, str):
            return got
        if layer is not None and 0 <= layer < like.n_layer:
            return next((s for s in got if like.in_layer(s, layer)), got[0])
        return got[0]
    return SOURCE_PATCH.get(name) or canonical(name)


def split(path: Path, name: str, values: np.ndarray, layer: int | None,
          like: Like) -> list[tuple[str, int | None, np.ndarray]]:
    """The stages ``values`` of :data:`~moesnap.stages.DUMPER_SPLITS` name ``name`` hold side by side,
    each ``[rows, its row size]``: every token's rows, or the last token's."""
    stages = DUMPER_SPLITS[name]
    lacking = [s for s in stages if s not in like.shapes]
    if lacking:
        raise GoldenError(f"{path}: {name} holds {', '.join(stages)} side by side, but the golden holds no "
                          f"{', '.join(lacking)}: a dump of another model?")
    sizes = [like.row_size(s) for s in stages]
    total = sum(sizes)
    n = like.n_tokens if values.size == like.n_tokens * total else 1 if values.size == total else 0
    if not n:
        raise GoldenError(f"{path}: {values.size} values of {', '.join(stages)} side by side, which are "
                          f"{' + '.join(map(str, sizes))} = {total} values a token, {like.n_tokens} tokens")
    parts = np.split(values.reshape(n, total), np.cumsum(sizes)[:-1], axis=1)
    return [(s, layer, p) for s, p in zip(stages, parts)]


def to_file_order(stage: str, values: np.ndarray, like: Like) -> np.ndarray:
    """``values`` of ``stage`` in the golden's per-head order (module docstring): unchanged but for the
    q/k stages of a family in :data:`PAIRED_QK_FAMILIES`; a head width that is not the golden's is left
    to the shape check."""
    if like.family not in PAIRED_QK_FAMILIES or stage not in PAIRED_STAGES or stage not in like.shapes:
        return values
    D = like.shapes[stage][-1]
    if values.size % D or D % 2:
        return values
    heads = values.reshape(-1, 2, D // 2)                              # [rows*heads, halves, D/2]
    return heads.swapaxes(1, 2).reshape(values.shape)                  # element 2i + j <- j*D/2 + i
