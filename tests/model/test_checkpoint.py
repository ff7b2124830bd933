"""HF checkpoint directories as models (moesnap.model.checkpoint): the same goldens as the GGUF of the
same weights, lazily read, every bad checkpoint refused in one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesnap.cli.main import main
from moesnap.errors import ModelFileError
from moesnap.model.checkpoint import CheckpointModel
from moesnap.model.load import open_model
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel
from moesnap.store.case import load_case

from ckptgen import hf_tensors, write_checkpoint, write_safetensors

TOKENS = "1,5,9,20,30,40,50,60"


@pytest.fixture(scope="module")
def gguf_model(tiny_path):
    return GGUFModel.open(tiny_path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gguf_model):
    return write_checkpoint(tmp_path_factory.mktemp("ck") / "tiny-f32", gguf_model)


def _trace(model, out, *extra) -> dict:
    assert main(["-q", "trace", str(model), "--tokens", TOKENS, "--out", str(out), *extra]) == 0
    return load_case(out)


@pytest.mark.parametrize("dtype, shards", [("F32", 1), ("F32", 3), ("BF16", 2)])
def test_checkpoint_golden_equals_the_gguf_golden_of_the_same_weights(tmp_path, tiny_path, gguf_model, dtype, shards):
    ck = write_checkpoint(tmp_path / "ck", gguf_model, dtype=dtype, shards=shards)
    a, b = _trace(ck, tmp_path / "a.zarr"), _trace(tiny_path, tmp_path / "b.zarr")
    assert set(a.layers) == set(b.layers) and set(a.model) == set(b.model)
    if dtype == "F32":   # the same float32 values: the same forward, bit for bit
        for s in a.layers:
            np.testing.assert_array_equal(a.layers[s], b.layers[s], err_msg=s)
        np.testing.assert_array_equal(a.model["logits"], b.model["logits"])
    else:                # bfloat16 weights: the GGUF's values rounded, so close, not equal
        rel = np.linalg.norm(a.model["logits"] - b.model["logits"]) / np.linalg.norm(b.model["logits"])
        assert 1e-5 < rel < 5e-2, rel
    prov = a.attrs["model"]
    assert prov["format"] == "hf-checkpoint" and set(prov["files"]) >= {"config.json"}
    assert len([f for f in prov["files"] if f.endswith(".safetensors")]) == shards
    assert a.attrs["model"]["quant_types"]["blk.0.attn_q"] == dtype


def test_goldens_generate_check_and_compare_accept_a_checkpoint(tmp_path, ckpt):
    store = tmp_path / "store"
    assert main(["-q", "goldens", "generate", str(ckpt), "--suite", "ck", "--store", str(store),
                 "--tokens", TOKENS]) == 0
    assert main(["-q", "check", str(ckpt), "--suite", "ck", "--store", str(store)]) == 0
    assert main(["-q", "check", str(ckpt), "--suite", "ck", "--store", str(store),
                 "--inject", "scale:layer=2,stage=moe_out,factor=1.05"]) == 1
    cand = tmp_path / "cand.zarr"
    assert main(["-q", "trace", str(ckpt), "--tokens", TOKENS, "--candidate", "--out", str(cand)]) == 0
    # the golden's provenance names the checkpoint directory: compare re-references from it by itself
    assert main(["-q", "compare", "ck", str(cand), "--store", str(store)]) == 0


def test_checkpoint_is_read_lazily_one_layer_at_a_time(ckpt):
    m = CheckpointModel(ckpt)
    assert m._maps == {}                          # headers parsed, no data mapped yet
    w = m.layer(1)
    assert w.wq.shape == (m.config.q_dim, m.config.hidden)
    gate, up, down = w.experts.expert(3)
    assert gate.shape == (m.config.expert_ff, m.config.hidden) and down.shape == (m.config.hidden, m.config.expert_ff)
    m.release_layer(1)


def test_a_gguf_model_file_is_still_opened_as_gguf(tiny_path, ckpt):
    assert isinstance(open_model(tiny_path), GGUFModel)
    assert isinstance(open_model(ckpt), CheckpointModel)


# -- bad checkpoints: one line naming the file, exit 2 ----------------------------------------------

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BAD = {
    "unknown architecture": (lambda d: _edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama"),
                             "config.json: architecture ['LlamaForCausalLM'] is not Qwen3-MoE"),
    "config not json": (lambda d: (d / "config.json").write_text("{nope"), "config.json: not valid JSON"),
    "wrong shape": (lambda d: _edit_config(d, hidden_size=96), "expected"),
    "dense layers": (lambda d: _edit_config(d, mlp_only_layers=[1]), "dense layers"),
    "missing expert": (lambda d: write_safetensors(d / "model.safetensors", {
        k: v for k, v in hf_tensors(GGUFModel.open(tiny_path())).items()
        if k != "model.layers.1.mlp.experts.5.up_proj.weight"}), "experts [5] missing"),
    "truncated shard": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:50000]),
                        "lie outside the file"),
    "truncated header": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                         "does not fit the file"),
    "header not json": (lambda d: (d / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{{{{{{{{"),
                        "safetensors header is not valid JSON"),
    "huge header length": (lambda d: (d / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}"),
                           "does not fit the file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, ckpt, capsys, case):
    d = _copy(ckpt, tmp_path / "ck")
    spoil, says = BAD[case]
    spoil(d)
    out = tmp_path / "out.zarr"
    code = main(["-q", "trace", str(d), "--tokens", TOKENS, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1 and str(d) in err, err
    assert not out.exists()


def test_missing_shard_named(tmp_path, gguf_model, capsys):
    d = write_checkpoint(tmp_path / "ck", gguf_model, shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    code = main(["-q", "trace", str(d), "--tokens", TOKENS, "--out", str(tmp_path / "o.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "model-00002-of-00003.safetensors: missing" in err, err


def test_checkpoint_model_error_is_a_model_file_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ModelFileError, match="num_attention_heads"):
        CheckpointModel(tmp_path / "x")
