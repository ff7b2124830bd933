"""moesnap.gguf.quants_torch: on-device dequantization, bit-exact against gguf-py."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moesnap.gguf import quants_torch as qt
from moesnap.errors import ModelFileError

T = gguf.GGMLQuantizationType
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: byte offsets of the fp16 scale fields (d, dmin / m) inside one block
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.MXFP4: (),  # its scale is an E8M0 exponent byte: E8M0_FIELDS
}
#: byte offsets of the E8M0 exponent fields inside one block
E8M0_FIELDS: dict[T, tuple[int, ...]] = {T.MXFP4: (0,)}
#: E8M0 bytes at the edges: the two subnormal halves (0, 1), 2**0 (127, 128) and the top (254, 255)
SPECIAL_E8M0 = np.array([0, 1, 2, 126, 127, 128, 253, 254, 255], dtype=np.uint8)
QUANT_TYPES = sorted(FP16_FIELDS, key=lambda t: t.name)
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
# fp16 bit patterns: +-Inf, quiet NaN, signalling NaN, -NaN, max finite, -0
SPECIAL_F16 = np.array([0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0x7BFF, 0x8000], dtype=np.uint16)


# --------------------------------------------------------------------------- helpers


def reference(raw: np.ndarray, qtype: T) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def ours(raw: np.ndarray, qtype: T, **kw) -> np.ndarray:
    got = qt.dequantize(torch.from_numpy(raw).to(DEVICE), qtype, **kw)
    assert got.device.type == DEVICE.type
    return got.cpu().numpy() if got.dtype != torch.bfloat16 else got


def assert_bits_equal(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    g_nan, r_nan = np.isnan(got), np.isnan(ref)
    assert np.array_equal(g_nan, r_nan), "NaN positions differ"
    g, r = got.view(np.uint32)[~g_nan], ref.view(np.uint32)[~r_nan]
    if not np.array_equal(g, r):
        bad = np.flatnonzero(g != r)[:5]
        raise AssertionError(
            f"{len(np.flatnonzero(g != r))} values differ, e.g. "
            f"{got[~g_nan][bad]} vs {ref[~r_nan][bad]}"
        )


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions, and equal values elsewhere."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.cpu(), want.cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok], want[ok])


def random_blocks(
    seed: int, qtype: T, lead: tuple[int, ...], n_blocks: int, *, special: bool = False
) -> np.ndarray:
    """Random bytes of shape [*lead, n_blocks * type_size].

    The fp16 scale fields get finite values unless ``special``, in which case
    about a quarter of them are Inf/NaN/extreme bit patterns.
    """
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_rows = int(np.prod(lead, dtype=np.int64))
    raw = rng.integers(0, 256, size=(n_rows * n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, ()):
        bits = rng.integers(0, 1 << 16, size=n_rows * n_blocks, dtype=np.uint16)
        if special:
            pick = rng.random(bits.shape) < 0.25
            bits[pick] = rng.choice(SPECIAL_F16, size=int(pick.sum()))
        else:
            inf_nan = (bits & 0x7C00) == 0x7C00
            bits[inf_nan] &= np.uint16(0xBFFF)  # clear the exponent's top bit: finite
        raw[:, off : off + 2] = bits.view(np.uint8).reshape(-1, 2)
    for off in E8M0_FIELDS.get(qtype, ()):
        if special:  # about a quarter of the blocks at an edge exponent
            pick = rng.random(raw.shape[0]) < 0.25
            raw[pick, off] = rng.choice(SPECIAL_E8M0, size=int(pick.sum()))
        else:  # 12 * 2**(e - 128) is finite for e <= 252
            raw[:, off] = rng.integers(0, 253, size=raw.shape[0], dtype=np.uint8)
    return raw.reshape(*lead, n_blocks * type_size)


leads = st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- bit-exactness


def test_supported_covers_the_required_types():
    required = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.MXFP4}
    assert required <= qt.SUPPORTED
    assert set(QUANT_TYPES) | set(FLOAT_TYPES) == qt.SUPPORTED


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@given(seed=seeds, lead=leads, n_blocks=st.integers(1, 4))
def test_bit_exact_with_finite_scales(qtype, seed, lead, n_blocks):
    raw = random_blocks(seed, qtype, lead, n_blocks)
    ref = reference(raw, qtype)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    assert ref.shape == (*lead, n_blocks * block_size)
    got = ours(raw, qtype)
    assert np.isfinite(got).all()
    assert_bits_equal(got, ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@given(seed=seeds, lead=leads, n_blocks=st.integers(1, 3))
def test_bit_exact_with_nan_and_inf_scales(qtype, seed, lead, n_blocks):
    raw = random_blocks(seed, qtype, lead, n_blocks, special=True)
    assert_bits_equal(ours(raw, qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_every_special_scale_pattern(qtype):
    # every block gets one of the special fp16 patterns, deterministically
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = len(SPECIAL_F16) ** 2
    raw = np.random.default_rng(7).integers(0, 256, size=(n, type_size), dtype=np.uint8)
    offs = FP16_FIELDS.get(qtype, ())
    for i, off in enumerate(offs):
        pat = SPECIAL_F16[(np.arange(n) // len(SPECIAL_F16) ** i) % len(SPECIAL_F16)]
        raw[:, off : off + 2] = pat.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(7, -1)
    got = ours(raw, qtype)
    ref = reference(raw, qtype)
    if offs:
        assert np.isnan(ref).any() and np.isinf(ref).any()
    assert_bits_equal(got, ref)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
@given(seed=seeds, lead=leads, n_values=st.integers(1, 40))
def test_float_types_bit_exact_from_raw_bytes(qtype, seed, lead, n_values):
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(*lead, n_values * type_size), dtype=np.uint8)
    assert_bits_equal(ours(raw, qtype), reference(raw, qtype))


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [(T.F32, torch.float32), (T.F16, torch.float16), (T.BF16, torch.bfloat16)],
    ids=["F32", "F16", "BF16"],
)
def test_float_types_round_trip(qtype, dtype):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    raw = x.view(torch.uint8).to(DEVICE)
    assert raw.shape == (3, 5, 64 * x.element_size())
    for out_dtype in (torch.float32, dtype):
        got = qt.dequantize(raw, qtype, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == x.shape
        assert torch.equal(got.cpu(), x.to(out_dtype))
        # an already-float tensor is just cast
        assert torch.equal(qt.dequantize(x.to(DEVICE), qtype, out_dtype=out_dtype).cpu(),
                           x.to(out_dtype))
    nan = torch.full((2, 8), float("nan"), dtype=dtype)
    assert torch.isnan(qt.dequantize(nan.view(torch.uint8), qtype)).all()


# --------------------------------------------------------------------------- out_dtype


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_out_dtype_is_the_float32_result_cast(qtype, out_dtype):
    raw = torch.from_numpy(random_blocks(11, qtype, (2, 3), 3, special=True)).to(DEVICE)
    f32 = qt.dequantize(raw, qtype)
    got = qt.dequantize(raw, qtype, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == f32.shape
    assert_same(got, f32.to(out_dtype))


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.MXFP4, T.BF16, T.F16, T.F32],
                         ids=lambda t: t.name)
def test_non_contiguous_and_misaligned_inputs(qtype):
    raw = random_blocks(3, qtype, (4, 6), 2)
    ref = reference(raw, qtype)
    t = torch.from_numpy(raw).to(DEVICE)
    # every other row: non-contiguous
    assert_bits_equal(qt.dequantize(t[::2], qtype).cpu().numpy(), ref[::2])
    # a buffer whose data starts at an odd byte offset
    buf = torch.zeros(t.numel() + 1, dtype=torch.uint8, device=DEVICE)
    buf[1:] = t.reshape(-1)
    odd = buf[1:].view(t.shape)
    assert odd.storage_offset() == 1
    assert_bits_equal(qt.dequantize(odd, qtype).cpu().numpy(), ref)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q5_0, T.MXFP4, T.BF16], ids=lambda t: t.name)
def test_chunked_decoding_matches(qtype, monkeypatch):
    raw = random_blocks(5, qtype, (3, 7), 5)
    ref = reference(raw, qtype)
    monkeypatch.setattr(qt, "CHUNK_VALUES", 300)  # forces many uneven chunks
    assert_bits_equal(ours(raw, qtype), ref)
    got16 = qt.dequantize(torch.from_numpy(raw), qtype, out_dtype=torch.bfloat16)
    assert_same(got16, torch.from_numpy(ref).to(torch.bfloat16))


def test_empty_inputs():
    raw = torch.zeros((0, 144), dtype=torch.uint8)
    assert qt.dequantize(raw, T.Q4_K).shape == (0, 256)
    assert qt.dequantize(torch.zeros((3, 0), dtype=torch.uint8), T.Q6_K).shape == (3, 0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("qtype", [T.Q8_K, T.IQ2_XXS, T.TQ1_0, T.IQ4_NL, T.I32],
                         ids=lambda t: t.name)
def test_unsupported_type_names_it(qtype):
    raw = torch.zeros((2, 1024), dtype=torch.uint8)
    with pytest.raises(ModelFileError, match=qtype.name):
        qt.dequantize(raw, qtype)
    with pytest.raises(ModelFileError, match=qtype.name):
        qt.decode_as(raw, T.Q8_0 if qtype != T.Q8_0 else T.Q4_0, qtype)


def test_partial_block_row_is_a_model_file_error():
    with pytest.raises(ModelFileError, match="Q4_K"):
        qt.dequantize(torch.zeros((2, 145), dtype=torch.uint8), T.Q4_K)
    with pytest.raises(ModelFileError, match="Q6_K"):
        qt.decode_as(torch.zeros((2, 211), dtype=torch.uint8), T.Q6_K, T.Q4_K)
    with pytest.raises(ModelFileError):
        qt.dequantize(torch.zeros((2, 34), dtype=torch.float32), T.Q8_0)


# --------------------------------------------------------------------------- decode_as


PAIRS = [
    (T.Q6_K, T.Q4_K),  # the real bug: fewer bytes needed, trailing bytes ignored
    (T.Q4_K, T.Q6_K),  # more bytes needed: the row's bytes wrap around
    (T.Q8_0, T.Q4_K),
    (T.Q4_K, T.Q8_0),
    (T.Q5_K, T.Q4_0),
    (T.BF16, T.Q4_K),
    (T.Q6_K, T.F16),
    (T.MXFP4, T.Q4_0),  # 17 vs 18 bytes per 32 values: wraps around
    (T.Q8_0, T.MXFP4),
]


@pytest.mark.parametrize(("true", "as_"), PAIRS, ids=lambda t: t.name)
@given(seed=seeds, lead=leads, n_blocks=st.integers(1, 3))
def test_decode_as_shape_contract(true, as_, seed, lead, n_blocks):
    true_bs, _ = gguf.GGML_QUANT_SIZES[true]
    # keep float true types at a whole number of 256-value rows
    n_blocks = n_blocks * (256 if true_bs == 1 else 1)
    raw = torch.from_numpy(random_blocks(seed, true, lead, n_blocks)).to(DEVICE)
    want_shape = qt.dequantize(raw, true).shape
    got = qt.decode_as(raw, true, as_)
    assert got.shape == want_shape and got.dtype == torch.float32
    assert got.device.type == DEVICE.type
    assert qt.decode_as(raw, true, as_, out_dtype=torch.bfloat16).shape == want_shape


def test_decode_as_semantics_are_the_documented_byte_stream():
    # Q6_K -> Q4_K: the first R * 144 / 210 bytes of each row, decoded as Q4_K
    raw = random_blocks(1, T.Q6_K, (2, 3), 4)
    got = qt.decode_as(torch.from_numpy(raw), T.Q6_K, T.Q4_K).numpy()
    assert_bits_equal(got, reference(np.ascontiguousarray(raw[..., : 4 * 144]), T.Q4_K))
    # Q4_K -> Q6_K: the row's bytes repeated cyclically, decoded as Q6_K
    raw = random_blocks(2, T.Q4_K, (5,), 3)  # 432 bytes/row, 768 values -> 3 Q6_K blocks
    stream = np.concatenate([raw, raw], axis=-1)[..., : 3 * 210]
    got = qt.decode_as(torch.from_numpy(raw), T.Q4_K, T.Q6_K).numpy()
    assert_bits_equal(got, reference(np.ascontiguousarray(stream), T.Q6_K))
    # Q8_0 -> Q4_K: 256 values need 1 Q4_K block (144 bytes) of the 272 bytes
    raw = random_blocks(3, T.Q8_0, (2,), 8)
    got = qt.decode_as(torch.from_numpy(raw), T.Q8_0, T.Q4_K).numpy()
    assert_bits_equal(got, reference(np.ascontiguousarray(raw[..., :144]), T.Q4_K))


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_decode_as_same_type_is_dequantize(qtype):
    raw = torch.from_numpy(random_blocks(9, qtype, (2, 2), 3)).to(DEVICE)
    a = qt.decode_as(raw, qtype, qtype)
    b = qt.dequantize(raw, qtype)
    assert_bits_equal(a.cpu().numpy(), b.cpu().numpy())


@given(seed=seeds, lead=leads, n_blocks=st.integers(1, 4))
def test_q6k_decoded_as_q4k_is_wrong(seed, lead, n_blocks):
    raw = torch.from_numpy(random_blocks(seed, T.Q6_K, lead, n_blocks)).to(DEVICE)
    true = qt.dequantize(raw, T.Q6_K)
    bad = qt.decode_as(raw, T.Q6_K, T.Q4_K)
    assert bad.shape == true.shape
    assert not torch.equal(bad, true)
    differ = (bad != true) | torch.isnan(bad)
    assert differ.float().mean() > 0.5


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """A plain (not llama.cpp-optimal) Q6_K quantizer; gguf-py has none."""
    blocks = w.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(axis=-1) / 31.0  # [n, 16]
    d = (sub_scale.max(axis=-1, keepdims=True) / 127.0).astype(np.float16)
    sc = np.clip(np.rint(sub_scale / np.maximum(d.astype(np.float32), 1e-30)), 1, 127)
    step = (d.astype(np.float32) * sc)[..., None]  # [n, 16, 1]
    q = (np.clip(np.rint(sub / step), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    lo, hi = q & 0x0F, (q >> 4).reshape(n, 2, 4, 32)
    ql = (lo[..., :64] | (lo[..., 64:] << 4)).reshape(n, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    scales = sc.astype(np.int8).view(np.uint8)
    out = np.concatenate([ql, qh, scales, d.view(np.uint8).reshape(n, 2)], axis=-1)
    return out.reshape(*w.shape[:-1], w.shape[-1] // 256 * 210)


def test_q6k_decoded_as_q4k_on_realistic_weights_is_garbage():
    w = np.random.default_rng(0).normal(0, 0.02, size=(16, 768)).astype(np.float32)
    raw = quantize_q6_k(w)
    good = qt.dequantize(torch.from_numpy(raw), T.Q6_K)
    assert_bits_equal(good.numpy(), reference(raw, T.Q6_K))
    assert (good - torch.from_numpy(w)).abs().max() < 0.003  # a faithful round trip
    bad = qt.decode_as(torch.from_numpy(raw), T.Q6_K, T.Q4_K)
    assert bad.shape == good.shape
    finite = torch.isfinite(bad)
    err = (bad[finite] - good[finite]).abs()
    assert (~finite).any() or err.max() > 1.0  # huge or non-finite somewhere
    assert err.median() > 0.02  # and wrong nearly everywhere


# --------------------------------------------------------------------------- MXFP4


def test_mxfp4_every_exponent_byte_and_code_is_bit_exact():
    # 256 blocks: block i has exponent byte i and every one of the 16 E2M1 codes twice
    codes = np.arange(32, dtype=np.uint8) % 16
    qs = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    raw = np.concatenate([np.arange(256, dtype=np.uint8)[:, None], np.tile(qs, (256, 1))], axis=1)
    raw = raw.reshape(8, 32 * 17)
    ref = reference(raw, T.MXFP4)
    got = ours(raw, T.MXFP4)
    assert_bits_equal(got, ref)
    vals = got.reshape(256, 32)
    assert vals[127, 2] == 1.0 and vals[128, 7] == 12.0  # E2M1 1.0 at scale 2**0; E2M1 6.0 at scale 2**1
    assert vals[0, 1] == 2.0**-128 and vals[1, 1] == 2.0**-127  # the subnormal scale bytes
    assert np.isinf(vals[255]).any() and np.signbit(vals[:, 9:16]).all()  # overflow; codes 9-15 negative
    assert (vals[:, 8] == 0).all() and not np.signbit(vals[:, 8]).any()  # code 8 is +0, not -0


@given(seed=seeds, lead=leads, n_blocks=st.integers(1, 4), shift=st.sampled_from([-2, -1, 1, 2]))
def test_mxfp4_scale_off_is_every_exponent_byte_shifted(seed, lead, n_blocks, shift):
    raw = random_blocks(seed, T.MXFP4, lead, n_blocks, special=True)
    moved = raw.reshape(-1, 17).astype(np.int64)
    moved[:, 0] = np.clip(moved[:, 0] + shift, 0, 255)
    want = reference(moved.astype(np.uint8).reshape(raw.shape), T.MXFP4)
    got = qt.decode_scale_off(torch.from_numpy(raw).to(DEVICE), T.MXFP4, shift).cpu().numpy()
    assert_bits_equal(got, want)


def test_mxfp4_scale_off_by_one_doubles_or_halves_ordinary_blocks():
    raw = random_blocks(4, T.MXFP4, (3,), 4)
    raw.reshape(-1, 17)[:, 0] = np.arange(12, dtype=np.uint8) + 120  # well inside the normal range
    good = qt.dequantize(torch.from_numpy(raw), T.MXFP4)
    assert torch.equal(qt.decode_scale_off(torch.from_numpy(raw), T.MXFP4, 1), good * 2)
    assert torch.equal(qt.decode_scale_off(torch.from_numpy(raw), T.MXFP4, -1), good / 2)
    bf = qt.decode_scale_off(torch.from_numpy(raw), T.MXFP4, 1, out_dtype=torch.bfloat16)
    assert torch.equal(bf, (good * 2).to(torch.bfloat16))


def test_mxfp4_scale_off_refuses_other_types():
    with pytest.raises(ModelFileError, match="Q4_K has no E8M0"):
        qt.decode_scale_off(torch.zeros((2, 144), dtype=torch.uint8), T.Q4_K, 1)
    with pytest.raises(ModelFileError, match="MXFP4 row of 18 bytes"):
        qt.decode_scale_off(torch.zeros((2, 18), dtype=torch.uint8), T.MXFP4, 1)
