"""What decode steps cost the goldens and the check, against one prefill, measured in the same run.

    python benchmarks/bench_decode_check.py [--preset qwen3-30b-a3b|tiny] [--layers N] [--prompt P] [--steps N]
        [--device cuda|cpu] [--dtype float32|bfloat16] [--repeat R] [--work DIR] [--cpu-draft] [--skip-check]

Rows (median of ``--repeat`` runs each, alternating, in one process):

* golden generation of the prompt alone (P tokens) and with ``decode=N`` (``goldens generate --decode N``:
  the candidate proposes the reference's greedy continuation, then ONE reference forward over P + N
  verifies it and is stored), their ratio (issue 20's goal: <= 1.5x at the 30B-A3B shape, 48 layers,
  P=128, N=32, on 16 cores), the proposal's own seconds and device (``moesnap.model.draft``), how many
  reference forwards ran, and the plain generation of the same P + N tokens (no proposal) for scale;
  ``--cpu-draft``: the same with the proposal forced onto the CPU (``MOESNAP_DRAFT_DEVICE=cpu``) where
  it would run on CUDA;
* the check of that golden as one prefill of P + N tokens, and as ``--decode N`` (a prefill of P, then N
  decode steps through the KV cache, each judged at its position), and their ratio (goal <= 2);
* the same with ``--cuda-graph`` (the decode steps on a CUDA graph's static buffers) where CUDA is present.

Defaults: the 30B-A3B shape at full width, 48 layers on a CUDA machine, 2 elsewhere (as bench_check.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import moesnap
from moesnap.model.synth import make_model, preset, tiny_path
from moesnap.run import trace


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


class _DraftClock:
    """Seconds spent proposing (``trace.greedy_draft``) while it is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = trace.greedy_draft

    def __enter__(self) -> _DraftClock:
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        trace.greedy_draft = timed
        return self

    def __exit__(self, *exc) -> None:
        trace.greedy_draft = self.real


def main(argv: list[str] | None = None) -> int:
    import torch

    from moesnap.judge.pool import case_processes, processes_by_default
    from moesnap.model.draft import DEVICE_VARIABLE, draft_device
    from moesnap.model.load import open_model
    from moesnap.store import open_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=["tiny", "qwen3-30b-a3b"])
    ap.add_argument("--layers", type=int, default=None, help="default: 48 on CUDA, 2 on the CPU")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32",
                    help="float32, bfloat16 or both (comma-separated): the check rows for each, on one golden")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--cpu-draft", action="store_true", help="also generate with the proposal on the CPU")
    ap.add_argument("--skip-check", action="store_true", help="golden generation only")
    ap.add_argument("--check-only", action="store_true",
                    help="the check rows only: the --decode golden is generated once, untimed")
    ap.add_argument("--processes", type=int, default=None,
                    help="worker processes judging decode steps (MOESNAP_JUDGE_PROCESSES); default: what a "
                         "moesnap command picks on this host")
    ap.add_argument("--no-plain", action="store_true",
                    help="leave out the plain generation of the same P+N tokens (no proposal)")
    ap.add_argument("--phases", action="store_true",
                    help="time the decode rows by phase (forwards, replays, judging, next-token figures; the GPU "
                         "synchronised at each phase's edges, which the ratio then includes) and print the split")
    ap.add_argument("--no-graph", action="store_true",
                    help="leave out the --cuda-graph row (its static buffers hold every expert dequantized: "
                         "~58 GB at 48 layers in bfloat16)")
    a = ap.parse_args(argv)
    dtypes = a.dtype.split(",")
    if not set(dtypes) <= {"float32", "bfloat16", "float16"} or a.skip_check and a.check_only:
        ap.error(f"--dtype {a.dtype!r}: float32, bfloat16, float16, comma-separated (and not --skip-check with "
                 f"--check-only)")
    if a.processes is not None:
        os.environ["MOESNAP_JUDGE_PROCESSES"] = str(a.processes)
    processes_by_default()          # as the moesnap command does: decode steps judged in worker processes
    layers = a.layers or (48 if a.device.startswith("cuda") else 2)
    work = a.work or Path(tempfile.mkdtemp(prefix="moesnap-bench-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    model = _model(a.preset, layers, work)
    rng = np.random.default_rng(0)
    opened = open_model(model)
    V = opened.config.vocab_size
    ids = [int(t) for t in rng.integers(1, V, size=a.prompt + a.steps)]
    prompt = ids[:a.prompt]
    store = str(work / "goldens")
    auto = draft_device(opened)
    with open(model, "rb") as f:                 # untimed: the file in the page cache for every row alike
        while f.read(64 << 20):
            pass
    gens: dict[str, dict[str, str]] = {"gen_prefill": {}, "gen_decode": {}}
    if not a.no_plain:
        gens["gen_plain"] = {}
    if a.cpu_draft and auto.type != "cpu":
        gens["gen_decode_cpu"] = {DEVICE_VARIABLE: "cpu"}
    if a.check_only:
        gens = {"gen_decode": {}}
    times: dict[str, list[float]] = {k: [] for k in (*gens, "check_prefill", "check_decode", "check_graph")}
    drafts: dict[str, list[float]] = {k: [] for k in gens}
    forwards: dict[str, set[int]] = {k: set() for k in gens}
    n = 0
    golden: str | None = None
    for r in range(1 if a.check_only else a.repeat):
        for which in list(gens) if r % 2 == 0 else list(gens)[::-1]:
            n += 1
            env = gens[which]
            before = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                with _DraftClock() as clock:
                    t = time.perf_counter()
                    if which == "gen_plain":
                        ref = moesnap.generate(model, f"{which}{n}", [ids], store=store)
                    else:
                        ref = moesnap.generate(model, f"{which}{n}", [prompt], store=store,
                                               decode=a.steps if which.startswith("gen_decode") else None)
                    times[which].append(time.perf_counter() - t)
            finally:
                for k, v in before.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            drafts[which].append(clock.seconds)
            entry = open_store(store).open_version(*ref.split("@")).meta.get("continuations", {}).get("case0", {})
            if "reference_forwards" in entry:
                forwards[which].add(int(entry["reference_forwards"]))
            # a 48-layer version is ~4 GB: keep only the golden the check rows need (the last --decode one)
            if which == "gen_decode" and not a.skip_check:
                if golden is not None:
                    shutil.rmtree(Path(store) / golden.split("@")[0])
                golden = ref
            else:
                shutil.rmtree(Path(store) / ref.split("@")[0])
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"decode cost: {a.preset}, {opened.config.n_layer} layers, P={a.prompt}, N={a.steps}, {a.device}, "
          f"{torch.get_num_threads()} CPU threads, {case_processes()} judge processes, median of {a.repeat} "
          f"alternating runs")
    for which in [k for k in gens if k.startswith("gen_decode") and not a.check_only]:
        where = "cpu" if which == "gen_decode_cpu" else str(auto)
        print(f"  golden generation  P alone {med['gen_prefill']:.2f} s   --decode {a.steps} {med[which]:.2f} s   "
              f"ratio {med[which] / med['gen_prefill']:.2f}x (goal <= 1.5x); of it the proposal on {where} "
              f"{statistics.median(drafts[which]):.2f} s, reference forwards {sorted(forwards[which])}")
    if "gen_plain" in med:
        print(f"  (plain generation of the same P+N tokens, no proposal: {med['gen_plain']:.2f} s, "
              f"{med['gen_plain'] / med['gen_prefill']:.2f}x)")
    if a.skip_check:
        return 0
    graph = a.device.startswith("cuda") and not a.no_graph
    for dtype in dtypes:
        _check_rows(model, golden, store, a, dtype, graph)
    return 0


class PhaseClock:
    """Seconds spent in each phase of a decode check while installed: the serving forwards
    (``Session.prefill``/``Session.decode``), the stage-local replay of each forward (``replay_batch``),
    handing steps to the judge processes, waiting for their verdicts, next-token figures, and judging in
    this process.  ``device``: a CUDA device is synchronised at each phase's edges (so a phase owns the
    GPU work it queued).  ``on_call(name, n)`` may return a context manager to run around call ``n``
    of phase ``name`` (a profiler, say)."""

    PHASES = (("prefill", "moesnap.model.serve", "Session", "prefill"),
              ("decode step", "moesnap.model.serve", "Session", "decode"),
              ("stage-local replay", "moesnap.model.serve", None, "replay_batch"),
              ("submit to judge processes", "moesnap.judge.suite", None, "submit_case"),
              ("wait for verdicts", "moesnap.judge.suite", None, "_result"),
              ("next-token figures", "moesnap.judge.suite", None, "next_tokens"),
              ("judge in this process", "moesnap.judge.suite", None, "_now"))

    def __init__(self, device: str, on_call=None) -> None:
        import importlib

        import torch

        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
        self.on_call = on_call
        self.spent: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._undo: list[tuple[object, str, object]] = []
        self._targets = [(name, getattr(importlib.import_module(mod), cls) if cls else importlib.import_module(mod),
                          attr) for name, mod, cls, attr in self.PHASES]

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            n = self.count[name] = self.count.get(name, 0) + 1
            extra = self.on_call(name, n) if self.on_call else None
            if extra is not None:
                extra.__enter__()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t
                if extra is not None:
                    extra.__exit__(None, None, None)
        return timed

    def __enter__(self) -> PhaseClock:
        for name, owner, attr in self._targets:
            real = getattr(owner, attr)
            self._undo.append((owner, attr, real))
            setattr(owner, attr, self._wrap(name, real))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, real in reversed(self._undo):
            setattr(owner, attr, real)
        self._undo.clear()

    def table(self, indent: str = "  ") -> str:
        return "\n".join(f"{indent}{name:28s} {s:8.2f} s  {self.count[name]:5d} calls  "
                         f"{1000 * s / max(1, self.count[name]):8.2f} ms/call"
                         for name, s in sorted(self.spent.items(), key=lambda kv: -kv[1]))


def _check_rows(model: str, golden: str | None, store: str, a: argparse.Namespace, dtype: str, graph: bool) -> None:
    """The check of ``golden`` as one prefill, with ``--decode N`` and with ``--cuda-graph``, in ``dtype``."""
    kw = dict(store=store, device=a.device, dtype=dtype, show_progress=False)
    times: dict[str, list[float]] = {"check_prefill": [], "check_decode": [], "check_graph": []}
    phases: list[PhaseClock] = []
    verdicts: dict[str, str] = {}
    cells: dict[str, str] = {}
    for r in range(a.repeat):
        order = ["check_prefill", "check_decode"] + (["check_graph"] if graph else [])
        for which in order if r % 2 == 0 else order[::-1]:
            extra = {} if which == "check_prefill" else {"decode": a.steps, "cuda_graph": which == "check_graph"}
            rep = None

            def run() -> None:
                nonlocal rep
                assert golden is not None
                rep = moesnap.check(model, golden, **kw, **extra)

            if a.phases and which == "check_decode":
                with PhaseClock(a.device) as clock:
                    times[which].append(_time(run))
                phases.append(clock)
            else:
                times[which].append(_time(run))
            assert rep is not None
            verdicts[which] = rep.verdict
            cells[which] = next(x for x in rep.summary().splitlines() if x.startswith("judged"))
            # every row must pass (a CUDA graph's decode steps run router replay inside the graph)
            assert rep.verdict == "pass", rep.summary()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"  check {dtype:9s} one prefill of P+N {med['check_prefill']:.2f} s   prefill P + {a.steps} decode steps "
          f"{med['check_decode']:.2f} s   ratio {med['check_decode'] / med['check_prefill']:.2f}x (goal <= 2x)")
    if "check_graph" in med:
        print(f"  check {dtype:9s} --cuda-graph prefill P + {a.steps} steps on a CUDA graph {med['check_graph']:.2f} s   "
              f"ratio {med['check_graph'] / med['check_prefill']:.2f}x ({verdicts['check_graph']})")
    for which, line in cells.items():
        print(f"    {which}: {line}")
    for clock in phases[:1]:
        print(f"    phases of the first --decode {a.steps} row (GPU synchronised at their edges):")
        print(clock.table("      "))


if __name__ == "__main__":
    raise SystemExit(main())
