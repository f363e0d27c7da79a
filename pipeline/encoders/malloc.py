"""glibc malloc settings for the processes that run an encoder.

CNN activations at batch 64 are tens to hundreds of MB each. glibc serves blocks that big with mmap
and returns them with munmap when they are freed, so every forward pass page-faults and zeroes all of
its activations again: on a 2-core VM half of the encoder actor's CPU time went to the kernel, and
efficientnet_lite0 ran at about half speed. Raising the mmap and trim thresholds keeps freed blocks in
the heap for the next batch, which is what jemalloc or tcmalloc (PyTorch's CPU tuning guide suggests
either) would do. One arena, because a thread other than the main one gets its own arena, whose heaps
are capped at 64 MB, so bigger blocks go to mmap whatever the threshold; Ray runs actor methods on such
a thread. The price: the process keeps its peak memory until it exits, which suits an actor that
encodes batch after batch of one shape.

glibc reads these variables when a process starts, so they go into the encoder actors' runtime_env
(`run.keep_freed_memory`); other C libraries ignore them.
"""
from __future__ import annotations

DEFAULT_THRESHOLD = 1 << 30


def malloc_env(threshold: int = DEFAULT_THRESHOLD) -> dict[str, str]:
    """Environment variables for a process about to start: blocks below `threshold` bytes stay in the heap."""
    return {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(threshold),
            "MALLOC_TRIM_THRESHOLD_": str(threshold)}
