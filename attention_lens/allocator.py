"""Large temporaries without page faults: glibc hands every block above its mmap threshold (at most 32 MB) to the
kernel as a fresh mapping and unmaps it when freed, so each vocabulary-wide tile (a 256-row fp32 tile of a
49k-token vocabulary is 50 MB) is faulted in page by page again, every time. Measured on 2 cores: an effect
eval of 1,024 SmolLM2 tokens spent 16% of its CPU time in the kernel (130 M minor page faults); with freed
blocks kept for reuse the scoring ran 26% faster (tiles of 256 rows, one SmolLM2 layer). `eval --exact` (fp32
whole rows) ran 49% faster with it (`bench/run.py --only eval --quick`: 5.2 -> 7.7 tokens/s; kernel time 2 min 22 s
-> 53 s), the default tiled `eval` 6% (its own tables and tiles already live in one workspace).

The price is a higher peak: freed blocks stay in the heap, fragmented. One step of `train` on 10 SmolLM2 layers
peaked at 1,798 MB with it and 1,663 MB without, where `plan` predicts 1,643 MB. So the scoring commands (`eval`,
`effects`, `train --objective effect`) turn it on, and a plain `train`, which `plan` sizes, does not."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt parameter numbers (glibc's malloc.h)."""
KEEP_BYTES = 1 << 30
"""Blocks below this come from the heap and are reused when freed; the heap keeps up to this much freed memory."""


def reuse_large_blocks(keep: int = KEEP_BYTES) -> bool:
    """Have glibc's malloc keep freed blocks below `keep` bytes for reuse instead of returning them to the kernel.
    Process-wide, from then on: the effect-scoring commands call it, a library import does not. Returns whether it
    took effect (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_THRESHOLD, keep) == 1 and libc.mallopt(M_TRIM_THRESHOLD, keep) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
