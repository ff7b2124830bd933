"""llama.cpp's graph tensor names onto moesnap stages, for every family llama.cpp runs.

llama.cpp names its graph's nodes ``<name>-<layer>`` (``cb(cur, "ffn_inp", il)``); the eval callback
of :mod:`moesnap.capture.llama` hands each named node over with its op (``ggml_op_name``).  As observed
with llama-cpp-python 0.3.36 (CPU, F32 KV cache, no flash attention) in its qwen3moe, openai-moe
(gpt-oss), qwen2moe, llama (Mixtral), olmoe and deepseek2 graphs:

* :data:`NAMES` maps a name onto a stage: the layer's last node of that name (a view a one-row decode
  step finds contiguous may come first: DeepSeek's ``kv_cmpr`` before its norm).  Where several names
  map to one stage of a layer the later node in the graph wins: ``ffn_moe_weights`` (the k
  probabilities) gives way to ``ffn_moe_weights_norm`` (renormalised: Qwen3-MoE, Mixtral, DeepSeek-V3),
  ``ffn_moe_weights_softmax`` (gpt-oss) and ``ffn_moe_weights_scaled`` (DeepSeek's routed scale);
  ``ffn_moe_down`` to gpt-oss's ``ffn_moe_down_biased``; ``ffn_moe_out`` (the routed mixture) to
  ``ffn_out``, which a graph with shared experts names the routed mixture plus the shared experts'
  output (Qwen2-MoE's gated).  In a layer without a router (DeepSeek's leading dense layers)
  ``ffn_out`` is the dense MLP's output: ``dense_ffn_out``.
* ``Qcur``/``Kcur``/``Vcur`` (:data:`ROPED`) name several nodes each: the projection, its bias added
  (gpt-oss, Qwen2-MoE), its reshape to heads, and the ``ROPE`` node; the ROPE node is ``q_rope`` /
  ``k_rope``, the last node before it ``q``/``k`` (OLMoE: the projection itself, normed apart as
  ``Qcur_normed``), the last ``Vcur`` node ``v``.
* Under multi-head latent attention (DeepSeek) llama.cpp absorbs ``kv_b`` into q and the output
  (``Qcur``/``Kcur``/``Vcur`` are latent forms: no stage), so ``k``, ``v``, ``k_rope`` are never
  computed; ``q`` names the q LoRA's nodes (:data:`MLA_BY_OP`: the first ``MUL_MAT`` the compressed q
  where there are two, the ``MUL`` its norm, the last ``MUL_MAT`` q), ``kv_cmpr_pe`` the latent and
  rope key, ``kv_cmpr`` the normed latent, ``q_pe`` the roped part of q: ``q_rope`` is q's first
  ``Dn`` dimensions followed by it (both nodes llama.cpp computed; nothing is recomputed).
* gpt-oss's router adds its bias after the node named ``ffn_moe_logits``; with top-k-then-softmax
  gating ``ffn_moe_probs`` holds those biased logits (:data:`FAMILY_NAMES`); elsewhere it holds
  probabilities (softmax or sigmoid): no stage.

Qwen3-MoE's, Qwen2-MoE's, OLMoE's and DeepSeek's graphs leave the o-projection output unnamed
(``node_N``): ``attn_out`` is then absent (:func:`map_stages` derives it as ``ffn_inp - <layer input>``
only where asked, for the cross-check).  The ggml shape ``ne = [ne0, ne1, ...]`` arrives reversed
into numpy order.

May import: ``model.config``, ``stages``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..model.config import DEEPSEEK2, GPT_OSS, ModelConfig
from ..stages import FAMILY_STAGES

#: (name, ggml op, array): one captured graph node
Node = tuple[str, str, np.ndarray]

NAMES: dict[str, str] = {
    "attn_norm": "attn_norm",
    "Qcur_normed": "q_norm",
    "Kcur_normed": "k_norm",
    "kv_cmpr_pe": "kv_latent",          # DeepSeek: the compressed kv and the rope key
    "kv_cmpr": "kv_latent_norm",        # DeepSeek: the compressed kv normed
    "kqv_out": "attn",
    "attn_out": "attn_out",             # openai-moe, llama
    "ffn_inp": "attn_resid",
    "ffn_norm": "ffn_norm",
    "attn_post_norm": "ffn_norm",       # openai-moe: the norm before the MoE
    "ffn_moe_logits": "router_logits",
    "ffn_moe_argsort": "topk_ids",      # [T, E] descending order; first k columns
    "ffn_moe_weights": "topk_weights",
    "ffn_moe_weights_norm": "topk_weights",
    "ffn_moe_weights_softmax": "topk_weights",
    "ffn_moe_weights_scaled": "topk_weights",
    "ffn_moe_down": "expert_out",       # [T, k, H] unweighted, in topk_ids order
    "ffn_moe_down_biased": "expert_out",
    "ffn_shexp": "shared_expert_out",   # before Qwen2-MoE's gate
    "ffn_shexp_gate_inp": "shared_gate",  # Qwen2-MoE: the gate's logit [T, 1]
    "ffn_moe_out": "moe_out",
    "ffn_out": "moe_out",               # with shared experts: routed + shared; a dense layer's MLP output
    "l_out": "layer_out",
}
#: a family's names where its graph differs (the later node wins as in :data:`NAMES`)
FAMILY_NAMES: dict[str, dict[str, str]] = {GPT_OSS: {**NAMES, "ffn_moe_probs": "router_logits"}}
#: names of several nodes per layer: (stage of the last node before the ROPE node, stage of the ROPE node)
ROPED: dict[str, tuple[str, str | None]] = {"Qcur": ("q", "q_rope"), "Kcur": ("k", "k_rope"), "Vcur": ("v", None)}
#: MLA: per name, (op, which node of that op: 0 the first, -1 the last, -2 the one before) -> stage
MLA_BY_OP: dict[str, dict[tuple[str, int], str]] = {
    "q": {("MUL_MAT", -2): "q_latent", ("MUL", -1): "q_latent_norm", ("MUL_MAT", -1): "q"},
    "q_pe": {("ROPE", -1): "_q_pe"},
}
MODEL_NAMES: dict[str, str] = {"embd": "embed", "result_norm": "final_norm", "result_output": "logits"}
HEAD_STAGES = frozenset({"q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope", "_q_pe"})


def _split(name: str) -> tuple[str, int | None]:
    base, sep, idx = name.rpartition("-")
    if sep and idx.isdigit():
        return base, int(idx)
    return name, None


def _picks(base: str, nodes: list[tuple[str, np.ndarray]], cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(stage, array) of the nodes named ``base`` in one layer, in graph order."""
    names = FAMILY_NAMES.get(cfg.arch, NAMES)
    if cfg.mla and base in MLA_BY_OP:
        out = []
        for (op, which), stage in MLA_BY_OP[base].items():
            of_op = [a for o, a in nodes if o == op]
            if len(of_op) >= (abs(which) if which < 0 else which + 1):
                out.append((stage, of_op[which]))
        return out
    if base in ROPED and not cfg.mla:
        before, roped = ROPED[base]
        at = next((i for i, (op, _) in enumerate(nodes) if op == "ROPE"), len(nodes))
        out = [(before, nodes[at - 1][1])] if at else []
        return out + ([(roped, nodes[at][1])] if roped is not None and at < len(nodes) else [])
    return [(names[base], nodes[-1][1])] if base in names else []


def map_stages(captured: list[Node], T: int, cfg: ModelConfig, *, derive_attn_out: bool = False
               ) -> tuple[dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """moesnap's stages in the captured llama.cpp nodes of one forward of ``T`` rows: (whole-model
    stages ``[T, ...]``, layer stages ``{stage: {layer: [T, ...]}}``, only the layers that have them).

    ``derive_attn_out``: add ``attn_out = ffn_inp - <layer input>`` where the graph leaves it unnamed
    (not a tensor llama.cpp computes: the cross-check uses it; a candidate case leaves the stage out)."""
    nodes: dict[tuple[str, int], list[tuple[str, np.ndarray]]] = {}
    model: dict[str, np.ndarray] = {}
    for name, op, arr in captured:
        base, il = _split(name)
        if il is None:
            if base in MODEL_NAMES and MODEL_NAMES[base] not in model:
                model[MODEL_NAMES[base]] = arr.reshape(T, -1)
        else:
            nodes.setdefault((base, il), []).append((op, arr))
    per: dict[str, dict[int, np.ndarray]] = {}
    for (base, il), layer_nodes in nodes.items():
        for stage, arr in _picks(base, layer_nodes, cfg):
            if arr.size % T:
                continue
            a: np.ndarray
            if stage in HEAD_STAGES:
                a = arr.reshape(T, -1, cfg.rope_dim if stage == "_q_pe" else cfg.head_dim)
            elif stage == "expert_out":
                a = arr.reshape(T, cfg.n_expert_used, -1)
            else:
                a = arr.reshape(T, -1)
            per.setdefault(stage, {})[il] = a[:, :cfg.n_expert_used] if stage == "topk_ids" else a
    q_pe = per.pop("_q_pe", {})
    for il, roped in q_pe.items():       # MLA: q's unroped dims, then its roped ones (both llama.cpp's)
        if il in per.get("q", {}):
            per.setdefault("q_rope", {})[il] = np.concatenate([per["q"][il][..., :cfg.qk_nope_dim], roped], -1)
    if "dense_ffn_out" in FAMILY_STAGES.get(cfg.arch, ()):
        for il in [il for il in per.get("moe_out", {}) if il not in per.get("router_logits", {})]:
            per.setdefault("dense_ffn_out", {})[il] = per["moe_out"].pop(il)
    if derive_attn_out and "attn_out" not in per and "embed" in model:
        for il, resid in per.get("attn_resid", {}).items():
            inp = model["embed"] if il == 0 else per.get("layer_out", {}).get(il - 1)
            if inp is not None:
                per.setdefault("attn_out", {})[il] = resid - inp   # derived: the o-projection output is unnamed
    return model, {s: v for s, v in per.items() if v}


def unsupported(cfg: ModelConfig) -> str | None:
    """Why llama-cpp-python 0.3.36 cannot run a model of config ``cfg`` (None: it can)."""
    if cfg.arch == DEEPSEEK2 and not cfg.q_lora_rank and cfg.n_layer not in (26, 27):
        return ("llama.cpp (llama-cpp-python 0.3.36) reads a DeepSeek file without a q LoRA only at 26 or 27 "
                "layers (its DeepSeek-V2-Lite check); other files must carry deepseek2.attention.q_lora_rank")
    return None


def stacked(layers: Mapping[str, Mapping[int, np.ndarray]], n_layer: int) -> dict[str, np.ndarray]:
    """Layer stages ``{stage: {layer: a}}`` as arrays ``[L', T, ...]`` over the layers that have them,
    with ``_layers.<stage>`` (the layer indices) where that is not every layer 0..n_layer-1."""
    out: dict[str, np.ndarray] = {}
    for stage, per in layers.items():
        idx = sorted(per)
        out[stage] = np.stack([per[i] for i in idx])
        if idx != list(range(n_layer)):
            out[f"_layers.{stage}"] = np.asarray(idx, dtype=np.int64)
    return out
