"""Where the judge computes: numpy on the host's threads, or torch on the device that holds the candidate.

The classifier's statistics have two implementations that give the same verdicts and the same numbers to
the precision the reports print (the sums differ at most in their last bits, being added in another
order): the numpy one (:mod:`moesnap.judge.classify`, :mod:`moesnap.judge.chunked`), and a torch one
(:mod:`moesnap.judge.torch_stats`, :mod:`moesnap.judge.torch_rows`) that runs on any torch device, a
CUDA GPU above all, where the check's candidate already is and the host's cores are not the bottleneck.

Which one runs is decided once per judgement (:func:`judge_device`), by the environment variable
``MOESNAP_JUDGE`` or the caller's ``mode``:

``auto`` (the default)
    torch on the candidate's device when that is a CUDA device, numpy otherwise.  Arrays smaller than
    :data:`DEVICE_MIN_ELEMENTS` stay on numpy, where they take microseconds and a device would spend
    more on launching its kernels.
``cpu``
    numpy always (``numpy`` is accepted as a synonym).
``device``
    torch always, for every array: on the candidate's device when given, else the first CUDA device
    when there is one, else torch on the CPU (how the tests hold the two paths against each other).

Arrays of a dtype the torch path does not take (unsigned integers wider than 8 bits) and float64 pairs
whose difference overflows float64 are judged by numpy whatever the choice.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError

#: the environment variable that picks the judge's arithmetic
ENV = "MOESNAP_JUDGE"
MODES: tuple[str, ...] = ("auto", "cpu", "device")
#: in ``auto`` mode, arrays below this many elements are judged by numpy
DEVICE_MIN_ELEMENTS = 1 << 16
#: the dtypes the torch path takes (numpy names); anything else is judged by numpy
DEVICE_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})


@dataclass(frozen=True)
class JudgeDevice:
    """Judge on torch device ``device`` (``"cuda:0"``, ``"cpu"``) the arrays of at least
    ``min_elements`` elements."""

    device: str
    min_elements: int = 0

    def takes(self, golden: Any, candidate: Any) -> bool:
        """Whether the pair is judged here rather than by numpy."""
        return (golden.size >= self.min_elements and str(golden.dtype) in DEVICE_DTYPES
                and str(candidate.dtype) in DEVICE_DTYPES)

    def __str__(self) -> str:
        return f"torch on {self.device}"


def _mode(mode: str | None) -> str:
    raw = os.environ.get(ENV, "") if mode is None else mode
    name = raw.strip().lower() or "auto"
    name = "cpu" if name == "numpy" else name
    if name not in MODES:
        where = f"{ENV}={raw!r}" if mode is None else f"judge={raw!r}"
        raise UsageError(f"{where}: expected one of {', '.join(MODES)}")
    return name


def judge_device(candidate_device: Any = None, mode: str | None = None) -> JudgeDevice | None:
    """Where to judge a candidate that runs on ``candidate_device`` (a torch device or its name; None: not
    a torch forward, e.g. another engine's dump): a :class:`JudgeDevice`, or None for numpy.  ``mode``:
    one of :data:`MODES` (None: ``$MOESNAP_JUDGE``, else ``auto``); a bad value is refused in one line."""
    name = _mode(mode)
    if name == "cpu":
        return None
    dev = None if candidate_device is None else str(candidate_device)
    if name == "auto":
        return JudgeDevice(dev, DEVICE_MIN_ELEMENTS) if dev is not None and dev.startswith("cuda") else None
    if dev is None:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return JudgeDevice(dev, 0)


_STREAMS = threading.local()


@contextlib.contextmanager
def stream_on(device: Any) -> Iterator[None]:
    """On a CUDA device, run the block on this thread's own stream (each judge thread's copies and kernels
    then overlap the other threads'; reading a result back waits for this thread's work alone); elsewhere
    nothing."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        yield
        return
    streams = getattr(_STREAMS, "by_device", None)
    if streams is None:
        streams = _STREAMS.by_device = {}
    key = str(dev)
    if key not in streams:
        streams[key] = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(streams[key]):
        yield


def to_device(a: Any, device: Any, start: int = 0, stop: int | None = None) -> Any:
    """Elements ``[start, stop)`` of ``a`` (a numpy array or a torch tensor) flattened, as a torch tensor
    on ``device`` in its own dtype (``torch.as_tensor``: no copy on the CPU, none through the host's
    memory to a GPU, and no warning for a read-only golden)."""
    import torch

    if isinstance(a, torch.Tensor):
        return a.reshape(-1)[start:stop].to(device)
    return torch.as_tensor(np.ascontiguousarray(a).reshape(-1)[start:stop], device=device)
