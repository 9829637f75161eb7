"""The page at scale and with hostile names (issue 12, F8 and F9): no recomputation, markdown escaped.

With more uploads than the old 64-entry answer cache, every widget change recomputed every
prediction and heatmap (65 files: 5.3 s per slider move). The cache now keeps every current
upload; heatmaps are computed only for the page of files drawn.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import open_page, xray_bytes
from model_helpers import SURFACE_META, tiny_bundle
from streamlit.testing.v1 import AppTest

from pneumo.app import support as app_support

N_FILES = 70  # over the old cache's 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the real prediction and heatmap functions the page calls (they still run)."""
    counts = {"predict": 0, "explain": 0}
    predict, explain = app_support.predict_upload, app_support.explain_upload

    def counted_predict(*args: object) -> app_support.Analysis:
        counts["predict"] += 1
        return predict(*args)  # type: ignore[arg-type]

    def counted_explain(*args: object) -> None:
        counts["explain"] += 1
        explain(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(app_support, "predict_upload", counted_predict)
    monkeypatch.setattr(app_support, "explain_upload", counted_explain)
    return counts


def _page(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv(app_support.BUDGET_FILES_ENV, str(N_FILES))  # over the default session budget of 50
    return open_page(bundle, monkeypatch, timeout=300)


def test_many_uploads_are_predicted_once_and_heatmaps_only_for_the_page_shown(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, calls: dict[str, int]
) -> None:
    at = _page(bundle, monkeypatch)
    files = [(f"chest{i:03d}.jpeg", xray_bytes(f"scale{i}"), "image/jpeg") for i in range(N_FILES)]
    at.file_uploader(key="uploads").set_value(files).run()
    assert not at.exception, at.exception
    assert calls["predict"] == N_FILES
    assert calls["explain"] == 8, "heatmaps for the first page only"
    assert len(at.main.dataframe[0].value) == N_FILES, "the table lists every file"
    assert len(at.get("image")) == 16  # 8 images + 8 heatmaps

    at.slider(key="opacity").set_value(0.8).run()
    at.toggle(key="show_heatmap").set_value(False).run()
    at.toggle(key="show_heatmap").set_value(True).run()
    assert not at.exception, at.exception
    assert calls["predict"] == N_FILES, "widget changes recompute nothing (the old cache evicted itself)"

    at.selectbox(key="detail_page").set_value(8).run()  # the last page: files 65-70
    assert not at.exception, at.exception
    assert calls["predict"] == N_FILES
    assert calls["explain"] == 8 + (N_FILES - 64), "first page once (kept while shown), then the last page"
    assert [s.value for s in at.main.subheader][1:] == [f"chest{i:03d}.jpeg" for i in range(64, N_FILES)]


def test_removed_uploads_are_forgotten(bundle: Path, monkeypatch: pytest.MonkeyPatch, calls: dict[str, int]) -> None:
    at = _page(bundle, monkeypatch)
    at.file_uploader(key="uploads").set_value([("a.jpeg", xray_bytes("a"), "image/jpeg")]).run()
    at.file_uploader(key="uploads").set_value([("b.jpeg", xray_bytes("b"), "image/jpeg")]).run()
    assert not at.exception
    assert len(at.session_state["pneumo_analyses"]) == 1


def test_file_names_are_shown_as_typed_not_rendered_as_markdown(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F9: an uploaded file name went raw into st.subheader and st.error (links, formulas, colours)."""
    at = _page(bundle, monkeypatch)
    name = "[click](http://evil.example) $x^2$ **loud** :red[alarm].txt"
    at.file_uploader(key="uploads").set_value([(name, b"not an image", "text/plain")]).run()
    assert not at.exception, at.exception
    escaped = r"\[click\]\(http\://evil.example\) \$x^2\$ \*\*loud\*\* \:red\[alarm\].txt"
    assert at.main.subheader[0].value == escaped
    assert at.error[0].value.startswith(f"**{escaped}** could not be analysed")
    assert "`unsupported_format`" in at.error[0].value


def test_a_session_analyses_at_most_its_budget_of_files(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, calls: dict[str, int]
) -> None:
    """Issue 22, item 7: one session uploading 40 x 19 MB held 1.76 GB; there was no limit on files."""
    monkeypatch.setenv(app_support.BUDGET_FILES_ENV, "3")
    at = open_page(bundle, monkeypatch)
    files = [(f"chest{i}.jpeg", xray_bytes(f"budget{i}"), "image/jpeg") for i in range(5)]
    at.file_uploader(key="uploads").set_value(files).run()
    assert not at.exception, at.exception
    assert calls["predict"] == 3
    assert "2 of 5 files were not analysed" in at.warning[0].value and "at most 3 files" in at.warning[0].value
    assert list(at.main.dataframe[0].value["file"]) == ["chest0.jpeg", "chest1.jpeg", "chest2.jpeg"]


def test_a_session_analyses_at_most_its_budget_of_bytes(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = xray_bytes("big", size=600)
    monkeypatch.setenv(app_support.BUDGET_MB_ENV, str(2.5 * len(big) / 2**20))  # room for two of them
    at = open_page(bundle, monkeypatch)
    at.file_uploader(key="uploads").set_value([(f"{i}.jpeg", big, "image/jpeg") for i in range(4)]).run()
    assert not at.exception, at.exception
    assert "2 of 4 files were not analysed" in at.warning[0].value
    assert len(at.session_state["pneumo_analyses"]) == 2
