"""Synthetic GGUF models: the bundled tiny file, random quant blocks, presets, writing."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import Q4_K, dequantize

from moesnap.model import synth
from moesnap.errors import UsageError
from moesnap.gguf.reader import open_gguf
from moesnap.model.config import Qwen3MoeConfig
from moesnap.model.synth import PRESETS, SynthSpec, make_model, preset, random_blocks, tiny_path

MB = 1 << 20
REGEN = "moesnap model make src/moesnap/data/tiny.gguf --preset tiny --force"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (numpy shape, type)}) of a GGUF file."""
    r = GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values()}
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type) for t in r.tensors}
    return kv, tensors


def weights(names: dict) -> dict:
    """Real files (and llama.cpp) name every weight ``<name>.weight``."""
    return {f"{name}.weight": value for name, value in names.items()}


# ---------------------------------------------------------------- the bundled tiny model


def test_tiny_file_is_small_and_regenerates_identically(tmp_path):
    committed = tiny_path()
    assert committed.is_file(), f"missing {committed}; make it with: {REGEN}"
    assert committed.stat().st_size <= 2 * MB
    fresh = make_model(tmp_path / "tiny.gguf", preset("tiny"))
    assert sha256(fresh) == sha256(committed), f"bundled tiny model is stale; regenerate with: {REGEN}"


def test_tiny_file_metadata():
    kv, _ = read(tiny_path())
    spec = preset("tiny")
    expected = {
        "general.architecture": "qwen3moe",
        "general.name": spec.name,
        "qwen3moe.block_count": spec.n_layer,
        "qwen3moe.context_length": spec.context_length,
        "qwen3moe.embedding_length": spec.hidden,
        "qwen3moe.feed_forward_length": spec.dense_ff,
        "qwen3moe.expert_feed_forward_length": spec.expert_ff,
        "qwen3moe.expert_count": spec.n_expert,
        "qwen3moe.expert_used_count": spec.n_expert_used,
        "qwen3moe.attention.head_count": spec.n_head,
        "qwen3moe.attention.head_count_kv": spec.n_head_kv,
        "qwen3moe.attention.key_length": spec.head_dim,
        "qwen3moe.attention.value_length": spec.head_dim,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    for key, value in expected.items():
        assert kv[key] == value, key
    assert kv["qwen3moe.attention.layer_norm_rms_epsilon"] == pytest.approx(spec.rms_eps)
    assert kv["qwen3moe.rope.freq_base"] == pytest.approx(spec.rope_base)

    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(kv["tokenizer.ggml.scores"]) == spec.vocab_size
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokens[3 + 0x0A] == "<0x0A>" and tokens[258] == "<0xFF>" and tokens[259] == "tok_259"
    assert types[:3] == [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    assert set(types[3:259]) == {6} and set(types[259:]) == {1}  # BYTE, NORMAL


def test_tiny_file_tensors():
    _, tensors = read(tiny_path())
    H, D, E, F, V = 64, 32, 8, 256, 272
    expected = {"token_embd": ((V, H), QT.F32), "output_norm": ((H,), QT.F32), "output": ((V, H), QT.Q8_0)}
    for i in range(4):
        down = QT.Q6_K if i % 2 == 0 else QT.Q4_K  # the real files' mix
        expected |= {
            f"blk.{i}.attn_norm": ((H,), QT.F32),
            f"blk.{i}.attn_q": ((4 * D, H), QT.Q8_0),
            f"blk.{i}.attn_k": ((2 * D, H), QT.Q8_0),
            f"blk.{i}.attn_v": ((2 * D, H), QT.Q8_0),
            f"blk.{i}.attn_q_norm": ((D,), QT.F32),
            f"blk.{i}.attn_k_norm": ((D,), QT.F32),
            f"blk.{i}.attn_output": ((H, 4 * D), QT.Q8_0),
            f"blk.{i}.ffn_norm": ((H,), QT.F32),
            f"blk.{i}.ffn_gate_inp": ((E, H), QT.F32),
            f"blk.{i}.ffn_gate_exps": ((E, F, H), QT.Q8_0),
            f"blk.{i}.ffn_up_exps": ((E, F, H), QT.Q8_0),
            f"blk.{i}.ffn_down_exps": ((E, H, F), down),
        }
    assert tensors == weights(expected)


def test_tiny_weights_have_the_intended_scales():
    r = GGUFReader(tiny_path())
    values = {t.name.removesuffix(".weight"): dequantize(np.asarray(t.data), t.tensor_type) for t in r.tensors}
    assert all(np.isfinite(v).all() for v in values.values())
    assert np.std(values["token_embd"]) == pytest.approx(1.0, rel=0.1)
    assert np.mean(values["blk.0.attn_norm"]) == pytest.approx(1.0, abs=0.05)
    assert np.std(values["blk.1.attn_q"]) == pytest.approx(1 / 8, rel=0.1)  # 1/sqrt(hidden)
    assert np.std(values["blk.1.attn_output"]) == pytest.approx(1 / np.sqrt(128), rel=0.1)
    assert np.std(values["blk.0.ffn_down_exps"]) == pytest.approx(1 / 16, rel=0.1)  # Q6_K, 1/sqrt(F)
    assert np.std(values["blk.1.ffn_down_exps"]) == pytest.approx(1 / 16, rel=0.1)  # Q4_K
    assert np.std(values["blk.2.ffn_gate_inp"]) == pytest.approx(4 / 8, rel=0.15)


def test_tensors_do_not_depend_on_the_layer_count(tmp_path):
    short = make_model(tmp_path / "two.gguf", preset("tiny", layers=2))
    full = {t.name: np.asarray(t.data) for t in GGUFReader(tiny_path()).tensors}
    for t in GGUFReader(short).tensors:
        assert np.array_equal(np.asarray(t.data), full[t.name]), t.name


def test_another_seed_gives_other_weights(tmp_path):
    other = make_model(tmp_path / "s1.gguf", preset("tiny", seed=1))
    assert sha256(other) != sha256(tiny_path())
    assert read(other)[1] == read(tiny_path())[1]  # same shapes and types


# ---------------------------------------------------------------- random blocks


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q4_0, QT.F16, QT.BF16, QT.F32])
@pytest.mark.parametrize("scale", [1.0, 1 / np.sqrt(2048)])
def test_random_blocks_dequantize_to_the_requested_std(qtype, scale):
    block, size = synth.GGML_QUANT_SIZES[qtype]
    data = random_blocks(qtype, 64, 512, np.random.default_rng(0), scale=scale)
    assert data.dtype == np.uint8 and data.shape == (64, 512 // block * size)
    x = dequantize(data, qtype)
    assert x.shape == (64, 512)
    assert np.isfinite(x).all()
    assert np.std(x) == pytest.approx(scale, rel=0.05)
    assert abs(np.mean(x)) < 0.05 * scale


def test_random_blocks_are_deterministic():
    a = random_blocks(QT.Q4_K, 8, 256, np.random.default_rng(7), scale=0.1)
    b = random_blocks(QT.Q4_K, 8, 256, np.random.default_rng(7), scale=0.1)
    c = random_blocks(QT.Q4_K, 8, 256, np.random.default_rng(8), scale=0.1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_k4_scale_packing_round_trips():
    rng = np.random.default_rng(0)
    sc, m = (rng.integers(0, 64, (50, 8), dtype=np.uint8) for _ in range(2))
    sc2, m2 = Q4_K.get_scale_min(synth._pack_k4_scales(sc, m))
    assert np.array_equal(sc2, sc) and np.array_equal(m2, m)


def test_q3k_scale_packing_round_trips():
    u = np.random.default_rng(0).integers(0, 64, (5, 16), dtype=np.uint8)
    blocks = np.zeros((5, 110), dtype=np.uint8)
    blocks[:, 0:32] = 0xFF  # hmask: high bit set, so q = low 2 bits
    blocks[:, 32:96] = 0b01010101  # every 2-bit quant = 1
    blocks[:, 96:108] = synth._pack_q3k_scales(u)
    blocks[:, 108:110] = np.array([1.0], dtype=np.float16).view(np.uint8)
    x = dequantize(blocks, QT.Q3_K).reshape(5, 16, 16)  # x = d * (u - 32) * 1
    assert np.array_equal(x[:, :, 0], u.astype(np.float32) - 32) and (x == x[:, :, :1]).all()


def test_random_blocks_reject_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="row_len=100"):
        random_blocks(QT.Q6_K, 1, 100, rng, scale=1.0)
    with pytest.raises(UsageError, match="IQ2_XXS"):
        random_blocks(QT.IQ2_XXS, 1, 256, rng, scale=1.0)
    with pytest.raises(UsageError, match="scale"):
        random_blocks(QT.Q8_0, 1, 32, rng, scale=0.0)


# ---------------------------------------------------------------- presets and specs


def test_presets():
    assert set(PRESETS) == {"tiny", "qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-tiny", "gpt-oss-20b",
                            "deepseek-v2-tiny", "deepseek-v3-tiny", "deepseek-v2-lite", "qwen2-moe-tiny",
                            "qwen1.5-moe-a2.7b", "mixtral-tiny", "mixtral-8x7b", "olmoe-tiny", "olmoe-1b-7b"}
    assert preset("tiny") == PRESETS["tiny"]
    assert preset("tiny", layers=7).n_layer == 7
    assert preset("qwen3-30b-a3b", seed=3).seed == 3
    assert preset("qwen3-30b-a3b", layers=2).with_(seed=5) == PRESETS["qwen3-30b-a3b"].with_(n_layer=2, seed=5)


def test_unknown_preset_names_it_and_the_choices():
    with pytest.raises(UsageError) as err:
        preset("qwen9")
    assert "'qwen9'" in str(err.value) and "tiny" in str(err.value) and "qwen3-30b-a3b" in str(err.value)


@pytest.mark.parametrize("layers", [0, -1])
def test_preset_rejects_layer_counts_below_one(layers):
    with pytest.raises(UsageError, match=f"layers={layers}"):
        preset("tiny", layers=layers)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"expert_ff": 96}, "blk.0.ffn_down_exps.weight: row length 96 is not a multiple of the Q6_K block size 256"),
        ({"n_head_kv": 3}, "n_head=4 is not a multiple of n_head_kv=3"),
        ({"n_expert_used": 9}, "n_expert_used=9 exceeds n_expert=8"),
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"qtypes": {"output": QT.Q8_0}}, "qtypes missing"),
        ({"down_exps_alternate": QT.IQ2_XXS}, "IQ2_XXS is not supported"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_invalid_specs_are_usage_errors(changes, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        preset("tiny").with_(**changes)


def test_qwen3_30b_a3b_plan():
    spec = preset("qwen3-30b-a3b")
    assert (spec.n_layer, spec.rope_base, spec.context_length) == (48, 1e7, 262144)
    plan = {t.name.removesuffix(".weight"): (t.shape, t.qtype) for t in spec.tensors()}
    assert len(plan) == 3 + 48 * 12
    assert plan["token_embd"] == ((151936, 2048), QT.Q4_K)
    assert plan["output"] == ((151936, 2048), QT.Q6_K)
    assert plan["blk.0.attn_q"] == ((4096, 2048), QT.Q4_K)
    assert plan["blk.0.attn_k"] == ((512, 2048), QT.Q4_K)
    assert plan["blk.0.attn_v"] == ((512, 2048), QT.Q6_K)
    assert plan["blk.0.attn_output"] == ((2048, 4096), QT.Q4_K)
    assert plan["blk.0.ffn_gate_inp"] == ((128, 2048), QT.F32)
    assert plan["blk.0.ffn_gate_exps"] == ((128, 768, 2048), QT.Q4_K)
    downs = [plan[f"blk.{i}.ffn_down_exps"] for i in range(48)]
    assert all(shape == (128, 2048, 768) for shape, _ in downs)
    assert [q for _, q in downs].count(QT.Q6_K) == [q for _, q in downs].count(QT.Q4_K) == 24


# ---------------------------------------------------------------- writing


def test_make_model_refuses_an_existing_file(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"m\.gguf: exists \(use --force to overwrite\)"):
        make_model(out, preset("tiny"))
    assert out.read_bytes() == b"precious"
    assert make_model(out, preset("tiny"), force=True) == out
    assert sha256(out) == sha256(tiny_path())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_make_model_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")

    def boom(t, spec):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "tensor_data", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_model(out, preset("tiny"), force=True)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_make_model_needs_an_existing_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        make_model(tmp_path / "nowhere" / "m.gguf", preset("tiny"))


def test_make_model_progress_goes_to_stderr_and_obeys_quiet(tmp_path, capsys, monkeypatch):
    from moesnap.util import quiet

    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    make_model(tmp_path / "m.gguf", preset("tiny", layers=2), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "layer 1/2" in captured.err and "layer 2/2" in captured.err
    with quiet():       # -q: the one switch, as for every other command
        make_model(tmp_path / "m.gguf", preset("tiny", layers=2), progress=True, force=True)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_one_layer_qwen3_30b_a3b_file(tmp_path):
    # ~8 s to write 0.84 GB, ~8 s for GGUFReader to parse the 151936-token vocabulary
    spec = preset("qwen3-30b-a3b", layers=1)
    r = GGUFReader(make_model(tmp_path / "q.gguf", spec))
    assert r.fields["qwen3moe.block_count"].contents() == 1
    assert r.fields["qwen3moe.expert_count"].contents() == 128
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 151936
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type) for t in r.tensors}
    assert tensors == {t.name: (t.shape, t.qtype) for t in spec.tensors()}
    down = next(t for t in r.tensors if t.name == "blk.0.ffn_down_exps.weight")
    x = dequantize(np.asarray(down.data)[:2], down.tensor_type)  # two experts
    assert np.isfinite(x).all() and np.std(x) == pytest.approx(1 / np.sqrt(768), rel=0.05)


def test_spec_is_built_around_the_config():
    spec = preset("tiny")
    assert isinstance(spec.config, Qwen3MoeConfig)
    assert (spec.n_layer, spec.vocab_size) == (spec.config.n_layer, spec.config.vocab_size)  # read through
    two = spec.with_(n_layer=2, seed=3)
    assert (two.config, two.seed, two.qtypes) == (dataclasses.replace(spec.config, n_layer=2), 3, spec.qtypes)
    with pytest.raises(AttributeError, match="no_such_field"):
        spec.no_such_field  # noqa: B018
    # what moesnap reads back from the file is the spec's config (GGUF keeps rms_eps as a float32)
    stored = dataclasses.replace(spec.config, rms_eps=float(np.float32(spec.config.rms_eps)))
    assert Qwen3MoeConfig.from_gguf(open_gguf(tiny_path())) == stored


def test_spec_is_frozen_and_normalises_qtypes():
    spec = preset("tiny")
    with pytest.raises(AttributeError):
        spec.n_layer = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.config.n_layer = 3  # type: ignore[misc]
    same = spec.with_(qtypes={k: int(v) for k, v in spec.qtypes.items()})
    assert same == spec and all(isinstance(v, QT) for v in same.qtypes.values())
    assert isinstance(spec, SynthSpec)


@pytest.mark.parametrize("name", sorted(synth.PRESETS))
def test_estimated_size_is_the_plan_s_bytes_and_counts_layers_without_looping(name):
    # `model make` refuses a file larger than the disk before writing: its size is counted from two sample
    # layers (families alternate layer kinds; DeepSeek leads with dense layers), never by walking every layer
    spec = synth.preset(name)
    for n in (1, 2, 3, 4, 5, 8):
        s = spec.with_(n_layer=n)
        assert synth.estimated_size(s) == sum(t.nbytes for t in s.tensors()), n
    huge = synth.estimated_size(spec.with_(n_layer=10**12))       # instant: 10^12 layers are not visited
    assert huge > 10**12
