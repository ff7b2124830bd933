"""The device judge (torch, :mod:`moesnap.judge.torch_stats` / :mod:`moesnap.judge.torch_rows`) against the
numpy judge: the same verdicts and the same numbers, to the precision the report prints.

torch on the CPU runs the code a GPU runs, so the two paths are held against each other here over the
hypothesis strategies, crafted edge cases (NaN/Inf placement, exact ties at the k-th ratio, all-zero rows,
empty stages, float64 extremes, integer arrays), every slice size, the expert-scale rule, and whole checks
of the bundled tiny model against the committed goldens (clean and with planted faults, float32 and
bfloat16 with stage-local replay), each judged both ways from one forward.

What "the same" means (:func:`assert_same`): verdict, detail text, counts, indices, tokens, maxima and
``closeness`` are equal; the sums (cosine, rel_l2, nmse, mean_abs, the row rule's relative error) agree to
1e-9 relative, being added in another order; a number printed with 6 significant digits may then differ
in its last digit only where its value sits on a rounding boundary.  The one exception is a cosine near 0
from cancelling terms (``g . c`` summing +-9e18 to 1e5): any two summation orders differ there by up to
``n * 2**-52`` of the cosine's scale (1), so it is held to 1e-12 absolute, in the metrics and in the detail.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from unittest import mock

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import moesnap
import moesnap.judge.torch_stats as TS
import moesnap.judge.torch_rows as TR
from moesnap.errors import UsageError
from moesnap.judge.classify import Verdict, classify
from moesnap.judge.device import DEVICE_MIN_ELEMENTS, ENV, JudgeDevice, judge_device
from moesnap.judge.experts import ExpertInputs, classify_stage
from moesnap.judge.report import text
from moesnap.judge.tolerances import Tolerance
from moesnap.testing import strategies as ms

ON = JudgeDevice("cpu", 0)
#: the torch devices the two paths are held against each other on (CUDA where there is one: ``-m gpu``)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")
EXACT_FLOATS = ("max_abs", "max_rel", "frac_outside", "closeness")
SUMMED = ("cosine", "rel_l2", "nmse", "mean_abs", "max_row_rel_l2")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)")


def _close(a: float, b: float, rel: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def _same_text(a: str, b: str) -> bool:
    """Equal, or equal but for printed numbers within a unit of their 6th significant digit."""
    if a == b:
        return True
    na, nb = NUMBER.findall(a), NUMBER.findall(b)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b) or len(na) != len(nb):
        return False
    return all(x == y or _close(float(x), float(y), 2e-5) or abs(float(x) - float(y)) <= 1e-12
               for x, y in zip(na, nb))


def assert_same(a, b, where: str = "") -> None:
    """``a`` (numpy's Result) and ``b`` (the device's) agree as the module docstring says."""
    assert a.verdict is b.verdict, (where, a.verdict, b.verdict, a.detail, b.detail)
    assert a.flipped_tokens == b.flipped_tokens and a.excluded_tokens == b.excluded_tokens, where
    assert _same_text(a.detail, b.detail), (where, a.detail, b.detail)
    assert (a.metrics is None) == (b.metrics is None), where
    if a.metrics is None:
        return
    ma, mb = a.metrics, b.metrics
    for name in ma.__dataclass_fields__:
        x, y = getattr(ma, name), getattr(mb, name)
        if name == "cosine":          # a sum of signed terms: cancellation bounds it absolutely
            assert _close(x, y, 1e-9) or abs(x - y) <= 1e-12, (where, name, x, y)
        elif name in SUMMED:
            assert _close(x, y, 1e-9), (where, name, x, y)
        elif name in EXACT_FLOATS:
            assert _close(x, y, 0.0), (where, name, x, y)
        else:
            assert x == y, (where, name, x, y)


def both(g, c, tol, dev="cpu", **kw):
    a = classify(g, c, tol, **kw)
    b = classify(g, c, tol, device=JudgeDevice(dev, 0), **kw)
    assert_same(a, b)
    return a, b


# ---------------------------------------------------------------- choosing the path


def test_the_environment_chooses_the_path(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert judge_device(None) is None                        # auto: a dump, no torch forward
    assert judge_device("cpu") is None                       # auto: a CPU candidate
    assert judge_device("cuda:1") == JudgeDevice("cuda:1", DEVICE_MIN_ELEMENTS)
    monkeypatch.setenv(ENV, "cpu")
    assert judge_device("cuda:0") is None
    monkeypatch.setenv(ENV, " Device ")
    assert judge_device("cpu") == JudgeDevice("cpu", 0)
    assert judge_device("cuda:0", "numpy") is None           # the caller's mode wins over the variable
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(UsageError, match=r"^MOESNAP_JUDGE='gpu': expected one of auto, cpu, device$"):
        judge_device("cuda:0")
    with pytest.raises(UsageError, match=r"^judge='fast': expected one of auto, cpu, device$"):
        judge_device(None, "fast")


def test_a_bad_choice_is_refused_in_one_line_with_exit_2(monkeypatch, capsys, tiny_path):
    from moesnap.cli import main

    monkeypatch.setenv(ENV, "gpu")
    code = main(["-q", "check", str(tiny_path), "--suite", "tiny", "--store", GOLDENS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["moesnap: error: MOESNAP_JUDGE='gpu': expected one of auto, cpu, device"], err


def test_auto_leaves_small_arrays_and_other_dtypes_to_numpy():
    on = JudgeDevice("cuda:0", DEVICE_MIN_ELEMENTS)
    small, big = np.zeros(16, np.float32), np.zeros(DEVICE_MIN_ELEMENTS, np.float32)
    assert not on.takes(small, small) and on.takes(big, big)
    assert not on.takes(big.astype(np.uint32), big) and ON.takes(big.astype(np.uint8), big.astype(bool))


# ---------------------------------------------------------------- hypothesis


@pytest.mark.parametrize("dev", DEVICES)
@given(pair=ms.array_pairs(allow_nan=True, allow_infinity=True,
                           dtype=st.sampled_from(ms.FLOAT_DTYPES + ms.INT_DTYPES)),
       tol=ms.tolerances(allow_row=True), data=st.data())
def test_same_as_numpy_on_any_pair(pair, tol, data, dev):
    g, c = pair
    axis = data.draw(st.sampled_from([0, None, -1] + ([1] if g.ndim > 1 else [])))
    exclude = ()
    if axis is not None and g.shape[axis] > 0:
        exclude = tuple(data.draw(st.sets(st.integers(0, g.shape[axis] - 1), max_size=g.shape[axis])))
    both(g, c, tol, token_axis=axis, exclude_tokens=exclude, dev=dev)


@pytest.mark.parametrize("dev", DEVICES)
@given(pair=ms.array_pairs(dtype=st.sampled_from(["float16", "float32"]),
                           shape=ms.shapes(min_dims=2, max_dims=3, min_side=1)),
       tol=ms.tolerances(allow_row=True), budget=st.sampled_from([1, 5, 64]), data=st.data())
def test_same_in_any_slicing(pair, tol, budget, data, dev):
    """Slices of a few elements (whole token rows, at least one) agree with one slice and with numpy."""
    g, c = pair
    exclude = tuple(data.draw(st.sets(st.integers(0, g.shape[0] - 1), max_size=g.shape[0] - 1)))
    with mock.patch.object(TS, "BUDGET", budget), mock.patch.object(TR, "BUDGET", budget):
        both(g, c, tol, exclude_tokens=exclude, dev=dev)


@pytest.mark.parametrize("dev", DEVICES)
@given(a=ms.shared_precision_arrays(shape=ms.shapes(min_dims=2, max_dims=3, min_side=1)),
       rtol=st.sampled_from([0.0, 2.0**-8, 2.0**-4]), frac=st.sampled_from([0.0, 0.1, 0.25, 0.5]))
def test_same_with_ties_on_a_grid(a, rtol, frac, dev):
    """Values on a coarse grid tie often: equal ratios around the k-th largest, equal |c - g| maxima."""
    c = np.round(a * 4) / 4
    both(a.astype(np.float32), c.astype(np.float32), Tolerance(2.0**-6, rtol, frac, 0.5), dev=dev)


# ---------------------------------------------------------------- crafted edge cases


@pytest.mark.parametrize("dev", DEVICES)
def test_non_finite_placement_is_found_alike(dev):
    g = np.arange(24, dtype=np.float32).reshape(4, 6)
    c = g.copy()
    c[3, 5] = np.nan            # in an excluded token: still counted, and the first in C order below
    g[1, 2] = np.inf
    c[1, 2] = -np.inf
    c[2, 0] = np.inf
    for budget in (1, 6, 12, 1 << 22):       # one token per slice, ..., one slice
        with mock.patch.object(TS, "BUDGET", budget):
            for exclude in ((), (3,), (1, 3), (0, 1, 2, 3)):
                a, _ = both(g, c, Tolerance(0.0, 1e-6, 0.1), exclude_tokens=exclude, dev=dev)
                assert a.verdict is Verdict.NAN_BOTH and a.metrics.worst_index == (1, 2)
                assert a.metrics.token_closeness[1:] == (math.inf,) * 3


@pytest.mark.parametrize("dev", DEVICES)
def test_exact_ties_at_the_kth_ratio(dev):
    """Ratios equal around the deciding rank: the k-th largest is the tied value, whichever copy is picked."""
    g = np.ones((10, 10), np.float32)
    c = g.copy()
    c.reshape(-1)[::7] = 1.5         # 15 elements at ratio exactly 0.5 / (atol + rtol)
    c[9, 9] = 3.0
    for frac in (0.0, 0.05, 0.14, 0.15, 0.16, 0.5):
        a, _ = both(g, c, Tolerance(0.25, 0.25, frac), dev=dev)
        assert a.metrics.closeness in (1.0, 4.0, 0.0)


@pytest.mark.parametrize("dev", DEVICES)
def test_all_zero_rows_and_sides(dev):
    z = np.zeros((4, 8), np.float32)
    x = z.copy()
    x[2] = 1e-3                       # one row alone, the rest all zero: the median row norm is 0
    tol = Tolerance(1e-6, 1e-6, 0.0, 0.01)
    for g, c in ((z, z), (z, x), (x, z), (x, x * (1 + 2.0**-10))):
        both(g, c, tol, dev=dev)
        both(g, c, tol, exclude_tokens=(2,), dev=dev)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("n_rows", [4, 5])
def test_the_row_floor_takes_numpys_median(n_rows, dev):
    """Rows of norms 1, 2, 10, 100 (and 1000): the floor is a quarter of the median row norm (the mean of
    the middle two for an even count), and it decides the small row's relative error."""
    norms = [1.0, 2.0, 10.0, 100.0, 1000.0][:n_rows]
    g = np.zeros((n_rows, 4), np.float32)
    g[:, 0] = norms
    c = g.copy()
    c[0, 1] = 0.5                             # row 0: error 0.5 against max(1, floor)
    a, _ = both(g, c, Tolerance(1.0, 0.0, 0.0, 0.1), dev=dev)
    floor = 0.25 * float(np.median(norms))
    assert a.metrics.max_row_rel_l2 == 0.5 / max(1.0, floor)


@pytest.mark.parametrize("dev", DEVICES)
def test_empty_stages_and_nothing_judged(dev):
    tol = Tolerance(1e-6, 1e-6, 0.1, 0.1)
    for shape in ((0,), (0, 8), (5, 0), (3, 0, 2), ()):
        g = np.zeros(shape, np.float32)
        both(g, g.copy(), tol, token_axis=0 if shape else None, dev=dev)
    g = np.ones((3, 4), np.float32)
    a, _ = both(g, g * 2, tol, exclude_tokens=(0, 1, 2), dev=dev)
    assert a.metrics.n == 0 and "nothing judged" in a.detail


@pytest.mark.parametrize("dev", DEVICES)
def test_float64_extremes_overflow_and_subnormals(dev):
    tol = Tolerance(0.0, 1e-3)
    both(np.array([1e308, -1e308, 3.0]), np.array([-1e308, 1e308, 3.0]), tol, dev=dev)   # |c-g| overflows: numpy
    tiny = np.array([[1e-310, 2e-320], [5e-324, 0.0]])
    both(tiny, np.array([[1.1e-310, 2e-320], [0.0, 5e-324]]), tol, dev=dev)
    big = np.array([[1e300, 2e300, -3e300], [1e-300, 4e-300, 0.0]])
    both(big, big * (1 + 1e-4), Tolerance(0.0, 1e-5, 0.0, 1e-6), dev=dev)


@pytest.mark.parametrize("dev", DEVICES)
def test_integer_and_bool_arrays(dev):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, (16, 8)).astype(np.int32)
    other = ids.copy()
    other[3, 1] += 1
    both(ids, other, Tolerance(0.0, 0.0), dev=dev)
    both(ids.astype(np.int64), other.astype(np.uint8), Tolerance(0.0, 0.0), dev=dev)
    both(ids.astype(np.float32), other, Tolerance(0.5, 0.0), dev=dev)       # an int against a float: float rule
    both(ids > 64, other > 64, Tolerance(0.0, 0.0), dev=dev)


# ---------------------------------------------------------------- the expert-scale rule


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("stage", ["expert_out", "moe_out"])
@pytest.mark.parametrize("budget", [1 << 22, 200])
def test_expert_scale_rule_alike(stage, budget, dev):
    rng = np.random.default_rng(7)
    T, E, K, H = 24, 6, 3, 64
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    eo = rng.standard_normal((T, K, H)).astype(np.float32)
    w = rng.dirichlet(np.ones(K), T).astype(np.float32)
    total = (eo * w[..., None]).sum(1).astype(np.float32)
    scale = np.where(ids == 2, 1.05, 1.0)[..., None]                            # expert 2 off by 5 %
    tol = Tolerance(0.25, 0.1, 0.0, math.inf, 0.01)      # the elementwise rule admits 5 %
    if stage == "expert_out":
        order = np.argsort(ids, axis=1)
        inputs = ExpertInputs(np.take_along_axis(ids, order, 1), eo, order, None, None)
        g = np.take_along_axis(eo, order[..., None], 1)
        c = np.take_along_axis((eo * scale).astype(np.float32), order[..., None], 1)
    else:
        inputs = ExpertInputs(ids, eo, None, w, total)
        g, c = total, (eo * scale * w[..., None]).sum(1).astype(np.float32)
    with mock.patch.object(TR, "BUDGET", budget):
        for exclude in ((), (0, 5)):
            a, ma = classify_stage(g, c, tol, exclude, inputs)
            b, mb = classify_stage(g, c, tol, exclude, inputs, device=JudgeDevice(dev, 0))
            assert_same(a, b, stage)
            assert a.verdict is Verdict.DIVERGE and "expert 2" in a.detail
            assert [(m.rule, m.text) for m in ma] == [(m.rule, m.text) for m in mb]
            assert all(_close(x.ratio, y.ratio, 1e-9) for x, y in zip(ma, mb))


# ---------------------------------------------------------------- whole checks on the committed goldens


def _check_both_ways(tiny_path, **kw):
    """One ``moesnap.check`` of the tiny model against the committed goldens: its candidate cases judged
    by numpy and by the device judge (torch on the CPU), from one forward; with how often each device
    function ran."""
    import moesnap.run.check as run_check
    from moesnap.judge.suite import judge_suite as real

    seen: dict = {}
    calls = {"device_metrics": 0, "device_row_stats": 0, "device_pair_sums": 0}

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return mock.patch.object(module, name, wrapper)

    def twice(pairs, policy, **kwargs):
        pairs = list(pairs)
        seen["device"] = real(pairs, policy, **{**kwargs, "judge": "device"})
        seen["cpu"] = real(pairs, policy, **{**kwargs, "judge": "cpu"})
        return seen["cpu"]

    with mock.patch.object(run_check, "judge_suite", twice), counted(TS, "device_metrics"), \
            counted(TR, "device_row_stats"), counted(TR, "device_pair_sums"):
        moesnap.check(tiny_path, "tiny", store=GOLDENS, show_progress=False, **kw)
    return seen["cpu"], seen["device"], calls


@pytest.mark.parametrize("kw", [
    {"dtype": "float32"},
    {"dtype": "bfloat16"},                                              # stage-local replay: rows, experts
    {"dtype": "float32", "inject": ["nan:layer=2,expert=3"]},
    {"dtype": "bfloat16", "inject": ["scale:layer=3,stage=moe_out,factor=0.95"]},
    {"dtype": "float32", "inject": ["scale:layer=1,stage=attn_out,factor=1.05"], "replay": True},
])
def test_committed_goldens_judged_alike(tiny_path, kw):
    a, b, calls = _check_both_ways(tiny_path, **kw)
    # every stage with metrics but the routing ids (judged as sets, on the host) went through the device
    judged = [r for c in list(b.cases) + list(b.replay or ()) for r in c.results
              if r.result.metrics is not None and r.stage != "topk_ids"]
    assert judged and calls["device_metrics"] == len(judged), (calls, len(judged))
    if kw["dtype"] == "bfloat16":      # replay judges each stage by the row and expert rules too
        assert calls["device_row_stats"] and calls["device_pair_sums"], calls
    said = "note: judge: statistics computed by torch on "       # the device's report says where it ran

    def printed(lines):
        return [line for line in lines if not line.startswith(said)]

    assert said not in "\n".join(text(a)) and said in "\n".join(text(b))
    assert a.verdict == b.verdict and text(a) == printed(text(b)) and a.summary() == b.summary()
    for ca, cb in zip(list(a.cases) + list(a.replay or ()), list(b.cases) + list(b.replay or ()), strict=True):
        assert [r.stage for r in ca.results] == [r.stage for r in cb.results]
        for ra, rb in zip(ca.results, cb.results):
            assert_same(ra.result, rb.result, f"{ca.case} layer {ra.layer} {ra.stage}")
            assert [m.text for m in ra.margins] == [m.text for m in rb.margins]
    if kw.get("inject"):
        assert not a.passed
