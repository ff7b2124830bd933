"""`moesnap check MODEL --suite NAME[@vNNNN]`: the candidate forward against the goldens."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..judge.policy import CHECK_DTYPES
from ._options import add_report_options, check_report_outputs, dtype_arg, device_name, emit, inject_syntax, settings

if TYPE_CHECKING:
    from ..judge.report import Report


#: the family-part faults (``model.inject.PARTS``), named here so that the help needs no torch
_PARTS = ("sink_off", "rope_flip", "qk_norm_flip", "bias_off", "renorm_flip", "scale_off", "shared_off",
          "shared_gate_off")

def cmd_check(a: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..util import loading_torch

    # every usage error before torch loads (seconds on a cold start)
    if a.replay and a.no_replay:
        raise UsageError("--replay and --no-replay contradict each other")
    for spec in a.inject:
        inject_syntax(spec)
    check_report_outputs(a, a.store)
    asked = settings(a, dtype=a.dtype, allowed=CHECK_DTYPES)
    from ..model.load import check_model_path

    check_model_path(a.model)     # a missing or wrong MODEL is the one line on stderr, before any status line
    loading_torch()
    from ..run.check import check

    if a.gpus is not None:
        ep = _check_expert_parallel(a, asked)
        if ep is None:   # a torchrun rank other than 0: rank 0 reports
            return 0
        report = ep
    else:
        report = check(a.model, a.suite, store=a.store, device=a.device, dtype=a.dtype,
                       replay=True if a.replay else False if a.no_replay else None, inject=a.inject,
                       settings=asked, router_replay=not a.no_router_replay, decode=a.decode, paged=a.paged,
                       batch=a.batch, chunk=a.chunk, cuda_graph=a.cuda_graph)
    return emit(report, a, f"moesnap check{'' if a.gpus is None else f' --gpus {a.gpus}'} {report.golden}")


def _check_expert_parallel(a: argparse.Namespace, asked) -> Report | None:
    """``--gpus N``: the expert-parallel candidate on N ranks (NCCL on CUDA, gloo on the CPU), started here;
    None on a torchrun rank other than 0.  With ``--decode`` (``--paged``, ``--batch``, ``--chunk``) every rank
    serves the cases and rank 0 judges each forward as the single-device serving check does."""
    from ..run.expert_parallel import check_ep

    return check_ep(a.model, a.suite, store=a.store, n_ranks=a.gpus, backend="nccl" if a.device.startswith("cuda")
                    else "gloo", device=a.device, dtype=a.dtype, mode=a.ep_mode, inject=a.inject,
                    router_replay=not a.no_router_replay, settings=asked, decode=a.decode, paged=a.paged,
                    batch=a.batch, chunk=a.chunk, cuda_graph=a.cuda_graph,
                    replay=True if a.replay else False if a.no_replay else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="run the candidate forward and check every stage against the goldens")
    p.add_argument("model", help="the model the goldens were made from: a GGUF file or a checkpoint directory")
    p.add_argument("--suite", required=True, help="NAME or NAME@vNNNN (default: newest version)")
    p.add_argument("--store", help="golden store root: a directory (default goldens/) or s3://bucket/prefix")
    p.add_argument("--device", default="cpu", type=device_name, help="where the candidate runs: cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", type=dtype_arg(CHECK_DTYPES), metavar="DTYPE",
                   help="the candidate's activations: float32 (default), bfloat16, float16")
    p.add_argument("--replay", action="store_true",
                   help="also run each layer, stage by stage, on the golden's inputs: error introduced vs "
                        "inherited (always on for bfloat16 and float16)")
    p.add_argument("--no-replay", action="store_true",
                   help="bfloat16/float16: judge free-running only (not sensitive to errors of a few percent)")
    p.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="plant a fault (self-test), KIND:KEY=VALUE,...: nan:layer=L,expert=E | "
                        "qtype:layer=L,tensor=ffn_down_exps,as=q4_k | scale:layer=L,stage=STAGE,factor=F | "
                        "route:layer=L,token=T; a family's own parts: mxfp4_scale:layer=L,tensor=T[,shift=S] | "
                        "window:layer=L[,by=B] | " + " | ".join(f"{k}:layer=L" for k in _PARTS) + "; serving "
                        "(--decode, --paged, --batch, --cuda-graph): rope_pos:step=S | kv_slot:layer=L | "
                        "kv_short:layer=L | block_table:seq=S,block=B | pad_attend[:layer=L] | swap_rows[:layer=L] | "
                        "graph_stale:step=S. A fault that cannot fire in the run is refused")
    p.add_argument("--no-router-replay", action="store_true",
                   help="let the candidate keep its own experts at near ties (a flipped token then goes unjudged "
                        "in later layers, and the verdict may be inconclusive)")
    p.add_argument("--decode", type=int, metavar="N",
                   help="serve each case: its prompt, then N decode steps through a KV cache, each judged against "
                        "the golden's row at its position (the golden needs N tokens after the prompt: goldens "
                        "generate --decode N)")
    p.add_argument("--paged", action="store_true", help="a paged KV cache (blocks of 16 tokens, a block table)")
    p.add_argument("--batch", action="store_true",
                   help="every golden case one sequence of a ragged batch: one forward per prefill and per step")
    p.add_argument("--chunk", type=int, metavar="N", help="prefill the prompt in forwards of N tokens (chunked prefill)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="the decode steps on static buffers, captured in a CUDA graph and replayed (with "
                        "--device cuda; eager on the CPU), the stages recorded from inside the graph")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="expert parallel: N ranks, each holding 1/N of every layer's experts, started here (NCCL "
                        "with --device cuda, gloo on the CPU); or one rank of a torchrun launch; with --decode N "
                        "(--paged, --batch, --chunk) every rank serves the steps, rank 0 judges them")
    p.add_argument("--ep-mode", choices=("alltoall", "allreduce"), default="alltoall",
                   help="with --gpus: all-to-all dispatch and combine (default), or every rank runs its experts "
                        "for all tokens and an all-reduce sums them")
    add_report_options(p)
    p.set_defaults(func=cmd_check)
