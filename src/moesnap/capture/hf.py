"""Capture HF transformers' MoE forward into a moesnap :class:`~moesnap.store.case.Case`.

transformers is an engine like any other: :func:`transformers_case` runs one
forward (batch 1, no KV cache) of a ``Qwen3MoeForCausalLM`` or a ``GptOssForCausalLM`` on any device and
in any dtype and records every stage that forward hooks can see, without
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
from ..model.config import GPT_OSS, QWEN3MOE
from ..model.recorder import ArrayRecorder
from ..stages import layer_stages
from ..util import versions

#: stages a hook-based capture of transformers cannot see
NOT_CAPTURED: tuple[str, ...] = ("q_rope", "k_rope", "expert_out")
#: moesnap's family (gguf-py's architecture name) of a transformers ``config.model_type``
FAMILY_OF_MODEL_TYPE: dict[str, str] = {"qwen3_moe": QWEN3MOE, "gpt_oss": GPT_OSS}


def _family(model: nn.Module) -> str:
    return FAMILY_OF_MODEL_TYPE.get(str(getattr(getattr(model, "config", None), "model_type", "")), QWEN3MOE)


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
    """The module that routes a layer's tokens: Qwen3-MoE's ``mlp.gate``, gpt-oss's ``mlp.router``."""
    mlp = getattr(layer, "mlp", None)
    return getattr(mlp, "gate", None) or getattr(mlp, "router", None)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder (``.model``) inside a ``Qwen3MoeForCausalLM`` or ``GptOssForCausalLM`` (refused with
    one line otherwise)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise UsageError(f"transformers capture: {type(model).__name__} is not a Qwen3MoeForCausalLM or "
                         f"GptOssForCausalLM (no .model.layers / .model.embed_tokens / .model.norm)")
    for i, layer in enumerate(layers):
        if _router(layer) is None:
            raise UsageError(f"transformers capture: layer {i} has a dense MLP (mlp_only_layers / "
                             f"decoder_sparse_step); only all-MoE models are captured")
    return inner


def model_from_gguf(model: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None, experts_implementation: str | None = None) -> nn.Module:
    """transformers' ``Qwen3MoeForCausalLM`` holding the weights of ``model`` (a
    :class:`~moesnap.model.weights.GGUFModel`), built on ``device`` in ``dtype``.

    The config comes from the GGUF's metadata through moesnap's own :class:`Qwen3MoeConfig`
    (all layers sparse, top-k probabilities renormalised, untied lm head); a gpt-oss model gives a
    ``GptOssForCausalLM`` (:mod:`moesnap.capture.hf_gpt_oss`).  Each tensor's stored
    bytes are dequantized on ``device`` (bit-exact with gguf-py in float32) one tensor at a time and
    assigned to the meta-initialised model, so the host never holds more than one tensor's bytes.
    ``attn_implementation`` / ``experts_implementation``: transformers' own choice when None (what a
    user of transformers runs); ``"eager"`` for the plain loops.
    """
    c = model.config
    extra: dict[str, Any] = {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if experts_implementation:
        extra["experts_implementation"] = experts_implementation
    if c.arch == GPT_OSS:
        from .hf_gpt_oss import gpt_oss_from_weights

        return gpt_oss_from_weights(model, device=device, dtype=dtype, extra=extra)
    if c.arch != QWEN3MOE:
        raise UsageError(f"{model.path}: transformers capture builds {QWEN3MOE!r} and {GPT_OSS!r} models, "
                         f"not {c.arch!r} ones")
    try:
        from transformers import Qwen3MoeConfig as HFConfig
        from transformers import Qwen3MoeForCausalLM
    except ImportError:
        raise UsageError("transformers is not installed (pip install 'moesnap[transformers]')") from None
    # head_dim is no declared field of Qwen3MoeConfig: the class takes it through **kwargs (PreTrainedConfig
    # sets it; the attention reads config.head_dim), which its dataclass typing does not show
    cfg = HFConfig(  # type: ignore[call-arg]
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.expert_ff * c.n_expert_used,
        moe_intermediate_size=c.expert_ff, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head_kv, head_dim=c.head_dim, num_experts=c.n_expert,
        num_experts_per_tok=c.n_expert_used, rms_norm_eps=c.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        max_position_embeddings=c.context_length, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
        dtype=dtype, **extra,
    )
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(cfg)

    def w(name: str) -> torch.Tensor:
        return model.on_device(name, device, dtype)

    def assign(sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
        if unexpected:
            raise UsageError(f"transformers capture: unexpected parameters {unexpected[:3]}")

    assign({"model.embed_tokens.weight": w("token_embd"), "model.norm.weight": w("output_norm"),
            "lm_head.weight": w("output")})
    for i in range(c.n_layer):
        g, m = f"blk.{i}.", f"model.layers.{i}."
        gate_up = torch.cat([w(g + "ffn_gate_exps"), w(g + "ffn_up_exps")], dim=1)   # [E, 2F, H] gate first
        assign({
            m + "input_layernorm.weight": w(g + "attn_norm"),
            m + "self_attn.q_proj.weight": w(g + "attn_q"),
            m + "self_attn.k_proj.weight": w(g + "attn_k"),
            m + "self_attn.v_proj.weight": w(g + "attn_v"),
            m + "self_attn.o_proj.weight": w(g + "attn_output"),
            m + "self_attn.q_norm.weight": w(g + "attn_q_norm"),
            m + "self_attn.k_norm.weight": w(g + "attn_k_norm"),
            m + "post_attention_layernorm.weight": w(g + "ffn_norm"),
            m + "mlp.gate.weight": w(g + "ffn_gate_inp"),                  # [E, H]
            m + "mlp.experts.gate_up_proj": gate_up,
            m + "mlp.experts.down_proj": w(g + "ffn_down_exps"),           # [E, H, F]
        })
        del gate_up
        model.release_layer(i)
    still_meta = [n for n, p in hf.named_parameters() if p.is_meta]
    if still_meta:
        raise UsageError(f"transformers capture: parameters not loaded from the GGUF: {still_meta[:3]}")
    # rotary inv_freq buffers are non-persistent and were created on meta: rebuild them on the device
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf.eval()


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
        hooks = [inner.embed_tokens.register_forward_hook(self._out("embed", None, (-1,))),
                 inner.norm.register_forward_hook(self._out("final_norm", None, (-1,)))]
        self.hooks = hooks
        try:
            hf_config: Any = model.config
            for i, layer in enumerate(inner.layers):
                att, mlp, router = layer.self_attn, layer.mlp, _router(layer)
                assert router is not None     # _decoder refused a layer without one
                D = int(att.head_dim)
                k = int(getattr(router, "top_k", hf_config.num_experts_per_tok))
                if hasattr(att, "q_norm") and hasattr(att, "k_norm"):    # gpt-oss has none: no such stage
                    hooks += [att.q_norm.register_forward_hook(self._out("q_norm", i, (-1, D))),  # [B, T, Hq, D]
                              att.k_norm.register_forward_hook(self._out("k_norm", i, (-1, D)))]
                hooks += [
                    layer.input_layernorm.register_forward_hook(self._out("attn_norm", i, (-1,))),
                    att.q_proj.register_forward_hook(self._out("q", i, (-1, D))),           # [T, Hq, D]
                    att.k_proj.register_forward_hook(self._out("k", i, (-1, D))),           # [T, Hkv, D]
                    att.v_proj.register_forward_hook(self._out("v", i, (-1, D))),           # [T, Hkv, D]
                    att.o_proj.register_forward_pre_hook(self._in("attn", i), with_kwargs=True),  # [T, Hq*D]
                    att.o_proj.register_forward_hook(self._out("attn_out", i, (-1,))),
                    layer.post_attention_layernorm.register_forward_pre_hook(self._in("attn_resid", i),
                                                                             with_kwargs=True),
                    layer.post_attention_layernorm.register_forward_hook(self._out("ffn_norm", i, (-1,))),
                    router.register_forward_hook(self._gate(i, k)),
                    mlp.register_forward_hook(self._out("moe_out", i, (-1,))),
                    layer.register_forward_hook(self._out("layer_out", i, (-1,))),
                ]
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def _save(self, stage: str, layer: int | None, x: torch.Tensor, tail: tuple[int, ...]) -> None:
        self.calls[(stage, layer)] += 1
        self.rec.save(stage, layer, x.detach().reshape(self.T, *tail))

    def _out(self, stage: str, layer: int | None, tail: tuple[int, ...]) -> Callable:
        return lambda mod, args, out: self._save(stage, layer, _tensor(out, f"{stage} (layer {layer})"), tail)

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
        self.rec, self.T, self.calls = ArrayRecorder(), int(ids.size), Counter()
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
        "not_captured": [s for s in layer_stages(_family(model)) if s not in rec.layers],
    }
    if n_steps:   # the prompt's rows are positions 0..T-1 of a sequence the steps go on (a prefix of the golden's)
        meta.update({"positions": list(range(T)), "prompt_tokens": T, "decode": n_steps,
                     "continuation_source": "greedy" if fed is None else "given",
                     "continuation": [int(s.tokens[0]) for s in step_cases], "kv_cache": type(cache).__name__})
    meta.update(attrs or {})
    return replace(from_recorder(rec, meta), steps=tuple(step_cases))
