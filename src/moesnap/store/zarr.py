"""The Zarr v3 golden stores' shared part: :class:`ZarrGoldenStore` (reading a version and its
cases, the same for every storage backend) and :func:`write_case_pipelined` (writing one case
group, checksums overlapped with the writes).

The backends are :class:`~moesnap.store.local.LocalGoldenStore` (a directory) and
:class:`~moesnap.store.s3.RemoteGoldenStore` (``s3://``).  The layout and the publishing rules
are described in :mod:`moesnap.store.base`.  Reading goes through zarr, except that a local
store's uncompressed chunk files are read and written directly (byte-identical to zarr's own).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .case import Case, GroupValue, read_arrays, read_case, write_case
from ..errors import GoldenError, MoesnapError, UsageError
from ..util import describe_error
from .base import MARKER, SCHEMA, GoldenStore, interrupts_held


# ---------------------------------------------------------------- writing a case

class _PipelinedGroup:
    """A zarr group for :func:`~moesnap.store.case.write_case` whose ``create_array`` hands the
    write to a worker thread and returns at once, so that write_case's checksum of one
    array (CRC-32C releases the GIL) runs while the previous array is written.  One worker:
    arrays are written in order, one at a time.  ``attrs`` waits for every write first, and
    :meth:`wait` re-raises the first failure.  ``delay`` (the store's ``write_delay``) sleeps
    after each array to widen the window of the crash tests.
    """

    def __init__(self, group, delay: float = 0.0, raw_dir: Path | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._group, self._delay, self._raw_dir = group, delay, raw_dir
        #: the CRC-32C of each array written, taken by the writer as it writes (write_case's ``checksum``
        #: values, without a second pass over the data); complete once ``attrs`` or ``wait`` returns
        self.checksums: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesnap-write")
        self._pending: list = []

    def create_array(self, *args, **kwargs) -> None:
        data, chunks = kwargs.get("data"), kwargs.get("chunks")
        if (self._raw_dir is not None and len(args) == 1 and set(kwargs) == {"data", "chunks", "compressors"}
                and kwargs["compressors"] is None and chunks is not None and _raw_items(data, chunks) is not None):
            job = self._pool.submit(self._create_raw, args[0], np.ascontiguousarray(data), tuple(chunks))
        else:
            job = self._pool.submit(self._create_zarr, args, kwargs)
        self._pending.append(job)
        if self._delay:
            self.wait()
            time.sleep(self._delay)

    def _create_zarr(self, args: tuple, kwargs: dict) -> None:
        from .case import checksum

        self._group.create_array(*args, **kwargs)
        data = kwargs.get("data")
        if args and isinstance(data, np.ndarray):
            self.checksums[args[0]] = checksum(data)

    def _create_raw(self, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        """The array's ``zarr.json`` (zarr's own metadata class serialises it: the bytes zarr's
        ``create_array`` writes, tested) and its chunk files (uncompressed: the chunk's
        little-endian C-order bytes, as zarr's bytes codec stores them) written straight to disk:
        zarr's asynchronous store round trips cost more than the data on a full-size case."""
        items = _raw_items(data, chunks)
        assert self._raw_dir is not None and items is not None   # create_array checked both
        meta = _array_json(data.shape, data.dtype, chunks)
        if meta is None:   # a dtype whose metadata we do not write ourselves
            self._group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None)
        else:
            parent = self._raw_dir
            for part in name.split("/")[:-1]:   # implicit parent groups, as zarr creates them
                parent = parent / part
                if not (parent / "zarr.json").is_file():
                    parent.mkdir(parents=True, exist_ok=True)
                    (parent / "zarr.json").write_bytes(_GROUP_JSON)
            (self._raw_dir / name).mkdir(parents=True, exist_ok=True)
            (self._raw_dir / name / "zarr.json").write_bytes(meta)
        import google_crc32c

        base = self._raw_dir / name / "c"
        crc = 0
        for key, sl in items:
            path = base.joinpath(*key)
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = data[sl].reshape(-1).view(np.uint8)
            with open(path, "wb", buffering=0) as f:
                for o in range(0, buf.size, PIECE):
                    piece = buf[o:o + PIECE]
                    f.write(piece.data)
                    crc = google_crc32c.extend(crc, piece)
        self.checksums[name] = f"crc32c:{crc:08x}"

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for f in pending:
                f.result()
        finally:
            for f in pending:
                f.cancel()

    @property
    def attrs(self) -> "_HeldAttributes":
        self.wait()
        return _HeldAttributes(self._group.attrs)

    def close(self) -> None:
        """Wait for every write (re-raising the first failure); however that ends, the worker has
        stopped writing when this returns, so that an abort removes everything."""
        try:
            self.wait()
        finally:
            with interrupts_held():
                self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, name: str):
        return getattr(self._group, name)


class _HeldAttributes:
    """A zarr group's attributes whose ``update`` holds off Ctrl-C: zarr writes them from its own
    thread, which an interrupt in this one would leave writing into a staging area being removed."""

    def __init__(self, attrs) -> None:
        self._attrs = attrs

    def update(self, values) -> None:
        with interrupts_held():
            self._attrs.update(values)

    def __getattr__(self, name: str):
        return getattr(self._attrs, name)


def _raw_items(a: Any, chunks: Any) -> list[tuple[tuple[str, ...], tuple[slice, ...]]] | None:
    """Chunk keys and slices when ``a`` is stored as one chunk or one chunk per leading index
    (the only layouts goldens use) in a dtype whose bytes zarr's ``bytes`` codec stores as they
    are in memory; else None (then zarr itself does the I/O)."""
    if not isinstance(a, np.ndarray) or a.ndim == 0 or 0 in a.shape or chunks is None:
        return None
    dt = a.dtype
    if dt.kind not in "biuf" or not (dt.byteorder in ("<", "|") or (dt.byteorder == "=" and sys.byteorder == "little")):
        return None
    chunks, zeros = tuple(int(c) for c in chunks), ("0",) * (a.ndim - 1)
    if chunks == a.shape:
        return [(("0",) + zeros, (slice(None),))]
    if chunks == (1, *a.shape[1:]):
        return [((str(i),) + zeros, (slice(i, i + 1),)) for i in range(a.shape[0])]
    return None


#: an empty group's ``zarr.json``, byte for byte as zarr 3 writes it
_GROUP_JSON = b'{\n  "attributes": {},\n  "zarr_format": 3,\n  "node_type": "group"\n}'


@functools.lru_cache(maxsize=256)
def _array_json(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...]) -> bytes | None:
    """``zarr.json`` of an uncompressed little-endian array with a regular chunk grid and default
    '/' chunk keys, serialised by zarr's :class:`ArrayV3Metadata` (None for dtypes other than
    bool, integers and floats)."""
    if dtype.kind not in "biuf":
        return None
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.metadata.v3 import ArrayV3Metadata

    fill: bool | int | float = False if dtype.kind == "b" else 0 if dtype.kind in "iu" else 0.0
    doc: dict[str, Any] = {
        "shape": list(shape), "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}] if dtype.itemsize > 1
        else [{"name": "bytes"}],
        "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": [],
    }
    return ArrayV3Metadata.from_dict(doc).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def write_case_pipelined(group, case: GroupValue, delay: float = 0.0, raw_dir: Path | None = None) -> dict[str, str]:
    """:func:`~moesnap.store.case.write_case` into ``group`` through a :class:`_PipelinedGroup`
    (``delay``: the store's ``write_delay``; ``raw_dir``: the case group's local directory, whose
    chunk files are then written directly).  Returns the checksum of every array."""
    import zarr

    g = _PipelinedGroup(group, delay, raw_dir)
    # every chunk is written, also all-zero ones: no scan for the fill value, and a golden
    # whose chunk file disappears is caught by its checksum rather than read back as zeros
    with zarr.config.set({"array.write_empty_chunks": True}):
        try:
            sums = write_case(g, case)
        finally:
            g.close()
    return sums


# ---------------------------------------------------------------- zarr (shared)


class ZarrGoldenStore(GoldenStore):
    """Reading is the same for every zarr storage backend; writing differs (rename vs marker).

    ``write_delay`` and ``read_delay`` (seconds, 0 in normal use) pause after each array written
    (the S3 store then also uploads one object at a time) and before each case is read: they
    widen the window in which the crash and concurrency tests kill a writer or a server.
    """

    def __init__(self, *, write_delay: float = 0.0, read_delay: float = 0.0) -> None:
        for name, value in (("write_delay", write_delay), ("read_delay", read_delay)):
            if not value >= 0:
                raise UsageError(f"{name}={value!r} must be ≥ 0")
        self.write_delay, self.read_delay = float(write_delay), float(read_delay)

    @abstractmethod
    def _zstore(self):
        """A read-only zarr store at the root."""

    def _raw_case_dir(self, suite: str, version: str, case: str) -> Path | None:
        """A local directory whose chunk files may be read directly (None: go through zarr)."""
        return None

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes | None:
        """Raw bytes of ``key`` under the root, or None when absent."""

    def _read_meta(self, suite: str, version: str) -> dict[str, Any]:
        where = self.where(suite, version)
        marker_raw = self._get_bytes(f"{suite}/{version}/{MARKER}")
        raw = self._get_bytes(f"{suite}/{version}/zarr.json")
        if marker_raw is None:
            raise GoldenError(f"{where}: not published (no {MARKER})")
        if raw is None:
            raise GoldenError(f"{where}: zarr.json is missing")
        try:
            marker = json.loads(marker_raw)
            doc = json.loads(raw)
        except ValueError as e:
            raise GoldenError(f"{where}: unreadable metadata ({e})") from None
        if not isinstance(marker, dict) or not isinstance(doc, dict):
            raise GoldenError(f"{where}: malformed metadata")
        if marker.get("meta_sha256") not in (None, hashlib.sha256(raw).hexdigest()):
            raise GoldenError(f"{where}/zarr.json: changed after publishing (sha256 differs from {MARKER})")
        if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
            raise GoldenError(f"{where}: not a Zarr v3 group")
        meta = doc.get("attributes") or {}
        if not isinstance(meta, dict) or not isinstance(meta.get("cases"), list):
            raise GoldenError(f"{where}: no golden provenance in its attributes")
        if meta.get("schema") != SCHEMA:
            raise GoldenError(f"{where}: golden schema {meta.get('schema')!r}, this moesnap reads {SCHEMA}")
        return meta

    def _open_case(self, suite: str, version: str, case: str, where: str):
        """The case group and the shape and dtype this version recorded of each of its arrays."""
        import zarr

        if self.read_delay:
            time.sleep(self.read_delay)
        try:
            group = zarr.open_group(self._zstore(), path=f"{suite}/{version}/{case}", mode="r", zarr_format=3)
        except MoesnapError:
            raise
        except Exception as e:
            raise GoldenError(f"{where}: case group missing or unreadable ({describe_error(e)})") from None
        return group, self._expected(suite, version, case)

    def _open_case_fast(self, suite: str, version: str, case: str, where: str):
        """:meth:`_open_case`, from a local case directory's ``zarr.json`` files read directly
        (:class:`_LocalGroup`) when every array in it is plain; else through zarr."""
        raw_dir = self._raw_case_dir(suite, version, case)
        local = _LocalGroup.open(raw_dir) if raw_dir is not None else None
        if local is None:
            return self._open_case(suite, version, case, where)
        if self.read_delay:
            time.sleep(self.read_delay)
        return local, self._expected(suite, version, case)

    def _expected(self, suite: str, version: str, case: str) -> dict:
        for entry in self._read_meta(suite, version).get("cases") or []:
            if isinstance(entry, dict) and entry.get("name") == case and isinstance(entry.get("arrays"), dict):
                return entry["arrays"]
        return {}

    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        where = f"{self.where(suite, version)}/{case}"
        with self._errors(where):
            group, expected = self._open_case_fast(suite, version, case, where)
            return _read_case_parallel(group, where=where, verify=verify,
                                       raw_dir=self._raw_case_dir(suite, version, case), expected=expected)

    def _read_arrays(self, suite: str, version: str, case: str, *, verify: bool) -> dict[str, np.ndarray]:
        where = f"{self.where(suite, version)}/{case}"
        with self._errors(where):
            group, expected = self._open_case_fast(suite, version, case, where)
            raw_dir = self._raw_case_dir(suite, version, case)
            raw = (lambda arr, path: _read_raw(arr, raw_dir, path)) if raw_dir is not None else None
            return read_arrays(group, where=where, verify=verify, threads=_READ_THREADS, raw=raw, expected=expected)[1]

    @contextlib.contextmanager
    def _errors(self, where: str) -> Iterator[None]:
        """Storage faults become one-line GoldenErrors naming the place."""
        try:
            yield
        except MoesnapError:
            raise
        except (OSError, TimeoutError, RuntimeError, ValueError, KeyError) as e:
            raise GoldenError(f"{where}: storage error ({describe_error(e)})") from None

    def _new_version_group(self, zstore):
        import zarr

        return zarr.create_group(zstore, zarr_format=3, overwrite=False)


@functools.lru_cache(maxsize=1024)
def _array_metadata(raw: bytes):
    """zarr's parsed metadata of an array's ``zarr.json`` bytes (the arrays of every case and
    version of a suite share a few dozen distinct ones; parsing is most of opening a case)."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    return ArrayV3Metadata.from_dict(json.loads(raw))


class _LocalArray:
    """What reading needs of a ``zarr.Array`` (``shape``, ``dtype``, ``metadata``), from its
    ``zarr.json`` parsed by zarr's metadata class; indexing opens the array through zarr."""

    def __init__(self, root: Path, path: str, metadata) -> None:
        self._root, self._path, self.metadata = root, path, metadata
        self.shape = tuple(int(n) for n in metadata.shape)
        self.dtype = np.dtype(metadata.data_type.to_native_dtype())

    def __getitem__(self, key):
        import zarr
        from zarr.storage import LocalStore

        return zarr.open_array(LocalStore(self._root, read_only=True), path=self._path, mode="r")[key]


class _LocalGroup:
    """A local case group read without zarr's asynchronous store: its attributes and its arrays'
    metadata come from the ``zarr.json`` files themselves (zarr's own classes parse them).
    :meth:`open` gives None unless every node is a plain Zarr v3 group or an uncompressed
    little-endian array in one of the chunk layouts moesnap writes (then zarr reads the group,
    with its own checks and messages)."""

    def __init__(self, attrs: dict, members: list[tuple[str, _LocalArray]]) -> None:
        self.attrs, self._members = attrs, members

    def array_members(self) -> list[tuple[str, _LocalArray]]:
        return list(self._members)

    @classmethod
    def open(cls, case_dir: Path) -> "_LocalGroup | None":
        try:
            doc = json.loads((case_dir / "zarr.json").read_bytes())
            if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
                return None
            attrs = doc.get("attributes") or {}
            if not isinstance(attrs, dict):
                return None
            members: list[tuple[str, _LocalArray]] = []
            if not cls._walk(case_dir, case_dir, "", members):
                return None
            return cls(attrs, sorted(members, key=lambda m: m[0]))
        # a file that is missing, unreadable or not the JSON a plain group or array holds: zarr's
        # reading says what is wrong with it (anything else is a bug of ours, and surfaces)
        except (OSError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RecursionError):
            return None

    @classmethod
    def _walk(cls, root: Path, d: Path, prefix: str, out: list) -> bool:
        from zarr.codecs import BytesCodec

        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue
            meta_path = Path(entry.path) / "zarr.json"
            if not meta_path.is_file():
                continue
            raw = meta_path.read_bytes()
            doc = json.loads(raw)
            path = prefix + entry.name
            if doc.get("node_type") == "group" and doc.get("zarr_format") == 3:
                if not cls._walk(root, Path(entry.path), path + "/", out):
                    return False
                continue
            if doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
                return False
            m = _array_metadata(raw)
            codecs = tuple(m.codecs)
            if (len(codecs) != 1 or not isinstance(codecs[0], BytesCodec)
                    or getattr(codecs[0].endian, "value", codecs[0].endian) not in ("little", None)
                    or getattr(m.chunk_key_encoding, "separator", "") != "/"
                    or getattr(m.chunk_key_encoding, "name", "") != "default" or m.storage_transformers):
                return False
            arr = _LocalArray(root, path, m)
            if arr.dtype.kind not in "biuf":
                return False
            chunks = tuple(int(c) for c in m.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
            if arr.shape and chunks != arr.shape and chunks != (1, *arr.shape[1:]):
                return False
            out.append((path, arr))
        return True


_READ_THREADS = 4   # arrays read and checked at once (zarr's reads and CRC-32C release the GIL)


def _read_raw(arr, raw_dir: Path, path: str) -> tuple[np.ndarray, str] | str | None:
    """Read a local array's chunk files straight into the result when its layout is one that
    :class:`_PipelinedGroup` writes raw (uncompressed, little-endian, one chunk or one per
    leading index, default '/' keys), with the CRC-32C of its bytes taken piece by piece as
    they arrive (while they are in cache; the store's checksum, so verifying costs no second
    pass); None when it is not (zarr reads it then); a string saying what is wrong with a
    chunk file of the wrong size."""
    import google_crc32c
    from zarr.codecs import BytesCodec

    m = arr.metadata
    try:
        codecs = tuple(m.codecs)
        simple = (len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
                  and getattr(codecs[0].endian, "value", codecs[0].endian) in ("little", None)
                  and getattr(m.chunk_key_encoding, "name", "") == "default"
                  and getattr(m.chunk_key_encoding, "separator", "") == "/"
                  and not getattr(m, "storage_transformers", ()))
        chunks = tuple(m.chunk_grid.chunk_shape)
    except AttributeError:
        return None
    if not simple:
        return None
    out = np.empty(arr.shape, dtype=arr.dtype)
    items = _raw_items(out, chunks)
    if items is None:
        return None
    base = raw_dir / path / "c"
    crc = 0
    for key, sl in items:
        view = out[sl]
        buf = view.reshape(-1).view(np.uint8)
        try:
            fd = os.open(base.joinpath(*key), os.O_RDONLY)
        except FileNotFoundError:
            view[...] = m.fill_value
            crc = google_crc32c.extend(crc, buf)
            continue
        try:
            if os.fstat(fd).st_size != buf.size:
                return f"chunk c/{'/'.join(key)} has the wrong size (corrupt or truncated)"
            for o in range(0, buf.size, PIECE):
                piece = buf[o:o + PIECE]
                if _pread_all(fd, piece.data, o) != piece.size:
                    return f"chunk c/{'/'.join(key)} has the wrong size (corrupt or truncated)"
                crc = google_crc32c.extend(crc, piece)
        finally:
            os.close(fd)
    return out, f"crc32c:{crc:08x}"


#: chunk files are read and written in pieces of this size, each checksummed while it is in cache
PIECE = 1 << 20


def _pread_all(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _read_case_parallel(group, *, where: str, verify: bool, raw_dir: Path | None = None,
                        expected: dict | None = None) -> Case:
    """:func:`moesnap.store.case.read_case` on :data:`_READ_THREADS` threads, local chunk files read
    straight into the result (:func:`_read_raw`) where ``raw_dir`` is given."""
    raw = (lambda arr, path: _read_raw(arr, raw_dir, path)) if raw_dir is not None else None
    return read_case(group, where=where, verify=verify, threads=_READ_THREADS, raw=raw, expected=expected)
