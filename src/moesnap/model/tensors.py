"""The tensors of a Qwen3-MoE GGUF file: one table for the loader, the synthetic writer, the
injector and the candidate.

Names come from gguf-py's constants (``TENSOR_NAMES`` for ``MODEL_ARCH.QWEN3MOE``), never retyped;
shapes are numpy (row-major) shapes, i.e. GGUF's ``ne`` reversed.  Real files (convert_hf_to_gguf,
llama.cpp) call every weight ``<name>.weight``; the bare form is accepted on read.
"""

from __future__ import annotations

from typing import NamedTuple

from gguf import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

WEIGHT_SUFFIX = ".weight"


class Dims(NamedTuple):
    """The dimensions tensor shapes depend on (a config's or a synthetic spec's)."""

    hidden: int
    q_dim: int       # query heads x head_dim
    kv_dim: int      # key-value heads x head_dim
    head_dim: int
    n_expert: int
    expert_ff: int
    vocab_size: int


class TensorKind(NamedTuple):
    """One kind of tensor: its bare name (``attn_q``; ``blk.N.`` prefix for per-layer ones), the
    stage it feeds first, and whether real files always store it as F32 (norms and router)."""

    tensor: MODEL_TENSOR
    stage: str
    f32: bool

    @property
    def name(self) -> str:
        return TENSOR_NAMES[self.tensor].removeprefix("blk.{bid}.")

    @property
    def per_layer(self) -> bool:
        return TENSOR_NAMES[self.tensor].startswith("blk.{bid}.")

    def gguf_name(self, layer: int | None = None) -> str:
        """The full GGUF name without the ``.weight`` suffix (``blk.3.attn_q``, ``token_embd``)."""
        return TENSOR_NAMES[self.tensor].format(bid=layer)

    def shape(self, d: Dims) -> tuple[int, ...]:
        return _SHAPES[self.tensor](d)


_T = MODEL_TENSOR
_SHAPES = {
    _T.TOKEN_EMBD: lambda d: (d.vocab_size, d.hidden),
    _T.OUTPUT_NORM: lambda d: (d.hidden,),
    _T.OUTPUT: lambda d: (d.vocab_size, d.hidden),
    _T.ATTN_NORM: lambda d: (d.hidden,),
    _T.ATTN_Q: lambda d: (d.q_dim, d.hidden),
    _T.ATTN_K: lambda d: (d.kv_dim, d.hidden),
    _T.ATTN_V: lambda d: (d.kv_dim, d.hidden),
    _T.ATTN_OUT: lambda d: (d.hidden, d.q_dim),
    _T.ATTN_Q_NORM: lambda d: (d.head_dim,),
    _T.ATTN_K_NORM: lambda d: (d.head_dim,),
    _T.FFN_NORM: lambda d: (d.hidden,),
    _T.FFN_GATE_INP: lambda d: (d.n_expert, d.hidden),
    _T.FFN_GATE_EXP: lambda d: (d.n_expert, d.expert_ff, d.hidden),
    _T.FFN_UP_EXP: lambda d: (d.n_expert, d.expert_ff, d.hidden),
    _T.FFN_DOWN_EXP: lambda d: (d.n_expert, d.hidden, d.expert_ff),
}

# file order of the synthetic writer: globals first (embedding), per-layer, then the head
_ORDER = [
    (_T.TOKEN_EMBD, "embed", False),
    (_T.ATTN_NORM, "attn_norm", True),
    (_T.ATTN_Q, "q", False),
    (_T.ATTN_K, "k", False),
    (_T.ATTN_V, "v", False),
    (_T.ATTN_Q_NORM, "q_norm", True),
    (_T.ATTN_K_NORM, "k_norm", True),
    (_T.ATTN_OUT, "attn_out", False),
    (_T.FFN_NORM, "ffn_norm", True),
    (_T.FFN_GATE_INP, "router_logits", True),
    (_T.FFN_GATE_EXP, "expert_out", False),
    (_T.FFN_UP_EXP, "expert_out", False),
    (_T.FFN_DOWN_EXP, "expert_out", False),
    (_T.OUTPUT_NORM, "final_norm", True),
    (_T.OUTPUT, "logits", False),
]
assert {t for t, _, _ in _ORDER} == set(MODEL_TENSORS[MODEL_ARCH.QWEN3MOE]), "gguf-py's qwen3moe tensors changed"

#: every kind, by bare name, in file order
KINDS: dict[str, TensorKind] = {k.name: k for k in (TensorKind(t, s, f) for t, s, f in _ORDER)}
#: per-layer tensors (``blk.L.<name>``) and the stage each one feeds first
LAYER_TENSORS: dict[str, str] = {n: k.stage for n, k in KINDS.items() if k.per_layer}
#: whole-model tensors
GLOBAL_TENSORS: tuple[str, ...] = tuple(n for n, k in KINDS.items() if not k.per_layer)
#: the three expert matrices (gate, up, down)
EXPERT_TENSORS: tuple[str, ...] = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
#: kinds real files always store as F32
F32_TENSORS: frozenset[str] = frozenset(n for n, k in KINDS.items() if k.f32)


def expected_shapes(d: Dims, n_layer: int) -> dict[str, tuple[int, ...]]:
    """Numpy shape of every tensor of a file, by GGUF name without ``.weight``: the whole-model
    tensors, then layer by layer."""
    out = {KINDS[n].gguf_name(): KINDS[n].shape(d) for n in GLOBAL_TENSORS}
    for layer in range(n_layer):
        out.update({KINDS[n].gguf_name(layer): KINDS[n].shape(d) for n in LAYER_TENSORS})
    return out
