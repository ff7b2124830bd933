"""HF checkpoints as model files: a directory of ``config.json`` and ``*.safetensors`` for Qwen3-MoE
and gpt-oss (its fused and MXFP4 experts: :mod:`moesnap.model.checkpoint_gpt_oss`).

What engines served from HF checkpoints (vLLM, SGLang, transformers) load: ``config.json`` plus one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, float32, float16 or
bfloat16, experts stored one by one (``model.layers.{L}.mlp.experts.{e}.gate_proj.weight``, as
transformers' ``save_pretrained`` writes them) or fused (``mlp.experts.gate_up_proj`` ``[E, 2F, H]``,
``mlp.experts.down_proj`` ``[E, H, F]``).  :class:`CheckpointModel` presents such a directory
through the same interface as a GGUF file (:class:`~moesnap.model.weights.ModelWeights`): tensors
are named as in GGUF, mapped with gguf-py's ``TensorNameMap`` for Qwen3-MoE, and validated against
the family's tensor table (:meth:`~moesnap.model.tensors.TensorTable.expected_shapes`).

Each shard's safetensors header is parsed here and its data memory-mapped (``np.memmap``):
nothing is read until a layer runs, bfloat16 stays as its stored bits until dequantized (numpy has
no bfloat16, which is why safetensors' own numpy loader is not used), and a layer's pages are
dropped after it ran, as on the GGUF path.  Every header field is checked before use: a missing
shard, an offset outside the file, a shape that disagrees with its byte count or with the config,
an unknown architecture -- each a :class:`~moesnap.errors.ModelFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..errors import ModelFileError
from .checkpoint_gpt_oss import FUSED as GPT_OSS_FUSED
from .checkpoint_gpt_oss import Make, expert_recipes, gpt_oss_config, is_gpt_oss
from .config import GPT_OSS, ModelConfig
from .tensors import EXPERT_TENSORS, table
from .weights import ModelWeights

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ARCHITECTURES = ("Qwen3MoeForCausalLM",)
MODEL_TYPES = ("qwen3_moe",)
MAX_HEADER = 100 << 20      # safetensors' own limit on the JSON header

# safetensors dtype -> (numpy dtype of the stored bits, GGML type of those bits)
_DTYPES: dict[str, tuple[np.dtype, GGMLQuantizationType]] = {
    "F32": (np.dtype("<f4"), GGMLQuantizationType.F32),
    "F16": (np.dtype("<f2"), GGMLQuantizationType.F16),
    "BF16": (np.dtype("<u2"), GGMLQuantizationType.BF16),
}
# what moesnap reads the stored bits as, by safetensors dtype (U8: MXFP4 blocks and scales)
_NUMPY: dict[str, np.dtype] = {**{k: v[0] for k, v in _DTYPES.items()}, "U8": np.dtype("u1")}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_KIND = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


@dataclass(frozen=True)
class _Stored:
    """One safetensors tensor: where its bytes are and what they hold."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int        # absolute byte offset in the shard
    end: int


@dataclass
class _Derived:
    """A GGUF tensor made from stored ones (gpt-oss's fused or MXFP4 experts): ``make`` of their
    arrays gives its data as GGUF stores it (MXFP4 rows of bytes, or floats in the stored dtype)."""

    parts: tuple[_Stored, ...]
    make: Make
    mxfp4: bool
    shape: tuple[int, ...] = ()       # logical (numpy) shape, set once checked against config.json

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType.MXFP4 if self.mxfp4 else _DTYPES[self.parts[0].dtype][1]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing ({what})") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({str(e)[:120]})") from None


def _header(path: Path) -> dict[str, _Stored]:
    """The tensors a safetensors file holds, every field checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise ModelFileError(f"{path}: safetensors header of {n} bytes does not fit the file ({size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing (a shard the checkpoint names)") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ModelFileError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    out: dict[str, _Stored] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelFileError(f"{path}: tensor {name!r}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ModelFileError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1] and base + offs[1] <= size):
            raise ModelFileError(f"{path}: tensor {name!r}: data_offsets {offs!r} lie outside the file")
        if dtype in _NUMPY:
            want = math.prod(shape) * _NUMPY[dtype].itemsize
            if offs[1] - offs[0] != want:
                raise ModelFileError(f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes for a {dtype} {shape}, "
                                     f"expected {want}")
        out[name] = _Stored(path, str(dtype), tuple(shape), base + offs[0], base + offs[1])
    return out


def _positive_int(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ModelFileError(f"{where}: {key!r} = {v!r} must be a positive integer")
    return v


def config_from_json(path: Path) -> ModelConfig:
    """moesnap's config from an HF ``config.json`` of a Qwen3-MoE or a gpt-oss model (transformers 4.x
    or 5.x keys; gpt-oss's own: :func:`~moesnap.model.checkpoint_gpt_oss.gpt_oss_config`)."""
    cfg = _read_json(path, "the checkpoint's config")
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    archs = cfg.get("architectures") or []
    gpt_oss = is_gpt_oss(cfg)
    if not gpt_oss and cfg.get("model_type") not in MODEL_TYPES and not (isinstance(archs, list)
                                                                          and set(archs) & set(ARCHITECTURES)):
        raise ModelFileError(f"{path}: architecture {archs or cfg.get('model_type')!r} is not Qwen3-MoE "
                             f"(model_type qwen3_moe, Qwen3MoeForCausalLM) or gpt-oss (gpt_oss, GptOssForCausalLM)")
    rp = cfg.get("rope_parameters")
    rope: dict[str, Any] = rp if isinstance(rp, dict) else {}
    if not gpt_oss:
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ModelFileError(f"{path}: dense layers (mlp_only_layers / decoder_sparse_step) are not supported; "
                                 f"every layer must be sparse")
        if cfg.get("tie_word_embeddings"):
            raise ModelFileError(f"{path}: tie_word_embeddings is not supported (Qwen3-MoE has its own lm_head)")
        if cfg.get("norm_topk_prob") is False:
            raise ModelFileError(f"{path}: norm_topk_prob = false is not supported (moesnap renormalises the top-k)")
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ModelFileError(f"{path}: rope scaling is not supported (rope_type {rope.get('rope_type')!r})")
    n_head = _positive_int(cfg, "num_attention_heads", path)
    hidden = _positive_int(cfg, "hidden_size", path)
    head_dim = cfg.get("head_dim", hidden // n_head)
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
        raise ModelFileError(f"{path}: rope_theta = {theta!r} must be a positive number")
    eps = cfg.get("rms_norm_eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < 1):
        raise ModelFileError(f"{path}: rms_norm_eps = {eps!r} must be a small positive number")
    n_expert = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not isinstance(n_expert, int) or isinstance(n_expert, bool) or n_expert <= 0:
        raise ModelFileError(f"{path}: num_experts = {n_expert!r} must be a positive integer")
    n_head_kv = _positive_int(cfg, "num_key_value_heads", path)
    n_used = _positive_int(cfg, "num_experts_per_tok", path)
    if n_head % n_head_kv:
        raise ModelFileError(f"{path}: num_attention_heads = {n_head} is not a multiple of num_key_value_heads = {n_head_kv}")
    if n_used > n_expert:
        raise ModelFileError(f"{path}: num_experts_per_tok = {n_used} exceeds num_experts = {n_expert}")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0 or head_dim % 2:
        raise ModelFileError(f"{path}: head_dim = {head_dim!r} must be a positive even integer")
    shape: dict[str, Any] = dict(
        n_layer=_positive_int(cfg, "num_hidden_layers", path), hidden=hidden, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_expert=n_expert, n_expert_used=n_used,
        expert_ff=_positive_int(cfg, "intermediate_size" if gpt_oss else "moe_intermediate_size", path),
        vocab_size=_positive_int(cfg, "vocab_size", path), rope_base=float(theta), rms_eps=float(eps),
        context_length=_positive_int(cfg, "max_position_embeddings", path),
    )
    return gpt_oss_config(cfg, path, shape) if gpt_oss else ModelConfig(**shape)


def is_checkpoint(path: str | Path) -> bool:
    """A directory holding a ``config.json`` (what :func:`~moesnap.model.load.open_model` treats as a checkpoint)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).exists()


class CheckpointModel(ModelWeights):
    """A Qwen3-MoE HF checkpoint directory, read lazily through memory maps (module docstring)."""

    kind = "hf-checkpoint"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFileError(f"{self.path}: not a directory (an HF checkpoint is config.json + *.safetensors)")
        self.config = config_from_json(self.path / CONFIG)
        self.shards = self._shards()
        stored: dict[str, _Stored] = {}
        for shard in self.shards:
            for name, t in _header(shard).items():
                if name in stored:
                    raise ModelFileError(f"{shard}: tensor {name!r} is also in {stored[name].shard.name}")
                stored[name] = t
        self._maps: dict[Path, np.memmap] = {}
        self._derived: dict[str, _Derived] = {}
        self._tensors: dict[str, list[_Stored]] = self._map_names(stored)
        for name, shape in table(self.config.arch).expected_shapes(self.config.dims, self.config.n_layer).items():
            d = self._derived.get(name)
            if d is not None:
                self._check_derived(name, d, shape)
                continue
            parts = self._tensors.get(name)
            if parts is None:
                raise ModelFileError(f"{self.path}: no tensor for {name!r} (HF name "
                                     f"{self._hf_hint(name)}) in {', '.join(s.name for s in self.shards)}")
            got = self.shape(name)
            if got != shape:
                raise ModelFileError(f"{parts[0].shard}: tensor for {name!r} has shape {list(got)}, expected "
                                     f"{list(shape)} (config.json)")
            for t in parts:
                if t.dtype not in _DTYPES:
                    raise ModelFileError(f"{t.shard}: tensor for {name!r} has dtype {t.dtype!r}; moesnap reads "
                                         f"F32, F16 and BF16 checkpoints")
            if len({t.dtype for t in parts}) > 1:
                raise ModelFileError(f"{parts[0].shard}: the experts of {name!r} are stored in mixed dtypes")

    def _check_derived(self, name: str, d: _Derived, shape: tuple[int, ...]) -> None:
        """A gpt-oss expert tensor made from fused (or MXFP4) stored ones: dtypes and shapes as config.json says."""
        want = ("U8",) * len(d.parts) if d.mxfp4 else (d.parts[0].dtype,)
        got_dtypes = tuple(t.dtype for t in d.parts)
        if got_dtypes != want or (not d.mxfp4 and want[0] not in _DTYPES):
            raise ModelFileError(f"{d.parts[0].shard}: {', '.join(t.shard.name + ':' + t.dtype for t in d.parts)} "
                                 f"for {name!r}: expected {'uint8 MXFP4 blocks and scales' if d.mxfp4 else 'F32, F16 or BF16'}")
        if d.mxfp4:   # blocks [E, R, G, 16] and scales [E, R, G] of R rows of G blocks of 32 values
            blocks, scales = (t.shape for t in d.parts)
            rows = shape[1] * (2 if name.endswith(("ffn_gate_exps", "ffn_up_exps")) else 1)   # gate and up interleaved
            ok = (len(blocks) == 4 and blocks[-1] == 16 and scales == blocks[:3]
                  and (blocks[0], blocks[1], blocks[2] * 32) == (shape[0], rows, shape[2]))
            if not ok:
                raise ModelFileError(f"{d.parts[0].shard}: MXFP4 blocks {list(blocks)} / scales {list(scales)} for "
                                     f"{name!r} do not hold a {list(shape)} tensor (config.json)")
        else:         # the recipe applied to expert 0 alone gives every dimension but the experts'
            one = d.make([self._view(t)[:1] for t in d.parts])
            got = (d.parts[0].shape[0], *one.shape[1:])
            if got != shape:
                raise ModelFileError(f"{d.parts[0].shard}: tensor {list(d.parts[0].shape)} for {name!r} gives "
                                     f"{list(got)}, expected {list(shape)} (config.json)")
        d.shape = shape

    # -- layout -----------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        index = self.path / INDEX
        if index.exists():
            data = _read_json(index, "the shard index")
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ModelFileError(f"{index}: has no weight_map of tensor names to shard files")
            names = sorted(set(wm.values()))
            for n in names:
                if Path(n).name != n:
                    raise ModelFileError(f"{index}: shard name {n!r} is not a file name in the checkpoint directory")
                if not (self.path / n).is_file():
                    raise ModelFileError(f"{self.path / n}: missing (a shard {INDEX} names)")
            return [self.path / n for n in names]
        single = self.path / SINGLE
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise ModelFileError(f"{self.path}: no {SINGLE}, and {len(found)} *.safetensors files without {INDEX}")

    def _map_names(self, stored: dict[str, _Stored]) -> dict[str, list[_Stored]]:
        gpt_oss = self.config.arch == GPT_OSS
        arch = gguf.MODEL_ARCH.GPT_OSS if gpt_oss else gguf.MODEL_ARCH.QWEN3MOE
        tmap = gguf.get_tensor_name_map(arch, self.config.n_layer)
        out: dict[str, list[_Stored]] = {}
        experts: dict[str, dict[int, _Stored]] = {}
        fused: dict[int, dict[str, str]] = {}          # gpt-oss: layer -> stored suffix -> name
        for name, t in stored.items():
            m = _EXPERT.match(name)
            if m and not gpt_oss:
                layer, e, kind = int(m.group(1)), int(m.group(2)), _KIND[m.group(3)]
                experts.setdefault(f"blk.{layer}.{kind}", {})[e] = t
                continue
            g = GPT_OSS_FUSED.match(name)
            if g and gpt_oss:
                fused.setdefault(int(g.group(1)), {})[g.group(2) + (g.group(3) or "")] = name
                continue
            if _FUSED.match(name) or m:
                raise ModelFileError(f"{t.shard}: expert tensor {name!r} is not laid out as a "
                                     f"{'gpt-oss' if gpt_oss else 'Qwen3-MoE'} checkpoint stores it"
                                     + ("" if gpt_oss else " (save it with experts stored one by one, as "
                                                           "transformers' save_pretrained does)"))
            mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias") if gpt_oss else (".weight",))
            if mapped is None:
                continue     # rotary buffers and the like: not weights moesnap needs
            out[mapped.removesuffix(".weight")] = [t]
        for name, by_e in experts.items():
            missing = sorted(set(range(self.config.n_expert)) - set(by_e))
            if missing:
                raise ModelFileError(f"{self.path}: {name}: experts {missing[:4]} missing (of {self.config.n_expert})")
            out[name] = [by_e[e] for e in range(self.config.n_expert)]
        for layer, names in fused.items():
            for kind, (sources, make, mxfp4) in expert_recipes(names).items():
                self._derived[f"blk.{layer}.{kind}"] = _Derived(tuple(stored[n] for n in sources), make, mxfp4)
        return out

    @staticmethod
    def _hf_hint(name: str) -> str:
        return {"token_embd": "model.embed_tokens.weight", "output": "lm_head.weight",
                "output_norm": "model.norm.weight"}.get(name, "model.layers.N....")

    def _view(self, t: _Stored) -> np.ndarray:
        mm = self._maps.get(t.shard)
        if mm is None:
            mm = self._maps[t.shard] = np.memmap(t.shard, dtype=np.uint8, mode="r")
        return mm[t.begin:t.end].view(_NUMPY[t.dtype]).reshape(t.shape)

    def _stored(self, name: str) -> list[_Stored]:
        parts = self._tensors.get(name.removesuffix(".weight"))
        if parts is None:
            raise ModelFileError(f"{self.path}: no tensor {name!r}")
        return parts

    def _made(self, d: _Derived, e: int | None = None) -> np.ndarray:
        """A derived tensor's data as GGUF stores it; of expert ``e`` alone (``[1, ...]``) when given."""
        return d.make([self._view(t) if e is None else self._view(t)[e:e + 1] for t in d.parts])

    def _dequantized(self, d: _Derived, e: int | None = None) -> torch.Tensor:
        data = self._made(d, e)
        if d.mxfp4:
            out = gguf.quants.dequantize(data, GGMLQuantizationType.MXFP4)
            return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
        return self._float(data, d.parts[0].dtype)

    # -- ModelWeights -------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The directory, and a sha256 over every file that defines the weights (config, index, shards)."""
        files = self.hashed_files()
        each = {f.name: _sha256(f) for f in files}
        whole = hashlib.sha256(json.dumps(each, sort_keys=True).encode()).hexdigest()
        return {"file": self.path.name, "path": str(self.path.resolve()), "size": sum(f.stat().st_size for f in files),
                "sha256": whole, "files": each, "format": "hf-checkpoint"}

    def hashed_files(self) -> list[Path]:
        return [self.path / CONFIG] + ([self.path / INDEX] if (self.path / INDEX).exists() else []) + self.shards

    def qtypes(self) -> dict[str, str]:
        return {**{name: _DTYPES[parts[0].dtype][1].name for name, parts in self._tensors.items()},
                **{name: d.qtype.name for name, d in self._derived.items()}}

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        d = self._derived.get(name)
        return d.qtype if d is not None else _DTYPES[self._stored(name)[0].dtype][1]

    def shape(self, name: str) -> tuple[int, ...]:
        d = self._derived.get(name)
        if d is not None:
            return d.shape
        parts = self._stored(name)
        return (len(parts), *parts[0].shape) if len(parts) > 1 or name.split(".")[-1] in EXPERT_TENSORS else parts[0].shape

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        d = self._derived.get(name)
        if d is not None:
            return d.qtype, self._made(d)
        parts = self._stored(name)
        qtype = _DTYPES[parts[0].dtype][1]
        if len(parts) == 1 and name.split(".")[-1] not in EXPERT_TENSORS:
            return qtype, self._view(parts[0])
        return qtype, np.stack([self._view(t) for t in parts])     # experts: [E, ...], one copy per layer

    def release_tensor(self, name: str) -> None:
        d = self._derived.get(name)
        for t in d.parts if d is not None else self._tensors.get(name.removesuffix(".weight"), []):
            mm = self._maps.get(t.shard)
            base = getattr(mm, "_mmap", None)
            if base is None or not hasattr(base, "madvise"):
                continue
            start = t.begin // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                base.madvise(mmap.MADV_DONTNEED, start, t.end - start)
            except (OSError, ValueError, AttributeError):
                pass

    @staticmethod
    def _float(a: np.ndarray, dtype_name: str) -> torch.Tensor:
        """Stored values as a float32 tensor (bfloat16 bits widened exactly)."""
        if dtype_name == "BF16":
            return torch.from_numpy(np.array(a, dtype=np.uint16)).view(torch.bfloat16).float()
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self._derived.get(name)
        if d is not None:
            return self._dequantized(d).reshape(d.shape).to(dtype)
        parts = self._stored(name)
        if len(parts) > 1:
            return torch.stack([self._float(self._view(t), t.dtype) for t in parts]).to(dtype)
        return self._float(self._view(parts[0]), parts[0].dtype).to(dtype)

    def rows(self, name: str, rows: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self._stored(name)[0]
        return self._float(self._view(t)[np.asarray(rows, dtype=np.int64)], t.dtype).to(dtype)

    def n_rows(self, name: str) -> int:
        return int(self._view(self._stored(name)[0]).shape[0])

    def expert_matrix(self, layer: int, tensor: str, e: int) -> np.ndarray:
        name = f"blk.{layer}.{tensor}"
        d = self._derived.get(name)
        if d is not None:
            return self._dequantized(d, e).reshape(d.shape[1:]).numpy()
        t = self._stored(name)[e]
        return self._float(self._view(t), t.dtype).numpy()


def _sha256(path: Path) -> str:
    from ..util import file_sha256

    return file_sha256(path)
