"""The expert-scale rule's per-pair sums (moesnap.judge.routing.expert_pair_sums) computed in blocks of
tokens on the chunk threads: the same, bit for bit, whatever the block size and the number of threads, and
the einsum sums they replaced within 1e-11 (another order of summation), the same pairs kept: residuals per
pair or per token, totals or none, excluded tokens, a NaN contribution, widths 1 to 9000."""

from __future__ import annotations

import numpy as np
import pytest

from moesnap.judge import pool
from moesnap.judge import routing as R


def _einsum(ids, contrib, resid, exclude_tokens=(), total=None):
    """The sums as einsum computed them before (the reference of this test)."""
    T, k = np.asarray(ids).shape
    a = np.asarray(contrib, dtype=np.float64).reshape(T, k, -1)
    r = np.asarray(resid, dtype=np.float64)
    r = r.reshape(T, 1, -1) if r.ndim == 2 else r.reshape(T, k, -1)
    keep = np.ones((T, k), dtype=bool)
    if exclude_tokens:
        keep[np.asarray(sorted(exclude_tokens), dtype=np.int64)] = False
    with np.errstate(over="ignore", invalid="ignore"):
        rb = np.broadcast_to(r, a.shape)
        dots = np.einsum("tkh,tkh->tk", rb, a)
        sq = np.einsum("tkh,tkh->tk", a, a)
        var = np.einsum("tkh,tkh->tk", rb * rb, a * a)
    keep &= np.isfinite(dots) & np.isfinite(sq) & np.isfinite(var)
    if total is not None:
        tot = np.asarray(total, dtype=np.float64).reshape(T, -1)
        keep &= sq >= (R.MIN_SHARE ** 2) * np.einsum("th,th->t", tot, tot)[:, None]
    return dots, sq, var, keep


@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_give_one_answer_and_the_einsum_sums(threads, monkeypatch):
    monkeypatch.setattr(pool, "_EXECUTORS", {})
    monkeypatch.setattr(pool, "workers", lambda: threads)
    rng = np.random.default_rng(7)
    for trial in range(48):
        T, k, H = int(rng.integers(1, 30)), int(rng.integers(1, 9)), int(rng.choice([1, 7, 64, 2048, 9000]))
        a = rng.normal(size=(T, k, H)).astype((np.float32, np.float64)[trial % 2])
        r = (rng.normal(size=(T, H)) if trial % 3 else rng.normal(size=(T, k, H))).astype(np.float32) * 1e-3
        if trial % 5 == 0:
            a[0, 0, 0] = np.nan
        total = a.sum(1) if trial % 3 else None
        total = None if total is None else total + rng.normal(0, 10, total.shape)   # some pairs below MIN_SHARE
        excluded = tuple(sorted(set(rng.integers(0, T, 2).tolist()))) if trial % 4 == 0 else ()
        ids = np.zeros((T, k), int)
        want = _einsum(ids, a, r, excluded, total)
        answers = []
        for values in (R.PAIR_CHUNK_VALUES, 100, 1):
            monkeypatch.setattr(R, "PAIR_CHUNK_VALUES", values)
            got = R.expert_pair_sums(ids, a, r, excluded, total)
            answers.append(got)
            assert np.array_equal(got[3], want[3]), (trial, values)
            for j in range(3):
                fin = np.isfinite(want[j])
                assert np.array_equal(np.isfinite(got[j]), fin)
                scale = float(np.abs(want[j][fin]).max()) if fin.any() else 0.0
                np.testing.assert_allclose(got[j][fin], want[j][fin], rtol=1e-11, atol=1e-12 * scale)
        for other in answers[1:]:
            for j in range(4):
                assert np.array_equal(other[j], answers[0][j], equal_nan=True), (trial, j)
    for ex in pool._EXECUTORS.values():
        ex.shutdown(wait=True)
