"""allocator.keep_freed_memory: large buffers freed and allocated again stop page-faulting."""

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from v1t_jax import allocator
    assert allocator.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.ones(16 * 2**20, np.float32)    # 64 MiB: above glibc's largest mmap threshold
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  default, kept = faults("default"), faults("keep")
  # 20 x 64 MiB = 327,680 fresh 4 KiB pages with glibc's defaults; about one pass with the
  # settings (the first allocation), whatever the page size.
  assert default > 5 * kept, (default, kept)
