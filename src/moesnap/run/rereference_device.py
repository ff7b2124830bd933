"""The local re-reference's weights on a torch device: one layer at a time, as on the host.

A layer's dense weights are dequantized on the host (:meth:`~moesnap.model.weights.ModelWeights.layer`,
a few matrices) and copied to the device; its experts' stored bytes are copied there once, and each
expert the router selects is dequantized there (:mod:`moesnap.gguf.quants_torch`: bit-exact with the
host's float32 dequantization), not on the host's cores, where a layer's 128 experts of the 30B-A3B
shape took seconds.  A type the device decoder lacks is dequantized on the host and copied.  The
whole-model tensors (``output_norm``, the lm head) likewise.  Everything in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from ..gguf import quants_torch
from ..model.weights import ExpertBank, LayerWeights, ModelWeights, file_bytes


class DeviceExpertBank(ExpertBank):
    """One layer's experts on ``device``: the stored bytes of each expert tensor copied once, an expert
    dequantized there when asked."""

    def __init__(self, host: ExpertBank, device: torch.device) -> None:
        # not ExpertBank.__init__: the host bank has read the biases already
        self.model, self.layer, self.dtype, self.names = host.model, host.layer, host.dtype, host.names
        self.device = device
        self.biases = None if host.biases is None else tuple(b.to(device) for b in host.biases)
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


def layer_on(model: ModelWeights, i: int, device: torch.device) -> LayerWeights:
    """Layer ``i``'s weights in float32 on ``device``: the dense ones dequantized on the host and copied, the
    experts a :class:`DeviceExpertBank`."""
    w = model.layer(i, torch.float32)
    moved: dict[str, object] = {}
    for f in dataclasses.fields(w):
        v = getattr(w, f.name)
        if isinstance(v, torch.Tensor):
            moved[f.name] = v.to(device)
        elif isinstance(v, tuple):
            moved[f.name] = tuple(t.to(device) for t in v)
        elif isinstance(v, ExpertBank):
            moved[f.name] = DeviceExpertBank(v, device)
    return dataclasses.replace(w, **moved)   # type: ignore[arg-type]


def output_on(model: ModelWeights, device: torch.device) -> torch.Tensor:
    """The lm head ``[V, H]`` in float32 on ``device``."""
    if model.tensor_type("output") in quants_torch.SUPPORTED:
        return model.on_device("output", device, torch.float32)
    return model.dense("output", torch.float32).to(device)


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
