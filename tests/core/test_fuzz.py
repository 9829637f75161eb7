"""Fuzzing bytes -> read_image -> preprocess: only pneumo's typed errors may escape, in bounded time and memory.

A short, derandomized run (the same examples every time, so CI is stable); the long, random run is
``python benchmarks/fuzz_decode.py`` (see docs/reliability.md).
"""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import run_with_helpers
from fuzz_strategies import (
    decode_and_preprocess,
    header_sizes,
    magic_prefixed,
    mutated_files,
    seeds,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Pillow warns about the corrupt EXIF and TIFF tags it skips; expected here, and not what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

# A generous per-example deadline: it only trips on pathological inputs (seconds of decoding), not on a busy CPU.
SHORT = settings(
    max_examples=100,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_every_seed_decodes() -> None:
    """The mutation seeds are valid files of every flavour (else the fuzzing starts from errors only)."""
    codes = [decode_and_preprocess(seed) for seed in seeds()]
    assert codes.count("multi_frame") == 1  # the APNG seed
    assert all(code in ("ok", "multi_frame") for code in codes), codes


@SHORT
@given(st.binary(max_size=1024))
def test_random_bytes(data: bytes) -> None:
    decode_and_preprocess(data)


@SHORT
@given(magic_prefixed())
def test_random_bytes_behind_a_real_signature(data: bytes) -> None:
    decode_and_preprocess(data)


@settings(SHORT, max_examples=250)
@given(mutated_files())
def test_damaged_valid_files(data: bytes) -> None:
    decode_and_preprocess(data)


@SHORT
@given(header_sizes())
def test_headers_claiming_any_size(data: bytes) -> None:
    decode_and_preprocess(data)


@pytest.mark.slow  # a subprocess with its own interpreter and fuzz run
def test_header_size_fuzz_stays_within_a_memory_cap() -> None:
    """The size-header fuzz again, in a child that may grow its address space by 96 MB only.

    With a 2-megapixel cap nothing legitimate needs more; a decoder that believed a header
    claiming 65535 x 65535 pixels would raise MemoryError, which the property does not allow.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure the address space")
    script = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from datetime import timedelta
        from hypothesis import HealthCheck, given, settings
        from fuzz_strategies import decode_and_preprocess, header_sizes, seeds
        seeds()
        decode_and_preprocess(seeds()[0], preprocess_too=False)  # warm up imports and lazy allocations before the cap
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 96 * 2**20, resource.RLIM_INFINITY))

        @settings(max_examples=60, derandomize=True, database=None, deadline=timedelta(seconds=5),
                  suppress_health_check=list(HealthCheck))
        @given(header_sizes())
        def run(data):
            decode_and_preprocess(data, preprocess_too=False)

        run()
        print("ok")
        """
    )
    done = run_with_helpers(script, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
