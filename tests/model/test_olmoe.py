"""OLMoE, the model side: its config from GGUF metadata, its tensor table (q/k norms over the whole
projection), the presets, top-k weights as the softmax gives them, and goldens judged by the one judge.
All on the CPU, in seconds; the comparison with transformers is tests/crosscheck/test_llama_like.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType as QT

from moesnap.errors import ModelFileError
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset
from moesnap.model.tensors import table
from moesnap.model.weights import GGUFModel

from family_files import TOKENS, judge_goldens, rewrite


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ol") / "ol.gguf", preset("olmoe-tiny"))


def test_the_file_reads_back_as_its_spec(tiny):
    cfg, want = GGUFModel.open(tiny).config, preset("olmoe-tiny").config
    assert dataclasses.replace(cfg, rms_eps=want.rms_eps) == want and cfg.rms_eps == pytest.approx(want.rms_eps)


def test_the_tensor_table_is_gguf_pys_with_whole_projection_norms(tiny):
    tab = table("olmoe")
    assert {TENSOR_NAMES[k.tensor] for k in tab.kinds} == {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.OLMOE]}
    cfg = GGUFModel.open(tiny).config
    shapes = tab.expected_shapes(cfg.dims, 1)
    assert shapes["blk.0.attn_q_norm"] == (cfg.n_head * cfg.head_dim,) and shapes["blk.0.attn_k_norm"] == (cfg.kv_dim,)


def test_the_1b_7b_preset_has_the_real_shape():
    spec = preset("olmoe-1b-7b")
    c = spec.config
    assert (c.n_layer, c.hidden, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.expert_ff,
            c.vocab_size) == (16, 2048, 16, 16, 128, 64, 8, 1024, 50304)
    assert (spec.qtype("ffn_down_exps", 0), spec.qtype("ffn_down_exps", 1), spec.qtype("attn_v")) == (QT.Q6_K, QT.Q4_K, QT.Q6_K)


def test_q_and_k_are_normalised_over_the_whole_projection_and_top_k_is_not_renormalised(tiny):
    model = GGUFModel.open(tiny)
    rec = ArrayRecorder()
    run_reference(model, TOKENS, recorder=rec)
    cfg, T = model.config, len(TOKENS)
    for i in range(cfg.n_layer):
        w = model.layer(i)
        q = torch.as_tensor(rec.layers["q"][i]).reshape(T, -1)                          # [T, Hq*D]
        want = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * w.q_norm
        qn = torch.as_tensor(rec.layers["q_norm"][i])
        assert qn.shape == (T, cfg.n_head, cfg.head_dim) and torch.allclose(qn.reshape(T, -1), want, atol=1e-5)
        per_head = q.view(T, cfg.n_head, -1).pow(2).mean(-1)                              # differs between heads
        assert float((per_head.max(-1).values / per_head.min(-1).values).min()) > 1.01
        tw = np.asarray(rec.layers["topk_weights"][i])
        assert tw.sum(-1).min() < 0.99 and (tw.sum(-1) <= 1 + 1e-6).all()                # 16 experts, top-4


def test_a_norm_of_one_head_is_refused_in_one_line(tiny, tmp_path):
    """A file whose q/k norms weigh one head (Qwen3-MoE's shapes) under the olmoe name: the shape is named."""
    D = preset("olmoe-tiny").config.head_dim

    def one_head(name, data):
        return data[:D].copy() if name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")) else data
    out = rewrite(tiny, tmp_path / "per_head.gguf", edit=one_head)
    with pytest.raises(ModelFileError, match=rf"tensor 'blk.0.attn_q_norm' has shape \[{D}\], expected \[64\]") as e:
        GGUFModel.open(out)
    assert str(e.value).startswith(str(out)) and "\n" not in str(e.value)


def test_goldens_judge_an_olmoe_model_and_its_candidate(tiny, tmp_path, capsys):
    config = judge_goldens(tiny, "olmoe", tmp_path, capsys)
    assert config["qk_norm_whole"] is True and config["gating"] == "softmax_topk"
