"""The long fuzzing run of bytes -> pneumo.core.decode.read_image -> preprocess (the suite runs a short one).

    python benchmarks/fuzz_decode.py --examples 20000            # hypothesis, random seed
    python benchmarks/fuzz_decode.py --engine atheris --seconds 600   # coverage-guided (pip install atheris)

Both engines check the property of ``tests/fuzz_strategies.decode_and_preprocess``: every input
gives a finite model input or a ``PneumoError``; anything else is a bug. Each engine runs in this
process under an address-space cap (``--memory-mb`` above the start-up size, RLIMIT_AS), so an
input that made the decoder allocate what a lying header claims fails as MemoryError; the time of
the slowest example is recorded. Writes JSON (``--out``) and prints a summary; exits non-zero on a failure
(hypothesis prints the shrunk failing input; atheris writes a ``crash-*`` file next to ``--corpus``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _strategies(engine: str) -> Any:
    """tests/fuzz_strategies, imported under atheris' coverage instrumentation of the parsers when asked."""
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["PIL", "pydicom", "pneumo", "fuzz_strategies"]):
            import fuzz_strategies
            import pydicom.pixels  # noqa: F401  (imported lazily otherwise, then uninstrumented)
            from PIL import Image

            Image.init()  # every Pillow format plugin, for the same reason
    else:
        import fuzz_strategies
    return fuzz_strategies


class Recorder:
    """Counts outcomes and the slowest example."""

    def __init__(self, check: Any) -> None:
        self.check = check
        self.codes: Counter[str] = Counter()
        self.slowest = 0.0
        self.slowest_size = 0
        self.failure: str | None = None

    def __call__(self, data: bytes) -> None:
        start = time.perf_counter()
        try:
            code = self.check(data)
        except BaseException as err:  # the property failed: keep what, then let the engine report the input
            self.failure = f"{type(err).__name__}: {err}"
            raise
        elapsed = time.perf_counter() - start
        self.codes[code] += 1
        if elapsed > self.slowest:
            self.slowest, self.slowest_size = elapsed, len(data)


def _cap_memory(extra_mb: int) -> int:
    with open("/proc/self/status") as handle:
        vm = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize"))
    limit = vm + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return limit


def run_hypothesis(recorder: Recorder, any_input: Any, examples: int, seconds: float) -> None:
    from datetime import timedelta

    from hypothesis import HealthCheck, given, settings

    deadline = time.monotonic() + seconds

    @settings(
        max_examples=examples,
        deadline=timedelta(seconds=10),
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(any_input)
    def fuzz(data: bytes) -> None:
        if time.monotonic() < deadline:
            recorder(data)

    fuzz()


def run_atheris(recorder: Recorder, seeds: list[bytes], seconds: float, corpus: Path, report: Any) -> None:
    """libFuzzer ends the process from C (no atexit), so the summary is written from the target itself."""
    import atheris

    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds):
        (corpus / f"seed{index:02d}").write_bytes(seed)
    deadline = time.monotonic() + seconds

    def target(data: bytes) -> None:
        if time.monotonic() > deadline:
            report()
            os._exit(0)
        try:
            recorder(data)
        except BaseException:
            report()  # then atheris prints the traceback and writes the crash-* input
            raise

    atheris.Setup(
        [sys.argv[0], "-max_len=65536", "-rss_limit_mb=0", f"-artifact_prefix={corpus.parent}/", str(corpus)],
        target,
    )
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--examples", type=int, default=20_000, help="hypothesis: examples to run.")
    parser.add_argument("--seconds", type=float, default=600, help="Stop after this long.")
    parser.add_argument("--memory-mb", type=int, default=512, help="Address-space headroom for the run.")
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/pneumo_fuzz_corpus"), help="atheris corpus.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fuzz_decode.json")
    args = parser.parse_args()
    # Pillow and pydicom warn about every damaged tag they skip: expected by the thousand here.
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("pydicom").setLevel(logging.ERROR)

    fuzz = _strategies(args.engine)
    recorder = Recorder(fuzz.decode_and_preprocess)
    fuzz.decode_and_preprocess(fuzz.seeds()[0])  # build the seeds, import torch, warm up: all before the cap
    cap = _cap_memory(args.memory_mb)
    start = time.perf_counter()
    failure: str | None = None

    def report() -> None:
        result: dict[str, Any] = {
            "engine": args.engine,
            "examples": sum(recorder.codes.values()),
            "seconds": round(time.perf_counter() - start, 1),
            "outcomes": dict(recorder.codes.most_common()),
            "slowest_example_s": round(recorder.slowest, 4),
            "slowest_example_bytes": recorder.slowest_size,
            "address_space_cap_mb": cap // 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "failure": failure or recorder.failure,
            "python": platform.python_version(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))

    if args.engine == "atheris":
        run_atheris(recorder, fuzz.seeds(), args.seconds, args.corpus, report)
        return 0
    try:
        run_hypothesis(recorder, fuzz.any_input(), args.examples, args.seconds)
    except Exception as err:  # the property failed: report it, then fail
        failure = f"{type(err).__name__}: {err}"
        report()
        raise
    report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
