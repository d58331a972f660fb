"""CPU buffers on transparent huge pages, for caches whose rows are gathered at random.

Why: a sparse decode step reads a few thousand scattered 256-byte rows out of a cache of tens to hundreds of MB.
With 4 KB pages nearly every row is a TLB miss, and on the AMD EPYC here that, not bandwidth, bounds the gather:
``attend_chosen`` at 32K tokens took 4.69 ms on 4 KB pages and 2.98 ms on 2 MB pages
(``benchmarks/results/attn_decode/scoring_and_gather_check_{4k_pages,thp}.json``). PyTorch can put every large
tensor on huge pages (``THP_MEM_ALLOC_ENABLE=1``), but only process-wide and only if set before its first
allocation; the caches ask for them here, per buffer, with ``madvise(MADV_HUGEPAGE)`` on a 2 MB-aligned range
that nothing has touched yet, so the first write faults in 2 MB pages (kernel THP mode ``madvise`` or
``always``; with ``never`` this is plain ``torch.empty``).

The cost is resident memory rounded up to 2 MB per buffer (1 MB on average), which is why only buffers of at
least :data:`MIN_BYTES` are placed this way. Values are never affected: the memory is ordinary, only its pages
are larger.
"""

from __future__ import annotations

import functools
import math
import mmap
import warnings

import torch

HUGE_PAGE = 2 << 20  # x86-64 / arm64 (4 KB base pages) PMD size
MIN_BYTES = 8 << 20  # below this a cache's rows fit the 4 KB-page TLB reach well enough; rounding would cost more


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None where there is none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


_WARNED = False


@functools.cache  # asked on the first large allocation, not at import
def huge_pages_available() -> bool:
    """Whether :func:`empty` can place buffers on huge pages in this process."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
          enabled: bool = True) -> torch.Tensor:
    """``torch.empty(shape)`` on whole 2 MB pages advised ``MADV_HUGEPAGE``, for CPU buffers ≥ :data:`MIN_BYTES`.

    Uninitialised, contiguous, of the requested dtype and shape; it keeps a ≤ 4 MB larger allocation alive (the
    2 MB alignment slack and the last page's rounding). Falls back to ``torch.empty`` (same tensor contract, 4 KB
    pages) off the CPU, for small buffers, with ``enabled=False``, or where the kernel offers no huge pages;
    :func:`on_huge_pages` tells which a tensor got. A refused ``madvise`` warns once and keeps the buffer (its
    values are the same on either page size).
    """
    global _WARNED
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if not enabled or device.type != "cpu" or nbytes < MIN_BYTES or not huge_pages_available():
        return torch.empty(shape, dtype=dtype, device=device)
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # A mapping of its own, never touched: torch.empty would take buffers below glibc's mmap threshold (which rises
    # to 32 MB after large frees) from the heap, whose pages may already be faulted in as 4 KB pages, on which
    # the advice does nothing until khugepaged gets to them. The tensor keeps the mapping alive (buffer export).
    region = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    try:
        _advise(region, offset, span)
    except OSError as exc:  # the memory is fine either way; only the page size, i.e. speed, is at stake
        if not _WARNED:
            _WARNED = True
            warnings.warn(f"madvise(MADV_HUGEPAGE) refused a {span}-byte cache buffer ({exc}); cache buffers stay "
                          "on 4 KB pages, so sparse decode gathers run slower", stacklevel=2)
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def _advise(region: mmap.mmap, offset: int, length: int) -> None:
    region.madvise(mmap.MADV_HUGEPAGE, offset, length)


def huge_page_eligible(t: torch.Tensor) -> bool:
    """Whether the mapping holding ``t`` is advised for huge pages (``THPeligible: 1`` in ``/proc/self/smaps``).

    Unlike :func:`on_huge_pages` this does not depend on the kernel finding free 2 MB blocks at fault time.
    """
    return any(eligible for _, _, _, eligible in _mappings_of(t))


def on_huge_pages(t: torch.Tensor) -> int:
    """Bytes of ``t``'s memory on huge pages now, from Linux ``/proc/self/smaps`` (0 elsewhere).

    smaps counts huge pages per mapping, not per address, so this is, per mapping overlapping ``t``, the smaller of
    its huge-page bytes and the whole 2 MB pages of ``t`` inside it: exact for a buffer with a mapping of its own (a
    large allocation, which glibc serves with mmap), an upper bound for a tensor sharing a mapping. For tests and
    benchmark records: it says whether the advice took effect, which depends on the kernel (THP mode, free 2 MB
    blocks), not only on us.
    """
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total = 0
    for lo, hi, huge_bytes, _ in _mappings_of(t):
        overlap = min(hi, end) - max(lo, start)
        total += min(huge_bytes, (overlap // HUGE_PAGE) * HUGE_PAGE)
    return total


def _mappings_of(t: torch.Tensor) -> list[list]:
    """[lo, hi, AnonHugePages bytes, THPeligible] of each smaps mapping overlapping ``t``; [] without procfs."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    found, current = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(x, 16) for x in head.split("-"))
                    current = [a, b, 0, False] if a < end and b > start else None
                    if current is not None:
                        found.append(current)
                elif current is not None and head == "AnonHugePages:":
                    current[2] = int(line.split()[1]) * 1024
                elif current is not None and head == "THPeligible:":
                    current[3] = line.split()[1] == "1"
    except OSError:
        return []
    return found
