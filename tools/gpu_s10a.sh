set -u
t0=$SECONDS; out=$OUT; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
W=/tmp/w48; mkdir -p "$W"
( /usr/bin/time -f "make: %e s, %M KiB" python -m moesnap -q model make "$W/qwen3-30b-a3b-48.gguf" \
    --preset qwen3-30b-a3b --layers 48 ) > "$out/make.txt" 2>&1 &
mk=$!
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider -rs tests > "$out/pytest_gpu.txt" 2>&1
tail -4 "$out/pytest_gpu.txt"; wait $mk; cat "$out/make.txt"; echo "at $((SECONDS-t0)) s"
left=$((560 - (SECONDS - t0)))
timeout $left python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 \
    --repeat 1 --no-graph --phases --work "$W" 2>&1 | tee "$out/bench_decode_check_48.txt"
echo "end at $((SECONDS-t0)) s"
