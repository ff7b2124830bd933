"""Reading a GGUF file: header, metadata fields and tensor records over a memory map.

No maths here.  One bounds-checked pass over the header collects every
metadata value and tensor record; tensor data are ``np.memmap`` views in
gguf-py's conventions (F32/F16/F64/I* typed arrays in numpy order, every
other type ``uint8 [..., bytes_per_row]``).  We do not use
``gguf.GGUFReader`` here: it trusts the counts it reads (an array claiming
2^60 items past the end of the file makes it spin for ever) and it builds
a Python object per vocabulary entry (~8 s for Qwen3's 151,936 tokens, paid by
every command).  Every problem is a :class:`~moesnap.errors.ModelFileError`
naming the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_TYPED = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Str(bytes):
    """A GGUF string, decoded to ``str`` only when a value is asked for."""


class TensorInfo(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray          # ggml order (ne0 first), like gguf-py's ReaderTensor.shape
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray           # memmap view, numpy order


class _Cursor:
    """Bounds-checked little-endian reader over the file's memory map."""

    def __init__(self, path: Path, buf: memoryview, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: truncated or corrupt GGUF header (reading {what} at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> _Str:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise ModelFileError(f"{self.path}: {what} claims {n} bytes, more than the file holds")
        return _Str(self.take(n, what))

    def vtype(self, raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelFileError(f"{self.path}: metadata key {key!r} has unknown value type {raw}") from None

    def value(self, t: GGUFValueType, key: str) -> Any:
        if t == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if t == GGUFValueType.ARRAY:
            it = self.vtype(self.u32(f"array type of {key!r}"), key)
            n = self.u64(f"array length of {key!r}")
            min_item = 8 if it == GGUFValueType.STRING else _SCALARS[it].itemsize if it in _SCALARS else 12
            if n * min_item > self.size - self.pos:
                raise ModelFileError(f"{self.path}: metadata key {key!r} claims {n} array items, more than the file holds")
            if it in _SCALARS:
                dt = _SCALARS[it]
                return np.frombuffer(self.take(n * dt.itemsize, f"array {key!r}"), dtype=dt)
            if it == GGUFValueType.STRING:
                return self.strings(n, key)
            return [self.value(it, key) for _ in range(n)]
        dt = _SCALARS[t]
        return np.frombuffer(self.take(dt.itemsize, f"value of {key!r}"), dtype=dt)[0].item()

    def strings(self, n: int, key: str) -> _StrArray:
        """An array of ``n`` strings, only stepped over: its items are split out when first read
        (a 152k-word vocabulary was most of parsing a header, and a check never reads it)."""
        buf, end, start = self.buf, self.size, self.pos
        pos = start
        for _ in range(n):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"length of value of {key!r}")
            length = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
            if length > end - pos:
                raise ModelFileError(f"{self.path}: value of {key!r} claims {length} bytes, more than the file holds")
            pos += length
        self.pos = pos
        return _StrArray(buf[start:pos], n)


class _StrArray:
    """A GGUF array of strings as its raw bytes (``n`` items of a u64 length and the bytes each)."""

    def __init__(self, raw: memoryview, n: int) -> None:
        self.raw, self.n = raw, n

    def decoded(self) -> list[str]:
        out, raw, pos = [], self.raw, 0
        for _ in range(self.n):
            length = int.from_bytes(raw[pos:pos + 8], "little")
            out.append(bytes(raw[pos + 8:pos + 8 + length]).decode("utf-8"))
            pos += 8 + length
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, _Str):
        return bytes(v).decode("utf-8")
    if isinstance(v, _StrArray):
        return v.decoded()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


class GGUFFile:
    """An open GGUF file: its path, metadata fields and tensors (memory-mapped)."""

    def __init__(self, path: Path, fields: dict[str, Any], tensors: dict[str, TensorInfo], mm: np.memmap) -> None:
        self.path, self._fields, self.tensors, self._mm = path, fields, tensors, mm

    @property
    def keys(self) -> list[str]:
        return list(self._fields)

    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str) -> Any:
        """A metadata value as plain Python; ModelFileError naming the key if absent or unreadable."""
        if key not in self._fields:
            raise ModelFileError(f"{self.path}: missing metadata key {key!r}")
        try:
            return _plain(self._fields[key])
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: metadata key {key!r} holds a string that is not UTF-8") from None

    def tensor(self, name: str) -> TensorInfo:
        """A tensor by its base name; real files add ``.weight`` (``blk.0.attn_q.weight``)."""
        t = self.tensors.get(name + ".weight")
        if t is None:
            t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: missing tensor {name!r}")
        return t

    def release(self, tensor: TensorInfo) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache)."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        import mmap as _mmap

        page = _mmap.PAGESIZE
        start = tensor.data_offset // page * page
        end = tensor.data_offset + tensor.n_bytes
        try:
            mm.madvise(_mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError, AttributeError):
            pass


def _parse(path: Path, mm: np.memmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    size = mm.shape[0]
    cur = _Cursor(path, mm.data, size)
    if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
    version = cur.u32("version")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version} (big-endian or not GGUF?)")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    # Each KV pair needs >= 8+1+4+1 bytes, each tensor record >= 8+1+4+8+4+8.
    if n_kv * 14 > size or n_tensors * 33 > size:
        raise ModelFileError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                             "more than the file holds")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        try:
            key = bytes(cur.string("metadata key")).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{path}: a metadata key at byte {cur.pos} is not UTF-8") from None
        if key in fields:
            raise ModelFileError(f"{path}: metadata key {key!r} appears twice")
        fields[key] = cur.value(cur.vtype(cur.u32(f"type of {key!r}"), key), key)
    records = []
    for _ in range(n_tensors):
        try:
            name = bytes(cur.string("tensor name")).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{path}: a tensor name at byte {cur.pos} is not UTF-8") from None
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.u64(f"dimensions of {name!r}") for _ in range(n_dims)]
        raw_type = cur.u32(f"type of {name!r}")
        offset = cur.u64(f"offset of {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, tsize = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFileError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
        n = 1
        for d in dims:
            n *= d
        if n == 0:
            raise ModelFileError(f"{path}: tensor {name!r} has a zero dimension {dims}")
        if dims[0] % block:
            raise ModelFileError(f"{path}: tensor {name!r} row length {dims[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}")
        nbytes = n // block * tsize
        if nbytes > size or offset > size:
            raise ModelFileError(f"{path}: tensor {name!r} claims {nbytes} bytes at offset {offset}, "
                                 f"more than the file holds ({size} bytes)")
        records.append((name, qtype, dims, n, nbytes, offset))
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise ModelFileError(f"{path}: metadata key 'general.alignment' = {align!r} must be a power of two")
    data_start = -(-cur.pos // align) * align
    tensors: dict[str, TensorInfo] = {}
    for name, qtype, dims, n, nbytes, offset in records:
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} appears twice")
        start = data_start + offset
        if start + nbytes > size:
            raise ModelFileError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        np_dims = tuple(reversed(dims))
        if qtype in _TYPED:
            data = mm[start:start + nbytes].view(_TYPED[qtype]).reshape(np_dims)
        else:
            block, tsize = GGML_QUANT_SIZES[qtype]
            data = mm[start:start + nbytes].reshape(*np_dims[:-1], np_dims[-1] // block * tsize)
        tensors[name] = TensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n, nbytes, start, data)
    return fields, tensors


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file's container (not its model semantics)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"{p}: no such file")
    if p.is_dir():
        raise ModelFileError(f"{p}: is a directory, not a GGUF file")
    try:
        if p.stat().st_size == 0:
            raise ModelFileError(f"{p}: empty file, not a GGUF model")
        mm = np.memmap(p, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read ({e.strerror or e})") from None
    fields, tensors = _parse(p, mm)
    return GGUFFile(p, fields, tensors, mm)
