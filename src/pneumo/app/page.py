"""The clinician's page (Streamlit): upload chest X-rays, see the answer and where the model looked.

Run it with ``pneumo app [--port 8501] [--model BUNDLE]``, or
``streamlit run src/pneumo/app/page.py -- --model BUNDLE``; without ``--model`` the page reads
``$PNEUMO_MODEL``, then falls back to the bundle shipped with pneumo.

The page is thin on purpose: it lays out widgets and calls :mod:`pneumo.app.support`, which
calls the one :class:`~pneumo.inference.predictor.Predictor`. The model loads once per server
(``st.cache_resource``); each session keeps its own answers (``st.session_state``), one per
current upload, so moving the opacity slider redraws without re-running the model, and no
upload outlives its session. Images and heatmaps are drawn eight files at a time.

Nothing is shown before the user is signed in, when the operator set a password or a trusted
proxy header (:mod:`pneumo.app.auth`). A session analyses at most its budget of files and bytes
(:class:`~pneumo.app.support.SessionBudget`); uploads past it are dropped from the server's
upload store, and memory is handed back to the OS when uploads are cleared.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import streamlit as st

from pneumo.app import support
from pneumo.app.auth import AppAuth, AppAuthError, auth_from_env, verify_password
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


@st.cache_resource
def _memory_trimmer() -> threading.Thread:
    """Once per server: hand freed memory back to the OS every 30 s (sessions end without a rerun to do it)."""

    def trim() -> None:
        while True:
            time.sleep(30)
            support.release_memory()

    thread = threading.Thread(target=trim, name="pneumo-memory-trim", daemon=True)
    thread.start()
    return thread


def _analyses(predictor: Predictor, uploads: list[Any]) -> list[support.Analysis]:
    """This session's answers for the current uploads, each computed on first sight only.

    Keyed by content hash and name, kept exactly as long as the file stays uploaded: no count
    limit can evict a current upload (with 65 files a 64-entry cache recomputed every answer
    on each widget change), and removed uploads free their memory at the next rerun. Bytes are
    read one upload at a time (no second copy of every upload in memory at once).
    """
    kept: dict[str, Any] = st.session_state.setdefault(_SESSION_KEY, {})
    keys = [f"{hashlib.sha256(upload.getbuffer()).hexdigest()}:{upload.name}" for upload in uploads]
    stale = set(kept) - set(keys)
    for key in stale:
        del kept[key]
    if stale:
        support.release_memory()
    for key, upload in zip(keys, uploads, strict=True):
        if key not in kept:
            kept[key] = support.predict_upload(predictor, upload.name, upload.getvalue())
    return [kept[key] for key in keys]


def _within_budget(uploads: list[Any]) -> list[Any]:
    """The uploads this session's budget takes; the others are dropped from the upload store, with a message."""
    budget = support.budget_from_env()
    kept = budget.split([upload.size for upload in uploads])
    if kept < len(uploads):
        st.warning(budget.message(kept, len(uploads)))
        _drop_uploads(uploads[kept:])
    return uploads[:kept]


def _drop_uploads(uploads: list[Any]) -> None:
    """Free the server's copies of ``uploads`` (Streamlit keeps every uploaded file in memory for the session)."""
    try:
        from streamlit.runtime import Runtime
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        context = get_script_run_ctx()
        manager = Runtime.instance().uploaded_file_mgr
        if context is None or not hasattr(manager, "remove_file"):
            return
        for upload in uploads:
            manager.remove_file(context.session_id, upload.file_id)
    except (RuntimeError, AttributeError):  # no runtime (a test harness): nothing is stored to free
        return
    support.release_memory()


def _signed_in(auth: AppAuth | None) -> bool:
    """Whether this session may see the page; shows the sign-in form (or the proxy message) when not."""
    if auth is None or st.session_state.get("pneumo_user"):
        return True
    if auth.header is not None:
        user = auth.user_from_headers(dict(st.context.headers))
        if user:
            st.session_state["pneumo_user"] = user
            return True
        st.error("This page is served through the hospital's sign-in; open it through that address.")
        return False
    st.title("pneumo")
    with st.form("sign_in"):
        password = st.text_input("Password", type="password", key="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        if auth.password_hash is not None and verify_password(password or "", auth.password_hash):
            st.session_state["pneumo_user"] = "password"
            st.rerun()
        failures = st.session_state.get("pneumo_sign_in_failures", 0) + 1
        st.session_state["pneumo_sign_in_failures"] = failures
        time.sleep(min(5.0, 0.5 * failures))  # slows a guesser down, session by session
        st.error("Wrong password.")
    return False


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
        _metrics(info.get("metrics", {}))
    return show, opacity


def _metrics(metrics: dict[str, Any]) -> None:
    """Headline validation figures with their intervals, the robustness summary, the full record folded."""
    st.markdown("**Validation metrics**")
    rows = support.validation_rows(metrics)
    if not rows:
        st.caption("This bundle records no validation metrics.")
        return
    st.dataframe(rows, hide_index=True, width="stretch", key="validation_metrics")
    caption = support.validation_caption(metrics)
    if caption:
        st.caption(caption)
    robustness = support.robustness_rows(metrics)
    if robustness:
        st.markdown("**Robustness** (validation images under shifts: crops, rotation, blur, noise, JPEG, ...)")
        st.dataframe(robustness, hide_index=True, width="stretch", key="robustness_metrics")
    with st.expander("Full validation record"):
        st.json(metrics, expanded=False)


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
    st.markdown(support.probability_line(prediction))
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
    _memory_trimmer()
    try:
        auth = auth_from_env()
    except AppAuthError as err:
        st.error(f"The page's sign-in is misconfigured: {err.message}")
        st.stop()
    if not _signed_in(auth):
        st.stop()
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

    uploads = _within_budget(list(uploads))
    if not uploads:
        return
    analyses = _analyses(predictor, uploads)
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
    for index, (analysis, upload) in enumerate(zip(analyses, uploads, strict=True)):
        if index not in shown:
            analysis.explanation = None  # heatmaps only for what is drawn: memory stays one page's worth
            continue
        st.divider()
        try:
            _show_result(analysis, upload.getvalue(), predictor, explainer, show, opacity)
        except Exception:
            log.exception("Showing the result of %s failed", analysis.name)
            st.error(f"**{support.markdown_escape(analysis.name)}**: {support.INTERNAL_ERROR_MESSAGE}")


if __name__ == "__main__":  # streamlit runs the page as __main__; importing it runs nothing
    main()
