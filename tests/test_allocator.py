"""retain_freed_memory: on glibc, the large blocks a training step frees are reused by the next step
instead of being unmapped and faulted in again."""

import platform
import resource
import subprocess
import sys

import pytest

from saekit.train import allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

STEP = """
import resource, torch
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(n) for n in ((64 << 20) // 4, (48 << 20) // 4)]  # two gradient-sized blocks
    for t in ts:
        t.fill_(1.0)  # touch every page
    del ts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def _faults_in_last_steps(tune: bool) -> int:
    """Minor page faults of steps 4-6 of a pattern like a training step's, in a fresh process."""
    tuning = "from saekit.train.allocator import retain_freed_memory\nassert retain_freed_memory()\n"
    code = STEP + (tuning if tune else "")
    code += "[faults_of_one_step() for _ in range(3)]\nprint(sum(faults_of_one_step() for _ in range(3)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@glibc_only
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages_per_step = (112 << 20) // resource.getpagesize()
    assert _faults_in_last_steps(tune=False) > pages_per_step  # glibc's default: mapped anew every step
    assert _faults_in_last_steps(tune=True) < pages_per_step // 10


def test_applied_once_and_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("SAEKIT_MALLOC_TUNING", "0")
    assert allocator.retain_freed_memory() is False
    monkeypatch.setenv("SAEKIT_MALLOC_TUNING", "1")
    assert allocator.retain_freed_memory() is False  # decided once per process
