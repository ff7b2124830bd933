"""The golden store: versioned, immutable, checksummed goldens.

::

    <root>/<suite>/<version>/              one Zarr v3 group per version (v0001, v0002, ...)
    <root>/<suite>/<version>/zarr.json     attributes: provenance, cases, a checksum per array
    <root>/<suite>/<version>/published.json   the publish marker, written last
    <root>/<suite>/<version>/<case>/...    one case group (the layout of :mod:`moesnap.store.case`, or
                                           named arrays: :mod:`moesnap.store.arrays`)

A root is a local directory (default ``goldens/``) or ``s3://bucket/prefix``
(through zarr's own :class:`~zarr.storage.FsspecStore` and s3fs; the endpoint
comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, credentials from the
usual AWS variables).  :class:`MemoryGoldenStore` keeps versions in a dict, for
tests and for callers that want no disk.  This module holds the interface
(:class:`GoldenStore`, :class:`VersionWriter`, :class:`GoldenVersion`) and the names; the
memory store is in :mod:`moesnap.store.memory`, the Zarr stores in :mod:`moesnap.store.local`
(``LocalGoldenStore``) and :mod:`moesnap.store.s3` (``RemoteGoldenStore``) over the shared part in
:mod:`moesnap.store.zarr`, and :func:`moesnap.store.open_store` picks one.

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

Reading verifies every array against the CRC-32C recorded at write time (the
case group's own and the version's must agree), and a missing array is an
error: :class:`~moesnap.errors.GoldenError` naming the array.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import signal
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ..case import Case, stack_layers
from ..stages import LAYER_STAGES
from .arrays import LAYOUT, NamedArrays
from .case import GroupValue, checksum_matches
from ..errors import GoldenError, UsageError

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


def is_suite_name(name: str) -> bool:
    """Whether a directory or prefix named ``name`` may be a suite (listing skips any other)."""
    return bool(_NAME.fullmatch(name)) and ".." not in name


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


def sort_versions(names: Iterable[str]) -> list[str]:
    """Version names, oldest first (by number: ``v10000`` after ``v9999``)."""
    return sorted(names, key=lambda v: version_number(v) or 0)


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


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (publish and claim stamps)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _json_clean(obj: Any) -> Any:
    """A deep copy that only holds JSON types (what zarr attributes can keep)."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise GoldenError(f"provenance is not JSON-serialisable ({e})") from None


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) while the store does what must not be left half done: claim a staging
    area, hand it to a writer, publish, remove.  A SIGINT that arrives meanwhile is delivered when
    the block is done: the handler it would have met runs then (Python's default raises
    KeyboardInterrupt there).  Off the main thread, and where SIGINT has no Python handler (ignored,
    default, a C library's), there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    caught: list[tuple[int, Any]] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    except ValueError:     # a subinterpreter: no signal handlers of its own
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(*caught[0])


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
        c: Mapping[str, Any]
        for c in self.meta.get("cases", []):
            if c.get("name") == name:
                return c
        raise GoldenError(f"{self.ref}: no case {name!r} (cases: {', '.join(self.case_names()) or 'none'})")

    def read_case(self, name: str, *, verify: bool = True) -> Case:
        """Read one case; with ``verify``, every array is checked against its recorded checksum."""
        if self.case_info(name).get("layout") == LAYOUT:
            raise GoldenError(f"{self.where}/{name}: a group of named arrays (layout {LAYOUT!r}, as "
                              f"moesnap_snapshot keeps), not a forward's case")
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
                    if not checksum_matches(arrays[path], digest):
                        raise GoldenError(f"{where}/{path}: checksum mismatch (corrupt or modified array)")
                raise GoldenError(f"{where}: the case's checksums differ from the version's provenance (modified)")
        return case

    def read_arrays(self, name: str, *, verify: bool = True) -> dict[str, np.ndarray]:
        """Every array of one case group, keyed by its path in the group, whatever the layout
        (``arrays/<name>`` for :meth:`VersionWriter.add_arrays`'s groups, ``layers/<stage>`` …
        for a forward's case).  With ``verify``, every array is checked against the checksum this
        version recorded, and an array the version does not record is an error too.
        """
        self.case_info(name)
        validate_case_name(name)
        where = f"{self.where}/{name}"
        arrays = self.store._read_arrays(self.suite, self.version, name, verify=verify)
        if verify:
            expect = {k[len(name) + 1:]: v for k, v in (self.meta.get("checksums") or {}).items()
                      if k.startswith(name + "/")}
            for path, digest in expect.items():
                if path not in arrays:
                    raise GoldenError(f"{where}/{path}: array is missing")
                if not checksum_matches(arrays[path], digest):
                    raise GoldenError(f"{where}/{path}: checksum mismatch (corrupt or modified array)")
            extra = sorted(set(arrays) - set(expect))
            if extra:
                raise GoldenError(f"{where}/{extra[0]}: array not recorded in the version (added after publishing)")
        return arrays


def case_info(case: Case) -> dict[str, Any]:
    """What a version's provenance says of a forward's case beside its arrays: prompt and token ids."""
    return {"prompt": case.attrs.get("prompt"), "token_ids": [int(t) for t in np.asarray(case.tokens).tolist()]}


class VersionWriter(ABC):
    """Writes one new version; nothing is visible until :meth:`commit` returns.

    Use as a context manager: leaving the block without a commit (or with an
    exception, KeyboardInterrupt included) aborts and removes what was written.
    Publishing and removing hold off Ctrl-C (:func:`interrupts_held`): an interrupt
    leaves the version either published whole or gone.
    """

    def __init__(self, store: "GoldenStore", suite: str) -> None:
        self.store, self.suite = store, suite
        self._cases: list[dict[str, Any]] = []
        self._checksums: dict[str, str] = {}
        self._done = False
        self._streams: dict[str, "CaseStream"] = {}    # cases begun and not yet finished, by name

    def add_case(self, name: str, case: Case) -> None:
        self._add(name, case, case_info(case))

    def begin_case(self, name: str) -> "CaseStream":
        """A case written while its forward runs (:mod:`moesnap.store.stream`): hand each layer's
        stages to its ``put_layer`` as the layer ends, then the rest to ``finish``.  What is stored
        is what :meth:`add_case` stores of the whole case, byte for byte."""
        self._check_new(name)
        if name in self._streams:
            raise UsageError(f"case name {name!r} given twice")
        self._streams[name] = stream = self._stream(name)
        return stream

    def _stream(self, name: str) -> "CaseStream":
        """The stream :meth:`begin_case` hands out: by default one that keeps the layers and adds the
        case when it is finished (a store that writes layers as they come overrides this:
        :class:`moesnap.store.stream.RawCaseStream`)."""
        return CaseStream(self, name)

    def _check_new(self, name: str) -> None:
        validate_case_name(name)
        if self._done:
            raise GoldenError(f"{self.suite}: writer already committed or aborted")
        if any(c["name"] == name for c in self._cases):
            raise UsageError(f"case name {name!r} given twice")

    def _record(self, name: str, info: dict[str, Any], arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                sums: Mapping[str, str]) -> None:
        """Case ``name`` is written: its entry in the version's provenance (``arrays``: each one's
        shape and dtype, in the case's order) and its arrays' checksums."""
        self._streams.pop(name, None)
        self._cases.append({
            "name": name,
            **info,
            "arrays": {p: {"shape": list(shape), "dtype": str(dtype)} for p, (shape, dtype) in arrays.items()},
        })
        self._checksums.update({f"{name}/{p}": s for p, s in sums.items()})

    def add_arrays(self, name: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> None:
        """Add a case group of arrays of any names (the layout of :mod:`moesnap.store.arrays`);
        ``attrs`` (JSON values) become the group's attributes.  Read it back with
        :meth:`GoldenVersion.read_arrays`."""
        self._add(name, NamedArrays.of(arrays, attrs), {"layout": LAYOUT})

    def _add(self, name: str, value: GroupValue, info: dict[str, Any]) -> None:
        self._check_new(name)
        sums = self._write_case(name, value)
        self._record(name, info, {p: (a.shape, a.dtype) for p, a in value.arrays().items()}, sums)

    def commit(self, meta: Mapping[str, Any] | None = None) -> GoldenVersion:
        """Publish atomically under the next free version name and return it."""
        if self._done:
            raise GoldenError(f"{self.suite}: writer already committed or aborted")
        if self._streams:
            raise UsageError(f"{self.suite}: case {next(iter(self._streams))!r} was begun and never finished")
        if not self._cases:
            raise UsageError(f"{self.suite}: a version needs at least one case")
        full = _json_clean({**dict(meta or {}), "schema": SCHEMA, "cases": self._cases,
                            "checksums": self._checksums})
        with interrupts_held():          # published and known to be, or neither
            version = self._publish(full)
            self._done = True
        return GoldenVersion(self.store, self.suite, version, full)

    def abort(self) -> None:
        """Remove what was written (nothing is published)."""
        if not self._done:
            self._done = True
            with interrupts_held():      # a staging area half removed is a leftover
                streams, self._streams = list(self._streams.values()), {}
                try:
                    for stream in streams:   # none still writing into what is removed next
                        stream.close()
                finally:
                    self._discard()

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._done:
            return
        try:
            self.abort()
        except (GoldenError, OSError):
            if exc is None:
                raise
            # the block's own error is the one to report; what the abort could not remove is a
            # leftover that prune removes once no writer holds it

    @abstractmethod
    def _write_case(self, name: str, case: GroupValue) -> dict[str, str]:
        """Write the case's arrays (a :class:`Case` or named arrays); return {array path: checksum}."""

    @abstractmethod
    def _publish(self, meta: dict[str, Any]) -> str:
        """Make the version visible under a fresh name; return that name."""

    @abstractmethod
    def _discard(self) -> None:
        """Remove what was written; a storage fault is a GoldenError (or OSError)."""


class CaseStream:
    """One case given layer by layer while its forward runs (:meth:`VersionWriter.begin_case`,
    :mod:`moesnap.store.stream`); this one keeps the layers in memory and adds the whole case, its
    layers stacked (:func:`moesnap.case.stack_layers`), when it is finished."""

    def __init__(self, writer: VersionWriter, name: str) -> None:
        self.writer, self.name = writer, name
        self._kept: dict[str, dict[int, np.ndarray]] = {}
        self._last = -1
        self._open = True

    def put_layer(self, layer: int, stages: Mapping[str, np.ndarray]) -> None:
        """Layer ``layer``'s per-layer stages, ``{stage: value}`` (after every earlier layer's)."""
        self._check_open()
        if layer <= self._last:
            raise ValueError(f"case {self.name!r}: layer {layer} after layer {self._last}; layers come in increasing order")
        unknown = [s for s in stages if s not in LAYER_STAGES]
        if unknown:
            raise ValueError(f"case {self.name!r}: {unknown[0]!r} is not a per-layer stage")
        self._last = layer
        for stage, value in stages.items():
            self._take(stage, layer, np.asarray(value))

    def finish(self, case: Case) -> None:
        """The rest of the case (its ``layers`` empty: they came through :meth:`put_layer`)."""
        self._check_open()
        if case.layers:
            raise ValueError(f"case {self.name!r}: its layers come through put_layer, not with finish")
        self._open = False
        self._finish(case)

    def close(self) -> None:
        """Stop (an aborted version): nothing is written into the version after this returns."""
        self._open = False
        self._kept = {}

    def _check_open(self) -> None:
        if not self._open:
            raise GoldenError(f"{self.writer.suite}: case {self.name!r} is finished or aborted already")

    def _take(self, stage: str, layer: int, value: np.ndarray) -> None:
        self._kept.setdefault(stage, {})[layer] = value

    def _finish(self, case: Case) -> None:
        kept, self._kept = self._kept, {}
        self.writer.add_case(self.name, replace(case, layers=stack_layers(kept, LAYER_STAGES)))


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
    def _read_arrays(self, suite: str, version: str, case: str, *, verify: bool) -> dict[str, np.ndarray]:
        """Every array of one case group by its path, checked against the group's own checksums when ``verify``."""

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

    def __exit__(self, *exc: object) -> None:
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
        with contextlib.ExitStack() as stack:
            with interrupts_held():      # the staging area exists only with the writer that removes it
                w = stack.enter_context(self.begin(suite))
            for name, case in cases.items():
                w.add_case(name, case)
            version = w.commit(meta)
        return version

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
