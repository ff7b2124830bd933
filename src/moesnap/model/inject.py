"""Planted faults for the candidate forward (``moesnap check --inject SPEC``).

Each fault is a frozen dataclass naming the layer it hits and
(:attr:`Injection.target_stage`) the stage where it first shows, which is
what a check must report.  The spec syntax is ``KIND:KEY=VALUE,...``:

``nan:layer=L,expert=E``
    expert ``E`` of layer ``L`` outputs NaN for every token routed to it.
``qtype:layer=L,tensor=NAME,as=TYPE``
    tensor ``blk.L.NAME`` is decoded with the ``TYPE`` block routine instead
    of its own (the real bug: ``tensor=ffn_down_exps,as=q4_k`` on a Q6_K
    layer); see :func:`moesnap.gguf.quants_torch.decode_as`.
``scale:layer=L,stage=STAGE,factor=F``
    the value of per-layer stage ``STAGE`` is multiplied by ``F`` and the
    scaled value flows on downstream.
```route:layer=L,token=T``
    token ``T`` takes its (k+1)-th ranked expert instead of its k-th; the
    renormalised weights are recomputed over the new set.

Serving faults (:class:`ServeFault`) act in **decode steps only** (a prompt, whole or in chunks, is
clean), in a :class:`~moesnap.model.serve.Session`; decode step ``S`` counts from 0, the first token
after the prompt:

``rope_pos:step=S``
    in decode step ``S`` RoPE rotates q and k by position ``p+1`` instead of ``p`` (every layer;
    first shows in layer 0 ``q_rope``).
``kv_slot:layer=L``
    layer ``L`` writes each decode step's k/v row to the slot of position ``p-1`` (overwriting the
    previous token's) instead of ``p``; first shows in layer ``L`` ``attn``.
``kv_short:layer=L``
    layer ``L``'s decode attention covers one cached slot too few (the sequence length passed to the
    kernel is one short: the newest key is left out); layer ``L`` ``attn``.
``block_table:seq=S,block=B``
    the block table attention reads (paged cache) points sequence ``S``'s block ``B`` at another
    sequence's block; the cache writes go to the right slots.  Layer 0 ``attn``, from the first decode
    step whose keys reach block ``B``.
``pad_attend`` / ``pad_attend:layer=L``
    decode attention without its key-padding mask (every layer, or layer ``L`` only): a sequence
    attends the slots past its own length up to the longest of the batch (all the cache's slots on
    a CUDA graph's static buffers); ``attn``.
``swap_rows`` / ``swap_rows:layer=L``
    the attention output rows of the batch's first two sequences are exchanged (every layer, or
    layer ``L`` only); ``attn``.
``mxfp4_scale:layer=L,tensor=NAME[,shift=S]``
    tensor ``blk.L.NAME`` (stored as MXFP4) is decoded with every block's E8M0 exponent read ``S``
    off (default 1: each value doubled); see :func:`moesnap.gguf.quants_torch.decode_scale_off`.
    Refused for a tensor of another type.
``window:layer=L[,by=N]``
    sliding layer ``L`` attends ``window + N`` positions instead of ``window`` (default ``N = 1``: the
    classic off-by-one); ``attn``.  Refused on a layer that does not slide, and where no prompt is
    long enough for the two windows to differ.

A family's parts, left out or done the other way at layer ``L`` (``KIND:layer=L``; :data:`PARTS`, data:
each refused in one line where the model, or the layer, lacks the part, or where it would change nothing):

``sink_off``
    the attention ignores its sinks (a softmax without the sink logits; gpt-oss); ``attn``.
``rope_flip``
    RoPE turns NeoX's halves where the family turns adjacent pairs (Mixtral's permuted rows, DeepSeek's
    rope part), or pairs where it turns halves; ``q_rope``.  Refused where every prompt is one token.
``qk_norm_flip``
    the q/k RMSNorm per head where the family normalises the whole projection (OLMoE), or over the whole
    projection where it normalises per head (Qwen3-MoE); ``q_norm``.
``bias_off``
    the score-correction bias (``exp_probs_b``, DeepSeek-V3) is left out of the selection; ``router_select``.
``renorm_flip``
    the k routing weights renormalised where the family keeps them (Qwen2-MoE, OLMoE, DeepSeek without
    ``topk_norm``), or kept where it renormalises (Qwen3-MoE, Mixtral); ``topk_weights``.
``scale_off``
    the routed weights are not multiplied by ``routed_scale`` (DeepSeek; refused where it is 1); ``topk_weights``.
``shared_off``
    the shared experts' output is computed but not added to the routed mixture; ``moe_out``.
``shared_gate_off``
    Qwen2-MoE's shared expert is added without its sigmoid gate (its logit, ``shared_gate``, is computed);
    ``moe_out``.

``graph_stale:step=S``
    the decode step on static buffers (:class:`~moesnap.model.serve.GraphDecoder`, CUDA graph) is
    replayed at step ``S`` with the static token buffer not refreshed (it still holds step ``S-1``'s
    token); first shows in ``embed``.

The forward applies faults through :class:`moesnap.model.faults.Faults`.
:func:`moesnap.model.inject_serving.check_serving` refuses, in one line, a serving fault that cannot fire
in a planned run (:class:`~moesnap.model.inject_serving.ServePlan`).

:func:`parse_inject` checks everything it can against the model's config and
raises :class:`~moesnap.errors.UsageError` with one line naming the bad value;
:func:`check_injections` what needs the model file and the prompts (a ``qtype`` fault
on a tensor already of that type, a ``token`` beyond a prompt).  Every message quotes
the spec as the user gave it (:attr:`Injection.option`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, ClassVar, NamedTuple, Protocol, Sequence

import gguf

from .config import Qwen3MoeConfig
from ..errors import UsageError
from ..stages import INTEGER_STAGES, LAYER_STAGES, stages_of_layer
from .tensors import LAYER_TENSORS, TABLES, table

__all__ = [
    "Injection", "NanExpert", "QtypeAs", "ScaleStage", "RouteFlip",
    "MxfpScale", "WindowOff", "PartOff", "PARTS", "SinkOff", "BiasOff", "SharedOff", "ScaleOff", "ServeFault", "RopePos", "KvSlot", "KvShort", "BlockTable", "PadAttend", "SwapRows", "GraphStale",
    "KINDS", "LAYER_TENSORS", "parse_inject", "validate_injection", "check_injections",
]

#: block types the decoder can be told to use (``as=``), by lower-case name
DECODE_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    t.name.lower(): t for t in sorted(
        (gguf.GGMLQuantizationType[n] for n in
         ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
          "MXFP4")),
        key=lambda t: t.value)
}

#: stages a scale fault may hit (every per-layer float stage)
SCALABLE_STAGES: tuple[str, ...] = tuple(s for s in LAYER_STAGES if s not in INTEGER_STAGES)


@dataclass(frozen=True)
class Injection(ABC):
    """Base of all planted faults: the layer it hits; ``given``, the spec as the user wrote it
    (:func:`parse_inject` keeps it; it takes no part in equality)."""

    layer: int
    given: str | None = field(default=None, compare=False, repr=False, kw_only=True)

    @property
    @abstractmethod
    def kind(self) -> str:
        """The fault's name in ``--inject`` syntax (``nan``, ``qtype``, ``scale``, ``route``)."""

    @property
    @abstractmethod
    def target_stage(self) -> str:
        """The first stage (in computation order) whose value the fault changes."""

    @property
    def spec(self) -> str:
        """The fault as ``--inject`` syntax (round-trips through :func:`parse_inject`): its kind, then each key
        :data:`KINDS` lists for it, with the value of the field of that name (``as``: ``as_qtype``)."""
        def value(key: str) -> str:
            v = getattr(self, "as_qtype" if key == "as" else key)
            return v.name.lower() if key == "as" else repr(v) if key == "factor" else str(v)
        return f"{self.kind}:" + ",".join(f"{key}={value(key)}" for key in KINDS[self.kind][1])

    @property
    def target_layer(self) -> int | None:
        """The layer of :attr:`target_stage` (None for a whole-model stage)."""
        return self.layer

    @property
    def option(self) -> str:
        """``--inject 'SPEC'`` as the user gave it (the canonical spec for a fault built in code): what
        every message about this fault starts with."""
        spec = self.given if self.given is not None else self.spec
        return f"--inject {spec!r}"

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class NanExpert(Injection):
    expert: int

    kind = "nan"
    target_stage = "expert_out"


@dataclass(frozen=True)
class QtypeAs(Injection):
    tensor: str
    as_qtype: gguf.GGMLQuantizationType

    kind = "qtype"

    @property
    def target_stage(self) -> str:
        return _tensor_stage(self.tensor) or LAYER_TENSORS[self.tensor]


@dataclass(frozen=True)
class ScaleStage(Injection):
    stage: str
    factor: float

    kind = "scale"

    @property
    def target_stage(self) -> str:
        return self.stage


@dataclass(frozen=True)
class RouteFlip(Injection):
    token: int

    kind = "route"
    target_stage = "topk_ids"


def _tensor_stage(tensor: str) -> str | None:
    """The stage a per-layer tensor (bare name, any family's) feeds first, or None for an unknown name."""
    for t in TABLES.values():
        if tensor in t.layer_tensors:
            return t.layer_tensors[tensor]
    return None


@dataclass(frozen=True)
class MxfpScale(Injection):
    tensor: str
    shift: int = 1

    kind = "mxfp4_scale"

    @property
    def target_stage(self) -> str:
        return _tensor_stage(self.tensor) or "expert_out"


@dataclass(frozen=True)
class WindowOff(Injection):
    by: int = 1

    kind = "window"
    target_stage = "attn"


class Part(NamedTuple):
    """A family part a :class:`PartOff` fault breaks: the stage it shows in first, whether only a MoE layer
    has it, and why a model cannot have it broken (``lacks(cfg)``: "" where it can)."""

    stage: str
    moe: bool
    lacks: Callable[[Qwen3MoeConfig], str]


_SOFTMAX = ("softmax_topk_renorm", "softmax_topk", "softmax_grouped")


def _renorm_lacks(c: Qwen3MoeConfig) -> str:
    if c.gating == "topk_softmax":
        return "has top-k weights that are a softmax over the k chosen (they sum to 1 renormalised or not)"
    if c.gating in _SOFTMAX and c.n_expert_used >= c.n_expert:
        return f"routes every token to all {c.n_expert} experts (their softmax weights sum to 1 renormalised or not)"
    return ""


#: the family parts a ``KIND:layer=L`` fault leaves out or does the other way (module docstring), by kind
PARTS: dict[str, Part] = {
    "sink_off": Part("attn", False, lambda c: "" if c.attn_sinks else "has no attention sinks to ignore"),
    "rope_flip": Part("q_rope", False, lambda c: ""),
    "qk_norm_flip": Part("q_norm", False, lambda c: "has no q/k norm" if not c.qk_norm else
                         "has one head (per head is the whole projection)" if c.n_head == 1 else ""),
    "bias_off": Part("router_select", True,
                     lambda c: "" if c.router_probs_bias else "has no score-correction bias (exp_probs_b)"),
    "renorm_flip": Part("topk_weights", True, _renorm_lacks),
    "scale_off": Part("topk_weights", True, lambda c: "" if c.routed_scale != 1.0 else "has no routed scale"
                      if c.gating not in ("softmax_grouped", "sigmoid_grouped") else
                      "has a routed scale of 1 (leaving it out changes nothing)"),
    "shared_off": Part("moe_out", True, lambda c: "" if c.n_shared_experts else "has no shared experts"),
    "shared_gate_off": Part("moe_out", True, lambda c: "" if c.shared_expert_gate else
                            "has no shared-expert gate (ffn_gate_inp_shexp)"),
}


@dataclass(frozen=True)
class PartOff(Injection):
    """A family part (:data:`PARTS`) left out or done the other way at ``layer``; ``part`` names it to
    :meth:`~moesnap.model.faults.Faults.off`."""

    part: str

    @property
    def kind(self) -> str:
        return self.part

    @property
    def target_stage(self) -> str:
        return PARTS[self.part].stage


# the spellings of earlier code
SinkOff, BiasOff = partial(PartOff, part="sink_off"), partial(PartOff, part="bias_off")
SharedOff, ScaleOff = partial(PartOff, part="shared_off"), partial(PartOff, part="scale_off")


@dataclass(frozen=True)
class ServeFault(Injection):
    """A fault of serving (KV cache, batches, CUDA graphs): it acts in decode steps only.  ``layer`` is the
    first layer it shows in; ``every_layer`` faults act in every layer."""

    every_layer: ClassVar[bool] = False


@dataclass(frozen=True)
class RopePos(ServeFault):
    step: int

    kind = "rope_pos"
    target_stage = "q_rope"
    every_layer = True


@dataclass(frozen=True)
class KvSlot(ServeFault):
    kind = "kv_slot"
    target_stage = "attn"


@dataclass(frozen=True)
class KvShort(ServeFault):
    kind = "kv_short"
    target_stage = "attn"


@dataclass(frozen=True)
class BlockTable(ServeFault):
    seq: int
    block: int

    kind = "block_table"
    target_stage = "attn"
    every_layer = True


@dataclass(frozen=True)
class _AnyLayer(ServeFault):
    """A fault of every layer (``only=False``, spec without ``layer=``) or of ``layer`` alone."""

    only: bool = False

    @property
    def every_layer(self) -> bool:  # type: ignore[override]
        return not self.only

    def hits(self, layer: int) -> bool:
        return not self.only or layer == self.layer

    @property
    def spec(self) -> str:
        return f"{self.kind}:layer={self.layer}" if self.only else self.kind


@dataclass(frozen=True)
class PadAttend(_AnyLayer):
    kind = "pad_attend"
    target_stage = "attn"


@dataclass(frozen=True)
class SwapRows(_AnyLayer):
    kind = "swap_rows"
    target_stage = "attn"


@dataclass(frozen=True)
class GraphStale(ServeFault):
    step: int

    kind = "graph_stale"
    target_stage = "embed"
    every_layer = True

    @property
    def target_layer(self) -> int | None:
        return None


#: kind -> (class, keys in spec order); keys in :data:`OPTIONAL` may be left out
KINDS: dict[str, tuple[type[Injection], tuple[str, ...]]] = {
    "nan": (NanExpert, ("layer", "expert")),
    "qtype": (QtypeAs, ("layer", "tensor", "as")),
    "scale": (ScaleStage, ("layer", "stage", "factor")),
    "route": (RouteFlip, ("layer", "token")),
    "mxfp4_scale": (MxfpScale, ("layer", "tensor", "shift")),
    "window": (WindowOff, ("layer", "by")),
    **{part: (PartOff, ("layer",)) for part in PARTS},
    "rope_pos": (RopePos, ("step",)),
    "kv_slot": (KvSlot, ("layer",)),
    "kv_short": (KvShort, ("layer",)),
    "block_table": (BlockTable, ("seq", "block")),
    "pad_attend": (PadAttend, ("layer",)),
    "swap_rows": (SwapRows, ("layer",)),
    "graph_stale": (GraphStale, ("step",)),
}
#: kind -> the keys it may leave out (a fault of every layer)
OPTIONAL: dict[str, frozenset[str]] = {"pad_attend": frozenset({"layer"}), "swap_rows": frozenset({"layer"}),
                                       "mxfp4_scale": frozenset({"shift"}), "window": frozenset({"by"})}
EXAMPLE = "nan:layer=6,expert=3"


def _int(key: str, text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise UsageError(f"{key}={text!r} is not an integer") from None


def _range(key: str, value: int, n: int, what: str) -> None:
    if not 0 <= value < n:
        raise UsageError(f"{key}={value} is out of range: the model has {n} {what}")


def validate_injection(inj: Injection, cfg: Qwen3MoeConfig) -> None:
    """Raise :class:`UsageError` if ``inj`` does not fit the model ``cfg``."""
    if not isinstance(inj, Injection) or type(inj) is Injection:
        raise UsageError(f"not a fault injection: {inj!r}")
    if isinstance(inj.layer, bool) or not isinstance(inj.layer, int):
        raise UsageError(f"layer={inj.layer!r} is not an integer")
    _range("layer", inj.layer, cfg.n_layer, "layers")
    _layer_has(inj, cfg)
    if isinstance(inj, NanExpert):
        _range("expert", inj.expert, cfg.n_expert, "experts")
    elif isinstance(inj, QtypeAs):
        if inj.tensor not in table(cfg.arch).layer_tensors:
            raise UsageError(f"tensor={inj.tensor!r} is not a layer tensor; choose one of "
                             f"{', '.join(table(cfg.arch).layer_tensors)}")
        if inj.as_qtype not in DECODE_TYPES.values():
            raise UsageError(f"as={inj.as_qtype!r} is not a supported quant type; "
                             f"choose one of {', '.join(DECODE_TYPES)}")
    elif isinstance(inj, ScaleStage):
        if inj.stage in INTEGER_STAGES:
            raise UsageError(f"stage={inj.stage} holds expert ids and cannot be scaled; "
                             f"use route:layer={inj.layer},token=T to flip a routing decision")
        if inj.stage not in SCALABLE_STAGES:
            raise UsageError(f"stage={inj.stage!r} is not a per-layer stage; choose one of {', '.join(SCALABLE_STAGES)}")
        if isinstance(inj.factor, bool) or not isinstance(inj.factor, (int, float)):
            raise UsageError(f"factor={inj.factor!r} is not a number")
    elif isinstance(inj, MxfpScale):
        if inj.tensor not in table(cfg.arch).layer_tensors:
            raise UsageError(f"tensor={inj.tensor!r} is not a layer tensor; choose one of "
                             f"{', '.join(table(cfg.arch).layer_tensors)}")
        if isinstance(inj.shift, bool) or not isinstance(inj.shift, int) or inj.shift == 0:
            raise UsageError(f"shift={inj.shift!r} must be a non-zero integer (exponent steps)")
    elif isinstance(inj, PartOff):
        if inj.part not in PARTS:
            raise UsageError(f"part={inj.part!r} is no family part; choose one of {', '.join(PARTS)}")
        why = PARTS[inj.part].lacks(cfg)
        if why:
            raise UsageError(f"the model ({cfg.arch}) {why}")
    elif isinstance(inj, WindowOff):
        if isinstance(inj.by, bool) or not isinstance(inj.by, int) or inj.by == 0:
            raise UsageError(f"by={inj.by!r} must be a non-zero integer")
        if not cfg.slides(inj.layer):
            sliding = [i for i in range(cfg.n_layer) if cfg.slides(i)]
            raise UsageError(f"layer {inj.layer} attends every position (no sliding window); "
                             + (f"the sliding layers are {', '.join(map(str, sliding))}" if sliding
                                else f"the model ({cfg.arch}) has no sliding-window layers"))
        if cfg.sliding_window + inj.by < 1:
            raise UsageError(f"by={inj.by} leaves a window of {cfg.sliding_window + inj.by} positions; "
                             f"the layer's window is {cfg.sliding_window}")
    elif isinstance(inj, (RopePos, GraphStale)):
        first = 1 if isinstance(inj, GraphStale) else 0
        if isinstance(inj.step, bool) or not isinstance(inj.step, int) or inj.step < first:
            why = " (step 0 has no earlier token to keep)" if first else ""
            raise UsageError(f"step={inj.step!r} must be an integer >= {first}{why}")
    elif isinstance(inj, BlockTable):
        for key in ("seq", "block"):
            value = getattr(inj, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{key}={value!r} must be an integer >= 0")
    elif isinstance(inj, RouteFlip):
        if cfg.n_expert_used >= cfg.n_expert:
            raise UsageError(f"route:layer={inj.layer} needs an unselected expert to flip to, "
                             f"but the model routes every token to all {cfg.n_expert} experts")
        if isinstance(inj.token, bool) or not isinstance(inj.token, int) or inj.token < 0:
            raise UsageError(f"token={inj.token!r} must be an integer >= 0")
        if inj.token >= cfg.context_length:
            raise UsageError(f"token={inj.token} is out of range: the model's context is {cfg.context_length} tokens")


def _layer_has(inj: Injection, cfg: Qwen3MoeConfig) -> None:
    """Refuse a fault of a layer that lacks what it breaks (it could not fire): the router or the experts of
    a dense layer (DeepSeek's leading ones), a stage or a tensor the layer does not have."""
    if isinstance(inj, ServeFault):
        return
    if cfg.dense(inj.layer) and (isinstance(inj, (NanExpert, RouteFlip)) or
                                 isinstance(inj, PartOff) and inj.part in PARTS and PARTS[inj.part].moe):
        moe = [i for i in range(cfg.n_layer) if not cfg.dense(i)]
        raise UsageError(f"layer {inj.layer} is dense (no router, no experts); the MoE layers are {moe[0]}..{moe[-1]}")
    if isinstance(inj, ScaleStage) and inj.stage in SCALABLE_STAGES and \
            inj.stage not in stages_of_layer(cfg.arch, cfg.to_dict(), inj.layer):
        raise UsageError(f"stage={inj.stage} is not a stage of layer {inj.layer} of this {cfg.arch} model, "
                         "so nothing would change")
    tensor = getattr(inj, "tensor", None)
    held = table(cfg.arch).in_layer(inj.layer, cfg.layer_where(inj.layer))
    if isinstance(tensor, str) and tensor in table(cfg.arch).layer_tensors and tensor not in held:
        raise UsageError(f"tensor={tensor} is not in layer {inj.layer} of this {cfg.arch} model; it holds "
                         f"{', '.join(held)}")


def parse_inject(spec: str, cfg: Qwen3MoeConfig) -> Injection:
    """Parse one ``--inject`` spec (syntax in the module docstring) and check it against ``cfg``."""
    if not isinstance(spec, str):
        raise UsageError(f"--inject {spec!r}: a spec is a string, KIND:KEY=VALUE,... (e.g. {EXAMPLE})")
    try:
        return replace(_parse(spec, cfg), given=spec)
    except UsageError as err:
        raise UsageError(f"--inject {spec!r}: {err}") from None


class _TensorTypes(Protocol):
    def tensor_type(self, name: str) -> gguf.GGMLQuantizationType: ...

    @property
    def config(self) -> Qwen3MoeConfig: ...


def check_injections(injections: Sequence[Injection], model: _TensorTypes, n_tokens: Sequence[int]) -> None:
    """Refuse, before any forward runs, a fault that needs what :func:`parse_inject` cannot see: a
    ``qtype`` fault on a tensor the ``model`` file already stores in that type (nothing would change),
    a ``route`` fault on a token beyond one of the prompts (``n_tokens``: each prompt's length)."""
    for inj in injections:
        if isinstance(inj, QtypeAs):
            stored = model.tensor_type(f"blk.{inj.layer}.{inj.tensor}")
            if stored == inj.as_qtype:
                raise UsageError(f"{inj.option}: blk.{inj.layer}.{inj.tensor} already is {stored.name}, "
                                 "so nothing would change; choose another type or tensor")
        if isinstance(inj, RouteFlip) and n_tokens and inj.token >= min(n_tokens):
            raise UsageError(f"{inj.option}: token={inj.token} is out of range: "
                             + (f"the prompt has {n_tokens[0]} tokens" if len(set(n_tokens)) == 1 else
                                f"the shortest of the {len(n_tokens)} prompts has {min(n_tokens)} tokens"))
        if isinstance(inj, MxfpScale):
            stored = model.tensor_type(f"blk.{inj.layer}.{inj.tensor}")
            if stored != gguf.GGMLQuantizationType.MXFP4:
                raise UsageError(f"{inj.option}: blk.{inj.layer}.{inj.tensor} is {stored.name}, not MXFP4, "
                                 "so it has no E8M0 block scale to misread; choose an MXFP4 tensor")
        if isinstance(inj, PartOff) and inj.part == "rope_flip" and n_tokens and max(n_tokens) < 2:
            raise UsageError(f"{inj.option}: the planted fault cannot fire (every prompt is one token, at position 0, "
                             "which RoPE does not turn)")
        if isinstance(inj, WindowOff) and n_tokens:
            window = model.config.sliding_window
            if max(n_tokens) <= min(window, window + inj.by):
                raise UsageError(f"{inj.option}: the planted fault cannot fire (a window of {window} and one of "
                                 f"{window + inj.by} positions differ only from position {min(window, window + inj.by)} "
                                 f"on; the longest prompt has {max(n_tokens)} tokens)")


def _parse(spec: str, cfg: Qwen3MoeConfig) -> Injection:
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not sep and not (kind in KINDS and OPTIONAL.get(kind, frozenset()) >= set(KINDS[kind][1])):
        raise UsageError(f"expected KIND:KEY=VALUE,... (e.g. {EXAMPLE}); kinds: {', '.join(KINDS)}")
    if kind not in KINDS:
        raise UsageError(f"unknown fault kind {kind!r}; choose one of {', '.join(KINDS)}")
    cls, keys = KINDS[kind]
    values: dict[str, str] = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise UsageError(f"{item!r} is not KEY=VALUE")
        if key not in keys:
            raise UsageError(f"unknown key {key!r} for {kind}; expected {', '.join(keys)}")
        if key in values:
            raise UsageError(f"key {key!r} given twice")
        values[key] = value
    missing = [k for k in keys if k not in values and k not in OPTIONAL.get(kind, ())]
    if missing:
        raise UsageError(f"missing {', '.join(k + '=' for k in missing)} (expected {kind}:"
                         + ",".join(f"{k}=…" for k in keys) + ")")

    layer = _int("layer", values.get("layer", "0"))
    _range("layer", layer, cfg.n_layer, "layers")
    if cls in (RopePos, GraphStale):
        inj: Injection = cls(layer=0, step=_int("step", values["step"]))  # type: ignore[call-arg]
    elif cls in (KvSlot, KvShort):
        inj = cls(layer=layer)
    elif cls is BlockTable:
        inj = BlockTable(layer=0, seq=_int("seq", values["seq"]), block=_int("block", values["block"]))
    elif cls in (PadAttend, SwapRows):
        inj = cls(layer=layer, only="layer" in values)  # type: ignore[call-arg]
    elif cls is MxfpScale:
        inj = MxfpScale(layer=layer, tensor=values["tensor"].lower(), shift=_int("shift", values.get("shift", "1")))
    elif cls is PartOff:
        inj = PartOff(layer=layer, part=kind)
    elif cls is WindowOff:
        inj = WindowOff(layer=layer, by=_int("by", values.get("by", "1")))
    elif cls is NanExpert:
        inj = NanExpert(layer=layer, expert=_int("expert", values["expert"]))
    elif cls is QtypeAs:
        tensor = values["tensor"].lower()
        if tensor not in table(cfg.arch).layer_tensors:
            raise UsageError(f"tensor={values['tensor']!r} is not a layer tensor; choose one of "
                             f"{', '.join(table(cfg.arch).layer_tensors)}")
        qname = values["as"].lower()
        if qname not in DECODE_TYPES:
            raise UsageError(f"as={values['as']!r} is not a supported quant type; choose one of {', '.join(DECODE_TYPES)}")
        inj = QtypeAs(layer=layer, tensor=tensor, as_qtype=DECODE_TYPES[qname])
    elif cls is ScaleStage:
        stage = values["stage"]
        try:
            factor = float(values["factor"])
        except ValueError:
            raise UsageError(f"factor={values['factor']!r} is not a number") from None
        if not math.isfinite(factor):
            raise UsageError(f"factor={values['factor']!r} must be finite (use nan:layer=L,expert=E to plant NaN)")
        inj = ScaleStage(layer=layer, stage=stage, factor=factor)
    else:
        inj = RouteFlip(layer=layer, token=_int("token", values["token"]))
    validate_injection(inj, cfg)
    return inj
