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

The forward never branches on a fault: a :class:`Faults` value (built once from the injections and the
model, passed to :meth:`~moesnap.model.candidate.CandidateModel.forward` as ``faults=``, like the
recorder) owns each point where a fault can act (how a tensor is decoded, a stage's value, the top-k
choice, the rows of an expert's output) and records which faults changed something
(:meth:`Faults.unfired`).  :data:`NO_FAULTS` plants nothing.

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
from typing import Iterable, Protocol, Sequence

import gguf
import torch

from ..gguf import quants_torch

from .config import Qwen3MoeConfig
from ..errors import UsageError
from ..stages import INTEGER_STAGES, LAYER_STAGES
from .tensors import LAYER_TENSORS

__all__ = [
    "Injection", "NanExpert", "QtypeAs", "ScaleStage", "RouteFlip",
    "KINDS", "LAYER_TENSORS", "parse_inject", "validate_injection", "check_injections", "Faults", "NO_FAULTS",
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


# --------------------------------------------------------------------------- applying them


class _Model(_TensorTypes, Protocol):
    @property
    def config(self) -> Qwen3MoeConfig: ...


class Faults:
    """The planted faults of one run, applied where the candidate forward hands them a value.

    Built once (``Faults(injections, model)``: each fault validated against the model's config, a
    ``qtype`` fault on a tensor already of that type refused) and passed to every forward of the run
    as an argument; the forward calls the methods below at fixed points and never asks which faults
    there are.  :attr:`fired` collects the faults that changed a value in any forward so far.
    """

    def __init__(self, injections: Sequence[Injection] = (), model: _Model | None = None) -> None:
        self.injections: tuple[Injection, ...] = tuple(injections)
        if self.injections and model is None:
            raise UsageError("planted faults need the model they are planted in")
        if model is not None:
            for inj in self.injections:
                validate_injection(inj, model.config)
            check_injections(self.injections, model, ())
        self._qtype = {(j.layer, j.tensor): j.as_qtype for j in self.injections if isinstance(j, QtypeAs)}
        self._scale: dict[tuple[int, str], float] = {}
        for j in self.injections:
            if isinstance(j, ScaleStage):
                self._scale[(j.layer, j.stage)] = self._scale.get((j.layer, j.stage), 1.0) * j.factor
        self._nan = {(j.layer, j.expert): j for j in self.injections if isinstance(j, NanExpert)}
        self._flips: dict[int, list[RouteFlip]] = {}
        for j in self.injections:
            if isinstance(j, RouteFlip):
                self._flips.setdefault(j.layer, []).append(j)
        self._flipped_in: dict[tuple[int, int], int] = {}   # (layer, token) -> the expert a flip brought in
        self._fired: set[Injection] = set()

    def __bool__(self) -> bool:
        return bool(self.injections)

    @property
    def fired(self) -> frozenset[Injection]:
        """The faults that changed a value in some forward so far."""
        return frozenset(self._fired)

    def unfired(self, fired_elsewhere: Iterable[Injection] = ()) -> list[Injection]:
        """The faults whose effect depends on the run and that changed nothing in any forward so far
        (nor, for the expert-parallel ranks, in ``fired_elsewhere``): a NaN expert no token routed to, a
        routing flip that router replay undid because it fell within the near-tie width."""
        done = self._fired | set(fired_elsewhere)
        return [j for j in self.injections if isinstance(j, (NanExpert, RouteFlip)) and j not in done]

    # -- what a forward asks -------------------------------------------------------------------------
    def check_tokens(self, n_tokens: int) -> None:
        """Refuse a routing flip of a token beyond a forward of ``n_tokens`` rows."""
        for flips in self._flips.values():
            for j in flips:
                if j.token >= n_tokens:
                    raise UsageError(f"token={j.token} is out of range: the prompt has {n_tokens} tokens")

    def dequantize(self, data: torch.Tensor, qtype: gguf.GGMLQuantizationType, layer: int | None, tensor: str,
                   dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``tensor`` of ``layer`` (None: a whole-model tensor) decoded from its stored bytes: by its
        own type's routine, or by another's where a ``qtype`` fault says so."""
        as_qtype = self._qtype.get((layer, tensor)) if layer is not None else None
        if as_qtype is None:
            return quants_torch.dequantize(data, qtype, out_dtype=dtype)
        return quants_torch.decode_as(data, qtype, as_qtype, out_dtype=dtype)

    def stage(self, layer: int, stage: str, x: torch.Tensor) -> torch.Tensor:
        """A stage's value as the forward passes it on (scaled where a ``scale`` fault says so)."""
        f = self._scale.get((layer, stage))
        return x if f is None else x * f

    def topk(self, layer: int, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``k`` (probabilities, expert ids) of each row of ``probs [T, E]``, descending; a
        ``route`` fault's token takes its (k+1)-th ranked expert instead of its k-th."""
        flips = self._flips.get(layer)
        if not flips:
            return torch.topk(probs, k, dim=-1)
        pw, pid = torch.topk(probs, k + 1, dim=-1)                              # [T, k+1]
        tokens = [j.token for j in flips]
        rows = torch.tensor(tokens, device=pw.device)
        pw[rows, k - 1], pid[rows, k - 1] = pw[rows, k], pid[rows, k]
        for t, e in zip(tokens, pid[rows, k - 1].tolist()):
            self._flipped_in[(layer, t)] = int(e)
        return pw[:, :k], pid[:, :k]

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        """The experts ``ids [T, k]`` the layer finally runs (after router replay): a flip fired where its
        token still runs the expert it brought in (replay following the golden's experts undoes it)."""
        for j in self._flips.get(layer, ()):
            e = self._flipped_in.pop((layer, j.token), None)
            if e is not None and e in ids[j.token].tolist():
                self._fired.add(j)

    def expert_rows(self, layer: int, experts: Sequence[int], out: torch.Tensor, bounds: Sequence[int]) -> None:
        """``out [n, H]`` holds the rows of ``experts`` (global ids), expert ``g``'s in
        ``out[bounds[g]:bounds[g+1]]``; a ``nan`` fault's expert outputs NaN for every row it got."""
        if not self._nan:
            return
        for g, e in enumerate(experts):
            j = self._nan.get((layer, e))
            if j is not None and bounds[g + 1] > bounds[g]:
                out[bounds[g]:bounds[g + 1]] = float("nan")
                self._fired.add(j)


#: plants nothing
NO_FAULTS = Faults()
