"""Tolerances: how far a candidate may be from the golden and still match.

A :class:`Tolerance` is the elementwise rule the classifier applies: an element
is *outside* when ``|c - g| > atol + rtol * |g|``, and an array matches when
the fraction of elements outside is at most ``max_frac_outside``.

:class:`Tolerances` holds one per (candidate dtype, stage), plus the routing
``tie_tol`` per dtype (how close, in golden router-logit units, two experts
must be for a flip between them to count as a near tie).  Lookups fall back
from a stage's own entry to the dtype's ``"default"`` entry.  Integer stages
(``tokens``, ``topk_ids``) are compared exactly; their tolerance is zero and
cannot be overridden.

Sources, applied in this order: :data:`DEFAULT_TOLERANCES`, then
``[tool.moesnap]`` of a ``pyproject.toml`` (:meth:`Tolerances.from_pyproject`)::

    [tool.moesnap]
    tie_tol = {float32 = 1e-4, bfloat16 = 0.05}   # or one number for all dtypes

    [tool.moesnap.tolerance.float32]
    max_frac_outside = 0.0                       # bare key: every stage of float32
    default = {atol = 1e-4, rtol = 1e-3}         # stages without their own entry
    moe_out = {atol = 2e-4}                      # other keys keep their value

`default` is applied before the stage tables, so a stage table without some
key takes it from the (new) default unless the stage has a built-in entry.

then command-line overrides (:meth:`Tolerances.with_overrides`), each
``[DTYPE:][STAGE.]KEY=VALUE`` with KEY one of ``atol``, ``rtol``,
``max_frac_outside``, ``tie_tol``: ``moe_out.atol=1e-3`` (every dtype),
``bfloat16:moe_out.rtol=0.02``, ``atol=1e-4`` (every stage of every dtype),
``bfloat16:tie_tol=0.1``.  Every bad value raises :class:`ToleranceError`
with a message naming it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import ToleranceError
from ..stages import DEFAULT_FAMILY, DTYPES, INTEGER_STAGES, canonical

KEYS: tuple[str, ...] = ("atol", "rtol", "max_frac_outside", "row_rel_l2", "expert_scale")
INF_KEYS = frozenset({"row_rel_l2", "expert_scale"})   # keys where inf means "rule off"
DEFAULT = "default"


def _number(name: str, value: object, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToleranceError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value) and not (allow_inf and value == math.inf):
        raise ToleranceError(f"{name}={value!r} must be finite")
    return value


@dataclass(frozen=True)
class Tolerance:
    """Elementwise rule ``|c - g| <= atol + rtol * |g|``, allowed to fail on a
    fraction ``max_frac_outside`` of the elements; and, where ``row_rel_l2`` is
    finite, a bound on every row's relative L2 error (a row is one vector along
    the last axis: a token's hidden state, one head, one expert's output).

    The elementwise rule must admit the tails of low-precision rounding; the row
    rule sees what averages out of that noise but not out of a bug (one expert
    scaled by 2 % moves every element of its rows by 2 %), so it is what makes
    bfloat16 sensitive to small systematic errors.  ``inf`` switches it off.

    ``expert_scale`` (``expert_out`` and ``moe_out`` only) bounds each expert's
    estimated relative scale error: the least-squares factor by which the
    candidate's per-expert contributions differ from the golden's over every
    token routed to that expert.  Rounding noise averages out of that estimate
    over a whole hidden vector and many tokens; one expert's output scaled by
    2 % does not.

    Both rules apply only where each stage is judged from its own inputs
    (stage-local replay, local re-reference), never free-running, where the
    error carried through many layers is not one operation's.
    """

    atol: float
    rtol: float
    max_frac_outside: float = 0.0
    row_rel_l2: float = math.inf
    expert_scale: float = math.inf

    def __post_init__(self) -> None:
        atol = _number("atol", self.atol)
        rtol = _number("rtol", self.rtol)
        max_frac_outside = _number("max_frac_outside", self.max_frac_outside)
        row_rel_l2 = _number("row_rel_l2", self.row_rel_l2, allow_inf=True)
        expert_scale = _number("expert_scale", self.expert_scale, allow_inf=True)
        if expert_scale <= 0:
            raise ToleranceError(f"{expert_scale=} must be > 0 (inf switches the expert rule off)")
        if atol < 0:
            raise ToleranceError(f"{atol=} must be >= 0")
        if rtol < 0:
            raise ToleranceError(f"{rtol=} must be >= 0")
        if not 0.0 <= max_frac_outside <= 1.0:
            raise ToleranceError(f"{max_frac_outside=} must be in [0, 1]")
        if row_rel_l2 <= 0:
            raise ToleranceError(f"{row_rel_l2=} must be > 0 (inf switches the row rule off)")
        object.__setattr__(self, "atol", atol)
        object.__setattr__(self, "rtol", rtol)
        object.__setattr__(self, "max_frac_outside", max_frac_outside)
        object.__setattr__(self, "row_rel_l2", row_rel_l2)
        object.__setattr__(self, "expert_scale", expert_scale)

    def __str__(self) -> str:
        text = f"atol={self.atol:g}, rtol={self.rtol:g}"
        if self.max_frac_outside:
            text += f", max_frac_outside={self.max_frac_outside:g}"
        if math.isfinite(self.row_rel_l2):
            text += f", row_rel_l2={self.row_rel_l2:g}"
        if math.isfinite(self.expert_scale):
            text += f", expert_scale={self.expert_scale:g}"
        return text


EXACT = Tolerance(0.0, 0.0, 0.0)


class DtypeDefaults(NamedTuple):
    tie_tol: float                              # golden router-logit units
    max_frac_outside: float                     # for every stage of this dtype
    stages: Mapping[str, tuple[float, float]]   # stage -> (atol, rtol); "default" for the rest
    #: stage -> row rule (absent: off); a stage listed here alone has the default (atol, rtol)
    row_rel_l2: Mapping[str, float] = MappingProxyType({})
    expert_scale: float = math.inf                           # expert_out and moe_out


# THE default numbers (the only place they live), measured by `moesnap calibrate`
# (figures in benchmarks/calibration/*.json and BENCHMARKS.md): for each candidate
# dtype the reference forward was run in that dtype and in float64 on the bundled
# tiny model (4 layers), a full-width 2-layer qwen3-30b-a3b file (float32,
# bfloat16, float16) and a full-width 12-layer one (float32).  Per stage,
# atol = MARGIN * max |x_dtype - x_f64| and rtol = MARGIN * p99 of |d|/|g| over
# elements with |g| >= the stage's RMS, the largest over those models, rounded up
# to two digits; MARGIN = 10 for float32 (the spread grows with depth: ~4x from 2
# to 12 layers), 2 for bfloat16 and float16 (their own rounding dominates).
# tie_tol is the router_logits atol: experts closer than the router's own noise
# may legitimately swap.  float64 candidates are held to near-exactness.
# Regenerate: `moesnap calibrate MODEL --json PATH` and re-derive.
#
# row_rel_l2 and expert_scale (per-layer modes only: stage-local replay, local re-reference) come
# from one operation's rounding: moesnap's candidate in bfloat16/float16 judged stage-locally on the
# tiny model, an 8-layer 32-expert model and a full-width 2-layer qwen3-30b-a3b file
# (benchmarks/calibration/stage-local-*.json), and transformers' Qwen3-MoE in bfloat16 on 4 models
# x 7 prompts (the planted-bug suite's clean runs).  Largest clean row error in bfloat16: 5.1e-3 for
# most stages (ours), attn 1.05e-2 (transformers' attention), expert_out 9.0e-3, moe_out 8.9e-3
# where expert_out is not dumped; limits about 2x that.  float16: ~8x below bfloat16.  Largest
# significant expert scale estimate: 0.42 % bfloat16, 0.054 % float16; limits 1 % and 0.2 %.
# The other SwiGLU MLP outputs (:data:`SWIGLU_STAGES`: DeepSeek's dense layers, the shared experts of
# DeepSeek and Qwen2-MoE) are the same three matmuls and SwiGLU and take expert_out's row limit:
# bfloat16 stage-local on the tiny DeepSeek V2/V3 presets (6 prompts of 24 tokens), dense_ffn_out
# 0.0092 / 0.0089 and shared_expert_out 0.0099 / 0.0090 at most against expert_out's 0.0098 / 0.0086,
# with single V3 rows at 0.0112 (dense_ffn_out) and 0.0117 (shared_expert_out): over the 0.01 default.
#: the stages that are one SwiGLU MLP's output (three matmuls): expert_out's row limits
SWIGLU_STAGES: tuple[str, ...] = ("expert_out", "dense_ffn_out", "shared_expert_out")
# Qwen2-MoE's shared_gate is one logit per token: a row of one value, whose relative error is
# unbounded where the logit nears 0 (clean: 3.4e-2 bfloat16, 5.3e-3 float16 at |error| <= 5.7e-3 / 8.4e-4),
# so the row rule is off there and the elementwise rule judges it (transformers' clean Qwen1.5-MoE-A2.7B in
# bfloat16: 0.011 at a logit of 0.6 in 2 of 32 rows; transformers' clean DeepSeek-V2 tiny: dense_ffn_out 1.06e-2).
DEFAULT_TOLERANCES: Mapping[str, DtypeDefaults] = MappingProxyType({
    "float64": DtypeDefaults(
        tie_tol=1e-9,
        max_frac_outside=0.0,
        stages={DEFAULT: (1e-10, 1e-9), "embed": (1e-12, 1e-12), "logits": (1e-9, 1e-8)},
    ),
    "float32": DtypeDefaults(
        tie_tol=0.00075,
        max_frac_outside=0.0,
        expert_scale=0.002,
        stages={
            DEFAULT: (0.00075, 5e-05),
            "embed": (1e-06, 1e-06),
            "attn_norm": (0.00031, 4.8e-05),
            "q": (0.00035, 5e-05),
            "k": (0.00027, 5e-05),
            "v": (0.00026, 5e-05),
            "q_norm": (0.00033, 5.1e-05),
            "k_norm": (0.00029, 5.2e-05),
            "q_rope": (0.00033, 5.1e-05),
            "k_rope": (0.00029, 5.2e-05),
            "attn": (0.00011, 2.9e-05),
            "attn_out": (6.6e-05, 3e-05),
            "attn_resid": (0.00066, 4.5e-05),
            "ffn_norm": (0.00029, 4.7e-05),
            "router_logits": (0.00075, 5e-05),
            "topk_weights": (0.00016, 0.0002),
            "expert_out": (0.00027, 7e-05),
            "moe_out": (0.00033, 0.00015),
            "layer_out": (0.00069, 4.8e-05),
            "final_norm": (0.00026, 5e-05),
            "logits": (0.00033, 5.1e-05),
        },
    ),
    "float16": DtypeDefaults(
        tie_tol=0.046,
        max_frac_outside=0.001,
        expert_scale=0.002,
        row_rel_l2=MappingProxyType({DEFAULT: 0.0015, "embed": 0.0015, "topk_weights": 0.0015, "attn": 0.003,
                                     **dict.fromkeys(SWIGLU_STAGES, 0.003), "moe_out": 0.002, "shared_gate": math.inf}),
        stages={
            DEFAULT: (0.046, 0.0053),
            "embed": (0.002, 0.00091),
            "attn_norm": (0.022, 0.0092),
            "q": (0.02, 0.0087),
            "k": (0.02, 0.0071),
            "v": (0.018, 0.0086),
            "q_norm": (0.02, 0.0083),
            "k_norm": (0.022, 0.0082),
            "q_rope": (0.02, 0.0085),
            "k_rope": (0.021, 0.0084),
            "attn": (0.014, 0.0085),
            "attn_out": (0.012, 0.0079),
            "attn_resid": (0.034, 0.0075),
            "ffn_norm": (0.023, 0.0082),
            "router_logits": (0.046, 0.0053),
            "topk_weights": (0.0097, 0.013),
            "expert_out": (0.02, 0.013),
            "moe_out": (0.029, 0.021),
            "layer_out": (0.041, 0.0087),
            "final_norm": (0.029, 0.0091),
            "logits": (0.028, 0.01),
        },
    ),
    "bfloat16": DtypeDefaults(
        tie_tol=0.37,
        max_frac_outside=0.005,
        expert_scale=0.01,
        row_rel_l2=MappingProxyType({DEFAULT: 0.01, "embed": 0.01, "topk_weights": 0.01, "attn": 0.02,
                                     **dict.fromkeys(SWIGLU_STAGES, 0.02), "moe_out": 0.02, "shared_gate": math.inf}),
        stages={
            DEFAULT: (0.37, 0.056),
            "embed": (0.016, 0.0072),
            "attn_norm": (0.13, 0.059),
            "q": (0.18, 0.06),
            "k": (0.12, 0.054),
            "v": (0.15, 0.059),
            "q_norm": (0.15, 0.063),
            "k_norm": (0.15, 0.055),
            "q_rope": (0.16, 0.063),
            "k_rope": (0.16, 0.057),
            "attn": (0.12, 0.074),
            "attn_out": (0.09, 0.067),
            "attn_resid": (0.22, 0.054),
            "ffn_norm": (0.13, 0.061),
            "router_logits": (0.37, 0.056),
            "topk_weights": (0.084, 0.075),
            "expert_out": (0.13, 0.11),
            "moe_out": (0.17, 0.21),
            "layer_out": (0.22, 0.068),
            "final_norm": (0.16, 0.078),
            "logits": (0.21, 0.09),
        },
    ),
})


# Free-running, a low-precision candidate carries the rounding of every layer before: on the
# full-width qwen3-30b-a3b preset in bfloat16 (H200, 48 layers, 128 tokens, router replay) the
# largest router-logit difference grew from 0.075 at layer 0 to 0.28 (layer 3), 0.41 (9), 0.84 (21)
# and 0.87 (47), and the share of layer_out elements outside the 2-layer tolerance from 0 (layer
# 12) to 5.6 % (47), while each stage's own error (stage-local replay) stayed flat.  Free-running
# tolerances therefore widen as sqrt(1 + DRIFT * layer) (x 6.9 at layer 47 in bfloat16); float32
# and float64 are calibrated on 12 layers x 10 and passed 48 layers at 1 - cos 4e-11, so they do
# not widen.  The sensitive judges in low precision are the per-layer modes.
DRIFT: Mapping[str, float] = MappingProxyType({"float64": 0.0, "float32": 0.0, "bfloat16": 1.0, "float16": 1.0})


# The ``ggml`` profile: engines built on ggml (llama.cpp) compute in float32 but round every input of
# a quantized matmul to 8 bits (Q8_0 / Q8_K, see moesnap.model.ggml), ~0.5 % relative L2 per matmul
# output, which then accumulates over the layers like bfloat16's rounding.  Free-running, such an
# engine is held to these tolerances, measured by `moesnap calibrate --profile ggml --margin 2`
# (the float32 reference with ggml's activation rounding against float64;
# benchmarks/calibration/ggml-*.json): the largest over the bundled tiny model, a full-width 2-layer
# and a full-width 8-layer qwen3-30b-a3b file, rounded up, widening with depth as bfloat16 does.
# The per-layer judge (local re-reference) rounds the reference's matmul inputs the same way, so it
# computes what a correct ggml engine computes from the same inputs (llama.cpp on the tiny model: every
# stage within 3e-7 relative L2) and keeps the float32 table: that is where a ggml engine's bugs are found.
GGML_CARRIED = DtypeDefaults(
    tie_tol=0.43,
    max_frac_outside=0.005,
    stages={
        DEFAULT: (0.43, 0.2),
        "embed": (1e-06, 1e-06),
        "attn_norm": (0.15, 0.082),
        "q": (0.2, 0.076),
        "k": (0.15, 0.085),
        "v": (0.16, 0.082),
        "q_norm": (0.25, 0.079),
        "k_norm": (0.16, 0.082),
        "q_rope": (0.25, 0.079),
        "k_rope": (0.18, 0.085),
        "attn": (0.17, 0.094),
        "attn_out": (0.16, 0.092),
        "attn_resid": (0.35, 0.078),
        "ffn_norm": (0.16, 0.08),
        "router_logits": (0.43, 0.065),
        "topk_weights": (0.13, 0.17),
        "expert_out": (0.2, 0.14),
        "moe_out": (0.38, 0.2),
        "layer_out": (0.37, 0.082),
        "final_norm": (0.21, 0.099),
        "logits": (0.28, 0.11),
    },
)
GGML_DRIFT = 1.0

#: tolerance profiles: ``default`` (moesnap's own forwards, transformers, any float engine) and ``ggml``
PROFILES: tuple[str, ...] = ("default", "ggml")
#: engines (a case's ``engine`` attribute) judged with the ``ggml`` profile unless told otherwise
GGML_ENGINES = frozenset({"llama.cpp", "ggml", "ollama"})


def profile_for(engine: object) -> str:
    """The tolerance profile an engine's dump is judged with by default."""
    return "ggml" if isinstance(engine, str) and engine.lower() in GGML_ENGINES else "default"


def _dtype_name(dtype: object) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ToleranceError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def _stage_name(stage: str) -> str:
    if stage == DEFAULT:
        return DEFAULT
    name = canonical(stage)
    if name is None:
        raise ToleranceError(f"unknown stage {stage!r}")
    if name in INTEGER_STAGES:
        raise ToleranceError(f"stage {name!r} is compared exactly; tolerances do not apply to it")
    return name


class Override(NamedTuple):
    """One parsed ``[DTYPE:][STAGE.]KEY=VALUE`` setting; None means 'every'."""

    dtype: str | None
    stage: str | None
    key: str
    value: float


def parse_override(text: str) -> Override:
    """Parse ``[DTYPE:][STAGE.]KEY=VALUE`` (``bfloat16:moe_out.rtol=0.02``)."""
    spec, eq, raw = text.partition("=")
    if not eq or not spec.strip() or not raw.strip():
        raise ToleranceError(f"bad tolerance override {text!r}: expected [DTYPE:][STAGE.]KEY=VALUE")
    dtype, colon, rest = spec.strip().rpartition(":")
    stage, dot, key = rest.rpartition(".")
    key = key.strip()
    try:
        dtype_name = _dtype_name(dtype.strip()) if colon else None
        if key == "tie_tol":
            if dot:
                raise ToleranceError("tie_tol is per dtype, not per stage")
            stage_name = None
        elif key in KEYS:
            stage_name = _stage_name(stage.strip()) if dot else None
        else:
            raise ToleranceError(f"unknown key {key!r}; expected one of {', '.join(KEYS)}, tie_tol")
        try:
            value = float(raw.strip())
        except ValueError:
            raise ToleranceError(f"{key}={raw.strip()!r} is not a number") from None
        _number(key, value, allow_inf=key in INF_KEYS)
    except ToleranceError as err:
        raise ToleranceError(f"bad tolerance override {text!r}: {err}") from None
    return Override(dtype_name, stage_name, key, value)


@dataclass(frozen=True)
class Tolerances:
    """Tolerance per (candidate dtype, stage) and routing tie_tol per dtype."""

    stages: Mapping[str, Mapping[str, Tolerance]]   # dtype -> stage|"default" -> Tolerance
    tie_tols: Mapping[str, float]                   # dtype -> tie_tol
    # free-running tables where they are not ``stages`` widened by drift (the ggml profile's float32)
    carried_stages: Mapping[str, Mapping[str, Tolerance]] = field(default_factory=dict)
    carried_tie_tols: Mapping[str, float] = field(default_factory=dict)
    drift_rates: Mapping[str, float] = field(default_factory=dict)
    profile: str = "default"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ToleranceError(f"unknown tolerance profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        carried = {}
        for dtype, table in self.carried_stages.items():
            _dtype_name(dtype)
            if DEFAULT not in table or not all(isinstance(t, Tolerance) for t in table.values()):
                raise ToleranceError(f"free-running tolerances for {dtype} need a {DEFAULT!r} entry of Tolerance")
            carried[dtype] = MappingProxyType(dict(table))
        object.__setattr__(self, "carried_stages", MappingProxyType(carried))
        object.__setattr__(self, "carried_tie_tols", MappingProxyType(dict(self.carried_tie_tols)))
        object.__setattr__(self, "drift_rates", MappingProxyType({**DRIFT, **self.drift_rates}))
        # :meth:`carried`'s answers by (stage, dtype, depth): a decode step asks for each of its ~870 stages
        object.__setattr__(self, "_carried_memo", {})
        stages: dict[str, Mapping[str, Tolerance]] = {}
        for dtype in DTYPES:
            table = dict(self.stages.get(dtype, {}))
            if DEFAULT not in table:
                raise ToleranceError(f"tolerances for {dtype} have no {DEFAULT!r} entry")
            for stage, tol in table.items():
                _stage_name(stage)
                if not isinstance(tol, Tolerance):
                    raise ToleranceError(f"{dtype}:{stage} tolerance={tol!r} is not a Tolerance")
            stages[dtype] = MappingProxyType(table)
        unknown = set(self.stages) - set(DTYPES)
        if unknown:
            raise ToleranceError(f"unknown dtype {sorted(unknown)[0]!r}; expected one of {', '.join(DTYPES)}")
        tie_tols = {}
        for dtype in DTYPES:
            tie_tol = _number("tie_tol", self.tie_tols.get(dtype))
            if tie_tol < 0:
                raise ToleranceError(f"{tie_tol=} must be >= 0")
            tie_tols[dtype] = tie_tol
        object.__setattr__(self, "stages", MappingProxyType(stages))
        object.__setattr__(self, "tie_tols", MappingProxyType(tie_tols))

    def __reduce__(self) -> tuple[type[Tolerances], tuple[Any, ...]]:
        """Pickled as its constructor's arguments in plain dicts (a read-only mapping view does not
        pickle): the judge hands tolerances to worker processes (:func:`moesnap.judge.pool.submit_case`)."""
        return (Tolerances, ({d: dict(t) for d, t in self.stages.items()}, dict(self.tie_tols),
                             {d: dict(t) for d, t in self.carried_stages.items()}, dict(self.carried_tie_tols),
                             dict(self.drift_rates), self.profile))

    def __hash__(self) -> int:
        stages = tuple((d, tuple(sorted(t.items()))) for d, t in self.stages.items())
        carried = tuple((d, tuple(sorted(t.items()))) for d, t in self.carried_stages.items())
        return hash((stages, tuple(self.tie_tols.items()), carried, tuple(self.carried_tie_tols.items()),
                     tuple(self.drift_rates.items()), self.profile))

    @classmethod
    def defaults(cls, family: str = DEFAULT_FAMILY) -> Tolerances:
        """The built-in table :data:`DEFAULT_TOLERANCES`; free-running, ``family``'s own calibrated
        numbers where it has them (:mod:`moesnap.judge.family_tolerances`)."""
        from .family_tolerances import family_carried

        stages = {   # a stage with a row limit of its own but no atol/rtol of its own takes the default's
            dtype: {
                stage: Tolerance(*d.stages.get(stage, d.stages[DEFAULT]), d.max_frac_outside,
                                 d.row_rel_l2.get(stage, d.row_rel_l2.get(DEFAULT, math.inf)),
                                 d.expert_scale if stage in ("expert_out", "moe_out") else math.inf)
                for stage in {**d.stages, **d.row_rel_l2}
            }
            for dtype, d in DEFAULT_TOLERANCES.items()
        }
        own = family_carried(family)
        carried = {dtype: {**stages[dtype], **{stage: replace(stages[dtype].get(stage, stages[dtype][DEFAULT]),
                                                              atol=atol, rtol=rtol)
                                               for stage, (atol, rtol) in f.stages.items()}}
                   for dtype, f in own.items()}
        return cls(stages, {dtype: d.tie_tol for dtype, d in DEFAULT_TOLERANCES.items()}, carried,
                   {dtype: f.tie_tol for dtype, f in own.items()})

    @classmethod
    def for_profile(cls, profile: str = "default", family: str = DEFAULT_FAMILY) -> Tolerances:
        """The built-in tables of ``profile`` (:data:`PROFILES`) for a golden of ``family``.

        ``ggml``: float32 candidates are held free-running to :data:`GGML_CARRIED` (or the family's own
        ggml numbers, :mod:`moesnap.judge.family_tolerances`; widening with
        depth by :data:`GGML_DRIFT`) and, in the per-layer modes, to the float32 table (there the
        reference rounds its matmul inputs as ggml does); other dtypes as by default."""
        base = cls.defaults(family)
        if profile == "default":
            return base
        if profile != "ggml":
            raise ToleranceError(f"unknown tolerance profile {profile!r}; choose one of {', '.join(PROFILES)}")
        from .family_tolerances import family_ggml_carried

        g, own = GGML_CARRIED, family_ggml_carried(family)
        table = {**g.stages, **(own.stages if own is not None else {})}
        carried = {**base.carried_stages,
                   "float32": {stage: Tolerance(atol, rtol, g.max_frac_outside) for stage, (atol, rtol) in table.items()}}
        tie = own.tie_tol if own is not None else g.tie_tol
        return replace(base, carried_stages=carried, carried_tie_tols={**base.carried_tie_tols, "float32": tie},
                       drift_rates={"float32": GGML_DRIFT}, profile="ggml")

    def for_stage(self, stage: str, dtype: str) -> Tolerance:
        """Tolerance for ``stage`` (canonical name or alias) and candidate ``dtype``."""
        dtype = _dtype_name(dtype)
        name = canonical(stage)
        if name is None:
            raise ToleranceError(f"unknown stage {stage!r}")
        if name in INTEGER_STAGES:
            return EXACT
        table = self.stages[dtype]
        return table.get(name, table[DEFAULT])

    def tie_tol(self, dtype: str) -> float:
        """Routing near-tie width, in golden router-logit units, for ``dtype``."""
        return self.tie_tols[_dtype_name(dtype)]

    # -- free-running: the error carried through ``depth`` layers ----------------
    def drift(self, dtype: str, depth: int) -> float:
        """How much wider free-running tolerances are after ``depth`` layers: ``sqrt(1 + rate * depth)``
        (:data:`DRIFT`; the ggml profile's float32 rate is :data:`GGML_DRIFT`)."""
        return math.sqrt(1.0 + self.drift_rates[_dtype_name(dtype)] * max(0, depth))

    def carried(self, stage: str, dtype: str, depth: int) -> Tolerance:
        """The free-running tolerance of ``stage`` at layer ``depth``: ``atol`` and ``rtol`` (of the
        free-running table where the profile has one) widened by :meth:`drift`; the row and expert
        rules, which judge one operation's error, switched off."""
        memo: dict[tuple[str, str, int], Tolerance] = self.__dict__["_carried_memo"]
        key = (stage, dtype, depth)
        done = memo.get(key)
        if done is not None:
            return done
        dname = _dtype_name(dtype)
        table = self.carried_stages.get(dname)
        name = canonical(stage)
        if table is None or name is None or name in INTEGER_STAGES:
            tol = self.for_stage(stage, dtype)
        else:
            tol = table.get(name, table[DEFAULT])
        f = self.drift(dtype, depth)
        memo[key] = tol = replace(tol, atol=tol.atol * f, rtol=tol.rtol * f, row_rel_l2=math.inf,
                                  expert_scale=math.inf)
        return tol

    def tie_tol_at(self, dtype: str, depth: int) -> float:
        """The near-tie width free-running at layer ``depth`` (router logits drift too)."""
        base = self.carried_tie_tols.get(_dtype_name(dtype), self.tie_tol(dtype))
        return base * self.drift(dtype, depth)

    def with_overrides(
        self, overrides: Mapping[str, object] | Iterable[str | Override]
    ) -> Tolerances:
        """Apply ``[DTYPE:][STAGE.]KEY=VALUE`` strings (or a mapping from
        ``[DTYPE:][STAGE.]KEY`` to value), in order; later ones win."""
        if isinstance(overrides, str):
            overrides = [overrides]
        if isinstance(overrides, Mapping):
            items = [parse_override(f"{spec}={_value_text(spec, v)}") for spec, v in overrides.items()]
        else:
            items = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
        stages = {dtype: dict(table) for dtype, table in self.stages.items()}
        carried = {dtype: dict(table) for dtype, table in self.carried_stages.items()}
        tie_tols, carried_ties = dict(self.tie_tols), dict(self.carried_tie_tols)
        for o in items:
            for dtype in (o.dtype,) if o.dtype else DTYPES:
                try:
                    if o.key == "tie_tol":
                        if o.value < 0:
                            raise ToleranceError(f"tie_tol={o.value!r} must be >= 0")
                        tie_tols[dtype] = o.value
                        if dtype in carried_ties:
                            carried_ties[dtype] = o.value
                        continue
                    # an override applies to the per-layer table and to the free-running one alike
                    for table in [stages[dtype]] + ([carried[dtype]] if dtype in carried else []):
                        if o.stage is None:
                            for stage, tol in table.items():
                                table[stage] = replace(tol, **{o.key: o.value})
                        else:
                            current = table.get(o.stage, table[DEFAULT])
                            table[o.stage] = replace(current, **{o.key: o.value})
                except ToleranceError as err:
                    where = f"{o.dtype + ':' if o.dtype else ''}{o.stage + '.' if o.stage else ''}{o.key}"
                    raise ToleranceError(f"tolerance override {where}={o.value!r}: {err}") from None
        return Tolerances(stages, tie_tols, carried, carried_ties, self.drift_rates, self.profile)

    @classmethod
    def from_pyproject(cls, path: str | Path, *, base: Tolerances | None = None) -> Tolerances:
        """``base`` (default: the built-in table) with ``[tool.moesnap]`` of ``path`` applied."""
        return cls.from_section(read_section(path), base=base, where=str(path))

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *, base: Tolerances | None = None,
                     where: str = "[tool.moesnap]") -> Tolerances:
        """``base`` (default: the built-in table) with a parsed ``[tool.moesnap]`` table applied.

        Other keys of ``[tool.moesnap]`` belong to other parts of moesnap and are
        ignored here; inside ``tolerance`` and ``tie_tol`` every unknown dtype,
        stage or key is an error naming it and ``where`` (the file).
        """
        base = base if base is not None else cls.defaults()
        try:
            items = list(_pyproject_overrides(dict(section)))
        except ToleranceError as err:
            raise ToleranceError(f"{where}: {err}") from None
        try:
            return base.with_overrides(items)
        except ToleranceError as err:
            raise ToleranceError(f"{where}: {err}") from None


def read_section(path: str | Path) -> dict[str, Any]:
    """``[tool.moesnap]`` of the TOML file ``path`` (empty when it has none); the one TOML reader of
    moesnap's settings.  A file that cannot be read or parsed is refused naming it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ToleranceError(f"{path}: cannot read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ToleranceError(f"{path}: not valid TOML: {err}") from None
    tool = data.get("tool", {})
    section = tool.get("moesnap", {}) if isinstance(tool, dict) else None   # 'tool = 5' is not a table either
    if not isinstance(section, dict):
        raise ToleranceError(f"{path}: [tool.moesnap] must be a table")
    return section


def _value_text(spec: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ToleranceError(f"bad tolerance override {spec!r}: value {value!r} is not a number")
    return repr(float(value)) if not isinstance(value, str) else value


def _pyproject_overrides(section: dict[str, Any]) -> Iterable[Override]:
    tie = section.get("tie_tol")
    if tie is not None:
        if isinstance(tie, dict):
            for dtype, value in tie.items():
                if dtype not in DTYPES:
                    raise ToleranceError(f"[tool.moesnap] tie_tol: unknown dtype {dtype!r}")
                yield Override(dtype, None, "tie_tol", _number(f"tie_tol.{dtype}", value))
        else:
            yield Override(None, None, "tie_tol", _number("tie_tol", tie))
    tables = section.get("tolerance", {})
    if not isinstance(tables, dict):
        raise ToleranceError("[tool.moesnap] tolerance must be a table of dtypes")
    for dtype, table in tables.items():
        where = f"[tool.moesnap.tolerance.{dtype}]"
        if dtype not in DTYPES:
            raise ToleranceError(f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(table, dict):
            raise ToleranceError(f"{where} must be a table")
        bare = {k: v for k, v in table.items() if not isinstance(v, dict)}
        for key, value in bare.items():
            if key not in KEYS:
                raise ToleranceError(f"{where}: unknown key {key!r}; expected a stage table or one of {', '.join(KEYS)}")
            yield Override(dtype, None, key, _number(f"{dtype}.{key}", value, allow_inf=key in INF_KEYS))
        stage_tables = sorted(
            ((s, e) for s, e in table.items() if isinstance(e, dict)), key=lambda se: se[0] != DEFAULT
        )
        for stage, entry in stage_tables:
            try:
                stage_name = _stage_name(stage)
            except ToleranceError as err:
                raise ToleranceError(f"{where}: {err}") from None
            for key, value in entry.items():
                if key not in KEYS:
                    raise ToleranceError(f"{where} {stage}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
                yield Override(dtype, stage_name, key, _number(f"{dtype}:{stage}.{key}", value, allow_inf=key in INF_KEYS))
