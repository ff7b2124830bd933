"""aprender's MoE trace dumps as a moesnap case.

aprender (aprender-serve's ``--trace`` of a Qwen3-MoE forward) writes one file per stage::

    <dir>/layer-<N>/<stage>.bin      a per-layer stage of layer N
    <dir>/<stage>.bin                a whole-model stage

each file: 4 bytes ``APRT``, the layer as a little-endian u32 (``0xFFFFFFFF`` for a whole-model
stage), the element count as a little-endian u32, then that many little-endian float32 values.
Stage names go through :data:`moesnap.stages.ALIASES` (``moe_router``, ``moe_ffn_out``,
``post_ffn_residual``, ``lm_head``; moesnap's own names work too).  A file holds every token's rows,
or only the last token's (an element count of one token's row): then only the last token is judged.

Refused, naming the file: a short header or bad magic, data shorter or longer than the count says,
a count that is neither every token's nor one token's row of the golden's shape, a header layer
that disagrees with the directory, an unknown stage name, a stage in the wrong place (per-layer at
the top, whole-model under ``layer-<N>``), a layer beyond the golden's.  Files whose names start with
a dot, or do not end in ``.bin``, are left alone; any other directory is refused.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..case import Case
from ..errors import GoldenError
from ..stages import LAYER_STAGES, canonical
from ._flat import Collector, Like

MAGIC = b"APRT"
WHOLE_MODEL = 0xFFFFFFFF
HEADER = struct.Struct("<4sII")      # magic, layer, element count

_LAYER_DIR = re.compile(r"layer-(\d+)")


def _files(d: Path) -> list[tuple[Path, int | None]]:
    """(file, layer of its directory or None) for every ``.bin`` file of the dump."""
    out: list[tuple[Path, int | None]] = []
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            m = _LAYER_DIR.fullmatch(p.name)
            if m is None:
                raise GoldenError(f"{p}: not a layer directory of an aprender trace (expected layer-<N>)")
            out += [(q, int(m[1])) for q in sorted(p.iterdir())
                    if q.name.endswith(".bin") and not q.name.startswith(".") and not q.is_dir()]
        elif p.name.endswith(".bin"):
            out.append((p, None))
    return out


def read_file(path: Path, dir_layer: int | None, like: Like) -> tuple[str, int | None, np.ndarray]:
    """(stage, layer, values) of one trace file, every header field checked before the data is read."""
    size = path.stat().st_size
    if size < HEADER.size:
        raise GoldenError(f"{path}: {size} bytes, shorter than the {HEADER.size}-byte header (APRT, layer, count)")
    with open(path, "rb") as fh:
        magic, layer, count = HEADER.unpack(fh.read(HEADER.size))
    if magic != MAGIC:
        raise GoldenError(f"{path}: bad magic {magic!r} (an aprender trace file starts with {MAGIC!r})")
    stem = path.name[: -len(".bin")]
    stage = canonical(stem)
    if stage is None or stage == "tokens" and dir_layer is not None:
        raise GoldenError(f"{path}: unknown stage name {stem!r} (stage names and aliases: moesnap.stages)")
    per_layer = stage in LAYER_STAGES
    if dir_layer is None:
        if per_layer:
            raise GoldenError(f"{path}: {stage} is a per-layer stage, outside any layer-<N> directory")
        if layer != WHOLE_MODEL:
            raise GoldenError(f"{path}: header layer {layer}, but a whole-model file says 0xFFFFFFFF")
    else:
        if not per_layer:
            raise GoldenError(f"{path}: {stage} is a whole-model stage, inside layer-{dir_layer}/")
        if layer != dir_layer:
            shown = "0xFFFFFFFF" if layer == WHOLE_MODEL else str(layer)
            raise GoldenError(f"{path}: header layer {shown}, but its directory is layer-{dir_layer}")
        if dir_layer >= like.n_layer:
            raise GoldenError(f"{path}: layer {dir_layer} is beyond the golden's {like.n_layer} layers "
                              f"(0..{like.n_layer - 1}): a trace of another model?")
    if stage != "tokens":
        like.rows(stage, count, str(path))        # refuses a count of neither every token nor one
    have = (size - HEADER.size) // 4
    if size != HEADER.size + 4 * count:
        what = "truncated" if have < count else "trailing bytes"
        raise GoldenError(f"{path}: the header says {count} float32 values, the file holds "
                          f"{(size - HEADER.size) / 4:g} after it ({what})")
    values = np.fromfile(path, dtype="<f4", count=count, offset=HEADER.size)
    return stage, (dir_layer if per_layer else None), values


def aprt_case(path: str | Path, like: Like, *, attrs: dict[str, Any] | None = None) -> Case:
    """The case an aprender trace directory holds (module docstring), shaped like ``like``'s golden.
    Every problem is a :class:`~moesnap.errors.MoesnapError` naming the file."""
    d = Path(path)
    if not d.is_dir():
        raise GoldenError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
    col = Collector(like)
    for f, dir_layer in _files(d):
        stage, layer, values = read_file(f, dir_layer, like)
        if stage == "tokens":
            if values.shape != like.tokens.shape or not np.array_equal(values, like.tokens):
                raise GoldenError(f"{f}: other token ids than the golden's case")
            continue
        col.add(stage, layer, values, str(f))
    if not col.values:
        raise GoldenError(f"{d}: holds no stage file (expected layer-<N>/<stage>.bin and <stage>.bin)")
    a = {"producer": "aprender", "source": str(d)}
    a.update(attrs or {})
    return col.case(a)
