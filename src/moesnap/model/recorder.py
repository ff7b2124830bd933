"""Explicit capture of intermediate stages.

A forward pass takes a recorder and calls ``rec.save(stage, layer, x)``.
:class:`NullRecorder` does nothing; a forward records only values it computes
anyway, so a null recorder changes nothing but the copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
import torch

from ..stages import ALL_STAGES, LAYER_STAGES, MODEL_STAGES, canonical

if TYPE_CHECKING:
    from ..case import Case

_INT32 = np.iinfo(np.int32)


def _short(x: Any, width: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= width else text[:width - 3] + "..."


class Recorder(Protocol):
    def save(self, stage: str, layer: int | None, x: torch.Tensor) -> None:
        """Record stage ``stage`` of layer ``layer`` (None for a whole-model stage) with value ``x``
        (see :meth:`ArrayRecorder.save`)."""
        ...


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
        #: the decode steps recorded after these rows (:meth:`step`), in order: (positions, recorder)
        self.steps: list[tuple[list[int], ArrayRecorder]] = []

    def _to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            return x.to(torch.int32).cpu().numpy()
        if x.dtype == torch.float64 and self.keep_dtype:
            return x.cpu().numpy()
        return x.to(torch.float32).cpu().numpy()

    def _from_host(self, stage: str, x: Any) -> np.ndarray:
        """A numpy array, a numpy scalar or a (nested) list or tuple of numbers as :meth:`_to_numpy`
        stores a tensor: integers as int32, floats as float32 (float64 kept with ``keep_dtype``)."""
        try:
            a = np.asarray(x)
        except ValueError:          # a ragged list
            raise ValueError(f"stage {stage!r}: {_short(x)} is not a rectangular array of numbers") from None
        if a.dtype.kind in "iu":
            if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
                raise ValueError(f"stage {stage!r}: integer values out of int32 range "
                                 f"[{_INT32.min}, {_INT32.max}] (min {a.min()}, max {a.max()})")
            return a.astype(np.int32)
        if a.dtype.kind == "f":
            return a.copy() if a.dtype == np.float64 and self.keep_dtype else a.astype(np.float32)
        raise TypeError(f"stage {stage!r}: a {type(x).__name__} of {a.dtype} values; "
                        f"expected integer or floating-point numbers")

    def save(self, stage: str, layer: int | None, x: torch.Tensor | np.ndarray | Sequence[Any]) -> None:
        """Record one stage's value, as a forward computes it.

        ``stage`` is a name of :data:`moesnap.stages.ALL_STAGES`.  Whole-model stages take
        ``layer=None``: ``tokens`` (the input ids, ``[T]``), ``embed`` and ``final_norm``
        (``[T, H]``), ``logits`` (``[T, V]``).  Per-layer stages take the layer's index (0-based):
        ``attn_norm``, ``attn_out``, ``attn_resid``, ``ffn_norm``, ``moe_out``, ``layer_out``
        (``[T, H]``); ``q``, ``q_norm``, ``q_rope`` (``[T, Hq, D]``); ``k``, ``v``, ``k_norm``,
        ``k_rope`` (``[T, Hkv, D]``); ``attn`` (``[T, Hq*D]``); ``router_logits`` (``[T, E]``);
        ``topk_ids`` and ``topk_weights`` (``[T, k]``, by descending weight); ``expert_out``
        (``[T, k, H]``): :mod:`moesnap.stages` lists them with their shapes.

        ``x`` is a torch tensor (any device; detached and copied to the host), a numpy array or a
        list of numbers (``rec.save("tokens", None, [1, 2, 3])``).  Integers are kept as int32,
        floats as float32 (float64 too with ``keep_dtype``).  Saving a stage again replaces it.
        An unknown stage, a layer where there is none (or none where one is needed) is a
        :class:`ValueError`; a value of another type (a string, None, a dict, ...) a
        :class:`TypeError` naming the stage and the type.
        """
        if stage not in ALL_STAGES:
            known = canonical(stage) if isinstance(stage, str) else None
            hint = f" (moesnap calls it {known!r})" if known else f"; choose one of {', '.join(ALL_STAGES)}"
            raise ValueError(f"unknown stage {stage!r}{hint}")
        if layer is None:
            if stage not in MODEL_STAGES:
                raise ValueError(f"stage {stage!r} is per-layer; give a layer")
        else:
            if stage not in LAYER_STAGES:
                raise ValueError(f"stage {stage!r} is whole-model; layer must be None")
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise TypeError(f"stage {stage!r}: layer {layer!r} is a {type(layer).__name__}; "
                                "expected an integer (or None for a whole-model stage)")
            layer = int(layer)
            if layer < 0:
                raise ValueError(f"stage {stage!r}: layer {layer} must be >= 0")
        if isinstance(x, torch.Tensor):
            arr = self._to_numpy(x)
        elif isinstance(x, (np.ndarray, np.generic, list, tuple)):
            arr = self._from_host(stage, x)
        else:
            raise TypeError(f"stage {stage!r}: cannot record a {type(x).__name__}; "
                            "expected a torch.Tensor, a numpy array or a list of numbers")
        if layer is None:
            self.model[stage] = arr
        else:
            self.layers.setdefault(stage, {})[layer] = arr

    def step(self, positions: int | Sequence[int]) -> ArrayRecorder:
        """A recorder for one decode step of your own decode loop, whose rows sit at the absolute
        ``positions`` of the sequence (one per row: a decode step of one sequence is one position)::

            rec = moesnap.Recorder()
            ...                                            # the prompt's stages into rec
            for n, tok in enumerate(continuation):
                srec = rec.step(len(prompt) + n)           # this step's stages into srec
                srec.save("tokens", None, [tok]); srec.save("moe_out", 0, x)   # ...
            case = rec.case()                              # the prompt's rows, with case.steps

        :meth:`case` then returns the prompt's rows with one step case each (``attrs`` ``positions`` and
        ``step``), judged against the golden's rows at those positions (``moesnap.compare``)."""
        pos = [int(positions)] if isinstance(positions, (int, np.integer)) else [int(p) for p in positions]
        if not pos or any(p < 0 for p in pos):
            raise ValueError(f"positions={positions!r}: expected one or more positions >= 0")
        child = ArrayRecorder(keep_dtype=self.keep_dtype)
        self.steps.append((pos, child))
        return child

    def case(self, attrs: dict[str, Any] | None = None) -> "Case":
        """What was saved as a :class:`~moesnap.case.Case` (the ``tokens`` stage must have been saved),
        with the decode steps recorded through :meth:`step` as its ``steps``."""
        from dataclasses import replace

        from ..case import from_recorder

        if "tokens" not in self.model:
            raise ValueError("save the token ids first: rec.save('tokens', None, ids)")
        case = from_recorder(self, attrs)
        if not self.steps:
            return case
        steps = []
        for n, (pos, child) in enumerate(self.steps):
            if "tokens" not in child.model:
                raise ValueError(f"decode step {n}: save its token ids first: srec.save('tokens', None, ids)")
            if child.model["tokens"].shape != (len(pos),):
                raise ValueError(f"decode step {n}: {child.model['tokens'].size} tokens for {len(pos)} positions")
            steps.append(from_recorder(child, {**(attrs or {}), "positions": pos, "step": n}))
        return replace(case, steps=tuple(steps))

    def stacked(self) -> dict[str, np.ndarray]:
        """Per-layer stages stacked on a leading layer axis, in layer order.

        A stage some layers lack (DeepSeek: the router stages in the leading dense layers,
        ``dense_ffn_out`` in the MoE ones) is stacked over layers 0..its last one, the rows of the
        layers without it filled (NaN; -1 for integer stages) so that row ``i`` stays layer ``i``.
        Those rows are no values: the judge never reads them (it walks the stages each layer has,
        :func:`moesnap.stages.stages_of_layer`)."""
        out: dict[str, np.ndarray] = {}
        for stage in LAYER_STAGES:
            per = self.layers.get(stage)
            if not per:
                continue
            n = max(per) + 1
            if len(per) == n:
                out[stage] = np.stack([per[i] for i in range(n)])
                continue
            some = next(iter(per.values()))
            a = np.full((n, *some.shape), -1 if some.dtype.kind in "iu" else np.nan, dtype=some.dtype)
            for i, row in per.items():
                a[i] = row
            out[stage] = a
        return out
