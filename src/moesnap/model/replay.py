"""Stage-local replay of one prefill: moesnap's candidate run layer by layer on a golden's values.

Each layer gets the golden's input of that layer (its ``embed`` for layer 0, the ``layer_out`` of the
layer before otherwise), and each of its stages is computed from the golden's value of the stage
before it.  A stage that diverges here is an error the layer **introduces**; one that diverges only
when the candidate runs free **inherits** it.  (The rows of a serving forward, a chunk or a decode
step, are replayed by :func:`moesnap.model.serve.replay_rows`, through a KV cache.)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..case import Case
from .candidate import CandidateModel
from .forward_io import Followed
from .faults import Faults
from .recorder import ArrayRecorder, Recorder


def followed_attr(followed: Sequence) -> list[list]:
    """Where the candidate continued with the golden's experts, as the ``router_followed`` attribute:
    ``[layer, token, [its own expert ids]]`` each."""
    return [[int(layer), int(t), [int(e) for e in ids]] for layer, t, ids in followed]


def replay_case(cand: CandidateModel, golden: Case, faults: Faults,
                progress: Callable[[int, int], None] | None = None) -> Case:
    """The candidate's stages of every layer of ``golden``, each computed from the golden's values
    (model-level stages are not replayed); attributes ``replay`` and ``router_followed``."""
    rec = ArrayRecorder()
    followed = replay_into(cand, golden, faults, rec, progress=progress)
    return Case(tokens=golden.tokens, model={}, layers=rec.stacked(), attrs=replay_attrs(followed))


def replay_attrs(followed: Sequence) -> dict[str, Any]:
    """The attributes of a replay case whose forwards followed the golden's experts at ``followed``."""
    return {"replay": True, "router_followed": followed_attr(followed)}


def replay_into(cand: CandidateModel, golden: Case, faults: Faults, rec: Recorder, *,
                progress: Callable[[int, int], None] | None = None,
                on_layer: Callable[[int, tuple[Followed, ...]], None] | None = None) -> list[Followed]:
    """:func:`replay_case`'s forwards, layer by layer, recorded into ``rec``; ``on_layer(i, followed)``
    after each layer (as :meth:`CandidateModel.forward` calls it).  Where it followed the golden's experts."""
    n = golden.n_layer
    followed: list[Followed] = []
    for i in range(n):
        x = golden.model["embed"] if i == 0 else golden.layers["layer_out"][i - 1]
        force = {stage: a[i] for stage, a in golden.layers.items() if i < a.shape[0]}
        out = cand.forward_layer(i, torch.from_numpy(np.ascontiguousarray(x)), rec, force=force, faults=faults)
        followed += out.followed
        if on_layer is not None:
            on_layer(i, out.followed)
        if progress is not None:
            progress(i + 1, n)
    return followed
