"""``pneumo predict``'s output: one row per input, written atomically, output paths checked first.

Kept out of the command module so the rules that make the CLI lose no rows (check before
predicting, temporary file then rename, an error row for every input) and the rules that keep
it safe (never replace what is not a regular file, never print a control character a file name
carries) read in one place.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import tempfile
import unicodedata
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


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ``\\u202e``), safe to print on one line.

    A file may be named ``evil.jpeg\\nchild42.jpeg\\tNORMAL\\tp=0.010``: printed raw, that name
    forges a NORMAL row for another child, and escape sequences (``\\x1b[...``) or bidirectional
    overrides can rewrite what the terminal shows. Control (Cc), format (Cf) and line/paragraph
    separator (Zl, Zp) characters are written as Python escapes; everything else, accents and
    non-Latin scripts included, is printed as it is.
    """
    out = []
    for char in str(text):
        if unicodedata.category(char) in _UNPRINTABLE:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or ascii(char)[1:-1])
        else:
            out.append(char)
    return "".join(out)


_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _refuse_non_regular(out: Path) -> str | None:
    """Why ``out`` must not be replaced (it exists and is not a regular file), or None when it may be."""
    try:
        mode = os.lstat(out).st_mode
    except OSError:  # absent, or its folder cannot be reached: the write check says why, if it matters
        return None
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a symbolic link"
        if stat.S_ISLNK(mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    return f"{printable(out)} is {kind}; give the path of a regular file to write (it is replaced, never followed)"


def check_output(out: Path, fail: Callable[[str], object]) -> None:
    """Fail now (exit 2) when ``out`` cannot be written: not a regular file, a parent that cannot be created,
    no permission.

    The results are written to a temporary file and renamed over ``out``; a rename replaces
    whatever sits there, so a device (``--json /dev/null`` as root replaced ``/dev/null`` with a
    regular file), a FIFO or a symbolic link at ``out`` is refused instead of being destroyed.
    """
    refusal = _refuse_non_regular(out)
    if refusal is not None:
        fail(f"{refusal}. Nothing was predicted.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name[:50]}.", suffix=".check"):
            pass  # a file can be created next to it, so the atomic rename at the end can succeed too
    except OSError as err:
        fail(f"cannot write {printable(out)} ({err.strerror or err}); choose another path. Nothing was predicted.")


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
        refusal = _refuse_non_regular(out)  # again: something may have been put there while predicting
        if refusal is not None:
            raise OSError(refusal)
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
