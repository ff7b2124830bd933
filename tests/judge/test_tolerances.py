"""Tolerance validation, the defaults table, overrides and pyproject parsing."""

from __future__ import annotations

import math
import textwrap

import pytest

from moesnap.judge.classify import Verdict, classify
from moesnap.errors import MoesnapError, ToleranceError
from moesnap.stages import ALL_STAGES, INTEGER_STAGES
from moesnap.judge.tolerances import (
    DEFAULT_TOLERANCES,
    DTYPES,
    Override,
    Tolerance,
    Tolerances,
    parse_override,
)


# ---------------------------------------------------------------- Tolerance

@pytest.mark.parametrize("kwargs, message", [
    ({"atol": -1e-3, "rtol": 0.0}, "atol=-0.001 must be >= 0"),
    ({"atol": 0.0, "rtol": -2}, "rtol=-2.0 must be >= 0"),
    ({"atol": math.nan, "rtol": 0.0}, "atol=nan must be finite"),
    ({"atol": 0.0, "rtol": math.inf}, "rtol=inf must be finite"),
    ({"atol": 0.0, "rtol": 0.0, "max_frac_outside": 1.5}, "max_frac_outside=1.5 must be in [0, 1]"),
    ({"atol": 0.0, "rtol": 0.0, "max_frac_outside": -0.1}, "max_frac_outside=-0.1 must be in [0, 1]"),
    ({"atol": "1e-3", "rtol": 0.0}, "atol='1e-3' must be a number"),
    ({"atol": True, "rtol": 0.0}, "atol=True must be a number"),
])
def test_tolerance_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ToleranceError) as info:
        Tolerance(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, MoesnapError)


def test_tolerance_is_frozen_float_and_prints_compactly():
    tol = Tolerance(1, 0, 0)
    assert type(tol.atol) is float and tol == Tolerance(1.0, 0.0)
    with pytest.raises(AttributeError):
        tol.atol = 2.0
    assert str(Tolerance(1e-4, 1e-3)) == "atol=0.0001, rtol=0.001"
    assert str(Tolerance(1e-4, 1e-3, 0.01)) == "atol=0.0001, rtol=0.001, max_frac_outside=0.01"


# ---------------------------------------------------------------- defaults

def test_defaults_cover_every_dtype_and_stage():
    tols = Tolerances.defaults()
    assert set(DEFAULT_TOLERANCES) == set(DTYPES)
    for dtype in DTYPES:
        assert tols.tie_tol(dtype) > 0
        for stage in ALL_STAGES:
            tol = tols.for_stage(stage, dtype)
            if stage in INTEGER_STAGES:
                assert tol == Tolerance(0.0, 0.0, 0.0)
            else:
                assert tol.atol > 0 and tol.rtol > 0


def test_defaults_loosen_as_precision_drops():
    tols = Tolerances.defaults()
    for stage in ALL_STAGES:
        if stage in INTEGER_STAGES:
            continue
        chain = [tols.for_stage(stage, d) for d in ("float64", "float32", "float16", "bfloat16")]
        for tight, loose in zip(chain, chain[1:]):
            assert tight.atol <= loose.atol and tight.rtol <= loose.rtol
            assert tight.max_frac_outside <= loose.max_frac_outside
    ties = [tols.tie_tol(d) for d in ("float64", "float32", "float16", "bfloat16")]
    assert ties == sorted(ties)


def test_lookup_accepts_aliases_and_dtype_objects_and_rejects_unknowns():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    tols = Tolerances.defaults()
    assert tols.for_stage("moe_ffn_out", "float32") == tols.for_stage("moe_out", "float32")
    assert tols.for_stage("moe_out", np.dtype("float32")) == tols.for_stage("moe_out", "float32")
    assert tols.tie_tol(torch.bfloat16) == tols.tie_tol("bfloat16")
    with pytest.raises(ToleranceError, match="unknown stage 'moe_outt'"):
        tols.for_stage("moe_outt", "float32")
    with pytest.raises(ToleranceError, match="unknown dtype 'float8'"):
        tols.for_stage("moe_out", "float8")


def test_tolerances_are_immutable_and_hashable():
    tols = Tolerances.defaults()
    with pytest.raises(TypeError):
        tols.stages["float32"]["default"] = Tolerance(1, 1)
    assert hash(tols) == hash(Tolerances.defaults()) and tols == Tolerances.defaults()


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize("text, expected", [
    ("moe_out.atol=1e-3", Override(None, "moe_out", "atol", 1e-3)),
    ("bfloat16:moe_out.rtol=0.02", Override("bfloat16", "moe_out", "rtol", 0.02)),
    ("atol=1e-4", Override(None, None, "atol", 1e-4)),
    (" float16 : default.max_frac_outside = 0.5 ", Override("float16", "default", "max_frac_outside", 0.5)),
    ("mlp.gate.atol=1", Override(None, "router_logits", "atol", 1.0)),   # dotted alias
    ("bfloat16:tie_tol=0.1", Override("bfloat16", None, "tie_tol", 0.1)),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("moe_out.atol", "expected [DTYPE:][STAGE.]KEY=VALUE"),
    ("=1", "expected [DTYPE:][STAGE.]KEY=VALUE"),
    ("moe_out.atol=", "expected [DTYPE:][STAGE.]KEY=VALUE"),
    ("moe_out.atl=1", "unknown key 'atl'"),
    ("mo_out.atol=1", "unknown stage 'mo_out'"),
    ("float8:atol=1", "unknown dtype 'float8'"),
    ("moe_out.atol=abc", "atol='abc' is not a number"),
    ("moe_out.atol=nan", "atol=nan must be finite"),
    ("moe_out.tie_tol=1", "tie_tol is per dtype"),
    ("topk_ids.atol=1", "'topk_ids' is compared exactly"),
])
def test_malformed_override_names_the_text(text, fragment):
    with pytest.raises(ToleranceError) as info:
        parse_override(text)
    assert repr(text) in str(info.value) and fragment in str(info.value)


def test_with_overrides_applies_in_order():
    base = Tolerances.defaults()
    tols = base.with_overrides(["moe_out.atol=1e-2", "bfloat16:moe_out.rtol=0.5", "float32:tie_tol=0.25"])
    for dtype in DTYPES:
        assert tols.for_stage("moe_out", dtype).atol == 1e-2
        assert tols.for_stage("attn_out", dtype) == base.for_stage("attn_out", dtype)
    assert tols.for_stage("moe_out", "bfloat16").rtol == 0.5
    assert tols.for_stage("moe_out", "float32").rtol == base.for_stage("moe_out", "float32").rtol
    assert tols.tie_tol("float32") == 0.25 and tols.tie_tol("float16") == base.tie_tol("float16")
    later = tols.with_overrides(["moe_out.atol=3e-3"])
    assert later.for_stage("moe_out", "float64").atol == 3e-3
    assert base == Tolerances.defaults()        # the original is unchanged


def test_bare_key_sets_every_stage_and_mapping_form_works():
    tols = Tolerances.defaults().with_overrides({"float32:atol": 0.5, "rtol": "0.25"})
    for stage in ALL_STAGES:
        if stage not in INTEGER_STAGES:
            assert tols.for_stage(stage, "float32").atol == 0.5
            assert tols.for_stage(stage, "bfloat16").rtol == 0.25
    assert tols.for_stage("topk_ids", "float32") == Tolerance(0, 0)


def test_override_with_invalid_value_names_it():
    with pytest.raises(ToleranceError, match=r"moe_out\.atol=-1\.0: atol=-1\.0 must be >= 0"):
        Tolerances.defaults().with_overrides(["moe_out.atol=-1"])
    with pytest.raises(ToleranceError, match="max_frac_outside=2.0 must be in"):
        Tolerances.defaults().with_overrides(["max_frac_outside=2"])
    with pytest.raises(ToleranceError, match="tie_tol=-1.0 must be >= 0"):
        Tolerances.defaults().with_overrides(["tie_tol=-1"])


def test_override_changes_the_verdict():
    np = pytest.importorskip("numpy")
    g = np.ones(8, np.float32)
    c = g * np.float32(1.01)
    tols = Tolerances.defaults()
    assert classify(g, c, tols.for_stage("moe_out", "float32")).verdict is Verdict.DIVERGE
    loose = tols.with_overrides(["float32:moe_out.rtol=0.02"])
    assert classify(g, c, loose.for_stage("moe_out", "float32")).verdict is Verdict.MATCH


# ---------------------------------------------------------------- pyproject

def write(tmp_path, text):
    path = tmp_path / "pyproject.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_from_pyproject_reads_tool_moesnap(tmp_path):
    path = write(tmp_path, """
        [project]
        name = "someone-elses-engine"

        [tool.moesnap]
        store = "goldens"            # belongs to another part of moesnap: ignored here
        tie_tol = {float32 = 2e-4, bfloat16 = 0.1}

        [tool.moesnap.tolerance.float32]
        moe_out = {atol = 2e-4}
        default = {atol = 5e-4, rtol = 2e-3}
        max_frac_outside = 0.001

        [tool.moesnap.tolerance.bfloat16]
        logits = {atol = 0.5, rtol = 0.1, max_frac_outside = 0.01}
    """)
    tols = Tolerances.from_pyproject(path)
    base = Tolerances.defaults()
    assert tols.tie_tol("float32") == 2e-4 and tols.tie_tol("bfloat16") == 0.1
    assert tols.tie_tol("float16") == base.tie_tol("float16")
    # default applies first; every stage has a calibrated built-in entry, which keeps its own values
    assert tols.stages["float32"]["default"] == Tolerance(5e-4, 2e-3, 0.001)
    m = base.for_stage("moe_out", "float32")
    assert tols.for_stage("moe_out", "float32") == Tolerance(2e-4, m.rtol, 0.001, m.row_rel_l2, m.expert_scale)
    b = base.for_stage("attn_out", "float32")
    assert tols.for_stage("attn_out", "float32") == Tolerance(b.atol, b.rtol, 0.001)
    # a stage with a built-in entry keeps it
    assert tols.for_stage("logits", "float32").atol == base.for_stage("logits", "float32").atol
    assert tols.for_stage("logits", "bfloat16") == Tolerance(0.5, 0.1, 0.01, base.for_stage("logits", "bfloat16").row_rel_l2)
    assert tols.for_stage("moe_out", "float16") == base.for_stage("moe_out", "float16")


def test_from_pyproject_single_tie_tol_and_no_section(tmp_path):
    tols = Tolerances.from_pyproject(write(tmp_path, "[tool.moesnap]\ntie_tol = 0.125\n"))
    assert {tols.tie_tol(d) for d in DTYPES} == {0.125}
    assert Tolerances.from_pyproject(write(tmp_path, "[project]\nname='x'\n")) == Tolerances.defaults()


@pytest.mark.parametrize("text, fragment", [
    ("[tool.moesnap.tolerance.float8]\ndefault = {atol = 1}\n", "unknown dtype 'float8'"),
    ("[tool.moesnap.tolerance.float32]\nmoe_outt = {atol = 1}\n", "unknown stage 'moe_outt'"),
    ("[tool.moesnap.tolerance.float32]\nmoe_out = {atl = 1}\n", "unknown key 'atl'"),
    ("[tool.moesnap.tolerance.float32]\nfoo = 1\n", "unknown key 'foo'"),
    ("[tool.moesnap.tolerance.float32]\nmoe_out = {atol = -1}\n", "atol=-1.0 must be >= 0"),
    ("[tool.moesnap.tolerance.float32]\nmoe_out = {atol = 'x'}\n", "float32:moe_out.atol='x' must be a number"),
    ("[tool.moesnap.tolerance.float32]\ntopk_ids = {atol = 1}\n", "'topk_ids' is compared exactly"),
    ("[tool.moesnap]\ntie_tol = {float9 = 1}\n", "tie_tol: unknown dtype 'float9'"),
    ("[tool.moesnap]\ntolerance = 3\n", "tolerance must be a table"),
    ("[tool.moesnap\n", "not valid TOML"),
])
def test_from_pyproject_errors_name_the_problem_and_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ToleranceError) as info:
        Tolerances.from_pyproject(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_from_pyproject_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ToleranceError, match="cannot read") as info:
        Tolerances.from_pyproject(path)
    assert str(path) in str(info.value)


def test_from_pyproject_then_cli_overrides(tmp_path):
    path = write(tmp_path, "[tool.moesnap.tolerance.float32]\natol = 0.5\n")  # bare key: every stage
    tols = Tolerances.from_pyproject(path).with_overrides(["float32:attn_out.atol=0.25"])
    assert tols.for_stage("attn_out", "float32").atol == 0.25
    assert tols.for_stage("q", "float32").atol == 0.5


# -- profiles -------------------------------------------------------------------

def test_ggml_profile_widens_free_running_float32_only_and_keeps_per_layer_tables():
    from moesnap.judge.tolerances import GGML_CARRIED, profile_for

    d, g = Tolerances.defaults(), Tolerances.for_profile("ggml")
    assert g.profile == "ggml" and d.profile == "default"
    # per-layer (local re-reference) tolerances: unchanged, since the reference rounds as ggml does
    for stage in ("q", "moe_out", "logits"):
        assert g.for_stage(stage, "float32") == d.for_stage(stage, "float32")
    # free-running float32: the calibrated ggml table, widening with depth
    q0 = g.carried("q", "float32", 0)
    assert (q0.atol, q0.rtol) == GGML_CARRIED.stages["q"]
    assert q0.atol > 100 * d.carried("q", "float32", 0).atol
    assert g.carried("q", "float32", 8).atol == pytest.approx(q0.atol * 3)
    assert g.tie_tol_at("float32", 0) == GGML_CARRIED.tie_tol and g.tie_tol("float32") == d.tie_tol("float32")
    # other dtypes as by default; integer stages stay exact
    assert g.carried("q", "bfloat16", 5) == d.carried("q", "bfloat16", 5)
    assert g.carried("topk_ids", "float32", 3).atol == 0
    assert profile_for("llama.cpp") == "ggml" and profile_for("transformers") == "default" and profile_for(None) == "default"


def test_overrides_reach_the_ggml_free_running_table_too():
    g = Tolerances.for_profile("ggml").with_overrides(["float32:q.atol=0.5", "float32:tie_tol=0.9"])
    assert g.profile == "ggml"
    assert g.carried("q", "float32", 0).atol == 0.5 and g.for_stage("q", "float32").atol == 0.5
    assert g.tie_tol_at("float32", 0) == 0.9 and g.tie_tol("float32") == 0.9


def test_unknown_profile_is_refused_by_name():
    with pytest.raises(ToleranceError, match="unknown tolerance profile 'vllm'"):
        Tolerances.for_profile("vllm")
