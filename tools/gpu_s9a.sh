#!/usr/bin/env bash
# Ninth session's first GPU call, on one 48-layer 30B-A3B-shaped file made once: every GPU test (beside the
# model's making), issue 22's table with both judges (bench_check --no-compare), then issue 20's 48-layer decode
# rows in float32 and bfloat16 with what time is left.   Usage: bash tools/gpu_s9a.sh OUTDIR  (carry .whl)
set -u
t0=$SECONDS; out=${1:?OUTDIR}; mkdir -p "$out"
. tools/gpu_common.sh
W=/tmp/w48
gpu_tests_beside_make "$W/qwen3-30b-a3b-48l.gguf" 110
echo "at $((SECONDS-t0)) s"
ln -sf "$W/qwen3-30b-a3b-48l.gguf" "$W/qwen3-30b-a3b-48.gguf"
timeout 300 python benchmarks/bench_check.py --layers 48 --judge cpu,device --no-compare --work "$W" 2>&1 \
    | tee "$out/bench_check_48.txt"
left=$((${BUDGET:-580} - (SECONDS - t0))); echo "at $((SECONDS-t0)) s, $left s left"
[ $left -gt 60 ] && timeout $left python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 \
    --repeat 1 --no-graph --phases --work "$W" 2>&1 | tee "$out/bench_decode_check_48.txt"
echo "end at $((SECONDS-t0)) s"
