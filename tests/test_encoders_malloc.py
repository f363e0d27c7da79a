"""Encoder processes keep freed activation memory in the heap instead of munmapping it after each batch."""
import os
import subprocess
import sys

import pytest
import ray

from pipeline.config import ExtractConfig, load_config
from pipeline.encoders.malloc import malloc_env
from pipeline.extract.run import _encoder_runtime_env

CHILD = """
import numpy as np

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before = rss_mb()
block = np.ones(256 * 2**20, dtype=np.uint8)  # one activation-sized block, touched
del block
print(round(rss_mb() - before))
"""


def _kept_after_free(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_freed_blocks_stay_in_the_heap_only_with_the_settings():
    assert _kept_after_free(malloc_env()) > 200  # freed, still resident: the next batch reuses it
    assert _kept_after_free({}) < 50  # glibc's default: munmap on free, page faults next time


def test_encoder_actors_start_with_the_settings(ray_local):
    cfg = load_config(ExtractConfig, None, [])
    options = _encoder_runtime_env(cfg)

    @ray.remote(num_cpus=0)
    class Probe:
        def env(self):
            return {k: os.environ.get(k) for k in malloc_env()}

    assert ray.get(Probe.options(**options).remote().env.remote()) == malloc_env()
    assert _encoder_runtime_env(load_config(ExtractConfig, None, ["run.keep_freed_memory=false"])) == {}
