"""The rule that turns a GPU test's refused backend into a skip (conftest.skip_unless_optional_missing), on the CPU
with the facts torch would report on a few machines: a refusal of a backend the machine must run fails the test."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from _pytest.outcomes import Skipped
from conftest import required_backends, skip_unless_optional_missing

from sdpa_flash import BackendUnavailableError

_NO_MASK = "^attn_mask is not supported"


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Pretend torch reports a GPU of compute capability ``cc`` with cuDNN ``cudnn`` (integer form)."""

    real_version = importlib.metadata.version

    def make(cc: tuple[int, int], cudnn: int | None = 91900, flash_built: bool = True, fa4: str | None = None) -> None:
        def version(name: str) -> str:
            if name != "flash-attn-4":
                return real_version(name)
            if fa4 is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return fa4

        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: cc)
        monkeypatch.setattr(torch.version, "hip", None, raising=False)
        monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: cudnn is not None)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
        monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: flash_built, raising=False)

    return make


_STOCK = {"cudnn", "flash", "efficient", "math", "chunked"}


@pytest.mark.parametrize(
    ("cc", "cudnn", "flash_built", "fa4", "required"),
    [
        ((9, 0), 91900, True, None, _STOCK),  # the H200 without FA4
        ((9, 0), 91900, True, "4.0.0b36", _STOCK | {"fa4"}),  # and with it
        ((10, 0), 91900, True, "4.0.0b36", _STOCK | {"fa4"}),
        ((8, 0), 90100, True, "4.0.0b36", _STOCK),  # FA4 installed but no kernel for sm80
        ((8, 0), 8907, True, None, _STOCK - {"cudnn"}),  # cuDNN 8.9.7: no cuDNN attention
        ((8, 6), None, True, None, _STOCK - {"cudnn"}),
        ((9, 0), 91900, False, None, _STOCK - {"flash"}),  # a build without flash
        ((7, 5), 91900, True, None, {"efficient", "math", "chunked"}),
    ],
)
def test_required_backends_follow_torch_facts(gpu, cc, cudnn, flash_built, fa4, required) -> None:  # type: ignore[no-untyped-def]
    gpu(cc, cudnn, flash_built, fa4)
    assert required_backends() == required


def _refused(backend: str, *reasons: str) -> BackendUnavailableError:
    return BackendUnavailableError("refused", reasons={backend: reasons})


def test_a_required_backend_refusing_a_call_fails(gpu) -> None:  # type: ignore[no-untyped-def]
    gpu((9, 0))
    # the case: a denylist entry read with a wrong cuDNN version, vetoing cuDNN on the H200
    with pytest.raises(AssertionError, match="cudnn must run here"):
        skip_unless_optional_missing("cudnn", _refused("cudnn", "denylisted: ... [pytorch/pytorch#169849]"))
    with pytest.raises(AssertionError, match="flash must run here"):  # a limitation the test did not declare
        skip_unless_optional_missing("flash", _refused("flash", "head_dim=64 (supported: <= 32)"), limitation=_NO_MASK)
    with pytest.raises(AssertionError, match="flash must run here"):  # every reason must be the declared one
        skip_unless_optional_missing("flash", _refused("flash", "attn_mask is not supported", "dtype=..."),
                                     limitation=_NO_MASK)


def test_legitimate_refusals_skip(gpu) -> None:  # type: ignore[no-untyped-def]
    gpu((9, 0))
    with pytest.raises(Skipped, match="flash does not take this call: attn_mask is not supported"):
        skip_unless_optional_missing("flash", _refused("flash", "attn_mask is not supported (pass causal=...)"),
                                     limitation=_NO_MASK)
    with pytest.raises(Skipped, match="fa4 is not required on this machine"):  # not installed: optional
        skip_unless_optional_missing("fa4", _refused("fa4", "flash-attn-4 is not installed"))
    gpu((9, 0), fa4="4.0.0b36")
    with pytest.raises(AssertionError, match="fa4 must run here"):  # installed on Hopper: it must run
        skip_unless_optional_missing("fa4", _refused("fa4", "requires compute capability >= (9, 0)"))
    gpu((8, 0), cudnn=8907)
    with pytest.raises(Skipped, match=r"cudnn is not required on this machine .*: requires cuDNN"):
        skip_unless_optional_missing("cudnn", _refused("cudnn", "requires cuDNN >= 90000, this build has 8907"))


def test_a_known_veto_of_one_gpu_skips_there_only(gpu) -> None:  # type: ignore[no-untyped-def]
    veto = _refused("cudnn", "denylisted: cuDNN ... GQA [pytorch/pytorch#193893]")
    gpu((10, 0))  # B200: the entry's GPU
    with pytest.raises(Skipped, match="#193893"):
        skip_unless_optional_missing("cudnn", veto)
    gpu((9, 0))
    with pytest.raises(AssertionError, match="cudnn must run here"):
        skip_unless_optional_missing("cudnn", veto)
