"""Capture HF transformers' Qwen3-MoE forward into a moesnap :class:`~moesnap.store.case.Case`.

transformers is an engine like any other: :func:`transformers_case` runs one
forward (batch 1, no KV cache) of a ``Qwen3MoeForCausalLM`` on any device and
in any dtype and records every stage that forward hooks can see, without
patching a forward function.  Where each stage is taken (``modeling_qwen3_moe.py``,
transformers 5.x; checked against 5.24)::

    model.embed_tokens            output            -> embed          [T, H]
    layer.input_layernorm         output            -> attn_norm      [T, H]
    self_attn.q_proj/k_proj/v_proj output           -> q, k, v        [T, heads, D]
    self_attn.q_norm/k_norm       output            -> q_norm, k_norm [T, heads, D]
    self_attn.o_proj              input / output    -> attn [T, Hq*D] / attn_out [T, H]
    layer.post_attention_layernorm input / output   -> attn_resid / ffn_norm [T, H]
    mlp.gate  -> (router_logits, top_k_weights, top_k_index)
                                                    -> router_logits [T, E], topk_weights, topk_ids [T, k]
    layer.mlp                     output            -> moe_out        [T, H]
    layer                         output            -> layer_out      [T, H]
    model.norm                    output            -> final_norm     [T, H]
    model output ``logits``                         -> logits         [T, V]

RoPE is a plain function and the experts are one fused module, so ``q_rope``,
``k_rope`` and ``expert_out`` are not visible: they are left out (compare with
``--allow-missing``), never reconstructed.  Every array is stored as float32
(bfloat16 and float16 values convert exactly); ``topk_ids`` as int32.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..case import Case, from_recorder
from ..errors import UsageError
from ..model.recorder import ArrayRecorder
from ..util import versions

#: stages a hook-based capture of transformers cannot see
NOT_CAPTURED: tuple[str, ...] = ("q_rope", "k_rope", "expert_out")

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


def _decoder(model: nn.Module) -> nn.Module:
    """The ``Qwen3MoeModel`` inside a ``Qwen3MoeForCausalLM`` (refused with one line otherwise)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise UsageError(f"transformers capture: {type(model).__name__} is not a Qwen3MoeForCausalLM "
                         f"(no .model.layers / .model.embed_tokens / .model.norm)")
    for i, layer in enumerate(layers):
        if not hasattr(getattr(layer, "mlp", None), "gate"):
            raise UsageError(f"transformers capture: layer {i} has a dense MLP (mlp_only_layers / "
                             f"decoder_sparse_step); only all-MoE models are captured")
    return inner


def model_from_gguf(model: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None, experts_implementation: str | None = None) -> nn.Module:
    """transformers' ``Qwen3MoeForCausalLM`` holding the weights of ``model`` (a
    :class:`~moesnap.model.weights.GGUFModel`), built on ``device`` in ``dtype``.

    The config comes from the GGUF's metadata through moesnap's own :class:`Qwen3MoeConfig`
    (all layers sparse, top-k probabilities renormalised, untied lm head).  Each tensor's stored
    bytes are dequantized on ``device`` (bit-exact with gguf-py in float32) one tensor at a time and
    assigned to the meta-initialised model, so the host never holds more than one tensor's bytes.
    ``attn_implementation`` / ``experts_implementation``: transformers' own choice when None (what a
    user of transformers runs); ``"eager"`` for the plain loops.
    """
    try:
        from transformers import Qwen3MoeConfig as HFConfig
        from transformers import Qwen3MoeForCausalLM
    except ImportError:
        raise UsageError("transformers is not installed (pip install 'moesnap[transformers]')") from None
    c = model.config
    extra: dict[str, Any] = {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if experts_implementation:
        extra["experts_implementation"] = experts_implementation
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


def transformers_case(model: nn.Module, tokens: Sequence[int], *, attrs: dict[str, Any] | None = None) -> Case:
    """Run ``tokens`` through a transformers ``Qwen3MoeForCausalLM`` and capture every visible stage.

    One forward, batch 1, ``use_cache=False``, under ``torch.inference_mode``;
    the model stays on its device and in its dtype (and is put in eval mode for
    the call, then back).  Returns a :class:`Case` whose ``attrs`` hold
    ``engine="transformers"``, ``dtype`` (of the model's parameters),
    ``transformers_version`` and the other versions, the device and the token
    ids, updated with ``attrs``.  Raises :class:`UsageError` when transformers
    is missing or ``model`` is not an all-MoE Qwen3-MoE causal LM.
    """
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
    T = int(ids.size)
    rec = ArrayRecorder()
    calls: Counter[tuple[str, int | None]] = Counter()

    def save(stage: str, layer: int | None, x: torch.Tensor, shape: tuple[int, ...]) -> None:
        calls[(stage, layer)] += 1
        rec.save(stage, layer, x.detach().reshape(shape))

    def out_hook(stage: str, layer: int | None, shape: tuple[int, ...]) -> Callable:
        return lambda mod, args, out: save(stage, layer, _tensor(out, f"{stage} (layer {layer})"), shape)

    def in_hook(stage: str, layer: int, shape: tuple[int, ...]) -> Callable:
        return lambda mod, args, kwargs: save(stage, layer, _first_arg(args, kwargs, f"{stage} (layer {layer})"),
                                              shape)

    def gate_hook(layer: int, k: int) -> Callable:
        def hook(mod, args, out) -> None:
            if not (isinstance(out, tuple) and len(out) == 3):
                raise UsageError(f"transformers capture: layer {layer} mlp.gate did not return "
                                 f"(router_logits, top_k_weights, top_k_index)")
            logits, weights, index = out
            save("router_logits", layer, logits, (T, -1))     # [T, E]
            save("topk_weights", layer, weights, (T, k))       # [T, k] renormalised when norm_topk_prob
            save("topk_ids", layer, index, (T, k))             # [T, k] by descending weight (torch.topk)
        return hook

    hooks = [inner.embed_tokens.register_forward_hook(out_hook("embed", None, (T, -1))),
             inner.norm.register_forward_hook(out_hook("final_norm", None, (T, -1)))]
    try:
        hf_config: Any = model.config
        for i, layer in enumerate(inner.layers):
            att, mlp = layer.self_attn, layer.mlp
            D = int(att.head_dim)
            k = int(getattr(mlp.gate, "top_k", hf_config.num_experts_per_tok))
            hooks += [
                layer.input_layernorm.register_forward_hook(out_hook("attn_norm", i, (T, -1))),
                att.q_proj.register_forward_hook(out_hook("q", i, (T, -1, D))),           # [T, Hq, D]
                att.k_proj.register_forward_hook(out_hook("k", i, (T, -1, D))),           # [T, Hkv, D]
                att.v_proj.register_forward_hook(out_hook("v", i, (T, -1, D))),           # [T, Hkv, D]
                att.q_norm.register_forward_hook(out_hook("q_norm", i, (T, -1, D))),      # [B, T, Hq, D] in
                att.k_norm.register_forward_hook(out_hook("k_norm", i, (T, -1, D))),
                att.o_proj.register_forward_pre_hook(in_hook("attn", i, (T, -1)), with_kwargs=True),  # [T, Hq*D]
                att.o_proj.register_forward_hook(out_hook("attn_out", i, (T, -1))),
                layer.post_attention_layernorm.register_forward_pre_hook(in_hook("attn_resid", i, (T, -1)),
                                                                         with_kwargs=True),
                layer.post_attention_layernorm.register_forward_hook(out_hook("ffn_norm", i, (T, -1))),
                mlp.gate.register_forward_hook(gate_hook(i, k)),
                mlp.register_forward_hook(out_hook("moe_out", i, (T, -1))),
                layer.register_forward_hook(out_hook("layer_out", i, (T, -1))),
            ]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                input_ids = torch.as_tensor(ids, device=param.device)[None, :]   # [1, T]
                out = model(input_ids=input_ids, use_cache=False)
        finally:
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    twice = sorted(f"{s}" + ("" if layer is None else f" (layer {layer})") for (s, layer), n in calls.items() if n > 1)
    if twice:
        raise UsageError(f"transformers capture: modules ran more than once in one forward: {', '.join(twice[:4])}")
    rec.save("tokens", None, torch.as_tensor(ids))
    rec.save("logits", None, out.logits.detach().reshape(T, -1))                  # [T, V]
    meta: dict[str, Any] = {
        "producer": "transformers",
        "engine": "transformers",
        "dtype": dtype,
        "device": str(param.device),
        "transformers_version": transformers.__version__,
        "versions": {**versions(), "transformers": transformers.__version__},
        "token_ids": [int(t) for t in ids],
        "not_captured": list(NOT_CAPTURED),
    }
    meta.update(attrs or {})
    return from_recorder(rec, meta)
