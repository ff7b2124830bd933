"""Known bugs planted into one layer of an HF transformers ``Qwen3MoeForCausalLM``.

Each :class:`Bug` patches one model *instance* in place -- a hook on one
module, an attribute of one module (``scaling``, ``variance_epsilon``), a
weight edited in place, or one layer's attention/router ``forward`` replaced
by a copy of transformers' own with a single change -- and records the
(layer, stage) where moesnap must name it first: the first stage, in
:data:`moesnap.stages.LAYER_STAGES` order, whose value the bug changes *among
the stages a hook capture can see* (``q_rope``, ``k_rope`` and ``expert_out``
are not captured, so a RoPE bug is first visible at ``attn`` and an expert bug
at ``moe_out``).

Where a bug cannot be seen in some dtype, its expectation says so
(``Expect(None, why)``) instead of leaving it out.

Nothing here imports moesnap except :func:`moesnap.gguf.quants_torch.decode_as` for
the "Q6_K bytes read as Q4_K" bug (the same wrong decoding the candidate's
``--inject qtype`` uses).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Plant:
    """Where to plant: the layer, the expert for per-expert bugs, the GGUF for weight-decoding bugs."""

    layer: int
    expert: int = 0
    gguf: Path | None = None


@dataclass(frozen=True)
class Expect:
    """What ``moesnap compare`` must say about a bug in one dtype.

    ``stage``: the stage of the planted layer it must name first.  ``None``:
    the bug is below that dtype's own rounding and may go unnoticed (``why``
    says why); if it is noticed it must still be named at the bug's stage.
    """

    stage: str | None
    why: str = ""


@dataclass(frozen=True)
class Bug:
    name: str
    family: str
    plant: Callable[[nn.Module, Plant], None]
    stage: str                               # first visible stage the bug changes (every dtype by default)
    doc: str
    per_dtype: dict[str, Expect] = field(default_factory=dict)   # overrides, with the reason

    def expect(self, dtype: str) -> Expect:
        return self.per_dtype.get(dtype, Expect(self.stage))


# ---------------------------------------------------------------- helpers


def _layer(model: nn.Module, p: Plant) -> nn.Module:
    return model.model.layers[p.layer]


def _hf():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    return m


def _rope_neox(q, k, cos, sin):
    """transformers' own ``apply_rotary_pos_emb`` (rotate-half pairs ``(i, i + D/2)``)."""
    return _hf().apply_rotary_pos_emb(q, k, cos, sin)


def _rope_interleaved(q, k, cos, sin):
    """GPT-J RoPE: pairs ``(2i, 2i+1)`` rotated by frequency ``i`` (the wrong layout for Qwen3)."""
    half = cos.shape[-1] // 2
    c = cos[..., :half].repeat_interleave(2, dim=-1).unsqueeze(1)   # [B, 1, T, D]
    s = sin[..., :half].repeat_interleave(2, dim=-1).unsqueeze(1)

    def rot(x):  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    return q * c + rot(q) * s, k * c + rot(k) * s


def _attention_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, *,
                       rope=_rope_neox, norm_after_rope: bool = False, **kwargs):
    """A copy of ``Qwen3MoeAttention.forward`` (transformers 5.24) with two knobs.

    With the defaults it computes exactly what transformers does (checked by
    ``test_planted_attention_forward_is_transformers``).  Submodules are called as
    transformers calls them, so capture hooks on them see the same tensors.
    """
    m = _hf()
    if cache is not None:
        raise NotImplementedError("planted attention runs without a KV cache")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)                    # [B, T, Hq, D]
    k = self.k_proj(hidden_states).view(hidden_shape)                    # [B, T, Hkv, D]
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)    # [B, Hkv, T, D]
    cos, sin = position_embeddings
    if norm_after_rope:
        q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)     # [B, H, T, D]
        q = self.q_norm(q.transpose(1, 2)).transpose(1, 2)
        k = self.k_norm(k.transpose(1, 2)).transpose(1, 2)
    else:
        q, k = rope(self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), cos, sin)
    attention = m.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, m.eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                             sliding_window=self.sliding_window)
    out = out.reshape(*input_shape, -1).contiguous()                     # [B, T, Hq*D]
    return self.o_proj(out), weights


def _replace_attention(model, p: Plant, **knobs) -> None:
    att = _layer(model, p).self_attn
    att.forward = types.MethodType(lambda self, *a, **kw: _attention_forward(self, *a, **kw, **knobs), att)


def _router_forward(self, hidden_states, *, softmax_dtype: torch.dtype = torch.float32, renorm: bool = True,
                    reverse_pairing: bool = False):
    """A copy of ``Qwen3MoeTopKRouter.forward`` (transformers 5.24) with three knobs (defaults: transformers)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)                                 # [T, E]
    probs = torch.softmax(router_logits.to(softmax_dtype), dim=-1)
    top, index = torch.topk(probs, self.top_k, dim=-1)                                   # [T, k]
    if renorm:
        top = top / top.sum(dim=-1, keepdim=True)
    if reverse_pairing:
        top = top.flip(-1)   # weights paired with the wrong ids (largest weight on the k-th expert)
    return router_logits, top.to(router_logits.dtype), index


def _replace_router(model, p: Plant, **knobs) -> None:
    gate = _layer(model, p).mlp.gate
    gate.forward = types.MethodType(lambda self, h: _router_forward(self, h, **knobs), gate)


# ---------------------------------------------------------------- the bugs: attention


def rope_theta_x2(model, p: Plant) -> None:
    """The layer's RoPE uses base 2*theta: its (cos, sin) are recomputed on the way in."""
    att = _layer(model, p).self_attn
    theta = float(model.config.rope_parameters["rope_theta"]) * 2
    D = att.head_dim

    def hook(mod, args, kwargs):
        cos, sin = kwargs["position_embeddings"]                                        # [B, T, D]
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(cos.shape[-2], device=cos.device)[None]
        inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=cos.device) / D))
        freqs = pos[..., None].float() * inv                                             # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return args, {**kwargs, "position_embeddings": (emb.cos().to(cos.dtype), emb.sin().to(sin.dtype))}

    att.register_forward_pre_hook(hook, with_kwargs=True)


def rope_interleaved(model, p: Plant) -> None:
    _replace_attention(model, p, rope=_rope_interleaved)


def qk_norm_skipped(model, p: Plant) -> None:
    att = _layer(model, p).self_attn
    att.q_norm, att.k_norm = nn.Identity(), nn.Identity()


def qk_norm_after_rope(model, p: Plant) -> None:
    _replace_attention(model, p, norm_after_rope=True)


def softmax_scale_1_over_d(model, p: Plant) -> None:
    att = _layer(model, p).self_attn
    att.scaling = 1.0 / att.head_dim


def softmax_scale_x1_1(model, p: Plant) -> None:
    att = _layer(model, p).self_attn
    att.scaling = att.scaling * 1.1


def causal_mask_off(model, p: Plant) -> None:
    """Every token attends to every token of the prompt (the layer gets no mask)."""
    _layer(model, p).self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": None}), with_kwargs=True)


# ---------------------------------------------------------------- norms


def rms_eps_1e_2(model, p: Plant) -> None:
    _layer(model, p).input_layernorm.variance_epsilon = 1e-2


def rms_weight_offset(model, p: Plant) -> None:
    """Gemma-style ``x * (1 + w)`` applied to Qwen3's plain ``w`` (post-attention norm)."""
    with torch.no_grad():
        _layer(model, p).post_attention_layernorm.weight.add_(1.0)


# ---------------------------------------------------------------- router


def router_softmax_bf16(model, p: Plant) -> None:
    _replace_router(model, p, softmax_dtype=torch.bfloat16)


def router_softmax_fp16(model, p: Plant) -> None:
    _replace_router(model, p, softmax_dtype=torch.float16)


def router_no_renorm(model, p: Plant) -> None:
    _replace_router(model, p, renorm=False)


def router_pairing_reversed(model, p: Plant) -> None:
    _replace_router(model, p, reverse_pairing=True)


# ---------------------------------------------------------------- experts


def expert_scale(factor: float) -> Callable[[nn.Module, Plant], None]:
    def plant(model, p: Plant) -> None:
        with torch.no_grad():
            _layer(model, p).mlp.experts.down_proj[p.expert].mul_(factor)   # [H, F]: output scaled by factor

    plant.__name__ = f"expert_scale_{factor:g}"
    return plant


def expert_nan(model, p: Plant) -> None:
    with torch.no_grad():
        _layer(model, p).mlp.experts.down_proj[p.expert].fill_(float("nan"))


def q6k_read_as_q4k(model, p: Plant) -> None:
    """The layer's ``ffn_down_exps`` (Q6_K in the file) decoded with the Q4_K routine, row stride kept."""
    from gguf import GGMLQuantizationType as QT, GGUFReader

    from moesnap.gguf.quants_torch import decode_as

    if p.gguf is None:
        raise ValueError("q6k_read_as_q4k needs the GGUF file")
    name = f"blk.{p.layer}.ffn_down_exps"
    t = next((t for t in GGUFReader(str(p.gguf)).tensors if t.name.removesuffix(".weight") == name), None)
    if t is None or t.tensor_type != QT.Q6_K:
        raise ValueError(f"{p.gguf}: {name} is {None if t is None else t.tensor_type.name}, not Q6_K")
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))                 # [E, H, bytes per row]
    wrong = decode_as(raw, QT.Q6_K, QT.Q4_K)                                 # [E, H, F]
    down = _layer(model, p).mlp.experts.down_proj
    if tuple(wrong.shape) != tuple(down.shape):
        raise ValueError(f"{name}: decoded {tuple(wrong.shape)} != down_proj {tuple(down.shape)}")
    with torch.no_grad():
        down.copy_(wrong.to(down.dtype))


def gate_up_swapped(model, p: Plant) -> None:
    with torch.no_grad():
        gu = _layer(model, p).mlp.experts.gate_up_proj                       # [E, 2F, H], gate rows first
        F_ = gu.shape[1] // 2
        gu.copy_(torch.cat([gu[:, F_:], gu[:, :F_]], dim=1))


# ---------------------------------------------------------------- residual


def attn_residual_doubled(model, p: Plant) -> None:
    """``attn_resid = 2 * residual + attn_out``: the residual is added inside and after attention."""
    layer = _layer(model, p)
    seen: dict[str, torch.Tensor] = {}

    def keep(mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    layer.register_forward_pre_hook(keep, with_kwargs=True)
    layer.self_attn.register_forward_hook(lambda mod, args, out: (out[0] + seen["x"], *out[1:]))


def ffn_residual_dropped(model, p: Plant) -> None:
    """``layer_out = moe_out`` (the residual around the MoE block is lost)."""
    layer = _layer(model, p)
    seen: dict[str, torch.Tensor] = {}
    layer.mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("moe", out))
    layer.register_forward_hook(lambda mod, args, out: seen["moe"])


# ---------------------------------------------------------------- the catalogue

# bfloat16 figures: World(seed=11), layer 3, local re-reference, relative L2 error at the bug's stage
# of a clean bfloat16 transformers run and of the planted one (float32 golden).

BUGS: tuple[Bug, ...] = (
    Bug("rope_theta_x2", "attention", rope_theta_x2, "attn",
        "RoPE base 2*theta in one layer; q_rope/k_rope are not captured, so it shows at attn (token >= 1)"),
    Bug("rope_interleaved", "attention", rope_interleaved, "attn",
        "GPT-J interleaved pairs instead of NeoX halves; first visible at attn"),
    Bug("qk_norm_skipped", "attention", qk_norm_skipped, "q_norm", "q_norm and k_norm left out"),
    Bug("qk_norm_after_rope", "attention", qk_norm_after_rope, "q_norm",
        "q/k RMSNorm applied after RoPE: the q_norm module's output is norm(rope(q)) (differs from token 1 on)"),
    Bug("softmax_scale_1_over_d", "attention", softmax_scale_1_over_d, "attn", "attention scale 1/D, not 1/sqrt(D)"),
    Bug("softmax_scale_x1_1", "attention", softmax_scale_x1_1, "attn", "attention scale 1.1/sqrt(D)"),
    Bug("causal_mask_off", "attention", causal_mask_off, "attn", "no causal mask in one layer"),
    Bug("rms_eps_1e-2", "norm", rms_eps_1e_2, "attn_norm", "input RMSNorm epsilon 1e-2 instead of 1e-6",
        {"bfloat16": Expect(None, "attn_norm shrinks by ~0.2 % (float32 rel_l2 2e-3): under bfloat16's own "
                                  "rounding there (clean rel_l2 3.0e-3, planted 3.7e-3)")}),
    Bug("rms_weight_offset", "norm", rms_weight_offset, "ffn_norm", "post-attention RMSNorm computes x*(1+w)"),
    Bug("router_softmax_bf16", "router", router_softmax_bf16, "topk_weights",
        "router softmax and renormalisation in bfloat16 (router_logits unchanged)",
        {"bfloat16": Expect(None, "a bfloat16 engine rounds its top-k weights to bfloat16 anyway (transformers "
                                  "casts them to the logits' dtype): topk_weights rel_l2 2.0e-3 vs 1.5e-3 clean")}),
    Bug("router_softmax_fp16", "router", router_softmax_fp16, "topk_weights",
        "router softmax and renormalisation in float16 (router_logits unchanged)",
        {"bfloat16": Expect(None, "float16 rounding of the weights is finer than the bfloat16 rounding every "
                                  "bfloat16 engine applies to them")}),
    Bug("router_no_renorm", "router", router_no_renorm, "topk_weights", "top-k weights not renormalised"),
    Bug("router_pairing_reversed", "router", router_pairing_reversed, "topk_weights",
        "top-k weights reversed against their expert ids"),
    Bug("expert_scale_3pct", "experts", expert_scale(1.03), "moe_out",
        "the most used expert's output x1.03; expert_out is not captured, so it shows at moe_out",
        {"bfloat16": Expect(None, "moe_out rel_l2 1.5e-2 vs 5.5e-3 clean (2.7x): near bfloat16's own noise; "
                                  "benchmarks/bench_sensitivity.py measures the smallest factor caught")}),
    Bug("expert_nan", "experts", expert_nan, "moe_out", "NaN weights in the most used expert"),
    Bug("q6k_read_as_q4k", "experts", q6k_read_as_q4k, "moe_out",
        "the layer's Q6_K ffn_down_exps bytes decoded as Q4_K"),
    Bug("gate_up_swapped", "experts", gate_up_swapped, "moe_out", "gate and up projections swapped"),
    Bug("attn_residual_doubled", "residual", attn_residual_doubled, "attn_resid",
        "the attention residual added twice"),
    Bug("ffn_residual_dropped", "residual", ffn_residual_dropped, "layer_out", "the MoE residual dropped"),
)

BY_NAME: dict[str, Bug] = {b.name: b for b in BUGS}
