#!/usr/bin/env bash
# Ninth session's second GPU call: the heavy session at 8 layers (issue 20's decode/paged/graph/fault rows on the
# candidate, issue 22's verdicts), then issue 23's full-shape family presets (tools/gpu_s8c.sh) with what is left.
# Usage: bash tools/gpu_s9b.sh OUTDIR   (carry .whl)
set -u
t0=$SECONDS; out=${1:?OUTDIR}; mkdir -p "$out"
python -m pip install -q --no-deps .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=$PWD/src MOESNAP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; git log --oneline -1; } | tee "$out/gpu.txt"
timeout ${HEAVY_S:-260} python tools/gpu_sessions.py heavy --layers 8 --no-engines --out /tmp/heavy \
    --work /tmp/heavy-work > "$out/heavy.txt" 2>&1
echo "heavy exit $? at $((SECONDS-t0)) s"; grep -E '^\[|^\{' "$out/heavy.txt" | cut -c1-220 | tail -30
left=$((575 - (SECONDS - t0))); echo "$left s left for the families"
[ $left -gt 60 ] && timeout $left bash tools/gpu_s8c.sh /tmp/fam 2 > /dev/null 2>&1
cp /tmp/fam/families.txt "$out/" 2>/dev/null; cat "$out/families.txt" 2>/dev/null; echo "end at $((SECONDS-t0)) s"
