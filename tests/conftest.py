"""Skip markers, defined once: ``@pytest.mark.cuda`` needs a CUDA GPU, ``@pytest.mark.sm80`` / ``sm90`` that
compute capability or newer. Tests carrying them are skipped, with the reason, where the hardware is absent.

On the GPU, a backend that refuses a test's call is a skip only where that is legitimate:
:func:`skip_unless_optional_missing` (imported by the GPU test modules: ``from conftest import ...``) fails the
test when a backend that :func:`required_backends` says this machine must run refused it for any other reason.

Tuned tables: no test reads one of the machine it runs on (:func:`_no_tuned_tables`).

Also the property-test budget: the hypothesis profile named by ``SDPA_FLASH_HYPOTHESIS_PROFILE`` (see
``sdpa_flash.testing.PropertyProfile``) is loaded before any test module is imported, and the ``property_log``
fixture counts the cases the property tests generate. The count ends the run as ``hypothesis: N generated
cases``, with the largest share of its bound any accuracy comparison used, per backend and dtype; with
``SDPA_FLASH_PROPERTY_REPORT=/path.json`` the same goes to that file.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import pytest
import torch

_CC_MARKS = {"sm80": (8, 0), "sm90": (9, 0)}
_REPORT_ENV = "SDPA_FLASH_PROPERTY_REPORT"


def pytest_configure(config: pytest.Config) -> None:
    for name, cc in _CC_MARKS.items():
        config.addinivalue_line("markers", f"{name}: needs a CUDA GPU of compute capability >= {cc}")
    try:
        import hypothesis  # noqa: F401  (the property tests skip themselves without it)
    except ImportError:
        return
    from sdpa_flash.errors import AttentionInputError
    from sdpa_flash.testing import register_hypothesis_profiles

    try:
        register_hypothesis_profiles()  # before test modules are imported: their @settings build on it
    except AttentionInputError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have_cuda = torch.cuda.is_available()
    cc = torch.cuda.get_device_capability() if have_cuda else None
    for item in items:
        if not have_cuda and any(item.get_closest_marker(m) for m in ("cuda", *_CC_MARKS)):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible"))
            continue
        for name, need in _CC_MARKS.items():
            if item.get_closest_marker(name) and cc is not None and cc < need:
                item.add_marker(pytest.mark.skip(reason=f"needs compute capability >= {need}, this GPU has {cc}"))


# --------------------------------------------------------------------------------------------- tuned tables
@pytest.fixture(scope="session", autouse=True)
def _no_tuned_tables(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Plans in tests never read a tuned table of the machine running them: the tune directory is an empty
    temporary one (subprocesses inherit it), ``SDPA_FLASH_TABLE`` is unset, and the shipped tables' directory is an
    empty one (tests/test_tune.py points these where it writes its own tables)."""
    from sdpa_flash.tuning import _table

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_table.ENV_DIR, str(tmp_path_factory.mktemp("tuned")))
        mp.delenv(_table.ENV_TABLE, raising=False)
        mp.setattr(_table, "SHIPPED_DIR", tmp_path_factory.mktemp("shipped_tables"))
        yield


# ----------------------------------------------------------------------- backends this machine must run
def required_backends() -> frozenset[str]:
    """The backends the current CUDA device must run a plain call on (bf16 from sm80, else fp16; head dim <= 128;
    no mask, no dropout), from torch's own facts, never from sdpa_flash's probe or planner (they are what the GPU
    tests check). Empty without CUDA.

    * ``math``, ``chunked``: plain PyTorch ops; ``efficient``: every GPU a CUDA build of torch supports (sm50+).
    * ``flash``: compute capability 8.0 or newer, where the build has it
      (``torch.backends.cuda.is_flash_attention_available()``; stock builds do).
    * ``cudnn``: compute capability 8.0 or newer with cuDNN 9 or newer, not on ROCm (cuDNN's integer versions order
      as the versions do across its two encodings: 8907 < 90000).
    * ``fa4``: sm90 to sm103 where the optional ``flash-attn-4`` package is installed.
    """
    if not torch.cuda.is_available():
        return frozenset()
    if getattr(torch.version, "hip", None):
        return frozenset(("math", "chunked"))  # ROCm's flash/efficient (AOTriton) depend on the GPU: not required
    cc = torch.cuda.get_device_capability()
    need = {"math", "chunked", "efficient"}
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    if cc >= (8, 0) and flash_built:
        need.add("flash")
    if cc >= (8, 0) and torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000:
        need.add("cudnn")
    try:
        importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        if (9, 0) <= cc <= (10, 3):
            need.add("fa4")
    return frozenset(need)


# Denylist entries (their ``source``) known to apply on a GPU, by compute capability: a refusal citing one is that
# machine's known kernel bug, not a regression. The H200 (sm90) has none for the GPU tests' calls.
MACHINE_VETOES: dict[tuple[int, int], tuple[str, ...]] = {
    (10, 0): ("pytorch/pytorch#193893",),  # B200: cuDNN with GQA/MQA of fewer than 8 key/value heads
}


def skip_unless_optional_missing(backend: str, exc: BaseException, *, limitation: str | None = None) -> NoReturn:
    """Skip the test for a refusal of ``backend`` that is legitimate here; otherwise fail it with the reasons.

    Legitimate: ``backend`` is not one this machine must run (an optional kernel not installed, or hardware or a
    build without it: see :func:`required_backends`); or every reason it gave matches ``limitation``, a regular
    expression for what the test's call asks that the backend does not do (``"attn_mask is not supported"`` for
    flash), or cites a denylist entry of :data:`MACHINE_VETOES` for this GPU. Anything else — a built-in backend
    this machine must run refusing the call for a wrong requirement, version check or denylist entry — would have
    turned a regression into a skip, and fails instead.
    """
    reasons: tuple[str, ...] = tuple(getattr(exc, "reasons", {}).get(backend, ()))
    if backend not in required_backends():
        pytest.skip(f"{backend} is not required on this machine (optional, or the hardware or build lacks it): "
                    f"{'; '.join(reasons) or exc}")
    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    known = MACHINE_VETOES.get(cc, ()) if cc is not None else ()

    def legitimate(reason: str) -> bool:
        return bool(limitation and re.search(limitation, reason)) or any(f"{src}]" in reason for src in known)

    if reasons and all(legitimate(r) for r in reasons):
        pytest.skip(f"{backend} does not take this call: {'; '.join(reasons)}")
    raise AssertionError(f"{backend} must run here (it is required on this machine: "
                         f"{', '.join(sorted(required_backends()))}) but was refused:\n{exc}") from exc


# ------------------------------------------------------------------------------------------ property log
class PropertyLog:
    """What the property tests ran: cases per test, and per backend, dtype and kind (forward / backward) of
    the accuracy tests the number of cases and the largest ``Comparison.usage`` (error / bound) per tensor."""

    def __init__(self) -> None:
        self.cases: collections.Counter[str] = collections.Counter()
        self.accuracy: dict[tuple[str, str, str], dict[str, Any]] = {}

    def case(self, test: str, backend: str, dtype: torch.dtype | None = None, comparisons: Sequence[Any] = (),
             kind: str | None = None) -> None:
        """Count one generated case of ``test``; with ``kind``, fold its comparisons into the accuracy table."""
        self.cases[test] += 1
        if kind is None or dtype is None:
            return
        from sdpa_flash.spec import dtype_name

        entry = self.accuracy.setdefault((backend, dtype_name(dtype), kind), {"cases": 0, "max_usage": {}})
        entry["cases"] += 1
        for c in comparisons:
            entry["max_usage"][c.name] = max(entry["max_usage"].get(c.name, 0.0), float(c.usage))

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def as_dict(self) -> dict[str, Any]:
        from sdpa_flash.testing import property_profile

        profile = property_profile()
        device: dict[str, Any] = {"type": profile.device, "torch": torch.__version__}
        if profile.device == "cuda" and torch.cuda.is_available():
            device.update(name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                          cudnn=torch.backends.cudnn.version())
        accuracy: dict[str, Any] = {}
        for (backend, dtype, kind), entry in sorted(self.accuracy.items()):
            accuracy.setdefault(backend, {}).setdefault(dtype, {})[kind] = entry
        return {"profile": profile.name, "device": device, "generated_cases": self.total,
                "cases_per_test": dict(sorted(self.cases.items())), "accuracy": accuracy}


_LOG = PropertyLog()


@pytest.fixture(scope="session")
def property_log() -> PropertyLog:
    """The session's :class:`PropertyLog` (session-scoped, so hypothesis may use it in every example)."""
    return _LOG


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    path = os.environ.get(_REPORT_ENV)
    if not _LOG.total and not path:
        return
    report = _LOG.as_dict()
    write = terminalreporter.write_line
    write(f"hypothesis: {report['generated_cases']} generated cases (profile {report['profile']}, "
          f"{report['device']['type']})")
    for (backend, dtype, kind), entry in sorted(_LOG.accuracy.items()):
        usage = ", ".join(f"{name} {u:.2f}" for name, u in entry["max_usage"].items())
        write(f"  {backend:>9} {dtype:<8} {kind:<8} {entry['cases']:>5} cases; largest error/bound: {usage}")
    if path:  # written also when nothing ran (all skipped), so a missing count is visible as 0
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        write(f"hypothesis: report written to {path}")
