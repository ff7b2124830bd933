# Eleventh session, first GPU call (<= 9.5 min): the GPU tests beside the 48-layer file's making, issue 23's two
# full-shape presets not yet checked on a GPU (gpt-oss-20b with MXFP4 experts, DeepSeek-V2-Lite), then the heavy
# session at 4 layers with what time is left.
# Usage: OUT=DIR bash tools/gpu_s11a.sh   (wheels carried in .whl/; the 48-layer file stays in /tmp/w48)
set -u
t0=$SECONDS; out=$OUT; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
W=/tmp/w48; mkdir -p "$W"
( /usr/bin/time -f "make: %e s, %M KiB" python -m moesnap -q model make "$W/qwen3-30b-a3b-48.gguf" \
    --preset qwen3-30b-a3b --layers 48 ) > "$out/make.txt" 2>&1 &
mk=$!
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rs tests > "$out/pytest_gpu.txt" 2>&1
tail -4 "$out/pytest_gpu.txt"; wait $mk; cat "$out/make.txt"; echo "at $((SECONDS-t0)) s"
PRESETS="gpt-oss-20b deepseek-v2-lite" TIMEOUT=150 bash tools/gpu_s8c.sh "$out/s8c" 2
echo "at $((SECONDS-t0)) s"
left=$((570 - (SECONDS - t0)))
# the heavy session (clean, planted faults, decode, CUDA graph) at 4 full-width layers, with what time is left
timeout $left python tools/gpu_sessions.py heavy --layers 4 --no-engines --out "$out/heavy" --work /tmp/heavy4 \
    2>&1 | tail -40
echo "end at $((SECONDS-t0)) s"
