"""What a newcomer tripped over (issue 19): the recorder taking plain lists and arrays, a directory as
MODEL, ``import`` of a missing directory, the README's fixture section in a fresh environment, and a
failing command's stderr holding its one error line without progress chatter before it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

import moesnap
from moesnap.cli.main import main
from moesnap.errors import ModelFileError, UsageError
from moesnap.model.load import check_model_path, open_model
from moesnap.stages import ALL_STAGES

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
REPO_GOLDENS = REPO / "goldens"          # tiny@v0001: three cases (an import must choose one with --case)


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", *argv])
    return code, out.getvalue(), err.getvalue()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``moesnap ARGS`` as a person runs it: its own process, progress on (status lines shown)."""
    env = {k: v for k, v in os.environ.items() if k != "MOESNAP_NO_PROGRESS"}
    return subprocess.run([sys.executable, "-m", "moesnap", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("moesnap: error: "), err
    return err.removeprefix("moesnap: error: ").rstrip("\n")


# ---------------------------------------------------------------- 1. Recorder.save takes lists and arrays


def test_recorder_takes_lists_and_numpy_arrays_as_it_takes_tensors():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 8))                                      # float64
    from_tensors, from_host = moesnap.Recorder(), moesnap.Recorder()
    from_tensors.save("tokens", None, torch.tensor([1, 2, 3]))
    from_tensors.save("embed", None, torch.from_numpy(h))
    from_tensors.save("topk_ids", 0, torch.tensor([[1, 0], [2, 1], [0, 3]]))
    from_tensors.save("moe_out", 0, torch.from_numpy(h))
    from_host.save("tokens", None, [1, 2, 3])                            # the newcomer's call
    from_host.save("embed", None, h)
    from_host.save("topk_ids", np.int64(0), ((1, 0), (2, 1), (0, 3)))   # a tuple, a numpy layer index
    from_host.save("moe_out", 0, h.tolist())
    a, b = from_tensors.case(), from_host.case()
    assert b.tokens.dtype == np.int32 and b.tokens.tolist() == [1, 2, 3]
    for x, y in [(a.tokens, b.tokens), *((a.model[k], b.model[k]) for k in a.model),
                 *((a.layers[k], b.layers[k]) for k in a.layers)]:
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert b.model["embed"].dtype == np.float32 and b.layers["topk_ids"].dtype == np.int32


def test_recorder_keep_dtype_keeps_float64_from_numpy():
    rec = moesnap.Recorder(keep_dtype=True)
    rec.save("embed", None, np.full((2, 4), 1 / 3))
    assert rec.model["embed"].dtype == np.float64 and rec.model["embed"][0, 0] == 1 / 3


@pytest.mark.parametrize("value, error, words", [
    ("1,2,3", TypeError, ("'tokens'", "str", "torch.Tensor", "numpy array", "list")),
    (None, TypeError, ("'tokens'", "NoneType")),
    ({"ids": [1]}, TypeError, ("'tokens'", "dict")),
    ([True, False], TypeError, ("'tokens'", "bool")),
    ([1, [2, 3]], ValueError, ("'tokens'", "rectangular")),
    ([2**40], ValueError, ("'tokens'", "int32")),
])
def test_recorder_refuses_other_values_naming_the_stage_and_the_type(value, error, words):
    rec = moesnap.Recorder()
    with pytest.raises(error) as e:
        rec.save("tokens", None, value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert rec.model == {}                                               # nothing half-saved


def test_recorder_refuses_bad_stages_and_layers_before_converting():
    rec = moesnap.Recorder()
    with pytest.raises(ValueError, match=r"unknown stage 'lm_head' \(moesnap calls it 'logits'\)"):
        rec.save("lm_head", None, [1.0])
    with pytest.raises(ValueError, match="unknown stage 'hidden'; choose one of tokens, embed"):
        rec.save("hidden", None, [1.0])
    with pytest.raises(ValueError, match="per-layer; give a layer"):
        rec.save("moe_out", None, [[1.0]])
    with pytest.raises(ValueError, match="whole-model; layer must be None"):
        rec.save("tokens", 0, [1])
    with pytest.raises(TypeError, match="layer '0' is a str"):
        rec.save("moe_out", "0", [[1.0]])
    with pytest.raises(ValueError, match="layer -1 must be >= 0"):
        rec.save("moe_out", -1, [[1.0]])
    assert rec.model == {} and rec.layers == {}


def test_save_is_documented_with_every_stage_none_for_whole_model_stages_and_shapes():
    doc = moesnap.Recorder.save.__doc__ or ""
    missing = [s for s in ALL_STAGES if f"``{s}``" not in doc]
    assert not missing, f"Recorder.save's docstring does not name {missing}"
    assert "layer=None" in doc and "[T, H]" in doc and "[T, k, H]" in doc and "numpy array" in doc


# ---------------------------------------------------------------- 2. a directory as MODEL


def test_a_directory_without_config_json_says_so(tmp_path, tiny_path):
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    for f in (check_model_path, open_model):
        with pytest.raises(ModelFileError) as e:
            f(d)
        msg = str(e.value)
        assert msg.startswith(f"{d}: ") and "config.json" in msg and "GGUF file" in msg and "checkpoint directory" in msg
        assert "not a GGUF file" not in msg
    code, out, err = invoke(["check", str(d), "--suite", "tiny", "--store", str(REPO_GOLDENS)])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"{d}: is a directory without config.json") and "*.safetensors" in line


def test_check_model_path_tells_each_bad_path_and_passes_good_ones(tmp_path, tiny_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "text.gguf").write_text("hello\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    cases = {tmp_path / "missing.gguf": "no such file", tmp_path / "empty.gguf": "empty file",
             tmp_path / "text.gguf": "not a GGUF file (bad magic)"}
    for path, words in cases.items():
        with pytest.raises(ModelFileError, match=re.escape(f"{path}: {words}")):
            check_model_path(path)
    with pytest.raises(ModelFileError, match="MODEL: empty path"):
        check_model_path("")
    assert check_model_path(tiny_path) == Path(tiny_path)
    assert check_model_path(ckpt) == ckpt          # a checkpoint's contents are CheckpointModel's to judge


def test_check_model_path_loads_no_torch(tmp_path):
    code = ("import sys; from moesnap.errors import ModelFileError; from moesnap.model.load import check_model_path\n"
            f"try: check_model_path({str(tmp_path)!r})\n"
            "except ModelFileError as e: print(e)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{tmp_path}: is a directory without config.json; MODEL is a GGUF file or an "
                                     f"HF checkpoint directory (config.json + *.safetensors)", "False"]


# ---------------------------------------------------------------- 3. + 5. import of a missing directory


def test_import_of_a_missing_directory_says_so_first_and_alone(tmp_path):
    # tiny holds three cases: before the fix, the missing --case was the complaint
    r = cli("import", str(tmp_path / "nonexistent"), "--format", "sglang", "--like", "tiny",
            "--store", str(REPO_GOLDENS), "--out", str(tmp_path / "cand.zarr"), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    line = one_error_line(r.stderr)                    # no "moesnap: loading torch" before it
    assert line == f"{tmp_path / 'nonexistent'}: no such directory (the sglang dump to import)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, extra, words", [
    (lambda d: (d / "dump").write_text("x"), (), "dump: not a directory (--format aprt reads a dump directory)"),
    (lambda d: (d / "dump").mkdir(), ("--pass", "1"), "--pass: only an SGLang or vLLM dump holds several forward passes"),
    (lambda d: (d / "dump").mkdir(), ("--format", "sglang", "--pass", "-1"), "--pass -1: a forward pass number is not negative"),
])
def test_import_refuses_a_bad_dump_before_torch_loads(tmp_path, make, extra, words):
    make(tmp_path)
    fmt = () if "--format" in extra else ("--format", "aprt")
    r = cli("import", str(tmp_path / "dump"), *fmt, *extra, "--like", "tiny", "--store", str(REPO_GOLDENS),
            "--out", str(tmp_path / "cand.zarr"), cwd=tmp_path)
    assert r.returncode == 2 and words in one_error_line(r.stderr)
    assert not (tmp_path / "cand.zarr").exists()


def test_import_dump_checks_the_directory_before_the_output_and_the_golden(tmp_path):
    from moesnap.run.importing import import_dump

    (tmp_path / "cand.zarr").mkdir()                   # an existing output, a golden that does not exist
    with pytest.raises(UsageError, match="nonexistent: no such directory"):
        import_dump("aprt", tmp_path / "nonexistent", like="nosuch", out=tmp_path / "cand.zarr",
                    store=str(tmp_path / "nostore"))


# ---------------------------------------------------------------- 4. the README's fixture section


def _fixture_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### In your test suite: the moesnap_snapshot fixture")
    return text[start:text.index("\n## ", start)]


def _blocks(section: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S)


def test_the_fixture_section_installs_pytest_beside_moesnap():
    """A fresh ``pip install -e .`` has no pytest: the section says to install one that the plugin
    works with (pytest 8+), before its first ``pytest --moesnap-regen``."""
    section = _fixture_section()
    installs = [line.split("#")[0].split() for block in _blocks(section) for line in block.splitlines()
                if line.startswith("pip install")]
    assert installs, "the fixture section names no `pip install` line"
    assert section.index("pip install") < section.index("pytest --moesnap-regen")
    reqs = [Requirement(word.strip("'\"")) for words in installs for word in words[2:] if not word.startswith("-")]
    assert "pytest" not in {Requirement(r).name for r in requires("moesnap") or [] if "extra ==" not in r}, \
        "pytest became a dependency: the README's install line is then not needed"
    ok = False
    for r in reqs:
        if r.name == "pytest":
            ok = r.specifier.contains(version("pytest")) and not r.specifier.contains("7.4.4")
        elif r.name == "moesnap" and r.extras:
            extra = [Requirement(d.split(";")[0]) for d in requires("moesnap") or []
                     if any(f'extra == "{e}"' in d for e in r.extras)]
            ok = any(x.name == "pytest" for x in extra)
        if ok:
            break
    assert ok, f"the fixture section installs no pytest >= 8: {installs}"


def test_the_fixture_sections_example_runs_as_written(pytester):
    """The README's ``test_my_kernel`` and its three commands, in a fresh project."""
    blocks = _blocks(_fixture_section())
    example = next(b for b in blocks if "def test_my_kernel(" in b)
    test = re.search(r"^def test_my_kernel\(.*?(?=^\S|\Z)", example, flags=re.S | re.M)
    assert test, example
    commands = next(b for b in blocks if "pytest --moesnap-regen" in b)
    runs = [line.split("#")[0].split()[1:] for line in commands.splitlines() if line.startswith("pytest")]
    assert len(runs) == 3, commands
    target = next(a for args in runs for a in args if a.endswith(".py"))
    pytester.path.joinpath(target).parent.mkdir(parents=True, exist_ok=True)
    pytester.path.joinpath(target).write_text(
        "import numpy as np\n\n\n"
        "def my_kernel(x):\n    return x * 2, np.log(np.exp(x).sum(-1))\n\n\n"
        "x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)\n\n\n" + test.group(0))
    plugin = [] if not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else ["-p", "moesnap.pytest_plugin"]
    outcomes = [pytester.runpytest(*plugin, "-p", "no:cacheprovider", *args) for args in runs]
    outcomes[0].assert_outcomes(failed=1)
    outcomes[0].stdout.fnmatch_lines(["*no golden for this test yet*"])
    outcomes[1].assert_outcomes(failed=1)
    outcomes[1].stdout.fnmatch_lines(["*wrote golden tests.test_k.test_my_kernel@v0001*"])
    outcomes[2].assert_outcomes(passed=1)
