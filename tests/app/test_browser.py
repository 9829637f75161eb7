"""End to end in a real browser: ``pneumo app`` on loopback, driven by headless Debian chromium (Playwright).

Uploads a full-resolution JPEG from ``../shared/data/fullres_samples``, waits for the answer,
takes a screenshot and reports the time from upload to answer (recorded with ``record_property``
and printed; never asserted). The screenshot goes to the test's temporary folder; with
``PNEUMO_UPDATE_SCREENSHOT=1`` it replaces ``docs/app.png`` (the README's), so an ordinary test
run leaves the working tree as it found it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SHARED_DATA

CHROMIUM = Path("/usr/bin/chromium")
SAMPLES = SHARED_DATA / "fullres_samples"
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "app.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser

#: True once the page shows two decoded images (the upload and its Grad-CAM overlay).
_IMAGES_SHOWN = """() => {
    const images = [...document.querySelectorAll('[data-testid=stImage] img')];
    return images.length >= 2 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"pneumo app exited with status {server.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"pneumo app did not answer {url} within {timeout:.0f} s")


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    """``pneumo app`` (default bundle) on a free loopback port; stopped, with its process group, afterwards."""
    port = _free_port()
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumo.cli", "app", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stopping it stops everything it started
    )
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/_stcore/health", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def test_upload_in_chromium_shows_the_answer_and_heatmap(
    app_url: str, record_property: Callable[[str, object], None], tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    if not SAMPLES.is_dir():
        pytest.skip(f"full-resolution samples not found at {SAMPLES}")
    playwright = pytest.importorskip("playwright.sync_api")
    sample = sorted((SAMPLES / "PNEUMONIA").glob("*.jpeg"))[0]
    update = os.environ.get("PNEUMO_UPDATE_SCREENSHOT") == "1"
    screenshot = README_SCREENSHOT if update else tmp_path / "app.png"

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            file_input = page.locator("input[type=file]")
            file_input.wait_for(state="attached", timeout=120_000)  # present once the model has loaded
            start = time.perf_counter()
            file_input.set_input_files(str(sample))
            result = page.get_by_text(re.compile(r"^Result: (NORMAL|PNEUMONIA)$"))
            result.wait_for(timeout=60_000)
            to_answer = time.perf_counter() - start
            page.get_by_text(re.compile("^Grad-CAM: where the model")).wait_for(timeout=60_000)
            page.wait_for_function(_IMAGES_SHOWN, timeout=60_000)
            to_heatmap = time.perf_counter() - start
            page.locator("[data-testid=stStatusWidget]").wait_for(state="detached", timeout=60_000)
            assert result.inner_text().split(": ")[1] in ("NORMAL", "PNEUMONIA")
            assert page.get_by_text("Probability of pneumonia").count() == 1
            assert page.get_by_text("not a diagnosis").count() >= 1
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    record_property("upload_to_answer_s", round(to_answer, 3))
    record_property("upload_to_heatmap_s", round(to_heatmap, 3))
    print(f"\n{sample.name}: upload -> answer {to_answer:.2f} s, upload -> heatmap {to_heatmap:.2f} s (chromium)")
    assert screenshot.stat().st_size > 10_000
