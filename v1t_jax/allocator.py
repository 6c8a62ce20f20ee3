"""Keep freed host memory in the process instead of returning it to the OS each step.

With glibc's defaults, XLA's CPU buffers (activations, gradients) come from fresh `mmap`s that
are unmapped again when freed, so every training step page-faults its whole working set back in:
on the demo that is ~100k minor faults and ~0.3 s of system time per 0.7 s step (measured with
getrusage on our 2-core VM). One malloc arena, no mmap'd chunks and no trimming make the step
reuse its memory (~10k faults, ~0.03 s system time). The cost is that the process keeps its peak
heap, which it needs again at the next step anyway. The PyTorch figures of issue 7 show the same
effect ("allocator tuned to keep freed memory").

Call before TensorFlow or JAX start their thread pools (first thing in an entry point). A no-op
where the C library is not glibc.
"""

import ctypes
import ctypes.util

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Returns True when glibc accepted the settings."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  ok = mallopt(_M_ARENA_MAX, 1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1
  # Never trim. mallopt's int -1 is read as SIZE_MAX. A finite threshold such as 2**31 - 1 is
  # below the ~6 GiB of XLA temporaries of a default-config train step at batch 16: glibc would
  # hand the top of the heap back after every step, and the next step would page-fault it in
  # again (1.6M faults, 5.5 s of system time per step on our VM).
  ok &= mallopt(_M_TRIM_THRESHOLD, -1) == 1
  return bool(ok)
