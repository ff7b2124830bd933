# Sourced by the tools/gpu_*.sh calls, with $out set: the carried wheels (.whl/) installed, the environment,
# the card, CPU count and commit written to $out/gpu.txt; and
#   gpu_tests_beside_make FILE LIMIT [PRESET LAYERS]
# runs `pytest -m gpu` (at most LIMIT seconds, into $out/pytest_gpu.txt) while FILE is made (default: the
# qwen3-30b-a3b shape at 48 layers; its time and peak memory into $out/make.txt).
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"

gpu_tests_beside_make() {
    local file=$1 limit=$2 preset=${3:-qwen3-30b-a3b} layers=${4:-48}
    mkdir -p "$(dirname "$file")"
    ( /usr/bin/time -f "make: %e s, %M KiB" python -m moesnap -q model make "$file" \
        --preset "$preset" --layers "$layers" ) > "$out/make.txt" 2>&1 &
    local mk=$!
    timeout "$limit" python -m pytest -q -m gpu -p no:cacheprovider -rs tests > "$out/pytest_gpu.txt" 2>&1
    tail -4 "$out/pytest_gpu.txt"; wait $mk; cat "$out/make.txt"
}
