#!/usr/bin/env bash
# The round's last GPU call when little device time is left: every GPU test, then the 48-layer decode check
# benchmark in float32 and bfloat16 (issue 20).  Usage: bash tools/gpu_s8d.sh OUTDIR   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
timeout 140 python -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tail -40 > "$out/pytest_gpu.txt"
tail -3 "$out/pytest_gpu.txt"
timeout 300 python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 --repeat 1 --no-graph \
    --work /tmp/b48 2>&1 | tail -12 | tee "$out/bench_decode_check_48.txt"
