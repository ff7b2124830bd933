"""What decode steps cost the check and the goldens, against one prefill, measured in the same run.

    python benchmarks/bench_decode_check.py [--preset tiny|qwen3-30b-a3b] [--layers N] [--prompt P] [--steps N]
                                            [--device cuda|cpu] [--dtype float32|bfloat16] [--repeat R] [--work DIR]

Rows (median of ``--repeat`` runs each, alternating):

* golden generation of the prompt alone (P tokens) and of prompt + continuation (P + N tokens: the golden
  of N decode steps is one reference forward over both), and their ratio (goal <= 1.5 at P=128, N=32);
* the check of that golden as one prefill of P + N tokens, and as ``--decode N`` (a prefill of P, then N
  decode steps through the KV cache, each judged at its position), and their ratio (goal <= 2);
* the same with ``--cuda-graph`` (the decode steps on a CUDA graph's static buffers) where CUDA is present.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import moesnap
from moesnap.model.synth import make_model, preset, tiny_path


def _model(name: str, layers: int, work: Path) -> str:
    if name == "tiny":
        return str(tiny_path())
    path = work / f"{name}-{layers}.gguf"
    if not path.exists():
        make_model(path, preset(name, layers=layers))
    return str(path)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "qwen3-30b-a3b"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="moesnap-bench-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    model = _model(a.preset, a.layers, work)
    rng = np.random.default_rng(0)
    from moesnap.model.load import open_model

    V = open_model(model).config.vocab_size
    ids = [int(t) for t in rng.integers(1, V, size=a.prompt + a.steps)]
    store = str(work / "goldens")
    times: dict[str, list[float]] = {k: [] for k in ("gen_prefill", "gen_decode", "check_prefill", "check_decode",
                                                      "check_graph")}
    n = 0
    for r in range(a.repeat):
        for which in ("gen_prefill", "gen_decode") if r % 2 == 0 else ("gen_decode", "gen_prefill"):
            toks = ids[:a.prompt] if which == "gen_prefill" else ids
            n += 1
            times[which].append(_time(lambda: moesnap.generate(model, f"{which}{n}", [toks], store=store)))
    ref = max((p.name for p in Path(store).iterdir() if p.name.startswith("gen_decode")), key=len)
    kw = dict(store=store, device=a.device, dtype=a.dtype, show_progress=False)
    graph = a.device.startswith("cuda")
    verdicts: dict[str, str] = {}
    for r in range(a.repeat):
        order = ["check_prefill", "check_decode"] + (["check_graph"] if graph else [])
        for which in order if r % 2 == 0 else order[::-1]:
            extra = {} if which == "check_prefill" else {"decode": a.steps, "cuda_graph": which == "check_graph"}
            rep = None

            def run() -> None:
                nonlocal rep
                rep = moesnap.check(model, ref, **kw, **extra)

            times[which].append(_time(run))
            assert rep is not None
            verdicts[which] = rep.verdict
            # every row must pass (a CUDA graph's decode steps run router replay inside the graph)
            assert rep.verdict == "pass", rep.summary()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"decode cost: {a.preset}, {a.layers} layers, P={a.prompt}, N={a.steps}, {a.device} {a.dtype}, "
          f"median of {a.repeat} alternating runs")
    print(f"  golden generation  P alone {med['gen_prefill']:.2f} s   P+N {med['gen_decode']:.2f} s   "
          f"ratio {med['gen_decode'] / med['gen_prefill']:.2f}x (goal <= 1.5x)")
    print(f"  check              one prefill of P+N {med['check_prefill']:.2f} s   prefill P + {a.steps} decode steps "
          f"{med['check_decode']:.2f} s   ratio {med['check_decode'] / med['check_prefill']:.2f}x (goal <= 2x)")
    if "check_graph" in med:
        print(f"  check --cuda-graph prefill P + {a.steps} steps on a CUDA graph {med['check_graph']:.2f} s   ratio "
              f"{med['check_graph'] / med['check_prefill']:.2f}x ({verdicts['check_graph']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
