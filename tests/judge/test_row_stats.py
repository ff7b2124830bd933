"""The row rule's figures (moesnap.judge.classify.row_stats) from norms computed in chunks of whole rows on
the chunk threads are the same, bit for bit, whatever the chunk size and the number of threads, and agree
with those from the whole-array norms they replaced (einsum's, whose order for a wide row depended on the
rows beside it) within 1e-12 relative, with the same rows judged and found bad: rows that are not finite, all-zero
goldens, excluded tokens, no token axis, float16/32/64, rows from 1 to 20000 values wide."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesnap.judge import classify as C
from moesnap.judge import pool


def _whole(golden, candidate, limit, axis, excluded):
    """Every row's norms from the whole arrays at once, with einsum, as they were made before (the reference
    of this test), then the same rule on them (classify.row_figures)."""
    width = golden.shape[-1]
    g = golden.astype(np.float64, copy=False).reshape(-1, width)
    c = candidate.astype(np.float64, copy=False).reshape(-1, width)
    finite = np.isfinite(g).all(axis=1) & np.isfinite(c).all(axis=1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        top = np.maximum(np.abs(g).max(axis=1), np.abs(c).max(axis=1))
        e = np.frexp(np.where(top > 0, top, 1.0))[1]
        gs, cs = np.ldexp(g, -e[:, None]), np.ldexp(c, -e[:, None])
        dn = np.sqrt(np.einsum("ij,ij->i", cs - gs, cs - gs))
        gn = np.sqrt(np.einsum("ij,ij->i", gs, gs))
    return C.row_figures(finite, dn, gn, e.astype(np.int64), golden.shape, limit, axis, excluded)


def _pairs(n: int):
    rng = np.random.default_rng(20261208)
    for trial in range(n):
        nd = int(rng.integers(2, 5))
        shape = tuple(int(x) for x in rng.integers(1, 9, nd))
        if trial % 7 == 0:
            shape = shape[:-1] + (int(rng.integers(1, 20000)),)
        dtype = (np.float32, np.float64, np.float16)[trial % 3]
        with np.errstate(over="ignore", invalid="ignore"):
            g = rng.normal(0, 10.0 ** int(rng.integers(-30, 30)), shape).astype(dtype)
            c = (g + rng.normal(0, 1e-2, shape) * g).astype(dtype)
        if trial % 4 == 0:
            c.reshape(-1)[rng.integers(0, c.size)] = np.nan
        if trial % 5 == 0:
            g[...] = 0
        if trial % 6 == 0:
            c.reshape(-1, shape[-1])[0] = g.reshape(-1, shape[-1])[0]
        axis = int(rng.integers(0, nd - 1)) if trial % 9 else None
        excluded = tuple(sorted(set(rng.integers(0, shape[axis], 2).tolist()))) if axis is not None and trial % 2 else ()
        yield g, c, axis, excluded


@pytest.mark.parametrize("threads", [1, 3])
def test_row_chunks_on_threads_give_one_answer_and_the_whole_arrays_figures(threads, monkeypatch):
    monkeypatch.setattr(pool, "_EXECUTORS", {})
    monkeypatch.setattr(pool, "workers", lambda: threads)
    judged_some = 0
    for g, c, axis, excluded in _pairs(90):
        want = _whole(g, c, 0.01, axis, excluded)
        answers = set()
        for values in (C.ROW_CHUNK_VALUES, 7, 1):
            monkeypatch.setattr(C, "ROW_CHUNK_VALUES", values)
            got = C.row_stats(g, c, 0.01, axis, excluded)
            answers.add(repr((got[:4], got[4].tolist())))
            assert got[0] == want[0] and got[2:4] == want[2:4], (g.shape, axis, excluded, values)
            assert got[1] == pytest.approx(want[1], rel=1e-12, nan_ok=True) or got[1] == want[1] == math.inf
            assert np.array_equal(got[4], want[4])
        assert len(answers) == 1, (g.shape, answers)
        judged_some += want[0] > 0 and want[3] > 0
    assert judged_some     # some pairs have rows above the limit: the bad-row path is exercised
    for ex in pool._EXECUTORS.values():
        ex.shutdown(wait=True)
