"""Back registered pool buffers with transparent huge pages: what makes DRAM pulls fast.

On a CPU-only host UCX moves DRAM between processes with cross-memory attach (process_vm_readv),
which pins and copies the source 4 KiB page by page; on 2 MiB pages the same READ ran about 4x
faster here (3.9 -> 15 GB/s for 256 MiB, docs/transfer.md). The pools are already allocated and
touched when an agent registers them, so this asks the kernel to collapse their 2 MiB-aligned
interior now (MADV_HUGEPAGE, then MADV_COLLAPSE, Linux >= 6.1). A kernel that refuses leaves the
buffer on small pages: the transfer stays correct, only slower, and the report says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import time
from dataclasses import dataclass

import torch

_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
HUGE = 2 << 20
_CHUNK = 32 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HugepageReport:
    """`collapsed` bytes of `nbytes` now sit on huge pages; `error` names why the rest does not."""

    nbytes: int
    collapsed: int
    seconds: float
    error: str

    @property
    def ok(self) -> bool:
        return not self.error


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    if name is None:
        raise OSError("hugepages: no C library found to call madvise")
    return ctypes.CDLL(name, use_errno=True)


def advise_hugepages(buffer: torch.Tensor) -> HugepageReport:
    """Ask for huge pages under the 2 MiB-aligned interior of a contiguous CPU buffer."""
    if buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError(
            f"advise_hugepages: need a contiguous CPU tensor, got {buffer.device} "
            f"(contiguous={buffer.is_contiguous()})"
        )
    nbytes = buffer.numel() * buffer.element_size()
    start = -(-buffer.data_ptr() // HUGE) * HUGE
    end = (buffer.data_ptr() + nbytes) // HUGE * HUGE
    if end <= start:
        return HugepageReport(nbytes, 0, 0.0, "buffer holds no aligned 2 MiB page")
    libc = _libc()
    t = time.perf_counter()
    if not _madvise(libc, start, end - start, _MADV_HUGEPAGE):
        return _refused(nbytes, 0, t, "MADV_HUGEPAGE")
    # Collapse chunk by chunk (retrying once): under memory pressure the kernel refuses some 2 MiB
    # pages (EAGAIN) but not all, and every collapsed chunk still pays off.
    collapsed, failed = 0, ""
    for lo in range(start, end, _CHUNK):
        n = min(_CHUNK, end - lo)
        if _madvise(libc, lo, n, _MADV_COLLAPSE) or _madvise(libc, lo, n, _MADV_COLLAPSE):
            collapsed += n
        else:
            failed = _errno_text()
    if failed:
        return _refused(nbytes, collapsed, t, "MADV_COLLAPSE", failed)
    return HugepageReport(nbytes, collapsed, time.perf_counter() - t, "")


def _madvise(libc: ctypes.CDLL, addr: int, length: int, advice: int) -> bool:
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)) == 0


def _errno_text() -> str:
    err = ctypes.get_errno()
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"


def _refused(nbytes: int, collapsed: int, t: float, what: str, why: str = "") -> HugepageReport:
    reason = f"{what} refused for part of the buffer: {why or _errno_text()}"
    log.warning("pool buffer of %d bytes: %d on huge pages; %s", nbytes, collapsed, reason)
    return HugepageReport(nbytes, collapsed, time.perf_counter() - t, reason)
