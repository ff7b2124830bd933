"""Planted faults as the candidate forward applies them: one :class:`Faults` value per run.

The forward never branches on a fault.  A :class:`Faults` (built once from the injections of
:mod:`moesnap.model.inject` and the model) is passed to every forward of a run as an argument, like the
recorder, and owns each point where a fault can act: how a tensor is decoded, a stage's value, the top-k
choice, the rows of an expert's output, and for decode steps the :class:`~moesnap.model.kvcache.Batch`
a forward (:meth:`Faults.step`) and each of its layers (:meth:`Faults.layer`) attend with, and whether
a static token buffer is refreshed (:meth:`Faults.refresh`).  It records which faults changed
something (:meth:`Faults.unfired`).  :data:`NO_FAULTS` plants nothing.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import gguf
import torch

from ..errors import UsageError
from ..gguf import quants_torch
from .config import Qwen3MoeConfig
from .inject import (BlockTable, GraphStale, Injection, KvShort, KvSlot, MxfpScale, NanExpert, PadAttend, PartOff, QtypeAs,
                     RopePos, RouteFlip, ScaleStage, ServeFault, SwapRows, WindowOff, check_injections, validate_injection)
from .kvcache import Batch

__all__ = ["Faults", "NO_FAULTS"]


class _TensorTypes(Protocol):
    def tensor_type(self, name: str) -> gguf.GGMLQuantizationType: ...


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
        self._mxfp4 = {(j.layer, j.tensor): j.shift for j in self.injections if isinstance(j, MxfpScale)}
        self._window = {j.layer: j for j in self.injections if isinstance(j, WindowOff)}
        self._off = {(j.layer, j.part): j for j in self.injections if isinstance(j, PartOff)}
        self._scale: dict[tuple[int, str], float] = {}
        for j in self.injections:
            if isinstance(j, ScaleStage):
                self._scale[(j.layer, j.stage)] = self._scale.get((j.layer, j.stage), 1.0) * j.factor
        self._nan = {(j.layer, j.expert): j for j in self.injections if isinstance(j, NanExpert)}
        self._flips: dict[int, list[RouteFlip]] = {}
        for j in self.injections:
            if isinstance(j, RouteFlip):
                self._flips.setdefault(j.layer, []).append(j)
        self._flipped_in: dict[tuple[int, int], tuple[RouteFlip, int]] = {}  # (layer, row) -> (flip, expert in)
        self._fired: set[Injection] = set()
        self._serve = [j for j in self.injections if isinstance(j, ServeFault)]
        self._layer_faults = [j for j in self._serve if isinstance(j, (KvSlot, KvShort, PadAttend, SwapRows))]

    def __bool__(self) -> bool:
        return bool(self.injections)

    @property
    def fired(self) -> frozenset[Injection]:
        """The faults that changed a value in some forward so far."""
        return frozenset(self._fired)

    def unfired(self, fired_elsewhere: Iterable[Injection] = ()) -> list[Injection]:
        """The faults whose effect depends on the run and that changed nothing in any forward so far
        (nor, for the expert-parallel ranks, in ``fired_elsewhere``): a NaN expert no token routed to, a
        routing flip that router replay undid because it fell within the near-tie width, a serving fault
        whose decode step, sequence or block never came."""
        done = self._fired | set(fired_elsewhere)
        return [j for j in self.injections if isinstance(j, (NanExpert, RouteFlip, ServeFault, WindowOff))
                and j not in done]

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
        shift = self._mxfp4.get((layer, tensor)) if layer is not None else None
        if shift is not None:
            return quants_torch.decode_scale_off(data, qtype, shift, out_dtype=dtype)
        if as_qtype is None:
            return quants_torch.dequantize(data, qtype, out_dtype=dtype)
        return quants_torch.decode_as(data, qtype, as_qtype, out_dtype=dtype)

    def attention(self, layer: int, window: int, sinks: torch.Tensor | None, last_pos: int
                  ) -> tuple[int, torch.Tensor | None]:
        """The sliding window (0: none) and the sink logits layer ``layer``'s attention uses, for queries up to
        position ``last_pos``: a ``sink_off`` fault drops the sinks, a ``window`` fault moves the window by
        ``by`` (it fires where some query reaches a key that only one of the two windows holds)."""
        if sinks is not None and self.off(layer, "sink_off"):
            sinks = None
        j = self._window.get(layer)
        if j is not None and window:
            if last_pos >= min(window, window + j.by):
                self._fired.add(j)
            return window + j.by, sinks
        return window, sinks

    def off(self, layer: int, part: str) -> bool:
        """Whether layer ``layer`` leaves out, or does the other way, the family part a
        :class:`~moesnap.model.inject.PartOff` fault names (:data:`~moesnap.model.inject.PARTS`: ``sink_off``,
        ``rope_flip``, ``shared_off``, ...; the forward asks only where the part exists)."""
        j = self._off.get((layer, part))
        if j is not None:
            self._fired.add(j)
        return j is not None

    def stage(self, layer: int, stage: str, x: torch.Tensor) -> torch.Tensor:
        """A stage's value as the forward passes it on (scaled where a ``scale`` fault says so)."""
        f = self._scale.get((layer, stage))
        return x if f is None else x * f

    def topk(self, layer: int, probs: torch.Tensor, k: int, positions: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``k`` (scores, expert ids) of each row of ``probs [T, E]`` (the router's probabilities, or its
        logits for a family that picks by them), descending; a
        ``route`` fault's token takes its (k+1)-th ranked expert instead of its k-th.  ``positions [T]``:
        the rows' positions in their sequences (a serving forward: the fault's token is a position, and
        a forward without it is left as it is); None: row ``t`` is token ``t``."""
        flips = self._flips.get(layer)
        if not flips:
            return torch.topk(probs, k, dim=-1)
        at = list(range(probs.shape[0])) if positions is None else positions.tolist()
        rows = [(j, r) for j in flips for r, p in enumerate(at) if p == j.token]
        if not rows:
            return torch.topk(probs, k, dim=-1)
        pw, pid = torch.topk(probs, k + 1, dim=-1)                              # [T, k+1]
        idx = torch.tensor([r for _, r in rows], device=pw.device)
        pw[idx, k - 1], pid[idx, k - 1] = pw[idx, k], pid[idx, k]
        for (j, r), e in zip(rows, pid[idx, k - 1].tolist()):
            self._flipped_in[(layer, r)] = (j, int(e))
        return pw[:, :k], pid[:, :k]

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        """The experts ``ids [T, k]`` the layer finally runs (after router replay): a flip fired where its
        row still runs the expert it brought in (replay following the golden's experts undoes it)."""
        if not self._flipped_in:
            return
        for (i, r) in [key for key in self._flipped_in if key[0] == layer]:
            j, e = self._flipped_in.pop((i, r))
            if e in ids[r].tolist():
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


    # -- decode steps --------------------------------------------------------------------------------
    def step(self, batch: Batch) -> Batch:
        """The :class:`Batch` a forward attends with: in decode step ``S`` a ``rope_pos:step=S`` fault moves
        RoPE one position on, a ``block_table`` fault points its sequence's block at another's.  Also
        notes which serving faults act in this step (a batch with ``step`` None -- a prompt, a chunk, the
        capture of a CUDA graph -- is left as it is)."""
        if not self._serve or batch.step is None or not batch.decode:
            return batch
        for j in self._serve:
            if isinstance(j, RopePos) and j.step == batch.step:
                batch = batch.with_(rope_pos=batch.rope_pos + 1)
                self._fired.add(j)
            elif isinstance(j, BlockTable) and j.seq in batch.seqs and len(batch.seqs) > 1:
                b = batch.seqs.index(j.seq)
                if batch.lens[b] > j.block * batch.block_size:          # this step reads that block
                    o = (b + 1) % len(batch.seqs)
                    other = min(j.block, -(-batch.lens[o] // batch.block_size) - 1)
                    table = batch.table.clone()
                    table[b, j.block] = batch.write_table[o, other]
                    batch = batch.with_(table=table)
                    self._fired.add(j)
            elif isinstance(j, (KvSlot, KvShort)):
                self._fired.add(j)
            elif isinstance(j, PadAttend) and min(batch.lens) < batch.n_keys:
                self._fired.add(j)
            elif isinstance(j, SwapRows) and len(batch.seqs) > 1:
                self._fired.add(j)
        return batch

    def layer(self, i: int, batch: Batch) -> Batch:
        """The :class:`Batch` layer ``i`` of a decode step attends with: a ``kv_slot`` fault writes the new
        k/v rows to the slots of the positions before, ``kv_short`` attends one key fewer, ``pad_attend``
        drops the key-padding mask, ``swap_rows`` exchanges the first two sequences' output rows.  Tensor
        operations only, so a CUDA graph captures them."""
        if not self._layer_faults or not batch.decode:
            return batch
        for j in self._layer_faults:
            if isinstance(j, KvSlot) and j.layer == i:
                batch = batch.with_(write_slot=batch.slots_at(batch.pos - 1))
            elif isinstance(j, KvShort) and j.layer == i:
                batch = batch.with_(seq_lens=batch.seq_lens - 1)
            elif isinstance(j, PadAttend) and j.hits(i):
                batch = batch.with_(key_mask=False)
            elif isinstance(j, SwapRows) and j.hits(i) and len(batch.seqs) > 1:
                a, b = batch.rows_of(0)[-1], batch.rows_of(1)[-1]
                rows = torch.arange(batch.n_rows, device=batch.out_index.device)
                swapped = torch.where(rows == a, b, torch.where(rows == b, a, rows))   # no host data: capturable
                batch = batch.with_(out_index=batch.out_index.index_select(0, swapped))
        return batch

    def refresh(self, step: int, old: Sequence[int], new: Sequence[int]) -> bool:
        """Whether decode step ``step`` on static buffers copies its tokens ``new`` into the static token
        buffer (which holds ``old``, the step before's): not where a ``graph_stale`` fault says so."""
        for j in self._serve:
            if isinstance(j, GraphStale) and j.step == step:
                if list(old) != list(new):
                    self._fired.add(j)
                return False
        return True


#: plants nothing
NO_FAULTS = Faults()
