"""The judge's worker threads, owned here alone: created on first use, sized once.

numpy releases the GIL, so the judge classifies on threads, in two tiers that never wait on
themselves:

- :func:`submit_stage`: one task per stage being judged (:func:`moesnap.judge.compare.compare_cases`).
  A stage task may wait on the chunk tier.  A stage too small to release the GIL for long (fewer than
  :data:`INLINE_VALUES` values: a decode step's row) is judged on the thread that asks instead
  (:func:`submit_stage_of`).
- :func:`map_chunks`: the slices of one large array (:mod:`moesnap.judge.chunked`).  Chunk work is a
  leaf: it never submits work nor waits on any, so the chunk tier always drains and a stage task
  waiting on it cannot deadlock.

A thread of a tier that asks its own tier for work runs that work inline instead of queueing behind
itself (``compare_cases`` called from a stage task, a chunk function that maps chunks): nothing ever
blocks on the executor it runs on.  Both executors have :func:`workers` threads.

A third tier is processes (:func:`submit_case`): whole small cases (a decode step's one row, through
every layer) are judged in worker processes.  Judging one row is mostly Python bytecode around small
numpy calls, which holds the GIL, so threads cannot overlap it; processes can, and overlap it with
the candidate's next forward too.  Used where :func:`case_processes` is above 0: ``MOESNAP_JUDGE_PROCESSES=N``
(``0``: none), else, in a ``moesnap`` command (:func:`processes_by_default`), on a host of 6 CPUs or more.
A worker process imports the main module of the program that started it (Python's ``spawn``), so a
script calling the Python API gets workers only when it asks for them, and must then keep its own work
under ``if __name__ == "__main__":``.

numpy's BLAS runs on one thread wherever the judge works (:func:`blas_one_thread`; every worker process
from its start): the tiers above are the judge's parallelism.  OpenBLAS otherwise starts a thread per
CPU for every dot product of 10^4 elements or more (a decode step's logits, its experts' outputs) and
keeps them spinning after it: each worker process of a 16-CPU host kept 15 threads busy between its
small calls, and the candidate's forward, on the same CPUs, waited.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")

_LOCK = threading.Lock()
_EXECUTORS: dict[str, ThreadPoolExecutor] = {}
_TIER = threading.local()      # .name: the tier this thread works for ("stage", "chunk"), unset elsewhere
_PREFIX = {"stage": "moesnap-classify", "chunk": "moesnap-chunk"}


def workers() -> int:
    """Threads per tier: the CPUs, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def _join_tier(name: str) -> None:
    _TIER.name = name


def _executor(tier: str) -> ThreadPoolExecutor:
    ex = _EXECUTORS.get(tier)
    if ex is None:
        with _LOCK:
            ex = _EXECUTORS.get(tier)
            if ex is None:
                ex = _EXECUTORS[tier] = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix=_PREFIX[tier],
                                                           initializer=_join_tier, initargs=(tier,))
    return ex


def _on(tier: str) -> bool:
    return getattr(_TIER, "name", None) == tier


def submit_stage(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """``fn(*args, **kwargs)`` on the stage tier; its outcome (value or exception) in the future."""
    if not _on("stage"):
        return _executor("stage").submit(fn, *args, **kwargs)
    return _here(fn, *args, **kwargs)


def _here(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """``fn(*args, **kwargs)`` run on this thread, its outcome (value or exception) in a future."""
    done: Future[T] = Future()
    try:
        done.set_result(fn(*args, **kwargs))
    except BaseException as e:   # kept for .result(), as the executor would
        done.set_exception(e)
    return done


#: a stage of fewer values than this is judged on the thread that asks (:func:`submit_stage_of`)
INLINE_VALUES = 1 << 15


def submit_stage_of(values: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """:func:`submit_stage` for a stage of ``values`` values: below :data:`INLINE_VALUES` it runs on the
    calling thread.  Judging a small stage (a decode step's row) is Python bytecode around numpy calls too
    short to release the GIL for long: a stage thread cannot overlap it, and handing it over costs a
    future, two thread switches and a wait for the GIL (a 48-layer decode step of the tiny model: ~870 such
    hand-overs, and its judging in this process took ~2x longer for them)."""
    if values < INLINE_VALUES:
        return _here(fn, *args, **kwargs)
    return submit_stage(fn, *args, **kwargs)


def map_chunks(fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """``[fn(x) for x in items]``, on the chunk tier (one item: on this thread); ``fn`` must not wait on other
    work."""
    items = list(items)
    if _on("chunk") or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_executor("chunk").map(fn, items))


def _numpy_blas() -> list[Any]:
    """The BLAS libraries numpy loaded (threadpoolctl's view of them); not torch's, whose CPU
    matmuls keep their threads."""
    import numpy  # noqa: F401  (loaded, so that threadpoolctl sees its BLAS)
    from threadpoolctl import ThreadpoolController

    return [lib for lib in ThreadpoolController().select(user_api="blas").lib_controllers
            if "numpy" in lib.filepath or "scipy_openblas" in lib.prefix]


_BLAS_LOCK = threading.Lock()
_BLAS_USERS: list[int] = [0]        # judgements running in this process
_BLAS_BEFORE: list[tuple[Any, int]] = []   # each library's thread count before the first of them


@contextlib.contextmanager
def blas_one_thread() -> Iterator[None]:
    """numpy's BLAS on one thread while the block runs (and judgements of other threads overlapping
    it), then as it was."""
    with _BLAS_LOCK:
        if _BLAS_USERS[0] == 0:
            libs = _numpy_blas()
            _BLAS_BEFORE[:] = [(lib, lib.num_threads) for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        _BLAS_USERS[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS[0] -= 1
            if _BLAS_USERS[0] == 0:
                for lib, n in _BLAS_BEFORE:
                    lib.set_num_threads(n)
                _BLAS_BEFORE.clear()


def _worker_start() -> None:
    """A judge worker process's first act: numpy's BLAS on one thread for its whole life."""
    for lib in _numpy_blas():
        lib.set_num_threads(1)


_PROCESSES: list[ProcessPoolExecutor] = []
_BY_DEFAULT: list[bool] = [False]


def processes_by_default() -> None:
    """Let :func:`case_processes` pick worker processes without ``MOESNAP_JUDGE_PROCESSES``: the ``moesnap``
    command says so before it runs (its entry module starts nothing when a worker imports it)."""
    _BY_DEFAULT[0] = True


def case_processes() -> int:
    """Worker processes for whole small cases: ``MOESNAP_JUDGE_PROCESSES`` where set (0: none), else, in a
    ``moesnap`` command, half the CPUs, at most 8, on a host of 6 CPUs or more (none below: a process costs
    a second to start, more than a few steps' judging on two cores); else none."""
    from ..errors import UsageError

    env = os.environ.get("MOESNAP_JUDGE_PROCESSES")
    if env is not None and env.strip() != "":
        if not env.strip().isdigit():
            raise UsageError(f"MOESNAP_JUDGE_PROCESSES={env!r}: expected a number of processes (0: none)")
        return int(env)
    cpus = os.cpu_count() or 1
    return min(8, cpus // 2) if _BY_DEFAULT[0] and cpus >= 6 else 0


def submit_case(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """``fn(*args, **kwargs)`` in a worker process (started on first use, by ``spawn``: the workers
    import the judge, never torch or CUDA); ``fn`` and its arguments must pickle."""
    with _LOCK:
        if not _PROCESSES:
            _PROCESSES.append(ProcessPoolExecutor(max_workers=max(1, case_processes()),
                                                  mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_start))
        ex = _PROCESSES[0]
    return ex.submit(fn, *args, **kwargs)
