"""What a decode check's judge costs the CPUs beside the candidate's forward: CPU seconds of the check's
process and of its judge worker processes, this tree against another (``--baseline SRC``), in one run.

A decode check hands each step's one-row case to judge worker processes (``MOESNAP_JUDGE_PROCESSES``; on
by itself on hosts of 6 CPUs or more) while the main process runs the next step, whose host time is the
decode step's cost on a GPU.  Whatever the workers burn besides their judging takes CPUs from it: OpenBLAS,
numpy's BLAS, starts a thread per CPU for each dot product of 10^4 elements or more (a step's logits, its
experts' outputs) and keeps them spinning after it.  Since e2743e8 the judge holds numpy's BLAS at one
thread (``moesnap.judge.pool.blas_one_thread``, every worker from its start).

One model (default: the qwen3-30b-a3b shape at full width, 1 layer, so that the rows are as wide as the real
model's), one golden of a 32-token prompt with ``--decode 8`` generated once, untimed; then ``moesnap check
--decode 8 --device cpu`` in a fresh process per run, the trees alternating, ``--repeat`` runs each. Figures
(medians): wall seconds, CPU seconds of the check's own process and of its workers (the workers' figure is
the children's rusage of a wrapper process); the reports' verdicts and judged cells must agree.

    python benchmarks/bench_judge_threads.py --baseline /tmp/old/src [--processes 2] [--repeat 3]
        [--preset qwen3-30b-a3b] [--layers 1] [--work DIR]

(``git archive e2743e8~1 src | tar -x -C /tmp/old`` makes the tree before the change.)  Without
``--baseline`` the rows are this tree's alone.
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
from pathlib import Path

import numpy as np

#: run in a fresh interpreter: the check, then the CPU of this process and of its (reaped) workers as JSON
_RUN = """
import json, resource, sys, time
from moesnap.cli.main import main
t = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - t
from moesnap.judge import pool
for ex in pool._PROCESSES:
    ex.shutdown(wait=True)
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({"code": code, "wall": wall, "cpu": me.ru_utime + me.ru_stime,
                             "workers": kids.ru_utime + kids.ru_stime}))
"""


def _run(src: Path, args: list[str], processes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), MOESNAP_JUDGE_PROCESSES=str(processes), MOESNAP_NO_PROGRESS="1")
    out = subprocess.run([sys.executable, "-c", _RUN, *args], env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"the check failed under {src}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    fig = json.loads(line[6:])
    fig["judged"] = next((x for x in out.stdout.splitlines() if x.startswith("judged")), "")
    fig["verdict"] = next((x.split(":", 1)[1].strip() for x in out.stdout.splitlines()
                           if x.startswith("verdict:")), "")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="another tree's src directory, run alternately")
    ap.add_argument("--processes", type=int, default=2, help="judge worker processes (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--work", default=None, help="keep the model and golden here (default: a temporary directory)")
    a = ap.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    trees = {"this tree": here}
    if a.baseline:
        trees["baseline"] = Path(a.baseline).resolve()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="moesnap-bench-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from moesnap.model.synth import make_model, preset

        cfg = preset(a.preset, layers=a.layers)
        model = work / f"{a.preset}-{a.layers}.gguf"
        if not model.exists():
            make_model(model, cfg)
        store = work / "store"
        toks = ",".join(map(str, np.random.default_rng(0).integers(0, cfg.config.vocab_size, 32)))
        if not store.exists():
            subprocess.run([sys.executable, "-m", "moesnap", "-q", "goldens", "generate", str(model), "--suite", "t",
                            "--store", str(store), "--tokens", toks, "--decode", "8"], check=True,
                           env=dict(os.environ, PYTHONPATH=str(here)))
        args = ["check", str(model), "--suite", "t", "--store", str(store), "--device", "cpu", "--decode", "8",
                "--force"]
        print(f"{a.preset}, {a.layers} layer(s), 32-token prompt + 8 decode steps, float32, {a.processes} judge "
              f"worker processes, {os.cpu_count()} CPUs; medians of {a.repeat} runs each, alternating", flush=True)
        figs: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(a.repeat):
            for name, src in trees.items():
                figs[name].append(_run(src, args, a.processes))
        med = {name: {k: statistics.median(f[k] for f in fs) for k in ("wall", "cpu", "workers")}
               for name, fs in figs.items()}
        print(f"{'tree':12s} {'wall s':>8s} {'check CPU s':>12s} {'workers CPU s':>14s}  verdict, cells")
        for name, m in med.items():
            f0 = figs[name][0]
            print(f"{name:12s} {m['wall']:8.2f} {m['cpu']:12.2f} {m['workers']:14.2f}  {f0['verdict']}, {f0['judged']}")
        if "baseline" in med:
            b, n = med["baseline"], med["this tree"]
            print(f"this tree / baseline: wall {n['wall'] / b['wall']:.2f}x, check CPU {n['cpu'] / b['cpu']:.2f}x, "
                  f"workers' CPU {n['workers'] / max(b['workers'], 1e-9):.2f}x")
            same = {(f["verdict"], f["judged"]) for fs in figs.values() for f in fs}
            print("reports agree (verdict, judged cells): " + ("yes" if len(same) == 1 else f"NO: {sorted(same)}"))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
