"""cProfile of one decode check (the 30B-A3B shape, a few layers): where its seconds go.

    python tools/profile_decode.py --layers 8 --dtype bfloat16 --steps 32 --out DIR [--processes N]

Writes DIR/decode_<dtype>.prof and prints the top functions by cumulative and own time, and the wall
times of the prefill-only check and the decode check of the same golden (one run each).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--processes", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/profile-decode"))
    a = ap.parse_args()
    if a.processes is not None:
        os.environ["MOESNAP_JUDGE_PROCESSES"] = str(a.processes)
    import moesnap
    from moesnap.judge.pool import case_processes, processes_by_default
    from moesnap.model.synth import make_model, preset

    processes_by_default()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / f"q30-{a.layers}.gguf"
    if not model.exists():
        make_model(model, preset("qwen3-30b-a3b", layers=a.layers))
    ids = [int(t) for t in np.random.default_rng(0).integers(1, 151000, size=a.prompt)]
    store = str(a.work / "goldens")
    ref = moesnap.generate(str(model), "prof", [ids], store=store, decode=a.steps, show_progress=False)
    kw = dict(store=store, device=a.device, dtype=a.dtype, show_progress=False)
    moesnap.check(str(model), ref, **kw, decode=2)          # warm-up: CUDA context, kernels, worker processes
    t = time.perf_counter()
    rep0 = moesnap.check(str(model), ref, **kw)
    t_pre = time.perf_counter() - t
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    rep = moesnap.check(str(model), ref, **kw, decode=a.steps)
    prof.disable()
    t_dec = time.perf_counter() - t
    path = a.out / f"decode_{a.dtype}.prof"
    prof.dump_stats(path)
    print(f"{a.layers} layers, P={a.prompt}, N={a.steps}, {a.dtype}, {case_processes()} judge processes: prefill "
          f"check {t_pre:.2f} s ({rep0.verdict}), decode check {t_dec:.2f} s under cProfile ({rep.verdict}), "
          f"ratio {t_dec / t_pre:.2f}x")
    st = pstats.Stats(str(path))
    st.sort_stats("cumulative").print_stats(45)
    st.sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
