#!/usr/bin/env bash
# The smallest useful GPU call (about five minutes of device time): every GPU test, then the 48-layer decode
# check benchmark in float32 alone (issue 20).  Usage: bash tools/gpu_s8e.sh OUTDIR   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tail -40 > "$out/pytest_gpu.txt"
tail -3 "$out/pytest_gpu.txt"
timeout 160 python benchmarks/bench_decode_check.py --check-only --dtype float32 --repeat 1 --no-graph \
    --work /tmp/b48 2>&1 | tail -8 | tee "$out/bench_decode_check_48.txt"
