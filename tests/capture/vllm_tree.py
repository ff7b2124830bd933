"""vLLM's port of SGLang's dumper (``vllm/utils/debug_utils/dumper.py`` of vLLM's main branch, unmodified;
not in the vLLM 0.34.0 wheel) driven by a module tree named and called as vLLM's Qwen3-MoE
(``vllm/model_executor/models/qwen3_moe.py``), built from moesnap's weights.  Run as a script (a process
of its own: the stubbed ``vllm`` modules never reach the test process; one process per rank)::

    python tests/capture/vllm_tree.py OUT [--mode all|core] [--dtype bfloat16] [--tp 2] [--prompt 17]
        [--decode 2] [--warmup] [--fault LAYER] [--filter EXPR]

writes the dump into ``OUT/exp``.  The dumper's file is ``$MOESNAP_VLLM_DUMPER``.  The prompt is the
first ``--prompt`` tokens of the committed golden case0, each decode pass is fed the next golden token,
``--warmup`` runs another request first, ``--fault L`` scales the fused MoE's result of layer L by 1.05
between ``mlp.experts`` and ``mlp``'s output, ``--filter`` is ``DUMPER_FILTER``.

The tree follows vLLM's call pattern: the model runner calls ``model(input_ids=, positions=,
intermediate_tensors=, inputs_embeds=)`` by keyword (the dumper's core fields ``input_ids`` and
``positions`` come from there) and ``model.compute_logits(hidden_states[logits_indices])`` after it
(``logits_processor(lm_head, hidden_states)``: the last row of the request);
``Qwen3MoeForCausalLM.forward`` -> ``model(input_ids, positions, intermediate_tensors, inputs_embeds)``
-> ``embed_tokens``, ``layers.N(positions, hidden_states, residual)`` returning ``(hidden_states,
residual)``, ``norm(hidden_states, residual)``; in a layer ``input_layernorm`` (with the residual from
layer 1 on), ``self_attn(positions=, hidden_states=)`` (``qkv_proj`` column-parallel, ``q_norm``/``k_norm``
on ``[T, heads, D]``, ``rotary_emb(positions, q, k)``, ``attn(q, k, v)``, ``o_proj`` row-parallel reduced
inside), ``post_attention_layernorm(h, residual)``, ``mlp`` (``gate`` -> ``(logits, None)``,
``experts(hidden_states=, router_logits=)`` -> ``(None, fused)``: top-k inside, this EP rank's experts, a
partial sum; ``mlp`` all-reduces it).  No ``topk`` module.  Tensor parallel over gloo, expert parallel
over the same ranks (``--enable-expert-parallel``), vocabulary-parallel lm head gathered.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sglang_tree import CASE0, MODEL, REPO, Linear, RadixAttention, RMSNorm, RotaryEmbedding  # noqa: E402

PAR = {"rank": 0, "size": 1}
CTX: dict[str, torch.Tensor] = {}          # vLLM's forward context: this pass's positions
VLLM = "vllm.model_executor.models.qwen3_moe"


def dumper_path() -> Path | None:
    """``$MOESNAP_VLLM_DUMPER`` where it names a file, else None (the vLLM wheels lack the dumper)."""
    env = os.environ.get("MOESNAP_VLLM_DUMPER")
    return Path(env) if env and Path(env).is_file() else None


class _Group:
    def __init__(self, rank: int, size: int) -> None:
        self.rank_in_group, self.world_size = rank, size


def _not_initialized():
    raise AssertionError("group is not initialized")


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load_dumper(path: Path):
    """vLLM's dumper module, loaded from ``path`` with the vLLM modules it imports stubbed."""
    for name in ("vllm", "vllm.distributed", "vllm.v1", "vllm.v1.worker", "vllm.v1.worker.gpu", "vllm.utils",
                 "vllm.utils.debug_utils"):
        _module(name)
    tp = lambda: _Group(PAR["rank"], PAR["size"])          # noqa: E731
    one = lambda: _Group(0, 1)                             # noqa: E731
    _module("vllm.distributed.parallel_state", get_tp_group=tp, get_pp_group=one, get_dp_group=one,
            get_ep_group=tp, get_etp_group=_not_initialized, get_dcp_group=one, get_pcp_group=one)
    _module("vllm.platforms", current_platform=types.SimpleNamespace(device_type="cpu"))
    _module("vllm.config", get_current_vllm_config=lambda: types.SimpleNamespace(
        model_config=types.SimpleNamespace(tokenizer=str(MODEL))))
    _module("vllm.sequence", IntermediateTensors=type("IntermediateTensors", (), {}))
    _module("vllm.v1.worker.gpu.input_batch", InputBatch=type("InputBatch", (), {}))
    spec = importlib.util.spec_from_file_location("vllm.utils.debug_utils.dumper", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if PAR["size"] > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


class RowParallelLinear(Linear):
    """``o_proj``: this rank's input columns, the partial products summed inside (reduce_results=True)."""

    def forward(self, x: torch.Tensor):
        return _all_reduce(x @ self.weight.T), None


class Attention(RadixAttention):
    """vLLM's ``Attention(q, k, v)``: positions and the KV cache come from the forward context."""

    def forward(self, q, k, v):
        return super().forward(q, k, v, types.SimpleNamespace(positions=CTX["positions"]))


class Qwen3MoeAttention(nn.Module):
    def __init__(self, cfg, w, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        r, n = PAR["rank"], PAR["size"]
        D = cfg.head_dim
        self.head_dim, self.num_heads, self.num_kv_heads = D, cfg.n_head // n, cfg.n_head_kv // n
        q = w.wq.view(cfg.n_head, D, -1)[r * self.num_heads:(r + 1) * self.num_heads].reshape(-1, cfg.hidden)
        k = w.wk.view(cfg.n_head_kv, D, -1)[r * self.num_kv_heads:(r + 1) * self.num_kv_heads].reshape(-1, cfg.hidden)
        v = w.wv.view(cfg.n_head_kv, D, -1)[r * self.num_kv_heads:(r + 1) * self.num_kv_heads].reshape(-1, cfg.hidden)
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.qkv_proj = Linear(torch.cat([q, k, v]))
        self.o_proj = RowParallelLinear(w.wo[:, r * self.q_size:(r + 1) * self.q_size])
        self.rotary_emb = RotaryEmbedding(D, cfg.rope_base, dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, D, layer)
        self.q_norm = RMSNorm(w.q_norm, cfg.rms_eps)
        self.k_norm = RMSNorm(w.k_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q_by_head = self.q_norm(q.view(*q.shape[:-1], q.shape[-1] // self.head_dim, self.head_dim))
        q = q_by_head.view(q.shape)
        k_by_head = self.k_norm(k.view(*k.shape[:-1], k.shape[-1] // self.head_dim, self.head_dim))
        k = k_by_head.view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class SharedFusedMoE(nn.Module):
    """Routing (softmax, top-k, renormalised) and this EP rank's experts: ``(shared_out, fused_out)``."""

    def __init__(self, cfg, w, dtype: torch.dtype) -> None:
        super().__init__()
        per = cfg.n_expert // PAR["size"]
        self.lo, self.hi, self.top_k = PAR["rank"] * per, (PAR["rank"] + 1) * per, cfg.n_expert_used
        self.bank, self.dtype = w.experts, dtype

    def forward(self, hidden_states, router_logits):
        probs = torch.softmax(router_logits.float(), dim=-1)
        wts, ids = torch.topk(probs, self.top_k, dim=-1)
        wts = (wts / wts.sum(-1, keepdim=True)).to(hidden_states.dtype)
        out = torch.zeros_like(hidden_states)
        for e in range(self.lo, self.hi):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                gate, up, down = (t.to(self.dtype) for t in self.bank.expert(e))
                x = hidden_states[tok]
                out[tok] += (F.silu(x @ gate.T) * (x @ up.T)) @ down.T * wts[tok, slot][:, None]
        return None, out


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg, w, layer: int, dtype: torch.dtype, fault: int | None) -> None:
        super().__init__()
        self.gate = Linear(w.router.to(dtype))
        self.experts = SharedFusedMoE(cfg, w, dtype)
        self.fault = fault == layer

    def forward(self, hidden_states):
        router_logits, _ = self.gate(hidden_states)
        shared_out, fused_out = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        final = fused_out
        if self.fault:                                  # a bug inside the fused MoE, after the experts
            final = final * 1.05
        return _all_reduce(final)                      # maybe_all_reduce_tensor_model_parallel


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer: int, dtype: torch.dtype, fault: int | None) -> None:
        super().__init__()
        self.self_attn = Qwen3MoeAttention(cfg, w, layer, dtype)
        self.mlp = Qwen3MoeSparseMoeBlock(cfg, w, layer, dtype, fault)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class VocabParallelEmbedding(nn.Embedding):
    pass


class Qwen3MoeModel(nn.Module):
    def __init__(self, weights, dtype: torch.dtype, fault: int | None) -> None:
        super().__init__()
        cfg = weights.config
        self.embed_tokens = VocabParallelEmbedding.from_pretrained(weights.dense("token_embd", dtype))
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, weights.layer(i, dtype), i, dtype, fault)
                                    for i in range(cfg.n_layer))
        self.norm = RMSNorm(weights.dense("output_norm", dtype), cfg.rms_eps)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class ParallelLMHead(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        per = weight.shape[0] // PAR["size"]
        self.weight = nn.Parameter(weight[PAR["rank"] * per:(PAR["rank"] + 1) * per], requires_grad=False)


class LogitsProcessor(nn.Module):
    def forward(self, lm_head, hidden_states):
        part = hidden_states @ lm_head.weight.T                    # this rank's vocabulary slice
        if PAR["size"] > 1:
            parts = [torch.empty_like(part) for _ in range(PAR["size"])]
            torch.distributed.all_gather(parts, part.contiguous())
            part = torch.cat(parts, dim=-1)
        return part


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, weights, dtype: torch.dtype, fault: int | None) -> None:
        super().__init__()
        self.model = Qwen3MoeModel(weights, dtype, fault)
        self.lm_head = ParallelLMHead(weights.dense("output", dtype))
        self.logits_processor = LogitsProcessor()

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states):
        return self.logits_processor(self.lm_head, hidden_states)


for _cls in (RowParallelLinear, Attention, Qwen3MoeAttention, SharedFusedMoE, Qwen3MoeSparseMoeBlock,
             Qwen3MoeDecoderLayer, VocabParallelEmbedding, Qwen3MoeModel, ParallelLMHead, LogitsProcessor,
             Qwen3MoeForCausalLM):
    _cls.__module__ = VLLM          # what the dumper's vLLM plugin looks at (convert_value)


def serve(rank: int, args: argparse.Namespace) -> None:
    """One rank: the dumper configured from the environment, the tree, the passes."""
    if args.tp > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=rank, world_size=args.tp)
    PAR.update(rank=rank, size=args.tp)
    os.environ.update(DUMPER_ENABLE="1", DUMPER_DIR=str(args.out), DUMPER_EXP_NAME="exp",
                      DUMPER_ENABLE_OUTPUT_CONSOLE="0", DUMPER_COLLECTIVE_TIMEOUT="30",
                      DUMPER_NON_INTRUSIVE_MODE=args.mode)
    if args.filter:
        os.environ["DUMPER_FILTER"] = args.filter
    dumper = load_dumper(Path(args.dumper)).dumper
    sys.path.insert(0, str(REPO / "src"))
    from moesnap.model.load import open_model
    from moesnap.store.case import load_case

    torch.set_grad_enabled(False)
    model = Qwen3MoeForCausalLM(open_model(MODEL), getattr(torch, args.dtype), args.fault)
    dumper.register_non_intrusive_dumper(model)
    tokens = torch.from_numpy(load_case(CASE0).tokens.astype("int64"))
    requests = [[(torch.tensor([1, 2, 3, 4, 5]), 0)]] if args.warmup else []
    requests.append([(tokens[:args.prompt], 0)] + [(tokens[p:p + 1], p)
                                                    for p in range(args.prompt, args.prompt + args.decode)])
    for passes in requests:
        for ids, start in passes:
            positions = torch.arange(start, start + ids.shape[0])
            CTX["positions"] = positions
            hidden = model(input_ids=ids, positions=positions, intermediate_tensors=None, inputs_embeds=None)
            model.compute_logits(hidden[-1:])                  # logits_indices: the request's last row
            dumper.step()
    if args.tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=("all", "core"), default="all")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt", type=int, default=19)
    p.add_argument("--decode", type=int, default=0)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--fault", type=int, default=None)
    p.add_argument("--filter", default=None)
    p.add_argument("--port", type=int, default=29651)
    args = p.parse_args(argv)
    found = dumper_path()
    if found is None:
        sys.exit("vLLM's dumper.py not found: set MOESNAP_VLLM_DUMPER to vllm/utils/debug_utils/dumper.py of "
                 "vLLM's main branch")
    args.dumper = str(found)
    torch.set_num_threads(1)
    if args.tp > 1:
        os.environ["MASTER_PORT"] = str(args.port)
        torch.multiprocessing.spawn(serve, args=(args,), nprocs=args.tp)
    else:
        serve(0, args)


if __name__ == "__main__":
    main()
