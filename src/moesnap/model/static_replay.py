"""Router replay decided on the device, for a decode step on static buffers (a CUDA graph captures it).

:class:`~moesnap.model.candidate.RouterReplay` decides on the host: it finds the rows whose expert set
differs from the golden's, computes the near-tie gap of each in numpy and gathers the golden's experts
for those rows only.  A captured graph cannot ask the host anything, so :class:`StaticReplay` holds the
golden's routing of one decode step in fixed device tensors that the host refills before each replay,
and makes the same decision for every row at once with tensor operations:

* ``differ = sorted(own ids) != sorted(golden ids)`` (any slot);
* ``gap = max(l[e] for e not in own) - min(l[e] for e in own)`` over the golden's router logits ``l``
  in float64 -- :func:`moesnap.judge.routing.tie_gap`'s formula, NaN where the row is not finite
  (the model may not import the judge, so the formula is written out here and tested against it);
* ``use = differ & (gap <= tie_tol[layer]) & active`` (``active``: the guide holds this layer);
* where ``use``: the golden's experts, weighted by the candidate's own scores for them (its router
  probabilities, or its logits for a family that picks by them, gpt-oss), sorted descending (stable) --
  the rows the eager replay rewrites, with the same values.

``use`` and the candidate's own ids are copied into static output buffers as part of the step, and
:meth:`StaticReplay.read` turns them into the (layer, row, own ids) notes the eager replay keeps.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

__all__ = ["StaticReplay", "tie_gaps"]


class _Guide(Protocol):
    """What :class:`StaticReplay` reads of a :class:`~moesnap.model.candidate.RouterReplay`."""

    @property
    def ids(self) -> np.ndarray: ...

    @property
    def logits(self) -> np.ndarray: ...

    def tie_tol_at(self, i: int) -> float: ...


def tie_gaps(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The near-tie gap of choosing ``chosen [B, k]`` under router logits ``logits [B, E]`` (float64),
    per row: ``max(l[e] for e not chosen) - min(l[e] for e chosen)``, NaN where the row holds a
    non-finite logit, 0 where every expert is chosen.  Tensor operations only (no host data)."""
    B, E = logits.shape
    if chosen.shape[1] >= E:
        return torch.zeros(B, dtype=torch.float64, device=logits.device)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)      # [B, E]
    worst_in = logits.masked_fill(~mask, float("inf")).amin(dim=-1)                  # [B]
    best_out = logits.masked_fill(mask, float("-inf")).amax(dim=-1)                  # [B]
    # Python scalars only: a tensor made from one on the device would be a host copy, which a capture refuses
    return (best_out - worst_in).masked_fill(~torch.isfinite(logits).all(dim=-1), float("nan"))


class StaticReplay:
    """The golden routing of one decode step of ``n_rows`` rows in static device tensors: golden ids
    ``ids [L, B, k]``, router logits ``logits [L, B, E]`` (float64), ``active [L, B]`` and the tie
    widths ``tie_tol [L]``; the decision written to ``used [L, B]`` and the candidate's own choice to
    ``own [L, B, k]``.  ``guides``: one :class:`~moesnap.model.candidate.RouterReplay` per row's sequence
    (the tie widths are the first's, as the eager replay of a batch takes them)."""

    def __init__(self, guides: Sequence[_Guide], *, n_layer: int, n_expert: int, k: int,
                 device: torch.device) -> None:
        self.guides = list(guides)
        L, B = n_layer, len(self.guides)
        self.k, self.n_expert = k, n_expert
        self.ids = torch.zeros(L, B, k, dtype=torch.long, device=device)
        self.logits = torch.zeros(L, B, n_expert, dtype=torch.float64, device=device)
        self.active = torch.zeros(L, B, dtype=torch.bool, device=device)
        self.tie_tol = torch.tensor([self.guides[0].tie_tol_at(i) for i in range(L)], dtype=torch.float64,
                                    device=device)
        self.used = torch.zeros(L, B, dtype=torch.bool, device=device)
        self.own = torch.zeros(L, B, k, dtype=torch.long, device=device)

    def fill(self, positions: Sequence[int]) -> None:
        """The golden's routing at ``positions[b]`` of row ``b``'s guide into the static tensors (before a
        step runs or replays).  A layer a guide lacks, or holds with another ``k`` or expert count,
        stays inactive for that row, as the eager replay skips it."""
        L, B = self.ids.shape[:2]
        ids = np.zeros((L, B, self.k), dtype=np.int64)
        logits = np.zeros((L, B, self.n_expert), dtype=np.float64)
        active = np.zeros((L, B), dtype=bool)
        for b, (g, p) in enumerate(zip(self.guides, positions)):
            for i in range(min(L, len(g.ids), len(g.logits))):
                gi, gl = np.asarray(g.ids[i]), np.asarray(g.logits[i])
                if gi.ndim != 2 or gl.ndim != 2 or gi.shape[1] != self.k or gl.shape[1] != self.n_expert:
                    continue
                ids[i, b], logits[i, b], active[i, b] = gi[p], gl[p], True
        self.ids.copy_(torch.from_numpy(ids))
        self.logits.copy_(torch.from_numpy(logits))
        self.active.copy_(torch.from_numpy(active))

    def follow(self, i: int, probs: torch.Tensor, pw: torch.Tensor, pid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (weights, ids) ``[B, k]`` after router replay: the golden's experts where the
        candidate's set differs at a near tie (module docstring).  ``probs [B, E]``: the candidate's
        router probabilities; ``pw``, ``pid``: its own top-k, descending."""
        g_ids = self.ids[i]                                                              # [B, k]
        differ = (pid.sort(dim=-1).values != g_ids.sort(dim=-1).values).any(dim=-1)     # [B]
        use = differ & self.active[i] & (tie_gaps(self.logits[i], pid) <= self.tie_tol[i])
        self.used[i].copy_(use)
        self.own[i].copy_(pid)
        new_w, order = probs.gather(-1, g_ids).sort(dim=-1, descending=True, stable=True)
        take = use[:, None]
        return torch.where(take, new_w, pw), torch.where(take, g_ids.gather(-1, order), pid)

    def read(self) -> list[tuple[int, int, list[int]]]:
        """After a step: (layer, row, the candidate's own ids) of every row that followed the golden,
        layer by layer, rows ascending (the eager replay's order)."""
        used = self.used.cpu().numpy()
        own = self.own.cpu().numpy()
        return [(int(i), int(b), [int(e) for e in own[i, b]]) for i, b in zip(*np.nonzero(used))]
