"""moesnap's emulation of ggml's activation rounding (``moesnap.model.ggml``) against ggml itself.

The oracle is the ggml CPU library that llama-cpp-python ships: ``ggml_get_type_traits_cpu(type)``
gives, for every weight type, the ``vec_dot_type`` its matmuls convert the activation to and the
``from_float`` that converts it (the function ``mul_mat`` / ``mul_mat_id`` call).  Each test feeds
the same float32 rows to ``from_float`` and to the emulation and asserts the values agree bit for
bit: random rows, rows built so that a product ``scale * x`` lies within a few ulps of a half (where
a scale one ulp off moves a quant by one), and the row of llama.cpp's layer-3 expert-6 input at
position 13 of the near-tie run (``test_decode_engines.py``) that exposed such a scale.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moesnap.model.ggml import VEC_DOT_TYPE, round_activation

pytestmark = pytest.mark.crosscheck


class _TraitsCpu(ctypes.Structure):
    """``struct ggml_type_traits_cpu`` (ggml/include/ggml-cpu.h)."""

    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml_cpu():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'moesnap[llama]')")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = [lib_dir / n for n in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll") if (lib_dir / n).exists()]
    assert found, f"llama-cpp-python is installed but {lib_dir} holds no ggml-cpu library"
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCpu)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()                      # fp16 tables and CPU feature detection, as a llama.cpp context does
    return lib


def _traits(lib, qtype: Q) -> _TraitsCpu:
    return lib.ggml_get_type_traits_cpu(int(qtype)).contents


#: activation format -> (elements per block, bytes per block, values of a block from its bytes)
def _q8_blocks(raw: np.ndarray, d_bytes: int, lead: int, n: int, d_dtype) -> np.ndarray:
    b = raw.reshape(-1, lead + n)
    d = b[:, :d_bytes].copy().view(d_dtype).astype(np.float32)           # [blocks, 1]
    qs = b[:, lead:].copy().view(np.int8).astype(np.float32)             # [blocks, n]
    return (d * qs).reshape(-1)                                          # float32 products, as ggml's d * q


_DECODE = {
    # block_q8_0 {ggml_half d; int8_t qs[32]}
    "Q8_0": (32, 34, lambda raw: _q8_blocks(raw, 2, 2, 32, np.float16)),
    # block_q8_1 {ggml_half d; ggml_half s; int8_t qs[32]}
    "Q8_1": (32, 36, lambda raw: _q8_blocks(raw, 2, 4, 32, np.float16)),
    # block_q8_K {float d; int8_t qs[256]; int16_t bsums[16]}: the values are d * qs
    "Q8_K": (256, 292, lambda raw: _q8_blocks(raw.reshape(-1, 292)[:, :260].reshape(-1), 4, 4, 256, np.float32)),
    "F16": (1, 2, lambda raw: raw.view(np.float16).astype(np.float32)),
    "BF16": (1, 2, lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)),
}


def _ggml_rounds(lib, weight_type: str, x: np.ndarray) -> np.ndarray:
    """``x [rows, n]`` through ggml's own ``from_float`` for ``weight_type``'s ``vec_dot_type``, as values."""
    tr = _traits(lib, Q[weight_type])
    fmt = Q(tr.vec_dot_type).name
    block, nbytes, decode = _DECODE[fmt]
    from_float = _FROM_FLOAT(_traits(lib, Q[fmt]).from_float)
    out = []
    for row in np.ascontiguousarray(x, dtype=np.float32):
        raw = np.zeros(row.size // block * nbytes, dtype=np.uint8)
        from_float(row.ctypes.data, raw.ctypes.data, row.size)
        out.append(decode(raw))
    return np.stack(out)


def _near_halves(rng: np.random.Generator, rows: int, block: int, *, signed_max: bool) -> np.ndarray:
    """Rows whose every block has a largest magnitude ``m`` and other elements ``x`` with ``x * scale``
    within 3 ulps of ``k + 1/2`` (``scale``: ggml's ``127 / m`` for Q8_0, ``-127 / m`` for Q8_K)."""
    n_blocks = rows * 2
    m = (rng.uniform(0.05, 40.0, n_blocks) * rng.choice([-1.0, 1.0], n_blocks)).astype(np.float32)
    scale = (np.float32(-127.0) / m) if signed_max else (np.float32(127.0) / np.abs(m))   # float32, as C
    k = rng.integers(-126, 126, (n_blocks, block)).astype(np.float64)
    x = ((k + 0.5) / scale.astype(np.float64)[:, None]).astype(np.float32)
    for _ in range(3):                                                   # nudge each by up to 3 ulps
        step = rng.integers(-1, 2, x.shape)
        x = np.where(step > 0, np.nextafter(x, np.float32(np.inf)),
                     np.where(step < 0, np.nextafter(x, np.float32(-np.inf)), x)).astype(np.float32)
    x = np.clip(x, -np.abs(m)[:, None] * 0.999, np.abs(m)[:, None] * 0.999).astype(np.float32)
    x[np.arange(n_blocks), rng.integers(0, block, n_blocks)] = m        # the block's largest magnitude
    return x.reshape(rows, 2 * block)


def _special_rows(block: int) -> np.ndarray:
    """A zero block, a block whose largest magnitude occurs as +m and -m (ggml takes the first), a
    block with one non-zero element; two blocks per row."""
    rows = np.zeros((3, 2 * block), dtype=np.float32)
    rows[1, 3], rows[1, 7], rows[1, 11] = 1.5, -1.5, 0.7
    rows[1, block + 2], rows[1, block + 5] = -2.25, 2.25
    rows[2, block + 1] = -3.0e-3
    return rows


#: llama.cpp's expert-6 input (``ffn_moe_swiglu``) at layer 3, position 13 of the near-tie run, reduced to what
#: decides the Q8_K rounding of element 42: the block's largest magnitude (element 189) and element 42, as
#: float32 bit patterns.  ``-127 / max * x[42]`` is -21.499998 (quant -21); with the scale one ulp high,
#: -21.5 (quant -22: that row's output 2.7e-3 off).
FAILED_ROW_BITS = {189: 0xC0180659, 42: 0xBECDE44F}


def _failed_row() -> np.ndarray:
    row = np.random.default_rng(7).uniform(-1.0, 1.0, 256).astype(np.float32)
    for i, bits in FAILED_ROW_BITS.items():
        row[i] = np.array(bits, dtype=np.uint32).view(np.float32)
    return row[None]


@pytest.mark.parametrize("weight_type", sorted(VEC_DOT_TYPE))
def test_the_vec_dot_type_table_is_ggmls(ggml_cpu, weight_type):
    want = Q(_traits(ggml_cpu, Q[weight_type]).vec_dot_type).name
    assert VEC_DOT_TYPE[weight_type] == (None if want == "F32" else want)


def test_every_weight_type_ggml_multiplies_is_in_the_table(ggml_cpu):
    """A quant type ggml's CPU backend can multiply (it has a ``vec_dot``) and gguf-py names is in
    ``VEC_DOT_TYPE``: an unknown one would silently be left unrounded."""
    not_weights = {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"}     # activation formats, integer tensors
    missing = [t.name for t in Q if t.name not in VEC_DOT_TYPE and t.name not in not_weights
               and _traits(ggml_cpu, t).vec_dot]
    assert not missing, f"weight types ggml multiplies that moesnap.model.ggml does not round for: {missing}"


# the weight types of the bundled tiny model and the synth presets, and one type per other activation format
_TYPES = ["Q8_0", "Q4_K", "Q6_K", "Q4_0", "Q5_1", "F16", "BF16"]


@pytest.mark.parametrize("weight_type", _TYPES)
def test_the_emulation_rounds_random_rows_as_ggml_does(ggml_cpu, weight_type):
    rng = np.random.default_rng(11)
    scales = np.array([1e-3, 0.3, 3.0, 50.0, 2e3], dtype=np.float32)
    x = (rng.standard_normal((60, 512)) * np.repeat(scales, 12)[:, None]).astype(np.float32)
    got = round_activation(torch.from_numpy(x), weight_type).numpy()
    np.testing.assert_array_equal(got, _ggml_rounds(ggml_cpu, weight_type, x))


@pytest.mark.parametrize("weight_type", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_the_emulation_rounds_near_halves_as_ggml_does(ggml_cpu, weight_type):
    """Products within 3 ulps of a half: a scale one ulp off, or a rounding other than ggml's, moves
    quants here (the old ``127 / t`` scales, a reciprocal times 127, moved quants in 179-181 of these 403 rows)."""
    fmt = VEC_DOT_TYPE[weight_type]
    block = 256 if fmt == "Q8_K" else 32
    x = np.concatenate([_near_halves(np.random.default_rng(5), 400, block, signed_max=fmt == "Q8_K"),
                        _special_rows(block)])
    got = round_activation(torch.from_numpy(x), weight_type).numpy()
    want = _ggml_rounds(ggml_cpu, weight_type, x)
    moved = np.flatnonzero((got != want).any(axis=1))
    assert moved.size == 0, f"{moved.size} of {len(x)} rows differ from ggml's {fmt} (first: row {moved[:5]})"


@pytest.mark.parametrize("weight_type", ["Q4_K", "Q6_K"])
def test_the_row_that_failed_rounds_as_ggml_does(ggml_cpu, weight_type):
    x = _failed_row()
    want = _ggml_rounds(ggml_cpu, weight_type, x)
    got = round_activation(torch.from_numpy(x), weight_type).numpy()
    d = np.float32(1.0) / (np.float32(-127.0) / x[0, 189])
    assert want[0, 42] == np.float32(-21.0) * d, "ggml's own quant of element 42 is -21"
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- near halves in local re-reference

#: a 64-token prompt (``[1]`` and 63 draws of ``default_rng(0).integers(3, 272)``) whose llama.cpp forward has
#: layer 1, token 18, expert 3's down-projection input at a near half: element 187's product with the Q8_K
#: scale is 3.4999983 in llama.cpp and 3.5000017 in the reference's batched float32 sums
NEAR_HALF_LAYER, NEAR_HALF_TOKEN, NEAR_HALF_EXPERT = 1, 18, 3


def _near_half_prompt() -> list[int]:
    return [1] + np.random.default_rng(0).integers(3, 272, 63).tolist()


@pytest.fixture(scope="module")
def near_half_run(tmp_path_factory):
    """(store, llama.cpp's case) for :func:`_near_half_prompt`."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'moesnap[llama]')")
    import moesnap
    import moesnap.capture
    from moesnap.model.synth import tiny_path

    store = str(tmp_path_factory.mktemp("near-half"))
    assert moesnap.generate(tiny_path(), "nh", [_near_half_prompt()], store=store) == "nh@v0001"
    return store, moesnap.capture.llama_cpp(tiny_path(), _near_half_prompt())


def _compare(store, case):
    import moesnap

    return moesnap.compare("nh", case, store=store, allow_missing=True, show_progress=False)


def test_local_re_reference_takes_llama_cpps_rounding_at_a_near_half(near_half_run):
    """The reference's own float32 sums put one product of that row on the other side of a half (one quant
    step: 4e-3 of the row, called a divergence before); local re-reference takes llama.cpp's rounding of
    that element, says so in a note, and every cell passes."""
    store, case = near_half_run
    rep = _compare(store, case)
    assert rep.verdict == "pass", rep.summary()
    notes = [n for c in rep.replay or () for n in c.notes if "near half" in n]
    assert len(notes) == 1 and f"layer {NEAR_HALF_LAYER}:" in notes[0], notes
    assert f"token {NEAR_HALF_TOKEN} expert {NEAR_HALF_EXPERT} element 187" in notes[0], notes


def test_one_quant_step_elsewhere_in_that_row_is_still_a_divergence(near_half_run):
    """Only near-half elements may round either way: one quant step added at an element of the same row
    that is not at a near half is named at that layer, ``expert_out``, that token."""
    from dataclasses import replace

    import torch.nn.functional as F

    from moesnap.model.ggml import ActivationQuant, near_halves, q8_k
    from moesnap.model.load import open_model
    from moesnap.model.synth import tiny_path

    store, case = near_half_run
    m = open_model(tiny_path())
    aq, p = ActivationQuant(m.qtypes()), f"blk.{NEAR_HALF_LAYER}."
    gate, up, down = m.layer(NEAR_HALF_LAYER, torch.float32).experts.expert(NEAR_HALF_EXPERT)
    x = torch.from_numpy(case.layers["ffn_norm"][NEAR_HALF_LAYER][NEAR_HALF_TOKEN:NEAR_HALF_TOKEN + 1])
    h = (F.silu(aq(x, p + "ffn_gate_exps") @ gate.T) * (aq(x, p + "ffn_up_exps") @ up.T))[0]
    near, _ = near_halves(h, aq.type_of(p + "ffn_down_exps"))
    assert 187 in near.tolist()
    big = int(h.abs().argmax())
    d = float(q8_k(h)[big]) / -127.0                                   # the block's scale: one quant step
    j = next(j for j in range(256) if j not in near.tolist() and j != big)
    slot = case.layers["topk_ids"][NEAR_HALF_LAYER][NEAR_HALF_TOKEN].tolist().index(NEAR_HALF_EXPERT)
    eo = case.layers["expert_out"].copy()
    eo[NEAR_HALF_LAYER, NEAR_HALF_TOKEN, slot] += (d * down[:, j]).numpy()
    rep = _compare(store, replace(case, layers={**case.layers, "expert_out": eo}))
    assert rep.verdict == "fail", rep.summary()
    fd = rep.first_divergence
    assert (fd.layer, fd.stage, fd.token) == (NEAR_HALF_LAYER, "expert_out", NEAR_HALF_TOKEN), rep.summary()
