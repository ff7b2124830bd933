"""The command line's habits (issue 13, item 4): --version, -q anywhere, --json -, help on every
argument, one error prefix, a note on tolerances from pyproject.toml, progress before the slow
steps, --inject errors that quote the spec."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import moesnap
from moesnap.cli.main import build_parser, main, subcommands

GOLDENS = Path(__file__).resolve().parents[2] / "goldens"     # the committed store: read, never written
CASE0 = GOLDENS / "tiny" / "v0001" / "case0"


def run(argv: list[str]) -> tuple[int, str, str]:
    """``moesnap ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def with_progress(monkeypatch):
    """Progress as a user at a terminal has it (the light suite sets MOESNAP_NO_PROGRESS); main's -q
    sets it again, so it is restored after each test."""
    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)


def check_argv(tiny_path, *extra: str) -> list[str]:
    return ["check", str(tiny_path), "--suite", "tiny", "--store", str(GOLDENS), *extra]


# ---------------------------------------------------------------- --version


def test_version_prints_the_package_version():
    code, out, err = run(["--version"])
    assert (code, out, err) == (0, f"moesnap {moesnap.__version__}\n", "")


# ---------------------------------------------------------------- -q after the subcommand


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_subcommand_silences_progress(where, tiny_path, with_progress):
    argv = check_argv(tiny_path)
    code, out, err = run(["-q", *argv] if where == "before" else [*argv, "-q"])
    assert code == 0, err
    assert err == "" and "verdict: pass" in out


def test_quiet_is_accepted_by_every_command():
    parser = build_parser()
    for child in subcommands(parser):
        assert any("-q" in a.option_strings for a in child._actions), child.prog
    args = parser.parse_args(["goldens", "list", "--quiet"])
    assert args.quiet is True
    assert parser.parse_args(["goldens", "list"]).quiet is False     # the top level's default survives


# ---------------------------------------------------------------- --json -


def test_compare_json_to_stdout_is_only_json(tmp_path):
    cand = tmp_path / "cand.zarr"
    shutil.copytree(CASE0, cand)
    code, out, err = run(["-q", "compare", str(CASE0), str(cand), "--json", "-"])
    assert code == 0, err
    rep = json.loads(out)                                   # stdout parses whole: `| jq` works
    assert rep["verdict"] == "pass"
    assert "verdict: pass" in err and "first divergence" in err    # the table went to stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.zarr"]   # no file named '-'


def test_check_json_to_stdout_with_html_beside_it(tiny_path, tmp_path):
    page = tmp_path / "r.html"
    code, out, err = run(["-q", *check_argv(tiny_path, "--json", "-", "--html", str(page))])
    assert code == 0, err
    assert json.loads(out)["verdict"] == "pass"
    assert f"wrote {page}" in err and page.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_calibrate_json_to_stdout(tiny_path):
    code, out, err = run(["-q", "calibrate", str(tiny_path), "--tokens", "1,2", "--dtypes", "float32", "--json", "-"])
    assert code == 0, err
    assert set(json.loads(out)["dtypes"]) == {"float32"}
    assert "suggested" in err


def test_html_to_stdout_is_refused(tiny_path):
    code, out, err = run(["-q", *check_argv(tiny_path, "--html", "-")])
    assert (code, out) == (2, "")
    assert err.startswith("moesnap: error: --html -:")


# ---------------------------------------------------------------- help on every argument


def _every_parser() -> list[argparse.ArgumentParser]:
    parser = build_parser()
    return [parser, *subcommands(parser)]


OTHERS = {"moesnap goldens", "moesnap goldens show", "moesnap goldens diff", "moesnap goldens prune"}


@pytest.mark.parametrize("prog", [p.prog for p in _every_parser()])
def test_every_option_and_positional_has_help(prog):
    parser = next(p for p in _every_parser() if p.prog == prog)
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not a.help or a.help == argparse.SUPPRESS]
    if bare and prog in OTHERS:
        pytest.xfail(f"cli/goldens.py (owned elsewhere) has no help yet on {', '.join(bare)}")
    assert not bare, f"`{prog}`: no help text on {', '.join(bare)}"


def test_every_subcommand_has_help_in_its_parents_listing():
    for parser in _every_parser():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed = {c.dest for c in action._choices_actions}
                assert listed == set(action.choices), parser.prog


# ---------------------------------------------------------------- one error prefix


@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["check"], "check: the following arguments are required: model, --suite"),
    (["goldens", "prune", "x", "--keep", "many"], "goldens prune: argument --keep: invalid int value: 'many'"),
    (["compare", "a", "b", "--profile", "loud"], "compare: argument --profile: invalid choice: 'loud'"),
    (["goldens", "list", "--stoer", "x"], "unrecognized arguments: --stoer"),
    (["check", "nowhere.gguf", "--suite", "tiny"], "nowhere.gguf: no such file"),
])
def test_errors_carry_one_prefix(argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["-q", *argv])
    assert (code, out) == (2, "")
    assert err.startswith("moesnap: error: ") and err.count("\n") == 1, err
    assert err.count("moesnap:") == 1 and err.count("error:") == 1, err
    assert needle in err, err


def test_usage_errors_point_at_the_commands_help():
    code, _, err = run(["-q", "model", "make", "x.gguf"])
    assert code == 2 and "(see `moesnap model make --help`)" in err, err


def test_a_message_that_already_has_the_prefix_gets_no_second(monkeypatch):
    from moesnap.errors import UsageError

    def boom(a):
        raise UsageError("moesnap: error: said twice")

    monkeypatch.setattr(sys.modules["moesnap.cli.main"], "cmd_model_make", boom)   # the module, not main()
    code, _, err = run(["-q", "model", "make", "x.gguf", "--preset", "tiny"])
    assert (code, err) == (2, "moesnap: error: said twice\n")


# ---------------------------------------------------------------- tolerances from pyproject.toml


PYPROJECT = """\
[project]
name = "mine"
[tool.moesnap.tolerance.float32]
moe_out = {atol = 1e-3, rtol = 1e-3}
[tool.moesnap]
tie_tol = {bfloat16 = 0.5}
"""


def test_a_note_says_which_pyproject_set_the_tolerances(tiny_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    code, out, err = run(["-q", *check_argv(tiny_path, "--json", "r.json")])
    assert code == 0, err
    note = (f"note: tolerances: [tool.moesnap] of {tmp_path / 'pyproject.toml'} applied over the built-in ones "
            "(3 settings: bfloat16:tie_tol, float32:moe_out.atol, float32:moe_out.rtol)")
    assert note in out.splitlines()
    assert note.removeprefix("note: ") in json.loads((tmp_path / "r.json").read_text())["notes"]


def test_the_note_names_a_config_file_given_with_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("[tool.moesnap.tolerance.float32.default]\natol = 1e-4\n")
    cand = tmp_path / "cand.zarr"
    shutil.copytree(CASE0, cand)
    code, out, err = run(["-q", "compare", str(CASE0), str(cand), "--config", str(cfg), "--tol", "moe_out.rtol=1e-3"])
    assert code == 0, err
    assert (f"note: tolerances: [tool.moesnap] of {cfg} applied over the built-in ones (1 setting: "
            "float32:default.atol); --tol over both") in out


def test_no_note_without_a_pyproject_or_without_tolerances_in_it(tiny_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["-q", *check_argv(tiny_path)])
    assert code == 0 and "tolerances:" not in out
    (tmp_path / "pyproject.toml").write_text('[tool.moesnap]\nsnapshot_store = "snaps"\n')   # the pytest plugin's
    code, out, _ = run(["-q", *check_argv(tiny_path)])
    assert code == 0 and "tolerances:" not in out
    code, out, _ = run(["-q", *check_argv(tiny_path, "--config", "pyproject.toml")])   # asked for: say it did nothing
    assert code == 0 and "note: tolerances: " + str(tmp_path / "pyproject.toml") + " has no tolerance settings" in out


# ---------------------------------------------------------------- progress before the slow steps


def test_check_speaks_before_each_slow_step(tiny_path, monkeypatch, with_progress):
    """What stderr held when each slow step began: a 2-layer full-width model spends its first seconds
    opening the model, reading the goldens and uploading the first layer."""
    import moesnap.run.check as run_check
    from moesnap.model.candidate import CandidateModel

    err = io.StringIO()
    seen: dict[str, str] = {}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            seen.setdefault(name, err.getvalue())
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run_check, "open_model", spy("open", run_check.open_model))
    monkeypatch.setattr(run_check, "load_goldens", spy("goldens", run_check.load_goldens))
    monkeypatch.setattr(CandidateModel, "forward", spy("forward", CandidateModel.forward))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(check_argv(tiny_path)) == 0
    assert seen["open"].endswith(f"moesnap: opening {tiny_path}\n")
    assert seen["goldens"].endswith(f"moesnap: reading golden tiny from {GOLDENS}\n")
    assert "moesnap: running the candidate on cpu in float32: 3 cases x 4 layers\n" in seen["forward"]
    assert seen["forward"].rstrip().endswith("0/4 [00:00<?, ?layer/s]")      # the bar, drawn at 0
    assert "check case0" in seen["forward"]


def test_a_command_says_it_is_loading_torch_before_importing_it(monkeypatch, with_progress):
    """On a GPU machine `import torch` alone takes 4 s of a check's first seconds: say so first."""
    from moesnap import util

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        util.loading_torch()                      # imported already (this process): nothing to say
        monkeypatch.delitem(sys.modules, "torch")
        util.loading_torch()
        util.loading_torch(enabled=False)
    assert err.getvalue() == "moesnap: loading torch\n"


def test_no_progress_with_the_environment_variable(tiny_path, monkeypatch):
    monkeypatch.setenv("MOESNAP_NO_PROGRESS", "1")
    code, _, err = run(check_argv(tiny_path))
    assert code == 0 and err == ""


def test_a_large_model_file_is_hashed_with_a_bar_once(tmp_path, monkeypatch, with_progress):
    from moesnap import util

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(300 << 20)                     # sparse: 300 MiB of zeros, no disk used
    monkeypatch.setenv("MOESNAP_CACHE", str(tmp_path / "cache"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        first = util.file_sha256(big, progress=True)
    assert "sha256 big.bin" in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert util.file_sha256(big, progress=True) == first
    assert err.getvalue() == ""                   # known now: no second pass over the bytes


# ---------------------------------------------------------------- --inject quotes the spec


@pytest.mark.parametrize("spec, needle", [
    ("", "expected KIND:KEY=VALUE"),
    ("  NaN : layer=9 , expert=0 ", "layer=9 is out of range"),
    ("nan:layer=0,expert=0,colour=red", "unknown key 'colour'"),
    ("scale:layer=0,stage=moe_out,factor=inf", "must be finite"),
    (" qtype : layer=0 , tensor=ffn_down_exps , as=Q6_K ", "already is Q6_K"),       # needs the model file
    ("ROUTE:layer=0, token=99", "token=99 is out of range: the shortest of the 3 prompts has"),  # the prompts
])
def test_inject_errors_quote_the_spec_as_given(spec, needle, tiny_path):
    code, out, err = run(["-q", *check_argv(tiny_path, "--inject", "nan:layer=1,expert=0", "--inject", spec)])
    assert (code, out) == (2, "")
    assert err.startswith(f"moesnap: error: --inject {spec!r}: "), err
    assert needle in err and err.count("\n") == 1, err
