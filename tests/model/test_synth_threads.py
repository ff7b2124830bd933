"""make_model on a thread pool: the same bytes as one thread, in order, with a bounded look-ahead."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from moesnap.errors import UsageError
from moesnap.model import synth
from moesnap.model.synth import make_model, preset, tiny_path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wide_qwen3() -> synth.SynthSpec:
    """30B-A3B's quant mix (Q4_K, Q6_K, alternating down projections) on rows of 256: many K-quant blocks."""
    return preset("qwen3-30b-a3b", layers=3).with_(hidden=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=16,
                                                   n_expert_used=4, expert_ff=256, vocab_size=1024, seed=7)


SPECS = {"tiny": lambda: preset("tiny"), "gpt-oss-tiny": lambda: preset("gpt-oss-tiny"),
         "deepseek-v3-tiny": lambda: preset("deepseek-v3-tiny"), "wide-qwen3": wide_qwen3}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_threads_write_the_serial_file_byte_for_byte(tmp_path, name):
    spec = SPECS[name]()
    serial = sha256(make_model(tmp_path / "serial.gguf", spec, threads=1))
    for threads in (2, 5):
        assert sha256(make_model(tmp_path / f"t{threads}.gguf", spec, threads=threads)) == serial, threads
    if name == "tiny":
        assert serial == sha256(tiny_path())


def test_tensors_finishing_out_of_order_are_written_in_order(tmp_path, monkeypatch):
    spec = preset("tiny", layers=2)
    serial = sha256(make_model(tmp_path / "serial.gguf", spec, threads=1))
    real = synth.tensor_data
    finished: list[str] = []

    def slow_first(t, s):   # the first tensors finish last
        time.sleep(0.05 if t.layer is None or (t.layer == 0 and t.kind == "attn_norm") else 0.0)
        out = real(t, s)
        finished.append(t.name)
        return out

    monkeypatch.setattr(synth, "tensor_data", slow_first)
    assert sha256(make_model(tmp_path / "threads.gguf", spec, threads=4)) == serial
    assert finished != [t.name for t in spec.tensors()]   # the pool did finish them out of order


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_look_ahead_is_at_most_a_tensor_per_thread(tmp_path, monkeypatch, threads):
    real_data, real_write = synth.tensor_data, synth.GGUFWriter.write_tensor_data
    started, ahead = [0], []
    lock = threading.Lock()

    def counting(t, s):
        with lock:
            started[0] += 1
        return real_data(t, s)

    def write(self, tensor, *args):
        with lock:
            ahead.append(started[0] - len(ahead))   # made or being made, this one included, not yet written
        return real_write(self, tensor, *args)

    monkeypatch.setattr(synth, "tensor_data", counting)
    monkeypatch.setattr(synth.GGUFWriter, "write_tensor_data", write)
    make_model(tmp_path / "m.gguf", preset("tiny"), threads=threads)
    assert len(ahead) == len(preset("tiny").tensors())
    assert max(ahead) <= threads + (threads > 1)
    if threads > 1:
        assert max(ahead) > 1   # the pool did work ahead


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failing_tensor_leaves_nothing_behind_and_no_thread(tmp_path, monkeypatch, threads):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    real = synth.tensor_data

    def boom(t, spec):
        if t.layer == 1:
            raise RuntimeError("no memory")
        return real(t, spec)

    monkeypatch.setattr(synth, "tensor_data", boom)
    with pytest.raises(RuntimeError, match="no memory"):
        make_model(out, preset("tiny"), force=True, threads=threads)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert not [t for t in threading.enumerate() if t.name.startswith("moesnap-synth")]


@pytest.mark.parametrize("threads", [0, -2, True, 1.5, "4"])
def test_bad_thread_counts_are_usage_errors_naming_the_file(tmp_path, threads):
    with pytest.raises(UsageError, match=r"m\.gguf: threads=.* must be an integer ≥ 1"):
        make_model(tmp_path / "m.gguf", preset("tiny"), threads=threads)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cores, want", [(1, 1), (2, 2), (64, None)])
def test_default_threads_are_the_cores_capped(monkeypatch, cores, want):
    monkeypatch.setattr(synth.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert synth.default_threads() == (synth.MAX_THREADS if want is None else want)
