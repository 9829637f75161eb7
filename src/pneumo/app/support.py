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


# ------------------------------------------------------------------------------------ session budget


@dataclass(frozen=True)
class SessionBudget:
    """What one browser session may have analysed at once: files and bytes (issue 22, item 7).

    One session uploading 40 files of 19 MB peaked at 1.76 GB. Files past the budget are not
    analysed, the page says so, and their bytes are dropped from the server's upload store.
    """

    max_files: int = 50
    max_bytes: int = 200 * 2**20

    def split(self, sizes: Sequence[int]) -> int:
        """How many of the uploads (sizes in upload order) fit: the first ones, until a limit is reached."""
        total = 0
        for count, size in enumerate(sizes):
            if count >= self.max_files or total + size > self.max_bytes:
                return count
            total += size
        return len(sizes)

    def message(self, kept: int, total: int) -> str:
        return (
            f"{total - kept} of {total} files were not analysed: a session takes at most {self.max_files} files and "
            f"{self.max_bytes / 2**20:.0f} MB at once. Remove files (or download the results and start over) to "
            "analyse more."
        )


BUDGET_FILES_ENV, BUDGET_MB_ENV = "PNEUMO_APP_MAX_FILES", "PNEUMO_APP_MAX_MB"


def budget_from_env(environ: Mapping[str, str] | None = None) -> SessionBudget:
    """The per-session budget (``pneumo app --max-files/--max-mb``), default :class:`SessionBudget`."""
    environ = os.environ if environ is None else environ
    default = SessionBudget()
    try:
        files = int(environ.get(BUDGET_FILES_ENV, default.max_files))
        megabytes = float(environ.get(BUDGET_MB_ENV, default.max_bytes / 2**20))
    except ValueError:
        return default
    return SessionBudget(max(1, files), max(1, int(megabytes * 2**20)))


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Decoded uploads free their buffers, but glibc keeps them in its arenas, so the process kept
    1.0 GB after a session's 760 MB of uploads were cleared. (The API has the same call in
    ``pneumo.api.backpressure``; the app may not import the API.)
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# ---------------------------------------------------------------------------------- model summary

#: Headline validation metrics, in the order a clinician reads them.
_HEADLINE = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("roc_auc", "ROC AUC"),
    ("accuracy", "Accuracy"),
    ("precision", "PPV (precision)"),
    ("npv", "NPV"),
    ("balanced_accuracy", "Balanced accuracy"),
)


def _pct(value: Any) -> str:
    return f"{float(value):.1%}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def validation_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """The headline validation metrics with their confidence intervals, one row each, for a readable table.

    Reads ``metrics["validation"]`` (bundles written by training) or the flat metrics of older
    bundles; rows without a value are left out.
    """
    section = metrics.get("validation", metrics)
    if not isinstance(section, Mapping):
        return []
    intervals = section.get("ci") if isinstance(section.get("ci"), Mapping) else {}
    level = section.get("ci_level", 0.95)
    rows = []
    for key, label in _HEADLINE:
        value = section.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        ci = intervals.get(key) if intervals else None
        low_high = f"{_pct(ci[0])} - {_pct(ci[1])}" if isinstance(ci, list | tuple) and len(ci) == 2 else "not recorded"
        rows.append({"metric": label, "value": _pct(value), f"{float(level):.0%} CI": low_high})
    return rows


def validation_caption(metrics: Mapping[str, Any]) -> str:
    """Where the headline figures come from: images, classes, and how the intervals were computed."""
    section = metrics.get("validation", metrics)
    if not isinstance(section, Mapping) or "n_images" not in section:
        return ""
    caption = f"{section['n_images']} validation images"
    if "n_positive" in section and "n_negative" in section:
        caption += f" ({section['n_positive']} pneumonia, {section['n_negative']} normal)"
    if section.get("ci_method"):
        caption += f"; intervals: {section['ci_method']}"
    return caption + "."


def robustness_rows(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """The robustness validation's summary: each metric clean, averaged over the shifts, and at the worst one."""
    robustness = metrics.get("robustness")
    summary = robustness.get("summary") if isinstance(robustness, Mapping) else None
    if not isinstance(summary, Mapping):
        return []
    names = dict(_HEADLINE)
    rows = []
    for key, values in summary.items():
        if not isinstance(values, Mapping):
            continue
        rows.append(
            {
                "metric": names.get(key, key.replace("_", " ").capitalize()),
                "clean": _pct(values.get("clean")),
                "mean": _pct(values.get("mean")),
                "worst": f"{_pct(values.get('worst'))} ({values.get('worst_shift', '?')})",
            }
        )
    return rows


def probability_line(prediction: Prediction) -> str:
    """The probability with the threshold beside it, said as borderline when they disagree about 50%.

    The threshold is chosen on validation data (for sensitivity, or balance on shifted films), so it
    need not sit at 50%: a film at 40% can be called PNEUMONIA, or one at 60% NORMAL. Shown bare,
    "PNEUMONIA, 40%" reads as a contradiction.
    """
    p, t = prediction.probability, prediction.threshold
    line = f"Probability of pneumonia **{p:.1%}**; threshold in force {t:.1%} (PNEUMONIA at or above it)."
    if prediction.borderline:
        side = "below" if p < 0.5 else "above"
        line = (
            f"**Borderline**: probability of pneumonia **{p:.1%}**, {side} 50% but on the "
            f"{prediction.label} side of the threshold in force ({t:.1%})."
        )
    if prediction.operating_point:
        line += f"  \nThreshold chosen on validation children by: {markdown_escape(prediction.operating_point)}."
    crop = prediction.crop
    if crop is not None:
        line += (
            "  \nThe model read the lung box (outlined on the heatmap)."
            if crop.get("found")
            else "  \nNo lung fields were found: the model read the whole film."
        )
    return line
