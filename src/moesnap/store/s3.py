"""The S3 golden store (:class:`RemoteGoldenStore`, ``s3://bucket/prefix``) through zarr's
FsspecStore and s3fs (imported only when one is opened): a version name claimed by a conditional
put, each case built in memory and its objects uploaded concurrently, the marker written last
(the rules are in :mod:`moesnap.store.base`).  Reading is
:class:`~moesnap.store.zarr.ZarrGoldenStore`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
import weakref
from typing import Any, Iterator

from .case import GroupValue
from ..errors import GoldenError, MoesnapError, UsageError
from ..util import describe_error
from .base import (
    CLAIM,
    MARKER,
    SCHEMA,
    Leftover,
    VersionWriter,
    interrupts_held,
    is_suite_name,
    sort_versions,
    utc_now,
    validate_suite,
    version_name,
    version_number,
)
from .zarr import ZarrGoldenStore, write_case_pipelined


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


def _request_faults() -> tuple[type[BaseException], ...]:
    """What a request to the server fails with when the server refuses or cannot be reached: the
    OSError s3fs makes of the server's answer, timeouts, and botocore's and aiohttp's own errors
    (an endpoint that does not answer, a dropped connection)."""
    faults: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError

        faults.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        faults.append(ClientError)
    return tuple(faults)


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
        return [s for s in self._ls("") if is_suite_name(s) and self.versions(s)]

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
                            "created": utc_now()}).encode()
        where = store.where(suite)
        self._delay = store.write_delay
        try:
            # held: a claimed name only with a writer that owns it (an interrupt in between would
            # leave the upload running on zarr's thread, or the claim to wait out stale_after)
            with store._errors(where), interrupts_held():
                n = max([version_number(v) or 0 for v in store._version_names(suite)], default=0) + 1
                for _ in range(1000):
                    try:
                        _sync(store.fs._pipe_file(store._key(f"{suite}/{version_name(n)}/{CLAIM}"), claim,
                                                  mode="create"))
                        break
                    except FileExistsError:
                        n += 1
                else:
                    raise GoldenError(f"{where}: no free version name")
                self.version = version_name(n)
                self.prefix = f"{suite}/{self.version}"
                self.zstore = FsspecStore(fs=store.fs, path=store._key(self.prefix))
                self.group = store._new_version_group(self.zstore)
        except KeyboardInterrupt:        # held until the claim was whole: no one will remove it but us
            if hasattr(self, "group"):
                self.abort()
            raise

    def _write_case(self, name: str, case: GroupValue) -> dict[str, str]:
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
            sums = write_case_pipelined(g, case)
            keys = sorted(_sync(_collect(mem.list())))
            proto = default_buffer_prototype()
            step = 1 if self._delay else _UPLOAD_BATCH    # slowed for a crash test: one object at a time
            for i in range(0, len(keys), step):
                batch = keys[i:i + step]
                bufs = [_sync(mem.get(k, prototype=proto)) for k in batch]
                with interrupts_held():   # no upload goes on after an abort removed the prefix
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
            marker = {"schema": SCHEMA, "published": utc_now(), "meta_sha256": hashlib.sha256(raw).hexdigest()}
            _sync(st.fs._pipe_file(st._key(f"{self.prefix}/{MARKER}"),
                                   (json.dumps(marker, indent=2) + "\n").encode(), mode="create"))
        try:
            _sync(st._root.delete(f"{self.prefix}/{CLAIM}"))
        except _request_faults():
            pass   # published; a claim left inside a published version is never read again
        return self.version

    def _discard(self) -> None:
        st: RemoteGoldenStore = self.store  # type: ignore[assignment]
        with st._errors(st.where(self.suite, self.version)):
            _sync(st._root.delete_dir(self.prefix))
