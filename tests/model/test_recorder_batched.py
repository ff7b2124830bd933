"""A batched recorder (``ArrayRecorder(batched=True)``: the serving forwards' recorder) holds what it is
given where it lives and copies it to the host in one go; it must store exactly what the one-by-one
recorder stores, in the same places, and what was saved must not change with later writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesnap.model import recorder as recorder_module
from moesnap.model.candidate import CandidateModel
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.synth import tiny_path
from moesnap.model.weights import GGUFModel

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model() -> GGUFModel:
    return GGUFModel.open(tiny_path())


def _all(rec: ArrayRecorder) -> dict[str, np.ndarray]:
    return {**rec.model, **rec.stacked()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batched_recorder_stores_the_same_bits_as_one_by_one(model, device, dtype):
    cand = CandidateModel(model, device=device, dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 9)
    one, batched = ArrayRecorder(), ArrayRecorder(batched=True)
    cand.forward(tokens, one)
    cand.forward(tokens, batched)
    a, b = _all(one), _all(batched)
    assert a.keys() == b.keys() and len(a) > 10
    for stage in a:
        assert a[stage].dtype == b[stage].dtype, stage
        np.testing.assert_array_equal(a[stage], b[stage], err_msg=stage)


@pytest.mark.parametrize("device", DEVICES)
def test_later_writes_do_not_reach_what_was_saved(device):
    rec = ArrayRecorder(batched=True)
    x = torch.arange(6, dtype=torch.float32, device=device).reshape(2, 3)
    ids = torch.tensor([[3, 1]], dtype=torch.int32, device=device)
    rec.save("attn_out", 0, x)
    rec.save("topk_ids", 0, ids)
    x.mul_(-1)
    ids.fill_(7)
    np.testing.assert_array_equal(rec.layers["attn_out"][0], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(rec.layers["topk_ids"][0], np.array([[3, 1]], dtype=np.int32))
    assert rec.layers["topk_ids"][0].dtype == np.int32


def test_a_later_save_replaces_an_earlier_one_in_save_order():
    rec = ArrayRecorder(batched=True)
    rec.save("moe_out", 1, torch.zeros(1, 2))
    rec.save("moe_out", 1, [[5.0, 6.0]])           # a host value after a held tensor: the later one stays
    rec.save("tokens", None, torch.tensor([4]))
    rec.save("tokens", None, torch.tensor([8]))
    np.testing.assert_array_equal(rec.layers["moe_out"][1], np.array([[5.0, 6.0]], dtype=np.float32))
    np.testing.assert_array_equal(rec.model["tokens"], np.array([8], dtype=np.int32))


def test_a_batched_recorder_goes_to_the_host_when_enough_values_wait(monkeypatch):
    monkeypatch.setattr(recorder_module, "BATCH_VALUES", 10)
    rec = ArrayRecorder(batched=True)
    rec.save("attn_out", 0, torch.ones(2, 3))
    assert rec._held, "6 values wait"
    rec.save("attn_out", 1, torch.ones(2, 3))
    assert not rec._held, "12 values: copied"
    assert sorted(rec.layers["attn_out"]) == [0, 1]
