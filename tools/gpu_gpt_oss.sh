#!/usr/bin/env bash
# One call on a GPU host for gpt-oss's candidate: the GPU tests of the family, then a gpt-oss-20b-shaped model
# (LAYERS layers, default 4: layers 0 and 2 slide over 128 positions) checked on CUDA against a CPU reference
# golden -- float32, bfloat16, 8 decode steps on a paged cache in a CUDA graph, and the family's planted faults.
# Usage: bash tools/gpu_gpt_oss.sh OUTDIR [LAYERS]   (wheels for gguf/zarr as tools/gpu_round.sh installs them)
set -u
out=${1:?OUTDIR}; layers=${2:-4}
work=/tmp/moesnap-gpt-oss; mkdir -p "$out" "$work"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -3; export PYTHONPATH=$PWD/src
export MOESNAP_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/gguf/test_quants_torch.py \
    tests/model/test_candidate_gpt_oss.py tests/run/test_check_gpt_oss.py 2>&1 | tail -12 | tee "$out/pytest_gpu.txt"
m="$work/g20.gguf"; s="$work/store"
toks=$(python -c "import numpy as np; print(','.join(map(str, np.random.default_rng(0).integers(0, 201088, 160))))")
{ time python -m moesnap model make "$m" --preset gpt-oss-20b --layers "$layers" --force; } 2>&1 | tail -4 | tee "$out/make.txt"
{ time python -m moesnap goldens generate "$m" --suite g20 --store "$s" --tokens "$toks" --decode 8; } 2>&1 \
    | tail -4 | tee "$out/generate.txt"
run() {   # name, then check options
    local name=$1; shift
    { time timeout 240 python -m moesnap check "$m" --suite g20 --store "$s" --device cuda --json "$out/$name.json" \
        --force "$@"; } > "$out/$name.txt" 2>&1
    echo "== $name: exit $?"; grep -E "^first divergence|^judged|^verdict|^real" "$out/$name.txt"
}
run float32 --dtype float32
run bfloat16 --dtype bfloat16
run decode-graph --dtype bfloat16 --decode 8 --paged --cuda-graph
run sink_off --dtype bfloat16 --inject sink_off:layer=1
run window --dtype bfloat16 --inject window:layer=2
run mxfp4_scale --dtype bfloat16 --inject mxfp4_scale:layer=1,tensor=ffn_down_exps
run sink_off-f32 --dtype float32 --inject sink_off:layer=1
run window-f32 --dtype float32 --inject window:layer=0,by=-1
run mxfp4_scale-f32 --dtype float32 --inject mxfp4_scale:layer=1,tensor=ffn_up_exps
