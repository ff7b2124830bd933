"""Mixtral (a ``llama`` GGUF with experts), the model side: its config from GGUF metadata (no
key_length, the experts' width from feed_forward_length), its tensor table, the presets, RoPE on pairs
of the converter's permuted q/k rows, and goldens judged by the one judge.  All on the CPU, in seconds;
the comparison with transformers is tests/crosscheck/test_llama_like.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType as QT, GGUFReader, GGUFValueType

from moesnap.errors import ModelFileError
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset
from moesnap.model.tensors import table
from moesnap.model.weights import GGUFModel

from family_files import TOKENS, judge_goldens, rewrite


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("mx") / "mx.gguf", preset("mixtral-tiny"))


def test_the_file_reads_back_as_its_spec_and_carries_the_converters_keys(tiny):
    cfg, want = GGUFModel.open(tiny).config, preset("mixtral-tiny").config
    assert dataclasses.replace(cfg, rms_eps=want.rms_eps) == want and cfg.rms_eps == pytest.approx(want.rms_eps)
    keys = GGUFReader(str(tiny)).fields
    assert "llama.attention.key_length" not in keys and "llama.expert_feed_forward_length" not in keys
    assert keys["llama.feed_forward_length"].contents() == want.expert_ff == 128
    assert keys["llama.rope.dimension_count"].contents() == want.head_dim


def test_the_tensor_table_is_gguf_pys():
    names = {TENSOR_NAMES[k.tensor] for k in table("llama").kinds}
    unused = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]} - names
    assert unused == {"rope_freqs", "blk.{bid}.attn_rot_embd", "blk.{bid}.ffn_gate", "blk.{bid}.ffn_up", "blk.{bid}.ffn_down"}


def test_the_8x7b_preset_has_the_real_layer_shape_and_a_q4_k_m_mix():
    spec = preset("mixtral-8x7b")
    c = spec.config
    assert (c.n_layer, c.hidden, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.expert_ff,
            c.vocab_size) == (32, 4096, 32, 8, 128, 8, 2, 14336, 32000)
    assert spec.qtype("attn_k") == spec.qtype("attn_v") == QT.Q8_0      # llama.cpp: 8 experts, k and v in Q8_0
    assert (spec.qtype("ffn_down_exps", 0), spec.qtype("ffn_down_exps", 1), spec.qtype("ffn_up_exps", 0)) == \
        (QT.Q6_K, QT.Q4_K, QT.Q4_K)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_pairs_of_the_permuted_rows_are_halves_of_the_checkpoints(tiny):
    """The NeoX/normal RoPE question: RoPE on adjacent pairs of the file's (permuted) q/k rows computes
    what NeoX RoPE on halves computes with the rows un-permuted (transformers' layout): the same
    attention and logits, q_rope equal up to the permutation of each head's dimensions."""
    model = GGUFModel.open(tiny)
    cfg = model.config
    rec = ArrayRecorder()
    ours = run_reference(model, TOKENS, recorder=rec)
    real = model.layer
    model.layer = lambda i, dtype=None: dataclasses.replace(  # type: ignore[method-assign]
        w := real(i, dtype), wq=_unpermute(w.wq, cfg.n_head), wk=_unpermute(w.wk, cfg.n_head_kv))
    model.config = dataclasses.replace(cfg, rope_interleaved=False)
    neox = ArrayRecorder()
    theirs = run_reference(model, TOKENS, recorder=neox)
    assert torch.allclose(ours, theirs, atol=1e-5)
    D = cfg.head_dim
    perm = np.arange(D).reshape(2, D // 2).T.reshape(-1)            # file row 2i + j is checkpoint row j*D/2 + i
    for i in range(cfg.n_layer):
        assert np.allclose(rec.layers["attn"][i], neox.layers["attn"][i], atol=1e-6)
        assert np.allclose(rec.layers["q_rope"][i], np.asarray(neox.layers["q_rope"][i])[..., perm], atol=1e-6)
    # and the other RoPE on the file's rows is wrong: the question has one answer
    model.layer = real  # type: ignore[method-assign]
    assert not torch.allclose(ours, run_reference(model, TOKENS), atol=1e-3)


def test_mixtral_renormalises_its_top_2(tiny):
    rec = ArrayRecorder()
    run_reference(GGUFModel.open(tiny), TOKENS, recorder=rec)
    for w in rec.layers["topk_weights"].values():
        assert np.allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("drop, override, skip, message", [
    (("llama.expert_count",), {}, (), "a 'llama' file without 'llama.expert_count' is a dense model"),
    ((), {"llama.rope.dimension_count": (8, GGUFValueType.UINT32)}, (), "partial RoPE is not supported"),
    ((), {"llama.rope.scaling.type": ("linear", GGUFValueType.STRING)}, (), "RoPE scaling is not supported for Mixtral"),
    ((), {}, ("blk.0.ffn_gate_exps.weight",), "tensor 'blk.0.ffn_gate_exps'"),
])
def test_a_bad_mixtral_file_is_one_line(tiny, tmp_path, drop, override, skip, message):
    out = rewrite(tiny, tmp_path / "bad.gguf", drop=drop, override=override, skip_tensors=skip)
    with pytest.raises(ModelFileError, match=message) as e:
        GGUFModel.open(out)
    assert str(e.value).startswith(str(out)) and "\n" not in str(e.value)


def test_goldens_judge_a_mixtral_model_and_its_candidate(tiny, tmp_path, capsys):
    config = judge_goldens(tiny, "llama", tmp_path, capsys)
    assert config["rope_interleaved"] is True and config["gating"] == "softmax_topk_renorm"
