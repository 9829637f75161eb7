"""The backends of :class:`~pneumo.inference.predictor.Predictor`, how one is chosen, and where the graphs live.

Why ONNX Runtime: on a clinic laptop without a GPU, the same EfficientNet graph runs several times
faster under ONNX Runtime (fused convolutions, no Python dispatch per layer) than in eager PyTorch.
Every exported graph follows the bundle's I/O contract (:mod:`pneumo.core.bundle`: one input
(N, 3, S, S), outputs ``logits`` (N, C) and ``features`` (N, F), optionally the last feature map),
exactly what :meth:`Predictor.forward` returns, so the backends are interchangeable.

Where the graphs live: a bundle may ship its INT8 graph (``model_int8.onnx``, listed with its
checksums in ``bundle.json``) and may hold an fp32 ``model.onnx``. The default bundle ships only
the INT8 graph (the fp32 one would take the package over its 25 MB budget); ``pneumo export onnx``
writes the fp32 graph of any bundle, into the bundle or, for the shipped one, into a per-user cache
(``$PNEUMO_CACHE/onnx``, else ``$XDG_CACHE_HOME/pneumo/onnx``, else ``~/.cache/pneumo/onnx``) named
by the SHA-256 of the weights. Exporting is always an explicit step: a Predictor never exports.

Every graph records the SHA-256 of the weights it was made from; a graph whose weights have since
changed (a bundle retrained in place) is ignored with a warning, so no backend answers with stale weights.

The PyTorch backend belongs to the training stack: :mod:`pneumo.modeling.torch_backend` registers
it here (:func:`register_backend`) when imported, so this module never imports torch or the
training code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from pneumo.core.bundle import (
    FEATURE_MAP_OUTPUT,
    INPUT_NAME,
    INPUT_SIZE_KEY,
    INT8_FILE,
    ONNX_FILE,
    OUTPUT_NAMES,
    WEIGHTS_FILE,
    WEIGHTS_SHA_KEY,
    Backend,
    BundleMeta,
    bundle_file,
)
from pneumo.core.environment import available_cores
from pneumo.core.errors import PneumoError

log = logging.getLogger(__name__)


class Runner(Protocol):
    """A backend: preprocessed float32 batch (N, 3, S, S) -> (logits (N, C), pooled features (N, F))."""

    #: Which backend it is (a :class:`Backend` value or a registered name): the Predictor's ``backend``.
    kind: str

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class GraphRunner(Runner, Protocol):
    """A runner of one of the bundle's ONNX graphs (ONNX Runtime or OpenVINO): CAM reads its feature map."""

    #: The graph's ONNX metadata (weights hash, architecture, CAM head).
    metadata: dict[str, str]
    #: Whether :meth:`with_feature_map` works (the graph exports its last feature map).
    has_feature_map: bool

    def with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


#: Makes a backend's runner for a bundle folder and its metadata (see :func:`register_backend`).
RunnerFactory = Callable[[Path, BundleMeta], Runner]
#: Cached exports kept (most recently used first); older ones are deleted after each new export.
CACHE_KEEP = 8


class BackendError(PneumoError):
    """The backend asked for cannot run this bundle here (no graph, no runtime, a bad file, an unknown name)."""

    code = "backend_unavailable"
    http_status = 500


# ------------------------------------------------------------------------------------------ files


def weights_sha256(bundle: str | Path) -> str:
    """SHA-256 of the bundle's weights: names the cached export and detects stale graphs."""
    path = bundle_file(bundle, WEIGHTS_FILE)
    assert path is not None  # required
    return file_sha256(path)


def cache_dir() -> Path:
    """Folder of cached exports: ``$PNEUMO_CACHE/onnx``, ``$XDG_CACHE_HOME/pneumo/onnx`` or ``~/.cache/pneumo/onnx``."""
    if os.environ.get("PNEUMO_CACHE"):
        return Path(os.environ["PNEUMO_CACHE"]).expanduser() / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pneumo" / "onnx"


def cached_onnx_path(bundle: str | Path, input_size: int, sha: str | None = None) -> Path:
    """Where the cached export of ``bundle``'s weights at ``input_size`` lives (whether or not it exists yet).

    The input size is part of the name: the graph's spatial size is fixed at export.
    """
    return cache_dir() / f"{sha or weights_sha256(bundle)}-{input_size}.onnx"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (bundle.json records one per shipped ONNX file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_metadata(path: str | Path) -> dict[str, str]:
    """What an exported graph records about its source (weights hash, architecture, input size); empty if unreadable.

    Read with ONNX Runtime's model metadata, not the ``onnx`` package: the base install has no exporter.
    """
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged or foreign file: treated as absent
        return {}
    return dict(session.get_modelmeta().custom_metadata_map)


def _fits(path: Path, sha: str, meta: BundleMeta) -> bool:
    recorded = graph_metadata(path)
    return recorded.get(WEIGHTS_SHA_KEY) == sha and recorded.get(INPUT_SIZE_KEY) == str(meta.preprocess.input_size)


def find_int8(bundle: str | Path, meta: BundleMeta) -> Path | None:
    """The bundle's quantized graph when ``meta`` lists it with matching checksums, else None.

    Checksums instead of parsing the graph: the file's own SHA-256 (a damaged or replaced file) and
    the weights' SHA-256 it was made from (a bundle retrained in place), both recorded in bundle.json.
    """
    entry = meta.int8
    path = bundle_file(bundle, INT8_FILE, required=False)
    if entry is None or path is None:
        return None
    if entry.sha256 != file_sha256(path) or entry.weights_sha256 != weights_sha256(bundle):
        log.warning(
            "%s does not match the checksums in bundle.json (damaged, or the weights changed since); ignoring it. "
            "Regenerate it with `pneumo export onnx --int8 --model %s --calibration-data DIR`.",
            path,
            bundle,
        )
        return None
    return path


def find_onnx(bundle: str | Path, meta: BundleMeta) -> Path | None:
    """An up-to-date fp32 ONNX export of the bundle: its own ``model.onnx``, else the cached export, else None.

    Up to date: made from these weights (their SHA-256) at this input size, both recorded in the graph.
    """
    folder = Path(bundle)
    sha = weights_sha256(folder)
    own = bundle_file(folder, ONNX_FILE, required=False)
    if own is not None:
        if _fits(own, sha, meta):
            return own
        log.warning(
            "%s was not exported from this bundle's weights at its input size (retrained since?); ignoring it. "
            "Run `pneumo export onnx --model %s` to refresh it.",
            own,
            folder,
        )
    cached = cached_onnx_path(folder, meta.preprocess.input_size, sha)
    if cached.is_file() and _fits(cached, sha, meta):
        with contextlib.suppress(OSError):
            os.utime(cached)  # mark as recently used, for prune_cache
        return cached
    return None


def prune_cache(keep: int = CACHE_KEEP) -> list[Path]:
    """Delete all but the ``keep`` most recently used cached exports; returns the deleted files.

    Every retrained bundle adds one file (~14 MB for Lite0); without pruning the cache would grow forever.
    """
    files = sorted(cache_dir().glob("*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    removed = []
    for old in files[keep:]:
        with contextlib.suppress(OSError):  # another process may be pruning too
            old.unlink()
            removed.append(old)
    return removed


# ---------------------------------------------------------------------------------------- runtime


class OnnxRunner:
    """An ONNX Runtime CPU session with :meth:`Predictor.forward`'s contract: batch -> (logits, features).

    Session settings: one intra-op thread per available core (the model is the only heavy work
    during a prediction), one inter-op thread (the graph is a chain: nothing runs in parallel
    between nodes), all graph optimizations (Conv+BN+activation fusion, constant folding), and
    worker threads that spin-wait *during* a run but stop when it returns
    (``session.force_spinning_stop``). Without spinning, each of the ~100 parallel sections of a
    forward pass wakes the sleeping worker; with ONNX Runtime's default, the workers keep spinning
    *after* each run, which on a 2-core machine takes the core the next image's decoding needs and
    starves everything else (single-image latency on 2 loaded cores: 61 ms without spinning, 140 ms
    with it). Stopping at the end of each run keeps the first gain without the second cost.
    Measured with the round-5 INT8 graph at batch 1, 3 ms between runs, p50 without spinning /
    spinning within runs / always spinning: idle 6.3 / 5.3 / 5.2 ms, beside two busy processes
    12.0 / 11.7 / 14.3 ms. ``run`` is thread-safe, so one runner serves every request of the API.

    Args:
        path: the exported ``.onnx`` file.
        threads: intra-op threads; default: :func:`available_cores`.
        spin: let worker threads keep spin-waiting between runs too (ONNX Runtime's default; lowest
            latency for back-to-back runs on an otherwise idle machine only).
        kind: what the graph is, ``"fp32"`` or ``"int8"``; reported as the Predictor's backend.
    """

    def __init__(
        self, path: str | Path, *, threads: int | None = None, spin: bool = False, kind: str = Backend.FP32
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise BackendError("The ONNX backend needs onnxruntime: pip install onnxruntime.") from err
        self.path = Path(path)
        #: ``"int8"`` (the bundle's quantized graph) or ``"fp32"``: the Predictor's ``backend``.
        self.kind = str(kind)
        self.spin = spin
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "0" if spin else "1")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise BackendError(f"ONNX Runtime cannot load {self.path}: {err}", code="onnx_load_failed") from err
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs not in (list(OUTPUT_NAMES), [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT]):
            raise BackendError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                f"{list(OUTPUT_NAMES)} (+ {FEATURE_MAP_OUTPUT!r}). Export it with `pneumo export onnx`.",
                code="onnx_load_failed",
            )
        #: The graph's metadata (weights hash, architecture, CAM head).
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        #: Whether :meth:`with_feature_map` works (the graph exports its last feature map).
        self.has_feature_map = FEATURE_MAP_OUTPUT in outputs

    def with_threads(self, threads: int) -> OnnxRunner:
        """Another session of the same graph with ``threads`` intra-op threads (batch work beside decoding)."""
        return OnnxRunner(self.path, threads=threads, spin=self.spin, kind=self.kind)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and pooled features (N, F) of a preprocessed float32 batch (N, 3, S, S)."""
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return logits, features

    def with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, pooled features and the last feature map (N, C, h, w), in one pass (for CAM)."""
        if not self.has_feature_map:
            raise BackendError(f"{self.path} does not export its feature map; re-export it.", code="onnx_no_cam")
        logits, features, feature_map = self.session.run(
            [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}
        )
        return logits, features, feature_map


#: A registered backend's offer to ``auto``: its runner when it is installed and checked for the bundle, else None.
AutoFactory = Callable[[Path, BundleMeta], "Runner | None"]
_FACTORIES: dict[str, RunnerFactory] = {}
_AUTO: dict[str, AutoFactory] = {}


def register_backend(name: Backend | str, factory: RunnerFactory, *, auto: AutoFactory | None = None) -> None:
    """Make ``backend=name`` available to every Predictor (the training stack registers ``torch`` this way).

    ``auto``: how ``backend="auto"`` may pick this backend before the ONNX Runtime graphs: it returns
    a runner only where the backend is installed and its check for the bundle passes (else None,
    logging why); OpenVINO (:mod:`pneumo.inference.openvino`) registers itself so.
    """
    _FACTORIES[str(name)] = factory
    if auto is not None:
        _AUTO[str(name)] = auto


def backend_names() -> list[str]:
    """Every backend name a Predictor accepts here: ``auto``, the ONNX ones and the registered ones."""
    return [Backend.AUTO, Backend.INT8, Backend.FP32, *_FACTORIES]


def parse_backend(name: Backend | str) -> str:
    """``name`` checked against the known backends (the one place a backend name is validated).

    Raises:
        BackendError: ``bad_backend``, naming the known ones.
    """
    value = str(name).strip().lower()
    known = [str(b) for b in Backend] + list(_FACTORIES)
    if value not in known:
        raise BackendError(
            f"Unknown backend {name!r}; use one of {', '.join(dict.fromkeys(known))}.", code="bad_backend"
        )
    return value


def select_runner(bundle: Path, meta: BundleMeta, backend: Backend | str = Backend.AUTO) -> Runner:
    """Resolve a Predictor's ``backend`` into a runner (``runner.kind`` says which one answers).

    ``int8`` is the bundle's quantized graph, ``fp32`` its fp32 ONNX graph (the bundle's
    ``model.onnx`` or the export in the user cache), a registered name (``torch``) that backend.
    ``auto`` first asks the backends registered with an ``auto`` offer (OpenVINO: where it is installed
    and a recorded check covers one of the bundle's graphs, :mod:`pneumo.inference.openvino`), then
    takes int8 when the bundle ships it and it passed its check against fp32, else the fp32 graph when
    one was exported, else an INT8 graph that missed the check (with a warning), logging why it passes
    over each. The environment variable ``PNEUMO_BACKEND`` overrides ``auto``.

    Raises:
        BackendError: the name is unknown, or the backend asked for (or every one, under ``auto``) cannot run.
    """
    choice = parse_backend(backend)
    if choice == Backend.AUTO:
        override = os.environ.get("PNEUMO_BACKEND", "").strip().lower()
        if override and override != Backend.AUTO:
            try:
                choice = parse_backend(override)
            except BackendError as err:
                raise BackendError(f"PNEUMO_BACKEND={override!r}: {err.message}", code="bad_backend") from err
    if choice in _FACTORIES:
        return _FACTORIES[choice](bundle, meta)
    if choice == Backend.TORCH:  # the training stack is not imported
        raise BackendError(
            f"The {choice} backend is not loaded: it comes with the training stack "
            "(pip install 'pneumo[train]', then use pneumo.modeling.torch_predictor(bundle)).",
            code="bad_backend",
        )
    if choice not in (Backend.AUTO, Backend.INT8, Backend.FP32):
        raise BackendError(f"The {choice} backend is not registered here.", code="bad_backend")
    if choice == Backend.AUTO:
        for offer in _AUTO.values():  # OpenVINO, where installed and checked for this bundle
            runner = offer(bundle, meta)
            if runner is not None:
                return runner
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise BackendError("The ONNX backends need onnxruntime: pip install onnxruntime.") from err
    int8 = find_int8(bundle, meta)
    checked = int8 is not None and meta.int8 is not None and meta.int8.passed_check
    if choice == Backend.INT8 or (choice == Backend.AUTO and checked):
        if int8 is None:
            raise BackendError(
                f"{bundle} ships no valid {INT8_FILE}; make one with "
                "`pneumo export onnx --int8 --calibration-data DIR --model BUNDLE`.",
            )
        return OnnxRunner(int8, kind=Backend.INT8)
    fp32 = find_onnx(bundle, meta)
    if fp32 is not None:
        return OnnxRunner(fp32, kind=Backend.FP32)
    if choice == Backend.AUTO and int8 is not None:
        log.warning(
            "Serving %s with its INT8 graph, which did not pass the agreement check against fp32 (see bundle.json "
            "files); export the fp32 graph (`pneumo export onnx --model %s`) to serve that instead.",
            bundle,
            bundle,
        )
        return OnnxRunner(int8, kind=Backend.INT8)
    raise BackendError(
        f"{bundle} has no fp32 ONNX graph{'' if choice == Backend.FP32 else ' and no INT8 graph'}; export one with "
        f"`pneumo export onnx --model {bundle}` (needs pip install 'pneumo[train]').",
    )
