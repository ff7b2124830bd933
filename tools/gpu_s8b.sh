#!/usr/bin/env bash
# Eighth session's measuring call: every GPU test, the 48-layer decode check benchmark in float32 and bfloat16
# (issue 20), and 48-layer golden generation against the tree before this session's generation changes
# (issue 22; the baseline's src carried in out/gen-baseline).
# Usage: bash tools/gpu_s8b.sh OUTDIR   (wheels carried in .whl/, out/gen-baseline carried)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
timeout 130 python -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tail -40 > "$out/pytest_gpu.txt"
tail -3 "$out/pytest_gpu.txt"
timeout 270 python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 --repeat 1 --no-graph \
    --work /tmp/b48 2>&1 | tail -12 | tee "$out/bench_decode_check_48.txt"
rm -rf /tmp/b48/goldens; ln -sf /tmp/b48/qwen3-30b-a3b-48.gguf /tmp/b48/qwen3-30b-a3b-48l.gguf
timeout 150 python benchmarks/bench_generate.py --layers 48 --repeat 1 --baseline out/gen-baseline/src \
    --work /tmp/b48 2>&1 | tail -25 | tee "$out/bench_generate_48.txt"
