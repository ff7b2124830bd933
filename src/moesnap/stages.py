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

# Whole-model stages, in computation order (``tokens`` is the input).
MODEL_STAGES: tuple[str, ...] = ("tokens", "embed", "final_norm", "logits")

# Per-layer stages, in computation order within one layer.
LAYER_STAGES: tuple[str, ...] = (
    "attn_norm",     # [T, H]
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
    "router_logits", # [T, E]       float32 router logits
    "topk_ids",      # [T, k] int32 selected experts, by descending weight
    "topk_weights",  # [T, k]       renormalised weights, same order as ids
    "expert_out",    # [T, k, H]    each selected expert's unweighted output
    "moe_out",       # [T, H]       weighted sum of expert outputs
    "layer_out",     # [T, H]       attn_resid + moe_out
)

# The layer stages of each family (gguf-py's architecture name), in LAYER_STAGES order.
FAMILY_STAGES: dict[str, tuple[str, ...]] = {
    "qwen3moe": LAYER_STAGES,
    "gpt-oss": tuple(s for s in LAYER_STAGES if s not in ("q_norm", "k_norm")),
}
# the family of a golden or dump that does not say (those written before families existed)
DEFAULT_FAMILY = "qwen3moe"
assert all(set(v) <= set(LAYER_STAGES) for v in FAMILY_STAGES.values())


def layer_stages(family: str) -> tuple[str, ...]:
    """The layer stages ``family`` has (KeyError for a family moesnap does not know)."""
    return FAMILY_STAGES[family]


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
)

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
    # returns (normed, residual sum); topk returns (topk_weights, topk_ids, router_logits).  Three
    # names capture/sglang.py maps itself, as they are no one stage of their own layer:
    # "input_layernorm.output.1" and "norm.output.1" (the previous layer's layer_out) and
    # "self_attn.qkv_proj.output" (q, k and v fused).
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


def canonical(name: str) -> str | None:
    """Return the canonical stage name for ``name`` (itself or an alias), or None."""
    if name in ALL_STAGES:
        return name
    return ALIASES.get(name)

