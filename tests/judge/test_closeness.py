"""``closeness``: how near a stage comes to failing, as error ÷ tolerance (above 1 exactly when the
elementwise rule fails), per stage and per token; and the bad-token wording of the detail."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import moesnap.judge.chunked as K
import moesnap.judge.classify as C
from moesnap.judge.classify import Verdict, classify
from moesnap.judge.tolerances import Tolerance
from moesnap.testing import strategies as ms

pytestmark = pytest.mark.props


@st.composite
def excludes(draw, shape):
    if not shape or shape[0] == 0:
        return ()
    return tuple(draw(st.sets(st.integers(0, shape[0] - 1), max_size=shape[0])))


def elementwise_fails(m, tol: Tolerance, exact: bool) -> bool:
    return m.n_outside > 0 if exact else m.frac_outside > tol.max_frac_outside


@given(data=st.data(), pair=ms.array_pairs(allow_nan=True, allow_infinity=True,
                                           dtype=st.sampled_from(ms.FLOAT_DTYPES + ms.INT_DTYPES)),
       tol=ms.tolerances())
def test_closeness_is_above_one_exactly_when_the_elementwise_rule_fails(data, pair, tol):
    g, c = pair
    ex = data.draw(excludes(g.shape))
    m = classify(g, c, tol, exclude_tokens=ex).metrics
    exact = g.dtype.kind in "biu" and c.dtype.kind in "biu"
    assert m.closeness >= 0.0 and not math.isnan(m.closeness)
    assert (m.closeness > 1.0) == elementwise_fails(m, tol, exact), (m.closeness, m.n_outside, m.n)
    if m.n == 0:
        assert m.closeness == 0.0


@given(pair=ms.array_pairs(), tol=ms.tolerances(allow_frac=False))
def test_without_an_allowed_fraction_closeness_is_the_largest_ratio(pair, tol):
    g, c = pair
    m = classify(g, c, tol).metrics
    if g.dtype.kind in "biu":
        assert m.closeness == (0.0 if np.array_equal(g, c) else math.inf)
        return
    gf, cf = g.astype(np.float64).ravel(), c.astype(np.float64).ravel()
    with np.errstate(all="ignore"):
        d = np.abs(cf - gf)
        thr = np.abs(gf) * tol.rtol + tol.atol
        r = [0.0 if x == 0 and t == 0 else (math.inf if t == 0 else x / t) for x, t in zip(d, thr)]
    assert m.closeness == max(r, default=0.0)


@given(data=st.data(), pair=ms.array_pairs(allow_nan=True, shape=ms.shapes(min_side=1)), tol=ms.tolerances())
def test_token_closeness_is_each_tokens_largest_ratio(data, pair, tol):
    g, c = pair
    ex = data.draw(excludes(g.shape))
    r = classify(g, c, tol, exclude_tokens=ex)
    m = r.metrics
    assert len(m.token_closeness) == g.shape[0]
    finite = np.isfinite(g.astype(np.float64)) & np.isfinite(c.astype(np.float64))
    for t, v in enumerate(m.token_closeness):
        if not finite[t].all():
            assert v == math.inf
        elif t in ex:
            assert v == 0.0
        else:   # above 1 exactly where the token holds an element outside the bound
            assert (v > 1.0) == (t in m.bad_tokens or m.n_bad_tokens > C.MAX_BAD_TOKENS and v > 1.0)
    if m.n and r.verdict in (Verdict.MATCH, Verdict.DIVERGE) and tol.max_frac_outside == 0:
        assert m.closeness == max(m.token_closeness)


def test_closeness_of_a_passing_stage_is_the_share_of_tolerance_used():
    g = np.ones((4, 8))
    c = g + 0.25e-3                          # each element uses a quarter of atol + rtol|g| = 1e-3
    m = classify(g, c, Tolerance(0.5e-3, 0.5e-3)).metrics
    assert m.closeness == pytest.approx(0.25)
    assert m.token_closeness == pytest.approx((0.25,) * 4)
    c[2, 3] += 1e-2                          # one element 10.25x beyond: the stage fails
    r = classify(g, c, Tolerance(0.5e-3, 0.5e-3))
    assert r.verdict is Verdict.DIVERGE and r.metrics.closeness == pytest.approx(10.25)
    assert r.metrics.token_closeness[2] == pytest.approx(10.25) and r.metrics.token_closeness[1] == pytest.approx(0.25)
    # 1 of 32 elements outside, 5 % admitted: the element that decides is the second largest
    r = classify(g, c, Tolerance(0.5e-3, 0.5e-3, max_frac_outside=0.05))
    assert r.verdict is Verdict.MATCH and r.metrics.closeness == pytest.approx(0.25)


def test_token_closeness_is_not_in_json():
    m = classify(np.ones((3, 2)), np.ones((3, 2)), Tolerance(1e-3, 0)).metrics
    assert m.token_closeness == (0.0, 0.0, 0.0) and "token_closeness" not in m.to_dict()
    assert m.to_dict()["closeness"] == 0.0


from judge_helpers import both  # noqa: E402


@pytest.mark.parametrize("seed", range(8))
def test_chunked_closeness_equals_general(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    shape = [(64, 300), (32, 8, 100), (100, 77), (16, 4, 64), (200, 50), (63, 301), (40, 2, 90), (128, 64)][seed]
    g = rng.standard_normal(shape).astype(np.float32)
    c = (g.astype(np.float64) * (1 + [1e-5, 1e-4, 3e-4, 1e-3][seed % 4] * rng.standard_normal(shape))).astype(np.float32)
    excluded = (3, 7) if seed in (1, 3, 6) else ()
    tol = Tolerance(1e-5, 1e-4, [0.0, 0.01, 0.2][seed % 3])
    for axis in (0, 1):
        ex = excluded if axis == 0 else ()
        a, b = both(monkeypatch, g, c, tol, exclude_tokens=ex, token_axis=axis)
        assert a.verdict == b.verdict
        assert a.metrics.closeness == b.metrics.closeness
        assert a.metrics.token_closeness == b.metrics.token_closeness
        assert (a.metrics.closeness > 1) == (a.verdict is Verdict.DIVERGE)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sample_every", [2, 32, 100_000])
def test_two_pass_closeness_equals_general(monkeypatch, seed, sample_every):
    """With many elements admitted outside (k in the thousands at full size) the chunked path finds the
    deciding ratio in two passes from a sample: exactly the general path's value, also when the sample
    misleads (every 100000th ratio: one per chunk, the cut too high, the fallback pass keeps all)."""
    rng = np.random.default_rng(100 + seed)
    shape = [(64, 300), (32, 8, 100), (100, 77), (40, 2, 90), (128, 64), (50, 400)][seed]
    g = rng.standard_normal(shape).astype(np.float32)
    c = (g.astype(np.float64) * (1 + [1e-5, 1e-4, 3e-4, 1e-3][seed % 4] * rng.standard_normal(shape))).astype(np.float32)
    if seed == 5:
        c[7] = g[7] * 1.5          # one token far off: the largest ratios all in one place
    tol = Tolerance(0.0 if seed == 4 else 1e-5, 1e-4, [0.01, 0.2, 0.05][seed % 3])   # atol 0: 0/0 ratios
    monkeypatch.setattr(K, "_ONE_PASS_K", 1)
    monkeypatch.setattr(K, "_SAMPLE", sample_every)
    for axis, ex in ((0, ()), (0, (3, 7)), (1, ())):
        a, b = both(monkeypatch, g, c, tol, exclude_tokens=ex, token_axis=axis)
        assert a.verdict == b.verdict
        assert a.metrics.closeness == b.metrics.closeness
        assert a.metrics.token_closeness == b.metrics.token_closeness


@pytest.mark.parametrize("bad, text", [
    ([5, 7, 9], "3 bad tokens, the first is token 5"),
    ([4], "1 bad token: token 4"),
])
def test_the_detail_says_how_many_tokens_are_bad_and_which_first(bad, text):
    g = np.ones((12, 4), dtype=np.float32)
    c = g.copy()
    c[bad, 1] = 2.0
    r = classify(g, c, Tolerance(1e-3, 0))
    assert text in r.detail and "of 3 bad" not in r.detail


def test_kth_largest_falls_back_when_the_sample_misleads():
    """A sample whose cut keeps fewer than k ratios (here: one huge value) takes the second pass over
    every ratio; the answer is still the exact k-th largest."""
    rng = np.random.default_rng(9)
    g = rng.standard_normal(5000).astype(np.float32)
    c = (g * (1 + 1e-3 * rng.standard_normal(5000))).astype(np.float32)
    tol = Tolerance(1e-5, 1e-4)
    d = np.abs(c.astype(np.float64) - g.astype(np.float64))
    r = d / (np.abs(g.astype(np.float64)) * 1e-4 + 1e-5)
    for k in (1, 50, 4999):
        want = np.sort(r)[-k]
        got = K._kth_largest(g, c, range(0, 5000, K.CHUNK), tol, None, 1, 1, k, np.array([1e300]))
        assert got == want
