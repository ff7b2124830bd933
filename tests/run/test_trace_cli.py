"""`moesnap trace` end to end on the bundled tiny model."""

from __future__ import annotations

import numpy as np
import zarr

from moesnap.store.case import load_case
from moesnap.cli.main import main
from moesnap.stages import FAMILY_STAGES

#: the stages of the family these tests run (Qwen3-MoE); the schema has other families' too
LAYER_STAGES = FAMILY_STAGES["qwen3moe"]


def test_trace_writes_the_case_layout_and_a_summary(capsys, tmp_path, tiny_path):
    out = tmp_path / "case.zarr"
    code = main(["-q", "trace", str(tiny_path), "--prompt", "Hi!", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "L00" in stdout and "L03" in stdout and "logits: finite=True" in stdout
    g = zarr.open_group(str(out), mode="r")
    assert g["tokens"][:].tolist() == [3 + ord(c) for c in "Hi!"]  # byte tokens <0xNN> sit at 3 + NN
    for stage in LAYER_STAGES:
        a = g[f"layers/{stage}"]
        assert a.shape[0] == 4 and a.chunks[0] == 1, stage
    assert g["logits"].shape == (3, 272)
    assert g.attrs["producer"] == "moesnap-reference"
    assert len(g.attrs["model"]["sha256"]) == 64
    case = load_case(out)
    assert np.isfinite(case.model["logits"]).all()


def test_trace_float64_and_force(capsys, tmp_path, tiny_path):
    out = tmp_path / "case.zarr"
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,6", "--out", str(out)]) == 0
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,6,7", "--dtype", "float64", "--out", str(out), "--force"]) == 0
    g = zarr.open_group(str(out), mode="r")
    assert g["logits"].dtype == np.float64 and g["tokens"].shape == (3,)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_corrupted_case_is_detected(tmp_path, tiny_path, capsys):
    out = tmp_path / "case.zarr"
    assert main(["-q", "trace", str(tiny_path), "--tokens", "5,6", "--out", str(out)]) == 0
    chunk = out / "layers" / "moe_out" / "c" / "1" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x40
    chunk.write_bytes(bytes(raw))
    import pytest

    from moesnap.errors import GoldenError

    with pytest.raises(GoldenError, match="layers/moe_out: checksum mismatch"):
        load_case(out)


# -- other engines (trace --engine): what is refused before anything runs ------------------------

import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("argv, says", [
    (["--engine", "vllm"], "unknown engine 'vllm'; choose one of moesnap, transformers, llama.cpp"),
    (["--engine", "llama.cpp", "--dtype", "bfloat16"], "--engine llama.cpp runs llama-cpp-python's CPU build"),
    (["--engine", "transformers", "--candidate"], "--engine transformers is a candidate already"),
    (["--engine", "transformers", "--dtype", "float64"], "--engine transformers runs in float32, bfloat16 or float16"),
])
def test_engine_misuse_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, tiny_path, argv, says):
    out = tmp_path / "c.zarr"
    code = main(["-q", "trace", str(tiny_path), "--tokens", "1,2,3", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("engine, module, extra", [("transformers", "transformers", "transformers"),
                                                   ("llama.cpp", "llama_cpp", "llama")])
def test_engine_without_its_package_says_how_to_install(capsys, tmp_path, tiny_path, engine, module, extra):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    code = main(["-q", "trace", str(tiny_path), "--tokens", "1,2,3", "--engine", engine,
                 "--out", str(tmp_path / "c.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install 'moesnap[{extra}]'" in err, err
