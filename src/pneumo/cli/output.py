"""``pneumo predict``'s output: one row per input, written atomically, output paths checked first.

Kept out of the command module so the rules that make the CLI lose no rows (check before
predicting, temporary file then rename, an error row for every input) read in one place.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def prediction_rows(files: list[Path], results: list[Any]) -> list[dict[str, Any]]:
    """One JSON-able row per file: the prediction's fields, or ``file`` + ``error``."""
    from pneumo.core.errors import PneumoError

    rows: list[dict[str, Any]] = []
    for path, result in zip(files, results, strict=True):
        if isinstance(result, PneumoError):
            rows.append({"file": str(path), "error": result.to_dict()})
        else:
            row = result.to_dict()
            row.pop("source", None)
            rows.append({"file": str(path), **row})
    return rows


def check_output(out: Path, fail: Callable[[str], object]) -> None:
    """Fail now (exit 2) when ``out`` cannot be written: a folder, a parent that cannot be created, no permission."""
    try:
        if out.is_dir():
            fail(f"{out} is a folder; give the path of the file to write.")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name[:50]}.", suffix=".check"):
            pass  # a file can be created next to it, so the atomic rename at the end can succeed too
    except OSError as err:
        fail(f"cannot write {out} ({err.strerror or err}); choose another path. Nothing was predicted.")


def _write_atomically(out: Path, write: Callable[[IO[str]], object]) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.NamedTemporaryFile(
        "w", dir=out.parent, prefix=f".{out.name[:50]}.", suffix=".tmp", delete=False, newline="", encoding="utf-8"
    ) as handle:
        temporary = Path(handle.name)
        try:
            write(handle)
        except BaseException:
            handle.close()
            temporary.unlink(missing_ok=True)
            raise
    try:
        temporary.chmod(0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_rows(
    rows: list[dict[str, Any]], json_out: Path | None, csv_out: Path | None, fail: Callable[[str, int], object]
) -> None:
    """Write ``rows`` to JSON and/or CSV atomically; ``fail(message, code)`` reports a write that failed."""
    fields = ["file", "label", "probability", "threshold", "ood_score", "error_code", "error_message"]

    def write_csv(handle: IO[str]) -> None:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            error = row.get("error") or {}
            writer.writerow({**row, "error_code": error.get("code", ""), "error_message": error.get("message", "")})

    try:
        if json_out is not None:
            _write_atomically(json_out, lambda handle: handle.write(json.dumps(rows, indent=2) + "\n"))
        if csv_out is not None:
            _write_atomically(csv_out, write_csv)
    except OSError as err:  # the disk filled up or the folder vanished since the check: say so, keep the rows
        fail(f"the results could not be written ({err.strerror or err}); they are printed above.", 1)
