#!/usr/bin/env bash
# One call on a GPU host for DeepSeek's candidate: the GPU tests of the family, then a DeepSeek-V2-Lite-shaped
# model (LAYERS layers, default 2: layer 0 dense, the rest MoE; Q4_K_M mix) checked on CUDA against a CPU
# reference golden -- float32, bfloat16 (the family's MLP stages take expert_out's row limit from the built-in
# tables: tests/run/test_check_deepseek.py says why), 8 decode steps on a paged cache in a CUDA graph, and the
# family's planted faults (V2-Lite has no correction bias and a routed scale of 1: shared_off is the fault
# that can fire there; bias_off and scale_off are run on the tiny V3 preset by the GPU tests).
# Usage: bash tools/gpu_deepseek.sh OUTDIR [LAYERS]   (wheels for gguf/zarr as tools/gpu_round.sh installs them)
set -u
out=${1:?OUTDIR}; layers=${2:-2}
work=/tmp/moesnap-deepseek; mkdir -p "$out" "$work"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -3; export PYTHONPATH=$PWD/src
export MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/model/test_candidate_deepseek.py \
    tests/run/test_check_deepseek.py 2>&1 | tail -12 | tee "$out/pytest_gpu.txt"
m="$work/lite.gguf"; s="$work/store"
toks=$(python -c "import numpy as np; print(','.join(map(str, np.random.default_rng(0).integers(0, 102400, 128))))")
{ time python -m moesnap model make "$m" --preset deepseek-v2-lite --layers "$layers" --force; } 2>&1 | tail -4 | tee "$out/make.txt"
{ time python -m moesnap goldens generate "$m" --suite lite --store "$s" --tokens "$toks" --decode 8; } 2>&1 \
    | tail -4 | tee "$out/generate.txt"
run() {   # name, then check options
    local name=$1; shift
    { time timeout 240 python -m moesnap check "$m" --suite lite --store "$s" --device cuda --json "$out/$name.json" \
        --force "$@"; } > "$out/$name.txt" 2>&1
    echo "== $name: exit $?"; grep -E "^first divergence|^judged|^verdict|^real" "$out/$name.txt"
}
run float32 --dtype float32
run bfloat16 --dtype bfloat16
run decode-graph --dtype bfloat16 --decode 8 --paged --cuda-graph
run decode-batch-f32 --dtype float32 --decode 8 --paged --batch
run shared_off --dtype bfloat16 --inject shared_off:layer=1
run shared_off-f32 --dtype float32 --inject shared_off:layer=1
