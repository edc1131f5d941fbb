"""tg.retain_freed_memory: freed tensors' memory stays in the process, so repeated forwards stop
page-faulting (NOTE: [Page faults from freed memory] in torchgraph/cpu_memory.py)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import torchgraph as tg

on_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                              reason="glibc's malloc only (elsewhere retain_freed_memory returns False)")

# A fresh interpreter, so that the process-wide setting does not leak into other tests: a forward-like
# loop that holds 44 MiB of activations of 4-12 MiB at once and frees them, minor page faults per loop
# counted after two warm-up loops, before and after tg.retain_freed_memory(). The interpreter starts
# with glibc's mmap threshold fixed at its initial 128 KiB (MALLOC_MMAP_THRESHOLD_), so that "before"
# does not depend on glibc's adaptation to what the interpreter freed earlier (which gave anything
# from 512 to 12,257 faults a loop in different interpreters).
_FAULTS = textwrap.dedent("""
    import json, resource, sys, torch
    import torchgraph as tg

    def forward():
        a = torch.ones(2 << 20)           # 8 MiB
        b = torch.ones(1 << 20) + a[:1 << 20]
        c = torch.ones(3 << 20)           # 12 MiB
        d = c * 2                         # 12 MiB
        e = a + 1                         # 8 MiB
        return float(b[0] + c[0] + d[0] + e[0])

    def faults_per_call():
        for _ in range(2):
            forward()
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            forward()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10

    before = faults_per_call()
    applied = tg.retain_freed_memory()
    after = faults_per_call()
    print(json.dumps({"before": before, "applied": applied, "after": after}))
""")


@on_glibc
def test_retained_memory_is_reused_without_page_faults():
    """Before: every block comes back as fresh pages on every call (~11,000 faults a loop); after:
    almost none (glibc and the kernel's huge pages decide the rest)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120,
                            check=True, env=env)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["applied"] is True
    assert measured["before"] > 5000, measured  # 44 MiB = 11264 pages
    assert measured["after"] <= measured["before"] / 8, measured


_LARGE_BLOCKS = textwrap.dedent("""
    import json, resource, sys, torch
    import torchgraph as tg

    logits = torch.randn(1024, 8192).bfloat16()  # a language model's logits; the float32 copy is 33.5 MB

    def faults_per_call():  # the median over 11 calls: a stray kernel event on a loaded machine moves a mean
        for _ in range(3):
            logits.float()
        counts = []
        for _ in range(11):
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            logits.float()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
        return sorted(counts)[5]

    tg.retain_freed_memory()
    default = faults_per_call()
    applied = tg.retain_freed_memory(large_blocks=True)
    large = faults_per_call()
    print(json.dumps({"default": default, "applied": applied, "large": large}))
""")


@on_glibc
def test_large_blocks_above_glibcs_cap_are_kept_when_asked():
    """A block above 32 MiB page-faults on every call with the default thresholds (glibc maps it afresh);
    with large_blocks=True it comes from the heap and is reused (NOTE: [Blocks above glibc's cap])."""
    result = subprocess.run([sys.executable, "-c", _LARGE_BLOCKS], capture_output=True, text=True, timeout=120,
                            check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["applied"] is True
    assert measured["default"] > 4000, measured  # 33.5 MB = 8192 pages
    assert measured["large"] <= measured["default"] / 8, measured


@pytest.mark.parametrize("kwargs, match", [
    ({"mmap_threshold": 0}, "mmap_threshold must be a positive int"),
    ({"trim_threshold": -1}, "trim_threshold must be a positive int"),
    ({"mmap_threshold": 1.5}, "mmap_threshold must be a positive int"),
    ({"mmap_threshold": 64 << 20}, "mmap_threshold must be at most 33554432 bytes"),
    ({"trim_threshold": 4 << 30}, "trim_threshold must be below 2 GiB"),
])
def test_bad_thresholds_raise_before_changing_anything(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tg.retain_freed_memory(**kwargs)
