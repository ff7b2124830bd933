"""Local re-reference: judge each layer of another engine's dump on that engine's own input.

A free-running comparison judges what the engine *carries*: once a bfloat16
engine picks other experts at a near tie, causal attention spreads the
difference and the later layers cannot be held to the golden any more.  Here
the reference instead recomputes every layer ``L`` from the engine's own input
to it (its ``layer_out`` of ``L - 1``, or its ``embed`` for layer 0) and the
engine's layer-``L`` stages are judged against that: the error each layer
**introduces**, with every token judged in every layer.

It goes further, stage by stage: each stage is recomputed from the engine's
own value of the stage before it, where the dump holds that stage (``q`` from
its ``attn_norm``, ``attn`` from its ``q_rope``/``k_rope``/``v``, ``moe_out``
from its ``topk_weights`` and ``expert_out``, ``layer_out`` from its
``attn_resid`` and ``moe_out``...), and from the reference's own value where
the dump lacks it (transformers' hooks see no ``q_rope`` or ``expert_out``).
So every judged difference is the error of one operation in the engine's
precision, not the sum of a layer's, and a bug is named at the stage that
makes it, with bfloat16 tolerances for one operation's rounding.

Where the engine chose other experts than the reference's own router at a near
tie (``tie_gap`` of the engine's set under the reference's router logits within
``tie_tol``), the reference follows the engine's experts, records its own
choice in ``router_followed`` and the comparison reports ``ROUTING_TIE``; a
wider gap keeps the reference's experts and is a divergence.  ``final_norm`` is
recomputed from the engine's last ``layer_out`` and ``logits`` from its
``final_norm``.  A layer whose input the dump lacks is not recomputed; the
caller says so (it is judged free-running only).

For a ggml engine (``aq``: :class:`~moesnap.model.ggml.ActivationQuant`) every matmul input is
rounded to 8 bits as ggml rounds it, and in llama.cpp's dump every such input but one is the
engine's own stage, so those roundings agree bit for bit.  The one exception is an expert's down-projection input (the SwiGLU
output, no stage): the reference computes it with its own float32 sums, and where a product
``scale * x`` of it falls within that noise of a half the two round it to neighbouring quants (one
step: ~4e-3 of the row).  There the reference takes the engine's rounding of those elements only
(:func:`_follow_rounding`), and a note says which.

The judge does not wait for the whole of it: :class:`LocalReference` makes it layer by layer on a
thread of its own, on the host or a CUDA device, while the judge reads the layers already made.

Memory: one layer's weights at a time (the reference's lazy loader); the
recomputed stages take what one golden case takes.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..case import Case
from ..judge.routing import tie_gap
from ..model.config import ModelConfig
from ..model.families import apply_rope, expert_act, route, route_grouped
from ..errors import GoldenError
from ..model.recorder import ArrayRecorder
from ..model.ggml import ActivationQuant, identity, near_halves, near_scale_halves
from ..model.reference import (ActQuant, RMSNorm, Transformer, _linear, causal_attention, expert_outputs,
                               rope_cos_sin, swiglu_mlp)
from ..stages import LAYER_STAGES, stages_of_layer
from ..model.tensors import table
from ..model.weights import LayerWeights, ModelWeights
from .rereference_device import DeviceWeights, exact_matmuls

Progress = Callable[[int, int], None]
_HOST = torch.device("cpu")


def _input_of(candidate: Case, layer: int) -> tuple[np.ndarray | None, str]:
    if layer == 0:
        return candidate.model.get("embed"), "embed"
    return candidate.stage("layer_out", layer - 1), f"layer_out of layer {layer - 1}"


class _Engine:
    """The engine's own values of one layer's stages, as float32 tensors (on ``device``) where usable."""

    def __init__(self, candidate: Case, layer: int, device: torch.device = _HOST) -> None:
        self.case, self.layer, self.device = candidate, layer, device

    def get(self, stage: str, like: torch.Tensor) -> torch.Tensor | None:
        a = self.case.stage(stage, self.layer)
        if a is None or a.dtype.kind != "f" or tuple(a.shape) != tuple(like.shape) or not np.isfinite(a).all():
            return None
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def or_own(self, stage: str, own: torch.Tensor) -> torch.Tensor:
        """The engine's value of ``stage`` where it has a usable one, else the reference's."""
        mine = self.get(stage, own)
        return own if mine is None else mine

    def ids(self, T: int, k: int, n_expert: int) -> np.ndarray | None:
        a = self.case.stage("topk_ids", self.layer)
        if a is None or a.dtype.kind not in "iu" or a.shape != (T, k):
            return None
        return a.astype(np.int64)


def _follow(own_ids: torch.Tensor, logits: torch.Tensor, cand: np.ndarray | None, n_expert: int,
            tie_tol: float, layer: int, followed: list) -> torch.Tensor:
    """Take the engine's expert set where it differs from the reference's own at a near tie."""
    if cand is None:
        return own_ids
    own = own_ids.cpu().numpy()
    differ = np.flatnonzero((np.sort(own, axis=1) != np.sort(cand, axis=1)).any(axis=1))
    out = own_ids.clone()
    lg = logits.cpu().numpy()
    for t in differ.tolist():
        row = cand[t]
        if len(set(row.tolist())) != row.size or row.min() < 0 or row.max() >= n_expert:
            continue
        if tie_gap(lg[t], row) <= tie_tol:
            followed.append([layer, t, [int(e) for e in own[t]]])
            out[t] = torch.from_numpy(row).to(out.device)
    return out


def _by_ids(values: torch.Tensor | None, ids_from: np.ndarray | None, ids_to: torch.Tensor) -> torch.Tensor | None:
    """The engine's per-expert ``values [T, k, ...]`` put in the slot order of ``ids_to``, where every
    token's two id sets agree; None otherwise."""
    if values is None or ids_from is None:
        return None
    to = ids_to.cpu().numpy()
    if not (np.sort(ids_from, axis=1) == np.sort(to, axis=1)).all():
        return None
    pos = np.argsort(ids_from, axis=1)[np.arange(to.shape[0])[:, None], np.argsort(np.argsort(to, axis=1), axis=1)]
    idx = torch.from_numpy(pos).to(values.device)
    if values.dim() == 3:
        idx = idx[..., None].expand(-1, -1, values.shape[-1])
    return values.gather(1, idx)


#: an expert row whose relative L2 distance to the engine's is below this is float noise (~2e-7 measured
#: against llama.cpp) and is left alone; one 8-bit quant step moves a row by ~1e-3
ROW_NOISE = 1e-5


def _rerounded(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tensor: str, aq: ActivationQuant,
               target: torch.Tensor) -> tuple[torch.Tensor, list[int | str]] | None:
    """``weight @ round(h) (+ bias)`` for one row ``h [n]`` of a matmul input that is no stage (``tensor``:
    the weight's name), computed alone (its own sums), with each of ``h``'s roundings that float noise
    decides turned the other way, nearest first, where that brings the row closer to the engine's
    ``target``: an element within :data:`~moesnap.model.ggml.NEAR_HALF` steps of a half, or a Q8_0
    block's float16 scale within as much of one (:func:`~moesnap.model.ggml.near_scale_halves`: the whole
    block moves by ~5e-4).  (the row, the near-half elements and the scales turned, ``the scale of block
    B``), or None where no rounding of ``h`` is decided by noise: any difference is then the judge's."""
    wtype = aq.type_of(tensor)
    near, steps = near_halves(h, wtype)
    scales = near_scale_halves(h, wtype)
    if near.numel() == 0 and not scales:
        return None
    y = _linear(aq(h, tensor), weight, bias)                                     # [out] this row alone
    taken: list[int | str] = list(near.tolist())      # every near half of a row that moves, as ever
    changes = [(j, step * weight[:, j]) for j, step in zip(near.tolist(), steps)]                 # [out] each
    changes += [(f"the scale of block {j // 32}", weight[:, j:j + 32] @ dq) for j, dq in scales]
    for j, change in changes:
        if (target - y - change).norm() < (target - y).norm():
            y = y + change
            if isinstance(j, str):
                taken.append(j)
    return y, taken


def _take_closer(own: torch.Tensor, engine: torch.Tensor, got: tuple[torch.Tensor, list[int | str]] | None,
                 where: list, rounded: list | None) -> None:
    """Put ``got``'s row into ``own`` (in place) where it is closer to the engine's row, noting its roundings."""
    if got is not None and (engine - got[0]).norm() < (engine - own).norm():
        own.copy_(got[0])
        if rounded is not None:
            rounded.extend([*where, j] for j in got[1])


def _differ(own: torch.Tensor, engine: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (over the last axis) where ``own`` and ``engine`` differ by more than float noise."""
    return ((own - engine).norm(dim=-1) > ROW_NOISE * engine.norm(dim=-1)).nonzero()


@torch.no_grad()
def _follow_rounding(cfg: ModelConfig, w: LayerWeights, fn: torch.Tensor, ids: torch.Tensor, eo: torch.Tensor, eo_e: torch.Tensor,
                     aq: ActivationQuant, layer: int, rounded: list | None) -> None:
    """Take the engine's 8-bit rounding of an expert's down-projection input where it sits at a near half.

    That input (the SwiGLU output) is no stage: the reference computes it from the engine's ``ffn_norm``
    with its own float32 sums, ~2e-7 away from the engine's, and where a product ``scale * h`` lies within
    that of a half the two round it to neighbouring quants (one step: ~1e-3 of the row).  Each row of
    ``eo [T, k, H]`` that differs from the engine's ``eo_e`` by more than float noise is computed again
    alone with those roundings turned (:func:`_rerounded`) and replaces ``eo``'s (in place) where it is
    the closer of the two; its near-half elements are appended to ``rounded`` as ``[layer, token,
    "expert E", element]``.  Only these roundings can move a row: any other difference is left for the
    judge."""
    p = f"blk.{w.index}."
    experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    bank = w.experts
    assert bank is not None   # a MoE layer's
    for t, slot in _differ(eo, eo_e).tolist():
        e = int(ids[t, slot])
        if e not in experts:
            experts[e] = bank.expert(e)
        gate, up, down = experts[e]
        x = fn[t:t + 1]
        bg, bu, bd = bank.bias(e) or (None, None, None)
        h = expert_act(cfg, _linear(aq(x, p + "ffn_gate_exps"), gate, bg),
                       _linear(aq(x, p + "ffn_up_exps"), up, bu))[0]                              # [F]
        _take_closer(eo[t, slot], eo_e[t, slot], _rerounded(h, down, bd, p + "ffn_down_exps", aq, eo_e[t, slot]),
                     [layer, t, f"expert {e}"], rounded)


@torch.no_grad()
def _mlp(x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], names: tuple[str, str, str],
         aq: ActQuant, engine: torch.Tensor | None, where: tuple[int, str], rounded: list | None) -> torch.Tensor:
    """A dense SwiGLU MLP of ``x [T, H]`` (DeepSeek's dense layers, the shared experts), its rows following
    the engine's (``engine [T, H]``) rounding of the down projection's input where a ggml engine's may
    differ by noise (as :func:`_follow_rounding`; ``where``: the layer and what to call the MLP in a note)."""
    gate, up, down = weights
    out = swiglu_mlp(x, gate, up, down, aq, names)                                 # [T, H]
    if engine is None or not isinstance(aq, ActivationQuant):
        return out
    for (t,) in _differ(out, engine).tolist():
        h = F.silu(aq(x[t], names[0]) @ gate.T) * (aq(x[t], names[1]) @ up.T)       # [F] this row alone
        _take_closer(out[t], engine[t], _rerounded(h, down, None, names[2], aq, engine[t]), [where[0], t, where[1]],
                     rounded)
    return out


def _weights_of(cfg: ModelConfig, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, ids)`` of the experts ``ids [T, k]`` (the reference's own, or the engine's it followed)
    under the family's gating, by descending weight: the softmax over all experts at those ids,
    renormalised (``softmax_topk_renorm``) or not (``softmax_topk``), the softmax over the k logits
    (``topk_softmax``), or DeepSeek's scores (softmax or sigmoid) at those ids, renormalised where
    ``topk_norm``, times ``routed_scale`` (the grouped gatings)."""
    if cfg.gating == "topk_softmax":
        tw = torch.softmax(logits.gather(-1, ids), dim=-1)                       # [T, k]
        tw, order = tw.sort(dim=-1, descending=True)
        return tw, ids.gather(-1, order)
    grouped = cfg.gating in ("softmax_grouped", "sigmoid_grouped")
    scores = torch.sigmoid(logits) if cfg.gating == "sigmoid_grouped" else torch.softmax(logits, dim=-1)  # [T, E]
    tw, order = scores.gather(-1, ids).sort(dim=-1, descending=True)            # [T, k]
    if cfg.gating == "softmax_topk_renorm" or grouped and cfg.topk_norm:
        tw = tw / tw.sum(-1, keepdim=True)
    return tw * cfg.routed_scale if grouped else tw, ids.gather(-1, order)


def _attention(cfg: ModelConfig, w: LayerWeights, eng: _Engine, i: int, a: torch.Tensor, cos, sin,
               rec: ArrayRecorder, aq: ActQuant, rounded: list | None = None) -> torch.Tensor:  # noqa: ARG001
    """Layer ``i``'s attention (``q`` .. ``attn_out``) of the engine's ``attn_norm`` ``a``, each stage from
    the engine's own value of the stage before it."""
    T, D, p = a.shape[0], cfg.head_dim, f"blk.{i}."
    assert w.wq is not None and w.wk is not None and w.wv is not None
    q = _linear(aq(a, p + "attn_q"), w.wq, w.bq).view(T, cfg.n_head, D)         # [T, Hq, D]
    k = _linear(aq(a, p + "attn_k"), w.wk, w.bk).view(T, cfg.n_head_kv, D)      # [T, Hkv, D]
    v = _linear(aq(a, p + "attn_v"), w.wv, w.bv).view(T, cfg.n_head_kv, D)      # [T, Hkv, D]
    for name, t in (("q", q), ("k", k), ("v", v)):
        rec.save(name, i, t)
    q, k, v = eng.or_own("q", q), eng.or_own("k", k), eng.or_own("v", v)
    if w.q_norm is not None and w.k_norm is not None:      # families without q/k norm (gpt-oss): no such stage
        if cfg.qk_norm_whole:                               # OLMoE: over every head at once
            qn = RMSNorm(w.q_norm, cfg.rms_eps)(q.reshape(T, -1)).view_as(q)
            kn = RMSNorm(w.k_norm, cfg.rms_eps)(k.reshape(T, -1)).view_as(k)
        else:
            qn, kn = RMSNorm(w.q_norm, cfg.rms_eps)(q), RMSNorm(w.k_norm, cfg.rms_eps)(k)
        rec.save("q_norm", i, qn)
        rec.save("k_norm", i, kn)
        q, k = eng.or_own("q_norm", qn), eng.or_own("k_norm", kn)
    qr, kr = apply_rope(cfg, q, cos, sin), apply_rope(cfg, k, cos, sin)          # [T, H*, D]
    return _attend(cfg, w, eng, i, qr, kr, v, rec, aq)


def _latent_attention(cfg: ModelConfig, w: LayerWeights, eng: _Engine, i: int, a: torch.Tensor, cos, sin,
                      rec: ArrayRecorder, aq: ActQuant, rounded: list | None = None) -> torch.Tensor:
    """DeepSeek's multi-head latent attention (:class:`~moesnap.model.reference.LatentAttention`) of the
    engine's ``attn_norm`` ``a``, each stage from the engine's own value of the stage before it."""
    T, Hq, Dn, Dr, p = a.shape[0], cfg.n_head, cfg.qk_nope_dim, cfg.rope_dim, f"blk.{i}."
    assert w.wkv_a is not None and w.wkv_b is not None and w.kv_a_norm is not None
    if w.q_a_norm is None:
        assert w.wq is not None
        q = aq(a, p + "attn_q") @ w.wq.T                                          # [T, Hq*D]
    else:
        assert w.wq_a is not None and w.wq_b is not None
        ql = aq(a, p + "attn_q_a") @ w.wq_a.T                                     # [T, Rq]
        rec.save("q_latent", i, ql)
        qln = RMSNorm(w.q_a_norm, cfg.rms_eps)(eng.or_own("q_latent", ql))
        rec.save("q_latent_norm", i, qln)
        q = aq(eng.or_own("q_latent_norm", qln), p + "attn_q_b") @ w.wq_b.T       # [T, Hq*D]
    q = q.view(T, Hq, Dn + Dr)                                                    # [T, Hq, D]
    rec.save("q", i, q)
    q = eng.or_own("q", q)
    kv_latent = aq(a, p + "attn_kv_a_mqa") @ w.wkv_a.T                            # [T, Rkv+Dr]
    rec.save("kv_latent", i, kv_latent)
    compressed, k_pe = eng.or_own("kv_latent", kv_latent).split([cfg.kv_lora_rank, Dr], dim=-1)
    cn = RMSNorm(w.kv_a_norm, cfg.rms_eps)(compressed)                            # [T, Rkv]
    rec.save("kv_latent_norm", i, cn)
    kv = (aq(eng.or_own("kv_latent_norm", cn), p + "attn_kv_b") @ w.wkv_b.T).view(T, Hq, -1)  # [T, Hq, Dn+Dv]
    k_nope, v = kv.split([Dn, cfg.v_dim], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None, :].expand(T, Hq, Dr)], dim=-1)           # [T, Hq, D]
    rec.save("k", i, k)
    rec.save("v", i, v)
    k, v = eng.or_own("k", k), eng.or_own("v", v)
    qr = torch.cat([q[..., :Dn], apply_rope(cfg, q[..., Dn:], cos, sin)], dim=-1)  # [T, Hq, D] rope part only
    kr = torch.cat([k[..., :Dn], apply_rope(cfg, k[..., Dn:], cos, sin)], dim=-1)
    absorbed = isinstance(aq, ActivationQuant) and cfg.kv_b_split    # llama.cpp's order: see _absorbed
    return _attend(cfg, w, eng, i, qr, kr, v, rec, aq, eng.or_own("kv_latent_norm", cn) if absorbed else None, rounded)


def _absorbed(cfg: ModelConfig, w: LayerWeights, i: int, qr: torch.Tensor, kr: torch.Tensor, latent: torch.Tensor,
              aq: ActQuant, engine: torch.Tensor | None, rounded: list | None) -> torch.Tensor:
    """``attn [T, Hq*Dv]`` of latent attention computed as llama.cpp computes it where the file splits
    ``kv_b`` into ``attn_k_b``/``attn_v_b``: ``k_b`` absorbed into each head's unroped q (its 8-bit
    rounding: of ``q_nope``), attention over the normed latent ``[T, Rkv]`` and the roped key as one
    shared head, then ``v_b`` applied to each head's weighted latent (its rounding: of that, which is
    no stage: each head's row follows the engine's ``attn`` where noise decides it, :func:`_rerounded`).
    Without rounding it equals :func:`~moesnap.model.reference.causal_attention` of q, k and v."""
    T, Hq, Dn, Rkv, p = qr.shape[0], cfg.n_head, cfg.qk_nope_dim, cfg.kv_lora_rank, f"blk.{i}."
    assert w.wkv_b is not None
    kv_b = w.wkv_b.view(Hq, Dn + cfg.v_dim, Rkv)                                  # [Hq, Dn+Dv, Rkv]
    q_abs = torch.einsum("thd,hdr->thr", aq(qr[..., :Dn].contiguous(), p + "attn_k_b"), kv_b[:, :Dn])  # [T, Hq, Rkv]
    q = torch.cat([q_abs, qr[..., Dn:]], dim=-1)                                  # [T, Hq, Rkv+Dr]
    k = torch.cat([latent, kr[:, 0, Dn:]], dim=-1)[:, None, :].expand(T, Hq, -1)  # [T, Hq, Rkv+Dr] one head
    mixed = causal_attention(cfg, q, k, latent[:, None, :].expand(T, Hq, Rkv), i).view(T, Hq, Rkv)
    attn = torch.einsum("thr,hvr->thv", aq(mixed, p + "attn_v_b"), kv_b[:, Dn:])  # [T, Hq, Dv]
    if engine is not None and isinstance(aq, ActivationQuant):
        target = engine.view(T, Hq, -1)
        for t, h in _differ(attn, target).tolist():
            got = _rerounded(mixed[t, h], kv_b[h, Dn:], None, p + "attn_v_b", aq, target[t, h])
            _take_closer(attn[t, h], target[t, h], got, [i, t, f"head {h} (attn_v_b)"], rounded)
    return attn.reshape(T, -1)                                                    # [T, Hq*Dv]


def _attend(cfg: ModelConfig, w: LayerWeights, eng: _Engine, i: int, qr: torch.Tensor, kr: torch.Tensor,
            v: torch.Tensor, rec: ArrayRecorder, aq: ActQuant, latent: torch.Tensor | None = None,
            rounded: list | None = None) -> torch.Tensor:
    """``q_rope``/``k_rope`` (the reference's, of the engine's q and k), ``attn`` (``latent``: the normed
    compressed kv an MLA engine attends over in llama.cpp's order, :func:`_absorbed`) and ``attn_out``."""
    rec.save("q_rope", i, qr)
    rec.save("k_rope", i, kr)
    qr, kr = eng.or_own("q_rope", qr), eng.or_own("k_rope", kr)
    if latent is None:
        attn = causal_attention(cfg, qr, kr, v, i, w.sinks)                      # [T, Hq*Dv]
    else:
        attn = _absorbed(cfg, w, i, qr, kr, latent, aq, eng.get("attn", v.new_zeros(qr.shape[0], v.shape[1] * v.shape[2])),
                         rounded)
    rec.save("attn", i, attn)
    attn_out = _linear(aq(eng.or_own("attn", attn), f"blk.{i}.attn_output"), w.wo, w.bo)   # [T, H]
    rec.save("attn_out", i, attn_out)
    return attn_out


@torch.no_grad()
def _layer(cfg: ModelConfig, w: LayerWeights, eng: _Engine, i: int, x: torch.Tensor, cos, sin,
           rec: ArrayRecorder, tie_tol: float, followed: list, aq: ActQuant = identity,
           rounded: list | None = None) -> None:
    """Every stage of layer ``i`` from the engine's own value of the stage before it (module docstring)."""
    T, p = x.shape[0], f"blk.{i}."
    own = RMSNorm(w.attn_norm, cfg.rms_eps)(x)                                  # [T, H]
    rec.save("attn_norm", i, own)
    attention = _latent_attention if cfg.mla else _attention
    attn_out = attention(cfg, w, eng, i, eng.or_own("attn_norm", own), cos, sin, rec, aq, rounded)
    resid = x + eng.or_own("attn_out", attn_out)                                 # [T, H]
    rec.save("attn_resid", i, resid)
    resid = eng.or_own("attn_resid", resid)
    fn = RMSNorm(w.ffn_norm, cfg.rms_eps)(resid)
    rec.save("ffn_norm", i, fn)
    fn = eng.or_own("ffn_norm", fn)
    if w.router is None:               # DeepSeek's leading dense layers
        assert w.ffn_gate is not None and w.ffn_up is not None and w.ffn_down is not None
        names = (p + "ffn_gate", p + "ffn_up", p + "ffn_down")
        mlp = (w.ffn_gate, w.ffn_up, w.ffn_down)
        dense = _mlp(fn, mlp, names, aq, eng.get("dense_ffn_out", fn), (i, "the dense MLP"), rounded)
        rec.save("dense_ffn_out", i, dense)
        rec.save("layer_out", i, resid + eng.or_own("dense_ffn_out", dense))
        return
    logits = _linear(aq(fn, p + "ffn_gate_inp"), w.router, w.router_bias)       # [T, E] float32
    rec.save("router_logits", i, logits)
    logits = eng.or_own("router_logits", logits)
    if cfg.gating in ("softmax_grouped", "sigmoid_grouped"):
        _, ids, ranked = route_grouped(cfg, logits, cfg.n_expert_used, w.probs_bias)   # ranked by the selection's scores
        rec.save("router_select", i, ranked)
    else:
        (_, ids), ranked = route(cfg, logits, cfg.n_expert_used), logits          # [T, k] the reference's own
    cand_ids = eng.ids(T, cfg.n_expert_used, cfg.n_expert)
    ids = _follow(ids, ranked, cand_ids, cfg.n_expert, tie_tol, i, followed)
    tw, ids = _weights_of(cfg, logits, ids)                                      # [T, k] by descending weight
    rec.save("topk_ids", i, ids)
    rec.save("topk_weights", i, tw)
    eo = expert_outputs(cfg, w, fn, ids, aq)                                     # [T, k, H]
    tw_e = _by_ids(eng.get("topk_weights", tw), cand_ids, ids)
    eo_e = _by_ids(eng.get("expert_out", eo), cand_ids, ids)
    if eo_e is not None and isinstance(aq, ActivationQuant):
        _follow_rounding(cfg, w, fn, ids, eo, eo_e, aq, i, rounded)
    rec.save("expert_out", i, eo)
    moe = ((eo if eo_e is None else eo_e) * (tw if tw_e is None else tw_e)[..., None]).sum(dim=1)  # [T, H]
    if w.shexp is not None:            # DeepSeek's, Qwen2-MoE's shared experts
        names = (p + "ffn_gate_shexp", p + "ffn_up_shexp", p + "ffn_down_shexp")
        shared = _mlp(fn, w.shexp, names, aq, eng.get("shared_expert_out", fn), (i, "the shared experts"), rounded)
        rec.save("shared_expert_out", i, shared)
        shared = eng.or_own("shared_expert_out", shared)
        if w.shexp_gate is not None:   # Qwen2-MoE: gated per token
            gate = aq(fn, p + "ffn_gate_inp_shexp") @ w.shexp_gate[:, None]     # [T, 1] logit
            rec.save("shared_gate", i, gate)
            shared = torch.sigmoid(eng.or_own("shared_gate", gate)) * shared
        moe = moe + shared
    rec.save("moe_out", i, moe)
    rec.save("layer_out", i, resid + eng.or_own("moe_out", moe))


def _rounding_note(rounded: list) -> str:
    """One line on the expert rows that follow the engine's rounding at a near half."""
    where = ", ".join(f"token {t} {what} " + (f"element {j}" if isinstance(j, int) else j) for _, t, what, j in rounded[:4])
    more = f" and {len(rounded) - 4} more" if len(rounded) > 4 else ""
    return (f"the engine's rounding taken for {len(rounded)} 8-bit quant{'s' if len(rounded) != 1 else ''} of a "
            f"matmul input no stage holds (a down projection's, MLA's v_b's) at a near half ({where}{more})")


class LocalReference:
    """The local re-reference of one dump (module docstring) as a value the judge reads while it is made.

    :attr:`case` holds the reference's arrays from the start (``[n_layer, ...]``, zeros until made);
    :meth:`start` makes them on a thread of its own, layer by layer, then the whole-model stages
    (``final_norm`` from the engine's last ``layer_out``, ``logits`` from its ``final_norm``), while
    :meth:`ready` returns once a layer (given None: all of it) is made.  So the judge of layer ``l``
    overlaps the recomputation of layer ``l + 1``, and the free-running judgement of the same dump the
    whole of it.  :meth:`run` makes it all on the calling thread instead (the same values, bit for bit).

    :attr:`layers`: the layers recomputed, those the dump gives an input for (known before any is made;
    the other layers' arrays hold zeros and must not be judged).  :attr:`notes`: what the re-reference
    says, in layer order, each prefixed with ``label``; complete once ``ready(None)`` returned.

    ``aq`` rounds each matmul's input as the engine does (``ActivationQuant`` for a ggml engine: the
    local reference then computes what a correct ggml engine computes from the same inputs).
    ``device``: where the arithmetic runs, in float32 (:mod:`moesnap.run.rereference_device`: one
    layer's weights at a time there, as on the host).  A dump whose input to a layer is not a float
    array ``[T, H]`` is refused here, before anything is made.
    """

    def __init__(self, model: ModelWeights, candidate: Case, *, tie_tol: float, progress: Progress | None = None,
                 aq: ActQuant = identity, device: torch.device | str = "cpu", label: str = "") -> None:
        cfg = model.config
        self.model, self.candidate, self.tie_tol, self.progress, self.aq = model, candidate, tie_tol, progress, aq
        self.device, self.label = torch.device(device), label
        #: made by the host's own code (``model.layer``, the reference's lm head); False: by the device path
        #: (experts dequantized where the arithmetic runs; a test runs it on the host, where it must agree)
        self.host = self.device.type == "cpu"
        T = int(candidate.tokens.shape[0])
        self.n_layer = min(cfg.n_layer, candidate.n_layer) if candidate.layers else cfg.n_layer
        done = []
        for i in range(self.n_layer):
            x, what = _input_of(candidate, i)
            if x is None:
                continue
            if x.ndim != 2 or x.shape != (T, cfg.hidden) or x.dtype.kind != "f":
                raise GoldenError(f"candidate {what}: expected a float array [{T}, {cfg.hidden}], "
                                  f"got {x.dtype} {list(x.shape)}")
            done.append(i)
        self.layers: tuple[int, ...] = tuple(done)
        self.notes: list[str] = []
        self.followed: list = []
        layers: dict[str, np.ndarray] = {s: np.zeros((self.n_layer, *shape), dtype=dt)
                                          for s, (shape, dt) in _layer_shapes(cfg, T, done).items()}
        model_stages: dict[str, np.ndarray] = {}
        if _usable(candidate.stage("layer_out", cfg.n_layer - 1), T, cfg.hidden):
            model_stages["final_norm"] = np.zeros((T, cfg.hidden), dtype=np.float32)
        if _usable(candidate.model.get("final_norm"), T, cfg.hidden):
            model_stages["logits"] = np.zeros((T, model.n_rows("output")), dtype=np.float32)
        self.case = Case(tokens=candidate.tokens, model=model_stages, layers=layers,
                         attrs={"producer": "moesnap-local-reference", "router_followed": self.followed,
                                "model": {"config": cfg.to_dict()}})  # its family: the judge walks its stages
        self._made: set[int] = set()
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the consumer's side
    def start(self) -> LocalReference:
        """Make it on a thread of its own (:meth:`ready` waits for what the judge reads)."""
        if self._thread is None and not self._finished:
            self._thread = threading.Thread(target=self.run, name="moesnap-local-reference", daemon=True)
            self._thread.start()
        return self

    def ready(self, layer: int | None) -> None:
        """Return once layer ``layer`` is made (None: every layer and the whole-model stages); what went
        wrong in making it is raised here.  Never started: it is made now, on this thread."""
        if self._thread is None and not self._finished:
            self.run()
        with self._cond:
            self._cond.wait_for(lambda: self._finished or layer is not None and (layer in self._made
                                                                                 or layer not in self.layers))
        if self._error is not None and (layer is None or layer not in self._made):
            raise self._error

    def close(self) -> None:
        """Stop after the layer in progress and wait for the thread (a judge that stopped early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def rows(self, positions: np.ndarray) -> Case:
        """:meth:`Case.rows <moesnap.case.Case.rows>` of :attr:`case` at ``positions``, consecutive ones: views
        of its arrays, so that what is made later is seen there too."""
        pos = np.asarray(positions, dtype=np.int64)
        lo = int(pos[0]) if pos.size else 0
        if not (pos == np.arange(lo, lo + pos.size)).all():
            raise ValueError(f"positions {pos.tolist()[:8]}: not consecutive")
        at = slice(lo, lo + pos.size)
        c = self.case
        attrs = {k: v for k, v in c.attrs.items() if k not in ("router_followed", "token_ids", "held_tokens")}
        attrs["positions"] = [int(p) for p in pos]
        return Case(tokens=c.tokens[pos], model={s: a[at] for s, a in c.model.items()},
                    layers={s: a[:, at] for s, a in c.layers.items()}, attrs=attrs)

    # -- the maker's side
    def run(self) -> None:
        """Make every layer, then the whole-model stages, on this thread."""
        try:
            with torch.no_grad(), exact_matmuls(self.device):
                self._make()
        except BaseException as e:   # handed to the judge's thread by ready()
            self._error = e
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _make(self) -> None:
        model, cand, cfg, dev = self.model, self.candidate, self.model.config, self.device
        T = int(cand.tokens.shape[0])
        cos, sin = (t.to(dev) for t in rope_cos_sin(cfg, T, torch.float32))
        for i in range(self.n_layer):
            if self._stop.is_set():
                raise RuntimeError("the local re-reference was closed before it was made")
            x, what = _input_of(cand, i)
            if x is None:
                self.notes.append(f"{self.label}layer {i}: the dump has no {what}, so the layer is judged "
                                  f"free-running only")
            else:
                w = (model if self.host else DeviceWeights(model, dev)).layer(i, torch.float32)
                rec = ArrayRecorder(batched=not self.host)     # one copy to the host per layer
                rounded: list = []
                _layer(cfg, w, _Engine(cand, i, dev), i, torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev),
                       cos, sin, rec, self.tie_tol, self.followed, self.aq, rounded)
                if rounded:
                    self.notes.append(f"{self.label}layer {i}: {_rounding_note(rounded)}")
                del w
                model.release_layer(i)
                self._write(i, rec.layers)
            if self.progress is not None:
                self.progress(i + 1, self.n_layer)
        x_last = cand.stage("layer_out", cfg.n_layer - 1)
        if "final_norm" in self.case.model and x_last is not None:
            self.case.model["final_norm"][...] = self._final_norm(x_last)
        if "logits" in self.case.model:
            self.case.model["logits"][...] = self._lm_head(cand.model["final_norm"])

    def _write(self, i: int, recorded: dict[str, dict[int, np.ndarray]]) -> None:
        """Layer ``i``'s stages into :attr:`case`, and the layer marked made."""
        got = sorted(s for s, per in recorded.items() if i in per)
        own = sorted(s for s in _stages_of(self.model.config, i) if s in self.case.layers)
        assert got == own, f"layer {i}: made {got}, allotted {own}"   # the others stay zeros: never judged
        for stage, per in recorded.items():
            dst, a = self.case.layers[stage], per[i]
            assert a.shape == dst.shape[1:] and a.dtype == dst.dtype, f"layer {i} / {stage}: {a.dtype} {a.shape}"
            dst[i] = a
        with self._cond:
            self._made.add(i)
            self._cond.notify_all()

    def _final_norm(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if self.host:
            return Transformer(self.model, torch.float32, self.aq).final_norm(t).numpy()
        norm = RMSNorm(DeviceWeights(self.model, self.device).dense("output_norm"), self.model.config.rms_eps)
        return norm(t.to(self.device)).cpu().numpy()

    def _lm_head(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if self.host:
            return Transformer(self.model, torch.float32, self.aq).lm_head(t).numpy()
        head = DeviceWeights(self.model, self.device).dense("output")                 # [V, H]
        return (self.aq(t.to(self.device), "output") @ head.T).cpu().numpy()


def _usable(x: np.ndarray | None, T: int, hidden: int) -> bool:
    return x is not None and x.shape == (T, hidden) and x.dtype.kind == "f"


def _layer_shapes(cfg: ModelConfig, T: int, layers: list[int]) -> dict[str, tuple[tuple[int, ...], type]]:
    """What :func:`_layer` records of the layers ``layers``, in stage order: (shape of one layer, dtype) by
    stage, over every stage one of them has (:func:`~moesnap.stages.stages_of_layer`: a family's own stages,
    a dense layer's or a MoE layer's; ``q_norm``/``k_norm`` where a recomputed layer holds q/k norms)."""
    if not layers:
        return {}
    H, D, Hq, Hkv, k, E = cfg.hidden, cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.n_expert_used, cfg.n_expert
    tab = table(cfg.arch)     # what model.layer(i) loads: q/k norms where the layer holds them
    qk = any({"attn_q_norm", "attn_k_norm"} <= set(tab.in_layer(i, cfg.layer_where(i))) for i in layers)
    Hk = Hq if cfg.mla else Hkv            # MLA: one key and value per query head
    shapes = {"attn_norm": (T, H), "q_latent": (T, cfg.q_lora_rank), "q_latent_norm": (T, cfg.q_lora_rank),
              "q": (T, Hq, D), "kv_latent": (T, cfg.kv_lora_rank + cfg.rope_dim), "kv_latent_norm": (T, cfg.kv_lora_rank),
              "k": (T, Hk, D), "v": (T, Hk, cfg.v_dim), "q_norm": (T, Hq, D), "k_norm": (T, Hk, D),
              "q_rope": (T, Hq, D), "k_rope": (T, Hk, D), "attn": (T, Hq * cfg.v_dim), "attn_out": (T, H),
              "attn_resid": (T, H), "ffn_norm": (T, H), "dense_ffn_out": (T, H), "router_logits": (T, E),
              "router_select": (T, E), "topk_ids": (T, k), "topk_weights": (T, k), "expert_out": (T, k, H),
              "shared_expert_out": (T, H), "shared_gate": (T, 1), "moe_out": (T, H), "layer_out": (T, H)}
    have = set().union(*(_stages_of(cfg, i) for i in layers))
    return {s: (shapes[s], np.int32 if s == "topk_ids" else np.float32) for s in LAYER_STAGES
            if s in have and (qk or s not in ("q_norm", "k_norm"))}


def layer_allotment(cfg: ModelConfig, T: int) -> dict[str, tuple[tuple[int, ...], type, tuple[int, ...]]]:
    """What a forward of ``T`` tokens through every layer records, by stage (:func:`_layer_shapes`): the
    shape of one layer's value, its dtype, and the layers that have it (the arrays a
    :class:`~moesnap.model.recorder.LayerRecorder` allots)."""
    every = list(range(cfg.n_layer))
    of = [set(_stages_of(cfg, i)) for i in every]
    return {s: (shape, dt, tuple(i for i in every if s in of[i])) for s, (shape, dt) in _layer_shapes(cfg, T, every).items()}


def _stages_of(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The stages layer ``layer`` of the model has (its family's, as a dense or a MoE layer)."""
    return stages_of_layer(cfg.arch, cfg.to_dict(), layer)


def local_reference(model: ModelWeights, candidate: Case, *, tie_tol: float, progress: Progress | None = None,
                    aq: ActQuant = identity, device: torch.device | str = "cpu") -> tuple[Case, list[int], list[str]]:
    """(the reference recomputed from ``candidate``'s own values, the layers recomputed, notes), made on
    this thread (:class:`LocalReference`, whose arguments these are)."""
    ref = LocalReference(model, candidate, tie_tol=tie_tol, progress=progress, aq=aq, device=device)
    ref.ready(None)
    return ref.case, list(ref.layers), list(ref.notes)
