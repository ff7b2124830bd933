"""Properties of the classifier, fuzzed with hypothesis.

Profiles come from conftest.py (HYPOTHESIS_PROFILE=ci|nightly); the suite is
meant to be run at high example counts by ``nox -s props``.
"""

from __future__ import annotations

import decimal
import json
import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import assume, event, given

from moesnap.judge.classify import MAX_BAD_TOKENS, Verdict, classify
from moesnap.judge.routing import align_topk_weights, classify_routing
from moesnap.testing import strategies as ms
from moesnap.judge.tolerances import Tolerance

pytestmark = pytest.mark.props

NAN_VERDICTS = {Verdict.NAN_GOLDEN, Verdict.NAN_CANDIDATE, Verdict.NAN_BOTH}
SWAPPED = {Verdict.NAN_GOLDEN: Verdict.NAN_CANDIDATE, Verdict.NAN_CANDIDATE: Verdict.NAN_GOLDEN}
ROUND = st.sampled_from([0.0, 1e-6, 1e-3, 0.25, 1.0])   # round numbers, safe to scale


def same_float(a: float, b: float, rel: float = 0.0, abs_: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@st.composite
def excludes(draw, shape):
    """A valid exclude_tokens set along axis 0 of ``shape``."""
    if not shape or shape[0] == 0:
        return ()
    return tuple(draw(st.sets(st.integers(0, shape[0] - 1), max_size=shape[0])))


# ---------------------------------------------------------------- basics

@given(x=ms.arrays(dtype=st.sampled_from(ms.FLOAT_DTYPES + ms.INT_DTYPES)), tol=ms.tolerances())
def test_reflexive_for_every_finite_array(x, tol):
    r = classify(x, x.copy(), tol)
    assert r.verdict is Verdict.MATCH
    m = r.metrics
    assert m.n_outside == 0 and m.max_abs == 0.0 and m.worst_index is None
    assert m.cosine == 1.0 and m.rel_l2 == 0.0 and m.first_bad_token is None


@given(data=st.data(), pair=ms.array_pairs(allow_nan=True, allow_infinity=True,
                                           dtype=st.sampled_from(ms.FLOAT_DTYPES + ms.INT_DTYPES)),
       tol=ms.tolerances(), other=st.sampled_from([None] + list(ms.FLOAT_DTYPES)))
def test_never_raises_and_metrics_are_sane(data, pair, tol, other):
    g, c = pair
    if other is not None:
        with np.errstate(over="ignore"):
            c = c.astype(other)      # mixed dtypes on the two sides
    ex = data.draw(excludes(g.shape))
    r = classify(g, c, tol, exclude_tokens=ex)
    m = r.metrics
    assert r.verdict not in (Verdict.MISSING, Verdict.SHAPE_MISMATCH, Verdict.ROUTING_TIE)
    assert r.excluded_tokens == tuple(sorted(ex))
    gf, cf = g.astype(np.float64), c.astype(np.float64)
    assert (m.nan_golden, m.inf_golden) == (np.isnan(gf).sum(), np.isinf(gf).sum())
    assert (m.nan_candidate, m.inf_candidate) == (np.isnan(cf).sum(), np.isinf(cf).sum())
    assert 0 <= m.n_outside <= m.n and 0.0 <= m.frac_outside <= 1.0
    assert math.isnan(m.cosine) or -1.0 <= m.cosine <= 1.0
    for value in (m.rel_l2, m.nmse, m.max_abs, m.mean_abs, m.max_rel):
        assert math.isnan(value) or value >= 0.0
    assert list(m.bad_tokens) == sorted(set(m.bad_tokens))
    assert len(m.bad_tokens) == min(m.n_bad_tokens, MAX_BAD_TOKENS)
    assert m.first_bad_token == (m.bad_tokens[0] if m.bad_tokens else None)
    if m.worst_index is not None:
        assert len(m.worst_index) == g.ndim
    if r.verdict is Verdict.DIVERGE:
        assert m.n_outside > 0 and m.first_bad_token is not None
    json.dumps(r.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- non-finite

@st.composite
def poisoned_pairs(draw):
    """(golden, candidate, placed) with NaN/+-Inf put at distinct positions;
    ``placed[side][kind]`` counts what was put there."""
    dt = draw(ms.float_dtypes())
    shape = draw(ms.shapes(min_side=1))
    g, c = draw(ms.array_pairs(dtype=dt, shape=shape))
    size = g.size
    positions = draw(st.lists(st.integers(0, size - 1), unique=True, max_size=min(size, 6)))
    placed = {"golden": {"nan": 0, "inf": 0}, "candidate": {"nan": 0, "inf": 0}}
    for p in positions:
        side = draw(st.sampled_from(["golden", "candidate"]))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        (g if side == "golden" else c).reshape(-1)[p] = value
        placed[side]["nan" if np.isnan(value) else "inf"] += 1
    return g, c, placed


@given(case=poisoned_pairs(), tol=ms.tolerances())
def test_non_finite_dominates_and_nan_is_counted_apart_from_inf(case, tol):
    g, c, placed = case
    r = classify(g, c, tol)
    m = r.metrics
    assert (m.nan_golden, m.inf_golden) == (placed["golden"]["nan"], placed["golden"]["inf"])
    assert (m.nan_candidate, m.inf_candidate) == (placed["candidate"]["nan"], placed["candidate"]["inf"])
    g_bad, c_bad = sum(placed["golden"].values()), sum(placed["candidate"].values())
    expected = (Verdict.NAN_BOTH if g_bad and c_bad else Verdict.NAN_GOLDEN if g_bad
                else Verdict.NAN_CANDIDATE if c_bad else None)
    if expected is None:
        assert r.verdict in (Verdict.MATCH, Verdict.DIVERGE)
    else:
        assert r.verdict is expected
        first = int(np.flatnonzero(~(np.isfinite(g) & np.isfinite(c)).reshape(-1))[0])
        assert m.worst_index == np.unravel_index(first, g.shape)
        assert m.first_bad_token is not None and m.first_bad_token <= m.worst_index[0]


@given(case=poisoned_pairs(), atol=ROUND)
def test_swapping_sides_swaps_the_nan_verdicts(case, atol):
    g, c, _ = case
    tol = Tolerance(atol, 0.0)       # rtol=0 makes the elementwise rule symmetric
    a, b = classify(g, c, tol), classify(c, g, tol)
    assert b.verdict is SWAPPED.get(a.verdict, a.verdict)
    ma, mb = a.metrics, b.metrics
    assert (ma.nan_golden, ma.inf_golden) == (mb.nan_candidate, mb.inf_candidate)
    assert (ma.nan_candidate, ma.inf_candidate) == (mb.nan_golden, mb.inf_golden)
    assert (ma.n_outside, ma.worst_index, ma.bad_tokens) == (mb.n_outside, mb.worst_index, mb.bad_tokens)
    assert same_float(ma.max_abs, mb.max_abs) and same_float(ma.cosine, mb.cosine)


# ---------------------------------------------------------------- tolerance monotonicity

@given(pair=ms.array_pairs(), tol=ms.tolerances(),
       more=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)))
def test_loosening_a_tolerance_never_turns_match_into_diverge(pair, tol, more):
    g, c = pair
    looser = Tolerance(tol.atol + more[0], tol.rtol + more[1],
                       min(1.0, tol.max_frac_outside + more[2]))
    tight, loose = classify(g, c, tol), classify(g, c, looser)
    event(f"tight={tight.verdict.name}")
    assert loose.metrics.n_outside <= tight.metrics.n_outside
    if tight.verdict is Verdict.MATCH:
        assert loose.verdict is Verdict.MATCH


# ---------------------------------------------------------------- order

@given(data=st.data(), pair=ms.array_pairs(allow_nan=True, allow_infinity=True), tol=ms.tolerances())
def test_invariant_under_one_permutation_of_both_arrays(data, pair, tol):
    g, c = pair
    perm = np.array(data.draw(st.permutations(range(g.size))), dtype=np.int64)
    gp = g.reshape(-1)[perm].reshape(g.shape)
    cp = c.reshape(-1)[perm].reshape(c.shape)
    a, b = classify(g, c, tol, token_axis=None), classify(gp, cp, tol, token_axis=None)
    assert a.verdict is b.verdict
    ma, mb = a.metrics, b.metrics
    for name in ("n", "n_outside", "frac_outside", "nan_golden", "nan_candidate",
                 "inf_golden", "inf_candidate", "max_abs", "max_rel"):
        assert same_float(getattr(ma, name), getattr(mb, name)), name
    assert same_float(ma.cosine, mb.cosine, abs_=1e-12)
    for name in ("rel_l2", "nmse", "mean_abs"):
        assert same_float(getattr(ma, name), getattr(mb, name), rel=1e-12), name


# ---------------------------------------------------------------- the elementwise rule, exactly

def _exact_ratio(g: float, c: float, tol: Tolerance) -> Fraction | float:
    """|c - g| / (atol + rtol |g|) in exact rational arithmetic."""
    diff = abs(Fraction(c) - Fraction(g))
    thr = Fraction(tol.atol) + Fraction(tol.rtol) * abs(Fraction(g))
    if thr == 0:
        return Fraction(0) if diff == 0 else math.inf
    return diff / thr


@st.composite
def perturbed(draw, beyond: bool):
    """(golden, candidate, tol): each candidate element is golden plus
    f * (atol + rtol |g|), then rounded, with f < 1 everywhere, or (beyond)
    f in [0, 2] and > 1.01 somewhere."""
    shape = draw(ms.shapes(min_side=1, max_dims=2))
    g = draw(ms.arrays(dtype=st.sampled_from(["float32", "float64"]), shape=shape,
                       max_magnitude=1e30, allow_subnormal=False)).astype(np.float64)
    atol = draw(st.one_of(st.floats(1e-12, 1.0), st.just(0.0)))
    rtol = draw(st.one_of(st.floats(1e-9, 0.5), st.just(0.0)))
    tol = Tolerance(atol, rtol) if atol or rtol else Tolerance(1e-3, 0.0)
    top = 2.0 if beyond else 0.995
    factors = draw(hnp.arrays(np.float64, shape, elements=st.one_of(
        st.floats(0.0, top), st.sampled_from([0.0, 0.5, 0.99, 1.01, 1.5][:5 if beyond else 3]))))
    if beyond:
        factors.reshape(-1)[draw(st.integers(0, factors.size - 1))] = draw(st.floats(1.01, 2.0))
    signs = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([-1.0, 1.0])))
    c = g + signs * factors * (tol.atol + tol.rtol * np.abs(g))
    return g, c, tol


@pytest.mark.parametrize("beyond", [False, True])
@given(data=st.data())
def test_within_tolerance_matches_and_beyond_diverges(beyond, data):
    g, c, tol = data.draw(perturbed(beyond))
    ex = data.draw(excludes(g.shape))
    ratios = np.array([_exact_ratio(a, b, tol) for a, b in zip(g.reshape(-1), c.reshape(-1))],
                      dtype=object).reshape(g.shape)
    # float rounding may decide elements within 1e-9 of the boundary either way
    assume(not any(abs(r - 1) <= Fraction(1, 10**9) for r in ratios.reshape(-1) if r != math.inf))
    outside = np.vectorize(lambda r: r > 1, otypes=[bool])(ratios)
    outside[list(ex)] = False
    r = classify(g, c, tol, exclude_tokens=ex)
    event("beyond" if outside.any() else "within")
    assert r.metrics.n_outside == outside.sum()
    assert r.verdict is (Verdict.DIVERGE if outside.any() else Verdict.MATCH)
    tokens = np.flatnonzero(outside.reshape(outside.shape[0], -1).any(axis=1))
    assert r.metrics.bad_tokens == tuple(tokens[:MAX_BAD_TOKENS])
    assert r.metrics.first_bad_token == (int(tokens[0]) if tokens.size else None)
    finite_diffs = [abs(Fraction(a) - Fraction(b)) for a, b, o in
                    zip(g.reshape(-1), c.reshape(-1), np.broadcast_to(
                        ~np.isin(np.arange(g.shape[0]), ex).reshape((-1,) + (1,) * (g.ndim - 1)),
                        g.shape).reshape(-1)) if o]
    if finite_diffs:
        assert r.metrics.max_abs == float(max(finite_diffs))


_WIDE = decimal.Context(prec=50, Emax=10**6, Emin=-10**6)


def _dec(q: Fraction) -> decimal.Decimal:
    return _WIDE.divide(decimal.Decimal(q.numerator), decimal.Decimal(q.denominator))


def _f(x: Fraction | decimal.Decimal) -> float:
    """Correctly rounded float of an exact value (a Decimal is rounded twice)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


@given(pair=ms.array_pairs(shape=ms.shapes(min_side=1, max_side=5, max_dims=2)))
def test_metrics_agree_with_exact_rational_arithmetic(pair):
    g, c = (a.astype(np.float64).reshape(-1) for a in pair)
    m = classify(*pair, Tolerance(0.0, 0.0)).metrics
    G, C = [Fraction(x) for x in g], [Fraction(x) for x in c]
    D = [abs(b - a) for a, b in zip(G, C)]
    gg, cc, dd = sum(x * x for x in G), sum(x * x for x in C), sum(x * x for x in D)
    dot = sum(a * b for a, b in zip(G, C))
    if gg == 0 or cc == 0:
        assert m.cosine == (1.0 if gg == cc else 0.0)
    else:
        cos = _f(_WIDE.sqrt(_dec(dot * dot / (gg * cc)))) * (1.0 if dot >= 0 else -1.0)
        assert m.cosine == pytest.approx(cos, abs=1e-12)
    if dd == 0:
        assert m.rel_l2 == 0.0 and m.nmse == 0.0
    elif gg == 0:
        assert m.rel_l2 == math.inf
    else:
        assert same_float(m.nmse, _f(dd / gg), rel=1e-12)
        assert same_float(m.rel_l2, _f(_WIDE.sqrt(_dec(dd / gg))), rel=1e-12)
    assert m.max_abs == _f(max(D))
    assert same_float(m.mean_abs, _f(sum(D) / len(D)), rel=1e-12)
    rels = [math.inf if a == 0 else _f(d / abs(a)) for a, d in zip(G, D) if d]
    # |c - g| and the division are each rounded once: allow two roundings
    assert same_float(m.max_rel, max(rels) if rels else 0.0, rel=1e-15)


@given(pair=st.one_of(*(st.tuples(ms.arrays(dtype=d, shape=s), ms.arrays(dtype=d, shape=s))
                        for d in ms.INT_DTYPES for s in [(3,), (2, 2)])),
       tol=ms.tolerances())
def test_integer_arrays_match_iff_equal(pair, tol):
    a, b = pair
    r = classify(a, b, tol)
    assert (r.verdict is Verdict.MATCH) == bool(np.array_equal(a, b))
    assert r.metrics.n_outside == int((a != b).sum())


# ---------------------------------------------------------------- dtype and scale independence

@st.composite
def shared_pairs(draw):
    shape = draw(ms.shapes(min_side=1))
    g = draw(ms.shared_precision_arrays(shape=shape))
    c = g.copy()
    mask = draw(hnp.arrays(bool, shape))
    c[mask] = draw(ms.shared_precision_arrays(shape=shape))[mask]
    for a in (g, c):
        if draw(st.booleans()):
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return g, c


def _as_bfloat16_f32(a: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    out = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(out, a)      # the values are bfloat16-exact
    return out


@given(pair=shared_pairs(), tol=ms.tolerances(), data=st.data())
def test_same_values_give_identical_results_in_every_dtype(pair, tol, data):
    g, c = pair
    ex = data.draw(excludes(g.shape))
    expected = classify(g, c, tol, exclude_tokens=ex).to_dict()
    variants = {
        "float16": (g.astype(np.float16), c.astype(np.float16)),
        "float32": (g.astype(np.float32), c.astype(np.float32)),
        "bfloat16": (_as_bfloat16_f32(g), _as_bfloat16_f32(c)),
        "mixed": (g.astype(np.float32), c.astype(np.float16)),
    }
    for name, (gv, cv) in variants.items():
        assert classify(gv, cv, tol, exclude_tokens=ex).to_dict() == expected, name


@given(pair=ms.array_pairs(dtype="float32"), k=st.integers(-800, 800),
       atol=ROUND, rtol=ROUND)
def test_metrics_are_exactly_equivariant_under_power_of_two_scaling(pair, k, atol, rtol):
    g, c = (a.astype(np.float64) for a in pair)
    a = classify(g, c, Tolerance(atol, rtol))
    b = classify(np.ldexp(g, k), np.ldexp(c, k), Tolerance(float(np.ldexp(atol, k)), rtol))
    assert a.verdict is b.verdict
    ma, mb = a.metrics, b.metrics
    assert (ma.n_outside, ma.worst_index, ma.bad_tokens) == (mb.n_outside, mb.worst_index, mb.bad_tokens)
    for name in ("cosine", "rel_l2", "nmse", "max_rel"):
        assert same_float(getattr(ma, name), getattr(mb, name)), name
    assert mb.max_abs == np.ldexp(ma.max_abs, k) and mb.mean_abs == np.ldexp(ma.mean_abs, k)


# ---------------------------------------------------------------- exclusion

@given(pair=ms.array_pairs(shape=ms.shapes(min_side=2)), tol=ms.tolerances(), data=st.data())
def test_excluded_tokens_do_not_matter_unless_non_finite(pair, tol, data):
    g, c = pair
    ex = data.draw(excludes(g.shape))
    assume(ex)
    base = classify(g, c, tol, exclude_tokens=ex)
    c2 = c.copy()
    c2[list(ex)] = data.draw(ms.arrays(dtype=c.dtype, shape=c2[list(ex)].shape))
    again = classify(g, c2, tol, exclude_tokens=ex)
    assert again.verdict is base.verdict
    assert (again.metrics.n, again.metrics.n_outside, again.metrics.max_abs) == (
        base.metrics.n, base.metrics.n_outside, base.metrics.max_abs)
    c2[(ex[0],) + (0,) * (c2.ndim - 1)] = np.nan
    poisoned = classify(g, c2, tol, exclude_tokens=ex)
    assert poisoned.verdict in (Verdict.NAN_CANDIDATE, Verdict.NAN_BOTH)


# ---------------------------------------------------------------- routing

def _witness_holds(row: np.ndarray, chosen: np.ndarray, tie_tol: float) -> bool:
    """Is ``chosen`` a top-k of some logits within tie_tol/2 of ``row``?  The
    best perturbation raises the chosen experts and lowers the others."""
    mask = np.zeros(row.size, dtype=bool)
    mask[chosen] = True
    shifted = row + np.where(mask, tie_tol / 2, -tie_tol / 2)
    return bool(mask.all() or shifted[mask].min() >= shifted[~mask].max())


@given(case=ms.routing_cases())
def test_routing_tie_only_at_near_ties(case):
    r = classify_routing(case.golden_ids, case.candidate_ids, case.logits, case.tie_tol)
    logits = case.logits.astype(np.float64)
    same = [set(a) == set(b) for a, b in zip(case.golden_ids.tolist(), case.candidate_ids.tolist())]
    assert r.flipped_tokens == tuple(t for t, s in enumerate(same) if not s)
    for t in r.flipped_tokens:
        tie = _witness_holds(logits[t], case.candidate_ids[t], case.tie_tol)
        assert (t in r.tie_tokens) == tie and (t in r.diverged_tokens) == (not tie)
        if tie:   # every expert the candidate picked instead is near the threshold
            threshold = np.sort(logits[t])[::-1][case.golden_ids.shape[1] - 1]
            extra = sorted(set(case.candidate_ids[t]) - set(case.golden_ids[t]))
            assert (logits[t, extra] >= threshold - case.tie_tol).all()
    expected = (Verdict.DIVERGE if r.diverged_tokens else
                Verdict.ROUTING_TIE if r.tie_tokens else Verdict.MATCH)
    assert r.verdict is expected
    event(r.verdict.name)
    json.dumps(r.to_dict(), allow_nan=False)


@given(case=ms.routing_cases(modes=("same", "perturb", "swap")), slack=st.sampled_from([0.0, 1 / 64]))
def test_routing_noise_within_half_tie_tol_never_diverges(case, slack):
    tie_tol = 2 * case.max_perturbation + slack
    r = classify_routing(case.golden_ids, case.candidate_ids, case.logits, tie_tol)
    assert r.verdict in (Verdict.MATCH, Verdict.ROUTING_TIE)
    event(r.verdict.name)


@given(case=ms.routing_cases(), data=st.data())
def test_routing_ignores_order_within_a_token(case, data):
    def shuffle(ids):
        return np.array([data.draw(st.permutations(list(row))) for row in ids], dtype=ids.dtype)

    a = classify_routing(case.golden_ids, case.candidate_ids, case.logits, case.tie_tol)
    b = classify_routing(shuffle(case.golden_ids), shuffle(case.candidate_ids), case.logits, case.tie_tol)
    assert a == b
    same = classify_routing(case.golden_ids, shuffle(case.golden_ids), case.logits, 0.0)
    assert same.verdict is Verdict.MATCH


@given(case=ms.routing_cases())
def test_aligned_weights_agree_where_expert_sets_agree(case):
    # weight = id + 0.5, so equal sets must give equal aligned weights
    gw, cw = case.golden_ids + 0.5, case.candidate_ids + 0.5
    ga, ca = align_topk_weights(case.golden_ids, gw, case.candidate_ids, cw)
    for t in range(case.golden_ids.shape[0]):
        assert list(ga[t]) == sorted(gw[t])
        if set(case.golden_ids[t]) == set(case.candidate_ids[t]):
            assert list(ga[t]) == list(ca[t])


# ---------------------------------------------------------------- the row rule


@given(x=ms.arrays(dtype=st.sampled_from(ms.FLOAT_DTYPES)), tol=ms.tolerances(allow_row=True))
def test_row_rule_reflexive(x, tol):
    r = classify(x, x.copy(), tol)
    assert r.verdict is Verdict.MATCH and r.metrics.max_row_rel_l2 == 0.0 and r.metrics.n_bad_rows == 0


@given(pair=ms.array_pairs(allow_nan=True, allow_infinity=True, dtype=st.sampled_from(ms.FLOAT_DTYPES)),
       tol=ms.tolerances(allow_row=True), data=st.data())
def test_row_rule_only_adds_divergence(pair, tol, data):
    """The row rule never turns a failure into a pass, never touches a NaN verdict, and where it
    fails a stage that the elementwise rule passed, it names the bad rows' tokens."""
    g, c = pair
    ex = data.draw(excludes(g.shape))
    plain = classify(g, c, Tolerance(tol.atol, tol.rtol, tol.max_frac_outside), exclude_tokens=ex)
    rowed = classify(g, c, tol, exclude_tokens=ex)
    if plain.verdict is not Verdict.MATCH:
        assert rowed.verdict is plain.verdict
        return
    assert rowed.verdict in (Verdict.MATCH, Verdict.DIVERGE)
    if rowed.verdict is Verdict.DIVERGE:
        event("row rule fired")
        m = rowed.metrics
        assert m.n_bad_rows >= 1 and m.max_row_rel_l2 > tol.row_rel_l2
        assert m.first_bad_token is not None and m.first_bad_token not in ex


@given(pair=ms.array_pairs(dtype=st.sampled_from(ms.FLOAT_DTYPES)), tol=ms.tolerances(allow_row=True),
       k=st.integers(-20, 20))
def test_row_rule_power_of_two_equivariant(pair, tol, k):
    g, c = pair
    g64, c64 = g.astype(np.float64), c.astype(np.float64)
    both = np.concatenate([g64.ravel(), c64.ravel()])
    nz = np.abs(both[both != 0])
    with np.errstate(over="ignore"):
        assume(nz.size == 0 or (np.isfinite(np.ldexp(nz.max(), k)) and np.ldexp(nz.min(), k) >= 2.0 ** -1000
                                and nz.max() < 2.0 ** 1000))
    a = classify(g64, c64, Tolerance(tol.atol, tol.rtol, tol.max_frac_outside, tol.row_rel_l2 if tol.atol == 0 else math.inf))
    b = classify(np.ldexp(g64, k), np.ldexp(c64, k),
                 Tolerance(0.0 if tol.atol == 0 else math.ldexp(tol.atol, k), tol.rtol, tol.max_frac_outside,
                           tol.row_rel_l2 if tol.atol == 0 else math.inf))
    assert a.verdict is b.verdict
    assert same_float(a.metrics.max_row_rel_l2, b.metrics.max_row_rel_l2, rel=1e-12) if a.metrics else True
