"""The peak GPU memory of a block of work, for the run's tables (no device work at import)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any


def cuda_devices(devices: Iterable[str]) -> list[str]:
    """The CUDA devices among ``devices`` (``auto``: ``cuda`` when one is available)."""
    import torch

    out = []
    for d in devices:
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        if str(d).startswith("cuda") and d not in out:
            out.append(str(d))
    return out


@contextlib.contextmanager
def peak_gpu_memory(devices: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Measure the block: the yielded dict gets ``peak_gpu_memory``, the most bytes torch held
    allocated (``torch.cuda.max_memory_allocated``) on any CUDA device among ``devices`` while
    the block ran, or ``"cpu"`` when none of them is a CUDA device (nothing is measured there).

    The count covers every tensor of this process on that device, models loaded before the
    block included. It is one count per device and process: with several stages at once on one
    device each start resets it for all, so measure with ``run.max_parallel: 1``.
    """
    import torch

    cuda = cuda_devices(devices)
    record: dict[str, Any] = {}
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
    yield record
    record["peak_gpu_memory"] = max(int(torch.cuda.max_memory_allocated(d)) for d in cuda) if cuda else "cpu"
