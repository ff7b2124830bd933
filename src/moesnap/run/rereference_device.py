"""The local re-reference's weights on a torch device: one layer at a time, as on the host.

:class:`DeviceWeights` is a model seen from a device: each tensor's stored bytes are copied there and
dequantized there (:mod:`moesnap.gguf.quants_torch`: bit-exact with the host's float32 dequantization),
not on the host's cores, where a layer's 128 experts of the 30B-A3B shape took seconds; a type the
device decoder lacks is dequantized on the host and copied.  Its :meth:`~DeviceWeights.layer` is the
model's own (:meth:`~moesnap.model.weights.ModelWeights.layer`: the same tensors, the same family
logic), with the experts a :class:`DeviceExpertBank`: their bytes copied once per layer, each expert the
router selects dequantized when asked.  Everything in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..gguf import quants_torch
from ..model.weights import ExpertBank, LayerWeights, ModelWeights, file_bytes


class DeviceWeights(ModelWeights):
    """``model``'s tensors dequantized on ``device`` by :meth:`dense` and :meth:`layer`; everything else is
    ``model``'s."""

    def __init__(self, model: ModelWeights, device: torch.device) -> None:
        self.model, self.device = model, device
        self.path, self.config, self.kind = model.path, model.config, model.kind

    def qtypes(self) -> dict[str, str]:
        return self.model.qtypes()

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return self.model.tensor_type(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.shape(name)

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        return self.model.raw(name)

    def release_tensor(self, name: str) -> None:
        self.model.release_tensor(name)

    def rows(self, name: str, rows: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.model.rows(name, rows, dtype).to(self.device)

    def n_rows(self, name: str) -> int:
        return self.model.n_rows(name)

    def expert_matrix(self, layer: int, tensor: str, e: int) -> np.ndarray:
        return self.model.expert_matrix(layer, tensor, e)

    def fingerprint(self) -> dict[str, Any]:
        return self.model.fingerprint()

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` dequantized on the device (on the host where the device decoder lacks its type)."""
        if self.tensor_type(name) in quants_torch.SUPPORTED:
            return self.model.on_device(name, self.device, torch.float32).to(dtype)
        return self.model.dense(name, dtype).to(self.device)

    def layer(self, i: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
        w = super().layer(i, dtype)
        return w if w.experts is None else dataclasses.replace(w, experts=DeviceExpertBank(w.experts, self.device))


class DeviceExpertBank(ExpertBank):
    """One layer's experts on ``device``: the stored bytes of each expert tensor copied once, an expert
    dequantized there when asked."""

    def __init__(self, bank: ExpertBank, device: torch.device) -> None:
        # not ExpertBank.__init__: ``bank`` has read the biases already
        self.model, self.layer, self.dtype, self.names, self.biases = bank.model, bank.layer, bank.dtype, bank.names, bank.biases
        self.device = device
        self._stored: dict[str, torch.Tensor | None] = {}
        for n in self.names:      # here, not when first asked: experts are asked for on the dequantizing threads
            qtype, data = self.model.raw(f"blk.{self.layer}.{n}")
            self._stored[n] = file_bytes(data).to(device) if qtype in quants_torch.SUPPORTED else None

    def _matrix(self, name: str, e: int) -> torch.Tensor:
        full = f"blk.{self.layer}.{name}"
        stored = self._stored[name]
        if stored is None:
            return torch.from_numpy(self.model.expert_matrix(self.layer, name, e)).to(self.device, self.dtype)
        out = quants_torch.dequantize(stored[e], self.model.tensor_type(full), out_dtype=torch.float32)
        return out.reshape(self.model.shape(full)[1:]).to(self.dtype)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [F, H], up [F, H], down [H, F]) of expert ``e``, on the device."""
        gate, up, down = (self._matrix(n, e) for n in self.names)
        return gate, up, down


@contextlib.contextmanager
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """float32 matmuls on a CUDA device in float32, not TF32 (as the host computes them), for the block."""
    if device.type != "cuda":
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
