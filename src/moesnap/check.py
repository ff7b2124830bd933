"""The check: run the candidate forward on each golden case's tokens and judge every stage.

With ``replay`` each layer of the candidate is also run on the *golden* input
of that layer (the golden ``embed`` for layer 0, the golden ``layer_out`` of
the layer before otherwise).  A stage that diverges in replay is an error the
layer **introduces**; one that diverges only when running free is an error it
**inherits** from the layers before.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .case import Case, from_recorder
from .compare import CaseReport, Report, compare_cases
from .errors import GoldenError
from .inject import Injection
from .recorder import ArrayRecorder
from .tolerances import Tolerances
from .util import LayerProgress, file_sha256
from .weights import GGUFModel


def check_golden_matches_model(cases: Sequence[tuple[str, Case]], model: GGUFModel, *, where: str,
                               meta: dict | None = None) -> None:
    """Refuse goldens made from another model file, or whose tokens the model cannot run."""
    sha = None
    for source in [meta or {}] + [c.attrs for _, c in cases]:
        m = source.get("model") if isinstance(source, dict) else None
        if isinstance(m, dict) and m.get("sha256"):
            sha = m["sha256"]
            break
    if sha is not None:
        mine = file_sha256(model.path)
        if sha != mine:
            raise GoldenError(f"{where}: golden was made from another model file "
                              f"(sha256 {sha[:12]}…, {model.path.name} is {mine[:12]}…)")
    for name, c in cases:
        ids = c.attrs.get("token_ids")
        if ids is not None and (not isinstance(ids, list)
                                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise GoldenError(f"{where}/{name}: attribute 'token_ids' is not a list of integers")
        if ids is not None and ids != c.tokens.tolist():
            raise GoldenError(f"{where}/{name}: tokens array differs from the recorded token ids")
        bad = c.tokens[(c.tokens < 0) | (c.tokens >= model.config.vocab_size)]
        if bad.size:
            raise GoldenError(f"{where}/{name}: token id {int(bad[0])} is outside the vocabulary of {model.path.name}")
        if c.n_layer and c.n_layer != model.config.n_layer:
            raise GoldenError(f"{where}/{name}: golden has {c.n_layer} layers, {model.path.name} has {model.config.n_layer}")


def _replay_case(cand, golden: Case, free: Case, progress=None) -> Case:
    """Run each layer on the golden input of that layer; model-level stages are not replayed."""
    rec = ArrayRecorder()
    n = golden.n_layer
    for i in range(n):
        x = golden.model["embed"] if i == 0 else golden.layers["layer_out"][i - 1]
        cand.forward_layer(i, torch.from_numpy(np.ascontiguousarray(x)), rec)
        if progress is not None:
            progress(i + 1, n)
    return Case(tokens=golden.tokens, model={}, layers=rec.stacked(), attrs={"replay": True})


def run_check(model: GGUFModel, goldens: Sequence[tuple[str, Case]], *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, replay: bool = False, injections: Sequence[Injection] = (),
              tols: Tolerances | None = None, golden_ref: str = "golden", show_progress: bool = True) -> Report:
    from .candidate import CandidateModel

    tols = tols or Tolerances.defaults()
    dname = str(dtype).removeprefix("torch.")
    cand = CandidateModel(model, device=device, dtype=dtype, injections=injections)
    cases: list[CaseReport] = []
    replays: list[CaseReport] | None = [] if replay else None
    for name, golden in goldens:
        rec = ArrayRecorder()
        bar = LayerProgress(f"check {name}", enabled=show_progress)
        cand.forward(golden.tokens, rec, progress=bar)
        bar.close()
        free = from_recorder(rec, {"dtype": dname})
        cases.append(compare_cases(golden, free, tols, dtype=dname, name=name))
        if replays is not None:
            bar = LayerProgress(f"replay {name}", enabled=show_progress)
            rcase = _replay_case(cand, golden, free, progress=bar)
            bar.close()
            replays.append(compare_cases(golden, rcase, tols, dtype=dname, name=name, allow_missing=True,
                                         propagate=False))
    notes = [f"injected fault: {inj}" for inj in injections]
    notes.append(f"candidate: {device} {dname}, experts via {cand.expert_path}")
    return Report(cases=cases, golden=golden_ref, candidate=f"moesnap candidate ({device}, {dname})", dtype=dname,
                  mode="free-running + replay" if replay else "free-running", replay=replays, notes=notes)
