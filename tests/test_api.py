"""The public Python API (``import moesnap``): what it exports, and each function end to end on the
bundled tiny model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import moesnap
from moesnap.model.synth import tiny_path

TOKENS = [1, 5, 9, 20, 30, 40]


def test_the_package_face_exports_the_api_and_stays_cheap_to_import():
    assert set(moesnap.__all__) >= {"check", "compare", "trace", "generate", "Recorder", "Report", "Case"}
    for name in moesnap.__all__:
        assert getattr(moesnap, name) is not None
    code = "import sys, moesnap; print('torch' in sys.modules, 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "import moesnap must not load torch or zarr"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moesnap.nope   # noqa: B018


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    store = tmp_path_factory.mktemp("api") / "goldens"
    ref = moesnap.generate(tiny_path(), "api", [TOKENS, [3, 4, 5, 6]], store=store)
    return ref, store


def test_generate_returns_the_new_version(suite):
    ref, store = suite
    assert ref == "api@v0001"
    assert moesnap.generate(tiny_path(), "api", [TOKENS], store=store) == "api@v0002"


def test_check_passes_clean_and_names_a_planted_fault(suite):
    ref, store = suite
    report = moesnap.check(tiny_path(), "api@v0001", store=str(store), show_progress=False)
    assert isinstance(report, moesnap.Report) and report.passed and report.first_divergence is None
    assert report.summary().startswith("pass: golden api@v0001")
    assert report.to_dict()["verdict"] == "pass"
    bad = moesnap.check(tiny_path(), "api@v0001", store=str(store), inject=["scale:layer=2,stage=moe_out,factor=1.05"],
                        show_progress=False)
    fd = bad.first_divergence
    assert not bad.passed and (fd.layer, fd.stage) == (2, "moe_out")
    assert "first divergence: case0 / layer 2 / moe_out" in bad.summary()


def test_trace_returns_a_case_and_writes_one_on_request(tmp_path):
    case = moesnap.trace(tiny_path(), TOKENS)
    assert isinstance(case, moesnap.Case) and case.layers["moe_out"].shape == (4, len(TOKENS), 64)
    out = tmp_path / "c.zarr"
    again = moesnap.trace(tiny_path(), TOKENS, out=out)
    assert out.is_dir() and np.array_equal(again.model["logits"], case.model["logits"])
    with pytest.raises(moesnap.MoesnapError, match="exists"):
        moesnap.trace(tiny_path(), TOKENS, out=out)


def test_recorder_and_compare_judge_a_users_own_forward(suite):
    ref, store = suite
    golden = moesnap.trace(tiny_path(), TOKENS)
    rec = moesnap.Recorder()
    rec.save("tokens", None, torch.tensor(TOKENS))
    for layer in range(golden.n_layer):
        rec.save("moe_out", layer, torch.from_numpy(golden.layers["moe_out"][layer]))
        rec.save("layer_out", layer, torch.from_numpy(golden.layers["layer_out"][layer]))
    report = moesnap.compare("api@v0001", rec.case(), store=str(store), allow_missing=True, show_progress=False)
    assert report.passed, report.summary()
    rec.save("moe_out", 1, torch.from_numpy(golden.layers["moe_out"][1] * 1.05))
    report = moesnap.compare("api@v0001", rec.case(), store=str(store), allow_missing=True, show_progress=False)
    assert not report.passed and (report.first_divergence.layer, report.first_divergence.stage) == (1, "moe_out")


def test_recorder_case_needs_the_tokens():
    with pytest.raises(ValueError, match="save the token ids first"):
        moesnap.Recorder().case()


def test_show_progress_is_the_same_switch_as_the_commands_quiet(monkeypatch, capsys):
    # one channel: show_progress=False runs the call inside util.quiet (as -q runs a command), and
    # nothing of it outlives the call
    from moesnap.util import progress_enabled, quiet

    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    moesnap.trace(tiny_path(), TOKENS, show_progress=False)
    assert capsys.readouterr().err == ""
    assert progress_enabled()                      # the call's quiet ended with it
    moesnap.trace(tiny_path(), TOKENS, show_progress=True)
    assert "moesnap: running the reference in float32: 6 tokens x 4 layers" in capsys.readouterr().err
    with quiet():                                  # a command's -q wins over the keyword
        moesnap.trace(tiny_path(), TOKENS, show_progress=True)
    assert capsys.readouterr().err == ""
