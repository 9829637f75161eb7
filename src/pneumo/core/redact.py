"""Keep server file-system paths out of what pneumo writes into bundles and shows to users.

A training config records where its data, run and cache folders were (``/srv/data/chest_xray``);
copied into ``bundle.json`` and served by ``GET /v1/model`` or the app's sidebar, that tells
anyone who asks how the server's disks are laid out (issue 12, F5). :func:`strip_paths` keeps
only the last component of every absolute or home-relative path (``chest_xray``), which is
what a reader needs to recognise the data set; relative names are kept as they are.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Any


def _is_server_path(text: str) -> bool:
    if "://" in text:  # a URL is not a path on this server
        return False
    return (
        text.startswith(("~", "../", "..\\"))
        or PurePosixPath(text).is_absolute()
        or PureWindowsPath(text).is_absolute()
    )


def strip_paths(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every server path reduced to its name."""
    if isinstance(value, str):
        if not _is_server_path(value):
            return value
        name = PureWindowsPath(value).name if "\\" in value else PurePosixPath(value).name
        return name or "."
    if isinstance(value, dict):
        return {key: strip_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strip_paths(item) for item in value]
    return value
