"""Synthetic MoE GGUF files (Qwen3-MoE, gpt-oss, DeepSeek; Qwen2-MoE, Mixtral and OLMoE through
:mod:`moesnap.model.synth_families`): random weights, real layout, real quant types.

A :class:`SynthSpec` says what to build (a :class:`~moesnap.model.config.ModelConfig`
for the family and the shapes, a quant type per tensor kind, a seed); :func:`make_model` streams it
into a GGUF file that gguf-py, moesnap's loaders and llama.cpp all read like a converted checkpoint
of that family:

* architecture ``qwen3moe`` or ``gpt-oss``, every hyper-parameter under the keys of
  ``gguf.constants.Keys``, tensor names from ``gguf.constants.TENSOR_NAMES``
  plus ``.weight`` (``.bias`` for biases) as in real files (``blk.0.ffn_down_exps.weight``);
* a byte-level ``llama`` (SentencePiece) vocabulary: ids 0-2 are ``<unk>``,
  ``<s>``, ``</s>``; ids 3-258 are the bytes ``<0x00>``..``<0xFF>``; the rest
  are filler tokens ``tok_259``...;
* quantized tensors hold *valid random blocks* (:func:`random_blocks`) whose
  dequantized values have the standard deviation a trained layer would have
  (projections ``1/sqrt(fan_in)``, embeddings 1, norms ``N(1, 0.1)``, router
  ``4/sqrt(hidden)`` so top-k choices do not nearly tie); gpt-oss's biases ``N(0, 0.1)``, sinks
  ``N(0, 1)``, and its expert gate/up projections ``3/sqrt(fan_in)`` so its SwiGLU clamp at 7 is
  reached by a few percent of the values, as in the trained model.

Each tensor draws from its own generator seeded by ``(seed, crc32(name))``
(the name without ``.weight``), so the same spec gives a byte-identical file,
and layer ``i`` of a 1-layer file equals layer ``i`` of a 48-layer file.
Files are written tensor by tensor to a temporary file next to the target and
renamed into place, so a crash never leaves a half-written model.  A pool of threads makes the
tensors ahead of the writer (numpy's generators and array maths release the GIL), each tensor
whole from its own generator, so the file is the same byte for byte whatever the thread count,
and memory stays at a tensor per thread.

The bundled ``data/tiny.gguf`` is ``make_model(..., preset("tiny"))``;
regenerate it with
``moesnap model make src/moesnap/data/tiny.gguf --preset tiny --force``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, ExpertGatingFuncType, GGUFValueType, Keys, RopeScalingType, TokenType
from gguf.quants import quantize

from ..errors import UsageError
from .config import DEEPSEEK2, FAMILIES, GPT_OSS, SHAPE_FIELDS, Qwen3MoeConfig
from .tensors import F32_TENSORS, KINDS, WEIGHT_SUFFIX, Dims, table
from . import synth_families

QT = GGMLQuantizationType
ARCH = "qwen3moe"
assert MODEL_ARCH.QWEN3MOE  # the architecture this module first wrote; a spec's config names its own

#: tensor kinds whose quant type a spec chooses (norms and router are always F32)
QTYPE_KINDS: tuple[str, ...] = (
    "token_embd",
    "output",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
)
assert set(QTYPE_KINDS) == set(KINDS) - F32_TENSORS
assert set(QTYPE_KINDS) == set(table(GPT_OSS).by_name) - table(GPT_OSS).f32_tensors


def qtype_kinds(arch: str) -> tuple[str, ...]:
    """The tensor kinds of ``arch`` whose quant type a spec chooses (every kind real files do not
    keep in F32), in file order; Qwen3-MoE's and gpt-oss's are :data:`QTYPE_KINDS`."""
    tab = table(arch)
    return tuple(n for n in tab.by_name if n not in tab.f32_tensors)


#: byte-level vocabulary layout
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
N_SPECIAL = 3
MIN_VOCAB = N_SPECIAL + 256

# types random_blocks builds by quantizing float data with gguf-py
_QUANTIZED_BY_GGUF = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0})
# K-quants gguf-py cannot quantize: random bits with chosen fp16 scales; MXFP4: random e2m1 values with
# chosen E8M0 scales (gguf-py's quantizer would need 64 bytes of work space per weight)
_K_QUANTS = frozenset({QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})
SUPPORTED_QTYPES = _QUANTIZED_BY_GGUF | _K_QUANTS | {QT.MXFP4}


#: the config's fields (read through a spec: ``spec.n_layer`` is ``spec.config.n_layer``)
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Qwen3MoeConfig))


@dataclass(frozen=True)
class SynthSpec:
    """What to build: the model's config (the hyper-parameters moesnap reads back from the file),
    what only the file carries, quant types and seed.

    The config's fields read through (``spec.n_layer``), and :meth:`with_` changes them
    (``spec.with_(n_layer=2, seed=1)``).  ``qtypes`` maps each of :data:`QTYPE_KINDS` to a
    quant type; the norms and the router (``ffn_gate_inp``) are always F32.  When
    ``down_exps_alternate`` is set, ``ffn_down_exps`` uses it in odd layers (real Q4_K_M
    files mix Q4_K and Q6_K there).
    """

    config: Qwen3MoeConfig
    dense_ff: int  # qwen3moe.feed_forward_length: unused by MoE layers, carried by real files
    qtypes: Mapping[str, GGMLQuantizationType] = field(default_factory=dict)
    down_exps_alternate: GGMLQuantizationType | None = None
    seed: int = 0
    name: str = "moesnap-synthetic"

    def __post_init__(self) -> None:
        try:
            qtypes = {str(k): QT(v) for k, v in dict(self.qtypes).items()}
            alt = None if self.down_exps_alternate is None else QT(self.down_exps_alternate)
        except ValueError as exc:
            raise UsageError(f"synthetic model spec: {exc}") from None
        object.__setattr__(self, "qtypes", qtypes)
        object.__setattr__(self, "down_exps_alternate", alt)
        _validate(self)

    def __getattr__(self, name: str) -> Any:
        if name in _CONFIG_FIELDS:
            return getattr(object.__getattribute__(self, "config"), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def with_(self, **changes: Any) -> SynthSpec:
        """A copy with some fields changed (``dataclasses.replace``); the config's fields change the config."""
        model = {k: changes.pop(k) for k in list(changes) if k in _CONFIG_FIELDS}
        if model:
            changes["config"] = dataclasses.replace(changes.get("config", self.config), **model)
        return dataclasses.replace(self, **changes)

    def qtype(self, kind: str, layer: int | None = None) -> GGMLQuantizationType:
        """The quant type of tensor kind ``kind`` (in ``layer`` for block tensors)."""
        if kind in table(self.config.arch).f32_tensors:
            return QT.F32
        if kind == "ffn_down_exps" and self.down_exps_alternate is not None and layer is not None and layer % 2 == 1:
            return self.down_exps_alternate
        return self.qtypes[kind]

    def tensors(self) -> list[SynthTensor]:
        """Every tensor of the file, in file order (embedding, layer by layer, head), with its numpy shape
        and type."""
        c = self.config
        d = c.dims
        out = [_tensor("token_embd", None, d, self)]
        for i in range(c.n_layer):
            out += [_tensor(kind, i, d, self) for kind in table(c.arch).in_layer(i, c.layer_where(i))]
        out += [_tensor("output_norm", None, d, self), _tensor("output", None, d, self)]
        return out


class SynthTensor(NamedTuple):
    name: str  # GGUF tensor name, e.g. "blk.3.ffn_down_exps.weight"
    kind: str  # name without the "blk.N." prefix
    layer: int | None
    shape: tuple[int, ...]  # numpy (row-major) shape; ggml's ne is this reversed
    qtype: GGMLQuantizationType

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


def _tensor(kind: str, layer: int | None, d: Dims, spec: SynthSpec) -> SynthTensor:
    k = table(spec.config.arch).by_name[kind]
    return SynthTensor(k.file_name(layer), kind, layer, k.shape(d), spec.qtype(kind, layer))


def _validate(spec: SynthSpec) -> None:
    def bad(msg: str) -> UsageError:
        return UsageError(f"synthetic model spec {spec.name!r}: {msg}")

    c = spec.config
    if not isinstance(c, Qwen3MoeConfig):
        raise bad(f"config={c!r} must be a ModelConfig")
    if c.arch not in FAMILIES:
        raise bad(f"arch={c.arch!r} is no family moesnap writes; choose one of {', '.join(FAMILIES)}")
    if c.arch == GPT_OSS and not (c.sliding_window >= 1 and c.rope_factor >= 1 and c.rope_orig_context >= 1):
        raise bad(f"sliding_window={c.sliding_window!r}, rope_factor={c.rope_factor!r} and "
                  f"rope_orig_context={c.rope_orig_context!r} must be ≥ 1 for gpt-oss")
    if c.arch == DEEPSEEK2:
        _validate_deepseek(spec, bad)
    if c.arch in synth_families.LLAMA_LIKE:
        synth_families.validate(spec, bad)
    counts = [(n, getattr(c, n)) for n in SHAPE_FIELDS if n not in ("rope_base", "rms_eps")]
    for name, value in [*counts, ("dense_ff", spec.dense_ff)]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise bad(f"{name}={value!r} must be an integer ≥ 1")
    if not (c.rope_base > 0 and c.rms_eps > 0):
        raise bad(f"rope_base={c.rope_base!r} and rms_eps={c.rms_eps!r} must be > 0")
    if c.n_head % c.n_head_kv:
        raise bad(f"n_head={c.n_head} is not a multiple of n_head_kv={c.n_head_kv}")
    if c.n_expert_used > c.n_expert:
        raise bad(f"n_expert_used={c.n_expert_used} exceeds n_expert={c.n_expert}")
    if c.vocab_size < MIN_VOCAB:
        raise bad(f"vocab_size={c.vocab_size} is below {MIN_VOCAB} (3 special + 256 byte tokens)")
    if not isinstance(spec.seed, (int, np.integer)) or spec.seed < 0:
        raise bad(f"seed={spec.seed!r} must be an integer ≥ 0")
    kinds = qtype_kinds(c.arch)
    missing = [k for k in kinds if k not in spec.qtypes]
    unknown = sorted(set(spec.qtypes) - set(kinds))
    if missing or unknown:
        raise bad(f"qtypes missing {missing}, unknown {unknown}; expected keys {list(kinds)}")
    for kind, qt in [*spec.qtypes.items(), ("down_exps_alternate", spec.down_exps_alternate)]:
        if qt is not None and qt not in SUPPORTED_QTYPES:
            raise bad(f"{kind}: {qt.name} is not supported; choose one of {sorted(t.name for t in SUPPORTED_QTYPES)}")
    # every layer has the same shapes (types alternate): two layers stand for all of them, and
    # --layers 1000000000000 does not build a plan of 12 trillion tensors
    sample = spec if c.n_layer <= c.n_dense_layers + 2 else spec.with_(n_layer=c.n_dense_layers + 2)
    for t in sample.tensors():
        block = GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[-1] % block:
            raise bad(f"{t.name}: row length {t.shape[-1]} is not a multiple of the {t.qtype.name} block size {block}")


def _validate_deepseek(spec: SynthSpec, bad) -> None:
    c = spec.config
    checks = [
        (c.kv_lora_rank >= 1 and c.qk_rope_dim >= 2 and c.qk_rope_dim % 2 == 0 and c.head_dim > c.qk_rope_dim
         and c.v_head_dim >= 1 and c.q_lora_rank >= 0,
         f"kv_lora_rank={c.kv_lora_rank}, qk_rope_dim={c.qk_rope_dim} (even), head_dim={c.head_dim} (> qk_rope_dim), "
         f"v_head_dim={c.v_head_dim} and q_lora_rank={c.q_lora_rank} (≥ 0) do not describe latent attention"),
        (c.n_head_kv == c.n_head, f"n_head_kv={c.n_head_kv} must equal n_head={c.n_head} (every head its own k, v)"),
        (0 <= c.n_dense_layers <= c.n_layer and (c.dense_ff == spec.dense_ff or not c.n_dense_layers),
         f"n_dense_layers={c.n_dense_layers} must be within the {c.n_layer} layers, with dense_ff={c.dense_ff} "
         f"the spec's dense_ff={spec.dense_ff}"),
        (c.n_group >= 1 and c.n_expert % c.n_group == 0 and 1 <= c.n_group_used <= c.n_group
         and c.n_group_used * (c.n_expert // c.n_group) >= c.n_expert_used,
         f"n_group={c.n_group}, n_group_used={c.n_group_used} must split n_expert={c.n_expert} evenly and keep "
         f"n_expert_used={c.n_expert_used} experts"),
        (c.gating in ("softmax_grouped", "sigmoid_grouped") and (not c.router_probs_bias or c.gating == "sigmoid_grouped"),
         f"gating={c.gating!r} with router_probs_bias={c.router_probs_bias} is no DeepSeek routing"),
        (c.n_shared_experts >= 0 and c.routed_scale > 0, f"n_shared_experts={c.n_shared_experts} must be ≥ 0 and "
         f"routed_scale={c.routed_scale} > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise bad(msg)


# ---------------------------------------------------------------- random blocks

# Distribution of the quantized integers (uniform random bits) and the
# per-sub-block scale ranges chosen below give, per type, the variance of one
# dequantized value in units of d**2 (fp16 super-block scale); a per-block
# jitter u ~ U(0.75, 1.25) on d makes blocks differ like real ones.
_JITTER = (0.75, 1.25)
_E_U2 = 1.0 + (_JITTER[1] - _JITTER[0]) ** 2 / 12.0


def _mean_sq(lo: int, hi: int) -> float:
    """E[s**2] for s uniform on the integers lo..hi."""
    s = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(s * s))


def _uniform_var(n_levels: int) -> float:
    return (n_levels**2 - 1) / 12.0


def _fp16(x: np.ndarray) -> np.ndarray:
    """fp16 bytes of x, shape (n, 2)."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _block_d(rng: np.random.Generator, n_blocks: int, d_base: float) -> np.ndarray:
    d = (d_base * rng.uniform(*_JITTER, n_blocks)).astype(np.float16)
    return np.maximum(d, np.float16(2.0**-24))  # never zero (smallest fp16 subnormal)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into Q4_K/Q5_K's 12 bytes."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _pack_q3k_scales(u: np.ndarray) -> np.ndarray:
    """Pack 16 six-bit (biased by 32) scales per block into Q3_K's 12 bytes."""
    lo, hi = u & 0x0F, u >> 4
    out = np.empty((u.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = lo[:, :8] | (lo[:, 8:] << 4)
    out[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return out


def _asym_k(rng, n_blocks, scale, type_size, var_q, mean_q, n_sub, d_off):
    """Q4_K / Q5_K: x = d*sc*q - dmin*m, with dmin*m ≈ d*sc*mean_q so blocks are zero-mean."""
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    sc = rng.integers(32, 64, (n_blocks, n_sub), dtype=np.uint8)
    dmin_ratio = 2 ** int(np.ceil(np.log2(mean_q)))  # power of two: dmin = d * ratio exactly in fp16
    m = np.rint(sc.astype(np.float64) * (mean_q / dmin_ratio)).astype(np.uint8)
    d = _block_d(rng, n_blocks, scale / np.sqrt(_E_U2 * _mean_sq(32, 63) * var_q))
    dmin = (d.astype(np.float32) * dmin_ratio).astype(np.float16)
    blocks[:, d_off : d_off + 2] = _fp16(d)
    blocks[:, d_off + 2 : d_off + 4] = _fp16(dmin)
    blocks[:, d_off + 4 : d_off + 16] = _pack_k4_scales(sc, m)
    return blocks


def _signed_scales(rng, shape, lo, hi) -> np.ndarray:
    """Integers with magnitude lo..hi and random sign."""
    mag = rng.integers(lo, hi + 1, shape, dtype=np.int16)
    sign = rng.integers(0, 2, shape, dtype=np.int16) * 2 - 1
    return mag * sign


def _kquant_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == QT.Q4_K:  # d(2) dmin(2) scales(12) qs(128); q in 0..15
        return _asym_k(rng, n_blocks, scale, type_size, _uniform_var(16), 7.5, 8, 0)
    if qtype == QT.Q5_K:  # d(2) dmin(2) scales(12) qh(32) qs(128); q in 0..31
        return _asym_k(rng, n_blocks, scale, type_size, _uniform_var(32), 15.5, 8, 0)
    if qtype == QT.Q6_K:  # ql(128) qh(64) scales(16 x int8) d(2); x = d*s*(q-32), q in 0..63
        blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        s = _signed_scales(rng, (n_blocks, 16), 64, 127)
        e_q2 = _uniform_var(64) + 0.25  # E[(q-32)**2]
        d = _block_d(rng, n_blocks, scale / np.sqrt(_E_U2 * _mean_sq(64, 127) * e_q2))
        blocks[:, 192:208] = s.astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = _fp16(d)
        return blocks
    if qtype == QT.Q3_K:  # hmask(32) qs(64) scales(12) d(2); x = d*(u-32)*q, q in -4..3
        blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        s = _signed_scales(rng, (n_blocks, 16), 16, 31)
        e_q2 = 5.5  # mean of q**2 over -4..3
        d = _block_d(rng, n_blocks, scale / np.sqrt(_E_U2 * _mean_sq(16, 31) * e_q2))
        blocks[:, 96:108] = _pack_q3k_scales((s + 32).astype(np.uint8))
        blocks[:, 108:110] = _fp16(d)
        return blocks
    if qtype == QT.Q2_K:  # scales(16: min<<4 | scale) qs(64) d(2) dmin(2); x = d*sc*q - dmin*m, q in 0..3
        blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
        sc = rng.integers(8, 16, (n_blocks, 16), dtype=np.uint8)
        m = np.rint(sc * 0.75).astype(np.uint8)  # dmin = 2d: dmin*m ≈ d*sc*1.5
        d = _block_d(rng, n_blocks, scale / np.sqrt(_E_U2 * _mean_sq(8, 15) * _uniform_var(4)))
        blocks[:, 0:16] = sc | (m << 4)
        blocks[:, 80:82] = _fp16(d)
        blocks[:, 82:84] = _fp16((d.astype(np.float32) * 2).astype(np.float16))
        return blocks
    raise AssertionError(qtype)


# MXFP4 (32 values a block): one E8M0 byte e (the scale 2**(e-128) as ggml halves it) and 16 bytes of
# two e2m1 nibbles; the 16 nibble values, doubled, are 0 1 2 3 4 6 8 12 and their negatives
_E2M1_MEAN_SQ = float(np.mean(np.square([0, 1, 2, 3, 4, 6, 8, 12])))


def _mxfp4_blocks(n_blocks: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Uniform random nibbles; each block's exponent the floor or ceiling of log2 of the wanted scale,
    drawn so that the mean square of the values is ``scale**2``."""
    want = scale * scale / _E2M1_MEAN_SQ                 # E[d**2]
    lo = np.floor(np.log2(want) / 2)                     # d = 2**lo or 2**(lo+1)
    p_lo = (4.0 ** (lo + 1) - want) / (4.0 ** (lo + 1) - 4.0 ** lo)
    e = lo + 128 + (rng.random(n_blocks) >= p_lo)
    if e.min() < 2 or e.max() > 254:
        raise UsageError(f"random_blocks: scale={scale!r} is out of MXFP4's range")
    out = rng.integers(0, 256, (n_blocks, 17), dtype=np.uint8)
    out[:, 0] = e.astype(np.uint8)
    return out


def random_blocks(
    qtype: GGMLQuantizationType, n_rows: int, row_len: int, rng: np.random.Generator, *, scale: float
) -> np.ndarray:
    """Valid random ``qtype`` data for an ``[n_rows, row_len]`` matrix, as raw bytes.

    Returns uint8 ``[n_rows, row_len // block_size * type_size]``; dequantized
    (``gguf.quants.dequantize``) the values are finite, mean ≈ 0, std ≈ ``scale``.
    Types gguf-py can quantize are made by quantizing normal noise; K-quants
    are random bits with fp16 super-block scales (and mins) set so that every
    sub-block is zero-mean with the requested spread.
    """
    qtype = QT(qtype)
    if qtype not in SUPPORTED_QTYPES:
        raise UsageError(f"random_blocks: {qtype.name} is not supported; choose one of "
                         f"{sorted(t.name for t in SUPPORTED_QTYPES)}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_rows < 0 or row_len < 1 or row_len % block:
        raise UsageError(f"random_blocks: row_len={row_len} must be a positive multiple of the "
                         f"{qtype.name} block size {block} (n_rows={n_rows})")
    if not (np.isfinite(scale) and scale > 0):
        raise UsageError(f"random_blocks: scale={scale!r} must be finite and > 0")
    row_bytes = row_len // block * type_size
    if qtype in _K_QUANTS:
        blocks = _kquant_blocks(qtype, n_rows * (row_len // block), rng, float(scale))
        return blocks.reshape(n_rows, row_bytes)
    if qtype == QT.MXFP4:
        return _mxfp4_blocks(n_rows * (row_len // block), rng, float(scale)).reshape(n_rows, row_bytes)
    x = rng.standard_normal((n_rows, row_len), dtype=np.float32)
    x *= np.float32(scale)
    q = quantize(x, qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(n_rows, row_bytes)


# ---------------------------------------------------------------- presets


def _tiny() -> SynthSpec:
    return SynthSpec(
        Qwen3MoeConfig(n_layer=4, hidden=64, n_head=4, n_head_kv=2, head_dim=32,  # q width 128 != hidden
                       n_expert=8, n_expert_used=2, expert_ff=256, vocab_size=272,
                       rope_base=1_000_000.0, rms_eps=1e-6, context_length=4096),
        dense_ff=192,
        qtypes={
            "token_embd": QT.F32, "output": QT.Q8_0,
            "attn_q": QT.Q8_0, "attn_k": QT.Q8_0, "attn_v": QT.Q8_0, "attn_output": QT.Q8_0,
            "ffn_gate_exps": QT.Q8_0, "ffn_up_exps": QT.Q8_0, "ffn_down_exps": QT.Q6_K,
        },
        down_exps_alternate=QT.Q4_K,  # layers 0, 2: Q6_K; layers 1, 3: Q4_K
        seed=0, name="moesnap-tiny",
    )


# the quant mix of a Q4_K_M file: Q4_K almost everywhere, Q6_K for attn_v, output and half of
# ffn_down_exps (the other half Q4_K: ``down_exps_alternate``)
Q4_K_M: dict[str, GGMLQuantizationType] = {
    "token_embd": QT.Q4_K, "output": QT.Q6_K,
    "attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q4_K,
    "ffn_gate_exps": QT.Q4_K, "ffn_up_exps": QT.Q4_K, "ffn_down_exps": QT.Q6_K,
}


def _qwen3_30b_a3b() -> SynthSpec:
    # Shapes of Qwen3-30B-A3B / Qwen3-Coder-30B-A3B (rope 1e7 and 262144 context as the
    # 2507 and Coder releases; Coder's GGUF says feed_forward_length 5472, the others 6144);
    # quant mix of a Q4_K_M file: Q4_K almost everywhere, Q6_K for attn_v, output and
    # half of ffn_down_exps.
    return SynthSpec(
        Qwen3MoeConfig(n_layer=48, hidden=2048, n_head=32, n_head_kv=4, head_dim=128,
                       n_expert=128, n_expert_used=8, expert_ff=768, vocab_size=151936,
                       rope_base=10_000_000.0, rms_eps=1e-6, context_length=262144),
        dense_ff=6144,
        qtypes=dict(Q4_K_M), down_exps_alternate=QT.Q4_K,
        seed=0, name="moesnap-qwen3-30b-a3b",
    )


def _qwen3_235b_a22b() -> SynthSpec:
    # Shapes of Qwen3-235B-A22B (94 layers, hidden 4096, 128 experts of 1536, top-8, 64 query / 4
    # key-value heads of 128, rope 1e6 and a 40960 context as released; feed_forward_length 12288),
    # with the Q4_K_M quant mix of the 30B preset: ~133 GB at 94 layers, ~1.4 GB per layer.
    return SynthSpec(
        Qwen3MoeConfig(n_layer=94, hidden=4096, n_head=64, n_head_kv=4, head_dim=128,
                       n_expert=128, n_expert_used=8, expert_ff=1536, vocab_size=151936,
                       rope_base=1_000_000.0, rms_eps=1e-6, context_length=40960),
        dense_ff=12288,
        qtypes=dict(Q4_K_M), down_exps_alternate=QT.Q4_K,
        seed=0, name="moesnap-qwen3-235b-a22b",
    )


def _gpt_oss(n_layer: int, hidden: int, n_head: int, n_head_kv: int, n_expert: int, expert_ff: int, vocab: int,
             window: int, context: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(n_layer=n_layer, hidden=hidden, n_head=n_head, n_head_kv=n_head_kv, head_dim=64,
                          n_expert=n_expert, n_expert_used=4, expert_ff=expert_ff, vocab_size=vocab,
                          rope_base=150_000.0, rms_eps=1e-5, context_length=context, arch=GPT_OSS,
                          sliding_window=window, rope_scaling="yarn", rope_factor=32.0, rope_orig_context=4096,
                          **FAMILIES[GPT_OSS]["fixed"])


# gpt-oss as ggml-org ships it (gpt-oss-20b-mxfp4.gguf): the experts in their native MXFP4, the other
# matrices Q8_0 (12.1 GB: 19.1e9 expert weights at 17/32 bytes plus 1.8e9 others at 34/32 bytes; F16
# would make 13.7 GB), norms, router, biases and sinks F32
GPT_OSS_MXFP4: dict[str, GGMLQuantizationType] = {
    "token_embd": QT.Q8_0, "output": QT.Q8_0,
    "attn_q": QT.Q8_0, "attn_k": QT.Q8_0, "attn_v": QT.Q8_0, "attn_output": QT.Q8_0,
    "ffn_gate_exps": QT.MXFP4, "ffn_up_exps": QT.MXFP4, "ffn_down_exps": QT.MXFP4,
}


def _gpt_oss_tiny() -> SynthSpec:
    # 4 layers (0 and 2 slide), a window of 4 positions that every CI prompt crosses, 8 experts of 64
    return SynthSpec(_gpt_oss(4, 64, 4, 2, 8, 64, 272, window=4, context=4096), dense_ff=64,
                     qtypes=dict(GPT_OSS_MXFP4), seed=0, name="moesnap-gpt-oss-tiny")


def _gpt_oss_20b() -> SynthSpec:
    # openai/gpt-oss-20b's config.json: 24 layers, hidden 2880, 64 query / 8 key-value heads of 64,
    # 32 experts of 2880, top-4, vocab 201088, window 128, YaRN 32 over 4096, context 131072
    return SynthSpec(_gpt_oss(24, 2880, 64, 8, 32, 2880, 201088, window=128, context=131072), dense_ff=2880,
                     qtypes=dict(GPT_OSS_MXFP4), seed=0, name="moesnap-gpt-oss-20b")


def _deepseek(n_layer: int, hidden: int, n_head: int, n_expert: int, n_used: int, expert_ff: int, vocab: int,
              *, nope: int, rope: int, v: int, kv_lora: int, q_lora: int, n_dense: int, dense_ff: int, shared: int,
              v3: bool, n_group: int = 1, n_group_used: int = 1, routed_scale: float = 1.0,
              yarn: tuple[float, int, float] | None = None, context: int = 4096) -> Qwen3MoeConfig:
    """A DeepSeek config; ``yarn``: (factor, original context, mscale_all_dim)."""
    scaling: dict[str, Any] = {} if yarn is None else {"rope_scaling": "yarn", "rope_factor": yarn[0], "rope_orig_context": yarn[1],
                                       "yarn_log_mul": 0.1 * yarn[2]}
    return Qwen3MoeConfig(n_layer=n_layer, hidden=hidden, n_head=n_head, n_head_kv=n_head, head_dim=nope + rope,
                          n_expert=n_expert, n_expert_used=n_used, expert_ff=expert_ff, vocab_size=vocab,
                          rope_base=10_000.0, rms_eps=1e-6, context_length=context, arch=DEEPSEEK2,
                          q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_rope_dim=rope, v_head_dim=v, kv_b_split=True,
                          n_dense_layers=n_dense, dense_ff=dense_ff, n_shared_experts=shared,
                          gating="sigmoid_grouped" if v3 else "softmax_grouped", n_group=n_group,
                          n_group_used=n_group_used, topk_norm=v3, routed_scale=routed_scale, router_probs_bias=v3,
                          **FAMILIES[DEEPSEEK2]["fixed"], **scaling)


def _deepseek_qtypes(base: GGMLQuantizationType) -> dict[str, GGMLQuantizationType]:
    return {k: base for k in qtype_kinds(DEEPSEEK2)}


# DeepSeek-V2-Lite as a Q4_K_M file: llama.cpp's K-quants need rows of 256 and fall back where a row
# is shorter or not a multiple (Q4_K -> Q5_0, Q6_K -> Q8_0): attn_k_b (rows of qk_nope 128), the
# experts' down projections (rows of 1408) and the dense layer's (10944); the rest as the Q4_K_M rule
# (Q6_K for the output, the values and half of the down projections, Q4_K elsewhere).  Our reading of
# llama.cpp's quantizer, not a byte-for-byte copy of a published file.
DEEPSEEK_Q4_K_M: dict[str, GGMLQuantizationType] = {
    **_deepseek_qtypes(QT.Q4_K), "output": QT.Q6_K, "attn_v_b": QT.Q6_K, "attn_kv_b": QT.Q6_K,
    "attn_k_b": QT.Q5_0, "ffn_down": QT.Q8_0, "ffn_down_exps": QT.Q8_0, "ffn_down_shexp": QT.Q6_K,
}


def _deepseek_v2_lite() -> SynthSpec:
    # deepseek-ai/DeepSeek-V2-Lite's config.json: 27 layers (the first dense, intermediate 10944), hidden
    # 2048, 16 heads, no q LoRA, kv_lora 512, qk_nope 128 + qk_rope 64, v 128; 64 routed experts of 1408,
    # top-6, 2 shared, softmax, greedy (one group), no renormalisation, routed_scaling_factor 1;
    # vocab 102400; YaRN 40 over 4096 with mscale = mscale_all_dim = 0.707; context 163840
    cfg = _deepseek(27, 2048, 16, 64, 6, 1408, 102400, nope=128, rope=64, v=128, kv_lora=512, q_lora=0, n_dense=1,
                    dense_ff=10944, shared=2, v3=False, yarn=(40.0, 4096, 0.707), context=163840)
    return SynthSpec(cfg, dense_ff=10944, qtypes=dict(DEEPSEEK_Q4_K_M), down_exps_alternate=QT.Q5_0,
                     seed=0, name="moesnap-deepseek-v2-lite")


def _deepseek_v2_tiny() -> SynthSpec:
    # V2 in small: no q LoRA, one dense layer, softmax routing limited to 1 of 2 groups (a group scores
    # its best expert, so keeping the top n_group_used >= k groups would never bind), 2 shared experts,
    # YaRN 4 over 256 with DeepSeek's mscale
    cfg = _deepseek(3, 64, 4, 8, 2, 64, 272, nope=32, rope=32, v=32, kv_lora=64, q_lora=0, n_dense=1, dense_ff=128,
                    shared=2, v3=False, n_group=2, n_group_used=1, routed_scale=1.5, yarn=(4.0, 256, 0.707), context=1024)
    return SynthSpec(cfg, dense_ff=128, qtypes=_deepseek_qtypes(QT.Q8_0), seed=0, name="moesnap-deepseek-v2-tiny")


def _deepseek_v3_tiny() -> SynthSpec:
    # V3 in small: q LoRA, one dense layer, sigmoid scores + correction bias, 2 of 4 groups, renormalised
    # weights times 2.5, one shared expert
    cfg = _deepseek(3, 64, 4, 8, 2, 64, 272, nope=32, rope=32, v=32, kv_lora=64, q_lora=64, n_dense=1, dense_ff=128,
                    shared=1, v3=True, n_group=4, n_group_used=2, routed_scale=2.5)
    return SynthSpec(cfg, dense_ff=128, qtypes=_deepseek_qtypes(QT.Q8_0), seed=0, name="moesnap-deepseek-v3-tiny")


PRESETS: dict[str, SynthSpec] = {"tiny": _tiny(), "qwen3-30b-a3b": _qwen3_30b_a3b(),
                                 "qwen3-235b-a22b": _qwen3_235b_a22b(), "gpt-oss-tiny": _gpt_oss_tiny(),
                                 "gpt-oss-20b": _gpt_oss_20b(), "deepseek-v2-tiny": _deepseek_v2_tiny(),
                                 "deepseek-v3-tiny": _deepseek_v3_tiny(), "deepseek-v2-lite": _deepseek_v2_lite(),
                                 **synth_families.presets(SynthSpec)}


def preset(name: str, *, layers: int | None = None, seed: int | None = None) -> SynthSpec:
    """The named preset, optionally with another layer count or seed."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1:
            raise UsageError(f"layers={layers!r} must be an integer ≥ 1")
        spec = spec.with_(n_layer=int(layers))
    if seed is not None:
        spec = spec.with_(seed=seed)
    return spec


def tiny_path() -> Path:
    """The bundled tiny model (``preset("tiny")``), used by tests and goldens."""
    return Path(__file__).resolve().parents[1] / "data" / "tiny.gguf"


# ---------------------------------------------------------------- writing


def vocabulary(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the byte-level vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens += [f"tok_{i}" for i in range(MIN_VOCAB, vocab_size)]
    types += [TokenType.NORMAL] * (vocab_size - MIN_VOCAB)
    scores = [0.0] * MIN_VOCAB + [-float(i) for i in range(vocab_size - MIN_VOCAB)]
    return tokens, scores, [int(t) for t in types]


def _add_metadata(w: GGUFWriter, spec: SynthSpec) -> None:
    c = spec.config
    w.add_name(spec.name)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.hidden)
    if c.arch in synth_families.LLAMA_LIKE:
        synth_families.add_metadata(w, spec)
    else:
        _add_moe_shape(w, spec)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_rope_freq_base(c.rope_base)
    if c.arch == DEEPSEEK2:
        _add_deepseek(w, c)
    if c.arch == GPT_OSS:   # what convert_hf_to_gguf's GptOssModel adds; the rest is gpt-oss's constants
        w.add_sliding_window(c.sliding_window)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_factor)
        w.add_rope_scaling_orig_ctx_len(c.rope_orig_context)
    w.add_quantization_version(2)
    tokens, scores, types = vocabulary(c.vocab_size)
    w.add_tokenizer_model("llama")
    # add_token_list & co. with the element types given: the same bytes, without gguf-py checking
    # the type of each of the vocabulary's items
    for key, items, item_type in [(Keys.Tokenizer.LIST, tokens, GGUFValueType.STRING),
                                  (Keys.Tokenizer.SCORES, scores, GGUFValueType.FLOAT32),
                                  (Keys.Tokenizer.TOKEN_TYPE, types, GGUFValueType.INT32)]:
        w.add_key_value(key, items, GGUFValueType.ARRAY, sub_type=item_type)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_moe_shape(w: GGUFWriter, spec: SynthSpec) -> None:
    """Qwen3-MoE's, gpt-oss's and DeepSeek's shape keys, after the embedding length."""
    c = spec.config
    w.add_feed_forward_length(spec.dense_ff)
    w.add_expert_feed_forward_length(c.expert_ff)
    w.add_expert_count(c.n_expert)
    w.add_expert_used_count(c.n_expert_used)
    w.add_head_count(c.n_head)
    if c.arch != DEEPSEEK2:      # keys in the order the bundled files were written with
        w.add_head_count_kv(c.n_head_kv)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)


def _add_deepseek(w: GGUFWriter, c: Qwen3MoeConfig) -> None:
    """What convert_hf_to_gguf's ``DeepseekV2Model`` writes: MLA as MQA over the latent (one kv head,
    key length ``kv_lora + rope``, value length ``kv_lora``) and the real head sizes as ``*_mla``."""
    w.add_head_count_kv(1)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_kv_lora_rank(c.kv_lora_rank)
    if c.q_lora_rank:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_rope_dimension_count(c.qk_rope_dim)
    w.add_leading_dense_block_count(c.n_dense_layers)
    w.add_vocab_size(c.vocab_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scale)
    if c.topk_norm:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if c.gating == "sigmoid_grouped" else ExpertGatingFuncType.SOFTMAX)
    if c.n_group > 1:
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.n_group_used)
    if c.rope_scaling == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_factor)
        w.add_rope_scaling_orig_ctx_len(c.rope_orig_context)
        w.add_rope_scaling_yarn_log_mul(c.yarn_log_mul)


def _scale(t: SynthTensor, spec: SynthSpec) -> float:
    """Standard deviation of a projection's values: 1/sqrt(fan_in); embeddings 1."""
    if t.kind == "token_embd":
        return 1.0
    if spec.config.ffn_act == "swiglu_oai" and t.kind in ("ffn_gate_exps", "ffn_up_exps"):
        return 3.0 / np.sqrt(t.shape[-1])   # gate and up of std 3: the clamp at 7 is reached
    if t.kind == "attn_k_b":                # stored transposed: its fan-in (kv_lora) is the middle axis
        return 1.0 / np.sqrt(t.shape[-2])
    return 1.0 / np.sqrt(t.shape[-1])


def tensor_data(t: SynthTensor, spec: SynthSpec) -> np.ndarray:
    """The bytes of tensor ``t``, uint8 of shape ``t.byte_shape`` (deterministic)."""
    rng = np.random.default_rng([int(spec.seed), zlib.crc32(t.name.removesuffix(WEIGHT_SUFFIX).encode())])
    if t.kind in table(spec.config.arch).f32_tensors:
        x = rng.standard_normal(t.shape, dtype=np.float32)
        if t.kind == "ffn_gate_inp":  # router: spread so top-k choices do not nearly tie
            x *= np.float32(4.0 / np.sqrt(spec.config.hidden))
        elif t.kind in ("attn_sinks", "ffn_gate_inp.bias"):   # as large as the logits they join: ~ N(0, 1)
            pass
        elif t.kind == "ffn_gate_inp_shexp":   # Qwen2-MoE's shared gate: logits ~ N(0, 1), sigmoids spread over (0, 1)
            x *= np.float32(1.0 / np.sqrt(spec.config.hidden))
        elif t.kind.endswith(".bias"):
            x *= np.float32(0.1)
        else:  # norm weights ~ N(1, 0.1)
            x = np.float32(1.0) + np.float32(0.1) * x
        return x.view(np.uint8).reshape(t.byte_shape)
    n_rows = int(np.prod(t.shape[:-1]))
    data = random_blocks(t.qtype, n_rows, t.shape[-1], rng, scale=_scale(t, spec))
    return data.reshape(t.byte_shape)


def _size(n: int) -> str:
    from ..util import mib

    return mib(n)


def estimated_size(spec: SynthSpec) -> int:
    """Bytes of tensor data ``spec`` makes, without building its plan (layers alternate types)."""
    n, lead = int(spec.config.n_layer), spec.config.n_dense_layers   # leading dense layers, then pairs alike
    sample = spec.with_(n_layer=min(n, lead + 2)).tensors()
    m = min(n, lead + 2)
    size = {k: sum(t.nbytes for t in sample if t.layer == k) for k in (None, *range(m))}
    rest = n - m        # layer i >= lead + 2 is like layer lead + (i - lead) % 2: counted, not looped over
    return size[None] + sum(size[i] for i in range(m)) + (rest + 1) // 2 * size.get(lead, 0) + rest // 2 * size.get(lead + 1, 0)


#: most threads :func:`make_model` uses by default (a tensor in memory each: ~0.2 GB for 30B-A3B's experts)
MAX_THREADS = 16


def default_threads() -> int:
    """The threads :func:`make_model` uses by default: this process's cores, at most :data:`MAX_THREADS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_THREADS))


def _in_order(pool: ThreadPoolExecutor | None, fn: Callable[[SynthTensor], np.ndarray],
              items: Iterable[SynthTensor], ahead: int) -> Iterator[np.ndarray]:
    """``fn(item)`` for each item in order; with a pool, made there at most ``ahead`` items ahead of the
    consumer, the first ``ahead`` submitted at once (they start before the first ``next``)."""
    if pool is None:
        return map(fn, items)
    it = iter(items)
    pending: deque[Future[np.ndarray]] = deque(pool.submit(fn, x) for x in islice(it, ahead))

    def results() -> Iterator[np.ndarray]:
        while pending:
            pending.extend(pool.submit(fn, x) for x in islice(it, 1))
            yield pending.popleft().result()    # the future goes: only the consumer holds the array

    return results()


def make_model(out: str | os.PathLike[str], spec: SynthSpec, *, force: bool = False, progress: bool = False,
               threads: int | None = None) -> Path:
    """Write the synthetic model ``spec`` to ``out`` (atomically) and return its path.

    Tensors are made on ``threads`` threads (default :func:`default_threads`; 1: one after another in
    this thread) at most one per thread ahead of the writer, and written in order: the file does not
    depend on ``threads``, and memory stays at ``threads + 1`` tensors.  An existing ``out`` is only
    replaced with ``force``.  ``progress``: a status line per layer written (on stderr; not under ``-q``
    / :func:`moesnap.util.quiet`).
    """
    out = Path(out)
    if threads is None:
        threads = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(f"{out}: threads={threads!r} must be an integer ≥ 1")
    if out.exists() and not force:
        raise UsageError(f"{out}: exists (use --force to overwrite)")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{out}: directory {parent} does not exist")
    from ..util import published_version_above, status

    inside = published_version_above(out)
    if inside is not None:
        raise UsageError(f"{out}: inside the published golden version {inside}; refusing to write there")
    need, free = estimated_size(spec), shutil.disk_usage(parent).free
    if need > free:   # checked before the tensor plan is built: --layers 100000000 would not fit in memory either
        raise UsageError(f"{out}: {spec.config.n_layer} layers need {_size(need)}, only {_size(free)} free in {parent}")

    plan = spec.tensors()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = GGUFWriter(tmp, spec.config.arch)
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(int(threads), thread_name_prefix="moesnap-synth") if threads > 1 else None
    try:
        # the pool starts on the first tensors while the vocabulary is packed
        data = _in_order(pool, lambda t: tensor_data(t, spec), plan, int(threads))
        _add_metadata(writer, spec)
        for t in plan:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written = 0
        for i, t in enumerate(plan):
            writer.write_tensor_data(next(data))    # held by no name: freed before the next is awaited
            written += t.nbytes
            last_of_layer = i + 1 == len(plan) or plan[i + 1].layer != t.layer
            if t.layer is not None and last_of_layer:
                status(f"{out.name}: layer {t.layer + 1}/{spec.config.n_layer} "
                       f"({_size(written)}, {time.perf_counter() - t0:.1f} s)", enabled=progress)
        assert writer.fout is not None
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):   # disk full, permissions: one line naming the file
            raise UsageError(f"{out}: cannot write ({e.strerror or e})") from None
        raise
    finally:
        if pool is not None:     # on failure: drop the tensors not begun, wait for those being made
            pool.shutdown(wait=True, cancel_futures=True)
    status(f"wrote {out} ({_size(out.stat().st_size)}, {time.perf_counter() - t0:.1f} s)", enabled=progress)
    return out
