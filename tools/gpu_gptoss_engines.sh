#!/usr/bin/env bash
# gpt-oss through transformers on a GPU host, at the gpt-oss-20b shape: goldens of a LAYERS-layer
# gpt-oss-20b file (the CPU reference), transformers' GptOssForCausalLM traced on CUDA in bfloat16 and
# float32 (a prefill, and 8 decode steps through its own cache fed the golden's continuation), each judged by `moesnap compare`
# (free-running with gpt-oss's own tolerances, and by local re-reference).
# Usage: bash tools/gpu_gptoss_engines.sh OUTDIR [LAYERS]   (after the carried wheels are installed, as
# tools/gpu_round.sh does; ~3 GB of disk for 4 layers)
# PRESET=gpt-oss-tiny DEVICE=cpu runs the same steps on a CPU in a minute (a dry run).
# Any family's preset runs the same way through its transformers model: PRESET=deepseek-v2-lite,
# qwen1.5-moe-a2.7b, mixtral-8x7b or olmoe-1b-7b (deepseek-v3-tiny, qwen2-moe-tiny... DEVICE=cpu: dry runs).
set -u
out=${1:?OUTDIR}; layers=${2:-4}; preset=${PRESET:-gpt-oss-20b}; device=${DEVICE:-cuda}
mkdir -p "$out"; export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1
work=/tmp/moesnap-gptoss; rm -rf "$work"; mkdir -p "$work"
python -c "import transformers; print('transformers', transformers.__version__)" | tee "$out/versions.txt"
timeout 120 python -m moesnap -q model make "$work/g.gguf" --preset "$preset" --layers "$layers" | tee "$out/make.txt"
prompt=$(python -c "
import numpy as np; from moesnap.model.load import open_model
v = open_model('$work/g.gguf').config.vocab_size
print(','.join(map(str, [1] + np.random.default_rng(7).integers(3, v, 63).tolist())))")
/usr/bin/time -v timeout 300 python -m moesnap -q goldens generate "$work/g.gguf" --suite g --store "$work/st" \
    --tokens "$prompt" 2> "$out/generate.time" | tail -3 | tee "$out/generate.txt"
timeout 200 python -m moesnap -q goldens generate "$work/g.gguf" --suite dec --store "$work/st" --tokens "$prompt" \
    --decode 8 | tail -2 | tee -a "$out/generate.txt"
cont=$(python -c "
from moesnap.store import open_store
t = open_store('$work/st').open_version('dec').read_case('case0').tokens.tolist(); print(','.join(map(str, t[64:])))")
for dt in bfloat16 float32; do
  mkdir -p "$work/$dt"
  /usr/bin/time -v timeout 300 python -m moesnap -q trace "$work/g.gguf" --tokens "$prompt" --engine transformers \
      --device "$device" --dtype "$dt" --out "$work/$dt/case0" 2> "$out/trace-$dt.time" | tail -2 | tee "$out/trace-$dt.txt"
  timeout 300 python -m moesnap compare g "$work/$dt" --store "$work/st" --allow-missing --json "$out/compare-$dt.json" \
      2>&1 | grep -E "^(first|judged|verdict|note: tolerances)" | tee "$out/compare-$dt.txt"
  timeout 300 python -m moesnap -q trace "$work/g.gguf" --tokens "$prompt" --engine transformers --device "$device" \
      --dtype "$dt" --decode 8 --continuation "$cont" --out "$work/$dt-dec" | tail -1
  mkdir -p "$work/$dt-decg"; mv "$work/$dt-dec" "$work/$dt-decg/case0"
  timeout 300 python -m moesnap compare dec "$work/$dt-decg" --store "$work/st" --allow-missing \
      --json "$out/compare-dec-$dt.json" 2>&1 | grep -E "^(first|judged|verdict)" | tee "$out/compare-dec-$dt.txt"
done
