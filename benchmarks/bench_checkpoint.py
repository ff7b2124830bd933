"""Peak memory of tracing an HF checkpoint against the same weights as a GGUF (issue 12).

For each layer count (default 2 and 8; full-width qwen3-30b-a3b shape: hidden 2048, 128 experts of
768, vocabulary 151936) a synthetic GGUF is made, its weights written as a bfloat16 HF checkpoint (one
shard per layer plus the embeddings and head, and an index, streamed tensor by tensor), and
``moesnap trace`` runs the reference over 32 tokens on each, in a child process whose peak resident
memory (ru_maxrss) is read.  Printed: both peaks, their ratio, and the peak's growth from the first to
the last layer count (it should not grow with depth: one layer's weights at a time).

    python benchmarks/bench_checkpoint.py [--layers 2,8] [--preset qwen3-30b-a3b] [--work DIR]

``--preset tiny`` runs in seconds (what ``nox -s bench`` does by default with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moesnap.model.synth import make_model, preset
from moesnap.model.weights import GGUFModel

HF = {"attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
      "attn_v": "self_attn.v_proj.weight", "attn_output": "self_attn.o_proj.weight",
      "attn_q_norm": "self_attn.q_norm.weight", "attn_k_norm": "self_attn.k_norm.weight",
      "ffn_norm": "post_attention_layernorm.weight", "ffn_gate_inp": "mlp.gate.weight"}
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def _bf16(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy().tobytes()


def _shard(path: Path, items: list[tuple[str, tuple[int, ...], callable]]) -> None:
    """Write one safetensors file, producing each tensor only when its turn comes."""
    header, pos = {}, 0
    for name, shape, _ in items:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, _, make in items:
            f.write(make())


def write_checkpoint(gguf: Path, out: Path) -> Path:
    m = GGUFModel.open(gguf)
    c = m.config
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": c.hidden,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head_kv,
        "head_dim": c.head_dim, "num_experts": c.n_expert, "num_experts_per_tok": c.n_expert_used,
        "moe_intermediate_size": c.expert_ff, "vocab_size": c.vocab_size, "rope_theta": c.rope_base,
        "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.context_length, "norm_topk_prob": True}))
    n = c.n_layer + 1
    weight_map = {}

    def dense(name):
        return lambda: _bf16(m.dense(name))

    def expert(layer, tensor, e):
        return lambda: _bf16(torch.from_numpy(m.expert_matrix(layer, tensor, e)))

    shards = [[("model.embed_tokens.weight", m.shape("token_embd"), dense("token_embd")),
               ("model.norm.weight", m.shape("output_norm"), dense("output_norm")),
               ("lm_head.weight", m.shape("output"), dense("output"))]]
    for i in range(c.n_layer):
        items = [(f"model.layers.{i}.{hf}", m.shape(f"blk.{i}.{ours}"), dense(f"blk.{i}.{ours}")) for ours, hf in HF.items()]
        for ours, hf in EXPERTS.items():
            shape = m.shape(f"blk.{i}.{ours}")[1:]
            items += [(f"model.layers.{i}.mlp.experts.{e}.{hf}.weight", shape, expert(i, ours, e))
                      for e in range(c.n_expert)]
        shards.append(items)
    for s, items in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        _shard(out / fname, items)
        weight_map.update({name: fname for name, _, _ in items})
        for i in range(c.n_layer):
            m.release_layer(i)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def peak_trace(model: Path, out: Path, tokens: str) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of ``moesnap trace`` in a child process."""
    code = ("import resource, sys; from moesnap.cli.main import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "-q", "trace", str(model), "--tokens", tokens, "--out", str(out),
                        "--force"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"trace {model} failed: {p.stderr[-2000:]}")
    kib = int(next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("PEAK")))
    return kib / 2**20, wall


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--work", default=None)
    ap.add_argument("--quick", action="store_true", help="the tiny preset, for nox -s bench")
    a, _ = ap.parse_known_args()
    name = "tiny" if a.quick else a.preset
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = ",".join(str(t) for t in np.random.default_rng(0).integers(3, 250, 32))
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        gguf = work / f"{name}-{layers}l.gguf"
        if not gguf.exists():
            make_model(gguf, preset(name, layers=layers), progress=False)
        ck = work / f"{name}-{layers}l-bf16"
        if not ck.exists():
            t0 = time.perf_counter()
            write_checkpoint(gguf, ck)
            print(f"wrote {ck} in {time.perf_counter() - t0:.1f} s", flush=True)
        g_peak, g_wall = peak_trace(gguf, work / "g.zarr", tokens)
        c_peak, c_wall = peak_trace(ck, work / "c.zarr", tokens)
        size = sum(f.stat().st_size for f in ck.glob("*.safetensors")) / 2**30
        rows.append((layers, g_peak, c_peak, g_wall, c_wall, size))
        print(f"{name} {layers} layers: trace GGUF peak {g_peak:.2f} GiB ({g_wall:.1f} s), checkpoint "
              f"({size:.1f} GiB bf16) peak {c_peak:.2f} GiB ({c_wall:.1f} s): checkpoint/GGUF peak "
              f"{c_peak / g_peak:.2f}x, time {c_wall / g_wall:.2f}x", flush=True)
    if len(rows) > 1:
        print(f"peak growth {rows[0][0]} -> {rows[-1][0]} layers: GGUF {rows[-1][1] / rows[0][1]:.2f}x, "
              f"checkpoint {rows[-1][2] / rows[0][2]:.2f}x (one layer at a time: ~1x)")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
