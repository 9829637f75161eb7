"""What a prediction is asked about: a file, an upload's bytes, or a folder of files to expand.

The Predictor accepts a :data:`Source` (a path or the bytes of an upload); the CLI and the
benchmark expand folders with :func:`iter_image_files`, which lists everything, so that a file
that is not an image gets an error row instead of being skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: One input: a path, or the bytes of an upload.
Source = str | Path | bytes


def name_of(source: Source) -> str | None:
    """The file name of a path source (shown in results and errors); None for bytes."""
    return str(source) if isinstance(source, str | Path) else None


def iter_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of files to predict.

    Every entry inside a folder that is not itself a folder is included, whatever its extension
    or kind (regular file, broken symbolic link, FIFO, device), so that anything that is not an
    image gets an error row instead of being skipped silently; a subfolder that cannot be listed
    is included too, for its ``unreadable_file`` row. Hidden entries are ignored. Paths named
    explicitly are kept as given, even when they cannot be examined (a name too long): their
    row says why. Symbolic links to folders are followed, each real folder once.
    """
    files: list[Path] = []
    for entry in map(Path, paths):
        try:
            is_dir = entry.is_dir()
        except OSError:  # name too long, permission denied on a parent: read_bytes explains it in the row
            is_dir = False
        if not is_dir:
            files.append(entry)
            continue
        files.extend(_walk(entry))
    return files


def _walk(root: Path) -> list[Path]:
    """Every non-folder entry under ``root`` and every folder that cannot be listed, sorted; hidden ones skipped."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(
        root, followlinks=True, onerror=lambda err: found.append(Path(err.filename))
    ):
        here = Path(folder)
        info = here.stat()
        if (info.st_dev, info.st_ino) in seen:  # a link loop, or a folder reached twice through links
            subfolders.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(here / name for name in names if not name.startswith("."))
    return sorted(found)
