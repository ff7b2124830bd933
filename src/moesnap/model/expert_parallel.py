"""The expert-parallel candidate: moesnap's candidate forward over ``torch.distributed``, its experts
spread over ranks.

Each of the N ranks holds every non-expert weight and a contiguous 1/N of every layer's experts:
rank ``r`` owns experts ``[r*E/N, (r+1)*E/N)`` (E must divide by N), and on a GPU uploads only
those experts' blocks.  Attention, norms and the router run on every rank for every token
(replicated, as with tensor-parallel size 1); only the experts are parallel.  Everything but the
experts is :class:`~moesnap.model.candidate.CandidateModel`'s own code: this module overrides three
hooks, which expert blocks a rank holds (``_stored``), which it may run (``_experts_weights``) and
how a layer's ``(token, slot)`` pairs reach them (``_experts``).  Two modes:

``"alltoall"`` (the default: dispatch and combine, as EP engines do it)
    each rank takes a contiguous slice of the tokens; it sorts its ``(token, slot)`` pairs by the
    rank that owns their expert, the ranks exchange the split sizes (``all_to_all_single`` of the
    counts), then the hidden rows and expert ids (dispatch); each rank runs the rows it received
    grouped by expert and sends the outputs back the way they came (combine, the split sizes
    swapped).  An all-gather of the token slices gives every rank ``expert_out [T, k, H]`` in the
    original (token, slot) order, which the replicated weighted sum and the next layer need.
    Rows are sent once per pair, not once per (token, rank) as DeepEP deduplicates them.
``"allreduce"`` (simpler to trust)
    every rank runs its own experts' pairs for all tokens into a zero ``[T, k, H]`` buffer and an
    ``all_reduce`` sums them: each pair is non-zero on exactly one rank, so the sum is exact.

Either way the recorded stages are the single-device candidate's, bit for bit where the expert
matmuls are (a planted NaN expert fires on the rank that owns the expert).  Rank 0 records; the
other ranks run with a null recorder.  :attr:`ExpertParallelCandidate.traffic` counts the bytes
each layer's collectives send from this rank to the others.

:func:`run_ep` starts the ranks itself (``torch.multiprocessing`` spawn, a free localhost port,
``env://``) or, where ``RANK`` and ``WORLD_SIZE`` are set (``torchrun``), runs this process's rank;
:func:`launch` does that for any rank function (the serving check's ranks,
:mod:`moesnap.run.expert_parallel`, run :meth:`ExpertParallelCandidate.forward_batch` through a KV cache of
their own, each forward's time and bytes noted in :attr:`ExpertParallelCandidate.served`).
gloo runs ``all_to_all_single`` on the CPU (torch 2.13, two processes), so the CPU test suite covers
both modes; NCCL runs them on GPUs, with NVLink multicast kept off in the ranks' environment.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np
import torch
import torch.distributed as dist

from .. import errors
from ..case import Case, from_recorder
from ..errors import MoesnapError, UsageError
from ..stages import CHECK_DTYPES
from .candidate import CandidateModel, Output, RouterReplay, _Call
from .faults import NO_FAULTS, Faults
from .inject import Injection, check_injections, parse_inject
from .kvcache import Batch, KVCache
from .recorder import ArrayRecorder, NullRecorder, Recorder
from .static_replay import StaticReplay
from .tensors import EXPERT_TENSORS
from .weights import ModelWeights

#: how a layer's (token, slot) pairs reach the ranks that own their experts
MODES = ("alltoall", "allreduce")
BACKENDS = ("gloo", "nccl")
#: NVLink multicast off in every rank (FINDINGS.md: the 2-GPU host hangs or fails with it on)
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def expert_range(n_expert: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the experts rank ``rank`` of ``world`` owns."""
    if world < 1 or n_expert % world:
        raise UsageError(f"n_ranks={world}: the model's {n_expert} experts do not split evenly over {world} ranks")
    per = n_expert // world
    return rank * per, (rank + 1) * per


def token_range(n_tokens: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the tokens rank ``rank`` dispatches (contiguous; the first ``T % N`` ranks take one more)."""
    base, extra = divmod(n_tokens, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


class ExpertParallelCandidate(CandidateModel):
    """:class:`~moesnap.model.candidate.CandidateModel` with this rank's experts only; every forward
    is collective (each rank of ``group`` must run the same calls in the same order).

    ``mode``: one of :data:`MODES`.  Other keywords as for the candidate.
    """

    def __init__(self, model: ModelWeights, *, group: dist.ProcessGroup | None = None, mode: str = "alltoall",
                 **kw: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise UsageError("the expert-parallel candidate needs torch.distributed initialised: run it under "
                             "torchrun, or through moesnap.model.expert_parallel.run_ep")
        if mode not in MODES:
            raise UsageError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
        super().__init__(model, **kw)
        self.group, self.mode = group, mode
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.lo, self.hi = expert_range(self.cfg.n_expert, self.rank, self.world)
        #: layer -> collective -> bytes this rank sent to the others (summed over forwards)
        self.traffic: dict[int, dict[str, int]] = {}
        #: each serving forward (:meth:`forward_batch`): whether a decode step, seconds, bytes this rank sent
        self.served: list[tuple[bool, float, int]] = []

    def forward_batch(self, tokens: Any, batch: Batch, cache: KVCache, rec: Recorder | None = None, *,
                      router_replay: RouterReplay | StaticReplay | None = None, faults: Faults = NO_FAULTS) -> Output:
        """:meth:`CandidateModel.forward_batch <moesnap.model.candidate.CandidateModel.forward_batch>` (collective),
        its time (the device synchronised around it) and bytes sent noted in :attr:`served`."""
        sent = sum(n for per in self.traffic.values() for n in per.values())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = super().forward_batch(tokens, batch, cache, rec, router_replay=router_replay, faults=faults)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = sum(n for per in self.traffic.values() for n in per.values())
        self.served.append((batch.step is not None, time.perf_counter() - t0, now - sent))
        return out

    # -- which experts this rank holds and runs -------------------------------------------------
    def _stored(self, name: str) -> tuple[gguf.GGMLQuantizationType, np.ndarray]:
        qtype, data = super()._stored(name)
        if name.split(".")[-1] in EXPERT_TENSORS:
            return qtype, data[self.lo:self.hi]          # [E/N, ...]: this rank's experts only
        return qtype, data

    def _experts_weights(self, i: int, ids: list[int], faults: Faults, idx: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if ids and (ids[0] < self.lo or ids[-1] >= self.hi):
            bad = next(e for e in ids if not self.lo <= e < self.hi)
            raise RuntimeError(f"rank {self.rank} was given expert {bad} of layer {i}; it holds [{self.lo}, {self.hi})")
        return super()._experts_weights(i, [e - self.lo for e in ids], faults, None if idx is None else idx - self.lo)

    def _sent(self, i: int, what: str, n: int) -> None:
        per = self.traffic.setdefault(i, {})
        per[what] = per.get(what, 0) + int(n)

    # -- how the pairs reach them ---------------------------------------------------------------
    def _experts(self, i: int, x: torch.Tensor, ids: torch.Tensor, c: _Call) -> torch.Tensor:
        if self.mode == "allreduce":
            return self._experts_allreduce(i, x, ids, c.faults)
        return self._experts_alltoall(i, x, ids, c.faults)

    def _experts_allreduce(self, i: int, x: torch.Tensor, ids: torch.Tensor, faults: Faults) -> torch.Tensor:
        T, k = ids.shape
        H = self.cfg.hidden
        flat = ids.reshape(-1)                                                   # [T*k]
        mine = torch.nonzero((flat >= self.lo) & (flat < self.hi)).squeeze(1)    # pairs this rank's experts take
        out = x.new_zeros(T * k, H)                                              # [T*k, H]
        out[mine] = self._expert_pairs(i, x, mine // k, flat.index_select(0, mine), faults)
        dist.all_reduce(out, group=self.group)                                   # one rank non-zero per pair
        self._sent(i, "allreduce", out.numel() * out.element_size())
        return out.view(T, k, H)

    def _experts_alltoall(self, i: int, x: torch.Tensor, ids: torch.Tensor, faults: Faults) -> torch.Tensor:
        T, k = ids.shape
        H, g = self.cfg.hidden, self.group
        t0, t1 = token_range(T, self.rank, self.world)
        flat = ids[t0:t1].reshape(-1)                                            # [n*k] this rank's pairs
        dest = flat // (self.hi - self.lo)                                       # the rank owning each pair's expert
        order = torch.argsort(dest, stable=True)                                 # pairs grouped by destination
        send_n = torch.bincount(dest, minlength=self.world)                      # [N]
        recv_n = torch.empty_like(send_n)
        dist.all_to_all_single(recv_n, send_n, group=g)                          # split sizes first
        send, recv = send_n.tolist(), recv_n.tolist()
        rows = x[t0:t1].index_select(0, order // k)                              # [n*k, H] dispatched rows
        got = x.new_empty(sum(recv), H)                                          # [m, H]
        dist.all_to_all_single(got, rows, recv, send, group=g)                   # dispatch
        eids = flat.new_empty(sum(recv))                                         # [m]
        dist.all_to_all_single(eids, flat.index_select(0, order), recv, send, group=g)
        done = self._expert_pairs(i, got, torch.arange(len(eids), device=eids.device), eids, faults)  # [m, H]
        back = x.new_empty(len(order), H)                                        # [n*k, H]
        dist.all_to_all_single(back, done, send, recv, group=g)                  # combine
        pairs = torch.empty_like(back)
        pairs[order] = back                                                      # (token, slot) order
        row, other = H * x.element_size(), sum(send) - send[self.rank]
        self._sent(i, "dispatch", other * (row + eids.element_size()))
        self._sent(i, "combine", (sum(recv) - recv[self.rank]) * row)
        return self._gather_tokens(i, pairs.view(t1 - t0, k, H), T)              # [T, k, H]

    def _gather_tokens(self, i: int, part: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Every rank's token slice, concatenated in rank order (slices padded to one size for all_gather)."""
        chunk = -(-n_tokens // self.world)
        pad = part.new_zeros(chunk, *part.shape[1:])
        pad[:part.shape[0]] = part
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        self._sent(i, "gather", pad.numel() * pad.element_size() * (self.world - 1))
        spans = [token_range(n_tokens, r, self.world) for r in range(self.world)]
        return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, spans)])

    def unfired(self, faults: Faults) -> list[Injection]:
        """:meth:`Faults.unfired <moesnap.model.inject.Faults.unfired>` over every rank (collective): a NaN
        expert fires on the rank that owns it only."""
        fired: list[Any] = [None] * self.world
        dist.all_gather_object(fired, faults.fired, group=self.group)
        return faults.unfired(set().union(*fired))


# --------------------------------------------------------------------------- launching the ranks


@dataclass(frozen=True)
class _Job:
    """What every rank runs: picklable, so that spawn can hand it to the ranks."""

    model_path: str
    cases: tuple[tuple[int, ...], ...]
    n_ranks: int
    backend: str
    device_type: str
    dtype: torch.dtype
    injections: tuple[Injection | str, ...]
    mode: str
    router_replay: tuple[RouterReplay | None, ...]
    expert_path: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in CHECK_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(CHECK_DTYPES)}")
    return getattr(torch, dtype)


def check_launch(n_ranks: int, backend: str, device_type: str, mode: str, n_expert: int) -> None:
    """Refuse, in one line, ranks that could not start or could not split ``n_expert`` experts."""
    if backend not in BACKENDS:
        raise UsageError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if device_type not in ("cpu", "cuda"):
        raise UsageError(f"device_type={device_type!r}; choose cpu or cuda")
    if backend == "nccl" and device_type != "cuda":
        raise UsageError("backend='nccl' runs on CUDA devices only; use device_type='cuda', or backend='gloo' on the CPU")
    if device_type == "cuda" and torch.cuda.device_count() < n_ranks:
        raise UsageError(f"n_ranks={n_ranks} needs {n_ranks} CUDA devices, this host has {torch.cuda.device_count()}")
    if mode not in MODES:
        raise UsageError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
    if n_ranks < 1:
        raise UsageError(f"n_ranks={n_ranks} must be >= 1")
    expert_range(n_expert, 0, n_ranks)


def _validate(job: _Job, model: ModelWeights) -> list[Injection]:
    """Refuse, in one line, what no rank could run; return the planted faults."""
    check_launch(job.n_ranks, job.backend, job.device_type, job.mode, model.config.n_expert)
    if not job.cases:
        raise UsageError("no token sequence to run")
    for ids in job.cases:
        model.check_tokens(np.asarray(ids, dtype=np.int64))
    if len(job.router_replay) != len(job.cases):
        raise UsageError(f"{len(job.router_replay)} router replays for {len(job.cases)} token sequences")
    injections = [parse_inject(j, model.config) if isinstance(j, str) else j for j in job.injections]
    check_injections(injections, model, [len(ids) for ids in job.cases])
    return injections


def rank_setup(n_ranks: int, backend: str, device_type: str) -> tuple[int, int, torch.device]:
    """This process's rank, the world's size and the rank's device (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    set, as torchrun and :func:`launch` set them); NVLink multicast off for NCCL."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != n_ranks:
        raise UsageError(f"n_ranks={n_ranks}, but WORLD_SIZE={world} ranks were started")
    if backend == "nccl":
        for key, value in NVLS_OFF.items():
            os.environ.setdefault(key, value)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return rank, world, device


@contextmanager
def process_group(backend: str) -> Iterator[None]:
    """The default process group (``env://``) while inside, unless one is initialised already (it is left be)."""
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend, init_method="env://")
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


def _rank_main(job: _Job) -> list[Case] | None:
    """This process's rank (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set): run every case;
    rank 0 returns what it recorded, the others None."""
    from .load import open_model

    rank, world, device = rank_setup(job.n_ranks, job.backend, job.device_type)
    model = open_model(job.model_path)
    injections = _validate(job, model)
    with process_group(job.backend):
        cand = ExpertParallelCandidate(model, device=device, dtype=job.dtype, mode=job.mode,
                                       expert_path=job.expert_path)
        faults = Faults(injections, model)
        t0 = time.perf_counter()
        cand.upload()
        upload_s = time.perf_counter() - t0
        cases: list[Case] = []
        seconds: list[float] = []
        traffic: list[dict[int, dict[str, int]]] = []
        for ids, guide in zip(job.cases, job.router_replay):
            rec: Recorder = ArrayRecorder() if rank == 0 else NullRecorder()
            cand.traffic = {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = cand.forward(list(ids), rec, router_replay=guide, faults=faults)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
            traffic.append(cand.traffic)
            if isinstance(rec, ArrayRecorder):
                followed = [[int(layer), int(t), [int(e) for e in own_ids]] for layer, t, own_ids in out.followed]
                cases.append(from_recorder(rec, {"dtype": str(job.dtype).removeprefix("torch."),
                                                 "router_followed": followed, **job.attrs}))
        unfired = cand.unfired(faults)
        if unfired:
            raise UsageError(f"{unfired[0].option}: the planted fault cannot fire (no token routes to that expert "
                             f"there, or router replay undid the flip), so this self-test would prove nothing")
        stats = {"upload_s": upload_s, "forward_s": seconds, "traffic": traffic,
                 "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                 "experts": [cand.lo, cand.hi], "expert_path": cand.expert_path}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, stats)
        if rank != 0:
            return None
        for c, case in enumerate(cases):
            case.attrs["expert_parallel"] = _summary(job, every, c, model.config.n_layer)
            case.attrs.setdefault("producer", f"moesnap expert-parallel candidate ({world} ranks, {job.mode}, "
                                              f"{job.backend}, {job.device_type} {case.attrs['dtype']})")
        return cases


def _summary(job: _Job, every: list[dict[str, Any]], c: int, n_layer: int) -> dict[str, Any]:
    """Case ``c``'s figures from every rank: time, peak device memory, bytes sent per layer."""
    sent = [[sum(s["traffic"][c].get(i, {}).values()) for i in range(n_layer)] for s in every]
    return {"ranks": job.n_ranks, "mode": job.mode, "backend": job.backend, "device": job.device_type,
            "experts": [s["experts"] for s in every], "expert_path": every[0]["expert_path"],
            "upload_s": [s["upload_s"] for s in every], "forward_s": [s["forward_s"][c] for s in every],
            "peak_bytes": [s["peak_bytes"] for s in every], "bytes_sent_per_layer": sent}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def under_torchrun() -> bool:
    """Whether this process is one rank of a launch (``RANK`` and ``WORLD_SIZE`` set, as torchrun sets them)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _spawned(rank: int, target: Callable[[Any], Any], job: Any, n_ranks: int, device_type: str, port: int,
             results: Any) -> None:
    """One rank started by :func:`launch`: the environment torchrun would give it, then ``target(job)``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n_ranks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":   # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_ranks))
    try:
        out = target(job)
    except MoesnapError as e:
        results.put(("error", type(e).__name__, str(e)))
        raise
    if out is not None:
        results.put(("ok", out))


def launch(target: Callable[[Any], Any], job: Any, n_ranks: int, device_type: str) -> Any:
    """``target(job)`` on each of ``n_ranks`` ranks, returning rank 0's result (the others return None).
    Under torchrun (:func:`under_torchrun`) this process is one rank and runs ``target`` itself; else the
    ranks are spawned here (``torch.multiprocessing``, a free localhost port), their result read while
    they run, and a rank's :class:`~moesnap.errors.MoesnapError` raised here as the same error.
    ``target`` and ``job`` must pickle (a module-level function, a frozen dataclass)."""
    if under_torchrun():
        return target(job)
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Queue()
    ranks = mp.spawn(_spawned, args=(target, job, n_ranks, device_type, free_port(), results), nprocs=n_ranks,
                     join=False)
    got: list[Any] = []
    while True:
        try:
            got.append(results.get(timeout=0.1))   # read while the ranks run: a large result fills the pipe
            continue
        except queue.Empty:
            pass
        try:
            if ranks.join(timeout=0.1):
                break
        except Exception as e:   # a rank failed; spawn has stopped the others
            while True:
                try:
                    got.append(results.get(timeout=1.0))
                except queue.Empty:
                    break
            for kind, *rest in got:
                if kind == "error":
                    raise getattr(errors, rest[0], MoesnapError)(rest[1]) from None
            raise RuntimeError(f"an expert-parallel rank failed: {e}") from e
    while not any(kind == "ok" for kind, *_ in got):
        got.append(results.get(timeout=10.0))
    return next(rest[0] for kind, *rest in got if kind == "ok")


def run_ep_cases(model_path: str | Path, cases: Sequence[Sequence[int]], n_ranks: int = 2, backend: str = "gloo",
                 device_type: str = "cpu", dtype: torch.dtype | str = torch.float32,
                 injections: Sequence[Injection | str] = (), *, mode: str = "alltoall",
                 router_replay: Sequence[RouterReplay | None] | None = None, expert_path: str | None = None,
                 attrs: dict[str, Any] | None = None) -> list[Case] | None:
    """:func:`run_ep` over several token sequences with one set of ranks (the weights upload once);
    ``router_replay``: one per sequence, or None."""
    job = _Job(model_path=str(model_path), cases=tuple(tuple(int(t) for t in ids) for ids in cases),
               n_ranks=int(n_ranks), backend=backend, device_type=device_type, dtype=_dtype(dtype),
               injections=tuple(injections), mode=mode,
               router_replay=tuple(router_replay) if router_replay is not None else (None,) * len(cases),
               expert_path=expert_path, attrs=dict(attrs or {}))
    if not under_torchrun():
        from .load import open_model

        _validate(job, open_model(job.model_path))             # refuse before starting anything
    out: list[Case] | None = launch(_rank_main, job, job.n_ranks, job.device_type)
    return out


def run_ep(model_path: str | Path, tokens: Sequence[int], n_ranks: int = 2, backend: str = "gloo",
           device_type: str = "cpu", dtype: torch.dtype | str = torch.float32,
           injections: Sequence[Injection | str] = (), *, mode: str = "alltoall",
           router_replay: RouterReplay | None = None, expert_path: str | None = None,
           attrs: dict[str, Any] | None = None) -> Case | None:
    """Run the expert-parallel candidate of ``model_path`` on ``tokens`` with ``n_ranks`` ranks and return
    the case rank 0 recorded (every stage, ``expert_out`` in the original ``[T, k, H]`` order).

    Started from a plain process, it spawns the ranks (``torch.multiprocessing``, a free localhost port)
    and returns the case here.  Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this process is one rank:
    rank 0 gets the case, the others None.  ``backend`` ``"gloo"`` (CPU) or ``"nccl"`` (``device_type=
    "cuda"``, rank r on ``cuda:LOCAL_RANK``).  ``injections``: planted faults or ``--inject`` specs (a NaN
    expert fires on the rank that owns it; one that fires nowhere is refused).  ``mode``: :data:`MODES`.
    ``router_replay``: follow the golden's experts at near ties, as ``moesnap check`` does.  The case's
    attribute ``expert_parallel`` holds each rank's experts, time, peak GPU memory and bytes sent per layer.
    """
    out = run_ep_cases(model_path, [tokens], n_ranks, backend, device_type, dtype, injections, mode=mode,
                       router_replay=None if router_replay is None else [router_replay],
                       expert_path=expert_path, attrs=attrs)
    return None if out is None else out[0]
