"""`moesnap import --format sglang|vllm|aprt DIR --like GOLDEN --out CAND.zarr`: another engine's flat dump as a
candidate case group."""

from __future__ import annotations

import argparse


def cmd_import(a: argparse.Namespace) -> int:
    from ..run.importing import check_dump, describe, import_dump
    from ..util import loading_torch

    check_dump(a.format, a.dir, a.forward_pass)     # a missing DIR is said first, before torch loads
    loading_torch()
    case, name = import_dump(a.format, a.dir, like=a.like, out=a.out, store=a.store, case=a.case,
                             forward_pass=a.forward_pass, force=a.force)
    print(f"{a.format} dump {a.dir} as golden case {name} ({len(case.tokens)} tokens):")
    for line in describe(case):
        print(f"  {line}")
    print(f"wrote {a.out}")
    store = f" --store {a.store}" if a.store else ""
    print(f"judge it: moesnap compare {a.like} {a.out}{store} --allow-missing")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn another engine's flat dump directory into a candidate case group")
    p.add_argument("dir", help="the dump directory")
    p.add_argument("--format", required=True, choices=("sglang", "vllm", "aprt"),
                   help="sglang: the .pt files of SGLang's dumper; vllm: those of vLLM's port of it (the same reader); aprt: an aprender trace (layer-<N>/<stage>.bin)")
    p.add_argument("--like", required=True, metavar="GOLDEN",
                   help="the golden the dump is to be judged against (NAME[@vNNNN] in the store, or a case group "
                        "path): it gives the token ids and shapes a flat dump lacks")
    p.add_argument("--out", required=True, help="the candidate case group to write")
    p.add_argument("--store", help="golden store root (default goldens/)")
    p.add_argument("--case", help="the golden's case the dump ran (where GOLDEN holds several)")
    p.add_argument("--pass", dest="forward_pass", type=int, metavar="N",
                   help="sglang, vllm: the forward pass to import (forward_pass_id / step in the file names)")
    p.add_argument("--force", action="store_true", help="replace an existing case group at --out")
    p.set_defaults(func=cmd_import)
