"""How cost grows with prompt length (issue 14): golden generation, golden bytes and the check, at
T = 128, 512, 2048 tokens on one model, each as a ratio to T = 128 measured in the same run.

Linear growth gives ratios 4x and 16x; attention's T^2 (the reference's [heads, T, T] scores and the
candidate's attention) shows as more.  The golden's bytes are split into what grows with T (every
stage is [T, ...]) and the logits [T, V], which dominate at a 151936-word vocabulary.

    python benchmarks/bench_scaling.py [--preset qwen3-30b-a3b] [--layers 2] [--tokens 128,512,2048]
                                       [--device cuda] [--work DIR]

Default: the tiny preset on the CPU (seconds; what ``nox -s bench`` runs).  On the H200:
``--preset qwen3-30b-a3b --layers 4 --device cuda``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokens", default="128,512,2048")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--work", default=None)
    a, _ = ap.parse_known_args()

    import moesnap
    from moesnap.model.synth import make_model, preset, tiny_path

    work = Path(a.work or tempfile.mkdtemp(prefix="bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.preset == "tiny" and a.layers is None:
        model = tiny_path()
    else:
        model = work / f"{a.preset}-{a.layers}l.gguf"
        if not model.exists():
            make_model(model, preset(a.preset, layers=a.layers), progress=False)
    from moesnap.model.load import open_model

    cfg = open_model(model).config
    rows = []
    rng = np.random.default_rng(0)
    for T in [int(t) for t in a.tokens.split(",")]:
        if T > cfg.context_length:
            print(f"T={T}: beyond the model's context {cfg.context_length}, skipped")
            continue
        ids = [int(t) for t in rng.integers(3, min(cfg.vocab_size, 250), T)]
        store = work / f"goldens-{T}"
        t0 = time.perf_counter()
        ref = moesnap.generate(model, "scale", [ids], store=store)
        gen = time.perf_counter() - t0
        v = next(p for p in (store / "scale").iterdir() if p.name.startswith("v"))
        total = _bytes(v)
        logits = _bytes(v / "case0" / "logits") if (v / "case0" / "logits").exists() else 0
        t0 = time.perf_counter()
        report = moesnap.check(model, ref, store=str(store), device=a.device, dtype=a.dtype, show_progress=False)
        chk = time.perf_counter() - t0
        rows.append((T, gen, chk, total, logits, report.verdict))
        print(f"T={T:5d}: generate {gen:7.2f} s, check ({a.device} {a.dtype}) {chk:7.2f} s [{report.verdict}], "
              f"golden {total / 2**20:8.1f} MiB (logits {logits / 2**20:.1f} MiB)", flush=True)
    if len(rows) > 1:
        T0, g0, c0, b0, l0, _ = rows[0]
        print(f"ratios to T={T0} ({cfg.n_layer} layers, hidden {cfg.hidden}, {cfg.n_expert} experts, vocab {cfg.vocab_size}):")
        for T, g, c, b, lg, _ in rows[1:]:
            print(f"  T={T}: tokens {T / T0:.0f}x  generate {g / g0:.2f}x  check {c / c0:.2f}x  "
                  f"golden bytes {b / b0:.2f}x (without logits {(b - lg) / max(1, b0 - l0):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
