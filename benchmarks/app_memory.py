"""Memory of ``pneumo app`` for one browser session uploading many large films (issue 22, item 7).

    python benchmarks/app_memory.py [--files 40] [--megabytes 19] [--linger 150]

Starts ``pneumo app`` on a free loopback port, opens it in headless chromium (Playwright), uploads
``--files`` 16-bit PNG films of about ``--megabytes`` MB each (synthetic chest-like pictures with
noise, 3100 x 3100), waits until the page has answered, then closes the browser and waits
``--linger`` seconds (the server frees a closed tab's session after its TTL). Samples the
server's RSS every 0.5 s and writes: before the upload, the peak, after the answers, and after
the browser left. The round-22 red team measured 1.76 GB at the peak and 1.0 GB after the
session ended, for 40 x 19 MB. Only loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def films(folder: Path, count: int, megabytes: float) -> list[Path]:
    """``count`` distinct 16-bit PNG films of about ``megabytes`` MB (noise keeps them from compressing)."""
    side = int((megabytes * 2**20 / 2) ** 0.5)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    body = 30000 + 20000 * np.exp(-(((x - 0.5) / 0.3) ** 2 + ((y - 0.55) / 0.35) ** 2))
    base = (body + rng.normal(0, 4000, body.shape)).clip(0, 65535).astype(np.uint16)
    paths = []
    for i in range(count):  # one noisy film, shifted: distinct files without drawing noise 40 times
        path = folder / f"film{i:02d}.png"
        Image.fromarray(np.roll(base, 97 * i, axis=1)).save(path, compress_level=1)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--megabytes", type=float, default=19.0)
    parser.add_argument("--linger", type=float, default=150.0, help="Seconds to wait after the browser left.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "app_memory.json")
    options = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as scratch:
        paths = films(Path(scratch), options.files, options.megabytes)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [sys.executable, "-m", "pneumo.cli", "app", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), _rss_mb(server.pid)))
                time.sleep(0.5)

        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            threading.Thread(target=sample, daemon=True).start()
            marks: dict[str, float] = {}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page()
                page.goto(url)
                uploader = page.locator("input[type=file]")
                uploader.wait_for(state="attached", timeout=300_000)
                time.sleep(3)
                marks["before_upload"] = _rss_mb(server.pid)
                started = time.monotonic()
                uploader.set_input_files([str(p) for p in paths])
                page.get_by_text("Download results (CSV)").wait_for(timeout=1_200_000)
                page.locator("[data-testid=stStatusWidget]").wait_for(state="detached", timeout=1_200_000)
                marks["answered_s"] = round(time.monotonic() - started, 1)
                marks["after_answers"] = _rss_mb(server.pid)
                warned = page.get_by_text("were not analysed").count()
                browser.close()
            time.sleep(options.linger)
            marks["after_browser_left"] = _rss_mb(server.pid)
            stop.set()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    result = {
        "files": options.files,
        "megabytes_each": options.megabytes,
        "rss_mb": {
            "before_upload": round(marks["before_upload"], 1),
            "peak": round(max(rss for _, rss in samples), 1),
            "after_answers": round(marks["after_answers"], 1),
            "after_browser_left": round(marks["after_browser_left"], 1),
        },
        "upload_to_answers_s": marks["answered_s"],
        "budget_warning_shown": bool(warned),
        "linger_s": options.linger,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(["python", "benchmarks/app_memory.py", *sys.argv[1:]]),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
