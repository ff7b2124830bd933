"""gpt-oss, the model side: its config from GGUF metadata, its tensor table, the synthetic writer's
presets, the pieces of the reference forward it differs by (model/families.py), and goldens that
record the family and refuse a model of another.  All on the CPU, in seconds; the comparison with
transformers is tests/crosscheck/test_gpt_oss.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from moesnap.cli.main import main
from moesnap.errors import ModelFileError
from moesnap.gguf.reader import open_gguf
from moesnap.model.config import FAMILIES, ModelConfig
from moesnap.model.families import attention_mask, expert_act, rope_attention_factor, rope_inv_freq, route, \
    softmax_with_sinks
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset, random_blocks, tiny_path
from moesnap.model.tensors import table
from moesnap.model.weights import GGUFModel
from moesnap.stages import FAMILY_STAGES

from ggufgen import write_gguf

TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7, 8, 30]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gptoss") / "gpt-oss-tiny.gguf", preset("gpt-oss-tiny"))


@pytest.fixture(scope="module")
def ref(tiny):
    rec = ArrayRecorder()
    run_reference(tiny, TOKENS, recorder=rec)
    return rec.stacked()


def test_the_file_reads_back_as_its_spec(tiny):
    spec = preset("gpt-oss-tiny")
    model = GGUFModel.open(tiny)
    assert model.config == dataclasses.replace(spec.config, rms_eps=float(np.float32(spec.config.rms_eps)))
    assert (model.config.arch, model.config.qk_norm, model.config.gating) == ("gpt-oss", False, "topk_softmax")
    types = model.qtypes()
    assert {types[f"blk.1.{n}"] for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")} == {"MXFP4"}
    assert {types[f"blk.1.{n}"] for n in ("attn_q", "attn_output")} | {types["output"]} == {"Q8_0"}
    biases = [n for n in types if n.endswith(".bias")]
    assert len(biases) == 4 * 8 and {types[n] for n in biases} == {"F32"} and types["blk.3.attn_sinks"] == "F32"
    names = {t.name for t in open_gguf(tiny).tensors.values()}
    assert "blk.0.attn_q.bias" in names and "blk.0.attn_sinks.weight" in names and "blk.0.attn_q_norm.weight" not in names


def test_the_tensor_table_is_gguf_pys():
    tab = table("gpt-oss")
    assert "attn_q_norm" not in tab.by_name and "post_attention_norm" in tab.by_name
    assert tab.expert_biases == ("ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias")
    assert table("qwen3moe").expert_biases == ()


def test_the_20b_preset_has_the_real_shape():
    c = preset("gpt-oss-20b").config
    assert (c.n_layer, c.hidden, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.expert_ff,
            c.vocab_size, c.sliding_window, c.rope_factor, c.rope_orig_context, c.swiglu_limit) == (
        24, 2880, 64, 8, 64, 32, 4, 2880, 201088, 128, 32.0, 4096, 7.0)
    assert [c.slides(i) for i in range(4)] == [True, False, True, False]
    assert preset("gpt-oss-20b").qtype("ffn_down_exps", 3) == QT.MXFP4


@pytest.mark.parametrize("scale", [0.02, 1 / math.sqrt(2880), 3.0])
def test_random_mxfp4_blocks_dequantize_to_the_requested_std(scale):
    data = random_blocks(QT.MXFP4, 256, 512, np.random.default_rng(0), scale=scale)
    x = quants.dequantize(data, QT.MXFP4)
    assert x.shape == (256, 512) and np.isfinite(x).all()
    assert np.std(x) == pytest.approx(scale, rel=0.05) and abs(np.mean(x)) < 0.05 * scale


def test_no_qk_norm_stages_and_the_rest_recorded(ref):
    assert set(ref) == set(FAMILY_STAGES["gpt-oss"])


def test_the_sliding_layers_do_not_see_past_the_window(tiny, ref):
    """Another first token changes nothing a sliding layer computes at positions >= the window, and
    changes the full layer after it there."""
    W = preset("gpt-oss-tiny").config.sliding_window
    rec = ArrayRecorder()
    run_reference(tiny, [2] + TOKENS[1:], recorder=rec)
    other = rec.stacked()
    assert np.array_equal(other["attn"][0, W:], ref["attn"][0, W:])
    assert not np.allclose(other["attn"][0, :W], ref["attn"][0, :W])
    assert not np.allclose(other["attn"][1, W:], ref["attn"][1, W:])


def test_the_clamp_binds_on_the_tiny_model(tiny, ref):
    """Some expert's gate or up projection reaches the SwiGLU limit (else the clamp goes untested)."""
    model = GGUFModel.open(tiny)
    w = model.layer(0)
    gate, up, _ = w.experts.expert(int(ref["topk_ids"][0, 0, 0]))
    bg, bu, _ = w.experts.bias(int(ref["topk_ids"][0, 0, 0]))
    x = torch.from_numpy(ref["ffn_norm"][0])
    g, u = x @ gate.T + bg, x @ up.T + bu
    assert int((g > 7).sum() + (u.abs() > 7).sum()) > 0


def test_routing_takes_the_top_k_logits_then_a_softmax_over_them():
    cfg = preset("gpt-oss-tiny").config
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -5.0]])
    w, ids = route(cfg, logits, 2)
    assert ids.tolist() == [[1, 3]]
    assert torch.allclose(w, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))
    qw, qids = route(ModelConfig(**{**dataclasses.asdict(cfg), **dict(gating="softmax_topk_renorm")}), logits, 2)
    assert qids.tolist() == [[1, 3]] and torch.allclose(qw, w)   # the two gatings agree on the k kept


def test_sinks_join_the_denominator_and_leave():
    scores = torch.randn(2, 3, 3)
    plain = softmax_with_sinks(scores, None)
    assert torch.equal(plain, torch.softmax(scores, -1))
    assert torch.allclose(softmax_with_sinks(scores, torch.tensor([-1e30, -1e30])), plain)
    sunk = softmax_with_sinks(scores, torch.tensor([0.0, 5.0]))
    mass = 1 - sunk.sum(-1)                                     # each head's sink share, per row
    assert (mass > 0).all() and (mass[1] > mass[0]).all()
    assert torch.allclose(sunk / sunk.sum(-1, keepdim=True), plain)


def test_the_clamped_swiglu():
    cfg = preset("gpt-oss-tiny").config
    gate, up = torch.tensor([-20.0, 1.0, 20.0]), torch.tensor([20.0, -1.0, -20.0])
    out = expert_act(cfg, gate, up)
    g = torch.tensor([-20.0, 1.0, 7.0])
    assert torch.allclose(out, (torch.tensor([7.0, -1.0, -7.0]) + 1) * g * torch.sigmoid(1.702 * g))


def test_yarn_frequencies_and_attention_factor():
    cfg = preset("gpt-oss-tiny").config
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling="none"))
    yarn = rope_inv_freq(cfg)
    assert yarn[0] == plain[0] and yarn[-1] == pytest.approx(plain[-1] / 32)   # fast dims kept, slow ones / 32
    assert rope_attention_factor(cfg) == pytest.approx(0.1 * math.log(32) + 1)
    mask = attention_mask(cfg, 0, 6)
    assert mask[5].tolist() == [False, False, True, True, True, True] and mask.tril().equal(mask)


def test_an_unknown_architecture_names_every_family(tmp_path):
    with pytest.raises(ModelFileError, match="architecture is 'phimoe', moesnap supports 'qwen3moe'") as e:
        ModelConfig.from_gguf(open_gguf(write_gguf(tmp_path / "l.gguf", arch="phimoe")))
    assert "'gpt-oss' (gpt-oss)" in str(e.value) and "'llama' (Mixtral)" in str(e.value)
    assert set(FAMILIES) == {"qwen3moe", "gpt-oss", "deepseek2", "qwen2moe", "llama", "olmoe"}


@pytest.mark.parametrize("keys, message", [
    ({}, "missing metadata key 'gpt-oss.attention.sliding_window'"),
    ({"gpt-oss.attention.sliding_window": (4, "u32")}, "missing metadata key 'gpt-oss.rope.scaling.type'"),
    ({"gpt-oss.attention.sliding_window": (4, "u32"), "gpt-oss.rope.scaling.type": ("linear", "str")},
     "'gpt-oss.rope.scaling.type' = 'linear' must be 'yarn'"),
    ({"gpt-oss.attention.sliding_window": (4, "u32"), "gpt-oss.rope.scaling.type": ("yarn", "str")},
     "missing metadata key 'gpt-oss.rope.scaling.factor'"),
])
def test_a_gpt_oss_file_without_its_keys_is_one_line(tmp_path, keys, message):
    path = write_gguf(tmp_path / "g.gguf", arch="gpt-oss", override_keys=keys)
    with pytest.raises(ModelFileError, match=message) as e:
        ModelConfig.from_gguf(open_gguf(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_goldens_record_the_family_and_refuse_another(tiny, tmp_path, capsys):
    store = tmp_path / "goldens"
    assert main(["goldens", "generate", str(tiny), "--suite", "g", "--store", str(store), "--tokens",
                 ",".join(map(str, TOKENS)), "-q"]) == 0
    import json
    attrs = json.loads((store / "g" / "v0001" / "case0" / "zarr.json").read_text())["attributes"]
    assert attrs["model"]["config"]["arch"] == "gpt-oss"
    capsys.readouterr()
    assert main(["goldens", "show", "g", "--store", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "config:   arch=gpt-oss" in shown and "MXFP4 in every layer: ffn_gate_exps, ffn_up_exps, ffn_down_exps" in shown
    assert "F32 in every layer: attn_norm, attn_q.bias" in shown      # a bias is a layer tensor like the rest
    # the bundled Qwen3-MoE model against the gpt-oss golden
    for model, said in [(tiny_path(), "golden is of a 'gpt-oss' model, tiny.gguf is a 'qwen3moe' one")]:
        assert main(["check", str(model), "--suite", "g", "--store", str(store), "--device", "cpu", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], err


def test_decode_goldens_continue_with_the_references_own_choices(tiny):
    """--decode N: with no candidate for the family, the reference proposes its own greedy steps."""
    from moesnap.run.trace import run_case

    case = run_case(GGUFModel.open(tiny), TOKENS[:6], decode=3)
    cont = case.attrs["continuation"]
    assert len(cont) == 3 and case.tokens.tolist() == TOKENS[:6] + cont
    logits = np.asarray(case.model["logits"])
    assert [int(i) for i in logits[5:8].argmax(-1)] == cont


def test_an_engine_refuses_a_family_it_is_not_driven_for_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    from moesnap.run import trace

    monkeypatch.setitem(trace.ENGINE_FAMILIES, "transformers", ("qwen3moe",))
    assert main(["trace", str(tiny), "--engine", "transformers", "--tokens", "1,2,3", "--out",
                 str(tmp_path / "hf"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine transformers runs 'qwen3moe' models only, not 'gpt-oss'" in err[0], err
