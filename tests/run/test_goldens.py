"""`moesnap goldens` end to end on the bundled tiny model: the commands, crash safety,
concurrent writers, determinism, and bad input (exit 2, one line, nothing stored changes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moesnap.cli.main import main
from moesnap.errors import GoldenError
from moesnap.stages import LAYER_STAGES
from moesnap.model.weights import GGUFModel
from moesnap.run.check import check_golden_matches_model
from moesnap.store import LocalGoldenStore

PROMPTS = ["The quick brown fox", "def main():\n    return 0"]


def gen_args(model, root, *extra, suite="tiny"):
    return ["-q", "goldens", "generate", str(model), "--suite", suite, "--store", str(root), *extra]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (names included): byte-for-byte comparison."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


SLOW_CLI = Path(__file__).with_name("slow_cli.py")


def run_cli(*args, env=None, write_delay=0.0, read_delay=0.0, **kw) -> subprocess.Popen:
    """``moesnap ARGS`` in a subprocess; with a delay, over stores slowed by it (:mod:`slow_cli`)."""
    if write_delay or read_delay:
        cmd = [sys.executable, str(SLOW_CLI), str(write_delay), str(read_delay)]
    else:
        cmd = [sys.executable, "-c", "import sys; from moesnap.cli.main import main; sys.exit(main(sys.argv[1:]))"]
    full_env = {**os.environ, "MOESNAP_NO_PROGRESS": "1", **(env or {})}
    return subprocess.Popen([*cmd, *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_path):
    """A store with tiny@v0001: two prompts and a token-id case."""
    root = tmp_path_factory.mktemp("published") / "goldens"
    args = gen_args(tiny_path, root, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--tokens", "1,259,3,270,42")
    assert main(args) == 0
    return root


@pytest.fixture
def root(published, tmp_path):
    """A private copy of the published store."""
    dst = tmp_path / "goldens"
    shutil.copytree(published, dst)
    return dst


# ---------------------------------------------------------------- the commands


def test_generate_prints_the_version_and_records_provenance(root, tiny_path, capsys):
    assert main(gen_args(tiny_path, root, "--tokens", "5,6,7", "--prompt", "Hi", "--dtype", "float64")) == 0
    assert capsys.readouterr().out == "tiny@v0002\n"
    v = LocalGoldenStore(root).open_version("tiny")
    m = v.meta
    assert v.version == "v0002" and m["dtype"] == "float64" and m["suite"] == "tiny"
    assert [(c["name"], c["prompt"], c["token_ids"]) for c in m["cases"]] == [
        ("case0", None, [5, 6, 7]), ("case1", "Hi", [3 + ord("H"), 3 + ord("i")])]
    assert m["model"]["file"] == tiny_path.name and m["model"]["size"] == tiny_path.stat().st_size
    from moesnap.util import file_sha256

    assert m["model"]["sha256"] == file_sha256(tiny_path)
    assert m["model"]["config"]["n_layer"] == 4 and m["model"]["quant_types"]
    assert {"torch", "numpy", "gguf", "zarr", "moesnap"} <= set(m["versions"])
    assert m["platform"] and m["created"] and "goldens generate" in m["command"]
    assert len(m["checksums"]) == 2 * (4 + len(LAYER_STAGES))
    case = v.read_case("case1")
    assert case.model["logits"].dtype == np.float64 and case.layers["moe_out"].shape[:2] == (4, 2)
    check_golden_matches_model([], GGUFModel.open(tiny_path), where="t", meta=m)


def test_generate_shows_progress(root, tiny_path, capsys, monkeypatch):
    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    assert main(["goldens", "generate", str(tiny_path), "--suite", "p", "--store", str(root), "--tokens", "1,2"]) == 0
    out, err = capsys.readouterr()
    assert out == "p@v0001\n"
    assert "p: cases" in err and "reference" in err


def test_list_and_show(root, capsys):
    assert main(["goldens", "list", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny  v0001  newest v0001: tiny.gguf (") and "3 case(s)" in out
    assert main(["-q", "goldens", "show", "tiny", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("tiny@v0001")
    for needle in ("sha256", "quants:", "torch", "case case0: 19 tokens", json.dumps(PROMPTS[1]),
                   "case case2: 5 tokens  prompt (token ids)  ids [1, 259, 3, 270, 42]",
                   "layers (4):", "topk_ids [19,2] int32", "expert_out [19,2,64]", "logits [19,272]",
                   "66 arrays, all verified"):
        assert needle in out, needle


def test_diff_identical_changed_and_json(root, tiny_path, tmp_path, capsys):
    inputs = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--tokens", "1,259,3,270,42"]
    assert main(gen_args(tiny_path, root, *inputs)) == 0                       # v0002, same inputs
    assert main(gen_args(tiny_path, root, *inputs, "--dtype", "float64")) == 0  # v0003, float64
    capsys.readouterr()
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "identical: all 225 stages bit for bit" in out and "\nchanged:" not in out
    report = tmp_path / "diff.json"
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny", "--store", str(root), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "provenance dtype: float32 -> float64" in out and "beyond tolerance" in out
    d = json.loads(report.read_text())
    assert d["a"] == "tiny@v0001" and d["b"] == "tiny@v0003" and d["verdict"] == "changed"
    changed = [r for r in d["results"] if not r["identical"]]
    assert changed and d["n_changed"] == len([r for r in changed if r["changed"]])
    # float64 against float32 is float noise: the classifier calls every changed stage MATCH
    assert {r["verdict"] for r in changed} == {"MATCH"}, {(r["stage"], r["verdict"]) for r in changed}
    assert all(r["metrics"]["max_abs"] < 1e-3 for r in changed)
    # embed only changed dtype (a float32 table read exactly): not a change; everything computed after it moved
    assert {r["stage"] for r in changed if r["metrics"]["max_abs"] == 0} == {"embed"}
    assert {r["stage"] for r in changed if not r["changed"]} == {"embed"} and d["n_dtype_only"] == 3


def test_diff_names_a_planted_change(root, capsys):
    st = LocalGoldenStore(root)
    v1 = st.open_version("tiny")
    cases = {n: v1.read_case(n) for n in v1.case_names()}
    cases["case0"].layers["moe_out"][2] *= 1.5                 # layer 2, one stage
    st.publish("tiny", cases, {k: v1.meta[k] for k in ("model", "dtype", "versions")})
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(line for line in lines if "DIVERGE" in line)
    assert "layer 2" in first and "moe_out" in first
    assert "case case1: all" in out and "case case2: all" in out   # untouched cases
    assert not any("layer 0" in line or "layer 1" in line for line in lines)   # nothing before it changed


def test_prune_keeps_the_newest(root, tiny_path, capsys):
    for _ in range(2):
        assert main(gen_args(tiny_path, root, "--tokens", "9,9")) == 0
    capsys.readouterr()
    assert main(["goldens", "prune", "tiny", "--keep", "1", "--store", str(root)]) == 0
    assert "deleted v0001, v0002; kept v0003" in capsys.readouterr().out
    assert LocalGoldenStore(root).versions("tiny") == ["v0003"]
    assert main(["goldens", "prune", "tiny", "--keep", "1", "--store", str(root)]) == 0
    assert LocalGoldenStore(root).versions("tiny") == ["v0003"]


def test_generate_is_deterministic(root, tiny_path):
    inputs = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--tokens", "1,259,3,270,42"]
    assert main(gen_args(tiny_path, root, *inputs)) == 0
    a, b = tree_digest(root / "tiny" / "v0001"), tree_digest(root / "tiny" / "v0002")
    assert a.keys() == b.keys()
    chunks = [p for p in a if "/c/" in p]
    assert len(chunks) > 100
    assert all(a[p] == b[p] for p in chunks)                                     # the array bytes
    assert all(a[p] == b[p] for p in a if p.endswith("zarr.json") and p.count("/") >= 2 and "/layers/" in p)
    st = LocalGoldenStore(root)
    va, vb = st.open_version("tiny", "v0001"), st.open_version("tiny", "v0002")
    assert va.meta["checksums"] == vb.meta["checksums"]


# ---------------------------------------------------------------- crashes and concurrency


def _wait_for(predicate, timeout=90.0, proc=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_sigkill_mid_write_publishes_nothing(root, tiny_path, capsys):
    before = tree_digest(root / "tiny" / "v0001")
    p = run_cli(*gen_args(tiny_path, root, "--tokens", "1,2,3,4", "--tokens", "5,6"),
                write_delay=0.05)
    suite = root / "tiny"
    _wait_for(lambda: any(suite.glob(".staging-*/case0/layers/*/c")), proc=p)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert [d.name for d in suite.glob(".staging-*")]                  # the half-written version is there...
    assert LocalGoldenStore(root).versions("tiny") == ["v0001"]         # ...and nobody sees it
    assert main(["-q", "goldens", "list", "--store", str(root)]) == 0
    assert "tiny  v0001  newest v0001" in capsys.readouterr().out
    assert main(["-q", "goldens", "show", "tiny", "--store", str(root)]) == 0
    assert capsys.readouterr().out.startswith("tiny@v0001")
    assert main(["-q", "goldens", "show", "tiny@v0002", "--store", str(root)]) == 2
    assert tree_digest(suite / "v0001") == before
    assert main(["-q", "goldens", "prune", "tiny", "--keep", "5", "--store", str(root)]) == 0
    assert "removed unpublished .staging-" in capsys.readouterr().out
    assert sorted(d.name for d in suite.iterdir()) == ["v0001"]
    assert tree_digest(suite / "v0001") == before
    # and the next generate takes the next number as if nothing happened
    assert main(gen_args(tiny_path, root, "--tokens", "7")) == 0
    assert capsys.readouterr().out == "tiny@v0002\n"


def test_concurrent_generates_make_two_complete_versions(root, tiny_path):
    before = tree_digest(root / "tiny" / "v0001")
    procs = {ids: run_cli(*gen_args(tiny_path, root, "--tokens", ids), write_delay=0.1)
             for ids in ("1,2,3", "4,5")}
    overlap = 0   # the most staging directories seen at once: the writes really were concurrent
    while any(p.poll() is None for p in procs.values()):
        overlap = max(overlap, len(list((root / "tiny").glob(".staging-*"))))
        time.sleep(0.01)
    results = {ids: p.communicate(timeout=120) + (p.returncode,) for ids, p in procs.items()}
    assert overlap == 2
    made = {}
    for ids, (out, err, code) in results.items():
        if code == 0:
            made[ids] = out.strip()
        else:   # the only acceptable alternative: one clean refusal
            assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert made, results
    assert len(set(made.values())) == len(made)
    st = LocalGoldenStore(root)
    assert st.versions("tiny") == ["v0001"] + sorted(r.split("@")[1] for r in made.values())
    for ids, ref in made.items():
        v = st.resolve(ref)
        assert v.meta["cases"][0]["token_ids"] == [int(t) for t in ids.split(",")]
        v.read_case("case0")                                         # complete and verified
    assert tree_digest(root / "tiny" / "v0001") == before
    assert not list((root / "tiny").glob(".*"))


# ---------------------------------------------------------------- bad input


def _flip_chunk(root: Path) -> None:
    chunk = root / "tiny" / "v0001" / "case1" / "layers" / "moe_out" / "c" / "3" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x04
    chunk.write_bytes(bytes(data))


BAD = {
    "unknown suite": (["goldens", "show", "nosuch"], None, "unknown suite 'nosuch'"),
    "unknown version": (["goldens", "show", "tiny@v0009"], None, "unknown version 'v0009' (published: v0001)"),
    "malformed version": (["goldens", "show", "tiny@9"], None, "version '9'"),
    "diff unknown version": (["goldens", "diff", "tiny@v0001", "tiny@v0002"], None, "unknown version 'v0002'"),
    "prune keep 0": (["goldens", "prune", "tiny", "--keep", "0"], None, "--keep 0"),
    "prune unknown suite": (["goldens", "prune", "other", "--keep", "1"], None, "unknown suite 'other'"),
    "suite with ..": (["goldens", "generate", "{model}", "--suite", "../evil", "--tokens", "1"], None, "contains '..'"),
    "suite with /": (["goldens", "generate", "{model}", "--suite", "a/b", "--tokens", "1"], None, "path separator"),
    "absolute suite": (["goldens", "generate", "{model}", "--suite", "/tmp/x", "--tokens", "1"], None, "absolute"),
    "control chars": (["goldens", "generate", "{model}", "--suite", "a\x1bb", "--tokens", "1"], None, "control characters"),
    "show suite ..": (["goldens", "show", "..@v0001"], None, "contains '..'"),
    "no inputs": (["goldens", "generate", "{model}", "--suite", "tiny"], None, "at least one --tokens or --prompt"),
    "bad dtype": (["goldens", "generate", "{model}", "--suite", "tiny", "--tokens", "1", "--dtype", "bfloat16"],
                  None, "unknown golden dtype 'bfloat16'"),
    "token out of vocab": (["goldens", "generate", "{model}", "--suite", "tiny", "--tokens", "1,99999"], None,
                           "token id 99999 is outside the vocabulary"),
    "missing model": (["goldens", "generate", "{missing}", "--suite", "tiny", "--tokens", "1"], None, "missing.gguf"),
    "bit flip": (["goldens", "show", "tiny"], _flip_chunk, "case1/layers/moe_out: checksum mismatch"),
    "bit flip in diff": (["goldens", "diff", "tiny@v0001", "tiny@v0001"], _flip_chunk, "checksum mismatch"),
    "missing array": (["goldens", "show", "tiny"],
                      lambda r: shutil.rmtree(r / "tiny" / "v0001" / "case2" / "logits"), "case2/logits: array is missing"),
    "deleted marker": (["goldens", "show", "tiny"],
                       lambda r: (r / "tiny" / "v0001" / "published.json").unlink(), "unknown suite 'tiny'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, root, tiny_path, tmp_path, capsys):
    argv, damage, message = BAD[name]
    if damage is not None:
        damage(root)
    argv = [a.replace("{model}", str(tiny_path)).replace("{missing}", str(tmp_path / "missing.gguf")) for a in argv]
    before = tree_digest(tmp_path)
    capsys.readouterr()
    assert main(["-q", *argv, "--store", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("moesnap: error: "), err
    assert message in err, err
    assert tree_digest(tmp_path) == before


def test_store_that_is_a_file(tmp_path, tiny_path, capsys):
    f = tmp_path / "store"
    f.write_text("not a directory")
    for argv in (["goldens", "list"], ["goldens", "show", "tiny"],
                 ["goldens", "generate", str(tiny_path), "--suite", "tiny", "--tokens", "1"]):
        assert main(["-q", *argv, "--store", str(f)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"moesnap: error: {f}: store path is a file, not a directory"
    assert f.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_golden_from_another_model_file(root, tiny_path, tmp_path):
    other = tmp_path / "tiny-edited.gguf"
    data = bytearray(tiny_path.read_bytes())
    data[-100] ^= 0xFF                       # a weight byte, far from the header
    other.write_bytes(bytes(data))
    meta = LocalGoldenStore(root).open_version("tiny").meta
    check_golden_matches_model([], GGUFModel.open(tiny_path), where="tiny", meta=meta)
    with pytest.raises(GoldenError, match=r"another model file \(sha256 .*tiny-edited.gguf is "):
        check_golden_matches_model([], GGUFModel.open(other), where="tiny", meta=meta)


def test_generation_clocks_each_layer_and_show_says_it(tiny_path, tmp_path, capsys):
    """Every layer's time and the memory after it are recorded in the version's provenance (issue 15:
    generation per layer, streaming one layer at a time); `goldens show` prints a line per case;
    `goldens diff` does not count how long generation took as a change."""
    root = tmp_path / "goldens"
    for _ in range(2):
        assert main(gen_args(tiny_path, root, "--tokens", "5,6,7", "--tokens", "1,2")) == 0
    m = LocalGoldenStore(root).open_version("tiny").meta
    assert set(m["layer_timing"]) == {"case0", "case1"}
    for rows in m["layer_timing"].values():
        assert [r["layer"] for r in rows] == [0, 1, 2, 3]
        assert all(r["seconds"] >= 0 and r["peak_rss_gib"] > 0 for r in rows)
        assert all(r["rss_gib"] is None or 0 < r["rss_gib"] <= r["peak_rss_gib"] + 1e-3 for r in rows)
    capsys.readouterr()
    assert main(["goldens", "show", "tiny", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("    generated: 4 layers in ") == 2 and "s/layer (slowest: layer " in out and "peak memory" in out
    assert main(["goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root)]) == 0
    assert "layer_timing" not in capsys.readouterr().out


def test_timing_summary_of_nothing_and_of_a_flat_run():
    from moesnap.run.goldens import timing_summary

    assert timing_summary([]) == "no per-layer timing recorded"
    rows = [{"layer": i, "seconds": s, "peak_rss_gib": 4.0, "rss_gib": 3.5} for i, s in enumerate([1.0, 3.0, 2.0])]
    assert timing_summary(rows) == ("3 layers in 6 s, 2 s/layer (slowest: layer 1, 3 s); peak memory 4.00 GiB, "
                                    "resident 3.50 GiB after layer 0, 3.50 GiB after layer 2")
