"""The smallest scale error ``moesnap compare`` catches in a foreign engine (HF transformers).

transformers' ``Qwen3MoeForCausalLM`` gets the weights of a synthetic GGUF
(8 layers, 16 experts, top-4, hidden 128; ``tests/crosscheck/foreign_run.py``);
one weight of layer 3 is scaled by a factor and the run is captured with
:func:`moesnap.capture.transformers` and judged with ``moesnap compare
--allow-missing --model MODEL`` (local re-reference: every layer judged from
the engine's own input) against float32 goldens of two prompts (32 and 40
tokens).  Targets:

* ``expert``: the most used expert's ``down_proj`` (its output scaled), first visible at ``moe_out``;
* ``o_proj``: the layer's attention output projection, first visible at ``attn_out``;
* ``q_proj``: the layer's query projection, first visible at ``q``.

For each dtype (float32, bfloat16) and target the table says, per factor,
whether the compare failed (``x``: at the target's layer and stage, ``?``:
somewhere else), passed (``.``) or was inconclusive (``i``), then the
smallest factor caught (local rows: where ``local.first_introduced`` is;
free-running rows: ``first_divergence``); a second
table gives the relative L2 error of the target stage (local re-reference),
with the clean run's in the first column, so signal and noise can be read
side by side.  ``--free`` adds free-running (``--no-local``) rows.

Seen on 2 CPU cores (torch 2.13, transformers 5.24, seed 11, 96 runs in 76 s), smallest factor caught:
float32 x1.001 for all three targets, local and free-running alike (the clean run's relative L2 error
is <= 1.3e-6, a x1.001 scale gives 4.5e-4 to 1e-3); bfloat16 with local re-reference x1.02 (expert,
moe_out rel_l2 7.1e-3 vs 5.6e-3 clean) and x1.01 (o_proj, q_proj: 1.0e-2 vs 2.4e-3 clean).
Free-running bfloat16 is ``inconclusive`` at every factor (near-tie flips in layers 1 and 4 leave
cells unjudged), and its x1.1 o_proj run names layer 3 / topk_weights, not attn_out (its attn_out,
10 % off, passes the free-running elementwise tolerance).

    python benchmarks/bench_sensitivity.py [--factors 1.001,1.002,...] [--targets expert,o_proj,q_proj]
                                           [--dtypes float32,bfloat16] [--free] [--seed 11] [--json PATH]

Needs transformers (``requirements-crosscheck.txt``); ~2-3 s per judged run on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

try:
    import transformers  # noqa: F401
except ImportError:   # `nox -s bench` runs every bench_*.py; this one needs the cross-check's extras
    print("bench_sensitivity: skipped: transformers not installed (pip install -r requirements-crosscheck.txt)")
    sys.exit(0)

from crosscheck.foreign_run import BUG_LAYER, World  # noqa: E402

FACTORS = (1.001, 1.002, 1.005, 1.01, 1.02, 1.03, 1.05, 1.1)
TARGETS = {"expert": "moe_out", "o_proj": "attn_out", "q_proj": "q"}


def scale(model, target: str, factor: float, expert: int) -> None:
    layer = model.model.layers[BUG_LAYER]
    with torch.no_grad():
        if target == "expert":
            layer.mlp.experts.down_proj[expert].mul_(factor)
        else:
            getattr(layer.self_attn, target).weight.mul_(factor)


def rel_l2(outcome, stage: str) -> float:
    """Worst relative L2 error of ``stage`` at the planted layer over the cases (local results, else free)."""
    rs = (outcome.report.get("local") or {}).get("results") or outcome.report.get("results", [])
    vals = [r["metrics"]["rel_l2"] for r in rs
            if r["layer"] == BUG_LAYER and r["stage"] == stage and r.get("metrics")]
    return max(vals, default=float("nan"))


def located(outcome, mode: str) -> tuple[int | None, str] | None:
    """Where the compare put the error: local re-reference's first introduced (layer, stage), or
    free-running's first divergence."""
    d = outcome.introduced if mode == "local" else outcome.first
    return None if d is None else (d.get("layer"), d.get("stage"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default=",".join(map(str, FACTORS)))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--free", action="store_true", help="also judge free-running (--no-local)")
    ap.add_argument("--seed", type=int, default=11, help="synthetic model seed")
    ap.add_argument("--json", metavar="PATH", help="write every result here")
    a = ap.parse_args(argv)
    factors = [float(f) for f in a.factors.split(",")]
    targets = a.targets.split(",")
    dtypes = a.dtypes.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    modes = [("local", True)] + ([("free", False)] if a.free else [])

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moesnap-sens-") as tmp:
        world = World(Path(tmp), seed=a.seed)
        expert = world.most_used_expert(BUG_LAYER)
        print(f"model: {world.gguf.name} (8 layers, 16 experts, top-4, hidden 128), prompts "
              f"{[len(p) for p in world.prompts]} tokens, planted layer {BUG_LAYER}, expert {expert}; "
              f"setup {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for dtype in dtypes:
            clean = world.judge(world.model(dtype), modes=[m for _, m in modes])
            for (mode, _), out in zip(modes, clean):
                print(f"clean {dtype:8} {mode:5}: {out.summary()}", flush=True)
            for target in targets:
                stage = TARGETS[target]
                for (mode, _), c in zip(modes, clean):
                    rows.append({"dtype": dtype, "target": target, "stage": stage, "mode": mode,
                                 "clean_verdict": c.verdict, "clean_rel_l2": rel_l2(c, stage), "runs": []})
                for f in factors:
                    model = world.model(dtype)
                    scale(model, target, f, expert)
                    outs = world.judge(model, modes=[m for _, m in modes])
                    for row, out in zip(rows[-len(modes):], outs):
                        named = located(out, row["mode"])
                        row["runs"].append({"factor": f, "verdict": out.verdict, "named": named,
                                            "right_place": named == (BUG_LAYER, stage),
                                            "rel_l2": rel_l2(out, stage)})
                print(f"  {dtype} {target}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    elapsed = time.perf_counter() - t0

    head = f"{'dtype':9} {'target':7} {'stage':9} {'mode':5} | " + " ".join(f"{f:>6g}" for f in factors)
    print(f"\ncaught (x: failed at L{BUG_LAYER}/stage, ?: failed elsewhere, .: passed, i: inconclusive); "
          f"local: where the re-reference says the error was introduced, free: the first divergence")
    print(head + " | smallest caught")
    for r in rows:
        marks = []
        for run in r["runs"]:
            mark = {"pass": ".", "inconclusive": "i"}.get(run["verdict"], "x" if run["right_place"] else "?")
            marks.append(f"{mark:>6}")
        smallest = next((run["factor"] for run in r["runs"] if run["verdict"] == "fail" and run["right_place"]), None)
        r["smallest_caught"] = smallest
        print(f"{r['dtype']:9} {r['target']:7} {r['stage']:9} {r['mode']:5} | " + " ".join(marks)
              + f" | {'none' if smallest is None else f'x{smallest:g}'}")
    print(f"\nrelative L2 error of the target stage at L{BUG_LAYER} (worst case; 'clean' = unscaled run)")
    print(f"{'dtype':9} {'target':7} {'stage':9} {'mode':5} | {'clean':>8} " + " ".join(f"{f:>8g}" for f in factors))
    for r in rows:
        print(f"{r['dtype']:9} {r['target']:7} {r['stage']:9} {r['mode']:5} | {r['clean_rel_l2']:8.1e} "
              + " ".join(f"{run['rel_l2']:8.1e}" for run in r["runs"]))
    print(f"\n{sum(len(r['runs']) for r in rows)} judged runs in {elapsed:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"factors": factors, "layer": BUG_LAYER, "rows": rows}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
