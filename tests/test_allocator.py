"""The effect-scoring commands keep freed large blocks for reuse: a vocabulary-sized tile allocated again costs no page faults."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from attention_lens.allocator import reuse_large_blocks
if sys.argv[1] == "reuse":
    assert reuse_large_blocks()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tile = torch.empty(48 << 18)  # 48 MB of fp32: above glibc's largest mmap threshold (32 MB)
    tile.fill_(1.0)  # touch every page
    del tile
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))  # after the heap has grown to hold it
"""


def _fewest_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    pages = (48 << 20) // 4096
    assert _fewest_faults("default") > pages // 2  # every tile faulted in again: what reuse removes
    assert _fewest_faults("reuse") < pages // 10
