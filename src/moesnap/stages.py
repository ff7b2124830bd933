"""The stage schema: canonical names, their order, their shapes, and aliases.

Shapes use ``T`` tokens, ``H`` hidden size, ``Hq``/``Hkv`` query/key-value
heads, ``D`` head dim, ``E`` experts, ``k`` experts per token, ``V`` vocab.
Per-layer stages are stored stacked on a leading layer axis ``[L, ...]``.

The schema is one list for every model family; :data:`FAMILY_STAGES` (data, not code) says which
layer stages each family's forward has.  A stage a family lacks (gpt-oss has no ``q_norm`` /
``k_norm``: its q and k go from the projection, with its bias, straight to RoPE) is absent from its
goldens and candidates, never faked, and the judge walks the golden's family's stages only, so it
is neither a missing stage of a candidate nor a cell a pass claims.

gpt-oss's attention sinks get no stage of their own: a sink is a per-head logit that only changes
each softmax's denominator, so all of its effect is in ``attn`` of its layer (a sink ignored, or
applied to the wrong head, fails there first: ``q_rope``/``k_rope`` before it hold no sink), and the
sink's share of the probability mass is no value any engine dumps to compare with.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeAlias

# Whole-model stages, in computation order (``tokens`` is the input).
MODEL_STAGES: tuple[str, ...] = ("tokens", "embed", "final_norm", "logits")

# Per-layer stages, in computation order within one layer (every family's, :data:`FAMILY_STAGES`
# says which a family has).  DeepSeek's multi-head latent attention (``Rq``/``Rkv``: q/kv LoRA ranks,
# ``Dr`` the decoupled RoPE width, ``Dn = D - Dr``, ``Dv`` its value width) adds the latents; its
# ``k`` is every head's ``[k_nope, k_pe]`` (k_pe, one per token, shared by the heads) and ``v`` is
# ``[T, Hq, Dv]``; RoPE turns the last ``Dr`` dimensions of q and k only, so ``q_rope``/``k_rope``
# equal ``q``/``k`` in the first ``Dn``.  Its leading dense layers have ``dense_ffn_out`` and none of
# the router, expert and MoE stages; its MoE layers have ``shared_expert_out``, and ``moe_out`` is the
# routed mixture plus the shared experts (transformers' ``mlp`` output).
LAYER_STAGES: tuple[str, ...] = (
    "attn_norm",     # [T, H]
    "q_latent",      # [T, Rq]      DeepSeek: q_a projection (the compressed q)
    "q_latent_norm", # [T, Rq]      DeepSeek: its RMSNorm
    "kv_latent",     # [T, Rkv+Dr]  DeepSeek: kv_a_mqa projection: the compressed kv, then the rope key
    "kv_latent_norm",  # [T, Rkv]   DeepSeek: the compressed kv's RMSNorm
    "q",             # [T, Hq, D]   after q projection
    "k",             # [T, Hkv, D]  after k projection
    "v",             # [T, Hkv, D]  after v projection
    "q_norm",        # [T, Hq, D]   per-head RMSNorm over D
    "k_norm",        # [T, Hkv, D]
    "q_rope",        # [T, Hq, D]   NeoX rotary embedding applied
    "k_rope",        # [T, Hkv, D]
    "attn",          # [T, Hq*D]    attention output before o projection
    "attn_out",      # [T, H]       after o projection
    "attn_resid",    # [T, H]       residual + attn_out
    "ffn_norm",      # [T, H]
    "dense_ffn_out", # [T, H]       DeepSeek's leading dense layers: the dense SwiGLU MLP's output
    "router_logits", # [T, E]       float32 router logits
    "router_select", # [T, E]       DeepSeek: the scores the top-k selection ranks by (see ROUTING_SCORES)
    "topk_ids",      # [T, k] int32 selected experts, by descending weight
    "topk_weights",  # [T, k]       renormalised weights, same order as ids
    "expert_out",    # [T, k, H]    each selected expert's unweighted output
    "shared_expert_out",  # [T, H]  DeepSeek, Qwen2-MoE: the shared experts' output (before Qwen2-MoE's gate)
    "shared_gate",   # [T, 1]       Qwen2-MoE: the shared expert's gate logit (ffn_gate_inp_shexp · x)
    "moe_out",       # [T, H]       weighted sum of expert outputs (plus the shared experts', gated in Qwen2-MoE)
    "layer_out",     # [T, H]       attn_resid + moe_out
)

_MLA = ("q_latent", "q_latent_norm", "kv_latent", "kv_latent_norm")
_DEEPSEEK_ONLY = (*_MLA, "dense_ffn_out", "router_select", "shared_expert_out")
_QWEN3MOE = tuple(s for s in LAYER_STAGES if s not in (*_DEEPSEEK_ONLY, "shared_gate"))
_NO_QK_NORM = tuple(s for s in _QWEN3MOE if s not in ("q_norm", "k_norm"))

# The layer stages of each family (gguf-py's architecture name), in LAYER_STAGES order: every stage
# some layer of some model of the family has (DeepSeek: V2-Lite has no q LoRA, so no ``q_latent``;
# dense layers no router: :func:`stages_of_layer` says which a given layer has).
FAMILY_STAGES: dict[str, tuple[str, ...]] = {
    "qwen3moe": _QWEN3MOE,
    "gpt-oss": _NO_QK_NORM,
    "deepseek2": tuple(s for s in LAYER_STAGES if s not in ("q_norm", "k_norm", "shared_gate")),
    # Qwen2-MoE: no q/k norm; its shared expert and the shared expert's gate, both in moe_out
    "qwen2moe": tuple(s for s in LAYER_STAGES if s in _NO_QK_NORM or s in ("shared_expert_out", "shared_gate")),
    "llama": _NO_QK_NORM,      # Mixtral
    "olmoe": _QWEN3MOE,        # its q_norm/k_norm normalise the whole projection: the same [T, heads, D] values
}
# the family of a golden or dump that does not say (those written before families existed)
DEFAULT_FAMILY = "qwen3moe"
assert all(set(v) <= set(LAYER_STAGES) for v in FAMILY_STAGES.values())

#: the stages of the router and the experts, which a dense layer (DeepSeek's leading ones) lacks
MOE_STAGES: frozenset[str] = frozenset(
    {"router_logits", "router_select", "topk_ids", "topk_weights", "expert_out", "shared_expert_out", "shared_gate",
     "moe_out"})
#: the stages only a dense layer has
DENSE_STAGES: frozenset[str] = frozenset({"dense_ffn_out"})

#: per family, the stage whose values the top-k selection ranks experts by: the near-tie rule
#: (:mod:`moesnap.judge.routing`) measures a flip's gap on it.  Qwen3-MoE and gpt-oss rank by the
#: router logits (softmax and top-k of the logits keep their order).  DeepSeek ranks by
#: ``router_select``: V2 the softmax probabilities, V3 the sigmoid scores plus the correction bias
#: (its weights come from the unbiased scores, which do not decide the selection).  With groups, an
#: expert of a group the group selection dropped carries its score lowered by its group's shortfall
#: to the last group kept, so a flip into a dropped group is a near tie only when the group scores
#: and the expert scores both nearly tie (the two gaps together within ``tie_tol``).
ROUTING_SCORES: dict[str, str] = {"qwen3moe": "router_logits", "gpt-oss": "router_logits",
                                  "deepseek2": "router_select", "qwen2moe": "router_logits",
                                  "llama": "router_logits", "olmoe": "router_logits"}
assert set(ROUTING_SCORES) == set(FAMILY_STAGES)


def layer_stages(family: str) -> tuple[str, ...]:
    """The layer stages ``family`` has (KeyError for a family moesnap does not know)."""
    return FAMILY_STAGES[family]


def stages_of_layer(family: str, config: Mapping[str, Any], layer: int) -> tuple[str, ...]:
    """The stages layer ``layer`` of a model of ``family`` has, by its recorded config (a golden's
    ``model.config``): a dense layer (``layer < n_dense_layers``) has no router, expert or MoE stage,
    a MoE layer no ``dense_ffn_out``; without a q LoRA (``q_lora_rank`` 0) there is no ``q_latent``;
    a family without MLA has no ``kv_latent``."""
    dense = layer < int(config.get("n_dense_layers", 0) or 0)
    drop = set(MOE_STAGES if dense else DENSE_STAGES)
    if not config.get("q_lora_rank"):
        drop |= {"q_latent", "q_latent_norm"}
    return tuple(s for s in FAMILY_STAGES[family] if s not in drop)


def stages_of_model(family: str, config: Mapping[str, Any], n_layer: int) -> tuple[str, ...]:
    """The layer stages some layer of a model of ``family`` has, by its recorded config
    (:func:`stages_of_layer` over its ``n_layer`` layers), in schema order."""
    have = {s for i in range(n_layer) for s in stages_of_layer(family, config, i)}
    return tuple(s for s in FAMILY_STAGES[family] if s in have)


INTEGER_STAGES: frozenset[str] = frozenset({"tokens", "topk_ids"})

# The precisions a forward may compute in, by name (torch's and numpy's), the widest first.  Every
# dtype table of moesnap is this one or a subset of it: goldens are float32/float64, the check's
# candidate runs float32/bfloat16/float16, tolerances exist for all four.
DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
GOLDEN_DTYPES: tuple[str, ...] = ("float32", "float64")
CHECK_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# Stages whose value depends on the routing decision of their layer.
POST_ROUTING_STAGES: frozenset[str] = frozenset(
    {"topk_ids", "topk_weights", "expert_out", "moe_out", "layer_out"}
)   # shared_expert_out and shared_gate are not: the shared experts see every token whatever its routing

ALL_STAGES: tuple[str, ...] = MODEL_STAGES + LAYER_STAGES

# Names other engines use for our stages.  Keys are foreign names, values
# canonical ones.  The first four come from the aprender-serve MoE trace.
ALIASES: dict[str, str] = {
    "moe_router": "topk_weights",
    "moe_ffn_out": "moe_out",
    "post_ffn_residual": "layer_out",
    "lm_head": "logits",
    # llama.cpp graph tensor names (eval-callback dumps; ``Qcur``/``Kcur`` are left out on
    # purpose: llama.cpp reuses them before and after RoPE)
    "embd": "embed",
    "Vcur": "v",
    "Qcur_normed": "q_norm",
    "Kcur_normed": "k_norm",
    "kqv_out": "attn",
    "ffn_inp": "attn_resid",
    "ffn_moe_logits": "router_logits",
    "ffn_moe_weights_norm": "topk_weights",
    "ffn_moe_down": "expert_out",
    "ffn_moe_out": "moe_out",
    "ffn_shexp": "shared_expert_out",        # before Qwen2-MoE's gate ("ffn_shexp_out": after it)
    "ffn_shexp_gate_inp": "shared_gate",
    "l_out": "layer_out",
    "result_norm": "final_norm",
    "result_output": "logits",
    # HF transformers module names (model_addition_debugger style)
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "router_logits",
    "mlp": "moe_out",
    "norm": "final_norm",
    # SGLang's dumper (python/sglang/srt/debug_utils/dumper.py), module outputs of its Qwen3-MoE as
    # the non-intrusive hooks name them, with "non_intrusive__" and "model.layers.<N>." taken off by
    # capture/sglang.py; "output.<i>" is the i-th tensor a module returns.  RMSNorm with a residual
    # returns (normed, residual sum); topk returns (topk_weights, topk_ids, router_logits).  Two
    # names capture/sglang.py maps itself, as they are no stage of their own layer:
    # "input_layernorm.output.1" and "norm.output.1" (the previous layer's layer_out); other families'
    # names: DUMPER_ALIASES below, fused outputs (q, k and v in qkv_proj): DUMPER_SPLITS.
    "embed_tokens.output": "embed",
    "input_layernorm.output": "attn_norm",
    "input_layernorm.output.0": "attn_norm",
    "self_attn.q_norm.output": "q_norm",
    "self_attn.k_norm.output": "k_norm",
    "self_attn.rotary_emb.output.0": "q_rope",
    "self_attn.rotary_emb.output.1": "k_rope",
    "self_attn.attn.output": "attn",
    "self_attn.o_proj.output": "attn_out",
    "self_attn.output": "attn_out",
    "post_attention_layernorm.output.0": "ffn_norm",
    "post_attention_layernorm.output.1": "attn_resid",
    "mlp.gate.output": "router_logits",
    "mlp.topk.output.0": "topk_weights",
    "mlp.topk.output.1": "topk_ids",
    "mlp.topk.output.2": "router_logits",
    "mlp.experts.output": "moe_out",
    "mlp.output": "moe_out",
    "norm.output": "final_norm",
    "norm.output.0": "final_norm",
    "output.next_token_logits": "logits",             # the last token's only, in a prefill pass
    "logits_processor.output.next_token_logits": "logits",
    "next_token_logits": "logits",
}


#: a dumper name's stage in a family's table: one stage; the first of several that the layer has (by the
#: golden's stages of that layer: a module whose output is one stage in a MoE layer and another in a dense
#: one); or None, no stage at all (the name is listed as ignored, never placed)
DumperAlias: TypeAlias = str | tuple[str, ...] | None

# SGLang's module paths as its dumper's non-intrusive hooks name them (``model.layers.N.`` taken off), per
# family, where they are other stages than :data:`ALIASES` says (its Qwen3-MoE names) or no stage; read
# from sglang/srt/models/{qwen2_moe,deepseek_v2,mixtral,gpt_oss}.py (OLMoE's are Qwen3-MoE's).  A linear
# layer returning ``(out, None)`` dumps ``.output`` (one tensor), a tuple of several ``.output.<i>``.
# vLLM's port reads with the same table (its DeepSeek and Mixtral modules have SGLang's paths and values),
# :data:`VLLM_ALIASES` over it where they differ.
DUMPER_ALIASES: dict[str, dict[str, DumperAlias]] = {
    "qwen2moe": {
        "mlp.shared_expert.output": "shared_expert_out",   # before its gate: SGLang gates it outside the module
        "mlp.shared_expert_gate.output": "shared_gate",     # [T, 1] logit; called only where the gate is not fused
        "mlp.experts.output": None,                         # the routed mixture alone (the shared expert comes after)
    },
    "deepseek2": {
        "self_attn.q_a_proj.output": "q_latent",
        "self_attn.q_a_layernorm.output": "q_latent_norm",
        "self_attn.kv_a_proj_with_mqa.output": "kv_latent",
        "self_attn.kv_a_layernorm.output": "kv_latent_norm",
        "self_attn.q_proj.output": "q",                     # no q LoRA (V2-Lite)
        "self_attn.q_b_proj.output": "q",
        # the MHA prefill path's attention inputs: q and k after RoPE on their rope part, v; its output
        "self_attn.attn_mha.inputs.0": "q_rope",
        "self_attn.attn_mha.inputs.1": "k_rope",
        "self_attn.attn_mha.inputs.2": "v",
        "self_attn.attn_mha.output": "attn",
        # o_proj's input: the attention's output on both paths; a decode pass's absorbed MLA (attn_mqa, in the
        # latent space: no stage) gives it as nothing else (its w_vc product calls no module)
        "self_attn.o_proj.inputs.0": "attn",
        "self_attn.rotary_emb.output.0": None,              # the rope part alone, [T, Hq, Dr] and [T, 1, Dr]
        "self_attn.rotary_emb.output.1": None,
        "self_attn.attn.output": None,  # vLLM's MHA path: v padded to the q/k head width, [T, Hq*(Dn+Dr)]
        "mlp.topk.output.0": None,      # routed_scaling_factor in it only where the MoE runner fuses it there
        "mlp.shared_experts.output": "shared_expert_out",
        "mlp.experts.output": None,     # the routed mixture alone, scaled or not by the backend
        "mlp.output": ("moe_out", "dense_ffn_out"),         # a dense layer's mlp is the dense MLP
    },
    "llama": {                          # Mixtral's MoE block is block_sparse_moe, not mlp
        "block_sparse_moe.gate.output": "router_logits",
        "block_sparse_moe.topk.output.0": "topk_weights",
        "block_sparse_moe.topk.output.1": "topk_ids",
        "block_sparse_moe.topk.output.2": "router_logits",
        "block_sparse_moe.experts.output": "moe_out",
        "block_sparse_moe.output": "moe_out",
    },
    "gpt-oss": {"mlp.router.output": "router_logits"},  # its sinks (self_attn.attn.inputs.sinks) are weights
}
# vLLM's port of the dumper, where its module of the same path holds another value than SGLang's:
# Qwen2-MoE's shared_expert applies its gate inside (sigmoid(shared_expert_gate(x)) * out), and
# SharedFusedMoE returns (gated shared, routed) as experts.output.0 / .1, neither one stage.
VLLM_ALIASES: dict[str, dict[str, DumperAlias]] = {
    "qwen2moe": {"mlp.shared_expert.output": None},
}
# Dumper names that hold several stages side by side ([T, sum of their rows]), in this order.
DUMPER_SPLITS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj.output": ("q", "k", "v"),
    "self_attn.fused_qkv_a_proj_with_mqa.output": ("q_latent", "kv_latent"),   # DeepSeek with a q LoRA
    "self_attn.fused_qkv_a_proj.output": ("q_latent", "kv_latent"),            # vLLM's name of it
}
assert all(set(v) <= set(FAMILY_STAGES) for v in (DUMPER_ALIASES, VLLM_ALIASES))
assert all(s in LAYER_STAGES for t in (*DUMPER_ALIASES.values(), *VLLM_ALIASES.values()) for v in t.values()
           for s in ((v,) if isinstance(v, str) else v or ()))


def canonical(name: str) -> str | None:
    """Return the canonical stage name for ``name`` (itself or an alias), or None."""
    if name in ALL_STAGES:
        return name
    return ALIASES.get(name)

