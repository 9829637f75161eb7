"""The README's quick start, Python snippet and API example run as written, and print what the README shows.

The blocks are found by their markers (``<!-- readme-test: NAME -->`` before a fenced block), so the
test reads the very text a newcomer copies. Commands run in a subprocess, as a shell would run them:
``pneumo ...`` through ``python -m pneumo.cli``, ``pneumo serve ... &`` on a free port, ``curl``
against it. Probabilities may differ in the last digit across CPUs (the INT8 kernels), so numbers
are compared within 0.01 and labels exactly.

The slow test does it all in a ``git clone`` of the repository into an empty folder: no
``../shared/data``, no files of the working tree that are not committed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```[\w]*\n(.*?)```", re.DOTALL)


def readme_blocks(readme: Path) -> dict[str, str]:
    """Marker name -> the fenced block after it."""
    blocks = dict(_BLOCK.findall(readme.read_text()))
    assert {"cli", "cli-output", "api-output", "python", "python-output"} <= set(blocks), sorted(blocks)
    return blocks


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PNEUMO_BACKEND"}
    env["PYTHONPATH"] = str(repo / "src")  # this checkout's pneumo, whatever is installed
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _same_prediction_lines(got: str, shown: str) -> None:
    """``file<TAB>label<TAB>p=...<TAB>(threshold ...)`` lines: same files and labels, numbers within 0.01."""
    got_lines, shown_lines = got.strip().splitlines(), shown.strip().splitlines()
    assert len(got_lines) == len(shown_lines), got
    for line, expected in zip(got_lines, shown_lines, strict=True):
        file, label, p, threshold = line.split("\t")
        e_file, e_label, e_p, e_threshold = expected.split("\t")
        assert (file, label) == (e_file, e_label)
        assert abs(float(p[2:]) - float(e_p[2:])) <= 0.01, (line, expected)
        assert threshold == e_threshold


def run_quick_start(repo: Path, workdir: Path) -> dict[str, str]:
    """Run the README's ``cli`` block in ``workdir`` (``examples/`` copied in); returns each command's stdout."""
    blocks = readme_blocks(repo / "README.md")
    shutil.copytree(repo / "examples", workdir / "examples", dirs_exist_ok=True)
    env, port, outputs = _env(repo), _free_port(), {}
    server: subprocess.Popen[bytes] | None = None
    try:
        for line in blocks["cli"].strip().splitlines():
            command = line.split("#")[0].strip()
            words = shlex.split(command.rstrip("&").replace("8000", str(port)))
            if words[:2] == ["pneumo", "app"]:
                continue  # Streamlit serves until stopped; tests/app covers the page
            if words[0] == "pneumo" and command.endswith("&"):
                server = subprocess.Popen([sys.executable, "-m", "pneumo.cli", *words[1:]], cwd=workdir, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                _wait_for(f"http://127.0.0.1:{port}/health", server)
                continue
            if words[0] == "pneumo":
                words = [sys.executable, "-m", "pneumo.cli", *words[1:]]
            elif words[0] == "curl" and shutil.which("curl") is None:
                pytest.skip("curl is not installed")
            proc = subprocess.run(words, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
            outputs[command.split()[0] + " " + command.split()[1]] = proc.stdout
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return outputs


def _wait_for(url: str, server: subprocess.Popen[bytes], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "pneumo serve exited"
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def check_quick_start(repo: Path, workdir: Path) -> None:
    blocks = readme_blocks(repo / "README.md")
    outputs = run_quick_start(repo, workdir)
    _same_prediction_lines(outputs["pneumo predict"], blocks["cli-output"])
    rows = json.loads((workdir / "predictions.json").read_text())
    shown_files = [line.split("\t")[0].split("/")[-1] for line in blocks["cli-output"].strip().splitlines()]
    assert [Path(row["file"]).name for row in rows] == shown_files
    answer, shown = json.loads(outputs["curl -s"]), json.loads(blocks["api-output"])
    for key, value in shown.items():
        if isinstance(value, float):
            assert answer[key] == pytest.approx(value, abs=0.01), key
        else:
            assert answer[key] == value, key


def check_python_snippet(repo: Path, workdir: Path) -> None:
    blocks = readme_blocks(repo / "README.md")
    shutil.copytree(repo / "examples", workdir / "examples", dirs_exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", blocks["python"]], cwd=workdir, env=_env(repo),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    label, probability, threshold = proc.stdout.split()
    e_label, e_probability, e_threshold = blocks["python-output"].split()
    assert label == e_label and threshold == e_threshold
    assert abs(float(probability) - float(e_probability)) <= 0.01


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    check_quick_start(REPO, tmp_path)


def test_readme_python_snippet_prints_what_the_readme_shows(tmp_path: Path) -> None:
    check_python_snippet(REPO, tmp_path)


def test_readme_examples_are_six_training_films_with_their_credit() -> None:
    films = sorted(
        p.relative_to(REPO / "examples" / "films").as_posix() for p in (REPO / "examples" / "films").rglob("*.jpeg")
    )
    assert len(films) == 6 and sum(f.startswith("NORMAL/") for f in films) == 3
    credit = (REPO / "examples" / "README.md").read_text()
    assert "CC BY 4.0" in credit and "10.17632/rscbjbr9sj.2" in credit and "10.1016/j.cell.2018.02.010" in credit
    assert all(Path(f).name in credit for f in films)


@pytest.mark.slow
def test_readme_from_a_fresh_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    """``git clone`` into an empty folder, then the quick start and the snippet there, without ../shared."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "pneumo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pneumo"]  # nothing beside it: no shared/
    work = tmp_path / "work"
    work.mkdir()
    check_quick_start(clone, work)
    check_python_snippet(clone, work)
