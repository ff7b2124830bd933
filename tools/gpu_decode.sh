#!/usr/bin/env bash
# A baseline GPU call for the decode check (issue 20): the GPU tests, the 48-layer decode check benchmark in
# float32 and bfloat16 (one golden), and a cProfile of an 8-layer bfloat16 decode check.
# Usage: bash tools/gpu_decode.sh OUTDIR   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -12 | tee "$out/pytest_gpu.txt"
timeout 300 python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 --repeat 1 --no-graph \
    --work /tmp/bench48 2>&1 | tail -12 | tee "$out/bench_decode_check_48.txt"
rm -rf /tmp/bench48
timeout 150 python tools/profile_decode.py --layers 8 --out "$out" 2>&1 | cut -c1-220 | tee "$out/profile_decode_8.txt" | head -40
