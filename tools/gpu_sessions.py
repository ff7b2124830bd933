"""GPU sessions that run with or without nox: ``python tools/gpu_sessions.py check_gpu|heavy``.

The GPU machine may have only torch, numpy and hypothesis installed (the rest
arrives as wheels), and no nox: these sessions therefore run in the current
environment and call moesnap in subprocesses, timing each step and taking its
peak host memory (ru_maxrss) and peak GPU memory.  Without CUDA they print
``skipped: no CUDA`` and exit 0 (nox turns that into a skipped session).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from moesnap.model.synth import tiny_path

TINY = tiny_path()

ROOT = Path(__file__).resolve().parents[1]
PROMPT_128 = ("def route(tokens, experts):\n    # pick the top-k experts for every token, renormalise, and run them\n"
              "    return [e(t) for t in tokens for e in experts]\n")[:128]


def _step(out_json: str, argv: list[str]) -> int:
    """Run one moesnap command in this process and write its timing and peak memory to ``out_json``."""
    import torch

    from moesnap.cli import main

    prof_dir = os.environ.get("MOESNAP_SESSION_PROFILE")
    prof = None
    if prof_dir:   # cProfile of the whole command (main thread), for tools/profile_report.py
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(Path(prof_dir) / (Path(out_json).stem + ".prof")))
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    Path(out_json).write_text(json.dumps({
        "argv": argv, "rc": rc, "wall_s": round(wall, 2),
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(cuda_peak / 2**30, 2),
    }))
    return rc


def run_step(name: str, argv: list[str], log: list[dict], expect: tuple[int, ...] = (0,)) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name)
    with tempfile.NamedTemporaryFile(prefix=f"step_{slug}_", suffix=".json", delete=False) as f:
        path = f.name
    print(f"\n$ moesnap {' '.join(argv)}", flush=True)
    proc = subprocess.run([sys.executable, __file__, "_step", path, "--", *argv])
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        rec = {"argv": argv, "rc": proc.returncode}
    rec["name"] = name
    log.append(rec)
    if os.environ.get("MOESNAP_SESSION_LOG"):
        Path(os.environ["MOESNAP_SESSION_LOG"]).write_text(json.dumps(log, indent=1))
    print(f"[{name}] rc={rec['rc']} wall={rec.get('wall_s')} s peak host={rec.get('peak_host_gib')} GiB "
          f"peak GPU={rec.get('peak_gpu_gib')} GiB", flush=True)
    if rec["rc"] not in expect:
        raise SystemExit(f"step {name} exited {rec['rc']}, expected {expect}")
    return rec


def read_floor(paths: list[Path]) -> float:
    """Seconds to read every byte of ``paths`` once (the I/O floor of a check)."""
    t0 = time.perf_counter()
    for p in paths:
        files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
        for q in files:
            with open(q, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def judged(rec: dict, report: Path, want: tuple[int, set[str]] | None = None) -> dict:
    """Add the report's verdict, coverage and first divergence to ``rec``; with ``want`` (layer, stages)
    fail the session unless the first divergence is there."""
    try:
        rep = json.loads(report.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"{rec['name']}: no readable report {report}") from None
    cov = rep.get("coverage", {})
    rec.update(verdict=rep["verdict"], first_divergence=rep["first_divergence"],
               cells=f"{cov.get('cells_judged')}/{cov.get('cells_held')}", judged_by_mode=cov.get("judged_by_mode"))
    rec["next_token"] = (rep.get("next_token") or {}).get("summary")
    print(f"[{rec['name']}] verdict {rep['verdict']}, judged {rec['cells']} cells, first divergence "
          f"{rep['first_divergence']}" + (f"; {rec['next_token']}" if rec["next_token"] else ""), flush=True)
    if rep["verdict"] == "pass" and cov.get("cells_judged") != cov.get("cells_held"):
        raise SystemExit(f"{rec['name']}: a pass that did not judge every cell")
    if want is not None:
        fd = rep["first_divergence"] or {}
        if fd.get("layer") != want[0] or fd.get("stage") not in want[1]:
            raise SystemExit(f"{rec['name']}: expected the fault named at layer {want[0]} / {sorted(want[1])}, "
                             f"got {fd}")
    return rec


def _routed_expert(store: Path | str, suite: str, layer: int) -> int:
    """An expert that case0 of the newest version of ``suite`` routes a token to at ``layer``."""
    from moesnap.store import open_store

    v = open_store(str(store)).open_version(suite, None)
    return int(v.read_case(v.case_names()[0]).layers["topk_ids"][layer][0][0])


def _faults(model: Path, store: Path | str, suite: str, layer: int, q6k_layer: int, device: str, out: Path,
            log: list[dict], tag: str) -> None:
    expert = _routed_expert(store, suite, layer)
    for dtype in ("float32", "bfloat16"):
        for spec, stages in ((f"nan:layer={layer},expert={expert}", {"expert_out"}),
                             (f"qtype:layer={q6k_layer},tensor=ffn_down_exps,as=q4_k", {"expert_out"}),
                             (f"scale:layer={layer},stage=attn_out,factor=1.02", {"attn_out"})):
            kind = spec.split(":")[0]
            js = out / f"{tag}_inject_{kind}_{dtype}.json"
            rec = run_step(f"{tag} inject {kind} {dtype}", ["-q", "check", str(model), "--suite", suite, "--store",
                                                          str(store), "--device", device, "--dtype", dtype,
                                                          "--inject", spec, "--force", "--json", str(js)],
                           log, expect=(1,))
            judged(rec, js, (q6k_layer if kind == "qtype" else layer, stages))


def check_gpu(out: Path, store: str, device: str, log: list[dict]) -> list[dict]:
    for dtype in ("float32", "bfloat16"):
        js = out / f"check_tiny_{dtype}.json"
        rec = run_step(f"check tiny {dtype}", ["-q", "check", str(TINY), "--suite", "tiny", "--store", store,
                                               "--device", device, "--dtype", dtype, "--replay",
                                               "--force", "--json", str(js),
                                               "--html", str(out / f"check_tiny_{dtype}.html")], log, expect=(0,))
        judged(rec, js)
    _faults(TINY, store, "tiny", 1, 2, device, out, log, "tiny")
    return log


def heavy(out: Path, work: Path, layers: int, device: str, log: list[dict], faults: bool = True,
          engines: bool = True) -> list[dict]:
    model = work / f"qwen3-30b-a3b-{layers}l.gguf"
    store = work / "goldens"
    if not model.exists():
        run_step("make model", ["-q", "model", "make", str(model), "--preset", "qwen3-30b-a3b",
                                "--layers", str(layers)], log)
    run_step("generate goldens (CPU)", ["-q", "goldens", "generate", str(model), "--suite", "heavy",
                                        "--store", str(store), "--prompt", PROMPT_128], log)
    floor = read_floor([model, store])
    log.append({"name": "I/O floor (read model + goldens)", "wall_s": round(floor, 2)})
    print(f"[I/O floor] {floor:.2f} s to read {model.stat().st_size / 2**30:.1f} GiB model + goldens", flush=True)
    # bfloat16: router replay free-running (every token judged in every layer) plus stage-local replay (the
    # default in low precision); then free-running alone, for its time and to see the drift it carries
    for dtype, extra in (("float32", []), ("bfloat16", []), ("bfloat16", ["--no-replay"])):
        tag = dtype + ("_free" if extra else "")
        js = out / f"heavy_{tag}.json"
        rec = run_step(f"check {device} {tag}", ["-q", "check", str(model), "--suite", "heavy", "--store", str(store),
                                                 "--device", device, "--dtype", dtype, *extra,
                                                 "--force", "--json", str(js)], log, expect=(0, 1))
        judged(rec, js)
    # beyond one prefill: the last 32 of the 128 golden tokens as decode steps through the KV cache (paged, and
    # on a CUDA graph's static buffers, router replay decided inside the graph: it must pass with every cell
    # judged), and a RoPE position off by one in decode step 5 only
    for tag, extra, expect in (("decode32_bfloat16", ["--dtype", "bfloat16"], (0,)),
                               ("decode32_paged_graph_bfloat16", ["--dtype", "bfloat16", "--paged", "--cuda-graph"], (0,)),
                               ("decode32_rope_pos_float32", ["--inject", "rope_pos:step=5"], (1,)),
                               ("decode32_rope_pos_bfloat16", ["--dtype", "bfloat16", "--inject", "rope_pos:step=5"], (1,))):
        js = out / f"heavy_{tag}.json"
        rec = run_step(f"check {device} {tag}", ["-q", "check", str(model), "--suite", "heavy", "--store", str(store),
                                                 "--device", device, "--decode", "32", *extra, "--force",
                                                 "--json", str(js)], log, expect=expect)
        judged(rec, js)
    if faults:
        mid = layers // 2
        _faults(model, store, "heavy", mid, mid - mid % 2, device, out, log, "heavy")   # even layers hold Q6_K
    if engines:
        transformers_engine(model, store, device, work, out, log)
    return log


def transformers_engine(model: Path, store: Path, device: str, work: Path, out: Path, log: list[dict]) -> None:
    """transformers' Qwen3MoeForCausalLM in bfloat16 on the device, traced and judged against the goldens
    (free-running with router replay off -- it is another engine -- and layer by layer by local re-reference)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        print("[transformers engine] skipped: transformers is not installed", flush=True)
        log.append({"name": "transformers engine", "skipped": "transformers not installed"})
        return
    cand = work / "transformers-bf16.zarr"
    run_step("trace transformers bfloat16", ["-q", "trace", str(model), "--prompt", PROMPT_128, "--engine",
                                             "transformers", "--device", device, "--dtype", "bfloat16",
                                             "--out", str(cand), "--force"], log)
    js = out / "heavy_transformers_bfloat16.json"
    rec = run_step("compare transformers bfloat16", ["-q", "compare", "heavy", str(cand), "--store", str(store),
                                                     "--allow-missing", "--model", str(model), "--force",
                                                     "--json", str(js)], log, expect=(0, 1))
    judged(rec, js)


def _last_rank_expert(store: Path, suite: str, layer: int, n_ranks: int) -> int:
    """An expert the last of ``n_ranks`` ranks owns (of 128) that case0 of ``suite`` routes a token to at ``layer``."""
    from moesnap.store import open_store

    v = open_store(str(store)).open_version(suite, None)
    ids = v.read_case(v.case_names()[0]).layers["topk_ids"][layer]
    return int(max(e for e in np.unique(ids) if e >= 128 - 128 // n_ranks))


def _ep_check(out: Path, model: Path, store: Path, suite: str, name: str, layers: int, log: list[dict], *,
              n_ranks: int, dtype: str, mode: str, inject: list[str], **serving: Any) -> None:
    """One expert-parallel check (``serving``: ``decode=N``, ``paged=True``, … as check_ep takes them), its
    report written and summed up; a pass that did not judge every cell, or a planted NaN not named at its
    layer / expert_out, ends the session."""
    from moesnap.judge.report import write_json
    from moesnap.run.expert_parallel import check_ep

    t0 = time.perf_counter()
    rep = check_ep(str(model), suite, store=str(store), n_ranks=n_ranks, backend="nccl", device="cuda", dtype=dtype,
                   mode=mode, inject=inject, **serving)
    wall = time.perf_counter() - t0
    assert rep is not None
    write_json(rep, out / (name.replace(" ", "_") + ".json"))
    cov = rep.coverage()
    fd = rep.first_divergence
    rec = {"name": name, "wall_s": round(wall, 2), "verdict": rep.verdict, "cells": f"{cov.judged}/{cov.held}",
           "first_divergence": None if fd is None else [fd.case, fd.layer, fd.stage, fd.verdict.name],
           "notes": [n for n in rep.notes if "expert parallel" in n or "routed to expert" in n]}
    log.append(rec)
    print(json.dumps(rec), flush=True)
    if rep.verdict == "pass" and cov.judged != cov.held:
        raise SystemExit(f"{name}: a pass that did not judge every cell")
    if inject and (fd is None or fd.layer != layers // 2 or fd.stage != "expert_out"):
        raise SystemExit(f"{name}: the planted NaN was not named at layer {layers // 2} / expert_out: {fd}")


def multi_gpu(out: Path, work: Path, layers: int, log: list[dict], n_ranks: int = 2,
              preset: str = "qwen3-30b-a3b", single: bool = True, decode: int = 0) -> list[dict]:
    """The expert-parallel candidate on ``n_ranks`` GPUs (NCCL) against full-width goldens: float32 and
    bfloat16, both dispatch modes, and a NaN planted in an expert of the last rank; then (``single``)
    the one-GPU candidate on the same file and goldens, for figures side by side from one run.
    ``decode``: then the same with the prompt served and ``decode`` decode steps after it (goldens generated
    with ``--decode``; every rank its own KV cache, rank 0 judging each step), beside the one-GPU serving check.
    The goldens' per-layer generation time and memory are in the summary (``goldens show``)."""
    model = work / f"{preset}-{layers}l.gguf"
    store = work / "goldens"
    if not model.exists():
        run_step("make model", ["-q", "model", "make", str(model), "--preset", preset, "--layers", str(layers)], log)
    run_step("generate goldens (CPU)", ["-q", "goldens", "generate", str(model), "--suite", "ep", "--store", str(store),
                                        "--prompt", PROMPT_128], log)
    from moesnap.store import open_store

    timing = (open_store(str(store)).open_version("ep", None).meta.get("layer_timing") or {}).get("case0") or []
    log.append({"name": "generation per layer", "layers": timing})
    last_rank = _last_rank_expert(store, "ep", layers // 2, n_ranks)   # an expert the last rank owns, routed to
    runs = [("float32", "alltoall", []), ("bfloat16", "alltoall", []), ("float32", "allreduce", []),
            ("bfloat16", "alltoall", [f"nan:layer={layers // 2},expert={last_rank}"])]
    for dtype, mode, inject in runs:
        _ep_check(out, model, store, "ep", f"ep{n_ranks} {dtype} {mode}" + (" nan" if inject else ""), layers, log,
                  n_ranks=n_ranks, dtype=dtype, mode=mode, inject=inject)
    if single:
        for dtype in ("float32", "bfloat16"):
            js = out / f"single_{dtype}.json"
            rec = run_step(f"one GPU {dtype}", ["-q", "check", str(model), "--suite", "ep", "--store", str(store),
                                                "--device", "cuda", "--dtype", dtype, "--force", "--json", str(js)],
                           log, expect=(0, 1))
            judged(rec, js)
    if decode:
        run_step(f"generate goldens with {decode} decode steps (CPU)",
                 ["-q", "goldens", "generate", str(model), "--suite", "ep_decode", "--store", str(store), "--prompt",
                  PROMPT_128, "--decode", str(decode)], log)
        last_rank = _last_rank_expert(store, "ep_decode", layers // 2, n_ranks)
        for dtype, mode, inject, how in (("float32", "alltoall", [], {}), ("bfloat16", "alltoall", [], {}),
                                         ("bfloat16", "allreduce", [], {"paged": True}),
                                         ("bfloat16", "alltoall", [f"nan:layer={layers // 2},expert={last_rank}"], {})):
            name = f"ep{n_ranks} decode{decode} {dtype} {mode}" + (" paged" if how else "") + (" nan" if inject else "")
            _ep_check(out, model, store, "ep_decode", name, layers, log, n_ranks=n_ranks, dtype=dtype, mode=mode,
                      inject=inject, decode=decode, **how)
        if single:
            for dtype in ("float32", "bfloat16"):
                js = out / f"single_decode{decode}_{dtype}.json"
                rec = run_step(f"one GPU decode{decode} {dtype}",
                               ["-q", "check", str(model), "--suite", "ep_decode", "--store", str(store), "--device",
                                "cuda", "--dtype", dtype, "--decode", str(decode), "--force", "--json", str(js)],
                               log, expect=(0, 1))
                judged(rec, js)
    return log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_step":
        return _step(argv[1], argv[3:])
    p = argparse.ArgumentParser(prog="python tools/gpu_sessions.py")
    p.add_argument("session", choices=("check_gpu", "heavy", "multi_gpu"))
    p.add_argument("--out", default="out", help="reports and the timing summary go here")
    p.add_argument("--work", default=None, help="where the full-size model and its goldens are made (heavy)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--store", default=str(ROOT / "goldens"))
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a dry run of the session")
    p.add_argument("--no-faults", action="store_true", help="heavy: skip the planted faults")
    p.add_argument("--no-engines", action="store_true", help="heavy: skip transformers as a candidate engine")
    p.add_argument("--profile", action="store_true", help="cProfile every step into OUT/profiles/*.prof")
    p.add_argument("--preset", default="qwen3-30b-a3b", help="multi_gpu: the model's shape (qwen3-235b-a22b: 94 "
                   "layers of hidden 4096, ~1.4 GB a layer at Q4_K_M; pick --layers to fit the disk)")
    p.add_argument("--no-single", action="store_true", help="multi_gpu: skip the one-GPU checks of the same file")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="multi_gpu: also serve the prompt plus N decode steps on the ranks (and on one GPU)")
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOESNAP_NO_PROGRESS", "1")
    if a.profile:
        (out / "profiles").mkdir(exist_ok=True)
        os.environ["MOESNAP_SESSION_PROFILE"] = str((out / "profiles").resolve())
    name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    log: list[dict] = [{"name": "machine", "device": name, "torch": torch.__version__, "cpus": os.cpu_count()}]
    summary = out / f"{a.session}_summary.json"
    os.environ["MOESNAP_SESSION_LOG"] = str(summary)
    try:
        if a.session == "check_gpu":
            check_gpu(out, a.store, a.device, log)
        elif a.session == "multi_gpu":
            if torch.cuda.device_count() < 2:
                print("skipped: needs 2 CUDA devices")
                return 0
            work = Path(a.work or tempfile.mkdtemp(prefix="moesnap-ep-"))
            work.mkdir(parents=True, exist_ok=True)
            multi_gpu(out, work, a.layers, log, n_ranks=torch.cuda.device_count(), preset=a.preset,
                      single=not a.no_single, decode=a.decode)
        else:
            work = Path(a.work or tempfile.mkdtemp(prefix="moesnap-heavy-"))
            work.mkdir(parents=True, exist_ok=True)
            heavy(out, work, a.layers, a.device, log, faults=not a.no_faults, engines=not a.no_engines)
    finally:
        summary.write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
