"""Beyond one prefill: moesnap's candidate served (prefill, decode steps through a KV cache, paged,
a ragged batch, chunked prefill, static buffers) and judged at (step, layer, stage, token) against the
committed goldens of the bundled tiny model; planted decode and batch faults named where they act;
dumps of decode steps (the ``steps/<n>`` layout) compared, and refused where they do not fit."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import moesnap
from moesnap.errors import GoldenError
from moesnap.model.synth import tiny_path
from moesnap.store.case import load_case, save_case

GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")
STEPS = 4


def check(**kw):
    return moesnap.check(tiny_path(), "tiny", store=GOLDENS, show_progress=False, **kw)


@functools.cache
def prefill_cells() -> int:
    """The cells one prefill of every golden case holds (what serving must cover too)."""
    return check().coverage().held


@pytest.mark.parametrize("kw", [{}, {"paged": True}, {"batch": True}, {"batch": True, "paged": True, "chunk": 3},
                                {"cuda_graph": True}])
def test_clean_serving_passes_with_every_step_judged(kw):
    rep = check(decode=STEPS, **kw)
    assert rep.verdict == "pass", rep.summary()
    steps = [c for c in rep.cases if c.step is not None]
    assert len(steps) == 3 * STEPS                                     # every case, every step
    assert all(c.n_tokens == 1 and c.passed for c in steps)
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held
    # prompt rows plus step rows cover every golden token once: the same cells as one prefill
    assert cov.held == prefill_cells()
    assert {r.choice for r in rep.next_tokens} == {"match"}


def test_bfloat16_serving_passes_with_replay_judging_every_step():
    rep = check(decode=STEPS, dtype="bfloat16", batch=True, paged=True)
    assert rep.verdict == "pass", rep.summary()
    assert rep.replay is not None and sum(c.step is not None for c in rep.replay) == 3 * STEPS


def test_bfloat16_on_static_buffers_follows_the_golden_at_near_ties_as_the_eager_steps_do():
    """--cuda-graph (the static step, eager on the CPU) in bfloat16: router replay decided on the device
    follows the golden's experts where the eager steps do -- on the tiny model case1's decode step 2 picks
    other experts at a near tie at layer 3 -- so every cell is judged; without router replay that token is
    excused and the check is inconclusive."""
    reps = {graph: check(decode=STEPS, dtype="bfloat16", paged=True, cuda_graph=graph) for graph in (False, True)}
    ties = {graph: [(c.case, r.layer) for c in rep.cases for r in c.results if r.verdict.name == "ROUTING_TIE"]
            for graph, rep in reps.items()}
    assert ties[True] == ties[False] and ("case1/step2", 3) in ties[True]
    for rep in reps.values():
        cov = rep.coverage()
        assert rep.verdict == "pass" and cov.complete and cov.judged == cov.held, rep.summary()
    free = check(decode=STEPS, dtype="bfloat16", paged=True, cuda_graph=True, router_replay=False)
    assert free.verdict == "inconclusive" and free.coverage().judged < free.coverage().held


# spec, options, (case, layer, stage) where it must be named first
FAULTS = [
    ("rope_pos:step=2", {}, ("case0/step2", 0, "q_rope")),
    ("kv_slot:layer=1", {}, ("case0/step0", 1, "attn")),
    ("kv_short:layer=2", {}, ("case0/step0", 2, "attn")),
    ("block_table:seq=0,block=0", {"batch": True, "paged": True}, ("case0/step0", 0, "attn")),
    ("pad_attend", {"batch": True}, ("case0/step0", 0, "attn")),
    ("swap_rows", {"batch": True}, ("case0/step0", 0, "attn")),
    ("graph_stale:step=2", {"cuda_graph": True}, ("case0/step2", None, "embed")),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec, kw, where", FAULTS, ids=[f[0] for f in FAULTS])
def test_each_planted_serving_fault_is_named_at_its_step_layer_and_stage(spec, kw, where, dtype):
    rep = check(decode=STEPS, inject=[spec], dtype=dtype, **kw)
    assert rep.verdict == "fail"
    fd = rep.first_divergence
    assert (fd.case, fd.layer, fd.stage) == where, fd.explain()
    if dtype == "bfloat16" and where[1] is not None and not kw.get("batch"):
        # stage-local replay (one sequence on the golden's cache): the step and layer that introduce it
        intro = rep.first_introduced()
        assert intro is not None and (intro.case, intro.layer) == where[:2], intro
    loc = rep.to_dict()["first_divergence"]
    step = int(where[0].split("step")[1])
    assert loc["step"] == step and loc["position"] == 15 + step    # case0: a 19-token golden, 4 steps


def test_a_fault_that_cannot_fire_is_refused():
    with pytest.raises(moesnap.MoesnapError, match="paged KV cache"):
        check(decode=STEPS, inject=["block_table:seq=0,block=0"], batch=True)
    with pytest.raises(moesnap.MoesnapError, match="decode steps only"):
        check(inject=["rope_pos:step=0"], paged=True)


def test_more_steps_than_the_golden_holds_is_one_line_exit_2(capsys):
    # in this process (the command in a process of its own: test_the_command_line_judges_steps_in_worker_processes)
    from moesnap.cli.main import main

    code = main(["check", str(tiny_path()), "--suite", "tiny", "--store", GOLDENS, "--decode", "40", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--decode 40: golden case case0 holds 19 tokens" in err and "generate the golden with --decode" in err


def test_the_text_has_one_line_per_step_and_the_table_of_the_first_failing_step():
    from moesnap.judge.report import text

    lines = text(check(decode=STEPS, inject=["rope_pos:step=2"]))
    step_lines = [line for line in lines if line.lstrip().startswith("case") and "position" in line]
    assert len(step_lines) == 3 * STEPS
    assert any("case0/step2" in line and "q_rope DIVERGE" in line for line in step_lines)
    assert any(line.startswith("first failing step: case0/step2 (position 17") for line in lines)


# ---------------------------------------------------------------- dumps of decode steps


@functools.cache
def _served() -> tuple:
    """The candidate's prefill of case0 and its decode steps (served once; :func:`_dump`'s edits copy)."""
    from moesnap.model.candidate import CandidateModel
    from moesnap.model.load import open_model
    from moesnap.model.serve import Session
    from moesnap.store import open_store

    g = open_store(GOLDENS).open_version("tiny").read_case("case0")
    toks = g.tokens.tolist()
    P = len(toks) - STEPS
    session = Session(CandidateModel(open_model(tiny_path())), capacity=len(toks))
    prefill = session.prefill(toks[:P])[0].case
    return prefill, tuple(session.decode(toks[P + n])[0].case for n in range(STEPS))


def _dump(tmp_path: Path, mutate=None) -> Path:
    """The candidate's prefill of case0 and its decode steps, in the steps/<n> layout."""
    prefill, served = _served()
    steps = list(served)
    if mutate is not None:
        steps = mutate(steps)
    path = tmp_path / "dump.zarr"
    save_case(path, replace(prefill, steps=tuple(steps)))
    return path


def test_a_dump_with_steps_round_trips_and_passes(tmp_path):
    path = _dump(tmp_path)
    back = load_case(path)
    assert len(back.steps) == STEPS and [s.positions.tolist() for s in back.steps] == [[15], [16], [17], [18]]
    rep = moesnap.compare("tiny", str(path), store=GOLDENS, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    assert sum(c.step is not None for c in rep.cases) == STEPS
    # the golden's model file is found by its sha256: every step is also re-referenced from the dump's own rows
    assert rep.replay_kind == "local" and sum(c.step is not None for c in rep.replay) == STEPS
    assert any("decode steps re-referenced with the prompt as one sequence" in n for n in rep.notes)
    d = json.loads(json.dumps(rep.to_dict()))
    assert [s["step"] for s in d["steps"]] == [0, 1, 2, 3] and d["next_token"]["rows"]


def test_a_step_at_a_position_the_golden_lacks_is_refused_naming_it(tmp_path):
    def shift(steps):
        last = steps[-1]
        return steps[:-1] + [replace(last, attrs={**last.attrs, "positions": [40]})]

    with pytest.raises(GoldenError, match=r"case0/step3: position 40 is outside the golden's 19 tokens"):
        moesnap.compare("tiny", str(_dump(tmp_path, shift)), store=GOLDENS, show_progress=False)


def test_a_step_on_other_tokens_is_refused_naming_the_position(tmp_path):
    def other(steps):
        s = steps[1]
        return [steps[0], replace(s, tokens=(s.tokens + 1).astype(np.int32)), *steps[2:]]

    with pytest.raises(GoldenError, match=r"case0/step1: the candidate ran other tokens than the golden: position 16 holds token"):
        moesnap.compare("tiny", str(_dump(tmp_path, other)), store=GOLDENS, show_progress=False)


@pytest.mark.parametrize("processes", ["0", "2"])
def test_steps_after_the_engine_left_the_golden_sequence_are_inconclusive(tmp_path, monkeypatch, processes):
    # with worker processes, the pending steps are taken before the engine's own choice is looked up
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", processes)

    def own_choice(steps):   # step 1 fed the candidate's own argmax after step 0, which differs from the golden's
        s0 = steps[0]
        logits = np.array(s0.model["logits"], copy=True)
        golden_next = int(steps[1].tokens[0])
        chosen = (golden_next + 7) % logits.shape[-1]
        logits[0, chosen] = logits[0].max() + 50.0
        s0 = replace(s0, model={**s0.model, "logits": logits})
        rest = [replace(s, tokens=np.array([chosen], dtype=np.int32)) if i == 0 else s
                for i, s in enumerate(steps[1:])]
        return [s0, *rest]

    rep = moesnap.compare("tiny", str(_dump(tmp_path, own_choice)), store=GOLDENS, show_progress=False)
    assert rep.verdict == "fail"                 # step 0's logits (and its clear flip) fail
    assert len(rep.unjudged_steps) == STEPS - 1 and "decoded its own choice" in rep.unjudged_steps[0]
    assert "--continuation" in rep.unjudged_steps[0]


def test_the_html_report_draws_the_next_token_figures_over_the_rows(tmp_path):
    from moesnap.judge.html import write_html

    rep = check(decode=STEPS, inject=["rope_pos:step=2"])
    out = tmp_path / "r.html"
    write_html(rep, out)
    page = out.read_text(encoding="utf-8")
    assert "next token, row by row" in page and "top-1 agreement" in page
    assert page.count("KL ") >= len(rep.next_tokens)          # one bar (with its tooltip) per row
    assert "case0/step2, position 17" in page


def test_a_dump_of_another_model_file_says_so(tmp_path):
    path = _dump(tmp_path)
    case = load_case(path)
    other = replace(case, attrs={**case.attrs, "model": {"file": "other.gguf", "sha256": "ab" * 32}})
    p2 = tmp_path / "other.zarr"
    save_case(p2, other)
    rep = moesnap.compare("tiny", str(p2), store=GOLDENS, show_progress=False)
    assert any("records another model file than the golden: other.gguf" in n for n in rep.notes)


def test_a_users_own_decode_loop_through_recorder_steps_is_judged_at_each_step():
    """moesnap.Recorder.step: the stages of a decode loop the user wrote (here moesnap's serving
    session stands in for it), one step recorder per step, judged as decode steps."""
    from moesnap.model.candidate import CandidateModel
    from moesnap.model.load import open_model
    from moesnap.model.serve import Session
    from moesnap.store import open_store

    g = open_store(GOLDENS).open_version("tiny").read_case("case0")
    toks = g.tokens.tolist()
    P = len(toks) - STEPS
    session = Session(CandidateModel(open_model(tiny_path())), capacity=len(toks))
    rec = moesnap.Recorder()
    prompt = session.prefill(toks[:P])[0].case
    for name, a in prompt.arrays().items():
        if name.startswith("layers/"):
            for layer in range(a.shape[0]):
                rec.save(name[7:], layer, a[layer])
        else:
            rec.save(name, None, a)
    for n in range(STEPS):
        step = session.decode(toks[P + n])[0].case
        srec = rec.step(P + n)
        srec.save("tokens", None, step.tokens.tolist())
        for stage in ("moe_out", "layer_out"):
            for layer in range(step.n_layer):
                srec.save(stage, layer, step.layers[stage][layer])
        srec.save("logits", None, step.model["logits"])
    case = rec.case()
    assert [s.positions.tolist() for s in case.steps] == [[P + n] for n in range(STEPS)]
    rep = moesnap.compare("tiny", case, store=GOLDENS, allow_missing=True, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    assert sum(c.step is not None for c in rep.cases) == STEPS
    with pytest.raises(ValueError, match="decode step 0: save its token ids first"):
        bad = moesnap.Recorder()
        bad.save("tokens", None, [1, 2])
        bad.step(2)
        bad.case()


def test_local_re_reference_names_the_step_and_layer_that_introduce_a_fault_in_a_dump(tmp_path):
    def scale(steps):   # the engine's moe_out of layer 2 off by 5 % in step 1, and carried on from there
        s = steps[1]
        layers = {k: np.array(v, copy=True) for k, v in s.layers.items()}
        layers["moe_out"][2] *= 1.05
        return [steps[0], replace(s, layers=layers), *steps[2:]]

    rep = moesnap.compare("tiny", str(_dump(tmp_path, scale)), store=GOLDENS, show_progress=False)
    intro = rep.first_introduced()
    assert rep.verdict == "fail" and intro is not None
    assert (intro.case, intro.layer, intro.stage) == ("case0/step1", 2, "moe_out"), intro.explain()


def test_local_re_reference_takes_steps_whose_prompt_holds_the_last_rows_logits_only(tmp_path):
    # as engines dump a prefill (SGLang computes the logits of the last prompt row alone): the prompt and
    # its steps still make one sequence for the re-reference, the partial logits left out of it
    def scale(steps):
        s = steps[1]
        layers = {k: np.array(v, copy=True) for k, v in s.layers.items()}
        layers["moe_out"][2] *= 1.05
        return [steps[0], replace(s, layers=layers), *steps[2:]]

    c = load_case(_dump(tmp_path / "whole", scale))
    T = int(c.tokens.shape[0])
    logits = np.full_like(c.model["logits"], np.nan)
    logits[-1] = c.model["logits"][-1]
    path = tmp_path / "last-row-logits.zarr"
    save_case(path, replace(c, model={**c.model, "logits": logits},
                            attrs={**c.attrs, "held_tokens": [["logits", None, [T - 1]]]}))
    rep = moesnap.compare("tiny", str(path), store=GOLDENS, show_progress=False)
    intro = rep.first_introduced()
    assert rep.verdict == "fail" and intro is not None, "\n".join(rep.notes)
    assert (intro.case, intro.layer, intro.stage) == ("case0/step1", 2, "moe_out"), intro.explain()
    assert not any("judged free-running only" in n for n in rep.notes)


def _same_judgement(a, b):
    assert a.verdict == b.verdict and a.first_divergence == b.first_divergence
    assert [(c.case, c.step, c.positions) for c in a.cases] == [(c.case, c.step, c.positions) for c in b.cases]
    assert a.to_dict() == b.to_dict()


def test_decode_steps_judged_in_worker_processes_give_the_same_report(monkeypatch, tmp_path):
    # MOESNAP_JUDGE_PROCESSES (a host of 6 CPUs or more turns it on by itself): the steps' one-row
    # cases judged in spawned workers while the candidate runs the next step, taken in pair order
    kw = dict(decode=STEPS, dtype="bfloat16", inject=["rope_pos:step=2"])
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "0")
    here = check(**kw)
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "2")
    there = check(**kw)
    assert here.verdict == "fail" and here.first_divergence.case == "case0/step2"
    _same_judgement(here, there)


def test_the_command_line_judges_steps_in_worker_processes(tmp_path):
    # ``python -m moesnap`` under spawn: a worker imports the entry module without running the command
    env = {**__import__("os").environ, "MOESNAP_JUDGE_PROCESSES": "2", "MOESNAP_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", "moesnap", "check", str(tiny_path()), "--suite", "tiny", "--store",
                          GOLDENS, "--decode", "2", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("verdict: pass") == 1 and out.stderr == ""
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "pass"


def test_a_bad_judge_process_count_is_one_line_before_any_work(monkeypatch, capsys):
    from moesnap.cli.main import main

    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "many")
    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    assert main(["check", str(tiny_path()), "--suite", "tiny", "--store", GOLDENS, "--decode", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "moesnap: error: MOESNAP_JUDGE_PROCESSES='many': expected a number of processes (0: none)\n"


def test_worker_processes_by_default_only_in_a_moesnap_command(monkeypatch):
    # a script calling the API would have its own main code run again by every spawned worker
    from moesnap.judge import pool

    monkeypatch.delenv("MOESNAP_JUDGE_PROCESSES", raising=False)
    monkeypatch.setattr(pool.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(pool, "_BY_DEFAULT", [False])
    assert pool.case_processes() == 0
    pool.processes_by_default()             # what the moesnap command does before it runs
    assert pool.case_processes() == 8
    monkeypatch.setattr(pool.os, "cpu_count", lambda: 2)
    assert pool.case_processes() == 0
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "3")
    assert pool.case_processes() == 3


def test_a_bad_judge_process_count_is_one_line(monkeypatch):
    monkeypatch.setenv("MOESNAP_JUDGE_PROCESSES", "many")
    with pytest.raises(moesnap.MoesnapError, match="MOESNAP_JUDGE_PROCESSES='many': expected a number"):
        check(decode=1)


@pytest.mark.parametrize("spec, layer", [("pad_attend:layer=2", 2), ("swap_rows:layer=3", 3)])
def test_a_batch_fault_is_named_where_stage_local_replay_sees_it_introduced(spec, layer):
    # the replay of a batched forward is one batched forward too (the sequences packed, each on its golden
    # prefix), so a fault between the sequences acts there and its layer is the one that introduces it
    rep = check(decode=STEPS, dtype="bfloat16", batch=True, inject=[spec])
    intro = rep.first_introduced()
    assert rep.verdict == "fail" and intro is not None, rep.summary()
    assert (intro.case, intro.layer, intro.stage) == ("case0/step0", layer, "attn")
    assert (rep.first_divergence.case, rep.first_divergence.layer) == ("case0/step0", layer)


def test_a_batch_prefilled_in_chunks_runs_one_forward_per_chunk_of_every_sequence():
    """--batch --chunk: forward n holds chunk n of every prompt that still has one (the committed cases'
    prompts are 4-18 tokens: chunks of 4 give one to five forwards each), each chunk judged at its positions."""
    rep = check(decode=STEPS, batch=True, chunk=4)
    assert rep.verdict == "pass", rep.summary()
    prefill = [c for c in rep.cases if c.step is None]
    for name in ("case0", "case1", "case2"):
        mine = [c for c in prefill if c.case == name or c.case.startswith(name + "/chunk")]
        P = sum(c.n_tokens for c in mine)
        assert [c.case for c in mine] == [name] + [f"{name}/chunk{n}" for n in range(1, -(-P // 4))]
        assert all(c.n_tokens == 4 for c in mine[:-1]) and 1 <= mine[-1].n_tokens <= 4
    assert any("/chunk" in c.case for c in prefill)
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held
