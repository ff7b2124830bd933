"""`moesnap compare` says what it did not judge: the golden's other cases when the candidate is one
case (its verdict is that case's, and says so), a case group missing from a directory of them (named,
and never a pass of the whole suite, with --allow-missing or without: not an error either), and arrays
that name no stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import moesnap
from moesnap.cli.main import main

CASES = ["5,9,200,17", "1,2,3", "7,7,8,9,10"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("cases") / "goldens"
    args = ["-q", "goldens", "generate", str(tiny_path), "--suite", "s", "--store", str(root)]
    for t in CASES:
        args += ["--tokens", t]
    assert main(args) == 0
    return root


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_path):
    """Each golden case's tokens traced by the reference (so identical to the golden), as case groups."""
    d = tmp_path_factory.mktemp("traced")
    for i, t in enumerate(CASES):
        assert main(["-q", "trace", str(tiny_path), "--tokens", t, "--out", str(d / f"case{i}")]) == 0
    return d


def compare(capsys, tmp_path, *args):
    js = tmp_path / "r.json"
    code = main(["-q", "compare", *map(str, args), "--json", str(js), "--force"])
    out = capsys.readouterr()
    return code, out.out, out.err, json.loads(js.read_text()) if js.exists() else None


def test_one_case_against_a_three_case_golden_is_judged_as_that_case_and_names_the_others(
        capsys, tmp_path, store, traced):
    code, out, err, rep = compare(capsys, tmp_path, "s", traced / "case1", "--store", store, "--no-local")
    assert code == 0 and rep["verdict"] == "pass", out + err
    assert rep["cases"] == {"golden": ["case0", "case1", "case2"], "judged": ["case1"], "not_judged": ["case0", "case2"],
                            "single_case": True}
    assert ("cases: judged 1 of 3 golden cases (case1, the one with the candidate's tokens); not judged: case0, "
            "case2 (the candidate holds no case for them)") in out
    assert "verdict: pass (golden case case1 only: 2 of the golden's 3 cases not judged)" in out.splitlines()
    api = moesnap.compare("s", traced / "case1", store=str(store), local=False, show_progress=False)
    assert "judged 1 of 3 golden cases" in api.summary() and api.cases_not_judged == ["case0", "case2"]


def test_naming_the_one_golden_case_judges_it_alone(store, traced):
    rep = moesnap.compare("s", traced / "case1", store=str(store), local=False, case="case1", show_progress=False)
    assert rep.verdict == "pass" and rep.cases_not_judged == [] and rep.golden_cases == ("case1",)
    assert "judging golden case case1 alone (--case)" in rep.notes
    with pytest.raises(moesnap.MoesnapError, match="--case 'case9': s holds no such case"):
        moesnap.compare("s", traced / "case1", store=str(store), local=False, case="case9", show_progress=False)


def test_a_failing_single_case_still_says_what_was_not_judged(store, traced):
    from moesnap.judge.report import text
    from moesnap.store.case import load_case

    cand = load_case(traced / "case2")
    cand.layers["moe_out"][1, 2, 3] = np.nan
    rep = moesnap.compare("s", cand, store=str(store), local=False, show_progress=False)
    assert rep.verdict == "fail"
    out = text(rep)
    assert "first divergence: case2 / layer 1 / moe_out / token 2: NAN_CANDIDATE (1 NaN in the candidate)" in out
    assert "cases: judged 1 of 3 golden cases (case2, the one with the candidate's tokens); not judged: case0, " \
           "case1 (the candidate holds no case for them)" in out


@pytest.mark.parametrize("allow_missing", [True, False])
def test_a_case_group_missing_from_a_directory_is_reported_not_an_error(capsys, tmp_path, store, traced, allow_missing):
    d = tmp_path / "dump"
    d.mkdir()
    for name in ("case0", "case2"):
        (d / name).symlink_to(traced / name, target_is_directory=True)
    (d / "case7").symlink_to(traced / "case1", target_is_directory=True)    # named like no golden case
    extra = ["--allow-missing"] if allow_missing else []
    code, out, err, rep = compare(capsys, tmp_path, "s", d, "--store", store, "--no-local", *extra)
    assert code == 1 and rep["verdict"] == "inconclusive", out + err
    assert err == ""
    assert rep["cases"]["judged"] == ["case0", "case2"] and rep["cases"]["not_judged"] == ["case1"]
    line = next(ln for ln in out.splitlines() if ln.startswith("inconclusive:"))
    assert line.startswith("inconclusive: judged 2 of 3 golden cases (case0, case2); not judged: case1 (the "
                           "candidate holds no case for it); to judge it, run the engine on its tokens too"), line
    assert "verdict: inconclusive" in out.splitlines() and "cases:" not in out
    assert f"note: {d}: case group case7 named like no case of the golden (case0, case1, case2): not judged" in out


def test_arrays_that_name_no_stage_are_listed(capsys, tmp_path, store, traced, tiny_path):
    cand = tmp_path / "extra.zarr"
    assert main(["-q", "trace", str(tiny_path), "--tokens", CASES[1], "--out", str(cand)]) == 0
    g = zarr.open_group(str(cand), mode="r+")
    g.create_array("router_probs", data=np.zeros((3, 8), np.float32))
    g.create_array("layers/mlp_gate_up", data=np.zeros((4, 3, 8), np.float32))
    code, out, err, rep = compare(capsys, tmp_path, "s", cand, "--store", store, "--no-local")
    assert code == 0 and rep["verdict"] == "pass", out + err
    assert {k: sorted(v) for k, v in rep["ignored"].items()} == {"case1": ["layers/mlp_gate_up", "router_probs"]}
    line = next(ln for ln in out.splitlines() if ln.startswith("ignored:"))
    assert line.startswith("ignored: case1: 2 candidate arrays name no stage moesnap knows, not judged: ")
    assert "router_probs" in line and "layers/mlp_gate_up" in line and "moesnap.stages" in line

