"""SGLang's own dumper (sglang 0.5.23, ``sglang/srt/debug_utils/dumper.py``, unmodified) driven by a module
tree named and called as SGLang's Qwen3-MoE, built from moesnap's weights.  Run as a script (a process of
its own: the stubbed ``sglang`` modules never reach the test process, and tensor parallelism needs one
process per rank)::

    python tests/capture/sglang_tree.py OUT --mode all|core|patch [--dtype bfloat16] [--tp 2]
        [--prompt 17] [--decode 2] [--warmup] [--fault LAYER] [--fused-qk] [--fault-qk LAYER]
    python tests/capture/sglang_tree.py --each '["OUT1", ...]' '["OUT2", "--tp", "2", ...]' ...

writes the dump into ``OUT/exp``.  The prompt is the first ``--prompt`` tokens of the committed golden
case0, each decode pass is fed the next golden token (teacher-forced), ``--warmup`` runs another request
first (SGLang's HTTP server sends one at start), ``--fault L`` scales the fused MoE's result of layer L
by 1.05 between ``mlp.experts`` and ``mlp``'s output (inside the fused MoE).  ``--fused-qk`` applies q/k
norm and RoPE in one step that calls no module (SGLang on CUDA in bfloat16 fuses them into one kernel:
``q_norm``, ``k_norm``, ``rotary_emb`` are then absent from the dump); ``--fault-qk L`` (implies it) scales
the normed q of layer L by 1.05 inside that step.

The dumper's module is found in the installed ``sglang`` package (``pip install --no-deps
sglang==0.5.23``: pure Python) or at ``$MOESNAP_SGLANG_DUMPER``; only what its imports need of SGLang is
stubbed here (``runtime_context``, ``utils.get_device``, ``managers.io_struct``, ``distributed``,
``layers.dp_attention``, ``LogitsProcessorOutput``, ``ForwardBatch``, ``PPProxyTensors``, the layer
boundary's output types), as FINDINGS.md lists.  Its file writing is its own.

The tree follows SGLang's call pattern: ``Qwen3MoeForCausalLM.forward(input_ids, positions,
forward_batch)`` -> ``model`` (``embed_tokens``, ``layers.N(positions, hidden_states, forward_batch)``,
``norm``) -> ``logits_processor(input_ids, hidden_states, lm_head, forward_batch)``; in a layer
``input_layernorm``, ``self_attn(positions=, hidden_states=, forward_batch=)`` (``qkv_proj`` and
``o_proj`` returning ``(out, None)``, ``q_norm``/``k_norm`` on ``[T*heads, D]``, ``rotary_emb`` returning
``(q, k)``, ``attn`` with a KV cache), ``post_attention_layernorm(h, residual)`` returning ``(normed,
residual)``, ``mlp`` (``gate`` -> ``(logits, None)``, ``topk`` -> ``(weights, ids, logits)``, ``experts``).
Tensor parallel (gloo): q/k/v heads column-parallel, ``o_proj`` and the experts (by EP rank) partial sums
reduced after the module, vocabulary-parallel lm head gathered in the logits processor.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "src" / "moesnap" / "data" / "tiny.gguf"
CASE0 = REPO / "goldens" / "tiny" / "v0001" / "case0"


def dumper_path() -> Path | None:
    """Where SGLang's dumper.py is: ``$MOESNAP_SGLANG_DUMPER``, else in the installed sglang package
    (found without importing it), else None."""
    env = os.environ.get("MOESNAP_SGLANG_DUMPER")
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "srt" / "debug_utils" / "dumper.py"
    return p if p.is_file() else None


def require_dumper() -> Path:
    """SGLang's dumper.py, or the calling test skipped with what to install (it needs pyzmq too)."""
    import pytest

    path = dumper_path()
    if path is None:
        pytest.skip("sglang's dumper.py is not installed (pip install --no-deps sglang==0.5.23 pyzmq, or set "
                    "MOESNAP_SGLANG_DUMPER)")
    pytest.importorskip("zmq", reason="SGLang's dumper imports zmq (pip install pyzmq)")
    return path


# --------------------------------------------------------------------------- SGLang, stubbed


class LogitsProcessorOutput:
    def __init__(self, next_token_logits: torch.Tensor) -> None:
        self.next_token_logits = next_token_logits


class ForwardBatch:
    def __init__(self, input_ids, positions, seq_lens, req_pool_indices, rids) -> None:
        self.input_ids, self.positions, self.seq_lens = input_ids, positions, seq_lens
        self.req_pool_indices, self.rids = req_pool_indices, rids


class PPProxyTensors:
    tensors: dict = {}


class _Opaque:     # layer boundary outputs this tree never returns
    pass


class Parallel(NamedTuple):
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    moe_ep_rank: int = 0
    moe_ep_size: int = 1
    moe_tp_rank: int = 0
    moe_tp_size: int = 1
    moe_dp_rank: int = 0
    attn_tp_rank: int = 0
    attn_tp_size: int = 1
    attn_dp_rank: int = 0
    attn_dp_size: int = 1
    attn_cp_rank: int = 0
    attn_cp_size: int = 1


PARALLEL = [Parallel()]
#: ``--fused-qk``: q/k norm and RoPE in one kernel (no module called, as SGLang on CUDA in bfloat16), and
#: ``--fault-qk L``: that kernel's q norm off by 5 % at layer L
FUSED_QK: dict[str, object] = {"on": False, "fault": None}


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__path__ = []          # a package: submodules import
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load_dumper(path: Path):
    """SGLang's dumper module, loaded from ``path`` with its SGLang imports stubbed."""
    for name in ("sglang", "sglang.srt", "sglang.srt.managers", "sglang.srt.layers", "sglang.srt.model_executor",
                 "sglang.srt.debug_utils", "sglang.srt.layers.layer_boundary",
                 "sglang.srt.layers.layer_boundary.residual"):
        _module(name)
    _module("sglang.srt.managers.io_struct", sock_recv=None, sock_send=None, wrap_as_pickle=None)
    _module("sglang.srt.runtime_context", get_parallel=lambda: PARALLEL[0], get_server_args=lambda: None,
            get_serving=lambda: None)
    _module("sglang.srt.utils", get_device=lambda *a, **k: "cpu")
    _module("sglang.srt.distributed")
    _module("sglang.srt.layers.dp_attention", get_moe_cp_size=lambda: 1, is_dp_attention_enabled=lambda: False)
    _module("sglang.srt.layers.logits_processor", LogitsProcessorOutput=LogitsProcessorOutput)
    _module("sglang.srt.model_executor.forward_batch_info", ForwardBatch=ForwardBatch, PPProxyTensors=PPProxyTensors)
    _module("sglang.srt.layers.layer_boundary.output", UnreducedOutput=type("UnreducedOutput", (_Opaque,), {}))
    _module("sglang.srt.layers.layer_boundary.residual.stream", OwedOutput=type("OwedOutput", (_Opaque,), {}))
    spec = importlib.util.spec_from_file_location("sglang.srt.debug_utils.dumper", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- the module tree


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if PARALLEL[0].tp_size > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(weight, requires_grad=False), eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (out * self.weight.float()).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        residual = x + residual                   # SGLang's fused add + norm: (normed, new residual)
        return self._norm(residual), residual


class Linear(nn.Module):
    """SGLang's linear layers return (output, bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor):
        return x @ self.weight.T, None


class RotaryEmbedding(nn.Module):
    is_neox_style = True

    def __init__(self, head_dim: int, base: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim, self.base, self.dtype = head_dim, base, dtype

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        D = self.head_dim
        inv = 1.0 / (self.base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        ang = torch.outer(positions.to(torch.float64), inv)
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().to(self.dtype)[:, None, :], ang.sin().to(self.dtype)[:, None, :]

        def rot(x: torch.Tensor) -> torch.Tensor:
            x = x.view(positions.shape[0], -1, D)
            x1, x2 = x.chunk(2, -1)
            return (x * cos + torch.cat([-x2, x1], -1) * sin).reshape(positions.shape[0], -1)
        return rot(q), rot(k)


class RadixAttention(nn.Module):
    """Causal GQA over this request's KV cache (prefill fills it, a decode pass appends one row)."""

    def __init__(self, n_head: int, n_kv: int, head_dim: int, layer_id: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim, self.layer_id = n_head, n_kv, head_dim, layer_id
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q, k, v, forward_batch):
        T, D = q.shape[0], self.head_dim
        q, k, v = q.view(T, self.n_head, D), k.view(T, self.n_kv, D), v.view(T, self.n_kv, D)
        start = int(forward_batch.positions[0])
        if start == 0 or self.cache is None:
            self.cache = (k, v)
        else:
            self.cache = (torch.cat([self.cache[0], k]), torch.cat([self.cache[1], v]))
        K, V = (c.repeat_interleave(self.n_head // self.n_kv, dim=1) for c in self.cache)
        scores = torch.einsum("thd,shd->hts", q, K) / math.sqrt(D)
        pos = torch.arange(K.shape[0])
        mask = pos[None, :] <= forward_batch.positions[:, None]
        probs = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), -1).to(q.dtype)
        return torch.einsum("hts,shd->thd", probs, V).reshape(T, self.n_head * D)


class Qwen3MoeAttention(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        par = PARALLEL[0]
        D = cfg.head_dim
        self.head_dim, self.num_heads, self.num_kv_heads = D, cfg.n_head // par.tp_size, cfg.n_head_kv // par.tp_size
        r = par.tp_rank
        q = w.wq.view(cfg.n_head, D, -1)[r * self.num_heads:(r + 1) * self.num_heads].reshape(-1, cfg.hidden)
        k = w.wk.view(cfg.n_head_kv, D, -1)[r * self.num_kv_heads:(r + 1) * self.num_kv_heads].reshape(-1, cfg.hidden)
        v = w.wv.view(cfg.n_head_kv, D, -1)[r * self.num_kv_heads:(r + 1) * self.num_kv_heads].reshape(-1, cfg.hidden)
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        self.qkv_proj = Linear(torch.cat([q, k, v]))
        self.q_norm = RMSNorm(w.q_norm, cfg.rms_eps)
        self.k_norm = RMSNorm(w.k_norm, cfg.rms_eps)
        self.rotary_emb = RotaryEmbedding(D, cfg.rope_base, dtype)
        self.attn = RadixAttention(self.num_heads, self.num_kv_heads, D, layer_id)
        self.o_proj = Linear(w.wo[:, r * self.q_size:(r + 1) * self.q_size])      # row parallel: partial sums

    def forward(self, positions, hidden_states, forward_batch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if FUSED_QK["on"]:      # one fused kernel: the modules' forwards called as functions, so no hook fires
            q = self.q_norm._norm(q.reshape(-1, self.head_dim)).view(q.shape)
            if FUSED_QK["fault"] == self.attn.layer_id:
                q = q * 1.05
            k = self.k_norm._norm(k.reshape(-1, self.head_dim)).view(k.shape)
            q, k = self.rotary_emb.forward(positions, q, k)
        else:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)         # [T*heads, D]
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
            q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v, forward_batch)
        output, _ = self.o_proj(attn_output)
        return output


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


class TopK(nn.Module):
    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k

    def forward(self, hidden_states, router_logits):
        probs = torch.softmax(router_logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        return TopKOutput((w / w.sum(-1, keepdim=True)).to(hidden_states.dtype), ids.to(torch.int32), router_logits)


class FusedMoE(nn.Module):
    """This EP rank's experts (a contiguous range) applied and weighted: a partial sum over ranks.  SwiGLU,
    or the family's activation (gpt-oss: the clamped one, ``gemm1_alpha``/``gemm1_clamp_limit``) and the
    experts' biases (``with_bias``) where the family has them."""

    def __init__(self, cfg, w, dtype: torch.dtype) -> None:
        super().__init__()
        par = PARALLEL[0]
        per = cfg.n_expert // par.moe_ep_size
        self.lo, self.hi = par.moe_ep_rank * per, (par.moe_ep_rank + 1) * per
        self.bank, self.dtype, self.cfg = w.experts, dtype, cfg

    def forward(self, hidden_states, topk_output):
        from moesnap.model.families import expert_act

        w, ids, _ = topk_output
        out = torch.zeros_like(hidden_states)
        for e in range(self.lo, self.hi):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                gate, up, down = (t.to(self.dtype) for t in self.bank.expert(e))
                bg, bu, bd = (t.to(self.dtype) for t in self.bank.bias(e) or (torch.zeros(()),) * 3)
                x = hidden_states[tok]
                h = expert_act(self.cfg, x @ gate.T + bg, x @ up.T + bu)
                out[tok] += (h @ down.T + bd) * w[tok, slot][:, None]
        return out


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, fault: int | None) -> None:
        super().__init__()
        self.gate = Linear(w.router.float())
        self.topk = TopK(cfg.n_expert_used)
        self.experts = FusedMoE(cfg, w, dtype)
        self.fault = fault == layer_id

    def forward(self, hidden_states, forward_batch=None):
        router_logits, _ = self.gate(hidden_states.float())
        topk_output = self.topk(hidden_states, router_logits)
        final = self.experts(hidden_states, topk_output)
        if self.fault:                                    # a bug inside the fused MoE, after the experts
            final = final * 1.05
        return final


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, fault: int | None, patch) -> None:
        super().__init__()
        self.layer_id, self.patch = layer_id, patch
        self.self_attn = Qwen3MoeAttention(cfg, w, layer_id, dtype)
        self.mlp = Qwen3MoeSparseMoeBlock(cfg, w, layer_id, dtype, fault)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, forward_batch):
        d, n = self.patch, self.layer_id
        if d:
            d.dump("layer_input", hidden_states, layer_id=n)
        h = self.input_layernorm(hidden_states)
        attn = _all_reduce(self.self_attn(positions=positions, hidden_states=h, forward_batch=forward_batch))
        if d:
            d.dump("attn_output", attn, layer_id=n)
        h, residual = self.post_attention_layernorm(attn, hidden_states)
        if d:
            d.dump("pre_mlp_residual", residual, layer_id=n)
        m = _all_reduce(self.mlp(h, forward_batch))
        if d:
            d.dump("mlp_output", m, layer_id=n)
        return residual + m


class Qwen3MoeModel(nn.Module):
    def __init__(self, weights, dtype: torch.dtype, fault: int | None, patch) -> None:
        super().__init__()
        cfg = weights.config
        self.embed_tokens = nn.Embedding.from_pretrained(weights.dense("token_embd", dtype))
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, weights.layer(i, dtype), i, dtype, fault, patch)
                                    for i in range(cfg.n_layer))
        self.norm = RMSNorm(weights.dense("output_norm", dtype), cfg.rms_eps)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states, forward_batch)
        return self.norm(hidden_states)


class LogitsProcessor(nn.Module):
    def forward(self, input_ids, hidden_states, lm_head, forward_batch, aux_hidden_states=None):
        last = hidden_states[-1:]                                  # one request: its last row
        part = last @ lm_head.weight.T                             # this rank's vocabulary slice
        if PARALLEL[0].tp_size > 1:
            parts = [torch.empty_like(part) for _ in range(PARALLEL[0].tp_size)]
            torch.distributed.all_gather(parts, part.contiguous())
            part = torch.cat(parts, dim=-1)
        return LogitsProcessorOutput(part)


class ParallelLMHead(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        par = PARALLEL[0]
        per = weight.shape[0] // par.tp_size
        self.weight = nn.Parameter(weight[par.tp_rank * per:(par.tp_rank + 1) * per], requires_grad=False)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, weights, dtype: torch.dtype, fault: int | None, patch=None) -> None:
        super().__init__()
        self.model = Qwen3MoeModel(weights, dtype, fault, patch)
        self.lm_head = ParallelLMHead(weights.dense("output", dtype))
        self.logits_processor = LogitsProcessor()

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch):
        hidden_states = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)


# --------------------------------------------------------------------------- a run


def serve(rank: int, args: argparse.Namespace) -> None:
    """One rank: the dumper configured from the environment, the tree, the passes."""
    tp = args.tp
    if tp > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", rank=rank, world_size=tp)
    PARALLEL[0] = Parallel(tp_rank=rank, tp_size=tp, moe_ep_rank=rank, moe_ep_size=tp, attn_tp_rank=rank,
                           attn_tp_size=tp)
    os.environ.update(DUMPER_ENABLE="1", DUMPER_DIR=str(args.out), DUMPER_EXP_NAME="exp",
                      DUMPER_ENABLE_OUTPUT_CONSOLE="0", DUMPER_COLLECTIVE_TIMEOUT="30")
    if args.mode != "patch":
        os.environ["DUMPER_NON_INTRUSIVE_MODE"] = args.mode
    dumper_mod = load_dumper(Path(args.dumper))
    dumper = dumper_mod.dumper
    sys.path.insert(0, str(REPO / "src"))
    from moesnap.model.load import open_model
    from moesnap.store.case import load_case

    dtype = getattr(torch, args.dtype)
    FUSED_QK.update(on=args.fused_qk or args.fault_qk is not None, fault=args.fault_qk)
    model = Qwen3MoeForCausalLM(open_model(MODEL), dtype, args.fault, dumper if args.mode == "patch" else None)
    if args.mode != "patch":
        dumper.register_non_intrusive_dumper(model)
    tokens = torch.from_numpy(load_case(CASE0).tokens.astype("int64"))
    requests = []
    if args.warmup:                                            # another request: SGLang's warm-up
        requests.append([(torch.tensor([1, 2, 3, 4, 5]), 0)])
    run = [(tokens[:args.prompt], 0)] + [(tokens[p:p + 1], p) for p in range(args.prompt, args.prompt + args.decode)]
    requests.append(run)
    for n_req, passes in enumerate(requests):
        for ids, start in passes:
            positions = torch.arange(start, start + ids.shape[0])
            fb = ForwardBatch(ids, positions, torch.tensor([start + ids.shape[0]]), torch.tensor([n_req]),
                              [f"req-{n_req}"])
            model.forward(ids, positions, fb)
            dumper.step()
    if tp > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--mode", choices=("all", "core", "patch"), default="all")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt", type=int, default=19)
    p.add_argument("--decode", type=int, default=0)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--fault", type=int, default=None)
    p.add_argument("--fused-qk", action="store_true")
    p.add_argument("--fault-qk", type=int, default=None)
    p.add_argument("--port", type=int, default=29611)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    found = dumper_path()
    if found is None:
        sys.exit("sglang's dumper.py not found: pip install --no-deps sglang==0.5.23, or set MOESNAP_SGLANG_DUMPER")
    args.dumper = str(found)
    torch.set_num_threads(1)
    if args.tp > 1:
        os.environ["MASTER_PORT"] = str(args.port)
        torch.multiprocessing.spawn(serve, args=(args,), nprocs=args.tp)
    else:
        serve(0, args)


def _forked_rank(rank: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_PORT"] = str(args.port)
    serve(rank, args)


def main_each(runs: list[list[str]]) -> None:
    """Several runs at once (``--each ARGV_JSON ...``), each rank a process forked from this one: torch,
    moesnap and the dumper's imports load once (a run of its own process pays ~3 s of CPU for them, a
    TP = 2 run under ``torch.multiprocessing.spawn`` three times that).  Each child starts from the
    state before any run (the stubs, the dumper and the model are made in the child, as in ``main``)."""
    import multiprocessing

    import zmq  # noqa: F401  (the dumper's imports, loaded once before the forks)
    import torch.distributed  # noqa: F401
    sys.path.insert(0, str(REPO / "src"))
    import moesnap.model.load  # noqa: F401
    import moesnap.store.case  # noqa: F401

    found = dumper_path()
    if found is None:
        sys.exit("sglang's dumper.py not found: pip install --no-deps sglang==0.5.23, or set MOESNAP_SGLANG_DUMPER")
    torch.set_num_threads(1)
    fork = multiprocessing.get_context("fork")
    procs = []
    for argv in runs:
        args = _parser().parse_args(argv)
        args.dumper = str(found)
        for rank in range(args.tp):
            procs.append((argv, fork.Process(target=_forked_rank, args=(rank, args))))
            procs[-1][1].start()
    failed = []
    for argv, proc in procs:
        proc.join(timeout=300)
        if proc.exitcode != 0:
            proc.kill()
            failed.append(f"{argv}: exit {proc.exitcode}")
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--each"]:
        import json

        main_each([json.loads(a) for a in sys.argv[2:]])
    else:
        main()
