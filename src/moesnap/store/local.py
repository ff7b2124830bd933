"""The local-directory golden store (:class:`LocalGoldenStore`): versions staged in a hidden
directory under an exclusive ``flock``, then published by ``os.rename`` (the rules are in
:mod:`moesnap.store.base`).  Reading is :class:`~moesnap.store.zarr.ZarrGoldenStore`'s; the
chunk files of uncompressed arrays are read and written directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .case import GroupValue
from ..errors import GoldenError, MoesnapError
from ..util import describe_error
from .base import (
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
from .stream import CaseStream, RawCaseStream
from .zarr import ZarrGoldenStore, write_case_pipelined


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
            if entry.is_dir() and is_suite_name(entry.name) and self.versions(entry.name):
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
        with self._errors(self.where(suite, version)), interrupts_held():
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
            with interrupts_held():    # not half removed
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
        from zarr.storage import LocalStore

        try:
            with interrupts_held():    # a staging area only with a writer that owns it
                self.suite_dir.mkdir(exist_ok=True)
                init = self.suite_dir / f".init-{token}"
                os.mkdir(init)
                self._fd = os.open(init, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.dir = self.suite_dir / f".staging-{token}"
                os.rename(init, self.dir)
                self.group = store._new_version_group(LocalStore(self.dir))
        except MoesnapError:
            raise
        except KeyboardInterrupt:          # held until the staging area was whole: no one will remove it but us
            if hasattr(self, "group"):
                self.abort()
            self._close()
            raise
        except Exception as e:
            self._close()
            raise GoldenError(f"{self.suite_dir}: cannot start a new version ({describe_error(e)})") from None
        self._delay = store.write_delay

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_case(self, name: str, case: GroupValue) -> dict[str, str]:
        with self.store._errors(f"{self.dir}/{name}"):  # type: ignore[attr-defined]
            with interrupts_held():    # zarr writes on its own thread: not on after the staging area is gone
                group = self.group.create_group(name)
            return write_case_pipelined(group, case, self._delay, raw_dir=self.dir / name)

    def _stream(self, name: str) -> CaseStream:
        """A case whose layers are written as its forward hands them over (:class:`RawCaseStream`)."""
        where = f"{self.dir}/{name}"
        with self.store._errors(where):  # type: ignore[attr-defined]
            with interrupts_held():
                group = self.group.create_group(name)
        return RawCaseStream(self, name, group, self.dir / name, delay=self._delay,
                             errors=self.store._errors)  # type: ignore[attr-defined]

    def _publish(self, meta: dict[str, Any]) -> str:
        st: LocalGoldenStore = self.store  # type: ignore[assignment]
        with st._errors(str(self.dir)):
            self.group.attrs.update(meta)
            raw = (self.dir / "zarr.json").read_bytes()
            marker = {"schema": SCHEMA, "published": utc_now(), "meta_sha256": hashlib.sha256(raw).hexdigest()}
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
        trash = self.suite_dir / f".trash-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.dir, trash)     # invisible at once, by name (never a published version)
            shutil.rmtree(trash)
        except OSError as e:
            raise GoldenError(f"{self.dir}: cannot remove the unpublished version ({describe_error(e)})") from None
        finally:
            self._close()

    def __del__(self) -> None:
        self._close()
