"""On-device dequantization of GGUF/GGML blocks, in plain torch.

The candidate forward uploads a GGUF tensor's bytes to the device unchanged
(``uint8 [..., n_bytes_per_row]``, exactly what :class:`gguf.GGUFReader`
hands out) and turns them into floats *there*, with this module.  Every
routine is vectorised over all blocks, uses only integer bit operations,
dtype conversions and element-wise float ``mul``/``sub``/``add`` (all of which
exist on CUDA as well as on the CPU), and never copies to the host.

Bit-exactness
-------------
With ``out_dtype=torch.float32`` the result is bit-for-bit the result of
``gguf.quants.dequantize(numpy_bytes, qtype)`` (gguf-py 0.19), NaN payloads
aside.  To get that, each routine mirrors gguf-py's float32 operation order:

* scales are computed first, in float32 (``d * sc``, ``dmin * m``), from an
  fp16 ``d``/``dmin`` converted exactly to float32;
* the small integer quants are converted exactly to float32 (offsets such as
  ``- 8`` or ``- 32`` are exact in float32, and ``8.0 - 8.0`` is ``+0.0`` as
  the integer route gives);
* then ``scale * q`` is rounded to float32, and only then is the minimum
  subtracted (``- dm``) or added (``+ m``) -- two separately rounded
  operations, never a fused multiply-add.

Element-wise multiplication is commutative in IEEE arithmetic, so the
in-place ``q.mul_(d)`` equals gguf-py's ``d * q``.

Memory
------
Blocks are decoded in chunks of about :data:`CHUNK_VALUES` values written
straight into the preallocated output, so temporaries stay around a float32
chunk (and a few uint8 chunk-sized tensors) whatever the input size.  A
non-contiguous input is copied once (its bytes, not its values).

MXFP4 (gpt-oss's expert weights) is a block of 32 FP4 E2M1 codes sharing one
E8M0 exponent byte; gguf-py multiplies the doubled E2M1 value by half the
scale, both exact powers of two times small integers, so the float32 product
is exact (or overflows to Inf for exponent bytes near 255) in any order.

``decode_as`` and ``decode_scale_off`` are fault-injection helpers: the first
decodes a tensor's bytes with the wrong block routine, the second reads each
MXFP4 block's E8M0 exponent off by a few (see their docstrings).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import gguf
import torch

from moesnap.errors import ModelFileError

__all__ = ["SUPPORTED", "CHUNK_VALUES", "dequantize", "decode_as", "decode_scale_off"]

T = gguf.GGMLQuantizationType

#: Values decoded per chunk (float32 temporaries stay near 4 bytes x this).
CHUNK_VALUES = 1 << 24

_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


# --------------------------------------------------------------------------- helpers


def _u8(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _view_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes (last dim) as ``dtype``, copying when misaligned."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if x.dim() == 0:
        x = x.reshape(1)
    if (
        not x.is_contiguous()
        or x.storage_offset() % itemsize != 0
        or x.data_ptr() % itemsize != 0
    ):
        x = x.clone(memory_format=torch.contiguous_format)
    return x.view(dtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 field ``b`` (uint8 ``[n, 2]``, any strides) -> exact float32 ``[n, 1]``."""
    return _view_as(b, torch.float16).to(torch.float32)


def _nibbles_into(dst: torch.Tensor, qs: torch.Tensor) -> None:
    """Write low nibbles of ``qs`` to ``dst[..., 0, :]`` and high ones to ``dst[..., 1, :]``."""
    dst.select(-2, 0).copy_(qs & 0x0F)
    dst.select(-2, 1).copy_(qs >> 4)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K 6-bit scales and mins: uint8 ``[n, 12]`` -> two ``[n, 8]``."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# --------------------------------------------------------------------------- block decoders
# Each takes uint8 blocks [n, type_size] and a float32 output [n, block_size]
# (contiguous) and fills the output.


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    _nibbles_into(out.view(n, 2, 16), b[:, 2:18])
    out.sub_(8.0).mul_(d)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    _nibbles_into(out.view(n, 2, 16), b[:, 4:20])
    out.mul_(d).add_(m)


def _q5_q(b_qh: torch.Tensor, b_qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit quants, uint8 ``[n, 32]`` in 0..31."""
    n = b_qs.shape[0]
    q = torch.empty((n, 2, 16), dtype=torch.uint8, device=b_qs.device)
    _nibbles_into(q, b_qs)
    q = q.view(n, 32)
    # value j takes bit j of the little-endian uint32 qh: bit j%8 of byte j//8
    hi = (b_qh.unsqueeze(-1) >> _u8(list(range(8)), b_qs.device)) & 1
    q |= hi.reshape(n, 32) << 4
    return q


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    out.copy_(_q5_q(b[:, 2:6], b[:, 6:22]))
    out.sub_(16.0).mul_(d)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    out.copy_(_q5_q(b[:, 4:8], b[:, 8:24]))
    out.mul_(d).add_(m)


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(b[:, 0:2])
    out.copy_(b[:, 2:34].view(torch.int8))
    out.mul_(d)


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, 0:16]
    qs = b[:, 16:80]
    d = _f16(b[:, 80:82])
    dmin = _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).unsqueeze(-1)  # [n, 16, 1]
    ml = (dmin * (scales >> 4).to(torch.float32)).unsqueeze(-1)
    q = (qs.reshape(n, 2, 1, 32) >> _u8([0, 2, 4, 6], b.device).view(1, 1, 4, 1)) & 3
    o = out.view(n, 16, 16)
    o.copy_(q.reshape(n, 16, 16))
    o.mul_(dl).sub_(ml)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    dev = b.device
    hmask = b[:, 0:32]
    qs = b[:, 32:96]
    scales = b[:, 96:108]
    d = _f16(b[:, 108:110])
    lsc = (scales[:, 0:8].reshape(n, 1, 8) >> _u8([0, 4], dev).view(1, 2, 1)).reshape(n, 16)
    hsc = (scales[:, 8:12].reshape(n, 1, 4) >> _u8([0, 2, 4, 6], dev).view(1, 4, 1)).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.float32) - 32.0
    dl = (d * sc).unsqueeze(-1)  # [n, 16, 1]
    o = out.view(n, 16, 16)
    ql = (qs.reshape(n, 2, 1, 32) >> _u8([0, 2, 4, 6], dev).view(1, 1, 4, 1)) & 3
    o.copy_(ql.reshape(n, 16, 16))
    # the offset 4 applies where the hmask bit is 0
    qh = (hmask.reshape(n, 1, 1, 32) >> _u8(list(range(8)), dev).view(1, 1, 8, 1)) & 1
    o.sub_(((qh ^ 1) << 2).reshape(n, 16, 16))
    o.mul_(dl)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).unsqueeze(-1)  # [n, 8, 1]
    dm = (dmin * mn.to(torch.float32)).unsqueeze(-1)
    _nibbles_into(out.view(n, 4, 2, 32), b[:, 16:144].reshape(n, 4, 32))
    o = out.view(n, 8, 32)
    o.mul_(dl).sub_(dm)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    dev = b.device
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).unsqueeze(-1)  # [n, 8, 1]
    dm = (dmin * mn.to(torch.float32)).unsqueeze(-1)
    qh = b[:, 16:48]
    q = torch.empty((n, 4, 2, 32), dtype=torch.uint8, device=dev)
    _nibbles_into(q, b[:, 48:176].reshape(n, 4, 32))
    q = q.view(n, 8, 32)
    q |= ((qh.reshape(n, 1, 32) >> _u8(list(range(8)), dev).view(1, 8, 1)) & 1) << 4
    o = out.view(n, 8, 32)
    o.copy_(q)
    o.mul_(dl).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    dev = b.device
    ql = b[:, 0:128]
    qh = b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(b[:, 208:210])
    dl = (d * scales).unsqueeze(-1)  # [n, 16, 1]
    q = torch.empty((n, 2, 2, 64), dtype=torch.uint8, device=dev)
    _nibbles_into(q, ql.reshape(n, 2, 64))
    q = q.view(n, 8, 32)
    hi = (qh.reshape(n, 2, 1, 32) >> _u8([0, 2, 4, 6], dev).view(1, 1, 4, 1)) & 3
    q |= hi.reshape(n, 8, 32) << 4
    out.copy_(q.view(n, 256))
    o = out.view(n, 16, 16)
    o.sub_(32.0).mul_(dl)


#: FP4 E2M1 values, doubled (the E8M0 scale below is halved to match), by 4-bit code
_E2M1_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 exponent bytes ``e`` (uint8, any shape) -> float32 ``2**(e - 128)``, built from its bits.

    Half the E8M0 scale ``2**(e - 127)``, as ggml's ``ggml_e8m0_to_fp32_half``: bytes 0 and 1 give the
    subnormals ``2**-128`` and ``2**-127`` (bit 21 or 22 set), the rest the normal ``(e - 1) << 23``.
    """
    x = e.to(torch.int32)
    bits = torch.where(x < 2, torch.bitwise_left_shift(torch.full_like(x, 0x00200000), x), (x - 1) << 23)
    return bits.view(torch.float32)


def _mxfp4_with(b: torch.Tensor, out: torch.Tensor, shift: int) -> None:
    n = b.shape[0]
    e = b[:, 0:1].to(torch.int32) + shift
    d = _e8m0_half(e.clamp(0, 255))  # [n, 1]
    q = torch.empty((n, 2, 16), dtype=torch.uint8, device=b.device)
    _nibbles_into(q, b[:, 1:17])
    table = torch.tensor(_E2M1_X2, dtype=torch.float32, device=b.device)
    out.copy_(table[q.view(n, 32).to(torch.int64)])
    out.mul_(d)


def _mxfp4(b: torch.Tensor, out: torch.Tensor) -> None:
    # block: 1 E8M0 exponent byte, then 16 bytes of E2M1 codes (values 0-15 the low nibbles, 16-31 the high)
    _mxfp4_with(b, out, 0)


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    # bf16 -> f32 is the 16-bit pattern shifted left by 16: build the four
    # little-endian bytes (0, 0, lo, hi) and reinterpret them.
    n = b.shape[0]
    w = torch.zeros((n, 4), dtype=torch.uint8, device=b.device)
    w[:, 2:4] = b
    out.copy_(w.view(torch.float32))


def _f16_blk(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_f16(b))


def _f32_blk(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_view_as(b, torch.float32))


_DECODERS = {
    T.F32: _f32_blk,
    T.F16: _f16_blk,
    T.BF16: _bf16,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.MXFP4: _mxfp4,
}

#: Types :func:`dequantize` decodes.  (Q8_K is left out: it never stores
#: weights in a GGUF file and gguf-py has no reference decoder for it.)
SUPPORTED: frozenset[gguf.GGMLQuantizationType] = frozenset(_DECODERS)


# --------------------------------------------------------------------------- public API


def _check_supported(qtype: gguf.GGMLQuantizationType) -> None:
    if qtype not in _DECODERS:
        name = getattr(qtype, "name", str(qtype))
        raise ModelFileError(
            f"unsupported GGML tensor type {name} for on-device dequantization "
            f"(supported: {', '.join(sorted(t.name for t in SUPPORTED))})"
        )


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bytes as uint8 ``[..., n_bytes_per_row]``."""
    if data.dtype == torch.uint8:
        return data
    if data.dim() == 0:
        data = data.reshape(1)
    if data.stride(-1) != 1 and data.shape[-1] > 1:
        data = data.contiguous()
    try:
        return data.view(torch.uint8)
    except RuntimeError:
        return data.contiguous().view(torch.uint8)


def _dequantize_bytes(
    data: torch.Tensor, qtype: gguf.GGMLQuantizationType, out_dtype: torch.dtype,
    decode: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if data.dim() == 0:
        raise ModelFileError(f"{qtype.name} tensor data must have at least one dimension")
    n_bytes = data.shape[-1]
    if n_bytes % type_size != 0:
        raise ModelFileError(
            f"{qtype.name} row of {n_bytes} bytes is not a whole number of "
            f"{type_size}-byte blocks"
        )
    lead = tuple(data.shape[:-1])
    n_values = n_bytes // type_size * block_size
    n_blocks = data.numel() // type_size
    blocks = data.reshape(n_blocks, type_size)  # a view unless data is non-contiguous
    out = torch.empty((n_blocks, block_size), dtype=out_dtype, device=data.device)
    decode = decode or _DECODERS[qtype]
    step = max(1, CHUNK_VALUES // block_size)
    for start in range(0, n_blocks, step):
        b = blocks[start : start + step]
        if out_dtype == torch.float32:
            decode(b, out[start : start + step])
        else:
            tmp = torch.empty((b.shape[0], block_size), dtype=torch.float32, device=data.device)
            decode(b, tmp)
            out[start : start + step].copy_(tmp)
    return out.view(*lead, n_values)


def dequantize(
    data: torch.Tensor,
    qtype: gguf.GGMLQuantizationType,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode GGUF tensor data to floats on ``data.device``.

    ``data`` is ``uint8 [..., n_bytes_per_row]`` -- rows of ``qtype`` blocks as
    :class:`gguf.GGUFReader` gives them (F32/F16/BF16 as raw bytes too).  A
    tensor already of dtype float32/float16/bfloat16 is accepted for the
    float types F32/F16/BF16 and simply cast (``data.to(out_dtype)``, which is
    ``data`` itself when the dtype already matches).  Returns
    ``[..., n_values_per_row]`` in ``out_dtype``; with float32 it is
    bit-exact against ``gguf.quants.dequantize``.  Other ``out_dtype`` values
    give the float32 result cast (round to nearest even).

    Raises :class:`~moesnap.errors.ModelFileError` for an unsupported type or
    a row that is not a whole number of blocks.
    """
    _check_supported(qtype)
    if data.dtype in (torch.float32, torch.float16, torch.bfloat16):
        if qtype not in _FLOAT_TYPES:
            raise ModelFileError(
                f"{qtype.name} tensor data must be raw uint8 bytes, got {data.dtype}"
            )
        return data.to(out_dtype)
    if data.dtype != torch.uint8:
        raise ModelFileError(f"{qtype.name} tensor data must be uint8 bytes, got {data.dtype}")
    return _dequantize_bytes(data, qtype, out_dtype)


def decode_as(
    data: torch.Tensor,
    true_qtype: gguf.GGMLQuantizationType,
    as_qtype: gguf.GGMLQuantizationType,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fault injection: decode ``true_qtype`` bytes with the ``as_qtype`` routine.

    Models a kernel that got the tensor's type wrong but still walks each row
    with the correct row stride (the real bug: Q6_K ``ffn_down_exps`` bytes
    decoded by the Q4_K routine).  The output has the *true* shape:
    ``[..., V]`` with ``V`` the true number of values per row.

    Semantics, per row of ``R`` bytes: the row's bytes are read from byte 0 as
    consecutive ``as_qtype`` blocks, exactly ``ceil(V / as_block_size)`` of
    them, and the decoded values are trimmed to ``V``.  If those blocks need
    more than ``R`` bytes the byte stream wraps around to the start of the
    same row (byte ``i`` of the stream is row byte ``i % R``); if they need
    fewer, the row's trailing bytes are ignored.  For Q6_K read as Q4_K
    (210 vs 144 bytes per 256 values) this is simply the first ``R*144/210``
    bytes of each row decoded as Q4_K -- the same value count, garbage values
    (often huge, sometimes Inf/NaN from the reinterpreted fp16 scales).

    Never raises for a shape mismatch between the two types; raises
    :class:`~moesnap.errors.ModelFileError` for an unsupported type or a true
    row that is not a whole number of ``true_qtype`` blocks.
    """
    _check_supported(true_qtype)
    _check_supported(as_qtype)
    raw = _as_bytes(data)
    if raw.dim() == 0:
        raise ModelFileError(f"{true_qtype.name} tensor data must have at least one dimension")
    t_bs, t_ts = gguf.GGML_QUANT_SIZES[true_qtype]
    a_bs, a_ts = gguf.GGML_QUANT_SIZES[as_qtype]
    row_bytes = raw.shape[-1]
    if row_bytes % t_ts != 0:
        raise ModelFileError(
            f"{true_qtype.name} row of {row_bytes} bytes is not a whole number of "
            f"{t_ts}-byte blocks"
        )
    n_values = row_bytes // t_ts * t_bs
    lead = tuple(raw.shape[:-1])
    if n_values == 0:
        return torch.empty((*lead, 0), dtype=out_dtype, device=raw.device)
    need_blocks = -(-n_values // a_bs)
    need_bytes = need_blocks * a_ts
    if need_bytes <= row_bytes:
        stream = raw[..., :need_bytes]
    else:
        idx = torch.arange(need_bytes, device=raw.device) % row_bytes
        stream = raw.index_select(-1, idx)
    values = _dequantize_bytes(stream.contiguous(), as_qtype, out_dtype)
    if values.shape[-1] != n_values:
        values = values[..., :n_values].contiguous()
    return values


def decode_scale_off(
    data: torch.Tensor,
    qtype: gguf.GGMLQuantizationType,
    shift: int,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fault injection: MXFP4 bytes decoded with every block's E8M0 exponent read ``shift`` off.

    Models a kernel that mistakes the shared scale's exponent by one (``shift=1``: it forgot that the
    E2M1 table is doubled and used ``2**(e-127)``; ``shift=-1`` the other way): each block's exponent
    byte ``e`` is taken as ``e + shift``, clamped to ``0..255``, so every value of a block is scaled
    by ``2**shift`` (exactly, except where the clamp or the subnormal range of exponent bytes 0 and 1
    makes it less, or the product overflows to Inf).  Same shape and ``out_dtype`` rule as
    :func:`dequantize`.

    Raises :class:`~moesnap.errors.ModelFileError` for a ``qtype`` other than MXFP4 (only MXFP4 has an
    E8M0 scale to misread) or a row that is not a whole number of blocks.
    """
    if qtype != T.MXFP4:
        name = getattr(qtype, "name", str(qtype))
        raise ModelFileError(f"{name} has no E8M0 block scale to read off by {shift} (only MXFP4 does)")
    if data.dtype != torch.uint8:
        raise ModelFileError(f"{qtype.name} tensor data must be uint8 bytes, got {data.dtype}")
    return _dequantize_bytes(data, qtype, out_dtype, partial(_mxfp4_with, shift=shift))
