"""Explicit capture of intermediate stages.

A forward pass takes a recorder and calls ``rec.save(stage, layer, x)``.
:class:`NullRecorder` does nothing; a forward records only values it computes
anyway, so a null recorder changes nothing but the copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..stages import ALL_STAGES, LAYER_STAGES, MODEL_STAGES

if TYPE_CHECKING:
    from ..case import Case


class Recorder(Protocol):
    def save(self, stage: str, layer: int | None, x: torch.Tensor) -> None: ...


class NullRecorder:
    """Records nothing; costs one call per stage."""

    def save(self, stage: str, layer: int | None, x: torch.Tensor) -> None:
        return None


class ArrayRecorder:
    """Keeps every saved stage as a numpy array on the host.

    Float stages are stored as float32 (the golden dtype) unless
    ``keep_dtype`` is set, in which case the tensor's own dtype is kept
    (bfloat16 becomes float32, numpy has no bfloat16).
    """

    def __init__(self, *, keep_dtype: bool = False) -> None:
        self.keep_dtype = keep_dtype
        self.model: dict[str, np.ndarray] = {}
        self.layers: dict[str, dict[int, np.ndarray]] = {}

    def _to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            return x.to(torch.int32).cpu().numpy()
        if x.dtype == torch.float64 and self.keep_dtype:
            return x.cpu().numpy()
        return x.to(torch.float32).cpu().numpy()

    def save(self, stage: str, layer: int | None, x: torch.Tensor) -> None:
        if stage not in ALL_STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        arr = self._to_numpy(x)
        if layer is None:
            if stage not in MODEL_STAGES:
                raise ValueError(f"stage {stage!r} is per-layer; give a layer")
            self.model[stage] = arr
        else:
            if stage not in LAYER_STAGES:
                raise ValueError(f"stage {stage!r} is whole-model; layer must be None")
            self.layers.setdefault(stage, {})[layer] = arr

    def case(self, attrs: dict[str, Any] | None = None) -> "Case":
        """What was saved as a :class:`~moesnap.case.Case` (the ``tokens`` stage must have been saved)."""
        from ..case import from_recorder

        if "tokens" not in self.model:
            raise ValueError("save the token ids first: rec.save('tokens', None, torch.tensor(ids))")
        return from_recorder(self, attrs)

    def stacked(self) -> dict[str, np.ndarray]:
        """Per-layer stages stacked on a leading layer axis, in layer order."""
        out: dict[str, np.ndarray] = {}
        for stage in LAYER_STAGES:
            per = self.layers.get(stage)
            if not per:
                continue
            out[stage] = np.stack([per[i] for i in sorted(per)])
        return out
