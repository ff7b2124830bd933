"""Local re-reference: judge each layer of another engine's dump on that engine's own input.

A free-running comparison judges what the engine *carries*: once a bfloat16
engine picks other experts at a near tie, causal attention spreads the
difference and the later layers cannot be held to the golden any more.  Here
the reference instead recomputes every layer ``L`` from the engine's own input
to it (its ``layer_out`` of ``L - 1``, or its ``embed`` for layer 0) and the
engine's layer-``L`` stages are judged against that: the error each layer
**introduces**, with every token judged in every layer.

It goes further, stage by stage: each stage is recomputed from the engine's
own value of the stage before it, where the dump holds that stage (``q`` from
its ``attn_norm``, ``attn`` from its ``q_rope``/``k_rope``/``v``, ``moe_out``
from its ``topk_weights`` and ``expert_out``, ``layer_out`` from its
``attn_resid`` and ``moe_out``...), and from the reference's own value where
the dump lacks it (transformers' hooks see no ``q_rope`` or ``expert_out``).
So every judged difference is the error of one operation in the engine's
precision, not the sum of a layer's, and a bug is named at the stage that
makes it, with bfloat16 tolerances for one operation's rounding.

Where the engine chose other experts than the reference's own router at a near
tie (``tie_gap`` of the engine's set under the reference's router logits within
``tie_tol``), the reference follows the engine's experts, records its own
choice in ``router_followed`` and the comparison reports ``ROUTING_TIE``; a
wider gap keeps the reference's experts and is a divergence.  ``final_norm`` is
recomputed from the engine's last ``layer_out`` and ``logits`` from its
``final_norm``.  A layer whose input the dump lacks is not recomputed; the
caller says so (it is judged free-running only).

For a ggml engine (``aq``: :class:`~moesnap.model.ggml.ActivationQuant`) every matmul input is
rounded to 8 bits as ggml rounds it, and in llama.cpp's dump every such input but one is the
engine's own stage, so those roundings agree bit for bit.  The one exception is an expert's down-projection input (the SwiGLU
output, no stage): the reference computes it with its own float32 sums, and where a product
``scale * x`` of it falls within that noise of a half the two round it to neighbouring quants (one
step: ~4e-3 of the row).  There the reference takes the engine's rounding of those elements only
(:func:`_follow_rounding`), and a note says which.

The judge does not wait for the whole of it: :class:`LocalReference` makes it layer by layer on a
thread of its own, on the host or a CUDA device, while the judge reads the layers already made.

Memory: one layer's weights at a time (the reference's lazy loader); the
recomputed stages take what one golden case takes.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch

from ..case import Case
from ..judge.routing import tie_gap
from ..model.config import ModelConfig
from ..model.families import expert_act, route
from ..errors import GoldenError
from ..model.recorder import ArrayRecorder
from ..model.ggml import ActivationQuant, identity, near_halves
from ..model.reference import (ActQuant, RMSNorm, Transformer, _linear, causal_attention, expert_outputs,
                               rope_cos_sin, rotate_half)
from ..stages import LAYER_STAGES
from ..model.tensors import table
from ..model.weights import LayerWeights, ModelWeights
from .rereference_device import DeviceWeights, exact_matmuls

Progress = Callable[[int, int], None]
_HOST = torch.device("cpu")


def _input_of(candidate: Case, layer: int) -> tuple[np.ndarray | None, str]:
    if layer == 0:
        return candidate.model.get("embed"), "embed"
    return candidate.stage("layer_out", layer - 1), f"layer_out of layer {layer - 1}"


class _Engine:
    """The engine's own values of one layer's stages, as float32 tensors (on ``device``) where usable."""

    def __init__(self, candidate: Case, layer: int, device: torch.device = _HOST) -> None:
        self.case, self.layer, self.device = candidate, layer, device

    def get(self, stage: str, like: torch.Tensor) -> torch.Tensor | None:
        a = self.case.stage(stage, self.layer)
        if a is None or a.dtype.kind != "f" or tuple(a.shape) != tuple(like.shape) or not np.isfinite(a).all():
            return None
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def or_own(self, stage: str, own: torch.Tensor) -> torch.Tensor:
        """The engine's value of ``stage`` where it has a usable one, else the reference's."""
        mine = self.get(stage, own)
        return own if mine is None else mine

    def ids(self, T: int, k: int, n_expert: int) -> np.ndarray | None:
        a = self.case.stage("topk_ids", self.layer)
        if a is None or a.dtype.kind not in "iu" or a.shape != (T, k):
            return None
        return a.astype(np.int64)


def _follow(own_ids: torch.Tensor, logits: torch.Tensor, cand: np.ndarray | None, n_expert: int,
            tie_tol: float, layer: int, followed: list) -> torch.Tensor:
    """Take the engine's expert set where it differs from the reference's own at a near tie."""
    if cand is None:
        return own_ids
    own = own_ids.cpu().numpy()
    differ = np.flatnonzero((np.sort(own, axis=1) != np.sort(cand, axis=1)).any(axis=1))
    out = own_ids.clone()
    lg = logits.cpu().numpy()
    for t in differ.tolist():
        row = cand[t]
        if len(set(row.tolist())) != row.size or row.min() < 0 or row.max() >= n_expert:
            continue
        if tie_gap(lg[t], row) <= tie_tol:
            followed.append([layer, t, [int(e) for e in own[t]]])
            out[t] = torch.from_numpy(row).to(out.device)
    return out


def _by_ids(values: torch.Tensor | None, ids_from: np.ndarray | None, ids_to: torch.Tensor) -> torch.Tensor | None:
    """The engine's per-expert ``values [T, k, ...]`` put in the slot order of ``ids_to``, where every
    token's two id sets agree; None otherwise."""
    if values is None or ids_from is None:
        return None
    to = ids_to.cpu().numpy()
    if not (np.sort(ids_from, axis=1) == np.sort(to, axis=1)).all():
        return None
    pos = np.argsort(ids_from, axis=1)[np.arange(to.shape[0])[:, None], np.argsort(np.argsort(to, axis=1), axis=1)]
    idx = torch.from_numpy(pos).to(values.device)
    if values.dim() == 3:
        idx = idx[..., None].expand(-1, -1, values.shape[-1])
    return values.gather(1, idx)


#: an expert row whose relative L2 distance to the engine's is below this is float noise (~2e-7 measured
#: against llama.cpp) and is left alone; one 8-bit quant step moves a row by ~1e-3
ROW_NOISE = 1e-5


@torch.no_grad()
def _follow_rounding(cfg: ModelConfig, w: LayerWeights, fn: torch.Tensor, ids: torch.Tensor, eo: torch.Tensor, eo_e: torch.Tensor,
                     aq: ActivationQuant, layer: int, rounded: list | None) -> None:
    """Take the engine's 8-bit rounding of an expert's down-projection input where it sits at a near half.

    That input (the SwiGLU output) is no stage: the reference computes it from the engine's ``ffn_norm``
    with its own float32 sums, ~2e-7 away from the engine's, and where a product ``scale * h`` lies within
    that of a half the two round it to neighbouring quants (one step: ~1e-3 of the row).  For each row of
    ``eo [T, k, H]`` that differs from the engine's ``eo_e`` by more than float noise and whose input has
    elements within :data:`~moesnap.model.ggml.NEAR_HALF` steps of a half, the row is computed again alone
    (its own sums may round those elements either way) and each such element is rounded the other way,
    nearest first, where that brings the row closer to the engine's; the row so made replaces ``eo``'s (in
    place) where it is the closer of the two, and its near-half elements are appended to ``rounded`` as
    ``[layer, token, expert, element]``.  Only the rounding of near-half elements can move a row: any other
    difference is left for the judge."""
    p = f"blk.{w.index}."
    down_type = aq.type_of(p + "ffn_down_exps")
    diff = (eo - eo_e).norm(dim=-1) > ROW_NOISE * eo_e.norm(dim=-1)                # [T, k]
    experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    bank = w.experts
    assert bank is not None   # local re-reference refuses families with dense layers
    for t, slot in diff.nonzero().tolist():
        e = int(ids[t, slot])
        if e not in experts:
            experts[e] = bank.expert(e)
        gate, up, down = experts[e]
        x = fn[t:t + 1]
        bg, bu, bd = bank.bias(e) or (None, None, None)
        h = expert_act(cfg, _linear(aq(x, p + "ffn_gate_exps"), gate, bg),
                       _linear(aq(x, p + "ffn_up_exps"), up, bu))[0]                              # [F]
        near, steps = near_halves(h, down_type)
        if near.numel() == 0:
            continue                    # no rounding here is decided by noise: the difference is the judge's
        y = _linear(aq(h, p + "ffn_down_exps"), down, bd)   # [H] this row alone: its sums, its own roundings
        for j, step in zip(near.tolist(), steps):
            change = step * down[:, j]                                                             # [H]
            if (eo_e[t, slot] - y - change).norm() < (eo_e[t, slot] - y).norm():
                y = y + change
        if (eo_e[t, slot] - y).norm() < (eo_e[t, slot] - eo[t, slot]).norm():
            eo[t, slot] = y
            if rounded is not None:
                rounded.extend([layer, t, e, j] for j in near.tolist())


def _weights_of(cfg: ModelConfig, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, ids)`` of the experts ``ids [T, k]`` (the reference's own, or the engine's it followed)
    under the family's gating, by descending weight: the softmax over all experts at those ids,
    renormalised (``softmax_topk_renorm``), or the softmax over the k logits (``topk_softmax``)."""
    if cfg.gating == "topk_softmax":
        tw = torch.softmax(logits.gather(-1, ids), dim=-1)                       # [T, k]
        tw, order = tw.sort(dim=-1, descending=True)
        return tw, ids.gather(-1, order)
    tw, order = torch.softmax(logits, dim=-1).gather(-1, ids).sort(dim=-1, descending=True)
    return tw / tw.sum(-1, keepdim=True), ids.gather(-1, order)                 # renormalised [T, k]


@torch.no_grad()
def _layer(cfg: ModelConfig, w: LayerWeights, eng: _Engine, i: int, x: torch.Tensor, cos, sin,
           rec: ArrayRecorder, tie_tol: float, followed: list, aq: ActQuant = identity,
           rounded: list | None = None) -> None:
    """Every stage of layer ``i`` from the engine's own value of the stage before it (module docstring)."""
    T, D, p = x.shape[0], cfg.head_dim, f"blk.{i}."
    assert w.wq is not None and w.wk is not None and w.wv is not None and w.router is not None   # Qwen3-MoE's
    own = RMSNorm(w.attn_norm, cfg.rms_eps)(x)                                  # [T, H]
    rec.save("attn_norm", i, own)
    a = eng.or_own("attn_norm", own)
    q = _linear(aq(a, p + "attn_q"), w.wq, w.bq).view(T, cfg.n_head, D)         # [T, Hq, D]
    k = _linear(aq(a, p + "attn_k"), w.wk, w.bk).view(T, cfg.n_head_kv, D)      # [T, Hkv, D]
    v = _linear(aq(a, p + "attn_v"), w.wv, w.bv).view(T, cfg.n_head_kv, D)      # [T, Hkv, D]
    for name, t in (("q", q), ("k", k), ("v", v)):
        rec.save(name, i, t)
    q, k, v = eng.or_own("q", q), eng.or_own("k", k), eng.or_own("v", v)
    if w.q_norm is not None and w.k_norm is not None:      # families without q/k norm (gpt-oss): no such stage
        qn, kn = RMSNorm(w.q_norm, cfg.rms_eps)(q), RMSNorm(w.k_norm, cfg.rms_eps)(k)
        rec.save("q_norm", i, qn)
        rec.save("k_norm", i, kn)
        q, k = eng.or_own("q_norm", qn), eng.or_own("k_norm", kn)
    qr, kr = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin      # [T, H*, D]
    rec.save("q_rope", i, qr)
    rec.save("k_rope", i, kr)
    qr, kr = eng.or_own("q_rope", qr), eng.or_own("k_rope", kr)
    attn = causal_attention(cfg, qr, kr, v, i, w.sinks)                          # [T, Hq*D]
    rec.save("attn", i, attn)
    attn_out = _linear(aq(eng.or_own("attn", attn), p + "attn_output"), w.wo, w.bo)   # [T, H]
    rec.save("attn_out", i, attn_out)
    resid = x + eng.or_own("attn_out", attn_out)                                 # [T, H]
    rec.save("attn_resid", i, resid)
    resid = eng.or_own("attn_resid", resid)
    fn = RMSNorm(w.ffn_norm, cfg.rms_eps)(resid)
    rec.save("ffn_norm", i, fn)
    fn = eng.or_own("ffn_norm", fn)
    logits = _linear(aq(fn, p + "ffn_gate_inp"), w.router, w.router_bias)       # [T, E] float32
    rec.save("router_logits", i, logits)
    logits = eng.or_own("router_logits", logits)
    _, ids = route(cfg, logits, cfg.n_expert_used)                               # [T, k] the reference's own
    cand_ids = eng.ids(T, cfg.n_expert_used, cfg.n_expert)
    ids = _follow(ids, logits, cand_ids, cfg.n_expert, tie_tol, i, followed)
    tw, ids = _weights_of(cfg, logits, ids)                                      # [T, k] by descending weight
    rec.save("topk_ids", i, ids)
    rec.save("topk_weights", i, tw)
    eo = expert_outputs(cfg, w, fn, ids, aq)                                     # [T, k, H]
    tw_e = _by_ids(eng.get("topk_weights", tw), cand_ids, ids)
    eo_e = _by_ids(eng.get("expert_out", eo), cand_ids, ids)
    if eo_e is not None and isinstance(aq, ActivationQuant):
        _follow_rounding(cfg, w, fn, ids, eo, eo_e, aq, i, rounded)
    rec.save("expert_out", i, eo)
    moe = ((eo if eo_e is None else eo_e) * (tw if tw_e is None else tw_e)[..., None]).sum(dim=1)  # [T, H]
    rec.save("moe_out", i, moe)
    rec.save("layer_out", i, resid + eng.or_own("moe_out", moe))


def _rounding_note(rounded: list) -> str:
    """One line on the expert rows that follow the engine's rounding at a near half."""
    where = ", ".join(f"token {t} expert {e} element {j}" for _, t, e, j in rounded[:4])
    more = f" and {len(rounded) - 4} more" if len(rounded) > 4 else ""
    return (f"the engine's rounding taken for {len(rounded)} 8-bit quant{'s' if len(rounded) != 1 else ''} of an "
            f"expert's down-projection input at a near half ({where}{more})")


class LocalReference:
    """The local re-reference of one dump (module docstring) as a value the judge reads while it is made.

    :attr:`case` holds the reference's arrays from the start (``[n_layer, ...]``, zeros until made);
    :meth:`start` makes them on a thread of its own, layer by layer, then the whole-model stages
    (``final_norm`` from the engine's last ``layer_out``, ``logits`` from its ``final_norm``), while
    :meth:`ready` returns once a layer (given None: all of it) is made.  So the judge of layer ``l``
    overlaps the recomputation of layer ``l + 1``, and the free-running judgement of the same dump the
    whole of it.  :meth:`run` makes it all on the calling thread instead (the same values, bit for bit).

    :attr:`layers`: the layers recomputed, those the dump gives an input for (known before any is made;
    the other layers' arrays hold zeros and must not be judged).  :attr:`notes`: what the re-reference
    says, in layer order, each prefixed with ``label``; complete once ``ready(None)`` returned.

    ``aq`` rounds each matmul's input as the engine does (``ActivationQuant`` for a ggml engine: the
    local reference then computes what a correct ggml engine computes from the same inputs).
    ``device``: where the arithmetic runs, in float32 (:mod:`moesnap.run.rereference_device`: one
    layer's weights at a time there, as on the host).  A dump whose input to a layer is not a float
    array ``[T, H]`` is refused here, before anything is made.
    """

    def __init__(self, model: ModelWeights, candidate: Case, *, tie_tol: float, progress: Progress | None = None,
                 aq: ActQuant = identity, device: torch.device | str = "cpu", label: str = "") -> None:
        cfg = model.config
        self.model, self.candidate, self.tie_tol, self.progress, self.aq = model, candidate, tie_tol, progress, aq
        self.device, self.label = torch.device(device), label
        #: made by the host's own code (``model.layer``, the reference's lm head); False: by the device path
        #: (experts dequantized where the arithmetic runs; a test runs it on the host, where it must agree)
        self.host = self.device.type == "cpu"
        T = int(candidate.tokens.shape[0])
        self.n_layer = min(cfg.n_layer, candidate.n_layer) if candidate.layers else cfg.n_layer
        done = []
        for i in range(self.n_layer):
            x, what = _input_of(candidate, i)
            if x is None:
                continue
            if x.ndim != 2 or x.shape != (T, cfg.hidden) or x.dtype.kind != "f":
                raise GoldenError(f"candidate {what}: expected a float array [{T}, {cfg.hidden}], "
                                  f"got {x.dtype} {list(x.shape)}")
            done.append(i)
        self.layers: tuple[int, ...] = tuple(done)
        self.notes: list[str] = []
        self.followed: list = []
        layers: dict[str, np.ndarray] = {s: np.zeros((self.n_layer, *shape), dtype=dt)
                                          for s, (shape, dt) in _layer_shapes(cfg, T, done).items()}
        model_stages: dict[str, np.ndarray] = {}
        if _usable(candidate.stage("layer_out", cfg.n_layer - 1), T, cfg.hidden):
            model_stages["final_norm"] = np.zeros((T, cfg.hidden), dtype=np.float32)
        if _usable(candidate.model.get("final_norm"), T, cfg.hidden):
            model_stages["logits"] = np.zeros((T, model.n_rows("output")), dtype=np.float32)
        self.case = Case(tokens=candidate.tokens, model=model_stages, layers=layers,
                         attrs={"producer": "moesnap-local-reference", "router_followed": self.followed,
                                "model": {"config": cfg.to_dict()}})  # its family: the judge walks its stages
        self._made: set[int] = set()
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the consumer's side
    def start(self) -> LocalReference:
        """Make it on a thread of its own (:meth:`ready` waits for what the judge reads)."""
        if self._thread is None and not self._finished:
            self._thread = threading.Thread(target=self.run, name="moesnap-local-reference", daemon=True)
            self._thread.start()
        return self

    def ready(self, layer: int | None) -> None:
        """Return once layer ``layer`` is made (None: every layer and the whole-model stages); what went
        wrong in making it is raised here.  Never started: it is made now, on this thread."""
        if self._thread is None and not self._finished:
            self.run()
        with self._cond:
            self._cond.wait_for(lambda: self._finished or layer is not None and (layer in self._made
                                                                                 or layer not in self.layers))
        if self._error is not None and (layer is None or layer not in self._made):
            raise self._error

    def close(self) -> None:
        """Stop after the layer in progress and wait for the thread (a judge that stopped early)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def rows(self, positions: np.ndarray) -> Case:
        """:meth:`Case.rows <moesnap.case.Case.rows>` of :attr:`case` at ``positions``, consecutive ones: views
        of its arrays, so that what is made later is seen there too."""
        pos = np.asarray(positions, dtype=np.int64)
        lo = int(pos[0]) if pos.size else 0
        if not (pos == np.arange(lo, lo + pos.size)).all():
            raise ValueError(f"positions {pos.tolist()[:8]}: not consecutive")
        at = slice(lo, lo + pos.size)
        c = self.case
        attrs = {k: v for k, v in c.attrs.items() if k not in ("router_followed", "token_ids", "held_tokens")}
        attrs["positions"] = [int(p) for p in pos]
        return Case(tokens=c.tokens[pos], model={s: a[at] for s, a in c.model.items()},
                    layers={s: a[:, at] for s, a in c.layers.items()}, attrs=attrs)

    # -- the maker's side
    def run(self) -> None:
        """Make every layer, then the whole-model stages, on this thread."""
        try:
            with torch.no_grad(), exact_matmuls(self.device):
                self._make()
        except BaseException as e:   # handed to the judge's thread by ready()
            self._error = e
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _make(self) -> None:
        model, cand, cfg, dev = self.model, self.candidate, self.model.config, self.device
        T = int(cand.tokens.shape[0])
        cos, sin = (t.to(dev) for t in rope_cos_sin(cfg, T, torch.float32))
        for i in range(self.n_layer):
            if self._stop.is_set():
                raise RuntimeError("the local re-reference was closed before it was made")
            x, what = _input_of(cand, i)
            if x is None:
                self.notes.append(f"{self.label}layer {i}: the dump has no {what}, so the layer is judged "
                                  f"free-running only")
            else:
                w = (model if self.host else DeviceWeights(model, dev)).layer(i, torch.float32)
                rec = ArrayRecorder(batched=not self.host)     # one copy to the host per layer
                rounded: list = []
                _layer(cfg, w, _Engine(cand, i, dev), i, torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev),
                       cos, sin, rec, self.tie_tol, self.followed, self.aq, rounded)
                if rounded:
                    self.notes.append(f"{self.label}layer {i}: {_rounding_note(rounded)}")
                del w
                model.release_layer(i)
                self._write(i, rec.layers)
            if self.progress is not None:
                self.progress(i + 1, self.n_layer)
        x_last = cand.stage("layer_out", cfg.n_layer - 1)
        if "final_norm" in self.case.model and x_last is not None:
            self.case.model["final_norm"][...] = self._final_norm(x_last)
        if "logits" in self.case.model:
            self.case.model["logits"][...] = self._lm_head(cand.model["final_norm"])

    def _write(self, i: int, recorded: dict[str, dict[int, np.ndarray]]) -> None:
        """Layer ``i``'s stages into :attr:`case`, and the layer marked made."""
        got = sorted(s for s, per in recorded.items() if i in per)
        assert got == sorted(self.case.layers), f"layer {i}: made {got}, allotted {sorted(self.case.layers)}"
        for stage, per in recorded.items():
            dst, a = self.case.layers[stage], per[i]
            assert a.shape == dst.shape[1:] and a.dtype == dst.dtype, f"layer {i} / {stage}: {a.dtype} {a.shape}"
            dst[i] = a
        with self._cond:
            self._made.add(i)
            self._cond.notify_all()

    def _final_norm(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if self.host:
            return Transformer(self.model, torch.float32, self.aq).final_norm(t).numpy()
        norm = RMSNorm(DeviceWeights(self.model, self.device).dense("output_norm"), self.model.config.rms_eps)
        return norm(t.to(self.device)).cpu().numpy()

    def _lm_head(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if self.host:
            return Transformer(self.model, torch.float32, self.aq).lm_head(t).numpy()
        head = DeviceWeights(self.model, self.device).dense("output")                 # [V, H]
        return (self.aq(t.to(self.device), "output") @ head.T).cpu().numpy()


def _usable(x: np.ndarray | None, T: int, hidden: int) -> bool:
    return x is not None and x.shape == (T, hidden) and x.dtype.kind == "f"


def _layer_shapes(cfg: ModelConfig, T: int, layers: list[int]) -> dict[str, tuple[tuple[int, ...], type]]:
    """What :func:`_layer` records of each layer, in stage order: (shape of one layer, dtype) by stage (none
    where no layer is recomputed; ``q_norm``/``k_norm`` where a recomputed layer has q/k norms)."""
    if not layers:
        return {}
    H, D, Hq, Hkv, k = cfg.hidden, cfg.head_dim, cfg.n_head, cfg.n_head_kv, cfg.n_expert_used
    tab = table(cfg.arch)     # what model.layer(i) loads: q/k norms where the layer holds them
    qk = any({"attn_q_norm", "attn_k_norm"} <= set(tab.in_layer(i, cfg.layer_where(i))) for i in layers)
    shapes = {"attn_norm": (T, H), "q": (T, Hq, D), "k": (T, Hkv, D), "v": (T, Hkv, D), "q_norm": (T, Hq, D),
              "k_norm": (T, Hkv, D), "q_rope": (T, Hq, D), "k_rope": (T, Hkv, D), "attn": (T, Hq * D),
              "attn_out": (T, H), "attn_resid": (T, H), "ffn_norm": (T, H), "router_logits": (T, cfg.n_expert),
              "topk_ids": (T, k), "topk_weights": (T, k), "expert_out": (T, k, H), "moe_out": (T, H), "layer_out": (T, H)}
    return {s: (shapes[s], np.int32 if s == "topk_ids" else np.float32) for s in LAYER_STAGES
            if s in shapes and (qk or s not in ("q_norm", "k_norm"))}


def local_reference(model: ModelWeights, candidate: Case, *, tie_tol: float, progress: Progress | None = None,
                    aq: ActQuant = identity, device: torch.device | str = "cpu") -> tuple[Case, list[int], list[str]]:
    """(the reference recomputed from ``candidate``'s own values, the layers recomputed, notes), made on
    this thread (:class:`LocalReference`, whose arguments these are)."""
    ref = LocalReference(model, candidate, tie_tol=tie_tol, progress=progress, aq=aq, device=device)
    ref.ready(None)
    return ref.case, list(ref.layers), list(ref.notes)
