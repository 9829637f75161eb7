"""The clinician's page (Streamlit): upload chest X-rays, see the answer and where the model looked.

Run it with ``pneumo app [--port 8501] [--model BUNDLE]``, or
``streamlit run src/pneumo/app/page.py -- --model BUNDLE``; without ``--model`` the page reads
``$PNEUMO_MODEL``, then falls back to the bundle shipped with pneumo.

The page is thin on purpose: it lays out widgets and calls :mod:`pneumo.app.support`, which
calls the one :class:`~pneumo.inference.predictor.Predictor`. The model loads once per server
(``st.cache_resource``); each session keeps its own answers (``st.session_state``), one per
current upload, so moving the opacity slider redraws without re-running the model, and no
upload outlives its session. Images and heatmaps are drawn eight files at a time.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import streamlit as st

from pneumo.app import support
from pneumo.core.errors import PneumoError
from pneumo.inference import model_info
from pneumo.inference.explain import DEFAULT_OPACITY

if TYPE_CHECKING:
    from pneumo.inference.explain import Explainer
    from pneumo.inference.predictor import Predictor

log = logging.getLogger("pneumo.app.page")

_SESSION_KEY = "pneumo_analyses"
#: Files whose image and heatmap are drawn at once; more uploads are paged (the table lists them all).
_DETAILS_PER_PAGE = 8


@st.cache_resource(show_spinner="Loading the model...")
def load_models(bundle: str | None) -> tuple[Predictor, Explainer | None]:
    """The predictor and its Grad-CAM explainer, built once per server process and bundle."""
    from pneumo.inference.cam import make_explainer
    from pneumo.inference.predictor import Predictor

    predictor = Predictor(bundle)
    try:
        explainer: Explainer | None = make_explainer(predictor)
    except PneumoError as err:
        log.warning("Heatmaps disabled: %s", err.message)
        explainer = None
    return predictor, explainer


def _analyses(predictor: Predictor, files: list[tuple[str, bytes]]) -> list[support.Analysis]:
    """This session's answers for the current uploads, each computed on first sight only.

    Keyed by content hash and name, kept exactly as long as the file stays uploaded: no count
    limit can evict a current upload (with 65 files a 64-entry cache recomputed every answer
    on each widget change), and removed uploads free their memory at the next rerun.
    """
    kept: dict[str, Any] = st.session_state.setdefault(_SESSION_KEY, {})
    keys = [f"{hashlib.sha256(data).hexdigest()}:{name}" for name, data in files]
    for stale in set(kept) - set(keys):
        del kept[stale]
    for key, (name, data) in zip(keys, files, strict=True):
        if key not in kept:
            kept[key] = support.predict_upload(predictor, name, data)
    return [kept[key] for key in keys]


def _shown(count: int) -> range:
    """Indices of the uploads drawn in detail: all up to a page, else the page the user picks."""
    if count <= _DETAILS_PER_PAGE:
        return range(count)
    pages = (count + _DETAILS_PER_PAGE - 1) // _DETAILS_PER_PAGE
    page = st.selectbox(
        "Images and heatmaps of",
        range(pages),
        format_func=lambda i: f"files {i * _DETAILS_PER_PAGE + 1}-{min(count, (i + 1) * _DETAILS_PER_PAGE)}",
        key="detail_page",
    )
    start = int(page or 0) * _DETAILS_PER_PAGE
    return range(start, min(count, start + _DETAILS_PER_PAGE))


def _sidebar(predictor: Predictor, explainer: Explainer | None) -> tuple[bool, float]:
    info = model_info.public_model_info(predictor.describe())
    with st.sidebar:
        st.title("pneumo")
        st.warning(f"**Intended use.** {model_info.INTENDED_USE}")
        st.subheader("Display")
        show = st.toggle("Show Grad-CAM heatmap", value=explainer is not None, key="show_heatmap")
        opacity = st.slider(
            "Heatmap opacity", 0.0, 1.0, DEFAULT_OPACITY, 0.05, key="opacity", disabled=not show or explainer is None
        )
        st.subheader("Model")
        st.markdown(
            f"- **{info.get('name', '?')}** version {info.get('version', '?')}\n"
            f"- architecture: `{info.get('arch', '?')}`, input {info.get('preprocess', {}).get('input_size', '?')} px\n"
            f"- threshold {float(info.get('threshold', 0.5)):.3f} ({info.get('threshold_rule', '')})\n"
            f"- calibration temperature {float(info.get('temperature', 1.0)):.3f}\n"
            f"- not-a-chest-X-ray gate: {'on' if info['ood']['enabled'] else 'off'}"
        )
        rows = support.metric_rows(info.get("metrics", {}))
        st.markdown("**Validation metrics**")
        if rows:
            st.table({"metric": [name for name, _ in rows], "value": [value for _, value in rows]})
        else:
            st.caption("This bundle records no validation metrics.")
    return show, opacity


def _show_result(
    analysis: support.Analysis,
    data: bytes,
    predictor: Predictor,
    explainer: Explainer | None,
    show: bool,
    opacity: float,
) -> None:
    name = support.markdown_escape(analysis.name)  # a file name is data, never markdown
    st.subheader(name)
    if analysis.error is not None:
        message = support.markdown_escape(analysis.error.message)
        st.error(f"**{name}** could not be analysed: {message} (`{analysis.error.code}`)")
        return
    prediction = analysis.prediction
    assert prediction is not None
    st.markdown(f"#### Result: {prediction.label}")
    st.markdown(
        f"Probability of pneumonia **{prediction.probability:.1%}**; "
        f"threshold in force {prediction.threshold:.1%} (PNEUMONIA at or above it)."
    )
    dicom = support.dicom_rows(prediction.metadata)
    if dicom:
        st.markdown("  \n".join(f"**{label}:** {value}" for label, value in dicom))
    left, right = st.columns(2)
    image = analysis.explanation.image if analysis.explanation is not None else support.display_image(predictor, data)
    left.image(image, caption="Uploaded image")
    if not show:
        return
    if analysis.explanation is None and analysis.explain_error is None:
        with right, st.spinner("Computing the heatmap..."):
            support.explain_upload(analysis, predictor, explainer, data)
    if analysis.explanation is not None:
        caption = f"Grad-CAM: where the model found evidence for {analysis.explanation.target_label}"
        if float(analysis.explanation.heatmap.max()) == 0.0:
            caption += " (no region stands out)"
        right.image(analysis.explanation.overlay(opacity), caption=caption)
    elif analysis.explain_error:
        right.info(analysis.explain_error)


def main() -> None:
    """Lay out the page; every failure is shown as a message, never as a traceback."""
    st.set_page_config(page_title="pneumo: pneumonia on pediatric chest X-rays", layout="wide")
    bundle = support.bundle_from_args(sys.argv[1:])
    try:
        predictor, explainer = load_models(str(bundle) if bundle is not None else None)
    except PneumoError as err:
        st.error(f"The model could not be loaded: {err.message}")
        st.stop()
    except Exception:
        log.exception("Loading the model failed")
        st.error("The model could not be loaded; the error was logged.")
        st.stop()
    show, opacity = _sidebar(predictor, explainer)

    st.title("Pneumonia on pediatric chest X-rays")
    st.caption("Decision support, not a diagnosis. Upload frontal chest X-rays of children: JPEG, PNG or DICOM.")
    uploads = st.file_uploader(
        "Chest X-rays (JPEG, PNG or DICOM; DICOM files may have no extension)",
        type=None,
        accept_multiple_files=True,
        key="uploads",
    )
    if not uploads:
        st.info("Upload one or more chest X-rays to classify them.")
        return

    files = [(upload.name, upload.getvalue()) for upload in uploads]
    analyses = _analyses(predictor, files)
    if len(analyses) > 1:
        st.subheader(f"{len(analyses)} images")
        st.dataframe(support.results_frame(analyses), hide_index=True)
        st.download_button(
            "Download results (CSV)",
            data=support.results_csv(analyses),
            file_name="pneumo_results.csv",
            mime="text/csv",
            key="download_csv",
        )
    shown = _shown(len(analyses))
    for index, (analysis, (_, data)) in enumerate(zip(analyses, files, strict=True)):
        if index not in shown:
            analysis.explanation = None  # heatmaps only for what is drawn: memory stays one page's worth
            continue
        st.divider()
        try:
            _show_result(analysis, data, predictor, explainer, show, opacity)
        except Exception:
            log.exception("Showing the result of %s failed", analysis.name)
            st.error(f"**{support.markdown_escape(analysis.name)}**: {support.INTERNAL_ERROR_MESSAGE}")


if __name__ == "__main__":  # streamlit runs the page as __main__; importing it runs nothing
    main()
