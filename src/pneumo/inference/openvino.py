"""The OpenVINO backend: the bundle's own ONNX graphs, run by OpenVINO's CPU plugin (``pneumo[openvino]``).

Why: on x86 CPUs OpenVINO runs the same graphs faster than ONNX Runtime (its oneDNN kernels fuse
the QDQ pairs of the INT8 graph into int8 convolutions end to end). Measured side by side in one
process on an AMD EPYC with AVX-512 VNNI, 2 threads (``pneumo bench``, see docs/performance.md):
OpenVINO on the INT8 graph is the fastest of the four, ahead of OpenVINO on the fp32 graph, so
OpenVINO prefers the INT8 graph (:data:`GRAPH_ORDER`) where its check passes.

No second model format: OpenVINO's ONNX reader reads ``model_int8.onnx`` or ``model.onnx`` at load,
and the graph's provenance (weights hash, CAM head) is read from the ONNX metadata as for ONNX
Runtime. Compiling costs ~0.7 s of CPU; the compiled model is cached beside the ONNX exports
(``$PNEUMO_CACHE/openvino``, OpenVINO's own model cache, keyed by the file and the settings), so
later starts take ~0.1 s. Inference precision is pinned to
f32: on CPUs with bf16 units OpenVINO would otherwise run the fp32 parts in bf16, which is not
what the check measured.

**The check.** OpenVINO's kernels are not ONNX Runtime's, so the answers of a graph under OpenVINO
are checked against ONNX Runtime's fp32 graph exactly as the INT8 graph was
(:mod:`pneumo.modeling.runtime_check`, run by ``pneumo export openvino``): decision agreement
>= 99.5% and ROC AUC within 0.002, on the bundle's validation split and on held-out training
images. The figures are recorded in ``bundle.json`` (``runtime_checks``) per graph file (SHA-256),
OpenVINO release (year.minor) and CPU int8 instruction set (:func:`cpu_isa`: the kernels oneDNN
picks, and so the rounding, differ between AMX, AVX-512 VNNI, AVX-VNNI and plain AVX2). ``auto``
serves OpenVINO only with a passing record that matches all three; otherwise it logs why and
falls back to ONNX Runtime. A check at load could not use real validation images (none ship), and
re-running 1,800 images at every start would cost a minute; a record per (graph, release, CPU
kind) is what the INT8 graph already has, extended by the runtime.

CAM: :class:`OpenVinoRunner` has ``with_feature_map`` like :class:`~pneumo.inference.runners.OnnxRunner`
(the graph's third output), so :func:`pneumo.inference.cam.make_explainer` works on it unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pneumo.core.bundle import FEATURE_MAP_OUTPUT, INPUT_NAME, OUTPUT_NAMES, Backend, BundleMeta
from pneumo.core.environment import available_cores
from pneumo.inference.runners import (
    BackendError,
    Runner,
    cache_dir,
    file_sha256,
    find_int8,
    find_onnx,
    graph_metadata,
    register_backend,
)

log = logging.getLogger(__name__)

#: The backend's name (``Predictor(backend="openvino")``, ``PNEUMO_BACKEND=openvino``) and the runtime's in the checks.
RUNTIME = OPENVINO = "openvino"
#: The key of ``bundle.json`` holding the checks (a list of :class:`RuntimeCheck`).
CHECKS_KEY = "runtime_checks"
#: Which graph OpenVINO runs when both are there and checked, fastest first (measured: docs/performance.md).
GRAPH_ORDER = (Backend.INT8, Backend.FP32)
#: CPU flags that decide oneDNN's int8 kernels, best first (Linux ``/proc/cpuinfo`` names).
_ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


class RuntimeCheck(BaseModel):
    """One runtime's execution of one of the bundle's graphs, checked against ONNX Runtime's fp32 graph.

    Written by ``pneumo export openvino`` into ``bundle.json`` (:data:`CHECKS_KEY`); ``auto`` serves
    a graph with OpenVINO only with a passing check for that file, that release and that kind of CPU.
    Kept beside :class:`~pneumo.core.bundle.BundleMeta` as a key it carries through unread, and validated here.
    """

    model_config = ConfigDict(extra="allow")

    runtime: str = Field(min_length=1, max_length=50)
    version: str = Field(min_length=1, max_length=100)
    graph: str = Field(min_length=1, max_length=100)
    graph_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    cpu_isa: str = Field(min_length=1, max_length=50)
    passed_check: bool = False
    cpu: str = Field(default="", max_length=200)
    validation: dict[str, Any] = Field(default_factory=dict)
    heldout: dict[str, Any] = Field(default_factory=dict)


def read_checks(meta: BundleMeta) -> list[RuntimeCheck]:
    """The runtime checks ``bundle.json`` records; none (with a warning) when the section is malformed."""
    raw = meta.extra.get(CHECKS_KEY) or []
    try:
        if not isinstance(raw, list) or len(raw) > 256:
            raise ValueError(f"a list of at most 256 entries is expected, not {type(raw).__name__}")
        return [RuntimeCheck.model_validate(entry) for entry in raw]
    except (ValidationError, ValueError) as err:
        log.warning("bundle.json's %s cannot be read (%s); OpenVINO counts as unchecked.", CHECKS_KEY, err)
        return []


def write_checks(meta: BundleMeta, checks: list[RuntimeCheck]) -> None:
    """Set ``meta``'s runtime checks (written with ``bundle.json`` by :func:`pneumo.core.bundle.write_meta`)."""
    setattr(meta, CHECKS_KEY, [check.model_dump(mode="json") for check in checks])


def openvino_version() -> str | None:
    """The installed OpenVINO's version (``2026.4.1``), or None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("openvino")
    except PackageNotFoundError:
        return None


def release(version: str) -> str:
    """The release a version belongs to (``2026.4.1`` -> ``2026.4``): kernels change between releases."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


def cpu_isa() -> str:
    """The best int8 instruction set of this CPU (``avx512_vnni``, ...), ``unknown`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.partition(":")[2].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((flag for flag in _ISA_FLAGS if flag in flags), "unknown" if not flags else "other")


def _compile_cache() -> Path | None:
    """Where OpenVINO keeps compiled models (``$PNEUMO_CACHE/openvino``, beside the ONNX exports), if writable.

    Compiling the Lite1 graph costs ~0.7 s of CPU at every start; loading it from this cache ~0.1 s
    (one ~6 MB file per graph and thread count). None where the folder cannot be made (read-only home).
    """
    folder = cache_dir().parent / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


class OpenVinoRunner:
    """An OpenVINO CPU model with :meth:`Predictor.forward`'s contract: batch -> (logits, features).

    Settings: one stream with one thread per available core (the model is the only heavy work during
    a prediction, as for ONNX Runtime), the latency hint, f32 inference precision (no silent bf16).
    Thread-safe: each calling thread gets its own infer request (requests are not shareable; with one
    stream they run one after another).

    Args:
        path: the ``.onnx`` file (the bundle's INT8 graph or an fp32 export).
        graph: what the file is, ``"int8"`` or ``"fp32"`` (reported by the bench and ``/v1/model``).
        threads: inference threads; default: :func:`available_cores`.

    Raises:
        BackendError: OpenVINO is not installed, or cannot read the file, or the graph breaks the I/O contract.
    """

    kind = OPENVINO

    def __init__(self, path: str | Path, *, graph: str = Backend.INT8, threads: int | None = None) -> None:
        try:
            import openvino as ov
            import openvino.properties as props
            import openvino.properties.hint as hints
        except ImportError as err:
            raise BackendError("The OpenVINO backend needs openvino: pip install 'pneumo[openvino]'.") from err
        self.path = Path(path)
        #: Which of the bundle's graphs runs: ``"int8"`` or ``"fp32"``.
        self.graph = str(graph)
        self.threads = threads or available_cores()
        config = {
            props.inference_num_threads: self.threads,
            props.num_streams: 1,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            hints.inference_precision: ov.Type.f32,
        }
        cache = _compile_cache()
        if cache is not None:
            config[props.cache_dir] = str(cache)
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own for bad files
            raise BackendError(f"OpenVINO cannot load {self.path}: {err}", code="onnx_load_failed") from err
        inputs = [port.get_any_name() for port in self.compiled.inputs]
        outputs = [port.get_any_name() for port in self.compiled.outputs]
        if inputs != [INPUT_NAME] or outputs not in (list(OUTPUT_NAMES), [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT]):
            raise BackendError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                f"{list(OUTPUT_NAMES)} (+ {FEATURE_MAP_OUTPUT!r}). Export it with `pneumo export onnx`.",
                code="onnx_load_failed",
            )
        self._outputs = {name: self.compiled.output(name) for name in outputs}
        #: The graph's metadata (weights hash, architecture, CAM head), read from the ONNX file.
        self.metadata: dict[str, str] = graph_metadata(self.path)
        #: Whether :meth:`with_feature_map` works (the graph exports its last feature map).
        self.has_feature_map = FEATURE_MAP_OUTPUT in outputs
        self._local = threading.local()

    def _run(self, batch: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        results = request.infer({0: np.ascontiguousarray(batch, np.float32)}, share_outputs=False)
        return [np.asarray(results[self._outputs[name]]) for name in names]

    def with_threads(self, threads: int) -> OpenVinoRunner:
        """Another compiled model of the same graph with ``threads`` threads (batch work beside decoding)."""
        return OpenVinoRunner(self.path, graph=self.graph, threads=threads)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and pooled features (N, F) of a preprocessed float32 batch (N, 3, S, S)."""
        logits, features = self._run(batch, OUTPUT_NAMES)
        return logits, features

    def with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, pooled features and the last feature map (N, C, h, w), in one pass (for CAM)."""
        if not self.has_feature_map:
            raise BackendError(f"{self.path} does not export its feature map; re-export it.", code="onnx_no_cam")
        logits, features, feature_map = self._run(batch, (*OUTPUT_NAMES, FEATURE_MAP_OUTPUT))
        return logits, features, feature_map


# -------------------------------------------------------------------------------------- choosing


def bundle_graphs(bundle: Path, meta: BundleMeta) -> dict[str, Path]:
    """The bundle's valid graphs by kind (``int8``: its checked-in file; ``fp32``: its export, if any)."""
    graphs = {Backend.INT8.value: find_int8(bundle, meta), Backend.FP32.value: find_onnx(bundle, meta)}
    return {kind: path for kind, path in graphs.items() if path is not None}


def matching_check(meta: BundleMeta, graph: Path, kind: str, version: str, isa: str) -> tuple[RuntimeCheck | None, str]:
    """The passing record of ``meta`` that covers ``graph`` here, or None and why none does.

    A record covers the graph when it names this runtime, the file's SHA-256, this release and,
    for the INT8 graph, this CPU's int8 instruction set (the fp32 kernels only reorder sums).
    """
    sha = file_sha256(graph)
    records = [c for c in read_checks(meta) if c.runtime == RUNTIME and c.graph_sha256 == sha]
    if not records:
        return None, f"no recorded OpenVINO check of {graph.name}"
    records = [c for c in records if release(c.version) == release(version)]
    if not records:
        return None, f"{graph.name} was checked with other OpenVINO releases, not {release(version)}"
    if kind == Backend.INT8:
        records = [c for c in records if c.cpu_isa == isa]
        if not records:
            return None, f"{graph.name} was checked under OpenVINO {release(version)} on other CPUs, not on {isa}"
    passed = [c for c in records if c.passed_check]
    if not passed:
        return None, f"{graph.name} failed its OpenVINO {release(version)} check on {isa}"
    return passed[-1], "checked"


def choose_graph(bundle: Path, meta: BundleMeta) -> tuple[str, Path, str | None]:
    """Which graph OpenVINO runs for ``bundle`` here: (kind, path, why it is unchecked, or None when checked).

    The fastest graph of :data:`GRAPH_ORDER` with a matching passing check; without one, the fp32
    graph (no quantization error) when there is one, else the INT8 graph.

    Raises:
        BackendError: OpenVINO is not installed, or the bundle has no ONNX graph.
    """
    version = openvino_version()
    if version is None:
        raise BackendError("The OpenVINO backend needs openvino: pip install 'pneumo[openvino]'.")
    graphs = bundle_graphs(bundle, meta)
    if not graphs:
        raise BackendError(
            f"{bundle} has no ONNX graph for OpenVINO to read; export one with `pneumo export onnx --model {bundle}`."
        )
    isa, reasons = cpu_isa(), []
    for kind in GRAPH_ORDER:
        if kind in graphs:
            record, why = matching_check(meta, graphs[kind], kind, version, isa)
            if record is not None:
                return kind, graphs[kind], None
            reasons.append(why)
    kind = Backend.FP32 if Backend.FP32 in graphs else Backend.INT8
    return kind, graphs[kind], f"OpenVINO {version} {'; '.join(reasons)}"


def checked_openvino(bundle: Path, meta: BundleMeta) -> Runner | None:
    """OpenVINO on the bundle's fastest checked graph, or None (logging why) when it cannot serve here.

    What ``auto`` tries first (:func:`pneumo.inference.runners.select_runner`).
    """
    if openvino_version() is None:
        log.debug("OpenVINO is not installed; auto serves with ONNX Runtime.")
        return None
    try:
        kind, path, unchecked = choose_graph(bundle, meta)
        if unchecked is None:
            return OpenVinoRunner(path, graph=kind)
        why = unchecked
    except BackendError as err:
        why = err.message
    log.info(
        "OpenVINO does not serve %s (%s); serving with ONNX Runtime. Record a check on this machine with "
        "`pneumo export openvino --model %s --data DIR`.",
        bundle,
        why,
        bundle,
    )
    return None


def openvino_runner(bundle: Path, meta: BundleMeta) -> Runner:
    """``backend="openvino"``: the fastest checked graph, else the fp32 graph, else the INT8 one (with a warning).

    Raises:
        BackendError: OpenVINO is not installed, or the bundle has no ONNX graph.
    """
    kind, path, unchecked = choose_graph(bundle, meta)
    if unchecked is not None and kind == Backend.INT8:
        log.warning(
            "OpenVINO serves %s with its INT8 graph, which has no passing check for this release and CPU (%s); "
            "record one with `pneumo export openvino --model %s --data DIR`.",
            bundle,
            unchecked,
            bundle,
        )
    return OpenVinoRunner(path, graph=kind)


def describe_checks(meta: BundleMeta) -> list[dict[str, Any]]:
    """The recorded OpenVINO checks in brief (graph, release, CPU, agreement), for the bench and the docs."""
    return [
        {
            "graph": c.graph,
            "version": c.version,
            "cpu_isa": c.cpu_isa,
            "cpu": c.cpu,
            "passed": c.passed_check,
            "validation_agreement": c.validation.get("decision_agreement"),
            "heldout_agreement": c.heldout.get("decision_agreement"),
        }
        for c in read_checks(meta)
        if c.runtime == RUNTIME
    ]


register_backend(OPENVINO, openvino_runner, auto=checked_openvino)
