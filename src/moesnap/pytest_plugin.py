"""moesnap's pytest plugin: the ``moesnap_snapshot`` fixture, snapshot regression (the habit of
pytest-regressions and syrupy) with moesnap's golden store and classifier behind it.

Installing moesnap registers it (entry point ``pytest11``)::

    def test_my_kernel(moesnap_snapshot):
        out, lse = my_kernel(x)                                 # numpy arrays or torch tensors
        moesnap_snapshot.check({"out": out, "lse": lse})        # against this test's golden

    def test_my_forward(moesnap_snapshot):                      # a Qwen3-MoE forward, stage by stage
        moesnap_snapshot.check_forward("model.gguf", [[1, 2, 3], "Hello"], my_forward)

Each test has its own golden suite (:func:`suite_name` of its node id), versioned in the snapshot
store: ``--moesnap-store ROOT``, else ``snapshot_store`` in ``[tool.moesnap]`` of the rootdir's
``pyproject.toml`` (relative to that file), else ``<rootdir>/goldens/snapshots``.  Without a golden
the test fails and says how to make one; ``pytest --moesnap-regen [NODEID ...]`` publishes a new
version for each test that ran and fails it, so that the change is seen; later runs judge against
the newest version.  Tolerances: the dtype's table of :mod:`moesnap.judge.tolerances` (with
``[tool.moesnap]``'s overrides), keyword arguments over it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Mapping, Sequence

import pytest

if TYPE_CHECKING:
    import numpy as np

    from .case import Case
    from .judge.classify import Result
    from .judge.policy import ConfigFile, Settings
    from .judge.report import Report
    from .judge.tolerances import Tolerance
    from .model.recorder import ArrayRecorder
    from .store import GoldenStore, GoldenVersion

DEFAULT_STORE = Path("goldens") / "snapshots"     # under the rootdir
#: the keyword tolerances ``check`` takes (the elementwise rule and the row rule of :class:`Tolerance`)
TOLERANCE_KEYS = ("atol", "rtol", "max_frac_outside", "row_rel_l2")
_ROW = "  {name:<{w}}  {verdict:<14} {shape:<{s}}  {what}"


# ---------------------------------------------------------------- options and settings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moesnap", "moesnap golden snapshots (the moesnap_snapshot fixture)")
    group.addoption("--moesnap-regen", action="store_true", default=False,
                    help="write a new golden version for every moesnap_snapshot test that runs, and fail it "
                         "so that the change is seen (pytest-regressions' --force-regen)")
    group.addoption("--moesnap-store", metavar="ROOT", default=None,
                    help="the snapshot golden store: a directory or s3://bucket/prefix (default: snapshot_store "
                         "of [tool.moesnap] in the rootdir's pyproject.toml, else <rootdir>/goldens/snapshots)")


@dataclass
class _Settings:
    root: str                    # the store root (an absolute directory or an s3:// URL)
    regen: bool
    config: ConfigFile | None    # [tool.moesnap] of the rootdir's pyproject.toml, parsed once

    def settings(self, dtype: str | None = None, tol: Mapping[str, float] | Sequence[str] | None = None) -> Settings:
        """The tolerance request of a check: the rootdir's ``[tool.moesnap]``, then ``tol``."""
        from .judge.policy import Settings

        return Settings(dtype=dtype, profile="auto", config=self.config, overrides=tol or ())


_SETTINGS = pytest.StashKey[_Settings]()
_SNAPSHOT = pytest.StashKey["MoesnapSnapshot"]()


def _settings(config: pytest.Config) -> _Settings:
    """Read once per session, on first use (a project that uses no snapshot never reads anything)."""
    if _SETTINGS in config.stash:
        return config.stash[_SETTINGS]
    from .errors import UsageError

    from .judge.policy import ConfigFile

    rootdir = Path(config.rootpath)
    candidate = rootdir / "pyproject.toml"
    pyproject = candidate if candidate.is_file() else None
    cfg = ConfigFile.read(pyproject) if pyproject is not None else None
    section: Mapping[str, Any] = cfg.section if cfg is not None else {}
    option = config.getoption("moesnap_store")
    configured = section.get("snapshot_store")
    if option:
        root = option if "://" in option else str(Path(config.invocation_params.dir, option).resolve())
    elif configured is not None:
        if not isinstance(configured, str) or not configured:
            raise UsageError(f"{pyproject}: [tool.moesnap] snapshot_store = {configured!r} must be a directory "
                             f"(relative to that file) or s3://bucket/prefix")
        root = configured if "://" in configured else str((rootdir / configured).resolve())
    else:
        root = str(rootdir / DEFAULT_STORE)
    settings = _Settings(root, bool(config.getoption("moesnap_regen")), cfg)
    config.stash[_SETTINGS] = settings
    return settings


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("moesnap_regen"):
        return f"moesnap: --moesnap-regen writes new goldens in {_settings(config).root}"
    return None


# ---------------------------------------------------------------- the fixture


@pytest.fixture
def moesnap_snapshot(request: pytest.FixtureRequest) -> MoesnapSnapshot:
    """Judge arrays (``check``) or a Qwen3-MoE forward (``check_forward``) against this test's golden."""
    snap = MoesnapSnapshot(request.node.nodeid, _settings(request.config))
    request.node.stash[_SNAPSHOT] = snap
    return snap


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Under ``--moesnap-regen``, once the test body has returned: publish what its ``check`` calls
    recorded as one new version, and fail the test, saying so (a test that fails otherwise writes
    nothing; ``check_forward`` has published its golden already)."""
    result = yield
    snap = item.stash.get(_SNAPSHOT, None)
    if snap is not None:
        with _golden_errors(None):
            snap._finish()
    return result


@contextlib.contextmanager
def _golden_errors(regen: str | None) -> Iterator[None]:
    """A store's error (a corrupt golden, an unwritable directory) fails the test in one message."""
    __tracebackhide__ = True
    from .errors import MoesnapError

    try:
        yield
    except MoesnapError as e:
        hint = f"\nif the golden is stale or damaged, regenerate it: {regen}" if regen else ""
        pytest.fail(f"moesnap_snapshot: {e}{hint}", pytrace=False)


def suite_name(nodeid: str) -> str:
    """The golden suite of the test ``nodeid``: ``tests/test_a.py::TestX::test_y`` -> ``tests.test_a.TestX.test_y``.

    Any character a suite name cannot hold (parameters: ``test_y[1-a/b]``) becomes ``_``, and then,
    as when the name is longer than 100 characters, 8 hex digits of the node id's sha1 keep it unique.
    """
    path, sep, rest = nodeid.partition("::")
    path = path[:-3] if path.endswith(".py") else path
    text = ".".join(p for p in re.split(r"[/\\]+", path) if p)
    if sep:
        text = f"{text}.{rest.replace('::', '.')}" if text else rest.replace("::", ".")
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    clean = re.sub(r"\.{2,}", ".", clean).strip("._-") or "test"
    if clean != text or len(clean) > 100:
        clean = f"{clean[:90].rstrip('._-')}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"
    from .store import validate_suite

    return validate_suite(clean)


class MoesnapSnapshot:
    """The ``moesnap_snapshot`` fixture of one test: its golden suite in the snapshot store."""

    def __init__(self, nodeid: str, settings: _Settings) -> None:
        self.nodeid = nodeid
        self.suite = suite_name(nodeid)
        self.store_root = settings.root
        self.regen = settings.regen
        self._settings = settings
        self._kind: str | None = None                             # "arrays" or "forward": one per test
        self._pending: dict[str, tuple[dict[str, np.ndarray], str]] = {}   # regen: name -> (arrays, dtype)
        self._calls = 0
        self._names: set[str] = set()                             # case names checked so far
        self._regenerated: str | None = None                      # check_forward's regen message
        self._policies: dict[str, Any] = {}                         # dtype -> the session's Policy

    @property
    def regen_command(self) -> str:
        return f"pytest --moesnap-regen {shlex.quote(self.nodeid)}"

    # -- arrays of any names
    def check(self, arrays: Mapping[str, Any] | Case | ArrayRecorder | str | os.PathLike[str], *,
              dtype: str = "float32", name: str | None = None, **tolerances: float) -> None:
        """Judge ``arrays`` against this test's golden; raise :class:`AssertionError` saying which array
        failed, how (NaN count, elements outside and max abs/rel error, rows above ``row_rel_l2``) and
        where (the first bad index), with the command that regenerates.

        ``arrays``: a mapping of names to numpy arrays or torch tensors (a name is ``/``-separated parts of
        letters, digits, ``.``, ``_``, ``-``), a :class:`moesnap.Case`, a :class:`moesnap.Recorder`, or the
        path of a case group.  ``dtype``: the candidate's, choosing the tolerance table; an array named
        like a moesnap stage (``logits``, ``layers/moe_out``) takes that stage's tolerance, any other
        the dtype's ``default``; ``tolerances`` (``atol``, ``rtol``, ``max_frac_outside``, ``row_rel_l2``)
        replace those keys for every array.  ``name``: the golden case, when a test checks several
        times (default ``check0``, ``check1``, … in call order).
        """
        __tracebackhide__ = True
        from .errors import UsageError
        from .store import validate_case_name

        self._use("arrays")
        name = validate_case_name(name if name is not None else f"check{self._calls}")
        self._calls += 1
        if name in self._names:
            raise UsageError(f"moesnap_snapshot.check: name {name!r} used twice in one test")
        self._names.add(name)
        values = _as_arrays(arrays)
        tols = {n: self._tolerance(n, dtype, tolerances) for n in values}
        if self.regen:
            self._pending[name] = ({n: _frozen(a) for n, a in values.items()}, dtype)
            return
        from .store.arrays import strip_prefix

        with _golden_errors(self.regen_command):
            version = self._golden(name)
            golden = strip_prefix(version.read_arrays(name))
        rows = _judge(golden, values, tols, lambda n: self._tolerance(n, dtype, tolerances))
        failed = [r for r in rows if not r.result.passed]
        if failed:
            head = (f"moesnap_snapshot: {len(failed)} of {len(rows)} arrays differ from golden {version.ref}, "
                    f"{name} ({dtype} tolerances)")
            raise AssertionError("\n".join([head, *_table(rows),
                                            f"store: {self.store_root}",
                                            f"regenerate if the change is intended: {self.regen_command}"]))

    # -- a Qwen3-MoE forward, stage by stage
    def check_forward(self, model: str | os.PathLike[str], suite: Sequence[Sequence[int] | str],
                      candidate: Callable[[list[int], ArrayRecorder], object] | str | os.PathLike[str] | Case, *,
                      dtype: str = "float32", tol: Mapping[str, float] | Sequence[str] | None = None,
                      allow_missing: bool = False) -> Report:
        """Judge a forward against this test's golden suite, made from ``model`` (a GGUF file or an HF
        checkpoint directory) by moesnap's reference on ``--moesnap-regen`` over the inputs ``suite``
        (token-id lists and prompt strings, one case each), as ``moesnap compare`` judges: free-running
        and, the model file at hand, every layer by local re-reference.  Returns the report; a report
        that does not pass raises :class:`AssertionError` with its summary and table.

        ``candidate``: ``candidate(tokens, recorder)``, the forward under test, called once per case
        with the token ids (a list of ints) and a fresh :class:`moesnap.Recorder` into which it saves
        its stages (``rec.save("moe_out", layer, tensor)``; ``tokens`` is saved for it when it does
        not); or a case group (or a directory of case groups named like the golden's) it wrote.
        ``dtype``: the candidate's; ``tol``: overrides as ``moesnap check --tol`` takes them
        (``{"moe_out.atol": 1e-3}`` or ``["bfloat16:logits.rtol=0.02"]``) over ``[tool.moesnap]``;
        ``allow_missing``: judge only the stages the candidate saved.
        """
        __tracebackhide__ = True
        from .case import Case
        from .errors import UsageError
        from .judge.report import text
        from .run.compare import compare
        from .run.goldens import generate_suite

        self._use("forward")
        if self._regenerated is not None:
            raise UsageError("moesnap_snapshot.check_forward: one call per test (one golden suite per test)")
        inputs = _inputs(suite)
        model_path = os.fspath(model)
        asked = self._settings.settings(dtype, tol)
        with _golden_errors(self.regen_command):
            if self.regen:
                ref = generate_suite(model_path, self.suite, inputs, store=self.store_root)
                self._regenerated = (f"moesnap_snapshot: wrote golden {ref} from {model_path} ({len(inputs)} "
                                     f"{'case' if len(inputs) == 1 else 'cases'}) in {self.store_root}; the test fails so that the change is seen: "
                                     f"run it again without --moesnap-regen")
            else:
                self._regenerated = ""
                version = self._golden(None, model=model_path)
                _same_inputs(version, inputs, self.regen_command)
                ref = version.ref
        if callable(candidate) and not isinstance(candidate, (str, os.PathLike)):
            where: Any = self._run_candidate(ref, candidate)
        else:
            where = candidate if isinstance(candidate, Case) else os.fspath(candidate)
        producer = (getattr(candidate, "__qualname__", None) or type(candidate).__name__) if callable(candidate) else None
        with _golden_errors(self.regen_command):
            report = compare(ref, where, store=self.store_root, settings=asked, model=model_path,
                             allow_missing=allow_missing, show_progress=False, candidate_name=producer)
        if not report.passed:
            lines = [f"moesnap_snapshot: the forward does not pass against {ref}", report.summary(), "",
                     *text(report)]
            if self.regen:
                lines.insert(0, self._regenerated)
            else:
                lines.append(f"regenerate (if the model or the inputs changed): {self.regen_command}")
            raise AssertionError("\n".join(lines))
        return report

    # -- inside
    def _use(self, kind: str) -> None:
        from .errors import UsageError

        if self._kind not in (None, kind):
            raise UsageError("moesnap_snapshot: a test uses check or check_forward, not both "
                             "(one golden suite per test, of one layout)")
        self._kind = kind

    def _store(self) -> GoldenStore:
        from .store import open_store

        return open_store(self.store_root)

    def _newest(self, st: GoldenStore) -> GoldenVersion | None:
        """The newest version of this test's suite; None where there is none (or no store yet)."""
        if "://" not in self.store_root and not Path(self.store_root).is_dir():
            return None
        return st.open_version(self.suite) if st.versions(self.suite) else None

    def _golden(self, name: str | None, *, model: str | None = None) -> GoldenVersion:
        """The newest version of this test's suite (holding case ``name``), or a failure saying how to make it."""
        __tracebackhide__ = True
        made = f" from {model}" if model else " from this run's values"
        version = self._newest(self._store())
        if version is None:
            pytest.fail(f"moesnap_snapshot: no golden for this test yet (suite {self.suite!r} in "
                        f"{self.store_root}).\nCreate it{made}: {self.regen_command}", pytrace=False)
        if name is not None and name not in version.case_names():
            pytest.fail(f"moesnap_snapshot: golden {version.ref} has no {name!r} (it holds: "
                        f"{', '.join(version.case_names())}).\nCreate it{made}: {self.regen_command}", pytrace=False)
        return version

    def _tolerance(self, name: str, dtype: str, overrides: Mapping[str, float]) -> Tolerance:
        """The tolerance of array ``name`` at ``dtype``: a stage's own (``logits``, ``layers/moe_out``), else
        the dtype's ``default``, from the session's policy; ``overrides`` replace keys for this check."""
        from .errors import UsageError
        from .judge.tolerances import DEFAULT
        from .stages import canonical

        bad = sorted(set(overrides) - set(TOLERANCE_KEYS))
        if bad:
            raise UsageError(f"moesnap_snapshot: unknown tolerance {bad[0]!r}; expected one of {', '.join(TOLERANCE_KEYS)}")
        from .judge.policy import DTYPES

        if dtype not in DTYPES:
            raise UsageError(f"moesnap_snapshot: dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        policy = self._policy(dtype)
        stage = canonical(name.rsplit("/", 1)[-1])
        tols = policy.tolerances
        tol = tols.for_stage(stage, dtype) if stage is not None else tols.stages[dtype][DEFAULT]
        return replace(tol, **overrides) if overrides else tol

    def _policy(self, dtype: str):
        if dtype not in self._policies:
            self._policies[dtype] = self._settings.settings(dtype).resolve()
        return self._policies[dtype]

    def _run_candidate(self, ref: str, candidate: Callable[[list[int], ArrayRecorder], object]) -> dict[str, Case]:
        """Run ``candidate`` on every golden case's tokens, each into a fresh recorder: the cases it made,
        by golden case name (judged together by ``moesnap.compare``)."""
        import torch

        from .model.recorder import ArrayRecorder

        with _golden_errors(self.regen_command):
            version = self._store().resolve(ref)
        producer = getattr(candidate, "__qualname__", None) or type(candidate).__name__
        cases = {}
        for name in version.case_names():
            ids = [int(t) for t in version.case_info(name).get("token_ids") or []]
            rec = ArrayRecorder()
            candidate(list(ids), rec)
            if "tokens" not in rec.model:
                rec.save("tokens", None, torch.tensor(ids, dtype=torch.int32))
            cases[name] = rec.case({"producer": producer})
        return cases

    def _finish(self) -> None:
        """After the test body (``--moesnap-regen``): publish the recorded arrays as one version, then fail."""
        __tracebackhide__ = True
        if self._regenerated:
            pytest.fail(self._regenerated, pytrace=False)
        if not self._pending:
            return
        st = self._store()
        previous = self._newest(st)
        from ._version import __version__
        from .store.base import utc_now

        with st.begin(self.suite) as w:
            for name, (values, dtype) in self._pending.items():
                w.add_arrays(name, values, {"dtype": dtype, "test": self.nodeid})
            v = w.commit({"suite": self.suite, "kind": "moesnap_snapshot", "test": self.nodeid,
                          "created": utc_now(), "versions": {"moesnap": __version__},
                          "command": self.regen_command})
        counts = ", ".join(f"{n}: {len(vals)} arrays" for n, (vals, _) in self._pending.items())
        lines = [f"moesnap_snapshot: wrote golden {v.ref} ({counts}) in {self.store_root}; the test fails so "
                 f"that the change is seen: run it again without --moesnap-regen"]
        if previous is not None:
            lines += self._changes(previous)
        self._pending = {}
        pytest.fail("\n".join(lines), pytrace=False)

    def _changes(self, previous: GoldenVersion) -> list[str]:
        """What changed since ``previous``, judged at the tolerances (one line per case)."""
        from .errors import MoesnapError
        from .store.arrays import strip_prefix

        out = []
        for name, (values, dtype) in self._pending.items():
            if name not in previous.case_names():
                out.append(f"  {name}: new (not in {previous.ref})")
                continue
            try:
                old = strip_prefix(previous.read_arrays(name))
            except MoesnapError as e:
                out.append(f"  {name}: {previous.ref} unreadable ({e})")
                continue
            rows = _judge(old, values, {}, lambda n: self._tolerance(n, dtype, {}))
            changed = [f"{r.name} {r.result.verdict.name}" for r in rows if not r.result.passed]
            out.append(f"  {name}: " + (f"differs from {previous.ref}: {', '.join(changed)}" if changed
                                        else f"within tolerance of {previous.ref}"))
        return out


# ---------------------------------------------------------------- arrays in, rows out


def _as_arrays(arrays: object) -> dict[str, np.ndarray]:
    """``arrays`` (a mapping, a Case, a Recorder, a case-group path) as numpy arrays by name."""
    from .case import Case
    from .errors import UsageError
    from .store.arrays import validate_array_name

    if isinstance(arrays, Case):
        items: Mapping[str, Any] = arrays.arrays()
    elif isinstance(arrays, (str, os.PathLike)):
        from .store.case import open_case_group, read_arrays

        items = read_arrays(open_case_group(os.fspath(arrays)), where=os.fspath(arrays))[1]
    elif hasattr(arrays, "stacked") and isinstance(getattr(arrays, "model", None), dict):
        rec: Any = arrays
        items = {**rec.model, **{f"layers/{s}": a for s, a in rec.stacked().items()}}
    elif isinstance(arrays, Mapping):
        items = arrays
    else:
        raise UsageError(f"moesnap_snapshot.check: arrays is a {type(arrays).__name__}; expected a mapping of "
                         f"names to arrays, a moesnap.Case, a moesnap.Recorder or a case-group path")
    if not items:
        raise UsageError("moesnap_snapshot.check: no arrays given")
    return {validate_array_name(n): _numpy(n, a) for n, a in items.items()}


def _numpy(name: str, value: object) -> np.ndarray:
    import numpy as np

    from .errors import UsageError

    if hasattr(value, "detach") and hasattr(value, "cpu"):        # a torch tensor, without importing torch
        t: Any = value
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()                                         # numpy has no bfloat16; exact in float32
        value = t.numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "biuf":
        raise UsageError(f"moesnap_snapshot: array {name!r} has dtype {a.dtype}; only real floating, integer "
                         f"or bool arrays can be judged")
    return a


def _frozen(a: np.ndarray) -> np.ndarray:
    import numpy as np

    c = np.array(a, copy=True, order="C")
    c.setflags(write=False)
    return c


def _inputs(suite: object) -> list[list[int] | str]:
    from .errors import UsageError

    if isinstance(suite, (str, bytes)) or not isinstance(suite, Sequence) or not suite:
        raise UsageError(f"moesnap_snapshot.check_forward: suite={suite!r}; expected a non-empty list of "
                         f"token-id lists and prompt strings, one golden case each")
    out: list[list[int] | str] = []
    for item in suite:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Sequence) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            out.append([int(t) for t in item])
        else:
            raise UsageError(f"moesnap_snapshot.check_forward: input {item!r}: expected a non-empty list of "
                             f"token ids or a prompt string")
    return out


def _same_inputs(version: GoldenVersion, inputs: list[list[int] | str], regen: str) -> None:
    """Fail when the golden was made for other inputs than the test's (a stale golden)."""
    __tracebackhide__ = True
    cases = [version.case_info(n) for n in version.case_names()]
    have = [c.get("prompt") if c.get("prompt") is not None else c.get("token_ids") for c in cases]
    if have != inputs:
        pytest.fail(f"moesnap_snapshot: golden {version.ref} was made for other inputs ({have!r}) than this "
                    f"test's ({inputs!r}).\nRegenerate it: {regen}", pytrace=False)


@dataclass(frozen=True)
class _Row:
    name: str
    golden: np.ndarray | None
    candidate: np.ndarray | None
    tol: Tolerance
    result: Result


def _judge(golden: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], tols: Mapping[str, Tolerance],
           tol_of: Callable[[str], Tolerance]) -> list[_Row]:
    """Every array of either side (the candidate's order, then what only the golden holds), judged by
    the classifier (no token axis)."""
    from .judge.classify import classify

    rows = []
    for name in [*candidate, *(n for n in golden if n not in candidate)]:
        g, c = golden.get(name), candidate.get(name)
        tol = tols[name] if name in tols else tol_of(name)
        rows.append(_Row(name, g, c, tol, classify(g, c, tol, token_axis=None)))
    return rows


def _table(rows: list[_Row]) -> list[str]:
    w = max(len(r.name) for r in rows)
    shapes = [_shape(r) for r in rows]
    s = max(len(x) for x in shapes)
    lines = [_ROW.format(name="array", w=w, verdict="verdict", shape="shape", s=s, what="what was judged")]
    for r, shape in zip(rows, shapes):
        lines.append(_ROW.format(name=r.name, w=w, verdict=r.result.verdict.name, shape=shape, s=s, what=_what(r)))
    return lines


def _shape(r: _Row) -> str:
    a = r.candidate if r.candidate is not None else r.golden
    return str(list(a.shape)) if a is not None else "-"


def _what(r: _Row) -> str:
    """The metric that decided the verdict, and where it first went wrong."""
    from .judge.classify import Verdict, fmt

    res, m, tol = r.result, r.result.metrics, r.tol
    if res.verdict == Verdict.MISSING:
        return "not in the golden (a new array)" if r.golden is None else "missing from the candidate"
    if res.verdict == Verdict.SHAPE_MISMATCH:
        assert r.golden is not None and r.candidate is not None
        return f"golden shape {list(r.golden.shape)}, candidate {list(r.candidate.shape)}"
    assert m is not None and r.golden is not None and r.candidate is not None
    exact = r.golden.dtype.kind in "biu" and r.candidate.dtype.kind in "biu"
    parts = []
    if res.verdict in (Verdict.NAN_CANDIDATE, Verdict.NAN_GOLDEN, Verdict.NAN_BOTH):
        for side, nan, inf in (("candidate", m.nan_candidate, m.inf_candidate), ("golden", m.nan_golden, m.inf_golden)):
            if nan or inf:
                parts.append(f"{nan} NaN, {inf} Inf in the {side}")
    elif m.n_outside or res.verdict == Verdict.DIVERGE:
        rule = "differ" if exact else f"outside atol={fmt(tol.atol)}, rtol={fmt(tol.rtol)}"
        allowed = f" (allowed {100 * tol.max_frac_outside:.3g}%)" if tol.max_frac_outside else ""
        parts.append(f"{m.n_outside} of {m.n} elements ({100 * m.frac_outside:.3g}%) {rule}{allowed}; "
                     f"max_abs={fmt(m.max_abs)}, max_rel={fmt(m.max_rel)}")
        if m.n_bad_rows:
            parts.append(f"{m.n_bad_rows} rows above row_rel_l2={fmt(tol.row_rel_l2)} "
                         f"(worst {fmt(m.max_row_rel_l2)})")
    else:
        parts.append("equal" if m.max_abs == 0 else f"max_abs={fmt(m.max_abs)}, max_rel={fmt(m.max_rel)}")
    idx = m.worst_index   # the classifier's: the first non-finite element, else the largest |c - g|
    if not res.passed and idx is not None and len(idx) == r.golden.ndim:
        parts.append(f"worst index {idx}: golden {fmt(float(r.golden[idx]))}, "
                     f"candidate {fmt(float(r.candidate[idx]))}")
    if r.golden.dtype != r.candidate.dtype:
        parts.append(f"dtype: golden {r.golden.dtype}, candidate {r.candidate.dtype}")
    return "; ".join(parts)
