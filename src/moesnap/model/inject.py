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
``route:layer=L,token=T``
    token ``T`` takes its (k+1)-th ranked expert instead of its k-th; the
    renormalised weights are recomputed over the new set.

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
from typing import Protocol, Sequence

import gguf

from .config import Qwen3MoeConfig
from ..errors import UsageError
from ..stages import INTEGER_STAGES, LAYER_STAGES
from .tensors import LAYER_TENSORS

__all__ = [
    "Injection", "NanExpert", "QtypeAs", "ScaleStage", "RouteFlip",
    "KINDS", "LAYER_TENSORS", "parse_inject", "validate_injection", "check_injections",
]

#: block types the decoder can be told to use (``as=``), by lower-case name
DECODE_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    t.name.lower(): t for t in sorted(
        (gguf.GGMLQuantizationType[n] for n in
         ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")),
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
    @abstractmethod
    def spec(self) -> str:
        """The fault as ``--inject`` syntax (round-trips through :func:`parse_inject`)."""

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

    @property
    def spec(self) -> str:
        return f"nan:layer={self.layer},expert={self.expert}"


@dataclass(frozen=True)
class QtypeAs(Injection):
    tensor: str
    as_qtype: gguf.GGMLQuantizationType

    kind = "qtype"

    @property
    def target_stage(self) -> str:
        return LAYER_TENSORS[self.tensor]

    @property
    def spec(self) -> str:
        return f"qtype:layer={self.layer},tensor={self.tensor},as={self.as_qtype.name.lower()}"


@dataclass(frozen=True)
class ScaleStage(Injection):
    stage: str
    factor: float

    kind = "scale"

    @property
    def target_stage(self) -> str:
        return self.stage

    @property
    def spec(self) -> str:
        return f"scale:layer={self.layer},stage={self.stage},factor={self.factor!r}"


@dataclass(frozen=True)
class RouteFlip(Injection):
    token: int

    kind = "route"
    target_stage = "topk_ids"

    @property
    def spec(self) -> str:
        return f"route:layer={self.layer},token={self.token}"


#: kind -> (class, keys in spec order)
KINDS: dict[str, tuple[type[Injection], tuple[str, ...]]] = {
    "nan": (NanExpert, ("layer", "expert")),
    "qtype": (QtypeAs, ("layer", "tensor", "as")),
    "scale": (ScaleStage, ("layer", "stage", "factor")),
    "route": (RouteFlip, ("layer", "token")),
}
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
    if isinstance(inj, NanExpert):
        _range("expert", inj.expert, cfg.n_expert, "experts")
    elif isinstance(inj, QtypeAs):
        if inj.tensor not in LAYER_TENSORS:
            raise UsageError(f"tensor={inj.tensor!r} is not a layer tensor; choose one of {', '.join(LAYER_TENSORS)}")
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
    elif isinstance(inj, RouteFlip):
        if cfg.n_expert_used >= cfg.n_expert:
            raise UsageError(f"route:layer={inj.layer} needs an unselected expert to flip to, "
                             f"but the model routes every token to all {cfg.n_expert} experts")
        if isinstance(inj.token, bool) or not isinstance(inj.token, int) or inj.token < 0:
            raise UsageError(f"token={inj.token!r} must be an integer >= 0")
        if inj.token >= cfg.context_length:
            raise UsageError(f"token={inj.token} is out of range: the model's context is {cfg.context_length} tokens")


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


def _parse(spec: str, cfg: Qwen3MoeConfig) -> Injection:
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not sep:
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
    missing = [k for k in keys if k not in values]
    if missing:
        raise UsageError(f"missing {', '.join(k + '=' for k in missing)} (expected {kind}:"
                         + ",".join(f"{k}=…" for k in keys) + ")")

    layer = _int("layer", values["layer"])
    _range("layer", layer, cfg.n_layer, "layers")
    if cls is NanExpert:
        inj: Injection = NanExpert(layer=layer, expert=_int("expert", values["expert"]))
    elif cls is QtypeAs:
        tensor = values["tensor"].lower()
        if tensor not in LAYER_TENSORS:
            raise UsageError(f"tensor={values['tensor']!r} is not a layer tensor; choose one of {', '.join(LAYER_TENSORS)}")
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
