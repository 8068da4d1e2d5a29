"""train.cpu_malloc_mmap_threshold_mb (medsft/runtime/allocator.py): on CPU, freed activations go back to the system.

Each case runs in a fresh interpreter: glibc's threshold is process-wide and, once fixed, stays fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from medsft.runtime.allocator import glibc_malloc, set_cpu_malloc_policy
from train_utils import ROOT

glibc_only = pytest.mark.skipif(glibc_malloc() is None, reason="glibc's malloc only")

# What a backward does to the heap, in small: one large freed tensor raises glibc's dynamic threshold; then 200
# activation-sized tensors (5 MiB), every other one freed while its neighbours stay (a freed chunk between held
# ones can only go back to the system if it was mmapped).
PROBE = textwrap.dedent("""
    import json, sys, torch
    from medsft.runtime.allocator import set_cpu_malloc_policy
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    said = set_cpu_malloc_policy(int(sys.argv[1]), "cpu")
    x = torch.ones(6 << 18); del x
    base = rss_mb()
    big = [torch.ones(5 << 18) for _ in range(200)]
    held_mb = rss_mb() - base
    del big[1::2]
    print(json.dumps({"said": said, "held_mb": held_mb, "freed_but_resident_mb": rss_mb() - base - 100 * 5}))
""")


def _probe(threshold_mb: int, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], env=environ, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_a_fixed_threshold_returns_freed_activations_and_the_dynamic_one_keeps_them():
    kept, returned = _probe(0), _probe(4)
    assert kept["held_mb"] > 950 and returned["held_mb"] > 950  # both really held the 1,000 MiB
    assert kept["freed_but_resident_mb"] > 400, kept  # glibc's default: the freed 500 MiB stay resident
    assert returned["freed_but_resident_mb"] < 50, returned
    assert "fixed at 4 MiB" in returned["said"]


@glibc_only
def test_a_threshold_in_the_environment_wins_and_is_left_alone():
    result = _probe(4, MALLOC_MMAP_THRESHOLD_="33554432")
    assert result["said"] == "unchanged: MALLOC_MMAP_THRESHOLD_=33554432 set in the environment"
    # glibc took the environment's 32 MiB: the 5 MiB tensors came from the heap and stay there
    assert result["freed_but_resident_mb"] > 400


def test_nothing_changes_off_the_cpu_or_when_switched_off():
    assert set_cpu_malloc_policy(4, "cuda") == "unchanged: training runs on cuda"
    assert "dynamic" in set_cpu_malloc_policy(0, "cpu")
