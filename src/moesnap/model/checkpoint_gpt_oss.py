"""gpt-oss HF checkpoints: ``config.json`` and the expert tensors that take more than a rename.

transformers 5.x (``modeling_gpt_oss.py``, ``integrations/mxfp4.py``) and openai's own release store
each layer's experts fused, gate and up *interleaved* along the output (gate at even positions)::

    mlp.experts.gate_up_proj       [E, H, 2F]  float (a dequantized checkpoint, save_pretrained's)
    mlp.experts.down_proj          [E, F, H]
    mlp.experts.gate_up_proj_bias  [E, 2F]     mlp.experts.down_proj_bias [E, H]
    mlp.experts.gate_up_proj_blocks [E, 2F, H/32, 16] uint8, _scales [E, 2F, H/32] uint8   (MXFP4, as released)
    mlp.experts.down_proj_blocks    [E, H, F/32, 16] uint8,  _scales [E, H, F/32] uint8

An MXFP4 block holds 32 values as 16 bytes of e2m1 nibbles, the low nibble of byte j value 2j and the
high one value 2j+1, and one E8M0 exponent byte (value = e2m1 * 2^(e - 127)).  GGUF's MXFP4 (ggml's
``block_mxfp4``, what gguf-py dequantizes) is the exponent byte then 16 bytes whose low nibbles are
values 0..15 and high nibbles 16..31: :func:`mxfp4_to_ggml` re-orders the nibbles, so the experts stay
MXFP4, bit for bit, as convert_hf_to_gguf's ``GptOssModel`` writes them.  The float layout is
transposed and de-interleaved into GGUF's ``ffn_gate_exps``/``ffn_up_exps`` ``[E, F, H]`` and
``ffn_down_exps`` ``[E, H, F]``.  Everything else is a rename (gguf-py's ``TensorNameMap``).
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ModelFileError
from .config import FAMILIES, GPT_OSS, ModelConfig

MODEL_TYPE = "gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"
FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")

#: how one GGUF expert tensor is made from the stored ones: (suffixes read, function of their arrays)
Make = Callable[[list[np.ndarray]], np.ndarray]


def is_gpt_oss(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == MODEL_TYPE or (isinstance(archs, list) and ARCHITECTURE in archs)


def _number(cfg: dict, key: str, path: Path, default: float | None = None) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelFileError(f"{path}: {key!r} = {v!r} must be a positive number")
    return float(v)


def gpt_oss_config(cfg: dict[str, Any], path: Path, shape: dict[str, Any]) -> ModelConfig:
    """moesnap's config of a gpt-oss ``config.json`` (``shape``: the fields every family has, read
    already); what moesnap's gpt-oss does not compute is refused naming the key."""
    fixed = dict(FAMILIES[GPT_OSS]["fixed"])
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ModelFileError(f"{path}: 'sliding_window' = {window!r} must be a positive integer")
    n_layer = shape["n_layer"]
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    layer_types = cfg.get("layer_types", want)
    if layer_types != want:
        raise ModelFileError(f"{path}: 'layer_types' must alternate sliding (even layers) and full attention as "
                             f"gpt-oss does; got {str(layer_types)[:80]}")
    if cfg.get("attention_bias", True) is not True:
        raise ModelFileError(f"{path}: 'attention_bias' = {cfg.get('attention_bias')!r}: gpt-oss's q/k/v/o carry biases")
    if cfg.get("tie_word_embeddings"):
        raise ModelFileError(f"{path}: tie_word_embeddings is not supported (gpt-oss has its own lm_head)")
    quant = cfg.get("quantization_config")
    if quant is not None and not (isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"):
        raise ModelFileError(f"{path}: quantization_config {str(quant)[:80]} is not supported (mxfp4 experts are)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelFileError(f"{path}: 'rope_parameters' is not an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "yarn":
        fixed.update(rope_scaling="yarn", rope_factor=_number(rope, "factor", path),
                     rope_orig_context=int(_number(rope, "original_max_position_embeddings", path)),
                     rope_beta_fast=_number(rope, "beta_fast", path, 32.0),
                     rope_beta_slow=_number(rope, "beta_slow", path, 1.0),
                     rope_yarn_truncate=bool(rope.get("truncate", True)))     # transformers' default: truncate
    elif kind != "default":
        raise ModelFileError(f"{path}: rope_type {kind!r} is not supported for gpt-oss (yarn or default)")
    fixed.update(sliding_window=window, swiglu_limit=_number(cfg, "swiglu_limit", path, 7.0),
                 swiglu_alpha=_number(cfg, "swiglu_alpha", path, 1.702))
    return ModelConfig(**shape, arch=GPT_OSS, **fixed)


def mxfp4_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF MXFP4 ``blocks [..., G, 16]`` and ``scales [..., G]`` (uint8) as GGUF MXFP4 rows
    ``[..., G * 17]``: per block the exponent byte, then byte j = value j (low) | value j+16 (high)."""
    lo, hi = blocks & 0x0F, blocks >> 4                          # [..., G, 16] values 2j, 2j+1
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)   # [..., G, 32] in order
    packed = values[..., :16] | (values[..., 16:] << 4)          # [..., G, 16] ggml's nibble order
    out = np.concatenate([scales[..., None], packed], axis=-1)   # [..., G, 17]
    return np.ascontiguousarray(out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17), dtype=np.uint8)


def _half(arrays: list[np.ndarray], which: int, mxfp4: bool) -> np.ndarray:
    """gate (``which`` 0) or up (1) of the fused ``gate_up_proj``."""
    if mxfp4:
        blocks, scales = arrays
        return mxfp4_to_ggml(blocks[:, which::2], scales[:, which::2])      # [E, F, H/32*17]
    return np.ascontiguousarray(arrays[0][:, :, which::2].transpose(0, 2, 1))   # [E, H, 2F] -> [E, F, H]


def _bias_half(arrays: list[np.ndarray], which: int) -> np.ndarray:
    """gate (0) or up (1) bias ``[E, F]`` of the fused ``gate_up_proj_bias [E, 2F]``."""
    return np.ascontiguousarray(arrays[0][:, which::2])


def _down(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(arrays[0].transpose(0, 2, 1))                     # [E, F, H] -> [E, H, F]


def _down_mxfp4(arrays: list[np.ndarray]) -> np.ndarray:
    return mxfp4_to_ggml(arrays[0], arrays[1])                                   # [E, H, F/32*17]


def _as_stored(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0]


def expert_recipes(layer_names: dict[str, str]) -> dict[str, tuple[list[str], Make, bool]]:
    """For one layer: each GGUF expert tensor (``ffn_gate_exps``, ``ffn_gate_exps.bias``, ...) as
    (the stored names it is made from, how, whether it is MXFP4), from ``layer_names``: what this
    layer's checkpoint holds, by suffix (``gate_up_proj``, ``gate_up_proj_blocks``, ...) to full name.
    A layer holding neither the float nor the MXFP4 form of a tensor gets no recipe for it."""
    out: dict[str, tuple[list[str], Make, bool]] = {}
    n = layer_names
    for which, kind in ((0, "ffn_gate_exps"), (1, "ffn_up_exps")):
        if "gate_up_proj_blocks" in n and "gate_up_proj_scales" in n:
            out[kind] = ([n["gate_up_proj_blocks"], n["gate_up_proj_scales"]], partial(_half, which=which, mxfp4=True),
                         True)
        elif "gate_up_proj" in n:
            out[kind] = ([n["gate_up_proj"]], partial(_half, which=which, mxfp4=False), False)
        if "gate_up_proj_bias" in n:
            out[kind + ".bias"] = ([n["gate_up_proj_bias"]], partial(_bias_half, which=which), False)
    if "down_proj_blocks" in n and "down_proj_scales" in n:
        out["ffn_down_exps"] = ([n["down_proj_blocks"], n["down_proj_scales"]],
                                _down_mxfp4, True)
    elif "down_proj" in n:
        out["ffn_down_exps"] = ([n["down_proj"]], _down, False)
    if "down_proj_bias" in n:
        out["ffn_down_exps.bias"] = ([n["down_proj_bias"]], _as_stored, False)
    return out
