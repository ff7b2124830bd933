"""Helpers of the family tests (test_qwen2moe.py, test_mixtral.py, test_olmoe.py, test_candidate_*.py):
rewrite a GGUF with metadata keys dropped or changed, judge a family's goldens end to end, and the checks
every family's candidate passes (router replay at a planted flip, static-buffer decode steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from moesnap.cli.main import main
from moesnap.judge.routing import tie_gap
from moesnap.model.candidate import CandidateModel, RouterReplay
from moesnap.model.inject import RouteFlip
from moesnap.model.recorder import ArrayRecorder
from moesnap.stages import FAMILY_STAGES, ROUTING_SCORES

TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7]


def rewrite(src: Path, out: Path, *, drop: tuple[str, ...] = (), override: dict[str, tuple[Any, GGUFValueType]] | None = None,
            skip_tensors: tuple[str, ...] = (), edit: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Path:
    """``src`` copied to ``out`` without the metadata keys ``drop`` (and the tensors ``skip_tensors``),
    with ``override`` {key: (value, type)} set and each tensor's data through ``edit(name, data)``."""
    r = GGUFReader(str(src))
    w = GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    override = dict(override or {})
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in drop or f.name == "general.architecture" or f.name in override:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for key, (value, vtype) in override.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name not in skip_tensors:
            data = np.asarray(t.data)
            w.add_tensor(t.name, data if edit is None else edit(t.name, data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def judge_goldens(path: Path, arch: str, tmp_path: Path, capsys) -> dict:
    """Generate goldens of ``path``, judge them against themselves (every cell of the family's stages
    judged, a pass) and check moesnap's candidate against them on the CPU (a pass, exit 0); the golden's
    recorded config."""
    store = tmp_path / "goldens"
    assert main(["goldens", "generate", str(path), "--suite", "f", "--store", str(store), "--tokens",
                 ",".join(map(str, TOKENS)), "-q"]) == 0
    attrs = json.loads((store / "f" / "v0001" / "case0" / "zarr.json").read_text())["attributes"]
    config = attrs["model"]["config"]
    assert config["arch"] == arch
    capsys.readouterr()
    case = str(store / "f" / "v0001" / "case0")
    assert main(["compare", case, case, "--no-local"]) == 0
    out = capsys.readouterr().out
    assert "verdict: pass" in out, out
    layer0 = next(line for line in out.splitlines() if line.startswith("L00"))
    assert layer0.split("|")[0].count(".") == len(FAMILY_STAGES[arch]), out
    assert main(["check", str(path), "--suite", "f", "--store", str(store), "--device", "cpu", "-q"]) == 0, \
        capsys.readouterr()
    return config


def close(c: np.ndarray, r: np.ndarray, rel: float) -> bool:
    """``c`` within ``rel`` of the largest magnitude of ``r``, where ``r`` is finite (a dense layer's filler
    rows of the MoE stages are NaN in both)."""
    ok = np.isfinite(r)
    assert (np.isfinite(c) == ok).all()
    return bool(np.abs(c[ok] - r[ok]).max(initial=0) <= rel * np.abs(r[ok]).max(initial=0))


def assert_router_replay(model, tokens: list[int], golden: dict[str, np.ndarray], layer: int, tie_tol: float,
                         follows: bool, rel: float) -> None:
    """Token 3 of ``layer`` flipped (``route``): with ``follows`` (a tie width that admits the flip's gap on
    the family's ranking scores, :data:`~moesnap.stages.ROUTING_SCORES`) it continues with the golden's
    experts, weighted as the golden weighs them (within ``rel``), and the flip did not fire; else the flip
    stays (a divergence)."""
    scores = golden[ROUTING_SCORES[model.config.arch]]
    guide = RouterReplay(golden["topk_ids"], scores, tie_tol, tie_gap)
    cand = CandidateModel(model)
    faults = cand.faults([RouteFlip(layer=layer, token=3)])
    rec = ArrayRecorder()
    _, followed = cand.forward(tokens, rec, router_replay=guide, faults=faults)
    got, want = rec.stacked()["topk_ids"][layer][3], golden["topk_ids"][layer][3]
    if follows:
        assert set(got.tolist()) == set(want.tolist()) and [(f.layer, f.token) for f in followed] == [(layer, 3)]
        assert close(rec.stacked()["topk_weights"][layer], golden["topk_weights"][layer], rel)
        assert not faults.fired                              # replay undid the flip
    else:
        assert set(got.tolist()) != set(want.tolist()) and followed == () and faults.fired


def assert_static_decode_is_the_sessions(model, tokens: list[int], prefix: int, stages: tuple[str, ...] = ()) -> None:
    """After a prefill of ``tokens[:prefix]``, each later token's decode step on static buffers (a CUDA graph
    on CUDA; eager here) computes what the session's step computes, in ``stages`` (every stage: ``()``)."""
    from moesnap.model.serve import GraphDecoder, Session

    cand = CandidateModel(model)
    eager, static = Session(cand, n_seqs=1, capacity=len(tokens)), Session(cand, n_seqs=1, capacity=len(tokens))
    eager.prefill(tokens[:prefix])
    static.prefill(tokens[:prefix])
    dec = GraphDecoder(static, graph=False)
    for t in tokens[prefix:]:
        a, b = eager.decode(t)[0], dec.decode(t)[0]
        for st in stages or tuple(a.case.layers):
            np.testing.assert_allclose(b.case.layers[st], a.case.layers[st], rtol=1e-5, atol=1e-5, err_msg=st)
