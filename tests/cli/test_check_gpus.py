"""`moesnap check --gpus N`: the expert-parallel candidate from the command line (gloo on the CPU here;
the NCCL run is tools/gpu_sessions.py multi_gpu), and the qwen3-235b-a22b preset's shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesnap.cli.main import main
from moesnap.model.synth import preset, tiny_path

GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")


def _check(capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["-q", "check", str(tiny_path()), "--suite", "tiny", "--store", GOLDENS, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_on_two_ranks_passes_and_names_a_nan_expert_and_its_rank(capsys):
    code, out, _ = _check(capsys, "--gpus", "2")
    assert code == 0 and "verdict: pass" in out and "experts [0, 4), [4, 8)" in out, out[-1500:]
    code, out, _ = _check(capsys, "--gpus", "2", "--ep-mode", "allreduce", "--inject", "nan:layer=2,expert=6")
    assert code == 1 and "first divergence: case0 / layer 2 / expert_out" in out, out[-1500:]
    assert "all routed to expert 6 of rank 1" in out


@pytest.mark.parametrize("extra, says", [
    (["--gpus", "1"], "--gpus 1: expert parallelism needs at least 2 ranks"),
    (["--gpus", "2", "--replay"], "--replay with --gpus: one prefill is judged layer by layer by local re-reference"),
    (["--gpus", "3"], "experts do not split evenly over 3 ranks"),
])
def test_misuse_of_gpus_is_one_line_exit_2(capsys, extra, says):
    code, _, err = _check(capsys, *extra)
    assert code == 2 and says in err and err.count("\n") == 1, err


def test_the_235b_preset_has_the_released_models_shapes():
    spec = preset("qwen3-235b-a22b", layers=3)
    c = spec.config
    assert (c.n_layer, c.hidden, c.n_head, c.n_head_kv, c.head_dim) == (3, 4096, 64, 4, 128)
    assert (c.n_expert, c.n_expert_used, c.expert_ff, c.vocab_size) == (128, 8, 1536, 151936)
    assert preset("qwen3-235b-a22b").config.n_layer == 94


def test_compare_case_judges_one_named_golden_case(capsys, tmp_path):
    out = tmp_path / "c.zarr"
    assert main(["-q", "trace", str(tiny_path()), "--tokens", "1,2,3,259,260,271,42,7", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "compare", "tiny", str(out), "--store", GOLDENS, "--case", "case2"]) == 0
    assert "verdict: pass" in capsys.readouterr().out
    assert main(["-q", "compare", "tiny", str(out), "--store", GOLDENS, "--case", "case9"]) == 2
    assert "tiny holds no such case" in capsys.readouterr().err
