"""Where a decode check's wall time goes, by phase (the GPU synchronised at each phase's edges), and a
torch.profiler table of a few decode steps.

    python tools/time_decode.py --layers 8 --dtype bfloat16 --steps 32 [--profile-steps 3]

Phases: the candidate's serving forwards (``Session.prefill``/``Session.decode``), the stage-local replay
of each forward (``replay_batch``), handing cases to the judge processes (``submit_case``), waiting for
their verdicts, the next-token figures, and the rest of the check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_decode_check import PhaseClock  # noqa: E402  (the phases, shared with the benchmark)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/time-decode"))
    a = ap.parse_args()
    import moesnap
    from moesnap.judge import pool
    from moesnap.model.synth import make_model, preset

    pool.processes_by_default()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / f"q30-{a.layers}.gguf"
    if not model.exists():
        make_model(model, preset("qwen3-30b-a3b", layers=a.layers))
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 151000, size=a.prompt)]
    store = str(a.work / "goldens")
    ref = moesnap.generate(str(model), "time", [ids], store=store, decode=a.steps, show_progress=False)
    kw = dict(store=store, device=a.device, dtype=a.dtype, show_progress=False)
    moesnap.check(str(model), ref, **kw, decode=2)          # warm-up
    prof_tables: list[str] = []
    on_cuda = a.device.startswith("cuda")
    first_profiled = {"decode step": 10, "stage-local replay": 11}

    class _Profiled:
        def __init__(self, name: str, n: int) -> None:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
            self.name, self.n, self.prof = name, n, torch.profiler.profile(activities=acts)

        def __enter__(self) -> None:
            self.prof.__enter__()

        def __exit__(self, *exc) -> None:
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
            prof_tables.append(f"--- {self.name} call {self.n}: by {key}\n"
                               + self.prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
                               + "--- same call by self_cpu_time_total\n"
                               + self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                                max_name_column_width=60))

    def on_call(name: str, n: int):
        lo = first_profiled.get(name)
        return _Profiled(name, n) if lo is not None and lo <= n < lo + a.profile_steps else None

    clock = PhaseClock(a.device, on_call).__enter__()
    t = time.perf_counter()
    rep = moesnap.check(str(model), ref, **kw, decode=a.steps)
    total = time.perf_counter() - t
    t = time.perf_counter()
    rep0 = moesnap.check(str(model), ref, **kw)
    pre = time.perf_counter() - t
    print(f"{a.layers} layers, P={a.prompt}, N={a.steps}, {a.dtype} on {a.device}, {pool.case_processes()} judge "
          f"processes: decode check {total:.2f} s ({rep.verdict}); prefill-only check {pre:.2f} s ({rep0.verdict})")
    print("phases of the decode check (prefill-only check's calls included in counts below the line):")
    clock.__exit__(None, None, None)
    print(clock.table())
    for tab in prof_tables:
        print(tab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
