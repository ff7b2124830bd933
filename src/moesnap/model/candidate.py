"""The candidate forward of Qwen3-MoE: a second, GPU-minded implementation.

It computes the same model as :mod:`moesnap.model.reference` but shares none of its
code: only the config, the stage names and the recorder.  What makes it a
"GPU" forward, on whatever torch device it is given:

* **Raw blocks on the device.**  Each GGUF tensor's stored bytes go to the
  device unchanged (``uint8 [..., bytes_per_row]``) and are dequantized there
  by :mod:`moesnap.gguf.quants_torch`, dispatching on *each tensor's own* type (the
  bug that inspired moesnap decoded Q6_K ``ffn_down_exps`` as Q4_K).  On a
  non-CPU device the bytes are uploaded once and kept (a 17 GB file fits a
  141 GB GPU); on the CPU they stay zero-copy views of the file's memory map,
  so the process holds no more than one layer's dequantized weights.
  Dequantized weights are never cached: dense ones are rebuilt per layer per
  forward, experts per batch of experts (:attr:`CandidateModel.expert_values`).
* **Grouped experts.**  The ``T*k`` (token, slot) pairs are sorted by expert;
  only the experts that received tokens are dequantized, and each of the
  three expert matmuls (gate, up, down) runs over all of them at once, as
  one grouped GEMM (``torch._grouped_mm``, path ``"grouped_mm"``) or as one
  matmul per expert group (path ``"loop"``, the fallback).
  :func:`default_expert_path` takes the grouped GEMM wherever
  :func:`grouped_mm_works` finds it present and agreeing with the loop for
  the (device, dtype, shapes) (speed figures: BENCHMARKS.md).  A build
  without it, or where it fails or disagrees, gets the loop.
* **Nothing only for recording.**  Every recorded stage is a value the
  forward needs anyway (q/k/v are views of the fused projection, expert_out
  is the grouped result put back in (token, slot) order before the weighted
  sum), so a :class:`~moesnap.model.recorder.NullRecorder` run does the same
  arithmetic, bit for bit, minus the copies to the host.
* **Fused attention.**  q/k/v come from one fused projection;
  attention is ``scaled_dot_product_attention(is_causal=True)`` with
  ``enable_gqa`` (key/value heads repeated where that flag is missing).
* **Mixed precision like real engines.**  Matmuls, attention, residuals and
  expert activations run in the requested dtype (float32, bfloat16, float16;
  float64 also works); RMSNorm reduces in float32 (``F.rms_norm``), RoPE is
  applied in float32 with tables computed in float64, the router and its
  softmax run in float32, and the weighted sum of expert outputs accumulates
  in float32.

Fault injection (:mod:`moesnap.model.inject`) hooks in at four points: the decode of
one tensor, one expert's output, one stage's value and one token's routing.

**Router replay** (:class:`RouterReplay`, what ``moesnap check`` does by default):
in low precision the candidate legitimately picks other experts where two
golden router logits nearly tie.  Given the golden routing, a token whose
expert set differs from the golden's within ``tie_tol`` (the judge's rule,
passed in as :attr:`RouterReplay.gap`) continues with the golden's experts,
weighted by the candidate's own router probabilities for them and
renormalised, so that it stays comparable in every later stage and layer.
``topk_ids`` records the experts used; :attr:`CandidateModel.followed` lists
each (layer, token, own choice), which the comparison judges as the routing
decision (``ROUTING_TIE``).  A wider flip is kept: it is a divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import gguf
import numpy as np
import torch
from torch.nn import functional as F

from ..gguf import quants_torch
from .config import Qwen3MoeConfig
from ..errors import UsageError
from ..stages import DTYPES as STAGE_DTYPES
from .inject import Injection, NanExpert, QtypeAs, RouteFlip, ScaleStage, validate_injection
from .tensors import GLOBAL_TENSORS, LAYER_TENSORS
from .recorder import NullRecorder, Recorder
from .weights import ModelWeights, file_bytes

Progress = Callable[[int, int], None]

#: dtypes the candidate computes in
DTYPES = tuple(getattr(torch, name) for name in STAGE_DTYPES)
#: ways to run the expert matmuls (see :func:`grouped_mm_works`)
EXPERT_PATHS = ("grouped_mm", "loop")

_GQA_FLAG: bool | None = None  # does scaled_dot_product_attention take enable_gqa?
_GROUPED_MM_PROBES: dict[tuple[str, torch.dtype, int, int], bool] = {}


# --------------------------------------------------------------------------- device helpers


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [N, K]`` rows grouped by ``offs`` (cumulative ends), times ``w [G, M, K]`` transposed -> ``[N, M]``."""
    return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)


def _looped(a: torch.Tensor, w: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Same as :func:`_grouped`, one matmul per group; ``bounds`` = ``[0, end_0, end_1, ...]`` on the host."""
    out = a.new_empty(a.shape[0], w.shape[1])
    for g in range(w.shape[0]):
        s, e = bounds[g], bounds[g + 1]
        out[s:e] = a[s:e] @ w[g].T
    return out


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype, k: int, m: int) -> bool:
    """Whether ``torch._grouped_mm`` runs on ``device`` in ``dtype`` for ``[N, k] x [G, m, k]^T``
    and agrees with one matmul per group.

    Probed once per (device, dtype, k, m) on random data with uneven groups and
    a row slice that starts mid-buffer, as the expert path uses it.  Seen
    passing: torch 2.13 CPU and torch 2.11 on the H200, each in float32,
    bfloat16 and float16.
    """
    device = torch.device(device)
    key = (str(device), dtype, k, m)
    if key in _GROUPED_MM_PROBES:
        return _GROUPED_MM_PROBES[key]
    ok = False
    if hasattr(torch, "_grouped_mm"):
        gen = torch.Generator(device="cpu").manual_seed(0)
        sizes = [3, 17, 1, 40]
        n = sum(sizes)
        a = (torch.randn(n + 5, k, generator=gen) / math.sqrt(k)).to(device, dtype)[5:]
        w = torch.randn(len(sizes), m, k, generator=gen).to(device, dtype)
        bounds = np.cumsum([0, *sizes]).tolist()
        offs = torch.tensor(bounds[1:], dtype=torch.int32, device=device)
        try:
            got = _grouped(a, w, offs).to(torch.float64)
            want = _looped(a, w, bounds).to(torch.float64)
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
            ok = bool(torch.isfinite(got).all()) and got.shape == want.shape and \
                bool(((got - want).abs() <= tol * (1 + want.abs())).all())
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            ok = False
    _GROUPED_MM_PROBES[key] = ok
    return ok


def default_expert_path(device: torch.device | str, dtype: torch.dtype, cfg: Qwen3MoeConfig) -> str:
    """``"grouped_mm"`` where it works for the model's expert shapes on ``device`` in ``dtype``, else ``"loop"``."""
    ok = all(grouped_mm_works(device, dtype, k, m) for k, m in ((cfg.hidden, cfg.expert_ff), (cfg.expert_ff, cfg.hidden)))
    return "grouped_mm" if ok else "loop"


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention; ``q [Hq, T, D]``, ``k``/``v`` ``[Hkv, T, D]`` -> ``[Hq, T, D]``."""
    global _GQA_FLAG
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, heads, T, D]
    if _GQA_FLAG is not False and q.shape[1] != k.shape[1]:
        try:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            _GQA_FLAG = True
            return out.squeeze(0)
        except TypeError:  # torch < 2.5 has no enable_gqa
            _GQA_FLAG = False
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(0)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RouterReplay:
    """The golden routing a candidate follows at near ties: ``ids [L, T, k]``, router
    ``logits [L, T, E]`` (numpy, any layer count), the tie width in logit units (one for every
    layer or one per layer, ``[L]``) and ``gap(logits_row, ids)``, the judge's near-tie gap of
    choosing ``ids`` under golden logits (:func:`moesnap.judge.routing.tie_gap`; passed in, so that the
    model does not depend on the judge)."""

    ids: np.ndarray
    logits: np.ndarray
    tie_tol: float | np.ndarray
    gap: Callable[[np.ndarray, np.ndarray], float]

    def tie_tol_at(self, i: int) -> float:
        t = np.asarray(self.tie_tol, dtype=np.float64)
        return float(t) if t.ndim == 0 else float(t[min(i, t.size - 1)])

    def layer(self, i: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray] | None:
        if i >= len(self.ids) or i >= len(self.logits):
            return None
        ids, logits = np.asarray(self.ids[i]), np.asarray(self.logits[i])
        if ids.ndim != 2 or logits.ndim != 2 or ids.shape[0] != n_tokens or logits.shape[0] != n_tokens:
            return None
        return ids, logits


@dataclass
class _Dense:
    """One layer's dense weights, dequantized on the device."""

    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor       # [Hq*D + 2*Hkv*D, H]
    wo: torch.Tensor         # [H, Hq*D]
    q_norm: torch.Tensor     # [D]
    k_norm: torch.Tensor     # [D]
    ffn_norm: torch.Tensor   # [H]
    router: torch.Tensor     # [E, H] in the router dtype


class CandidateModel:
    """The candidate forward over an open :class:`~moesnap.model.weights.GGUFModel`.

    ``expert_path`` forces ``"grouped_mm"`` or ``"loop"``; by default
    :func:`default_expert_path` chooses.
    ``expert_values`` bounds how many expert weight values are dequantized at
    once (default: 2**26 on the CPU, 2**31 elsewhere, i.e. a whole full-width
    layer on a GPU).
    """

    def __init__(self, model: ModelWeights, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, injections: Sequence[Injection] = (),
                 expert_path: str | None = None, expert_values: int | None = None) -> None:
        if dtype not in DTYPES:
            raise UsageError(f"dtype {dtype} is not supported by the candidate forward; "
                             f"choose one of {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {str(self.device)!r} requested but no CUDA device is available")
        self.model, self.cfg, self.dtype = model, model.config, dtype
        self.opmath = _opmath(dtype)
        self.router_dtype = self.opmath
        cfg = self.cfg
        self.injections = tuple(injections)
        for inj in self.injections:
            validate_injection(inj, cfg)
        self._qtype_as = {(j.layer, j.tensor): j.as_qtype for j in self.injections if isinstance(j, QtypeAs)}
        for (layer, tensor), as_qtype in self._qtype_as.items():
            true_qtype = model.tensor_type(f"blk.{layer}.{tensor}")
            if true_qtype == as_qtype:
                raise UsageError(f"--inject qtype:layer={layer},tensor={tensor},as={as_qtype.name.lower()}: "
                                 f"that tensor already is {true_qtype.name}, so nothing would change")
        self._scales: dict[tuple[int, str], float] = {}
        for j in self.injections:
            if isinstance(j, ScaleStage):
                self._scales[(j.layer, j.stage)] = self._scales.get((j.layer, j.stage), 1.0) * j.factor
        self._nan = {(j.layer, j.expert) for j in self.injections if isinstance(j, NanExpert)}
        self._flips: dict[int, list[int]] = {}
        for j in self.injections:
            if isinstance(j, RouteFlip):
                self._flips.setdefault(j.layer, []).append(j.token)
        #: (layer, token, own expert ids) where the last forward followed the golden's experts
        self.followed: list[tuple[int, int, list[int]]] = []
        #: planted faults that changed something in any forward so far (see :meth:`unfired`)
        self.fired: set[Injection] = set()
        self._guide: RouterReplay | None = None
        self._force: dict[str, np.ndarray] | None = None

        if expert_path is None:
            expert_path = default_expert_path(self.device, dtype, cfg)
        if expert_path not in EXPERT_PATHS:
            raise UsageError(f"expert_path={expert_path!r}; choose one of {', '.join(EXPERT_PATHS)}")
        self.expert_path = expert_path
        on_cpu = self.device.type == "cpu"
        self.expert_values = expert_values or (1 << 26 if on_cpu else 1 << 31)
        self.resident = not on_cpu          # keep uploaded bytes for the model's lifetime
        self._bytes: dict[str, torch.Tensor] = {}
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- raw bytes and dequantization ----------------------------------------
    def _stored(self, name: str) -> tuple[gguf.GGMLQuantizationType, np.ndarray]:
        """(stored type, the file's data) of the tensor this forward holds (the expert-parallel
        candidate holds a slice of each expert tensor)."""
        return self.model.raw(name)

    def _raw(self, name: str) -> tuple[gguf.GGMLQuantizationType, torch.Tensor]:
        """(stored type, stored bytes ``uint8 [..., bytes_per_row]`` on the device)."""
        qtype, data = self._stored(name)
        cached = self._bytes.get(name)
        if cached is not None:
            return qtype, cached
        t = file_bytes(data)
        if self.resident:
            t = t.to(self.device)
            self._bytes[name] = t
            self.model.release_tensor(name)  # the host copy is no longer needed
        return qtype, t

    def upload(self) -> None:
        """Upload every tensor's bytes now (a no-op on the CPU, where they stay memory-mapped)."""
        if self.resident:
            for name in GLOBAL_TENSORS:
                self._raw(name)
            for i in range(self.cfg.n_layer):
                for t in LAYER_TENSORS:
                    self._raw(f"blk.{i}.{t}")

    def _decode(self, name: str, data: torch.Tensor, qtype, layer: int | None, dtype: torch.dtype) -> torch.Tensor:
        tensor = name.split(".")[-1]
        as_qtype = self._qtype_as.get((layer, tensor)) if layer is not None else None
        if as_qtype is not None:
            return quants_torch.decode_as(data, qtype, as_qtype, out_dtype=dtype)
        return quants_torch.dequantize(data, qtype, out_dtype=dtype)

    def _weight(self, name: str, layer: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        qtype, data = self._raw(name)
        return self._decode(name, data.to(self.device), qtype, layer, dtype or self.dtype)

    def _dense(self, i: int) -> _Dense:
        p = f"blk.{i}."
        cfg = self.cfg
        wqkv = torch.empty(cfg.q_dim + 2 * cfg.kv_dim, cfg.hidden, dtype=self.dtype, device=self.device)
        wqkv[:cfg.q_dim] = self._weight(p + "attn_q", i)
        wqkv[cfg.q_dim:cfg.q_dim + cfg.kv_dim] = self._weight(p + "attn_k", i)
        wqkv[cfg.q_dim + cfg.kv_dim:] = self._weight(p + "attn_v", i)
        return _Dense(
            attn_norm=self._weight(p + "attn_norm", i),
            wqkv=wqkv,
            wo=self._weight(p + "attn_output", i),
            q_norm=self._weight(p + "attn_q_norm", i),
            k_norm=self._weight(p + "attn_k_norm", i),
            ffn_norm=self._weight(p + "ffn_norm", i),
            router=self._weight(p + "ffn_gate_inp", i, self.router_dtype),
        )

    def _experts_weights(self, i: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate ``[G, F, H]``, up ``[G, F, H]`` and down ``[G, H, F]`` of experts ``ids`` (ascending)."""
        p = f"blk.{i}."
        lo, hi = ids[0], ids[-1] + 1
        contiguous = hi - lo == len(ids)  # common with many tokens: a slice, no gather
        out = []
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            qtype, data = self._raw(p + name)
            sel = data[lo:hi] if contiguous else data.index_select(0, torch.tensor(ids, device=data.device))
            out.append(self._decode(p + name, sel.to(self.device), qtype, i, self.dtype))  # only these experts
        return out[0], out[1], out[2]

    # -- stages ---------------------------------------------------------------
    def _emit(self, stage: str, layer: int, x: torch.Tensor, rec: Recorder) -> torch.Tensor:
        """Apply a planted scale error (if any) to a stage's value, record it and pass it on
        (the golden's value instead, when stage-local replay forces this stage)."""
        f = self._scales.get((layer, stage))
        if f is not None:
            x = x * f
        rec.save(stage, layer, x)
        forced = self._force.get(stage) if self._force is not None and stage != "topk_ids" else None
        if forced is not None and tuple(forced.shape) == tuple(x.shape):
            return torch.as_tensor(np.ascontiguousarray(forced)).to(x.device, x.dtype)
        return x

    def _rope(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D/2]`` in the rope dtype, from float64 angles."""
        hit = self._rope_cache.get(n_tokens)
        if hit is None:
            half = self.cfg.head_dim // 2
            inv = torch.pow(float(self.cfg.rope_base), -torch.arange(half, dtype=torch.float64) * 2.0 / self.cfg.head_dim)
            ang = torch.arange(n_tokens, dtype=torch.float64)[:, None] * inv[None, :]  # [T, D/2]
            hit = (ang.cos().to(self.device, self.opmath)[:, None, :],
                   ang.sin().to(self.device, self.opmath)[:, None, :])
            self._rope_cache[n_tokens] = hit
        return hit

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """NeoX rotation of the two halves of each head, in float32: ``[T, H*, D]``."""
        xf = x.to(self.opmath)
        half = xf.shape[-1] // 2
        a, b = xf[..., :half], xf[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_eps)

    def _attention(self, i: int, x: torch.Tensor, w: _Dense, rec: Recorder) -> torch.Tensor:
        cfg = self.cfg
        T, D = x.shape[0], cfg.head_dim
        qkv = x @ w.wqkv.T                                                      # [T, Hq*D + 2*Hkv*D]
        q = self._emit("q", i, qkv[:, :cfg.q_dim].view(T, cfg.n_head, D), rec)  # [T, Hq, D]
        k = self._emit("k", i, qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].view(T, cfg.n_head_kv, D), rec)
        v = self._emit("v", i, qkv[:, cfg.q_dim + cfg.kv_dim:].view(T, cfg.n_head_kv, D), rec)
        q = self._emit("q_norm", i, self._norm(q, w.q_norm), rec)
        k = self._emit("k_norm", i, self._norm(k, w.k_norm), rec)
        cos, sin = self._rope(T)
        q = self._emit("q_rope", i, self._apply_rope(q, cos, sin), rec)
        k = self._emit("k_rope", i, self._apply_rope(k, cos, sin), rec)
        o = _sdpa_causal(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))  # [Hq, T, D]
        attn = self._emit("attn", i, o.transpose(0, 1).reshape(T, cfg.q_dim), rec)  # [T, Hq*D]
        return self._emit("attn_out", i, attn @ w.wo.T, rec)                      # [T, H]

    def _route(self, i: int, x: torch.Tensor, w: _Dense, rec: Recorder) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids ``[T, k]`` int64, topk_weights ``[T, k]`` in the compute dtype)."""
        k = self.cfg.n_expert_used
        logits = self._emit("router_logits", i, x.to(self.router_dtype) @ w.router.T, rec)  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        flips = self._flips.get(i)
        if flips:
            # planted routing flip: the token takes its (k+1)-th ranked expert instead of its k-th
            pw, pid = torch.topk(probs, k + 1, dim=-1)                         # [T, k+1]
            rows = torch.tensor(flips, device=pw.device)
            pw[rows, k - 1], pid[rows, k - 1] = pw[rows, k], pid[rows, k]
            pw, pid = pw[:, :k], pid[:, :k]
        else:
            pw, pid = torch.topk(probs, k, dim=-1)                              # [T, k], descending
        if self._force is not None and "topk_ids" in self._force:
            pw, pid = self._forced_router(i, probs, pw, pid)
        elif self._guide is not None:
            pw, pid = self._replay_router(i, probs, pw, pid)
        for t in flips or ():   # a flip fires when free-running keeps it (router replay undoes near ties)
            if self._force is None and not any(f[0] == i and f[1] == t for f in self.followed):
                self.fired.add(RouteFlip(layer=i, token=t))
        weights = (pw / pw.sum(dim=-1, keepdim=True)).to(self.dtype)
        ids = self._emit("topk_ids", i, pid, rec)
        weights = self._emit("topk_weights", i, weights, rec)
        return ids, weights

    def _replay_router(self, i: int, probs: torch.Tensor, pw: torch.Tensor, pid: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router replay: tokens whose expert set differs from the golden's at a near tie take the golden's."""
        replay = self._guide
        guide = replay.layer(i, pid.shape[0]) if replay is not None else None
        if replay is None or guide is None or guide[0].shape[1] != pid.shape[1]:
            return pw, pid
        g_ids = torch.as_tensor(guide[0].astype(np.int64), device=pid.device)           # [T, k]
        differ = (pid.sort(dim=-1).values != g_ids.sort(dim=-1).values).any(dim=-1)     # [T]
        tokens = torch.nonzero(differ).squeeze(1).tolist()                              # host: usually none
        if not tokens:
            return pw, pid
        own = pid[tokens].cpu().numpy()
        tie_tol = replay.tie_tol_at(i)
        follow = [t for t, ids in zip(tokens, own) if replay.gap(guide[1][t], ids) <= tie_tol]
        if not follow:
            return pw, pid
        for t in follow:
            self.followed.append((i, t, [int(e) for e in own[tokens.index(t)]]))
        idx = torch.tensor(follow, device=pid.device)
        pid, pw = pid.clone(), pw.clone()
        new_w, order = probs[idx].gather(-1, g_ids[idx]).sort(dim=-1, descending=True)
        pid[idx] = g_ids[idx].gather(-1, order)
        pw[idx] = new_w
        return pw, pid

    def _forced_router(self, i: int, probs: torch.Tensor, pw: torch.Tensor, pid: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-local replay: every token continues with the golden's experts, in the golden's slot order,
        weighted by this router's probabilities for them; tokens whose own set differs are listed in
        :attr:`followed` (the comparison judges the own choice)."""
        assert self._force is not None, "called only while a forced topk_ids is set"
        g = np.asarray(self._force["topk_ids"])
        if g.shape != tuple(pid.shape):
            return pw, pid
        g_ids = torch.as_tensor(g.astype(np.int64), device=pid.device)
        differ = (pid.sort(dim=-1).values != g_ids.sort(dim=-1).values).any(dim=-1)
        tokens = torch.nonzero(differ).squeeze(1).tolist()
        if tokens:
            own = pid[tokens].cpu().numpy()
            self.followed += [(i, t, [int(e) for e in ids]) for t, ids in zip(tokens, own)]
        return probs.gather(-1, g_ids), g_ids

    def unfired(self) -> list[Injection]:
        """Planted faults that have changed nothing in any forward so far: an expert no token routed
        to, or a routing flip that router replay undid because it fell within the near-tie width."""
        return [j for j in self.injections if isinstance(j, (NanExpert, RouteFlip)) and j not in self.fired]

    def _experts(self, i: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs ``[T, k, H]`` of each token's selected experts, run grouped by expert
        (the expert-parallel candidate overrides this: its experts are spread over ranks)."""
        T, k = ids.shape
        token = torch.arange(T * k, device=ids.device) // k                    # [T*k] token of each pair
        return self._expert_pairs(i, x, token, ids.reshape(-1)).view(T, k, self.cfg.hidden)

    def _expert_pairs(self, i: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Expert ``experts[j]``'s unweighted output on ``x[rows[j]]`` for every pair ``j``: ``[n, H]``,
        in pair order, computed grouped by expert (only the experts that occur are dequantized)."""
        cfg = self.cfg
        order = torch.argsort(experts, stable=True)                  # pairs sorted by expert
        counts = torch.bincount(experts, minlength=cfg.n_expert)     # [E]
        used = torch.nonzero(counts).squeeze(1)                      # experts with tokens
        n_used = counts.index_select(0, used).tolist()               # host: group sizes
        used_host = used.tolist()
        a_all = x.index_select(0, rows.index_select(0, order))       # [n, H] grouped by expert
        out = torch.empty_like(a_all)                                # [n, H]
        per_expert = 3 * cfg.expert_ff * cfg.hidden
        batch = max(1, self.expert_values // per_expert)
        r0 = 0
        for g0 in range(0, len(used_host), batch):
            sizes = n_used[g0:g0 + batch]
            gate, up, down = self._experts_weights(i, used_host[g0:g0 + batch])  # [G, F, H] x2, [G, H, F]
            r1 = r0 + sum(sizes)
            bounds = np.cumsum([0, *sizes]).tolist()
            a = a_all[r0:r1]                                           # [n_g, H]
            if self.expert_path == "grouped_mm":
                offs = torch.tensor(bounds[1:], dtype=torch.int32, device=self.device)
                h = F.silu(_grouped(a, gate, offs)) * _grouped(a, up, offs)    # [n_g, F]
                out[r0:r1] = _grouped(h, down, offs)                   # [n_g, H]
            else:
                h = F.silu(_looped(a, gate, bounds)) * _looped(a, up, bounds)
                out[r0:r1] = _looped(h, down, bounds)
            for g, e in enumerate(used_host[g0:g0 + batch]):
                if (i, e) in self._nan:                                # planted fault: a NaN expert
                    out[r0 + bounds[g]:r0 + bounds[g + 1]] = float("nan")
                    self.fired.add(NanExpert(layer=i, expert=e))
            r0 = r1
        pairs = torch.empty_like(out)
        pairs[order] = out                                           # back to pair order
        return pairs

    def _moe(self, i: int, x: torch.Tensor, w: _Dense, rec: Recorder) -> torch.Tensor:
        ids, weights = self._route(i, x, w, rec)
        eo = self._emit("expert_out", i, self._experts(i, x, ids), rec)       # [T, k, H]
        mix = torch.bmm(weights.to(self.opmath).unsqueeze(1), eo.to(self.opmath))  # [T, 1, H]
        return self._emit("moe_out", i, mix.squeeze(1).to(self.dtype), rec)       # [T, H]

    # -- public entry points --------------------------------------------------
    @torch.inference_mode()
    def forward_layer(self, i: int, x: torch.Tensor, rec: Recorder | None = None, *,
                      router_replay: RouterReplay | None = None,
                      force: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """Run layer ``i`` on hidden state ``x [T, H]``; return its output ``[T, H]`` (replay uses this).

        With ``router_replay`` the layer follows the golden's experts at near ties (the module
        docstring); :attr:`followed` then lists where, for this call only.
        ``force`` (stage-local replay) maps stages of this layer to golden values: each stage is
        recorded as computed and then replaced by the golden's value before the next operation uses
        it, so every recorded stage holds the error of one operation alone; ``topk_ids`` makes the
        layer run the golden's experts (:attr:`followed` lists the tokens whose own choice differed).
        """
        if router_replay is not None or force is not None:
            self._guide, self._force, self.followed = router_replay, force, []
            try:
                return self.forward_layer(i, x, rec)
            finally:
                self._guide, self._force = None, None
        rec = rec or NullRecorder()
        if not 0 <= i < self.cfg.n_layer:
            raise UsageError(f"layer={i} is out of range: the model has {self.cfg.n_layer} layers")
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.cfg.hidden or x.shape[0] == 0:
            raise UsageError(f"layer {i} input has shape {list(x.shape)}, expected [T, {self.cfg.hidden}]")
        x = x.to(self.device, self.dtype)
        self._check_tokens_for_injections(x.shape[0])
        w = self._dense(i)
        h = self._emit("attn_norm", i, self._norm(x, w.attn_norm), rec)
        h = self._emit("attn_resid", i, x + self._attention(i, h, w, rec), rec)
        m = self._emit("ffn_norm", i, self._norm(h, w.ffn_norm), rec)
        return self._emit("layer_out", i, h + self._moe(i, m, w, rec), rec)

    def _check_tokens_for_injections(self, n_tokens: int) -> None:
        for toks in self._flips.values():
            for t in toks:
                if t >= n_tokens:
                    raise UsageError(f"token={t} is out of range: the prompt has {n_tokens} tokens")

    @torch.inference_mode()
    def forward(self, tokens, rec: Recorder | None = None, *, progress: Progress | None = None,
                layer_inputs: dict[int, torch.Tensor] | None = None,
                router_replay: RouterReplay | None = None) -> torch.Tensor:
        """Logits ``[T, V]`` (in the compute dtype) for ``tokens`` ``[T]``, every stage recorded.

        ``layer_inputs`` (replay) maps a layer index to the hidden state
        ``[T, H]`` that layer receives instead of its predecessor's output.
        ``router_replay``: follow the golden's experts at near ties (module
        docstring); :attr:`followed` then lists where, for this forward.
        """
        self._guide, self.followed = router_replay, []
        try:
            return self._forward(tokens, rec, progress=progress, layer_inputs=layer_inputs)
        finally:
            self._guide = None

    def _forward(self, tokens, rec: Recorder | None, *, progress: Progress | None,
                 layer_inputs: dict[int, torch.Tensor] | None) -> torch.Tensor:
        rec = rec or NullRecorder()
        cfg = self.cfg
        bad = sorted(set(layer_inputs or ()) - set(range(cfg.n_layer)))
        if bad:
            raise UsageError(f"layer_inputs: layer={bad[0]} is out of range: the model has {cfg.n_layer} layers")
        ids = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).astype(np.int64).reshape(-1)
        self.model.check_tokens(ids)
        self._check_tokens_for_injections(len(ids))
        tok = torch.from_numpy(ids).to(self.device)
        rec.save("tokens", None, tok)
        qtype, emb = self._raw("token_embd")
        x = quants_torch.dequantize(emb.index_select(0, tok.to(emb.device)).to(self.device), qtype,
                                    out_dtype=self.dtype)                      # [T, H]
        rec.save("embed", None, x)
        for i in range(cfg.n_layer):
            if layer_inputs is not None and i in layer_inputs:
                x = torch.as_tensor(layer_inputs[i])
                if x.dim() != 2 or x.shape[0] != len(ids):
                    raise UsageError(f"layer_inputs[{i}] has shape {list(x.shape)}, expected [{len(ids)}, {cfg.hidden}]")
            x = self.forward_layer(i, x, rec)
            if progress is not None:
                progress(i + 1, cfg.n_layer)
        x = self._norm(x, self._weight("output_norm"))
        rec.save("final_norm", None, x)
        logits = self._lm_head(x)
        rec.save("logits", None, logits)
        return logits

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H] @ output.T`` with the vocabulary dequantized in row chunks on the device."""
        qtype, data = self._raw("output")
        V = data.shape[0]
        step = max(1, min(V, (self.expert_values // 4) // self.cfg.hidden))
        logits = torch.empty(x.shape[0], V, dtype=self.dtype, device=self.device)
        for s in range(0, V, step):
            wchunk = quants_torch.dequantize(data[s:s + step].to(self.device), qtype, out_dtype=self.dtype)
            logits[:, s:s + step] = x @ wchunk.T
        return logits
