"""Small shared helpers: file hashing (cached), progress, atomic paths, versions."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


def _cache_dir() -> Path:
    base = os.environ.get("MOESNAP_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moesnap"


#: sha256 digests this process has computed or read, by cache key (a read-only cache still hashes once)
_SHA256_SEEN: dict[str, str] = {}
#: files being hashed on a thread of their own (:func:`hash_ahead`), by cache key
_SHA256_AHEAD: dict[str, "_Hashing"] = {}
_SHA256_LOCK = threading.Lock()


def _sha256_key(path: str | Path) -> tuple[Path, os.stat_result, str]:
    p = Path(path).resolve()
    st = p.stat()
    return p, st, f"{p}|{st.st_size}|{st.st_mtime_ns}"


def _sha256_known(key: str) -> str | None:
    """The digest of cache key ``key``, from this process's memory or the cache file, or None."""
    if key in _SHA256_SEEN:
        return _SHA256_SEEN[key]
    known = _sha256_cache()
    if isinstance(known.get(key), str):
        _SHA256_SEEN[key] = known[key]
        return known[key]
    return None


def _sha256_cache() -> dict[str, Any]:
    try:
        known = json.loads((_cache_dir() / "sha256.json").read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _sha256_compute(p: Path, key: str, on_bytes: Callable[[int], None]) -> str:
    """Hash ``p`` (``on_bytes(n)`` after each piece), remember the digest in memory and in the cache file."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)          # releases the GIL: a thread hashing beside a forward costs it one core
            on_bytes(len(chunk))
    digest = h.hexdigest()
    _SHA256_SEEN[key] = digest
    cache = _cache_dir() / "sha256.json"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known = _sha256_cache()       # read again: another file's digest may have come in meanwhile
        known[key] = digest
        tmp = cache.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


class _Hashing:
    """One file to hash on a thread (:func:`hash_ahead`); :meth:`result` waits for its digest (or
    re-raises what went wrong)."""

    def __init__(self, p: Path, key: str) -> None:
        self.p, self.key = p, key
        self.done_bytes = 0
        self._done = threading.Event()
        self._digest: str | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        def count(n: int) -> None:
            self.done_bytes += n

        try:
            self._digest = _sha256_compute(self.p, self.key, count)
        except BaseException as e:        # handed to whoever waits for the digest
            self._error = e
        finally:
            self._done.set()

    def result(self, bar: Any = None) -> str:
        while not self._done.wait(0.1):
            if bar is not None:
                bar.update(self.done_bytes - bar.n)
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


def hash_ahead(paths: Iterable[str | Path]) -> None:
    """Start hashing ``paths``, one after the other on a thread of their own, except those whose
    sha256 is known (this process, or the cache of :func:`file_sha256`) or already on the way;
    :func:`file_sha256` of one of them later takes that digest, waiting for it if need be.  A
    golden's provenance needs the model's sha256, and a 17 GB model takes 10-15 s to hash: started
    here, it runs beside the forward instead of before it.  A file that cannot be read is left
    alone (:func:`file_sha256` reports it)."""
    todo: list[_Hashing] = []
    with _SHA256_LOCK:
        for path in paths:
            try:
                p, _, key = _sha256_key(path)
            except OSError:
                continue
            if key in _SHA256_AHEAD:
                continue
            if _sha256_known(key) is None:
                _SHA256_AHEAD[key] = h = _Hashing(p, key)
                todo.append(h)
    if todo:
        threading.Thread(target=_hash_all, args=(todo,), name="moesnap-sha256", daemon=True).start()


def _hash_all(todo: list[_Hashing]) -> None:
    for h in todo:
        h.run()


def file_sha256(path: str | Path, *, progress: bool = False) -> str:
    """sha256 of a file, cached by (real path, size, mtime) so a 17 GB model is hashed once;
    ``progress``: a byte bar on stderr while a large file is hashed (see :func:`progress_enabled`).
    A file :func:`hash_ahead` is hashing already is waited for, not hashed again."""
    p, st, key = _sha256_key(path)
    with _SHA256_LOCK:
        running = _SHA256_AHEAD.get(key)
        digest = None if running is not None else _sha256_known(key)
    if digest is not None:
        return digest
    bar = None
    if progress_enabled(progress) and st.st_size >= 256 << 20 and (running is None or running.done_bytes < st.st_size):
        from tqdm import tqdm

        bar = tqdm(total=st.st_size, desc=f"sha256 {p.name}", unit="iB", unit_scale=True, unit_divisor=1024,   # MiB
                   file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        if running is not None:
            try:
                digest = running.result(bar)
            finally:              # done with it: the digest is remembered, a failure is tried afresh next time
                with _SHA256_LOCK:
                    _SHA256_AHEAD.pop(key, None)
        else:
            digest = _sha256_compute(p, key, bar.update if bar is not None else (lambda n: None))
    finally:
        if bar is not None:
            bar.close()
    return digest


# -- progress -------------------------------------------------------------------
# Everything here draws on stderr, and only when asked (``enabled``), outside a command run with `-q`
# or a Python API call with ``show_progress=False`` (both :func:`quiet`: the one channel), and with
# MOESNAP_NO_PROGRESS unset (the user's own switch; the test suite sets it).

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("moesnap_quiet", default=False)


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No progress or status lines inside (``moesnap -q``): scoped to the command, never left in the
    environment of the process."""
    token = _QUIET.set(on or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def show_progress_switch(fn: Callable[P, T]) -> Callable[P, T]:
    """The Python API's ``show_progress`` keyword as the one switch there is: ``show_progress=False``
    runs the call inside :func:`quiet`, as ``-q`` runs a command; the function itself never reads it."""
    default = inspect.signature(fn).parameters["show_progress"].default

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with quiet(not kwargs.get("show_progress", default)):
            return fn(*args, **kwargs)

    return call


def progress_enabled(enabled: bool = True) -> bool:
    """Whether to draw progress: ``enabled``, not :func:`quiet`, and MOESNAP_NO_PROGRESS unset."""
    return enabled and not _QUIET.get() and not os.environ.get("MOESNAP_NO_PROGRESS")


def status(message: str, *, enabled: bool = True) -> None:
    """One line on stderr, ``moesnap: MESSAGE``, saying what a command is about to do: a command that
    may take more than a few seconds says so before its first slow step, not after it.  Drawn above
    the progress bars when some are on the screen (tqdm clears them, writes the line, draws them
    again), never into a bar."""
    if not progress_enabled(enabled):
        return
    line = f"moesnap: {printable(message)}"
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if tqdm is not None and len(getattr(tqdm, "_instances", ())):
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()
    else:
        print(line, file=sys.stderr, flush=True)


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 token``, ``3 tokens`` (``words``: the plural where it is not ``word + "s"``)."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def spans(xs: Iterable[int]) -> str:
    """Ascending numbers as runs: ``0-2, 5, 7-8``."""
    parts: list[str] = []
    for x in xs:
        if parts and parts[-1].split("-")[-1] == str(x - 1):
            parts[-1] = parts[-1].split("-")[0] + f"-{x}"
        else:
            parts.append(str(x))
    return ", ".join(parts)


def mib(n_bytes: float) -> str:
    """A size as moesnap prints every size: in MiB (``1.6 MiB``, ``0.0123 MiB``, ``16,213.5 MiB``)."""
    value = n_bytes / 2**20
    return f"{value:,.1f} MiB" if value >= 1 or value == 0 else f"{value:.3g} MiB"


def loading_torch(*, enabled: bool = True) -> None:
    """The first line of a command about to import torch, when it is not imported yet: that alone
    takes seconds on a cold start (4 s for a CUDA build), before the command can say anything else."""
    if "torch" not in sys.modules:
        status("loading torch", enabled=enabled)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable[T]:
    """tqdm on stderr (quiet when disabled or when MOESNAP_NO_PROGRESS is set)."""
    if not progress_enabled(enabled):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def memory_gib() -> tuple[float, float | None]:
    """(peak, current) resident memory of this process in GiB; current is None where /proc is absent."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            current: float | None = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        current = None
    return round(peak, 3), None if current is None else round(current, 3)


class LayerProgress:
    """A callback ``(done, total)`` drawing a tqdm bar for layer-by-layer work; :meth:`start` draws it
    at 0 before the first layer (which may take long: it uploads that layer's weights).

    Whether drawn or not, it clocks each layer: :meth:`timing` gives each layer's seconds and the
    process's peak and current resident memory when the layer ended (a forward that streams one layer
    at a time shows a flat current memory)."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled = desc, progress_enabled(enabled)
        self.bar: Any = None   # a tqdm bar once started or the first layer is done
        self._t0: float | None = None
        self._marks: list[tuple[int, float, float, float | None]] = []   # (layers done, time, peak, current)

    def start(self, total: int) -> LayerProgress:
        """Draw the bar at 0 of ``total`` now (and start the clock)."""
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self.enabled and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, file=sys.stderr, leave=False, unit="layer", dynamic_ncols=True)
        return self

    def __call__(self, done: int, total: int) -> None:
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        self._marks.append((done, time.perf_counter(), *memory_gib()))
        if not self.enabled:
            return
        self.start(total)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def timing(self) -> list[dict[str, Any]]:
        """One entry per layer clocked: ``layer``, ``seconds``, ``peak_rss_gib``, ``rss_gib``."""
        out, last = [], self._t0
        for done, t, peak, current in self._marks:
            if last is None:
                last = t
            out.append({"layer": done - 1, "seconds": round(t - last, 4), "peak_rss_gib": peak, "rss_gib": current})
            last = t
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def versions() -> dict[str, Any]:
    import gguf  # noqa: F401
    import numpy
    import torch
    import zarr

    from ._version import __version__

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:
        gguf_version = "unknown"
    return {
        "moesnap": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "gguf": gguf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


# -- outputs ----------------------------------------------------------------

def published_version_above(path: str | Path) -> Path | None:
    """The published golden version directory (one holding ``published.json``) that ``path``
    is or lies inside, if any."""
    p = Path(os.path.abspath(path))
    real = Path(os.path.realpath(p.parent)) / p.name    # a symlinked directory leads where it points
    for q in (p, real):
        for d in (q, *q.parents):
            if (d / "published.json").is_file():
                return d
    return None


def write_text_atomic(path: str | Path, content: str) -> None:
    """Write ``content`` (UTF-8; characters that cannot be encoded, such as the lone
    surrogates of a non-UTF-8 file name, written as backslash escapes) through a temporary
    file beside ``path`` and a rename; the temporary file never outlives a failure."""
    from .errors import UsageError

    p = Path(path)
    data = content.encode("utf-8", errors="backslashreplace")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except OSError as e:
        raise UsageError(f"{p}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def describe_error(e: BaseException) -> str:
    """An exception as one line: its type and its message with all whitespace runs made single spaces."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def printable(text: str) -> str:
    """``text`` with control characters (and lone surrogates) as backslash escapes: text that
    came from input cannot split a line or send escape sequences to the terminal."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)
