"""Free-running tolerances a model family has calibrated for itself: data, read by
:meth:`~moesnap.judge.tolerances.Tolerances.defaults`; the judge has no per-family code.

A family's free-running spread (its own reference in a low precision against float64, carried
through the layers) can be wider than Qwen3-MoE's, on which :data:`~moesnap.judge.tolerances.DEFAULT_TOLERANCES`
were measured.  Where it is, the family lists here, per candidate dtype, the free-running
``(atol, rtol)`` of each stage and the free-running near-tie width; they become the
:attr:`~moesnap.judge.tolerances.Tolerances.carried_stages` / ``carried_tie_tols`` of a judgement
against a golden of that family (widened with depth as every free-running tolerance is).  The
per-layer modes (stage-local replay, local re-reference) judge one operation's rounding, which a
family does not change: they keep the built-in tables, and with them their sensitivity.

gpt-oss (measured with ``moesnap calibrate --margin 1``; ``benchmarks/calibration/gpt-oss-*.json``): on
the ``gpt-oss-tiny`` preset (4 layers, three prompts of 12, 6 and 24 tokens) and a 2-layer file of the
``gpt-oss-20b`` preset (full width, 24 tokens), each stage's ``atol = MARGIN * max |x_dtype - x_f64|``
and ``rtol = MARGIN * p99 |d| / |g|`` (MARGIN 10 for float32, 2 for bfloat16 and float16, as the
built-in tables), the larger of the two models, rounded up to two digits and never below the
built-in value; the near-tie width is the ``router_logits`` atol.  bfloat16 spreads 2-4x wider than
Qwen3-MoE's at the same depth (the 2-layer 20b file: ``moe_out`` p99 0.25 against ~0.1; its
``topk_weights``, a softmax over only k selected logits, p99 0.22), so transformers' clean bfloat16
gpt-oss failed the built-in free-running table (``moe_out`` 0.6 % of elements outside where 0.5 % is
allowed) while its per-layer judgement passed.  Stages not listed keep the built-in value.

The ``ggml`` profile (llama.cpp: float32 with every quantized matmul's input rounded to 8 bits) has its
own free-running float32 numbers per family likewise (``calibrate --profile ggml``,
``benchmarks/calibration/ggml-gpt-oss-*.json``): llama.cpp's clean gpt-oss-tiny failed
``GGML_CARRIED`` free-running (``expert_out`` 1.4 % of elements outside) while the local
re-reference found every stage of every layer within float32 noise of a correct ggml engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple


class FamilyCarried(NamedTuple):
    """One dtype's free-running numbers of a family."""

    tie_tol: float                              # golden router-logit units, free-running
    stages: Mapping[str, tuple[float, float]]   # stage -> (atol, rtol)


FAMILY_CARRIED: Mapping[str, Mapping[str, FamilyCarried]] = MappingProxyType({
    "gpt-oss": MappingProxyType({
        "float32": FamilyCarried(tie_tol=0.00075, stages={
            "attn": (0.00017, 9.6e-05), "attn_out": (9.3e-05, 6.8e-05), "attn_resid": (0.0015, 4.8e-05),
            "router_logits": (0.00075, 6e-05), "expert_out": (0.0013, 7.2e-05), "moe_out": (0.0011, 0.00015),
            "layer_out": (0.0021, 5.4e-05), "final_norm": (0.00026, 6.1e-05), "logits": (0.00033, 6.7e-05),
        }),
        "bfloat16": FamilyCarried(tie_tol=1.4, stages={
            "embed": (0.03, 0.0072), "attn_norm": (0.48, 0.16), "q": (0.45, 0.19), "k": (0.48, 0.19),
            "v": (0.43, 0.2), "q_rope": (0.61, 0.2), "k_rope": (0.57, 0.2), "attn": (0.7, 0.37),
            "attn_out": (0.35, 0.36), "attn_resid": (3.9, 0.3), "ffn_norm": (0.45, 0.28),
            "router_logits": (1.4, 0.2), "topk_weights": (0.3, 0.45), "expert_out": (4.6, 0.29),
            "moe_out": (8.7, 0.5), "layer_out": (9.5, 0.32), "final_norm": (1.6, 0.39), "logits": (2.0, 0.39),
        }),
        "float16": FamilyCarried(tie_tol=0.16, stages={
            "embed": (0.0035, 0.00091), "attn_norm": (0.036, 0.018), "q": (0.047, 0.019), "k": (0.05, 0.017),
            "v": (0.048, 0.019), "q_rope": (0.063, 0.02), "k_rope": (0.068, 0.018), "attn": (0.052, 0.029),
            "attn_out": (0.042, 0.032), "attn_resid": (0.26, 0.015), "ffn_norm": (0.041, 0.016),
            "router_logits": (0.16, 0.023), "topk_weights": (0.019, 0.032), "expert_out": (0.43, 0.033),
            "moe_out": (0.55, 0.037), "layer_out": (0.46, 0.025), "final_norm": (0.064, 0.022),
            "logits": (0.092, 0.025),
        }),
    }),
})


#: the ``ggml`` profile's float32 free-running numbers of a family (in place of ``GGML_CARRIED``):
#: ``moesnap calibrate --profile ggml --margin 1`` on the same two models, MARGIN 2 as for GGML_CARRIED
FAMILY_GGML_CARRIED: Mapping[str, FamilyCarried] = MappingProxyType({
    "gpt-oss": FamilyCarried(tie_tol=0.98, stages={
        "attn_norm": (0.32, 0.15), "q": (0.41, 0.21), "k": (0.44, 0.24), "v": (0.44, 0.21),
        "q_rope": (0.54, 0.21), "k_rope": (0.59, 0.21), "attn": (0.55, 0.4), "attn_out": (0.38, 0.28),
        "attn_resid": (2.4, 0.25), "ffn_norm": (0.38, 0.21), "router_logits": (0.98, 0.11),
        "topk_weights": (0.15, 0.24), "expert_out": (5.3, 0.39), "moe_out": (4.0, 0.31),
        "layer_out": (4.4, 0.2), "final_norm": (0.78, 0.24), "logits": (0.96, 0.29),
    }),
})


def family_carried(family: str) -> Mapping[str, FamilyCarried]:
    """``family``'s own free-running numbers by dtype (empty: the built-in tables judge it)."""
    return FAMILY_CARRIED.get(family, MappingProxyType({}))


def family_ggml_carried(family: str) -> FamilyCarried | None:
    """``family``'s own float32 free-running numbers under the ``ggml`` profile, if it has them."""
    return FAMILY_GGML_CARRIED.get(family)


def family_note(family: str) -> str | None:
    """What a report says when ``family``'s own numbers judge it free-running."""
    own = family_carried(family)
    if not own:
        return None
    return (f"tolerances: free-running, a golden of {family!r} is judged with that family's own calibrated "
            f"spread ({', '.join(own)}; moesnap.judge.family_tolerances); the per-layer modes keep the built-in "
            f"tables")
