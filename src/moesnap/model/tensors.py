"""The tensors of a MoE GGUF file, one table per architecture: for the loader, the synthetic writer,
the injector and the candidate.  The tables are built from data: what each tensor feeds and its shape
(the same in every family), Qwen3-MoE's tensors in file order, and each family's edits of them (what it
drops, which weights have a bias, what it adds where, which layers hold what).

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
from typing import Callable, Mapping, NamedTuple

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
        shape = _FEEDS[self.tensor].shape(d)
        return shape[:-1] if self.bias else shape


#: where a kind of DeepSeek's table is: ``q_lora`` / ``no_q_lora`` (the q LoRA or one q projection),
#: ``kv_b`` / ``kv_split`` (one ``attn_kv_b`` or its split ``attn_k_b`` + ``attn_v_b``), ``dense`` / ``moe``
#: (the leading dense layers or the MoE ones), ``probs_bias`` (the V3 score-correction bias, MoE layers)
WHEN: tuple[str, ...] = ("", "q_lora", "no_q_lora", "kv_b", "kv_split", "dense", "moe", "probs_bias")

_T = MODEL_TENSOR


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


class _Feeds(NamedTuple):
    """What one tensor is in every family: the stage it feeds first, whether real files store it as F32,
    and its numpy shape from the dimensions."""

    stage: str
    f32: bool
    shape: Callable[[Dims], tuple[int, ...]]


_FEEDS: dict[MODEL_TENSOR, _Feeds] = {
    _T.TOKEN_EMBD: _Feeds("embed", False, lambda d: (d.vocab_size, d.hidden)),
    _T.OUTPUT_NORM: _Feeds("final_norm", True, lambda d: (d.hidden,)),
    _T.OUTPUT: _Feeds("logits", False, lambda d: (d.vocab_size, d.hidden)),
    _T.ATTN_NORM: _Feeds("attn_norm", True, lambda d: (d.hidden,)),
    _T.ATTN_Q: _Feeds("q", False, lambda d: (d.q_dim, d.hidden)),
    _T.ATTN_K: _Feeds("k", False, lambda d: (d.kv_dim, d.hidden)),
    _T.ATTN_V: _Feeds("v", False, lambda d: (d.kv_dim, d.hidden)),
    _T.ATTN_OUT: _Feeds("attn_out", False, lambda d: (d.hidden, d.o_dim or d.q_dim)),
    _T.ATTN_Q_NORM: _Feeds("q_norm", True, lambda d: (d.q_dim if d.qk_norm_whole else d.head_dim,)),
    _T.ATTN_K_NORM: _Feeds("k_norm", True, lambda d: (d.kv_dim if d.qk_norm_whole else d.head_dim,)),
    # gpt-oss: a learned sink logit per query head, felt in ``attn``; the norm before its MoE is
    # ``post_attention_norm``, feeding our ``ffn_norm`` stage
    _T.ATTN_SINKS: _Feeds("attn", True, lambda d: (d.q_dim // d.head_dim,)),
    _T.ATTN_POST_NORM: _Feeds("ffn_norm", True, lambda d: (d.hidden,)),
    _T.FFN_NORM: _Feeds("ffn_norm", True, lambda d: (d.hidden,)),
    _T.FFN_GATE_INP: _Feeds("router_logits", True, lambda d: (d.n_expert, d.hidden)),
    _T.FFN_GATE_EXP: _Feeds("expert_out", False, lambda d: (d.n_expert, d.expert_ff, d.hidden)),
    _T.FFN_UP_EXP: _Feeds("expert_out", False, lambda d: (d.n_expert, d.expert_ff, d.hidden)),
    _T.FFN_DOWN_EXP: _Feeds("expert_out", False, lambda d: (d.n_expert, d.hidden, d.expert_ff)),
    # DeepSeek: attn_output reads heads x value width; q through a LoRA; the kv latent and its rope key
    _T.ATTN_Q_A: _Feeds("q_latent", False, lambda d: (d.q_lora, d.hidden)),
    _T.ATTN_Q_A_NORM: _Feeds("q_latent_norm", True, lambda d: (d.q_lora,)),
    _T.ATTN_Q_B: _Feeds("q", False, lambda d: (d.q_dim, d.q_lora)),
    _T.ATTN_KV_A_MQA: _Feeds("kv_latent", False, lambda d: (d.kv_lora + d.rope_dim, d.hidden)),
    _T.ATTN_KV_A_NORM: _Feeds("kv_latent_norm", True, lambda d: (d.kv_lora,)),
    _T.ATTN_KV_B: _Feeds("k", False, lambda d: (d.n_head * (d.head_dim - d.rope_dim + d.v_dim), d.kv_lora)),
    _T.ATTN_K_B: _Feeds("k", False, lambda d: (d.n_head, d.kv_lora, d.head_dim - d.rope_dim)),  # transposed
    _T.ATTN_V_B: _Feeds("v", False, lambda d: (d.n_head, d.v_dim, d.kv_lora)),
    _T.FFN_GATE: _Feeds("dense_ffn_out", False, lambda d: (d.dense_ff, d.hidden)),
    _T.FFN_UP: _Feeds("dense_ffn_out", False, lambda d: (d.dense_ff, d.hidden)),
    _T.FFN_DOWN: _Feeds("dense_ffn_out", False, lambda d: (d.hidden, d.dense_ff)),
    _T.FFN_EXP_PROBS_B: _Feeds("router_select", True, lambda d: (d.n_expert, 1)),   # only its ".bias": [E]
    # the shared experts (DeepSeek, Qwen2-MoE) and Qwen2-MoE's gate of them: one logit per token
    _T.FFN_GATE_SHEXP: _Feeds("shared_expert_out", False, lambda d: (d.shexp_ff, d.hidden)),
    _T.FFN_UP_SHEXP: _Feeds("shared_expert_out", False, lambda d: (d.shexp_ff, d.hidden)),
    _T.FFN_DOWN_SHEXP: _Feeds("shared_expert_out", False, lambda d: (d.hidden, d.shexp_ff)),
    _T.FFN_GATE_INP_SHEXP: _Feeds("shared_gate", True, lambda d: (d.hidden,)),   # llama.cpp: {n_embd}
}
#: tensors whose ``.bias`` alone exists (no weight)
_BIAS_ONLY = frozenset({_T.FFN_EXP_PROBS_B})

#: Qwen3-MoE's tensors in file order, which every family's table edits (:class:`_Family`)
_BASE: tuple[MODEL_TENSOR, ...] = (
    _T.TOKEN_EMBD, _T.ATTN_NORM, _T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_Q_NORM, _T.ATTN_K_NORM, _T.ATTN_OUT,
    _T.FFN_NORM, _T.FFN_GATE_INP, _T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP, _T.OUTPUT_NORM, _T.OUTPUT)
_QK_NORM = (_T.ATTN_Q_NORM, _T.ATTN_K_NORM)
_EXPERTS = (_T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP)
_SHARED = (_T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP, _T.FFN_DOWN_SHEXP)
_DENSE = (_T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN)


class _Family(NamedTuple):
    """A family's tensors as edits of :data:`_BASE`: ``drop`` these, give ``biases`` a ``.bias`` right
    after the weight, put ``after[t]`` after ``t`` (and its bias); ``when`` (:data:`WHEN`) says which
    files or layers hold a tensor; ``unused``: gguf-py's tensors of ``arch`` that converted files of the
    family do not hold."""

    arch: MODEL_ARCH
    drop: tuple[MODEL_TENSOR, ...] = ()
    biases: tuple[MODEL_TENSOR, ...] = ()
    after: Mapping[MODEL_TENSOR, tuple[MODEL_TENSOR, ...]] = {}
    when: Mapping[MODEL_TENSOR, str] = {}
    unused: tuple[MODEL_TENSOR, ...] = ()

    def table(self) -> TensorTable:
        kinds: list[TensorKind] = []
        todo = [t for t in _BASE if t not in self.drop]
        while todo:
            t = todo.pop(0)
            stage, f32, _ = _FEEDS[t]
            when = self.when.get(t, "")
            if t not in _BIAS_ONLY:
                kinds.append(TensorKind(t, stage, f32, False, when))
            if t in self.biases or t in _BIAS_ONLY:
                kinds.append(TensorKind(t, stage, True, True, when))
            todo[:0] = self.after.get(t, ())
        assert {k.tensor for k in kinds} | set(self.unused) == set(MODEL_TENSORS[self.arch]), \
            f"gguf-py's {self.arch.name} tensors changed"
        return TensorTable(MODEL_ARCH_NAMES[self.arch], tuple(kinds))


_FAMILIES: tuple[_Family, ...] = (
    _Family(MODEL_ARCH.QWEN3MOE),
    # gpt-oss: biases on q/k/v/o, the router and the experts; a sink logit per query head; no q/k norm;
    # post_attention_norm in place of ffn_norm
    _Family(MODEL_ARCH.GPT_OSS, drop=(*_QK_NORM, _T.FFN_NORM),
            biases=(_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT, _T.FFN_GATE_INP, *_EXPERTS),
            after={_T.ATTN_V: (_T.ATTN_SINKS,), _T.ATTN_OUT: (_T.ATTN_POST_NORM,)}),
    # DeepSeek-V2/V3: multi-head latent attention (q through the LoRA ``attn_q_a`` -> ``attn_q_a_norm`` ->
    # ``attn_q_b`` where the model has one, else ``attn_q``; ``attn_kv_a_mqa`` -> the compressed kv and the
    # rope key; ``attn_kv_a_norm``; ``attn_kv_b`` or its split ``attn_k_b``/``attn_v_b``); leading dense
    # layers (``ffn_gate``/``ffn_up``/``ffn_down``); in the MoE layers shared experts and, in V3, the
    # score-correction bias ``exp_probs_b.bias``.  gguf-py also lists ``rope_freqs``, ``attn_k``,
    # ``attn_v`` and ``attn_rot_embd`` for the architecture; no converted DeepSeek file holds them.
    _Family(MODEL_ARCH.DEEPSEEK2, drop=(_T.ATTN_K, _T.ATTN_V, *_QK_NORM),
            after={_T.ATTN_Q: (_T.ATTN_Q_A, _T.ATTN_Q_A_NORM, _T.ATTN_Q_B, _T.ATTN_KV_A_MQA, _T.ATTN_KV_A_NORM,
                               _T.ATTN_KV_B, _T.ATTN_K_B, _T.ATTN_V_B),
                   _T.FFN_NORM: _DENSE, _T.FFN_GATE_INP: (_T.FFN_EXP_PROBS_B,), _T.FFN_DOWN_EXP: _SHARED},
            when={_T.ATTN_Q: "no_q_lora", **dict.fromkeys((_T.ATTN_Q_A, _T.ATTN_Q_A_NORM, _T.ATTN_Q_B), "q_lora"),
                  _T.ATTN_KV_B: "kv_b", _T.ATTN_K_B: "kv_split", _T.ATTN_V_B: "kv_split",
                  **dict.fromkeys(_DENSE, "dense"), **dict.fromkeys((_T.FFN_GATE_INP, *_EXPERTS, *_SHARED), "moe"),
                  _T.FFN_EXP_PROBS_B: "probs_bias"},
            unused=(_T.ROPE_FREQS, _T.ATTN_K, _T.ATTN_V, _T.ATTN_ROT_EMBD)),
    # Qwen2-MoE: biases on q/k/v (not o), no q/k norm; one shared expert and its gate
    # ``ffn_gate_inp_shexp`` (a [H] vector: the gate's logit of each token; F32 like the router)
    _Family(MODEL_ARCH.QWEN2MOE, drop=_QK_NORM, biases=(_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V),
            after={_T.FFN_DOWN_EXP: (_T.FFN_GATE_INP_SHEXP, *_SHARED)}),
    # Mixtral: a ``llama`` file with experts, no q/k norm.  gguf-py's llama also lists ``rope_freqs``
    # (Llama 3's RoPE scaling), ``attn_rot_embd`` and the dense ``ffn_gate``/``ffn_up``/``ffn_down`` (dense
    # Llamas; old Mixtral conversions kept one ``ffn_gate.<e>`` per expert): no current Mixtral file holds them.
    _Family(MODEL_ARCH.LLAMA, drop=_QK_NORM, unused=(_T.ROPE_FREQS, _T.ATTN_ROT_EMBD, *_DENSE)),
    # OLMoE: Qwen3-MoE's tensors, its q/k norms over the whole projection ([Hq*D], [Hkv*D])
    _Family(MODEL_ARCH.OLMOE),
)

#: every architecture moesnap reads, by gguf-py's name
TABLES: dict[str, TensorTable] = {t.arch: t for t in (f.table() for f in _FAMILIES)}
QWEN3MOE = TABLES[MODEL_ARCH_NAMES[MODEL_ARCH.QWEN3MOE]]


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
