"""The tensors of a MoE GGUF file, one table per architecture: for the loader, the synthetic writer,
the injector and the candidate.

Names come from gguf-py's constants (``TENSOR_NAMES`` for the architecture's ``MODEL_TENSORS``),
never retyped; shapes are numpy (row-major) shapes, i.e. GGUF's ``ne`` reversed.  Real files
(convert_hf_to_gguf, llama.cpp) call every weight ``<name>.weight`` and every bias ``<name>.bias``;
the bare weight name is accepted on read.

:func:`table` gives an architecture's :class:`TensorTable`; the module-level names (``KINDS``,
``LAYER_TENSORS``, ``GLOBAL_TENSORS``, ``EXPERT_TENSORS``, ``F32_TENSORS``, :func:`expected_shapes`)
are Qwen3-MoE's, which moesnap knew first.  A bias is a kind of its own (``attn_q.bias``): it has
the weight's shape less the input dimension, feeds the same stage, and is F32 in real files (the
converter keeps every tensor not named ``.weight`` in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

WEIGHT_SUFFIX = ".weight"
BIAS_SUFFIX = ".bias"


class Dims(NamedTuple):
    """The dimensions tensor shapes depend on (a config's or a synthetic spec's)."""

    hidden: int
    q_dim: int       # query heads x head_dim
    kv_dim: int      # key-value heads x head_dim
    head_dim: int
    n_expert: int
    expert_ff: int
    vocab_size: int
    # DeepSeek's multi-head latent attention, dense layers and shared experts (0 where a family has none)
    n_head: int = 0
    o_dim: int = 0       # heads x value width: attn_output's input
    q_lora: int = 0
    kv_lora: int = 0
    rope_dim: int = 0
    v_dim: int = 0
    dense_ff: int = 0
    shexp_ff: int = 0
    qk_norm_whole: bool = False   # OLMoE: q/k norms over the whole projection


class TensorKind(NamedTuple):
    """One kind of tensor: its bare name (``attn_q``, ``attn_q.bias``; ``blk.N.`` prefix for per-layer
    ones), the stage it feeds first, and whether real files always store it as F32 (norms, router,
    biases, sinks)."""

    tensor: MODEL_TENSOR
    stage: str
    f32: bool
    bias: bool = False
    #: which files or layers hold it (:data:`WHEN`); "" everywhere
    when: str = ""

    @property
    def name(self) -> str:
        return TENSOR_NAMES[self.tensor].removeprefix("blk.{bid}.") + (BIAS_SUFFIX if self.bias else "")

    @property
    def per_layer(self) -> bool:
        return TENSOR_NAMES[self.tensor].startswith("blk.{bid}.")

    def gguf_name(self, layer: int | None = None) -> str:
        """The full GGUF name; a weight's without the ``.weight`` suffix (``blk.3.attn_q``,
        ``token_embd``), a bias's with ``.bias`` (``blk.3.attn_q.bias``)."""
        return TENSOR_NAMES[self.tensor].format(bid=layer) + (BIAS_SUFFIX if self.bias else "")

    def file_name(self, layer: int | None = None) -> str:
        """The name real files give it: ``blk.3.attn_q.weight``, ``blk.3.attn_q.bias``."""
        return self.gguf_name(layer) + ("" if self.bias else WEIGHT_SUFFIX)

    def shape(self, d: Dims) -> tuple[int, ...]:
        shape = _SHAPES[self.tensor](d)
        return shape[:-1] if self.bias else shape


#: where a kind of :data:`DEEPSEEK2` is: ``q_lora`` / ``no_q_lora`` (the q LoRA or one q projection),
#: ``kv_b`` / ``kv_split`` (one ``attn_kv_b`` or its split ``attn_k_b`` + ``attn_v_b``), ``dense`` / ``moe``
#: (the leading dense layers or the MoE ones), ``probs_bias`` (the V3 score-correction bias, MoE layers)
WHEN: tuple[str, ...] = ("", "q_lora", "no_q_lora", "kv_b", "kv_split", "dense", "moe", "probs_bias")

_T = MODEL_TENSOR
_SHAPES = {
    _T.TOKEN_EMBD: lambda d: (d.vocab_size, d.hidden),
    _T.OUTPUT_NORM: lambda d: (d.hidden,),
    _T.OUTPUT: lambda d: (d.vocab_size, d.hidden),
    _T.ATTN_NORM: lambda d: (d.hidden,),
    _T.ATTN_Q: lambda d: (d.q_dim, d.hidden),
    _T.ATTN_K: lambda d: (d.kv_dim, d.hidden),
    _T.ATTN_V: lambda d: (d.kv_dim, d.hidden),
    _T.ATTN_OUT: lambda d: (d.hidden, d.o_dim or d.q_dim),
    _T.ATTN_Q_NORM: lambda d: (d.q_dim if d.qk_norm_whole else d.head_dim,),
    _T.ATTN_K_NORM: lambda d: (d.kv_dim if d.qk_norm_whole else d.head_dim,),
    _T.ATTN_SINKS: lambda d: (d.q_dim // d.head_dim,),
    _T.ATTN_POST_NORM: lambda d: (d.hidden,),
    _T.FFN_NORM: lambda d: (d.hidden,),
    _T.FFN_GATE_INP: lambda d: (d.n_expert, d.hidden),
    _T.FFN_GATE_EXP: lambda d: (d.n_expert, d.expert_ff, d.hidden),
    _T.FFN_UP_EXP: lambda d: (d.n_expert, d.expert_ff, d.hidden),
    _T.FFN_DOWN_EXP: lambda d: (d.n_expert, d.hidden, d.expert_ff),
    # DeepSeek: attn_output reads heads x value width; q through a LoRA; the kv latent and its rope key
    _T.ATTN_Q_A: lambda d: (d.q_lora, d.hidden),
    _T.ATTN_Q_A_NORM: lambda d: (d.q_lora,),
    _T.ATTN_Q_B: lambda d: (d.q_dim, d.q_lora),
    _T.ATTN_KV_A_MQA: lambda d: (d.kv_lora + d.rope_dim, d.hidden),
    _T.ATTN_KV_A_NORM: lambda d: (d.kv_lora,),
    _T.ATTN_KV_B: lambda d: (d.n_head * (d.head_dim - d.rope_dim + d.v_dim), d.kv_lora),
    _T.ATTN_K_B: lambda d: (d.n_head, d.kv_lora, d.head_dim - d.rope_dim),   # transposed by the converter
    _T.ATTN_V_B: lambda d: (d.n_head, d.v_dim, d.kv_lora),
    _T.FFN_GATE: lambda d: (d.dense_ff, d.hidden),
    _T.FFN_UP: lambda d: (d.dense_ff, d.hidden),
    _T.FFN_DOWN: lambda d: (d.hidden, d.dense_ff),
    _T.FFN_GATE_SHEXP: lambda d: (d.shexp_ff, d.hidden),
    _T.FFN_UP_SHEXP: lambda d: (d.shexp_ff, d.hidden),
    _T.FFN_DOWN_SHEXP: lambda d: (d.hidden, d.shexp_ff),
    _T.FFN_EXP_PROBS_B: lambda d: (d.n_expert, 1),   # only its ".bias" exists: [E]
    _T.FFN_GATE_INP_SHEXP: lambda d: (d.hidden,),     # Qwen2-MoE: one logit per token (llama.cpp: {n_embd})
}


@dataclass(frozen=True)
class TensorTable:
    """One architecture's tensors, in the synthetic writer's file order (embedding, per-layer, head)."""

    arch: str                              # gguf-py's name: MODEL_ARCH_NAMES
    kinds: tuple[TensorKind, ...]
    #: the three expert matrices (gate, up, down), as the forwards ask for them
    expert_tensors: tuple[str, str, str] = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    @property
    def by_name(self) -> dict[str, TensorKind]:
        """Every kind, by bare name, in file order."""
        return {k.name: k for k in self.kinds}

    @property
    def layer_tensors(self) -> dict[str, str]:
        """Per-layer tensors (``blk.L.<name>``) and the stage each one feeds first."""
        return {k.name: k.stage for k in self.kinds if k.per_layer}

    @property
    def global_tensors(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kinds if not k.per_layer)

    @property
    def f32_tensors(self) -> frozenset[str]:
        """Kinds real files always store as F32."""
        return frozenset(k.name for k in self.kinds if k.f32)

    @property
    def expert_biases(self) -> tuple[str, ...]:
        """The experts' biases (``ffn_gate_exps.bias``, …) where the architecture has them, in
        :attr:`expert_tensors` order; empty otherwise."""
        names = self.by_name
        biases = tuple(n + BIAS_SUFFIX for n in self.expert_tensors)
        return biases if all(b in names for b in biases) else ()

    def has(self, name: str) -> bool:
        return name in self.by_name

    def in_layer(self, layer: int, where: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The per-layer kinds layer ``layer`` holds: those found everywhere and those whose
        :attr:`TensorKind.when` is in ``where`` (what a config says of that layer:
        :meth:`~moesnap.model.config.ModelConfig.layer_where`)."""
        return tuple(k.name for k in self.kinds if k.per_layer and (not k.when or k.when in where))

    def expected_shapes(self, d: Dims, n_layer: int,
                        where: Callable[[int], frozenset[str]] | None = None) -> dict[str, tuple[int, ...]]:
        """Numpy shape of every tensor of a file, by GGUF name without ``.weight``: the whole-model
        tensors, then layer by layer (``where(layer)``: which conditional kinds the layer holds)."""
        kinds = self.by_name
        out = {kinds[n].gguf_name(): kinds[n].shape(d) for n in self.global_tensors}
        for layer in range(n_layer):
            names = self.in_layer(layer, where(layer) if where else frozenset())
            out.update({kinds[n].gguf_name(layer): kinds[n].shape(d) for n in names})
        return out


def _table(arch: MODEL_ARCH, rows: list[tuple], unused: tuple[MODEL_TENSOR, ...] = ()) -> TensorTable:
    """``rows``: (tensor, stage, f32, bias[, when]); ``unused``: gguf-py's tensors of ``arch`` that
    converted files of the family do not hold."""
    assert {r[0] for r in rows} | set(unused) == set(MODEL_TENSORS[arch]), f"gguf-py's {arch.name} tensors changed"
    return TensorTable(MODEL_ARCH_NAMES[arch], tuple(TensorKind(*r) for r in rows))


QWEN3MOE = _table(MODEL_ARCH.QWEN3MOE, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False),
    (_T.ATTN_K, "k", False, False),
    (_T.ATTN_V, "v", False, False),
    (_T.ATTN_Q_NORM, "q_norm", True, False),
    (_T.ATTN_K_NORM, "k_norm", True, False),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.FFN_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, False),
    (_T.FFN_GATE_EXP, "expert_out", False, False),
    (_T.FFN_UP_EXP, "expert_out", False, False),
    (_T.FFN_DOWN_EXP, "expert_out", False, False),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
])

# gpt-oss: biases on q/k/v/o, the router and the experts; a learned sink logit per query head; the
# norm before the MoE is ``post_attention_norm`` (ATTN_POST_NORM), feeding our ``ffn_norm`` stage
GPT_OSS = _table(MODEL_ARCH.GPT_OSS, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False),
    (_T.ATTN_Q, "q", True, True),
    (_T.ATTN_K, "k", False, False),
    (_T.ATTN_K, "k", True, True),
    (_T.ATTN_V, "v", False, False),
    (_T.ATTN_V, "v", True, True),
    (_T.ATTN_SINKS, "attn", True, False),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.ATTN_OUT, "attn_out", True, True),
    (_T.ATTN_POST_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, True),
    (_T.FFN_GATE_EXP, "expert_out", False, False),
    (_T.FFN_GATE_EXP, "expert_out", True, True),
    (_T.FFN_UP_EXP, "expert_out", False, False),
    (_T.FFN_UP_EXP, "expert_out", True, True),
    (_T.FFN_DOWN_EXP, "expert_out", False, False),
    (_T.FFN_DOWN_EXP, "expert_out", True, True),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
])

# DeepSeek-V2/V3: multi-head latent attention (q through the LoRA ``attn_q_a`` -> ``attn_q_a_norm`` ->
# ``attn_q_b`` where the model has one, else ``attn_q``; ``attn_kv_a_mqa`` -> the compressed kv and the
# rope key; ``attn_kv_a_norm``; ``attn_kv_b`` or its split ``attn_k_b``/``attn_v_b``); leading dense
# layers (``ffn_gate``/``ffn_up``/``ffn_down``); in the MoE layers shared experts (``*_shexp``) and, in
# V3, the score-correction bias ``exp_probs_b.bias``.  gguf-py also lists ``rope_freqs``, ``attn_k``,
# ``attn_v`` and ``attn_rot_embd`` for the architecture; no converted DeepSeek file holds them.
DEEPSEEK2 = _table(MODEL_ARCH.DEEPSEEK2, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False, "no_q_lora"),
    (_T.ATTN_Q_A, "q_latent", False, False, "q_lora"),
    (_T.ATTN_Q_A_NORM, "q_latent_norm", True, False, "q_lora"),
    (_T.ATTN_Q_B, "q", False, False, "q_lora"),
    (_T.ATTN_KV_A_MQA, "kv_latent", False, False),
    (_T.ATTN_KV_A_NORM, "kv_latent_norm", True, False),
    (_T.ATTN_KV_B, "k", False, False, "kv_b"),
    (_T.ATTN_K_B, "k", False, False, "kv_split"),
    (_T.ATTN_V_B, "v", False, False, "kv_split"),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.FFN_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE, "dense_ffn_out", False, False, "dense"),
    (_T.FFN_UP, "dense_ffn_out", False, False, "dense"),
    (_T.FFN_DOWN, "dense_ffn_out", False, False, "dense"),
    (_T.FFN_GATE_INP, "router_logits", True, False, "moe"),
    (_T.FFN_EXP_PROBS_B, "router_select", True, True, "probs_bias"),
    (_T.FFN_GATE_EXP, "expert_out", False, False, "moe"),
    (_T.FFN_UP_EXP, "expert_out", False, False, "moe"),
    (_T.FFN_DOWN_EXP, "expert_out", False, False, "moe"),
    (_T.FFN_GATE_SHEXP, "shared_expert_out", False, False, "moe"),
    (_T.FFN_UP_SHEXP, "shared_expert_out", False, False, "moe"),
    (_T.FFN_DOWN_SHEXP, "shared_expert_out", False, False, "moe"),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
], unused=(_T.ROPE_FREQS, _T.ATTN_K, _T.ATTN_V, _T.ATTN_ROT_EMBD))

# Qwen2-MoE: biases on q/k/v (not o), no q/k norm; one shared expert (``*_shexp``) and its gate
# ``ffn_gate_inp_shexp`` (a [H] vector: the gate's logit of each token; F32 like the router)
QWEN2MOE = _table(MODEL_ARCH.QWEN2MOE, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False),
    (_T.ATTN_Q, "q", True, True),
    (_T.ATTN_K, "k", False, False),
    (_T.ATTN_K, "k", True, True),
    (_T.ATTN_V, "v", False, False),
    (_T.ATTN_V, "v", True, True),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.FFN_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, False),
    (_T.FFN_GATE_EXP, "expert_out", False, False),
    (_T.FFN_UP_EXP, "expert_out", False, False),
    (_T.FFN_DOWN_EXP, "expert_out", False, False),
    (_T.FFN_GATE_INP_SHEXP, "shared_gate", True, False),
    (_T.FFN_GATE_SHEXP, "shared_expert_out", False, False),
    (_T.FFN_UP_SHEXP, "shared_expert_out", False, False),
    (_T.FFN_DOWN_SHEXP, "shared_expert_out", False, False),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
])

# Mixtral: a ``llama`` file with experts.  gguf-py's llama also lists ``rope_freqs`` (Llama 3's RoPE
# scaling), ``attn_rot_embd`` and the dense ``ffn_gate``/``ffn_up``/``ffn_down`` (dense Llamas; old
# Mixtral conversions kept one ``ffn_gate.<e>`` per expert): no current Mixtral file holds them.
LLAMA = _table(MODEL_ARCH.LLAMA, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False),
    (_T.ATTN_K, "k", False, False),
    (_T.ATTN_V, "v", False, False),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.FFN_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, False),
    (_T.FFN_GATE_EXP, "expert_out", False, False),
    (_T.FFN_UP_EXP, "expert_out", False, False),
    (_T.FFN_DOWN_EXP, "expert_out", False, False),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
], unused=(_T.ROPE_FREQS, _T.ATTN_ROT_EMBD, _T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN))

# OLMoE: Qwen3-MoE's tensors, its q/k norms over the whole projection ([Hq*D], [Hkv*D])
OLMOE = _table(MODEL_ARCH.OLMOE, [
    (_T.TOKEN_EMBD, "embed", False, False),
    (_T.ATTN_NORM, "attn_norm", True, False),
    (_T.ATTN_Q, "q", False, False),
    (_T.ATTN_K, "k", False, False),
    (_T.ATTN_V, "v", False, False),
    (_T.ATTN_Q_NORM, "q_norm", True, False),
    (_T.ATTN_K_NORM, "k_norm", True, False),
    (_T.ATTN_OUT, "attn_out", False, False),
    (_T.FFN_NORM, "ffn_norm", True, False),
    (_T.FFN_GATE_INP, "router_logits", True, False),
    (_T.FFN_GATE_EXP, "expert_out", False, False),
    (_T.FFN_UP_EXP, "expert_out", False, False),
    (_T.FFN_DOWN_EXP, "expert_out", False, False),
    (_T.OUTPUT_NORM, "final_norm", True, False),
    (_T.OUTPUT, "logits", False, False),
])

#: every architecture moesnap reads, by gguf-py's name
TABLES: dict[str, TensorTable] = {t.arch: t for t in (QWEN3MOE, GPT_OSS, DEEPSEEK2, QWEN2MOE, LLAMA, OLMOE)}


def table(arch: str) -> TensorTable:
    """The tensor table of ``arch`` (gguf-py's name, a config's ``arch``); KeyError for one moesnap
    does not know (:meth:`~moesnap.model.config.ModelConfig.from_gguf` refuses those first)."""
    return TABLES[arch]


# Qwen3-MoE's table under the names the code written for it uses
#: every kind, by bare name, in file order
KINDS: dict[str, TensorKind] = QWEN3MOE.by_name
#: per-layer tensors (``blk.L.<name>``) and the stage each one feeds first
LAYER_TENSORS: dict[str, str] = QWEN3MOE.layer_tensors
#: whole-model tensors
GLOBAL_TENSORS: tuple[str, ...] = QWEN3MOE.global_tensors
#: the three expert matrices (gate, up, down)
EXPERT_TENSORS: tuple[str, ...] = QWEN3MOE.expert_tensors
#: kinds real files always store as F32
F32_TENSORS: frozenset[str] = QWEN3MOE.f32_tensors


def expected_shapes(d: Dims, n_layer: int) -> dict[str, tuple[int, ...]]:
    """Qwen3-MoE's :meth:`TensorTable.expected_shapes`."""
    return QWEN3MOE.expected_shapes(d, n_layer)
