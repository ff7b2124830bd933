"""The rows of the performance table (issue 14) that need a whole model: one run, every figure a ratio.

A model is made with a preset (default: the qwen3-30b-a3b shape, full width), goldens of one 128-token
prompt are generated on the CPU, and then, each as a real ``moesnap`` command in its own process (so
fixed costs such as importing torch count, as a user pays them):

* the **I/O floor**: reading every byte of the model file and the golden version once;
* ``check`` in float32 (router replay), in bfloat16 with router replay alone (``--no-replay``), and in
  bfloat16 with stage-local replay as well (the default there), each as a ratio to the I/O floor;
* ``trace --candidate`` (a dump) and ``compare DUMP --model`` (local re-reference of every layer, judged
  layer by layer as it is made), the compare as a ratio to golden generation: on a CUDA machine once with
  the re-reference on the GPU (``--device cuda``, the default there) and once on the host (``--device cpu``);
* golden generation itself: wall time and peak resident memory (``ru_maxrss`` of its process), and per
  layer (importing torch, the embedding and the lm head included, so an upper bound of a layer's cost).

On a CUDA machine the candidate runs on the GPU (``--device cuda``, the default there; 48 layers by
default); elsewhere on the CPU with 2 layers, where the forward, not I/O, dominates and the ratios say
so.  Goals (issue 14, on the H200 host): check float32 <= 1.2x floor, bfloat16 router replay <= 1.3x,
with stage-local replay <= 1.5x, compare with local re-reference <= 1x generation (issue 22), generation of 48
layers <= 30 s and <= 6 GiB on 16 cores (issue 22; ``bench_generate.py`` splits it into phases).

``--judge cpu,device`` runs every check and compare row once per judge (``MOESNAP_JUDGE``: numpy on the
host's cores, or torch on the candidate's device, :mod:`moesnap.judge.device`), in the same run, and says
whether their verdicts agree stage by stage; ``--pipeline 1,0`` runs every check row with and without the
pipeline (``MOESNAP_PIPELINE``: each layer judged while the forward makes the next, or the forwards made whole
first) and says whether the JSON reports are the same file; ``--no-compare`` leaves out the trace and compare rows.

    python benchmarks/bench_check.py [--preset qwen3-30b-a3b] [--layers N] [--device cpu|cuda] [--work DIR]
                                     [--judge cpu,device] [--pipeline 1,0] [--no-compare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_128 = ("def route(tokens, experts):\n    # pick the top-k experts for every token, renormalise, and run them\n"
              "    return [e(t) for t in tokens for e in experts]\n")[:128]


def run(argv: list[str], judge: str | None = None, pipeline: str | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak resident GiB, exit code) of ``python -m moesnap ARGV`` in a child process
    (``judge``: its ``MOESNAP_JUDGE``; ``pipeline``: its ``MOESNAP_PIPELINE``)."""
    env = {**os.environ, "MOESNAP_NO_PROGRESS": "1"}
    if judge is not None:
        env["MOESNAP_JUDGE"] = judge
    if pipeline is not None:
        env["MOESNAP_PIPELINE"] = pipeline
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moesnap", "-q", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if rc not in (0, 1):
        raise SystemExit(f"moesnap {' '.join(argv)} exited {rc}:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, rc


def stage_verdicts(report: Path) -> list[tuple]:
    """(mode, case, layer, stage, verdict) of every stage result of a JSON report, in its order."""
    d = json.loads(report.read_text())
    replay = d.get("replay") if isinstance(d.get("replay"), dict) else {}
    out = []
    for mode, results in (("free", d.get("results") or []), ("replay", replay.get("results") or [])):
        out += [(mode, r.get("case"), r.get("layer"), r.get("stage"), r.get("verdict")) for r in results]
    return out


def read_floor(paths: list[Path]) -> float:
    """Seconds to read every byte of ``paths`` once."""
    t0 = time.perf_counter()
    for p in paths:
        for q in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(q, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="default: 48 on CUDA, 2 on the CPU")
    ap.add_argument("--device", default=None, help="cuda when available, else cpu")
    ap.add_argument("--work", default=None, help="where the model and goldens go (default: a temporary directory)")
    ap.add_argument("--judge", default=None, help="comma-separated MOESNAP_JUDGE values to time: cpu, device, auto "
                                                  "(default: as the environment says)")
    ap.add_argument("--pipeline", default=None, help="comma-separated MOESNAP_PIPELINE values to time the checks "
                                                     "with: 1 (each layer judged as it is made), 0 (forwards whole "
                                                     "first); default: as the environment says")
    ap.add_argument("--no-compare", action="store_true", help="leave out the trace and compare rows")
    a = ap.parse_args(argv)
    pipes: list[str | None] = [p.strip() for p in a.pipeline.split(",") if p.strip()] if a.pipeline else [None]
    if any(p not in ("0", "1") for p in pipes if p is not None):
        raise SystemExit(f"--pipeline {a.pipeline!r}: expected 1 and/or 0")
    judges: list[str | None] = [j.strip() for j in a.judge.split(",") if j.strip()] if a.judge else [None]
    if any(j is not None and j not in ("cpu", "device", "auto") for j in judges):
        raise SystemExit(f"--judge {a.judge!r}: expected cpu, device and/or auto")
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    layers = a.layers or (48 if device.startswith("cuda") else 2)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_check-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{a.preset}-{layers}l.gguf"
    store = work / "goldens"
    dump = work / "dump.zarr"
    try:
        if not model.exists():
            run(["model", "make", str(model), "--preset", a.preset, "--layers", str(layers)])
        shutil.rmtree(store, ignore_errors=True)
        gen, gen_rss, _ = run(["goldens", "generate", str(model), "--suite", "bench", "--store", str(store),
                               "--prompt", PROMPT_128])
        read_floor([model, store])           # the page cache as a check finds it after generation
        floor = read_floor([model, store])
        rows = []
        verdicts: dict[str, list[list[tuple]]] = {}
        reports: dict[str, list[str]] = {}       # each check's JSON report, in run order
        for judge in judges:
            for label, extra in (("check float32 (router replay)", ["--dtype", "float32"]),
                                 ("check bfloat16, router replay", ["--dtype", "bfloat16", "--no-replay"]),
                                 ("check bfloat16, + stage-local replay", ["--dtype", "bfloat16"])):
                for pipe in pipes:
                    tag = (f" [judge {judge}]" if judge else "") + (f" [pipeline {pipe}]" if pipe else "")
                    report = work / "report.json"
                    wall, rss, rc = run(["check", str(model), "--suite", "bench", "--store", str(store), "--device",
                                         device, *extra, "--force", "--json", str(report)], judge, pipe)
                    rows.append((label, tag, wall, rss, rc))
                    verdicts.setdefault(label, []).append(stage_verdicts(report))
                    reports.setdefault(label, []).append(report.read_text())
        cmp_rows = []
        if not a.no_compare:
            tr, _, _ = run(["trace", str(model), "--prompt", PROMPT_128, "--candidate", "--device", device,
                            "--out", str(dump), "--force"])
            for judge in judges:
                for where in ([device, "cpu"] if device.startswith("cuda") else ["cpu"]):
                    report = work / "compare.json"
                    cmp_wall, cmp_rss, cmp_rc = run(["compare", "bench", str(dump), "--store", str(store), "--model",
                                                     str(model), "--device", where, "--force", "--json", str(report)],
                                                    judge)
                    cmp_rows.append((f" on {where}" + (f" [judge {judge}]" if judge else ""), cmp_wall, cmp_rss, cmp_rc))
                    verdicts.setdefault("compare", []).append(stage_verdicts(report))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    cpus = os.cpu_count()
    print(f"bench_check: {a.preset} x {layers} layers, 128 tokens, candidate on {device}, {cpus} CPUs, "
          f"torch {torch.__version__}")
    print(f"  I/O floor (read model + goldens once)        {floor:8.2f} s")
    goals = {"check float32 (router replay)": 1.2, "check bfloat16, router replay": 1.3,
             "check bfloat16, + stage-local replay": 1.5}
    for label, tag, wall, rss, rc in rows:
        verdict = "pass" if rc == 0 else "FAIL"
        print(f"  {label + tag:<60} {wall:8.2f} s  {wall / floor:6.2f}x floor (goal <= {goals[label]}x)  "
              f"peak {rss:5.2f} GiB  {verdict}")
    print(f"  golden generation (CPU)                      {gen:8.2f} s  {gen / layers:6.2f} s/layer (fixed costs "
          f"included)  peak {gen_rss:5.2f} GiB  (goal: 48 layers <= 30 s, <= 6 GiB on 16 cores, issue 22)")
    if not a.no_compare:
        print(f"  trace --candidate (the dump)                 {tr:8.2f} s")
        for tag, cmp_wall, cmp_rss, cmp_rc in cmp_rows:
            print(f"  {'compare DUMP --model (local re-reference)' + tag:<60} {cmp_wall:8.2f} s  "
                  f"{cmp_wall / gen:6.2f}x generation (goal <= 1x, issue 22)  peak {cmp_rss:5.2f} GiB  "
                  f"{'pass' if cmp_rc == 0 else 'FAIL'}")
    for label, runs in verdicts.items():
        if len(runs) > 1:
            same = all(r == runs[0] for r in runs[1:])
            print(f"  verdicts of {label}: {'identical' if same else 'DIFFER'} across "
                  f"{'judges and re-reference devices' if label == 'compare' else 'judges and pipelines'} "
                  f"({len(runs[0])} stage results)")
    if len(pipes) > 1:              # one judge's reports with and without the pipeline: the same file
        for label, texts in reports.items():
            groups = [texts[i:i + len(pipes)] for i in range(0, len(texts), len(pipes))]
            same = all(t == g[0] for g in groups for t in g[1:])
            print(f"  JSON reports of {label}: {'identical' if same else 'DIFFER'} with and without the pipeline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
