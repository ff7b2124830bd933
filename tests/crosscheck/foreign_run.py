"""HF transformers as a foreign engine under ``moesnap compare``: a model, goldens, a judge.

:class:`World` makes a synthetic Qwen3-MoE GGUF (:func:`planted_spec`: 8
layers, 16 experts, top-4, hidden 128, the tiny preset's quant types with
Q6_K ``ffn_down_exps`` in odd layers), writes goldens for a few prompts with
``moesnap goldens generate``, loads the same weights into transformers
(:func:`.hf_model.load_hf_from_gguf`), and judges any (possibly patched) copy
of that model: each prompt is captured with
:func:`moesnap.capture.transformers`, written as a case group, and
checked with ``moesnap compare --allow-missing --json`` -- with ``--model``
(local re-reference: every layer judged from the engine's own input) or
``--no-local`` (free-running only).

Used by ``test_planted_bugs.py`` and ``benchmarks/bench_sensitivity.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .hf_model import load_hf_from_gguf

BUG_LAYER = 3                    # a middle layer of 8, with Q6_K ffn_down_exps
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def planted_spec(seed: int = 11):
    """8 layers, 16 experts, top-4, hidden 128 (4 q heads, 2 kv heads, head_dim 32), expert FFN 256,
    the tiny preset's quant types; ``ffn_down_exps`` is Q4_K in even layers and Q6_K in odd ones."""
    from gguf import GGMLQuantizationType as QT
    from moesnap.model.synth import preset

    tiny = preset("tiny")
    qtypes = {**tiny.qtypes, "ffn_down_exps": QT.Q4_K}
    return tiny.with_(n_layer=8, hidden=128, n_head=4, n_head_kv=2, head_dim=32, n_expert=16, n_expert_used=4,
                      expert_ff=256, qtypes=qtypes, down_exps_alternate=QT.Q6_K, seed=seed,
                      name="moesnap-planted-bugs")


def prompts(seed: int, lengths: Sequence[int] = (32, 40), vocab: int = 272) -> list[list[int]]:
    """Random prompts starting with BOS (id 1), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def cli(*argv: str) -> tuple[int, str]:
    """Run ``moesnap ARGV`` in this process; (exit code, stdout + stderr)."""
    from moesnap.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(list(argv))
        except SystemExit as e:   # argparse: unknown option, bad value
            rc = int(e.code or 0)
    return rc, buf.getvalue()


@dataclass(frozen=True)
class Outcome:
    """What ``moesnap compare`` said about one candidate."""

    rc: int
    report: dict
    output: str

    @property
    def verdict(self) -> str:
        return self.report.get("verdict", "?")

    @property
    def first(self) -> dict | None:
        """``first_divergence``: the first failing (layer, stage, token, verdict)."""
        return self.report.get("first_divergence")

    @property
    def introduced(self) -> dict | None:
        """With local re-reference: the first (layer, stage) whose own computation diverges."""
        return (self.report.get("local") or {}).get("first_introduced")

    def named(self) -> tuple[int | None, str] | None:
        f = self.first
        return None if f is None else (f.get("layer"), f.get("stage"))

    def summary(self) -> str:
        def loc(d):
            return "-" if d is None else f"L{d.get('layer')}/{d.get('stage')}/t{d.get('token')}:{d.get('verdict')}"

        return f"rc={self.rc} {self.verdict} first={loc(self.first)} introduced={loc(self.introduced)}"


class World:
    """One synthetic model, its goldens, and transformers loaded with its weights."""

    def __init__(self, root: Path, *, seed: int = 11, prompt_seed: int = 0, lengths: Sequence[int] = (32, 40),
                 suite: str = "planted") -> None:
        from moesnap.store import open_store
        from moesnap.model.synth import make_model

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spec = planted_spec(seed)
        self.gguf = make_model(self.root / f"planted-{seed}.gguf", self.spec, force=True)
        self.store = self.root / "goldens"
        self.suite = suite
        self.prompts = prompts(prompt_seed, lengths, self.spec.vocab_size)
        args = ["goldens", "generate", str(self.gguf), "--suite", suite, "--store", str(self.store)]
        for p in self.prompts:
            args += ["--tokens", ",".join(map(str, p))]
        rc, out = cli(*args)
        if rc != 0:
            raise RuntimeError(f"moesnap goldens generate failed ({rc}): {out[-2000:]}")
        self.ref = out.strip().splitlines()[-1].strip()           # NAME@v0001
        version = open_store(self.store).open_version(suite, None)
        self.cases = {name: version.read_case(name) for name in version.case_names()}
        self.base = load_hf_from_gguf(self.gguf)                  # float32, eager
        self._n = 0

    def most_used_expert(self, layer: int) -> int:
        """The expert the golden routes the most (token, slot) pairs to at ``layer``, over every prompt."""
        ids = np.concatenate([c.layers["topk_ids"][layer].reshape(-1) for c in self.cases.values()])
        return int(np.bincount(ids, minlength=self.spec.n_expert).argmax())

    def model(self, dtype: str = "float32"):
        """A fresh copy of the transformers model in ``dtype``, free to patch."""
        return copy.deepcopy(self.base).to(TORCH_DTYPES[dtype])

    def capture(self, model) -> Path:
        """Every prompt through ``model`` (:func:`moesnap.capture.transformers`), written as a
        directory of case groups named like the golden's cases."""
        from moesnap.capture.hf import transformers_case
        from moesnap.run.trace import write_output

        self._n += 1
        cand = self.root / f"cand-{self._n:04d}"
        if cand.exists():
            shutil.rmtree(cand)
        cand.mkdir()
        for name, case in self.cases.items():
            write_output(transformers_case(model, case.tokens.tolist()), cand / name)
        return cand

    def compare(self, cand: Path, *, local: bool = True, extra: Sequence[str] = ()) -> Outcome:
        """``moesnap compare`` of a captured directory: with ``--model`` (local) or ``--no-local``."""
        self._n += 1
        out_json = self.root / f"report-{self._n:04d}.json"
        mode = ["--model", str(self.gguf)] if local else ["--no-local"]
        rc, text = cli("compare", self.ref, str(cand), "--store", str(self.store), "--allow-missing", *mode,
                       "--json", str(out_json), "--force", *extra)
        report = json.loads(out_json.read_text()) if out_json.exists() else {}
        out_json.unlink(missing_ok=True)
        return Outcome(rc, report, text)

    def judge(self, model, *, modes: Sequence[bool] = (True,), extra: Sequence[str] = ()) -> list[Outcome]:
        """Capture ``model`` once and compare it in each mode (``True``: local, ``False``: free-running)."""
        cand = self.capture(model)
        try:
            return [self.compare(cand, local=m, extra=extra) for m in modes]
        finally:
            shutil.rmtree(cand, ignore_errors=True)
