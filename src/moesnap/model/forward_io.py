"""What one forward of the candidate is given and gives back: the golden routing it follows at near
ties (:class:`RouterReplay`), where it followed it (:class:`Followed`), its results (:class:`Output`,
:class:`LayerOutput`) and the arguments of one call handed down its stages (``_Call``); how a layer's
own top-k choice gives way to the golden's (:func:`choose_experts`: :func:`replay_router` at near ties,
:func:`forced_router` in stage-local replay), whichever family's router made it; what the family modules
(:mod:`~moesnap.model.candidate_moe`, :mod:`~moesnap.model.candidate_mla`) use of the candidate
(:class:`Candidate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from .config import ModelConfig
from .faults import Faults
from .kvcache import Batch, KVCache
from .recorder import Recorder
from .static_replay import StaticReplay
from .weights import ModelWeights

__all__ = ["RouterReplay", "Followed", "Output", "LayerOutput"]
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

    def ids_on(self, i: int, device: torch.device | str) -> torch.Tensor:
        """Layer ``i``'s golden ids ``[T, k]`` (int64) on ``device``: every layer's uploaded in one copy at the
        first ask and kept (a forward would otherwise upload, and wait for, a copy at each layer)."""
        kept = self.__dict__.setdefault("_on_device", {})
        key = str(device)
        if key not in kept:
            kept[key] = torch.as_tensor(np.asarray(self.ids).astype(np.int64), device=device)
        return kept[key][i]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the device copies (a rank, a worker process makes its own)."""
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}

    def rows(self, positions: Sequence[int] | np.ndarray) -> RouterReplay:
        """The same guide for a forward over the golden's rows at ``positions`` only (a decode step, a
        chunk of a prompt)."""
        idx = np.asarray(positions, dtype=np.int64)
        return RouterReplay(np.asarray(self.ids)[:, idx], np.asarray(self.logits)[:, idx], self.tie_tol, self.gap)


class Followed(NamedTuple):
    """Where a forward continued with the golden's experts instead of its own: the layer, the row of the
    forward (the token index of its case) and the experts the candidate itself chose."""

    layer: int
    token: int
    own: list[int]


class Output(NamedTuple):
    """What :meth:`CandidateModel.forward` returns: the logits ``[T, V]`` (compute dtype) and where it
    followed the golden's experts."""

    logits: torch.Tensor
    followed: tuple[Followed, ...]


class LayerOutput(NamedTuple):
    """What :meth:`CandidateModel.forward_layer` returns: the layer's output ``[T, H]`` and where it
    followed the golden's experts."""

    out: torch.Tensor
    followed: tuple[Followed, ...]


@dataclass
class _Call:
    """What one forward call was given, and the experts it followed: made by the public entry
    points, handed down explicitly, never kept on the model."""

    rec: Recorder
    faults: Faults
    guide: RouterReplay | StaticReplay | None = None   # StaticReplay: decided on the device
    force: Mapping[str, np.ndarray | torch.Tensor] | None = None
    batch: Batch | None = None          # rows attend through ``cache`` (else: causal over themselves)
    cache: KVCache | None = None
    followed: list[Followed] = field(default_factory=list)

    def emit(self, stage: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A stage's value: passed through the planted faults, recorded, and passed on (the golden's
        value instead, where stage-local replay forces this stage)."""
        x = self.faults.stage(layer, stage, x)
        self.rec.save(stage, layer, x)
        forced = self.force.get(stage) if self.force is not None and stage != "topk_ids" else None
        if forced is not None and tuple(forced.shape) == tuple(x.shape):
            t = forced if isinstance(forced, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(forced))
            return t.to(x.device, x.dtype)
        return x


class Candidate(Protocol):
    """What the family modules use of :class:`~moesnap.model.candidate.CandidateModel` (which calls them;
    a Protocol: no import cycle)."""

    cfg: ModelConfig
    model: ModelWeights
    dtype: torch.dtype
    opmath: torch.dtype
    router_dtype: torch.dtype
    gqa: bool

    def _weight(self, name: str, faults: Faults, layer: int | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def _rope(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _rope_at(self, positions: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _apply_rope(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: _Call) -> torch.Tensor: ...

    def _experts(self, i: int, x: torch.Tensor, ids: torch.Tensor, c: _Call) -> torch.Tensor: ...


def choose_experts(i: int, rank: torch.Tensor, select: torch.Tensor, k: int, c: _Call
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s (scores, expert ids) ``[T, k]``: the top ``k`` of ``rank [T, E]`` (descending; a planted
    ``route`` flip applied), then the golden's experts where stage-local replay forces them or router replay
    follows them at a near tie, ordered and scored by ``select [T, E]`` (the scores the family ranks by)."""
    pw, pid = c.faults.topk(i, rank, k, c.batch.pos if c.batch is not None else None)   # [T, k], descending
    if c.force is not None and "topk_ids" in c.force:
        pw, pid = forced_router(i, select, pw, pid, c)
    elif isinstance(c.guide, StaticReplay):                                     # the same rule, no host
        pw, pid = c.guide.follow(i, select, pw, pid)
    elif c.guide is not None:
        pw, pid = replay_router(i, select, pw, pid, c)
    c.faults.routed(i, pid)
    return pw, pid


def replay_router(i: int, probs: torch.Tensor, pw: torch.Tensor, pid: torch.Tensor, c: _Call
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router replay: tokens whose expert set differs from the golden's at a near tie take the golden's,
    ordered and weighted by ``probs [T, E]`` (the scores the candidate ranks by)."""
    replay = c.guide
    assert not isinstance(replay, StaticReplay), "decided on the device by StaticReplay.follow"
    guide = replay.layer(i, pid.shape[0]) if replay is not None else None
    if replay is None or guide is None or guide[0].shape[1] != pid.shape[1]:
        return pw, pid
    g_ids = replay.ids_on(i, pid.device)                                            # [T, k]
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
        c.followed.append(Followed(i, t, [int(e) for e in own[tokens.index(t)]]))
    idx = torch.tensor(follow, device=pid.device)
    pid, pw = pid.clone(), pw.clone()
    new_w, order = probs[idx].gather(-1, g_ids[idx]).sort(dim=-1, descending=True, stable=True)
    pid[idx] = g_ids[idx].gather(-1, order)
    pw[idx] = new_w
    return pw, pid


def forced_router(i: int, probs: torch.Tensor, pw: torch.Tensor, pid: torch.Tensor, c: _Call
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-local replay: every token continues with the golden's experts, in the golden's slot order,
    weighted by this router's probabilities for them; tokens whose own set differs are listed as
    followed (the comparison judges the own choice)."""
    assert c.force is not None, "called only while a forced topk_ids is given"
    g = np.asarray(c.force["topk_ids"])
    if g.shape != tuple(pid.shape):
        return pw, pid
    g_ids = torch.as_tensor(g.astype(np.int64), device=pid.device)
    differ = (pid.sort(dim=-1).values != g_ids.sort(dim=-1).values).any(dim=-1)
    tokens = torch.nonzero(differ).squeeze(1).tolist()
    if tokens:
        own = pid[tokens].cpu().numpy()
        c.followed += [Followed(i, t, [int(e) for e in ids]) for t, ids in zip(tokens, own)]
    return probs.gather(-1, g_ids), g_ids
