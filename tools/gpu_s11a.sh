# Eleventh session, first GPU call (<= 9.5 min): the GPU tests beside the 48-layer file's making, issue 23's two
# full-shape presets not yet checked on a GPU (gpt-oss-20b with MXFP4 experts, DeepSeek-V2-Lite), then the heavy
# session at 4 layers with what time is left.
# Usage: OUT=DIR bash tools/gpu_s11a.sh   (wheels carried in .whl/; the 48-layer file stays in /tmp/w48)
set -u
t0=$SECONDS; out=$OUT; mkdir -p "$out"
. tools/gpu_common.sh
W=/tmp/w48
gpu_tests_beside_make "$W/qwen3-30b-a3b-48.gguf" 150
echo "at $((SECONDS-t0)) s"
PRESETS="gpt-oss-20b deepseek-v2-lite" TIMEOUT=150 bash tools/gpu_s8c.sh "$out/s8c" 2
echo "at $((SECONDS-t0)) s"
left=$((570 - (SECONDS - t0)))
# the heavy session (clean, planted faults, decode, CUDA graph) at 4 full-width layers, with what time is left
timeout $left python tools/gpu_sessions.py heavy --layers 4 --no-engines --out "$out/heavy" --work /tmp/heavy4 \
    2>&1 | tail -40
echo "end at $((SECONDS-t0)) s"
