"""The ONNX Runtime backend of :class:`~pneumo.serving.inference.Predictor`, and where ONNX files live.

Why ONNX Runtime: on a clinic laptop without a GPU, the same EfficientNet-Lite0 graph runs several
times faster under ONNX Runtime (fused convolutions, no Python dispatch per layer) than in eager
PyTorch. The exported graph (see :mod:`pneumo.modeling.export`) has one input ``input``
(N, 3, S, S) with a dynamic batch axis and two outputs, ``logits`` (N, C) and ``features`` (N, F),
exactly what :meth:`Predictor.forward` returns (the pooled features feed the out-of-distribution
gate), so the two backends are interchangeable.

Where the ONNX file lives: a bundle may hold ``model.onnx`` next to its weights
(``pneumo export onnx --model BUNDLE``). The default bundle does *not* ship one: its weights are
13.7 MB and the ONNX graph is as large again, over the package's 25 MB budget. Instead, the first
:class:`Predictor` that wants ONNX exports the graph once into a per-user cache
(``$PNEUMO_CACHE/onnx``, else ``$XDG_CACHE_HOME/pneumo/onnx``, else ``~/.cache/pneumo/onnx``),
named by the SHA-256 of the weights, and every later start reuses it.

Every exported file records the SHA-256 of the weights it was made from; a ``model.onnx`` whose
weights have since changed (a bundle retrained in place) is ignored with a warning, so the ONNX
backend can never answer with stale weights.

No torch here: running an existing export needs only onnxruntime; exporting (first use of a
bundle without an export) imports the training stack lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from pneumo.core.bundle import WEIGHTS_FILE, resolve_bundle
from pneumo.core.environment import available_cores
from pneumo.core.errors import PneumoError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
#: The statically quantized (INT8, QDQ) graph a bundle may ship (see :mod:`pneumo.modeling.quantize`).
INT8_FILE = "model_int8.onnx"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
#: Optional third output: the last feature map (N, C, h, w), from which CAM heatmaps are computed.
FEATURE_MAP_OUTPUT = "feature_map"
#: ``int8`` = the bundle's quantized graph, ``onnx`` = the fp32 graph, ``torch`` = eager PyTorch.
BACKENDS = ("auto", "int8", "onnx", "torch")
#: Metadata key (in the ONNX model's ``metadata_props``) holding the SHA-256 of the source weights.
WEIGHTS_SHA_KEY = "pneumo_weights_sha256"
#: Metadata key naming the state-dict prefix of the linear head (set when CAM equals Grad-CAM).
CAM_HEAD_KEY = "pneumo_cam_head"
#: Cached exports kept (most recently used first); older ones are deleted after each new export.
CACHE_KEEP = 8


class OnnxBackendError(PneumoError):
    """The ONNX backend was asked for and cannot be used (no onnxruntime, export failed, bad file)."""

    code = "onnx_unavailable"
    http_status = 500


# ------------------------------------------------------------------------------------------ files


def weights_sha256(bundle_dir: str | Path) -> str:
    """SHA-256 of the bundle's weights: names the cached export and detects stale ``model.onnx`` files."""
    return file_sha256(Path(bundle_dir) / WEIGHTS_FILE)


def cache_dir() -> Path:
    """Folder of cached exports: ``$PNEUMO_CACHE/onnx``, ``$XDG_CACHE_HOME/pneumo/onnx`` or ``~/.cache/pneumo/onnx``."""
    if os.environ.get("PNEUMO_CACHE"):
        return Path(os.environ["PNEUMO_CACHE"]).expanduser() / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pneumo" / "onnx"


def cached_onnx_path(bundle_dir: str | Path, sha: str | None = None) -> Path:
    """Where the cached export of ``bundle_dir``'s weights lives (whether or not it exists yet)."""
    # ".fm": exports that carry the feature map output (older cached exports lack it and are re-made).
    return cache_dir() / f"{sha or weights_sha256(bundle_dir)}.fm.onnx"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (bundle.json records one per shipped ONNX file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_weights_sha(path: str | Path) -> str | None:
    """The weights hash recorded in an exported file, or None (not ours, or unreadable).

    Read with ONNX Runtime's model metadata, not the ``onnx`` package: the base install has no exporter.
    """
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # a damaged or foreign file: treated as absent
        return None
    return session.get_modelmeta().custom_metadata_map.get(WEIGHTS_SHA_KEY)


def find_int8(bundle_dir: str | Path) -> Path | None:
    """The bundle's quantized graph when bundle.json lists it with matching checksums, else None.

    Checksums instead of parsing the graph: the file's own SHA-256 (a damaged or replaced file) and
    the weights' SHA-256 it was made from (a bundle retrained in place), both recorded in bundle.json.
    """
    from pneumo.core.bundle import read_meta

    folder = resolve_bundle(bundle_dir)
    entry = read_meta(folder).files.get(INT8_FILE)
    path = folder / INT8_FILE
    if not entry or not path.is_file():
        return None
    if entry.get("sha256") != file_sha256(path) or entry.get("weights_sha256") != weights_sha256(folder):
        log.warning(
            "%s does not match the checksums in bundle.json (damaged, or the weights changed since); ignoring it. "
            "Regenerate it with `pneumo export onnx --int8 --model %s --calibration-data DIR`.",
            path,
            folder,
        )
        return None
    return path


def _passed_check(bundle_dir: str | Path) -> bool:
    from pneumo.core.bundle import read_meta

    return bool(read_meta(resolve_bundle(bundle_dir)).files.get(INT8_FILE, {}).get("passed_check", False))


def find_onnx(bundle_dir: str | Path) -> Path | None:
    """An up-to-date ONNX export of the bundle: its own ``model.onnx``, else the cached export, else None."""
    folder = resolve_bundle(bundle_dir)
    sha = weights_sha256(folder)
    own = folder / ONNX_FILE
    if own.is_file():
        if onnx_weights_sha(own) == sha:
            return own
        log.warning(
            "%s was not exported from this bundle's weights (retrained since?); ignoring it. "
            "Run `pneumo export onnx --model %s` to refresh it.",
            own,
            folder,
        )
    cached = cached_onnx_path(folder, sha)
    if cached.is_file() and onnx_weights_sha(cached) == sha:
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
        kind: what the graph is, ``"onnx"`` (fp32) or ``"int8"``; reported as the Predictor's backend.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, spin: bool = False, kind: str = "onnx") -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise OnnxBackendError("The ONNX backend needs onnxruntime: pip install onnxruntime.") from err
        self.path = Path(path)
        #: ``"int8"`` (the bundle's quantized graph) or ``"onnx"`` (fp32): the Predictor's ``backend``.
        self.kind = kind
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
            raise OnnxBackendError(f"ONNX Runtime cannot load {self.path}: {err}", code="onnx_load_failed") from err
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs not in (list(OUTPUT_NAMES), [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT]):
            raise OnnxBackendError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                f"{list(OUTPUT_NAMES)} (+ {FEATURE_MAP_OUTPUT!r}). Export it with `pneumo export onnx`.",
                code="onnx_load_failed",
            )
        #: The graph's metadata (weights hash, architecture, CAM head).
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        #: Whether :meth:`with_feature_map` works (the graph exports its last feature map).
        self.has_feature_map = FEATURE_MAP_OUTPUT in outputs

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and pooled features (N, F) of a preprocessed float32 batch (N, 3, S, S)."""
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return logits, features

    def with_feature_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits, pooled features and the last feature map (N, C, h, w), in one pass (for CAM)."""
        if not self.has_feature_map:
            raise OnnxBackendError(f"{self.path} does not export its feature map; re-export it.", code="onnx_no_cam")
        logits, features, feature_map = self.session.run(
            [*OUTPUT_NAMES, FEATURE_MAP_OUTPUT], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}
        )
        return logits, features, feature_map


def select_onnx_runner(bundle_dir: str | Path, backend: str = "auto", *, device: str = "cpu") -> OnnxRunner | None:
    """Resolve the Predictor's ``backend`` choice: an :class:`OnnxRunner` (``runner.kind`` says which), or None.

    ``"torch"`` always gives None (PyTorch). ``"int8"`` gives the bundle's quantized graph or raises;
    ``"onnx"`` the fp32 graph (the bundle's ``model.onnx`` or the cached export, exporting it the
    first time, which needs the ``[train]`` extra) or raises. ``"auto"``, on the CPU, takes int8 when
    the bundle ships it and it passed its check against fp32, else fp32 ONNX, else an INT8 graph that
    missed the check (a base install has no exporter), else PyTorch, logging why it passes over each; a
    prediction never fails because a fast path did. Under ``"auto"`` the environment variable
    ``PNEUMO_BACKEND`` (``int8``, ``onnx`` or ``torch``) overrides the choice.

    Raises:
        OnnxBackendError: ``backend`` is unknown, or ``"int8"``/``"onnx"`` was asked for and is impossible.
    """
    if backend not in BACKENDS:
        raise OnnxBackendError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.", code="bad_backend")
    if backend == "auto":
        override = os.environ.get("PNEUMO_BACKEND", "").strip().lower()
        if override and override != "auto":
            if override not in BACKENDS:
                raise OnnxBackendError(
                    f"PNEUMO_BACKEND={override!r} is not a backend; use one of {', '.join(BACKENDS)}.",
                    code="bad_backend",
                )
            return select_onnx_runner(bundle_dir, override, device=device)
    if backend == "torch":
        return None
    if device.split(":")[0] != "cpu":
        if backend != "auto":
            raise OnnxBackendError(
                f"The {backend} backend runs on the CPU, but device={device!r} was asked for; "
                "use device='cpu' or backend='torch'.",
                code="bad_backend",
            )
        return None  # a GPU is faster in PyTorch than the CPU in ONNX Runtime
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        if backend != "auto":
            raise OnnxBackendError(f"backend={backend!r} needs onnxruntime: pip install onnxruntime.") from err
        log.info("onnxruntime is not installed; using PyTorch.")
        return None
    if backend in ("auto", "int8"):
        runner = _int8_runner(bundle_dir, required=backend == "int8", checked_only=backend == "auto")
        if runner is not None:
            return runner
    try:
        path = find_onnx(bundle_dir)
        if path is None:
            log.info("No ONNX export of %s yet; exporting it once into %s.", bundle_dir, cache_dir())
            try:
                from pneumo.modeling.export import export_onnx  # lazy: exporting needs torch
            except ImportError as err:
                raise OnnxBackendError(
                    "Exporting the fp32 ONNX graph needs the training stack: pip install 'pneumo[train]'."
                ) from err
            path = export_onnx(bundle_dir, out=cached_onnx_path(bundle_dir))
            prune_cache()
        return OnnxRunner(path, kind="onnx")
    except Exception as err:
        if backend == "onnx":
            if isinstance(err, OnnxBackendError):
                raise
            raise OnnxBackendError(f"The ONNX backend is unavailable: {type(err).__name__}: {err}") from err
        if backend == "auto":  # no exporter (a base install): an INT8 graph that missed the bar beats no model
            fallback = _int8_runner(bundle_dir, required=False, checked_only=False)
            if fallback is not None:
                log.warning(
                    "Serving %s with its INT8 graph, which did not pass the agreement check against fp32 (see "
                    "bundle.json files); install 'pneumo[train]' to serve the fp32 graph (%s).",
                    bundle_dir,
                    err,
                )
                return fallback
        log.warning("ONNX Runtime unavailable for %s (%s); falling back to PyTorch.", bundle_dir, err)
        return None


def _int8_runner(bundle_dir: str | Path, *, required: bool, checked_only: bool = False) -> OnnxRunner | None:
    """The bundle's INT8 graph as a runner; None (or, when ``required``, an error) when it has none.

    With ``checked_only``, a graph whose entry says it did not pass the agreement check against fp32
    (``passed_check: false``, written by ``--force``) counts as none: ``auto`` then prefers fp32.
    """
    path = find_int8(bundle_dir)
    if path is not None and checked_only and not _passed_check(bundle_dir):
        log.info("The INT8 graph of %s did not pass the agreement check; trying the fp32 ONNX graph.", bundle_dir)
        return None
    if path is None:
        if required:
            raise OnnxBackendError(
                f"{bundle_dir} ships no valid {INT8_FILE}; make one with "
                "`pneumo export onnx --int8 --calibration-data DIR --model BUNDLE`.",
            )
        log.info("%s has no INT8 graph; trying the fp32 ONNX graph.", bundle_dir)
        return None
    try:
        return OnnxRunner(path, kind="int8")
    except OnnxBackendError:
        if required:
            raise
        log.warning("The INT8 graph of %s cannot be loaded; trying the fp32 ONNX graph.", bundle_dir, exc_info=True)
        return None
