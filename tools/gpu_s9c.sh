#!/usr/bin/env bash
# Issue 20's 48-layer decode rows on the file and --decode 32 golden a warm machine kept from gpu_s9a.sh
# (/tmp/w48; made again when absent): one prefill vs --decode 32, float32 then bfloat16, the decode row by phase.
set -u
t0=$SECONDS; out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
W=/tmp/w48; M=$W/qwen3-30b-a3b-48l.gguf
ls -la $W $W/goldens 2>&1 | head; nvidia-smi --query-gpu=name --format=csv,noheader
if [ ! -d $W/goldens/gen_decode1 ]; then
  timeout $((${BUDGET:-400} - 20)) python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 \
      --repeat 1 --no-graph --phases --work /tmp/w48b 2>&1 | tee "$out/decode48.txt"; exit
fi
timeout $((${BUDGET:-400} - (SECONDS - t0))) python - "$M" "$W/goldens" <<'PY' 2>&1 | tee "$out/decode48.txt"
import sys, time
sys.path.insert(0, "benchmarks")
from bench_decode_check import PhaseClock
import moesnap
from moesnap.judge.pool import case_processes, processes_by_default
processes_by_default()
m, store = sys.argv[1], sys.argv[2]
print(f"48 layers, golden gen_decode1 (P=128, N=32), {case_processes()} judge processes", flush=True)
for dt in ("float32", "bfloat16"):
    kw = dict(store=store, device="cuda", dtype=dt, show_progress=False)
    t = time.perf_counter(); r = moesnap.check(m, "gen_decode1", **kw); a = time.perf_counter() - t
    print(f"{dt}: one prefill of P+N {a:.2f} s {r.verdict}", flush=True)
    with PhaseClock("cuda") as c:
        t = time.perf_counter(); r2 = moesnap.check(m, "gen_decode1", **kw, decode=32); b = time.perf_counter() - t
    cells = next(x for x in r2.summary().splitlines() if x.startswith("judged"))
    print(f"{dt}: prefill P + 32 decode steps {b:.2f} s {r2.verdict} ratio {b / a:.2f}x; {cells}", flush=True)
    print(c.table("    "), flush=True)
PY
echo "end at $((SECONDS-t0)) s"
