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
from moesnap.stages import FAMILY_STAGES
from moesnap.model.weights import GGUFModel
from moesnap.run.check import check_golden_matches_model
from moesnap.store import LocalGoldenStore

#: the stages of the family these tests run (Qwen3-MoE); the schema has other families' too
LAYER_STAGES = FAMILY_STAGES["qwen3moe"]

PROMPTS = ["The quick brown fox", "def main():\n    return 0"]


def gen_args(model, root, *extra, suite="tiny"):
    return ["-q", "goldens", "generate", str(model), "--suite", suite, "--store", str(root), *extra]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (names included): byte-for-byte comparison.  The files
    ``root.rglob("*")`` yields that are files (symlinked directories not entered), walked with os.walk:
    two thirds of rglob's time over a copy of goldens/ (300 files), which test_bad_inputs digests per row."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


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


def test_generate_shows_progress_in_whole_lines(root, tiny_path, capsys, monkeypatch):
    """Redirected to a file (not a terminal), the progress is whole lines: a status line between bars,
    one bar at a time (its redraws on one line, cleared when done), no cursor movement, no blank line."""
    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    assert main(["goldens", "generate", str(tiny_path), "--suite", "p", "--store", str(root), "--tokens", "1,2",
                 "--tokens", "7"]) == 0
    out, err = capsys.readouterr()
    assert out == "p@v0001\n"
    assert "\x1b" not in err and err.endswith("\n"), err
    lines = err.split("\n")[:-1]
    for line in lines:
        shown = line.split("\r")[-1]              # what is left of the line once the bars are cleared
        assert shown.startswith("moesnap: ") and "%|" not in shown, (line, err)
    shown = [line.split("\r")[-1] for line in lines]
    assert shown[0] == "moesnap: p: case0 (1 of 2), 2 tokens" and "moesnap: p: case1 (2 of 2), 1 token" in shown
    assert any("reference:" in line for line in lines)        # the forward's bar, on the status line's left
    assert sum(s.startswith("moesnap: case") and " in " in s for s in shown) == 2   # each case's clock


def test_a_status_line_goes_above_an_open_bar(capsys, monkeypatch):
    from moesnap.util import progress, status

    monkeypatch.delenv("MOESNAP_NO_PROGRESS", raising=False)
    for i in progress(range(3), desc="work"):
        if i == 1:
            status("halfway")
    err = capsys.readouterr().err
    assert "moesnap: halfway\n" in err
    before = err.split("moesnap: halfway")[0]
    assert before.endswith("\r") and "work:" in before      # the bar was cleared first, not written over


def test_list_and_show(root, capsys):
    assert main(["goldens", "list", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny  v0001  newest v0001: tiny.gguf (") and "3 cases" in out
    assert main(["-q", "goldens", "show", "tiny", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("tiny@v0001")
    for needle in ("sha256", "model:    tiny.gguf  1.6 MiB  sha256 ", "quants:", "torch", "case case0: 19 tokens",
                   json.dumps(PROMPTS[1]),
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
    # the commands differ in --store (a copy of the store) and --dtype: too long to show, the keys are named
    assert "provenance: 2 keys differ: command, dtype (values: --details)" in out and "beyond tolerance" in out
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


# ---------------------------------------------------------------- what a newcomer tripped over (issue 19)


def test_diff_json_dash_writes_to_stdout(root, tiny_path, tmp_path, capsys, monkeypatch):
    """`--json -` prints the JSON on stdout (the summary on stderr), as check and compare do: no file named -."""
    monkeypatch.chdir(tmp_path)
    assert main(gen_args(tiny_path, root, "--tokens", "9,9")) == 0
    capsys.readouterr()
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root), "--json", "-"]) == 1
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["a"] == "tiny@v0001" and d["b"] == "tiny@v0002" and d["verdict"] == "changed"
    assert err.startswith("tiny@v0001 -> tiny@v0002\n") and "wrote" not in err
    assert not (tmp_path / "-").exists()


def test_diff_of_a_changed_prompt_says_where_the_tokens_differ(root, tiny_path, capsys):
    """One prompt changed: the note names the first differing position, both token ids and both
    prompts; --details shows the ids from there and the prompts whole; the command is provenance."""
    other = PROMPTS[1].replace("return 0", "return 1")
    assert main(gen_args(tiny_path, root, "--prompt", PROMPTS[0], "--prompt", other, "--tokens", "1,259,3,270,42")) == 0
    capsys.readouterr()
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    at = PROMPTS[1].index("0")
    note = next(line for line in out.splitlines() if line.startswith("  case case1:"))
    n = len(PROMPTS[1].encode())                                      # the byte vocabulary: a token a byte
    assert note == (f"  case case1: other tokens in tiny@v0002: {n} tokens each, the first difference at position {at} "
                    f"({3 + ord('0')} in tiny@v0001, {3 + ord('1')} in tiny@v0002); "
                    f"prompt {json.dumps(PROMPTS[1])} -> {json.dumps(other)}; stages not compared"), note
    assert "  provenance: 1 key differs: command (values: --details)" in out    # --store (a copy) and the prompt
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root), "--details"]) == 1
    details = capsys.readouterr().out.splitlines()
    assert details[1].startswith("  provenance command: … --store ") and "return 1" in details[1]
    i = details.index(note)
    assert details[i + 1].startswith(f"    ids in tiny@v0001 from position {at - 4}: […, ")
    assert details[i + 1].endswith(f"{3 + ord('0')}]") and details[i + 2].endswith(f"{3 + ord('1')}]")
    assert details[i + 3] == f"    prompt in tiny@v0001: {json.dumps(PROMPTS[1])}"
    assert details[i + 4] == f"    prompt in tiny@v0002: {json.dumps(other)}"


def test_diff_of_a_longer_case(tiny_path, tmp_path, capsys):
    root = tmp_path / "goldens"
    for ids in ("5,6,7", "5,6,7,8"):
        assert main(gen_args(tiny_path, root, "--tokens", ids)) == 0
    capsys.readouterr()
    assert main(["-q", "goldens", "diff", "tiny@v0001", "tiny@v0002", "--store", str(root), "--json", "-"]) == 1
    out, err = capsys.readouterr()
    assert ("  case case0: other tokens in tiny@v0002: 3 -> 4 tokens, the first 3 tokens the same, then "
            "tiny@v0002 goes on with 8; stages not compared") in err
    assert "  provenance command: … --tokens 5,6,7 … -> … --tokens 5,6,7,8 …" in err     # the command is provenance
    d = json.loads(out)
    assert d["token_changes"] == [{"case": "case0", "first_difference": 3, "tokens": [[5, 6, 7], [5, 6, 7, 8]],
                                   "prompts": [None, None]}]
    assert {"key": "command", "a": d["provenance"][0]["a"], "b": d["provenance"][0]["b"]} in d["provenance"]


def _bash_words(command: str) -> list[str]:
    """The words bash makes of a command line (each printed NUL-terminated, read back as argv is)."""
    r = subprocess.run(["bash", "-c", f"set -- {command}; for w; do printf '%s\\0' \"$w\"; done"],
                       capture_output=True, check=True)
    return [w.decode("utf-8", "surrogateescape") for w in r.stdout.split(b"\0")[:-1]]


@pytest.mark.parametrize("prompt", [PROMPTS[1], "tab\there", "it's  two  spaces", "\x1b[31mred\u2028line é",
                                    "back\\slash $HOME `x`"])
def test_the_recorded_command_gives_back_the_same_prompt(prompt, tiny_path, tmp_path):
    """The regenerate command quotes a prompt so that bash gives it back exactly: a newline, a tab,
    an escape, runs of spaces (a note that joins the command's words with single spaces keeps them)."""
    from moesnap.run.goldens import shell_command

    root = tmp_path / "goldens"
    assert main(gen_args(tiny_path, root, "--prompt", prompt)) == 0
    command = LocalGoldenStore(root).open_version("tiny").meta["command"]
    assert "\n" not in command and command.isprintable()
    for shown in (command, " ".join(command.split())):
        words = _bash_words(shown)
        assert words[words.index("--prompt") + 1] == prompt, shown
    assert shell_command(["a b", "c"]) == "'a b' c"                      # plain text: shlex's quoting


def test_the_check_note_regenerates_the_same_golden(published, tiny_path, capsys):
    """A failing check names the command that generated its golden; pasted into bash it gives the same prompts."""
    assert main(["-q", "check", str(tiny_path), "--suite", "tiny", "--store", str(published),
                 "--inject", "scale:layer=1,stage=moe_out,factor=1.5"]) == 1
    note = next(line for line in capsys.readouterr().out.splitlines() if "was generated by: " in line)
    words = _bash_words(note.split("was generated by: ", 1)[1])
    prompts = [words[i + 1] for i, w in enumerate(words) if w == "--prompt"]
    assert prompts == PROMPTS and words[:3] == ["moesnap", "goldens", "generate"]


def test_generate_help_names_both_kinds_of_model(capsys):
    assert main(["goldens", "generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "a GGUF file, or a checkpoint directory (config.json + *.safetensors)" in out
    assert "--tokens IDS" in out and "--prompt TEXT" in out and "the GGUF model file" not in out


def test_one_of_each_is_singular(tiny_path, tmp_path, capsys):
    root = tmp_path / "goldens"
    assert main(gen_args(tiny_path, root, "--tokens", "7")) == 0
    capsys.readouterr()
    assert main(["-q", "goldens", "list", "--store", str(root)]) == 0
    assert ", 1 case, " in capsys.readouterr().out
    assert main(["-q", "goldens", "show", "tiny", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "case case0: 1 token  prompt" in out and "1 tokens" not in out


def test_generate_suite_passes_token_lists_through(tiny_path, tmp_path, monkeypatch):
    """The Python API hands token lists (numpy integers too) to generate as they are; a value that is
    not an integer is a UsageError naming it."""
    import moesnap.run.goldens as goldens
    from moesnap.errors import UsageError

    seen = []
    real = goldens.generate
    monkeypatch.setattr(goldens, "generate", lambda *a, **kw: seen.append(kw["inputs"]) or real(*a, **kw))
    ref = goldens.generate_suite(tiny_path, "api", [np.array([5, 6, 7]), "Hi"], store=tmp_path / "g")
    assert ref == "api@v0001" and seen == [[("tokens", [5, 6, 7]), ("prompt", "Hi")]]
    assert LocalGoldenStore(tmp_path / "g").open_version("api").meta["cases"][0]["token_ids"] == [5, 6, 7]
    for bad, message in (([1.5, 2], r"token ids \[1.5, 2\]: expected a list of integers"),
                         ([], "an empty list of token ids")):
        with pytest.raises(UsageError, match=message):
            goldens.generate_suite(tiny_path, "api", [bad], store=tmp_path / "g")


def test_show_gives_a_command_recorded_before_the_quoting_to_paste(capsys, monkeypatch):
    """The bundled golden's command was recorded with a newline inside '...': goldens show re-quotes it,
    and bash gives back the prompts it was made from."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    meta = LocalGoldenStore("goldens").open_version("tiny").meta
    assert "\n" in meta["command"]                                   # as recorded (the bundled golden is unchanged)
    assert main(["-q", "goldens", "show", "tiny", "--store", "goldens", "--no-verify"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  command:  "))
    words = _bash_words(line.removeprefix("  command:  "))
    prompts = [words[i + 1] for i, w in enumerate(words) if w == "--prompt"]
    assert prompts == [c["prompt"] for c in meta["cases"] if c["prompt"] is not None] == PROMPTS
