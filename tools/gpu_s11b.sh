# Eleventh session, second GPU call on the warm machine (~8 min): issue 20's 48-layer decode rows by phase
# (the file made by gpu_s11a.sh in /tmp/w48), then the heavy session at 8 layers (clean, faults, decode, graph).
# Usage: OUT=DIR bash tools/gpu_s11b.sh
set -u
t0=$SECONDS; out=$OUT; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git log --oneline -1; } | tee "$out/gpu.txt"
W=/tmp/w48; mkdir -p "$W"
timeout 330 python benchmarks/bench_decode_check.py --check-only --dtype float32,bfloat16 \
    --repeat 1 --no-graph --phases --work "$W" 2>&1 | tee "$out/bench_decode_check_48.txt"
echo "at $((SECONDS-t0)) s"
left=$((570 - (SECONDS - t0)))
timeout $left python tools/gpu_sessions.py heavy --layers 8 --no-engines --out "$out/heavy" --work /tmp/heavy8 \
    2>&1 | tail -40
echo "end at $((SECONDS-t0)) s"
