#!/usr/bin/env bash
# Eighth session's first GPU call (a baseline of main at its start): every GPU test, the 48-layer decode check
# benchmark in float32 and bfloat16 (issue 20), and the phases of an 8-layer bfloat16 decode check.
# Usage: bash tools/gpu_s8a.sh OUTDIR   (wheels carried in .whl/)
set -u
out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rs tests 2>&1 | tail -30 > "$out/pytest_gpu.txt"
tail -3 "$out/pytest_gpu.txt"
timeout 280 python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 --repeat 1 --no-graph \
    --work /tmp/bench48 2>&1 | tail -12 | tee "$out/bench_decode_check_48.txt"
rm -rf /tmp/bench48
timeout 100 python tools/time_decode.py --layers 8 --dtype bfloat16 --steps 32 2>&1 | cut -c1-200 \
    | tee "$out/time_decode_8.txt" | head -40
# a cProfile of the 8-layer bfloat16 prefill-only check (stage-local replay, the bf16 default) of time_decode's golden
timeout 90 python -m cProfile -o "$out/check8.prof" -m moesnap check /tmp/time-decode/q30-8.gguf --suite time \
    --store /tmp/time-decode/goldens --device cuda --dtype bfloat16 2>&1 | grep -E "^(judged|verdict|first)"
python -c "import pstats; p = pstats.Stats('$out/check8.prof'); p.sort_stats('cumtime').print_stats(35); \
p.sort_stats('tottime').print_stats(25)" 2>&1 | cut -c1-170 > "$out/check8_prof.txt"
