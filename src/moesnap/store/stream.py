"""A case written while its forward runs: each layer's stages go to the store as the layer ends.

:meth:`~moesnap.store.base.VersionWriter.begin_case` hands out a :class:`CaseStream`;
``put_layer(l, {stage: value})`` gives it layer ``l``'s per-layer stages (layers in increasing
order), ``finish(case)`` the rest (tokens, whole-model stages, attributes; no layers).  What is
stored is what :meth:`~moesnap.store.base.VersionWriter.add_case` stores of the same case with its
layers stacked (:func:`moesnap.case.stack_layers`), byte for byte: the same chunk files, the same
``zarr.json`` files, the same checksums, the same provenance.

:class:`~moesnap.store.base.CaseStream` itself keeps the layers and adds the whole case at the end
(the memory and S3 stores).  The local store's :class:`RawCaseStream` writes each layer's chunk of every stage
(``layers/<stage>/c/<l>/0/...``: one chunk per layer, uncompressed, as
:func:`~moesnap.store.case.write_arrays` lays them out) on a thread of its own while the next layer
is computed, extends each array's CRC-32C over the chunks in order, and writes the arrays'
``zarr.json`` once the case is finished and their shapes are known.  No stacked copy of the layers
is made (on a 48-layer 30B-A3B case, 1.2 GB copied and then written after the forward).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..case import Case, fill_row, stack_layers
from ..stages import LAYER_STAGES
from .base import CaseStream, case_info, interrupts_held
from .case import write_arrays, write_attrs
from .zarr import _GROUP_JSON, PIECE, _array_json, _PipelinedGroup

if TYPE_CHECKING:
    from .base import VersionWriter


@dataclass
class _Rows:
    """One stage's array as written so far: chunk files of rows 0..n-1, their CRC-32C."""

    first: np.ndarray      # the first row given: every other row (and fill row) has its shape and dtype
    n: int = 0
    crc: int = 0

    @property
    def zeros(self) -> tuple[str, ...]:
        return ("0",) * self.first.ndim


def streamable(value: np.ndarray) -> bool:
    """Whether rows like ``value`` are written as they come: a dtype whose bytes are stored as they
    are in memory (what :func:`~moesnap.store.zarr._raw_items` writes directly) and no empty axis."""
    dt = value.dtype
    return dt.kind in "biuf" and dt.byteorder in ("<", "|", "=") and 0 not in value.shape and np.little_endian


class RawCaseStream(CaseStream):
    """A local store's case: each layer's chunk files written on a thread while the forward goes on
    (module docstring).  ``group`` is the case's zarr group (created), ``raw_dir`` its directory;
    ``delay`` (the store's ``write_delay``) sleeps after each layer, for the crash tests;
    ``errors(where)`` the store's context that turns storage faults into GoldenErrors."""

    def __init__(self, writer: VersionWriter, name: str, group: Any, raw_dir: Path, *, delay: float = 0.0,
                 errors: Callable[[str], Any]) -> None:
        super().__init__(writer, name)
        self._group, self._dir, self._delay, self._errors = group, raw_dir, delay, errors
        self._rows: dict[str, _Rows] = {}        # stages written as they come (the worker's alone once submitted)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesnap-write-layers")
        self._pending: list[Future] = []

    def put_layer(self, layer: int, stages: Mapping[str, np.ndarray]) -> None:
        with self._errors(f"{self._dir}"):
            self._raise_failed()
        super().put_layer(layer, stages)
        if self._delay:
            self._pending.append(self._pool.submit(time.sleep, self._delay))

    def _take(self, stage: str, layer: int, value: np.ndarray) -> None:
        rows = self._rows.get(stage)
        if rows is None:
            if stage in self._kept or not streamable(value):
                super()._take(stage, layer, value)      # written with the rest, when the case is finished
                return
            rows = self._rows[stage] = _Rows(value)
        if value.shape != rows.first.shape or value.dtype != rows.first.dtype:
            raise ValueError(f"case {self.name!r}: stage {stage!r} of layer {layer} is {value.dtype} "
                             f"{list(value.shape)}, an earlier layer's {rows.first.dtype} {list(rows.first.shape)}")
        self._pending.append(self._pool.submit(self._write_row, stage, rows, layer, value))

    def _write_row(self, stage: str, rows: _Rows, layer: int, value: np.ndarray) -> None:
        """Rows ``rows.n .. layer-1`` (layers without the stage) filled, then ``value`` as row ``layer``."""
        import google_crc32c

        where = self._dir / "layers"
        if rows.n == 0 and not (where / "zarr.json").is_file():     # the implicit group, as zarr writes it
            where.mkdir(parents=True, exist_ok=True)
            (where / "zarr.json").write_bytes(_GROUP_JSON)
        base = where / stage / "c"
        for i in range(rows.n, layer + 1):
            row = np.ascontiguousarray(value if i == layer else fill_row(rows.first))
            path = base.joinpath(str(i), *rows.zeros)
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = row.reshape(-1).view(np.uint8)
            with open(path, "wb", buffering=0) as f:
                for o in range(0, buf.size, PIECE):
                    piece = buf[o:o + PIECE]
                    f.write(piece.data)
                    rows.crc = google_crc32c.extend(rows.crc, piece)
        rows.n = layer + 1

    def _raise_failed(self) -> None:
        """Re-raise the first failure of a write done so far (the forward stops at the next layer)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for f in pending:
                f.result()
        finally:
            for f in pending:
                f.cancel()

    def _finish(self, case: Case) -> None:
        with self._errors(f"{self._dir}"):
            self._wait()
            written: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {}
            for stage, rows in self._rows.items():
                shape = (rows.n, *rows.first.shape)
                meta = _array_json(shape, rows.first.dtype, (1, *rows.first.shape))
                assert meta is not None      # streamable() dtypes only
                (self._dir / "layers" / stage / "zarr.json").write_bytes(meta)
                written[f"layers/{stage}"] = (shape, rows.first.dtype, f"crc32c:{rows.crc:08x}")
            kept, self._kept = stack_layers(self._kept, LAYER_STAGES), {}
            rest = {"tokens": case.tokens, **case.model, **{f"layers/{s}": a for s, a in kept.items()}, **case.extra}
            g = _PipelinedGroup(self._group, self._delay, self._dir)
            try:
                import zarr

                with zarr.config.set({"array.write_empty_chunks": True}):   # as write_case_pipelined
                    sums = write_arrays(g, rest)
                # every array in the order a whole case lists them (Case.arrays: layers in stage order)
                order = ["tokens", *case.model, *(f"layers/{s}" for s in LAYER_STAGES
                                                 if f"layers/{s}" in written or s in kept), *case.extra]
                all_sums = {p: written[p][2] if p in written else sums[p] for p in order}
                write_attrs(g, case.attrs, all_sums)
            finally:
                g.close()
        self._pool.shutdown(wait=True)
        shapes = {p: (written[p][0], written[p][1]) if p in written else (rest[p].shape, rest[p].dtype) for p in order}
        self.writer._record(self.name, case_info(case), shapes, all_sums)

    def close(self) -> None:
        super().close()
        with interrupts_held():      # the write under way ends, the others never start (what failed no longer matters)
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = []
