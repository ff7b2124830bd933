"""Unit tests: one per documented edge case of the classifier."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from moesnap.judge.classify import MAX_BAD_TOKENS, Verdict, classify
from moesnap.judge.routing import align_topk_weights, classify_routing
from moesnap.errors import MoesnapError, ToleranceError
from moesnap.stages import INTEGER_STAGES, LAYER_STAGES, MODEL_STAGES
from moesnap.judge.tolerances import Tolerance, Tolerances

F32 = Tolerances.defaults().for_stage("moe_out", "float32")
EXACT = Tolerance(0.0, 0.0)


def rng_array(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def json_roundtrip(obj) -> dict:
    return json.loads(json.dumps(obj.to_dict(), allow_nan=False))


def test_identical_arrays_match_with_perfect_metrics():
    g = rng_array((4, 16))
    r = classify(g, g.copy(), EXACT)
    m = r.metrics
    assert r.verdict is Verdict.MATCH and r.passed
    assert (m.cosine, m.rel_l2, m.nmse, m.max_abs, m.max_rel) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert m.n == 64 and m.n_outside == 0 and m.worst_index is None
    assert m.first_bad_token is None and m.bad_tokens == () and m.n_bad_tokens == 0


def test_both_all_zero_is_match_with_cosine_one():
    r = classify(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32), EXACT)
    assert r.verdict is Verdict.MATCH
    assert r.metrics.cosine == 1.0 and r.metrics.rel_l2 == 0.0


def test_one_side_zero_has_cosine_zero_and_elementwise_verdict():
    g = rng_array((2, 8))
    r = classify(g, np.zeros_like(g), F32)
    assert r.metrics.cosine == 0.0 and r.metrics.rel_l2 == 1.0
    assert r.verdict is Verdict.DIVERGE
    # tiny golden, zero candidate: cosine 0 but every element within atol
    tiny = np.full((2, 3), 1e-6, np.float32)
    r = classify(tiny, np.zeros_like(tiny), F32)
    assert r.metrics.cosine == 0.0 and r.verdict is Verdict.MATCH
    # zero golden, non-zero candidate: rel_l2 and max_rel are +inf, JSON says "inf"
    r = classify(np.zeros(3), np.array([0.0, 1.0, 0.0]), F32)
    assert r.metrics.rel_l2 == np.inf and r.metrics.max_rel == np.inf
    assert json_roundtrip(r)["metrics"]["rel_l2"] == "inf"


def test_empty_arrays_match_with_n_zero():
    r = classify(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32), EXACT)
    assert r.verdict is Verdict.MATCH
    assert r.metrics.n == 0 and r.metrics.cosine == 1.0 and r.metrics.frac_outside == 0.0
    assert "empty" in r.detail


def test_negative_zero_equals_zero():
    g = np.array([0.0, -0.0, 1.0], np.float32)
    c = np.array([-0.0, 0.0, 1.0], np.float32)
    r = classify(g, c, EXACT)
    assert r.verdict is Verdict.MATCH and r.metrics.max_abs == 0.0 and r.metrics.cosine == 1.0


def test_float32_subnormals_give_exact_cosine():
    g = np.array([1e-45, 2e-45, 0.0, 4e-45], np.float32)   # subnormal float32
    assert (g[g != 0] < np.finfo(np.float32).tiny).all()
    r = classify(g, g * np.float32(2), Tolerance(0.0, 0.5))
    assert r.metrics.cosine == 1.0          # parallel vectors, no underflow to 0/0
    assert r.metrics.rel_l2 == 1.0 and r.metrics.max_rel == 1.0
    assert r.verdict is Verdict.DIVERGE      # |c-g| = |g| > 0.5 |g|


def test_float64_subnormals_do_not_underflow():
    g = np.array([5e-324, 1e-323, 0.0])
    r = classify(g, -g, EXACT)
    assert r.metrics.cosine == -1.0 and r.metrics.rel_l2 == 2.0


def test_huge_finite_values_do_not_overflow():
    g = np.array([3e38, -3e38, 1e38, 2.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = classify(g, g.copy(), F32)
        half = classify(g, g * np.float32(0.5), F32)
    assert same.verdict is Verdict.MATCH and same.metrics.cosine == 1.0
    assert half.metrics.cosine == 1.0 and half.metrics.rel_l2 == 0.5
    assert half.metrics.max_abs == pytest.approx(1.5e38, rel=1e-6)
    assert half.verdict is Verdict.DIVERGE and np.isfinite(half.metrics.nmse)


def test_float64_near_max_keeps_metrics_finite_where_true_value_is():
    g = np.array([1e308, -1e308])
    r = classify(g, -g, F32)
    assert r.metrics.rel_l2 == 2.0 and r.metrics.nmse == 4.0 and r.metrics.max_rel == 2.0
    assert r.metrics.cosine == -1.0
    assert r.metrics.max_abs == np.inf      # 2e308 is beyond float64
    assert r.verdict is Verdict.DIVERGE


def test_sides_of_very_different_magnitude_do_not_break_the_cosine():
    # regression: a joint scale flushed the small side to zero (ZeroDivisionError)
    g = np.array([2.532e-294, 6.338e29])
    c = np.array([2.532e-294, 0.0])
    r = classify(g, c, F32)
    assert 0.0 <= r.metrics.cosine < 1e-300 and r.metrics.rel_l2 == pytest.approx(1.0)
    assert r.verdict is Verdict.DIVERGE and r.metrics.worst_index == (1,)


@pytest.mark.parametrize("stage", [s for s in MODEL_STAGES + LAYER_STAGES if s not in INTEGER_STAGES])
def test_pure_five_percent_scale_error_diverges_under_float32_defaults(stage):
    tol = Tolerances.defaults().for_stage(stage, "float32")
    g = rng_array((8, 64), seed=3)
    r = classify(g, g * np.float32(1.05), tol)
    assert r.verdict is Verdict.DIVERGE
    assert r.metrics.cosine == pytest.approx(1.0)    # cosine alone would miss it
    assert r.metrics.rel_l2 == pytest.approx(0.05, rel=1e-5)


def test_shape_mismatch_names_both_shapes():
    r = classify(np.zeros((2, 3)), np.zeros((3, 2)), F32)
    assert r.verdict is Verdict.SHAPE_MISMATCH and r.metrics is None and not r.passed
    assert "(2, 3)" in r.detail and "(3, 2)" in r.detail


@pytest.mark.parametrize("golden, candidate, side", [
    (None, np.zeros(2), "golden"),
    (np.zeros(2), None, "candidate"),
    (None, None, "golden and candidate"),
])
def test_missing_side(golden, candidate, side):
    r = classify(golden, candidate, F32)
    assert r.verdict is Verdict.MISSING and r.metrics is None
    assert r.detail == f"{side} missing"


def test_nan_and_inf_are_counted_apart():
    g = rng_array((3, 4))
    c = g.copy()
    c[1, 2] = np.inf
    c[2, 0] = -np.inf
    c[2, 3] = np.nan
    r = classify(g, c, F32)
    m = r.metrics
    assert r.verdict is Verdict.NAN_CANDIDATE
    assert (m.nan_candidate, m.inf_candidate, m.nan_golden, m.inf_golden) == (1, 2, 0, 0)
    assert "1 NaN, 2 Inf" in r.detail
    assert m.worst_index == (1, 2) and m.first_bad_token == 1 and m.bad_tokens == (1, 2)
    assert m.n_outside == 3 and m.max_abs == 0.0   # the finite rest is identical


@pytest.mark.parametrize("where, verdict", [
    ("golden", Verdict.NAN_GOLDEN), ("candidate", Verdict.NAN_CANDIDATE), ("both", Verdict.NAN_BOTH)])
def test_non_finite_dominates_whatever_the_tolerance(where, verdict):
    g = rng_array(10)
    c = g.copy()
    if where in ("golden", "both"):
        g[3] = np.nan
    if where in ("candidate", "both"):
        c[7] = np.inf
    r = classify(g, c, Tolerance(1e9, 1e9, 1.0))
    assert r.verdict is verdict and not r.passed


def test_same_nan_positions_are_still_nan_both():
    g = np.array([1.0, np.nan])
    assert classify(g, g.copy(), F32).verdict is Verdict.NAN_BOTH


def test_all_elements_non_finite_gives_null_float_metrics_in_json():
    r = classify(np.array([np.nan, np.nan]), np.array([np.inf, 1.0]), F32)
    assert r.verdict is Verdict.NAN_BOTH
    d = json_roundtrip(r)["metrics"]
    assert d["cosine"] is None and d["max_abs"] is None and d["n_outside"] == 2


def test_exclude_tokens_leaves_them_out_of_the_judgement():
    g = rng_array((4, 8))
    c = g.copy()
    c[2] += 1.0
    assert classify(g, c, F32).verdict is Verdict.DIVERGE
    r = classify(g, c, F32, exclude_tokens=[2])
    assert r.verdict is Verdict.MATCH and r.excluded_tokens == (2,)
    assert r.metrics.n == 24 and r.metrics.max_abs == 0.0
    assert "1 of 4 tokens excluded" in r.detail
    # along another axis
    r = classify(g.T.copy(), c.T.copy(), F32, token_axis=1, exclude_tokens={2})
    assert r.verdict is Verdict.MATCH and r.excluded_tokens == (2,)


def test_exclusion_never_excuses_non_finite_values():
    g = rng_array((3, 5))
    c = g.copy()
    c[1, 4] = np.nan
    r = classify(g, c, F32, exclude_tokens=[1])
    assert r.verdict is Verdict.NAN_CANDIDATE and r.metrics.first_bad_token == 1
    assert r.metrics.n_outside == 0     # the NaN is not among the judged elements


def test_everything_excluded_is_match_with_note():
    g = rng_array((2, 3))
    r = classify(g, g + 5, F32, exclude_tokens=[0, 1])
    assert r.verdict is Verdict.MATCH and r.metrics.n == 0
    assert r.detail == "nothing judged: all tokens excluded"


def test_absent_tokens_are_told_apart_from_routing_flips():
    """``absent_tokens`` of the excluded tokens are excluded because the candidate does not hold them
    (an imported dump): the detail says so, by both paths (general and chunked), whatever the verdict;
    the judgement itself is that of the same exclusion."""
    g = rng_array((8, 4))
    c = g.copy()
    c[0, 0] += 1.0
    big_g, big_c = np.tile(g, (1, 1 << 15)), np.tile(c, (1, 1 << 15))   # past the chunked path's threshold
    for a, b, verdict in ((g, g, Verdict.MATCH), (g, c, Verdict.DIVERGE), (big_g, big_c, Verdict.DIVERGE)):
        flips = classify(a, b, F32, exclude_tokens=[1, 2, 5])
        assert flips.verdict is verdict and flips.detail.endswith("; 3 of 8 tokens excluded (routing flips)")
        some = classify(a, b, F32, exclude_tokens=[1, 2, 5], absent_tokens=2)
        assert some.detail == flips.detail.replace("; 3 of 8 tokens excluded (routing flips)",
                                                   "; 2 of 8 tokens not in the dump, 1 excluded (routing flips)")
        every = classify(a, b, F32, exclude_tokens=[5, 1, 2], absent_tokens=3)
        assert every.detail == flips.detail.replace("; 3 of 8 tokens excluded (routing flips)",
                                                    "; 3 of 8 tokens not in the dump")
        assert some.metrics == every.metrics == flips.metrics and some.excluded_tokens == (1, 2, 5)
    # a row-rule failure keeps the elementwise detail, worded alike
    rows = Tolerance(1.0, 0.0, row_rel_l2=1e-3)
    r = classify(g, c, rows, exclude_tokens=[1, 2], absent_tokens=1)
    assert r.verdict is Verdict.DIVERGE and "; 1 of 8 tokens not in the dump, 1 excluded (routing flips)" in r.detail
    with pytest.raises(ValueError, match="absent_tokens=4"):
        classify(g, g, F32, exclude_tokens=[1, 2, 5], absent_tokens=4)
    with pytest.raises(ValueError, match="absent_tokens=-1"):
        classify(g, g, F32, absent_tokens=-1)


@pytest.mark.parametrize("kwargs", [
    {"exclude_tokens": [4]}, {"exclude_tokens": [-1]},
    {"token_axis": None, "exclude_tokens": [0]}, {"token_axis": 2}])
def test_bad_exclusion_arguments_are_caller_errors(kwargs):
    g = rng_array((4, 2))
    with pytest.raises(ValueError):
        classify(g, g, F32, **kwargs)


def test_integer_stages_compare_exactly():
    ids = np.array([[3, 1], [0, 2]], np.int32)
    loose = Tolerance(100.0, 100.0, 1.0)
    assert classify(ids, ids.astype(np.int64), loose).verdict is Verdict.MATCH
    other = ids.copy()
    other[1, 1] = 3
    r = classify(ids, other, loose)
    assert r.verdict is Verdict.DIVERGE and r.metrics.n_outside == 1
    assert r.metrics.worst_index == (1, 1) and r.metrics.first_bad_token == 1
    assert "exact equality" in r.detail
    flags = np.array([True, False])
    assert classify(flags, ~flags, loose).verdict is Verdict.DIVERGE


def test_integer_against_float_takes_the_float_rule():
    r = classify(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0004], np.float32), F32)
    assert r.verdict is Verdict.MATCH


def test_max_frac_outside_compares_the_reported_fraction():
    g = np.zeros(3)
    c = np.array([1.0, 0.0, 0.0])
    assert classify(g, c, Tolerance(0.0, 0.0, 1 / 3)).verdict is Verdict.MATCH
    assert classify(g, c, Tolerance(0.0, 0.0, 0.333)).verdict is Verdict.DIVERGE
    assert classify(g, c, Tolerance(0.0, 0.0, 0.0)).verdict is Verdict.DIVERGE
    g = np.zeros(100)
    c = g.copy()
    c[[5, 50]] = 1.0
    assert classify(g, c, Tolerance(0.0, 0.0, 0.01)).verdict is Verdict.DIVERGE
    r = classify(g, c, Tolerance(0.0, 0.0, 0.02))
    assert r.verdict is Verdict.MATCH and "within the allowed" in r.detail


def test_worst_index_and_bad_tokens():
    g = np.zeros((100, 3), np.float32)
    c = g.copy()
    c[10:, 1] = 1.0
    c[42, 2] = 7.0
    m = classify(g, c, F32).metrics
    assert m.worst_index == (42, 2) and m.max_abs == 7.0
    assert m.first_bad_token == 10 and m.n_bad_tokens == 90
    assert m.bad_tokens == tuple(range(10, 10 + MAX_BAD_TOKENS))
    m = classify(g, c, F32, token_axis=None).metrics
    assert (m.first_bad_token, m.bad_tokens, m.n_bad_tokens) == (None, (), 0)
    m = classify(g, c, F32, token_axis=-1).metrics
    assert m.bad_tokens == (1, 2)


def test_zero_dimensional_arrays_have_no_token_axis():
    r = classify(np.array(1.0), np.array(2.0), F32)
    assert r.verdict is Verdict.DIVERGE and r.metrics.worst_index == ()
    assert r.metrics.first_bad_token is None


def test_unsupported_inputs():
    with pytest.raises(MoesnapError, match="complex"):
        classify(np.zeros(2, complex), np.zeros(2, complex), F32)
    with pytest.raises(TypeError, match="numpy array"):
        classify([1.0], np.zeros(1), F32)


def test_to_dict_is_json_safe_with_plain_types():
    g = rng_array((3, 4))
    c = g * 2
    c[0, 0] = np.inf
    for r in (classify(g, c, F32), classify(g, g, F32), classify(None, g, F32),
              classify(np.zeros(2), np.ones(2), F32)):
        d = json_roundtrip(r)
        assert d["verdict"] == r.verdict.name
    d = classify(g, c, F32).to_dict()
    assert type(d["metrics"]["n"]) is int and type(d["metrics"]["worst_index"][0]) is int


# ---------------------------------------------------------------- routing

def _logits(rows):
    return np.array(rows, np.float32)


def test_routing_same_sets_in_any_order_match():
    ids = np.array([[0, 2], [1, 3]])
    r = classify_routing(ids, ids[:, ::-1].copy(), _logits([[4, 0, 3, 1], [0, 5, 1, 4]]), 0.0)
    assert r.verdict is Verdict.MATCH and r.flipped_tokens == () and r.max_gap == 0.0


def test_routing_near_tie_swap_is_tolerated_and_reported():
    # the aprender layer-47 case: cpu-only {20, 73}, gpu-only {12, 103}
    logits = np.zeros((2, 128), np.float32)
    logits[:, [20, 73]] = 1.0003
    logits[:, [12, 103]] = 1.0
    logits[:, [5, 6]] = 3.0
    golden = np.array([[5, 6, 20, 73], [5, 6, 20, 73]])
    cand = np.array([[5, 6, 20, 73], [103, 6, 5, 12]])
    r = classify_routing(golden, cand, logits, tie_tol=1e-3)
    assert r.verdict is Verdict.ROUTING_TIE and r.passed
    assert r.flipped_tokens == (1,) and r.tie_tokens == (1,) and r.diverged_tokens == ()
    (flip,) = r.flips
    assert flip.golden_only == (20, 73) and flip.candidate_only == (12, 103)
    assert flip.gap == pytest.approx(3e-4, abs=1e-6)
    assert "golden-only [20, 73]" in r.detail
    res = r.as_result()
    assert res.verdict is Verdict.ROUTING_TIE and res.flipped_tokens == (1,)
    assert classify_routing(golden, cand, logits, tie_tol=1e-4).verdict is Verdict.DIVERGE


def test_routing_dropping_a_clear_winner_is_not_a_tie():
    # expert 3 sits just under the threshold (a near tie with expert 1), but the
    # candidate dropped expert 0, the clear winner: not explainable by noise.
    logits = _logits([[5.0, 2.0, -1.0, 1.999]])
    r = classify_routing(np.array([[0, 1]]), np.array([[1, 3]]), logits, tie_tol=0.01)
    assert r.verdict is Verdict.DIVERGE and r.diverged_tokens == (0,)
    assert r.max_gap == pytest.approx(3.001, rel=1e-6)


def test_routing_exact_tie_is_tolerated_at_zero_tie_tol():
    logits = _logits([[1.0, 1.0, 0.0]])
    r = classify_routing(np.array([[0]]), np.array([[1]]), logits, tie_tol=0.0)
    assert r.verdict is Verdict.ROUTING_TIE


@pytest.mark.parametrize("cand", [[[0, 7]], [[0, -1]], [[1, 1]], [[0.5, 1.0]]])
def test_routing_invalid_candidate_ids_diverge_without_exception(cand):
    logits = _logits([[1.0, 0.9, 0.0]])
    r = classify_routing(np.array([[0, 1]]), np.array(cand), logits, tie_tol=1.0)
    assert r.verdict is Verdict.DIVERGE and r.flips[0].gap == np.inf
    json.dumps(r.to_dict(), allow_nan=False)


def test_routing_non_finite_golden_logits_cannot_justify_a_flip():
    logits = _logits([[1.0, np.nan, 0.99]])
    r = classify_routing(np.array([[0]]), np.array([[2]]), logits, tie_tol=1.0)
    assert r.verdict is Verdict.DIVERGE and np.isnan(r.max_gap)
    assert json.loads(json.dumps(r.to_dict(), allow_nan=False))["max_gap"] is None


@pytest.mark.parametrize("gi, ci, logits, verdict", [
    (None, np.zeros((1, 1), int), np.zeros((1, 2)), Verdict.MISSING),
    (np.zeros((1, 1), int), np.zeros((1, 1), int), None, Verdict.MISSING),
    (np.zeros((2, 1), int), np.zeros((2, 2), int), np.zeros((2, 3)), Verdict.SHAPE_MISMATCH),
    (np.zeros(2, int), np.zeros(2, int), np.zeros((2, 3)), Verdict.SHAPE_MISMATCH),
    (np.zeros((2, 1), int), np.zeros((2, 1), int), np.zeros((3, 3)), Verdict.SHAPE_MISMATCH),
    (np.zeros((2, 4), int), np.zeros((2, 4), int), np.zeros((2, 3)), Verdict.SHAPE_MISMATCH),
])
def test_routing_missing_and_shapes(gi, ci, logits, verdict):
    r = classify_routing(gi, ci, logits, 0.1)
    assert r.verdict is verdict and not r.passed
    json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("tie_tol", [-1e-3, float("nan"), float("inf")])
def test_routing_bad_tie_tol(tie_tol):
    with pytest.raises(ToleranceError, match="tie_tol"):
        classify_routing(np.zeros((1, 1), int), np.zeros((1, 1), int), np.zeros((1, 2)), tie_tol)


def test_align_topk_weights_orders_by_expert_id():
    gi = np.array([[3, 1, 2]])
    gw = np.array([[0.5, 0.3, 0.2]])
    ci = np.array([[1, 2, 3]])
    cw = np.array([[0.3, 0.2, 0.5]])
    ga, ca = align_topk_weights(gi, gw, ci, cw)
    np.testing.assert_array_equal(ga, [[0.3, 0.2, 0.5]])
    np.testing.assert_array_equal(ca, cw)
    assert classify(ga, ca, EXACT).verdict is Verdict.MATCH


def test_align_topk_weights_handles_expert_out_and_bad_shapes():
    ids = np.array([[2, 0]])
    out = np.arange(6.0).reshape(1, 2, 3)          # [T, k, H]
    aligned, same = align_topk_weights(ids, out, ids[:, :1], out)
    np.testing.assert_array_equal(aligned[0], out[0, ::-1])
    assert same is out                              # ids cannot index it: returned as given
    assert align_topk_weights(None, None, ids, None) == (None, None)


@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 3, 4), (7, 1, 2, 3), (4, 8, 16)])
def test_align_topk_weights_moves_whole_rows_as_take_along_axis_would(shape):
    """Per-expert rows ``[T, k, ...]`` gathered whole give take_along_axis's result, C or Fortran order."""
    rng = np.random.default_rng(len(shape) + shape[0])
    T, k = shape[:2]
    ids = np.stack([rng.permutation(20)[:k] for _ in range(T)]) if T else np.zeros((0, k), np.int64)
    values = rng.normal(size=shape).astype(np.float32)
    order = np.argsort(ids, axis=1, kind="stable").reshape((T, k) + (1,) * (len(shape) - 2))
    want = np.take_along_axis(values, order, axis=1)
    for v in (values, np.asfortranarray(values)):
        got = align_topk_weights(ids, v, ids, v)[0]
        assert got.shape == want.shape and np.array_equal(got, want)
