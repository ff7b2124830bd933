#!/usr/bin/env bash
# One call on a GPU host for the candidate of Qwen2-MoE, Mixtral and OLMoE (issue 23): the GPU tests of the three
# families, then each full-shape preset (qwen1.5-moe-a2.7b, mixtral-8x7b, olmoe-1b-7b: LAYERS layers, default 2,
# in their Q4_K_M mixes) checked on CUDA against a CPU reference golden of 128 tokens and 8 decode steps --
# float32, bfloat16, the decode steps on a paged cache in a CUDA graph (bfloat16), and the family's planted
# faults in bfloat16 and float32, each line saying where the check names it (expected: the stage after "->").
# Usage: bash tools/gpu_families3.sh OUTDIR [LAYERS]   (wheels for gguf/zarr as tools/gpu_round.sh installs them)
#   PRESETS="mixtral-8x7b" for some of them (one preset per call if the three do not fit a call's time);
#   DEVICE=cpu PRESETS="qwen2-moe-tiny mixtral-tiny olmoe-tiny" is a dry run on a CPU host (no GPU tests).
set -u
out=${1:?OUTDIR}; layers=${2:-2}
device=${DEVICE:-cuda}; presets=${PRESETS:-"qwen1.5-moe-a2.7b mixtral-8x7b olmoe-1b-7b"}
work=/tmp/moesnap-families3; mkdir -p "$out" "$work"
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
if [ "$device" = cuda ]; then
    python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -3
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/model/test_candidate_llama_like.py \
        tests/run/test_check_llama_like.py 2>&1 | tail -12 | tee "$out/pytest_gpu.txt"
fi
for p in $presets; do
    m="$work/$p.gguf"; s="$work/store-$p"
    vocab=$(python -c "from moesnap.model.synth import preset; print(preset('$p').config.vocab_size)")
    toks=$(python -c "import numpy as np; print(','.join(map(str, np.random.default_rng(0).integers(0, $vocab, 128))))")
    { time python -m moesnap model make "$m" --preset "$p" --layers "$layers" --force; } 2>&1 | tail -4 \
        | tee "$out/$p-make.txt"
    rm -rf "$s"
    { time python -m moesnap goldens generate "$m" --suite f3 --store "$s" --tokens "$toks" --decode 8; } 2>&1 \
        | tail -4 | tee "$out/$p-generate.txt"
    run() {   # name, then check options
        local name=$p-$1; shift
        { time timeout 240 python -m moesnap check "$m" --suite f3 --store "$s" --device "$device" \
            --json "$out/$name.json" --force "$@"; } > "$out/$name.txt" 2>&1
        echo "== $name: exit $?"; grep -E "^first divergence|^judged|^verdict|^real" "$out/$name.txt"
    }
    run float32 --dtype float32
    run bfloat16 --dtype bfloat16
    run decode-graph --dtype bfloat16 --decode 8 --paged --cuda-graph
    case $p in
        qwen*) faults="shared_gate_off:layer=1->moe_out shared_off:layer=0->moe_out renorm_flip:layer=1->topk_weights" ;;
        mixtral*) faults="rope_flip:layer=1->q_rope renorm_flip:layer=1->topk_weights" ;;
        *) faults="qk_norm_flip:layer=1->q_norm renorm_flip:layer=0->topk_weights rope_flip:layer=0->q_rope" ;;
    esac
    for f in $faults; do
        spec=${f%->*}; kind=${spec%%:*}
        echo "-- $spec -> layer ${spec##*=} ${f#*->}"
        run "$kind-bf16" --dtype bfloat16 --inject "$spec"
        run "$kind-f32" --dtype float32 --inject "$spec"
    done
done
