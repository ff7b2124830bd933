"""ggml's activation rounding (moesnap.model.ggml): the values a correct llama.cpp feeds its matmuls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from moesnap.model.ggml import VEC_DOT_TYPE, ActivationQuant, near_halves, near_scale_halves, q8_0, q8_k, round_activation


def _x(rows: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, n)) * 3).astype(np.float32)


def test_q8_0_equals_gguf_py_quantize_then_dequantize():
    x = _x(9, 512)
    x[0, :32] = 0.0                                   # an all-zero block stays zero
    want = quants.dequantize(quants.quantize(x, Q.Q8_0), Q.Q8_0)
    got = q8_0(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)


def test_q8_k_rounds_each_block_of_256_to_127_steps_of_its_largest_magnitude():
    x = _x(4, 768, seed=1)
    x[1, 256:512] = 0.0
    got = q8_k(torch.from_numpy(x)).numpy().reshape(4, 3, 256)
    b = x.reshape(4, 3, 256)
    big = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)       # signed largest magnitude
    d = np.where(big != 0, 1 / (-127 / np.where(big != 0, big, 1)), 0)
    q = got / np.where(d != 0, d, 1)
    assert np.allclose(q, np.round(q), atol=1e-3), "not on the block's grid"
    assert (np.abs(got - b) <= np.abs(d) / 2 * (1 + 1e-5) + 1e-7).all(), "rounded further than half a step"
    np.testing.assert_allclose(np.take_along_axis(got, np.abs(b).argmax(-1)[..., None], -1), big, rtol=1e-6)
    assert (got[1, 1] == 0).all()
    assert not np.array_equal(got, b)


@pytest.mark.parametrize("qtype, fmt", [("Q8_0", "Q8_0"), ("Q4_K", "Q8_K"), ("Q6_K", "Q8_K"), ("Q4_0", "Q8_0"),
                                        ("Q5_1", "Q8_1"), ("F16", "F16"), ("BF16", "BF16"), ("F32", None)])
def test_each_weight_type_meets_its_vec_dot_type(qtype, fmt):
    assert VEC_DOT_TYPE[qtype] == fmt
    x = torch.from_numpy(_x(3, 512, seed=2))
    y = round_activation(x, qtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    if fmt is None:
        assert y is x
    elif fmt == "F16":
        assert torch.equal(y, x.half().float())
    elif fmt == "BF16":
        assert torch.equal(y, x.bfloat16().float())
    else:
        assert not torch.equal(y, x)
        rel = float((y - x).norm() / x.norm())
        assert 1e-4 < rel < 2e-2, rel                       # one 8-bit rounding: ~0.3-0.6 %


def test_rows_that_are_not_whole_blocks_and_unknown_types_are_left_alone():
    x = torch.from_numpy(_x(2, 100))
    assert round_activation(x, "Q8_0") is x
    assert round_activation(torch.from_numpy(_x(2, 512)), "NOT_A_TYPE").equal(torch.from_numpy(_x(2, 512)))


def test_activation_quant_looks_up_the_weight_it_meets():
    aq = ActivationQuant({"blk.0.attn_q": "Q8_0", "blk.0.ffn_gate_inp": "F32", "blk.0.ffn_down_exps": "Q6_K"})
    x = torch.from_numpy(_x(2, 256))
    assert aq(x, "blk.0.ffn_gate_inp") is x
    assert torch.equal(aq(x, "blk.0.attn_q.weight"), q8_0(x))
    assert torch.equal(aq(x, "blk.0.ffn_down_exps"), q8_k(x))
    assert aq(x, "blk.9.attn_q") is x                    # a tensor the table does not know: F32


def test_the_reference_with_ggml_rounding_differs_from_the_plain_reference_by_8_bit_noise():
    from moesnap.model.recorder import ArrayRecorder
    from moesnap.model.reference import run_reference
    from moesnap.model.synth import tiny_path
    from moesnap.model.weights import GGUFModel

    m = GGUFModel.open(tiny_path())
    tokens = [1, 40, 41, 42, 43, 44, 45, 46]
    plain, rounded = ArrayRecorder(), ArrayRecorder()
    run_reference(m, tokens, recorder=plain)
    run_reference(m, tokens, recorder=rounded, aq=ActivationQuant(m.qtypes()))
    a, b = plain.stacked(), rounded.stacked()
    assert np.array_equal(a["attn_norm"][0], b["attn_norm"][0])          # no matmul before it
    q_rel = np.linalg.norm(a["q"][0] - b["q"][0]) / np.linalg.norm(a["q"][0])
    assert 1e-3 < q_rel < 2e-2, q_rel


def _near_half_blocks(rng: np.random.Generator, n_blocks: int, block: int, scale_of) -> np.ndarray:
    """Blocks whose elements' products with ggml's scale lie within a few ulps of ``k + 1/2``."""
    m = (rng.uniform(0.05, 40.0, n_blocks) * rng.choice([-1.0, 1.0], n_blocks)).astype(np.float32)
    k = rng.integers(-126, 126, (n_blocks, block)) + 0.5
    x = (k / scale_of(m).astype(np.float64)[:, None]).astype(np.float32)
    x = x + (rng.integers(-3, 4, x.shape) * np.spacing(x)).astype(np.float32)
    x = np.clip(x, -np.abs(m)[:, None] * 0.999, np.abs(m)[:, None] * 0.999).astype(np.float32)
    x[np.arange(n_blocks), rng.integers(0, block, n_blocks)] = m
    return x


def test_q8_scales_are_one_float32_division_as_in_ggml():
    """ggml divides in C: ``127.f / amax`` (Q8_0) and ``-127.f / max`` (Q8_K), each rounded once.  torch's
    ``127 / t`` is ``t.reciprocal() * 127`` (rounded twice, one ulp off for a quarter of all values), which
    moved the Q8_K quant of llama.cpp's layer-3 expert-6 input at position 13 of the near-tie run from -21
    to -22.  Checked here against numpy's float32 arithmetic on products within ulps of a half."""
    rng = np.random.default_rng(3)
    x = _near_half_blocks(rng, 2000, 32, lambda m: np.float32(127.0) / np.abs(m))
    amax = np.abs(x).max(-1, keepdims=True)
    want = np.round(x * (np.float32(127.0) / amax)) * (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(q8_0(torch.from_numpy(x.reshape(-1, 64))).numpy().reshape(x.shape), want)

    x = _near_half_blocks(rng, 400, 256, lambda m: np.float32(-127.0) / m)
    big = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)
    iscale = np.float32(-127.0) / big
    want = np.minimum(np.round(iscale * x), 127) * (np.float32(1.0) / iscale)
    np.testing.assert_array_equal(q8_k(torch.from_numpy(x.reshape(-1, 512))).numpy().reshape(x.shape), want)

    row = np.zeros(256, dtype=np.float32)                    # the two elements that decided that row
    row[189], row[42] = np.array([0xC0180659, 0xBECDE44F], dtype=np.uint32).view(np.float32)
    d = np.float32(1.0) / (np.float32(-127.0) / row[189])
    assert q8_k(torch.from_numpy(row))[42].item() == np.float32(-21.0) * d


@pytest.mark.parametrize("weight_type, block", [("Q4_K", 256), ("Q6_K", 256), ("Q8_0", 32), ("Q5_1", 32)])
def test_near_halves_are_the_elements_float_noise_can_round_either_way(weight_type, block):
    """Two elements placed 1e-5 and 3e-6 steps past a half are found, nearest first, with the change of
    their rounded value had they rounded the other way; elements a quarter step from a half are not."""
    k8 = VEC_DOT_TYPE[weight_type] == "Q8_K"
    scales = (np.float32(-127.0 / 2.0), np.float32(127.0 / 2.5)) if k8 else (np.float32(127.0 / 2.0), np.float32(127.0 / 2.5))
    steps = np.random.default_rng(4).integers(-100, 100, 2 * block) + 0.25   # a quarter step from any half
    steps[7], steps[block + 9] = 10.5 + 1e-5, -20.5 - 3e-6
    scale = np.repeat(scales, block)
    x = (steps / scale).astype(np.float32)
    x[5], x[block + 3] = 2.0, -2.5                                   # each block's largest magnitude
    near, step = near_halves(torch.from_numpy(x), weight_type)
    assert near.tolist() == [block + 9, 7]
    for i, s in zip(near.tolist(), step.tolist()):
        prod = float(np.float32(x[i]) * scale[i])
        q = round(prod)
        other = int(np.floor(prod)) if q > prod else int(np.ceil(prod))
        assert abs(s - (other - q) / float(scale[i])) < 1e-3 / abs(float(scale[i])), (i, s, prod)
    assert near_halves(torch.from_numpy(x), "F32")[0].numel() == 0
    assert near_halves(torch.from_numpy(x), "F16")[0].numel() == 0
    assert near_halves(torch.from_numpy(x[:block - 1]), weight_type)[0].numel() == 0


def test_near_scale_halves_are_the_q8_0_blocks_whose_float16_scale_float_noise_decides():
    """A block whose ``amax / 127`` lies at a half between two float16 values (scale 1.0 and its next
    float16 up, 1 + 2^-10) is found with the change of each of its rounded elements had the scale rounded
    the other way (its integer quants times the other scale); a block a quarter step away is not, nor
    are Q8_K rows (a float32 scale) or rows that are not whole blocks."""
    up = np.float32(1.0 + 2.0 ** -10)                                # the float16 after 1.0
    x = _x(1, 64, seed=3)[0] / 10
    x[3] = 127.0 * (1.0 + 2.0 ** -11)                                # block 0: amax / 127 halfway to ``up``
    x[40] = 127.0 * (1.0 + 2.0 ** -12)                               # block 1: a quarter step above 1.0
    found = near_scale_halves(torch.from_numpy(x), "Q8_0")
    assert [j for j, _ in found] == [0]
    (_, change), = found
    rounded = q8_0(torch.from_numpy(x)).numpy()[:32]
    d = np.float32(np.float16(x[3] / np.float32(127.0)))
    q = np.round(rounded / d)
    other = np.float32(1.0) if d == up else up
    np.testing.assert_allclose(change.numpy(), q * (other - d), rtol=1e-6)
    assert near_scale_halves(torch.from_numpy(x), "Q4_K") == []       # Q8_K: its scale is float32
    assert near_scale_halves(torch.from_numpy(x[:40]), "Q8_0") == []
    assert near_scale_halves(torch.from_numpy(x), "F32") == []
