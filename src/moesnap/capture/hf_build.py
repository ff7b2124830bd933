"""transformers' causal LM of a model moesnap opened (GGUF or checkpoint), built in memory: what
``trace --engine transformers`` runs.

One builder for every family: the transformers config comes from moesnap's
:class:`~moesnap.model.config.ModelConfig` and the parameters from the tensors the reference reads,
mapped per family (:data:`BUILDS`: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2/V3 in
:mod:`moesnap.capture.hf_families`, gpt-oss in :mod:`moesnap.capture.hf_gpt_oss`).  The model is
created on the meta device and each layer's tensors dequantized on ``device`` (moesnap's torch decoder,
bit-exact with gguf-py in float32; gguf-py on the host for a type it does not know) and assigned one
layer at a time, so the host never holds more than one layer's.  Every parameter takes ``dtype``
except those transformers' ``from_pretrained`` keeps in float32 (the class's
``_keep_in_fp32_modules_strict`` in bfloat16 and float16: DeepSeek's router and correction bias;
``_keep_in_fp32_modules`` in float16: gpt-oss's norms).
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..errors import UsageError
from ..model.config import DEEPSEEK2, GPT_OSS, LLAMA, OLMOE, QWEN2MOE, QWEN3MOE, ModelConfig
from . import hf_families as fam
from . import hf_gpt_oss


class Build(NamedTuple):
    """How one family's transformers model is made."""

    cls: Callable[[ModelConfig], str]          # the transformers class name, by config (DeepSeek: V2 or V3)
    config: Callable[[ModelConfig, torch.dtype, dict[str, Any]], Any]
    check: Callable[[Any, ModelConfig, Any], None] | None = None   # after the meta model is made


def _deepseek_cls(c: ModelConfig) -> str:
    return "DeepseekV3ForCausalLM" if c.gating == "sigmoid_grouped" else "DeepseekV2ForCausalLM"


BUILDS: dict[str, Build] = {
    QWEN3MOE: Build(lambda c: "Qwen3MoeForCausalLM", fam.qwen3_moe_config),
    GPT_OSS: Build(lambda c: "GptOssForCausalLM", hf_gpt_oss.hf_config, hf_gpt_oss.check),
    QWEN2MOE: Build(lambda c: "Qwen2MoeForCausalLM", fam.qwen2_moe_config),
    LLAMA: Build(lambda c: "MixtralForCausalLM", fam.mixtral_config),
    OLMOE: Build(lambda c: "OlmoeForCausalLM", fam.olmoe_config),
    DEEPSEEK2: Build(_deepseek_cls, fam.deepseek_config),
}
#: every family's layer map, by transformers ``model_type``
LAYERS: dict[str, fam.LayerMap] = {**fam.LAYERS, "gpt_oss": hf_gpt_oss.gpt_oss_layer}


def _keeps_fp32(hf: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether ``from_pretrained`` would keep parameter ``name`` in float32 in a ``dtype`` model."""
    names = set(getattr(hf, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16, torch.bfloat16) \
        else set()
    if dtype == torch.float16:
        names |= set(getattr(hf, "_keep_in_fp32_modules", None) or ())
    if not names:
        return lambda name: False
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, sorted(names))) + r")(\.|$)")
    return lambda name: pattern.search(name) is not None


def model_from_gguf(model: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None, experts_implementation: str | None = None) -> nn.Module:
    """transformers' causal LM of ``model``'s family (a :class:`~moesnap.model.weights.ModelWeights`)
    holding its weights, built on ``device`` in ``dtype`` (module docstring).

    ``attn_implementation`` / ``experts_implementation``: transformers' own choice when None (what a
    user of transformers runs); ``"eager"`` for the plain loops.  Refused in one line
    (:class:`~moesnap.errors.UsageError`) where transformers is missing or lacks the family's class, or
    cannot compute the model as its file says.
    """
    c = model.config
    build = BUILDS.get(c.arch)
    if build is None:
        raise UsageError(f"{model.path}: transformers capture builds {', '.join(map(repr, BUILDS))} models, "
                         f"not {c.arch!r} ones")
    name = build.cls(c)
    try:
        import transformers
    except ImportError:
        raise UsageError("transformers is not installed (pip install 'moesnap[transformers]')") from None
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UsageError(f"{model.path}: transformers {transformers.__version__} has no {name}")
    extra = {k: v for k, v in (("attn_implementation", attn_implementation),
                               ("experts_implementation", experts_implementation)) if v}
    cfg = build.config(c, dtype, extra)
    with torch.device("meta"):
        hf = cls(cfg)
    if build.check is not None:
        build.check(hf, c, model.path)
    keep = _keeps_fp32(hf, dtype)
    held = set(model.qtypes())
    from ..gguf import quants_torch

    def get(tensor: str) -> torch.Tensor:    # float32 on the device; cast per parameter on assignment
        if model.tensor_type(tensor) in quants_torch.SUPPORTED:
            return model.on_device(tensor, device, torch.float32)
        return model.dense(tensor, torch.float32).to(device)

    def assign(sd: dict[str, torch.Tensor]) -> None:
        sd = {k: v.to(torch.float32 if keep(k) else dtype) for k, v in sd.items()}
        missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
        if unexpected:
            raise UsageError(f"transformers capture: unexpected parameters {unexpected[:3]}")

    layer = LAYERS[cfg.model_type]
    assign(fam.top(get))
    for i in range(c.n_layer):
        assign(layer(get, held.__contains__, cfg, i))
        model.release_layer(i)
    # rotary inv_freq buffers are non-persistent and were created on meta: rebuild them on the device
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    still_meta = [n for n, p in [*hf.named_parameters(), *hf.named_buffers()] if p.is_meta]
    if still_meta:
        raise UsageError(f"transformers capture: parameters not loaded from {model.path}: {still_meta[:3]}")
    return hf.eval()
