"""Golden generation, phase by phase (issue 22, point 3): where ``goldens generate`` spends its time.

One model (default: the qwen3-30b-a3b shape, full width, 2 layers) and one 128-token prompt (the
prompt of ``bench_check.py``).  Each run is a fresh process, as a user's command is: it imports
moesnap from a source tree, generates the goldens with the model's sha256 not yet known (an empty
cache, as on the first use of a model), and reports the main thread's time in each phase:

* ``sha256``: waiting for the model's digest (the provenance; 17 GB at 1.2-2 GB/s);
* ``dense weights``: a layer's attention and router weights dequantized (``ModelWeights.layer``);
* ``attention`` and ``experts``: the layer's maths (experts: dequantized on the pool threads, each run on
  the thread that dequantized it, the main thread waiting);
* ``lm head``; ``stack``: the recorder's per-layer values stacked into the case; ``store``: writing the
  case (``add_case``, or finishing a case whose layers were written while the forward ran);
* ``other``: the rest of the wall time (importing torch, opening the model, the tokenizer, norms).

With ``--baseline SRC`` (another tree's ``src`` directory, e.g. ``git archive 6391b61 src | tar -x -C
/tmp/old``) the runs alternate between the two trees and every figure is a median over ``--repeat``
runs of each, with the ratio new / baseline.  ``--passive`` adds this tree run with
``OMP_WAIT_POLICY=PASSIVE``: every expert-pool thread that calls a torch matmul gets an OpenMP team of
its own (16 x 16 threads on 16 cores), whose idle members spin by default; passive waiting changes no
value (the same teams split the same work), only whether idle threads burn the cores the dequantizing
threads need.  The goldens of every run are compared array by array (their checksums): they must be
identical.

    python benchmarks/bench_generate.py [--preset qwen3-30b-a3b] [--layers 2] [--repeat 2]
                                        [--baseline /tmp/old/src] [--passive] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("sha256", "dense weights", "attention", "experts", "lm head", "stack", "store", "other")


def inner(model: str, store: str, prompt: str) -> None:
    """One generation in this process, instrumented; prints one JSON line."""
    import functools
    import threading

    t_start = time.perf_counter()
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    main = threading.main_thread()

    def clock(owner, name: str, phase: str) -> None:
        f = getattr(owner, name, None)
        if f is None:
            return

        @functools.wraps(f)
        def timed(*a, **k):
            if threading.current_thread() is not main:
                return f(*a, **k)
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[phase] += time.perf_counter() - t0

        setattr(owner, name, timed)

    import moesnap
    from moesnap.model import reference, weights
    from moesnap.run import trace
    from moesnap.store import base

    clock(trace, "file_sha256", "sha256")
    clock(weights.GGUFModel, "fingerprint", "sha256")
    clock(weights.ModelWeights, "layer", "dense weights")
    clock(reference, "causal_attention", "attention")
    clock(reference, "expert_outputs", "experts")
    clock(reference.Transformer, "lm_head", "lm head")
    clock(trace, "from_recorder", "stack")
    clock(base.VersionWriter, "add_case", "store")
    try:
        from moesnap.store import stream

        clock(stream.RawCaseStream, "finish", "store")
    except ImportError:
        pass
    t0 = time.perf_counter()
    ref = moesnap.generate(model, "bench", [prompt], store=store)
    wall = time.perf_counter() - t_start
    spent["other"] = wall - sum(spent.values())
    import resource

    meta = json.loads((Path(store) / "bench" / ref.split("@")[1] / "zarr.json").read_text())["attributes"]
    layers = meta["layer_timing"]["case0"]
    print(json.dumps({"wall": wall, "generate": time.perf_counter() - t0, "phases": spent,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "cpu_s": time.process_time(), "layers_s": sum(e["seconds"] for e in layers),
                      "checksums": meta["checksums"]}))


def run_tree(src: Path, model: Path, work: Path, prompt: str, extra_env: dict[str, str]) -> dict:
    store = work / "goldens"
    shutil.rmtree(store, ignore_errors=True)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)     # the model's sha256 not known yet, as on its first use
    env = {**os.environ, "PYTHONPATH": str(src), "MOESNAP_CACHE": str(cache), "MOESNAP_NO_PROGRESS": "1", **extra_env}
    out = subprocess.run([sys.executable, __file__, "--inner", str(model), str(store), prompt], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{src}: generation failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="another tree's src directory, run alternately")
    ap.add_argument("--passive", action="store_true", help="also this tree with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--work", default=None)
    ap.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    a, _ = ap.parse_known_args(argv)     # nox -s bench hands every script the same arguments
    if a.inner:
        inner(*a.inner)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_check import PROMPT_128

    here = Path(__file__).resolve().parent.parent / "src"
    trees: dict[str, tuple[Path, dict[str, str]]] = {}
    if a.baseline is not None:
        trees["baseline"] = (Path(a.baseline).resolve(), {})
    trees["new"] = (here, {})
    if a.passive:
        trees["passive"] = (here, {"OMP_WAIT_POLICY": "PASSIVE"})
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_generate-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{a.preset}-{a.layers}l.gguf"
    if not model.exists():
        env = {**os.environ, "PYTHONPATH": str(here)}
        subprocess.run([sys.executable, "-m", "moesnap", "-q", "model", "make", str(model), "--preset", a.preset,
                        "--layers", str(a.layers)], env=env, check=True)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    try:
        for i in range(a.repeat):
            for name in (trees if i % 2 == 0 else reversed(list(trees))):   # alternate which goes first
                src, env = trees[name]
                r = run_tree(src, model, work, PROMPT_128, env)
                runs[name].append(r)
                print(f"  run {i + 1} {name:8s} {r['wall']:7.2f} s  peak {r['peak_gib']:.2f} GiB", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key) -> float:
        return statistics.median(key(r) for r in runs[name])

    print(f"bench_generate: {a.preset} x {a.layers} layers, 128 tokens, {os.cpu_count()} CPUs, "
          f"median of {a.repeat} (main thread's seconds per phase)")
    names = list(trees)
    base = "baseline" if "baseline" in trees else None
    print(f"  {'':22s}" + "".join(f"{n:>12s}" for n in names)
          + "".join(f"{n + '/base':>14s}" for n in names if base and n != base))
    rows = [(p, lambda r, p=p: r["phases"][p]) for p in PHASES]
    rows += [("wall", lambda r: r["wall"]), ("  of it the layers", lambda r: r["layers_s"]),
             ("process CPU", lambda r: r["cpu_s"]), ("peak memory (GiB)", lambda r: r["peak_gib"])]
    for label, key in rows:
        vals = {n: med(n, key) for n in names}
        ratios = "".join(f"{vals[n] / vals[base]:13.2f}x" if vals[base] > 0 else f"{'-':>14s}"
                         for n in names if base and n != base)
        print(f"  {label:22s}" + "".join(f"{vals[n]:12.2f}" for n in names) + ratios)
    sums = {json.dumps(r["checksums"], sort_keys=True) for v in runs.values() for r in v}
    print(f"  goldens: {'identical' if len(sums) == 1 else 'DIFFER'} array by array (checksums) across "
          f"{sum(len(v) for v in runs.values())} runs")
    return 0 if len(sums) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
