"""`moesnap calibrate`: the float32-vs-float64 spread and the tolerances it suggests."""

from __future__ import annotations

import json

import pytest

from moesnap.run.calibrate import MARGIN
from moesnap.cli.main import main
from moesnap.judge.tolerances import Tolerances


def test_calibrate_reports_spread_and_suggestions(capsys, tiny_path, tmp_path):
    js = tmp_path / "cal.json"
    code = main(["-q", "calibrate", str(tiny_path), "--tokens", "5,9,200,17,3", "--dtypes", "float32",
                 "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0
    assert "[tool.moesnap.tolerance.float32]" in out
    d = json.loads(js.read_text())["dtypes"]["float32"]
    spread, sugg = d["spread"], d["suggested"]
    assert spread["embed"]["max_abs"] == 0.0  # dequantized rows are exact in both precisions
    for stage in ("q", "router_logits", "moe_out", "layer_out", "logits"):
        assert 0 < spread[stage]["max_abs"] < 1e-4, stage     # float32 noise, not a bug
        assert sugg[stage]["atol"] == pytest.approx(MARGIN * spread[stage]["max_abs"])
    # the shipped defaults cover what this run measured
    tols = Tolerances.defaults()
    for stage, s in spread.items():
        assert tols.for_stage(stage, "float32").atol >= s["max_abs"], stage


@pytest.mark.parametrize("argv, needle", [
    (["--dtypes", "float8"], "float8"),
    (["--margin", "0"], "margin"),
    (["--tokens", "1,99999"], "99999"),
])
def test_calibrate_bad_arguments(capsys, tiny_path, argv, needle):
    code = main(["-q", "calibrate", str(tiny_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
