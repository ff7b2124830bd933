#!/usr/bin/env bash
# The round's last GPU call: the GPU tests, the heavy session (8 layers, planted faults), then the 48-layer
# decode benchmark (issue 20). Usage: bash tools/gpu_final.sh OUTDIR   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -12 | tee "$out/pytest_gpu.txt"
timeout 230 python tools/gpu_sessions.py heavy --layers 8 --no-engines --out /tmp/hv --work /tmp/heavy 2>&1 \
    | grep -E "^\[" | cut -c1-400 | tee "$out/heavy.txt"
cp /tmp/hv/heavy_summary.json "$out/" 2>/dev/null
rm -rf /tmp/heavy
timeout 230 python benchmarks/bench_decode_check.py --repeat 1 --no-graph --no-plain --work /tmp/bench48 2>&1 | tail -8 \
    | tee "$out/bench_decode_check_48.txt"
