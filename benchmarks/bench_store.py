"""Write and read one golden of a full-width 2-layer qwen3-30b-a3b case, against raw numpy files.

The arrays have the real shapes (T=128 tokens, H=2048, E=128 experts, top-8,
32 q heads, 4 kv heads, head_dim 128, vocab 151936; ~127 MiB of float32) and
random values; the model is not run.  The baseline writes the same arrays with
``np.save`` and reads them with ``np.load`` in the same run, into the same
temporary directory's file system.  Ratios are baseline time / store time
(higher is better; the goal is >= 0.9).  The store's figures include what it
owes its guarantees: a checksum (CRC-32C) per array on write and a verification on read,
the publish marker and the atomic rename.

    python benchmarks/bench_store.py [--repeat N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moesnap.store.case import Case, checksum
from moesnap.stages import LAYER_STAGES
from moesnap.store import LocalGoldenStore

T, H, E, K, HQ, HKV, D, V, L = 128, 2048, 128, 8, 32, 4, 128, 151936, 2


def synth_case(seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    shapes = {
        "attn_norm": (T, H), "q": (T, HQ, D), "k": (T, HKV, D), "v": (T, HKV, D),
        "q_norm": (T, HQ, D), "k_norm": (T, HKV, D), "q_rope": (T, HQ, D), "k_rope": (T, HKV, D),
        "attn": (T, HQ * D), "attn_out": (T, H), "attn_resid": (T, H), "ffn_norm": (T, H),
        "router_logits": (T, E), "topk_weights": (T, K), "expert_out": (T, K, H),
        "moe_out": (T, H), "layer_out": (T, H),
    }
    assert set(shapes) | {"topk_ids"} == set(LAYER_STAGES)
    layers = {s: rng.standard_normal((L, *shape), dtype=np.float32) for s, shape in shapes.items()}
    layers["topk_ids"] = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(T)]) for _ in range(L)]).astype(np.int32)
    model = {"embed": rng.standard_normal((T, H), dtype=np.float32),
             "final_norm": rng.standard_normal((T, H), dtype=np.float32),
             "logits": rng.standard_normal((T, V), dtype=np.float32)}
    return Case(tokens=rng.integers(0, V, T, dtype=np.int32), model=model, layers=layers,
                attrs={"prompt": None, "token_ids": []})


def numpy_write(case: Case, d: Path) -> None:
    d.mkdir()
    for path, a in case.arrays().items():
        np.save(d / (path.replace("/", "__") + ".npy"), a)


def numpy_read(case: Case, d: Path) -> int:
    return sum(np.load(d / (path.replace("/", "__") + ".npy")).nbytes for path in case.arrays())


def zarr_write(case: Case, d: Path) -> None:
    """The store's I/O layer alone: the same arrays and chunks through zarr, nothing hashed."""
    import zarr

    g = zarr.open_group(str(d), mode="w-", zarr_format=3)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for path, a in case.arrays().items():
            chunks = (1, *a.shape[1:]) if path.startswith("layers/") else a.shape
            g.create_array(path, data=a, chunks=chunks, compressors=None)


def zarr_read(case: Case, d: Path) -> int:
    import zarr

    g = zarr.open_group(str(d), mode="r")
    return sum(g[path][...].nbytes for path in case.arrays())


def checksums(case: Case) -> None:
    """What write_case spends on checksums: moesnap.store.case.checksum (CRC-32C, no copy) per array."""
    for a in case.arrays().values():
        checksum(a)


def store_write(case: Case, root: Path) -> str:
    return LocalGoldenStore(root).publish("bench", {"case0": case}, {"dtype": "float32"}).version


def store_read(root: Path, version: str, verify: bool = True) -> int:
    v = LocalGoldenStore(root).open_version("bench", version)
    return sum(a.nbytes for a in v.read_case("case0", verify=verify).arrays().values())


def _settle() -> None:
    """Flush dirty pages before a timed write, so that neither side pays for the other's writeback
    (the kernel throttles a writer once enough dirty pages pile up)."""
    os.sync()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    a = ap.parse_args(argv)
    case = synth_case()
    nbytes = sum(x.nbytes for x in case.arrays().values())
    base = Path(tempfile.mkdtemp(prefix="bench_store-", dir=a.dir))
    times: dict[str, list[float]] = {k: [] for k in ("np_write", "np_read", "store_write", "store_read",
                                                     "store_read_noverify", "zarr_write", "zarr_read",
                                                     "checksums")}
    try:
        for i in range(a.repeat):   # interleaved, so drift hits both sides alike
            d = base / f"np{i}"
            root = base / f"store{i}"

            def np_side() -> None:
                _settle()
                t0 = time.perf_counter(); numpy_write(case, d); times["np_write"].append(time.perf_counter() - t0)
                t0 = time.perf_counter(); numpy_read(case, d); times["np_read"].append(time.perf_counter() - t0)

            def store_side() -> str:
                _settle()
                t0 = time.perf_counter(); version = store_write(case, root); times["store_write"].append(time.perf_counter() - t0)
                t0 = time.perf_counter(); got = store_read(root, version); times["store_read"].append(time.perf_counter() - t0)
                assert got == nbytes
                return version

            if i % 2:      # alternate which side goes first: the page cache's state favours neither
                version = store_side(); np_side()
            else:
                np_side(); version = store_side()
            t0 = time.perf_counter(); store_read(root, version, verify=False)
            times["store_read_noverify"].append(time.perf_counter() - t0)
            z = base / f"zarr{i}"
            _settle()
            t0 = time.perf_counter(); zarr_write(case, z); times["zarr_write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); zarr_read(case, z); times["zarr_read"].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); checksums(case); times["checksums"].append(time.perf_counter() - t0)
            for p in (d, root, z):
                shutil.rmtree(p)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mib = nbytes / 2**20
    print(f"bench_store: one golden case of a full-width 2-layer qwen3-30b-a3b, T={T}: "
          f"{len(case.arrays())} arrays, {mib:.1f} MiB; median of {a.repeat}")
    def line(label: str, t: float, base_t: float) -> str:
        return f"  {label:<36} {t * 1e3:7.1f} ms {mib / t:6.0f} MiB/s   numpy/this {base_t / t:5.2f}x"

    nw, nr = med["np_write"], med["np_read"]
    print(line("write: numpy np.save (baseline)", nw, nw))
    print(line("write: golden store", med["store_write"], nw) + "   (goal >= 0.9x)")
    print(line("       its checksums alone (crc32c)", med["checksums"], nw))
    print(line("       plain zarr-python, no hashing", med["zarr_write"], nw))
    print(line("read:  numpy np.load (baseline)", nr, nr))
    print(line("read:  golden store, verified", med["store_read"], nr) + "   (goal >= 0.9x)")
    print(line("       golden store, --no-verify", med["store_read_noverify"], nr))
    print(line("       plain zarr-python, no hashing", med["zarr_read"], nr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
