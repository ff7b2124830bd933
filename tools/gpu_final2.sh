#!/usr/bin/env bash
# The round's last GPU call (seventh session, ~400 s of device time left): the GPU tests, then the 48-layer
# decode check benchmark (issue 20) in DTYPES (default float32).
# Usage: bash tools/gpu_final2.sh OUTDIR [DTYPES]   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; dtypes=${2:-float32}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 70 python -m pytest -q -m gpu -p no:cacheprovider -x tests 2>&1 | tail -14 | tee "$out/pytest_gpu.txt"
timeout 200 python benchmarks/bench_decode_check.py --check-only --dtype "$dtypes" --repeat 1 --no-graph \
    --work /tmp/bench48 2>&1 | tail -8 | tee "$out/bench_decode_check_48.txt"
