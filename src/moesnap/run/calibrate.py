"""Measure the noise floor that tolerances are derived from.

For each candidate dtype the reference forward is run in that dtype and in
float64 on the same tokens; per stage we take

* ``max_abs``: the largest |x_dtype - x_float64| over layers, tokens, elements;
* ``rel_p99``: the 99th percentile of |d| / |g| over elements with |g| at least
  the stage's RMS (small |g| are covered by atol);
* ``max_rel_l2``: the largest per-layer relative L2 error.

Tokens whose expert set differs from float64's at some layer (a near tie the
lower precision flipped) are left out of that layer's post-routing stages
and of every later layer from that token on, as the classifier does.  Each
layer is measured on the stages it has (:func:`moesnap.stages.stages_of_layer`:
a DeepSeek dense layer has no router or experts, a MoE layer no
``dense_ffn_out``); the filler rows the stacked arrays hold for the others are
never read.

The suggested tolerance is ``atol = margin * max_abs``, ``rtol = margin *
rel_p99`` (:data:`MARGIN`): the float32 reference's own distance to float64
is the yardstick for what a correct float32 engine may differ by, in the
spirit of Dynamo's accuracy check (a few times the reference's own error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.recorder import ArrayRecorder
from ..model.ggml import identity
from ..model.reference import ActQuant, run_reference
from ..stages import INTEGER_STAGES, POST_ROUTING_STAGES, layer_stages, stages_of_layer
from ..model.weights import ModelWeights

MARGIN = 10.0


@dataclass
class StageSpread:
    max_abs: float = 0.0
    rel_p99: float = 0.0
    max_rel_l2: float = 0.0
    n: int = 0

    def add(self, g: np.ndarray, c: np.ndarray) -> None:
        g64, c64 = g.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        if g64.size == 0:
            return
        d = np.abs(c64 - g64)
        self.max_abs = max(self.max_abs, float(d.max()))
        rms = float(np.sqrt(np.mean(g64 * g64)))
        big = np.abs(g64) >= rms
        if big.any():
            self.rel_p99 = max(self.rel_p99, float(np.quantile(d[big] / np.abs(g64[big]), 0.99)))
        norm = float(np.linalg.norm(g64))
        if norm > 0:
            self.max_rel_l2 = max(self.max_rel_l2, float(np.linalg.norm(c64 - g64)) / norm)
        self.n += g64.size


def measure(model: ModelWeights, token_lists: list[list[int]], dtype: torch.dtype,
            progress=None, aq: ActQuant = identity) -> tuple[dict[str, StageSpread], int]:
    """Per-stage spread of the reference in ``dtype`` against float64; also the number of routing flips.

    ``aq`` rounds each matmul input of the ``dtype`` run (``ActivationQuant``: what a correct ggml
    engine computes, for the ``ggml`` profile); the float64 run never rounds.  The stages are the
    model's family's (gpt-oss has no ``q_norm``/``k_norm``)."""
    cfg = model.config
    spread = {s: StageSpread() for s in ("embed", *layer_stages(cfg.arch), "final_norm", "logits")
              if s not in INTEGER_STAGES}
    per_layer = [stages_of_layer(cfg.arch, cfg.to_dict(), layer) for layer in range(cfg.n_layer)]
    flips = 0
    for tokens in token_lists:
        lo, hi = ArrayRecorder(), ArrayRecorder(keep_dtype=True)
        run_reference(model, tokens, dtype=dtype, recorder=lo, progress=progress, aq=aq)
        run_reference(model, tokens, dtype=torch.float64, recorder=hi, progress=progress)
        L_lo, L_hi = lo.stacked(), hi.stacked()
        T = len(tokens)
        keep_from = T  # tokens >= keep_from are left out (an earlier layer flipped one)
        spread["embed"].add(hi.model["embed"], lo.model["embed"])
        for layer, stages in enumerate(per_layer):
            flipped = np.zeros(0, dtype=np.int64)
            if "topk_ids" in stages:
                same = np.array([set(a) == set(b) for a, b in zip(L_hi["topk_ids"][layer], L_lo["topk_ids"][layer])])
                flipped = np.flatnonzero(~same[:keep_from])
            flips += len(flipped)
            for stage in stages:
                if stage in INTEGER_STAGES:
                    continue
                rows = np.arange(keep_from)
                if stage in POST_ROUTING_STAGES and flipped.size:
                    rows = np.setdiff1d(rows, flipped)
                g, c = L_hi[stage][layer][rows], L_lo[stage][layer][rows]
                if stage in ("topk_weights", "expert_out"):  # compare per expert, in id order
                    og = np.argsort(L_hi["topk_ids"][layer][rows], axis=1)
                    oc = np.argsort(L_lo["topk_ids"][layer][rows], axis=1)
                    ex = (1,) * (g.ndim - 2)
                    g = np.take_along_axis(g, og.reshape(og.shape + ex), 1)
                    c = np.take_along_axis(c, oc.reshape(oc.shape + ex), 1)
                spread[stage].add(g, c)
            if flipped.size:
                keep_from = int(flipped.min())
        for stage in ("final_norm", "logits"):
            spread[stage].add(hi.model[stage][:keep_from], lo.model[stage][:keep_from])
    return spread, flips


def suggested(spread: dict[str, StageSpread], margin: float = MARGIN) -> dict[str, tuple[float, float]]:
    return {s: (margin * sp.max_abs, margin * sp.rel_p99) for s, sp in spread.items() if sp.n}


def toml_block(dtype: str, sugg: dict[str, tuple[float, float]]) -> list[str]:
    lines = [f"[tool.moesnap.tolerance.{dtype}]"]
    for stage, (atol, rtol) in sugg.items():
        lines.append(f"{stage} = {{atol = {atol:.3g}, rtol = {rtol:.3g}}}")
    return lines
