"""Time the candidate's decode step: eager through the KV cache, and on static buffers captured in a
CUDA graph with the stages recorded from inside the graph (on) or not recorded (off).

    python benchmarks/bench_decode.py [--preset tiny|qwen3-30b-a3b] [--layers N] [--prompt P] [--steps N]
                                      [--dtype float32|bfloat16] [--device cuda|cpu] [--json PATH]

For each way of decoding it prints the median time of a decode step (after the first, which warms up
and, for the graph, captures it), and how far its rows are from the rows of one causal forward over
prompt + continuation (max relative L2 over every stage, layer and step; and whether the experts are
the same).  Without CUDA the graph rows run the same static step eagerly.  The qwen3-30b-a3b preset is
written once into ``--model-dir`` (~0.6 GB per layer).

Measured on an H100 (torch 2.11, CUDA 13), paged cache, median decode step after the first:

====================================  ==========  =========  ==========  ===========  ==========================
model                                 dtype       eager      graph, on   graph, off   rows vs one causal forward
====================================  ==========  =========  ==========  ===========  ==========================
tiny (4 layers), P=32, 32 steps       float32     15.2 ms    2.91 ms     0.76 ms      1.3e-6 / 1.4e-6 (graph)
tiny (4 layers), P=32, 32 steps       bfloat16    50.1 ms    3.53 ms     0.76 ms      3.4e-5
30B-A3B shape, 2 layers, P=128, 16    float32     20.8 ms    3.57 ms     1.75 ms      2.4e-6 / 2.3e-6, same experts
30B-A3B shape, 2 layers, P=128, 16    bfloat16    52.9 ms    2.91 ms     1.25 ms      0.54: near-tie expert flips
====================================  ==========  =========  ==========  ===========  ==========================

"graph, on" includes reading the ~75-150 recorded stages back to the host after each replay (most of
its cost over "off").  The eager step dequantizes every dense weight and the lm head each step; the
graph's resident weights are dequantized once.  bfloat16 at full width flips experts at near ties
between the decode step and the causal forward (both in bfloat16): a judge needs router replay there.
The last row runs the graph with router replay decided inside it (the causal forward's routing as the
guide, a wide tie width), which follows those flips: its rows keep the causal forward's experts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moesnap.judge.routing import tie_gap
from moesnap.model.candidate import CandidateModel, RouterReplay
from moesnap.model.recorder import ArrayRecorder
from moesnap.model.serve import GraphDecoder, Rows, Session
from moesnap.model.synth import make_model, preset, tiny_path
from moesnap.model.weights import GGUFModel


def model_path(name: str, layers: int, model_dir: Path) -> Path:
    if name == "tiny":
        return tiny_path()
    path = model_dir / f"{name}-{layers}layers.gguf"
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_model(path, preset(name, layers=layers))
        print(f"made {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def worst(rows: list[Rows], golden: dict[str, np.ndarray]) -> tuple[float, bool]:
    """(max relative L2 of any float stage of ``rows`` against the golden's rows there, same experts)."""
    err, same = 0.0, True
    for r in rows:
        for stage, a in {**r.case.model, **r.case.layers}.items():
            g = golden[stage][r.positions] if stage in r.case.model else golden[stage][:, r.positions]
            if stage == "topk_ids":
                same &= bool(np.array_equal(np.sort(a, -1), np.sort(g, -1)))
                continue
            a64, g64 = a.astype(np.float64), g.astype(np.float64)
            err = max(err, float(np.linalg.norm(a64 - g64) / max(np.linalg.norm(g64), 1e-30)))
    return err, same


def decode_steps(step: Callable[[int], list[Rows]], tokens: list[int], sync: bool) -> tuple[list[Rows], list[float]]:
    rows, times = [], []
    for t in tokens:
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step(t)
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        rows += out
    return rows, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "qwen3-30b-a3b"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/moesnap-models"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model = GGUFModel.open(model_path(a.preset, a.layers, a.model_dir))
    dtype, cuda = getattr(torch, a.dtype), a.device.startswith("cuda")
    seq = np.random.default_rng(0).integers(0, model.config.vocab_size, a.prompt + a.steps).tolist()
    cand = CandidateModel(model, device=a.device, dtype=dtype)
    cand.upload()
    full = ArrayRecorder()
    cand.forward(seq, full)
    golden = {**full.model, **full.stacked()}
    out: list[dict] = []
    # router replay of the causal forward's routing at a wide tie width: wherever the step picks other
    # experts than the causal forward, it continues with the causal forward's (decided inside the graph)
    guide = RouterReplay(golden["topk_ids"], golden["router_logits"], 1e9, tie_gap)
    where = "cuda graph" if cuda else "static buffers (eager)"
    ways: list[tuple[str, bool | None, bool, bool]] = [("eager (KV cache)", None, True, False)]
    ways += [(f"{where}, recording on", cuda, True, False), (f"{where}, recording off", cuda, False, False),
             (f"{where}, router replay, recording on", cuda, True, True)]
    for name, graph, record, replay in ways:
        s = Session(cand, capacity=a.prompt + a.steps, paged=True, record=record,
                    router_replay=guide if replay else None)
        s.prefill(seq[:a.prompt])
        step: Callable[[int], list[Rows]] = s.decode
        if graph is not None:
            dec = GraphDecoder(s, graph=graph, record=record)
            step = dec.decode
        rows, times = decode_steps(step, seq[a.prompt:], cuda)
        row = {"way": name, "first_step_ms": round(times[0] * 1e3, 3),
               "median_step_ms": round(statistics.median(times[1:]) * 1e3, 3),
               "followed": sum(len(r.followed) for r in rows)}
        if record:
            err, same = worst(rows, golden)
            row.update(max_rel_l2=float(f"{err:.3g}"), same_experts=same)
        out.append(row)
        print(f"{name:<48} first {row['first_step_ms']:>9.3f} ms  median {row['median_step_ms']:>8.3f} ms"
              + (f"  max rel L2 vs causal {row['max_rel_l2']:.2g}, same experts {row['same_experts']}" if record else "")
              + (f", followed the causal forward's experts at {row['followed']} (layer, row)" if replay else ""),
              flush=True)
    info = {"preset": a.preset, "layers": model.config.n_layer, "prompt": a.prompt, "steps": a.steps,
            "dtype": a.dtype, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    print(json.dumps(info))
    if a.json:
        a.json.write_text(json.dumps({**info, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
