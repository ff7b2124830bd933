"""The check with the expert-parallel candidate: every golden case of a suite run on N ranks
(:mod:`moesnap.model.expert_parallel`), then judged as ``moesnap compare`` judges a dump.

The ranks run with router replay as ``moesnap check`` does (near-tie flips continue with the golden's
experts), free-running; each layer is then also judged by local re-reference (the reference recomputes
it from the candidate's own inputs), which plays the part of ``check``'s stage-local replay.  The report
notes what each rank held and cost (time, peak GPU memory, bytes sent per layer) and, where
``expert_out`` went non-finite, which experts, and so which ranks, produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..case import Case
from ..errors import UsageError
from ..judge.policy import Settings
from ..judge.report import Report
from ..judge.tolerances import Tolerances
from ..model.expert_parallel import run_ep_cases
from .check import open_check, with_golden_command
from .compare import judge_dump


def nonfinite_experts(case: Case, ranges: Sequence[Sequence[int]]) -> list[str]:
    """One line per layer whose experts turned a finite input (``ffn_norm``) into NaN/Inf in ``expert_out``:
    the experts of those (token, slot) pairs and the ranks that own them."""
    eo, ids, x = (case.layers.get(s) for s in ("expert_out", "topk_ids", "ffn_norm"))
    if eo is None or ids is None or x is None:
        return []
    lines = []
    for layer in range(min(len(eo), len(ids), len(x))):
        fed = np.broadcast_to(np.isfinite(x[layer]).all(axis=-1)[:, None], ids[layer].shape)   # [T, k] finite input
        bad = ~np.isfinite(eo[layer]).all(axis=-1) & fed
        if bad.any():
            experts = sorted({int(e) for e in ids[layer][bad]})
            whole = all(bad[fed & (ids[layer] == e)].all() for e in experts)
            ranks = sorted({r for e in experts for r, (lo, hi) in enumerate(ranges) if lo <= e < hi})
            lines.append(f"layer {layer} / expert_out: NaN/Inf in {int(bad.sum())} (token, slot) pairs, all routed to "
                         f"expert {', '.join(map(str, experts))} of rank {', '.join(map(str, ranks))}"
                         + ("" if whole else " (not in every pair routed there)"))
    return lines


def _figures(ep: dict[str, Any]) -> str:
    sent = np.asarray(ep["bytes_sent_per_layer"], dtype=np.float64)             # [ranks, layers]
    peak = [p for p in ep["peak_bytes"] if p is not None]
    return (f"expert parallel: {ep['ranks']} ranks ({ep['mode']}, {ep['backend']}, experts via {ep['expert_path']}), "
            f"experts {', '.join(f'[{lo}, {hi})' for lo, hi in ep['experts'])}; forward "
            f"{max(ep['forward_s']):.3g} s (slowest rank)"
            + (f", peak GPU memory {', '.join(f'{p / 2**30:.3g}' for p in peak)} GiB per rank" if peak else "")
            + f"; sent per layer per rank: mean {sent.mean() / 2**20:.3g} MiB, max {sent.max() / 2**20:.3g} MiB")


def check_ep(model: str | Path, suite: str, *, store: str | None = None, n_ranks: int = 2, backend: str = "gloo",
             device: str = "cpu", dtype: str = "float32", mode: str = "alltoall", inject: Sequence[str] = (),
             router_replay: bool = True, local: bool = True, tols: Tolerances | None = None,
             settings: Settings | None = None) -> Report | None:
    """Run the expert-parallel candidate of ``model`` on every case of ``suite`` (``NAME[@vNNNN]`` in
    ``store``) with ``n_ranks`` ranks (spawned here, or this process's rank under torchrun) and judge it
    as ``compare`` judges a dump (its cases handed over in memory).  Under torchrun the ranks other than
    0 return None.  ``inject``: ``--inject`` specs; ``settings``/``tols`` as for :func:`moesnap.run.check.check`."""
    if n_ranks < 2:
        raise UsageError(f"--gpus {n_ranks}: expert parallelism needs at least 2 ranks (leave --gpus out for one "
                         f"device)")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < n_ranks:
            raise UsageError(f"--gpus {n_ranks}: this host has {torch.cuda.device_count()} CUDA device(s)")
    o = open_check(model, suite, store=store, device=device, dtype=dtype, inject=inject, settings=settings, tols=tols,
                   router_replay=router_replay)
    cases = run_ep_cases(o.model.path, [g.tokens.tolist() for _, g in o.goldens], n_ranks, backend,
                         o.device.type, dtype, o.injections, mode=mode, router_replay=o.guides)
    if cases is None:
        return None
    ep = cases[0].attrs["expert_parallel"]
    notes = [f"injected fault: {inj}" for inj in o.injections] + [_figures(ep)]
    notes += [f"{name}: {line}" for (name, _), case in zip(o.goldens, cases)
              for line in nonfinite_experts(case, ep["experts"])]
    report = judge_dump(o.ref, o.meta, list(o.goldens), {name: case for (name, _), case in zip(o.goldens, cases)},
                        o.policy, model=o.model.path if local else None,
                        local=local, candidate_name=str(cases[0].attrs.get("producer") or "expert parallel"),
                        notes=tuple(notes))
    return with_golden_command(report, o)
