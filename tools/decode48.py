"""Issue 20's decode rows on an existing file and ``gen_decode1`` golden (tools/gpu_s9c.sh): one prefill of
P+N vs prefill P + 32 decode steps, float32 then bfloat16, the decode row split by phase.

    python tools/decode48.py MODEL STORE
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def main() -> None:
    from bench_decode_check import PhaseClock

    import moesnap
    from moesnap.judge.pool import case_processes, processes_by_default

    processes_by_default()
    m, store = sys.argv[1], sys.argv[2]
    print(f"golden gen_decode1 (P=128, N=32), {case_processes()} judge processes", flush=True)
    for dt in ("float32", "bfloat16"):
        kw = dict(store=store, device="cuda", dtype=dt, show_progress=False)
        t = time.perf_counter()
        r = moesnap.check(m, "gen_decode1", **kw)
        a = time.perf_counter() - t
        print(f"{dt}: one prefill of P+N {a:.2f} s {r.verdict}", flush=True)
        with PhaseClock("cuda") as c:
            t = time.perf_counter()
            r2 = moesnap.check(m, "gen_decode1", **kw, decode=32)
            b = time.perf_counter() - t
        cells = next(x for x in r2.summary().splitlines() if x.startswith("judged"))
        print(f"{dt}: prefill P + 32 decode steps {b:.2f} s {r2.verdict} ratio {b / a:.2f}x; {cells}", flush=True)
        print(c.table("    "), flush=True)


if __name__ == "__main__":
    main()
