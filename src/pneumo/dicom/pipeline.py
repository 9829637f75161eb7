"""The supervised pipeline behind the SCP: spool -> analyse -> deliver, in which no exception ends a stage.

Every instance the SCP acknowledged (0x0000) is in ``SPOOL/incoming``; from there it ends, within
a bound, either delivered or as a dead letter in ``SPOOL/failed`` with its reason:

* each stage is a thread that runs rounds; an exception in one item is that item's failure (it is
  retried with exponential backoff, then dead-lettered after :attr:`RetryPolicy.max_attempts`), an
  exception outside an item is logged and the round starts again, and a supervisor restarts a
  stage whose thread died anyway (a ``BaseException``), counting the restart;
* a destination that refuses a SOP class gets the objects it accepts; each refused object is a
  dead letter with the destination's answer, and the delivery is audited as ``partial``;
* a destination that cannot be reached costs every due item one attempt (no head-of-line
  blocking, no retrying every 5 s forever);
* when no delivery is waiting, the analyse stage sends the results at once (nothing staged, no
  extra fsync on the common path); whatever was not stored is staged in ``SPOOL/outgoing`` for
  the deliver stage, which alone retries;
* the supervisor rewrites ``SPOOL/status.json`` (queue depth, oldest item, failures, dead letters,
  last delivery, stage liveness) for ``pneumo dicom status``, whose health check fails when a
  stage is not alive or the status is stale (the node is gone).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.dicom.analysis import Analyser
from pneumo.dicom.audit import AuditLog
from pneumo.dicom.delivery import DeliveryReport, Destination, send
from pneumo.dicom.spool import Spool, read_json, write_json

log = logging.getLogger(__name__)

#: A stage whose heartbeat is older than this is reported stalled (an item may take long, not this long).
STALL_S = 600.0
#: ``status.json`` older than this means no node is writing it.
STATUS_STALE_S = 15.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often an item is tried before it becomes a dead letter, and how long between tries."""

    max_attempts: int = 10
    first_delay_s: float = 2.0
    max_delay_s: float = 300.0

    def delay(self, attempts: int) -> float:
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** max(0, attempts - 1)))


@dataclass
class Stage:
    """One supervised thread: its round function, liveness and error counts."""

    name: str
    round: Callable[[], float]
    thread: threading.Thread | None = None
    heartbeat: float = field(default_factory=time.time)
    restarts: int = 0
    errors: int = 0
    last_error: str | None = None
    wake: threading.Event = field(default_factory=threading.Event)

    def describe(self, now: float) -> dict[str, Any]:
        alive = self.thread is not None and self.thread.is_alive() and now - self.heartbeat < STALL_S
        return {
            "alive": alive,
            "heartbeat_age_s": round(now - self.heartbeat, 1),
            "restarts": self.restarts,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class Pipeline:
    """Analysis and delivery stages over a :class:`Spool`, under a supervisor.

    Args:
        spool: the spool (its ``incoming/`` is fed by the SCP).
        analyser: the analysis (model, heatmap, intended use).
        destination: where results go.
        audit: the audit log.
        ae_title: the AE title results are sent with.
        retry: retries and backoff, for analysis and delivery alike.
        send_timeout: ACSE/DIMSE/network timeout of the delivery association.
        receive_alive: reports whether the SCP still listens (shown as the ``receive`` stage).
    """

    def __init__(
        self,
        spool: Spool,
        analyser: Analyser,
        destination: Destination,
        audit: AuditLog,
        ae_title: str,
        retry: RetryPolicy = RetryPolicy(),
        send_timeout: float = 30.0,
        receive_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.spool = spool
        self.analyser = analyser
        self.destination = destination
        self.audit = audit
        self.ae_title = ae_title
        self.retry = retry
        self.send_timeout = send_timeout
        self.receive_alive = receive_alive
        self.stages = {
            "analyse": Stage("analyse", self._analyse_round),
            "deliver": Stage("deliver", self._deliver_round),
        }
        self.failures: deque[dict[str, Any]] = deque(maxlen=50)
        self._failures_lock = threading.Lock()
        self.last_delivery: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # --- life cycle ---

    def start(self) -> None:
        self._stop.clear()
        for stage in self.stages.values():
            self._start_stage(stage)
        self._supervisor = threading.Thread(target=self._supervise, name="pneumo-dicom-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self, timeout: float = 120.0) -> None:
        """Stop after the items in hand; what is left stays in the spool for the next start."""
        self._stop.set()
        for stage in self.stages.values():
            stage.wake.set()
        for thread in [self._supervisor, *(stage.thread for stage in self.stages.values())]:
            if thread is not None:
                thread.join(timeout=timeout)
        self.write_status()

    def wake(self, name: str = "analyse") -> None:
        self.stages[name].wake.set()

    def _start_stage(self, stage: Stage) -> None:
        stage.heartbeat = time.time()
        stage.thread = threading.Thread(target=self._run, args=(stage,), name=f"pneumo-dicom-{stage.name}", daemon=True)
        stage.thread.start()

    def _run(self, stage: Stage) -> None:
        while not self._stop.is_set():
            stage.heartbeat = time.time()
            try:
                wait = stage.round()
            except Exception as err:  # outside any item: log, count, start the round again
                stage.errors += 1
                stage.last_error = f"{type(err).__name__}: {err}"[:300]
                log.exception("The %s stage failed outside an item; it goes on.", stage.name)
                wait = 1.0
            stage.wake.wait(wait)
            stage.wake.clear()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for stage in self.stages.values():
                if stage.thread is not None and not stage.thread.is_alive() and not self._stop.is_set():
                    stage.restarts += 1
                    log.error("The %s stage died (restart %d); restarting it.", stage.name, stage.restarts)
                    self._start_stage(stage)
            try:
                self.write_status()
            except Exception:  # a status that cannot be written must not end supervision
                log.exception("status.json could not be written")

    # --- analysis: incoming/<uid>.dcm -> outgoing/<uid>/ ---

    def _analyse_round(self) -> float:
        now = time.time()
        waiting: list[float] = []
        for path in self.spool.pending():
            if self._stop.is_set():
                break
            meta = read_json(path.with_suffix(".json"))
            if meta.get("next_try", 0) > now:
                waiting.append(meta["next_try"] - now)
                continue
            self.stages["analyse"].heartbeat = time.time()
            try:
                self._analyse_one(path, meta)
            except Exception as err:
                log.exception("Analysis of spool file %s failed.", path.name)
                self._item_failed(
                    "analyse", path.stem, [path, path.with_suffix(".json")], meta, err, path.with_suffix(".json")
                )
        return min([1.0, *waiting])

    def _analyse_one(self, path: Path, meta: dict[str, Any]) -> None:
        outcome = self.analyser.analyse(path)
        sender = {key: meta.get(key) for key in ("calling_ae", "called_ae", "peer")}
        channel = meta.get("channel", "dimse")
        record = self.audit.event("instance_analysed", channel=channel, **sender, **outcome.audit_fields())
        if outcome.status == "rejected":  # e.g. a file dropped into the spool by hand: kept, never deleted
            os.replace(path, self.spool.rejected / path.name)
            self.spool.enforce_quota(self.spool.rejected)
        elif outcome.objects:
            item = {**record, "received": meta.get("received", path.stat().st_mtime), "attempts": 0, "next_try": 0}
            waiting = outcome.objects
            if not self.spool.deliveries():  # no backlog (the destination answers): send now, stage nothing
                report = self._send(outcome.objects)
                if report.stored:
                    self._audit_delivery(item, [outcome.objects[i] for i in report.stored], report.complete)
                waiting = [ds for i, ds in enumerate(outcome.objects) if i not in report.stored]
            if waiting:  # what was not stored goes to the deliver stage: retries, refusals, dead letters
                self.spool.stage_result(outcome.sop_instance_uid or path.stem, waiting, item)
                self.wake("deliver")
        if path.exists():
            path.unlink()
        path.with_suffix(".json").unlink(missing_ok=True)
        del outcome
        release_memory()

    # --- delivery: outgoing/<uid>/ -> destination ---

    def _deliver_round(self) -> float:
        now = time.time()
        waiting: list[float] = []
        unreachable: str | None = None
        for folder in self.spool.deliveries():
            if self._stop.is_set():
                break
            item = read_json(folder / "item.json")
            if item.get("next_try", 0) > now:
                waiting.append(item["next_try"] - now)
                continue
            files = sorted(folder.glob("*.dcm"))
            self.stages["deliver"].heartbeat = time.time()
            if unreachable is not None:  # the destination is down: this item fails the same way, unsent
                report = DeliveryReport(failed=dict.fromkeys(range(len(files)), unreachable))
            else:
                report = self._send(files)
                if files and not report.stored and len(report.failed) == len(files):
                    unreachable = next(iter(report.failed.values()))
            self._delivered(folder, item, files, report)
            if item.get("next_try", 0) > now:
                waiting.append(item["next_try"] - now)
        return min([5.0, *waiting])

    def _send(self, objects: list[Any]) -> DeliveryReport:
        try:
            return send(self.destination, objects, self.ae_title, timeout=self.send_timeout)
        except Exception as err:  # whatever it was, every object waits for the next attempt
            return DeliveryReport(failed=dict.fromkeys(range(len(objects)), f"{type(err).__name__}: {err}"))

    def _audit_delivery(self, item: dict[str, Any], stored: list[Any], complete: bool) -> None:
        sender = {key: item.get(key) for key in ("channel", "calling_ae", "called_ae", "peer")}
        uid = item.get("sop_instance_uid")
        uids = [_uid_of(obj.name) if isinstance(obj, Path) else str(obj.SOPInstanceUID) for obj in stored]
        outcome = "delivered" if complete else "partial"
        self.audit.event("result_delivered", **sender, sop_instance_uid=uid, outcome=outcome, result_uids=uids)
        self.last_delivery = {"time": time.time(), "sop_instance_uid": uid, "result_uids": uids}

    def _delivered(self, folder: Path, item: dict[str, Any], files: list[Path], report: DeliveryReport) -> None:
        uid = item.get("sop_instance_uid")
        sender = {key: item.get(key) for key in ("channel", "calling_ae", "called_ae", "peer")}
        for index in report.stored:
            files[index].unlink(missing_ok=True)
        for index, reason in report.refused.items():
            path = files[index]
            entry = self.spool.dead_letter([path], uid, {"stage": "deliver", "reason": reason, "file": path.name})
            self._note_failure("deliver", uid, reason, int(item.get("attempts", 0)) + 1, dead=True)
            self.audit.event(
                "dead_letter", **sender, sop_instance_uid=uid, outcome="refused", reason=reason,
                result_uids=[_uid_of(path.name)], detail={"entry": entry.name},
            )  # fmt: skip
        if report.stored:
            self._audit_delivery(item, [files[i] for i in report.stored], report.complete)
        if report.failed:
            reason = next(iter(report.failed.values()))
            failed = [files[i] for i in report.failed]
            self._item_failed("deliver", uid, failed, item, RuntimeError(reason), folder / "item.json")
        if not any(folder.glob("*.dcm")):
            for leftover in folder.iterdir():
                leftover.unlink(missing_ok=True)
            folder.rmdir()

    # --- failures: retry with backoff, then a dead letter ---

    def _item_failed(
        self, stage: str, uid: str | None, paths: list[Path], state: dict[str, Any], err: Exception, state_file: Path
    ) -> None:
        attempts = int(state.get("attempts", 0)) + 1
        reason = str(err)[:500] if stage == "deliver" else f"{type(err).__name__}: {err}"[:500]
        sender = {key: state.get(key) for key in ("channel", "calling_ae", "called_ae", "peer")}
        if attempts >= self.retry.max_attempts:
            entry = self.spool.dead_letter(
                [p for p in paths if p.exists()], uid, {"stage": stage, "reason": reason, "attempts": attempts}
            )
            self._note_failure(stage, uid, reason, attempts, dead=True)
            self.audit.event(
                "dead_letter", **sender, sop_instance_uid=uid, outcome="gave_up", reason=reason,
                detail={"stage": stage, "attempts": attempts, "entry": entry.name},
            )  # fmt: skip
            log.error(
                "Gave up on %s after %d attempt(s) in %s: %s (dead letter %s)", uid, attempts, stage, reason, entry
            )
            if stage == "deliver" and state_file.parent.is_dir() and not any(state_file.parent.glob("*.dcm")):
                state_file.unlink(missing_ok=True)
            return
        state.update(attempts=attempts, next_try=time.time() + self.retry.delay(attempts), last_error=reason)
        if state_file.parent.is_dir():
            write_json(state_file, state)
        self._note_failure(stage, uid, reason, attempts, dead=False)
        self.audit.event(
            "delivery_failed" if stage == "deliver" else "analysis_failed", **sender, sop_instance_uid=uid,
            outcome="retry", reason=reason, detail={"attempts": attempts, "retry_in_s": self.retry.delay(attempts)},
        )  # fmt: skip

    def _note_failure(self, stage: str, uid: str | None, reason: str, attempts: int, dead: bool) -> None:
        with self._failures_lock:
            self.failures.append(
                {"time": time.time(), "stage": stage, "sop_instance_uid": uid, "reason": reason,
                 "attempts": attempts, "dead_letter": dead}
            )  # fmt: skip

    # --- status and health ---

    def status(self) -> dict[str, Any]:
        now = time.time()
        stages = {"receive": {"alive": bool(self.receive_alive())}}
        stages.update({name: stage.describe(now) for name, stage in self.stages.items()})
        pending, outgoing = self.spool.pending(), self.spool.deliveries()
        ages = [now - p.stat().st_mtime for p in pending if p.exists()]
        ages += [now - float(read_json(f / "item.json").get("received", now)) for f in outgoing]
        with self._failures_lock:
            failures = list(self.failures)
        problems = [f"{name} stage is not alive" for name, stage in stages.items() if not stage["alive"]]
        if not self.audit.healthy:
            problems.append(f"audit log cannot be written ({self.audit.error}); {self.audit.backlog} line(s) waiting")
        return {
            "time": now,
            "pid": os.getpid(),
            "healthy": not problems,
            "problems": problems,
            "stages": stages,
            "queue": {
                "incoming": len(pending),
                "outgoing": len(outgoing),
                "oldest_age_s": round(max(ages), 1) if ages else None,
            },
            "failures": failures[-20:],
            "dead_letters": self.spool.count(self.spool.failed),
            "last_delivery": self.last_delivery,
            "audit": {"healthy": self.audit.healthy, "error": self.audit.error, "backlog": self.audit.backlog},
        }

    def write_status(self) -> None:
        write_json(self.spool.status_file, self.status())


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (one per thread by default): a threaded server keeps tens of MB in them.

    Call it once, early, in the process that runs the node (``pneumo dicom listen`` does); elsewhere a no-op.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_memory() -> None:
    """Hand the heap's free pages back to the system after an item (a film's buffers are tens of MB)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another C library: nothing to tune
        return None


def _uid_of(file_name: str) -> str:
    """The SOP Instance UID in a spooled result's file name (``NN-<uid>.dcm``)."""
    return file_name.split("-", 1)[-1].removesuffix(".dcm")
