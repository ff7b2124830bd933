"""GPU sessions that run with or without nox: ``python -m moesnap.sessions check_gpu|heavy``.

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

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).resolve().parent / "data" / "tiny.gguf"
PROMPT_128 = ("def route(tokens, experts):\n    # pick the top-k experts for every token, renormalise, and run them\n"
              "    return [e(t) for t in tokens for e in experts]\n")[:128]


def _step(out_json: str, argv: list[str]) -> int:
    """Run one moesnap command in this process and write its timing and peak memory to ``out_json``."""
    import torch

    from .cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    Path(out_json).write_text(json.dumps({
        "argv": argv, "rc": rc, "wall_s": round(wall, 2),
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(cuda_peak / 2**30, 2),
    }))
    return rc


def run_step(name: str, argv: list[str], log: list[dict], expect: tuple[int, ...] = (0,)) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    print(f"\n$ moesnap {' '.join(argv)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "moesnap.sessions", "_step", path, "--", *argv])
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


def check_gpu(out: Path, store: str, device: str, log: list[dict]) -> list[dict]:
    for dtype in ("float32", "bfloat16"):
        run_step(f"check tiny {dtype}", ["-q", "check", str(TINY), "--suite", "tiny", "--store", store,
                                         "--device", device, "--dtype", dtype, "--replay",
                                         "--force", "--json", str(out / f"check_tiny_{dtype}.json"),
                                         "--html", str(out / f"check_tiny_{dtype}.html")], log, expect=(0, 1))
    for spec in ("nan:layer=2,expert=3", "qtype:layer=2,tensor=ffn_down_exps,as=q4_k",
                 "scale:layer=2,stage=attn_out,factor=1.05"):
        tag = spec.split(":")[0]
        run_step(f"inject {tag}", ["-q", "check", str(TINY), "--suite", "tiny", "--store", store, "--device", device,
                                   "--inject", spec, "--force", "--json", str(out / f"inject_{tag}.json")], log, expect=(1,))
    return log


def heavy(out: Path, work: Path, layers: int, device: str, log: list[dict]) -> list[dict]:
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
    for dtype, extra in (("float32", []), ("bfloat16", []), ("bfloat16", ["--replay"])):
        tag = dtype + ("_replay" if extra else "")
        run_step(f"check {device} {tag}", ["-q", "check", str(model), "--suite", "heavy", "--store", str(store),
                                           "--device", device, "--dtype", dtype, *extra,
                                           "--force", "--json", str(out / f"heavy_{tag}.json"),
                                           "--html", str(out / f"heavy_{tag}.html")], log, expect=(0, 1))
    return log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_step":
        return _step(argv[1], argv[3:])
    p = argparse.ArgumentParser(prog="python -m moesnap.sessions")
    p.add_argument("session", choices=("check_gpu", "heavy"))
    p.add_argument("--out", default="out", help="reports and the timing summary go here")
    p.add_argument("--work", default=None, help="where the full-size model and its goldens are made (heavy)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--store", default=str(ROOT / "goldens"))
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a dry run of the session")
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOESNAP_NO_PROGRESS", "1")
    name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    log: list[dict] = [{"name": "machine", "device": name, "torch": torch.__version__, "cpus": os.cpu_count()}]
    summary = out / f"{a.session}_summary.json"
    os.environ["MOESNAP_SESSION_LOG"] = str(summary)
    try:
        if a.session == "check_gpu":
            check_gpu(out, a.store, a.device, log)
        else:
            work = Path(a.work or tempfile.mkdtemp(prefix="moesnap-heavy-"))
            work.mkdir(parents=True, exist_ok=True)
            heavy(out, work, a.layers, a.device, log)
    finally:
        summary.write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
