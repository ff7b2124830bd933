"""One case (one prompt) as a Zarr v3 group: the layout every engine can write.

::

    <case>/tokens           [T] int32
    <case>/embed            [T, H]
    <case>/final_norm       [T, H]
    <case>/logits           [T, V]
    <case>/layers/<stage>   [L, ...]   one chunk per layer

The group's attributes are optional for a candidate written by another
engine; moesnap writes ``schema``, ``checksums`` (CRC-32C of each array's
little-endian C-order bytes) and provenance.  Foreign stage names listed in
:data:`moesnap.stages.ALIASES` are accepted on read.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import zarr
import zarr.errors

from ..case import PARTED, Case, from_recorder  # noqa: F401  (the value, re-exported beside its I/O)
from ..errors import GoldenError
from ..util import describe_error
from ..stages import LAYER_STAGES, MODEL_STAGES, canonical
from .arrays import LAYOUT

SCHEMA_VERSION = 1


def _le_bytes(a: np.ndarray) -> np.ndarray:
    """The array's little-endian C-order bytes as a read-only uint8 view (no copy when possible)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    b = a.reshape(-1).view(np.uint8)
    b = b.view()
    b.setflags(write=False)
    return b


def checksum(a: np.ndarray) -> str:
    """``crc32c:xxxxxxxx`` of the array's little-endian C-order bytes.

    CRC-32C (Castagnoli) is what zarr's ``crc32c`` codec and tensorstore use;
    google-crc32c (a zarr dependency) computes it in hardware at several GB/s,
    where sha256 ran at ~0.5-0.9 GB/s and dominated writing and reading a golden.
    It detects corruption (bit flips, truncation, zeroed chunks), not tampering.
    """
    import google_crc32c

    return f"crc32c:{google_crc32c.value(_le_bytes(a)):08x}"


def checksum_matches(a: np.ndarray, digest: str) -> bool:
    """Whether ``a`` has checksum ``digest`` (``crc32c:…``, or a bare sha256 hex digest as in schema 1 goldens)."""
    if isinstance(digest, str) and digest.startswith("crc32c:"):
        return checksum(a) == digest
    return hashlib.sha256(_le_bytes(a).data).hexdigest() == digest


class CaseSink(Protocol):
    """What :func:`write_case` writes into: a :class:`zarr.Group`, or one that passes its calls on
    (the Zarr store's pipelined group)."""

    def create_array(self, *args: Any, **kwargs: Any) -> Any: ...

    @property
    def attrs(self) -> Any: ...


class GroupValue(Protocol):
    """What :func:`write_case` writes: a :class:`Case`, or named arrays (:class:`~moesnap.store.arrays.NamedArrays`)."""

    @property
    def attrs(self) -> dict[str, Any]: ...

    def arrays(self) -> dict[str, np.ndarray]: ...


def write_case(group: CaseSink, case: GroupValue) -> dict[str, str]:
    """Write ``case`` into an empty group; return the checksum of every array."""
    sums = write_arrays(group, case.arrays())
    write_attrs(group, case.attrs, sums)
    return sums


def write_arrays(group: CaseSink, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Create each array in ``group`` (one chunk per layer under ``layers/``, one chunk otherwise,
    uncompressed); return the checksum of every array, in the order given.  A pipelined sink
    has written them all once its ``attrs`` is read."""
    sums: dict[str, str] = {}
    taken = getattr(group, "checksums", None)     # a sink that checksums what it writes, as it writes
    for path, arr in arrays.items():
        arr = np.ascontiguousarray(arr).reshape(np.shape(arr))     # a 0-d array stays 0-d
        group.create_array(path, data=arr, chunks=layer_chunks(path, arr.shape), compressors=None)
        if not isinstance(taken, dict):
            sums[path] = checksum(arr)
    if isinstance(taken, dict):
        _ = group.attrs               # a pipelined sink: every array written (and checksummed) once it is read
        sums = {path: taken[path] for path in arrays}
    return sums


def layer_chunks(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The chunks of array ``path`` in a case group: one per layer for a per-layer stage
    (``layers/<stage>`` ``[L, ...]``), else the whole array."""
    whole: tuple[int, ...] = (1, *shape[1:]) if path.startswith("layers/") and len(shape) >= 1 else shape
    return tuple(max(1, c) for c in whole)


def write_attrs(group: CaseSink, attrs: dict[str, Any], sums: dict[str, str]) -> None:
    """The case group's attributes: ``attrs`` with the schema and every array's checksum."""
    group.attrs.update({**attrs, "schema": SCHEMA_VERSION, "checksums": sums})


def save_case(path: str | Path, case: Case) -> dict[str, str]:
    """Write ``case`` as a new Zarr v3 group at ``path`` (which must not exist); its steps (decode
    steps, later chunks) as case groups ``steps/0``, ``steps/1``, … inside it."""
    p = Path(path)
    if p.exists():
        raise GoldenError(f"{p}: exists (use --force to overwrite)")
    group = zarr.open_group(str(p), mode="w-", zarr_format=3)
    sums = write_case(group, case)
    if case.steps:
        holder = group.create_group(STEPS)
        for n, step in enumerate(case.steps):
            if step.steps:
                raise GoldenError(f"{p}/{STEPS}/{n}: a step holds steps of its own")
            write_case(holder.create_group(str(n)), step)
    return sums


#: the subgroup of a case group that holds its steps, ``steps/<n>/`` (a case group each)
STEPS = "steps"


def _walk(group: zarr.Group) -> Iterable[tuple[str, Any]]:
    if hasattr(group, "array_members"):   # a local group read without zarr (moesnap.store.zarr._LocalGroup)
        yield from group.array_members()
        return
    for name, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            yield name, member


def open_case_group(path: str | Path) -> zarr.Group:
    p = Path(path)
    if not p.exists():
        raise GoldenError(f"{p}: no such case group")
    try:
        g = zarr.open_group(str(p), mode="r")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError, TypeError, KeyError) as e:
        raise GoldenError(f"{p}: not a Zarr v3 group ({type(e).__name__})") from None
    except Exception as e:
        raise GoldenError(f"{p}: not a readable Zarr group ({type(e).__name__}: {e})") from None
    return g


#: arrays are read whole; what they declare may exceed what they store only by this factor
#: (compression, chunks left out as fill value), beyond a floor that is always allowed
MAX_EXPANSION = 64
ALWAYS_ALLOWED_BYTES = 64 << 20
ALWAYS_ALLOWED_CHUNKS = 4096


def _check_sizes(members: list[tuple[str, Any]], where: str) -> None:
    """Refuse a group whose arrays declare far more than they store: a corrupt or hostile
    ``zarr.json`` claiming a shape of 2^40 would be allocated and filled, and a tokens array
    of 2^24 ids in 883k one-token chunks would be read chunk by chunk for minutes."""
    sizes = []
    for path, arr in members:
        try:
            n = int(arr.nbytes)
            have, stored = _stored(arr)
            outer = arr.shards or arr.chunks
            chunks = int(np.prod([-(-int(a) // max(1, int(c))) for a, c in zip(arr.shape, outer)], dtype=np.float64))
            chunk_bytes = int(np.prod(outer, dtype=np.float64)) * arr.dtype.itemsize
        except Exception as e:
            raise GoldenError(f"{where}/{path}: unreadable array ({type(e).__name__}: {e})") from None
        if chunk_bytes > max(ALWAYS_ALLOWED_BYTES, MAX_EXPANSION * stored):
            raise GoldenError(f"{where}/{path}: declares chunks of {list(arr.metadata.chunk_grid.chunk_shape)} "
                              f"({chunk_bytes / 2**30:.3g} GiB each), far more than it stores; corrupt zarr.json?")
        sizes.append((n - stored, n, stored, chunks, have, path, arr))
    declared = sum(x[1] for x in sizes)
    stored = sum(x[2] for x in sizes)
    if declared > max(ALWAYS_ALLOWED_BYTES, MAX_EXPANSION * stored):
        _, n, _, _, _, path, arr = max(sizes, key=lambda x: x[0])
        raise GoldenError(f"{where}/{path}: declares shape {list(arr.shape)} {arr.dtype} ({n / 2**30:.3g} GiB), "
                          f"far more than the group stores ({stored} bytes); corrupt zarr.json?")
    if sum(x[3] for x in sizes) > max(ALWAYS_ALLOWED_CHUNKS, MAX_EXPANSION * sum(x[4] for x in sizes)):
        _, _, _, chunks, have, path, arr = max(sizes, key=lambda x: x[3] - x[4])
        raise GoldenError(f"{where}/{path}: declares shape {list(arr.shape)} in {chunks} chunks but stores {have}; "
                          f"corrupt zarr.json?")


def _stored(arr) -> tuple[int, int]:
    """(chunk or shard objects, bytes) stored under the array, by listing its own prefix only
    (zarr's nchunks_initialized enumerates every declared chunk key: 10^12 of them never return)."""
    from zarr.core.sync import sync

    sp = arr.store_path

    async def count() -> tuple[int, int]:
        keys = [k async for k in sp.store.list_prefix(f"{sp.path}/" if sp.path else "")]
        sizes = [await sp.store.getsize(k) for k in keys]
        return sum(1 for k in keys if not k.endswith("zarr.json")), sum(sizes)

    return sync(count())


#: reads one array's data itself (local chunk files straight into the result): the data (or the data and
#: the ``crc32c:…`` checksum of the bytes read), None to let zarr read it, or a string saying what is wrong
RawReader = Callable[[Any, str], "np.ndarray | tuple[np.ndarray, str] | str | None"]


def read_arrays(group: zarr.Group, *, where: str, verify: bool = True, threads: int = 1,
                raw: RawReader | None = None, expected: dict | None = None,
                skip_steps: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The group's attributes and every array in it, keyed by its path inside the group, whatever
    the names.

    ``where`` names the group in error messages.  With ``verify`` each array
    that has a recorded checksum is checked against it, and an array the
    checksums name but the group lacks is an error.  ``threads`` arrays are
    read and checked at once.  ``expected`` (a golden version's record of
    each array's shape and dtype) is checked before an array is read, so a
    tampered ``zarr.json`` cannot make us allocate what it claims; without it
    the declared sizes are bounded by what the group stores.  Every problem is
    a :class:`GoldenError` naming the array.
    """
    try:
        attrs = dict(group.attrs)
    except Exception as e:
        raise GoldenError(f"{where}: unreadable group attributes ({e})") from None
    sums = attrs.get("checksums") or {}
    if not isinstance(sums, dict):
        raise GoldenError(f"{where}: attribute 'checksums' is not a mapping")
    try:
        members = list(_walk(group))
    except Exception as e:
        raise GoldenError(f"{where}: unreadable group ({describe_error(e)})") from None
    if skip_steps:   # a case's steps are case groups of their own (read by load_case)
        members = [(path, arr) for path, arr in members if not path.startswith(f"{STEPS}/")]
    if expected is None:
        _check_sizes(members, where)

    def load(item) -> tuple[str, np.ndarray | None, str | None]:
        path, arr = item
        want = (expected or {}).get(path)
        if isinstance(want, dict) and (list(arr.shape) != list(want.get("shape") or [])
                                       or str(arr.dtype) != str(want.get("dtype"))):
            return path, None, (f"declares shape {list(arr.shape)} {arr.dtype}, the version recorded "
                                f"{want.get('shape')} {want.get('dtype')} (modified metadata)")
        digest = None     # the reader's own CRC-32C of the bytes it read, if it took one
        try:
            got = raw(arr, path) if raw is not None else None
            if isinstance(got, str):
                return path, None, got
            if isinstance(got, tuple):
                data, digest = got
            else:
                data = np.asarray(arr[...]) if got is None else got
        except Exception as e:
            return path, None, f"unreadable array ({describe_error(e)})"
        if verify and path in sums:
            want = sums[path]
            ok = (digest == want) if digest is not None and str(want).startswith("crc32c:") else checksum_matches(data, want)
            if not ok:
                return path, None, "checksum mismatch (corrupt or modified array)"
        return path, data, None

    if threads > 1 and len(members) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moesnap-read") as pool:
            loaded = list(pool.map(load, members))
    else:
        loaded = []
        for item in members:
            loaded.append(load(item))
            if loaded[-1][2] is not None:
                break
    arrays: dict[str, np.ndarray] = {}
    for path, data, problem in loaded:
        if problem is not None:
            raise GoldenError(f"{where}/{path}: {problem}")
        assert data is not None   # load gives an array or a problem
        arrays[path] = data
    if verify:
        for path in sums:
            if path not in arrays:
                raise GoldenError(f"{where}/{path}: array is missing")
    return attrs, arrays


def read_case(group: zarr.Group, *, where: str, verify: bool = True, threads: int = 1,
              raw: RawReader | None = None, expected: dict | None = None) -> Case:
    """Read every array of a case group (the checks of :func:`read_arrays`), mapping foreign stage
    names onto ours."""
    attrs, arrays = read_arrays(group, where=where, verify=verify, threads=threads, raw=raw, expected=expected,
                                skip_steps=True)
    if attrs.get("layout") == LAYOUT:
        raise GoldenError(f"{where}: a group of named arrays (layout {LAYOUT!r}, as moesnap_snapshot keeps), "
                          f"not a forward's case")
    tokens = None
    model: dict[str, np.ndarray] = {}
    layers: dict[str, np.ndarray] = {}
    ignored: list[str] = []
    extra: dict[str, np.ndarray] = {}
    for path, data in arrays.items():
        parts = path.split("/")
        name = canonical(parts[-1]) if len(parts) == 1 or (len(parts) == 2 and parts[0] == "layers") else None
        if len(parts) == 2 and name in LAYER_STAGES:
            layers[name] = data
        elif len(parts) == 1 and name == "tokens":
            tokens = _token_ids(data, f"{where}/{path}")
        elif len(parts) == 1 and name in MODEL_STAGES:
            model[name] = data
        elif len(parts) == 2 and parts[0] == PARTED:
            extra[path] = data
        else:
            ignored.append(path)
    if tokens is None:
        raise GoldenError(f"{where}: no 'tokens' array")
    return Case(tokens=tokens, model=model, layers=layers, attrs=attrs, ignored=tuple(ignored), extra=extra)


def _token_ids(data: np.ndarray, where: str) -> np.ndarray:
    """The tokens array as int32; a float, boolean, multi-dimensional or out-of-range array is refused
    (a cast would truncate 87.5 to 87 or wrap 2^40 to 0 and compare the wrong prompt)."""
    if data.dtype.kind not in "iu" or data.ndim != 1:
        raise GoldenError(f"{where}: expected a 1-D integer array of token ids, got {data.dtype} {list(data.shape)}")
    if data.size and (int(data.min()) < np.iinfo(np.int32).min or int(data.max()) > np.iinfo(np.int32).max):
        raise GoldenError(f"{where}: token id {int(data.max()) if int(data.max()) > 0 else int(data.min())} "
                          f"is out of the int32 range")
    return data.astype(np.int32)


def load_case(path: str | Path, *, verify: bool = True) -> Case:
    """The case group at ``path``, with its steps (``steps/0``, ``steps/1``, …) in order."""
    case = read_case(open_case_group(path), where=str(path), verify=verify)
    holder = Path(path) / STEPS
    if not holder.is_dir():
        return case
    names = sorted((q.name for q in holder.iterdir() if q.is_dir()), key=lambda n: (not n.isdigit(), len(n), n))
    bad = [n for n in names if not n.isdigit()]
    if bad or names != [str(i) for i in range(len(names))]:
        raise GoldenError(f"{holder}: steps must be named 0, 1, 2, … without a gap (found {', '.join(names[:6])})")
    steps = tuple(read_case(open_case_group(holder / n), where=str(holder / n), verify=verify) for n in names)
    return replace(case, steps=steps)
