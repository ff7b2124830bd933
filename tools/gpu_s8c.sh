#!/usr/bin/env bash
# Issue 23's figures in one call: each family's full-shape preset (LAYERS layers, default 2, its own quant mix)
# made, its CPU reference golden generated (128 tokens + 8 decode steps), then checked on CUDA in float32,
# bfloat16, bfloat16 decode on a paged cache in a CUDA graph, and one planted fault in bfloat16 (each fault
# line says where the check must name it: the stage after "->").
# Usage: bash tools/gpu_s8c.sh OUTDIR [LAYERS]   (wheels carried in .whl/; PRESETS="..." for some of them)
# The same rows on the CPU (a rehearsal before a GPU call: the candidate's code is the same, --cuda-graph runs the
# static-buffer decode eagerly there): DEVICE=cpu TIMEOUT=900 PRESETS="gpt-oss-20b deepseek-v2-lite" bash ...
# TIMEOUT: seconds a check may run (default 120 on CUDA, 900 on the CPU; 0: no limit); WORK: where the GGUFs and
# stores go (deleted after each preset).  Each step's line gives its wall time and peak resident memory.
set -u
out=${1:?OUTDIR}; layers=${2:-2}
presets=${PRESETS:-"gpt-oss-20b deepseek-v2-lite qwen1.5-moe-a2.7b olmoe-1b-7b mixtral-8x7b"}
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then limit=${TIMEOUT:-120}; else limit=${TIMEOUT:-900}; fi
work=${WORK:-/tmp/moesnap-s8c}; mkdir -p "$out" "$work"
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
fi
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
else
    echo "$device: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" | tee "$out/gpu.txt"
fi
for p in $presets; do
    m="$work/$p.gguf"; s="$work/store-$p"
    echo "=== $p"
    vocab=$(python -c "from moesnap.model.synth import preset; print(preset('$p').config.vocab_size)") ||
        { echo "!! $p: no vocabulary size (not a preset, or moesnap not importable); skipped"; continue; }
    toks=$(python -c "import numpy as np; print(','.join(map(str, np.random.default_rng(0).integers(0, $vocab, 128))))")
    setup() {   # step name, then its command: its time line, or where it failed its error and the preset skipped
        local step=$1; shift
        { /usr/bin/time -f "$step %e s, peak %M KB" "$@"; } > "$work/$step.log" 2>&1
        local rc=$?
        if [ $rc -eq 0 ]; then tail -1 "$work/$step.log"; else
            tail -3 "$work/$step.log"; echo "!! $p: $step failed (exit $rc); its rows skipped"; fi
        return $rc
    }
    setup make python -m moesnap -q model make "$m" --preset "$p" --layers "$layers" --force || continue
    setup generate python -m moesnap -q goldens generate "$m" --suite f --store "$s" --tokens "$toks" --decode 8 ||
        { rm -rf "$m" "$s"; continue; }
    run() {   # name, then check options
        local name=$p-$1; shift
        { /usr/bin/time -f "wall %e s, peak %M KB" timeout "$limit" python -m moesnap check "$m" --suite f \
            --store "$s" --device "$device" --force "$@"; } > "$out/$name.txt" 2>&1
        echo "== $name: exit $? $(grep -E '^wall' "$out/$name.txt")"
        grep -E "^first divergence|^judged|^verdict|^note: candidate" "$out/$name.txt" | cut -c1-200
    }
    run float32 --dtype float32
    run bfloat16 --dtype bfloat16
    run decode-graph --dtype bfloat16 --decode 8 --paged --cuda-graph
    case $p in
        qwen*) f="shared_gate_off:layer=1->moe_out" ;;
        mixtral*) f="rope_flip:layer=1->q_rope" ;;
        olmoe*) f="qk_norm_flip:layer=1->q_norm" ;;
        gpt-oss*) f="sink_off:layer=1->attn" ;;
        deepseek*) f="shared_off:layer=1->moe_out" ;;
    esac
    at=${f#*layer=}
    echo "-- ${f%->*}: expected at layer ${at%%[,-]*}, stage ${f#*->}"
    run fault-bf16 --dtype bfloat16 --inject "${f%->*}"
    rm -rf "$m" "$s"
done 2>&1 | tee "$out/families.txt"
