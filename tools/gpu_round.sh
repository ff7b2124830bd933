#!/usr/bin/env bash
# One call on a GPU host: install the carried wheels, then the GPU tests, the decode benchmarks and the heavy
# session, each bounded so that what ran comes back. Usage: bash tools/gpu_round.sh OUTDIR [LAYERS]
set -u
out=${1:?OUTDIR}; layers=${2:-8}
mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -3; python -c "import gguf, zarr; print(\"zarr\", zarr.__version__)"; export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
export MOESNAP_NO_PROGRESS=1
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -20 | tee "$out/pytest_gpu.txt"
timeout 100 python benchmarks/bench_decode.py --preset qwen3-30b-a3b --layers 4 --prompt 128 --steps 32 --dtype bfloat16 \
    --json "$out/bench_decode.json" 2>&1 | tail -12 | tee "$out/bench_decode.txt"
timeout 120 python benchmarks/bench_decode_check.py --preset qwen3-30b-a3b --layers 4 --prompt 128 --steps 32 \
    --dtype bfloat16 --repeat 2 --work /tmp/moesnap-bench 2>&1 | tail -8 | tee "$out/bench_decode_check.txt"
timeout 200 python tools/gpu_sessions.py heavy --layers "$layers" --no-faults --out "$out" --work /tmp/moesnap-heavy \
    2>&1 | grep -E "^\[|skipped|Error|error" | tail -30 | tee "$out/heavy.txt"
