"""What the Streamlit page and the HTTP API share, kept out of the page script so it can be tested.

The page (:mod:`pneumo.app.page`) only lays out widgets; everything that decides what is shown
(which bundle, the model summary, one upload's analysis, the results table) lives here and
never imports Streamlit, so plain unit tests and the API can use it too.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.core.errors import PneumoError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from pneumo.inference.explain import Explainer, Explanation
    from pneumo.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

#: Environment variable naming the model bundle when no ``--model`` is given to the page.
MODEL_ENV = "PNEUMO_MODEL"

#: Message for failures that are pneumo's fault, not the file's (details go to the log only).
INTERNAL_ERROR_MESSAGE = "Something went wrong on our side while analysing this file; the error was logged."


def bundle_from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Path | None:
    """The bundle folder the page should load: ``--model PATH`` in ``argv``, else ``$PNEUMO_MODEL``, else None.

    Only ``--model`` is looked at, so unrelated arguments (a test runner's, Streamlit's) are ignored.
    """
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--model" and index + 1 < len(args):
            return Path(args[index + 1])
        if arg.startswith("--model="):
            return Path(arg.split("=", 1)[1])
    value = (os.environ if environ is None else environ).get(MODEL_ENV, "").strip()
    return Path(value) if value else None


#: Characters that mean something to Streamlit's markdown (CommonMark, ``$`` maths, ``:emoji:`` and ``:red[...]``).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-!|~$:])")


def markdown_escape(text: str) -> str:
    """``text`` with every markdown-special character backslash-escaped, so it shows as typed.

    Uploaded file names reach ``st.subheader`` and ``st.error``, which render markdown: a name
    like ``[click](http://x)`` or ``$x$`` would become a link or a formula. Streamlit has no
    escaping helper, hence this one.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text.replace("\n", " "))


def metric_rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten (possibly nested) bundle metrics into ``(name, formatted value)`` rows for display."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(metric_rows(value, f"{name}."))
        elif isinstance(value, float):
            rows.append((name, f"{value:.3f}"))
        elif isinstance(value, list | tuple) and all(isinstance(v, float | int) for v in value) and len(value) <= 4:
            rows.append((name, " - ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value)))
        elif isinstance(value, str | int | bool):
            rows.append((name, str(value)))
    return rows


@dataclass
class Analysis:
    """Everything the page shows for one upload: its answer and heatmap, or why there is none.

    Attributes:
        name: the uploaded file's name.
        prediction: the model's answer, when the file could be analysed.
        error: the typed error (``code`` + friendly ``message``) when it could not.
        explanation: the Grad-CAM map of the answer, when it could be computed.
        explain_error: why there is no heatmap although there is an answer.
        seconds: time from bytes to answer (decode + model), for the record.
    """

    name: str
    prediction: Prediction | None = None
    error: PneumoError | None = None
    explanation: Explanation | None = None
    explain_error: str | None = None
    seconds: float = 0.0


def predict_upload(predictor: Predictor, name: str, data: bytes) -> Analysis:
    """Run the one inference path on an upload; every failure becomes an :class:`Analysis` error.

    A :class:`PneumoError` (bad file, not a chest X-ray, ...) keeps its own message; anything
    else is a bug on our side: it is logged with its traceback and the user gets a generic message.
    """
    import time

    start = time.perf_counter()
    try:
        prediction = predictor.predict(data, name=name)
    except PneumoError as err:
        return Analysis(name, error=err, seconds=time.perf_counter() - start)
    except Exception:
        log.exception("Unexpected failure analysing %s", name)
        error = PneumoError(INTERNAL_ERROR_MESSAGE, code="internal_error")
        return Analysis(name, error=error, seconds=time.perf_counter() - start)
    return Analysis(name, prediction=prediction, seconds=time.perf_counter() - start)


def explain_upload(analysis: Analysis, predictor: Predictor, explainer: Explainer | None, data: bytes) -> None:
    """Add the Grad-CAM map of ``analysis``'s answer (in place); failures only cost the heatmap."""
    if analysis.prediction is None:
        return
    if explainer is None:
        analysis.explain_error = "Heatmaps are not available for this model."
        return
    try:
        analysis.explanation = explainer.explain(predictor.decode(data), analysis.prediction.label)
    except PneumoError as err:
        analysis.explain_error = err.message
    except Exception:
        log.exception("Grad-CAM failed for %s", analysis.name)
        analysis.explain_error = "The heatmap could not be computed for this image; the error was logged."


def results_frame(analyses: Sequence[Analysis]) -> pd.DataFrame:
    """One row per upload (answer or error), in upload order: the table and the CSV download."""
    import pandas as pd

    rows = []
    for item in analyses:
        p = item.prediction
        rows.append(
            {
                "file": item.name,
                "label": p.label if p else "",
                "probability": round(p.probability, 4) if p else None,
                "threshold": round(p.threshold, 4) if p else None,
                "error_code": item.error.code if item.error else "",
                "error_message": item.error.message if item.error else "",
            }
        )
    return pd.DataFrame(rows, columns=["file", "label", "probability", "threshold", "error_code", "error_message"])


def results_csv(analyses: Sequence[Analysis]) -> bytes:
    """The results table as UTF-8 CSV bytes."""
    buffer = io.StringIO()
    results_frame(analyses).to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def dicom_rows(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    """The DICOM header fields a clinician checks (:data:`pneumo.core.decode.dicom.DICOM_FIELDS`), named for users."""
    from pneumo.core.decode.dicom import DICOM_FIELDS

    return [(label, str(metadata[key])) for key, label in DICOM_FIELDS.items() if metadata.get(key)]


def display_image(predictor: Predictor, data: bytes, max_side: int = 1024) -> Image.Image:
    """The decoded upload as it is shown on screen: grayscale, at most ``max_side`` pixels a side."""
    image = predictor.decode(data).image.copy()
    image.thumbnail((max_side, max_side))
    return image
