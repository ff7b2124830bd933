"""The check with the expert-parallel candidate: every golden case of a suite run on N ranks
(:mod:`moesnap.model.expert_parallel`), then judged as ``moesnap compare`` judges a dump.

The ranks run with router replay as ``moesnap check`` does (near-tie flips continue with the golden's
experts), free-running; each layer is then also judged by local re-reference (the reference recomputes
it from the candidate's own inputs), which plays the part of ``check``'s stage-local replay.  The report
notes what each rank held and cost (time, peak GPU memory, bytes sent per layer) and, where
``expert_out`` went non-finite, which experts, and so which ranks, produced it.

Beyond one prefill (``decode``, ``paged``, ``batch``, ``chunk``): every rank serves the same cases as the
single-device serving check does (:func:`moesnap.run.serving.serve_pairs`: prefill, then teacher-forced
decode steps through a KV cache of its own -- attention is replicated --, the experts reached through the
collectives), stage-local replay included (each replayed layer's experts on their ranks too); rank 0
records and judges each forward as it comes (:func:`moesnap.run.serving.judge_serving`, the one judging of
every serving check), the other ranks keep only their logits.  The decode step runs eagerly: a CUDA graph
would have to capture the collectives, which this candidate does not do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..case import Case
from ..errors import UsageError
from ..judge.policy import Settings
from ..judge.report import Report
from ..judge.suite import Pair
from ..judge.tolerances import Tolerances
from ..model.expert_parallel import (check_launch, expert_range, launch, process_group, rank_setup, run_ep_cases,
                                     under_torchrun)
from ..util import progress_enabled, quiet, status
from .check import Opened, open_check, with_golden_command
from .compare import judge_dump
from .serving import Serving, judge_serving, plan_serving, serve_pairs, unfired_error

if TYPE_CHECKING:
    import torch


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
             settings: Settings | None = None, decode: int | None = None, paged: bool = False, batch: bool = False,
             chunk: int | None = None, cuda_graph: bool = False, replay: bool | None = None,
             served: list[tuple[str, Case]] | None = None) -> Report | None:
    """Run the expert-parallel candidate of ``model`` on every case of ``suite`` (``NAME[@vNNNN]`` in
    ``store``) with ``n_ranks`` ranks (spawned here, or this process's rank under torchrun) and judge it
    as ``compare`` judges a dump (its cases handed over in memory).  Under torchrun the ranks other than
    0 return None.  ``inject``: ``--inject`` specs; ``settings``/``tols`` as for :func:`moesnap.run.check.check`.

    Beyond one prefill, as :func:`moesnap.run.check.check` serves (``decode`` steps after each prompt,
    ``paged``, ``batch``, ``chunk``; ``replay``: stage-local replay, default on in bfloat16/float16): every
    rank serves the cases, rank 0 judges each forward as the single-device serving check does.  ``served``:
    a list that receives each forward's recorded rows, ``(name, Case)`` in the report's order (to save or
    compare them).  ``cuda_graph`` is refused (the decode step's collectives are not captured)."""
    if n_ranks < 2:
        raise UsageError(f"--gpus {n_ranks}: expert parallelism needs at least 2 ranks (leave --gpus out for one "
                         f"device)")
    if cuda_graph:
        raise UsageError("--cuda-graph: not with --gpus (the expert-parallel decode step's collectives are not "
                         "captured in a CUDA graph; its steps run eagerly)")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < n_ranks:
            raise UsageError(f"--gpus {n_ranks}: this host has {torch.cuda.device_count()} CUDA device(s)")
    if decode is not None or paged or batch or chunk is not None:
        job = _ServeJob(model=str(model), suite=suite, store=store, n_ranks=n_ranks, backend=backend, device=device,
                        dtype=dtype, mode=mode, inject=tuple(inject), router_replay=router_replay, settings=settings,
                        tols=tols, decode=decode or 0, replay=replay, paged=paged, batch=batch, chunk=chunk,
                        keep=served is not None, quiet=not progress_enabled())
        out = _check_ep_serving(job)
        if out is None:
            return None
        if served is not None:
            served.extend(out[1])
        return out[0]
    if replay:
        raise UsageError("--replay with --gpus: one prefill is judged layer by layer by local re-reference; stage-"
                         "local replay is for the decode steps (--decode N)")
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


# --------------------------------------------------------------------------- serving on N ranks


@dataclass(frozen=True)
class _ServeJob:
    """What every rank of an expert-parallel serving check runs (picklable, for spawn): the options of
    :func:`check_ep`, each rank opening the model and the golden itself."""

    model: str
    suite: str
    store: str | None
    n_ranks: int
    backend: str
    device: str
    dtype: str
    mode: str
    inject: tuple[str, ...]
    router_replay: bool
    settings: Settings | None
    tols: Tolerances | None
    decode: int
    replay: bool | None
    paged: bool
    batch: bool
    chunk: int | None
    keep: bool                        # rank 0 returns each forward's recorded rows too
    quiet: bool                       # no status lines (the caller's -q / show_progress=False)
    opened: bool = False              # the caller has opened and checked it all (rank 0 need not say so again)
    judge_processes: int | None = None  # the caller's judging processes (a spawned rank is no moesnap command)

    @property
    def device_type(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"


def _check_ep_serving(job: _ServeJob) -> tuple[Report, list[tuple[str, Case]]] | None:
    """Refuse what no rank could run (before any starts), then serve ``job`` on its ranks."""
    if job.chunk is not None and job.chunk < 1:
        raise UsageError(f"--chunk {job.chunk}: must be >= 1 token")
    if not under_torchrun():
        from ..judge.pool import case_processes

        with quiet(job.quiet):
            _open(job, job.device)
        job = replace(job, opened=True, judge_processes=case_processes())
    out: tuple[Report, list[tuple[str, Case]]] | None = launch(_serve_rank, job, job.n_ranks, job.device_type)
    return out


def _open(job: _ServeJob, device: str) -> tuple[Opened, Serving]:
    """The policy, model, faults and golden of the check (:func:`~moesnap.run.check.open_check`) and the
    serving run planned on them, every bad input refused in one line."""
    o = open_check(job.model, job.suite, store=job.store, device=device, dtype=job.dtype, inject=job.inject,
                   settings=job.settings, tols=job.tols, router_replay=job.router_replay)
    check_launch(job.n_ranks, job.backend, job.device_type, job.mode, o.model.config.n_expert)
    s = plan_serving(o.model, o.goldens, device=o.device, dtype=o.policy.dtype or "float32", decode=job.decode,
                     replay=job.replay, injections=o.injections, paged=job.paged, batch=job.batch, chunk=job.chunk)
    return o, s


def _serve_rank(job: _ServeJob) -> tuple[Report, list[tuple[str, Case]]] | None:
    """One rank of the serving check: serve every case; rank 0 judges and returns the report (and, with
    ``job.keep``, each forward's recorded rows), the others None."""
    rank, world, device = rank_setup(job.n_ranks, job.backend, job.device_type)
    if rank == 0 and job.judge_processes is not None:
        os.environ.setdefault("MOESNAP_JUDGE_PROCESSES", str(job.judge_processes))
    with quiet(job.quiet or rank != 0 or job.opened):
        o, s = _open(job, str(device))
    with quiet(job.quiet or rank != 0), process_group(job.backend):
        return _serve(job, o, s, rank, world, device)


def _serve(job: _ServeJob, o: Opened, s: Serving, rank: int, world: int,
           device: torch.device) -> tuple[Report, list[tuple[str, Case]]] | None:
    """This rank's serving run on its candidate (the process group up); rank 0 judges it."""
    import torch
    import torch.distributed as dist

    from ..model.expert_parallel import ExpertParallelCandidate

    cand = ExpertParallelCandidate(o.model, device=device, dtype=o.policy.torch_dtype, mode=job.mode)
    t0 = time.perf_counter()
    cand.upload()
    upload_s = time.perf_counter() - t0
    if s.decode:
        cand.keep_weights()     # every step would dequantize the dense weights and the output matrix again
    faults = cand.faults(o.injections)
    pairs = serve_pairs(cand, o.goldens, s, faults, o.guides, record=rank == 0)
    dname = o.policy.dtype or "float32"
    report: Report | None = None
    kept: list[tuple[str, Case]] = []
    named: dict[str, list[Any]] = {}        # sequence -> [its first forward's NaN/Inf expert lines, later forwards]
    if rank == 0:
        n = len(o.goldens)
        status(f"serving {n} case{'s' if n != 1 else ''} on {world} ranks ({job.mode}, {job.backend}, {device.type}) "
               f"in {dname}: prefill + {s.decode} decode step{'s' if s.decode != 1 else ''} ({s.how})")
        ranges = [expert_range(o.model.config.n_expert, r, world) for r in range(world)]

        def watched(pairs: Iterable[Pair]) -> Iterator[Pair]:
            for p in pairs:
                if job.keep:
                    kept.append((p.name, p.candidate))
                lines = nonfinite_experts(p.candidate, ranges)
                seq = p.name.split("/")[0]
                if lines and seq in named:
                    named[seq][1] += 1
                elif lines:
                    named[seq] = [[f"{p.name}: {line}" for line in lines], 0]
                yield p

        producer = (f"moesnap expert-parallel candidate ({world} ranks, {job.mode}, {job.backend}, {device.type} "
                    f"{dname})")
        report = judge_serving(watched(pairs), s, o.policy, goldens=o.goldens, injections=o.injections,
                               unfired=lambda: cand.unfired(faults), candidate=producer,
                               served_by=f"{world} ranks on {device.type} in {dname}, experts via {cand.expert_path}",
                               device=device, router_replay=o.guides is not None, golden_ref=o.ref)
    else:
        for _ in pairs:
            pass
        error = unfired_error(cand.unfired(faults))     # collective, as rank 0's judging asks it
        if error is not None:
            raise error
    stats = {"upload_s": upload_s, "served": cand.served, "experts": [cand.lo, cand.hi],
             "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, stats)
    if report is None:
        return None
    moe_layers = sum(not o.model.config.dense(i) for i in range(o.model.config.n_layer))
    notes = [_serving_figures(job, every, cand.expert_path, moe_layers)]
    for lines, later in named.values():
        notes += lines[:-1] + [lines[-1] + (f" (and in {later} later forward{'s' if later != 1 else ''} of the "
                                            f"sequence)" if later else "")]
    return with_golden_command(report.with_notes(*notes), o), kept


def _serving_figures(job: _ServeJob, every: list[dict[str, Any]], expert_path: str, moe_layers: int) -> str:
    """What the ranks held and cost in a serving run: rank 0's time per forward (it judges between them, so
    it reaches each forward last and its time is the forward's own), peak GPU memory, bytes sent per layer."""
    served = every[0]["served"]
    prefill = [t for step, t, _ in served if not step]
    steps = [t for step, t, _ in served if step]

    def sent(decode: bool) -> float:
        """Bytes per MoE layer a rank sent in a forward (mean over the forwards; the rank that sent most)."""
        per_rank = [[b for step, _, b in s["served"] if step == decode] for s in every]
        return max(sum(b) / max(1, len(b)) for b in per_rank) / max(1, moe_layers)

    peak = [p for p in (s["peak_bytes"] for s in every) if p is not None]
    return (f"expert parallel: {job.n_ranks} ranks ({job.mode}, {job.backend}, experts via {expert_path}), experts "
            f"{', '.join(f'[{lo}, {hi})' for lo, hi in (s['experts'] for s in every))}; served {len(prefill)} prefill "
            f"forward{'s' if len(prefill) != 1 else ''} in {sum(prefill):.3g} s and {len(steps)} decode "
            f"step{'s' if len(steps) != 1 else ''}" + (f", {1e3 * sum(steps) / len(steps):.3g} ms each" if steps else "")
            + " (rank 0, each forward timed)"
            + (f"; peak GPU memory {', '.join(f'{p / 2**30:.3g}' for p in peak)} GiB per rank" if peak else "")
            + f"; sent per MoE layer per rank (max over ranks): prefill forward {sent(False) / 2**20:.3g} MiB"
            + (f", decode step {sent(True) / 2**10:.3g} KiB" if steps else ""))
