"""The pytest plugin (``moesnap_snapshot``), run as a user runs it: pytester on a small example
project, whole workflows (no golden, regenerate, pass, regress), as pytest-regressions tests itself.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest

from moesnap.errors import UsageError
from moesnap.pytest_plugin import suite_name

pytest_plugins = ["pytester"]

# the plugin comes in through its pytest11 entry point (the editable install); where plugin autoload is
# off, it is named on the command line instead (naming it as well as autoloading it registers it twice)
AUTOLOADED = (not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
              and any(ep.name == "moesnap" for ep in entry_points(group="pytest11")))
PLUGIN = [] if AUTOLOADED else ["-p", "moesnap.pytest_plugin"]

DEMO = """
import os

import numpy as np


def arrays():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 8)).astype(np.float32)
    mode = os.environ.get("DEMO_MODE", "clean")
    if mode == "noise":                    # float noise: a few ulp-scale relative changes
        hidden = (hidden * (1 + 1e-6 * rng.standard_normal(hidden.shape))).astype(np.float32)
    elif mode == "nan":
        hidden[2, 5] = np.nan
    elif mode == "scale":                  # a 5 % change
        hidden = hidden * np.float32(1.05)
    return {"hidden": hidden, "ids": np.arange(4, dtype=np.int32)}


def test_kernel(moesnap_snapshot):
    moesnap_snapshot.check(arrays())
"""

FORWARD = """
import os

import torch

import moesnap
from moesnap.model.synth import tiny_path


def forward(tokens, rec):
    # moesnap's reference as the forward under test, its stages saved into the recorder;
    # DEMO_FAULT plants a 5 % error in layer 2's MoE output
    case = moesnap.trace(tiny_path(), tokens)
    for stage, a in case.model.items():
        rec.save(stage, None, torch.from_numpy(a))
    for stage, a in case.layers.items():
        for layer in range(a.shape[0]):
            x = torch.from_numpy(a[layer])
            if os.environ.get("DEMO_FAULT") and (stage, layer) == ("moe_out", 2):
                x = x * 1.05
            rec.save(stage, layer, x)


def test_forward(moesnap_snapshot):
    report = moesnap_snapshot.check_forward(tiny_path(), [[1, 2, 3, 4], [5, 6]], forward)
    assert report.passed
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider", *args)


def out(result: pytest.RunResult) -> str:
    return result.stdout.str()


def row(result: pytest.RunResult, name: str) -> str:
    """The failure table's row of array ``name`` (pytest prefixes the message's lines with ``E``)."""
    return next(line for line in out(result).splitlines() if line.lstrip("E ").startswith(f"{name}  "))


@pytest.fixture
def demo(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("DEMO_MODE", raising=False)
    monkeypatch.delenv("DEMO_FAULT", raising=False)
    pytester.makepyfile(test_demo=DEMO)
    return pytester


@pytest.fixture
def golden(demo: pytest.Pytester) -> pytest.Pytester:
    """The demo project with its golden made from the clean values."""
    run(demo, "--moesnap-regen").assert_outcomes(failed=1)
    return demo


# ---------------------------------------------------------------- the workflow


def test_no_golden_fails_saying_how_to_create_it_then_regen_writes_and_fails_then_passes(demo):
    first = run(demo)
    first.assert_outcomes(failed=1)
    assert "no golden for this test yet (suite 'test_demo.test_kernel'" in out(first)
    assert "pytest --moesnap-regen test_demo.py::test_kernel" in out(first)
    store = demo.path / "goldens" / "snapshots"
    assert not store.exists()           # a failing check writes nothing

    regen = run(demo, "--moesnap-regen")
    regen.assert_outcomes(failed=1)
    assert "wrote golden test_demo.test_kernel@v0001 (check0: 2 arrays)" in out(regen)
    assert "run it again without --moesnap-regen" in out(regen)
    assert (store / "test_demo.test_kernel" / "v0001" / "published.json").is_file()

    run(demo).assert_outcomes(passed=1)
    again = run(demo, "--moesnap-regen")                  # a new version, never an overwrite
    again.assert_outcomes(failed=1)
    assert "wrote golden test_demo.test_kernel@v0002" in out(again)
    assert "check0: within tolerance of test_demo.test_kernel@v0001" in out(again)
    assert (store / "test_demo.test_kernel" / "v0001" / "published.json").is_file()
    run(demo).assert_outcomes(passed=1)


def test_nan_in_the_candidate_fails_naming_the_array_and_the_index(golden, monkeypatch):
    monkeypatch.setenv("DEMO_MODE", "nan")
    res = run(golden)
    res.assert_outcomes(failed=1)
    text = out(res)
    assert "1 of 2 arrays differ from golden test_demo.test_kernel@v0001, check0 (float32 tolerances)" in text
    hidden = row(res, "hidden")
    assert "NAN_CANDIDATE" in hidden and "1 NaN, 0 Inf in the candidate" in hidden
    assert "worst index (2, 5)" in hidden and "candidate nan" in hidden
    assert "MATCH" in row(res, "ids")
    assert "regenerate if the change is intended: pytest --moesnap-regen test_demo.py::test_kernel" in text


def test_float_noise_within_tolerance_passes(golden, monkeypatch):
    monkeypatch.setenv("DEMO_MODE", "noise")
    run(golden).assert_outcomes(passed=1)


def test_a_five_percent_change_fails_with_the_metric_that_failed(golden, monkeypatch):
    monkeypatch.setenv("DEMO_MODE", "scale")
    res = run(golden)
    res.assert_outcomes(failed=1)
    hidden = row(res, "hidden")
    assert "DIVERGE" in hidden and "outside atol=0.00075, rtol=5e-05" in hidden
    assert "max_rel=0.05" in hidden and "worst index (" in hidden


def test_regen_after_a_change_says_what_changed(golden, monkeypatch):
    monkeypatch.setenv("DEMO_MODE", "scale")
    res = run(golden, "--moesnap-regen")
    res.assert_outcomes(failed=1)
    assert "check0: differs from test_demo.test_kernel@v0001: hidden DIVERGE" in out(res)
    run(golden).assert_outcomes(passed=1)          # the newest version is the 5 % one


def test_a_test_that_fails_otherwise_writes_no_golden(pytester):
    pytester.makepyfile(test_other="""
        def test_x(moesnap_snapshot):
            moesnap_snapshot.check({"a": [1.0, 2.0]})
            assert False, "the test's own failure"
    """)
    res = run(pytester, "--moesnap-regen")
    res.assert_outcomes(failed=1)
    assert "the test's own failure" in out(res) and "wrote golden" not in out(res)
    assert not (pytester.path / "goldens").exists()


def test_a_damaged_golden_fails_naming_the_array(golden):
    chunk = golden.path / "goldens" / "snapshots" / "test_demo.test_kernel" / "v0001" / "check0" / "arrays" / "hidden" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0x01
    chunk.write_bytes(bytes(data))
    res = run(golden)
    res.assert_outcomes(failed=1)
    assert "check0/arrays/hidden: checksum mismatch" in out(res)
    assert "regenerate it: pytest --moesnap-regen test_demo.py::test_kernel" in out(res)
    assert "Traceback" not in out(res)


# ---------------------------------------------------------------- where goldens live


def test_store_root_from_pyproject_and_the_option(demo):
    demo.makepyprojecttoml('[tool.moesnap]\nsnapshot_store = "tests/goldens"\n')
    run(demo, "--moesnap-regen").assert_outcomes(failed=1)
    assert (demo.path / "tests" / "goldens" / "test_demo.test_kernel" / "v0001").is_dir()
    assert not (demo.path / "goldens").exists()
    run(demo).assert_outcomes(passed=1)
    res = run(demo, "--moesnap-store", "elsewhere")         # the option wins: no golden there
    res.assert_outcomes(failed=1)
    assert f"in {demo.path / 'elsewhere'}" in out(res)


def test_tolerances_from_pyproject_and_keywords(pytester, monkeypatch):
    pytester.makepyprojecttoml('[tool.moesnap.tolerance.float32]\ndefault = {atol = 0.1, rtol = 0.0}\n')
    pytester.makepyfile(test_tol="""
        import os
        import numpy as np

        def test_x(moesnap_snapshot):
            shift = float(os.environ.get("SHIFT", "0"))
            kw = {"atol": float(os.environ["ATOL"])} if "ATOL" in os.environ else {}
            moesnap_snapshot.check({"a": np.ones(3) + shift}, **kw)
    """)
    monkeypatch.delenv("SHIFT", raising=False)
    monkeypatch.delenv("ATOL", raising=False)
    run(pytester, "--moesnap-regen").assert_outcomes(failed=1)
    monkeypatch.setenv("SHIFT", "0.05")
    run(pytester).assert_outcomes(passed=1)              # atol 0.1 from [tool.moesnap]
    monkeypatch.setenv("ATOL", "0.01")
    res = run(pytester)                                  # the keyword wins
    res.assert_outcomes(failed=1)
    assert "outside atol=0.01, rtol=0" in out(res)


# ---------------------------------------------------------------- what check takes


def test_torch_tensors_cases_recorders_and_several_checks(pytester):
    pytester.makepyfile(test_kinds="""
        import numpy as np
        import torch

        import moesnap

        def test_kinds(moesnap_snapshot):
            rec = moesnap.Recorder()
            rec.save("tokens", None, torch.tensor([1, 2]))
            rec.save("moe_out", 0, torch.ones(2, 4))
            moesnap_snapshot.check({"t": torch.arange(6.0, dtype=torch.bfloat16).reshape(2, 3),
                                    "nested/x.y": np.zeros(2), "scalar": np.float64(3.0)}, dtype="bfloat16")
            moesnap_snapshot.check(rec, name="recorded")
            moesnap_snapshot.check(rec.case())
    """)
    res = run(pytester, "--moesnap-regen")
    res.assert_outcomes(failed=1)
    assert "(check0: 3 arrays, recorded: 2 arrays, check2: 2 arrays)" in out(res)
    run(pytester).assert_outcomes(passed=1)


def test_new_missing_and_reshaped_arrays_fail(pytester, monkeypatch):
    pytester.makepyfile(test_shapes="""
        import os
        import numpy as np

        def test_x(moesnap_snapshot):
            arrays = {"a": np.zeros(3), "b": np.zeros(2)}
            if os.environ.get("CHANGED"):
                arrays = {"a": np.zeros(4), "c": np.zeros(1)}
            moesnap_snapshot.check(arrays)
    """)
    monkeypatch.delenv("CHANGED", raising=False)
    run(pytester, "--moesnap-regen").assert_outcomes(failed=1)
    monkeypatch.setenv("CHANGED", "1")
    res = run(pytester)
    res.assert_outcomes(failed=1)
    text = out(res)
    assert "3 of 3 arrays differ" in text
    assert "SHAPE_MISMATCH" in text and "golden shape [3], candidate [4]" in text
    assert "missing from the candidate" in text and "not in the golden (a new array)" in text


def test_misuse_is_one_clear_error(pytester):
    pytester.makepyfile(test_misuse="""
        import numpy as np
        import pytest
        from moesnap.errors import UsageError

        def test_misuse(moesnap_snapshot):
            with pytest.raises(UsageError, match="unknown tolerance 'tol'"):
                moesnap_snapshot.check({"a": np.zeros(1)}, tol=1)
            with pytest.raises(UsageError, match="array name '../x'"):
                moesnap_snapshot.check({"../x": np.zeros(1)})
            with pytest.raises(UsageError, match="only real floating"):
                moesnap_snapshot.check({"s": np.array(["x"])})
            with pytest.raises(UsageError, match="dtype='float8'"):
                moesnap_snapshot.check({"a": np.zeros(1)}, dtype="float8")
            with pytest.raises(UsageError, match="expected a mapping"):
                moesnap_snapshot.check(42)
            with pytest.raises(UsageError, match="not both"):
                moesnap_snapshot.check_forward("m.gguf", [[1]], lambda t, r: None)
    """)
    run(pytester).assert_outcomes(passed=1)


def test_suite_names_from_node_ids():
    assert suite_name("tests/test_a.py::test_b") == "tests.test_a.test_b"
    assert suite_name("tests/test_a.py::TestX::test_b") == "tests.test_a.TestX.test_b"
    p1, p2 = suite_name("t.py::test_b[1-a/b]"), suite_name("t.py::test_b[1-a_b]")
    assert p1.startswith("t.test_b_1-a_b-") and p1 != p2          # parameters: a hash keeps them apart
    long = suite_name("tests/" + "x" * 200 + ".py::test")
    assert len(long) <= 100 and long == suite_name("tests/" + "x" * 200 + ".py::test")
    for nodeid in ("../../evil.py::t", "/abs/path.py::t", "a\\b.py::t", "::", "t.py::test[\x00]"):
        name = suite_name(nodeid)
        assert ".." not in name and "/" not in name and "\\" not in name
    with pytest.raises(UsageError):
        from moesnap.store import validate_suite
        validate_suite("a/b")


# ---------------------------------------------------------------- a Qwen3-MoE forward


def test_check_forward_regenerates_passes_and_names_a_planted_fault(pytester, monkeypatch):
    monkeypatch.delenv("DEMO_FAULT", raising=False)
    pytester.makepyfile(test_fwd=FORWARD)
    first = run(pytester)
    first.assert_outcomes(failed=1)
    assert "no golden for this test yet" in out(first) and "from " in out(first)
    regen = run(pytester, "--moesnap-regen")
    regen.assert_outcomes(failed=1)
    assert "wrote golden test_fwd.test_forward@v0001 from" in out(regen) and "(2 cases)" in out(regen)
    run(pytester).assert_outcomes(passed=1)

    monkeypatch.setenv("DEMO_FAULT", "1")
    res = run(pytester)
    res.assert_outcomes(failed=1)
    text = out(res)
    assert "the forward does not pass against test_fwd.test_forward@v0001" in text
    assert "first divergence: case0 / layer 2 / moe_out" in text
    assert "verdict: fail" in text          # the table text follows the summary


def test_check_forward_refuses_a_golden_made_for_other_inputs(pytester, monkeypatch):
    monkeypatch.delenv("DEMO_FAULT", raising=False)
    pytester.makepyfile(test_fwd=FORWARD)
    run(pytester, "--moesnap-regen").assert_outcomes(failed=1)
    pytester.makepyfile(test_fwd=FORWARD.replace("[[1, 2, 3, 4], [5, 6]]", "[[1, 2, 3]]"))
    res = run(pytester)
    res.assert_outcomes(failed=1)
    assert "was made for other inputs ([[1, 2, 3, 4], [5, 6]]) than this test's ([[1, 2, 3]])" in out(res)
