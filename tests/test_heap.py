"""fastbptt.heap: the allocator a benchmark names, and whether the rule may count on freed blocks coming back."""
import platform

import pytest

from fastbptt import heap

RAISED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824", "HOME": "/x"}
JEMALLOC = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reads glibc's settings")


@glibc_only
def test_describe_names_glibc_settings_or_the_preloaded_allocator():
    assert heap.describe({}) == "glibc malloc (default settings)"
    assert heap.describe(RAISED) == "glibc malloc, MALLOC_MMAP_THRESHOLD_=1073741824, MALLOC_TRIM_THRESHOLD_=1073741824"
    assert heap.describe({**JEMALLOC, **RAISED}) == "jemalloc (LD_PRELOAD)"


@glibc_only
@pytest.mark.parametrize("environ,reuses", [
    ({}, False),
    (RAISED, True),
    (JEMALLOC, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0x40000000:glibc.malloc.trim_threshold=1073741824"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "1073741824"}, False),             # the trim threshold still returns the pages
    ({**RAISED, "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}, False),   # not above glibc's own maximum
    ({**RAISED, "MALLOC_TRIM_THRESHOLD_": "lots"}, False),
])
def test_reuses_large_blocks_only_where_both_thresholds_are_raised_or_an_allocator_keeps_them(environ, reuses):
    assert heap.reuses_large_blocks(environ) is reuses
