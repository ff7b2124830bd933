"""The judge's own CPU work where it grows: the next-token figures of a long prompt (rows x vocabulary) and
the judging of decode steps in the check's process (one row through every layer), this tree against another
(``--baseline SRC``), in one run, each figure in a fresh interpreter, the trees alternating.

Rows (medians of ``--repeat`` runs; the figures of both trees must agree, or the benchmark fails):

- **next-token figures**: ``moesnap.judge.distribution.next_tokens`` over ``--tokens`` rows of random logits
  of a ``--vocab``-word vocabulary (default 1024 x 151936: Qwen3's), seconds inside the call.  Its KL,
  top-1s and |Δ logprob| are float64 over every logit of every row; since the eleventh session they are
  worked in blocks on the judge's chunk threads.
- **row rule**: ``moesnap.judge.classify.row_stats`` (bfloat16's and float16's rule: each row's relative L2
  error against the median row norm) over ``--tokens``/2 rows of the same logits, seconds inside the call;
  since the eleventh session in chunks of whole rows on the chunk threads (its sums of squares in another
  order than einsum's before: the worst row's error is compared to 12 significant digits).
- **expert-scale sums**: ``moesnap.judge.routing.expert_scale_errors`` (the rule that names an expert whose
  output is scaled) over ``--tokens`` tokens x top-8 x 2048 (30B-A3B's width), seconds inside the call; since
  the eleventh session in blocks of tokens on the chunk threads (pairwise sums instead of einsum's: compared
  to 9 significant digits).
- **decode steps judged in this process**: ``moesnap check --decode 16 --device cpu`` of the tiny model at
  ``--layers`` layers (default 48: a deep model's ~870 small stages a step), judge worker processes off
  (``MOESNAP_JUDGE_PROCESSES=0``, as on a machine of fewer than 6 CPUs), wall seconds of the check.  Since the
  eleventh session a stage of fewer than 2^15 values is judged on the thread that asks.

    python benchmarks/bench_judge_cpu.py [--baseline /tmp/old/src] [--repeat 3] [--tokens 1024] [--layers 48]

(``git archive <commit> src | tar -x -C /tmp/old`` makes an older tree.)  Without ``--baseline`` the rows
are this tree's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_NEXT = """
import json, sys, time
import numpy as np
from moesnap.case import Case
from moesnap.judge.distribution import next_tokens
from moesnap.judge.policy import Policy
T, V = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
g = rng.normal(0, 3, (T, V)).astype(np.float32)
c = g + rng.normal(0, 0.01, (T, V)).astype(np.float32)
tokens = rng.integers(0, V, T).astype(np.int32)
golden = Case(tokens=tokens, model={"logits": g}, layers={})
cand = Case(tokens=tokens, model={"logits": c}, layers={})
t = time.perf_counter()
rows = next_tokens(golden, golden, cand, "case0", None, Policy.default(), "float32")
wall = time.perf_counter() - t
digest = sum(r.kl for r in rows) + sum(r.dlogprob for r in rows) + sum(r.candidate_top1 for r in rows)
print("BENCH " + json.dumps({"wall": wall, "same": repr(digest)}))
"""

_ROWS = """
import json, sys, time
import numpy as np
from moesnap.judge.classify import row_stats
T, V = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
g = rng.normal(0, 3, (T, V)).astype(np.float32)
c = g + rng.normal(0, 0.01, (T, V)).astype(np.float32)
t = time.perf_counter()
n, worst, at, bad, toks = row_stats(g, c, 0.01, 0, (1, 2))
print("BENCH " + json.dumps({"wall": time.perf_counter() - t, "same": repr((n, f"{worst:.12g}", at, bad, toks.tolist()))}))
"""

_PAIRS = """
import json, sys, time
import numpy as np
from moesnap.judge.routing import expert_scale_errors
T, k, H = int(sys.argv[1]), 8, 2048
rng = np.random.default_rng(0)
ids = np.stack([rng.permutation(128)[:k] for _ in range(T)])
a = rng.normal(0, 1, (T, k, H)).astype(np.float32)
r = (a.sum(1) * 1e-3 + rng.normal(0, 1e-3, (T, H))).astype(np.float32)
t = time.perf_counter()
out = expert_scale_errors(ids, a, r, (), a.sum(1))
print("BENCH " + json.dumps({"wall": time.perf_counter() - t,
                             "same": repr([(e, f"{eps:.9g}", f"{se:.9g}", n, t0) for e, eps, se, n, t0 in out])}))
"""

_CHECK = """
import json, sys, time
from moesnap.cli.main import main
t = time.perf_counter()
code = main(sys.argv[1:])
print("BENCH " + json.dumps({"wall": time.perf_counter() - t, "same": code}))
"""


def _run(src: Path | None, program: str, args: list[str]) -> dict:
    env = dict(os.environ, MOESNAP_JUDGE_PROCESSES="0", MOESNAP_NO_PROGRESS="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run([sys.executable, "-c", program, *args], env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"the run failed under {src or 'this tree'}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[6:])


def _row(name: str, trees: dict[str, Path | None], program: str, args: list[str], repeat: int) -> None:
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(repeat):
        for tag, src in trees.items():
            runs[tag].append(_run(src, program, args))
    same = {repr(r["same"]) for rs in runs.values() for r in rs}
    if len(same) != 1:
        raise SystemExit(f"{name}: the trees disagree: {same}")
    med = {tag: statistics.median(r["wall"] for r in rs) for tag, rs in runs.items()}
    text = ", ".join(f"{tag} {med[tag]:.2f} s" for tag in trees)
    if "baseline" in med:
        text += f" = {med['this tree'] / med['baseline']:.2f}x the baseline"
    print(f"  {name:<40} {text}  (medians of {repeat}; {', '.join(str(r['wall'])[:5] for r in runs['this tree'])})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=None, help="another tree's src/ to time beside this one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--work", type=Path, default=None)
    a, _ = ap.parse_known_args()
    here = Path(__file__).resolve().parents[1] / "src"
    trees: dict[str, Path | None] = {"this tree": here}
    if a.baseline is not None:
        trees["baseline"] = a.baseline.resolve()
    print(f"bench_judge_cpu: {os.cpu_count()} CPUs; this tree {here}" +
          (f", baseline {a.baseline}" if a.baseline else ""))
    _row(f"next-token figures, {a.tokens} x {a.vocab}", trees, _NEXT, [str(a.tokens), str(a.vocab)], a.repeat)
    _row(f"row rule, {a.tokens // 2} x {a.vocab}", trees, _ROWS, [str(a.tokens // 2), str(a.vocab)], a.repeat)
    _row(f"expert-scale sums, {a.tokens} x 8 x 2048", trees, _PAIRS, [str(a.tokens)], a.repeat)

    import moesnap
    from moesnap.model.synth import make_model, preset

    work = a.work or Path(tempfile.mkdtemp(prefix="bench-judge-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"tiny-{a.layers}.gguf"
    if not model.exists():
        make_model(model, preset("tiny", layers=a.layers), progress=False)
    store = work / "goldens"
    ids = [(7 * i) % 200 + 3 for i in range(32)]
    ref = moesnap.generate(str(model), "judgecpu", [ids], store=str(store), decode=16, show_progress=False)
    args = ["-q", "check", str(model), "--suite", ref, "--store", str(store), "--device", "cpu", "--decode", "16"]
    _row(f"check --decode 16, tiny x {a.layers} layers", trees, _CHECK, args, a.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
