"""Give the freed memory of glibc's heap back to the system during CPU training.

On the CPU every tensor is a block from ``malloc``. glibc serves blocks of up to 32 MiB from its heap and
keeps the pages of freed ones: the holes that a forward's temporaries leave between the activations it
keeps for the backward stay resident until a block fits them, and many never do, so a training process
holds far more than it uses (docs/memory.md measures how much). ``malloc_trim(0)`` hands every free page
inside the heap back. Training calls it after each decoder layer's forward and after each micro-batch's
backward, which keeps the holes to about one layer's temporaries, for the price of faulting the pages in
again when they are reused (docs/benchmarks.md has the step time it costs).

Only where the C library is glibc (Linux); elsewhere, and on GPUs, whose allocator caches blocks itself,
nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Callable, Optional

from torch import nn


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Return the free pages of the heap to the system (glibc), else nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def trim_after_each_layer(model: nn.Module) -> int:
    """Trim the heap after the forward of every decoder layer (the classes transformers keeps whole when
    it splits a model over devices); how many layers."""
    if _malloc_trim() is None:
        return 0
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    for layer in layers:
        layer.register_forward_hook(_trim_hook)
    return len(layers)


def _trim_hook(module, inputs, output) -> None:
    trim_heap()
