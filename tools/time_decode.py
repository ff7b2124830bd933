"""Where a decode check's wall time goes, by phase (the GPU synchronised at each phase's edges), and a
torch.profiler table of a few decode steps.

    python tools/time_decode.py --layers 8 --dtype bfloat16 --steps 32 [--profile-steps 3]

Phases: the candidate's serving forwards (``Session.prefill``/``Session.decode``), the stage-local replay
of each forward (``replay_batch``), handing cases to the judge processes (``submit_case``), waiting for
their verdicts, the next-token figures, and the rest of the check.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


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
    from moesnap.judge import pool, suite
    from moesnap.model import serve
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
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    spent: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    prof_tables: list[str] = []

    def timed(name, fn, profile_from=None):
        def wrapper(*args, **kwargs):
            sync()
            count[name] += 1
            prof = None
            if profile_from is not None and profile_from <= count[name] < profile_from + a.profile_steps:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if a.device.startswith("cuda"):
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - t
                if prof is not None:
                    prof.__exit__(None, None, None)
                    key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
                    prof_tables.append(f"--- {name} call {count[name]}: by {key}\n"
                                       + prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
                                       + "--- same call by self_cpu_time_total\n"
                                       + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                                                   max_name_column_width=60))
        return wrapper

    serve.Session.prefill = timed("prefill", serve.Session.prefill)
    serve.Session.decode = timed("decode step", serve.Session.decode, profile_from=10)
    serve.replay_batch = timed("stage-local replay", serve.replay_batch, profile_from=11)
    suite.submit_case = timed("submit to judge processes", suite.submit_case)
    suite._result = timed("wait for verdicts", suite._result)
    suite.next_tokens = timed("next-token figures", suite.next_tokens)
    suite._now = timed("judge in this process", suite._now)
    t = time.perf_counter()
    rep = moesnap.check(str(model), ref, **kw, decode=a.steps)
    total = time.perf_counter() - t
    t = time.perf_counter()
    rep0 = moesnap.check(str(model), ref, **kw)
    pre = time.perf_counter() - t
    print(f"{a.layers} layers, P={a.prompt}, N={a.steps}, {a.dtype} on {a.device}, {pool.case_processes()} judge "
          f"processes: decode check {total:.2f} s ({rep.verdict}); prefill-only check {pre:.2f} s ({rep0.verdict})")
    print("phases of the decode check (prefill-only check's calls included in counts below the line):")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {s:8.2f} s  {count[name]:5d} calls  {1000 * s / max(1, count[name]):8.2f} ms/call")
    for tab in prof_tables:
        print(tab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
