"""The MoE half of a candidate layer, every family's: the routing of the families that rank their experts by
one score, the routed mixture, and shared experts (DeepSeek's; Qwen2-MoE's one, gated), as device functions
:class:`~moesnap.model.candidate.CandidateModel` and :mod:`~moesnap.model.candidate_mla` call (DeepSeek's
grouped routing is :func:`moesnap.model.candidate_mla.route`).  Its own code: it shares the config, the stage
names and the recorder with the reference, none of its code paths.

* **Routing** (:func:`route`): the router logits in float32 (plus gpt-oss's bias); the experts are the top
  k of the softmax over every expert (``softmax_topk_renorm``: Qwen3-MoE and Mixtral renormalise the k
  probabilities; ``softmax_topk``: Qwen2-MoE and OLMoE keep them as they are) or of the logits themselves
  (``topk_softmax``, gpt-oss: a softmax over the k chosen logits).  The logits' order decides either way,
  so router replay measures near ties on them (:data:`moesnap.stages.ROUTING_SCORES`) and, following the
  golden's experts, weighs them by the family's own rule.
* **Mixture** (:func:`mixture`): the selected experts' unweighted outputs (``expert_out``, the candidate's
  grouped expert path) weighted and summed in float32; the shared experts (``shared_expert_out``: one
  SwiGLU of the layer's fused gate/up and down matrices, in the compute dtype) added in float32, Qwen2-MoE's
  first scaled by the sigmoid of its gate's logit (``shared_gate``: ``ffn_gate_inp_shexp · x`` in float32,
  as the router).

Planted faults of these parts act through :meth:`~moesnap.model.faults.Faults.off`: ``renorm_flip`` (the k
weights renormalised where the family keeps them, or kept where it renormalises: ``topk_weights``),
``shared_off`` (the shared experts left out of ``moe_out``), ``shared_gate_off`` (Qwen2-MoE's shared expert
added without its gate: ``moe_out``).
"""

from __future__ import annotations

import torch

from .forward_io import Candidate, _Call, choose_experts
from .kernels import swiglu

#: a MoE layer's shared experts: the fused gate/up ``[2F, H]`` and down ``[H, F]`` matrices, and the gate
#: ``[H]`` of Qwen2-MoE's shared expert (None: ungated, DeepSeek's)
Shared = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP of ``x [T, H]`` with fused gate/up ``[2F, H]`` and down ``[H, F]`` matrices (a dense
    layer's MLP, a MoE layer's shared experts): ``[T, H]`` in ``x``'s dtype."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)                                # [T, F] x2
    return swiglu(gate, up) @ down.T                                           # [T, H]


def route(cand: Candidate, i: int, x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None,
          c: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids ``[T, k]`` int64, topk_weights ``[T, k]`` in the compute dtype) of ``x [T, H]`` by the router
    ``[E, H]`` (and its ``bias [E]``), both in the router dtype (module docstring)."""
    cfg = cand.cfg
    logits = x.to(cand.router_dtype) @ router.T                                # [T, E]
    if bias is not None:
        logits = logits + bias
    logits = c.emit("router_logits", i, logits)
    softmax = cfg.gating != "topk_softmax"
    scores = torch.softmax(logits, dim=-1) if softmax else logits              # what top-k picks from
    pw, pid = choose_experts(i, scores, scores, cfg.n_expert_used, c)          # [T, k]
    if not softmax:
        weights = torch.softmax(pw, dim=-1)
    elif (cfg.gating == "softmax_topk_renorm") != c.faults.off(i, "renorm_flip"):
        weights = pw / pw.sum(dim=-1, keepdim=True)
    else:
        weights = pw
    return c.emit("topk_ids", i, pid), c.emit("topk_weights", i, weights.to(cand.dtype))


def mixture(cand: Candidate, i: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            shared: Shared | None, c: _Call) -> torch.Tensor:
    """``moe_out [T, H]`` (compute dtype) of ``x [T, H]``: the experts ``ids [T, k]`` weighted by ``weights``,
    plus the ``shared`` experts (module docstring)."""
    eo = c.emit("expert_out", i, cand._experts(i, x, ids, c))                 # [T, k, H]
    mix = torch.bmm(weights.to(cand.opmath).unsqueeze(1), eo.to(cand.opmath)).squeeze(1)   # [T, H] float32
    if shared is not None:
        gate_up, down, gate = shared
        out = c.emit("shared_expert_out", i, mlp(x, gate_up, down)).to(cand.opmath)      # [T, H]
        if gate is not None:                                                   # Qwen2-MoE: gated per token
            logit = c.emit("shared_gate", i, x.to(cand.router_dtype) @ gate[:, None])     # [T, 1]
            if not c.faults.off(i, "shared_gate_off"):
                out = torch.sigmoid(logit.to(cand.opmath)) * out
        if not c.faults.off(i, "shared_off"):
            mix = mix + out
    return c.emit("moe_out", i, mix.to(cand.dtype))
