"""The golden store: versioned, immutable, checksummed goldens.

::

    <root>/<suite>/<version>/              one Zarr v3 group per version (v0001, v0002, ...)
    <root>/<suite>/<version>/zarr.json     attributes: provenance, cases, a checksum per array
    <root>/<suite>/<version>/published.json   the publish marker, written last
    <root>/<suite>/<version>/<case>/...    one case group (the layout of :mod:`moesnap.case`)

A root is a local directory (default ``goldens/``) or ``s3://bucket/prefix``
(through zarr's own :class:`~zarr.storage.FsspecStore` and s3fs; the endpoint
comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials from the
usual AWS variables).  :class:`MemoryGoldenStore` keeps versions in a dict, for
tests and for callers that want no disk.

Publishing is atomic and never overwrites (readers only ever see versions
that carry the marker):

* **local**: a version is written into ``<suite>/.staging-<id>/`` whose
  directory the writer holds an exclusive ``flock`` on; the marker goes in
  last; then, under a ``flock`` on the suite directory, the next free name is
  claimed by ``os.rename`` (a name that exists in any form is skipped, and a
  rename onto a non-empty directory fails, so two writers never share one).
  A killed writer leaves only a ``.staging-*`` directory that nobody lists;
  ``prune`` removes it once its lock is free.  No ``fsync``: this covers
  crashed processes, not power loss.
* **S3**: object stores cannot rename, so a version name is claimed up front
  by a conditional put (``If-None-Match: *``) of ``<version>/claim.json``;
  the arrays, the group metadata and then the marker (also conditional) are
  written under that name.  A version without the marker is invisible; a
  killed writer leaves an unmarked prefix that ``prune`` removes once nothing
  in it has been written for ``stale_after`` seconds.  Deleting removes the
  marker first.

Reading verifies every array against the sha256 recorded at write time (the
case group's own and the version's must agree), and a missing array is an
error: :class:`~moesnap.errors.GoldenError` naming the array.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .case import Case, checksum, write_case
from .errors import GoldenError, MoesnapError, UsageError

SCHEMA = 1                      # version of the store layout and its provenance attributes
MARKER = "published.json"       # written last; readers ignore versions without it
CLAIM = "claim.json"            # object stores: the conditional put that reserves a version name
DEFAULT_ROOT = "goldens"
DEFAULT_STALE_AFTER = 24 * 3600  # seconds without a write before an unpublished remote version counts as dead

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_VERSION = re.compile(r"v(\d{4,9})")


# ---------------------------------------------------------------- names


def validate_suite(name: object) -> str:
    """Return ``name`` if it is a safe suite name, else raise :class:`UsageError` saying why."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"suite name {name!r} is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UsageError(f"suite name {name!r} contains control characters")
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        raise UsageError(f"suite name {name!r} is an absolute path")
    if ".." in name:
        raise UsageError(f"suite name {name!r} contains '..'")
    if "/" in name or "\\" in name:
        raise UsageError(f"suite name {name!r} contains a path separator")
    if not _NAME.fullmatch(name):
        raise UsageError(f"suite name {name!r}: use up to 100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    return name


def validate_case_name(name: object) -> str:
    if not isinstance(name, str) or not _CASE.fullmatch(name):
        raise UsageError(f"case name {name!r}: use up to 100 letters, digits, '_' or '-', "
                         f"starting with a letter or digit")
    return name


def version_name(n: int) -> str:
    return f"v{n:04d}"


def version_number(name: str) -> int | None:
    m = _VERSION.fullmatch(name)
    return int(m.group(1)) if m else None


def validate_version(name: object) -> str:
    if not isinstance(name, str) or version_number(name) is None:
        raise UsageError(f"version {name!r}: expected v followed by 4 or more digits, like v0001")
    return name


def parse_ref(spec: str) -> tuple[str, str | None]:
    """``NAME`` -> (NAME, None) meaning the newest version; ``NAME@v0003`` -> (NAME, "v0003")."""
    if not isinstance(spec, str):
        raise UsageError(f"golden reference {spec!r}: expected NAME or NAME@vNNNN")
    suite, at, version = spec.partition("@")
    validate_suite(suite)
    if not at:
        return suite, None
    return suite, validate_version(version)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_clean(obj: Any) -> Any:
    """A deep copy that only holds JSON types (what zarr attributes can keep)."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise GoldenError(f"provenance is not JSON-serialisable ({e})") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _test_delay(var: str) -> float:
    """Test hook: seconds to sleep between writes/reads (widens the window for kill tests)."""
    try:
        return max(0.0, float(os.environ.get(var, "0") or 0))
    except ValueError:
        return 0.0


class _PipelinedGroup:
    """A zarr group for :func:`~moesnap.case.write_case` whose ``create_array`` hands the
    write to a worker thread and returns at once, so that write_case's checksum of one
    array (sha256 releases the GIL) runs while the previous array is written.  One worker:
    arrays are written in order, one at a time.  ``attrs`` waits for every write first, and
    :meth:`wait` re-raises the first failure.  ``delay`` (MOESNAP_TEST_SLOW_WRITE) sleeps
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
                and kwargs["compressors"] is None and _raw_items(data, chunks) is not None):
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
        self._group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None)
        base = self._raw_dir / name / "c"
        for key, sl in _raw_items(data, chunks):
            path = base.joinpath(*key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(memoryview(data[sl]).cast("B"))

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


def _write_case_pipelined(group, case: Case, delay: float = 0.0, raw_dir: Path | None = None) -> dict[str, str]:
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


# ---------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Leftover:
    """Something unpublished in a suite: a writer's staging area (alive or dead) or trash."""

    name: str
    age_s: float | None      # seconds since its last write, if known
    alive: bool | None       # True: a writer holds it; False: dead; None: unknown (judge by age)

    def stale(self, stale_after: float) -> bool:
        if self.alive is not None:
            return not self.alive
        return self.age_s is not None and self.age_s >= stale_after


@dataclass(frozen=True)
class PruneResult:
    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    cleaned: tuple[str, ...]


@dataclass(frozen=True)
class GoldenVersion:
    """One published version: its provenance and access to its cases."""

    store: "GoldenStore" = field(repr=False)
    suite: str
    version: str
    meta: Mapping[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        return f"{self.suite}@{self.version}"

    @property
    def where(self) -> str:
        return self.store.where(self.suite, self.version)

    def case_names(self) -> list[str]:
        return [c["name"] for c in self.meta.get("cases", [])]

    def case_info(self, name: str) -> Mapping[str, Any]:
        for c in self.meta.get("cases", []):
            if c.get("name") == name:
                return c
        raise GoldenError(f"{self.ref}: no case {name!r} (cases: {', '.join(self.case_names()) or 'none'})")

    def read_case(self, name: str, *, verify: bool = True) -> Case:
        """Read one case; with ``verify``, every array is checked against the recorded sha256."""
        self.case_info(name)
        validate_case_name(name)
        where = f"{self.where}/{name}"
        case = self.store._read_case(self.suite, self.version, name, verify=verify)
        if verify:
            expect = {k[len(name) + 1:]: v for k, v in (self.meta.get("checksums") or {}).items()
                      if k.startswith(name + "/")}
            have = case.attrs.get("checksums") or {}
            if expect != have:
                arrays = case.arrays()
                for path, digest in expect.items():
                    if path not in arrays:
                        raise GoldenError(f"{where}/{path}: array is missing")
                    if checksum(arrays[path]) != digest:
                        raise GoldenError(f"{where}/{path}: checksum mismatch (corrupt or modified array)")
                raise GoldenError(f"{where}: the case's checksums differ from the version's provenance (modified)")
        return case


class VersionWriter(ABC):
    """Writes one new version; nothing is visible until :meth:`commit` returns.

    Use as a context manager: leaving the block without a commit (or with an
    exception) aborts and removes what was written.
    """

    def __init__(self, store: "GoldenStore", suite: str) -> None:
        self.store, self.suite = store, suite
        self._cases: list[dict[str, Any]] = []
        self._checksums: dict[str, str] = {}
        self._done = False

    def add_case(self, name: str, case: Case) -> None:
        validate_case_name(name)
        if self._done:
            raise GoldenError(f"{self.suite}: writer already committed or aborted")
        if any(c["name"] == name for c in self._cases):
            raise UsageError(f"case name {name!r} given twice")
        sums = self._write_case(name, case)
        self._cases.append({
            "name": name,
            "prompt": case.attrs.get("prompt"),
            "token_ids": [int(t) for t in np.asarray(case.tokens).tolist()],
            "arrays": {p: {"shape": list(a.shape), "dtype": str(a.dtype)} for p, a in case.arrays().items()},
        })
        self._checksums.update({f"{name}/{p}": s for p, s in sums.items()})

    def commit(self, meta: Mapping[str, Any] | None = None) -> GoldenVersion:
        """Publish atomically under the next free version name and return it."""
        if self._done:
            raise GoldenError(f"{self.suite}: writer already committed or aborted")
        if not self._cases:
            raise UsageError(f"{self.suite}: a version needs at least one case")
        full = _json_clean({**dict(meta or {}), "schema": SCHEMA, "cases": self._cases,
                            "checksums": self._checksums})
        version = self._publish(full)
        self._done = True
        return GoldenVersion(self.store, self.suite, version, full)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._discard()

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            with contextlib.suppress(Exception):
                self.abort()

    @abstractmethod
    def _write_case(self, name: str, case: Case) -> dict[str, str]:
        """Write the case's arrays; return {array path: sha256}."""

    @abstractmethod
    def _publish(self, meta: dict[str, Any]) -> str:
        """Make the version visible under a fresh name; return that name."""

    @abstractmethod
    def _discard(self) -> None:
        """Remove what was written (best effort)."""


class GoldenStore(ABC):
    """A root of suites of immutable versions.  Implementations: Zarr (local, S3) and memory."""

    url: str

    # -- what an implementation provides
    @abstractmethod
    def suites(self) -> list[str]:
        """Suites with at least one published version, sorted."""

    @abstractmethod
    def versions(self, suite: str) -> list[str]:
        """Published versions of ``suite``, oldest first ([] for an unknown suite)."""

    @abstractmethod
    def begin(self, suite: str) -> VersionWriter:
        """Start writing a new version of ``suite``."""

    @abstractmethod
    def _read_meta(self, suite: str, version: str) -> dict[str, Any]:
        """The attributes of a published version."""

    @abstractmethod
    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        """One case, checked against its own checksums when ``verify``."""

    @abstractmethod
    def _delete(self, suite: str, version: str) -> None:
        """Unpublish and remove one version (atomically invisible first)."""

    @abstractmethod
    def leftovers(self, suite: str) -> list[Leftover]:
        """Unpublished things in ``suite``: writers' staging areas, dead or alive, and trash."""

    @abstractmethod
    def _remove_leftover(self, suite: str, leftover: Leftover) -> bool:
        """Remove a leftover judged dead; False when it turned out to be alive or gone."""

    # -- what every store shares
    def close(self) -> None:
        """Release connections (remote stores); the store stays readable by reopening."""

    def __enter__(self) -> "GoldenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def where(self, suite: str, version: str | None = None) -> str:
        base = f"{self.url.rstrip('/')}/{suite}"
        return f"{base}/{version}" if version else base

    def open_version(self, suite: str, version: str | None = None) -> GoldenVersion:
        """A published version (the newest when ``version`` is None)."""
        validate_suite(suite)
        known = self.versions(suite)
        if not known:
            have = self.suites()
            raise GoldenError(f"{self.where(suite)}: unknown suite {suite!r} "
                              f"(suites in {self.url}: {', '.join(have) or 'none'})")
        if version is None:
            version = known[-1]
        validate_version(version)
        if version not in known:
            raise GoldenError(f"{self.where(suite)}: unknown version {version!r} "
                              f"(published: {', '.join(known)})")
        return GoldenVersion(self, suite, version, self._read_meta(suite, version))

    def resolve(self, spec: str) -> GoldenVersion:
        """``NAME`` or ``NAME@vNNNN`` -> that version."""
        return self.open_version(*parse_ref(spec))

    def publish(self, suite: str, cases: Mapping[str, Case], meta: Mapping[str, Any] | None = None) -> GoldenVersion:
        """Write ``cases`` as one new version (a convenience around :meth:`begin`)."""
        with self.begin(suite) as w:
            for name, case in cases.items():
                w.add_case(name, case)
            return w.commit(meta)

    def delete_version(self, suite: str, version: str) -> None:
        """Delete one version; the newest version of a suite is never deleted."""
        known = self.versions(validate_suite(suite))
        validate_version(version)
        if version not in known:
            raise GoldenError(f"{self.where(suite)}: unknown version {version!r}")
        if version == known[-1]:
            raise GoldenError(f"{self.where(suite, version)}: refusing to delete the newest version")
        self._delete(suite, version)

    def prune(self, suite: str, keep: int, *, stale_after: float = DEFAULT_STALE_AFTER) -> PruneResult:
        """Keep the newest ``keep`` (at least 1) versions; remove dead leftovers."""
        validate_suite(suite)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise UsageError(f"keep={keep!r} must be an integer ≥ 1 (the newest version is never deleted)")
        if stale_after < 0:
            raise UsageError(f"stale_after={stale_after!r} must be ≥ 0")
        known = self.versions(suite)
        if not known and not self.leftovers(suite):
            raise GoldenError(f"{self.where(suite)}: unknown suite {suite!r}")
        doomed, kept = known[:-keep], known[-keep:]
        for v in doomed:
            self._delete(suite, v)
        cleaned = [lo.name for lo in self.leftovers(suite)
                   if lo.stale(stale_after) and self._remove_leftover(suite, lo)]
        return PruneResult(tuple(doomed), tuple(kept), tuple(cleaned))


# ---------------------------------------------------------------- in memory


@dataclass
class _MemVersion:
    meta: dict[str, Any]
    cases: dict[str, dict[str, np.ndarray]]   # case -> array path -> array
    case_attrs: dict[str, dict[str, Any]]


class MemoryGoldenStore(GoldenStore):
    """Versions in a dict: same rules as the Zarr store, no disk."""

    def __init__(self, name: str = "memory") -> None:
        self.url = f"memory://{name}"
        self._lock = threading.Lock()
        self._published: dict[str, dict[str, _MemVersion]] = {}
        self._writers: dict[str, dict[str, "_MemoryWriter"]] = {}
        self._claimed: dict[str, int] = {}

    def suites(self) -> list[str]:
        with self._lock:
            return sorted(s for s, vs in self._published.items() if vs)

    def versions(self, suite: str) -> list[str]:
        validate_suite(suite)
        with self._lock:
            return sorted(self._published.get(suite, {}), key=version_number)

    def begin(self, suite: str) -> VersionWriter:
        validate_suite(suite)
        w = _MemoryWriter(self, suite)
        with self._lock:
            self._writers.setdefault(suite, {})[w.token] = w
        return w

    def _get(self, suite: str, version: str) -> _MemVersion:
        with self._lock:
            v = self._published.get(suite, {}).get(version)
        if v is None:
            raise GoldenError(f"{self.where(suite, version)}: unknown version")
        return v

    def _read_meta(self, suite: str, version: str) -> dict[str, Any]:
        return copy.deepcopy(self._get(suite, version).meta)

    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        v = self._get(suite, version)
        where = f"{self.where(suite, version)}/{case}"
        if case not in v.cases:
            raise GoldenError(f"{where}: no such case group")
        arrays, attrs = v.cases[case], copy.deepcopy(v.case_attrs[case])
        sums = attrs.get("checksums") or {}
        if verify:
            for path, digest in sums.items():
                if path not in arrays:
                    raise GoldenError(f"{where}/{path}: array is missing")
                if checksum(arrays[path]) != digest:
                    raise GoldenError(f"{where}/{path}: checksum mismatch (corrupt or modified array)")
        if "tokens" not in arrays:
            raise GoldenError(f"{where}: no 'tokens' array")
        out = {p: a.copy() for p, a in arrays.items()}
        return Case(tokens=out.pop("tokens").astype(np.int32),
                    model={p: a for p, a in out.items() if not p.startswith("layers/")},
                    layers={p[len("layers/"):]: a for p, a in out.items() if p.startswith("layers/")},
                    attrs=attrs)

    def _delete(self, suite: str, version: str) -> None:
        with self._lock:
            self._published.get(suite, {}).pop(version, None)

    def leftovers(self, suite: str) -> list[Leftover]:
        with self._lock:
            return [Leftover(t, None, not w._dead) for t, w in self._writers.get(suite, {}).items()]

    def _remove_leftover(self, suite: str, leftover: Leftover) -> bool:
        with self._lock:
            w = self._writers.get(suite, {}).get(leftover.name)
            if w is None or not w._dead:
                return False
            del self._writers[suite][leftover.name]
            return True

    def simulate_crash(self, writer: VersionWriter) -> None:
        """Test helper: the writer's process died (its staging stays until pruned)."""
        assert isinstance(writer, _MemoryWriter)
        writer._dead = writer._done = True


class _MemoryWriter(VersionWriter):
    def __init__(self, store: MemoryGoldenStore, suite: str) -> None:
        super().__init__(store, suite)
        self.token = f".staging-{uuid.uuid4().hex[:12]}"
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._attrs: dict[str, dict[str, Any]] = {}
        self._dead = False

    def _write_case(self, name: str, case: Case) -> dict[str, str]:
        arrays = {p: np.array(a, copy=True, order="C") for p, a in case.arrays().items()}
        for a in arrays.values():
            a.setflags(write=False)
        sums = {p: checksum(a) for p, a in arrays.items()}
        self._arrays[name] = arrays
        self._attrs[name] = _json_clean({**case.attrs, "checksums": sums})
        return sums

    def _publish(self, meta: dict[str, Any]) -> str:
        st: MemoryGoldenStore = self.store  # type: ignore[assignment]
        with st._lock:
            if self._dead:
                raise GoldenError(f"{self.suite}: writer died")
            vs = st._published.setdefault(self.suite, {})
            n = max([version_number(v) or 0 for v in vs] + [st._claimed.get(self.suite, 0)]) + 1
            name = version_name(n)
            st._claimed[self.suite] = n
            vs[name] = _MemVersion(meta, self._arrays, self._attrs)
            st._writers.get(self.suite, {}).pop(self.token, None)
        return name

    def _discard(self) -> None:
        st: MemoryGoldenStore = self.store  # type: ignore[assignment]
        with st._lock:
            st._writers.get(self.suite, {}).pop(self.token, None)


# ---------------------------------------------------------------- zarr (shared)


class ZarrGoldenStore(GoldenStore):
    """Reading is the same for every zarr storage backend; writing differs (rename vs marker)."""

    def _zstore(self):
        """A read-only zarr store at the root."""
        raise NotImplementedError

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

    def _read_case(self, suite: str, version: str, case: str, *, verify: bool) -> Case:
        import zarr

        where = f"{self.where(suite, version)}/{case}"
        delay = _test_delay("MOESNAP_TEST_SLOW_READ")
        if delay:
            time.sleep(delay)
        with self._errors(where):
            try:
                group = zarr.open_group(self._zstore(), path=f"{suite}/{version}/{case}", mode="r", zarr_format=3)
            except MoesnapError:
                raise
            except Exception as e:
                raise GoldenError(f"{where}: case group missing or unreadable ({_one_line(e)})") from None
            return _read_case_parallel(group, where=where, verify=verify,
                                       raw_dir=self._raw_case_dir(suite, version, case))

    @contextlib.contextmanager
    def _errors(self, where: str) -> Iterator[None]:
        """Storage faults become one-line GoldenErrors naming the place."""
        try:
            yield
        except MoesnapError:
            raise
        except (OSError, TimeoutError, RuntimeError, ValueError, KeyError) as e:
            raise GoldenError(f"{where}: storage error ({_one_line(e)})") from None

    def _new_version_group(self, zstore):
        import zarr

        return zarr.create_group(zstore, zarr_format=3, overwrite=False)


def _sha256(a: np.ndarray) -> str:
    """:func:`moesnap.case.checksum` without its copy: the same digest of the same bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or a.dtype.kind not in "biuf":
        return checksum(a)
    return hashlib.sha256(memoryview(a.reshape(-1)).cast("B")).hexdigest()


_READ_THREADS = 4   # arrays read and hashed at once (zarr's reads and sha256 release the GIL)


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
            n = f.readinto(memoryview(view).cast("B"))
            extra = f.read(1)
        if n != view.nbytes or extra:
            return f"chunk c/{'/'.join(key)} has the wrong size (corrupt or truncated)"
    return out


def _read_case_parallel(group, *, where: str, verify: bool, raw_dir: Path | None = None) -> Case:
    """:func:`moesnap.case.read_case` for goldens this module wrote (canonical names): the
    arrays are read and their sha256 checked on a few threads at once (local chunk files
    straight into the result when :func:`_read_raw` can).  Same errors: an unreadable,
    corrupt or missing array is a GoldenError naming it."""
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    try:
        attrs = dict(group.attrs)
        members = [(p, a) for p, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    except Exception as e:
        raise GoldenError(f"{where}: unreadable group ({_one_line(e)})") from None
    sums = attrs.get("checksums") or {}
    if not isinstance(sums, dict):
        raise GoldenError(f"{where}: attribute 'checksums' is not a mapping")

    def load(item):
        path, arr = item
        try:
            data = _read_raw(arr, raw_dir, path) if raw_dir is not None else None
            if isinstance(data, str):
                return path, None, data
            if data is None:
                data = np.asarray(arr[...])
        except Exception as e:
            return path, None, f"unreadable array ({_one_line(e)})"
        if verify and path in sums and _sha256(data) != sums[path]:
            return path, None, "checksum mismatch (corrupt or modified array)"
        return path, data, None

    with ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="moesnap-read") as pool:
        loaded = list(pool.map(load, members))
    arrays: dict[str, np.ndarray] = {}
    for path, data, problem in loaded:
        if problem is not None:
            raise GoldenError(f"{where}/{path}: {problem}")
        arrays[path] = data
    if verify:
        for path in sums:
            if path not in arrays:
                raise GoldenError(f"{where}/{path}: array is missing")
    if "tokens" not in arrays:
        raise GoldenError(f"{where}: no 'tokens' array")
    return Case(tokens=arrays.pop("tokens").astype(np.int32),
                model={p: a for p, a in arrays.items() if "/" not in p},
                layers={p[len("layers/"):]: a for p, a in arrays.items() if p.startswith("layers/")},
                attrs=attrs)


# ---------------------------------------------------------------- local directory


@contextlib.contextmanager
def _flocked(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on the directory ``path``; yields False if not blocking and busy."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class LocalGoldenStore(ZarrGoldenStore):
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.url = str(root)
        if self.root.exists() and not self.root.is_dir():
            raise GoldenError(f"{self.root}: store path is a file, not a directory")

    def _check(self, *, create: bool = False) -> None:
        if self.root.is_dir():
            return
        if self.root.exists():
            raise GoldenError(f"{self.root}: store path is a file, not a directory")
        if not create:
            raise GoldenError(f"{self.root}: no such golden store (a directory, or s3://bucket/prefix)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GoldenError(f"{self.root}: cannot create the store ({_one_line(e)})") from None

    def _zstore(self):
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=True)

    def _raw_case_dir(self, suite: str, version: str, case: str) -> Path | None:
        return self.root / suite / version / case

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            raise GoldenError(f"{self.root / key}: {_one_line(e)}") from None

    def suites(self) -> list[str]:
        self._check()
        out = []
        for entry in os.scandir(self.root):
            if entry.is_dir() and _NAME.fullmatch(entry.name) and ".." not in entry.name and self.versions(entry.name):
                out.append(entry.name)
        return sorted(out)

    def _version_dirs(self, suite: str) -> list[str]:
        d = self.root / suite
        if not d.is_dir():
            return []
        return [e.name for e in os.scandir(d) if version_number(e.name) is not None]

    def versions(self, suite: str) -> list[str]:
        validate_suite(suite)
        self._check()
        d = self.root / suite
        names = [v for v in self._version_dirs(suite) if (d / v / MARKER).is_file() and (d / v / "zarr.json").is_file()]
        return sorted(names, key=version_number)

    def begin(self, suite: str) -> VersionWriter:
        validate_suite(suite)
        self._check(create=True)
        return _LocalWriter(self, suite)

    def _delete(self, suite: str, version: str) -> None:
        d = self.root / suite
        trash = d / f".trash-{uuid.uuid4().hex[:12]}"
        with self._errors(self.where(suite, version)):
            os.rename(d / version, trash)      # invisible at once
            shutil.rmtree(trash)

    def leftovers(self, suite: str) -> list[Leftover]:
        validate_suite(suite)
        d = self.root / suite
        if not d.is_dir():
            return []
        out = []
        now = time.time()
        for e in os.scandir(d):
            if not e.is_dir(follow_symlinks=False):
                continue
            kind = e.name.split("-", 1)[0]
            if kind not in (".staging", ".init", ".trash"):
                continue
            try:
                age = now - e.stat(follow_symlinks=False).st_mtime
                if kind == ".trash":
                    alive = False
                else:
                    with _flocked(Path(e.path), blocking=False) as got:
                        alive = not got
                    if kind == ".init" and age < 60:
                        alive = True   # between mkdir and flock
            except FileNotFoundError:
                continue
            out.append(Leftover(e.name, age, alive))
        return sorted(out, key=lambda lo: lo.name)

    def _remove_leftover(self, suite: str, leftover: Leftover) -> bool:
        d = self.root / suite
        src = d / leftover.name
        trash = d / f".trash-{uuid.uuid4().hex[:12]}"
        try:
            if leftover.name.startswith(".trash-"):
                shutil.rmtree(src)
                return True
            with _flocked(src, blocking=False) as got:
                if not got:
                    return False
                # the writer is dead or already renamed this away: move by *name*, so a
                # published version (the renamed inode) is never what we delete
                os.rename(src, trash)
            shutil.rmtree(trash)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise GoldenError(f"{src}: cannot remove ({_one_line(e)})") from None


class _LocalWriter(VersionWriter):
    def __init__(self, store: LocalGoldenStore, suite: str) -> None:
        super().__init__(store, suite)
        self.suite_dir = store.root / suite
        token = uuid.uuid4().hex[:12]
        self._fd: int | None = None
        try:
            self.suite_dir.mkdir(exist_ok=True)
            init = self.suite_dir / f".init-{token}"
            os.mkdir(init)
            self._fd = os.open(init, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.dir = self.suite_dir / f".staging-{token}"
            os.rename(init, self.dir)
            from zarr.storage import LocalStore

            self.group = store._new_version_group(LocalStore(self.dir))
        except MoesnapError:
            raise
        except Exception as e:
            self._close()
            raise GoldenError(f"{self.suite_dir}: cannot start a new version ({_one_line(e)})") from None
        self._delay = _test_delay("MOESNAP_TEST_SLOW_WRITE")

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_case(self, name: str, case: Case) -> dict[str, str]:
        with self.store._errors(f"{self.dir}/{name}"):  # type: ignore[attr-defined]
            return _write_case_pipelined(self.group.create_group(name), case, self._delay, raw_dir=self.dir / name)

    def _publish(self, meta: dict[str, Any]) -> str:
        st: LocalGoldenStore = self.store  # type: ignore[assignment]
        with st._errors(str(self.dir)):
            self.group.attrs.update(meta)
            raw = (self.dir / "zarr.json").read_bytes()
            marker = {"schema": SCHEMA, "published": _now(), "meta_sha256": hashlib.sha256(raw).hexdigest()}
            (self.dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            with _flocked(self.suite_dir):
                n = max([version_number(v) or 0 for v in st._version_dirs(self.suite)], default=0) + 1
                for _ in range(10_000):
                    target = self.suite_dir / version_name(n)
                    if os.path.lexists(target):
                        n += 1
                        continue
                    try:
                        os.rename(self.dir, target)
                    except OSError as e:
                        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                            n += 1
                            continue
                        raise
                    break
                else:
                    raise GoldenError(f"{self.suite_dir}: no free version name")
        self._close()
        return version_name(n)

    def _discard(self) -> None:
        try:
            trash = self.suite_dir / f".trash-{uuid.uuid4().hex[:12]}"
            os.rename(self.dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            self._close()

    def __del__(self) -> None:
        self._close()


# ---------------------------------------------------------------- S3 (object stores)


def _env_number(name: str, default: float, *, integer: bool = False) -> float:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{name}={text!r}: expected a {'whole ' if integer else ''}number") from None
    if value < (1 if integer else 0):
        raise UsageError(f"{name}={text!r}: must be ≥ {1 if integer else 0}")
    return value


def _s3_options() -> dict[str, Any]:
    """s3fs options: endpoint from the AWS variables; timeouts and attempts from MOESNAP_S3_*."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config: dict[str, Any] = {
        "connect_timeout": _env_number("MOESNAP_S3_CONNECT_TIMEOUT", 5.0),
        "read_timeout": _env_number("MOESNAP_S3_READ_TIMEOUT", 30.0),
        "retries": {"max_attempts": int(_env_number("MOESNAP_S3_ATTEMPTS", 3, integer=True)), "mode": "standard"},
    }
    opts: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False, "config_kwargs": config}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


async def _collect(agen) -> list:
    return [x async for x in agen]


async def _upload(store, items: list) -> None:
    """Set every (key, buffer) concurrently; wait for all of them, then raise the first failure."""
    import asyncio

    results = await asyncio.gather(*(store.set(k, b) for k, b in items), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _close_fs(fs) -> None:
    """Close the aiohttp session of an asynchronous s3fs instance (s3fs leaves that to its owner)."""
    creator = getattr(fs, "_s3creator", None)
    if creator is None:
        return
    fs._s3creator = fs._s3 = None
    with contextlib.suppress(Exception):
        if hasattr(creator, "__aexit__"):
            _sync(creator.__aexit__(None, None, None))
        elif hasattr(creator, "clear"):
            _sync(creator.clear())


class RemoteGoldenStore(ZarrGoldenStore):
    """``s3://bucket/prefix`` through zarr's FsspecStore (s3fs imported only here)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        scheme, _, rest = url.partition("://")
        if scheme != "s3":
            raise UsageError(f"store {url!r}: only local directories and s3://bucket/prefix are supported")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise UsageError(f"store {url!r}: no bucket (expected s3://bucket/prefix)")
        if any(ord(ch) < 32 for ch in rest) or ".." in rest.split("/"):
            raise UsageError(f"store {url!r}: bad characters or '..' in the prefix")
        try:
            from zarr.storage import FsspecStore

            self._root = FsspecStore.from_url(self.url, storage_options=_s3_options())
        except ImportError as e:
            raise UsageError(f"store {url!r}: s3 support needs s3fs (pip install s3fs): {e}") from None
        self.fs = self._root.fs
        self.path = self._root.path.rstrip("/")
        self._finalizer = weakref.finalize(self, _close_fs, self.fs)

    def close(self) -> None:
        self._finalizer()

    @contextlib.contextmanager
    def _errors(self, where: str) -> Iterator[None]:
        try:
            yield
        except MoesnapError:
            raise
        except FileNotFoundError as e:
            raise GoldenError(f"{where}: not found ({_one_line(e)})") from None
        except PermissionError as e:
            raise GoldenError(f"{where}: access denied ({_one_line(e)})") from None
        except Exception as e:  # botocore / aiohttp / asyncio faults: the server went away or refused
            raise GoldenError(f"{where}: S3 storage error ({_one_line(e)})") from None

    def _key(self, key: str) -> str:
        return f"{self.path}/{key}" if key else self.path

    def _zstore(self):
        return self._root.with_read_only(True)

    def _get_bytes(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype

        with self._errors(f"{self.url}/{key}"):
            buf = _sync(self._root.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def _ls(self, key: str) -> list[str]:
        with self._errors(f"{self.url}/{key}"):
            try:
                return sorted(_sync(_collect(self._root.list_dir(key))))
            except FileNotFoundError:
                return []

    def _exists(self, key: str) -> bool:
        with self._errors(f"{self.url}/{key}"):
            return bool(_sync(self._root.exists(key)))

    def _check(self) -> None:
        bucket = self.path.split("/", 1)[0]
        try:
            _sync(self.fs._call_s3("head_bucket", Bucket=bucket))
        except FileNotFoundError:
            raise GoldenError(f"{self.url}: no such bucket {bucket!r}") from None
        except PermissionError as e:
            raise GoldenError(f"{self.url}: access denied ({_one_line(e)})") from None
        except Exception as e:   # unreachable endpoint, timeouts: say so, not "no such bucket"
            raise GoldenError(f"{self.url}: S3 storage error ({_one_line(e)})") from None

    def suites(self) -> list[str]:
        self._check()
        return [s for s in self._ls("") if _NAME.fullmatch(s) and ".." not in s and self.versions(s)]

    def _version_names(self, suite: str) -> list[str]:
        return [v for v in self._ls(suite) if version_number(v) is not None]

    def versions(self, suite: str) -> list[str]:
        validate_suite(suite)
        names = [v for v in self._version_names(suite) if self._get_bytes(f"{suite}/{v}/{MARKER}") is not None]
        return sorted(names, key=version_number)

    def begin(self, suite: str) -> VersionWriter:
        validate_suite(suite)
        self._check()
        return _RemoteWriter(self, suite)

    def _delete(self, suite: str, version: str) -> None:
        where = self.where(suite, version)
        with self._errors(where):
            _sync(self._root.delete(f"{suite}/{version}/{MARKER}"))   # invisible at once
            _sync(self._root.delete_dir(f"{suite}/{version}"))

    def leftovers(self, suite: str) -> list[Leftover]:
        validate_suite(suite)
        out = []
        now = time.time()
        for v in self._version_names(suite):
            if self._get_bytes(f"{suite}/{v}/{MARKER}") is not None:
                continue
            with self._errors(self.where(suite, v)):
                infos = _sync(self.fs._find(self._key(f"{suite}/{v}"), detail=True))
            stamps = [i.get("LastModified") for i in infos.values() if i.get("LastModified") is not None]
            age = None
            if stamps:
                newest = max(s.timestamp() if hasattr(s, "timestamp") else float(s) for s in stamps)
                age = max(0.0, now - newest)
            out.append(Leftover(v, age, None))
        return out

    def _remove_leftover(self, suite: str, leftover: Leftover) -> bool:
        with self._errors(self.where(suite, leftover.name)):
            if self._get_bytes(f"{suite}/{leftover.name}/{MARKER}") is not None:
                return False
            _sync(self._root.delete_dir(f"{suite}/{leftover.name}"))
        return True


_UPLOAD_BATCH = 64   # objects in flight at once when uploading a case


class _RemoteWriter(VersionWriter):
    def __init__(self, store: RemoteGoldenStore, suite: str) -> None:
        super().__init__(store, suite)
        from zarr.storage import FsspecStore

        self.token = uuid.uuid4().hex
        claim = json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                            "created": _now()}).encode()
        where = store.where(suite)
        with store._errors(where):
            n = max([version_number(v) or 0 for v in store._version_names(suite)], default=0) + 1
            for _ in range(1000):
                try:
                    _sync(store.fs._pipe_file(store._key(f"{suite}/{version_name(n)}/{CLAIM}"), claim, mode="create"))
                    break
                except FileExistsError:
                    n += 1
            else:
                raise GoldenError(f"{where}: no free version name")
            self.version = version_name(n)
            self.prefix = f"{suite}/{self.version}"
            self.zstore = FsspecStore(fs=store.fs, path=store._key(self.prefix))
            self.group = store._new_version_group(self.zstore)
        self._delay = _test_delay("MOESNAP_TEST_SLOW_WRITE")

    def _write_case(self, name: str, case: Case) -> dict[str, str]:
        """Build the case group in memory, then upload its objects concurrently.

        Object stores answer each request slowly; zarr writing straight to S3
        would make a few existence checks per array, one after the other.
        """
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import MemoryStore

        st: RemoteGoldenStore = self.store  # type: ignore[assignment]
        with st._errors(f"{st.where(self.suite, self.version)}/{name}"):
            mem = MemoryStore()
            g = zarr.create_group(mem, zarr_format=3)
            sums = _write_case_pipelined(g, case)
            keys = sorted(_sync(_collect(mem.list())))
            proto = default_buffer_prototype()
            step = 1 if self._delay else _UPLOAD_BATCH    # the test hook uploads one object at a time
            for i in range(0, len(keys), step):
                batch = keys[i:i + step]
                bufs = [_sync(mem.get(k, prototype=proto)) for k in batch]
                _sync(_upload(self.zstore, [(f"{name}/{k}", b) for k, b in zip(batch, bufs)]))
                if self._delay:
                    time.sleep(self._delay)
            return sums

    def _publish(self, meta: dict[str, Any]) -> str:
        st: RemoteGoldenStore = self.store  # type: ignore[assignment]
        with st._errors(st.where(self.suite, self.version)):
            self.group.attrs.update(meta)
            raw = st._get_bytes(f"{self.prefix}/zarr.json")
            claim = st._get_bytes(f"{self.prefix}/{CLAIM}")
            if raw is None or claim is None or json.loads(claim).get("token") != self.token:
                raise GoldenError(f"{st.where(self.suite, self.version)}: our claim on this version "
                                  f"disappeared while writing (pruned as stale?)")
            marker = {"schema": SCHEMA, "published": _now(), "meta_sha256": hashlib.sha256(raw).hexdigest()}
            _sync(st.fs._pipe_file(st._key(f"{self.prefix}/{MARKER}"),
                                   (json.dumps(marker, indent=2) + "\n").encode(), mode="create"))
        with contextlib.suppress(Exception):
            _sync(st._root.delete(f"{self.prefix}/{CLAIM}"))
        return self.version

    def _discard(self) -> None:
        st: RemoteGoldenStore = self.store  # type: ignore[assignment]
        _sync(st._root.delete_dir(self.prefix))


# ---------------------------------------------------------------- opening


def open_store(root: str | os.PathLike | None = None) -> GoldenStore:
    """A store at ``root``: a directory (default ``goldens/``) or ``s3://bucket/prefix``."""
    if root is None:
        root = DEFAULT_ROOT
    text = os.fspath(root)
    if not text:
        raise UsageError("store root is empty")
    if any(ord(ch) < 32 for ch in text):
        raise UsageError(f"store root {text!r} contains control characters")
    if "://" in text:
        return RemoteGoldenStore(text)
    return LocalGoldenStore(text)


def check_model_matches(version_meta: Mapping[str, Any], model: Any, *, where: str = "golden") -> None:
    """Refuse a golden made from another model file (compares sha256).

    ``model`` is a path or anything with a ``.path`` (a :class:`~moesnap.weights.GGUFModel`).
    """
    from .util import file_sha256

    path = Path(getattr(model, "path", model))
    recorded = (version_meta.get("model") or {}) if isinstance(version_meta, Mapping) else {}
    want = recorded.get("sha256") if isinstance(recorded, Mapping) else None
    if not want:
        raise GoldenError(f"{where}: provenance records no model sha256")
    try:
        have = file_sha256(path)
    except OSError as e:
        raise GoldenError(f"{path}: cannot read the model file ({_one_line(e)})") from None
    if have != want:
        raise GoldenError(f"{where}: golden was made from another model file "
                          f"({recorded.get('file')!r} sha256 {want[:12]}…, {path.name} is {have[:12]}…)")
