"""Decoding under a deadline that really stops the work: the worker pool of pneumo.core.decode.isolate (issue 22).

Before there was no deadline at all: a decode ran as long as the decoder liked (143 s for the
progressive JPEG of the red team), in the request's thread, and nothing could stop it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_helpers import dicom_bytes, xray_array
from bad_inputs import encode, xray_like
from codec_inputs import film, j2k_dicom, native_dicom
from model_helpers import SURFACE_META, tiny_bundle

from pneumo.core.decode import Limits, read_image
from pneumo.core.decode.isolate import DecodePool, default_pool
from pneumo.core.errors import DecodeAbortedError, DicomError, InputTooLargeError
from pneumo.inference import Predictor


def _ramp(rows: int, cols: int) -> np.ndarray:
    """A cheap 12-bit film of ``rows`` x ``cols`` (no random numbers: big ones are made in milliseconds)."""
    return (np.arange(rows * cols, dtype=np.uint32) % 4096).astype(np.uint16).reshape(rows, cols)


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    pool = DecodePool(workers=1)
    yield pool
    pool.close()


def test_a_worker_decodes_exactly_what_the_process_decodes(pool: DecodePool) -> None:
    for data in (native_dicom(film(300, 240, 12), 12), j2k_dicom(film(512, 512, 12), 12), encode(xray_like(), "TIFF")):
        isolated, local = pool.read_image(data, draft_size=128), read_image(data, draft_size=128)
        assert np.array_equal(np.asarray(isolated.image), np.asarray(local.image))
        assert (isolated.format, isolated.original_size, isolated.metadata) == (
            local.format,
            local.original_size,
            local.metadata,
        )


def test_jpeg_and_png_stay_in_process(pool: DecodePool) -> None:
    assert pool.isolates("dicom") and pool.isolates("tiff")
    assert not pool.isolates("jpeg") and not pool.isolates("png")


def test_typed_errors_cross_the_process_boundary_with_their_class_and_code(pool: DecodePool) -> None:
    with pytest.raises(DicomError, match="modality") as caught:
        pool.read_image(dicom_bytes(xray_array(), modality="CT"))
    assert caught.value.code == "unsupported_modality" and caught.value.http_status == 422
    with pytest.raises(InputTooLargeError) as too_big:
        pool.read_image(native_dicom(film(300, 240, 12), 12), Limits(max_pixels=1000))
    assert too_big.value.code == "too_many_pixels"


def test_a_decode_past_its_cpu_deadline_is_killed_and_the_pool_recovers(pool: DecodePool) -> None:
    data = native_dicom(_ramp(4000, 3000), 12)  # a decode of a few hundred ms, far over the 1 ms allowed here
    with pytest.raises(DecodeAbortedError, match="was stopped") as caught:
        pool.read_image(data, Limits(decode_cpu_seconds=0.001))
    assert caught.value.code == "decode_timeout" and caught.value.http_status == 422
    assert pool.read_image(native_dicom(film(300, 240, 12), 12)).original_size == (240, 300)  # a fresh worker


def test_a_dead_worker_is_replaced(pool: DecodePool) -> None:
    pool.read_image(encode(xray_like(), "TIFF"))
    ((_, worker),) = pool._idle
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    assert pool.read_image(encode(xray_like(), "TIFF")).original_size == (96, 96)


def test_a_decode_over_the_worker_memory_cap_fails_in_the_worker_not_here() -> None:
    """The worker's address space is capped: what it cannot allocate is a typed 413, and the parent is untouched."""
    small = DecodePool(workers=1, memory_mb=24)  # room to receive 18 MB, not to decode them
    try:
        with pytest.raises(InputTooLargeError) as caught:
            small.read_image(native_dicom(_ramp(3000, 3000), 12))
        assert caught.value.code == "decode_out_of_memory"
        with pytest.raises(DecodeAbortedError) as crashed:  # not even room to receive: the worker dies
            small.read_image(native_dicom(_ramp(4000, 4000), 12))
        assert crashed.value.code == "decoder_crashed"
    finally:
        small.close()


def test_predictor_decodes_dicom_through_the_shared_pool(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, head="wide", **SURFACE_META)[0]
    predictor = Predictor(bundle)
    data = dicom_bytes(xray_array("pool", bits=12), bits_stored=12)
    decoded = predictor.decode(data)
    assert default_pool().idle_workers, "the shared pool's worker decoded it"
    assert np.array_equal(np.asarray(decoded.image), np.asarray(read_image(data, draft_size=224).image))
    local = Predictor(bundle, isolate_decoding=False)
    assert local.predict(data).probability == pytest.approx(predictor.predict(data).probability, abs=1e-6)


def test_idle_workers_are_stopped() -> None:
    """An idle worker gives its memory back after ``idle_seconds`` (the DICOM node's steady-state budget)."""
    quick = DecodePool(workers=1, idle_seconds=0.2)
    try:
        quick.read_image(encode(xray_like(), "TIFF"))
        ((_, worker),) = quick._idle
        deadline = time.monotonic() + 30
        while (quick.idle_workers or worker.process.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.05)  # the reaper takes the worker off the list, then stops it
        assert quick.idle_workers == 0 and worker.process.poll() is not None
        assert quick.read_image(encode(xray_like(), "TIFF")).original_size == (96, 96)  # a fresh one starts
    finally:
        quick.close()
