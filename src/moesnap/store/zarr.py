"""The Zarr v3 golden stores: a local directory (:class:`LocalGoldenStore`) and S3
(:class:`RemoteGoldenStore`, through zarr's FsspecStore and s3fs, imported only for s3:// roots).

The layout and the publishing rules are described in :mod:`moesnap.store.base`.  Reading goes
through zarr; the local store reads and writes the chunk files of its uncompressed arrays
itself (byte-identical to zarr's own), the S3 store builds each case in memory and uploads
its objects concurrently.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import weakref
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .case import Case, read_case, write_case
from ..errors import GoldenError, MoesnapError, UsageError
from ..util import describe_error
from .base import (
    _NAME,
    CLAIM,
    MARKER,
    SCHEMA,
    GoldenStore,
    Leftover,
    VersionWriter,
    _now,
    sort_versions,
    validate_suite,
    version_name,
    version_number,
)


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
        if self.read_delay:
            time.sleep(self.read_delay)
        with self._errors(where):
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
            return _read_case_parallel(group, where=where, verify=verify,
                                       raw_dir=self._raw_case_dir(suite, version, case), expected=expected)

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
    def __init__(self, root: str | os.PathLike, *, write_delay: float = 0.0, read_delay: float = 0.0) -> None:
        super().__init__(write_delay=write_delay, read_delay=read_delay)
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
            raise GoldenError(f"{self.root}: cannot create the store ({describe_error(e)})") from None

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
            raise GoldenError(f"{self.root / key}: {describe_error(e)}") from None

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
        return sort_versions(names)

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
            raise GoldenError(f"{src}: cannot remove ({describe_error(e)})") from None


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
            raise GoldenError(f"{self.suite_dir}: cannot start a new version ({describe_error(e)})") from None
        self._delay = store.write_delay

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

    def __init__(self, url: str, *, write_delay: float = 0.0, read_delay: float = 0.0) -> None:
        super().__init__(write_delay=write_delay, read_delay=read_delay)
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
            raise GoldenError(f"{where}: not found ({describe_error(e)})") from None
        except PermissionError as e:
            raise GoldenError(f"{where}: access denied ({describe_error(e)})") from None
        except Exception as e:  # botocore / aiohttp / asyncio faults: the server went away or refused
            raise GoldenError(f"{where}: S3 storage error ({describe_error(e)})") from None

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

    def _check(self) -> None:
        bucket = self.path.split("/", 1)[0]
        try:
            _sync(self.fs._call_s3("head_bucket", Bucket=bucket))
        except FileNotFoundError:
            raise GoldenError(f"{self.url}: no such bucket {bucket!r}") from None
        except PermissionError as e:
            raise GoldenError(f"{self.url}: access denied ({describe_error(e)})") from None
        except Exception as e:   # unreachable endpoint, timeouts: say so, not "no such bucket"
            raise GoldenError(f"{self.url}: S3 storage error ({describe_error(e)})") from None

    def suites(self) -> list[str]:
        self._check()
        return [s for s in self._ls("") if _NAME.fullmatch(s) and ".." not in s and self.versions(s)]

    def _version_names(self, suite: str) -> list[str]:
        return [v for v in self._ls(suite) if version_number(v) is not None]

    def versions(self, suite: str) -> list[str]:
        validate_suite(suite)
        names = [v for v in self._version_names(suite) if self._get_bytes(f"{suite}/{v}/{MARKER}") is not None]
        return sort_versions(names)

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
        self._delay = store.write_delay

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
            step = 1 if self._delay else _UPLOAD_BATCH    # slowed for a crash test: one object at a time
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
