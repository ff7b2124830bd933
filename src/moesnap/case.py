"""One case (one prompt) as a value: token ids, whole-model stages and per-layer stages stacked over layers.

Pure numpy: the judge needs the value, not its storage (the Zarr v3 layout and its I/O are
:mod:`moesnap.store.case`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import numpy as np


#: the subgroup of a case group that holds an imported dump's second values of a stage (:attr:`Case.extra`)
PARTED = "parted"


@dataclass
class Case:
    tokens: np.ndarray                                     # [T] int32
    model: dict[str, np.ndarray] = field(default_factory=dict)   # embed, final_norm, logits
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # stage -> [L, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()      # arrays of the group that name no stage (read_case skipped them)
    #: what the engine computed after these rows, one serving forward each (decode steps, later chunks),
    #: each a case over its own rows with ``attrs["positions"]`` (on disk: ``steps/<n>/`` inside the group)
    steps: tuple[Case, ...] = ()
    #: arrays kept beside the stages, by their path inside the case group: an imported dump's second value
    #: of a stage that two of its names gave other values for (``parted/<i>``, described by
    #: ``attrs["parted"][i]``; judged by :mod:`moesnap.judge.compare`)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_layer(self) -> int:
        return max((a.shape[0] for a in self.layers.values()), default=0)

    @property
    def positions(self) -> np.ndarray:
        """The absolute positions of this case's rows, ``[T] int32``: ``attrs["positions"]``, else 0..T-1."""
        pos = self.attrs.get("positions") if isinstance(self.attrs, dict) else None
        if pos is None:
            return np.arange(self.tokens.shape[0], dtype=np.int32)
        return np.asarray(pos, dtype=np.int32)

    def rows(self, positions: np.ndarray | list[int]) -> Case:
        """This case's rows at ``positions`` (of a case over positions 0..T-1): tokens, whole-model
        stages and every layer's stage, as the case a candidate over those positions is judged against."""
        idx = np.asarray(positions, dtype=np.int64)
        model = {s: a[idx] for s, a in self.model.items()}
        layers = {s: a[:, idx] for s, a in self.layers.items()}
        attrs = {k: v for k, v in self.attrs.items() if k not in ("router_followed", "token_ids", "held_tokens")}
        attrs["positions"] = [int(p) for p in idx]
        return Case(tokens=self.tokens[idx], model=model, layers=layers, attrs=attrs)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array keyed by its path inside the case group."""
        out = {"tokens": self.tokens}
        out.update(self.model)
        out.update({f"layers/{s}": a for s, a in self.layers.items()})
        out.update(self.extra)
        return out

    def stage(self, stage: str, layer: int | None = None) -> np.ndarray | None:
        if layer is None:
            return self.tokens if stage == "tokens" else self.model.get(stage)
        a = self.layers.get(stage)
        if a is None or layer >= a.shape[0]:
            return None
        one: np.ndarray = a[layer]
        return one


class Recorded(Protocol):
    """What :func:`from_recorder` reads: an :class:`~moesnap.model.recorder.ArrayRecorder` after a forward."""

    @property
    def model(self) -> Mapping[str, np.ndarray]: ...

    def stacked(self) -> dict[str, np.ndarray]: ...


def stack_layers(per_layer: Mapping[str, Mapping[int, np.ndarray]], order: Iterable[str]) -> dict[str, np.ndarray]:
    """Per-layer values ``{stage: {layer: array}}`` stacked on a leading layer axis, stage by stage in
    ``order`` (stages without values left out).

    A stage some layers lack (DeepSeek: the router stages in the leading dense layers,
    ``dense_ffn_out`` in the MoE ones) is stacked over layers 0..its last one, the rows of the
    layers without it filled (:func:`fill_row`) so that row ``i`` stays layer ``i``.  Those rows
    are no values: the judge never reads them (it walks the stages each layer has,
    :func:`moesnap.stages.stages_of_layer`)."""
    out: dict[str, np.ndarray] = {}
    for stage in order:
        per = per_layer.get(stage)
        if not per:
            continue
        n = max(per) + 1
        if len(per) == n:
            out[stage] = np.stack([per[i] for i in range(n)])
            continue
        some = next(iter(per.values()))
        a = np.empty((n, *some.shape), dtype=some.dtype)
        for i in range(n):
            a[i] = per[i] if i in per else fill_row(some)
        out[stage] = a
    return out


def fill_row(like: np.ndarray) -> np.ndarray:
    """The row that stands for a layer without the stage, in a stack of rows like ``like``: NaN, or
    -1 for an integer stage."""
    return np.full(like.shape, -1 if like.dtype.kind in "iu" else np.nan, dtype=like.dtype)


def from_recorder(rec: Recorded, attrs: dict[str, Any] | None = None) -> Case:
    """Build a Case from an :class:`~moesnap.model.recorder.ArrayRecorder`."""
    model = {k: v for k, v in rec.model.items() if k != "tokens"}
    return Case(tokens=rec.model["tokens"].astype(np.int32), model=model,
                layers=rec.stacked(), attrs=dict(attrs or {}))
