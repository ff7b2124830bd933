"""Mapping GGUF tensors onto a MoE model's weights (each family of :mod:`moesnap.model.tensors`),
dequantized lazily with gguf-py.

This is the one place where GGUF's reversed (ggml-order) dimensions meet the
model's numpy/torch order: GGUF ``ne = [in, out]`` is numpy ``[out, in]``.
Nothing is dequantized until asked for: a layer's dense weights when the
layer runs, an expert's three matrices only when the router selects it, the
embedding only for the rows of the prompt's tokens, the lm head in chunks of
rows.  Peak memory therefore does not grow with depth.
"""

from __future__ import annotations

import os
import threading
import warnings

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from .config import ModelConfig
from .tensors import table
from ..errors import ModelFileError
from ..gguf.reader import GGUFFile, open_gguf

# gguf-py's per-type classes; calling one on a whole matrix does the same maths as
# quants.dequantize (which splits it into 16-row groups) in a few large numpy calls:
# 2.5x faster, and threads then scale because numpy holds the GIL less.
_TRAITS = getattr(quants, "_type_traits", {})


def _dequantize(gf: GGUFFile, name: str, qtype: GGMLQuantizationType, data: np.ndarray) -> np.ndarray:
    try:
        traits = _TRAITS.get(qtype)
        if traits is not None and getattr(data, "ndim", 0) == 2 and hasattr(traits, "dequantize_rows"):
            traits.init_grid()     # the IQ types' lookup grids (quants.dequantize builds them first too)
            out = traits.dequantize_rows(np.asarray(data))
        else:
            out = quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError:
        raise ModelFileError(f"{gf.path}: tensor {name!r} has type {qtype.name}, which gguf-py cannot dequantize") from None
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # F32 tensors come back as read-only memmap views


#: threads that dequantize a large dense matrix in blocks of rows (:func:`_dequantize_rows_parallel`)
DENSE_THREADS = max(1, min(16, os.cpu_count() or 1))
#: the fewest rows a thread takes (fewer rows per numpy call cost more than they give: measured ~1.2x
#: slower at 64 rows than at 256 for Q4_K)
DENSE_MIN_ROWS = 256
_DENSE_POOL: ThreadPoolExecutor | None = None
_DENSE_POOL_LOCK = threading.Lock()


def _dense_pool() -> ThreadPoolExecutor:
    global _DENSE_POOL
    with _DENSE_POOL_LOCK:
        if _DENSE_POOL is None:
            _DENSE_POOL = ThreadPoolExecutor(max_workers=DENSE_THREADS, thread_name_prefix="moesnap-dense")
        return _DENSE_POOL


def _dequantize_rows_parallel(gf: GGUFFile, name: str, qtype: GGMLQuantizationType, data: np.ndarray) -> np.ndarray:
    """:func:`_dequantize` of a 2-D quantized matrix, its rows split into blocks dequantized on
    :data:`DENSE_THREADS` threads: the same values bit for bit (every quantized block holds values of
    one row only, and each is decoded alone), ~DENSE_THREADS times sooner.  A layer's attention
    weights took ~0.1-0.2 s on one thread, 5-10 s over 48 layers of a 30B-A3B while the other
    cores waited.  A small matrix, an unquantized one or a single thread: one call."""
    traits = _TRAITS.get(qtype)
    n = data.shape[0] if getattr(data, "ndim", 0) == 2 else 0
    if traits is None or not hasattr(traits, "dequantize_rows") or DENSE_THREADS == 1 or n < 2 * DENSE_MIN_ROWS:
        return _dequantize(gf, name, qtype, data)
    step = max(DENSE_MIN_ROWS, -(-n // DENSE_THREADS))
    starts = range(0, n, step)
    parts = list(_dense_pool().map(lambda a: _dequantize(gf, name, qtype, data[a:a + step]), starts))
    out = np.empty((n, parts[0].shape[-1]), dtype=np.float32)
    for a, part in zip(starts, parts):
        out[a:a + step] = part
    return out


@dataclass
class LayerWeights:
    """Dense weights of one layer as torch tensors; experts stay quantized.  What a family lacks is
    None (gpt-oss: no ``q_norm``/``k_norm``; Qwen3-MoE: no biases, no sinks)."""

    index: int
    attn_norm: torch.Tensor     # [H]
    wq: torch.Tensor | None     # [Hq*D, H]  (None: DeepSeek's q LoRA instead)
    wk: torch.Tensor | None     # [Hkv*D, H] (None under MLA)
    wv: torch.Tensor | None     # [Hkv*D, H] (None under MLA)
    wo: torch.Tensor            # [H, Hq*D]  (MLA: [H, Hq*Dv])
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None  # [D]
    ffn_norm: torch.Tensor      # [H]  (gpt-oss: post_attention_norm)
    router: torch.Tensor | None  # [E, H] (None in a dense layer)
    experts: "ExpertBank | None"
    bq: torch.Tensor | None = None            # [Hq*D]
    bk: torch.Tensor | None = None            # [Hkv*D]
    bv: torch.Tensor | None = None            # [Hkv*D]
    bo: torch.Tensor | None = None            # [H]
    sinks: torch.Tensor | None = None         # [Hq]  one learned logit per query head
    router_bias: torch.Tensor | None = None   # [E]
    # DeepSeek-V2/V3 (multi-head latent attention, dense layers, shared experts, V3's correction bias)
    wq_a: torch.Tensor | None = None          # [Rq, H]
    q_a_norm: torch.Tensor | None = None      # [Rq]
    wq_b: torch.Tensor | None = None          # [Hq*D, Rq]
    wkv_a: torch.Tensor | None = None         # [Rkv + Dr, H]
    kv_a_norm: torch.Tensor | None = None     # [Rkv]
    wkv_b: torch.Tensor | None = None         # [Hq*(Dn + Dv), Rkv]: per head its Dn key rows, then Dv value rows
    ffn_gate: torch.Tensor | None = None      # [F_dense, H]
    ffn_up: torch.Tensor | None = None        # [F_dense, H]
    ffn_down: torch.Tensor | None = None      # [H, F_dense]
    shexp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # gate, up [F_sh, H]; down [H, F_sh]
    probs_bias: torch.Tensor | None = None    # [E] added to the scores for the selection only
    shexp_gate: torch.Tensor | None = None    # [H] Qwen2-MoE: the shared expert's gate (sigmoid of its logit)


def file_bytes(arr: np.ndarray) -> torch.Tensor:
    """A GGUF tensor's stored data as ``uint8 [..., bytes_per_row]``, zero-copy."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = a.view(np.uint8)  # F32/F16/BF16 rows as their raw bytes
    with warnings.catch_warnings():
        # the memory map is read-only; nothing here ever writes through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class ExpertBank:
    """One layer's experts, dequantized one expert at a time on request."""

    def __init__(self, model: "ModelWeights", layer: int, dtype: torch.dtype) -> None:
        self.model, self.layer, self.dtype = model, layer, dtype
        tab = table(model.config.arch)
        self.names = tab.expert_tensors
        # the experts' biases ([E, F], [E, F], [E, H]; a few hundred KB) are read whole, once per layer
        self.biases = tuple(model.dense(f"blk.{layer}.{b}", dtype) for b in tab.expert_biases) or None

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [F, H], up [F, H], down [H, F]) of expert ``e``."""
        gate, up, down = (self.model.expert_matrix(self.layer, n, e) for n in self.names)
        return (torch.from_numpy(gate).to(self.dtype), torch.from_numpy(up).to(self.dtype),
                torch.from_numpy(down).to(self.dtype))

    def bias(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(gate [F], up [F], down [H]) biases of expert ``e``, or None where the family has none."""
        if self.biases is None:
            return None
        bg, bu, bd = self.biases
        return bg[e], bu[e], bd[e]


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """DeepSeek's ``kv_b`` ``[Hq*(Dn+Dv), Rkv]`` (transformers' ``kv_b_proj.weight``) from the split the
    converter writes: ``attn_k_b`` ``[Hq, Rkv, Dn]`` (transposed) and ``attn_v_b`` ``[Hq, Dv, Rkv]``."""
    k_b = k_b.transpose(1, 2)                                           # [Hq, Dn, Rkv]
    return torch.cat([k_b, v_b], dim=1).reshape(-1, k_b.shape[-1]).contiguous()  # [Hq*(Dn+Dv), Rkv]


class ModelWeights(ABC):
    """What the forwards need of a model file: its config, each tensor's type, shape and stored data,
    and lazy dequantization.  :class:`GGUFModel` (a GGUF file) and
    :class:`~moesnap.model.checkpoint.CheckpointModel` (an HF checkpoint directory) implement it; the
    reference, the candidate and the local re-reference see only this interface.  Tensors are named
    as in GGUF (``blk.3.attn_q``, ``token_embd``), shapes are numpy (logical) shapes."""

    path: Path
    config: ModelConfig
    kind: str = "model"

    # -- per format -----------------------------------------------------------
    @abstractmethod
    def qtypes(self) -> dict[str, str]:
        """Stored type name of every tensor, e.g. {'blk.0.ffn_down_exps': 'Q6_K'}."""

    @abstractmethod
    def tensor_type(self, name: str) -> GGMLQuantizationType:
        """The stored type of tensor ``name``."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The logical (numpy) shape of tensor ``name``."""

    @abstractmethod
    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """(type, data as stored): uint8 blocks for quantized types, typed array otherwise."""

    def release_tensor(self, name: str) -> None:  # noqa: B027 -- optional: formats without mapped pages keep it
        """Drop the tensor's mapped pages from this process (they stay in the page cache)."""

    @abstractmethod
    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantized on the host, in ``dtype``."""

    @abstractmethod
    def rows(self, name: str, rows: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Selected rows of a 2-D tensor (the embedding for a prompt's tokens)."""

    @abstractmethod
    def n_rows(self, name: str) -> int:
        """How many rows the 2-D tensor ``name`` has (the lm head reads them in blocks with :meth:`rows`)."""

    @abstractmethod
    def expert_matrix(self, layer: int, tensor: str, e: int) -> np.ndarray:
        """Expert ``e``'s matrix of ``blk.<layer>.<tensor>`` as float32."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model's bytes in provenance: ``file``, ``path``, ``size``, ``sha256``."""

    def hashed_files(self) -> list[Path]:
        """The files :meth:`fingerprint` takes the sha256 of (:func:`moesnap.util.hash_ahead` starts
        on them early)."""
        return [self.path] if self.path.is_file() else []

    # -- shared -------------------------------------------------------------------
    def on_device(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` in its logical shape, its stored bytes dequantized on ``device``
        (bit-exact with :meth:`dense` in float32; other dtypes are the float32 values rounded)."""
        from ..gguf import quants_torch

        qtype, data = self.raw(name)
        out = quants_torch.dequantize(file_bytes(data).to(device), qtype, out_dtype=dtype)
        return out.reshape(self.shape(name))

    def layer(self, i: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
        cfg, p = self.config, f"blk.{i}."
        held = set(table(cfg.arch).in_layer(i, cfg.layer_where(i)))

        def opt(name: str) -> torch.Tensor | None:
            return self.dense(p + name, dtype) if name in held else None

        moe = "ffn_gate_inp" in held
        return LayerWeights(
            index=i,
            attn_norm=self.dense(p + "attn_norm", dtype),
            wq=opt("attn_q"), wk=opt("attn_k"), wv=opt("attn_v"),
            wo=self.dense(p + "attn_output", dtype),
            q_norm=opt("attn_q_norm"),
            k_norm=opt("attn_k_norm"),
            ffn_norm=self.dense(p + ("ffn_norm" if "ffn_norm" in held else "post_attention_norm"), dtype),
            router=opt("ffn_gate_inp"),
            experts=ExpertBank(self, i, dtype) if moe else None,
            bq=opt("attn_q.bias"), bk=opt("attn_k.bias"), bv=opt("attn_v.bias"), bo=opt("attn_output.bias"),
            sinks=opt("attn_sinks"),
            router_bias=opt("ffn_gate_inp.bias"),
            wq_a=opt("attn_q_a"), q_a_norm=opt("attn_q_a_norm"), wq_b=opt("attn_q_b"),
            wkv_a=opt("attn_kv_a_mqa"), kv_a_norm=opt("attn_kv_a_norm"), wkv_b=self._kv_b(i, held, dtype),
            ffn_gate=opt("ffn_gate"), ffn_up=opt("ffn_up"), ffn_down=opt("ffn_down"),
            shexp=(self.dense(p + "ffn_gate_shexp", dtype), self.dense(p + "ffn_up_shexp", dtype),
                   self.dense(p + "ffn_down_shexp", dtype)) if "ffn_gate_shexp" in held and cfg.n_shared_experts else None,
            probs_bias=opt("exp_probs_b.bias"),
            shexp_gate=opt("ffn_gate_inp_shexp"),
        )

    def _kv_b(self, i: int, held: set[str], dtype: torch.dtype) -> torch.Tensor | None:
        """DeepSeek's ``kv_b`` as transformers' ``kv_b_proj.weight`` ``[Hq*(Dn+Dv), Rkv]``: the file's
        ``attn_kv_b``, or its split ``attn_k_b`` ``[Hq, Rkv, Dn]`` (transposed by the converter) and
        ``attn_v_b`` ``[Hq, Dv, Rkv]`` put back together."""
        p = f"blk.{i}."
        if "attn_kv_b" in held:
            return self.dense(p + "attn_kv_b", dtype)
        if "attn_k_b" not in held:
            return None
        return join_kv_b(self.dense(p + "attn_k_b", dtype), self.dense(p + "attn_v_b", dtype))

    def release_layer(self, i: int) -> None:
        """Drop layer ``i``'s mapped pages from this process, so resident memory does not grow with depth."""
        for name in table(self.config.arch).in_layer(i, self.config.layer_where(i)):
            self.release_tensor(f"blk.{i}.{name}")

    def check_tokens(self, tokens: Any) -> None:
        ids = np.asarray(tokens)
        if ids.size == 0:
            raise ModelFileError(f"{self.path}: empty token list")
        if ids.size > self.config.context_length:   # attention is T x T: refuse before allocating it
            raise ModelFileError(f"{self.path}: {ids.size} tokens, more than the model's context of "
                                 f"{self.config.context_length}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ModelFileError(
                f"{self.path}: token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )


class GGUFModel(ModelWeights):
    """A validated GGUF of a family moesnap knows: config, tensor types, and lazy weight access."""

    kind = "gguf"

    def __init__(self, gf: GGUFFile) -> None:
        self.file = gf
        self.path = gf.path
        self.config = ModelConfig.from_gguf(gf)
        # the layer count comes from metadata and every check below loops over it: bound it by the
        # tensors first (block_count = 2^32-1 built 50 billion expected shapes and never returned)
        layers = {int(n.split(".")[1]) for n in gf.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
        if self.config.n_layer > len(layers):
            raise ModelFileError(f"{gf.path}: metadata key '{self.config.arch}.block_count' = {self.config.n_layer}, "
                                 f"but the file holds tensors of {len(layers)} layers")
        cfg = self.config
        for name, shape in table(cfg.arch).expected_shapes(cfg.dims, cfg.n_layer, cfg.layer_where).items():
            t = gf.tensor(name)
            got = tuple(int(d) for d in reversed(t.shape.tolist()))
            if got != shape:
                raise ModelFileError(f"{gf.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")

    @classmethod
    def open(cls, path: str | Path) -> "GGUFModel":
        return cls(open_gguf(path))

    def fingerprint(self) -> dict[str, Any]:
        from ..util import file_sha256

        return {"file": self.path.name, "path": str(self.path.resolve()), "size": self.path.stat().st_size,
                "sha256": file_sha256(self.path)}

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self.file.tensor(name).tensor_type

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.file.tensor(name).shape.tolist()))

    def release_tensor(self, name: str) -> None:
        self.file.release(self.file.tensor(name))

    # -- inspection ---------------------------------------------------------
    def qtypes(self) -> dict[str, str]:
        """Quant type name of every tensor, e.g. {'blk.0.ffn_down_exps': 'Q6_K'}."""
        return {name.removesuffix(".weight"): t.tensor_type.name for name, t in self.file.tensors.items()}

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """(type, data as stored): uint8 blocks for quantized types, typed array otherwise."""
        t = self.file.tensor(name)
        return t.tensor_type, t.data

    # -- dequantization ------------------------------------------------------
    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.file.tensor(name)
        arr = _dequantize_rows_parallel(self.file, name, t.tensor_type, t.data)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return torch.from_numpy(arr.reshape(shape)).to(dtype)

    def rows(self, name: str, rows: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Selected rows of a 2-D tensor (the embedding for a prompt's tokens)."""
        t = self.file.tensor(name)
        data = np.asarray(t.data)[np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(_dequantize(self.file, name, t.tensor_type, data)).to(dtype)

    def n_rows(self, name: str) -> int:
        return int(self.file.tensor(name).shape[-1])

    def expert_matrix(self, layer: int, tensor: str, e: int) -> np.ndarray:
        name = f"blk.{layer}.{tensor}"
        t = self.file.tensor(name)
        return _dequantize(self.file, name, t.tensor_type, t.data[e])
