"""Skip markers, defined once: ``@pytest.mark.cuda`` needs a CUDA GPU, ``@pytest.mark.sm80`` / ``sm90`` that
compute capability or newer. Tests carrying them are skipped, with the reason, where the hardware is absent."""

from __future__ import annotations

import pytest
import torch

_CC_MARKS = {"sm80": (8, 0), "sm90": (9, 0)}


def pytest_configure(config: pytest.Config) -> None:
    for name, cc in _CC_MARKS.items():
        config.addinivalue_line("markers", f"{name}: needs a CUDA GPU of compute capability >= {cc}")


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
