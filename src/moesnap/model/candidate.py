"""The candidate forward of the MoE families moesnap knows: a second, GPU-minded implementation.

Families differ in data, read from the config once: gpt-oss adds biases to q/k/v/o, the router and
the experts (the experts' biases and clamped SwiGLU in float32, as a fused kernel's epilogue), attention
sinks and a sliding window on its sliding layers (one more key of zeros whose additive bias is the
head's sink, and a mask; :mod:`moesnap.model.kernels`), YaRN RoPE tables, and picks its experts by the
top k of its logits with a softmax over those k; Qwen3-MoE's q/k norm runs where the config has it, per
head, OLMoE's over the whole projection; Qwen2-MoE adds q/k/v biases; Mixtral's RoPE turns adjacent pairs
of the file's permuted q/k rows (as llama.cpp; ``rope_interleaved``).  Routing, the routed mixture and
shared experts (Qwen2-MoE's gated one) are :mod:`moesnap.model.candidate_moe`'s, every family's; the k
weights renormalised or not (Qwen2-MoE and OLMoE do not) by the config's ``gating``.
DeepSeek-V2/V3 (a config with ``mla``) runs its own layer parts from :mod:`moesnap.model.candidate_mla`:
latent attention, dense leading layers, grouped routing, with this module's expert path, RoPE tables,
KV cache and router replay.

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

**The forward is only the forward** (gpt-fast's ``MOEFeedForward``): no modes, no state kept
between calls.  What one call needs comes in as arguments (the recorder, a
:class:`~moesnap.model.inject.Faults` of planted faults, router replay, stage-local replay's forced
values) and what it finds comes back in its return value (:class:`Output`, :class:`LayerOutput`).
Planted faults act only through the :class:`~moesnap.model.inject.Faults` methods the forward calls at
fixed points (decoding a tensor, passing a stage on, the top-k choice, an expert's rows), which also
record whether each fault fired.  Whether ``scaled_dot_product_attention`` takes ``enable_gqa`` and
which expert path runs are decided once per model, from cached probes.

**Router replay** (:class:`RouterReplay`, what ``moesnap check`` does by default):
in low precision the candidate legitimately picks other experts where two
golden router logits nearly tie.  Given the golden routing, a token whose
expert set differs from the golden's within ``tie_tol`` (the judge's rule,
passed in as :attr:`RouterReplay.gap`) continues with the golden's experts,
weighted by the candidate's own router probabilities for them as the family
weighs its own (renormalised or not), so that it stays comparable in every
later stage and layer.
``topk_ids`` records the experts used; :attr:`Output.followed` lists
each (layer, token, own choice), which the comparison judges as the routing
decision (``ROUTING_TIE``).  A wider flip is kept: it is a divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import gguf
import numpy as np
import torch
from torch.nn import functional as F

from ..gguf import quants_torch
from ..errors import UsageError
from ..stages import DTYPES as STAGE_DTYPES
from .faults import NO_FAULTS, Faults
from .forward_io import Followed, LayerOutput, Output, RouterReplay, _Call
from .kernels import (EXPERT_PATHS, _grouped, _looped, _opmath, _sdpa_causal, default_expert_path,
                      grouped_mm_works, rope_frequencies, rope_halves, rope_pairs, sdpa_masked, sdpa_takes_enable_gqa,
                      swiglu, window_mask)
from .kvcache import Batch, KVCache, cached_attention
from . import candidate_mla as mla
from . import candidate_moe as moe
from .candidate_mla import Latent
from .tensors import table
from .recorder import NullRecorder, Recorder
from .static_replay import StaticReplay
from .weights import ModelWeights, file_bytes

Progress = Callable[[int, int], None]

#: dtypes the candidate computes in
DTYPES = tuple(getattr(torch, name) for name in STAGE_DTYPES)
__all__ = ["CandidateModel", "RouterReplay", "Followed", "Output", "LayerOutput", "DTYPES", "EXPERT_PATHS",
           "grouped_mm_works", "default_expert_path", "sdpa_takes_enable_gqa"]


@dataclass
class _Dense:
    """One layer's dense weights, dequantized on the device."""

    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor       # [Hq*D + 2*Hkv*D, H]
    wo: torch.Tensor         # [H, Hq*D]
    q_norm: torch.Tensor | None      # [D] (families with q/k norm; OLMoE's over the whole projection: [Hq*D])
    k_norm: torch.Tensor | None      # [D] (OLMoE: [Hkv*D])
    ffn_norm: torch.Tensor   # [H]
    router: torch.Tensor     # [E, H] in the router dtype
    bqkv: torch.Tensor | None = None         # [Hq*D + 2*Hkv*D] q/k/v biases (families with attention biases)
    bo: torch.Tensor | None = None           # [H] the output projection's bias
    sinks: torch.Tensor | None = None        # [Hq] attention sink logits, float32 (families with sinks)
    router_bias: torch.Tensor | None = None  # [E] in the router dtype
    shexp_gate_up: torch.Tensor | None = None  # [2F, H] the shared expert (Qwen2-MoE): gate and up, fused
    shexp_down: torch.Tensor | None = None     # [H, F]
    shexp_gate: torch.Tensor | None = None     # [H] its gate, in the router dtype


#: how a family turns router logits into its k experts and their weights (:func:`moesnap.model.candidate_moe.route`;
#: DeepSeek's grouped ones: :func:`moesnap.model.candidate_mla.route`)
GATINGS = ("softmax_topk_renorm", "softmax_topk", "topk_softmax", "softmax_grouped", "sigmoid_grouped")
#: the experts' activations the candidate computes
FFN_ACTS = ("swiglu", "swiglu_oai")


def _kind(name: str) -> str:
    """A tensor's name without its ``blk.N.`` prefix (``attn_q.bias``, ``token_embd``): what planted faults
    name a tensor by."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def _batch(batch: Batch | None, cache: KVCache | None, n_rows: int) -> Batch | None:
    """``batch`` checked against the rows it must place and the cache it needs."""
    if batch is None:
        return None
    if cache is None:
        raise UsageError("rows placed in a KV cache (batch=) need the cache (cache=)")
    if batch.n_rows != n_rows:
        raise UsageError(f"the batch places {batch.n_rows} rows, the forward has {n_rows}")
    return batch


def _ids_on(idx: torch.Tensor | None, ids: list[int], device: torch.device | str) -> torch.Tensor:
    """``ids`` as an index tensor on ``device``: ``idx`` where it is one there already, else uploaded."""
    if idx is not None and idx.device == torch.device(device):
        return idx
    return torch.tensor(ids, device=device)


def _token_ids(tokens: Any) -> np.ndarray:
    return np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).astype(np.int64).reshape(-1)


#: the families (gguf-py architecture names) this forward computes
CANDIDATE_FAMILIES: tuple[str, ...] = ("qwen3moe", "gpt-oss", "deepseek2", "qwen2moe", "llama", "olmoe")


class CandidateModel:
    """The candidate forward over an open :class:`~moesnap.model.weights.GGUFModel`.

    ``expert_path`` forces ``"grouped_mm"`` or ``"loop"``; by default
    :func:`default_expert_path` chooses.
    ``expert_values`` bounds how many expert weight values are dequantized at
    once (default: 2**26 on the CPU, 2**31 elsewhere, i.e. a whole full-width
    layer on a GPU).  Planted faults are not part of the model: each forward takes them
    (``faults=``, a :class:`~moesnap.model.inject.Faults`).
    """

    def __init__(self, model: ModelWeights, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, expert_path: str | None = None,
                 expert_values: int | None = None) -> None:
        if dtype not in DTYPES:
            raise UsageError(f"dtype {dtype} is not supported by the candidate forward; "
                             f"choose one of {', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")
        if model.config.arch not in CANDIDATE_FAMILIES:
            raise UsageError(f"{model.path}: moesnap's candidate forward computes {', '.join(CANDIDATE_FAMILIES)} "
                             f"models, not {model.config.arch!r} ones (the reference and goldens do)")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {str(self.device)!r} requested but no CUDA device is available")
        self.model, self.cfg, self.dtype = model, model.config, dtype
        cfg = self.cfg
        if cfg.gating not in GATINGS or cfg.ffn_act not in FFN_ACTS:
            raise UsageError(f"the candidate forward does not compute {cfg.arch}'s gating {cfg.gating!r} with "
                             f"activation {cfg.ffn_act!r} (it computes {', '.join(GATINGS)}; {', '.join(FFN_ACTS)})")
        self.tensors = table(cfg.arch)
        #: the norm before the MoE (``ffn_norm``; gpt-oss files call it ``post_attention_norm``)
        self.ffn_norm_name = next(n for n, k in self.tensors.by_name.items() if k.stage == "ffn_norm" and not k.bias)
        self._act = partial(swiglu, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha, oai=cfg.ffn_act == "swiglu_oai")
        self.opmath = _opmath(dtype)
        self.router_dtype = self.opmath
        if expert_path is None:
            expert_path = default_expert_path(self.device, dtype, self.cfg)
        if expert_path not in EXPERT_PATHS:
            raise UsageError(f"expert_path={expert_path!r}; choose one of {', '.join(EXPERT_PATHS)}")
        self.expert_path = expert_path
        #: whether attention passes ``enable_gqa`` (else key/value heads are repeated first)
        self.gqa = sdpa_takes_enable_gqa()
        on_cpu = self.device.type == "cpu"
        self.expert_values = expert_values or (1 << 26 if on_cpu else 1 << 31)
        self.resident = not on_cpu          # keep uploaded bytes for the model's lifetime
        self._bytes: dict[str, torch.Tensor] = {}
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        #: with :meth:`keep_weights`: each layer's dense weights and the output matrix's chunks, dequantized
        #: once for the faults they were decoded under (None: decoded at every forward)
        self._kept: dict[Any, Any] | None = None
        self._kept_faults: Faults | None = None
        #: bytes of whole layers' experts :meth:`keep_weights` may keep dequantized (None: while the GPU has a
        #: quarter of its memory free after them), and those kept so far
        self._expert_budget: int | None = 0
        self._expert_kept = 0

    def keep_weights(self, expert_bytes: int | None = None) -> None:
        """Keep what a forward dequantizes besides the experts (each layer's dense weights, the output
        matrix in the chunks it is multiplied by) from its first use on, for every later forward of the
        same planted faults: a server's decode steps, one row each, would otherwise dequantize them again
        at every step (the output matrix alone is 311 M values at the 30B-A3B shape).  The same tensors
        and the same chunked products, so the same bits.  Costs their memory: about ``itemsize x (n_layer x
        H x (2 q_dim + 2 kv_dim + E) + V x H)`` bytes (~2.5 GB in bfloat16 for 48 layers of 30B-A3B).

        Experts too, a whole layer's at a time, the layers first used first, while they fit in
        ``expert_bytes`` (default: on a GPU, while a quarter of its memory stays free after them, asked at
        each layer; on the CPU, none): a decode step would otherwise dequantize its experts at every layer again (three calls of
        dozens of small kernels each, twice with stage-local replay).  The same dequantized values, the
        selected experts taken from them: the same bits."""
        if self._kept is None:
            self._kept = {}
        self._expert_budget = expert_bytes if expert_bytes is not None else None if self.device.type == "cuda" else 0

    def _keeping(self, faults: Faults) -> dict[Any, Any] | None:
        """The kept weights for ``faults`` (those of another planted fault are dropped), or None."""
        if self._kept is None:
            return None
        if faults is not self._kept_faults:
            self._kept.clear()
            self._kept_faults = faults
            self._expert_kept = 0
        return self._kept

    def faults(self, injections: Sequence[Any] = ()) -> Faults:
        """The :class:`~moesnap.model.inject.Faults` of ``injections`` for this model (validated)."""
        return Faults(tuple(injections), self.model)

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
            for name in self.tensors.global_tensors:
                self._raw(name)
            for i in range(self.cfg.n_layer):
                for t in self.tensors.in_layer(i, self.cfg.layer_where(i)):
                    self._raw(f"blk.{i}.{t}")

    def _weight(self, name: str, faults: Faults, layer: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        qtype, data = self._raw(name)
        return faults.dequantize(data.to(self.device), qtype, layer, _kind(name), dtype or self.dtype)

    def _dense(self, i: int, faults: Faults) -> _Dense | Latent:
        kept = self._keeping(faults)
        if kept is not None:
            w = kept.get(("dense", i))
            if w is None:
                w = kept[("dense", i)] = self._dequantized_dense(i, faults)
            return w
        return self._dequantized_dense(i, faults)

    def _dequantized_dense(self, i: int, faults: Faults) -> _Dense | Latent:
        p = f"blk.{i}."
        cfg = self.cfg
        if cfg.mla:                                   # DeepSeek: latent attention, dense or shared MLPs
            return mla.weights(self, i, faults)
        wqkv = torch.empty(cfg.q_dim + 2 * cfg.kv_dim, cfg.hidden, dtype=self.dtype, device=self.device)
        wqkv[:cfg.q_dim] = self._weight(p + "attn_q", faults, i)
        wqkv[cfg.q_dim:cfg.q_dim + cfg.kv_dim] = self._weight(p + "attn_k", faults, i)
        wqkv[cfg.q_dim + cfg.kv_dim:] = self._weight(p + "attn_v", faults, i)
        bqkv = bo = gate_up = down = gate = None
        if cfg.attn_bias:   # q/k/v (and gpt-oss's o)
            bqkv = torch.cat([self._weight(p + f"attn_{n}.bias", faults, i) for n in "qkv"])
            bo = self._weight(p + "attn_output.bias", faults, i) if self.tensors.has("attn_output.bias") else None
        if cfg.n_shared_experts:   # Qwen2-MoE's one, with its gate
            gate_up = torch.cat([self._weight(p + "ffn_gate_shexp", faults, i), self._weight(p + "ffn_up_shexp", faults, i)])
            down = self._weight(p + "ffn_down_shexp", faults, i)
            gate = self._weight(p + "ffn_gate_inp_shexp", faults, i, self.router_dtype) if cfg.shared_expert_gate else None
        return _Dense(
            attn_norm=self._weight(p + "attn_norm", faults, i),
            wqkv=wqkv,
            wo=self._weight(p + "attn_output", faults, i),
            q_norm=self._weight(p + "attn_q_norm", faults, i) if cfg.qk_norm else None,
            k_norm=self._weight(p + "attn_k_norm", faults, i) if cfg.qk_norm else None,
            ffn_norm=self._weight(p + self.ffn_norm_name, faults, i),
            router=self._weight(p + "ffn_gate_inp", faults, i, self.router_dtype),
            bqkv=bqkv, bo=bo,
            sinks=self._weight(p + "attn_sinks", faults, i, self.opmath) if cfg.attn_sinks else None,
            router_bias=self._weight(p + "ffn_gate_inp.bias", faults, i, self.router_dtype) if cfg.router_bias else None,
            shexp_gate_up=gate_up, shexp_down=down, shexp_gate=gate,
        )

    def _experts_weights(self, i: int, ids: list[int], faults: Faults, idx: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate ``[G, F, H]``, up ``[G, F, H]`` and down ``[G, H, F]`` of experts ``ids`` (ascending); ``idx``:
        the same ids as a tensor on the device already (no upload, so no wait for one)."""
        whole = self._kept_experts(i, faults)
        if whole is not None:
            idx = _ids_on(idx, ids, self.device)
            return whole[0].index_select(0, idx), whole[1].index_select(0, idx), whole[2].index_select(0, idx)
        p = f"blk.{i}."
        lo, hi = ids[0], ids[-1] + 1
        contiguous = hi - lo == len(ids)  # common with many tokens: a slice, no gather
        out = []
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            qtype, data = self._raw(p + name)
            sel = data[lo:hi] if contiguous else data.index_select(0, _ids_on(idx, ids, data.device))
            out.append(faults.dequantize(sel.to(self.device), qtype, i, name, self.dtype))  # only these experts
        return out[0], out[1], out[2]

    def _kept_experts(self, i: int, faults: Faults) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every expert of layer ``i`` dequantized (kept by :meth:`keep_weights` while the budget lasts), or
        None."""
        kept = self._keeping(faults)
        if kept is None or self._expert_budget == 0:
            return None
        whole = kept.get(("experts", i))
        if whole is None:
            cfg = self.cfg
            size = 3 * cfg.n_expert * cfg.expert_ff * cfg.hidden * torch.empty(0, dtype=self.dtype).element_size()
            if self._expert_budget is None:
                free, total = torch.cuda.mem_get_info(self.device)
                # what torch's allocator holds cached but unused (the judge's copies, a prefill's activations)
                # is free to it too, though the driver counts it as taken
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                if free - size < total // 4:
                    return None
            elif self._expert_kept + size > self._expert_budget:
                return None
            whole = kept[("experts", i)] = self._experts_weights_all(i, faults)
            self._expert_kept += size
        return whole

    def _experts_weights_all(self, i: int, faults: Faults) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f"blk.{i}."
        out = []
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            qtype, data = self._raw(p + name)
            out.append(faults.dequantize(data.to(self.device), qtype, i, name, self.dtype))
        return out[0], out[1], out[2]

    def _experts_biases(self, i: int, ids: list[int], faults: Faults, idx: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The biases of gate ``[G, F]``, up ``[G, F]`` and down ``[G, H]`` of experts ``ids`` (global ids: the
        biases are small and every rank holds them whole), in float32, or None for a family without them;
        ``idx``: ``ids`` on the device already."""
        if not self.cfg.expert_bias:
            return None
        idx = _ids_on(idx, ids, self.device)
        g, u, d = (self._weight(f"blk.{i}.{n}.bias", faults, i, self.opmath).index_select(0, idx)
                   for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        return g, u, d

    # -- stages ---------------------------------------------------------------
    def _rope(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D/2]`` of positions ``0..T-1`` in the rope dtype, from float64 angles."""
        return self._rope_at(torch.arange(n_tokens), n_tokens)

    def _rope_at(self, positions: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, 1, D/2]`` of each row's absolute position (``positions [T]``, every one below
        ``need``): rows of one table that grows as needed, each row computed from its position alone
        (float64 angles), so a row is the same whatever else is asked with it."""
        if self._rope_table is None or self._rope_table[0].shape[0] < need:
            n = max(need, 2 * (self._rope_table[0].shape[0] if self._rope_table is not None else 0), 64)
            cfg = self.cfg
            inv, mscale = rope_frequencies(cfg.rope_dim, cfg.rope_base, scaling=cfg.rope_scaling, factor=cfg.rope_factor,
                                           orig_context=cfg.rope_orig_context, beta_fast=cfg.rope_beta_fast,
                                           beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_yarn_truncate)
            ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]  # [n, D/2]
            cos, sin = ang.cos(), ang.sin()
            if cfg.yarn_log_mul > 0:    # DeepSeek's YaRN scales the softmax instead (candidate_mla.softmax_scale)
                mscale = 1.0
            if mscale != 1.0:                                                   # YaRN's attention factor
                cos, sin = cos * mscale, sin * mscale
            self._rope_table = (cos.to(self.device, self.opmath), sin.to(self.device, self.opmath))
        cos, sin = self._rope_table
        idx = positions.to(self.device)
        return cos.index_select(0, idx)[:, None, :], sin.index_select(0, idx)[:, None, :]

    def _apply_rope(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: _Call) -> torch.Tensor:
        """``x [T, heads, D]`` of layer ``i`` turned in float32: NeoX's halves, or the family's adjacent pairs
        (``rope_interleaved``: DeepSeek's rope part, a Mixtral file's permuted rows); a ``rope_flip`` fault
        turns the other layout."""
        pairs = self.cfg.rope_interleaved != c.faults.off(i, "rope_flip")
        return (rope_pairs if pairs else rope_halves)(x, cos, sin)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_eps)

    def _qk_norm(self, i: int, x: torch.Tensor, w: torch.Tensor, c: _Call) -> torch.Tensor:
        """RMSNorm of ``x [T, heads, D]`` per head (weights ``[D]``), or over the whole projection (OLMoE's
        ``qk_norm_whole``, weights ``[heads*D]``); a ``qk_norm_flip`` fault normalises over the other extent
        (the weights applied as they are)."""
        whole = self.cfg.qk_norm_whole
        if not c.faults.off(i, "qk_norm_flip"):
            return self._norm(x.flatten(1), w).view_as(x) if whole else self._norm(x, w)
        if whole:
            return F.rms_norm(x, (x.shape[-1],), None, self.cfg.rms_eps) * w.view(x.shape[1:])
        return F.rms_norm(x.flatten(1), (x[0].numel(),), None, self.cfg.rms_eps).view_as(x) * w

    def _attention(self, i: int, x: torch.Tensor, w: _Dense, c: _Call) -> torch.Tensor:
        cfg = self.cfg
        T, D = x.shape[0], cfg.head_dim
        qkv = x @ w.wqkv.T                                                      # [T, Hq*D + 2*Hkv*D]
        if w.bqkv is not None:
            qkv = qkv + w.bqkv
        q = c.emit("q", i, qkv[:, :cfg.q_dim].view(T, cfg.n_head, D))           # [T, Hq, D]
        k = c.emit("k", i, qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].view(T, cfg.n_head_kv, D))
        v = c.emit("v", i, qkv[:, cfg.q_dim + cfg.kv_dim:].view(T, cfg.n_head_kv, D))
        if w.q_norm is not None and w.k_norm is not None:                       # families with q/k norm
            q = c.emit("q_norm", i, self._qk_norm(i, q, w.q_norm, c))
            k = c.emit("k_norm", i, self._qk_norm(i, k, w.k_norm, c))
        window = cfg.sliding_window if cfg.slides(i) else 0
        if c.batch is None or c.cache is None:                                  # causal over these rows
            cos, sin = self._rope(T)
            q = c.emit("q_rope", i, self._apply_rope(i, q, cos, sin, c))
            k = c.emit("k_rope", i, self._apply_rope(i, k, cos, sin, c))
            qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D]
            window, sinks = c.faults.attention(i, window, w.sinks, T - 1)
            if sinks is None and not window:
                o = _sdpa_causal(qh, kh, vh, self.gqa).transpose(0, 1)
            else:
                mask = window_mask(torch.arange(T, device=x.device), T, window or T)[None]   # [1, T, T]
                o = sdpa_masked(qh[None], kh[None], vh[None], mask, sinks, self.gqa)[0].transpose(0, 1)
        else:                                                                   # through the KV cache
            b = c.faults.layer(i, c.batch)
            cos, sin = self._rope_at(b.rope_pos, b.max_pos + 1)
            q = c.emit("q_rope", i, self._apply_rope(i, q, cos, sin, c))
            k = c.emit("k_rope", i, self._apply_rope(i, k, cos, sin, c))
            window, sinks = c.faults.attention(i, window, w.sinks, max(b.lens) - 1)
            o = cached_attention(q, k, v, c.cache.k[i], c.cache.v[i], b, self.gqa,
                                 window=window, sinks=sinks)                    # [T, Hq, D]
        attn = c.emit("attn", i, o.reshape(T, cfg.q_dim))                       # [T, Hq*D]
        out = attn @ w.wo.T                                                     # [T, H]
        return c.emit("attn_out", i, out if w.bo is None else out + w.bo)

    def _experts(self, i: int, x: torch.Tensor, ids: torch.Tensor, c: _Call) -> torch.Tensor:
        """Unweighted outputs ``[T, k, H]`` of each token's selected experts, run grouped by expert
        (the expert-parallel candidate overrides this: its experts are spread over ranks)."""
        T, k = ids.shape
        token = torch.arange(T * k, device=ids.device) // k                    # [T*k] token of each pair
        return self._expert_pairs(i, x, token, ids.reshape(-1), c.faults).view(T, k, self.cfg.hidden)

    def _expert_pairs(self, i: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                      faults: Faults) -> torch.Tensor:
        """Expert ``experts[j]``'s unweighted output on ``x[rows[j]]`` for every pair ``j``: ``[n, H]``,
        in pair order, computed grouped by expert (only the experts that occur are dequantized)."""
        cfg = self.cfg
        order = torch.argsort(experts, stable=True)                  # pairs sorted by expert
        counts = torch.bincount(experts, minlength=cfg.n_expert)     # [E]
        used = torch.nonzero(counts).squeeze(1)                      # experts with tokens
        host = torch.cat((used, counts.index_select(0, used))).tolist()   # one wait for the device
        used_host, n_used = host[:used.shape[0]], host[used.shape[0]:]    # experts, group sizes
        a_all = x.index_select(0, rows.index_select(0, order))       # [n, H] grouped by expert
        out = torch.empty_like(a_all)                                # [n, H]
        per_expert = 3 * cfg.expert_ff * cfg.hidden
        batch = max(1, self.expert_values // per_expert)
        sizes_dev = counts.index_select(0, used)                     # [U] the group sizes, where used lives
        r0 = 0
        for g0 in range(0, len(used_host), batch):
            # the ids, offsets and group of each row made from what is on the device already: a decode step
            # would otherwise upload them (and wait for each upload) at every layer
            sizes, ids_dev = n_used[g0:g0 + batch], used[g0:g0 + batch]
            gate, up, down = self._experts_weights(i, used_host[g0:g0 + batch], faults, ids_dev)  # [G, F, H] x2, [G, H, F]
            bias = self._experts_biases(i, used_host[g0:g0 + batch], faults, ids_dev)           # [G, F] x2, [G, H]
            r1 = r0 + sum(sizes)
            bounds = np.cumsum([0, *sizes]).tolist()
            a = a_all[r0:r1]                                           # [n_g, H]
            if self.expert_path == "grouped_mm":
                offs = torch.cumsum(sizes_dev[g0:g0 + batch], 0, dtype=torch.int32)
                mm = partial(_grouped, offs=offs)
            else:
                mm = partial(_looped, bounds=bounds)
            g, u = mm(a, gate), mm(a, up)                              # [n_g, F]
            if bias is None:
                out[r0:r1] = mm(self._act(g, u), down)                 # [n_g, H]
            else:   # the biases and the activation in float32, as a fused kernel's epilogue applies them
                grp = torch.repeat_interleave(torch.arange(len(sizes), device=self.device), sizes_dev[g0:g0 + batch],
                                              output_size=r1 - r0)
                g = g.to(self.opmath) + bias[0].index_select(0, grp)
                u = u.to(self.opmath) + bias[1].index_select(0, grp)
                d = mm(self._act(g, u).to(self.dtype), down)
                out[r0:r1] = d.to(self.opmath) + bias[2].index_select(0, grp)
            faults.expert_rows(i, used_host[g0:g0 + batch], out[r0:r1], bounds)
            r0 = r1
        pairs = torch.empty_like(out)
        pairs[order] = out                                           # back to pair order
        return pairs

    def _layer(self, i: int, x: torch.Tensor, c: _Call) -> torch.Tensor:
        w = self._dense(i, c.faults)
        h = c.emit("attn_norm", i, self._norm(x, w.attn_norm))
        if isinstance(w, Latent):                     # DeepSeek (candidate_mla)
            h = c.emit("attn_resid", i, x + mla.attention(self, i, h, w, c))
            m = c.emit("ffn_norm", i, self._norm(h, w.ffn_norm))
            return c.emit("layer_out", i, h + mla.ffn(self, i, m, w, c))
        h = c.emit("attn_resid", i, x + self._attention(i, h, w, c))
        m = c.emit("ffn_norm", i, self._norm(h, w.ffn_norm))
        ids, weights = moe.route(self, i, m, w.router, w.router_bias, c)
        shared = None if w.shexp_gate_up is None or w.shexp_down is None else (w.shexp_gate_up, w.shexp_down, w.shexp_gate)
        return c.emit("layer_out", i, h + moe.mixture(self, i, m, ids, weights, shared, c))

    def _layer_input(self, i: int, x: Any) -> torch.Tensor:
        if not 0 <= i < self.cfg.n_layer:
            raise UsageError(f"layer={i} is out of range: the model has {self.cfg.n_layer} layers")
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.cfg.hidden or x.shape[0] == 0:
            raise UsageError(f"layer {i} input has shape {list(x.shape)}, expected [T, {self.cfg.hidden}]")
        return x.to(self.device, self.dtype)

    # -- public entry points --------------------------------------------------
    @torch.inference_mode()
    def forward_layer(self, i: int, x: torch.Tensor, rec: Recorder | None = None, *,
                      router_replay: RouterReplay | None = None, force: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                      faults: Faults = NO_FAULTS, batch: Batch | None = None,
                      cache: KVCache | None = None) -> LayerOutput:
        """Run layer ``i`` on hidden state ``x [T, H]`` (replay uses this).

        With ``router_replay`` the layer follows the golden's experts at near ties (the module
        docstring).  ``force`` (stage-local replay) maps stages of this layer to golden values: each
        stage is recorded as computed and then replaced by the golden's value before the next operation
        uses it, so every recorded stage holds the error of one operation alone; ``topk_ids`` makes the
        layer run the golden's experts.  The returned :attr:`LayerOutput.followed` lists the tokens that
        ran the golden's experts rather than their own.  ``batch`` and ``cache``: the rows attend through
        a KV cache (:meth:`forward_batch`) instead of causally over themselves.
        """
        x = self._layer_input(i, x)
        if batch is None:
            faults.check_tokens(x.shape[0])
        c = _Call(rec or NullRecorder(), faults, router_replay, force, _batch(batch, cache, x.shape[0]), cache)
        return LayerOutput(self._layer(i, x, c), tuple(c.followed))

    @torch.inference_mode()
    def forward(self, tokens: Any, rec: Recorder | None = None, *, progress: Progress | None = None,
                layer_inputs: Mapping[int, torch.Tensor] | None = None,
                router_replay: RouterReplay | None = None, faults: Faults = NO_FAULTS,
                on_layer: Callable[[int, tuple[Followed, ...]], None] | None = None) -> Output:
        """Logits ``[T, V]`` (in the compute dtype) for ``tokens`` ``[T]``, every stage recorded.

        ``layer_inputs`` (replay) maps a layer index to the hidden state
        ``[T, H]`` that layer receives instead of its predecessor's output.
        ``router_replay``: follow the golden's experts at near ties (module
        docstring); the returned :attr:`Output.followed` lists where.
        ``faults``: the planted faults to apply (:meth:`faults`).
        ``on_layer(i, followed)``: called once layer ``i`` is computed (its stages saved), with where it
        followed the golden's experts in that layer (a judge may read the layer while the next runs).
        """
        rec = rec or NullRecorder()
        cfg = self.cfg
        bad = sorted(set(layer_inputs or ()) - set(range(cfg.n_layer)))
        if bad:
            raise UsageError(f"layer_inputs: layer={bad[0]} is out of range: the model has {cfg.n_layer} layers")
        ids = _token_ids(tokens)
        self.model.check_tokens(ids)
        faults.check_tokens(len(ids))
        c = _Call(rec, faults, router_replay)
        tok = torch.from_numpy(ids).to(self.device)
        rec.save("tokens", None, tok)
        x = self._embed(tok)                                                   # [T, H]
        rec.save("embed", None, x)
        for i in range(cfg.n_layer):
            if layer_inputs is not None and i in layer_inputs:
                x = torch.as_tensor(layer_inputs[i])
                if x.dim() != 2 or x.shape[0] != len(ids):
                    raise UsageError(f"layer_inputs[{i}] has shape {list(x.shape)}, expected [{len(ids)}, {cfg.hidden}]")
            before = len(c.followed)
            x = self._layer(i, self._layer_input(i, x), c)
            if on_layer is not None:
                on_layer(i, tuple(c.followed[before:]))
            if progress is not None:
                progress(i + 1, cfg.n_layer)
        return Output(self._head(x, rec), tuple(c.followed))

    @torch.inference_mode()
    def forward_batch(self, tokens: Any, batch: Batch, cache: KVCache, rec: Recorder | None = None, *,
                      router_replay: RouterReplay | StaticReplay | None = None, faults: Faults = NO_FAULTS) -> Output:
        """One serving forward: the packed rows of ``batch`` (a prompt, a chunk of one, a decode step, or
        several sequences' of them at once; :mod:`moesnap.model.kvcache`), ``tokens [T]`` at the
        positions ``batch.pos``, each row attending its own sequence's keys in ``cache`` (this forward's
        k/v rows written there first).  Every stage is recorded as :meth:`forward` records it, packed
        ``[T, ...]`` in row order.  ``router_replay``: a guide over these ``T`` rows
        (:meth:`RouterReplay.rows`), or a :class:`~moesnap.model.static_replay.StaticReplay` (decided on
        the device; where it followed is read from it after the step).  Returns the logits ``[T, V]`` and
        where the golden's experts were followed (``token``: the packed row)."""
        rec = rec or NullRecorder()
        tok = tokens.to(self.device) if isinstance(tokens, torch.Tensor) else \
            torch.from_numpy(_token_ids(tokens)).to(self.device)
        if tok.shape[0] != batch.n_rows:
            raise UsageError(f"{tok.shape[0]} tokens for a batch of {batch.n_rows} rows")
        c = _Call(rec, faults, router_replay, None, _batch(faults.step(batch), cache, batch.n_rows), cache)
        rec.save("tokens", None, tok)
        x = self._embed(tok)                                                   # [T, H]
        rec.save("embed", None, x)
        for i in range(self.cfg.n_layer):
            x = self._layer(i, x, c)
        return Output(self._head(x, rec), tuple(c.followed))

    def _embed(self, tok: torch.Tensor) -> torch.Tensor:
        """The embedding rows ``[T, H]`` of token ids ``tok [T]`` (on the device), dequantized there."""
        qtype, emb = self._raw("token_embd")
        return quants_torch.dequantize(emb.index_select(0, tok.to(emb.device)).to(self.device), qtype,
                                       out_dtype=self.dtype)

    def _head(self, x: torch.Tensor, rec: Recorder) -> torch.Tensor:
        """Final norm and lm head of the last layer's output ``x [T, H]``, both recorded."""
        x = self._norm(x, self._weight("output_norm", NO_FAULTS))
        rec.save("final_norm", None, x)
        logits = self._lm_head(x)
        rec.save("logits", None, logits)
        return logits

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H] @ output.T`` with the vocabulary dequantized in row chunks on the device."""
        V = self._stored("output")[1].shape[0]      # the file's rows: no fetch of the bytes for the shape alone
        logits = torch.empty(x.shape[0], V, dtype=self.dtype, device=self.device)
        for s, wchunk in self._output_chunks():
            logits[:, s:s + wchunk.shape[0]] = x @ wchunk.T
        return logits

    def _output_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The output matrix as (first row, rows ``[n, H]`` dequantized on the device), one chunk at a time
        (those :meth:`keep_weights` keeps are taken from there, the others kept there as they are made)."""
        qtype, data = self._raw("output")
        V = data.shape[0]
        step = max(1, min(V, (self.expert_values // 4) // self.cfg.hidden))
        kept = self._kept       # no planted fault decodes the output matrix
        for s in range(0, V, step):
            wchunk = None if kept is None else kept.get(("output", s))
            if wchunk is None:
                wchunk = quants_torch.dequantize(data[s:s + step].to(self.device), qtype, out_dtype=self.dtype)
                if kept is not None:
                    kept[("output", s)] = wchunk
            yield s, wchunk
