"""The candidate's KV cache, contiguous or paged, and where the rows of one forward sit in it.

**Layout.**  Every layer keeps a pool of blocks ``k, v [n_blocks, block_size, Hkv, D]`` in the compute
dtype (zeros until written; DeepSeek's values are ``v_head_dim`` wide, narrower than its keys).  Each sequence owns a row of the block table: its logical block ``j`` (token
positions ``16j .. 16j+15``) lives in physical block ``table[seq, j]``, and the token at position ``p``
in slot ``table[seq, p // bs] * bs + p % bs`` of the flattened pool.

* **paged** (``paged=True``, blocks of 16 tokens as vLLM and SGLang lay them out): blocks come from one
  pool shared by every sequence, taken from a free list as a sequence grows (highest block ids first,
  so a sequence's blocks are neither contiguous nor at its own index);
* **contiguous** (``paged=False``): one block of ``capacity`` tokens per sequence, block ``s`` for
  sequence ``s`` -- the same code with a one-entry table.

**A batch in one forward.**  The rows of a forward are **packed** (varlen, as vLLM/SGLang's flattened
batches): the sequences' new tokens one after another, ``[T, ...]`` with no padding, through every
token-wise operation (norms, projections, router, experts).  Attention alone uses **padding with
masks**: each sequence's queries are gathered into ``[B, Tq, Hq, D]`` (``Tq``: the most rows any
sequence has in this forward) and its cached keys into ``[B, S, Hkv, D]`` through its block-table row
(``S``: the longest sequence's key count, or every slot of the cache on a CUDA graph's static buffers),
with a boolean mask ``[B, Tq, S]``: key position ``< seq_len`` (key padding) and, when some sequence has
more than one row (a prompt or a chunk of one), key position ``<=`` the query's position (causal).  A
decode batch (one row per sequence, each at its last position) needs only the key-padding mask.  The
outputs go back to the packed rows through :attr:`Batch.out_index`.

A forward first writes its new k/v rows into the cache (:attr:`Batch.write_slot`), then attends over
the cache: a chunk of a prompt attends the chunks before it, a decode step the whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from ..errors import UsageError
from .config import Qwen3MoeConfig
from .kernels import masked_sdpa, sdpa_masked

#: tokens per block of the paged cache (vLLM's and SGLang's default)
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Batch:
    """Where the ``T`` packed rows of one forward sit and how they attend (device tensors, except the
    fields marked host).  Built by :meth:`KVCache.batch`; planted faults return altered copies."""

    seqs: tuple[int, ...]       # host: the sequences of this forward, in row order
    counts: tuple[int, ...]     # host: rows per sequence (1 in a decode step)
    lens: tuple[int, ...]       # host: keys each sequence attends (cached before + its rows)
    step: int | None            # host: decode step number, None for a prompt or chunk (or a static capture)
    decode: bool                # host: every sequence has one row after a cached prefix
    block_size: int             # host
    n_keys: int                 # host: key slots gathered per sequence
    max_pos: int                # host: a bound on every position below (the RoPE table's size)
    pos: torch.Tensor           # [T] absolute position of each row
    rope_pos: torch.Tensor      # [T] the position RoPE rotates each row by
    row_seq: torch.Tensor       # [T] the batch index (0..B-1) of each row's sequence
    write_slot: torch.Tensor    # [T] flat cache slot each row's k/v is written to
    write_table: torch.Tensor   # [B, nb] the sequences' block-table rows (writes)
    table: torch.Tensor         # [B, nb] the block-table rows attention reads through
    seq_lens: torch.Tensor      # [B] keys each sequence attends
    q_index: torch.Tensor       # [B, Tq] packed row of each padded query slot (pads repeat a real row)
    q_pos: torch.Tensor         # [B, Tq] position of each padded query slot
    out_index: torch.Tensor     # [T] padded query slot (b*Tq + t) each packed row's output comes from
    key_mask: bool = True       # host: mask the keys past each sequence's length
    causal: bool = True         # host: mask keys after each query's position

    @property
    def n_rows(self) -> int:
        return sum(self.counts)

    def slots_at(self, pos: torch.Tensor) -> torch.Tensor:
        """Flat cache slots ``[T]`` of the rows' own sequences at positions ``pos [T]``."""
        bs = self.block_size
        return self.write_table[self.row_seq, torch.div(pos, bs, rounding_mode="floor")] * bs + pos % bs

    def rows_of(self, b: int) -> range:
        """The packed rows of the ``b``-th sequence of the batch."""
        start = sum(self.counts[:b])
        return range(start, start + self.counts[b])

    def with_(self, **changes: object) -> Batch:
        return replace(self, **changes)  # type: ignore[arg-type]


class KVCache:
    """Per-layer K and V of ``n_seqs`` sequences of at most ``capacity`` tokens each (module docstring).

    ``lens[s]`` tokens of sequence ``s`` are cached; :meth:`batch` reserves the slots of a forward's new
    rows and returns its :class:`Batch`.
    """

    def __init__(self, cfg: Qwen3MoeConfig, *, n_seqs: int, capacity: int, paged: bool = False,
                 block_size: int = BLOCK_SIZE, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if n_seqs < 1:
            raise UsageError(f"n_seqs={n_seqs} must be >= 1")
        if capacity < 1:
            raise UsageError(f"capacity={capacity} must be >= 1 token per sequence")
        if paged and block_size < 1:
            raise UsageError(f"block_size={block_size} must be >= 1")
        self.cfg, self.n_seqs, self.capacity, self.paged = cfg, n_seqs, capacity, paged
        self.device, self.dtype = torch.device(device), dtype
        self.block_size = block_size if paged else capacity
        self.max_blocks = -(-capacity // self.block_size)                    # blocks a full sequence takes
        n_blocks = n_seqs * self.max_blocks
        shape = (n_blocks, self.block_size, cfg.n_head_kv, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        # values are v_dim wide (DeepSeek's MLA: narrower than its keys; head_dim elsewhere)
        self.v = [torch.zeros(shape[:-1] + (cfg.v_dim,), dtype=dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.lens = [0] * n_seqs
        #: host block table ``[n_seqs][blocks held]``
        self.blocks: list[list[int]] = [[] if paged else [s] for s in range(n_seqs)]
        self._free = list(range(n_blocks)) if paged else []                 # popped from the end

    @property
    def n_blocks(self) -> int:
        return self.k[0].shape[0]

    def _grow(self, seq: int, n_tokens: int) -> None:
        if not 0 <= seq < self.n_seqs:
            raise UsageError(f"seq={seq} is out of range: the cache holds {self.n_seqs} sequences")
        if self.lens[seq] + n_tokens > self.capacity:
            raise UsageError(f"sequence {seq} would hold {self.lens[seq] + n_tokens} tokens; the cache holds "
                             f"{self.capacity} per sequence (capacity=)")
        need = -(-(self.lens[seq] + n_tokens) // self.block_size)
        while len(self.blocks[seq]) < need:
            self.blocks[seq].append(self._free.pop())

    def table_rows(self, seqs: Sequence[int], width: int) -> torch.Tensor:
        """``[B, width]`` block-table rows of ``seqs``; entries past a sequence's blocks are 0 (a pad
        entry, as vLLM pads its block tables: masked out, or read when the mask is off)."""
        rows = [(self.blocks[s] + [0] * width)[:width] for s in seqs]
        return torch.tensor(rows, dtype=torch.long)

    def batch(self, rows: Sequence[tuple[int, int]], *, step: int | None = None, n_keys: int | None = None) -> Batch:
        """Reserve the slots of a forward that appends ``n`` tokens to sequence ``seq`` for each
        ``(seq, n)`` of ``rows`` (each sequence once) and return its :class:`Batch` (on the device).
        ``n_keys``: gather that many key slots per sequence (static buffers: the whole cache) rather than
        the longest sequence's keys."""
        seqs = tuple(s for s, _ in rows)
        counts = tuple(int(n) for _, n in rows)
        if len(set(seqs)) != len(seqs):
            raise UsageError(f"a sequence appears twice in one forward: {list(seqs)}")
        if any(n < 1 for n in counts):
            raise UsageError(f"every sequence of a forward needs at least one new token: {list(counts)}")
        starts = []
        for s, n in zip(seqs, counts):
            self._grow(s, n)
            starts.append(self.lens[s])
        lens = tuple(a + n for a, n in zip(starts, counts))
        n_keys = max(lens) if n_keys is None else n_keys
        width = -(-n_keys // self.block_size)
        table = self.table_rows(seqs, width)
        pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, counts)])         # [T]
        row_seq = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])         # [T]
        bs = self.block_size
        write_slot = table[row_seq, pos // bs] * bs + pos % bs
        tq = max(counts)
        offsets = [sum(counts[:b]) for b in range(len(counts))]
        q_index = torch.tensor([[off + min(t, n - 1) for t in range(tq)] for off, n in zip(offsets, counts)])
        q_pos = pos[q_index]                                                              # [B, Tq]
        out_index = torch.cat([b * tq + torch.arange(n) for b, n in enumerate(counts)])
        for s, n in zip(seqs, counts):
            self.lens[s] += n
        dev = self.device
        return Batch(seqs=seqs, counts=counts, lens=lens, step=step,
                     decode=all(n == 1 for n in counts) and all(a > 0 for a in starts),
                     block_size=bs, n_keys=n_keys, max_pos=n_keys + 1,
                     pos=pos.to(dev), rope_pos=pos.to(dev), row_seq=row_seq.to(dev), write_slot=write_slot.to(dev),
                     write_table=table.to(dev), table=table.to(dev), seq_lens=torch.tensor(lens, device=dev),
                     q_index=q_index.to(dev), q_pos=q_pos.to(dev), out_index=out_index.to(dev),
                     causal=tq > 1)

    def load(self, layer: int, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put ``k``/``v [n, Hkv, D]`` (e.g. a golden's ``k_rope`` and ``v`` rows) at positions ``0..n-1``
        of sequence ``seq`` in ``layer`` (stage-local replay of a decode step attends a golden prefix)."""
        self.load_layers(seq, {layer: (k, v)})

    def load_layers(self, seq: int, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`load` of several layers (``{layer: (k, v)}``, the same ``n`` rows each): the slots
        found once."""
        if not kv:
            return
        n = next(iter(kv.values()))[0].shape[0]
        if self.lens[seq] < n:
            self._grow(seq, n - self.lens[seq])
            self.lens[seq] = n
        pos = torch.arange(n)
        table = self.table_rows([seq], -(-n // self.block_size))[0]
        slot = (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)
        for layer, (k, v) in kv.items():
            if k.shape[0] != n or v.shape[0] != n:
                raise UsageError(f"layer {layer}: {k.shape[0]} key and {v.shape[0]} value rows, expected {n}")
            self.k[layer].view(-1, *self.k[layer].shape[2:]).index_copy_(0, slot, k.to(self.device, self.dtype))
            self.v[layer].view(-1, *self.v[layer].shape[2:]).index_copy_(0, slot, v.to(self.device, self.dtype))


def _gather(pool: torch.Tensor, table: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The key (or value) rows of each sequence, ``[B, n_keys, Hkv, D]``, through its block-table row."""
    if table.shape[1] == 1:                                    # contiguous: one block per sequence
        return pool[:, :n_keys].index_select(0, table[:, 0])
    B, nb = table.shape
    rows = pool.index_select(0, table.reshape(-1))             # [B*nb, bs, Hkv, D]
    return rows.view(B, nb * pool.shape[1], *pool.shape[2:])[:, :n_keys]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                     v_pool: torch.Tensor, batch: Batch, gqa: bool, *, window: int = 0,
                     sinks: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Write the new rows' ``k``/``v [T, Hkv, D]`` into the cache of one layer, then attend each packed
    query row ``q [T, Hq, D]`` over its own sequence's cached keys; returns ``[T, Hq, D]``.

    ``window`` (a sliding layer): each query attends the keys of its own and the ``window - 1`` positions
    before it only (the cache keeps every position; the older ones are masked, prefill and decode alike).
    ``sinks [Hq]``: the layer's attention sink logits (:func:`~moesnap.model.kernels.sdpa_masked`).
    ``scale``: what ``q·k`` is multiplied by (None: ``1/sqrt(D)``); values may be narrower than keys
    (``v [T, Hkv, Dv]``, DeepSeek), the output is then ``[T, Hq, Dv]``."""
    B, Tq = batch.q_index.shape
    T, Hq, D = q.shape
    Dv = v_pool.shape[-1]
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, batch.write_slot, k)
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, batch.write_slot, v)
    keys = _gather(k_pool, batch.table, batch.n_keys).transpose(1, 2)           # [B, Hkv, S, D]
    vals = _gather(v_pool, batch.table, batch.n_keys).transpose(1, 2)           # [B, Hkv, S, D]
    qp = q.index_select(0, batch.q_index.reshape(-1)).view(B, Tq, Hq, D).transpose(1, 2)  # [B, Hq, Tq, D]
    kpos = torch.arange(batch.n_keys, device=q.device)                          # [S]
    mask = torch.ones(B, Tq, batch.n_keys, dtype=torch.bool, device=q.device)   # [B, Tq, S]
    if batch.key_mask:
        mask &= kpos[None, None, :] < batch.seq_lens[:, None, None]
    if batch.causal:
        mask &= kpos[None, None, :] <= batch.q_pos[:, :, None]
    if window:
        mask &= batch.q_pos[:, :, None] - kpos[None, None, :] < window
    kw: dict[str, float] = {} if scale is None else {"scale": scale}
    if sinks is not None:
        o = sdpa_masked(qp, keys, vals, mask, sinks, gqa)                       # [B, Hq, Tq, D]
    elif Hq != keys.shape[1] and gqa:
        o = masked_sdpa(qp, keys, vals, mask[:, None], enable_gqa=True, **kw)
    else:
        rep = Hq // keys.shape[1]
        if rep > 1:
            keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
        o = masked_sdpa(qp, keys, vals, mask[:, None], **kw)                    # [B, Hq, Tq, Dv]
    return o.transpose(1, 2).reshape(B * Tq, Hq, Dv).index_select(0, batch.out_index)  # [T, Hq, Dv]
