"""``moesnap check`` as a pipeline (:func:`moesnap.run.check.run_check`): the candidate's forwards run on a thread
of their own into arrays allotted from the config (:class:`moesnap.model.recorder.LayerRecorder`) while the judge
reads each layer as it is made.  The reports are those of the forwards made whole first (``MOESNAP_PIPELINE=0``),
to the last printed digit; an error of a forward surfaces as it does there, and no thread is left behind."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import moesnap
import moesnap.judge.compare as judge_compare
import moesnap.run.check as run_check
from moesnap.case import from_recorder
from moesnap.cli.main import main
from moesnap.errors import GoldenError, UsageError
from moesnap.judge.report import text
from moesnap.model.candidate import CandidateModel
from moesnap.model.load import open_model
from moesnap.model.recorder import ArrayRecorder, LayerRecorder
from moesnap.model.replay import replay_case
from moesnap.model.synth import make_model, preset
from moesnap.run.rereference import layer_allotment

GOLDENS = str(Path(__file__).resolve().parents[2] / "goldens")
TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7]


def _check(tiny_path, monkeypatch, pipeline: str, **kw):
    monkeypatch.setenv("MOESNAP_PIPELINE", pipeline)
    return moesnap.check(tiny_path, "tiny", store=GOLDENS, show_progress=False, **kw)


def _cli(tiny_path, monkeypatch, capsys, tmp_path, pipeline: str, *extra: str):
    monkeypatch.setenv("MOESNAP_PIPELINE", pipeline)
    js = tmp_path / "r.json"       # one name: stdout says where it wrote
    js.unlink(missing_ok=True)
    code = main(["-q", "check", str(tiny_path), "--suite", "tiny", "--store", GOLDENS, "--json", str(js), "--force",
                 *extra])
    out = capsys.readouterr()
    return code, out.out, out.err, (json.loads(js.read_text()) if js.exists() else None)


def _no_thread_left() -> bool:
    return not any(t.name.startswith("moesnap-check") and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("kw, verdict", [
    ({"dtype": "float32"}, "pass"),
    ({"dtype": "float32", "replay": True, "inject": ["nan:layer=2,expert=3"]}, "fail"),
    ({"dtype": "float32", "inject": ["route:layer=2,token=4"]}, "fail"),          # a routing flip beyond a tie
    ({"dtype": "bfloat16"}, "pass"),                                # stage-local replay, router replay followed
    ({"dtype": "bfloat16", "router_replay": False}, "inconclusive"),
    ({"dtype": "bfloat16", "inject": ["scale:layer=3,stage=moe_out,factor=0.95"]}, "fail"),
])
def test_the_pipeline_gives_the_report_of_the_forwards_made_whole_first(tiny_path, monkeypatch, kw, verdict):
    piped = _check(tiny_path, monkeypatch, "1", **kw)
    whole = _check(tiny_path, monkeypatch, "0", **kw)
    assert piped.to_dict() == whole.to_dict()
    assert text(piped) == text(whole)
    # and what they agree on is something: the verdict, the replay, the routes the candidate followed
    assert piped.verdict == verdict
    assert bool(piped.replay) == (kw["dtype"] == "bfloat16" or bool(kw.get("replay")))
    notes = [n for c in piped.cases for n in c.routing_notes]
    if kw == {"dtype": "bfloat16"}:     # router replay followed the golden at layer 3: read as the layer was made
        assert any("layer 3: tokens [22]" in n and "one side followed" in n for n in notes), notes
    if kw.get("inject"):
        fd = piped.first_divergence
        assert fd is not None and fd.layer == int(kw["inject"][0].split("layer=")[1].split(",")[0]), fd


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_the_pipeline_gives_the_report_of_the_forwards_made_whole_first(tiny_path, monkeypatch, dtype):
    # each layer to the host in one copy (a batched recorder), the judge on the device
    kw = {"dtype": dtype, "device": "cuda", "inject": ["nan:layer=2,expert=3"]}
    piped = _check(tiny_path, monkeypatch, "1", **kw)
    whole = _check(tiny_path, monkeypatch, "0", **kw)
    assert piped.to_dict() == whole.to_dict() and text(piped) == text(whole)
    assert piped.verdict == "fail" and piped.first_divergence.layer == 2


def test_the_command_line_reports_are_the_same_file(tiny_path, monkeypatch, capsys, tmp_path):
    # without router replay a near-tie flip excuses its token in later layers: what the judge leaves out
    # depends on the routes, read layer by layer as they are made
    extra = ("--inject", "route:layer=1,token=4", "--tol", "float32:tie_tol=100", "--no-router-replay", "--replay")
    piped = _cli(tiny_path, monkeypatch, capsys, tmp_path, "1", *extra)
    whole = _cli(tiny_path, monkeypatch, capsys, tmp_path, "0", *extra)
    assert piped == whole
    code, out, _, rep = piped
    assert code == 1 and rep["verdict"] == "inconclusive", out
    assert any(r["stage"] == "topk_ids" and r["layer"] == 1 and r["flipped_tokens"] == [4] for r in rep["results"])


class _Bar:
    """A progress bar that calls ``fn(desc, done)`` after each layer (on the forwards' thread)."""

    def __init__(self, desc, fn):
        self.desc, self.fn = desc, fn

    def start(self, total):
        return self

    def __call__(self, done, total):
        self.fn(self.desc, done)

    def close(self):
        pass


def test_the_judge_of_a_layer_overlaps_the_forward_of_the_next(tiny_path, monkeypatch):
    # the forward waits after layer 0 until the judge has judged layer 0 of the free-running case, and the
    # replay after its layer 0 until the judge has judged the free case's last layer: forwards made whole
    # before judging would wait out the timeouts
    n_layer = open_model(tiny_path).config.n_layer
    judged = {0: threading.Event(), n_layer - 1: threading.Event()}
    judge_layer = judge_compare._judge_layer

    def spy(w, layer, inherited):
        out = judge_layer(w, layer, inherited)
        if not w.per_layer and w.name == "case0" and layer in judged:
            judged[layer].set()
        return out

    waited: list[tuple[str, bool, str]] = []

    def progress(desc, done):
        if done == 1 and desc.endswith("case0"):
            at = 0 if desc.startswith("check") else n_layer - 1
            waited.append((desc, judged[at].wait(timeout=30), threading.current_thread().name))

    monkeypatch.setattr(judge_compare, "_judge_layer", spy)
    monkeypatch.setattr(run_check, "LayerProgress", lambda desc: _Bar(desc, progress))
    report = _check(tiny_path, monkeypatch, "1", dtype="float32", replay=True)
    assert waited == [("check case0", True, "moesnap-check case0"), ("replay case0", True, "moesnap-check case0")]
    assert report.verdict == "pass" and len(report.cases) == len(report.replay) == 3
    assert _no_thread_left()


def test_a_fault_that_cannot_fire_is_refused_alike(tiny_path, monkeypatch, capsys, tmp_path):
    extra = ("--inject", "route:layer=1,token=4", "--tol", "float32:tie_tol=100")
    piped = _cli(tiny_path, monkeypatch, capsys, tmp_path, "1", *extra)
    whole = _cli(tiny_path, monkeypatch, capsys, tmp_path, "0", *extra)
    assert piped == whole
    code, out, err, _ = piped
    assert code == 2 and "cannot fire" in err and len(err.strip().splitlines()) == 1, out + err
    assert _no_thread_left()


def _broken_forward(monkeypatch, layer: int, replay: bool):
    """The candidate's forward raising a one-line error at ``layer`` (of the stage-local replay with ``replay``)."""
    fwd = CandidateModel._layer

    def broken(self, i, x, c):
        if i == layer and (c.force is not None) == replay:
            raise UsageError(f"layer {i}: something the forward could not do")
        return fwd(self, i, x, c)

    monkeypatch.setattr(CandidateModel, "_layer", broken)


@pytest.mark.parametrize("replay", [False, True])
def test_an_error_of_the_forward_reaches_the_command_line_as_itself(tiny_path, monkeypatch, capsys, tmp_path, replay):
    _broken_forward(monkeypatch, 2, replay)
    extra = ("--replay",) if replay else ()
    piped = _cli(tiny_path, monkeypatch, capsys, tmp_path, "1", *extra)
    whole = _cli(tiny_path, monkeypatch, capsys, tmp_path, "0", *extra)
    assert piped == whole
    code, out, err, rep = piped
    assert code == 2 and rep is None, out + err
    assert err == "moesnap: error: layer 2: something the forward could not do\n"
    assert _no_thread_left()


def test_an_error_of_the_forward_comes_before_one_of_the_judge_after_it(tiny_path, monkeypatch):
    # made whole first, the replay's error (its layer 2) is met before the judge's (the free case's layer 1):
    # the pipeline, which judged layer 1 first, lets the forwards end and raises theirs
    _broken_forward(monkeypatch, 2, True)
    judge_layer = judge_compare._judge_layer

    def judge_fails(w, layer, inherited):
        if layer == 1:
            raise GoldenError("case0: the judge could not judge layer 1")
        return judge_layer(w, layer, inherited)

    monkeypatch.setattr(judge_compare, "_judge_layer", judge_fails)
    for pipeline in ("1", "0"):
        with pytest.raises(UsageError, match="^layer 2: something the forward could not do$"):
            _check(tiny_path, monkeypatch, pipeline, dtype="float32", replay=True)
        assert _no_thread_left()
    monkeypatch.undo()
    _broken_forward(monkeypatch, 99, True)     # no error of the forward: the judge's own
    monkeypatch.setattr(judge_compare, "_judge_layer", judge_fails)
    with pytest.raises(GoldenError, match="^case0: the judge could not judge layer 1$"):
        _check(tiny_path, monkeypatch, "1", dtype="float32", replay=True)
    assert _no_thread_left()


def test_an_interrupt_stops_the_forward_after_the_layer_in_progress(tiny_path, monkeypatch):
    stopped = threading.Event()
    stop = run_check._Making.stop

    def stopping(self):
        self._stop.set()
        stopped.set()
        stop(self)

    def interrupt(w, layer, inherited):
        raise KeyboardInterrupt

    replayed: list[int] = []

    def progress(desc, done):
        if desc.startswith("replay"):
            replayed.append(done)
        elif done == 1:
            assert stopped.wait(timeout=30)     # held until the check stops it

    monkeypatch.setattr(run_check._Making, "stop", stopping)
    monkeypatch.setattr(judge_compare, "_judge_layer", interrupt)
    monkeypatch.setattr(run_check, "LayerProgress", lambda desc: _Bar(desc, progress))
    with pytest.raises(KeyboardInterrupt):
        _check(tiny_path, monkeypatch, "1", dtype="float32", replay=True)
    assert _no_thread_left() and replayed == []


@pytest.mark.parametrize("env, on_cpu, on_cuda", [(None, False, False), ("auto", False, True), ("1", True, True),
                                                    ("0", False, False)])
def test_the_pipeline_is_off_by_default_and_auto_runs_it_where_the_forward_leaves_the_cores_to_the_judge(monkeypatch, env, on_cpu,
                                                                                      on_cuda):
    if env is None:
        monkeypatch.delenv("MOESNAP_PIPELINE", raising=False)
    else:
        monkeypatch.setenv("MOESNAP_PIPELINE", env)
    assert (run_check.pipelined("cpu"), run_check.pipelined("cuda:0")) == (on_cpu, on_cuda)


def test_a_bad_pipeline_switch_is_refused_in_one_line(tiny_path, monkeypatch, capsys, tmp_path):
    code, out, err, _ = _cli(tiny_path, monkeypatch, capsys, tmp_path, "yes")
    assert code == 2 and err.startswith("moesnap: error: MOESNAP_PIPELINE='yes': expected 1") and err.count("\n") == 1


# ---------------------------------------------------------------- the allotment against every family's forward


def _same_case(a, b):
    assert sorted(a.model) == sorted(b.model) and sorted(a.layers) == sorted(b.layers)
    assert np.array_equal(a.tokens, b.tokens)
    for key in a.arrays():
        x, y = a.arrays()[key], b.arrays()[key]
        assert x.shape == y.shape and x.dtype == y.dtype, (key, x.dtype, x.shape, y.dtype, y.shape)
        assert np.array_equal(x, y, equal_nan=True), key
    assert a.attrs == b.attrs


@pytest.mark.parametrize("name", ["tiny", "gpt-oss-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny", "qwen2-moe-tiny",
                                  "mixtral-tiny", "olmoe-tiny"])
def test_the_allotted_arrays_are_the_forwards_of_every_family(name, tmp_path):
    # every stage of every layer (a family's own, DeepSeek's dense leading layers) allotted as the forward
    # records it: the free-running case and the stage-local replay, array for array, the filled rows too
    path = make_model(tmp_path / f"{name}.gguf", preset(name))
    cand = CandidateModel(open_model(path))
    faults = cand.faults(())
    rec = ArrayRecorder()
    out = cand.forward(TOKENS, rec)
    free = from_recorder(rec, {"dtype": "float32", "router_followed": []})
    m = run_check._Making(cand, "c", free, None, faults, "float32", replay=True)
    m.start()
    m.join()
    assert m.error is None and m.free.finished and m.replay is not None and m.replay.finished
    assert out.followed == ()
    _same_case(m.free.made, free)
    _same_case(m.replay.made, replay_case(cand, free, faults))


def test_a_batched_recorder_allots_the_same_values(tiny_path):
    # on a GPU each layer goes to the host in one copy (batched): the same values, bit for bit
    cand = CandidateModel(open_model(tiny_path))
    cfg = cand.cfg
    T = len(TOKENS)
    whole = {"embed": ((T, cfg.hidden), np.float32), "final_norm": ((T, cfg.hidden), np.float32),
             "logits": ((T, cand.model.n_rows("output")), np.float32)}
    recs = [LayerRecorder(np.asarray(TOKENS), layers=layer_allotment(cfg, T), model=whole, batched=b) for b in (False, True)]
    for r in recs:
        cand.forward(TOKENS, r, on_layer=lambda i, followed, r=r: r.layer_done(i))
        r.finish()
    _same_case(recs[0].made, recs[1].made)


# ---------------------------------------------------------------- the recorder


def _small(**kw):
    return LayerRecorder(np.array([3, 4]), layers={"moe_out": ((2, 3), np.float32, (0, 1)),
                                                  "topk_ids": ((2, 1), np.int32, (1,))},
                         model={"logits": ((2, 5), np.float32)}, **kw)


def test_the_recorder_says_each_layer_once_made():
    import torch

    r = _small()
    assert r.made.layers["topk_ids"][0].tolist() == [[-1], [-1]]      # layer 0 has no router: a filled row
    r.save("tokens", None, torch.tensor([3, 4]))
    r.save("moe_out", 0, torch.ones(2, 3))
    r.layer_done(0)
    r.ready(0)                                                          # made: returns at once
    waiter = threading.Thread(target=r.ready, args=(1,))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()                                            # layer 1 is not made yet
    r.save("moe_out", 1, torch.full((2, 3), 2.0))
    r.save("topk_ids", 1, torch.tensor([[1], [0]]))
    r.layer_done(1)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    r.save("logits", None, torch.zeros(2, 5))
    r.finish()
    r.ready(None)
    assert r.made.layers["moe_out"][:, 0, 0].tolist() == [1.0, 2.0] and r.made.layers["topk_ids"][1].tolist() == [[1], [0]]


def test_the_recorder_refuses_what_it_did_not_allot_and_hands_on_a_failure():
    import torch

    r = _small()
    with pytest.raises(ValueError, match="^q of layer 0: saved by the forward, not allotted$"):
        r.save("q", 0, torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match=r"^moe_out of layer 0: saved as float32 \[2, 4\], allotted float32 \[2, 3\]$"):
        r.save("moe_out", 0, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="^tokens .*: the forward ran other tokens"):
        r.save("tokens", None, [3, 5])
    with pytest.raises(ValueError, match="^topk_ids of layer 0: saved by the forward, not allotted$"):
        r.save("topk_ids", 0, torch.zeros(2, 1, dtype=torch.int32))   # layer 0 has none
    r.save("moe_out", 0, torch.zeros(2, 3))
    r.layer_done(0)
    r.save("moe_out", 1, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="^layer 1: topk_ids allotted, not saved by the forward$"):
        r.layer_done(1)
    with pytest.raises(ValueError, match="^logits, layer 1 allotted, not made by the forward$"):
        r.finish()
    r.fail(UsageError("the forward stopped"))
    r.ready(0)                                                          # made before it failed
    for layer in (1, None):
        with pytest.raises(UsageError, match="^the forward stopped$"):
            r.ready(layer)

