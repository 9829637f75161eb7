"""``pneumo predict`` loses no rows (issue 12, F6 and F7): bad output paths fail before predicting,
results are written atomically, and every input that cannot be read gets its own error row.

The command runs as a real process. Root reads files whatever their permissions, so where the
tests run as root the command is started without the capabilities that allow it
(``setpriv``: no CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), as an ordinary user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from app_helpers import xray_bytes
from model_helpers import SURFACE_META, tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle"), head="wide", **SURFACE_META)[0]


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


def predict(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [*_as_user(), sys.executable, "-m", "pneumo.cli", "predict", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def _rows(path: Path) -> dict[str, dict]:
    return {Path(row["file"]).name: row for row in json.loads(path.read_text())}


def test_json_output_that_is_a_folder_fails_before_predicting(bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.jpeg"
    image.write_bytes(xray_bytes("a"))
    result = predict(image, "--model", bundle, "--json", tmp_path)
    assert result.returncode == 2
    assert "is a folder" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert "a.jpeg" not in result.stdout  # refused before predicting, not after


def test_csv_output_whose_folder_cannot_be_created_fails_before_predicting(bundle: Path, tmp_path: Path) -> None:
    image, blocker = tmp_path / "a.jpeg", tmp_path / "plain-file"
    image.write_bytes(xray_bytes("a"))
    blocker.write_text("not a folder")
    result = predict(image, "--model", bundle, "--csv", blocker / "sub" / "out.csv")
    assert result.returncode == 2
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_read_only_output_folder_fails_before_predicting(bundle: Path, tmp_path: Path) -> None:
    image, locked = tmp_path / "a.jpeg", tmp_path / "locked"
    image.write_bytes(xray_bytes("a"))
    locked.mkdir(mode=0o555)
    result = predict(image, "--model", bundle, "--json", locked / "out.json")
    assert result.returncode == 2 and "cannot write" in result.stderr
    assert not (locked / "out.json").exists()


def test_every_unreadable_input_gets_its_own_row(bundle: Path, tmp_path: Path) -> None:
    """F7: explicit and discovered paths that cannot be read each get a row; the good ones are predicted."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "good.jpeg").write_bytes(xray_bytes("good"))
    (folder / "dangling.jpeg").symlink_to(folder / "gone.jpeg")
    os.mkfifo(folder / "pipe.jpeg")
    locked_dir = folder / "locked"
    locked_dir.mkdir()
    (locked_dir / "inside.jpeg").write_bytes(xray_bytes("inside"))
    locked_dir.chmod(0)
    (folder / ".hidden.jpeg").write_bytes(xray_bytes("hidden"))
    unreadable = tmp_path / "unreadable.jpeg"
    unreadable.write_bytes(xray_bytes("unreadable"))
    unreadable.chmod(0)
    long_name = tmp_path / ("x" * 300 + ".jpeg")
    explicit_good = tmp_path / "explicit.jpeg"
    explicit_good.write_bytes(xray_bytes("explicit"))
    out = tmp_path / "out" / "rows.json"
    try:
        result = predict(unreadable, long_name, folder, explicit_good, "--model", bundle, "--json", out)
    finally:
        locked_dir.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    rows = json.loads(out.read_text())
    names = [Path(row["file"]).name for row in rows]
    assert names == [
        unreadable.name,
        long_name.name,
        "dangling.jpeg",
        "good.jpeg",
        "locked",
        "pipe.jpeg",
        "explicit.jpeg",
    ]
    by_name = _rows(out)
    codes = {name: row.get("error", {}).get("code") for name, row in by_name.items()}
    assert codes == {
        unreadable.name: "unreadable_file",
        long_name.name: "unreadable_file",
        "dangling.jpeg": "file_not_found",
        "good.jpeg": None,
        "locked": "unreadable_file",
        "pipe.jpeg": "unreadable_file",
        "explicit.jpeg": None,
    }
    assert "broken symbolic link" in by_name["dangling.jpeg"]["error"]["message"]
    assert "named pipe" in by_name["pipe.jpeg"]["error"]["message"]
    assert "cannot be listed" in by_name["locked"]["error"]["message"]
    assert "5 failed" in result.stderr


def test_results_are_written_atomically_with_ordinary_permissions(bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.jpeg"
    image.write_bytes(xray_bytes("a"))
    out_json, out_csv = tmp_path / "res" / "rows.json", tmp_path / "res" / "rows.csv"
    out_json.parent.mkdir()
    out_json.write_text("old results")
    result = predict(image, "--model", bundle, "--json", out_json, "--csv", out_csv)
    assert result.returncode == 0, result.stderr
    assert [row["file"] for row in json.loads(out_json.read_text())] == [str(image)]
    assert out_csv.read_text().splitlines()[0].startswith("file,label,probability")
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["rows.csv", "rows.json"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert out_json.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ issue 22, item 1: safe outputs


def _special_outputs(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symbolic link to a file and (where this process may create one) a character device."""
    fifo, target, link = tmp_path / "pipe.json", tmp_path / "precious.txt", tmp_path / "link.json"
    os.mkfifo(fifo)
    target.write_text("precious")
    link.symlink_to(target)
    outputs = {"fifo": fifo, "symlink": link}
    device = tmp_path / "null.json"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
        outputs["device"] = device
    except OSError:
        pass  # not root (CAP_MKNOD): the FIFO and the link still test the rule
    return outputs


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_an_output_that_is_not_a_regular_file_is_refused_not_replaced(
    bundle: Path, tmp_path: Path, option: str
) -> None:
    """Item 1: the atomic rename replaced whatever sat at the output path (as root, ``--json /dev/null``
    turned /dev/null into a regular file)."""
    image = tmp_path / "a.jpeg"
    image.write_bytes(xray_bytes("a"))
    for kind, out in _special_outputs(tmp_path).items():
        before = os.lstat(out)
        result = predict(image, "--model", bundle, option, out)
        assert result.returncode == 2, (kind, result.stderr)
        assert "regular file" in result.stderr and "Traceback" not in result.stderr, kind
        assert "a.jpeg" not in result.stdout, "refused before predicting"
        after = os.lstat(out)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino, kind
    assert (tmp_path / "precious.txt").read_text() == "precious"


def test_control_characters_in_file_names_are_escaped_in_printed_rows(bundle: Path, tmp_path: Path) -> None:
    """Item 1: a file named ``evil.jpeg\\nchild42.jpeg\\tNORMAL\\tp=0.010...`` printed a forged NORMAL row."""
    forged = "evil.jpeg\nchild42.jpeg\tNORMAL\tp=0.010\t(threshold 0.500)\x1b[2K\u202e"
    (tmp_path / forged).write_bytes(b"not an image")
    (tmp_path / "real.jpeg").write_bytes(xray_bytes("real"))
    result = predict(tmp_path / forged, tmp_path / "real.jpeg", "--model", bundle)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines  # one line per input, whatever the names hold
    assert not any(line.startswith("child42.jpeg") for line in lines)
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert lines[0].startswith(str(tmp_path / "evil.jpeg\\nchild42.jpeg\\tNORMAL\\tp=0.010"))
    assert "\\x1b[2K\\u202e\tERROR unsupported_format" in lines[0]
