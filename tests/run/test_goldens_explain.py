"""`moesnap goldens diff` is a compact summary (each stage with --details) that counts only stages whose
values changed; `goldens show` lists each layer's tensor types and a --inject qtype example that fires,
and its help example works on the bundled goldens of the bundled model."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from moesnap.cli.main import main
from moesnap.store import LocalGoldenStore

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ["--tokens", "5,9,200,17", "--tokens", "1,2,3", "--tokens", "7,8"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_path):
    """v0001 float32, v0002 float64 of the same inputs."""
    root = tmp_path_factory.mktemp("diff") / "goldens"
    for dtype in ("float32", "float64"):
        assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "t", "--store", str(root), *INPUTS,
                     "--dtype", dtype]) == 0
    return root


@pytest.fixture
def root(published, tmp_path):
    dst = tmp_path / "goldens"
    shutil.copytree(published, dst)
    return dst


def diff(capsys, root, a, b, *extra):
    code = main(["-q", "goldens", "diff", a, b, "--store", str(root), *extra])
    return code, capsys.readouterr().out.splitlines()


def test_diff_is_a_short_summary_per_case(capsys, root, tmp_path):
    code, lines = diff(capsys, root, "t@v0001", "t@v0002", "--json", str(tmp_path / "d.json"))
    assert code == 1
    lines = lines[:-1]                                      # "wrote …"
    assert len(lines) == 1 + 2 + 3 + 1, lines               # versions, provenance, a line per case, the total
    assert max(map(len, lines)) <= 150, max(lines, key=len)
    assert lines[1] == "  provenance command: … --dtype float32 -> … --dtype float64"   # where the commands differ
    assert lines[2] == "  provenance dtype: float32 -> float64"
    n = 3 + 17 * 4               # stages per case that a float64 run moves: all 75 but the 4 topk_ids (integers)
    for i, line in enumerate(lines[3:6]):
        assert line.startswith(f"  case case{i}: ") and "none beyond tolerance (closest: " in line, line
        assert "1 other in dtype only" in line               # embed: a float32 table stored as float64
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["n_changed"] == 3 * (n - 1) and d["n_dtype_only"] == 3
    assert lines[-1] == f"changed: {3 * (n - 1)} stages, 0 beyond tolerance (each stage: --details)"


def test_details_on_request(capsys, root):
    code, lines = diff(capsys, root, "t@v0001", "t@v0002", "--details")
    assert code == 1
    stage_lines = [ln for ln in lines if ln.startswith("    ")]
    assert len(stage_lines) == 3 * (3 + 17 * 4)             # every changed stage, and the dtype-only ones
    assert max(map(len, lines)) <= 140, max(lines, key=len)
    assert any("embed: same values, dtype float32 -> float64" in ln for ln in stage_lines)
    assert all("of tolerance" in ln for ln in stage_lines if "MATCH" in ln)


def test_an_unchanged_version_and_a_planted_change(capsys, root, tiny_path):
    assert main(["-q", "goldens", "generate", str(tiny_path), "--suite", "t", "--store", str(root), *INPUTS]) == 0
    capsys.readouterr()
    code, lines = diff(capsys, root, "t@v0001", "t@v0003")
    assert code == 0 and lines[-1] == "identical: all 225 stages bit for bit", lines
    st = LocalGoldenStore(root)
    v1 = st.open_version("t", "v0001")
    cases = {n: v1.read_case(n) for n in v1.case_names()}
    cases["case1"].layers["moe_out"][2] *= 1.05
    st.publish("t", cases, {k: v1.meta[k] for k in ("model", "dtype", "versions")})
    code, lines = diff(capsys, root, "t@v0001", "t@v0004")
    assert code == 1
    case1 = next(ln for ln in lines if ln.startswith("  case case1:"))
    assert case1.startswith("  case case1: 1 of 75 stages changed, 1 beyond tolerance, the first: layer 2 moe_out "
                            "DIVERGE (") and "elements beyond atol+rtol·|g|" in case1
    assert "  case case0: all 75 stages unchanged" in lines and "  case case2: all 75 stages unchanged" in lines


def test_show_lists_each_layers_tensor_types_and_the_help_example_works(capsys, monkeypatch, tiny_path):
    from moesnap.model.weights import GGUFModel

    p = next(a for a in _goldens_parser()._actions if a.dest == "goldens_command").choices["show"]
    example = p.epilog.split("model): ", 1)[1].split(";", 1)[0]
    assert example == "moesnap goldens show tiny"
    monkeypatch.chdir(ROOT)                                   # the bundled goldens/ of the bundled model
    assert main(["-q", *shlex.split(example)[1:]]) == 0
    out = capsys.readouterr().out.splitlines()
    q = GGUFModel.open(tiny_path).qtypes()
    by_layer = [ln for ln in out if ln.strip()[:1].isdigit() and ("Q6_K" in ln or "Q4_K" in ln)]
    assert [ln.split()[1] for ln in by_layer] == [q[f"blk.{i}.ffn_down_exps"] for i in range(4)]
    assert any("Q8_0 in every layer: attn_q, attn_k, attn_v, attn_output" in ln for ln in out)
    inject = next(ln for ln in out if ln.startswith("  inject:   e.g. "))
    cmd = shlex.split(inject.split("e.g. ", 1)[1].split("  (")[0])
    assert cmd[:3] == ["moesnap", "check", "src/moesnap/data/tiny.gguf"], cmd
    layer = int(cmd[-1].split("layer=")[1].split(",")[0])
    assert q[f"blk.{layer}.ffn_down_exps"] == "Q6_K" and cmd[-1].endswith("as=q4_k")
    assert main(["-q", *cmd[1:]]) == 1                        # it fires: the check names that layer
    fd = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("first divergence:"))
    assert f"/ layer {layer} / expert_out" in fd


def _goldens_parser():
    import argparse

    from moesnap.cli.goldens import register

    top = argparse.ArgumentParser(prog="moesnap")
    register(top.add_subparsers())
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["goldens"]
