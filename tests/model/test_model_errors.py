"""Bad model files and bad tokens: one line naming the file and the problem, exit 2."""

from __future__ import annotations

import shutil

import pytest

from moesnap.cli.main import main
from ggufgen import absurd_header, write_gguf


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def trace(capsys, tmp_path, model, *extra):
    return run(capsys, "-q", "trace", str(model), *(extra or ("--tokens", "1,2,3")), "--out", str(tmp_path / "o.zarr"))


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"not a gguf at all, just text" * 10, "not a GGUF file"),
    (b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40, "GGUF"),
    (b"GGUF\x03\x00\x00\x00", "truncated"),
])
def test_unreadable_files(capsys, tmp_path, content, needle):
    p = tmp_path / "m.gguf"
    if content is not None:
        p.write_bytes(content)
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), needle)
    assert not (tmp_path / "o.zarr").exists()


def test_truncated_model(capsys, tmp_path, tiny_path):
    p = tmp_path / "cut.gguf"
    data = tiny_path.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p))


@pytest.mark.parametrize("kw, needle", [
    (dict(n_tensors=2**60), "more than the file holds"),
    (dict(n_kv=2**60), "more than the file holds"),
    (dict(n_kv=1, array_len=2**60), "more than the file holds"),
    (dict(n_tensors=1, dim=2**40), "more than the file holds"),
])
def test_absurd_headers(capsys, tmp_path, kw, needle):
    p = absurd_header(tmp_path / "absurd.gguf", **kw)
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), needle)


def test_other_architecture(capsys, tmp_path):
    p = write_gguf(tmp_path / "phimoe.gguf", arch="phimoe")
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), "'phimoe'", "qwen3moe")


@pytest.mark.parametrize("key", [
    "qwen3moe.rope.freq_base", "qwen3moe.expert_used_count", "qwen3moe.attention.key_length",
    "qwen3moe.attention.layer_norm_rms_epsilon", "qwen3moe.block_count",
])
def test_missing_metadata_key(capsys, tmp_path, key):
    p = write_gguf(tmp_path / "m.gguf", drop_keys=(key,))
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), key)


@pytest.mark.parametrize("key, value, needle", [
    ("qwen3moe.expert_used_count", (9, "u32"), "exceeds"),
    ("qwen3moe.attention.head_count_kv", (3, "u32"), "not a multiple"),
    ("qwen3moe.rope.freq_base", (-1.0, "f32"), "positive"),
    ("qwen3moe.block_count", ("four", "str"), "positive integer"),
])
def test_invalid_metadata_value(capsys, tmp_path, key, value, needle):
    p = write_gguf(tmp_path / "m.gguf", override_keys={key: value})
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), key, needle)


def test_tensor_of_wrong_shape(capsys, tmp_path):
    p = write_gguf(tmp_path / "m.gguf", bad_shape="blk.1.ffn_down_exps")
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p), "blk.1.ffn_down_exps", "shape")


@pytest.mark.parametrize("tokens, needle", [
    ("1,2,-5", "-5"), ("1,99999", "99999"), ("", "empty"), ("1,x", "integers"),
])
def test_bad_tokens(capsys, tmp_path, tiny_path, tokens, needle):
    code, _, err = trace(capsys, tmp_path, tiny_path, "--tokens", tokens)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.zarr").exists()


def test_tokens_and_prompt_are_exclusive(capsys, tmp_path, tiny_path):
    code, _, err = trace(capsys, tmp_path, tiny_path, "--tokens", "1", "--prompt", "x")
    assert_one_line_error(code, err, "exactly one")


@pytest.mark.parametrize("opt, value", [("--dtype", "float8"), ("--device", "tpu")])
def test_unknown_dtype_or_device(capsys, tmp_path, tiny_path, opt, value):
    code, _, err = trace(capsys, tmp_path, tiny_path, "--tokens", "1", opt, value)
    assert_one_line_error(code, err, value)


def test_existing_output_is_not_overwritten(capsys, tmp_path, tiny_path):
    out = tmp_path / "o.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = trace(capsys, tmp_path, tiny_path)
    assert_one_line_error(code, err, "exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_model_path_is_a_directory(capsys, tmp_path):
    code, _, err = trace(capsys, tmp_path, tmp_path)
    assert_one_line_error(code, err, "directory")


def test_gguf_with_garbage_after_valid_header_prefix(capsys, tmp_path, tiny_path):
    data = bytearray(tiny_path.read_bytes())
    data[24:4000] = bytes(range(256)) * 15 + bytes(range(256))[: 4000 - 24 - 256 * 15]
    p = tmp_path / "junk.gguf"
    p.write_bytes(bytes(data))
    code, _, err = trace(capsys, tmp_path, p)
    assert_one_line_error(code, err, str(p))
    shutil.rmtree(tmp_path / "o.zarr", ignore_errors=True)
