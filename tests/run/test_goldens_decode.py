"""Goldens with a continuation (issue 20, item 2): ``goldens generate --decode N`` (the reference's own
greedy continuation) and ``--continuation IDS|TEXT`` (a given one), recorded with each case and in the
version's provenance, shown by ``goldens show``, and served by ``check --decode N`` end to end."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moesnap
from moesnap.cli.main import main
from moesnap.model.load import open_model
from moesnap.model.reference import run_reference
from moesnap.model.synth import tiny_path
from moesnap.store import open_store

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8]
N = 6


def gen(root, *extra, suite="d"):
    return main(["-q", "goldens", "generate", str(tiny_path()), "--suite", suite, "--store", str(root), *extra])


def version(root, suite="d"):
    return open_store(str(root)).open_version(suite)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    """The definition: the reference over the growing sequence, the argmax of its last row each time."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(run_reference(tiny_path(), prompt + out).numpy()[-1])))
    return out


@pytest.fixture(scope="module")
def greedy_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("greedy")
    assert gen(root, "--tokens", ",".join(map(str, PROMPT)), "--prompt", "Hello", "--decode", str(N)) == 0
    return root


def test_decode_stores_the_prompt_and_the_references_own_greedy_continuation(greedy_store):
    v = version(greedy_store)
    case = v.read_case("case0")
    P = len(PROMPT)
    after = case.attrs["continuation"]
    assert case.attrs["prompt_tokens"] == P and case.attrs["decode"] == N and len(after) == N
    assert case.attrs["continuation_source"] == "greedy"
    assert case.tokens.tolist() == PROMPT + after == case.attrs["token_ids"]
    # every continuation token is the argmax of the stored golden's own logits at the row before it
    assert np.argmax(case.model["logits"][P - 1:P - 1 + N], axis=-1).tolist() == after
    # ... and the reference's greedy choice token by token (its growing sequence)
    assert after == reference_greedy(PROMPT, N)
    # the version's provenance records each case's prompt and continuation
    assert v.meta["decode"] == N
    entry = v.meta["continuations"]["case1"]
    assert entry["prompt_tokens"] == len("Hello".encode()) and entry["continuation"] == v.read_case("case1").attrs["continuation"]
    assert entry["reference_forwards"] >= 1


def test_the_case_is_one_plain_reference_forward_over_prompt_and_continuation(greedy_store, tmp_path):
    case = version(greedy_store).read_case("case0")
    assert gen(tmp_path, "--tokens", ",".join(map(str, case.tokens.tolist()))) == 0
    plain = version(tmp_path).read_case("case0")
    for path, a in plain.arrays().items():
        assert np.array_equal(case.arrays()[path], a), path       # bit for bit, every stage


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_decode_serves_such_a_golden_and_passes(greedy_store, dtype):
    rep = moesnap.check(tiny_path(), "d", store=str(greedy_store), decode=N, dtype=dtype, show_progress=False)
    assert rep.verdict == "pass", rep.summary()
    steps = [c for c in rep.cases if c.step is not None]
    assert len(steps) == 2 * N and all(c.n_tokens == 1 for c in steps)
    # the prompt rows are the recorded prompt_tokens: the first step sits right after it
    assert {c.case for c in steps if c.step == 0} == {"case0/step0", "case1/step0"}
    cov = rep.coverage()
    assert cov.complete and cov.judged == cov.held


def test_check_decode_beyond_the_continuation_is_refused_in_one_line(greedy_store, capsys):
    code = main(["-q", "check", str(tiny_path()), "--suite", "d", "--store", str(greedy_store), "--decode", str(N + 1)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--decode {N + 1}: golden case case0 holds {len(PROMPT) + N} tokens ({len(PROMPT)} of them its prompt)" in err


def test_goldens_show_has_a_line_per_case_with_prompt_and_continuation(greedy_store, capsys):
    assert main(["goldens", "show", "d", "--store", str(greedy_store)]) == 0
    out = capsys.readouterr().out.splitlines()
    after = version(greedy_store).read_case("case0").attrs["continuation"]
    i = next(i for i, line in enumerate(out) if line.startswith("  case case0: "))
    assert out[i + 1] == (f"    decode:    prompt {len(PROMPT)} tokens, continuation {N} tokens "
                          f"[{', '.join(map(str, after))}] (the reference's greedy choice); serves check --decode up to {N}")
    assert sum(line.startswith("    decode:    prompt ") for line in out) == 2


def test_a_wrong_proposal_is_corrected_by_the_references_own_choice(monkeypatch, tmp_path):
    """The greedy continuation is verified by the stored forward, not trusted from the proposer."""
    from moesnap.run import trace

    real = trace.greedy_draft
    calls = []

    def bad_first(model, tokens, n, **kw):
        calls.append(n)
        out = real(model, tokens, n, **kw)
        if len(calls) == 1 and n > 2:      # the first proposal goes wrong at its third token
            out[2] = (out[2] + 1) % model.config.vocab_size
        return out

    monkeypatch.setattr(trace, "greedy_draft", bad_first)
    case = trace.continued_reference(open_model(tiny_path()), PROMPT, decode=N)
    assert case.attrs["continuation"] == reference_greedy(PROMPT, N)
    assert case.attrs["reference_forwards"] == 2 and calls == [N, N - 3]


def test_a_given_continuation_as_ids_and_as_text(tmp_path):
    assert gen(tmp_path, "--tokens", "1,2,3", "--prompt", "Hi", "--continuation", "9, 8", "--continuation", " there") == 0
    v = version(tmp_path)
    c0, c1 = v.read_case("case0"), v.read_case("case1")
    assert c0.tokens.tolist() == [1, 2, 3, 9, 8] and c0.attrs["continuation"] == [9, 8]
    assert c0.attrs["prompt_tokens"] == 3 and c0.attrs["decode"] == 2 and c0.attrs["continuation_source"] == "given"
    # text: the prompt's tokenizer on its own (bytes for the tiny model: <0xNN> sits at 3 + NN)
    assert c1.attrs["continuation"] == [3 + b for b in b" there"] and c1.attrs["continuation_text"] == " there"
    assert c1.tokens.tolist() == [3 + b for b in b"Hi there"] and c1.attrs["prompt_tokens"] == 2
    assert "--continuation '9, 8' --continuation ' there'" in v.meta["command"]
    rep = moesnap.check(tiny_path(), "d", store=str(tmp_path), decode=2, show_progress=False)
    assert rep.verdict == "pass", rep.summary()


def test_the_recorded_command_makes_the_same_golden(greedy_store, tmp_path):
    v = version(greedy_store)
    argv = shlex.split(v.meta["command"])
    assert argv[:3] == ["moesnap", "goldens", "generate"] and "--decode" in argv
    argv[argv.index("--store") + 1] = str(tmp_path)
    assert main(["-q", *argv[1:]]) == 0
    again = version(tmp_path)
    for name in v.case_names():
        assert again.read_case(name).tokens.tolist() == v.read_case(name).tokens.tolist()


def test_the_python_api_takes_decode_and_continuation(tmp_path):
    ref = moesnap.generate(tiny_path(), "api", [[1, 2, 3]], store=str(tmp_path), decode=2)
    assert ref == "api@v0001"
    one = moesnap.generate(tiny_path(), "api", [[1, 2, 3]], store=str(tmp_path), continuation=[7, 6])
    two = moesnap.generate(tiny_path(), "api", [[1, 2, 3], "Hi"], store=str(tmp_path), continuation=[[7, 6], "yo"],
                           decode=2)
    assert (one, two) == ("api@v0002", "api@v0003")
    v = open_store(str(tmp_path)).open_version("api", "v0003")
    assert v.read_case("case0").attrs["continuation"] == [7, 6]
    assert v.read_case("case1").attrs["continuation"] == [3 + b for b in b"yo"]
    with pytest.raises(moesnap.MoesnapError, match="1 continuation for 2 cases"):
        moesnap.generate(tiny_path(), "api", [[1, 2], [3]], store=str(tmp_path), continuation=[7, 6])
    with pytest.raises(moesnap.MoesnapError, match="holds 2 tokens and --decode 3"):
        moesnap.generate(tiny_path(), "api", [[1, 2]], store=str(tmp_path), continuation=[7, 6], decode=3)
    assert open_store(str(tmp_path)).versions("api") == ["v0001", "v0002", "v0003"]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing changes

BAD = [
    (["--tokens", "1,2", "--decode", "-1"], "--decode -1: must be a number of decode steps >= 0"),
    (["--tokens", "1,2", "--continuation", ""], "--continuation: empty"),
    (["--tokens", "1,2", "--continuation", "4,-5"], "token id -5 is negative"),
    (["--tokens", "1,2", "--tokens", "3", "--continuation", "4"],
     "1 --continuation for 2 cases: give one --continuation per case"),
    (["--tokens", "1,2", "--decode", "3", "--continuation", "4,5"],
     "--continuation 1 (case0) holds 2 tokens and --decode 3 asks for 3"),
    (["--tokens", "1,2", "--decode", "0", "--continuation", "4"], "--decode 0 with --continuation"),
]


# every command of BAD in one process: main() for each, its stderr kept, then whether torch was imported
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
    root = tmp_path / "store"
    assert gen(root, "--tokens", "1,2") == 0
    before = digest(root)
    argvs = [["-q", "goldens", "generate", str(tiny_path()), "--suite", "d", "--store", str(root), *argv]
             for argv, _ in BAD]
    r = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(argvs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for (rc, err), (argv, message) in zip(got["results"], BAD):
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert got["torch"] is False                    # every one refused before torch was imported
    assert digest(root) == before


def test_a_text_continuation_of_the_wrong_length_and_an_id_out_of_vocab_are_refused(tmp_path, capsys):
    root = tmp_path / "store"
    assert gen(root, "--tokens", "1,2") == 0
    before = digest(root)
    assert gen(root, "--tokens", "1,2", "--decode", "2", "--continuation", "abc") == 2
    assert "--continuation 1 (case0, 3 tokens from its text) holds 3 tokens and --decode 2" in capsys.readouterr().err
    assert gen(root, "--tokens", "1,2", "--continuation", "5,100000") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "100000" in err, err
    assert digest(root) == before and json.loads((root / "d" / "v0001" / "zarr.json").read_text())


def test_a_model_the_candidate_cannot_run_is_continued_by_the_reference_alone(monkeypatch):
    """The proposer falls back to the reference token by token; the golden is the same (float64 too)."""
    import moesnap.model.candidate as candidate
    from moesnap.errors import ModelFileError
    from moesnap.run import trace

    def refuse(*args, **kwargs):
        raise ModelFileError("IQ2_XXS: the candidate does not decode this type")

    monkeypatch.setattr(candidate.CandidateModel, "__init__", refuse)
    assert trace.greedy_draft(open_model(tiny_path()), PROMPT, 3) == reference_greedy(PROMPT, 3)
    case = trace.continued_reference(open_model(tiny_path()), PROMPT, decode=3, dtype=trace.torch.float64)
    assert case.model["logits"].dtype == np.float64 and case.attrs["reference_forwards"] == 1
    assert np.argmax(case.model["logits"][len(PROMPT) - 1:-1], axis=-1).tolist() == case.attrs["continuation"]
