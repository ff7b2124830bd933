"""Flat dumps (one file per stage and layer) into a :class:`~moesnap.case.Case` shaped like a golden's.

A flat dump directory (SGLang's dumper, aprender's trace) names each tensor and holds its values, but
not the prompt's token ids nor each stage's shape: a golden case of the same model and prompt gives
both (:class:`Like`).  An adapter reads its files and hands each tensor to a :class:`Collector`,
which checks it against the golden's shape and builds the case:

* a tensor holds every token's rows, or the last token's alone (an engine that keeps only the row it
  samples from): its element count says which, and any other count is refused, naming the file;
* a per-layer stage the dump holds at some layers only is stored for layers ``0 .. last held``;
* rows the dump does not hold are NaN (-1 for ``topk_ids``), never the golden's values, and attribute
  ``held_tokens`` lists ``[stage, layer or None, [token indices]]`` for every (stage, layer) whose
  array holds fewer than every token's rows.  The judge (:func:`moesnap.judge.compare.compare_cases`)
  judges those rows only and counts only them as held, so nothing the dump lacks can pass;
* a stage the golden's model has at some layers only (DeepSeek: no router or experts in its leading
  dense layers, no ``dense_ffn_out`` in the MoE ones; :func:`moesnap.stages.stages_of_layer` by the
  golden's recorded config) is taken at those layers alone: what a dump gives at another layer is
  no value of the model's (an engine's zeros, a module output under the other layer kind's name),
  is not stored, and attribute ``skipped`` lists it as ``[stage, layer]``; that layer's row is filler
  as in the golden, and held by no token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import Case
from ..errors import GoldenError
from ..stages import DEFAULT_FAMILY, FAMILY_STAGES, INTEGER_STAGES, LAYER_STAGES, MODEL_STAGES, stages_of_layer

#: the case attribute naming the rows an imported array holds (read by moesnap.judge.compare)
HELD_TOKENS = "held_tokens"
#: the case attribute listing the [stage, layer] a dump gave at a layer of the golden's model without it
SKIPPED = "skipped"


@dataclass(frozen=True)
class Like:
    """What a flat dump lacks and a golden case gives: the token ids, the layer count, and the shape
    of one token's row of each stage."""

    tokens: np.ndarray                      # [T] int32
    n_layer: int
    shapes: dict[str, tuple[int, ...]]      # stage -> one token's row shape
    #: the stages each layer of the golden's model has (None: every stage at every layer)
    layer_stages: tuple[frozenset[str], ...] | None = None
    #: the golden model's family (gguf-py's architecture name; a dump's module names depend on it)
    family: str = DEFAULT_FAMILY

    @classmethod
    def of(cls, case: Case) -> Like:
        shapes = {s: tuple(int(d) for d in a.shape[1:]) for s, a in case.model.items()}
        shapes.update({s: tuple(int(d) for d in a.shape[2:]) for s, a in case.layers.items()})
        return cls(tokens=np.asarray(case.tokens, dtype=np.int32), n_layer=case.n_layer, shapes=shapes,
                   layer_stages=_layer_stages(case), family=_family(case))

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def in_layer(self, stage: str, layer: int) -> bool:
        """Layer ``layer`` of the golden's model has ``stage``."""
        return self.layer_stages is None or stage in self.layer_stages[layer]

    def row_size(self, stage: str) -> int:
        return int(np.prod(self.shapes[stage], dtype=np.int64))

    def rows(self, stage: str, n: int, source: str) -> int:
        """How many token rows ``n`` elements of ``stage`` are: every token's, or 1 (the last token's)."""
        if stage not in self.shapes:
            raise GoldenError(f"{source}: the golden holds no {stage} to take its shape from")
        per, T = self.row_size(stage), self.n_tokens
        if n == T * per:
            return T
        if n == per:
            return 1
        why = "a dump of another model or prompt than the golden's?"
        if T * per and n % (T * per) == 0:
            k = n // (T * per)
            why = (f"{k} x every token's values: a tensor-parallel rank holding the whole row where its 1/{k} was "
                   f"expected (all-gathered first, as vLLM does for OLMoE's q/k norm), or a dump of more tokens than "
                   f"the golden's?")
        raise GoldenError(f"{source}: {n} values of {stage}, whose row is {list(self.shapes[stage])} ({per} values): "
                          f"neither every token's ({T} x {per} = {T * per}) nor the last token's ({per}); {why}")


@dataclass(frozen=True)
class Parted:
    """Two files naming one stage with other values: ``first`` (earlier in the forward) and ``second``
    (later: what the case holds)."""

    stage: str
    layer: int | None
    first: str
    second: str
    first_rows: np.ndarray
    second_rows: np.ndarray

    def where(self) -> dict[str, Any]:
        """Where the two part: the first differing token, max |difference| and relative L2 of the difference."""
        a, b = self.first_rows.astype(np.float64), self.second_rows.astype(np.float64)
        if a.shape != b.shape:
            return {"token": None, "max_abs": None, "rel_l2": None, "note": f"shapes {list(a.shape)} and {list(b.shape)}"}
        d = np.abs(a - b).reshape(a.shape[0], -1)
        d = np.where(np.isnan(d), np.inf, d)
        bad = np.nonzero(d.max(axis=1) > 0)[0]
        norm = float(np.sqrt(np.nansum(a * a)))
        fin = np.isfinite(d)
        diff = float(np.sqrt(np.sum(np.where(fin, d, 0) ** 2)))
        return {"token": int(bad[0]) if bad.size else None, "max_abs": float(d.max()) if d.size else 0.0,
                "rel_l2": diff / norm if norm > 0 else None}


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"))


class Collector:
    """Tensors of one dump, checked against ``like`` as they come, then stacked into a Case."""

    def __init__(self, like: Like, *, keep_both: bool = False) -> None:
        self.like = like
        self.values: dict[tuple[str, int | None], tuple[np.ndarray, str]] = {}   # (stage, layer) -> rows, source
        self.keep_both = keep_both              # two differing names of one stage: kept (Parted), not refused
        self.parted: list[Parted] = []
        self.skipped: set[tuple[str, int]] = set()   # (stage, layer) given at a layer without the stage

    def has(self, stage: str, layer: int | None) -> bool:
        return (stage, layer) in self.values

    def get(self, stage: str, layer: int | None) -> tuple[np.ndarray, str] | None:
        return self.values.get((stage, layer))

    def rows(self, stage: str, values: np.ndarray, source: str) -> np.ndarray:
        """``values`` (any shape) as ``[T or 1, *row shape]``, checked; integer stages as int32."""
        flat = np.asarray(values).reshape(-1)
        n = self.like.rows(stage, int(flat.size), source)
        if stage in INTEGER_STAGES:
            if flat.dtype.kind == "f":
                if not np.isfinite(flat).all() or not (flat == np.round(flat)).all():
                    raise GoldenError(f"{source}: {stage} holds values that are not whole numbers")
            elif flat.dtype.kind not in "iu":
                raise GoldenError(f"{source}: {stage} holds {flat.dtype} values, not integers")
            if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
                raise GoldenError(f"{source}: {stage} holds {flat.min() if flat.min() < 0 else flat.max()}, "
                                  f"not an expert id")
            flat = flat.astype(np.int32)
        elif flat.dtype.kind not in "fiu":
            raise GoldenError(f"{source}: {stage} holds {flat.dtype} values, not real numbers")
        elif flat.dtype != np.float64:
            flat = flat.astype(np.float32)
        return flat.reshape(n, *self.like.shapes[stage])

    def add(self, stage: str, layer: int | None, values: np.ndarray, source: str) -> None:
        """Take ``values`` of ``stage`` at ``layer`` (None: a whole-model stage) from file ``source``.
        The same (stage, layer) from a second file must hold the same values."""
        if stage in LAYER_STAGES:
            if layer is None:
                raise GoldenError(f"{source}: {stage} is a per-layer stage, but the file gives no layer")
            if not 0 <= layer < self.like.n_layer:
                raise GoldenError(f"{source}: layer {layer} is beyond the golden's {self.like.n_layer} layers "
                                  f"(0..{self.like.n_layer - 1}): a dump of another model?")
        elif stage in MODEL_STAGES and stage != "tokens":
            if layer is not None:
                raise GoldenError(f"{source}: {stage} is a whole-model stage, but the file gives layer {layer}")
        else:
            raise GoldenError(f"{source}: {stage!r} is not a stage moesnap judges")
        if layer is not None and stage in self.like.shapes and not self.like.in_layer(stage, layer):
            self.skipped.add((stage, layer))     # no value of the model's: not read (module docstring)
            return
        rows = self.rows(stage, values, source)
        old = self.values.get((stage, layer))
        if old is not None:
            if not _equal(old[0], rows):
                if not self.keep_both:
                    where = f"{stage}" + (f" of layer {layer}" if layer is not None else "")
                    raise GoldenError(f"{source}: holds other values of {where} than {old[1]}: which did the engine "
                                      f"use?")
                # two names of one stage that differ (a fault between them): the later in the forward is what
                # the engine carried on; the earlier is kept beside it, and where they part is recorded
                self.parted.append(Parted(stage, layer, old[1], source, old[0], rows))
                self.values[(stage, layer)] = (rows, source)
            return
        self.values[(stage, layer)] = (rows, source)

    def case(self, attrs: dict[str, Any] | None = None) -> Case:
        """The collected tensors as a case (module docstring); an empty dump is refused by the caller."""
        T = self.like.n_tokens
        held: list[list] = []
        model: dict[str, np.ndarray] = {}
        layers: dict[str, np.ndarray] = {}
        last = [T - 1]
        for stage in MODEL_STAGES:
            got = self.values.get((stage, None))
            if got is None:
                continue
            rows = got[0]
            out = np.full((T, *rows.shape[1:]), _fill(rows), dtype=rows.dtype)
            out[T - rows.shape[0]:] = rows
            model[stage] = out
            if rows.shape[0] < T:
                held.append([stage, None, last])
        for stage in LAYER_STAGES:
            got_layers = sorted(lay for (s, lay) in self.values if s == stage and lay is not None)
            if not got_layers:
                continue
            first = self.values[(stage, got_layers[0])][0]
            dtype = np.result_type(*(self.values[(stage, lay)][0].dtype for lay in got_layers))
            out = np.full((got_layers[-1] + 1, T, *first.shape[1:]), _fill(first), dtype=dtype)
            for lay in range(got_layers[-1] + 1):
                got = self.values.get((stage, lay))
                if got is None:
                    held.append([stage, lay, []])
                    continue
                out[lay, T - got[0].shape[0]:] = got[0]
                if got[0].shape[0] < T:
                    held.append([stage, lay, last])
            layers[stage] = out
        a = dict(attrs or {})
        if held:
            a[HELD_TOKENS] = held
        if self.skipped:
            a[SKIPPED] = [[stage, layer] for layer, stage in sorted((lay, s) for s, lay in self.skipped)]
        return Case(tokens=self.like.tokens.copy(), model=model, layers=layers, attrs=a)


def _fill(a: np.ndarray) -> float | int:
    return -1 if a.dtype.kind in "iu" else np.nan


def _config(case: Case) -> Mapping | None:
    model = case.attrs.get("model") if isinstance(case.attrs, Mapping) else None
    config = model.get("config") if isinstance(model, Mapping) else None
    return config if isinstance(config, Mapping) else None


def _family(case: Case) -> str:
    """The family ``case``'s recorded config names (``arch``), :data:`DEFAULT_FAMILY` where it names none."""
    config = _config(case)
    family = config.get("arch", DEFAULT_FAMILY) if config is not None else DEFAULT_FAMILY
    return family if isinstance(family, str) else DEFAULT_FAMILY


def _layer_stages(case: Case) -> tuple[frozenset[str], ...] | None:
    """The stages each layer of the model ``case`` records (``attrs.model.config``) has; None where it
    records no config or no family moesnap knows (the judge refuses those)."""
    config = _config(case)
    family = config.get("arch", DEFAULT_FAMILY) if config is not None else None
    if config is None or not isinstance(family, str) or family not in FAMILY_STAGES:
        return None
    return tuple(frozenset(stages_of_layer(family, config, layer)) for layer in range(case.n_layer))
