"""What one forward of the candidate is given and gives back: the golden routing it follows at near
ties (:class:`RouterReplay`), where it followed it (:class:`Followed`), its results (:class:`Output`,
:class:`LayerOutput`) and the arguments of one call handed down its stages (``_Call``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .faults import Faults
from .kvcache import Batch, KVCache
from .recorder import Recorder
from .static_replay import StaticReplay

__all__ = ["RouterReplay", "Followed", "Output", "LayerOutput"]
# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RouterReplay:
    """The golden routing a candidate follows at near ties: ``ids [L, T, k]``, router
    ``logits [L, T, E]`` (numpy, any layer count), the tie width in logit units (one for every
    layer or one per layer, ``[L]``) and ``gap(logits_row, ids)``, the judge's near-tie gap of
    choosing ``ids`` under golden logits (:func:`moesnap.judge.routing.tie_gap`; passed in, so that the
    model does not depend on the judge)."""

    ids: np.ndarray
    logits: np.ndarray
    tie_tol: float | np.ndarray
    gap: Callable[[np.ndarray, np.ndarray], float]

    def tie_tol_at(self, i: int) -> float:
        t = np.asarray(self.tie_tol, dtype=np.float64)
        return float(t) if t.ndim == 0 else float(t[min(i, t.size - 1)])

    def layer(self, i: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
        if i >= len(self.ids) or i >= len(self.logits):
            return None
        ids, logits = np.asarray(self.ids[i]), np.asarray(self.logits[i])
        if ids.ndim != 2 or logits.ndim != 2 or ids.shape[0] != n_tokens or logits.shape[0] != n_tokens:
            return None
        return ids, logits

    def rows(self, positions: Sequence[int] | np.ndarray) -> RouterReplay:
        """The same guide for a forward over the golden's rows at ``positions`` only (a decode step, a
        chunk of a prompt)."""
        idx = np.asarray(positions, dtype=np.int64)
        return RouterReplay(np.asarray(self.ids)[:, idx], np.asarray(self.logits)[:, idx], self.tie_tol, self.gap)


class Followed(NamedTuple):
    """Where a forward continued with the golden's experts instead of its own: the layer, the row of the
    forward (the token index of its case) and the experts the candidate itself chose."""

    layer: int
    token: int
    own: list[int]


class Output(NamedTuple):
    """What :meth:`CandidateModel.forward` returns: the logits ``[T, V]`` (compute dtype) and where it
    followed the golden's experts."""

    logits: torch.Tensor
    followed: tuple[Followed, ...]


class LayerOutput(NamedTuple):
    """What :meth:`CandidateModel.forward_layer` returns: the layer's output ``[T, H]`` and where it
    followed the golden's experts."""

    out: torch.Tensor
    followed: tuple[Followed, ...]


@dataclass
class _Call:
    """What one forward call was given, and the experts it followed: made by the public entry
    points, handed down explicitly, never kept on the model."""

    rec: Recorder
    faults: Faults
    guide: RouterReplay | StaticReplay | None = None   # StaticReplay: decided on the device
    force: Mapping[str, np.ndarray | torch.Tensor] | None = None
    batch: Batch | None = None          # rows attend through ``cache`` (else: causal over themselves)
    cache: KVCache | None = None
    followed: list[Followed] = field(default_factory=list)

    def emit(self, stage: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A stage's value: passed through the planted faults, recorded, and passed on (the golden's
        value instead, where stage-local replay forces this stage)."""
        x = self.faults.stage(layer, stage, x)
        self.rec.save(stage, layer, x)
        forced = self.force.get(stage) if self.force is not None and stage != "topk_ids" else None
        if forced is not None and tuple(forced.shape) == tuple(x.shape):
            t = forced if isinstance(forced, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(forced))
            return t.to(x.device, x.dtype)
        return x
