#!/usr/bin/env bash
# Issue 22, the device judge: one call on a GPU host, each step bounded so that what ran comes back.
#   1. the differential tests (numpy vs torch) on CUDA, and the committed goldens judged both ways
#   2. the judge alone at full width, 128 tokens x 2 layers: numpy vs torch on the GPU (bench_classify)
#   3. the whole-model table with both judges in one run, verdicts compared stage by stage (bench_check)
#   4. one forward per planted fault, its pairs judged both ways, timed, reports compared (bench_judge_parity)
# Usage: bash tools/gpu_devjudge.sh OUTDIR [LAYERS] [STEPS]   (STEPS: which of 1-4, default "1 2 3 4")
set -u
out=${1:?OUTDIR}; layers=${2:-48}; steps=${3:-"1 2 3 4"}
work=/tmp/moesnap-devjudge
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -3; fi
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for s in $steps; do case $s in
1) timeout 240 python -m pytest -q -p no:cacheprovider -rs tests/judge/test_device_judge.py 2>&1 | tail -8 \
       | tee "$out/pytest_device_judge.txt" ;;
2) timeout 180 python benchmarks/bench_classify.py --judge cpu,device 2>&1 | tee "$out/bench_classify.txt" ;;
3) timeout 540 python benchmarks/bench_check.py --layers "$layers" --judge cpu,device --work "$work" 2>&1 \
       | tee "$out/bench_check.txt" ;;
4) timeout 300 python benchmarks/bench_judge_parity.py "$work/qwen3-30b-a3b-${layers}l.gguf" --suite bench \
       --store "$work/goldens" --device cuda --dtype bfloat16 --inject scale:layer=7,stage=moe_out,factor=0.98 \
       --inject scale:layer=20,stage=attn_out,factor=1.02 2>&1 | tee "$out/judge_parity.txt" ;;
esac; done
