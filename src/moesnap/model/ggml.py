"""ggml's activation quantization, emulated: what a correct llama.cpp does to the input of a matmul.

ggml's CPU backend multiplies a quantized weight by an activation only after converting the
activation to the weight type's ``vec_dot_type``: Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0 weights,
Q8_1 for Q4_1/Q5_1, Q8_K blocks of 256 for the k-quants (Q2_K..Q6_K) and the i-quants, float16
for F16 weights and bfloat16 for BF16; F32 weights (norms, the router) see the activation as it
is.  So a correct llama.cpp differs from a float32 reference by about one 8-bit rounding of every
matmul input (~0.5 % relative L2 per output row), and that difference accumulates over layers.

:class:`ActivationQuant` returns ``x`` rounded the way ggml rounds it (values, not blocks: each
block's integer quants times its scale), so the reference can compute what a correct ggml engine
computes, up to float summation order.  The rounding follows ggml's x86 ``quantize_row_q8_0``
(``d = amax / 127`` stored as float16, ``q = round(x * 127 / amax)``, ties to even) and
``quantize_row_q8_K_ref`` (``iscale = -127 / max`` for the element of largest magnitude,
``q = min(127, round(iscale * x))``, ``d = 1 / iscale`` in float32).
"""

from __future__ import annotations

import torch

#: weight type -> the activation format ggml converts to before the dot product (None: as is)
VEC_DOT_TYPE: dict[str, str | None] = {
    "F32": None, "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0",
    "MXFP4": "Q8_0", "NVFP4": "Q8_0", "Q1_0": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` in float32 rounded once, as C's ``a / b`` is.

    Not ``127 / t``: torch computes a number divided by a tensor as ``t.reciprocal() * 127``, two
    roundings, one ulp away from the quotient for about a quarter of all values (and on CUDA a tensor
    divided by a number as a product with its reciprocal).  One ulp in ggml's scale moves a product
    that lies within an ulp of a half across it: that element's 8-bit quant changes by one.
    """
    like = a if isinstance(a, torch.Tensor) else b
    assert isinstance(like, torch.Tensor), "one side is a tensor"
    num = a if isinstance(a, torch.Tensor) else torch.full_like(like, a)
    den = b if isinstance(b, torch.Tensor) else torch.full_like(like, b)
    return num / den


def _grid_q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``b [..., 32]``: (each element's product with ggml's inverse scale, the block's scale)."""
    amax = b.abs().amax(-1, keepdim=True)
    nz = amax > 0
    d = _div(amax, 127.0).to(torch.float16).float()
    inv = torch.where(nz, _div(127.0, torch.where(nz, amax, torch.ones_like(amax))), torch.zeros_like(amax))
    return b * inv, d


def _grid_q8_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``b [..., 256]``: (each element's product with ggml's ``iscale``, the block's scale)."""
    mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))           # signed value of largest magnitude
    nz = mx != 0
    iscale = torch.where(nz, _div(-127.0, torch.where(nz, mx, torch.ones_like(mx))), torch.zeros_like(mx))
    d = torch.where(nz, _div(1.0, torch.where(nz, iscale, torch.ones_like(iscale))), torch.zeros_like(iscale))
    return iscale * b, d


#: activation format -> (elements per block, products and scale of blocks, the largest quant)
_GRID = {"Q8_0": (32, _grid_q8_0, 127.0), "Q8_1": (32, _grid_q8_0, 127.0), "Q8_K": (256, _grid_q8_k, 127.0)}


def _rounded(x: torch.Tensor, fmt: str) -> torch.Tensor:
    block, grid, top = _GRID[fmt]
    prod, d = grid(x.float().reshape(*x.shape[:-1], -1, block))
    return (torch.round(prod).clamp(max=top) * d).reshape(x.shape)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` (n a multiple of 32) rounded to Q8_0 (also Q8_1's values), in float32."""
    return _rounded(x, "Q8_0")


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` (n a multiple of 256) rounded to Q8_K, in float32."""
    return _rounded(x, "Q8_K")


_ROUND = {"Q8_0": (q8_0, 32), "Q8_1": (q8_0, 32), "Q8_K": (q8_k, 256)}

#: how close (in quant steps) a product ``scale * x`` may come to a half and count as a near half: ggml's
#: and the reference's float32 sums before an unexposed matmul input (an expert's SwiGLU) differ by
#: ~2e-7 relative, which moved such products by 3e-6 and 1.4e-5 steps across a half on the tiny model
NEAR_HALF = 1e-3


def near_halves(x: torch.Tensor, weight_type: str, tol: float = NEAR_HALF) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ggml's 8-bit rounding of the row ``x [n]`` is decided by float noise: the elements whose
    product with their block's scale lies within ``tol`` steps of a half, nearest first, and for each
    the change of its rounded value had it rounded the other way (``[m]`` indices, ``[m]`` float32).
    Empty for weight types whose activation is not 8-bit rounded and rows that are not whole blocks."""
    fmt = VEC_DOT_TYPE.get(weight_type)
    empty = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float32)
    if fmt not in _GRID or x.dim() != 1 or x.shape[0] % _GRID[fmt][0]:
        return empty
    block, grid, top = _GRID[fmt]
    prod, d = grid(x.float().reshape(-1, block))
    gap = (prod - torch.floor(prod) - 0.5).abs()                     # steps from the nearest half
    q = torch.round(prod).clamp(max=top)
    other = torch.where(prod > q, q + 1, q - 1).clamp(max=top)
    step = ((other - q) * d).reshape(-1)
    near = ((gap.reshape(-1) < tol) & (step != 0)).nonzero().flatten()
    near = near[gap.reshape(-1)[near].argsort()]
    return near, step[near]


#: the same for a Q8_0 block's float16 scale ``amax / 127``: a relative error e of the block's largest
#: element moves an element's product by at most 127 e quant steps but the scale by 2^11 e float16 steps
#: (11 significant bits), so the scale's near half is that much wider (Qwen1.5-MoE-A2.7B's full-width
#: experts: a scale 1.1e-3 steps from a half rounded the other way in llama.cpp, whose SwiGLU output
#: differs from the reference's by ~1e-6)
NEAR_HALF_SCALE = NEAR_HALF * 2048 / 127


def near_scale_halves(x: torch.Tensor, weight_type: str, tol: float = NEAR_HALF_SCALE) -> list[tuple[int, torch.Tensor]]:
    """Where the float16 scale of a Q8_0 block of the row ``x [n]`` is decided by float noise: the blocks
    whose ``amax / 127`` lies within ``tol`` float16 steps of a half between two float16 values (its
    rounding may go either way; every quant of the block then keeps its integer and changes with the
    scale, ~5e-4 of the block), and for each (its first element's index, the change of each of its
    rounded elements ``[32]`` had the scale rounded the other way).  Empty for other formats (Q8_K's
    scale is float32) and rows that are not whole blocks."""
    fmt = VEC_DOT_TYPE.get(weight_type)
    if fmt not in ("Q8_0", "Q8_1") or x.dim() != 1 or x.shape[0] % 32:
        return []
    prod, d = _grid_q8_0(x.float().reshape(-1, 32))                 # [B, 32], [B, 1]
    s = _div(x.float().reshape(-1, 32).abs().amax(-1, keepdim=True), 127.0)   # [B, 1] before float16
    mant, exp = torch.frexp(d)                                      # d = mant * 2^exp, mant in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(d), exp - 11)                 # float16's spacing above d (normal range)
    below = torch.where(mant == 0.5, ulp / 2, ulp)                  # ...and below it
    other = torch.where(s > d, d + ulp, d - below)
    gap = ((s - (d + other) / 2).abs() / (other - d).abs()).reshape(-1)   # float16 steps from the half
    q = torch.round(prod).clamp(max=127.0)
    return [(32 * b, q[b] * (other[b] - d[b])) for b in (gap < tol).nonzero().flatten().tolist() if d[b] > 0]


def round_activation(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` as ggml hands it to a matmul with a ``weight_type`` weight (same dtype as ``x``).

    Unknown weight types and rows that are not a whole number of blocks are returned unchanged
    (ggml would refuse such a matmul; nothing here invents a rounding).
    """
    fmt = VEC_DOT_TYPE.get(weight_type)
    if fmt is None:
        return x
    if fmt == "F16":
        return x.to(torch.float16).to(x.dtype)
    if fmt == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    fn, block = _ROUND[fmt]
    if x.shape[-1] % block:
        return x
    return fn(x).to(x.dtype)


class ActivationQuant:
    """Round a matmul's input as ggml does for the weight it meets: ``aq(x, "blk.3.attn_q")``.

    ``qtypes`` maps bare tensor names to their stored type names
    (:meth:`~moesnap.model.weights.GGUFModel.qtypes`).
    """

    def __init__(self, qtypes: dict[str, str]) -> None:
        self.qtypes = dict(qtypes)

    def __call__(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        return round_activation(x, self.type_of(tensor))

    def type_of(self, tensor: str) -> str:
        """The stored type of ``tensor`` (``F32`` for a tensor the table does not know)."""
        return self.qtypes.get(tensor.removesuffix(".weight"), "F32")


def identity(x: torch.Tensor, tensor: str) -> torch.Tensor:  # noqa: ARG001
    """No activation rounding (moesnap's reference, transformers, a float engine)."""
    return x
