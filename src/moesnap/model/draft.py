"""Greedy proposals for a golden's continuation: moesnap's candidate decoding through a KV cache, cheaply.

``goldens generate --decode N`` stores ONE reference forward over the prompt and the reference's own
greedy continuation (:func:`moesnap.run.trace.continued_reference`).  The continuation is found by
proposing it here and letting that reference forward verify it: where the reference's argmax differs
from the proposal, its own choice is kept and the rest proposed again.  A proposal changes no golden
bit; it only decides how many reference forwards run (one when it is right).

A proposal is a prefill of the prompt and then one decode step per token.  The plain candidate
(:class:`~moesnap.model.candidate.CandidateModel`) dequantizes every weight it touches at every step:
at the 30B-A3B shape (hidden 2048, 151936-token vocabulary) a step dequantized 311 M values of the
output matrix, 19 M of each layer's dense weights and 38 M of its 8 experts, so that 32 steps of a
48-layer model dequantized ~3 times the values of the reference's whole prefill.  :class:`Drafter` is
the same forward (the same dequantization and the same arithmetic, so the same choices) with:

* each layer's dense weights (fused q/k/v, o, norms, router) dequantized at the layer's first forward
  and kept for the following steps;
* the output matrix dequantized once and kept, and only the last row's logits computed (the prefill
  of a 128-token prompt computed 128 rows of 151936 logits to use one);
* a KV cache that can start from a reference forward's own ``k_rope``/``v`` rows
  (:func:`propose` ``seed=``), so that a proposal made again after a correction skips the prefill.

Experts stay dequantized per step (only the 8 each token routes to): keeping them would hold every
expert of every layer in float32 (2.4 GB per layer at the 30B-A3B shape).  What is kept: float32
copies of the dense weights and the output matrix, about ``4 * (n_layer * H * (2 * q_dim + 2 * kv_dim + E)
+ V * H)`` bytes (:func:`kept_bytes`; ~4.9 GB for 48 layers of 30B-A3B, ~0.6 GB for 2), for one proposal
only.  On the CPU the file's pages a layer read leave the process after the layer (as the reference's do),
so the proposal's resident memory is those copies plus one layer's working set.

:func:`draft_device` picks where proposals run: a CUDA device where one is present and its free
memory holds the model's stored bytes and those copies with room to spare (the decode steps
dequantize there at device speed; a model of less than 256 MiB stays on the CPU), else the CPU.  ``MOESNAP_DRAFT_DEVICE`` (``cpu``, ``cuda``,
``cuda:N``) overrides the choice.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import gguf
import numpy as np
import torch

from ..errors import UsageError
from .candidate import CandidateModel, _Call, _Dense
from .candidate_mla import Latent
from .faults import NO_FAULTS, Faults
from .kvcache import KVCache
from .recorder import NullRecorder, Recorder
from .tensors import table
from .weights import ModelWeights

#: the environment variable that names where proposals run (``cpu``, ``cuda``, ``cuda:N``)
DEVICE_VARIABLE = "MOESNAP_DRAFT_DEVICE"

#: the part of a CUDA device's free memory a proposal may count on
CUDA_SHARE = 0.8

#: stored bytes from which a model's proposal goes to a CUDA device (below, starting CUDA costs more than
#: the CPU's whole proposal: the bundled tiny model's takes ~0.05 s there)
CUDA_FROM_BYTES = 256 << 20


class Drafter(CandidateModel):
    """The candidate forward in float32 for proposals: dense weights and the output matrix dequantized
    once and kept, logits of the last row only (module docstring).  :attr:`kept` says what is kept."""

    def __init__(self, model: ModelWeights, *, device: torch.device | str = "cpu") -> None:
        super().__init__(model, device=device, dtype=torch.float32)
        self._layers: dict[int, _Dense | Latent] = {}
        self._head_weights: tuple[torch.Tensor, torch.Tensor] | None = None   # output_norm [H], output [V, H]

    @property
    def kept(self) -> dict[str, int]:
        """Bytes of dequantized weights kept so far: ``dense`` (every layer run so far), ``output``."""
        dense = sum(t.numel() * t.element_size() for w in self._layers.values() for t in vars(w).values()
                    if t is not None)
        out = sum(t.numel() * t.element_size() for t in self._head_weights or ())
        return {"dense": dense, "output": out}

    def _dense(self, i: int, faults: Faults) -> _Dense | Latent:
        if faults:      # planted faults decide how a tensor is decoded: nothing kept for them
            return super()._dense(i, faults)
        w = self._layers.get(i)
        if w is None:
            w = self._layers[i] = super()._dense(i, faults)
        return w

    def _layer(self, i: int, x: torch.Tensor, c: _Call) -> torch.Tensor:
        out = super()._layer(i, x, c)
        if not self.resident:    # on the CPU: the file's pages this layer read leave the resident set, as the
            self.model.release_layer(i)   # reference's do (they stay in the page cache; a step maps 8 experts again)
        return out

    def _head(self, x: torch.Tensor, rec: Recorder) -> torch.Tensor:
        """The logits ``[1, V]`` of the last row of ``x [T, H]`` only (a proposal needs the next token)."""
        if self._head_weights is None:
            self._head_weights = (self._weight("output_norm", NO_FAULTS), self._weight("output", NO_FAULTS))
            if not self.resident:
                self.model.release_tensor("output")
        norm, out = self._head_weights
        return self._norm(x[-1:], norm) @ out.T                                # [1, V]


def propose(model: ModelWeights | Drafter, tokens: Sequence[int], n: int, *, device: torch.device | str = "cpu",
            seed: Mapping[str, np.ndarray] | None = None) -> list[int]:
    """``n`` tokens after ``tokens``, each the argmax of the draft's logits at the one before: a prefill
    of ``tokens`` and ``n - 1`` decode steps through a KV cache, in float32 on ``device``.

    ``seed``: ``k_rope`` and ``v`` ``[L, >= len(tokens) - 1, Hkv, D]`` of a forward over ``tokens``
    (and maybe more after them), e.g. a reference forward's recorded stages; the cache starts with its
    rows ``0 .. len(tokens) - 2`` and the first step runs the last token alone (no prefill).  A seed of
    another shape is a caller's mistake (ValueError: not a model the candidate cannot run, which
    :func:`~moesnap.run.trace.greedy_draft` answers by falling back to the reference)."""
    ids = [int(t) for t in tokens]
    if not ids:
        raise UsageError("an empty prompt: nothing to continue")
    if n <= 0:
        return []
    draft = model if isinstance(model, Drafter) else Drafter(model, device=device)
    cfg = draft.cfg
    cache = KVCache(cfg, n_seqs=1, capacity=len(ids) + n, device=draft.device, dtype=torch.float32)
    fed = ids
    if seed is not None and len(ids) > 1:
        k, v = np.asarray(seed["k_rope"]), np.asarray(seed["v"])
        want = (cfg.n_layer, cfg.n_head_kv, cfg.head_dim)
        if (k.ndim != 4 or v.shape != k.shape[:-1] + (cfg.v_dim,) or (k.shape[0], *k.shape[2:]) != want
                or k.shape[1] < len(ids) - 1):
            raise ValueError(f"seed k_rope/v of shape {list(k.shape)}/{list(v.shape)}: expected "
                             f"[{cfg.n_layer}, >= {len(ids) - 1}, {cfg.n_head_kv}, {cfg.head_dim}]"
                             + (f" (values {cfg.v_dim} wide)" if cfg.v_dim != cfg.head_dim else ""))
        for i in range(cfg.n_layer):
            cache.load(i, 0, torch.from_numpy(np.ascontiguousarray(k[i, :len(ids) - 1])),
                       torch.from_numpy(np.ascontiguousarray(v[i, :len(ids) - 1])))
        fed = ids[-1:]
    rec = NullRecorder()
    out: list[int] = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False      # float32 matmuls on CUDA too, as the reference's
    try:
        while len(out) < n:
            batch = cache.batch([(0, len(fed))])
            logits = draft.forward_batch(np.asarray(fed, dtype=np.int64), batch, cache, rec).logits
            out.append(int(torch.argmax(logits[-1]).item()))
            fed = out[-1:]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def stored_bytes(model: ModelWeights) -> int:
    """Bytes of every tensor as stored (what a device candidate uploads), from shapes and types alone."""
    tab = table(model.config.arch)
    names = list(tab.global_tensors) + [f"blk.{i}.{t}" for i in range(model.config.n_layer)
                                          for t in tab.in_layer(i, model.config.layer_where(i))]
    total = 0
    for name in names:
        block, size = gguf.GGML_QUANT_SIZES[model.tensor_type(name)]
        total += int(np.prod(model.shape(name))) // block * size
    return total


def kept_bytes(model: ModelWeights) -> int:
    """Bytes :class:`Drafter` keeps for a whole proposal: every tensor of the family's table but the embedding
    and the experts (and their biases) in float32: each layer's dense weights and the output matrix."""
    c = model.config
    tab = table(c.arch)
    left = {"token_embd", *tab.expert_tensors, *tab.expert_biases}
    shapes = tab.expected_shapes(c.dims, c.n_layer, c.layer_where)
    return 4 * sum(int(np.prod(shape)) for name, shape in shapes.items() if name.split(".", 2)[-1] not in left)


def draft_device(model: ModelWeights) -> torch.device:
    """Where proposals for ``model`` run (module docstring): ``$MOESNAP_DRAFT_DEVICE``, else, for a model
    of at least :data:`CUDA_FROM_BYTES` stored bytes, the current CUDA device when its free memory holds
    those bytes, the kept weights and a whole layer's experts dequantized, within :data:`CUDA_SHARE` of
    it, else the CPU."""
    name = os.environ.get(DEVICE_VARIABLE, "").strip()
    if name:
        if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
            raise UsageError(f"{DEVICE_VARIABLE}={name!r}: expected cpu, cuda or cuda:N")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"{DEVICE_VARIABLE}={name!r}: no CUDA device is available")
        return torch.device(name)
    stored = stored_bytes(model)
    if stored < CUDA_FROM_BYTES or not torch.cuda.is_available():
        return torch.device("cpu")
    c = model.config
    experts = 4 * 2 * 3 * c.n_expert * c.expert_ff * c.hidden     # a layer's experts dequantized, twice over
    free, _ = torch.cuda.mem_get_info()
    need = stored + kept_bytes(model) + experts
    return torch.device("cuda") if need <= CUDA_SHARE * free else torch.device("cpu")
