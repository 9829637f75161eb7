"""The node's spool: where every acknowledged instance lives until its result is delivered or dead-lettered.

::

    SPOOL/tmp/                   instances arriving (pynetdicom writes them here as they come) and .part files
    SPOOL/incoming/<uid>.dcm     acknowledged, waiting for analysis (+ <uid>.json: who sent it, attempts)
    SPOOL/outgoing/<uid>/        analysed: the objects to deliver (*.dcm) and item.json (audit fields, attempts)
    SPOOL/failed/<uid>/          dead letters: what could not be answered or delivered, and reason.json
                                 (built as failed/.<uid>.staging, renamed into place whole)
    SPOOL/rejected/              datasets answered 0xC210 (unparseable), kept for inspection
    SPOOL/status.json            what ``pneumo dicom status`` shows, rewritten by the running node

Files move between folders by atomic rename only, after an ``fsync``, so a crash at any moment
leaves each instance in exactly one stage. ``tmp/`` is emptied at start (a ``.part`` file used to
survive a disk-full and a restart forever), and ``rejected/`` and ``failed/`` are held under a
quota (count and bytes; the oldest entries go first, each removal logged).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9.]{1,64}")
#: Suffix of a dead-letter entry being built (hidden: a leading dot), see :meth:`Spool.dead_letter`.
_STAGING = ".staging"
_COPY_CHUNK = 1 << 20


def safe_name(uid: str | None) -> str:
    """A file name for ``uid``: the UID itself when it is one, else a random name (never a path from the network)."""
    return uid if uid and _UID.fullmatch(uid) else f"x{uuid.uuid4().hex}"


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` next to ``path`` and rename it into place (readers never see half a file)."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        temp.write_text(json.dumps(data, default=str, indent=1), encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Quota:
    """How much a keep-for-inspection folder may hold before its oldest entries are removed."""

    max_entries: int = 1000
    max_bytes: int = 2 * 2**30


class SpoolFullError(OSError):
    """The spool's file system has less free space than the node keeps in reserve."""


class Spool:
    """The folders of the spool, and the moves between them (see the module docstring).

    Args:
        root: the spool folder (created).
        min_free_bytes: refuse new instances (0xA700) when the file system has less free space than this.
        rejected_quota, failed_quota: limits of ``rejected/`` and ``failed/``.
    """

    def __init__(
        self,
        root: Path,
        min_free_bytes: int = 256 * 2**20,
        rejected_quota: Quota = Quota(200, 2**30),
        failed_quota: Quota = Quota(),
    ) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        self.outgoing = root / "outgoing"
        self.failed = root / "failed"
        self.rejected = root / "rejected"
        self.status_file = root / "status.json"
        self.min_free_bytes = min_free_bytes
        self.quotas = {self.rejected: rejected_quota, self.failed: failed_quota}
        for folder in (self.tmp, self.incoming, self.outgoing, self.failed, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)

    # --- start-up cleanup and quotas ---

    def clean(self) -> int:
        """Remove left-overs of interrupted writes (``tmp/`` and ``.part`` files anywhere); returns how many."""
        removed = 0
        for path in [*self.tmp.iterdir(), *self.root.rglob(".*.part")]:
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.warning("Removed %d left-over partial file(s) of interrupted writes from the spool.", removed)
        for staging in self.failed.glob(f".*{_STAGING}"):  # dead letters interrupted by a crash
            if not any(staging.iterdir()):  # the crash came before its reason was written: nothing was moved
                staging.rmdir()
                continue
            name = staging.name[1 : -len(_STAGING)]
            os.replace(staging, self.failed / name)
            log.warning("Finished the interrupted dead letter %s.", name)
        for folder in self.quotas:
            self.enforce_quota(folder)
        return removed

    def enforce_quota(self, folder: Path) -> None:
        quota = self.quotas[folder]
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=_mtime)  # not in-flight
        sizes = {entry: _size(entry) for entry in entries}
        total = sum(sizes.values())
        while entries and (len(entries) > quota.max_entries or total > quota.max_bytes):
            oldest = entries.pop(0)
            total -= sizes[oldest]
            shutil.rmtree(oldest, ignore_errors=True) if oldest.is_dir() else oldest.unlink(missing_ok=True)
            log.warning(
                "%s/ is over its quota (%d entries, %d MB); removed its oldest entry %s.",
                folder.name,
                quota.max_entries,
                quota.max_bytes // 2**20,
                oldest.name,
            )

    def check_free_space(self) -> None:
        """Raise :class:`SpoolFullError` when accepting one more instance would eat the reserve."""
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise SpoolFullError(
                28,
                f"only {free // 2**20} MB free on the spool's file system (reserve {self.min_free_bytes // 2**20} MB)",
            )

    # --- receiving ---

    def adopt(self, received: Path | bytes, uid: str | None, folder: Path, meta: dict[str, Any] | None = None) -> Path:
        """Make ``received`` (a file pynetdicom wrote, or bytes) durable as ``folder/<uid>.dcm``.

        The data is fsynced, renamed into place atomically and the folder fsynced, so a sender hears
        "success" only for an instance that survives a crash. A failure leaves no partial file.
        """
        target = folder / f"{safe_name(uid)}.dcm"
        temp = self.tmp / f".{uuid.uuid4().hex}.part"
        try:
            if isinstance(received, bytes):
                with temp.open("wb") as handle:
                    handle.write(received)
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                _copy_or_link(received, temp)
            if meta is not None:
                write_json(target.with_suffix(".json"), meta)
            os.replace(temp, target)
            fsync_dir(folder)
        finally:
            temp.unlink(missing_ok=True)
        if folder in self.quotas:
            self.enforce_quota(folder)
        return target

    # --- the queues ---

    def pending(self) -> list[Path]:
        """Instances waiting for analysis, oldest first."""
        return _oldest_first(p for p in self.incoming.glob("*.dcm") if p.is_file())

    def deliveries(self) -> list[Path]:
        """Analysed items waiting for delivery (folders), oldest first."""
        return _oldest_first(p for p in self.outgoing.iterdir() if p.is_dir() and (p / "item.json").is_file())

    def stage_result(self, uid: str | None, objects: list[Any], item: dict[str, Any]) -> Path:
        """Write the objects of one outcome as an outgoing item (built in ``tmp/``, renamed into ``outgoing/``)."""
        name = safe_name(uid)
        build = self.tmp / f"{name}.{uuid.uuid4().hex}"
        build.mkdir()
        try:
            for index, dataset in enumerate(objects):
                path = build / f"{index:02d}-{safe_name(str(dataset.SOPInstanceUID))}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                with path.open("rb+") as handle:
                    os.fsync(handle.fileno())
            write_json(build / "item.json", item)
            target = self.outgoing / name
            if target.exists():  # the same instance was received again and analysed again: newest wins
                shutil.rmtree(target)
            os.replace(build, target)
            fsync_dir(self.outgoing)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return target

    def dead_letter(self, paths: list[Path], uid: str | None, reason: dict[str, Any]) -> Path:
        """Move ``paths`` (files) into ``failed/<uid>/`` with ``reason.json``; returns the entry.

        The entry is built under a hidden name in ``failed/`` (reason first, then the files) and renamed
        into place whole: the health count and ``pneumo dicom status`` never see an entry without its
        reason, and after a crash mid-way :meth:`clean` finds the hidden one, reason included, and
        finishes it. Not built in ``tmp/``: ``clean`` empties that, and the files would be lost with it.
        """
        name = f"{safe_name(uid)}-{uuid.uuid4().hex[:8]}"
        staging = self.failed / f".{name}{_STAGING}"
        staging.mkdir(parents=True)
        write_json(staging / "reason.json", {**reason, "sop_instance_uid": uid, "time": time.time()})
        for path in paths:
            if path.exists():
                os.replace(path, staging / path.name)
        entry = self.failed / name
        os.replace(staging, entry)
        fsync_dir(self.failed)
        self.enforce_quota(self.failed)
        return entry

    def dead_letters(self, newest: int = 20) -> list[dict[str, Any]]:
        """The newest dead-letter reasons (for ``pneumo dicom status``)."""
        entries = sorted(
            (p for p in self.failed.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_mtime, reverse=True
        )
        return [read_json(entry / "reason.json") | {"entry": entry.name} for entry in entries[:newest]]

    def count(self, folder: Path) -> int:
        return sum(1 for p in folder.iterdir() if not p.name.startswith("."))


def _copy_or_link(source: Path, temp: Path) -> None:
    """``temp`` becomes a durable copy of ``source``: a hard link on the same file system, else a chunked copy."""
    try:
        os.link(source, temp)
    except OSError:
        with source.open("rb") as reader, temp.open("wb") as writer:
            while chunk := reader.read(_COPY_CHUNK):
                writer.write(chunk)
    with temp.open("rb+") as handle:
        os.fsync(handle.fileno())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _oldest_first(paths: Iterator[Path] | Any) -> list[Path]:
    return sorted(paths, key=lambda p: (_mtime(p), p.name))
