"""Reading a GGUF file: header sanity checks, memory map, fields and tensors.

No maths here.  :func:`open_gguf` first walks the header with bounds checks of
its own (gguf-py's reader trusts the counts it reads: an array that claims
2^60 elements past the end of the file would make it spin for ever), then
hands the file to :class:`gguf.GGUFReader`, whose tensors are ``np.memmap``
views.  Every problem becomes a :class:`~moesnap.errors.ModelFileError` that
names the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGMLQuantizationType, GGUFValueType

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
MAX_DIMS = 4


class _Cursor:
    """Bounds-checked little-endian reader over a bytes-like header."""

    def __init__(self, path: Path, buf: memoryview, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(
                f"{self.path}: truncated or corrupt GGUF header (reading {what} at byte {self.pos})"
            )
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        return bytes(self.take(n, what))

    def value(self, vtype: int, key: str) -> None:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise ModelFileError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}") from None
        if t == GGUFValueType.STRING:
            self.string(f"value of {key!r}")
        elif t == GGUFValueType.ARRAY:
            itype = self.u32(f"array type of {key!r}")
            n = self.u64(f"array length of {key!r}")
            try:
                it = GGUFValueType(itype)
            except ValueError:
                raise ModelFileError(f"{self.path}: metadata key {key!r} has unknown array item type {itype}") from None
            min_item = 8 if it == GGUFValueType.STRING else _SCALAR_SIZES.get(it, 12)
            if n * min_item > self.size - self.pos:
                raise ModelFileError(
                    f"{self.path}: metadata key {key!r} claims {n} array items, more than the file holds"
                )
            if it in _SCALAR_SIZES:
                self.take(n * _SCALAR_SIZES[it], f"array {key!r}")
            else:
                for _ in range(n):
                    self.value(itype, key)
        else:
            self.take(_SCALAR_SIZES[t], f"value of {key!r}")


def prescan(path: Path) -> None:
    """Walk the header with bounds checks; raise ModelFileError on anything absurd."""
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path}: empty file, not a GGUF model")
    with open(path, "rb") as f:
        mm = np.memmap(f, dtype=np.uint8, mode="r")
        cur = _Cursor(path, memoryview(mm), size)
        if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
        version = cur.u32("version")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: unsupported GGUF version {version}")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Each KV pair needs >= 8+1+4+1 bytes, each tensor info >= 8+1+4+8+4+8.
        if n_kv * 14 > size or n_tensors * 33 > size:
            raise ModelFileError(
                f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file holds"
            )
        for _ in range(n_kv):
            key = cur.string("metadata key").decode("utf-8", "replace")
            cur.value(cur.u32(f"type of {key!r}"), key)
        for _ in range(n_tensors):
            name = cur.string("tensor name").decode("utf-8", "replace")
            n_dims = cur.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            dims = [cur.u64(f"dimensions of {name!r}") for _ in range(n_dims)]
            qt = cur.u32(f"type of {name!r}")
            offset = cur.u64(f"offset of {name!r}")
            try:
                qtype = GGMLQuantizationType(qt)
                block, tsize = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelFileError(f"{path}: tensor {name!r} has unknown type {qt}") from None
            n = 1
            for d in dims:
                n *= d
            if dims[0] % block:
                raise ModelFileError(
                    f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of the {qtype.name} block size {block}"
                )
            nbytes = n // block * tsize
            if nbytes > size or offset > size:
                raise ModelFileError(
                    f"{path}: tensor {name!r} claims {nbytes} bytes at offset {offset}, more than the file holds ({size} bytes)"
                )
        del mm


@dataclass
class GGUFFile:
    """An open GGUF file: its path, metadata fields and tensors (memory-mapped)."""

    path: Path
    reader: GGUFReader
    tensors: dict[str, Any]

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str) -> Any:
        """A metadata value; ModelFileError naming the key if absent or unreadable."""
        field = self.reader.fields.get(key)
        if field is None:
            raise ModelFileError(f"{self.path}: missing metadata key {key!r}")
        try:
            if field.types and field.types[0] == GGUFValueType.ARRAY:
                return field.contents()
            return field.contents()
        except Exception as e:  # malformed string bytes and the like
            raise ModelFileError(f"{self.path}: metadata key {key!r} is unreadable ({e})") from None

    def tensor(self, name: str) -> Any:
        """A tensor by its base name; real files add ``.weight`` (``blk.0.attn_q.weight``)."""
        t = self.tensors.get(name + ".weight")
        if t is None:
            t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: missing tensor {name!r}")
        return t


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file's container (not its model semantics)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if p.is_dir():
        raise ModelFileError(f"{p}: is a directory, not a GGUF file")
    try:
        prescan(p)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        reader = GGUFReader(p, "r")
    except ModelFileError:
        raise
    except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError...
        raise ModelFileError(f"{p}: malformed GGUF ({type(e).__name__}: {e})") from None
    size = p.stat().st_size
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{p}: tensor {t.name!r} runs past the end of the file (truncated?)")
        tensors[t.name] = t
    return GGUFFile(path=p, reader=reader, tensors=tensors)
