"""Large CPU tensors on transparent huge pages.

Decoding streams every weight from memory once per token. On 4 KiB pages that stream takes a TLB
miss every 4 KiB (under a hypervisor, a two-level page walk); on 2 MiB pages, one every 2 MiB. On
the development machine (a VM) the same weights decode about 5% faster from huge pages, and a
plain sum over 1 GiB reads about 10% faster.

Linux asks for them with madvise(MADV_HUGEPAGE) on a 2 MiB-aligned range, which is what `empty`
does; with transparent huge pages off (`never`), off Linux, or with GLM4_HUGE_PAGES=0, the tensors
here are plain `torch.empty` ones. Only whole 2 MiB pages are advised, so a tensor never holds
more physical memory than its size.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def _madvise():
    """libc's madvise, or None where huge pages cannot be asked for."""
    if not sys.platform.startswith("linux") or os.environ.get("GLM4_HUGE_PAGES", "1") == "0":
        return None
    try:
        if "[never]" in THP_SETTING.read_text():
            return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def available() -> bool:
    return _madvise() is not None


def empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole 2 MiB pages are advised as huge pages.

    It is a view into a buffer one huge page longer, starting at the first 2 MiB boundary; the
    bytes before it are never touched, so they take address space but no memory.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    skip = -buffer.data_ptr() % HUGE_PAGE
    # Advice is a hint: where the kernel refuses it, the memory is still ordinary memory.
    madvise(buffer.data_ptr() + skip, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return buffer[skip : skip + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros, on huge pages when on the CPU (KV caches: read in full at every decode step)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return empty(shape, dtype).zero_()


def adopt(t: torch.Tensor) -> torch.Tensor:
    """`t` moved to huge pages when it is a large contiguous CPU tensor; otherwise `t` itself."""
    if not (available() and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()):
        return t
    if t.nbytes < HUGE_PAGE or t.data_ptr() % HUGE_PAGE == 0:
        return t
    return empty(t.shape, t.dtype).copy_(t)
