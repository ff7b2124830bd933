"""Flat dumps written from a golden case, as the engines write them: aprender traces and SGLang dumper files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from moesnap.case import Case
from moesnap.cli.main import main

REPO_GOLDENS = Path(__file__).resolve().parents[2] / "goldens"
CASE0 = REPO_GOLDENS / "tiny" / "v0001" / "case0"        # read only: the dumps are written elsewhere

#: aprender's names for the stages it traces (moesnap.stages.ALIASES maps them)
APRT_NAMES = {"topk_weights": "moe_router", "moe_out": "moe_ffn_out", "layer_out": "post_ffn_residual"}


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """``moesnap -q ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", *argv])
    return code, out.getvalue(), err.getvalue()


def import_sglang_run(runs, run: str, tmp: Path) -> tuple[Case, Path]:
    """``moesnap import --format sglang`` of run ``run``'s dump (``runs[run]``: dump directory, golden store,
    golden reference) against its golden: the imported case and where it was written."""
    from moesnap.store.case import load_case

    dump, store, golden = runs[run]
    out = tmp / "cand.zarr"
    code, text, err = invoke(["import", "--format", "sglang", str(dump), "--like", golden, "--store", str(store),
                              "--out", str(out)])
    assert code == 0, err
    return load_case(out), out


def compare_run(runs, run: str, cand: Path, tmp: Path) -> tuple[int, str, dict]:
    """``moesnap compare`` of an imported candidate against run ``run``'s golden (missing stages allowed):
    (exit code, text, the JSON report)."""
    import json

    _, store, golden = runs[run]
    code, text, err = invoke(["compare", golden, str(cand), "--store", str(store), "--allow-missing",
                              "--json", str(tmp / "r.json")])
    assert code in (0, 1), err
    return code, text, json.loads((tmp / "r.json").read_text())


def golden_of_run(runs, run: str) -> Case:
    """Run ``run``'s golden case0, read from its store."""
    from moesnap.store.case import load_case

    _, store, golden = runs[run]
    return load_case(store / golden.split("@")[0] / "v0001" / "case0")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (names included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(argv: list[str], *needles: str) -> str:
    """``moesnap ARGV`` exits 2 with one short line on stderr holding every needle, and prints nothing."""
    code, out, err = invoke(argv)
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("moesnap: error: "), err
    assert "Traceback" not in err and len(err) < 700, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def aprt_bytes(layer: int, values: np.ndarray, *, count: int | None = None, magic: bytes = b"APRT") -> bytes:
    a = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return magic + struct.pack("<II", layer, a.size if count is None else count) + a.tobytes()


def write_aprt(d: Path, case: Case, *, last: bool = False,
               edit: Callable[[str, int | None, np.ndarray], np.ndarray] | None = None) -> Path:
    """aprender's trace of ``case``: moe_router, moe_ffn_out, post_ffn_residual of every layer and lm_head;
    every token's rows, or the last token's (``last``); ``edit(stage, layer, rows)`` plants a fault."""
    sl = slice(-1, None) if last else slice(None)
    d.mkdir(parents=True)
    for layer in range(case.n_layer):
        (d / f"layer-{layer}").mkdir()
        for stage, name in APRT_NAMES.items():
            rows = case.layers[stage][layer][sl]
            rows = edit(stage, layer, rows) if edit else rows
            (d / f"layer-{layer}" / f"{name}.bin").write_bytes(aprt_bytes(layer, rows))
    logits = case.model["logits"][sl]
    (d / "lm_head.bin").write_bytes(aprt_bytes(0xFFFFFFFF, edit("logits", None, logits) if edit else logits))
    return d


def sglang_name(**tags) -> str:
    return "___".join(f"{k}={v}" for k, v in tags.items()) + ".pt"


def write_sglang(d: Path, case: Case, *, style: str = "new", step: int = 0, rank: int = 0, dtype=None,
                 edit: Callable[[str, int | None, np.ndarray], np.ndarray] | None = None) -> Path:
    """SGLang's dumper files of ``case``'s prefill pass.

    ``style`` ``new``: the non-intrusive hooks' module names (``step=``, ``{"value", "meta"}`` files, q/k/v
    fused in qkv_proj, the residual as input_layernorm's second output, next_token_logits of the last
    token; a dense layer's ``mlp.output`` its ``dense_ffn_out``); ``old``: ``dumper.dump("moe_out", x, layer_id=N)`` calls of 2025 releases (``forward_pass_id=``,
    bare tensors).  ``edit(stage, layer, values)`` plants a fault; ``dtype``: a torch dtype to store in."""
    import torch

    d.mkdir(parents=True, exist_ok=True)
    T = int(case.tokens.shape[0])
    index = [0]

    def dump(name: str, values: np.ndarray, stage: str | None = None, layer: int | None = None, **tags) -> None:
        values = edit(stage, layer, values) if edit and stage else values
        index[0] += 1
        t = torch.from_numpy(np.ascontiguousarray(values))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if style == "new":
            full = dict(step=step, rank=rank, dump_index=index[0], name=name, recompute_status="disabled", **tags)
            torch.save({"value": t, "meta": {**full, "world_rank": rank}}, d / sglang_name(**full))
        else:
            full = dict(forward_pass_id=step + 1, rank=rank, name=name, dump_index=index[0], **tags)
            torch.save(t, d / sglang_name(**full))

    dump("input_ids", case.tokens.astype(np.int64))
    dump("positions", np.arange(T))
    dump("seq_lens", np.array([T]))
    L = case.n_layer
    if style == "old":
        dump("embed", case.model["embed"], "embed")
        for layer in range(L):
            for stage in ("attn_norm", "attn_out", "router_logits", "topk_ids", "topk_weights", "moe_out", "layer_out"):
                dump(stage, case.layers[stage][layer], stage, layer, layer_id=layer)
        dump("final_norm", case.model["final_norm"], "final_norm")
        dump("logits", case.model["logits"], "logits")
        return d
    dump("non_intrusive__model.embed_tokens.output", case.model["embed"], "embed")
    for layer in range(L):
        p = f"non_intrusive__model.layers.{layer}."
        lay = dict(layer_id=layer)
        if layer == 0:
            dump(p + "input_layernorm.output", case.layers["attn_norm"][0], "attn_norm", 0, **lay)
        else:
            dump(p + "input_layernorm.output.0", case.layers["attn_norm"][layer], "attn_norm", layer, **lay)
            dump(p + "input_layernorm.output.1", case.layers["layer_out"][layer - 1], "layer_out", layer - 1, **lay)
        qkv = np.concatenate([case.layers[s][layer].reshape(T, -1) for s in ("q", "k", "v")], axis=1)
        dump(p + "self_attn.qkv_proj.output", qkv, "qkv", layer, **lay)
        for stage, name in (("attn", "self_attn.attn.output"), ("attn_out", "self_attn.o_proj.output"),
                            ("ffn_norm", "post_attention_layernorm.output.0"),
                            ("attn_resid", "post_attention_layernorm.output.1"), ("router_logits", "mlp.gate.output"),
                            ("topk_weights", "mlp.topk.output.0"), ("topk_ids", "mlp.topk.output.1"),
                            ("moe_out", "mlp.output")):
            if name == "mlp.output" and layer < len(case.layers.get("dense_ffn_out", ())) and \
                    not np.isnan(case.layers["dense_ffn_out"][layer]).all():
                stage = "dense_ffn_out"          # a dense layer's mlp (DeepSeek's leading layers) is the dense MLP
            dump(p + name, case.layers[stage][layer], stage, layer, **lay)
    dump("non_intrusive__model.norm.output.0", case.model["final_norm"], "final_norm")
    dump("non_intrusive__model.norm.output.1", case.layers["layer_out"][L - 1], "layer_out", L - 1)
    dump("non_intrusive__logits_processor.output.next_token_logits", case.model["logits"][-1:], "logits")
    return d
