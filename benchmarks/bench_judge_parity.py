"""The numpy judge and the device judge on the same candidate cases: timed, and compared stage by stage.

For each run (clean, then each ``--inject`` spec alone) one ``moesnap.check``: the candidate runs once
(on ``--device``), and the pairs it made are judged twice, by numpy on the host's cores
(``judge="cpu"``) and by torch on the device (``judge="device"``, :mod:`moesnap.judge.device`), each
timed.  The two reports must agree: every stage's verdict, its detail and its margins' texts to the
precision they print (the rule of ``tests/judge/test_device_judge.py``), and the verdict line.  Exit 1
when any run disagrees.

On a GPU host, with the model and goldens ``bench_check.py --work DIR`` leaves behind (issue 22's
"verdicts identical between the CPU and device judges", clean and with planted faults)::

    python benchmarks/bench_judge_parity.py DIR/qwen3-30b-a3b-48l.gguf --suite bench --store DIR/goldens \\
        --device cuda --dtype bfloat16 --inject nan:layer=5,expert=3 \\
        --inject scale:layer=7,stage=moe_out,factor=0.98
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from unittest import mock

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)")


def same_text(a: str, b: str) -> bool:
    """Equal, or equal but for printed numbers within a unit of their 6th significant digit."""
    if a == b:
        return True
    na, nb = NUMBER.findall(a), NUMBER.findall(b)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b) or len(na) != len(nb):
        return False
    return all(x == y or math.isclose(float(x), float(y), rel_tol=2e-5) for x, y in zip(na, nb))


def differences(a, b) -> list[str]:
    """Where report ``b`` (device) differs from report ``a`` (numpy), one line each."""
    out = []
    if a.verdict != b.verdict:
        out.append(f"verdict {a.verdict} != {b.verdict}")
    for ca, cb in zip(list(a.cases) + list(a.replay or ()), list(b.cases) + list(b.replay or ())):
        for ra, rb in zip(ca.results, cb.results):
            where = f"{ca.case} / {ca.mode} / layer {ra.layer} / {ra.stage}"
            if ra.verdict != rb.verdict or not same_text(ra.result.detail, rb.result.detail):
                out.append(f"{where}: {ra.verdict.name} '{ra.result.detail}' != {rb.verdict.name} "
                           f"'{rb.result.detail}'")
            elif not all(same_text(x.text, y.text) for x, y in zip(ra.margins, rb.margins)):
                out.append(f"{where}: margins {[m.text for m in ra.margins]} != {[m.text for m in rb.margins]}")
    return out


def warm_up(device: str) -> None:
    """The device judge's first use (a CUDA context, its kernels loaded) outside the timings."""
    import numpy as np

    from moesnap.judge.classify import classify
    from moesnap.judge.device import JudgeDevice
    from moesnap.judge.tolerances import Tolerance

    x = np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64)
    for _ in range(2):
        classify(x, x * 1.001, Tolerance(1e-3, 1e-2, 0.01, 0.1), device=JudgeDevice(device, 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--suite", required=True)
    ap.add_argument("--store", default=None)
    ap.add_argument("--device", default=None, help="the candidate's device (default: cuda if any, else cpu)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--replay", action="store_true", default=None, help="stage-local replay in float32 too")
    ap.add_argument("--inject", action="append", default=[], help="a planted fault, judged in a run of its own")
    a = ap.parse_args(argv)
    import torch

    import moesnap
    import moesnap.run.check as run_check
    from moesnap.errors import UsageError
    from moesnap.judge.suite import judge_suite

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warm_up(device)
    print(f"bench_judge_parity: {a.model} suite {a.suite}, candidate on {device} in {a.dtype}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    bad = 0
    for specs in [[]] + [[s] for s in a.inject]:
        seen: dict[str, float] = {}
        reports = {}

        def twice(pairs, policy, **kw):
            t0 = time.perf_counter()
            pairs = list(pairs)                       # the candidate's forwards (and replays)
            seen["forward"] = time.perf_counter() - t0
            for judge in ("cpu", "device"):
                t0 = time.perf_counter()
                reports[judge] = judge_suite(pairs, policy, **{**kw, "judge": judge})
                if judge == "device" and device.startswith("cuda"):
                    torch.cuda.synchronize()
                seen[judge] = time.perf_counter() - t0
            return reports["cpu"]

        name = ", ".join(specs) or "clean"
        try:
            with mock.patch.object(run_check, "judge_suite", twice):
                moesnap.check(a.model, a.suite, store=a.store, device=device, dtype=a.dtype, replay=a.replay,
                              inject=specs, show_progress=False)
        except UsageError as e:
            print(f"  {name}: refused: {e}")
            continue
        diff = differences(reports["cpu"], reports["device"])
        bad += bool(diff)
        print(f"  {name:<44} forward {seen['forward']:7.2f} s   numpy judge {seen['cpu']:7.2f} s   "
              f"device judge {seen['device']:7.2f} s   verdict {reports['cpu'].verdict}/{reports['device'].verdict}"
              f"   {'identical' if not diff else f'{len(diff)} DIFFERENCES'}")
        for line in diff[:10]:
            print(f"    {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
