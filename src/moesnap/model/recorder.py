"""Explicit capture of intermediate stages.

A forward pass takes a recorder and calls ``rec.save(stage, layer, x)``.
:class:`NullRecorder` does nothing; a forward records only values it computes
anyway, so a null recorder changes nothing but the copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

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


#: a batched recorder copies what it holds to the host once this many values are waiting
BATCH_VALUES = 1 << 24


class ArrayRecorder:
    """Keeps every saved stage as a numpy array on the host.

    Float stages are stored as float32 (the golden dtype) unless
    ``keep_dtype`` is set, in which case the tensor's own dtype is kept
    (bfloat16 becomes float32, numpy has no bfloat16).

    ``batched``: a saved tensor is converted where it lives and held there; everything held goes to the
    host in one copy per dtype when :attr:`model` or :attr:`layers` is first read (or once
    :data:`BATCH_VALUES` values wait).  A forward of one row (a decode step) saves ~18 small stages per
    layer: copied one by one, each copy waits for the device, and its dispatch costs more than its
    bytes.  The same values either way, bit for bit.
    """

    def __init__(self, *, keep_dtype: bool = False, batched: bool = False) -> None:
        self.keep_dtype = keep_dtype
        self.batched = batched
        self._model: dict[str, np.ndarray] = {}
        self._layers: dict[str, dict[int, np.ndarray]] = {}
        #: saved tensors not yet on the host (``batched``): (stage, layer, converted flat tensor, shape)
        self._held: list[tuple[str, int | None, torch.Tensor, tuple[int, ...]]] = []
        self._held_values = 0
        #: the decode steps recorded after these rows (:meth:`step`), in order: (positions, recorder)
        self.steps: list[tuple[list[int], ArrayRecorder]] = []

    @property
    def model(self) -> dict[str, np.ndarray]:
        """Whole-model stages by name."""
        self._to_host()
        return self._model

    @property
    def layers(self) -> dict[str, dict[int, np.ndarray]]:
        """Per-layer stages: ``{stage: {layer: array}}``."""
        self._to_host()
        return self._layers

    def _converted(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype it is stored in (int32, float32, or float64 with ``keep_dtype``)."""
        return x.detach().to(self._stored_dtype(x))

    def _to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return self._converted(x).cpu().numpy()

    def _stored_dtype(self, x: torch.Tensor) -> torch.dtype:
        if x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            return torch.int32
        return x.dtype if x.dtype == torch.float64 and self.keep_dtype else torch.float32

    def _hold(self, stage: str, layer: int | None, x: torch.Tensor) -> None:
        # one dispatch where a decode step's ~18 saves a layer count: a copy in the stored dtype (always a copy, so
        # later in-place writes do not reach it), contiguous, so the flat view below is free
        y = (x.detach() if x.requires_grad else x).to(self._stored_dtype(x), memory_format=torch.contiguous_format,
                                                      copy=True)
        self._held.append((stage, layer, y.view(-1), tuple(y.shape)))
        self._held_values += y.numel()
        if self._held_values >= BATCH_VALUES:
            self._to_host()

    def _to_host(self) -> None:
        """Every held tensor copied to the host: one concatenation and one copy per dtype."""
        if not self._held:
            return
        held, self._held, self._held_values = self._held, [], 0
        by_dtype: dict[torch.dtype, list[int]] = {}
        for j, (_, _, flat, _) in enumerate(held):
            by_dtype.setdefault(flat.dtype, []).append(j)
        arrays: list[np.ndarray | None] = [None] * len(held)
        for js in by_dtype.values():
            flats = [held[j][2] for j in js]
            host = (torch.cat(flats) if len(flats) > 1 else flats[0]).cpu().numpy()
            at = 0
            for j in js:
                n = held[j][2].numel()
                arrays[j] = host[at:at + n].reshape(held[j][3])
                at += n
        for (stage, layer, _, _), arr in zip(held, arrays):   # in save order: a later save replaces
            assert arr is not None
            self._store(stage, layer, arr)

    def _store(self, stage: str, layer: int | None, arr: np.ndarray) -> None:
        if layer is None:
            self._model[stage] = arr
        else:
            self._layers.setdefault(stage, {})[layer] = arr

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
        (``[T, k, H]``).  Stages of some families only: DeepSeek's ``q_latent``,
        ``q_latent_norm``, ``kv_latent``, ``kv_latent_norm``, ``dense_ffn_out``, ``router_select``
        (``[T, E]``) and ``shared_expert_out`` (``[T, H]``, Qwen2-MoE's too), Qwen2-MoE's
        ``shared_gate`` (``[T, 1]``): :mod:`moesnap.stages` lists them all with their shapes.

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
            if self.batched:
                self._hold(stage, layer, x)
                return
            arr = self._to_numpy(x)
        elif isinstance(x, (np.ndarray, np.generic, list, tuple)):
            arr = self._from_host(stage, x)
            self._to_host()                  # what was held before comes first
        else:
            raise TypeError(f"stage {stage!r}: cannot record a {type(x).__name__}; "
                            "expected a torch.Tensor, a numpy array or a list of numbers")
        self._store(stage, layer, arr)

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
        child = ArrayRecorder(keep_dtype=self.keep_dtype, batched=self.batched)
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
        """Per-layer stages stacked on a leading layer axis, in layer order
        (:func:`moesnap.case.stack_layers`: a stage some layers lack is stacked over layers 0..its last
        one, the rows of the layers without it filled)."""
        from ..case import stack_layers

        return stack_layers(self.layers, LAYER_STAGES)

    def pop_layer(self, layer: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s stages as saved (``{stage: array}``), no longer held here: a forward's
        finished layer handed on (to a store that writes it while the next layer runs) leaves the
        recorder, so that :meth:`stacked` and :meth:`case` hold the other layers only."""
        out = {}
        for stage, per in self.layers.items():
            if layer in per:
                out[stage] = per.pop(layer)
        return out


#: one layer stage's allotment: (the shape of one layer's value, its dtype, the layers that have it)
Allotment = tuple[tuple[int, ...], Any, tuple[int, ...]]


class LayerRecorder(ArrayRecorder):
    """Records one forward into arrays allotted before it runs, and says when each layer is made: the
    judge reads layer ``l`` (:meth:`ready`) while the forward computes layer ``l + 1``.

    :attr:`made` holds the arrays from the start: ``tokens``; each whole-model stage of ``model``
    ({stage: (shape, dtype)}); each layer stage of ``layers`` ({stage: (shape of one layer, dtype, the
    layers that have it)}) stacked over layers 0..the last that has it, the rows of the layers without
    it filled as :func:`moesnap.case.stack_layers` fills them.  So once made it is, array for array,
    the case :func:`moesnap.case.from_recorder` builds from an :class:`ArrayRecorder` of the same forward.

    The forward saves into it as into an :class:`ArrayRecorder` (``batched``: one copy to the host per
    layer, when the layer is done, instead of one per stage); its driver calls :meth:`layer_done` after
    each layer, :meth:`finish` at the end, :meth:`fail` where it raised.  A stage saved that was not
    allotted, or one allotted and not saved by the end of its layer, is a ``ValueError``: the allotment
    and the forward disagree, and what the judge would read is not what the forward made.
    """

    def __init__(self, tokens: np.ndarray, *, layers: Mapping[str, Allotment],
                 model: Mapping[str, tuple[tuple[int, ...], Any]], attrs: dict[str, Any] | None = None,
                 batched: bool = False) -> None:
        import threading

        from ..case import Case, fill_row

        super().__init__(batched=batched)
        stacked: dict[str, np.ndarray] = {}
        self._of_layer: dict[int, set[str]] = {}
        for stage, (shape, dtype, have) in layers.items():
            if not have:
                continue
            a = np.zeros((max(have) + 1, *shape), dtype=dtype)
            for i in sorted(set(range(a.shape[0])) - set(have)):
                a[i] = fill_row(a[i])
            stacked[stage] = a
            for i in have:
                self._of_layer.setdefault(i, set()).add(stage)
        #: the case being made (its arrays filled as the layers are made)
        self.made: Case = Case(tokens=np.asarray(tokens, dtype=np.int32),
                               model={s: np.zeros(shape, dtype=dt) for s, (shape, dt) in model.items()},
                               layers=stacked, attrs=dict(attrs or {}))
        self._saved: set[tuple[int | None, str]] = set()
        self._made: set[int] = set()
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @property
    def model(self) -> dict[str, np.ndarray]:
        """Whole-model stages by name (those not yet made hold zeros)."""
        return {"tokens": self.made.tokens, **self.made.model}

    @property
    def layers(self) -> dict[str, dict[int, np.ndarray]]:
        """Per-layer stages, ``{stage: {layer: array}}``, of the layers that have them (views)."""
        return {s: {i: a[i] for i in range(a.shape[0]) if s in self._of_layer.get(i, ())}
                for s, a in self.made.layers.items()}

    def stacked(self) -> dict[str, np.ndarray]:
        """The allotted per-layer arrays themselves."""
        return dict(self.made.layers)

    # -- the forward's side
    def _store(self, stage: str, layer: int | None, arr: np.ndarray) -> None:
        if stage == "tokens" and layer is None:
            if not np.array_equal(arr, self.made.tokens):
                raise ValueError(f"tokens {arr.tolist()[:8]}: the forward ran other tokens than the ones allotted")
            return
        if layer is None:
            dst = self.made.model.get(stage)
        else:
            dst = self.made.layers.get(stage) if stage in self._of_layer.get(layer, ()) else None
            dst = None if dst is None else dst[layer]
        where = stage if layer is None else f"{stage} of layer {layer}"
        if dst is None:
            raise ValueError(f"{where}: saved by the forward, not allotted")
        if dst.shape != arr.shape or dst.dtype != arr.dtype:
            raise ValueError(f"{where}: saved as {arr.dtype} {list(arr.shape)}, allotted {dst.dtype} {list(dst.shape)}")
        dst[...] = arr
        self._saved.add((layer, stage))

    def layer_done(self, layer: int) -> None:
        """Layer ``layer`` is computed: its values on the host, every allotted stage of it saved, and it
        marked made (:meth:`ready` returns for it)."""
        self._to_host()
        lacking = sorted(s for s in self._of_layer.get(layer, ()) if (layer, s) not in self._saved)
        if lacking:
            raise ValueError(f"layer {layer}: {', '.join(lacking)} allotted, not saved by the forward")
        with self._cond:
            self._made.add(layer)
            self._cond.notify_all()

    def finish(self) -> None:
        """The forward is done: every allotted whole-model stage saved; :meth:`ready` returns for all."""
        self._to_host()
        lacking = sorted(s for s in self.made.model if (None, s) not in self._saved)
        made = set(self._made)
        lacking += [f"layer {i}" for i in sorted(set(self._of_layer) - made)]
        if lacking:
            raise ValueError(f"{', '.join(lacking)} allotted, not made by the forward")
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The forward raised ``error``: :meth:`ready` raises it for every layer not made (a recorder
        already finished keeps what it made)."""
        with self._cond:
            if not self._finished:
                self._error, self._finished = error, True
            self._cond.notify_all()

    # -- the judge's side
    def ready(self, layer: int | None) -> None:
        """Return once layer ``layer`` is made (and what the forward computes before it: ``embed`` with
        layer 0), or with None once all of it is; what went wrong in making it is raised here."""
        with self._cond:
            self._cond.wait_for(lambda: self._finished or (layer is not None and layer in self._made))
        if self._error is not None and (layer is None or layer not in self._made):
            raise self._error

    @property
    def finished(self) -> bool:
        """Made to the end, or failed."""
        return self._finished
