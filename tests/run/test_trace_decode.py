"""``moesnap trace --decode N [--continuation IDS|TEXT]`` (issue 20, item 7 for moesnap's engines): the
reference over prompt + continuation as one case; moesnap's candidate served through its KV cache, the
prefill as the case's rows and each decode step under ``steps/<n>/``, judged by ``moesnap compare``
against a golden with that continuation; other engines get ``decode``/``continuation`` where their
capture function takes them, else one line saying it is not available yet."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import moesnap
from moesnap.case import Case
from moesnap.cli.main import main
from moesnap.model.synth import tiny_path
from moesnap.store import open_store
from moesnap.store.case import load_case

PROMPT = "1,2,3,40,50,60,7"
P = 7
N = 5


def trace(out, *extra):
    return main(["-q", "trace", str(tiny_path()), "--tokens", PROMPT, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A golden of the prompt and the reference's greedy continuation of N tokens."""
    root = tmp_path_factory.mktemp("golden")
    assert main(["-q", "goldens", "generate", str(tiny_path()), "--suite", "g", "--store", str(root),
                 "--tokens", PROMPT, "--decode", str(N)]) == 0
    case = open_store(str(root)).open_version("g").read_case("case0")
    return str(root), case


def test_reference_trace_is_one_case_over_prompt_and_greedy_continuation(golden, tmp_path, capsys):
    out = tmp_path / "ref.zarr"
    assert trace(out, "--decode", str(N)) == 0
    assert f"decode: a {P}-token prompt, then {N} steps on [" in capsys.readouterr().out
    case = load_case(out)
    _, g = golden
    assert not case.steps and case.tokens.tolist() == g.tokens.tolist()      # the golden's own continuation
    assert case.attrs["prompt_tokens"] == P and case.attrs["decode"] == N
    assert case.attrs["continuation"] == g.attrs["continuation"] and case.attrs["producer"] == "moesnap-reference"
    for path, a in g.arrays().items():
        assert np.array_equal(case.arrays()[path], a), path


def test_candidate_trace_serves_prefill_and_steps_and_compare_passes(golden, tmp_path):
    root, g = golden
    out = tmp_path / "cand.zarr"
    assert trace(out, "--candidate", "--decode", str(N)) == 0          # its own greedy choices
    case = load_case(out)
    assert case.tokens.tolist() == g.tokens.tolist()[:P] and case.positions.tolist() == list(range(P))
    assert [s.positions.tolist() for s in case.steps] == [[P + n] for n in range(N)]
    assert [int(s.tokens[0]) for s in case.steps] == case.attrs["continuation"] == g.attrs["continuation"]
    assert case.attrs["producer"] == "moesnap-candidate" and case.attrs["continuation_source"] == "greedy"
    rep = moesnap.compare("g", str(out), store=root, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    assert sorted(c.step for c in rep.cases if c.step is not None) == list(range(N))
    assert rep.coverage().complete


def test_candidate_trace_fed_the_goldens_continuation_in_bfloat16_passes(golden, tmp_path):
    root, g = golden
    out = tmp_path / "bf16.zarr"
    after = ",".join(map(str, g.attrs["continuation"]))
    assert trace(out, "--candidate", "--dtype", "bfloat16", "--continuation", after, "--decode", str(N)) == 0
    case = load_case(out)
    assert case.attrs["continuation_source"] == "given" and case.attrs["dtype"] == "bfloat16"
    assert len(case.steps) == N
    rep = moesnap.compare("g", str(out), store=root, show_progress=False)
    assert rep.verdict == "pass", rep.summary()


def test_candidate_steps_on_other_tokens_than_the_golden_are_refused(golden, tmp_path):
    root, g = golden
    out = tmp_path / "other.zarr"
    other = [(t + 1) % 272 for t in g.attrs["continuation"]]
    assert trace(out, "--candidate", "--continuation", ",".join(map(str, other))) == 0
    with pytest.raises(moesnap.MoesnapError, match=f"case0/step0: the candidate ran other tokens than the golden: position {P} holds token"):
        moesnap.compare("g", str(out), store=root, show_progress=False)


def test_a_text_continuation_goes_through_the_prompts_tokenizer(tmp_path):
    out = tmp_path / "text.zarr"
    assert main(["-q", "trace", str(tiny_path()), "--prompt", "Hi", "--continuation", " you", "--out", str(out)]) == 0
    case = load_case(out)
    assert case.tokens.tolist() == [3 + b for b in b"Hi you"]
    assert case.attrs["continuation"] == [3 + b for b in b" you"] and case.attrs["continuation_text"] == " you"
    assert case.attrs["prompt"] == "Hi" and case.attrs["decode"] == 4 and case.attrs["prompt_tokens"] == 2


def test_the_python_api_trace_takes_decode_and_continuation():
    served = moesnap.trace(tiny_path(), [1, 2, 3], candidate=True, decode=2, continuation=[9, 8])
    assert [s.tokens.tolist() for s in served.steps] == [[9], [8]] and served.attrs["continuation"] == [9, 8]
    ref = moesnap.trace(tiny_path(), [1, 2, 3], continuation=[9, 8])
    assert ref.tokens.tolist() == [1, 2, 3, 9, 8] and not ref.steps
    with pytest.raises(moesnap.MoesnapError, match="holds 2 tokens and --decode 3"):
        moesnap.trace(tiny_path(), [1, 2, 3], decode=3, continuation=[9, 8])


# ---------------------------------------------------------------- other engines


def _fake_engine_case(tokens, decode, continuation):
    """What a capture function with decode returns: a prefill case and one one-row case per step."""
    after = list(continuation) if continuation is not None else [11 + n for n in range(decode)]

    def rows(ids, start):
        T = len(ids)
        return Case(tokens=np.asarray(ids, dtype=np.int32), model={"logits": np.zeros((T, 272), np.float32)},
                    attrs={"positions": list(range(start, start + T))})

    prefill = rows(list(tokens), 0)
    prefill.attrs["producer"] = "fake-llama"
    steps = tuple(rows([t], len(tokens) + n) for n, t in enumerate(after))
    return Case(tokens=prefill.tokens, model=prefill.model, attrs=prefill.attrs, steps=steps)


def test_engine_decode_is_passed_through_where_the_capture_function_takes_it(monkeypatch, tmp_path):
    import moesnap.capture.llama as llama

    calls = []

    def llama_case(path, tokens, *, n_threads=None, decode=0, continuation=None):
        calls.append((list(tokens), decode, continuation))
        return _fake_engine_case(tokens, decode, continuation)

    monkeypatch.setattr(llama, "llama_case", llama_case)
    out = tmp_path / "llama.zarr"
    assert trace(out, "--engine", "llama.cpp", "--decode", "2", "--continuation", "9,8") == 0
    assert trace(tmp_path / "greedy.zarr", "--engine", "llama.cpp", "--decode", "3") == 0
    prompt = [int(t) for t in PROMPT.split(",")]
    assert calls == [(prompt, 2, [9, 8]), (prompt, 3, None)]
    case = load_case(out)
    assert [s.positions.tolist() for s in case.steps] == [[P], [P + 1]]
    assert case.attrs["continuation"] == [9, 8] and case.attrs["prompt_tokens"] == P
    assert case.attrs["producer"] == "fake-llama" and case.attrs["token_ids"] == prompt
    assert load_case(tmp_path / "greedy.zarr").attrs["continuation"] == [11, 12, 13]


def test_engine_decode_without_support_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    import moesnap.capture.llama as llama

    calls = []

    def llama_case(path, tokens, *, n_threads=None):
        calls.append(list(tokens))
        return _fake_engine_case(tokens, 0, None)

    monkeypatch.setattr(llama, "llama_case", llama_case)
    out = tmp_path / "c.zarr"
    assert trace(out, "--engine", "llama.cpp", "--decode", "2") == 2
    err = capsys.readouterr().err
    assert err == "moesnap: error: --decode with --engine llama.cpp is not available yet\n"
    assert not calls and not out.exists()
    assert trace(out, "--engine", "llama.cpp") == 0 and len(calls) == 1    # one prefill still works


# ---------------------------------------------------------------- usage errors before torch loads

BAD = [
    (["--decode", "-1"], "--decode -1: must be a number of decode steps >= 0"),
    (["--continuation", ""], "--continuation: empty"),
    (["--continuation", "1,-2"], "--continuation '1,-2': token id -2 is negative"),
    (["--decode", "2", "--continuation", "5,6,7"], "--continuation holds 3 tokens and --decode 2 asks for 2"),
    (["--decode", "0", "--continuation", "5"], "--decode 0 with --continuation"),
]

_RUN_ALL = """
import contextlib, io, json, sys
from moesnap.cli.main import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps({"results": out, "torch": "torch" in sys.modules}))
"""


def test_bad_decode_or_continuation_is_refused_before_torch_loads(tmp_path):
    out = tmp_path / "c.zarr"
    argvs = [["-q", "trace", str(tiny_path()), "--tokens", "1,2", "--out", str(out), *argv] for argv, _ in BAD]
    r = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(argvs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for (rc, err), (argv, message) in zip(got["results"], BAD):
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert got["torch"] is False and not out.exists()
