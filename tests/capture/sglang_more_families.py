"""SGLang's own dumper (unmodified, loaded as sglang_tree.py loads it) driven by module trees named and called
as SGLang's Mixtral (``sglang/srt/models/mixtral.py``), OLMoE (``olmoe.py``) and gpt-oss (``gpt_oss.py``),
built from a moesnap model file's weights; the building blocks, the passes and the command line are
sglang_families.py's, this file adds the three families' layers.  Run as a script::

    python tests/capture/sglang_more_families.py OUT --model M.gguf --tokens 1,2,3 [--dtype bfloat16]
        [--decode N] [--tp 2 [--port P] [--fault-rank R]] [--fault-rope LAYER] [--fault-qk-norm LAYER]
        [--fault-sinks LAYER]

``--tp 2`` (gloo, one process per rank, sglang_families.py's): as SGLang shards the three at tp_size=2 without
EP: QKVParallelLinear's heads (gpt-oss: with their biases and sinks), ``o_proj`` row parallel (gpt-oss: its
bias on rank 0), ``FusedMoE`` every expert's slice of the intermediate width (``moe_tp_size`` = 2; gpt-oss's
down bias on rank 0, as its loader zeroes it elsewhere), the router replicated.  Mixtral's and gpt-oss's
``o_proj`` and experts are ``reduce_results=False`` (partial sums, reduced by the layer); OLMoE's are
reduced inside the module (RowParallelLinear's and its ``FusedMoE(reduce_results=True)``).  OLMoE's
whole-projection q/k norm: SGLang 0.5.23 applies ``RMSNorm(hidden_size)`` to the rank's ``[T, hidden/tp]``
and fails at tp > 1 (sgl-project/sglang#11651, closed unfixed); the tree uses the tp-aware norm SGLang has
for the same problem (``MiniMaxM2RMSNormTP``: the mean square all-reduced, the weight split by heads).

Mixtral (``MixtralDecoderLayer``): ``self_attn`` (``qkv_proj`` without biases, ``rotary_emb`` NeoX,
``attn``, ``o_proj``) over transformers' q/k rows (the engines load the HF checkpoint; the GGUF's rows are
permuted per head for llama.cpp's adjacent pairs, so the tree un-permutes them: the dump holds q and k in
transformers' order, as SGLang's does), then ``block_sparse_moe`` (``MixtralMoE``: ``gate`` a
ReplicatedLinear in the model's dtype, ``topk`` softmax, top-2, renormalised, ``experts``) called with the
hidden states alone.  ``--fault-rope L``: layer L turns GPT-J's adjacent pairs of those rows (a
``is_neox_style`` flipped).

OLMoE (``OlmoeDecoderLayer``): layers pass ``(hidden_states, residual)`` along and ``input_layernorm``
adds the residual in (SGLang's older layer pattern: its ``output.1`` is the previous layer's output);
``q_norm``/``k_norm`` are RMSNorm over the whole projection (``RMSNorm(hidden_size)`` on ``[T, Hq*D]``), eps
1e-5; ``mlp`` (``OlmoeMoE``: ``gate``, ``topk`` softmax, top-k, not renormalised, ``experts``).
``--fault-qk-norm L``: layer L's q norm normalises each head apart (Qwen3-MoE's rule) with the same weights.

gpt-oss (``GptOssDecoderLayer``): ``self_attn`` (``qkv_proj`` and ``o_proj`` with biases, ``rotary_emb``
NeoX over YaRN's frequencies and attention factor, ``attn(q, k, v, forward_batch, sinks=self.sinks,
save_kv_cache=...)`` with the layer's sliding window of ``sliding_window - 1`` (SGLang's inclusive window)
on the sliding layers), then ``mlp`` (``GptOssSparseMoeBlock``: ``router`` with its bias, ``topk``
renormalised, ``experts`` with biases and the clamped SwiGLU).  The sinks are held in float32 (SGLang's
``trtllm_mha`` backend; the others hold them in bfloat16).  ``--fault-sinks L``: layer L's attention is
called without its sinks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sglang_families as fam  # noqa: E402
from sglang_families import LinearBias, Qwen2MoeAttention, RadixAttention, Rotary, TopK, _cols, _heads, experts  # noqa: E402
from sglang_tree import PARALLEL, FusedMoE, Linear, RMSNorm, _all_reduce  # noqa: E402


def _layer_forward(layer: nn.Module, positions, hidden_states, forward_batch, ffn) -> torch.Tensor:
    """A layer of SGLang's fused add + norm pattern: ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm(attn, residual)``, then ``ffn`` of the normed hidden states; under tensor
    parallelism both partial sums reduced after their modules (the layer's communicator)."""
    h = layer.input_layernorm(hidden_states)
    attn = _all_reduce(layer.self_attn(positions=positions, hidden_states=h, forward_batch=forward_batch))
    h, residual = layer.post_attention_layernorm(attn, hidden_states)
    return residual + _all_reduce(ffn(h))


class ReducedLinear(Linear):
    """A RowParallelLinear with ``reduce_results=True`` (OLMoE's ``o_proj``): reduced inside the module."""

    def forward(self, x: torch.Tensor):
        return _all_reduce(x @ self.weight.T), None


class ReducedFusedMoE(FusedMoE):
    """A FusedMoE with ``reduce_results=True`` (OLMoE's ``experts``): its output reduced inside it."""

    def forward(self, hidden_states, topk_output):
        return _all_reduce(super().forward(hidden_states, topk_output))


class RouterMoE(nn.Module):
    """MixtralMoE / OlmoeMoE: ``gate`` (the model's dtype, replicated) -> ``(logits, None)``, ``topk``,
    ``experts`` (this rank's slice of every expert's intermediate width; ``reduced``: OLMoE's, reduced inside)."""

    def __init__(self, cfg, w, dtype: torch.dtype, reduced: bool = False) -> None:
        super().__init__()
        self.gate = Linear(w.router.to(dtype))
        self.topk = TopK(cfg)
        self.experts = experts(cfg, w, dtype, ReducedFusedMoE if reduced else FusedMoE)

    def forward(self, hidden_states):
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states, self.topk(hidden_states, router_logits))


# --------------------------------------------------------------------------- Mixtral


class MixtralAttention(nn.Module):
    def __init__(self, cfg, w, dtype: torch.dtype, layer_id: int, fault: bool) -> None:
        super().__init__()
        from moesnap.capture.hf_families import unpermute

        D, tp, Hq, Hkv = cfg.head_dim, PARALLEL[0].tp_size, cfg.n_head, cfg.n_head_kv
        self.q_size, self.kv_size = Hq // tp * D, Hkv // tp * D
        self.qkv_proj = Linear(torch.cat([_heads(unpermute(w.wq, Hq), Hq), _heads(unpermute(w.wk, Hkv), Hkv),
                                          _heads(w.wv, Hkv)]))
        self.rotary_emb = Rotary(cfg, dtype)
        self.rotary_emb.is_neox_style = not fault          # get_rope(..., is_neox_style=True)
        self.attn = RadixAttention(Hq // tp, Hkv // tp, D, D, D ** -0.5, layer_id=layer_id)
        self.o_proj = Linear(_cols(w.wo, Hq))              # reduce_results=False: reduced by the layer

    forward = Qwen2MoeAttention.forward                    # the same calls as SGLang's Qwen2-MoE attention


class MixtralDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.self_attn = MixtralAttention(cfg, w, dtype, layer_id, args.fault_rope == layer_id)
        self.block_sparse_moe = RouterMoE(cfg, w, dtype)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, forward_batch):
        return _layer_forward(self, positions, hidden_states, forward_batch, self.block_sparse_moe)


# --------------------------------------------------------------------------- OLMoE


class OlmoeRMSNormTP(RMSNorm):
    """OLMoE's whole-projection q/k norm over this rank's heads: its slice of the weight, the mean square
    all-reduced over the ranks (SGLang's tp-aware ``MiniMaxM2RMSNormTP``); at tp 1 ``RMSNorm(hidden_size)``.
    SGLang 0.5.23's olmoe.py itself applies ``RMSNorm(hidden_size)`` to the rank's ``[T, hidden/tp]`` and
    fails at tp > 1 (sgl-project/sglang#11651, closed unfixed): this is the norm a tp-capable OLMoE needs."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        if PARALLEL[0].tp_size > 1:
            variance = _all_reduce(variance) / PARALLEL[0].tp_size
        return (xf * torch.rsqrt(variance + self.variance_epsilon) * self.weight.float()).to(x.dtype)


class HeadwiseRMSNorm(RMSNorm):
    """The fault of ``--fault-qk-norm``: each head normalised apart, the whole projection's weights."""

    def __init__(self, weight: torch.Tensor, eps: float, head_dim: int) -> None:
        super().__init__(weight, eps)
        self.head_dim = head_dim

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        xf = x.float().view(T, -1, D)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (out.view(T, -1) * self.weight.float()).to(x.dtype)


class OlmoeAttention(nn.Module):
    OLMOE_EPS = 1e-5          # RMSNorm(hidden_size, eps=1e-5): SGLang's OLMoE takes no eps from the config

    def __init__(self, cfg, w, dtype: torch.dtype, layer_id: int, fault: bool) -> None:
        super().__init__()
        D, tp, Hq, Hkv = cfg.head_dim, PARALLEL[0].tp_size, cfg.n_head, cfg.n_head_kv
        self.q_size, self.kv_size = Hq // tp * D, Hkv // tp * D
        self.qkv_proj = Linear(torch.cat([_heads(w.wq, Hq), _heads(w.wk, Hkv), _heads(w.wv, Hkv)]))
        q_w, k_w = _heads(w.q_norm, Hq), _heads(w.k_norm, Hkv)
        self.q_norm = HeadwiseRMSNorm(q_w, self.OLMOE_EPS, D) if fault else OlmoeRMSNormTP(q_w, self.OLMOE_EPS)
        self.k_norm = OlmoeRMSNormTP(k_w, self.OLMOE_EPS)
        self.o_proj = ReducedLinear(_cols(w.wo, Hq))        # RowParallelLinear's default reduce_results=True
        self.rotary_emb = Rotary(cfg, dtype)
        self.attn = RadixAttention(Hq // tp, Hkv // tp, D, D, D ** -0.5, layer_id=layer_id)

    def forward(self, positions, hidden_states, forward_batch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v, forward_batch))
        return output


class OlmoeDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.self_attn = OlmoeAttention(cfg, w, dtype, layer_id, args.fault_qk_norm == layer_id)
        self.mlp = RouterMoE(cfg, w, dtype, reduced=True)
        self.input_layernorm = RMSNorm(w.attn_norm, OlmoeAttention.OLMOE_EPS)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, OlmoeAttention.OLMOE_EPS)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states, forward_batch=forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class OlmoeModel(fam.Model):
    def forward(self, input_ids, positions, forward_batch, input_embeds=None):
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# --------------------------------------------------------------------------- gpt-oss


class GptOssAttention(nn.Module):
    def __init__(self, cfg, w, dtype: torch.dtype, layer_id: int, fault: bool) -> None:
        super().__init__()
        D, par, Hq, Hkv = cfg.head_dim, PARALLEL[0], cfg.n_head, cfg.n_head_kv
        self.q_size, self.kv_size = Hq // par.tp_size * D, Hkv // par.tp_size * D
        self.qkv_proj = LinearBias(torch.cat([_heads(w.wq, Hq), _heads(w.wk, Hkv), _heads(w.wv, Hkv)]),
                                   torch.cat([_heads(w.bq, Hq), _heads(w.bk, Hkv), _heads(w.bv, Hkv)]))
        self.sinks = nn.Parameter(_heads(w.sinks.float(), Hq), requires_grad=False)     # this rank's heads' sinks
        # row parallel, reduce_results=False: the bias added on rank 0 alone, the sum reduced by the layer
        self.o_proj = LinearBias(_cols(w.wo, Hq), w.bo if par.tp_rank == 0 else torch.zeros_like(w.bo))
        self.rotary_emb = Rotary(cfg, dtype)
        window = cfg.sliding_window - 1 if cfg.slides(layer_id) else -1
        self.attn = RadixAttention(Hq // par.tp_size, Hkv // par.tp_size, D, D, D ** -0.5, window, layer_id)
        self.fault = fault

    def forward(self, positions, hidden_states, forward_batch):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v, forward_batch, sinks=None if self.fault else self.sinks, save_kv_cache=True)
        output, _ = self.o_proj(attn_output)
        return output


class GptOssSparseMoeBlock(nn.Module):
    def __init__(self, cfg, w, dtype: torch.dtype) -> None:
        super().__init__()
        self.topk = TopK(cfg)
        self.experts = experts(cfg, w, dtype)
        self.router = LinearBias(w.router.to(dtype), w.router_bias.to(dtype))

    def forward(self, hidden_states, forward_batch=None):
        router_logits, _ = self.router(hidden_states)
        return self.experts(hidden_states, self.topk(hidden_states, router_logits))


class GptOssDecoderLayer(nn.Module):
    def __init__(self, cfg, w, layer_id: int, dtype: torch.dtype, args) -> None:
        super().__init__()
        self.self_attn = GptOssAttention(cfg, w, dtype, layer_id, args.fault_sinks == layer_id)
        self.mlp = GptOssSparseMoeBlock(cfg, w, dtype)
        self.input_layernorm = RMSNorm(w.attn_norm, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(w.ffn_norm, cfg.rms_eps)

    def forward(self, positions, hidden_states, forward_batch):
        return _layer_forward(self, positions, hidden_states, forward_batch, lambda h: self.mlp(h, forward_batch))


fam.LAYERS.update({"llama": MixtralDecoderLayer, "olmoe": OlmoeDecoderLayer, "gpt-oss": GptOssDecoderLayer})
fam.MODELS["olmoe"] = OlmoeModel
fam.FAULT_FAMILIES.update(fault_rope="llama", fault_qk_norm="olmoe", fault_sinks="gpt-oss")
fam.TP_FAMILIES += ["llama", "olmoe", "gpt-oss"]
fam.EXPERTS_TP += ["llama", "olmoe", "gpt-oss"]        # SGLang's FusedMoE without --ep-size


def main(argv: list[str] | None = None) -> None:
    p = fam.parser()
    p.add_argument("--fault-rope", type=int, default=None)
    p.add_argument("--fault-qk-norm", type=int, default=None)
    p.add_argument("--fault-sinks", type=int, default=None)
    fam.main(argv, p)


if __name__ == "__main__":
    main()
