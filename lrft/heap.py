"""Give the freed memory of glibc's heap back to the system during CPU training.

On the CPU every tensor is a block from ``malloc``. glibc serves blocks of up to 32 MiB from its heap and
keeps the pages of freed ones: the holes that a forward's temporaries leave between the activations it
keeps for the backward stay resident until a block fits them, and many never do, so a training process
holds far more than it uses (docs/memory.md measures how much). ``malloc_trim(0)`` hands every free page
inside the heap back, for the price of faulting the pages in again when they are reused. Training calls it
after each decoder layer's forward, which keeps the holes to about one layer's temporaries, and after each
micro-batch's backward; ``lrft train`` runs with glibc's heap in transparent huge pages, so the faults are
few (docs/memory.md, "The heap", has what each costs and why both are the default).

Only where the C library is glibc (Linux); elsewhere, and on GPUs, whose allocator caches blocks itself,
nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from torch import nn


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def restart_with_huge_pages() -> None:
    """Run this program again, in the same process, with glibc's malloc backing its heap by transparent huge
    pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``). A trimmed heap faults its pages in again at every
    micro-batch, and with 2 MiB pages those faults are 512 times fewer. glibc reads its tunables only when a
    process starts, hence the restart; it happens before anything is loaded. Nothing is done where the C
    library is not glibc, where the kernel has transparent huge pages off, or where ``GLIBC_TUNABLES``
    already names ``glibc.malloc.hugetlb`` (``=0`` keeps 4 KiB pages)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or _malloc_trim() is None or not sys.orig_argv:
        return
    try:
        if "[never]" in THP_MODE.read_text():
            return
    except OSError:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    try:
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # the program goes on with 4 KiB pages
        pass


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
