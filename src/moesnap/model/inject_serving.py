"""Planted faults against a planned serving run: :func:`check_serving` refuses, in one line naming the spec,
a fault of :mod:`moesnap.model.inject` that cannot fire in a :class:`ServePlan` (a self-test that cannot
fire proves nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import UsageError
from .inject import BlockTable, GraphStale, Injection, NanExpert, PadAttend, RopePos, RouteFlip, ServeFault, SwapRows

__all__ = ["ServePlan", "check_serving"]


@dataclass(frozen=True)
class ServePlan:
    """A planned serving run: each sequence's prompt length, the decode steps after the prompts (every
    sequence one token per step), a paged cache or a contiguous one, and whether the decode steps run on
    static buffers (``graph``: :class:`~moesnap.model.serve.GraphDecoder`)."""

    prompt_lens: tuple[int, ...]
    decode: int
    paged: bool = False
    block_size: int = 16
    graph: bool = False


def check_serving(injections: Sequence[Injection], plan: ServePlan) -> None:
    """Refuse, in one line naming the spec, a planted fault that cannot fire in ``plan`` (a self-test
    that cannot fire proves nothing)."""
    n = len(plan.prompt_lens)
    last = [p + plan.decode - 1 for p in plan.prompt_lens]   # each sequence's last decode position
    for inj in injections:
        why = None
        if isinstance(inj, ServeFault) and plan.decode < 1:
            why = "it acts in decode steps only, and the run has none (--decode N)"
        elif plan.graph and isinstance(inj, (NanExpert, RouteFlip)):
            why = "the decode steps run in a CUDA graph (static buffers), where it is not planted; run them eagerly"
        elif isinstance(inj, RopePos) and inj.step >= plan.decode:
            why = f"the run has {plan.decode} decode step{'s' if plan.decode != 1 else ''} (0..{plan.decode - 1})"
        elif isinstance(inj, GraphStale) and not plan.graph:
            why = "it needs the decode steps on a CUDA graph's static buffers (--cuda-graph)"
        elif isinstance(inj, GraphStale) and inj.step >= plan.decode:
            why = f"the run has {plan.decode} decode steps (0..{plan.decode - 1})"
        elif isinstance(inj, BlockTable):
            if not plan.paged:
                why = "it needs a paged KV cache (--paged)"
            elif n < 2:
                why = "it needs a batch of at least 2 sequences (another sequence's block to point at)"
            elif inj.seq >= n:
                why = f"seq={inj.seq} is out of range: the batch has {n} sequences"
            elif last[inj.seq] < inj.block * plan.block_size:
                why = (f"sequence {inj.seq} never reaches block {inj.block} (its last decode position is "
                       f"{last[inj.seq]}, blocks of {plan.block_size})")
        elif isinstance(inj, PadAttend) and not plan.graph and len(set(plan.prompt_lens)) < 2:
            why = ("no decode step has padding: it needs a batch of sequences of different lengths"
                   if n > 1 else "a single sequence has no padding: it needs a batch of sequences of different lengths")
        elif isinstance(inj, SwapRows) and n < 2:
            why = "it needs a batch of at least 2 sequences"
        if why is not None:
            raise UsageError(f"{inj.option}: the planted fault cannot fire ({why})")
