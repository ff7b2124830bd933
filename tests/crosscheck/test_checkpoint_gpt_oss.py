"""gpt-oss HF checkpoints as the golden source: what transformers' ``save_pretrained`` writes (fused,
interleaved, transposed float experts; float32 single-file and sharded, bfloat16) and the MXFP4 layout
openai releases (``*_blocks``/``*_scales``, which transformers reads), each read by moesnap as the GGUF
of the same weights is: the goldens equal bit for bit, the MXFP4 experts stay MXFP4 byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install 'moesnap[transformers]')")

import torch  # noqa: E402

from moesnap.cli.main import main  # noqa: E402
from moesnap.model.load import open_model  # noqa: E402
from moesnap.store.case import load_case  # noqa: E402

from .foreign_run import cli  # noqa: E402

pytestmark = pytest.mark.crosscheck
TOKENS = "1,7,19,33,47,61,88,120,200,250"
EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def ggml_to_hf(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF MXFP4 rows ``[..., G*17]`` -> HF ``blocks [..., G, 16]`` (byte k: values 2k | 2k+1 << 4)
    and ``scales [..., G]``, written here independently of moesnap's reader."""
    r = rows.reshape(*rows.shape[:-1], -1, 17)
    scales, qs = r[..., 0], r[..., 1:]
    v = np.concatenate([qs & 15, qs >> 4], axis=-1)          # [..., G, 32] in value order
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8), scales.copy()


def mxfp4_checkpoint(gguf_path: Path, float_ckpt: Path, out: Path) -> Path:
    """``float_ckpt`` (save_pretrained's) with its experts replaced by the GGUF's MXFP4 bytes in HF's layout."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file, save_file

    shutil.copytree(float_ckpt, out)
    t = {x.name: x for x in GGUFReader(str(gguf_path)).tensors}
    sd = load_file(str(out / "model.safetensors"))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    for i in range(layers):
        p = f"model.layers.{i}.mlp.experts."
        del sd[p + "gate_up_proj"], sd[p + "down_proj"]
        (gb, gs), (ub, us), (db, ds) = (ggml_to_hf(np.asarray(t[f"blk.{i}.{k}.weight"].data)) for k in EXPERT_KINDS)
        sd[p + "gate_up_proj_blocks"] = np.stack([gb, ub], axis=2).reshape(gb.shape[0], -1, *gb.shape[2:])
        sd[p + "gate_up_proj_scales"] = np.stack([gs, us], axis=2).reshape(gs.shape[0], -1, gs.shape[2])
        sd[p + "down_proj_blocks"], sd[p + "down_proj_scales"] = db, ds
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny gpt-oss GGUF, a folder of its checkpoints: float32 ``single``/``sharded``, ``bf16``, ``mxfp4``)."""
    from moesnap.model.synth import make_model, preset

    from .hf_gpt_oss import load_hf_from_gguf

    root = tmp_path_factory.mktemp("gptoss-ckpt")
    gguf_path = make_model(root / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny"))
    hf = load_hf_from_gguf(gguf_path)
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="100KB")
    hf.to(torch.bfloat16).save_pretrained(root / "bf16")
    mxfp4_checkpoint(Path(gguf_path), root / "single", root / "mxfp4")
    return Path(gguf_path), root


def _trace(src: Path, out: Path, *extra: str):
    rc, text = cli("-q", "trace", str(src), "--tokens", TOKENS, "--out", str(out), *extra)
    assert rc == 0, text
    return load_case(out)


@pytest.mark.parametrize("layout", ["single", "sharded", "mxfp4"])
def test_checkpoint_golden_equals_the_gguf_golden_bit_for_bit(ckpts, tmp_path, layout):
    gguf_path, root = ckpts
    ck = root / layout
    assert (ck / "model.safetensors.index.json").exists() == (layout == "sharded")
    model, gguf_model = open_model(ck), open_model(gguf_path)
    assert model.config == gguf_model.config and model.config.arch == "gpt-oss"
    want = "MXFP4" if layout == "mxfp4" else "F32"
    assert {model.qtypes()[f"blk.1.{k}"] for k in EXPERT_KINDS} == {want}
    if layout == "mxfp4":     # the experts' bytes are the GGUF's: the nibbles re-ordered back exactly
        for k in EXPERT_KINDS:
            assert np.array_equal(model.raw(f"blk.3.{k}")[1], np.asarray(gguf_model.raw(f"blk.3.{k}")[1])), k
    a, b = _trace(ck, tmp_path / "ck.zarr"), _trace(gguf_path, tmp_path / "gguf.zarr")
    for s in b.layers:
        assert np.array_equal(a.layers[s], b.layers[s]), s
    assert np.array_equal(a.model["logits"], b.model["logits"])
    assert a.attrs["model"]["format"] == "hf-checkpoint" and set(a.attrs["model"]["files"]) >= {"config.json"}


def test_transformers_reads_the_mxfp4_layout_as_the_float_checkpoint_it_wrote(ckpts):
    from safetensors.numpy import load_file
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, root = ckpts
    mx, ref = load_file(str(root / "mxfp4" / "model.safetensors")), load_file(str(root / "single" / "model.safetensors"))
    for k in ("gate_up_proj", "down_proj"):
        p = "model.layers.2.mlp.experts."
        got = convert_moe_packed_tensors(torch.from_numpy(mx[p + k + "_blocks"]), torch.from_numpy(mx[p + k + "_scales"]),
                                         dtype=torch.float32)
        assert torch.equal(got, torch.from_numpy(ref[p + k])), k
    m = GptOssForCausalLM.from_pretrained(root / "mxfp4", dtype=torch.float32,
                                          quantization_config=Mxfp4Config(dequantize=True))
    r = GptOssForCausalLM.from_pretrained(root / "single", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 30, 7, 100]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, r(ids).logits)


def test_transformers_engine_from_a_bfloat16_checkpoint_is_judged_against_its_golden(ckpts, tmp_path):
    _, root = ckpts
    ck, store = root / "bf16", tmp_path / "store"
    assert {open_model(ck).qtypes()[f"blk.0.{k}"] for k in EXPERT_KINDS} == {"BF16"}
    rc, text = cli("-q", "goldens", "generate", str(ck), "--suite", "ck", "--store", str(store), "--tokens", TOKENS)
    assert rc == 0, text
    _trace(ck, tmp_path / "hf.zarr", "--engine", "transformers", "--dtype", "bfloat16")
    rc, text = cli("-q", "compare", "ck", str(tmp_path / "hf.zarr"), "--store", str(store), "--allow-missing")
    assert rc == 0 and "verdict: pass" in text, text[-2000:]


def _broken(ckpts, tmp_path: Path, edit) -> Path:
    ck = tmp_path / "broken"
    shutil.copytree(ckpts[1] / "mxfp4", ck)
    edit(ck)
    return ck


def _edit_config(**changes):
    def edit(ck: Path) -> None:
        cfg = json.loads((ck / "config.json").read_text())
        cfg.update(changes)
        (ck / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn):
    def edit(ck: Path) -> None:
        from safetensors.numpy import load_file, save_file

        sd = load_file(str(ck / "model.safetensors"))
        fn(sd)
        save_file(sd, str(ck / "model.safetensors"))
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_edit_config(layer_types=["full_attention"] * 4), "'layer_types' must alternate sliding"),
    (_edit_config(sliding_window=0), "'sliding_window' = 0 must be a positive integer"),
    (_edit_config(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (_edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope_type 'llama3' is not supported"),
    (_edit_tensors(lambda sd: sd.pop("model.layers.1.mlp.experts.down_proj_scales")),
     "no tensor for 'blk.1.ffn_down_exps'"),
    (_edit_tensors(lambda sd: sd.update({"model.layers.0.mlp.experts.gate_up_proj_blocks":
                                         sd["model.layers.0.mlp.experts.gate_up_proj_blocks"][:, :, :1].copy(),
                                         "model.layers.0.mlp.experts.gate_up_proj_scales":
                                         sd["model.layers.0.mlp.experts.gate_up_proj_scales"][:, :, :1].copy()})),
     "do not hold a [8, 64, 64] tensor"),
])
def test_a_bad_gpt_oss_checkpoint_is_refused_in_one_line_naming_the_file(ckpts, tmp_path, capsys, edit, needle):
    ck = _broken(ckpts, tmp_path, edit)
    assert main(["-q", "trace", str(ck), "--tokens", "1,2,3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(ck) in err[0], err
