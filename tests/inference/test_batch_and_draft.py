"""The Predictor's speed paths: JPEG draft decoding at a fraction of the needed size, and batches beside decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_helpers import tiny_bundle, xray_jpegs

from pneumo.core.decode import read_image
from pneumo.core.environment import available_cores
from pneumo.inference import Predictor
from pneumo.inference.bench import synthesize_xrays
from pneumo.inference.predictor import DRAFT_FRACTION, draft_size_for


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("speed") / "bundle", head="spread", input_size=96)[0]


def test_draft_size_is_the_fraction_of_the_needed_side() -> None:
    assert draft_size_for(240, 1.0) == 240
    assert draft_size_for(240, 0.75) == 180
    assert draft_size_for(400, 0.5) == 200  # a lung crop needing 400 px of the film asks for more
    assert draft_size_for(1, 0.1) == 1
    assert 0.5 < DRAFT_FRACTION <= 1.0  # 0.5 missed the 99.5% agreement bar (docs/performance.md)


def test_the_predictor_drafts_a_full_resolution_film_close_to_the_exact_decode(bundle: Path, tmp_path: Path) -> None:
    predictor = Predictor(bundle, check_ood=False)
    assert predictor.draft_size == draft_size_for(96, DRAFT_FRACTION)
    (film,) = synthesize_xrays(tmp_path, 1, seed=5)
    drafted, exact = predictor.decode(film), read_image(film)
    # The coarsest DCT scale (1/1 ... 1/8) that still gives the draft size on both sides.
    scale = max(s for s in (1, 2, 4, 8) if all(-(-side // s) >= predictor.draft_size for side in exact.image.size))
    assert scale > 1 and drafted.image.size == tuple(-(-side // scale) for side in exact.image.size)
    difference = np.abs(predictor.prepare(drafted) - predictor.prepare(exact))
    assert float(difference.mean()) < 0.02  # ~2.5 gray levels; the 224 px training copies differ by ~0.018


def test_predict_many_answers_as_predict_does(bundle: Path) -> None:
    predictor = Predictor(bundle, check_ood=False)
    blobs = xray_jpegs(10, size=160)
    single = [predictor.predict(blob).probability for blob in blobs]
    many = predictor.predict_many(blobs, batch_size=4)
    assert [r.probability for r in many] == pytest.approx(single, abs=1e-5)  # type: ignore[union-attr]
    assert len(set(np.round(single, 4))) > 5  # the films differ, so order mistakes would show


def test_batches_beside_decoding_run_on_half_the_cores(bundle: Path) -> None:
    predictor = Predictor(bundle, check_ood=False)
    runner = predictor._batch_runner()
    cores = available_cores()
    if cores < 2:
        assert runner is predictor.runner
        return
    assert runner is not predictor.runner and runner is predictor._batch_runner()  # made once
    options = runner.session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == cores // 2
    batch = np.stack([predictor.prepare(predictor.decode(b)) for b in xray_jpegs(3)])
    np.testing.assert_allclose(runner(batch)[0], predictor.runner(batch)[0], atol=1e-5)
