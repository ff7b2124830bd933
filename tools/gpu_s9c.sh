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
timeout $((${BUDGET:-400} - (SECONDS - t0))) python tools/decode48.py "$M" "$W/goldens" 2>&1 | tee "$out/decode48.txt"
echo "end at $((SECONDS-t0)) s"
