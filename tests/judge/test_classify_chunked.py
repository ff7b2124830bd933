"""The chunked, threaded path for large float16/float32 arrays agrees with the general path."""

from __future__ import annotations

import math

import numpy as np
import pytest

import moesnap.judge.chunked as K
import moesnap.judge.classify as C
from moesnap.judge.ratios import largest
from moesnap.judge.tolerances import Tolerance

EXACT_FIELDS = ("n", "n_outside", "worst_index", "bad_tokens", "n_bad_tokens", "first_bad_token", "max_abs",
                "max_rel", "nan_golden", "nan_candidate", "inf_golden", "inf_candidate")
SUM_FIELDS = ("cosine", "rel_l2", "nmse", "mean_abs")


from judge_helpers import both  # noqa: E402


@pytest.mark.parametrize("seed", range(8))
def test_chunked_equals_general(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    shape = [(64, 300), (32, 8, 100), (100, 77), (16, 4, 64), (200, 50), (64, 300), (40, 2, 90), (128, 64)][seed]
    dtype = np.float16 if seed % 3 == 2 else np.float32
    g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
    noise = [1e-7, 1e-3, 0.0, 5e-2, 1e-6, 1e-4, 2e-2, 0.0][seed]
    c = (g.astype(np.float64) * (1 + noise * rng.standard_normal(shape))).astype(dtype)
    if seed == 5:
        g[:] = 0
    if seed == 7:
        c[:] = 0
    excluded = (3, 7) if seed in (1, 3, 6) else ()
    tol = Tolerance(1e-5, 1e-4, 0.0)
    a, b = both(monkeypatch, g, c, tol, exclude_tokens=excluded)
    assert a.verdict == b.verdict and a.excluded_tokens == b.excluded_tokens
    for f in EXACT_FIELDS:
        assert getattr(a.metrics, f) == getattr(b.metrics, f), f
    for f in SUM_FIELDS:
        x, y = getattr(a.metrics, f), getattr(b.metrics, f)
        assert x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300), (f, x, y)


def test_non_finite_chunk_falls_back_to_the_general_path(monkeypatch):
    g = np.random.default_rng(0).standard_normal((64, 8, 64), dtype=np.float32)
    c = g.copy()
    c[5, 3, 7] = np.nan
    c[9, 0, 0] = np.inf
    a, b = both(monkeypatch, g, c, Tolerance(1e-5, 1e-4))
    assert a == b
    assert b.verdict == C.Verdict.NAN_CANDIDATE and b.metrics.nan_candidate == 1 and b.metrics.inf_candidate == 1
    assert b.metrics.first_bad_token == 5


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moesnap.testing.strategies import array_pairs, tolerances  # noqa: E402

pytestmark = pytest.mark.props


@settings(max_examples=200)
@given(pair=array_pairs(dtype=st.sampled_from([np.float16, np.float32]), allow_nan=True, allow_infinity=True),
       tol=tolerances())
def test_prop_chunked_path_agrees_with_general_path(pair, tol):
    g, c = pair
    saved = K.CHUNK
    try:
        K.CHUNK = 1 << 40
        a = C.classify(g, c, tol)
        K.CHUNK = 2
        b = C.classify(g, c, tol)
    finally:
        K.CHUNK = saved
    assert a.verdict == b.verdict and a.detail.split(";")[0] == b.detail.split(";")[0]
    for f in EXACT_FIELDS:
        x, y = getattr(a.metrics, f), getattr(b.metrics, f)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), f
    for f in SUM_FIELDS:
        x, y = getattr(a.metrics, f), getattr(b.metrics, f)
        assert x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300) or (math.isnan(x) and math.isnan(y)), (f, x, y)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 20_000), k=st.integers(1, 400), seed=st.integers(0, 2**32 - 1),
       ties=st.booleans())
def test_largest_equals_a_full_partition(n, k, seed, ties):
    """The k largest values after the block-maxima cut are exactly those of a full partition
    (ties and repeated values included), as a new array."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 5, n).astype(np.float64) if ties else rng.exponential(size=n)
    got = largest(r, k)
    want = r if k >= n else np.partition(r, n - k)[n - k:]
    assert np.array_equal(np.sort(got), np.sort(want))
    assert not np.shares_memory(got, r)
