"""Helpers of the family tests (test_qwen2moe.py, test_mixtral.py, test_olmoe.py): rewrite a GGUF with
metadata keys dropped or changed, and judge a family's goldens end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from moesnap.cli.main import main
from moesnap.stages import FAMILY_STAGES

TOKENS = [1, 5, 9, 200, 17, 3, 3, 64, 100, 7]


def rewrite(src: Path, out: Path, *, drop: tuple[str, ...] = (), override: dict[str, tuple[Any, GGUFValueType]] | None = None,
            skip_tensors: tuple[str, ...] = (), edit: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Path:
    """``src`` copied to ``out`` without the metadata keys ``drop`` (and the tensors ``skip_tensors``),
    with ``override`` {key: (value, type)} set and each tensor's data through ``edit(name, data)``."""
    r = GGUFReader(str(src))
    w = GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    override = dict(override or {})
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in drop or f.name == "general.architecture" or f.name in override:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for key, (value, vtype) in override.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name not in skip_tensors:
            data = np.asarray(t.data)
            w.add_tensor(t.name, data if edit is None else edit(t.name, data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def judge_goldens(path: Path, arch: str, tmp_path: Path, capsys) -> dict:
    """Generate goldens of ``path``, judge them against themselves (every cell of the family's stages
    judged, a pass) and check moesnap's candidate against them on the CPU (a pass, exit 0); the golden's
    recorded config."""
    store = tmp_path / "goldens"
    assert main(["goldens", "generate", str(path), "--suite", "f", "--store", str(store), "--tokens",
                 ",".join(map(str, TOKENS)), "-q"]) == 0
    attrs = json.loads((store / "f" / "v0001" / "case0" / "zarr.json").read_text())["attributes"]
    config = attrs["model"]["config"]
    assert config["arch"] == arch
    capsys.readouterr()
    case = str(store / "f" / "v0001" / "case0")
    assert main(["compare", case, case, "--no-local"]) == 0
    out = capsys.readouterr().out
    assert "verdict: pass" in out, out
    layer0 = next(line for line in out.splitlines() if line.startswith("L00"))
    assert layer0.split("|")[0].count(".") == len(FAMILY_STAGES[arch]), out
    assert main(["check", str(path), "--suite", "f", "--store", str(store), "--device", "cpu", "-q"]) == 0, \
        capsys.readouterr()
    return config
