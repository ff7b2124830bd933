"""DeepSeek-V2/V3, the model side: its config from GGUF metadata, its tensor table, the presets, the
routing (model/families.py: route_grouped), kv_b whole or split, and goldens whose dense layers have
no router stages, judged by the same judge.  All on the CPU, in seconds; the comparison with
transformers is tests/crosscheck/test_deepseek.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

from moesnap.cli.main import main
from moesnap.errors import ModelFileError
from moesnap.gguf.reader import open_gguf
from moesnap.model.config import ModelConfig
from moesnap.model.families import route_grouped
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset
from moesnap.model.tensors import table
from moesnap.model.weights import GGUFModel
from moesnap.stages import ROUTING_SCORES, stages_of_layer

TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7]


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ds") / "v2.gguf", preset("deepseek-v2-tiny"))


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ds") / "v3.gguf", preset("deepseek-v3-tiny"))


@pytest.mark.parametrize("name", ["deepseek-v2-tiny", "deepseek-v3-tiny"])
def test_the_file_reads_back_as_its_spec(name, tmp_path):
    spec = preset(name)
    cfg = GGUFModel.open(make_model(tmp_path / "m.gguf", spec)).config
    want = spec.config
    # float32 in the file: the eps and the log multiplier come back rounded
    assert dataclasses.replace(cfg, rms_eps=want.rms_eps, yarn_log_mul=want.yarn_log_mul) == want
    assert cfg.yarn_log_mul == pytest.approx(want.yarn_log_mul) and cfg.rms_eps == pytest.approx(want.rms_eps)


def test_the_tensor_table_is_gguf_pys():
    tab = table("deepseek2")
    names = {TENSOR_NAMES[k.tensor] for k in tab.kinds}
    unused = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]} - names
    assert unused == {"rope_freqs", "blk.{bid}.attn_k", "blk.{bid}.attn_v", "blk.{bid}.attn_rot_embd"}
    cfg = preset("deepseek-v3-tiny").config
    assert "ffn_gate" in tab.in_layer(0, cfg.layer_where(0)) and "ffn_gate_inp" not in tab.in_layer(0, cfg.layer_where(0))
    moe = tab.in_layer(1, cfg.layer_where(1))
    assert {"ffn_gate_inp", "exp_probs_b.bias", "ffn_gate_shexp", "attn_q_a", "attn_k_b"} <= set(moe)
    assert not {"attn_q", "attn_kv_b", "ffn_gate"} & set(moe)


def test_the_v2_lite_preset_has_the_real_shape():
    c = preset("deepseek-v2-lite").config
    assert (c.hidden, c.n_layer, c.n_dense_layers, c.n_expert, c.n_expert_used, c.n_shared_experts, c.expert_ff,
            c.kv_lora_rank, c.q_lora_rank, c.n_head, c.qk_nope_dim, c.rope_dim, c.v_dim, c.vocab_size) == \
        (2048, 27, 1, 64, 6, 2, 1408, 512, 0, 16, 128, 64, 128, 102400)
    assert c.gating == "softmax_grouped" and not c.topk_norm and c.rope_factor == 40


def test_dense_layers_have_no_router_stages(v2):
    rec = ArrayRecorder()
    run_reference(GGUFModel.open(v2), TOKENS, recorder=rec)
    assert sorted(rec.layers["router_logits"]) == [1, 2] and sorted(rec.layers["dense_ffn_out"]) == [0]
    assert "q_latent" not in rec.layers                                    # V2-Lite's shape: no q LoRA
    stacked = rec.stacked()
    assert stacked["router_logits"].shape[0] == 3 and np.isnan(stacked["router_logits"][0]).all()
    assert (stacked["topk_ids"][0] == -1).all()
    cfg = dataclasses.asdict(GGUFModel.open(v2).config)
    assert "router_logits" not in stages_of_layer("deepseek2", cfg, 0) and "dense_ffn_out" in stages_of_layer("deepseek2", cfg, 0)
    assert "shared_expert_out" in stages_of_layer("deepseek2", cfg, 1) and "q_latent" not in stages_of_layer("deepseek2", cfg, 1)


def test_the_correction_bias_selects_but_does_not_weigh():
    cfg = dataclasses.replace(preset("deepseek-v3-tiny").config, n_group=1, n_group_used=1, topk_norm=False,
                              routed_scale=1.0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    bias = torch.zeros(8)
    bias[7] = 10.0                                      # expert 7 is selected by the bias alone
    w, ids, select = route_grouped(cfg, logits, 2, bias)
    assert ids.tolist() == [[7, 0]]
    assert w[0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([-5.0, 2.0])).tolist())   # unbiased weights
    assert select[0, 7] == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item() + 10)


def test_groups_limit_the_selection_and_the_tie_scores_say_by_how_much():
    cfg = dataclasses.replace(preset("deepseek-v2-tiny").config, n_group=2, n_group_used=1, topk_norm=True,
                              routed_scale=2.0)
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0, 2.9, 2.8, 0.0, 0.0]])   # group 0: {0..3}, group 1: {4..7}
    w, ids, select = route_grouped(cfg, logits, 2, None)
    assert sorted(ids[0].tolist()) == [0, 1] or sorted(ids[0].tolist()) == [0, 2] or sorted(ids[0].tolist()) == [0, 3]
    assert float(w.sum()) == pytest.approx(2.0)                            # renormalised, times the scale
    p = torch.softmax(logits, -1)[0]
    shortfall = float(p[0] - p[4])                                          # group 1's best vs group 0's
    assert float(select[0, 4]) == pytest.approx(float(p[4]) - shortfall)
    assert ROUTING_SCORES["deepseek2"] == "router_select"


def test_kv_b_whole_or_split_gives_the_same_forward(tmp_path):
    spec = preset("deepseek-v3-tiny")
    split = make_model(tmp_path / "split.gguf", spec)
    whole = make_model(tmp_path / "whole.gguf", spec.with_(kv_b_split=False))
    a, b = GGUFModel.open(split), GGUFModel.open(whole)
    assert b.config.kv_b_split is False and "blk.1.attn_kv_b" in b.qtypes() and "blk.1.attn_k_b" in a.qtypes()
    # the two files draw their kv_b from different seeds (other names): compare the mapping, not the forward
    kb, vb = a.dense("blk.1.attn_k_b"), a.dense("blk.1.attn_v_b")
    assert torch.equal(a.layer(1).wkv_b.view(4, 64, 64)[:, :32], kb.transpose(1, 2))
    assert torch.equal(a.layer(1).wkv_b.view(4, 64, 64)[:, 32:], vb)
    run_reference(b, TOKENS[:4])


@pytest.mark.parametrize("drop, message", [
    ("deepseek2.attention.kv_lora_rank", "missing metadata key 'deepseek2.attention.kv_lora_rank'"),
    ("deepseek2.attention.key_length_mla", "missing metadata key 'deepseek2.attention.key_length_mla'"),
])
def test_a_deepseek_file_without_its_keys_is_one_line(v2, tmp_path, drop, message):
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(str(v2))
    out = tmp_path / "cut.gguf"
    w = GGUFWriter(str(out), "deepseek2")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in (drop, "general.architecture"):
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match=message) as e:
        ModelConfig.from_gguf(open_gguf(out))
    assert str(e.value).startswith(str(out)) and "\n" not in str(e.value)


def test_goldens_judge_a_deepseek_model_and_its_candidate(v3, tmp_path, capsys):
    store = tmp_path / "goldens"
    assert main(["goldens", "generate", str(v3), "--suite", "d", "--store", str(store), "--tokens",
                 ",".join(map(str, TOKENS)), "-q"]) == 0
    attrs = json.loads((store / "d" / "v0001" / "case0" / "zarr.json").read_text())["attributes"]
    assert attrs["model"]["config"]["arch"] == "deepseek2" and attrs["model"]["config"]["n_dense_layers"] == 1
    capsys.readouterr()
    # the golden judged against itself: every cell judged, none of the dense layer's absent router cells
    case = str(store / "d" / "v0001" / "case0")
    assert main(["compare", case, case, "--no-local"]) == 0
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.lstrip().startswith("an "))
    assert "verdict: pass" in out and head.split()[:6] == ["an", "ql", "qa", "kl", "ka", "q"] and "rs" in head, out
    layer0 = next(line for line in out.splitlines() if line.startswith("L00"))
    assert layer0.split("|")[0].count(".") == len(stages_of_layer("deepseek2", attrs["model"]["config"], 0)), out
    # moesnap's candidate computes the family (tests/model/test_candidate_deepseek.py): every cell judged
    assert main(["check", str(v3), "--suite", "d", "--store", str(store), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    cells = len(TOKENS) * (3 + sum(len(stages_of_layer("deepseek2", attrs["model"]["config"], i)) for i in range(3)))
    assert "verdict: pass" in out and f"judged: {cells} of {cells} " in out, out
