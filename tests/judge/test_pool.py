"""The judge's worker threads (moesnap.judge.pool): created on first use, and no task ever waits on the
executor it runs on."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from moesnap.judge import pool


@pytest.fixture
def one_worker(monkeypatch):
    """Fresh executors of one thread each (the tightest case for a task that waits on its own tier); what
    it yields runs a function from a plain thread and fails if it has not returned in time (then the
    tasks still queued are cancelled, so that whatever waits on them, stuck, wakes)."""
    monkeypatch.setattr(pool, "_EXECUTORS", {})
    monkeypatch.setattr(pool, "workers", lambda: 1)
    executors = pool._EXECUTORS

    def within(fn, seconds=30.0):
        box = []
        t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
        t.start()
        t.join(seconds)
        if t.is_alive():
            for ex in list(executors.values()):
                ex.shutdown(wait=False, cancel_futures=True)
            pytest.fail(f"still waiting after {seconds} s: a task waits on the tier it runs on")
        assert box, "it raised (see the thread's traceback above)"
        return box[0]

    yield within
    for ex in list(executors.values()):
        ex.shutdown(wait=True, cancel_futures=True)


def test_no_thread_before_the_first_judgement():
    code = ("import threading, numpy as np\n"
            "import moesnap.judge.compare, moesnap.judge.classify\n"
            "from moesnap.judge import pool\n"
            "assert not pool._EXECUTORS and not [t for t in threading.enumerate() if t.name.startswith('moesnap-')]\n"
            "from moesnap.judge.classify import classify\n"
            "from moesnap.judge.tolerances import Tolerance\n"
            "g = np.ones((64, 4096), np.float32)\n"
            "classify(g, g, Tolerance(1e-5, 1e-4))\n"
            "print(sorted(pool._EXECUTORS))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['chunk']"   # a large array made the chunk tier, nothing made the stage tier


def test_a_stage_task_asking_for_stage_work_runs_it_inline(one_worker):
    def outer():
        inner = pool.submit_stage(threading.current_thread)
        return threading.current_thread(), inner.result()   # queued behind itself, it would never run

    me, ran_on = one_worker(lambda: pool.submit_stage(outer).result())
    assert ran_on is me and me.name.startswith("moesnap-classify")


def test_an_inline_stage_task_keeps_its_exception_for_result(one_worker):
    def outer():
        return pool.submit_stage(int, "not a number")

    inner = one_worker(lambda: pool.submit_stage(outer).result())
    with pytest.raises(ValueError, match="not a number"):
        inner.result()


def test_a_chunk_asking_for_chunks_runs_them_inline_and_in_order(one_worker):
    def chunk(x):
        here = threading.current_thread().name
        return [(here, y) for y in pool.map_chunks(lambda y: (threading.current_thread().name, y), [x, x + 1])]

    got = one_worker(lambda: pool.map_chunks(chunk, range(3)))
    assert [[y for _, (_, y) in row] for row in got] == [[0, 1], [1, 2], [2, 3]]
    assert all(outer == inner and outer.startswith("moesnap-chunk") for row in got for outer, (inner, _) in row)


def test_stage_tasks_wait_on_the_chunk_tier_without_deadlock(one_worker, monkeypatch):
    """compare_cases from inside a stage task (itself waiting on its stages), with stages large enough
    to be classified in chunks: every tier at one thread, it still finishes, with the result of a
    call from outside any tier."""
    import moesnap.judge.chunked as K
    from moesnap.case import Case
    from moesnap.judge.compare import compare_cases
    from moesnap.judge.tolerances import Tolerances

    monkeypatch.setattr(K, "CHUNK", 64)
    rng = np.random.default_rng(0)
    layers = {"attn_out": rng.standard_normal((2, 8, 128), dtype=np.float32)}
    g = Case(tokens=np.arange(8, dtype=np.int32), model={"logits": rng.standard_normal((8, 512), dtype=np.float32)},
             layers=layers)
    c = Case(tokens=g.tokens, model={"logits": g.model["logits"] * np.float32(1 + 1e-7)},
             layers={"attn_out": layers["attn_out"] * np.float32(1 - 1e-7)})

    def judge():
        return compare_cases(g, c, Tolerances.defaults(), dtype="float32", allow_missing=True, layers=[0, 1])

    nested = one_worker(lambda: pool.submit_stage(judge).result())
    assert set(pool._EXECUTORS) == {"stage", "chunk"}
    direct = judge()
    assert [r.to_dict() for r in nested.results] == [r.to_dict() for r in direct.results]
    assert [r.stage for r in direct.results] == ["attn_out", "attn_out", "logits"] and direct.passed


# ---------------------------------------------------------------- numpy's BLAS threads


def _blas_threads() -> list[int]:
    return [lib.num_threads for lib in pool._numpy_blas()]


def _worker_blas_threads() -> list[int]:
    return _blas_threads()


@pytest.fixture
def two_blas_threads():
    """numpy's BLAS set to two threads in this process for the test (as a 2-CPU host starts it), then as it
    was: what the judge must hold at one thread while it works."""
    libs = pool._numpy_blas()
    if not libs:
        pytest.skip("numpy loaded no BLAS that threadpoolctl can set")
    before = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(2)
    yield
    for lib, n in zip(libs, before):
        lib.set_num_threads(n)


def test_blas_one_thread_holds_numpy_blas_at_one_thread_and_restores_it_after_the_last_user(two_blas_threads):
    with pool.blas_one_thread():
        assert set(_blas_threads()) == {1}
        with pool.blas_one_thread():          # a judgement overlapping another (two ranks, two threads)
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}    # the outer one still runs
    assert set(_blas_threads()) == {2}


def test_judge_suite_classifies_with_numpy_blas_on_one_thread(two_blas_threads, monkeypatch):
    from moesnap.judge import suite
    from moesnap.judge.policy import Policy
    from moesnap.testing.store import small_case

    seen = []
    real = suite.compare_cases

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "compare_cases", spy)
    g = small_case()
    suite.judge_suite([suite.Pair("c", g, g)], Policy.default("float32"), golden="g", candidate="c")
    assert seen and all(set(s) == {1} for s in seen)
    assert set(_blas_threads()) == {2}


def test_judge_worker_processes_run_numpy_blas_on_one_thread(monkeypatch):
    # a spawned worker starts OpenBLAS at this many threads (its environment's), then its first act sets 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "1")
    monkeypatch.setattr(pool, "_PROCESSES", [])
    try:
        threads = pool.submit_case(_worker_blas_threads).result(timeout=120)
    finally:
        for ex in pool._PROCESSES:
            ex.shutdown(wait=True)
    if not threads:
        pytest.skip("numpy loaded no BLAS that threadpoolctl can set")
    assert set(threads) == {1}
