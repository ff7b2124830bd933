"""Time the candidate forward against the reference forward on the same tokens.

Models: the bundled tiny model, and a full-width 2-layer ``qwen3-30b-a3b``
file made with :mod:`moesnap.model.synth` (hidden 2048, 128 experts, top-8, vocab
151936; ~1.2 GB, made once into ``--model-dir`` and reused).  Every forward
records every stage into an :class:`~moesnap.model.recorder.ArrayRecorder`, as
``trace`` and ``check`` do; the ``bare`` column is the same forward with no
recorder.  Times are medians of ``--repeat`` runs after one warm-up run
(the full-width CPU rows, tens of seconds each on 2 cores, run
``--repeat-full`` times with no warm-up and no bare run).

Rows, all measured in the same run:

* CPU: the reference (float32) and the candidate in float32 with each expert
  path; ``vs ref`` = reference time / candidate time (higher is better).
* CUDA (when available): the candidate in bfloat16 and float32 with the
  ``grouped_mm`` and ``loop`` expert paths (bytes uploaded once beforehand,
  upload time shown apart); ``vs ref`` as above against the CPU reference of
  this run, ``vs loop`` = loop time / grouped time.

``max|dlogit|`` is each timed run's largest logit difference to the reference
and ``flips`` the number of (layer, token) expert sets that differ, so a fast
but wrong run shows.

Seen on the H200 host (torch 2.11, 16 CPU threads, T=128, commit ca772e8),
full-width 2-layer model: reference 23.2 s; candidate on the CPU 1.48 s
(15.6x); on CUDA, recorded, bfloat16 grouped_mm 0.102 s (227x the CPU
reference, 1.59x the loop's 0.162 s; bare 0.051 s), float32 grouped_mm
0.134 s (1.06x the loop); upload of the 1.2 GB file 0.15-0.18 s; peak GPU
memory 2.6 GiB (bf16) / 3.7 GiB (fp32).  Max |dlogit| to the reference:
float32 3.9e-6 (CPU) and 1.3e-5 (CUDA), no routing flips; bfloat16 0.19
with 15 of 256 (layer, token) expert sets flipped, every one at a near tie.

    python benchmarks/bench_candidate.py [--tokens 128] [--repeat 3] [--repeat-full 1]
                                         [--model-dir DIR] [--no-full] [--no-cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moesnap.model.candidate import CandidateModel, grouped_mm_works
from moesnap.model.recorder import ArrayRecorder, NullRecorder
from moesnap.model.reference import run_reference
from moesnap.model.synth import make_model, preset, tiny_path
from moesnap.model.weights import GGUFModel


def full_model(model_dir: Path) -> Path:
    path = model_dir / "qwen3-30b-a3b-2layers.gguf"
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_model(path, preset("qwen3-30b-a3b", layers=2))
        print(f"made {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def timed(fn: Callable[[], object], repeat: int, *, warmup: bool, sync: bool) -> tuple[float, object]:
    """Median wall time of ``fn`` over ``repeat`` runs, and the last result."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def flips(ref: ArrayRecorder, cand: ArrayRecorder) -> int:
    a, b = ref.stacked()["topk_ids"], cand.stacked()["topk_ids"]
    return int((np.sort(a, -1) != np.sort(b, -1)).any(-1).sum())


def bench_model(name: str, path: Path, tokens: list[int], repeat: int, *, full: bool, cuda: bool) -> list[dict]:
    model = GGUFModel.open(path)
    rows: list[dict] = []

    def record(ref_rec: ArrayRecorder | None, rec: ArrayRecorder) -> dict:
        if ref_rec is None:
            return {}
        d = np.abs(ref_rec.model["logits"].astype(np.float64) - rec.model["logits"]).max()
        return {"max_dlogit": float(d), "flips": flips(ref_rec, rec)}

    def run_ref() -> ArrayRecorder:
        rec = ArrayRecorder()
        run_reference(model, tokens, recorder=rec)
        return rec

    t_ref, ref = timed(run_ref, repeat, warmup=not full, sync=False)
    rows.append({"model": name, "device": "cpu", "dtype": "float32", "forward": "reference",
                 "seconds": t_ref, "vs_ref": 1.0, **record(ref, ref)})
    print(f"  {name}: reference {t_ref:.3f} s", flush=True)

    def candidate_rows(device: str, dtype: torch.dtype, paths: list[str]) -> None:
        sync = device == "cuda"
        per_path: dict[str, float] = {}
        for path_name in paths:
            cm = CandidateModel(model, device=device, dtype=dtype, expert_path=path_name)
            t0 = time.perf_counter()
            cm.upload()
            if sync:
                torch.cuda.synchronize()
            t_up = time.perf_counter() - t0

            def run_cand() -> ArrayRecorder:
                rec = ArrayRecorder()
                cm.forward(tokens, rec)
                return rec

            slow = full and not sync  # full width on the CPU: tens of seconds a run
            t, rec = timed(run_cand, repeat, warmup=not slow, sync=sync)
            per_path[path_name] = t
            row = {"model": name, "device": device, "dtype": str(dtype).removeprefix("torch."),
                   "forward": f"candidate/{path_name}", "seconds": t,
                   "upload_seconds": t_up, "vs_ref": t_ref / t, **record(ref, rec)}
            if not slow:
                row["bare_seconds"], _ = timed(lambda: cm.forward(tokens, NullRecorder()), repeat,
                                               warmup=False, sync=sync)
            if device == "cuda":
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            rows.append(row)
            print(f"  {name}: {device} {row['dtype']} {path_name}: {t:.4f} s", flush=True)
        if "grouped_mm" in per_path and "loop" in per_path:
            for r in rows[-len(paths):]:
                r["vs_loop"] = per_path["loop"] / r["seconds"]

    candidate_rows("cpu", torch.float32, ["loop", "grouped_mm"] if hasattr(torch, "_grouped_mm") else ["loop"])
    if cuda:
        for dtype in (torch.bfloat16, torch.float32):
            cfg = model.config
            ok = all(grouped_mm_works("cuda", dtype, k, m)
                     for k, m in ((cfg.hidden, cfg.expert_ff), (cfg.expert_ff, cfg.hidden)))
            candidate_rows("cuda", dtype, ["grouped_mm", "loop"] if ok else ["loop"])
            if not ok:
                print(f"  torch._grouped_mm does not work on this GPU in {dtype}: loop only", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<22} {'device':<6} {'dtype':<9} {'forward':<22} {'seconds':>9} {'bare':>9} " \
           f"{'upload':>8} {'vs ref':>8} {'vs loop':>8} {'max|dlogit|':>12} {'flips':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['model']:<22} {r['device']:<6} {r['dtype']:<9} {r['forward']:<22} {f('seconds', '9.4f')} "
              f"{f('bare_seconds', '9.4f'):>9} {f('upload_seconds', '8.3f'):>8} {f('vs_ref', '8.2f'):>8} "
              f"{f('vs_loop', '8.2f'):>8} {f('max_dlogit', '12.3g'):>12} {f('flips', '6d'):>6}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="prompt length T (default 128)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--repeat-full", type=int, default=1, help="timed runs of the full-width CPU rows")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "moesnap-bench")
    ap.add_argument("--no-full", action="store_true", help="skip the full-width 2-layer model")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.no_cuda
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if cuda else None, "tokens": args.tokens}
    print(f"bench_candidate: {env}", flush=True)
    rows: list[dict] = []
    models = [("tiny", tiny_path(), args.repeat, False)]
    if not args.no_full:
        models.append(("qwen3-30b-a3b-2layers", full_model(args.model_dir), args.repeat_full, True))
    for name, path, repeat, full in models:
        vocab = GGUFModel.open(path).config.vocab_size
        tokens = np.random.default_rng(0).integers(0, vocab, args.tokens).tolist()
        rows += bench_model(name, path, tokens, repeat, full=full, cuda=cuda)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
