# Eleventh session, second GPU call on the warm machine (~8 min): issue 20's 48-layer decode rows by phase
# (the file made by gpu_s11a.sh in /tmp/w48), then issue 22's
# check with the layer pipeline on and off (the device judge), with what time is left.
# Usage: OUT=DIR [BUDGET=seconds, default 570] bash tools/gpu_s11b.sh
set -u
t0=$SECONDS; out=$OUT; mkdir -p "$out"
. tools/gpu_common.sh
W=/tmp/w48; mkdir -p "$W"
limit=${BUDGET:-570}
timeout $((limit < 330 ? limit : 330)) python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 \
    --repeat 1 --no-graph --phases --work "$W" 2>&1 | tee "$out/bench_decode_check_48.txt"
echo "at $((SECONDS-t0)) s"
left=$((limit - (SECONDS - t0)))
[ $left -gt 30 ] || { echo "no time left for the pipeline rows"; exit 0; }
# issue 22: the float32 check of the same 48-layer file with the layer pipeline on and off, the device judge
mkdir -p /tmp/w48b; ln -sf "$W/qwen3-30b-a3b-48.gguf" /tmp/w48b/qwen3-30b-a3b-48l.gguf
timeout $left python benchmarks/bench_check.py --layers 48 --judge device --pipeline 1,0 --no-compare \
    --work /tmp/w48b 2>&1 | tail -30
echo "end at $((SECONDS-t0)) s"
