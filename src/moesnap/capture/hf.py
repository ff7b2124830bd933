"""Capture HF transformers' MoE forward into a moesnap :class:`~moesnap.store.case.Case`.

transformers is an engine like any other: :func:`transformers_case` runs one
forward (batch 1, no KV cache) of a ``Qwen3MoeForCausalLM``, ``GptOssForCausalLM``,
``Qwen2MoeForCausalLM``, ``MixtralForCausalLM``, ``OlmoeForCausalLM``, ``DeepseekV2ForCausalLM`` or
``DeepseekV3ForCausalLM`` (:data:`FAMILY_OF_MODEL_TYPE`) on any device
and in any dtype and records every stage that forward hooks can see, without
patching a forward function.  With ``decode=N`` it serves the prompt as
transformers does: a prefill into its ``DynamicCache``, then N single-token
forwards through it (transformers places each at the cache's length), the same
hooks recording every forward; each step is a one-row case at its position in
the returned case's ``steps``.  Where each stage is taken (``modeling_qwen3_moe.py``,
transformers 5.x; checked against 5.24)::

    model.embed_tokens            output            -> embed          [T, H]
    layer.input_layernorm         output            -> attn_norm      [T, H]
    self_attn.q_proj/k_proj/v_proj output           -> q, k, v        [T, heads, D]
    self_attn.q_norm/k_norm       output            -> q_norm, k_norm [T, heads, D]
    self_attn.o_proj              input / output    -> attn [T, Hq*D] / attn_out [T, H]
    layer.post_attention_layernorm input / output   -> attn_resid / ffn_norm [T, H]
    mlp.gate  -> (router_logits, top_k_weights, top_k_index)
                                                    -> router_logits [T, E], topk_weights, topk_ids [T, k]
    layer.mlp                     output            -> moe_out        [T, H]  (gpt-oss: its first output)
    layer                         output            -> layer_out      [T, H]
    model.norm                    output            -> final_norm     [T, H]
    model output ``logits``                         -> logits         [T, V]

gpt-oss (``modeling_gpt_oss.py``) has the same modules but no ``q_norm``/``k_norm`` (no such stage
in its family) and its router is ``mlp.router``, returning ``(router_logits [T, E], scores, indices
[T, k])``: the scores are the softmax over the k selected logits, in slot order ``[T, k]`` in
transformers 5.x; where a release gives them scattered over the experts ``[T, E]`` (transformers
4.5x: ``(scores [T, E], indices)``, no logits) the weights are gathered at the indices and
``router_logits`` is left out.  Its experts are fused too (gate and up interleaved in one
``gate_up_proj``).

Qwen2-MoE: ``mlp.shared_expert`` output -> ``shared_expert_out`` (before its gate),
``mlp.shared_expert_gate`` output -> ``shared_gate`` ``[T, 1]`` (the logit), ``mlp`` output (routed plus
gated shared) -> ``moe_out``.  Mixtral: no q/k norm; ``q``/``k`` are put back into the GGUF's row order
(:data:`PAIRED_QK`: the converter permutes them so that llama.cpp's RoPE on pairs equals transformers' on
halves; the golden keeps the file's order).  OLMoE: ``q_norm``/``k_norm`` normalise the whole projection
``[T, H*D]``, stored per head.  DeepSeek-V2/V3 (multi-head latent attention)::

    self_attn.q_a_proj / q_a_layernorm   output     -> q_latent / q_latent_norm [T, Rq] (with a q LoRA)
    self_attn.q_b_proj (or q_proj)       output     -> q              [T, Hq, Dn+Dr]
    self_attn.kv_a_proj_with_mqa         output     -> kv_latent      [T, Rkv+Dr]
    self_attn.kv_a_layernorm             output     -> kv_latent_norm [T, Rkv]
    self_attn.kv_b_proj output (this forward's rows, the last T: it runs over every cached position)
        [k_nope | v], with kv_latent's rope key  -> k = [k_nope, k_pe] [T, Hq, Dn+Dr], v [T, Hq, Dv]
    mlp.shared_experts            output            -> shared_expert_out [T, H]
    a dense layer's mlp           output            -> dense_ffn_out  [T, H] (no router stages)

``k`` joins two outputs the engine computed (no arithmetic); the router's ids come as transformers
returns them (unsorted: the judge compares them as sets, weights by expert), and ``router_select``
(moesnap's measure of the selection scores) is no module's output.

RoPE is a plain function and the experts are one fused module, so ``q_rope``,
``k_rope`` and ``expert_out`` are not visible: they are left out (compare with
``--allow-missing``), never reconstructed.  Every array is stored as float32
(bfloat16 and float16 values convert exactly); ``topk_ids`` as int32.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..case import Case, from_recorder
from ..errors import UsageError
from ..model.config import DEEPSEEK2, GPT_OSS, LLAMA, OLMOE, QWEN2MOE, QWEN3MOE
from ..model.recorder import ArrayRecorder
from ..stages import FAMILY_STAGES, stages_of_model
from ..util import versions
from .hf_build import model_from_gguf
from .hf_families import interleave

#: stages a hook-based capture of transformers cannot see (every family's; DeepSeek also its ``router_select``)
NOT_CAPTURED: tuple[str, ...] = ("q_rope", "k_rope", "expert_out")
#: moesnap's family (gguf-py's architecture name) of a transformers ``config.model_type``
FAMILY_OF_MODEL_TYPE: dict[str, str] = {"qwen3_moe": QWEN3MOE, "gpt_oss": GPT_OSS, "qwen2_moe": QWEN2MOE,
                                        "mixtral": LLAMA, "olmoe": OLMOE, "deepseek_v2": DEEPSEEK2,
                                        "deepseek_v3": DEEPSEEK2}
#: model types whose GGUF q/k rows are permuted from transformers' (the converter's ``LlamaModel.permute``):
#: their q and k are captured in the file's order (:func:`~moesnap.capture.hf_families.interleave`)
PAIRED_QK: frozenset[str] = frozenset({"mixtral"})

__all__ = ["transformers_case", "model_from_gguf", "NOT_CAPTURED", "FAMILY_OF_MODEL_TYPE"]


def _family(model: nn.Module) -> str:
    return FAMILY_OF_MODEL_TYPE.get(str(getattr(getattr(model, "config", None), "model_type", "")), QWEN3MOE)


def _layout(hf_config: Any) -> dict[str, int]:
    """What of a transformers config says which stages a layer has (:func:`~moesnap.stages.stages_of_layer`)."""
    return {"n_dense_layers": int(getattr(hf_config, "first_k_dense_replace", 0) or 0),
            "q_lora_rank": int(getattr(hf_config, "q_lora_rank", 0) or 0)}


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


def _tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, (tuple, list)):  # a module returning (hidden_states, ...) as older releases did
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"transformers capture: {where} gave {type(x).__name__}, not a tensor")
    return x


def _first_arg(args: tuple, kwargs: dict, where: str) -> torch.Tensor:
    if args:
        return _tensor(args[0], where)
    if "hidden_states" in kwargs:
        return _tensor(kwargs["hidden_states"], where)
    raise UsageError(f"transformers capture: {where} was called without a tensor input")


def _router(layer: nn.Module) -> nn.Module | None:
    """The module that routes a layer's tokens: ``mlp.gate`` (gpt-oss: ``mlp.router``); None in a dense layer."""
    mlp = getattr(layer, "mlp", None)
    return getattr(mlp, "gate", None) or getattr(mlp, "router", None)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder (``.model``) inside a causal LM of a family moesnap knows (refused with one line
    otherwise, and where a layer is dense in a family that has no dense layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise UsageError(f"transformers capture: {type(model).__name__} is not a Qwen3MoeForCausalLM, GptOssForCausalLM, "
                         f"Qwen2MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM or DeepseekV2/V3ForCausalLM "
                         f"(no .model.layers / .model.embed_tokens / .model.norm)")
    family = _family(model)
    for i, layer in enumerate(layers):
        if _router(layer) is None and "dense_ffn_out" not in FAMILY_STAGES[family]:
            raise UsageError(f"transformers capture: layer {i} has a dense MLP (mlp_only_layers / "
                             f"decoder_sparse_step); only all-MoE {family} models are captured")
    return inner


def _routing(out: Any, layer: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(router_logits or None, topk_weights [.., k], topk_ids [.., k])`` from what a router module
    returned: ``(logits, weights, ids)`` with the weights in slot order ``[.., k]`` or scattered over the
    experts ``[.., E]``, or transformers 4.5x gpt-oss's ``(scores [.., E], ids)``."""
    if isinstance(out, tuple) and len(out) == 3 and all(isinstance(x, torch.Tensor) for x in out):
        logits, scores, index = out
    elif isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, torch.Tensor) for x in out):
        (scores, index), logits = out, None
    else:
        raise UsageError(f"transformers capture: layer {layer}'s router did not return (router_logits, "
                         f"top_k_weights, top_k_index) or (router_scores, router_indices)")
    if index.shape[-1] != k:
        raise UsageError(f"transformers capture: layer {layer}'s router gave {index.shape[-1]} expert ids per "
                         f"token, expected top-k = {k}")
    if logits is None or (scores.shape[-1] != k and scores.shape == logits.shape):
        # scattered over the experts [.., E]: the selected experts' weights, in slot order [.., k]
        scores = scores.reshape(-1, scores.shape[-1]).gather(-1, index.reshape(-1, k).long())
    elif scores.shape[-1] != k:
        raise UsageError(f"transformers capture: layer {layer}'s router scores have {scores.shape[-1]} columns, "
                         f"neither top-k = {k} nor one per expert")
    return logits, scores, index


class _Stages:
    """Forward hooks on the modules of every stage, recording into the forward under way.

    Registered once for all the forwards of one capture (the prefill, then each decode step);
    :meth:`forward` runs one forward of ``T`` rows into a fresh recorder and checks that every hooked
    module ran once."""

    def __init__(self, model: nn.Module, inner: Any) -> None:
        self.rec = ArrayRecorder()
        self.T = 0
        self.calls: Counter[tuple[str, int | None]] = Counter()
        self.kv_latent: dict[int, torch.Tensor] = {}
        hooks = [inner.embed_tokens.register_forward_hook(self._out("embed", None, (-1,))),
                 inner.norm.register_forward_hook(self._out("final_norm", None, (-1,)))]
        self.hooks = hooks
        try:
            hf_config: Any = model.config
            paired = str(getattr(hf_config, "model_type", "")) in PAIRED_QK
            for i, layer in enumerate(inner.layers):
                att, mlp, router = layer.self_attn, layer.mlp, _router(layer)
                hooks += [
                    layer.input_layernorm.register_forward_hook(self._out("attn_norm", i, (-1,))),
                    att.o_proj.register_forward_pre_hook(self._in("attn", i), with_kwargs=True),  # [T, Hq*Dv]
                    att.o_proj.register_forward_hook(self._out("attn_out", i, (-1,))),
                    layer.post_attention_layernorm.register_forward_pre_hook(self._in("attn_resid", i),
                                                                             with_kwargs=True),
                    layer.post_attention_layernorm.register_forward_hook(self._out("ffn_norm", i, (-1,))),
                    layer.register_forward_hook(self._out("layer_out", i, (-1,))),
                ]
                hooks += self._latent(i, att) if hasattr(att, "kv_a_proj_with_mqa") else self._attention(i, att, paired)
                if router is None:                      # a dense layer (DeepSeek's leading ones; _decoder checked)
                    hooks.append(mlp.register_forward_hook(self._out("dense_ffn_out", i, (-1,))))
                    continue
                k = int(getattr(router, "top_k", hf_config.num_experts_per_tok))
                hooks += [router.register_forward_hook(self._gate(i, k)),
                          mlp.register_forward_hook(self._out("moe_out", i, (-1,)))]
                shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
                if shared is not None:                  # Qwen2-MoE's (before its gate), DeepSeek's
                    hooks.append(shared.register_forward_hook(self._out("shared_expert_out", i, (-1,))))
                if getattr(mlp, "shared_expert_gate", None) is not None:                     # [T, 1] logit
                    hooks.append(mlp.shared_expert_gate.register_forward_hook(self._out("shared_gate", i, (1,))))
        except BaseException:
            self.remove()
            raise

    def _attention(self, i: int, att: Any, paired: bool) -> list:
        """Hooks of a layer's q, k, v projections and q/k norms (where the family has them)."""
        D = int(att.head_dim)
        order = interleave if paired else None          # Mixtral: q and k in the file's row order
        hooks = [att.q_proj.register_forward_hook(self._out("q", i, (-1, D), order)),           # [T, Hq, D]
                 att.k_proj.register_forward_hook(self._out("k", i, (-1, D), order)),           # [T, Hkv, D]
                 att.v_proj.register_forward_hook(self._out("v", i, (-1, D)))]                  # [T, Hkv, D]
        if getattr(att, "q_norm", None) is not None and getattr(att, "k_norm", None) is not None:
            hooks += [att.q_norm.register_forward_hook(self._out("q_norm", i, (-1, D))),   # per head or whole
                      att.k_norm.register_forward_hook(self._out("k_norm", i, (-1, D)))]
        return hooks

    def _latent(self, i: int, att: Any) -> list:
        """Hooks of DeepSeek's latent attention: the q LoRA (where there is one) and q, the latent and its
        norm, and ``k``/``v`` from ``kv_b_proj``'s output (its rows of this forward: the last T, as it runs
        over every cached position) and the rope key of the latent (``k = [k_nope, k_pe]``, no arithmetic)."""
        Dn, Dr, Dv = int(att.qk_nope_head_dim), int(att.qk_rope_head_dim), int(att.v_head_dim)
        hooks = []
        if getattr(att, "q_a_proj", None) is not None:
            hooks += [att.q_a_proj.register_forward_hook(self._out("q_latent", i, (-1,))),
                      att.q_a_layernorm.register_forward_hook(self._out("q_latent_norm", i, (-1,))),
                      att.q_b_proj.register_forward_hook(self._out("q", i, (-1, Dn + Dr)))]
        else:
            hooks.append(att.q_proj.register_forward_hook(self._out("q", i, (-1, Dn + Dr))))

        def latent(mod, args, out) -> None:
            x = _tensor(out, f"kv_latent (layer {i})")
            self.kv_latent[i] = x.detach().reshape(self.T, -1)
            self._save("kv_latent", i, x, (-1,))

        def kv(mod, args, out) -> None:
            x = _tensor(out, f"kv_b_proj (layer {i})").detach()
            x = x.reshape(-1, x.shape[-1])[-self.T:].reshape(self.T, -1, Dn + Dv)        # [T, Hq, Dn+Dv]
            if i not in self.kv_latent:
                raise UsageError(f"transformers capture: layer {i}'s kv_b_proj ran before kv_a_proj_with_mqa")
            k_pe = self.kv_latent[i][:, -Dr:][:, None, :].expand(self.T, x.shape[1], Dr)  # [T, Hq, Dr] one per token
            self._save("k", i, torch.cat([x[..., :Dn], k_pe.to(x.dtype)], dim=-1), (-1, Dn + Dr))
            self._save("v", i, x[..., Dn:], (-1, Dv))

        return hooks + [att.kv_a_proj_with_mqa.register_forward_hook(latent),
                        att.kv_a_layernorm.register_forward_hook(self._out("kv_latent_norm", i, (-1,))),
                        att.kv_b_proj.register_forward_hook(kv)]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def _save(self, stage: str, layer: int | None, x: torch.Tensor, tail: tuple[int, ...]) -> None:
        self.calls[(stage, layer)] += 1
        self.rec.save(stage, layer, x.detach().reshape(self.T, *tail))

    def _out(self, stage: str, layer: int | None, tail: tuple[int, ...],
             then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable:
        def hook(mod, args, out) -> None:
            x = _tensor(out, f"{stage} (layer {layer})")
            if then is not None:
                x = then(x.detach().reshape(self.T, *tail))
            self._save(stage, layer, x, tail)
        return hook

    def _in(self, stage: str, layer: int) -> Callable:
        return lambda mod, args, kwargs: self._save(stage, layer, _first_arg(args, kwargs, f"{stage} (layer {layer})"),
                                                    (-1,))

    def _gate(self, layer: int, k: int) -> Callable:
        def hook(mod, args, out) -> None:
            logits, weights, index = _routing(out, layer, k)
            if logits is not None:
                self._save("router_logits", layer, logits, (-1,))  # [T, E]
            self._save("topk_weights", layer, weights, (k,))       # [T, k] (renormalised / softmax over the k)
            self._save("topk_ids", layer, index, (k,))             # [T, k] by descending weight (torch.topk)
        return hook

    def forward(self, run: Callable[[], Any], ids: np.ndarray, where: str) -> tuple[ArrayRecorder, torch.Tensor]:
        """Run one forward (``run()``) over the rows ``ids``; its recorder (tokens and logits included)
        and its logits ``[T, V]``."""
        self.rec, self.T, self.calls, self.kv_latent = ArrayRecorder(), int(ids.size), Counter(), {}
        out = run()
        twice = sorted(f"{s}" + ("" if layer is None else f" (layer {layer})")
                       for (s, layer), n in self.calls.items() if n > 1)
        if twice:
            raise UsageError(f"transformers capture: modules ran more than once in one forward ({where}): "
                             f"{', '.join(twice[:4])}")
        logits = out.logits.detach().reshape(self.T, -1)                          # [T, V]
        self.rec.save("tokens", None, torch.as_tensor(ids))
        self.rec.save("logits", None, logits)
        return self.rec, logits


def _cache_keyword(model: nn.Module) -> str:
    """The keyword the causal LM's forward takes its KV cache by: ``cache`` (transformers 5.2x renamed
    it) where the signature names it, else ``past_key_values`` (5.17 and earlier; deprecated later)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def transformers_case(model: nn.Module, tokens: Sequence[int], *, decode: int = 0,
                      continuation: Sequence[int] | None = None, attrs: dict[str, Any] | None = None) -> Case:
    """Run ``tokens`` through a transformers ``Qwen3MoeForCausalLM`` or ``GptOssForCausalLM`` and
    capture every visible stage;
    with ``decode``, then decode steps through transformers' own KV cache, each captured too.

    ``decode=0`` (and no ``continuation``): one forward, batch 1, ``use_cache=False``.  ``decode=N``:
    a prefill of ``tokens`` into a ``DynamicCache``, then ``N`` single-token forwards through the same
    cache (transformers places each at the cache's length), the hooks recording every forward.  The
    tokens the steps are fed: ``continuation`` (teacher-forced: step ``n`` is fed ``continuation[n]``;
    ``decode=0`` with a continuation decodes all of it), else the model's own greedy choice (the
    argmax of the previous forward's last logits).  Everything runs under ``torch.inference_mode``;
    the model stays on its device and in its dtype (and is put in eval mode for the call, then back).

    Returns the prompt's :class:`Case` whose ``attrs`` hold ``engine="transformers"``, ``dtype`` (of
    the model's parameters), ``transformers_version`` and the other versions, the device and the token
    ids (with steps, as ``trace --decode`` names them: ``positions`` 0..T-1, ``prompt_tokens``,
    ``decode``, the fed ``continuation`` and ``continuation_source`` — ``"given"`` or ``"greedy"``),
    updated with ``attrs``; its ``steps`` hold one case of one row per decode step
    (``attrs`` ``positions=[len(tokens) + n]``, ``step=n``, ``engine``, ``dtype``).  Raises
    :class:`UsageError` when transformers is missing, ``model`` is not an all-MoE Qwen3-MoE or gpt-oss causal LM,
    or a token or ``decode``/``continuation`` is out of range.
    """
    from ._decode import decode_plan

    try:
        import transformers
    except ImportError:
        raise UsageError("transformers is not installed (pip install -c constraints-cpu.txt "
                         "-r requirements-crosscheck.txt)") from None
    # transformers' submodules are reached by attribute name, which nn.Module.__getattr__ types as Tensor | Module
    inner: Any = _decoder(model)
    param = next(model.parameters())
    dtype = _DTYPE_NAMES.get(param.dtype)
    if dtype is None:
        raise UsageError(f"transformers capture: unsupported parameter dtype {param.dtype}")
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise UsageError("transformers capture: empty token list")
    n_steps, fed = decode_plan(decode, continuation, engine="transformers")
    vocab = int(inner.embed_tokens.num_embeddings)
    for what, seq in (("token", ids.tolist()), ("continuation token", fed or [])):
        bad = [int(t) for t in seq if not 0 <= int(t) < vocab]
        if bad:
            raise UsageError(f"transformers capture: {what} {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    T = int(ids.size)
    common: dict[str, Any] = {"producer": "transformers", "engine": "transformers", "dtype": dtype,
                              "device": str(param.device)}
    stages = _Stages(model, inner)
    step_cases: list[Case] = []
    try:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                keyword = _cache_keyword(model)
                hf_config: Any = model.config
                cache: Any = None
                if n_steps:
                    from transformers import DynamicCache

                    cache = DynamicCache(config=hf_config)

                def forward(rows: np.ndarray) -> Callable[[], Any]:
                    input_ids = torch.as_tensor(rows, device=param.device)[None, :]   # [1, T]
                    if cache is None:
                        return lambda: model(input_ids=input_ids, use_cache=False)
                    return lambda: model(input_ids=input_ids, use_cache=True, **{keyword: cache})

                rec, logits = stages.forward(forward(ids), ids, "the prompt")
                for n in range(n_steps):
                    tok = fed[n] if fed is not None else int(torch.argmax(logits[-1]).item())
                    row = np.asarray([tok], dtype=np.int64)
                    srec, logits = stages.forward(forward(row), row, f"decode step {n}")
                    step_cases.append(from_recorder(srec, {**common, "positions": [T + n], "step": n,
                                                           "token_ids": [tok]}))
                if cache is not None and cache.get_seq_length() != T + n_steps:
                    raise UsageError(f"transformers capture: the KV cache holds {cache.get_seq_length()} "
                                     f"positions after {T} prompt tokens and {n_steps} decode steps")
        finally:
            model.train(was_training)
    finally:
        stages.remove()
    meta: dict[str, Any] = {
        **common,
        "transformers_version": transformers.__version__,
        "versions": {**versions(), "transformers": transformers.__version__},
        "token_ids": [int(t) for t in ids],
        "not_captured": [s for s in stages_of_model(_family(model), _layout(model.config), len(inner.layers))
                         if s not in rec.layers],
    }
    if n_steps:   # the prompt's rows are positions 0..T-1 of a sequence the steps go on (a prefix of the golden's)
        meta.update({"positions": list(range(T)), "prompt_tokens": T, "decode": n_steps,
                     "continuation_source": "greedy" if fed is None else "given",
                     "continuation": [int(s.tokens[0]) for s in step_cases], "kv_cache": type(cache).__name__})
    meta.update(attrs or {})
    return replace(from_recorder(rec, meta), steps=tuple(step_cases))
