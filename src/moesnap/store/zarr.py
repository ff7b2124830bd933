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
import hashlib
import json
import sys
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .case import Case, GroupValue, read_arrays, read_case, write_case
from ..errors import GoldenError, MoesnapError, UsageError
from ..util import describe_error
from .base import MARKER, SCHEMA, GoldenStore


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
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moesnap-write")
        self._pending: list = []

    def create_array(self, *args, **kwargs) -> None:
        data, chunks = kwargs.get("data"), kwargs.get("chunks")
        if (self._raw_dir is not None and len(args) == 1 and set(kwargs) == {"data", "chunks", "compressors"}
                and kwargs["compressors"] is None and chunks is not None and _raw_items(data, chunks) is not None):
            job = self._pool.submit(self._create_raw, args[0], np.ascontiguousarray(data), tuple(chunks))
        else:
            job = self._pool.submit(self._group.create_array, *args, **kwargs)
        self._pending.append(job)
        if self._delay:
            self.wait()
            time.sleep(self._delay)

    def _create_raw(self, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        """zarr writes the metadata; the chunk files (uncompressed: the chunk's little-endian
        C-order bytes) are written straight from the array, as zarr's bytes codec would."""
        items = _raw_items(data, chunks)
        assert self._raw_dir is not None and items is not None   # create_array checked both
        self._group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None)
        base = self._raw_dir / name / "c"
        for key, sl in items:
            path = base.joinpath(*key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data[sl].data.cast("B"))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for f in pending:
                f.result()
        finally:
            for f in pending:
                f.cancel()

    @property
    def attrs(self):
        self.wait()
        return self._group.attrs

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, name: str):
        return getattr(self._group, name)


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
        expected: dict = {}
        for entry in self._read_meta(suite, version).get("cases") or []:
            if isinstance(entry, dict) and entry.get("name") == case and isinstance(entry.get("arrays"), dict):
                expected = entry["arrays"]
        return group, expected

    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        where = f"{self.where(suite, version)}/{case}"
        with self._errors(where):
            group, expected = self._open_case(suite, version, case, where)
            return _read_case_parallel(group, where=where, verify=verify,
                                       raw_dir=self._raw_case_dir(suite, version, case), expected=expected)

    def _read_arrays(self, suite: str, version: str, case: str, *, verify: bool) -> dict[str, np.ndarray]:
        where = f"{self.where(suite, version)}/{case}"
        with self._errors(where):
            group, expected = self._open_case(suite, version, case, where)
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


_READ_THREADS = 4   # arrays read and checked at once (zarr's reads and CRC-32C release the GIL)


def _read_raw(arr, raw_dir: Path, path: str) -> np.ndarray | str | None:
    """Read a local array's chunk files straight into the result when its layout is one that
    :class:`_PipelinedGroup` writes raw (uncompressed, little-endian, one chunk or one per
    leading index, default '/' keys); None when it is not (zarr reads it then); a string
    saying what is wrong with a chunk file of the wrong size."""
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
    for key, sl in items:
        view = out[sl]
        try:
            f = open(base.joinpath(*key), "rb")
        except FileNotFoundError:
            view[...] = m.fill_value
            continue
        with f:
            n = f.readinto(view.data.cast("B"))
            extra = f.read(1)
        if n != view.nbytes or extra:
            return f"chunk c/{'/'.join(key)} has the wrong size (corrupt or truncated)"
    return out


def _read_case_parallel(group, *, where: str, verify: bool, raw_dir: Path | None = None,
                        expected: dict | None = None) -> Case:
    """:func:`moesnap.store.case.read_case` on :data:`_READ_THREADS` threads, local chunk files read
    straight into the result (:func:`_read_raw`) where ``raw_dir`` is given."""
    raw = (lambda arr, path: _read_raw(arr, raw_dir, path)) if raw_dir is not None else None
    return read_case(group, where=where, verify=verify, threads=_READ_THREADS, raw=raw, expected=expected)
